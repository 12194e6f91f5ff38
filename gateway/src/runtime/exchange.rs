//! The per-request data that plugins read and edit through their imports.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::forwarded::{self, ClientAddr};
use crate::h1::RawFields;

/// Which phase a plugin call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `handler.configure`, when the manifest loads or an instance starts.
    Configure,
    /// `handler.on-request`.
    Request,
    /// `handler.on-response`.
    Response,
    /// `handler.on-complete`.
    Complete,
}

impl Phase {
    /// The phase's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Configure => "configure",
            Phase::Request => "request",
            Phase::Response => "response",
            Phase::Complete => "complete",
        }
    }
}

/// One request/response exchange, owned by the proxy and lent to each plugin call in turn.
///
/// It is boxed and moved into a plugin's store for the length of a call, then moved back: no
/// locking, no copying of headers, and no way for a plugin to keep a reference past its call.
#[derive(Debug)]
pub struct Exchange {
    /// Method, URI and headers of the request as it will go upstream, but for the forwarding
    /// headers while they are held in `forwarding`.
    pub request: http::request::Parts,
    /// The forwarding headers the gateway adds ([`forwarded::Pending`]), while no plugin has
    /// read or edited one of them or read all headers: the request's map then holds none of
    /// them, and they are written as the request is sent. Most chains read a header or two by
    /// name; inserting the four into every request's map, one of them a value built for it,
    /// would cost more than a plugin's fixed edits. Read and edit the request's headers
    /// through [`Exchange::request_headers_mut`] or [`Exchange::request_headers_for`], and count
    /// them with [`Exchange::request_header_count`].
    pub forwarding: Option<forwarded::Pending>,
    /// The buffered request body, when the route has a plugin that reads bodies.
    pub body: Option<Bytes>,
    /// Status and headers of the response, once there is one. Read and edited through
    /// [`Exchange::response_mut`], which first moves in the fields still held as bytes.
    pub response: Option<http::response::Parts>,
    /// The response's fields as the upstream sent them ([`RawFields`]), while no plugin has
    /// read or edited them: `response`'s map then holds none. Most chains never read the
    /// response's headers, and a map of them costs building and writing out again.
    pub response_raw: Option<Box<RawFields>>,
    /// Properties shared along the chain.
    pub properties: Properties,
    /// The client's address.
    pub client: Arc<ClientAddr>,
    /// The matched route's name.
    pub route: Arc<str>,
    /// The request's id, as sent upstream and to the client.
    pub request_id: http::HeaderValue,
    /// The W3C trace id (hex), for log lines; empty when the request has no trace.
    pub trace_id: Box<str>,
}

impl Exchange {
    /// Starts an exchange for a request.
    pub fn new(
        request: http::request::Parts,
        client: Arc<ClientAddr>,
        route: Arc<str>,
        request_id: http::HeaderValue,
    ) -> Self {
        Exchange {
            request,
            forwarding: None,
            body: None,
            response: None,
            response_raw: None,
            properties: Properties::with_capacity(8),
            client,
            route,
            request_id,
            trace_id: Box::default(),
        }
    }

    /// Inserts the forwarding headers still held aside into the request's map.
    pub fn forwarding_into_map(&mut self) {
        if let Some(pending) = self.forwarding.take() {
            pending
                .fields(&self.client)
                .insert_into(&mut self.request.headers);
        }
    }

    /// The request's headers, all in the map: the forwarding headers are inserted first.
    pub fn request_headers_mut(&mut self) -> &mut HeaderMap {
        self.forwarding_into_map();
        &mut self.request.headers
    }

    /// The request's headers, for a read or an edit of `name` alone: the forwarding headers are
    /// inserted first only when `name` (in any case) is one of them.
    pub fn request_headers_for(&mut self, name: &str) -> &mut HeaderMap {
        if self.forwarding.is_some() && forwarded::is_forwarding_name(name) {
            self.forwarding_into_map();
        }
        &mut self.request.headers
    }

    /// How many forwarding headers are held aside (not in the request's map).
    pub fn forwarding_held_aside(&self) -> usize {
        self.forwarding
            .as_ref()
            .map_or(0, forwarded::Pending::count)
    }

    /// How many request headers there are, the forwarding headers held aside included.
    pub fn request_header_count(&self) -> usize {
        self.request.headers.len() + self.forwarding_held_aside()
    }

    /// The response, its fields all in the map: those still held as bytes are moved in first.
    pub fn response_mut(&mut self) -> Option<&mut http::response::Parts> {
        let response = self.response.as_mut()?;
        if let Some(raw) = self.response_raw.take() {
            raw.into_map(&mut response.headers);
        }
        Some(response)
    }

    /// How many response headers there are, those held as bytes included.
    pub fn response_header_count(&self) -> usize {
        let mapped = self.response.as_ref().map_or(0, |r| r.headers.len());
        mapped + self.response_raw.as_ref().map_or(0, |raw| raw.count())
    }

    /// The request id as text, for logs.
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

/// The properties of one request: a handful of entries (at most 64), set and read a few times
/// each, so a vector searched in order beats a hash map (no hashing, one allocation). The gateway's
/// own keys are static strings and cost no allocation.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    entries: Vec<(Cow<'static, str>, String)>,
}

