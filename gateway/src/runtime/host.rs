//! The gateway's side of the plugin imports: `request`, `response`, `properties` and `log`.
//!
//! Every function acts on the exchange lent to the current call, and counts against the call's
//! host-call cap and deadline. A call made where it makes no sense (the response before there is
//! one), a hostile edit (a protected header, a control character in a value) and a breached cap
//! trap: the plugin stops and its failure policy applies. An edit made in the wrong phase, or a
//! body access not granted, returns an error the plugin can handle.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use wasmtime::Result;

use super::PluginState;
use super::bindings::{LogLevel, log, properties, request, response, types};
use super::budget::FailureKind;
use super::exchange::{Exchange, Phase, checked_header, checked_name};

/// Most properties one request may carry, and the longest key and value.
pub(super) const MAX_PROPERTIES: usize = 64;

/// Most prepared key lists (`properties.prepare`) one instance keeps.
const MAX_PREPARED: usize = 16;

/// The values of `keys` in one buffer, as `properties.get-many` lays them out.
fn values_of<'e>(keys: impl ExactSizeIterator<Item = Option<&'e str>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * 24);
    for value in keys {
        push_property(&mut out, value);
    }
    out
}

/// One key's entry as `properties.get-many` lays it out (and `handler-with-values` too): `0`, or
/// `1`, the value's length as four bytes little-endian, and its UTF-8 bytes.
pub(super) fn push_property(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(value) => {
            // Values are at most 16 KiB (properties) or a request's URI: u32 holds them.
            out.push(1);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }
}

pub(super) const MAX_PROPERTY_KEY: usize = 256;
const MAX_PROPERTY_VALUE: usize = 16 << 10;
/// How many host calls pass between two deadline checks in host calls.
const DEADLINE_CHECK_EVERY: u32 = 32;

impl PluginState {
    /// Records a breach and returns the error that makes the call trap.
    fn fail(&mut self, kind: FailureKind, detail: String) -> wasmtime::Error {
        let error = wasmtime::format_err!("{detail}");
        self.failure = Some((kind, detail));
        error
    }

    /// Counts a host call against the caps, and checks the deadline every
    /// [`DEADLINE_CHECK_EVERY`] calls: the epoch tick catches a plugin spending its time in host
    /// calls too (at its next loop or function entry), this stops it sooner. Not on every call:
    /// reading the clock was a tenth of what a host call cost.
    fn enter(&mut self) -> Result<()> {
        self.calls += 1;
        if self.calls > self.budget.host_calls {
            let detail = format!(
                "more than {} host calls in one call",
                self.budget.host_calls
            );
            return Err(self.fail(FailureKind::Cap, detail));
        }
        if self.calls.is_multiple_of(DEADLINE_CHECK_EVERY)
            && self.time_spent(std::time::Instant::now()) > self.budget.deadline
        {
            let detail = format!(
                "ran past its {:?} deadline in host calls",
                self.budget.deadline
            );
            return Err(self.fail(FailureKind::Deadline, detail));
        }
        Ok(())
    }

    /// The exchange, for a read.
    fn exchange(&mut self) -> Result<&mut Exchange> {
        self.enter()?;
        match self.exchange.as_deref_mut() {
            Some(exchange) => Ok(exchange),
            None => Err(wasmtime::format_err!(
                "request data is not available during configure"
            )),
        }
    }

    /// The request, for an edit: `Ok(Err(..))` outside the request phase.
    fn request_for_edit(&mut self) -> Result<Result<&mut Exchange, String>> {
        if self.phase != Phase::Request {
            self.enter()?;
            return Ok(Err(
                "the request can only be changed in the request phase".into()
            ));
        }
        self.exchange().map(Ok)
    }

    /// Refuses a response edit outside the response phase (the completion phase reads only).
    fn response_for_edit(&mut self) -> Result<Result<(), String>> {
        if self.phase != Phase::Response {
            self.enter()?;
            return Ok(Err(
                "the response can only be changed in the response phase".into(),
            ));
        }
        Ok(Ok(()))
    }

    fn response_parts(&mut self) -> Result<&mut http::response::Parts> {
        self.exchange()?.response_mut().ok_or_else(|| {
            wasmtime::format_err!("the response is only available in the response phase")
        })
    }

