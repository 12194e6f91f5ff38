//! The per-request data that plugins read and edit through their imports.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::forwarded::ClientAddr;

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
    /// Method, URI and headers of the request as it will go upstream.
    pub request: http::request::Parts,
    /// The buffered request body, when the route has a plugin that reads bodies.
    pub body: Option<Bytes>,
    /// Status and headers of the response, once there is one.
    pub response: Option<http::response::Parts>,
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
            body: None,
            response: None,
            properties: Properties::with_capacity(8),
            client,
            route,
            request_id,
            trace_id: Box::default(),
        }
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
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{}` is not a valid header name", name.escape_debug()))?;
    if is_protected_header(&name, phase_is_request) {
        return Err(format!("`{name}` is managed by the gateway"));
    }
    Ok(name)
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
}
