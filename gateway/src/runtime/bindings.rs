//! Host-side bindings generated from the WIT package in `wit/`.
//!
//! The generated code stays in the private `generated` module; the rest of the crate uses the few
//! names re-exported here.

#[allow(missing_docs, clippy::all)]
mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        // Every import may trap: the host stops a plugin that breaches its budget or the
        // contract. Imports are synchronous (they never wait on I/O); exports are async, so that
        // a long-running call yields to other requests at every epoch tick.
        imports: { default: trappable },
        exports: { default: async },
    });
}

pub(crate) use generated::wasmgate::plugin::{log, properties, request, response, types};
pub(crate) use generated::{Plugin as PluginWorld, PluginPre as PluginWorldPre};
pub(crate) use types::{Action, ImmediateResponse, LogLevel};
