//! Write [wasmgate](https://example.invalid/wasmgate) policy plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`]: it is built from its typed configuration when an
//! instance starts, then sees the request (request phase) and the response (response phase) of the
//! exchange it serves. One [`export_plugin!`] line turns it into a `wasm32-wasip2` component:
//!
//! ```no_run
//! use wasmgate_plugin_sdk::{export_plugin, Action, ImmediateResponse, Plugin, Request};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     /// Value of the `x-hello` header added to every request.
//!     greeting: String,
//! }
//!
//! struct Hello {
//!     greeting: String,
//! }
//!
//! impl Plugin for Hello {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         if config.greeting.is_empty() {
//!             return Err("greeting must not be empty".into());
//!         }
//!         Ok(Hello { greeting: config.greeting })
//!     }
//!
//!     fn on_request(&self, request: &mut Request) -> Action {
//!         match request.set_header("x-hello", &self.greeting) {
//!             Ok(()) => Action::Continue,
//!             Err(_) => Action::Respond(ImmediateResponse::new(500)),
//!         }
//!     }
//! }
//!
//! export_plugin!(Hello);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (the crate's `crate-type` must
//! include `cdylib`) and name the `.wasm` file in the gateway's manifest.
//!
//! # Instances
//!
//! The gateway gives every request a fresh instance of each plugin in its route's chain, so a
//! plugin's globals never carry one request's data into another. Within one request the same
//! instance runs both phases: state kept in the plugin value between [`Plugin::on_request`] and
//! [`Plugin::on_response`] belongs to that request alone.
//!
//! # Reads
//!
//! Every read of the request, the response or a property asks the gateway, a call out of the
//! sandbox each. A plugin that reads the same values for (nearly) every request names them in
//! [`Plugin::reads`]; the gateway then hands them in with each call (contract 0.2.3), and the same
//! methods answer from there. Naming a value is a hint: a plugin reads the same whether it names
//! it or not.
//!
//! # Fixed edits
//!
//! A phase that, with the plugin's configuration, makes the same header edits for every request
//! (a rewrite with fixed values) can say so in [`Plugin::fixed_edits`]: the gateway then makes
//! those edits itself, at the plugin's place in the chain, instead of calling the phase (contract
//! 0.2.4), and checks them when the manifest loads. The phase must still make them when called.

// Lets the generated bindings name this crate by its public path, from inside and outside alike.
extern crate self as wasmgate_plugin_sdk;

use std::fmt;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;

#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod __private {
    //! Generated bindings and glue used by [`export_plugin!`](crate::export_plugin). Not part
    //! of the SDK's API.
    pub use wit_bindgen;

    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world_plugin",
        default_bindings_module: "::wasmgate_plugin_sdk::__private",
        runtime_path: "::wasmgate_plugin_sdk::__private::wit_bindgen::rt",
    });

    pub use self::exports::wasmgate::plugin::handler::Guest;
    pub use self::exports::wasmgate::plugin::handler_with_fixed_edits::Guest as GuestWithFixedEdits;
    pub use self::exports::wasmgate::plugin::handler_with_values::Guest as GuestWithValues;
    pub use self::wasmgate::plugin::types::FixedEdits as WitFixedEdits;
    pub use self::wasmgate::plugin::types::{Action as WitAction, PluginInfo, ReadSet};
    pub use crate::glue::{
        configure, fixed_edits, on_complete, on_request, on_response, reads, with_values,
    };
}

use __private::wasmgate::plugin as wit;

/// A policy plugin.
///
/// Every hook has a default that lets the exchange pass unchanged, so a plugin implements only the
/// phases it cares about.
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The plugin's configuration, deserialised from the `config` of its entry in a route's chain.
    ///
    /// When the manifest gives no `config`, it is deserialised from `null` and, failing that, from
    /// an empty map, so both `()` and a struct whose fields all have defaults work.
    type Config: DeserializeOwned;

    /// Whether the plugin decides who may pass (authentication or authorisation). The gateway's
    /// `check` warns when such a plugin is configured to fail open.
    const AUTH: bool = false;

    /// Whether the plugin implements [`Plugin::on_request`]. Set it to `false` when it does not:
    /// the gateway then skips the call (a call into a plugin is most of what it costs per
    /// request). An [`AUTH`](Plugin::AUTH) plugin must keep it `true`; the gateway refuses one
    /// that does not.
    const ON_REQUEST: bool = true;

    /// Whether the plugin implements [`Plugin::on_response`]. Set it to `false` when it does not,
    /// and the gateway skips the call.
    const ON_RESPONSE: bool = true;

    /// Whether the plugin implements [`Plugin::on_complete`]. One instance serves every phase a
    /// plugin asks for in a request, held from the first to the last; with this set and another
    /// phase, that means until the response body has been sent.
    const ON_COMPLETE: bool = false;

    /// What the plugin reads in its phases: the request and response headers and the properties
    /// it reads for (nearly) every request. The gateway hands these values in with each call,
    /// so that reading them costs no call out of the sandbox; anything not named here is still
    /// read from the gateway, one call out each (a few hundred nanoseconds). Asked once, right
    /// after [`Plugin::new`]; like the phase constants, the answer must follow from the
    /// configuration alone. The default names nothing, and the gateway then calls the plugin as
    /// it calls one built before contract 0.2.3.
    fn reads(&self) -> Reads {
        Reads::default()
    }

    /// The header edits that are the whole of the plugin's request or response phase when, with
    /// its configuration, they are the same for every request (a header rewrite with fixed
    /// values): the gateway then makes them itself, at the plugin's place in the chain, instead
    /// of calling the phase (contract 0.2.4), which costs far less than a call. The phase itself
    /// must still make the same edits: an older gateway calls it. Asked once, right after
    /// [`Plugin::new`]; the default fixes nothing.
    fn fixed_edits(&self) -> FixedEdits {
        FixedEdits::default()
    }

    /// Builds the plugin from its configuration.
    ///
    /// Runs when the manifest loads, so that a configuration this returns an error for is refused
    /// before any request is served (the gateway reports the message with the route and plugin),
    /// and again at the start of every instance.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The request phase, in chain order, before the upstream is called. Runs only when
    /// [`Plugin::ON_REQUEST`] is `true` (the default).
    ///
    /// Returning [`Action::Respond`] answers the client at once: later plugins and the upstream
    /// are skipped. The default continues.
    fn on_request(&self, request: &mut Request) -> Action {
        let _ = request;
        Action::Continue
    }

    /// The response phase, in reverse chain order, once the response head is known. Runs only
    /// when [`Plugin::ON_RESPONSE`] is `true` (the default).
    ///
    /// Runs for every plugin whose request phase continued, whether the response came from the
    /// upstream, from a later plugin's [`Action::Respond`], or from the gateway (a 502 or 504).
    /// The default leaves the response unchanged.
    fn on_response(&self, request: &Request, response: &mut Response) {
        let _ = (request, response);
    }

    /// The completion phase, in reverse chain order, after the response body has been sent (or
    /// the exchange ended early). Runs only when [`Plugin::ON_COMPLETE`] is `true`. Request and
    /// response are read-only; the properties `wasmgate.bytes_out` and `wasmgate.completed` tell
    /// how it went. The default does nothing.
    fn on_complete(&self, request: &Request, response: &Response) {
        let _ = (request, response);
    }
}

