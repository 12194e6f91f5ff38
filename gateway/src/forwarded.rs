//! `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded` (RFC 7239).
//!
//! What a client says about where a request came from is believed only when the client is a
//! configured trusted proxy (`trusted_proxies` in the manifest): then the gateway appends itself
//! to the chain it received. From anyone else those headers are removed and replaced with what the
//! gateway saw, so an upstream can never be told a forged client address. This runs before any
//! plugin, so plugins see the same values the upstream will.

use std::net::{IpAddr, SocketAddr};

use http::header::{FORWARDED, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The headers this module writes (`apply` refers to them by index in this order).
static FORWARDING: [&HeaderName; 4] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &FORWARDED,
];
// Their indices in `FORWARDING`.
const XFF: usize = 0;
const XFP: usize = 1;
const XFH: usize = 2;
const RFC_7239: usize = 3;

/// Whether `name` is one of the forwarding headers this module writes.
pub fn is_forwarding(name: &HeaderName) -> bool {
    FORWARDING.contains(&name)
}

/// Whether `name`, in any case, names one of the forwarding headers this module writes.
pub fn is_forwarding_name(name: &str) -> bool {
    FORWARDING
        .iter()
        .any(|known| known.as_str().eq_ignore_ascii_case(name))
}

/// The networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses addresses (`10.0.0.7`) and networks (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("`{entry}` in `trusted_proxies` is not an address or a network")
                    })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    /// Whether `ip` is one of them.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// A client's address as the forwarding headers write it: worked out once per connection rather
/// than formatted again for every request on it.
#[derive(Debug)]
pub struct ClientAddr {
    addr: SocketAddr,
    /// The address without its port, an IPv4-mapped IPv6 address written as IPv4.
    ip: IpAddr,
    /// The address as an `X-Forwarded-For` entry.
    listed: HeaderValue,
    /// The RFC 7239 `for` parameter: an IPv6 address is quoted and bracketed.
    node: Box<str>,
    /// Address and port, as plugins read them (`request.client-addr`).
    text: Box<str>,
}

impl ClientAddr {
    /// The forwarding texts of a connection from `addr`.
    pub fn new(addr: SocketAddr) -> ClientAddr {
        let ip = addr.ip().to_canonical();
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => format!("for={text}"),
            IpAddr::V6(_) => format!("for=\"[{text}]\""),
        };
        ClientAddr {
            addr,
            ip,
            listed: HeaderValue::try_from(text).expect("an address is visible ASCII"),
            node: node.into(),
            text: addr.to_string().into(),
        }
    }

    /// The client's address and port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The client's address and port as text (`192.0.2.9:5000`, `[2001:db8::1]:5000`).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Sets the forwarding headers of a request received from `client` on a listener speaking
/// `proto`.
pub fn apply(
    headers: &mut HeaderMap,
    uri: &Uri,
    client: &ClientAddr,
    proto: &'static str,
    trusted: &TrustedProxies,
) {
    if let Some(pending) = prepare(headers, uri, client, proto, trusted) {
        pending.fields(client).insert_into(headers);
    }
}

/// Does what [`apply`] does, except where the request keeps none of the forwarding headers it
/// carried (the usual case: it carried none, or not from a trusted proxy): then the four to add
/// are returned rather than inserted, for whoever sends the request to write. wasmgate's own
/// client writes them straight into the request it sends ([`Fields::write_lines`]), which costs
/// a route without plugins four map insertions and the `Forwarded` value's own allocation; a
/// chain inserts them only when a plugin reads or edits one of them.
pub fn prepare(
    headers: &mut HeaderMap,
    uri: &Uri,
    client: &ClientAddr,
    proto: &'static str,
    trusted: &TrustedProxies,
) -> Option<Pending> {
    // Which of the four the request carries, found in one pass over its names instead of a
    // hashed lookup for each (this runs for every request, and most carry none of them).
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(index) = FORWARDING.iter().position(|known| *known == name) {
            present |= 1 << index;
        }
    }
    if present != 0 && !trusted.trusts(client.ip) {
        for (index, name) in FORWARDING.iter().enumerate() {
            if present & 1 << index != 0 {
                headers.remove(*name);
            }
        }
        present = 0;
    }
    // The host the client asked for: `Host`, or the authority of an HTTP/2 or absolute-form URI.
    let host = headers.get(HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let pending = Pending { proto, host };
    if present == 0 {
        return Some(pending);
    }
    // A trusted proxy's headers: extended (or, where one is missing, added) here.
    let carries = |index: usize| present & 1 << index != 0;
    if carries(XFF) {
        append(headers, &X_FORWARDED_FOR, client.listed.as_bytes(), ", ");
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), client.listed.clone());
    }
    if !carries(XFP) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !carries(XFH)
        && let Some(host) = &pending.host
    {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let element = pending.fields(client).element();
    if carries(RFC_7239) {
        append(headers, &FORWARDED, element.as_bytes(), ", ");
    } else if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(element)) {
        headers.insert(FORWARDED, value);
    }
    None
}

