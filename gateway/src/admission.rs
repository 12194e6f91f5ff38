//! What a client request must satisfy before it is routed: size limits, unambiguous framing and
//! host, and a normalised path.
//!
//! hyper already refuses most malformed HTTP/1.1 (conflicting `Content-Length` values,
//! `Transfer-Encoding` that does not end in `chunked`, obsolete line folding, header names with
//! spaces) and answers 431 and 414 past its own, fixed, buffer limits. What it lets through and a
//! gateway must not is refused here: a repeated `Content-Length` (even with equal values),
//! `Content-Length` together with `Transfer-Encoding` (hyper drops the former and reads chunked;
//! a server behind us might not: request smuggling), `chunked` applied twice, a repeated `Host`,
//! HTTP/1.1 without `Host`, and the configurable limits.

use std::borrow::Cow;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, Version};

use crate::manifest::HttpSpec;
use crate::normalize::normalize;

/// A refused request: the status and the short reason sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 413, 414 or 431.
    pub status: StatusCode,
    /// One line for the client.
    pub reason: &'static str,
}

const fn refuse(status: StatusCode, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// Checks a request and normalises its path in place.
pub fn admit<B>(request: &mut Request<B>, http: &HttpSpec) -> Result<(), Refusal> {
    let uri_length = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_length as u64 > http.max_uri_length.0 {
        return Err(refuse(StatusCode::URI_TOO_LONG, "request target too long"));
    }
    let fields = check_headers(request.headers(), http)?;
    check_host(fields.host, request.version(), request.uri())?;
    // Checked here, before `Host` may be replaced below, and answered after it, as before.
    let framing = check_framing(&fields, http);
    if let Some(authority) = request.uri().authority() {
        // RFC 9112 section 3.2.2: with an absolute-form target (and HTTP/2's `:authority`), the
        // target's authority is the host, and `Host` is replaced by it. Routing uses it too, so
        // a request cannot be routed by one host and reach the upstream naming another.
        let value = Some(authority.as_str())
            .filter(|text| !text.contains('@'))
            .and_then(|text| http::HeaderValue::from_str(text).ok())
            .ok_or(refuse(StatusCode::BAD_REQUEST, "invalid authority"))?;
        request.headers_mut().insert(HOST, value);
    }
    framing?;

    let path = request.uri().path();
    if path == "*" {
        // `OPTIONS *` asks about the server, not a resource: no route can take it.
        return Err(refuse(StatusCode::BAD_REQUEST, "bad path: `*`"));
    }
    let normal = normalize(path, http.path_rules())
        .map_err(|bad| refuse(StatusCode::BAD_REQUEST, bad.reason()))?;
    if let Cow::Owned(normal) = normal {
        let uri =
            with_path(request.uri(), &normal).ok_or(refuse(StatusCode::BAD_REQUEST, "bad path"))?;
        *request.uri_mut() = uri;
    }
    Ok(())
}

/// The fields whose number and values admission checks, found in the one pass over the headers
/// that counts their size, rather than by a lookup each (three hashes of a name a request).
#[derive(Default)]
struct Fields<'h> {
    host: Occurrences<'h>,
    length: Occurrences<'h>,
    encoding: Occurrences<'h>,
}

/// The first value of a field, and whether there was another.
#[derive(Default, Clone, Copy)]
struct Occurrences<'h> {
    first: Option<&'h HeaderValue>,
    repeated: bool,
}

impl<'h> Occurrences<'h> {
    fn add(&mut self, value: &'h HeaderValue) {
        match self.first {
            Some(_) => self.repeated = true,
            None => self.first = Some(value),
        }
    }
}

fn check_headers<'h>(headers: &'h HeaderMap, http: &HttpSpec) -> Result<Fields<'h>, Refusal> {
    let too_large = refuse(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request headers too large",
    );
    if headers.len() > http.max_headers as usize {
        return Err(too_large);
    }
    let mut fields = Fields::default();
    let mut bytes = 0usize;
    for (name, value) in headers {
        bytes += name.as_str().len() + value.len();
        // Standard names compare as one small integer each.
        if name == HOST {
            fields.host.add(value);
        } else if name == CONTENT_LENGTH {
            fields.length.add(value);
        } else if name == TRANSFER_ENCODING {
            fields.encoding.add(value);
        }
    }
    if bytes as u64 > http.max_header_bytes.0 {
        return Err(too_large);
    }
    Ok(fields)
}

fn check_host(host: Occurrences<'_>, version: Version, uri: &Uri) -> Result<(), Refusal> {
    if host.repeated {
        return Err(refuse(StatusCode::BAD_REQUEST, "more than one Host header"));
    }
    match host.first {
        Some(value) => {
            // The router and the upstream read it as an authority: it must be one. Most are
            // plainly one; the rest are parsed in full (which copies the value).
            let valid = plain_authority(value.as_bytes())
                || value
                    .to_str()
                    .ok()
                    .and_then(|text| text.parse::<Authority>().ok())
                    .is_some_and(|authority| !authority.as_str().contains('@'));
            if !valid {
                return Err(refuse(StatusCode::BAD_REQUEST, "invalid Host header"));
            }
        }
        // RFC 9112 section 3.2: an HTTP/1.1 request without Host is refused. HTTP/2 clients
        // name the host in `:authority`, which is the URI's authority here.
        None if version == Version::HTTP_11 && uri.authority().is_none() => {
            return Err(refuse(StatusCode::BAD_REQUEST, "missing Host header"));
        }
        None => {}
    }
    Ok(())
}