/// What the request phase decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pass the request on to the next plugin, then to the upstream.
    Continue,
    /// Answer the client with this response; the upstream is never called.
    Respond(ImmediateResponse),
}

/// A complete response produced by a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImmediateResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers, in order. The gateway computes `content-length` itself.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl ImmediateResponse {
    /// A response with this status, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        ImmediateResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

/// What a plugin reads in its phases ([`Plugin::reads`]), handed in with each call.
///
/// ```
/// use wasmgate_plugin_sdk::Reads;
///
/// let reads = Reads::new()
///     .request_header("Authorization")
///     .property("subject");
/// assert_eq!(reads.request_headers(), ["authorization"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    request_headers: Vec<String>,
    response_headers: Vec<String>,
    properties: Vec<String>,
}

impl Reads {
    /// Nothing read.
    pub fn new() -> Reads {
        Reads::default()
    }

    /// Adds a request header (any case; kept lower-case), handed in every phase. A name that
    /// is not a header name is left out: reading it asks the gateway, which finds nothing.
    pub fn request_header(mut self, name: &str) -> Reads {
        if is_header_name(name) {
            push_new(&mut self.request_headers, name.to_ascii_lowercase());
        }
        self
    }

    /// Adds a response header (any case; kept lower-case), handed in the response and
    /// completion phases. A name that is not a header name is left out.
    pub fn response_header(mut self, name: &str) -> Reads {
        if is_header_name(name) {
            push_new(&mut self.response_headers, name.to_ascii_lowercase());
        }
        self
    }

    /// Adds a property (its value as the call starts; `wasmgate.*` ones included). A key
    /// longer than a property key can be (256 bytes) is left out.
    pub fn property(mut self, key: &str) -> Reads {
        if key.len() <= MAX_PROPERTY_KEY {
            push_new(&mut self.properties, key.to_string());
        }
        self
    }

    /// Adds several properties.
    pub fn properties<'k>(self, keys: impl IntoIterator<Item = &'k String>) -> Reads {
        keys.into_iter()
            .fold(self, |reads, key| reads.property(key))
    }

    /// Adds a key list's keys, so that [`properties::KeyList::read`] takes them, together, from
    /// what is handed in (when none of them is named already and all of them fit; otherwise
    /// they are read as the list is without it).
    pub fn key_list(mut self, list: &properties::KeyList) -> Reads {
        let keys = list.keys();
        let offset = self.properties.len();
        let fits = offset + keys.len() <= MAX_READS
            && keys.iter().all(|key| key.len() <= MAX_PROPERTY_KEY)
            && keys
                .iter()
                .enumerate()
                .all(|(at, key)| !self.properties.contains(key) && !keys[..at].contains(key));
        if fits {
            self.properties.extend(keys.iter().cloned());
            let _ = list.offset.set(offset);
        }
        self
    }

    /// The request headers named, lower-case, in order.
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    /// The response headers named, lower-case, in order.
    pub fn response_headers(&self) -> &[String] {
        &self.response_headers
    }

    /// The properties named, in order.
    pub fn property_keys(&self) -> &[String] {
        &self.properties
    }

    /// Whether nothing is named.
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_empty()
            && self.response_headers.is_empty()
            && self.properties.is_empty()
    }
}

/// Whether `name` is an HTTP field name (a token, RFC 9110 section 5.1).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The most names in each list of [`Reads`] (the gateway refuses more); the rest are read from
/// the gateway.
const MAX_READS: usize = 64;

/// The longest property key.
const MAX_PROPERTY_KEY: usize = 256;

fn push_new(list: &mut Vec<String>, item: String) {
    if list.len() < MAX_READS && !list.contains(&item) {
        list.push(item);
    }
}

/// A header edit the gateway can make on a plugin's behalf ([`Plugin::fixed_edits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replaces every value of the header (name, value).
    Set(String, String),
    /// Appends a value to the header (name, value).
    Add(String, String),
    /// Removes every value of the header.
    Remove(String),
}

/// The header edits that are the whole of a phase, for every request ([`Plugin::fixed_edits`]):
/// `Some` for a phase the gateway need not call, `None` for one it must.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixedEdits {
    /// The request phase's edits, in order, if fixed.
    pub request: Option<Vec<HeaderEdit>>,
    /// The response phase's edits, in order, if fixed.
    pub response: Option<Vec<HeaderEdit>>,
}

/// An error returned by the gateway for a host call it refused, such as a header value that
/// contains a line break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(String);

impl HostError {
    /// The gateway's explanation.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostError {}

/// The request of the current exchange.
///
/// Hooks receive `&mut Request` in the request phase, where it can be changed, and `&Request` in
/// the response phase, where it is read-only. Every read asks the gateway, which owns the data.
#[derive(Debug)]
pub struct Request {
    _private: (),
}

impl Request {
    // The request's own fields are properties too (`wasmgate.method` and the others): named
    // in [`Plugin::reads`], they are handed in like any property.

