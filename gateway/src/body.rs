//! The body type the proxy moves around.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A body that is either streamed from a peer untouched or held whole in memory (produced by the
/// gateway or a plugin, or buffered for a plugin that reads bodies). An enum rather than a boxed
/// trait object: no allocation per request for the common streaming case.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// A body held in memory.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(bytes.into()))
}

/// A streamed body.
pub fn streamed(incoming: Incoming) -> ProxyBody {
    Either::Left(incoming)
}