/// The four forwarding headers of a request that kept none of its own, but for the client
/// they name (its connection's [`ClientAddr`]): held until they are written or inserted.
#[derive(Debug, Clone)]
pub struct Pending {
    proto: &'static str,
    /// The host the client asked for, when it named one.
    host: Option<HeaderValue>,
}

impl Pending {
    /// How many headers they are.
    pub fn count(&self) -> usize {
        3 + usize::from(self.host.is_some())
    }

    /// The headers, naming `client`.
    pub fn fields<'a>(&'a self, client: &'a ClientAddr) -> Fields<'a> {
        Fields {
            client,
            proto: self.proto,
            host: self.host.as_ref(),
        }
    }
}

/// The four forwarding headers of a request that kept none of its own.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    client: &'a ClientAddr,
    proto: &'static str,
    /// The host the client asked for, when it named one.
    host: Option<&'a HeaderValue>,
}

impl Fields<'_> {
    /// Inserts them into `headers`.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        headers.insert(X_FORWARDED_FOR.clone(), self.client.listed.clone());
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.proto),
        );
        if let Some(host) = self.host {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(self.element())) {
            headers.insert(FORWARDED, value);
        }
    }

    /// Writes them as HTTP/1.1 field lines (`name: value\r\n`), as [`Fields::insert_into`]
    /// would set them.
    pub fn write_lines(&self, out: &mut Vec<u8>) {
        let mut line = |name: &HeaderName, parts: &[&[u8]]| {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            for part in parts {
                out.extend_from_slice(part);
            }
            out.extend_from_slice(b"\r\n");
        };
        line(&X_FORWARDED_FOR, &[self.client.listed.as_bytes()]);
        line(&X_FORWARDED_PROTO, &[self.proto.as_bytes()]);
        if let Some(host) = self.host {
            line(&X_FORWARDED_HOST, &[host.as_bytes()]);
        }
        line(&FORWARDED, &self.element_parts().map(str::as_bytes));
    }

    /// The RFC 7239 element for this hop, in the pieces it is written from: `for`, `host`
    /// (quoted when it is not a plain token: a port's colon is allowed in a token, brackets are
    /// not; all four pieces empty without a host) and `proto`.
    fn element_parts(&self) -> [&str; 7] {
        let node = &*self.client.node;
        match self.host.and_then(|h| h.to_str().ok()) {
            Some(host) => {
                let quote = if host.bytes().all(is_token_byte) {
                    ""
                } else {
                    "\""
                };
                [node, ";host=", quote, host, quote, ";proto=", self.proto]
            }
            None => [node, "", "", "", "", ";proto=", self.proto],
        }
    }

    /// The element as one value (one allocation of its exact size).
    fn element(&self) -> String {
        self.element_parts().concat()
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b)
}

