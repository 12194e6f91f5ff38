//! The values a plugin reads, handed in with each call (`handler-with-values`, contract 0.2.3).
//!
//! A host call that returns a string leaves the sandbox and then, to place the string, enters it
//! again (`cabi_realloc`): for a plugin that reads a header or two per call, those crossings cost
//! more than the call itself. A plugin that names what it reads ([`ReadSet`], asked once per
//! instance right after `configure`) gets those values in one buffer with the call instead,
//! placed by the one `cabi_realloc` Wasmtime makes to lower the argument.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};

use super::exchange::{Exchange, Phase};
use super::host::{MAX_PROPERTIES, MAX_PROPERTY_KEY, PropertyKey, push_property};

/// Most names in each list of a plugin's reads (the same bound as a request's properties).
const MAX_READS: usize = MAX_PROPERTIES;

/// What a buffer is first given room for.
const FIRST_CAPACITY: usize = 512;

/// What a plugin reads in its phases, checked: the names it gave, as the gateway looks them up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSet {
    request_headers: Box<[HeaderName]>,
    /// Whether `request_headers` names a forwarding header (`X-Forwarded-For` and the others).
    reads_forwarding: bool,
    response_headers: Box<[HeaderName]>,
    properties: Box<[PropertyKey]>,
}

impl ReadSet {
    /// Checks a plugin's `reads` answer: `None` when it names nothing (the plain phases are then
    /// cheaper), an error naming the first entry refused.
    pub fn new(
        request_headers: Vec<String>,
        response_headers: Vec<String>,
        properties: Vec<String>,
    ) -> Result<Option<ReadSet>, String> {
        for (list, len) in [
            ("request-headers", request_headers.len()),
            ("response-headers", response_headers.len()),
            ("properties", properties.len()),
        ] {
            if len > MAX_READS {
                return Err(format!(
                    "reads: {len} {list}, more than the {MAX_READS} allowed"
                ));
            }
        }
        if request_headers.is_empty() && response_headers.is_empty() && properties.is_empty() {
            return Ok(None);
        }
        let names = |list: Vec<String>| {
            list.into_iter()
                .map(|name| {
                    // Lower-case only: a name the plugin compares as given must be the one
                    // the gateway looks up.
                    HeaderName::from_bytes(name.as_bytes())
                        .ok()
                        .filter(|parsed| parsed.as_str() == name)
                        .ok_or_else(|| {
                            format!(
                                "reads: `{}` is not a lower-case header name",
                                name.escape_debug()
                            )
                        })
                })
                .collect::<Result<Box<[_]>, String>>()
        };
        let request_headers = names(request_headers)?;
        let response_headers = names(response_headers)?;
        if let Some(key) = properties.iter().find(|key| key.len() > MAX_PROPERTY_KEY) {
            return Err(format!(
                "reads: a property key of {} bytes, more than the {MAX_PROPERTY_KEY} allowed",
                key.len()
            ));
        }
        Ok(Some(ReadSet {
            reads_forwarding: request_headers.iter().any(crate::forwarded::is_forwarding),
            request_headers,
            response_headers,
            properties: properties.into_iter().map(PropertyKey::new).collect(),
        }))
    }

    /// Whether the plugin names a forwarding header of the request (looked up in the request's
    /// map, so they must be in it: [`Exchange::forwarding`]).
    pub fn reads_forwarding_headers(&self) -> bool {
        self.reads_forwarding
    }

    /// Whether the plugin names response headers (looked up in the response's map).
    pub fn reads_response_headers(&self) -> bool {
        !self.response_headers.is_empty()
    }

    /// Writes the values for a call in `phase` into `out` (cleared first), laid out as the
    /// contract's `handler-with-values` says.
    pub fn encode(&self, exchange: &Exchange, phase: Phase, out: &mut Vec<u8>) {
        out.clear();
        // A fresh instance's buffer is empty: one allocation of a size that holds the usual
        // values, rather than a doubling at each of the first few.
        out.reserve(FIRST_CAPACITY);
        let response = match phase {
            Phase::Response | Phase::Complete => exchange.response.as_ref(),
            Phase::Configure | Phase::Request => None,
        };
        let status = response.map_or(0, |parts| parts.status.as_u16());
        out.extend_from_slice(&status.to_le_bytes());
        headers(out, &self.request_headers, Some(&exchange.request.headers));
        headers(
            out,
            &self.response_headers,
            response.map(|parts| &parts.headers),
        );
        for key in &self.properties {
            push_property(out, key.value(exchange));
        }
    }
}

/// Each name's values, as `header-values` reads them; none for every name without a map.
fn headers(out: &mut Vec<u8>, names: &[HeaderName], map: Option<&HeaderMap>) {
    for name in names {
        let Some(map) = map else {
            out.extend_from_slice(&0u32.to_le_bytes());
            continue;
        };
        let values = map.get_all(name);
        // Counted first: a header rarely has more than one value, and the count comes before
        // them.
        let count = values.iter().count() as u32;
        out.extend_from_slice(&count.to_le_bytes());
        for value in values {
            match String::from_utf8_lossy(value.as_bytes()) {
                Cow::Borrowed(text) => push_bytes(out, text.as_bytes()),
                Cow::Owned(text) => push_bytes(out, text.as_bytes()),
            }
        }
    }
}

/// A length (four bytes, little-endian) and the bytes. Values are bounded by the request's and
/// the properties' caps, far below 4 GiB.
fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_an_empty_set_is_none() {
        assert_eq!(ReadSet::new(vec![], vec![], vec![]), Ok(None));
        let set = ReadSet::new(vec!["x-api-key".into()], vec![], vec!["subject".into()]);
        assert!(matches!(set, Ok(Some(_))));
        let err = ReadSet::new(vec!["X-Api-Key".into()], vec![], vec![]).unwrap_err();
        assert!(
            err.contains("`X-Api-Key` is not a lower-case header name"),
            "{err}"
        );
        let err = ReadSet::new(vec![], vec!["bad name".into()], vec![]).unwrap_err();
        assert!(err.contains("`bad name`"), "{err}");
        let many = vec!["x".to_string(); 65];
        let err = ReadSet::new(vec![], vec![], many).unwrap_err();
        assert!(
            err.contains("65 properties, more than the 64 allowed"),
            "{err}"
        );
        let err = ReadSet::new(vec![], vec![], vec!["k".repeat(300)]).unwrap_err();
        assert!(err.contains("300 bytes"), "{err}");
    }
}