    /// The method, e.g. `GET`.
    pub fn method(&self) -> String {
        view::field("wasmgate.method").unwrap_or_else(wit::request::method)
    }

    /// The path without the query string, as routed.
    pub fn path(&self) -> String {
        view::field("wasmgate.path").unwrap_or_else(wit::request::path)
    }

    /// The query string without the leading `?`, if there is one.
    pub fn query(&self) -> Option<String> {
        view::property("wasmgate.query").unwrap_or_else(wit::request::query)
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        view::header_first(view::Side::Request, name).unwrap_or_else(|| wit::request::header(name))
    }

    /// Every value of a header, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        view::header_values(view::Side::Request, name)
            .unwrap_or_else(|| wit::request::header_values(name))
    }

    /// All headers, in order, with lower-case names.
    pub fn headers(&self) -> Vec<(String, String)> {
        wit::request::headers()
    }

    /// The client's socket address, e.g. `127.0.0.1:53412`.
    pub fn client_addr(&self) -> String {
        view::field("wasmgate.client_addr").unwrap_or_else(wit::request::client_addr)
    }

    /// The name of the route that matched.
    pub fn route_name(&self) -> String {
        view::field("wasmgate.route").unwrap_or_else(wit::request::route_name)
    }

    /// The buffered request body; fails unless the plugin's manifest entry sets `body: true`.
    pub fn body(&self) -> Result<Vec<u8>, HostError> {
        wit::request::body().map_err(HostError)
    }

    /// Replaces every value of a header with `value`.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        wit::request::set_header(name, value).map_err(HostError)?;
        view::edit(view::Side::Request, name, view::Edit::Set(value));
        Ok(())
    }

    /// Appends a value to a header.
    pub fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        wit::request::add_header(name, value).map_err(HostError)?;
        view::edit(view::Side::Request, name, view::Edit::Add(value));
        Ok(())
    }

    /// Removes every value of a header.
    pub fn remove_header(&mut self, name: &str) -> Result<(), HostError> {
        wit::request::remove_header(name).map_err(HostError)?;
        view::edit(view::Side::Request, name, view::Edit::Remove);
        Ok(())
    }

    /// Replaces the request body; fails unless the plugin's manifest entry sets `body: true`.
    pub fn set_body(&mut self, body: &[u8]) -> Result<(), HostError> {
        wit::request::set_body(body).map_err(HostError)
    }
}

/// The response of the current exchange, in the response phase.
#[derive(Debug)]
pub struct Response {
    _private: (),
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        view::status().unwrap_or_else(wit::response::status)
    }

    /// Changes the status code (100 to 999).
    pub fn set_status(&mut self, status: u16) -> Result<(), HostError> {
        wit::response::set_status(status).map_err(HostError)?;
        view::set_status(status);
        Ok(())
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        view::header_first(view::Side::Response, name)
            .unwrap_or_else(|| wit::response::header(name))
    }

    /// Every value of a header, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        view::header_values(view::Side::Response, name)
            .unwrap_or_else(|| wit::response::header_values(name))
    }

    /// All headers, in order, with lower-case names.
    pub fn headers(&self) -> Vec<(String, String)> {
        wit::response::headers()
    }

    /// Replaces every value of a header with `value`.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        wit::response::set_header(name, value).map_err(HostError)?;
        view::edit(view::Side::Response, name, view::Edit::Set(value));
        Ok(())
    }

    /// Appends a value to a header.
    pub fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        wit::response::add_header(name, value).map_err(HostError)?;
        view::edit(view::Side::Response, name, view::Edit::Add(value));
        Ok(())
    }

    /// Removes every value of a header.
    pub fn remove_header(&mut self, name: &str) -> Result<(), HostError> {
        wit::response::remove_header(name).map_err(HostError)?;
        view::edit(view::Side::Response, name, view::Edit::Remove);
        Ok(())
    }
}

/// Header reads and edits that the request (in the request phase) and the response have in
/// common, so that one piece of plugin code can serve both, and a test double can stand in for
/// them in unit tests.
pub trait EditHeaders {
    /// Every value of a header, in order.
    fn header_values(&self, name: &str) -> Vec<String>;
    /// Replaces every value of a header with `value`.
    fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    /// Appends a value to a header.
    fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    /// Removes every value of a header.
    fn remove_header(&mut self, name: &str) -> Result<(), HostError>;
}

macro_rules! delegate_edit_headers {
    ($ty:ty) => {
        impl EditHeaders for $ty {
            fn header_values(&self, name: &str) -> Vec<String> {
                <$ty>::header_values(self, name)
            }
            fn set_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
                <$ty>::set_header(self, name, value)
            }
            fn add_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
                <$ty>::add_header(self, name, value)
            }
            fn remove_header(&mut self, name: &str) -> Result<(), HostError> {
                <$ty>::remove_header(self, name)
            }
        }
    };
}

delegate_edit_headers!(Request);
delegate_edit_headers!(Response);

/// Properties of the current request, shared along the chain and dropped when it ends.
pub mod properties {
    use super::{HostError, wit};

    /// The value of a property, if a plugin earlier in the chain set it.
    pub fn get(key: &str) -> Option<String> {
        crate::view::property(key).unwrap_or_else(|| wit::properties::get(key))
    }

    /// The values of `keys`, in order, in one call out of the sandbox: for a plugin that reads
    /// many values (every call out has a fixed cost). The request's own fields read as
    /// properties too (`wasmgate.method`, `wasmgate.path`, `wasmgate.query`, `wasmgate.route`,
    /// `wasmgate.client_addr`, `wasmgate.request_id`). At most 64 keys; more stops the plugin.
    /// Build the key list once (at configuration), not for every request.
    pub fn get_many(keys: &[String]) -> Vec<Option<String>> {
        decode_many(wit::properties::get_many(keys), keys.len())
    }

