//! A plugin's fixed edits (`handler-with-fixed-edits`, contract 0.2.4): the header edits that are
//! the whole of its request or response phase, for every request, with its configuration. The
//! gateway makes them itself at the plugin's place in the chain instead of calling the phase: a
//! call costs far more than a few `HeaderMap` inserts (docs/performance.md, "Session 20").
//!
//! They are checked once, when the manifest loads, as the imports check an edit, so that a bad
//! one fails the load with the route and plugin named rather than every request.

use http::header::DATE;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::h1::RawFields;

use super::bindings::{WitFixedEdits, WitHeaderEdit};
use super::budget::PluginBudget;
use super::exchange::{checked_header, checked_name};

/// One checked edit.
#[derive(Debug, Clone)]
pub enum FixedEdit {
    /// Replaces every value of the header.
    Set(HeaderName, HeaderValue),
    /// Appends a value.
    Add(HeaderName, HeaderValue),
    /// Removes every value.
    Remove(HeaderName),
}

/// A plugin use's fixed edits, by phase: `Some` for a phase the gateway makes itself.
#[derive(Debug, Clone, Default)]
pub struct FixedEdits {
    /// The request phase's edits, in order.
    pub request: Option<Box<[FixedEdit]>>,
    /// The response phase's edits, in order.
    pub response: Option<Box<[FixedEdit]>>,
}

impl FixedEdits {
    /// Checks what the plugin answered: names and values as the imports check them (a framing,
    /// hop-by-hop or gateway-managed header is refused, so is a control character in a value),
    /// values within the plugin's cap.
    pub(super) fn check(wit: WitFixedEdits, budget: &PluginBudget) -> Result<FixedEdits, String> {
        let side = |edits: Option<Vec<WitHeaderEdit>>, on_request: bool| {
            let phase = if on_request { "request" } else { "response" };
            edits
                .map(|edits| {
                    edits
                        .into_iter()
                        .map(|edit| check_one(edit, on_request, budget))
                        .collect::<Result<Box<[_]>, String>>()
                        .map_err(|err| format!("a fixed {phase} edit: {err}"))
                })
                .transpose()
        };
        Ok(FixedEdits {
            request: side(wit.request, true)?,
            response: side(wit.response, false)?,
        })
    }
}

fn check_one(
    edit: WitHeaderEdit,
    on_request: bool,
    budget: &PluginBudget,
) -> Result<FixedEdit, String> {
    let valued = |(name, value): (String, String)| {
        if value.len() > budget.header_value as usize {
            return Err(format!(
                "the value of `{}` is {} bytes, more than the {} allowed",
                name.escape_debug(),
                value.len(),
                budget.header_value
            ));
        }
        checked_header(&name, value, on_request)
    };
    Ok(match edit {
        WitHeaderEdit::Set(entry) => valued(entry).map(|(n, v)| FixedEdit::Set(n, v))?,
        WitHeaderEdit::Add(entry) => valued(entry).map(|(n, v)| FixedEdit::Add(n, v))?,
        WitHeaderEdit::Remove(name) => FixedEdit::Remove(checked_name(&name, on_request)?),
    })
}

/// Makes `edits` on `headers`, in order; an error when the headers, with `held_aside` more that
/// are not in the map (a request's forwarding headers), then pass `max_headers` (the cap the
/// plugin's own edits would have met).
pub fn apply(
    edits: &[FixedEdit],
    headers: &mut HeaderMap,
    held_aside: usize,
    max_headers: u32,
) -> Result<(), String> {
    make(edits, headers);
    match headers.len() + held_aside > max_headers as usize {
        true => Err(format!("more than {max_headers} headers")),
        false => Ok(()),
    }
}

/// Makes `edits` on `headers`, in order, for a caller that has bounded the count already
/// ([`most_added`]).
pub fn make(edits: &[FixedEdit], headers: &mut HeaderMap) {
    for edit in edits {
        match edit {
            FixedEdit::Set(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            FixedEdit::Add(name, value) => {
                headers.append(name.clone(), value.clone());
            }
            FixedEdit::Remove(name) => {
                headers.remove(name);
            }
        }
    }
}

/// Makes `edits` on a response head passed through as bytes, as [`make`] would on its map.
/// The lines keep the upstream's order; a set field's line goes last.
pub fn make_raw(edits: &[FixedEdit], raw: &mut RawFields) {
    for edit in edits {
        let name = match edit {
            FixedEdit::Set(name, value) => {
                raw.remove(name);
                raw.push(name, value);
                name
            }
            FixedEdit::Add(name, value) => {
                raw.push(name, value);
                name
            }
            FixedEdit::Remove(name) => {
                raw.remove(name);
                name
            }
        };
        if name == DATE {
            // The server side adds a `Date` to a head without one.
            raw.dated = !matches!(edit, FixedEdit::Remove(_));
        }
    }
}

/// The most headers `edits` can add: one for each set or add (a set that replaces a value, or
/// a remove, adds none). With it the caller can tell that no cap can be passed before making
/// any edit.
pub fn most_added(edits: &[FixedEdit]) -> usize {
    edits
        .iter()
        .filter(|edit| !matches!(edit, FixedEdit::Remove(_)))
        .count()
}

/// Whether one of `edits` names a header `matches` picks.
pub fn names_any(edits: &[FixedEdit], matches: impl Fn(&HeaderName) -> bool) -> bool {
    edits.iter().any(|edit| match edit {
        FixedEdit::Set(name, _) | FixedEdit::Add(name, _) | FixedEdit::Remove(name) => {
            matches(name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(lines: &str) -> RawFields {
        RawFields {
            lines: lines.as_bytes().to_vec(),
            length: None,
            dated: lines.to_ascii_lowercase().contains("date:"),
        }
    }

    /// Made on the bytes of a head, edits leave what they would leave in its map.
    #[test]
    fn edits_on_raw_fields_match_edits_on_a_map() {
        let name = HeaderName::from_static;
        let value = HeaderValue::from_static;
        let edits = [
            FixedEdit::Set(name("x-upstream"), value("replaced")),
            FixedEdit::Add(name("x-list"), value("b")),
            FixedEdit::Remove(name("x-version")),
            FixedEdit::Remove(name("date")),
        ];
        let upstream = "X-Upstream: main\r\nx-list: a\r\nX-Version: HTTP/1.1\r\n\
                        Date: Mon, 30 Nov 2026 12:00:00 GMT\r\nX-Upstream: again\r\n";
        let mut bytes = raw(upstream);
        make_raw(&edits, &mut bytes);
        assert!(!bytes.dated, "the server side dates the response itself");
        let mut from_bytes = HeaderMap::new();
        bytes.into_map(&mut from_bytes);

        let mut map = HeaderMap::new();
        raw(upstream).into_map(&mut map);
        make(&edits, &mut map);
        assert_eq!(from_bytes, map);
        assert_eq!(map.len(), 3);
        assert_eq!(map["x-upstream"], "replaced");
        assert_eq!(most_added(&edits), 2);
        assert!(names_any(&edits, |n| n == "x-version"));
        assert!(!names_any(&edits, |n| n == "x-absent"));

        let mut dated = raw("x: 1\r\n");
        make_raw(&[FixedEdit::Set(name("date"), value("today"))], &mut dated);
        assert!(dated.dated);
    }
}