    /// Applies a header edit, trapping on a hostile or oversized one.
    fn edit_headers(
        &mut self,
        on_request: bool,
        name: &str,
        value: Option<(String, Edit)>,
    ) -> Result<()> {
        let budget = self.budget;
        let checked = match value {
            Some((ref value, _)) if value.len() > budget.header_value as usize => Err((
                FailureKind::Cap,
                format!(
                    "the value of `{}` is {} bytes, more than the {} allowed",
                    name.escape_debug(),
                    value.len(),
                    budget.header_value
                ),
            )),
            Some((value, how)) => checked_header(name, value, on_request)
                .map(|(n, v)| (n, Some((v, how))))
                .map_err(|m| (FailureKind::Contract, m)),
            None => checked_name(name, on_request)
                .map(|n| (n, None))
                .map_err(|m| (FailureKind::Contract, m)),
        };
        let (name, value) = match checked {
            Ok(checked) => checked,
            Err((kind, detail)) => return Err(self.fail(kind, detail)),
        };
        // The forwarding headers the request's map does not hold yet count against the cap.
        let (headers, held_aside) = if on_request {
            // `request_for_edit` counted this host call already.
            match self.exchange.as_deref_mut() {
                Some(exchange) => {
                    if crate::forwarded::is_forwarding(&name) {
                        exchange.forwarding_into_map();
                    }
                    let held_aside = exchange.forwarding_held_aside();
                    (&mut exchange.request.headers, held_aside)
                }
                None => return Err(wasmtime::format_err!("no request to edit")),
            }
        } else {
            (&mut self.response_parts()?.headers, 0)
        };
        match value {
            Some((value, Edit::Set)) => {
                headers.insert(name, value);
            }
            Some((value, Edit::Add)) => {
                headers.append(name, value);
            }
            None => {
                headers.remove(name);
            }
        }
        if headers.len() + held_aside > budget.headers as usize {
            let detail = format!("more than {} headers", budget.headers);
            return Err(self.fail(FailureKind::Cap, detail));
        }
        Ok(())
    }
}

fn first_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn all_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn all_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// How a header edit changes the map.
enum Edit {
    Set,
    Add,
}

impl types::Host for PluginState {}

impl request::Host for PluginState {
    fn method(&mut self) -> Result<String> {
        Ok(self.exchange()?.request.method.as_str().to_owned())
    }

    fn path(&mut self) -> Result<String> {
        Ok(self.exchange()?.request.uri.path().to_owned())
    }

    fn query(&mut self) -> Result<Option<String>> {
        Ok(self.exchange()?.request.uri.query().map(str::to_owned))
    }

    fn header(&mut self, name: String) -> Result<Option<String>> {
        let headers = self.exchange()?.request_headers_for(&name);
        Ok(first_value(headers, &name))
    }

    fn header_values(&mut self, name: String) -> Result<Vec<String>> {
        let headers = self.exchange()?.request_headers_for(&name);
        Ok(all_values(headers, &name))
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>> {
        Ok(all_headers(self.exchange()?.request_headers_mut()))
    }

    fn set_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.request_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(true, &name, Some((value, Edit::Set)))
            .map(Ok)
    }

    fn add_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.request_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(true, &name, Some((value, Edit::Add)))
            .map(Ok)
    }

    fn remove_header(&mut self, name: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.request_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(true, &name, None).map(Ok)
    }

    fn client_addr(&mut self) -> Result<String> {
        Ok(self.exchange()?.client.text().to_owned())
    }

    fn route_name(&mut self) -> Result<String> {
        Ok(self.exchange()?.route.to_string())
    }

    fn body(&mut self) -> Result<Result<Vec<u8>, String>> {
        if !self.budget.body_access {
            self.enter()?;
            return Ok(Err(NO_BODY_ACCESS.into()));
        }
        Ok(Ok(self
            .exchange()?
            .body
            .as_ref()
            .map(|b| b.to_vec())
            .unwrap_or_default()))
    }

    fn set_body(&mut self, body: Vec<u8>) -> Result<Result<(), String>> {
        if !self.budget.body_access {
            self.enter()?;
            return Ok(Err(NO_BODY_ACCESS.into()));
        }
        if body.len() as u64 > self.budget.body {
            let detail = format!(
                "a body of {} bytes, more than the {} allowed",
                body.len(),
                self.budget.body
            );
            return Err(self.fail(FailureKind::Cap, detail));
        }
        Ok(self.request_for_edit()?.map(|ex| {
            ex.body = Some(Bytes::from(body));
        }))
    }
}

const NO_BODY_ACCESS: &str =
    "body access is not granted: set `body: true` in the plugin's declaration";

impl response::Host for PluginState {
    fn status(&mut self) -> Result<u16> {
        Ok(self.response_parts()?.status.as_u16())
    }

    fn set_status(&mut self, status: u16) -> Result<Result<(), String>> {
        if let Err(refused) = self.response_for_edit()? {
            return Ok(Err(refused));
        }
        let Ok(status) = StatusCode::from_u16(status) else {
            return Err(self.fail(
                FailureKind::Contract,
                format!("{status} is not a valid status code"),
            ));
        };
        self.response_parts()?.status = status;
        Ok(Ok(()))
    }