    /// Property keys read together for every request (a logger's): the first [`KeyList::get`]
    /// leaves the list with the gateway (`properties.prepare`, contract 0.2.2), and every read
    /// after it names the list by a number, so that the keys are not handed out of the sandbox
    /// for every request. Build it once, with the plugin (at configuration); the first read
    /// happens in a phase, so constructing it needs no gateway (a plugin's unit tests can).
    #[derive(Debug)]
    pub struct KeyList {
        keys: Vec<String>,
        handle: std::sync::OnceLock<u32>,
        /// Where the keys are in [`Reads`] when they were named there together
        /// ([`Reads::key_list`]): then they are handed in with the call, and read from there.
        pub(crate) offset: std::sync::OnceLock<usize>,
    }

    impl KeyList {
        /// The list; at most 64 keys (more stops the plugin at the first read).
        pub fn new(keys: Vec<String>) -> KeyList {
            KeyList {
                keys,
                handle: std::sync::OnceLock::new(),
                offset: std::sync::OnceLock::new(),
            }
        }

        /// The keys, in order.
        pub fn keys(&self) -> &[String] {
            &self.keys
        }

        /// The keys' values, in order, as [`get_many`] reads them, in one call out of the
        /// sandbox (two the first time).
        pub fn get(&self) -> Vec<Option<String>> {
            let values = self.read();
            (0..self.keys.len())
                .map(|index| values.get(index).map(str::to_owned))
                .collect()
        }

        /// The keys' values as [`KeyList::get`] reads them, borrowed from the one buffer the
        /// gateway hands in rather than copied into a `String` each: for a plugin that only
        /// writes them out again (an access log), that is an allocation and a free per value
        /// saved.
        pub fn read(&self) -> Values {
            let handed_in = self
                .offset
                .get()
                .and_then(|&offset| crate::view::property_run(offset, self.keys.len()));
            if let Some(buffer) = handed_in {
                return Values::new(buffer, self.keys.len());
            }
            let handle = *self
                .handle
                .get_or_init(|| wit::properties::prepare(&self.keys));
            Values::new(wit::properties::get_prepared(handle), self.keys.len())
        }
    }

    /// Values read in one call ([`KeyList::read`]), in the order of the keys.
    #[derive(Debug)]
    pub struct Values {
        /// The buffer, as text when the whole of it is UTF-8 (the usual case). Then every
        /// value in it is too: each is preceded by the last byte of its length (below 0x80 for
        /// a buffer under 2 GiB) and followed by a marker byte (0 or 1), so none can start or
        /// end inside a character (and `str::get` checks that anyway). One check of the buffer
        /// stands for one per value, which cost more than the values' own length in the
        /// compiled plugin.
        buffer: Result<String, Vec<u8>>,
        /// Where each value is in `buffer`; `None` for an absent one.
        spans: Vec<Option<(u32, u32)>>,
    }

    impl Values {
        /// The values laid out in `buffer` as the contract says; a value cut short reads as
        /// absent, and so do those after it.
        pub(crate) fn new(buffer: Vec<u8>, count: usize) -> Values {
            let mut spans = Vec::with_capacity(count);
            let mut at = 0usize;
            for _ in 0..count {
                let span = match buffer.get(at) {
                    Some(1) => {
                        let length = buffer
                            .get(at + 1..at + 5)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                        match length {
                            Some(length) if at + 5 + length <= buffer.len() => {
                                let start = at + 5;
                                at = start + length;
                                Some((start as u32, at as u32))
                            }
                            _ => {
                                at = buffer.len();
                                None
                            }
                        }
                    }
                    Some(_) => {
                        at += 1;
                        None
                    }
                    None => None,
                };
                spans.push(span);
            }
            let buffer = String::from_utf8(buffer).map_err(|err| err.into_bytes());
            Values { buffer, spans }
        }

        /// The value of the key at `index`, if it is set (and is UTF-8).
        pub fn get(&self, index: usize) -> Option<&str> {
            let (start, end) = (*self.spans.get(index)?)?;
            let range = start as usize..end as usize;
            match &self.buffer {
                Ok(text) => text.get(range),
                Err(bytes) => std::str::from_utf8(&bytes[range]).ok(),
            }
        }

        /// How many keys were read.
        pub fn len(&self) -> usize {
            self.spans.len()
        }

        /// Whether no key was read.
        pub fn is_empty(&self) -> bool {
            self.spans.is_empty()
        }
    }

    /// The values in the buffer `get-many` returns (the contract says how it is laid out); a
    /// value cut short or not UTF-8 reads as absent.
    pub(crate) fn decode_many(buffer: Vec<u8>, count: usize) -> Vec<Option<String>> {
        let values = Values::new(buffer, count);
        (0..count)
            .map(|index| values.get(index).map(str::to_owned))
            .collect()
    }

    /// Sets a property for the plugins that run after this one (and for the response phase).
    pub fn set(key: &str, value: &str) -> Result<(), HostError> {
        wit::properties::set(key, value).map_err(HostError)?;
        crate::view::set_property(key, value);
        Ok(())
    }
}

/// Log lines written through the gateway's log output, tagged with the plugin's name.
pub mod log {
    use super::wit::log::log;
    use super::wit::types::LogLevel;

    /// Logs at trace level.
    pub fn trace(message: &str) {
        log(LogLevel::Trace, message);
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message);
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message);
    }

    /// Logs at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message);
    }
}

mod view {
    //! The values the gateway handed in with the current call (`handler-with-values`): the
    //! buffer as it came, read in place, and the plugin's own edits made during the call on
    //! top, so that a read after an edit sees it, as a read from the gateway would.

    use std::sync::{Mutex, MutexGuard};

    use crate::Reads;

