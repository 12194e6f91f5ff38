//! wasmgate's own HTTP/1.1 server side, for the requests most traffic is made of; hyper's server
//! takes a connection over at the first request this one does not serve (docs/design.md,
//! "Session 9 decisions").
//!
//! Counted with callgrind, hyper's server was about 8,000 of the 39,000 instructions a bare
//! proxied request cost, and the framing guard in front of it parsed every head a second time
//! (docs/performance.md). Here the connection's task reads a head into its buffer, parses it
//! once with httparse, builds the request from slices of that buffer, runs the proxy, and writes
//! the response head and a small body with one write. Nothing else is spawned, boxed or sent
//! over a channel.
//!
//! It serves HTTP/1.1 requests without a body or with a `Content-Length` body of at most
//! [`crate::h1::MAX_BODY`] bytes, which it reads whole before the proxy sees the request (as the
//! proxy would for such a body anyway). Anything else goes to hyper, from that request on, with
//! the bytes read so far replayed ([`Rewind`]) and the framing guard in front: a head httparse
//! refuses or that is too large, HTTP/1.0, the HTTP/2 preface, `Transfer-Encoding`, a repeated
//! or malformed `Content-Length`, `Expect`, `Upgrade` and `CONNECT`, a request target that is not
//! a path, more header fields than the stack holds. hyper then answers exactly as it always
//! did, refusals included.
//!
//! Between requests the connection waits at most `idle_timeout`, and a head must be whole within
//! `header_read_timeout` of the previous response (of the connection opening, for the first),
//! the same bounds hyper's side applies. A graceful shutdown closes an idle connection at once
//! and one with a request in progress after its response, which then says `Connection: close`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body::{RequestBody, ResponseBody};
use crate::proxy::Peer;
use crate::server::Shared;

/// Header fields parsed on the stack. A head with more (when `http.max_headers` allows more)
/// goes to hyper.
const STACK_HEADERS: usize = 100;

/// How much room a read asks for.
const READ_CHUNK: usize = 8 * 1024;

/// Response bytes gathered before a write: the head and a small body go out together, a larger
/// body frame by frame.
const WRITE_GATHER: usize = 16 * 1024;

/// The limits a connection is served with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most header fields in a request head.
    pub max_headers: usize,
    /// Most bytes of a request head, as hyper's read buffer bounds it.
    pub max_head: usize,
    /// From the previous response (or the connection opening) to a whole head.
    pub header_read_timeout: Duration,
    /// Longest wait with no request in progress.
    pub idle_timeout: Duration,
}

/// How a connection left this server.
pub(crate) enum Outcome {
    /// It is closed, or is to be closed.
    Closed,
    /// hyper serves it from here, starting with these bytes, already read from it.
    HandOff(Bytes),
}

/// One connection: who is at the other end and what it is served with.
pub(crate) struct Connection<'a> {
    /// The gateway, for the snapshot each request is served with.
    pub shared: &'a Shared,
    /// The client (with [`Peer::raw_heads`] set: this side writes upstream heads as bytes).
    pub peer: &'a Peer,
    /// Its limits.
    pub limits: Limits,
    /// Cancelled for a graceful shutdown.
    pub stop: &'a CancellationToken,
}

/// A request head this server serves.
struct Head {
    /// Boxed: a request is a few hundred bytes, and on its way from the parser into
    /// `proxy::handle`'s future it would be copied at each of eight moves.
    request: Box<Request<RequestBody>>,
    /// The declared body length (at most `h1::MAX_BODY`).
    length: usize,
    /// The client asked for the connection to close after the response.
    close: bool,
}

/// What parsing the front of the read buffer found.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per request and taken apart at once; boxing would allocate per request"
)]
enum Parsed {
    Head(Head),
    /// More bytes are needed.
    Partial,
    /// A request for hyper.
    Foreign,
}