    fn header(&mut self, name: String) -> Result<Option<String>> {
        Ok(first_value(&self.response_parts()?.headers, &name))
    }

    fn header_values(&mut self, name: String) -> Result<Vec<String>> {
        Ok(all_values(&self.response_parts()?.headers, &name))
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>> {
        Ok(all_headers(&self.response_parts()?.headers))
    }

    fn set_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.response_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(false, &name, Some((value, Edit::Set)))
            .map(Ok)
    }

    fn add_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.response_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(false, &name, Some((value, Edit::Add)))
            .map(Ok)
    }

    fn remove_header(&mut self, name: String) -> Result<Result<(), String>> {
        if let Err(refused) = self.response_for_edit()? {
            return Ok(Err(refused));
        }
        self.edit_headers(false, &name, None).map(Ok)
    }
}

impl properties::Host for PluginState {
    fn get(&mut self, key: String) -> Result<Option<String>> {
        Ok(property(self.exchange()?, &key).map(str::to_owned))
    }

    fn get_many(&mut self, keys: Vec<String>) -> Result<Vec<u8>> {
        if keys.len() > MAX_PROPERTIES {
            let detail = format!(
                "properties.get-many asked for {} keys, more than the {MAX_PROPERTIES} allowed",
                keys.len()
            );
            return Err(self.fail(FailureKind::Cap, detail));
        }
        let exchange = self.exchange()?;
        Ok(values_of(keys.iter().map(|key| property(exchange, key))))
    }

    fn prepare(&mut self, keys: Vec<String>) -> Result<u32> {
        self.enter()?;
        if keys.len() > MAX_PROPERTIES {
            let detail = format!(
                "properties.prepare was given {} keys, more than the {MAX_PROPERTIES} allowed",
                keys.len()
            );
            return Err(self.fail(FailureKind::Cap, detail));
        }
        if self.prepared.len() >= MAX_PREPARED {
            let detail = format!("more than {MAX_PREPARED} prepared key lists in one instance");
            return Err(self.fail(FailureKind::Cap, detail));
        }
        self.prepared
            .push(keys.into_iter().map(PropertyKey::new).collect());
        Ok((self.prepared.len() - 1) as u32)
    }

    fn get_prepared(&mut self, keys: u32) -> Result<Vec<u8>> {
        if keys as usize >= self.prepared.len() {
            self.enter()?;
            let detail = format!("properties.get-prepared was given {keys}, not a handle of its");
            return Err(self.fail(FailureKind::Contract, detail));
        }
        // Taken out for the call, so that the exchange can be borrowed beside it.
        let list = std::mem::take(&mut self.prepared[keys as usize]);
        let out = self
            .exchange()
            .map(|exchange| values_of(list.iter().map(|key| key.value(exchange))));
        self.prepared[keys as usize] = list;
        out
    }

    fn set(&mut self, key: String, value: String) -> Result<Result<(), String>> {
        let properties = &mut self.exchange()?.properties;
        if key.len() > MAX_PROPERTY_KEY || value.len() > MAX_PROPERTY_VALUE {
            return Ok(Err(format!(
                "property keys are limited to {MAX_PROPERTY_KEY} bytes and values to {MAX_PROPERTY_VALUE}"
            )));
        }
        if key.starts_with("wasmgate.") {
            return Ok(Err(
                "properties named `wasmgate.*` are set by the gateway only".into(),
            ));
        }
        if properties.len() >= MAX_PROPERTIES && !properties.contains_key(&key) {
            return Ok(Err(format!(
                "a request carries at most {MAX_PROPERTIES} properties"
            )));
        }
        properties.insert(key, value);
        Ok(Ok(()))
    }
}

/// A property's value: one set along the chain or by the gateway, or one of the request's own
/// fields (`wasmgate.method` and the others the contract lists), read from the request itself.
pub(super) fn property<'e>(exchange: &'e Exchange, key: &str) -> Option<&'e str> {
    match RequestField::named(key) {
        Some(field) => field.value(exchange),
        None => exchange.properties.get(key),
    }
}

/// A property key a plugin names for every call (its reads, a prepared list), told apart once:
/// one of the request's own fields, or a property set along the chain. Told apart at each
/// read, a logger's dozen keys cost a dozen name comparisons a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PropertyKey {
    /// One of the request's own fields.
    Field(RequestField),
    /// A property set along the chain or by the gateway.
    Set(Box<str>),
}

impl PropertyKey {
    /// The key, told apart.
    pub(super) fn new(key: String) -> PropertyKey {
        match RequestField::named(&key) {
            Some(field) => PropertyKey::Field(field),
            None => PropertyKey::Set(key.into_boxed_str()),
        }
    }

