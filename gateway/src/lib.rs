//! wasmgate: an API gateway whose policies run as sandboxed WebAssembly components.
//!
//! The crate is both the `wasmgate` binary and a library, so that tests and embedders can run a
//! gateway in-process. The pieces, in the order a request meets them:
//!
//! - [`server`]: listeners and connections (hyper 1.x, HTTP/1.1 and HTTP/2);
//! - [`router`]: host, path and method matching, with a documented precedence;
//! - [`proxy`]: the request phase of the route's plugin chain, the upstream call, the response
//!   phase;
//! - [`runtime`]: the wasmtime engine, compiled plugins and per-request instances;
//! - [`upstream`]: target selection and pooled keep-alive connections;
//! - [`h1`]: wasmgate's own HTTP/1.1 client, for plain-HTTP upstreams.
//!
//! [`manifest`] parses the YAML the operator writes; [`snapshot`] turns it into the immutable
//! set of routes, plugins and upstreams that the proxy serves from. A reload (SIGHUP, a change
//! in the manifest's folder, `POST /reload` on the admin listener) builds a new snapshot off the
//! request path and swaps it in whole; [`metrics`] outlive every snapshot.

mod admin;
pub mod admission;
pub mod allocator;
pub mod body;
pub mod cli;
pub mod forwarded;
mod framing;
pub mod h1;
mod h1_server;
mod listener;
pub mod log_output;
pub mod manifest;
pub mod metrics;
pub mod normalize;
pub mod proxy;
mod reload;
pub mod request_id;
pub mod router;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod trace;
pub mod upstream;

pub use server::{Drained, Gateway, ReloadReport, StartError, check};