/// Whether `value` is plainly an authority without user information: a name of ASCII letters,
/// digits, dots and hyphens, then perhaps `:` and a port's digits. Everything this accepts,
/// [`Authority`] accepts too; it costs a scan of the bytes where parsing an `Authority` copies
/// them (1.3 % of a bare request's instructions, docs/performance.md, session 24).
fn plain_authority(value: &[u8]) -> bool {
    let (name, port) = match memchr::memchr(b':', value) {
        Some(colon) => (&value[..colon], &value[colon + 1..]),
        None => (value, &b"0"[..]),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !port.is_empty()
        && port.iter().all(u8::is_ascii_digit)
}

fn check_framing(fields: &Fields<'_>, http: &HttpSpec) -> Result<(), Refusal> {
    let length = fields.length.first;
    if fields.length.repeated {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "more than one Content-Length header",
        ));
    }
    if let Some(encoding) = fields.encoding.first {
        if length.is_some() {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "both Content-Length and Transfer-Encoding",
            ));
        }
        // The only transfer coding a request may use here is a single `chunked`; hyper has
        // already refused codings that do not end in it.
        if fields.encoding.repeated || !encoding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "unsupported Transfer-Encoding",
            ));
        }
    }
    if let Some(length) = length {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(refuse(StatusCode::BAD_REQUEST, "invalid Content-Length"))?;
        if length > http.max_request_body.0 {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ));
        }
    }
    Ok(())
}

/// The URI with its path replaced and everything else kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
        None => PathAndQuery::try_from(path),
    }
    .ok()?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lines: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::post("/a?q=1").version(Version::HTTP_11);
        for (name, value) in lines {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn status(lines: &[(&str, &str)]) -> Result<(), StatusCode> {
        admit(&mut request(lines), &HttpSpec::default()).map_err(|r| r.status)
    }

    #[test]
    fn framing_must_be_unambiguous() {
        assert_eq!(status(&[("host", "x"), ("content-length", "4")]), Ok(()));
        assert_eq!(
            status(&[
                ("host", "x"),
                ("content-length", "4"),
                ("content-length", "4")
            ]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(&[
                ("host", "x"),
                ("content-length", "4"),
                ("transfer-encoding", "chunked")
            ]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(&[
                ("host", "x"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(&[("host", "x"), ("content-length", "999999999999")]),
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );
    }

    #[test]
    fn host_must_be_single_and_valid() {
        assert_eq!(status(&[]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            status(&[("host", "a"), ("host", "b")]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(status(&[("host", "a b")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(status(&[("host", "u@a")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(status(&[("host", "a.example:8080")]), Ok(()));
        // Past the plain scan, in full: an IPv6 literal, an underscore, a port-less colon.
        assert_eq!(status(&[("host", "[::1]:8080")]), Ok(()));
        assert_eq!(status(&[("host", "a_b.example")]), Ok(()));
        assert_eq!(status(&[("host", "a.example:")]), Ok(()));
        assert_eq!(status(&[("host", "a:1:2")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(status(&[("host", "[::1")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(status(&[("host", "a/b")]), Err(StatusCode::BAD_REQUEST));
    }

    /// The plain scan never accepts what a full parse refuses: every string built from the
    /// bytes that matter to either (up to four of them) is checked both ways.
    #[test]
    fn a_plain_authority_is_always_a_valid_one() {
        let alphabet = b"a0.-:_@[]/%?# ";
        let mut plain = 0;
        let mut candidates = vec![Vec::new()];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = candidates
                .iter()
                .flat_map(|prefix| {
                    alphabet.iter().map(move |&b| {
                        let mut next = prefix.clone();
                        next.push(b);
                        next
                    })
                })
                .collect();
            for candidate in &longer {
                if plain_authority(candidate) {
                    plain += 1;
                    let text = std::str::from_utf8(candidate).expect("ASCII");
                    let parsed = text.parse::<Authority>();
                    assert!(
                        parsed.is_ok_and(|a| !a.as_str().contains('@')),
                        "{text:?} passes the plain scan but is no authority"
                    );
                }
            }
            candidates = longer;
        }
        // The scan is not vacuous: `a`, `a.0`, `0-a:0` and the like pass it.
        assert!(plain > 100, "{plain}");
        assert!(plain_authority(b"api.example.com:443"));
        assert!(!plain_authority(b""));
        assert!(!plain_authority(b":80"));
    }

    #[test]
    fn the_path_is_normalised_and_the_query_kept() {
        let mut req = Request::get("/x/../%61dmin//?q=%2e")
            .header("host", "h")
            .body(())
            .unwrap();
        admit(&mut req, &HttpSpec::default()).unwrap();
        assert_eq!(req.uri(), "/admin/?q=%2e");
    }

    #[test]
    fn limits_give_414_and_431() {
        let http = HttpSpec {
            max_uri_length: crate::manifest::ByteSize(10),
            max_headers: 3,
            ..HttpSpec::default()
        };
        let mut long = Request::get("/0123456789")
            .header("host", "h")
            .body(())
            .unwrap();
        assert_eq!(
            admit(&mut long, &http).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        let mut many = request(&[("host", "x"), ("a", "1"), ("b", "1"), ("c", "1")]);
        assert_eq!(
            admit(&mut many, &http).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