    /// Which headers.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Side {
        Request,
        Response,
    }

    /// A header edit the gateway accepted.
    pub(crate) enum Edit<'v> {
        Set(&'v str),
        Add(&'v str),
        Remove,
    }

    /// Where something is in the buffer.
    type Span = (u32, u32);

    /// The values of one call: the buffer as it came (checked once, read in place).
    pub(crate) struct View {
        /// What the plugin named, which the buffer follows in order.
        reads: &'static Reads,
        buffer: Vec<u8>,
        /// The response status; 0 in the request phase.
        status: u16,
        /// Where the properties start in `buffer`.
        properties_at: u32,
        /// Headers the plugin edited in this call, with their values now.
        edited_headers: Vec<(Side, usize, Vec<String>)>,
        /// Properties the plugin set in this call, with their values now.
        edited_properties: Vec<(usize, String)>,
    }

    // A component has one thread, so the lock is never contended; it is a `static` rather
    // than a `thread_local!` because a thread-local with a destructor registers it at its first
    // use, which in a fresh instance per request is every request.
    static CURRENT: Mutex<Option<View>> = Mutex::new(None);

    fn current() -> MutexGuard<'static, Option<View>> {
        // A panic traps the instance; nothing runs in it after one.
        CURRENT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `call` with `view` as the current call's values, and forgets them after it.
    pub(crate) fn during<R>(view: Option<View>, call: impl FnOnce() -> R) -> R {
        *current() = view;
        let result = call();
        *current() = None;
        result
    }

    fn with<R>(f: impl FnOnce(&mut View) -> Option<R>) -> Option<R> {
        current().as_mut().and_then(f)
    }

    /// A header's values when they were handed in (`None`: ask the gateway).
    pub(crate) fn header_values(side: Side, name: &str) -> Option<Vec<String>> {
        with(|view| {
            let index = view.header_index(side, name)?;
            if let Some(edited) = view.edited_header(side, index) {
                return Some(edited.clone());
            }
            Some(
                view.header_spans(index)
                    .map(|span| view.text(span).to_string())
                    .collect(),
            )
        })
    }

    /// A header's first value when it was handed in (`None`: ask the gateway).
    pub(crate) fn header_first(side: Side, name: &str) -> Option<Option<String>> {
        with(|view| {
            let index = view.header_index(side, name)?;
            if let Some(edited) = view.edited_header(side, index) {
                return Some(edited.first().cloned());
            }
            let first = view.header_spans(index).next();
            Some(first.map(|span| view.text(span).to_string()))
        })
    }

    /// Applies an edit the gateway accepted to a header that was handed in.
    pub(crate) fn edit(side: Side, name: &str, edit: Edit<'_>) {
        with(|view| {
            let index = view.header_index(side, name)?;
            let at = view
                .edited_headers
                .iter()
                .position(|(s, i, _)| *s == side && *i == index);
            // Only an addition needs the values the header had.
            let values = match (edit, at) {
                (Edit::Set(value), _) => vec![value.to_string()],
                (Edit::Remove, _) => Vec::new(),
                (Edit::Add(value), Some(at)) => {
                    let mut values = std::mem::take(&mut view.edited_headers[at].2);
                    values.push(value.to_string());
                    values
                }
                (Edit::Add(value), None) => view
                    .header_spans(index)
                    .map(|span| view.text(span).to_string())
                    .chain([value.to_string()])
                    .collect(),
            };
            match at {
                Some(at) => view.edited_headers[at].2 = values,
                None => view.edited_headers.push((side, index, values)),
            }
            Some(())
        });
    }

    /// The response status, when it was handed in.
    pub(crate) fn status() -> Option<u16> {
        with(|view| (view.status != 0).then_some(view.status))
    }

    pub(crate) fn set_status(status: u16) {
        with(|view| {
            if view.status != 0 {
                view.status = status;
            }
            Some(())
        });
    }

    /// One of the request's own fields (always set), when its property was handed in.
    pub(crate) fn field(key: &str) -> Option<String> {
        property(key).flatten()
    }

    /// A property's value when it was handed in (`None`: ask the gateway).
    pub(crate) fn property(key: &str) -> Option<Option<String>> {
        with(|view| {
            let index = view.reads.properties.iter().position(|k| k == key)?;
            if let Some((_, value)) = view.edited_properties.iter().find(|(i, _)| *i == index) {
                return Some(Some(value.clone()));
            }
            Some(
                view.property_at(index)
                    .map(|span| view.text(span).to_string()),
            )
        })
    }

    pub(crate) fn set_property(key: &str, value: &str) {
        with(|view| {
            let index = view.reads.properties.iter().position(|k| k == key)?;
            view.edited_properties.retain(|(i, _)| *i != index);
            view.edited_properties.push((index, value.to_string()));
            Some(())
        });
    }

    /// The values of the `count` properties named from `offset` on, laid out as
    /// `properties.get-many` returns them: a copy of the bytes as they came, unless the plugin
    /// set one of them in this call.
    pub(crate) fn property_run(offset: usize, count: usize) -> Option<Vec<u8>> {
        with(|view| {
            let end = offset.checked_add(count)?;
            if end > view.reads.properties.len() {
                return None;
            }
            if !view
                .edited_properties
                .iter()
                .any(|(i, _)| (offset..end).contains(i))
            {
                let entries = view.property_entries(offset, end)?;
                return Some(view.bytes(entries).to_vec());
            }
            let mut out = Vec::new();
            for index in offset..end {
                let edited = view.edited_properties.iter().find(|(i, _)| *i == index);
                let value = match edited {
                    Some((_, value)) => Some(value.as_bytes()),
                    None => view.property_at(index).map(|span| view.bytes(span)),
                };
                match value {
                    None => out.push(0),
                    Some(value) => {
                        out.push(1);
                        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                        out.extend_from_slice(value);
                    }
                }
            }
            Some(out)
        })
    }

    impl View {
        /// Checks the buffer the gateway laid out for `reads`; `None` when it does not match
        /// (then every read asks the gateway, which is slower but right). Nothing is copied or
        /// allocated: the values are found again, by walking the buffer, when they are read.
        pub(crate) fn decode(buffer: Vec<u8>, reads: &'static Reads) -> Option<View> {
            let status = u16::from_le_bytes([*buffer.first()?, *buffer.get(1)?]);
            let names = reads.request_headers.len() + reads.response_headers.len();
            let mut at = 2;
            for _ in 0..names {
                at = skip_header(&buffer, at)?;
            }
            let properties_at = at;
            for _ in &reads.properties {
                at = skip_property(&buffer, at)?.1;
            }
            if at != buffer.len() {
                return None;
            }
            Some(View {
                reads,
                status,
                properties_at: properties_at as u32,
                buffer,
                edited_headers: Vec::new(),
                edited_properties: Vec::new(),
            })
        }

        fn header_index(&self, side: Side, name: &str) -> Option<usize> {
            let (names, base) = match side {
                Side::Request => (&self.reads.request_headers, 0),
                Side::Response => (
                    &self.reads.response_headers,
                    self.reads.request_headers.len(),
                ),
            };
            let index = names.iter().position(|n| n.eq_ignore_ascii_case(name))?;
            Some(base + index)
        }

        fn edited_header(&self, side: Side, index: usize) -> Option<&Vec<String>> {
            self.edited_headers
                .iter()
                .find(|(s, i, _)| *s == side && *i == index)
                .map(|(_, _, values)| values)
        }

        /// The values of the `index`th header named (request headers first).
        fn header_spans(&self, index: usize) -> impl Iterator<Item = Span> + '_ {
            let mut at = 2;
            for _ in 0..index {
                // Checked by `decode`.
                at = skip_header(&self.buffer, at).unwrap_or(self.buffer.len());
            }
            let count = word(&self.buffer, at).unwrap_or(0);
            at += 4;
            (0..count).map_while(move |_| {
                let len = word(&self.buffer, at)?;
                let span = ((at + 4) as u32, (at + 4 + len) as u32);
                at += 4 + len;
                Some(span)
            })
        }

        /// The value of the `index`th property named, and where its entry ends.
        fn property_at(&self, index: usize) -> Option<Span> {
            let mut at = self.properties_at as usize;
            for _ in 0..index {
                at = skip_property(&self.buffer, at)?.1;
            }
            skip_property(&self.buffer, at)?.0
        }

        /// Where the entries of the properties `from..to` start and end.
        fn property_entries(&self, from: usize, to: usize) -> Option<Span> {
            let mut at = self.properties_at as usize;
            let mut start = at;
            for index in 0..to {
                if index == from {
                    start = at;
                }
                at = skip_property(&self.buffer, at)?.1;
            }
            Some((start as u32, at as u32))
        }

        fn bytes(&self, (start, end): Span) -> &[u8] {
            &self.buffer[start as usize..end as usize]
        }

        /// A value as text; the gateway sends UTF-8 (headers with anything else replaced), so
        /// the check is for a broken buffer, which reads as empty rather than panicking.
        fn text(&self, span: Span) -> &str {
            std::str::from_utf8(self.bytes(span)).unwrap_or_default()
        }
    }

    /// The four bytes at `at`, little-endian.
    fn word(buffer: &[u8], at: usize) -> Option<usize> {
        let bytes = buffer.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
    }

    /// Where the header entry at `at` (a count, then each value's length and bytes) ends.
    fn skip_header(buffer: &[u8], at: usize) -> Option<usize> {
        let count = word(buffer, at)?;
        let mut at = at + 4;
        for _ in 0..count {
            at = at.checked_add(4)?.checked_add(word(buffer, at)?)?;
        }
        (at <= buffer.len()).then_some(at)
    }

    /// The value of the property entry at `at` (`get-many`'s layout), and where it ends.
    fn skip_property(buffer: &[u8], at: usize) -> Option<(Option<Span>, usize)> {
        match *buffer.get(at)? {
            0 => Some((None, at + 1)),
            _ => {
                let len = word(buffer, at + 1)?;
                let end = (at + 5)
                    .checked_add(len)
                    .filter(|end| *end <= buffer.len())?;
                Some((Some(((at + 5) as u32, end as u32)), end))
            }
        }
    }
}

