//! `header-rewrite`: adds, sets and removes request and response headers.
//!
//! ```yaml
//! plugins:
//!   - name: header-rewrite
//!     config:
//!       request:
//!         remove: [x-internal]
//!         set: { x-gateway: wasmgate }
//!         add: { x-trace-tag: edge }
//!       response:
//!         set: { cache-control: no-store }
//! ```
//!
//! Within a phase the operations run in the order remove, set, add, each over its headers in
//! name order. Names and values are checked when the manifest loads: a name must be an HTTP token
//! and a value must not contain CR, LF or NUL.

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmgate_plugin_sdk::{
    Action, EditHeaders, HostError, ImmediateResponse, Plugin, Request, Response, log,
};

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rewrites applied to the request before it goes upstream.
    #[serde(default)]
    pub request: Rewrite,
    /// Rewrites applied to the response before it goes to the client.
    #[serde(default)]
    pub response: Rewrite,
}

/// One phase's rewrites.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Headers removed, every value.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers set to one value, replacing any others.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values appended to headers.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

impl Rewrite {
    fn validate(&self, phase: &str) -> Result<(), String> {
        let names = self
            .remove
            .iter()
            .chain(self.set.keys())
            .chain(self.add.keys());
        for name in names {
            if !is_token(name) {
                return Err(format!("{phase}: `{name}` is not a valid header name"));
            }
        }
        for (name, value) in self.set.iter().chain(self.add.iter()) {
            if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(format!(
                    "{phase}: the value of `{name}` contains CR, LF or NUL"
                ));
            }
        }
        Ok(())
    }
}

/// RFC 9110 token characters.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The header-rewrite plugin.
pub struct HeaderRewrite {
    config: Config,
}

impl Plugin for HeaderRewrite {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        config.request.validate("request")?;
        config.response.validate("response")?;
        Ok(HeaderRewrite { config })
    }

    fn on_request(&self, request: &mut Request) -> Action {
        match apply(&self.config.request, request) {
            Ok(()) => Action::Continue,
            // Names and values were checked at load, so a refusal here is the gateway enforcing
            // a rule of its own (a protected header): fail the request rather than half-apply.
            Err(err) => {
                log::error(&format!("request rewrite refused: {err}"));
                Action::Respond(ImmediateResponse::new(500).body("header rewrite failed\n"))
            }
        }
    }

    fn on_response(&self, _request: &Request, response: &mut Response) {
        if let Err(err) = apply(&self.config.response, response) {
            log::error(&format!("response rewrite refused: {err}"));
        }
    }
}

/// Runs one phase's rewrites.
fn apply(rules: &Rewrite, target: &mut impl EditHeaders) -> Result<(), HostError> {
    for name in &rules.remove {
        target.remove_header(name)?;
    }
    for (name, value) in &rules.set {
        target.set_header(name, value)?;
    }
    for (name, value) in &rules.add {
        target.add_header(name, value)?;
    }
    Ok(())
}

wasmgate_plugin_sdk::export_plugin!(HeaderRewrite);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<HeaderRewrite, String> {
        let config: Config = serde_json::from_str(json).map_err(|e| e.to_string())?;
        HeaderRewrite::new(config)
    }

    #[test]
    fn accepts_valid_rules() {
        assert!(config(r#"{"request":{"set":{"x-a":"1"},"remove":["x-b"]}}"#).is_ok());
    }

    #[test]
    fn refuses_bad_names_and_values() {
        let err = config(r#"{"request":{"set":{"bad name":"1"}}}"#)
            .err()
            .unwrap();
        assert!(
            err.contains("`bad name` is not a valid header name"),
            "{err}"
        );
        let err = config(r#"{"response":{"add":{"x-a":"1\r\nx-b: 2"}}}"#)
            .err()
            .unwrap();
        assert!(err.contains("CR, LF or NUL"), "{err}");
    }

    /// Records the edits instead of calling the gateway.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl EditHeaders for Recorder {
        fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.0.push(format!("set {name}={value}"));
            Ok(())
        }
        fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.0.push(format!("add {name}={value}"));
            Ok(())
        }
        fn remove_header(&mut self, name: &str) -> Result<(), HostError> {
            self.0.push(format!("remove {name}"));
            Ok(())
        }
    }

    #[test]
    fn applies_remove_then_set_then_add() {
        let rules: Rewrite =
            serde_json::from_str(r#"{"add":{"x-a":"2"},"set":{"x-a":"1"},"remove":["x-a"]}"#)
                .unwrap();
        let mut recorder = Recorder::default();
        apply(&rules, &mut recorder).unwrap();
        assert_eq!(recorder.0, ["remove x-a", "set x-a=1", "add x-a=2"]);
    }
}
