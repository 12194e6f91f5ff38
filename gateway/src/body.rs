//! The body types the proxy moves around.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What to run once a response body has ended: the bytes sent, and whether it ended normally.
pub type OnEnd = Box<dyn FnOnce(u64, bool) + Send>;

/// The body of a response to a client: a [`ProxyBody`] that counts what it sends and, when asked,
/// runs a callback once it has ended, normally, with an error, or by being dropped (the client
/// went away). The callback serves the plugins' completion phase; without one, the body only
/// forwards frames.
pub struct ResponseBody {
    inner: ProxyBody,
    sent: u64,
    on_end: Option<OnEnd>,
}

impl ResponseBody {
    /// A body that runs `on_end` when it has ended.
    pub fn with_on_end(inner: ProxyBody, on_end: OnEnd) -> Self {
        ResponseBody {
            inner,
            sent: 0,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self, completed: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.sent, completed);
        }
    }
}

impl From<ProxyBody> for ResponseBody {
    fn from(inner: ProxyBody) -> Self {
        ResponseBody {
            inner,
            sent: 0,
            on_end: None,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = <ProxyBody as http_body::Body>::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        // Every field is `Unpin`, so the body can be used through a plain `&mut`.
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may drop a body it knows is complete (`is_end_stream`) without polling it to
        // the end; anything else dropped early was cut short.
        let completed = http_body::Body::is_end_stream(&self.inner);
        self.end(completed);
    }
}

/// A request body on its way upstream. With a counter attached, it adds the data bytes it sends to
/// it, for the completion phase's `wasmgate.bytes_in`.
pub struct UpstreamBody {
    inner: ProxyBody,
    counter: Option<Arc<AtomicU64>>,
}

impl UpstreamBody {
    /// A body that counts what it sends into `counter`.
    pub fn counted(inner: ProxyBody, counter: Arc<AtomicU64>) -> Self {
        UpstreamBody {
            inner,
            counter: Some(counter),
        }
    }
}

impl From<ProxyBody> for UpstreamBody {
    fn from(inner: ProxyBody) -> Self {
        UpstreamBody {
            inner,
            counter: None,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = <ProxyBody as http_body::Body>::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let (std::task::Poll::Ready(Some(Ok(frame))), Some(counter)) = (&polled, &this.counter)
            && let Some(data) = frame.data_ref()
        {
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
