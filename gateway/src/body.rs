//! The body types the proxy moves around.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Sleep;

/// A body that is either streamed from a peer untouched, streamed until a deadline, or held
/// whole in memory (produced by the gateway or a plugin, or buffered for a plugin that reads
/// bodies). An enum rather than a boxed trait object: no allocation per request for the common
/// streaming case.
pub enum ProxyBody {
    /// Streamed from a peer.
    Streamed(Stream),
    /// Streamed from a peer, failing if it has not ended by the deadline.
    Timed(Stream, Pin<Box<Sleep>>),
    /// Held in memory.
    Full(Full<Bytes>),
}

/// A body read from a peer: through hyper (clients, and upstreams hyper's client serves), or
/// from an upstream connection of wasmgate's own HTTP/1.1 client.
pub enum Stream {
    /// Read by hyper.
    Hyper(Incoming),
    /// Read by [`crate::h1`].
    Native(crate::h1::Body),
}

impl From<Incoming> for Stream {
    fn from(incoming: Incoming) -> Self {
        Stream::Hyper(incoming)
    }
}

impl From<crate::h1::Body> for Stream {
    fn from(body: crate::h1::Body) -> Self {
        Stream::Native(body)
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both variants are `Unpin`.
        match self.get_mut() {
            Stream::Hyper(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            Stream::Native(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Stream::Hyper(incoming) => incoming.is_end_stream(),
            Stream::Native(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Stream::Hyper(incoming) => incoming.size_hint(),
            Stream::Native(body) => body.size_hint(),
        }
    }
}

impl Stream {
    /// The upstream head's fields as bytes, if wasmgate's own client read them that way.
    fn raw_fields(&mut self) -> Option<&mut Option<Box<crate::h1::RawFields>>> {
        match self {
            Stream::Native(body) => Some(body.raw_fields()),
            Stream::Hyper(_) => None,
        }
    }
}

/// A client's request body: read by hyper as the proxy asks for it, or read whole before the
/// request was handed on, by wasmgate's own HTTP/1.1 server side ([`crate::h1_server`]).
pub enum RequestBody {
    /// Read by hyper.
    Hyper(Incoming),
    /// Already read (at most [`crate::h1::MAX_BODY`] bytes).
    Whole(Bytes),
}

/// A body held in memory.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::Full(Full::new(bytes.into()))
}

/// A streamed body.
pub fn streamed(stream: impl Into<Stream>) -> ProxyBody {
    ProxyBody::Streamed(stream.into())
}

/// A streamed body that fails once `deadline` passes before its end.
pub fn streamed_until(stream: impl Into<Stream>, deadline: tokio::time::Instant) -> ProxyBody {
    ProxyBody::Timed(stream.into(), Box::pin(tokio::time::sleep_until(deadline)))
}

impl ProxyBody {
    /// Where the upstream head's fields are kept as bytes ([`crate::h1::RawFields`]), for a
    /// body of wasmgate's own client asked for them: taken out while a chain's response phase
    /// runs (`Exchange::response_raw`), put back for the server side to write.
    pub fn raw_fields(&mut self) -> Option<&mut Option<Box<crate::h1::RawFields>>> {
        match self {
            ProxyBody::Streamed(stream) | ProxyBody::Timed(stream, _) => stream.raw_fields(),
            ProxyBody::Full(_) => None,
        }
    }
}

/// The deadline of a [`ProxyBody::Timed`] passed.
#[derive(Debug, thiserror::Error)]
#[error("the body did not end before the request deadline")]
pub struct DeadlinePassed;

/// An error of any kind, as bodies and clients report them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Every variant is `Unpin`.
        match self.get_mut() {
            ProxyBody::Streamed(stream) => Pin::new(stream).poll_frame(cx),
            ProxyBody::Timed(stream, deadline) => {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(DeadlinePassed.into())));
                }
                Pin::new(stream).poll_frame(cx)
            }
            ProxyBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streamed(stream) | ProxyBody::Timed(stream, _) => stream.is_end_stream(),
            ProxyBody::Full(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streamed(stream) | ProxyBody::Timed(stream, _) => stream.size_hint(),
            ProxyBody::Full(full) => full.size_hint(),
        }
    }
}

/// Why a body stopped with an error. Request bodies are polled by the upstream client, so this
/// type is how the proxy tells, from the client's error chain, that the fault was the
/// downstream client's (400, 413) rather than the upstream's (502).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer's body could not be read: reset, bad chunked framing, shorter than declared.
    #[error("body read failed: {0}")]
    Read(#[source] BoxError),
    /// More bytes than the body may have.
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
}

impl BodyError {
    /// The first `BodyError` in an error's source chain.
    pub fn find<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e BodyError> {
        find_cause(err)
    }
}