/// Exports a [`Plugin`] implementation as the component's `handler`.
///
/// Use it once per plugin crate, at the top level:
///
/// ```no_run
/// # use wasmgate_plugin_sdk::Plugin;
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     type Config = ();
/// #     fn new(_: ()) -> Result<Self, String> { Ok(MyPlugin) }
/// # }
/// wasmgate_plugin_sdk::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[allow(unsafe_code)]
        const _: () = {
            struct WasmgateExport;
            static INSTANCE: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();

            impl $crate::__private::Guest for WasmgateExport {
                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<$crate::__private::PluginInfo, ::std::string::String> {
                    $crate::__private::configure::<$plugin>(&INSTANCE, &config)
                }

                fn on_request() -> $crate::__private::WitAction {
                    $crate::__private::on_request::<$plugin>(&INSTANCE)
                }

                fn on_response() {
                    $crate::__private::on_response::<$plugin>(&INSTANCE)
                }

                fn on_complete() {
                    $crate::__private::on_complete::<$plugin>(&INSTANCE)
                }
            }

            impl $crate::__private::GuestWithValues for WasmgateExport {
                fn reads() -> $crate::__private::ReadSet {
                    $crate::__private::reads()
                }

                fn on_request(values: ::std::vec::Vec<u8>) -> $crate::__private::WitAction {
                    $crate::__private::with_values(values, || {
                        $crate::__private::on_request::<$plugin>(&INSTANCE)
                    })
                }

                fn on_response(values: ::std::vec::Vec<u8>) {
                    $crate::__private::with_values(values, || {
                        $crate::__private::on_response::<$plugin>(&INSTANCE)
                    })
                }

                fn on_complete(values: ::std::vec::Vec<u8>) {
                    $crate::__private::with_values(values, || {
                        $crate::__private::on_complete::<$plugin>(&INSTANCE)
                    })
                }
            }

            impl $crate::__private::GuestWithFixedEdits for WasmgateExport {
                fn fixed() -> $crate::__private::WitFixedEdits {
                    $crate::__private::fixed_edits::<$plugin>(&INSTANCE)
                }
            }

            // Exported only in the component: host builds (the plugin's unit tests) have no use
            // for the component ABI symbols, and host linkers refuse their names.
            #[cfg(target_family = "wasm")]
            $crate::__private::__export_world_plugin!(WasmgateExport with_types_in $crate::__private);
            // ...and this keeps the plugin's code counted as used in those host builds.
            #[cfg(not(target_family = "wasm"))]
            let _ = <WasmgateExport as $crate::__private::Guest>::configure;
        };
    };
}

