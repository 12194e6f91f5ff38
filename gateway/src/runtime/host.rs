//! The gateway's side of the plugin imports: `request`, `response`, `properties` and `log`.
//!
//! Every function acts on the exchange lent to the current call. A call made where it makes no
//! sense (the response before there is one) traps; a refused edit (a protected header, a line
//! break in a value) returns an error the plugin can handle.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use wasmtime::Result;

use super::PluginState;
use super::bindings::{LogLevel, log, properties, request, response, types};
use super::exchange::{Exchange, Phase, checked_header, checked_name};

/// Most properties one request may carry, and the longest key and value.
const MAX_PROPERTIES: usize = 64;
const MAX_PROPERTY_KEY: usize = 256;
const MAX_PROPERTY_VALUE: usize = 16 << 10;

impl PluginState {
    fn exchange(&mut self) -> Result<&mut Exchange> {
        self.exchange
            .as_deref_mut()
            .ok_or_else(|| wasmtime::format_err!("host call outside of a request"))
    }

    /// The request's headers, for an edit: refused outside the request phase.
    fn request_for_edit(&mut self) -> Result<Result<&mut Exchange, String>> {
        if self.phase != Phase::Request {
            return Ok(Err(
                "the request can only be changed in the request phase".into()
            ));
        }
        self.exchange().map(Ok)
    }

    fn response_parts(&mut self) -> Result<&mut http::response::Parts> {
        self.exchange()?.response.as_mut().ok_or_else(|| {
            wasmtime::format_err!("the response is only available in the response phase")
        })
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

fn edit(
    headers: &mut HeaderMap,
    name: &str,
    value: &str,
    how: Edit,
    request: bool,
) -> Result<(), String> {
    let (name, value) = checked_header(name, value, request)?;
    match how {
        Edit::Set => {
            headers.insert(name, value);
        }
        Edit::Add => {
            headers.append(name, value);
        }
    }
    Ok(())
}

fn remove(headers: &mut HeaderMap, name: &str, request: bool) -> Result<(), String> {
    let name = checked_name(name, request)?;
    headers.remove(name);
    Ok(())
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
        Ok(first_value(&self.exchange()?.request.headers, &name))
    }

    fn header_values(&mut self, name: String) -> Result<Vec<String>> {
        Ok(all_values(&self.exchange()?.request.headers, &name))
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>> {
        Ok(all_headers(&self.exchange()?.request.headers))
    }

    fn set_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        Ok(self
            .request_for_edit()?
            .and_then(|ex| edit(&mut ex.request.headers, &name, &value, Edit::Set, true)))
    }

    fn add_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        Ok(self
            .request_for_edit()?
            .and_then(|ex| edit(&mut ex.request.headers, &name, &value, Edit::Add, true)))
    }

    fn remove_header(&mut self, name: String) -> Result<Result<(), String>> {
        Ok(self
            .request_for_edit()?
            .and_then(|ex| remove(&mut ex.request.headers, &name, true)))
    }

    fn client_addr(&mut self) -> Result<String> {
        Ok(self.exchange()?.client_addr.to_string())
    }

    fn route_name(&mut self) -> Result<String> {
        Ok(self.exchange()?.route.to_string())
    }

    fn body(&mut self) -> Result<Result<Vec<u8>, String>> {
        if !self.body_access {
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
        if !self.body_access {
            return Ok(Err(NO_BODY_ACCESS.into()));
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
        let parts = self.response_parts()?;
        Ok(match StatusCode::from_u16(status) {
            Ok(status) => {
                parts.status = status;
                Ok(())
            }
            Err(_) => Err(format!("{status} is not a valid status code")),
        })
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
        let parts = self.response_parts()?;
        Ok(edit(&mut parts.headers, &name, &value, Edit::Set, false))
    }

    fn add_header(&mut self, name: String, value: String) -> Result<Result<(), String>> {
        let parts = self.response_parts()?;
        Ok(edit(&mut parts.headers, &name, &value, Edit::Add, false))
    }

    fn remove_header(&mut self, name: String) -> Result<Result<(), String>> {
        let parts = self.response_parts()?;
        Ok(remove(&mut parts.headers, &name, false))
    }
}

impl properties::Host for PluginState {
    fn get(&mut self, key: String) -> Result<Option<String>> {
        Ok(self.exchange()?.properties.get(&key).cloned())
    }

    fn set(&mut self, key: String, value: String) -> Result<Result<(), String>> {
        let properties = &mut self.exchange()?.properties;
        if key.len() > MAX_PROPERTY_KEY || value.len() > MAX_PROPERTY_VALUE {
            return Ok(Err(format!(
                "property keys are limited to {MAX_PROPERTY_KEY} bytes and values to {MAX_PROPERTY_VALUE}"
            )));
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

impl log::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) -> Result<()> {
        let plugin = &*self.plugin;
        let route = self.exchange.as_deref().map(|ex| &*ex.route).unwrap_or("");
        // `{:?}` escapes control characters, so a plugin cannot forge log lines.
        match level {
            LogLevel::Trace => tracing::trace!(plugin, route, "{message:?}"),
            LogLevel::Debug => tracing::debug!(plugin, route, "{message:?}"),
            LogLevel::Info => tracing::info!(plugin, route, "{message:?}"),
            LogLevel::Warn => tracing::warn!(plugin, route, "{message:?}"),
            LogLevel::Error => tracing::error!(plugin, route, "{message:?}"),
        }
        Ok(())
    }
}