    /// Its value for `exchange`, as [`property`] reads it.
    pub(super) fn value<'e>(&self, exchange: &'e Exchange) -> Option<&'e str> {
        match self {
            PropertyKey::Field(field) => field.value(exchange),
            PropertyKey::Set(key) => exchange.properties.get(key),
        }
    }
}

/// The request's own fields that read as properties (`wasmgate.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestField {
    Method,
    Path,
    Query,
    Route,
    ClientAddr,
    RequestId,
}

impl RequestField {
    /// The field a property key names, if it names one.
    fn named(key: &str) -> Option<RequestField> {
        Some(match key.strip_prefix("wasmgate.")? {
            "method" => RequestField::Method,
            "path" => RequestField::Path,
            "query" => RequestField::Query,
            "route" => RequestField::Route,
            "client_addr" => RequestField::ClientAddr,
            "request_id" => RequestField::RequestId,
            _ => return None,
        })
    }

    fn value(self, exchange: &Exchange) -> Option<&str> {
        let request = &exchange.request;
        match self {
            RequestField::Method => Some(request.method.as_str()),
            RequestField::Path => Some(request.uri.path()),
            RequestField::Query => request.uri.query(),
            RequestField::Route => Some(&exchange.route),
            RequestField::ClientAddr => Some(exchange.client.text()),
            RequestField::RequestId => Some(exchange.request_id()),
        }
    }
}

impl log::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) -> Result<()> {
        self.enter()?;
        if message.len() > self.budget.log_line as usize {
            let detail = format!(
                "a log line of {} bytes, more than the {} allowed",
                message.len(),
                self.budget.log_line
            );
            return Err(self.fail(FailureKind::Cap, detail));
        }
        let plugin = &*self.plugin;
        let (route, request_id, trace_id) = match self.exchange.as_deref() {
            Some(exchange) => (&*exchange.route, exchange.request_id(), &*exchange.trace_id),
            None => ("", "", ""),
        };
        // Control characters are escaped, so a plugin cannot forge log lines.
        let message = escape_controls(&message);
        let line = crate::log_output::PluginLine {
            message: &message,
            plugin,
            route,
            request_id,
            trace_id,
        };
        // The plain text format writes the line itself (`enabled!` asks the filters the event
        // would meet); other formats get the event. Each level is a callsite of its own.
        macro_rules! emit {
            ($level:expr, $event:ident) => {
                if !crate::log_output::plugin_line(
                    $level,
                    || tracing::enabled!(target: PLUGIN_LOG_TARGET, $level),
                    line,
                ) {
                    tracing::$event!(target: PLUGIN_LOG_TARGET, plugin, route, request_id, trace_id, "{message}");
                }
            };
        }
        match level {
            LogLevel::Trace => emit!(tracing::Level::TRACE, trace),
            LogLevel::Debug => emit!(tracing::Level::DEBUG, debug),
            LogLevel::Info => emit!(tracing::Level::INFO, info),
            LogLevel::Warn => emit!(tracing::Level::WARN, warn),
            LogLevel::Error => emit!(tracing::Level::ERROR, error),
        }
        Ok(())
    }
}

/// The target of the log lines plugins write (`RUST_LOG=wasmgate::plugin=debug` shows their
/// debug lines). Every field of these events is escaped or checked by the gateway (the message by
/// [`escape_controls`], names from the manifest, ids of a checked alphabet), so the log writer
/// does not escape them again (`cli::main`).
pub const PLUGIN_LOG_TARGET: &str = "wasmgate::plugin";

/// The text with control characters written as `\u{..}` escapes; borrowed when there are none,
/// which is the common case.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    // Control characters are C0, DEL and C1; in UTF-8 every C1 character starts with 0xC2. A
    // byte scan settles the common case without decoding (an access-log line per request).
    // Folded without stopping early, so that the compiler can scan many bytes per step.
    let suspect = text.as_bytes().iter().fold(false, |seen, &b| {
        seen | (b < 0x20) | (b == 0x7f) | (b == 0xc2)
    });
    if !suspect || !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls(r#"{"a": "b"}"#), r#"{"a": "b"}"#);
        assert_eq!(escape_controls("x\ny\u{1b}[31m"), "x\\u{a}y\\u{1b}[31m");
        // C1 controls are two bytes in UTF-8; other characters starting with 0xC2 are kept.
        assert_eq!(escape_controls("a\u{85}b"), "a\\u{85}b");
        assert_eq!(escape_controls("a\u{a9}b\u{7f}"), "a\u{a9}b\\u{7f}");
        assert_eq!(escape_controls("caf\u{e9}"), "caf\u{e9}");
    }
}