/// The first error of type `T` in an error's source chain, the error itself included.
pub(crate) fn find_cause<'e, T: std::error::Error + 'static>(
    err: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// What to do once a body has ended, given the bytes it sent and whether it ended normally: the
/// work to run then (the completion phase).
pub type OnEnd = Box<dyn FnOnce(u64, bool) -> AfterBody + Send>;

/// A future made in its box. `Box::pin(future)` makes the future first, on the stack, and then
/// copies it whole into the box; a chain's futures are kilobytes (3 KB for `proxy::run_chain`'s),
/// most of it room for the states after the first, so that copy was most of what boxing cost.
/// With the box there first, the future is made in it.
pub fn pinned<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Work to run once a response body has ended. wasmgate's own HTTP/1.1 server side runs it in
/// the connection's task after the response is written ([`TrackedBody::keep_after_body`]), so
/// that it costs no task of its own when it does not wait; otherwise it is spawned.
pub struct AfterBody {
    work: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Where to spawn it: a body may end, or be dropped, outside the runtime's context.
    runtime: tokio::runtime::Handle,
}

impl AfterBody {
    /// The work `make` makes, to be run on `runtime`; made in its box ([`pinned`]).
    pub fn new<F>(make: impl FnOnce() -> F, runtime: tokio::runtime::Handle) -> AfterBody
    where
        F: Future<Output = ()> + Send + 'static,
    {
        AfterBody {
            work: pinned(make),
            runtime,
        }
    }

    /// Runs the work as a task of its own.
    pub fn spawn(self) {
        self.runtime.spawn(self.work);
    }

    /// Runs the work as far as it goes without waiting, and spawns the rest, if any.
    pub fn run(mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.work.as_mut().poll(&mut cx).is_pending() {
            // Polled again by its own task, which registers its own waker.
            self.spawn();
        }
    }
}

/// A [`ProxyBody`] that counts the data bytes it sends and, when asked, adds them to a shared
/// counter or runs a callback once it has ended (normally, with an error, or by being dropped
/// before its end, as when the client goes away). Without either it only forwards frames. It
/// serves the plugins' completion phase, which reports those counts.
pub struct TrackedBody {
    inner: ProxyBody,
    sent: u64,
    limit: u64,
    counter: Option<Arc<AtomicU64>>,
    on_end: Option<OnEnd>,
    /// Whether the work after the body is kept for [`TrackedBody::take_after_body`] rather than
    /// spawned.
    keep_after: bool,
    after: Option<AfterBody>,
}

/// The body of a response to a client.
pub type ResponseBody = TrackedBody;

/// The body of a request on its way upstream.
pub type UpstreamBody = TrackedBody;

impl TrackedBody {
    /// The upstream head's fields as bytes ([`crate::h1::RawFields`]), for a response that
    /// passes through unread; taken once.
    pub fn take_raw_fields(&mut self) -> Option<Box<crate::h1::RawFields>> {
        self.raw_fields()?.take()
    }

    /// The upstream head's fields as bytes, to add one to ([`crate::h1::RawFields::push`]).
    pub fn raw_fields_mut(&mut self) -> Option<&mut crate::h1::RawFields> {
        self.raw_fields()?.as_deref_mut()
    }

    fn raw_fields(&mut self) -> Option<&mut Option<Box<crate::h1::RawFields>>> {
        self.inner.raw_fields()
    }

    /// A body that runs `on_end` when it has ended.
    pub fn with_on_end(inner: ProxyBody, on_end: OnEnd) -> Self {
        let mut body = TrackedBody::from(inner);
        body.on_end = Some(on_end);
        body
    }

    /// A body that adds the bytes it sends to `counter`.
    pub fn counted(inner: ProxyBody, counter: Arc<AtomicU64>) -> Self {
        let mut body = TrackedBody::from(inner);
        body.counter = Some(counter);
        body
    }

    /// Fails the body once it has sent more than `limit` data bytes.
    pub fn limited(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Keeps the work to run after the body for [`TrackedBody::take_after_body`], when the body
    /// ends while it is polled, instead of spawning it.
    pub fn keep_after_body(&mut self) {
        self.keep_after = true;
    }

    /// The work to run now that the body has ended (polled to its end, or known to be at it).
    pub fn take_after_body(&mut self) -> Option<AfterBody> {
        if self.on_end.is_some() && self.inner.is_end_stream() {
            self.end(true);
        }
        self.after.take()
    }

    fn end(&mut self, completed: bool) {
        if let Some(on_end) = self.on_end.take() {
            let after = on_end(self.sent, completed);
            if self.keep_after {
                self.after = Some(after);
            } else {
                after.spawn();
            }
        }
    }
}

impl From<ProxyBody> for TrackedBody {
    fn from(inner: ProxyBody) -> Self {
        TrackedBody {
            inner,
            sent: 0,
            limit: u64::MAX,
            counter: None,
            on_end: None,
            keep_after: false,
            after: None,
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        // Every field is `Unpin`, so the body can be used through a plain `&mut`.
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                    if this.sent > this.limit {
                        this.end(false);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                    if let Some(counter) = &this.counter {
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.end(false);
                Poll::Ready(Some(Err(BodyError::Read(err))))
            }
            Poll::Ready(None) => {
                this.end(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // hyper may drop a body it knows is complete (`is_end_stream`) without polling it to
        // the end; anything else dropped early was cut short.
        let completed = http_body::Body::is_end_stream(&self.inner);
        // Nobody is left to take the work: it runs as a task of its own.
        self.keep_after = false;
        self.end(completed);
        if let Some(after) = self.after.take() {
            after.spawn();
        }
    }
}