/// Appends `value` to the header's values, joined into one line (so a list stays one line), or
/// sets it.
fn append(headers: &mut HeaderMap, name: &HeaderName, value: &[u8], separator: &str) {
    let mut combined = Vec::new();
    for received in headers.get_all(name) {
        // A received value that cannot be extended (not visible ASCII) is dropped for ours.
        if received.to_str().is_ok() {
            combined.extend_from_slice(received.as_bytes());
            combined.extend_from_slice(separator.as_bytes());
        }
    }
    combined.extend_from_slice(value);
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(combined)) {
        headers.insert(name.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn untrusted_clients_cannot_forge_their_address() {
        let mut headers = request(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        let peer = ClientAddr::new("192.0.2.9:5000".parse().unwrap());
        apply(
            &mut headers,
            &Uri::from_static("/x"),
            &peer,
            "http",
            &TrustedProxies::default(),
        );
        assert_eq!(headers["x-forwarded-for"], "192.0.2.9");
        assert_eq!(peer.text(), "192.0.2.9:5000");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "api.example.com");
        assert_eq!(
            headers["forwarded"],
            "for=192.0.2.9;host=api.example.com;proto=http"
        );
        assert_one_each(&headers);
    }

    #[test]
    fn fields_written_as_lines_are_the_fields_inserted() {
        for (host, client) in [
            (Some("api.example.com"), "192.0.2.9:5000"),
            (Some("[2001:db8::1]:8443"), "[2001:db8::2]:5000"),
            (None, "192.0.2.9:5000"),
        ] {
            let mut headers = request(&host.map(|h| vec![("host", h)]).unwrap_or_default());
            let peer = ClientAddr::new(client.parse().unwrap());
            let trusted = TrustedProxies::default();
            let pending = prepare(
                &mut headers,
                &Uri::from_static("/x"),
                &peer,
                "https",
                &trusted,
            )
            .expect("nothing to keep: the fields are handed back");
            let fields = pending.fields(&peer);
            assert_eq!(
                headers.len(),
                usize::from(host.is_some()),
                "nothing inserted"
            );
            let mut inserted = HeaderMap::new();
            fields.insert_into(&mut inserted);
            let mut lines = Vec::new();
            fields.write_lines(&mut lines);
            let lines = String::from_utf8(lines).unwrap();
            let written: Vec<(&str, &str)> = lines
                .strip_suffix("\r\n")
                .unwrap()
                .split("\r\n")
                .map(|line| line.split_once(": ").unwrap())
                .collect();
            assert_eq!(written.len(), inserted.len(), "{lines}");
            for (name, value) in written {
                assert_eq!(inserted[name], value, "{name}");
            }
            // And as `apply` sets them.
            let mut applied = host.map(|h| request(&[("host", h)])).unwrap_or_default();
            apply(
                &mut applied,
                &Uri::from_static("/x"),
                &peer,
                "https",
                &trusted,
            );
            applied.remove(HOST);
            assert_eq!(applied, inserted);
        }
        // A trusted proxy's own headers are extended in the map at once: nothing handed back.
        let trusted = TrustedProxies::parse(&["192.0.2.0/24".into()]).unwrap();
        let mut headers = request(&[("host", "a"), ("x-forwarded-for", "1.2.3.4")]);
        let peer = ClientAddr::new("192.0.2.9:5000".parse().unwrap());
        assert!(
            prepare(
                &mut headers,
                &Uri::from_static("/x"),
                &peer,
                "http",
                &trusted
            )
            .is_none()
        );
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 192.0.2.9");
        assert_one_each(&headers);
    }

    /// Each forwarding header is one field, whether it was received, replaced or added.
    fn assert_one_each(headers: &HeaderMap) {
        for name in FORWARDING {
            assert_eq!(headers.get_all(name).iter().count(), 1, "{name}");
        }
    }

    #[test]
    fn trusted_proxies_are_appended_to() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let mut headers = request(&[
            ("host", "api.example.com:8443"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4;proto=https"),
        ]);
        let peer = ClientAddr::new("10.1.2.3:5000".parse().unwrap());
        apply(
            &mut headers,
            &Uri::from_static("/x"),
            &peer,
            "http",
            &trusted,
        );
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.1.2.3");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers["forwarded"],
            "for=1.2.3.4;proto=https, for=10.1.2.3;host=api.example.com:8443;proto=http"
        );
        // Not received, so added.
        assert_eq!(headers["x-forwarded-host"], "api.example.com:8443");
        assert_one_each(&headers);

        let mut v6 = request(&[("host", "[::1]:8080")]);
        let peer = ClientAddr::new("[::1]:5000".parse().unwrap());
        apply(&mut v6, &Uri::from_static("/x"), &peer, "http", &trusted);
        assert_eq!(
            v6["forwarded"],
            "for=\"[::1]\";host=\"[::1]:8080\";proto=http"
        );
        assert_eq!(v6["x-forwarded-for"], "::1");
        assert_one_each(&v6);
        // An IPv4 client on a dual-stack socket is written as IPv4.
        let mut mapped = request(&[]);
        let peer = ClientAddr::new("[::ffff:10.0.0.1]:5000".parse().unwrap());
        apply(
            &mut mapped,
            &Uri::from_static("/x"),
            &peer,
            "http",
            &trusted,
        );
        assert_eq!(mapped["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["proxy.example".into()]).is_err());
    }
}
