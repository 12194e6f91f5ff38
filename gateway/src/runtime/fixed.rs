//! A plugin's fixed edits (`handler-with-fixed-edits`, contract 0.2.4): the header edits that are
//! the whole of its request or response phase, for every request, with its configuration. The
//! gateway makes them itself at the plugin's place in the chain instead of calling the phase: a
//! call costs far more than a few `HeaderMap` inserts (docs/performance.md, "Session 20").
//!
//! They are checked once, when the manifest loads, as the imports check an edit, so that a bad
//! one fails the load with the route and plugin named rather than every request.

use http::{HeaderMap, HeaderName, HeaderValue};

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

/// Makes `edits` on `headers`, in order; an error when the headers then pass `max_headers`
/// (the cap the plugin's own edits would have met).
pub fn apply(edits: &[FixedEdit], headers: &mut HeaderMap, max_headers: u32) -> Result<(), String> {
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
    match headers.len() > max_headers as usize {
        true => Err(format!("more than {max_headers} headers")),
        false => Ok(()),
    }
}