impl Properties {
    /// Room for `capacity` properties: a chain's request usually gets half a dozen (the
    /// gateway's timings and byte counts, a plugin's own), which would otherwise grow the list
    /// twice.
    pub fn with_capacity(capacity: usize) -> Properties {
        Properties {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// The value of a property, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a property, replacing any earlier value.
    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: String) {
        let key = key.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => *slot = value,
            None => self.entries.push((key, value)),
        }
    }

    /// Whether a property is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// How many properties are set.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Headers no plugin may set or remove: they frame the message or belong to one connection, and
/// the proxy manages them itself (RFC 9110 section 7.6.1).
pub fn is_protected_header(name: &HeaderName, phase_is_request: bool) -> bool {
    use http::header::*;
    name == CONTENT_LENGTH
        || name == TRANSFER_ENCODING
        || name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        || (phase_is_request && name == HOST)
        || name == crate::request_id::X_REQUEST_ID
}

/// Checks a header a plugin wants to write. The value's buffer, lifted out of the plugin's
/// memory already, becomes the header value's without another copy.
pub fn checked_header(
    name: &str,
    value: String,
    phase_is_request: bool,
) -> Result<(HeaderName, HeaderValue), String> {
    let name = checked_name(name, phase_is_request)?;
    // HeaderValue refuses CR, LF, NUL and other control characters except tab.
    let value = HeaderValue::from_maybe_shared(Bytes::from(value.into_bytes()))
        .map_err(|_| format!("the value of `{name}` contains a control character"))?;
    Ok((name, value))
}

/// Checks a header name a plugin wants to write or remove.
pub fn checked_name(name: &str, phase_is_request: bool) -> Result<HeaderName, String> {
    let name = parse_name(name)
        .map_err(|_| format!("`{}` is not a valid header name", name.escape_debug()))?;
    if is_protected_header(&name, phase_is_request) {
        return Err(format!("`{name}` is managed by the gateway"));
    }
    Ok(name)
}

/// How many header names [`parse_name`] keeps per thread.
const RECENT_NAMES: usize = 16;

thread_local! {
    /// Header names plugins wrote or removed lately on this thread, as parsed.
    static RECENT: RefCell<RecentNames> = const {
        RefCell::new(RecentNames {
            names: Vec::new(),
            next: 0,
        })
    };
}

/// The last [`RECENT_NAMES`] distinct header names parsed, oldest replaced first.
struct RecentNames {
    names: Vec<HeaderName>,
    next: usize,
}

/// Parses a header name a plugin passed. Parsing a name outside the standard set copies it to
/// the heap; plugins write the same few names (`x-consumer`, `x-user`) on every request, so the
/// name parsed before is shared instead (a reference count). Only a name given exactly as it
/// parses (lower case) is kept, so that finding one is a plain comparison.
fn parse_name(name: &str) -> Result<HeaderName, http::header::InvalidHeaderName> {
    RECENT.with_borrow_mut(|recent| {
        if let Some(known) = recent.names.iter().find(|known| known.as_str() == name) {
            return Ok(known.clone());
        }
        let parsed = HeaderName::from_bytes(name.as_bytes())?;
        if parsed.as_str() == name {
            if recent.names.len() < RECENT_NAMES {
                recent.names.push(parsed.clone());
            } else {
                recent.names[recent.next] = parsed.clone();
                recent.next = (recent.next + 1) % RECENT_NAMES;
            }
        }
        Ok(parsed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_keep_one_value_per_key() {
        let mut properties = Properties::default();
        assert!(properties.is_empty());
        properties.insert("wasmgate.completed", "false".into());
        properties.insert(String::from("subject"), "alice".into());
        properties.insert(String::from("wasmgate.completed"), "true".into());
        assert_eq!(properties.len(), 2);
        assert_eq!(properties.get("wasmgate.completed"), Some("true"));
        assert_eq!(properties.get("subject"), Some("alice"));
        assert!(!properties.contains_key("Subject"));
    }

    #[test]
    fn refuses_injection_and_framing_headers() {
        assert!(checked_header("x-ok", "fine value".into(), true).is_ok());
        assert!(checked_header("x-bad", "a\r\nx-evil: 1".into(), true).is_err());
        assert!(checked_header("x-bad", "a\0b".into(), true).is_err());
        assert!(checked_header("bad name", "v".into(), true).is_err());
        assert!(checked_header("Content-Length", "0".into(), true).is_err());
        assert!(checked_header("transfer-encoding", "chunked".into(), false).is_err());
        assert!(checked_header("host", "evil".into(), true).is_err());
        assert!(checked_header("host", "fine".into(), false).is_ok());
    }

    #[test]
    fn a_header_name_written_again_shares_the_one_parsed_before() {
        let first = checked_name("x-interned-consumer", true).unwrap();
        let again = checked_name("x-interned-consumer", true).unwrap();
        assert_eq!(first, again);
        // The same bytes, not a second copy of them.
        assert_eq!(first.as_str().as_ptr(), again.as_str().as_ptr());
        // Given in another case, it parses to the same name.
        assert_eq!(checked_name("X-Interned-Consumer", true).unwrap(), first);
        // Protected names stay refused, however often they are asked for.
        for _ in 0..2 {
            assert!(checked_name("content-length", false).is_err());
        }
        // More names than are kept: each still parses to itself, the oldest parsed again.
        let many: Vec<String> = (0..2 * RECENT_NAMES)
            .map(|i| format!("x-name-{i}"))
            .collect();
        for name in many.iter().chain(&many) {
            assert_eq!(checked_name(name, true).unwrap().as_str(), name);
        }
        assert!(checked_name("bad name", true).is_err());
    }
}
