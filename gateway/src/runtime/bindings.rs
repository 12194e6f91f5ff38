//! Host-side bindings generated from the WIT package in `wit/`.
//!
//! The generated code stays in private modules; the rest of the crate uses the few names
//! re-exported here. The exports are generated twice: as async calls, which run on a fiber and
//! can yield at an epoch tick, and as plain calls, which skip the fiber for a plugin that has
//! never run long enough to need one (`runtime::mod`, "Calls without a fiber").

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

#[allow(missing_docs, clippy::all)]
mod generated_sync {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        imports: { default: trappable },
        // The imports and the types are those of `generated`: one set of host traits, one
        // `Action`, whichever way a call is made.
        with: {
            "wasmgate:plugin/types": super::generated::wasmgate::plugin::types,
            "wasmgate:plugin/request": super::generated::wasmgate::plugin::request,
            "wasmgate:plugin/response": super::generated::wasmgate::plugin::response,
            "wasmgate:plugin/properties": super::generated::wasmgate::plugin::properties,
            "wasmgate:plugin/log": super::generated::wasmgate::plugin::log,
        },
    });
}

pub(crate) use generated::Plugin as PluginWorld;
pub(crate) use generated::wasmgate::plugin::{log, properties, request, response, types};
pub(crate) use types::{
    Action, FixedEdits as WitFixedEdits, HeaderEdit as WitHeaderEdit, ImmediateResponse, LogLevel,
    ReadSet as WitReadSet,
};

/// The exports as called on a fiber: `handler`, and `handler-with-values` (contract 0.2.3) when
/// the plugin has it.
pub(crate) mod fiber {
    pub(crate) use super::generated::exports::wasmgate::plugin::handler::{
        Guest as Handler, GuestIndices as HandlerIndices,
    };
    pub(crate) use super::generated::exports::wasmgate::plugin::handler_with_values::{
        Guest as WithValues, GuestIndices as WithValuesIndices,
    };
    // Called once per use of a plugin, when the manifest loads: on a fiber only.
    pub(crate) use super::generated::exports::wasmgate::plugin::handler_with_fixed_edits::GuestIndices as WithFixedEditsIndices;
}

/// The same exports, as called plainly.
pub(crate) mod plain {
    pub(crate) use super::generated_sync::exports::wasmgate::plugin::handler::{
        Guest as Handler, GuestIndices as HandlerIndices,
    };
    pub(crate) use super::generated_sync::exports::wasmgate::plugin::handler_with_values::{
        Guest as WithValues, GuestIndices as WithValuesIndices,
    };
}