impl Connection<'_> {
    /// Serves requests from `io` until the connection closes or a request needs hyper.
    pub(crate) async fn serve<I>(&self, io: &mut I) -> Outcome
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = Vec::with_capacity(1024);
        // One timer and one cancellation waiter for the whole connection, rather than one of
        // each registered per request. Each request's head is waited for until `head_deadline`;
        // the timer is moved to it only when it fires at an earlier one (`h1::expired`).
        let head_wait = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout);
        let mut head_deadline = Instant::now() + head_wait;
        let mut timer = pin!(tokio::time::sleep_until(head_deadline));
        let mut stopped = pin!(self.stop.cancelled());
        loop {
            let head = loop {
                match parse(&mut buf, &self.limits) {
                    Parsed::Head(head) => break head,
                    Parsed::Foreign => return Outcome::HandOff(buf.freeze()),
                    Parsed::Partial if buf.len() > self.limits.max_head => {
                        // hyper refuses it (431) as it always has.
                        return Outcome::HandOff(buf.freeze());
                    }
                    Parsed::Partial => {}
                }
                buf.reserve(READ_CHUNK);
                let late = std::future::poll_fn(|cx| {
                    crate::h1::expired(timer.as_mut(), head_deadline, cx)
                });
                tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return Outcome::Closed,
                        Ok(_) => {}
                    },
                    () = late => {
                        tracing::debug!(client = %self.peer.client.addr(), "request head not received in time");
                        return Outcome::Closed;
                    }
                    () = stopped.as_mut(), if buf.is_empty() => return Outcome::Closed,
                }
            };
            let Head {
                mut request,
                length,
                close,
            } = head;
            while buf.len() < length {
                buf.reserve(length - buf.len());
                // A body in progress is a request in progress: each read may wait as long as
                // an idle connection would.
                let read = tokio::time::timeout(self.limits.idle_timeout, io.read_buf(&mut buf));
                match read.await {
                    Ok(Ok(0) | Err(_)) | Err(_) => return Outcome::Closed,
                    Ok(Ok(_)) => {}
                }
            }
            if length > 0 {
                *request.body_mut() = RequestBody::Whole(buf.split_to(length).freeze());
            }
            let head_only = request.method() == Method::HEAD;
            let snapshot = self.shared.snapshot.load_full();
            // The response is dropped where it is, at the block's end (moved into `drop`, it
            // would be copied first), before anything else waits: its body's end starts the
            // completion phase.
            let kept = {
                let mut response = crate::proxy::handle(snapshot, request, self.peer.clone()).await;
                let keep_alive = !close && !self.stop.is_cancelled();
                write_response(io, &mut out, &mut response, head_only, keep_alive).await
            };
            if !kept {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
            head_deadline = Instant::now() + head_wait;
        }
    }
}

/// Parses a request head at the front of `buf`, removing it when this server serves it.
fn parse(buf: &mut BytesMut, limits: &Limits) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    // Uninitialised: zeroing 100 fields (3.2 KB) per request costs more than parsing the head.
    let mut fields = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let fields = &mut fields[..limits.max_headers.min(STACK_HEADERS)];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Refused by hyper as it always was, or (too many fields for the stack) served by it.
        Err(_) => return Parsed::Foreign,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Parsed::Foreign;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Foreign;
    }
    // Offsets into `buf`, so that the head can be frozen and its path and values shared rather
    // than copied. (A head fits `max_head`, far below `u32::MAX`.)
    let base = buf.as_ptr() as usize;
    let offset = |at: *const u8, len: usize| {
        let start = at as usize - base;
        (start as u32, (start + len) as u32)
    };
    let mut spans = [(0u32, 0u32, 0u32, 0u32); STACK_HEADERS];
    let count = parsed.headers.len();
    let mut length = None;
    let mut close = false;
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let (name_start, name_end) = offset(field.name.as_ptr(), field.name.len());
        let (value_start, value_end) = offset(field.value.as_ptr(), field.value.len());
        *span = (name_start, name_end, value_start, value_end);
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match (length, crate::h1::parse_length(field.value)) {
                (None, Some(declared)) if declared <= crate::h1::MAX_BODY as u64 => {
                    length = Some(declared as usize);
                }
                // Repeated, malformed or large: the framing guard and hyper's body reader.
                _ => return Parsed::Foreign,
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= field
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::Foreign;
        }
    }
    let path = offset(path.as_ptr(), path.len());
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Foreign;
    };
    let head = buf.split_to(len).freeze();
    match build(&head, method, path, &spans[..count]) {
        Some(request) => Parsed::Head(Head {
            request,
            length: length.unwrap_or(0),
            close,
        }),
        None => {
            // Something the `http` types refuse that httparse let through: hyper refuses it
            // too. Put the head back in front of what follows it.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Parsed::Foreign
        }
    }
}