mod glue {
    //! What the exported functions do, kept out of the macro so that it is type-checked once.
    use super::*;

    /// What the configured plugin reads ([`Plugin::reads`]); one plugin per component.
    static READS: OnceLock<Reads> = OnceLock::new();

    /// `handler.configure`: parses the configuration and builds the plugin.
    pub fn configure<P: Plugin>(
        slot: &OnceLock<P>,
        config: &str,
    ) -> Result<__private::PluginInfo, String> {
        let parsed = parse_config::<P::Config>(config)?;
        let plugin = P::new(parsed)?;
        let reads = plugin.reads();
        // A second `configure` on the same instance keeps the first plugin: the gateway never
        // does this, and replacing state under a running instance would be surprising.
        let _ = slot.set(plugin);
        let _ = READS.set(reads);
        Ok(__private::PluginInfo {
            auth: P::AUTH,
            on_request: P::ON_REQUEST,
            on_response: P::ON_RESPONSE,
            on_complete: P::ON_COMPLETE,
        })
    }

    /// `handler-with-values.reads`: what [`Plugin::reads`] said at `configure`.
    pub fn reads() -> __private::ReadSet {
        let reads = READS.get().cloned().unwrap_or_default();
        __private::ReadSet {
            request_headers: reads.request_headers,
            response_headers: reads.response_headers,
            properties: reads.properties,
        }
    }

    /// `handler-with-fixed-edits.fixed`: [`Plugin::fixed_edits`] of the configured plugin,
    /// asked only when the gateway asks (once per use, when the manifest loads).
    pub fn fixed_edits<P: Plugin>(slot: &OnceLock<P>) -> __private::WitFixedEdits {
        use wit::types::HeaderEdit as Wit;
        let list = |edits: Option<Vec<HeaderEdit>>| {
            edits.map(|edits| {
                edits
                    .into_iter()
                    .map(|edit| match edit {
                        HeaderEdit::Set(name, value) => Wit::Set((name, value)),
                        HeaderEdit::Add(name, value) => Wit::Add((name, value)),
                        HeaderEdit::Remove(name) => Wit::Remove(name),
                    })
                    .collect()
            })
        };
        let fixed = configured(slot).fixed_edits();
        __private::WitFixedEdits {
            request: list(fixed.request),
            response: list(fixed.response),
        }
    }

    /// Runs a `handler-with-values` phase: `call` with the values handed in.
    pub fn with_values<R>(values: Vec<u8>, call: impl FnOnce() -> R) -> R {
        let view = READS
            .get()
            .and_then(|reads| view::View::decode(values, reads));
        view::during(view, call)
    }

    /// `handler.on-request`: runs [`Plugin::on_request`].
    pub fn on_request<P: Plugin>(slot: &OnceLock<P>) -> __private::WitAction {
        let mut request = Request { _private: () };
        match configured(slot).on_request(&mut request) {
            Action::Continue => __private::WitAction::Continue,
            Action::Respond(response) => {
                __private::WitAction::Respond(wit::types::ImmediateResponse {
                    status: response.status,
                    headers: response.headers,
                    body: response.body,
                })
            }
        }
    }

    /// `handler.on-response`: runs [`Plugin::on_response`].
    pub fn on_response<P: Plugin>(slot: &OnceLock<P>) {
        let request = Request { _private: () };
        let mut response = Response { _private: () };
        configured(slot).on_response(&request, &mut response);
    }

    /// `handler.on-complete`: runs [`Plugin::on_complete`].
    pub fn on_complete<P: Plugin>(slot: &OnceLock<P>) {
        let request = Request { _private: () };
        let response = Response { _private: () };
        configured(slot).on_complete(&request, &response);
    }

    fn configured<P>(slot: &OnceLock<P>) -> &P {
        // The gateway always configures an instance before its first phase; a trap is the
        // honest answer if that contract is ever broken.
        slot.get()
            .expect("wasmgate called a phase before configure")
    }

    /// Deserialises the configuration, treating a missing one as `null`, then as `{}`.
    pub(crate) fn parse_config<C: DeserializeOwned>(config: &str) -> Result<C, String> {
        match serde_json::from_str::<C>(config) {
            Ok(parsed) => Ok(parsed),
            Err(first) if config.trim() == "null" => {
                serde_json::from_str::<C>("{}").map_err(|_| describe(&first))
            }
            Err(err) => Err(describe(&err)),
        }
    }