/// The request for a parsed head, its path and values shared with `head`.
fn build(
    head: &Bytes,
    method: Method,
    (path_start, path_end): (u32, u32),
    spans: &[(u32, u32, u32, u32)],
) -> Option<Box<Request<RequestBody>>> {
    let uri = Uri::from_maybe_shared(head.slice(path_start as usize..path_end as usize)).ok()?;
    // Room for the fields the gateway adds (`x-request-id`, the forwarding fields), so the map
    // does not grow on the way.
    let mut headers = HeaderMap::with_capacity(spans.len() + 6);
    for &(name_start, name_end, value_start, value_end) in spans {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize]).ok()?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .ok()?;
        headers.append(name, value);
    }
    let mut request = Box::new(Request::new(RequestBody::Whole(Bytes::new())));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body is sent (`HEAD`, 204, 304, 1xx), whatever the headers say.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes `response`; returns whether the connection can carry another request. Borrowed: a
/// response is a few hundred bytes, and taken by value it was copied into this future and out
/// again as it was taken apart.
async fn write_response<I>(
    io: &mut I,
    out: &mut Vec<u8>,
    response: &mut Response<ResponseBody>,
    head_only: bool,
    mut keep_alive: bool,
) -> bool
where
    I: AsyncWrite + Unpin,
{
    let status = response.status();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");

    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut declared = None;
    let mut dated = false;
    for (name, value) in response.headers() {
        if *name == CONTENT_LENGTH {
            match crate::h1::parse_length(value.as_bytes()) {
                // A second, different length cannot both be right: the first one frames.
                Some(length) if declared.is_none_or(|seen| seen == length) => {
                    if declared.is_some() {
                        continue;
                    }
                    declared = Some(length);
                }
                // Unusable: the body's own size frames it instead.
                _ => continue,
            }
        } else if *name == TRANSFER_ENCODING {
            // This side frames the body itself.
            continue;
        } else if *name == DATE {
            dated = true;
        } else if *name == CONNECTION {
            // This side says whether the connection stays open (below); a response that asks
            // for it to close (a plugin may) closes it.
            keep_alive &= !value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let body = response.body_mut();
    // An upstream head passed through as bytes (a route without plugins): its fields follow
    // the gateway's own (`x-request-id`), which are all the map then holds.
    if let Some(raw) = body.take_raw_fields() {
        out.extend_from_slice(&raw.lines);
        dated |= raw.dated;
        declared = declared.or(raw.length);
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(length) = declared {
        Framing::Length(length)
    } else if let Some(length) = body.size_hint().exact() {
        let mut digits = itoa::Buffer::new();
        field(out, b"content-length", digits.format(length).as_bytes());
        Framing::Length(length)
    } else {
        field(out, b"transfer-encoding", b"chunked");
        Framing::Chunked
    };
    if !dated {
        date::with(|now| field(out, b"date", now));
    }
    if !keep_alive {
        field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");

    let mut sent = 0u64;
    let mut failed = false;
    body.keep_after_body();
    if !body.is_end_stream() {
        loop {
            // What the body has ready is gathered with the head; before waiting for more,
            // what is gathered goes out.
            let frame = match poll_now(body) {
                Some(frame) => frame,
                None => {
                    if !out.is_empty() && write(io, out).await.is_err() {
                        return false;
                    }
                    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "response body failed; closing the connection");
                    failed = true;
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            let data = match framing {
                Framing::None => continue,
                Framing::Length(length) => {
                    let room = length - sent;
                    if data.len() as u64 > room {
                        // More than the head declared: what fits goes, then the connection
                        // closes, as the body cannot be framed.
                        failed = true;
                        data.slice(..room as usize)
                    } else {
                        data
                    }
                }
                Framing::Chunked => {
                    let mut size = [0u8; 16];
                    out.extend_from_slice(hex(data.len(), &mut size));
                    out.extend_from_slice(b"\r\n");
                    data
                }
            };
            sent += data.len() as u64;
            if out.len() + data.len() <= WRITE_GATHER {
                out.extend_from_slice(&data);
            } else {
                if write(io, out).await.is_err() || io.write_all(&data).await.is_err() {
                    return false;
                }
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            if failed {
                break;
            }
        }
    }
    if failed || matches!(framing, Framing::Length(length) if sent != length) {
        // The client must not take a cut body for a whole one: what was sent goes, then the
        // connection closes (a chunked body stays without its last chunk).
        let _ = write(io, out).await;
        return false;
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    let written = write(io, out).await.is_ok();
    // The completion phase, once the client has the whole response: in this task as far as it
    // goes without waiting (usually all the way), rather than as a task of its own.
    if let Some(after) = body.take_after_body() {
        after.run();
    }
    written && keep_alive
}

/// Writes and empties `out`.
async fn write<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> io::Result<()> {
    let written = io.write_all(out).await;
    out.clear();
    written
}

/// A frame the body has ready now, or `None` when it would wait.
fn poll_now(
    body: &mut ResponseBody,
) -> Option<Option<Result<http_body::Frame<Bytes>, crate::body::BodyError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

/// Appends one header field.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `n` in lower-case hexadecimal, written at the end of `space`.
fn hex(mut n: usize, space: &mut [u8; 16]) -> &[u8] {
    let mut at = space.len();
    loop {
        at -= 1;
        space[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &space[at..];
        }
    }
}

/// The `Date` field's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::io::Write;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// An IMF-fixdate is 29 bytes: `Sun, 06 Nov 1994 08:49:37 GMT`.
    const LEN: usize = 29;

    struct Cached {
        second: u64,
        text: [u8; LEN],
    }

    thread_local! {
        static NOW: RefCell<Cached> = const {
            RefCell::new(Cached { second: u64::MAX, text: [0; LEN] })
        };
    }

    /// Calls `f` with the current date as `Date` spells it.
    pub(super) fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        NOW.with_borrow_mut(|cached| {
            if cached.second != second {
                let mut text = &mut cached.text[..];
                let _ = write!(text, "{}", httpdate::HttpDate::from(now));
                cached.second = second;
            }
            f(&cached.text)
        })
    }
}

/// A connection whose first bytes were already read: they are read again first. hyper serves a
/// connection through it after this server handed the connection over.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    /// `inner`, read from `prefix` first.
    pub(crate) fn new(prefix: Bytes, inner: I) -> Rewind<I> {
        Rewind { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_lower_case_hexadecimal() {
        let mut space = [0u8; 16];
        assert_eq!(hex(0, &mut space), b"0");
        assert_eq!(hex(0x1f, &mut space), b"1f");
        assert_eq!(hex(65536, &mut space), b"10000");
        assert_eq!(hex(usize::MAX, &mut space), b"ffffffffffffffff");
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let text = date::with(|now| String::from_utf8(now.to_vec()).unwrap());
        assert_eq!(text.len(), 29, "{text}");
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }

    #[test]
    fn heads_it_does_not_serve_are_left_in_the_buffer() {
        let limits = Limits {
            max_headers: 100,
            max_head: 1 << 16,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        };
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(head);
            assert!(
                matches!(parse(&mut buf, &limits), Parsed::Foreign),
                "{head}"
            );
            assert_eq!(&buf[..], head.as_bytes(), "left whole: {head}");
        }
        let mut buf =
            BytesMut::from("GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nnext");
        let Parsed::Head(head) = parse(&mut buf, &limits) else {
            panic!("a plain GET is served");
        };
        assert!(head.close);
        assert_eq!(head.request.uri(), "/a?b");
        assert_eq!(head.request.headers()["host"], "x");
        assert_eq!(&buf[..], b"next");
    }

    #[tokio::test]
    async fn a_rewound_connection_reads_what_was_read_first() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(b" world").await.unwrap();
        drop(near);
        let mut rewound = Rewind::new(Bytes::from_static(b"hello"), far);
        let mut text = String::new();
        rewound.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "hello world");
    }
}