    /// serde_json's message without its position, which points into JSON the gateway wrote and
    /// would only confuse someone reading their YAML manifest.
    fn describe(err: &serde_json::Error) -> String {
        let text = err.to_string();
        match text.rfind(" at line ") {
            Some(cut) if err.line() > 0 => text[..cut].to_string(),
            _ => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glue::parse_config;
    use super::properties;

    #[test]
    fn get_many_buffers_decode_in_order_and_a_bad_one_reads_as_absent() {
        let mut buffer = vec![1, 5, 0, 0, 0];
        buffer.extend_from_slice(b"alice");
        buffer.push(0);
        buffer.extend_from_slice(&[1, 0, 0, 0, 0]);
        assert_eq!(
            properties::decode_many(buffer, 3),
            [Some("alice".to_string()), None, Some(String::new())]
        );
        // Fewer values than keys, a length past the end, bytes that are not UTF-8: never a
        // panic, and nothing made up.
        assert_eq!(properties::decode_many(vec![], 2), [None, None]);
        assert_eq!(
            properties::decode_many(vec![1, 9, 0, 0, 0, b'a'], 1),
            [None]
        );
        assert_eq!(
            properties::decode_many(vec![1, 1, 0, 0, 0, 0xff], 1),
            [None]
        );

        // Values of several bytes a character, one long enough that its length has a byte
        // past 0x7f: read whole, whether the buffer as a whole is UTF-8 or (with a value that
        // is not) read value by value.
        let long = "é".repeat(100);
        let encode = |values: &[&[u8]]| {
            let mut buffer = Vec::new();
            for value in values {
                buffer.push(1);
                buffer.extend_from_slice(&(value.len() as u32).to_le_bytes());
                buffer.extend_from_slice(value);
            }
            buffer
        };
        let values: [&[u8]; 3] = ["中文".as_bytes(), long.as_bytes(), "🦀".as_bytes()];
        let expected = [
            Some("中文".to_string()),
            Some(long.clone()),
            Some("🦀".into()),
        ];
        assert_eq!(properties::decode_many(encode(&values), 3), expected);
        let values: [&[u8]; 4] = [values[0], values[1], &[0xe4, 0xb8], values[2]];
        let mut expected = expected.to_vec();
        expected.insert(2, None);
        assert_eq!(properties::decode_many(encode(&values), 4), expected);
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        name: String,
    }

    #[test]
    fn missing_config_becomes_unit_or_empty_map() {
        assert_eq!(parse_config::<()>("null"), Ok(()));
        assert_eq!(
            parse_config::<Sample>("null"),
            Ok(Sample {
                name: String::new()
            })
        );
    }

    #[test]
    fn config_errors_do_not_point_into_generated_json() {
        let err = parse_config::<Sample>(r#"{"nam": "x"}"#).unwrap_err();
        assert!(err.starts_with("unknown field `nam`"), "{err}");
        assert!(!err.contains("line"), "{err}");
    }
}

#[cfg(test)]
mod view_tests {
    use super::properties::KeyList;
    use super::view::{self, Edit, Side, View};
    use super::{Reads, Response};

    /// A buffer laid out as the gateway lays it out (contract 0.2.3, `handler-with-values`).
    fn buffer(status: u16, headers: &[&[&str]], properties: &[Option<&str>]) -> Vec<u8> {
        let mut out = status.to_le_bytes().to_vec();
        let push = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        for values in headers {
            out.extend_from_slice(&(values.len() as u32).to_le_bytes());
            for value in *values {
                push(&mut out, value.as_bytes());
            }
        }
        for value in properties {
            match value {
                None => out.push(0),
                Some(value) => {
                    out.push(1);
                    push(&mut out, value.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn values_are_read_in_place_and_edits_are_seen_by_later_reads() {
        let list = KeyList::new(vec!["wasmgate.method".into(), "unset".into()]);
        let reads: &'static Reads = Box::leak(Box::new(
            Reads::new()
                .request_header("X-One")
                .request_header("x-two")
                .response_header("x-up")
                .property("subject")
                .key_list(&list),
        ));
        let values = buffer(
            200,
            &[&["a"], &["b", "c"], &[]],
            &[Some("alice"), Some("GET"), None],
        );
        let view = View::decode(values.clone(), reads).expect("a buffer laid out for the reads");
        view::during(Some(view), || {
            assert_eq!(
                view::header_first(Side::Request, "x-one"),
                Some(Some("a".into()))
            );
            assert_eq!(
                view::header_values(Side::Request, "X-TWO"),
                Some(vec!["b".into(), "c".into()])
            );
            assert_eq!(view::header_values(Side::Response, "x-up"), Some(vec![]));
            // Not named: the gateway is asked.
            assert_eq!(view::header_first(Side::Request, "x-other"), None);
            assert_eq!(Response { _private: () }.status(), 200);
            assert_eq!(view::property("subject"), Some(Some("alice".into())));
            assert_eq!(view::field("wasmgate.method"), Some("GET".into()));
            assert_eq!(view::property("unset"), Some(None));
            assert_eq!(view::property("other"), None);
            // The key list's run, as `get-many` lays it out.
            let run = view::property_run(1, 2).unwrap();
            assert_eq!(run, [1, 3, 0, 0, 0, b'G', b'E', b'T', 0]);
            assert_eq!(list.read().get(0), Some("GET"));

            view::edit(Side::Request, "x-two", Edit::Add("d"));
            assert_eq!(
                view::header_values(Side::Request, "x-two"),
                Some(vec!["b".into(), "c".into(), "d".into()])
            );
            view::edit(Side::Request, "X-Two", Edit::Set("e"));
            assert_eq!(
                view::header_first(Side::Request, "x-two"),
                Some(Some("e".into()))
            );
            view::edit(Side::Request, "x-one", Edit::Remove);
            assert_eq!(view::header_values(Side::Request, "x-one"), Some(vec![]));
            view::set_property("unset", "now");
            assert_eq!(view::property("unset"), Some(Some("now".into())));
            assert_eq!(list.read().get(1), Some("now"));
        });
        // Gone after the call.
        assert_eq!(view::property("subject"), None);

        // A buffer that does not match the reads is refused whole: every read asks the gateway.
        assert!(View::decode(values[..values.len() - 1].to_vec(), reads).is_none());
        let mut longer = values.clone();
        longer.push(0);
        assert!(View::decode(longer, reads).is_none());
        let mut lying = values;
        lying[2] = 9; // x-one claims nine values
        assert!(View::decode(lying, reads).is_none());
    }

    #[test]
    fn a_key_list_takes_its_run_only_when_its_keys_were_not_named_already() {
        let list = KeyList::new(vec!["a".into(), "b".into()]);
        let reads = Reads::new().property("b").key_list(&list);
        assert_eq!(reads.property_keys(), ["b"]);
        assert!(list.offset.get().is_none());
        let list = KeyList::new(vec!["a".into(), "b".into()]);
        let reads = Reads::new().property("c").key_list(&list);
        assert_eq!(reads.property_keys(), ["c", "a", "b"]);
        assert_eq!(list.offset.get(), Some(&1));
        // Names that are not header names are left out.
        let reads = Reads::new()
            .request_header("bad name")
            .request_header("Good");
        assert_eq!(reads.request_headers(), ["good"]);
    }
}
