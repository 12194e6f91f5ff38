//! wasmgate's own HTTP/1.1 client, for plain-HTTP upstreams (docs/design.md, "Session 5").
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own and hands each
//! request to it over a channel, the response and each body frame coming back the same way.
//! Measured, that costs about 4.7 µs of CPU per proxied request, a third of what nginx spends on a
//! whole one (docs/performance.md). Here the request's own task takes an idle connection from
//! the target's pool, writes the head and the body with one write, reads and parses the response
//! head with httparse, and hands the connection to the response body, which reads straight from
//! the socket and gives the connection back to the pool once the body has ended.
//!
//! It carries requests whose body is known whole and at most [`MAX_BODY`] bytes (every bodiless
//! request) to `http://` targets that speak HTTP/1.1, without an upgrade. Streamed uploads, TLS,
//! HTTP/2 and upgrades still go through hyper's client, which reads the answer while it writes.
//!
//! What it does, as a production client must:
//! - framing by RFC 9112 section 6.3: no body for `HEAD`, 1xx, 204 and 304; chunked when it is
//!   the last transfer coding (which then overrides `Content-Length`); `Content-Length` (repeated
//!   only with the same value); otherwise the body runs to the end of the connection;
//! - interim answers (100, 102, 103) skipped; at most 100 header fields and [`MAX_HEAD`] bytes of
//!   head, as hyper's client allows;
//! - a connection goes back to the pool only after a whole body, when both sides keep it alive,
//!   and with no byte left over; an idle one is dropped after [`IDLE_TIMEOUT`], and is checked
//!   before reuse (the reactor has seen it readable: the upstream closed it);
//! - a reused connection that fails before any byte of an answer is a connection the upstream
//!   closed while idle: an idempotent request is sent again, once, on a new connection;
//! - a body the upstream cuts short (closed early, bad chunk framing) ends with an error, so that
//!   the client's response is cut too rather than passed as whole.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// The largest request body sent through this client. A larger one goes through hyper's client,
/// which reads the answer while it writes, so that an upstream that answers early (a 413) and
/// stops reading is not left waiting on a write.
pub const MAX_BODY: usize = 64 * 1024;

/// The most header fields in a response head (hyper's client default).
const MAX_HEADERS: usize = 100;
// `parse_head` marks fields in a `u128`.
const _: () = assert!(MAX_HEADERS <= 128);

/// The largest response head, 1xx heads before it included (hyper's client default buffer).
pub const MAX_HEAD: usize = 8192 + 4096 * 100;

/// How much room a read asks for.
const READ_CHUNK: usize = 8 * 1024;

/// The largest message buffer [`MESSAGE`] keeps (a request with a body may have grown it to
/// [`MAX_BODY`] and more).
const KEPT_MESSAGE: usize = 4 * 1024;

// `parse_head` keeps offsets into the read buffer as `u32`.
const _: () = assert!(MAX_HEAD + READ_CHUNK < u32::MAX as usize);

/// The longest line of a chunk size, extensions included, and the most trailer bytes.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// How long a connection may wait in the pool (hyper's client default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The most idle connections kept per target and thread slot.
const MAX_IDLE: usize = 256;

/// Idle lists per target. A worker thread takes from and gives back to its own slot, so that a
/// connection is mostly used by the event loop whose reactor it is registered with, and workers
/// do not contend for one lock.
const SLOTS: usize = 8;

/// A request as this client sends it. The headers may be borrowed: they are only written out,
/// so a request that may be sent again (to another target) need not copy them.
pub struct Request<'a> {
    /// The method.
    pub method: Method,
    /// The request target, origin form.
    pub path_and_query: PathAndQuery,
    /// The header fields; framing fields (`Content-Length`, `Transfer-Encoding`) are written by
    /// the client from the body.
    pub headers: std::borrow::Cow<'a, HeaderMap>,
    /// Forwarding headers to write after `headers` (added here rather than to the map when no
    /// plugin reads or edits them: [`crate::forwarded::prepare`]).
    pub forwarded: Option<&'a crate::forwarded::Fields<'a>>,
    /// The whole body, at most [`MAX_BODY`] bytes.
    pub body: Bytes,
    /// Whether the response's fields may come back as bytes ([`RawFields`]) rather than as a
    /// map: for a response nothing reads or edits before wasmgate's own server side writes it.
    pub raw_fields: bool,
}

/// A response's header fields as they go on to the client: each line as the upstream wrote it
/// (`Name: value\r\n`, the name's case kept), hop-by-hop fields, a repeated length and one a
/// transfer coding overrides left out. A route without plugins passes the upstream's head on
/// this way: building a map of it and writing the map out again was a tenth of the bare proxy's
/// work.
#[derive(Debug, Clone, Default)]
pub struct RawFields {
    /// The field lines.
    pub lines: Vec<u8>,
    /// The `Content-Length` among them.
    pub length: Option<u64>,
    /// Whether they include `Date`.
    pub dated: bool,
}

impl RawFields {
    /// Adds a field line (one the gateway sets, never a framing field).
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        field(&mut self.lines, name.as_str().as_bytes(), value.as_bytes());
    }

    /// How many field lines there are (a value never holds a line feed: the parser refused it).
    pub fn count(&self) -> usize {
        memchr::memchr_iter(b'\n', &self.lines).count()
    }

    /// Removes the lines of the field `name` (never a framing field: the caller's edits were
    /// checked for that). Most often there is none, and nothing is moved.
    pub fn remove(&mut self, name: &HeaderName) {
        let name = name.as_str().as_bytes();
        let named = |line: &[u8]| {
            line.len() > name.len()
                && line[name.len()] == b':'
                && line[..name.len()].eq_ignore_ascii_case(name)
        };
        let mut start = 0;
        let mut first = None;
        for newline in memchr::memchr_iter(b'\n', &self.lines) {
            if named(&self.lines[start..newline]) {
                first = Some(start);
                break;
            }
            start = newline + 1;
        }
        let Some(first) = first else {
            return;
        };
        // The lines from the first one removed are written again without those named.
        let rest = self.lines.split_off(first);
        for line in rest.split_inclusive(|&b| b == b'\n') {
            if !named(line) {
                self.lines.extend_from_slice(line);
            }
        }
    }

    /// The fields as a map, appended to `headers` (for edits that must be made on one).
    pub fn into_map(self, headers: &mut HeaderMap) {
        for line in self.lines.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            // Checked by the parser already; a line that would not parse again is left out.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made; a timeout is an [`io::ErrorKind::TimedOut`] source.
    #[error("cannot connect to {authority}")]
    Connect {
        /// The target.
        authority: Authority,
        /// What connecting said.
        #[source]
        source: io::Error,
    },
    /// The connection failed while the request was written or the answer read.
    #[error("upstream connection failed")]
    Io(#[source] io::Error),
    /// The upstream closed the connection before a whole response head.
    #[error("the upstream closed the connection before answering")]
    Closed,
    /// No whole response head by the caller's deadline (connecting, writing or reading).
    #[error("no response head in time")]
    TimedOut,
    /// The response head is not one this client accepts.
    #[error("invalid response head: {0}")]
    Head(&'static str),
}

/// A target's idle connections.
#[derive(Debug)]
pub struct Pool {
    authority: Authority,
    slots: [Mutex<VecDeque<Idle>>; SLOTS],
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// An open connection and the bytes read from it that are not consumed yet.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Bounds each exchange on this connection. It stays with the connection, where a timer of
    /// its own per request would be inserted into Tokio's timer wheel and removed again under
    /// its lock (~600 instructions a request, docs/performance.md "Session 23"), and it is
    /// moved only to an earlier deadline: one that is later waits for the timer to fire at the
    /// one it has ([`expired`]), which happens once a timeout's length, not once a request.
    timer: Pin<Box<Sleep>>,
    /// When its last request was started, the time its idleness is counted from: that saves a
    /// clock read when it goes back to the pool. It is judged idle for longer than it was (by
    /// its last exchange's length), so it is dropped before [`IDLE_TIMEOUT`], never after.
    started: Instant,
}

impl Conn {
    /// Reads what has arrived onto the end of the buffer; `Ok(0)` at the connection's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        fill(&mut self.stream, &mut self.buf, cx)
    }
}

/// Reads what has arrived on `stream` onto the end of `buf`; `Ok(0)` at the connection's end.
fn fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

thread_local! {
    /// A buffer for the next request message this thread encodes, given back once it is
    /// written. One allocated and freed per request cost ~100 instructions, and up to ~570
    /// where mimalloc took its page from the segment and gave it back each time
    /// (docs/performance.md "Session 24"). While a write waits, another request on the thread
    /// finds it empty and allocates its own.
    static MESSAGE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };

    /// This thread's pool slot.
    static SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS
    };
}

fn slot() -> usize {
    SLOT.with(|slot| *slot)
}

impl Pool {
    /// An empty pool for the target at `authority`.
    pub fn new(authority: Authority) -> Pool {
        Pool {
            authority,
            slots: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
        }
    }

    /// Takes over the idle connections of `previous`, the same target in the snapshot that a
    /// reload replaces, so that a reload does not cost every kept-alive upstream connection.
    /// Connections still in use then go back to `previous` and close with it.
    pub fn adopt(&self, previous: &Pool) {
        for (slot, old) in self.slots.iter().zip(&previous.slots) {
            let taken = std::mem::take(&mut *old.lock().unwrap_or_else(PoisonError::into_inner));
            let mut idle = slot.lock().unwrap_or_else(PoisonError::into_inner);
            let room = MAX_IDLE.saturating_sub(idle.len());
            // Oldest first, as they were.
            idle.extend(taken.into_iter().rev().take(room).rev());
        }
    }

    /// Sends `request` and waits for the response head; the body streams from the connection,
    /// in whatever `wrap` makes of it. `connect_timeout` bounds making a new connection;
    /// `deadline` the whole wait for the head ([`Error::TimedOut`] past it). `now` is the
    /// caller's reading of the clock as the attempt starts, shared so that the pool need not
    /// read it again.
    ///
    /// The body is wrapped as the response is made: a response is a few hundred bytes, and
    /// each conversion of its body after it returns (`Response::map`) copies it whole.
    pub async fn send<B>(
        self: &Arc<Self>,
        request: &Request<'_>,
        connect_timeout: Duration,
        now: Instant,
        deadline: tokio::time::Instant,
        wrap: impl FnOnce(Body) -> B,
    ) -> Result<Response<B>, Error> {
        let head_only = request.method == Method::HEAD;
        let reading = Reading {
            head_only,
            raw_fields: request.raw_fields,
        };
        let mut fresh_only = false;
        loop {
            let idle = if fresh_only { None } else { self.take(now) };
            let (mut conn, reused) = match idle {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare on a kept-alive pool, and its future (name lookup,
                // connect, timer) would otherwise make every request's future larger, which is
                // moved whole as it is built.
                None => {
                    let connecting = Box::pin(self.connect(connect_timeout, now, deadline));
                    match tokio::time::timeout_at(deadline, connecting).await {
                        Ok(connected) => (connected?, false),
                        Err(_) => return Err(Error::TimedOut),
                    }
                }
            };
            conn.started = now;
            let encode = |message: &mut Vec<u8>| self.encode(request, message);
            match exchange(&mut conn, encode, reading, deadline).await {
                Ok(head) => return Ok(self.response(conn, head, wrap)),
                // The upstream closed an idle connection as it was being reused: it has not
                // seen the request. Sent again only where doing so twice is harmless anyway.
                Err(Failure::Unanswered(_)) if reused && request.method.is_idempotent() => {
                    fresh_only = true;
                }
                Err(Failure::Unanswered(err) | Failure::Answering(err)) => return Err(err),
            }
        }
    }

    /// The request line, header fields and body as one message, in `out` (emptied first).
    fn encode(&self, request: &Request<'_>, out: &mut Vec<u8>) {
        let headers = &*request.headers;
        out.clear();
        out.reserve(256 + headers.len() * 32 + request.body.len());
        out.extend_from_slice(request.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(request.path_and_query.as_str().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if !headers.contains_key(HOST) {
            field(out, b"host", self.authority.as_str().as_bytes());
        }
        let mut declared_length = false;
        for (name, value) in headers {
            if name == CONTENT_LENGTH {
                declared_length = true;
                continue;
            }
            if name == TRANSFER_ENCODING {
                continue;
            }
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(forwarded) = request.forwarded {
            forwarded.write_lines(out);
        }
        // The length is the body's own, whatever a plugin left in the header; a bodiless
        // request says `0` only where the client said so.
        if !request.body.is_empty() || declared_length {
            let length = HeaderValue::from(request.body.len());
            field(out, b"content-length", length.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&request.body);
    }

    /// An idle connection from this thread's slot that is still open, if there is one; `now`
    /// is the time.
    fn take(&self, now: Instant) -> Option<Conn> {
        let slot = &self.slots[slot()];
        loop {
            let idle = slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_back()?;
            if now.saturating_duration_since(idle.since) > IDLE_TIMEOUT {
                // The newest is too old, so all are.
                slot.lock().unwrap_or_else(PoisonError::into_inner).clear();
                return None;
            }
            if still_open(&idle.conn.stream) {
                return Some(idle.conn);
            }
        }
    }

    /// Gives a connection whose exchange ended cleanly back to this thread's slot.
    fn put(&self, conn: Conn) {
        // No later than the time: what its last request's start can say without a clock read.
        let now = conn.started;
        let mut idle = self.slots[slot()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The oldest waits at the front; one past its time goes, so that a pool that was once
        // large shrinks under steady traffic too.
        if idle
            .front()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { conn, since: now });
        }
    }

    /// A new connection, its exchange timer first set to `deadline`, started at `now`.
    async fn connect(
        &self,
        timeout: Duration,
        now: Instant,
        deadline: tokio::time::Instant,
    ) -> Result<Conn, Error> {
        let failed = |source| Error::Connect {
            authority: self.authority.clone(),
            source,
        };
        let host = self.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.authority.port_u16().unwrap_or(80);
        let connecting = async {
            let mut last = None;
            for addr in tokio::net::lookup_host((host, port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("the host name has no address")))
        };
        let stream = match tokio::time::timeout(timeout, connecting).await {
            Ok(connected) => connected.map_err(failed)?,
            Err(_) => return Err(failed(io::ErrorKind::TimedOut.into())),
        };
        stream.set_nodelay(true).map_err(failed)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            started: now,
        })
    }

    /// The response for a parsed head, its body reading from `conn`.
    fn response<B>(
        self: &Arc<Self>,
        conn: Conn,
        head: Head,
        wrap: impl FnOnce(Body) -> B,
    ) -> Response<B> {
        let state = match head.framing {
            Framing::Length(0) => State::Done,
            Framing::Length(left) => State::Length(left),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::Close => State::Close,
        };
        let mut body = Body {
            conn: Some(conn),
            pool: head.keep_alive.then(|| self.clone()),
            state,
            failed: None,
            raw_fields: head.raw,
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        let mut response = Response::new(wrap(body));
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        response
    }
}

/// Appends one header field line.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether an idle connection can be used: the reactor has not seen it readable, or reading
/// it would block. Anything readable on an idle connection (its end, or bytes no request asked
/// for) makes it unusable.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readiness is only cleared by a read that would block; a read that emptied the
        // socket can leave it set.
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock
        ),
    }
}

/// How an exchange failed: before any byte of an answer arrived, or after.
enum Failure {
    Unanswered(Error),
    Answering(Error),
}

thread_local! {
    /// Requests in progress on this thread. Each of the gateway's workers is one thread running
    /// its own current-thread runtime, so this counts one event loop's requests. (Under a
    /// multi-threaded runtime, as in some tests, a request may end on another thread than it
    /// began: the count is then only a hint, which is all [`exchange`] takes it for.)
    static IN_PROGRESS: Cell<u32> = const { Cell::new(0) };
}

/// Counts a request as in progress on this thread's event loop while alive; held by the
/// proxy for each request it handles.
#[derive(Debug)]
pub(crate) struct InProgress(());

impl InProgress {
    /// Counts one more request in progress on this thread.
    pub(crate) fn enter() -> InProgress {
        IN_PROGRESS.with(|count| count.set(count.get().saturating_add(1)));
        InProgress(())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        IN_PROGRESS.with(|count| count.set(count.get().saturating_sub(1)));
    }
}

/// Writes the request that `encode` makes on `conn` and reads the response head (interim ones
/// skipped), by `deadline`.
async fn exchange(
    conn: &mut Conn,
    encode: impl FnOnce(&mut Vec<u8>),
    reading: Reading,
    deadline: tokio::time::Instant,
) -> Result<Head, Failure> {
    let Conn {
        stream, buf, timer, ..
    } = conn;
    if deadline < timer.deadline() {
        timer.as_mut().reset(deadline);
    }
    // Every write wakes the upstream; where it shares a CPU with us, it preempts us there and
    // then, for one request. Yielding once first lets the other requests ready in this turn of
    // the event loop reach their writes too, so that the upstream wakes once for several of
    // them: 0.88 context switches per request without this, 0.48 with it (nginx: 0.59), for
    // one more poll of the task (docs/performance.md, session 5). Tokio runs a yielded task
    // after it polls the I/O driver again, so the yield costs a system call: with no other
    // request in progress there is nothing to wait for.
    if IN_PROGRESS.with(Cell::get) > 1 {
        tokio::task::yield_now().await;
    }
    // Encoded after the yield, so that the thread's buffer is not held across it.
    let mut message = MESSAGE.take();
    encode(&mut message);
    // A timeout is never `Unanswered`: the request may have reached the upstream, and is not
    // sent again.
    let timed_out = || Failure::Answering(Error::TimedOut);
    {
        let mut writing = std::pin::pin!(stream.write_all(message.as_slice()));
        before(timer, deadline, |cx| writing.as_mut().poll(cx))
            .await
            .ok_or_else(timed_out)?
            .map_err(|err| Failure::Unanswered(Error::Io(err)))?;
    }
    // Written: the buffer serves this thread's next request while this one waits.
    if message.capacity() <= KEPT_MESSAGE {
        MESSAGE.set(message);
    }
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            if let Some(head) = parse_head(buf, reading).map_err(Failure::Answering)? {
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(Failure::Answering(Error::Head("response head too large")));
            }
        }
        let read = before(timer, deadline, |cx| fill(stream, buf, cx))
            .await
            .ok_or_else(timed_out)?;
        let failed = |err| match answered {
            true => Failure::Answering(err),
            false => Failure::Unanswered(err),
        };
        match read {
            Ok(0) => return Err(failed(Error::Closed)),
            Ok(_) => {}
            Err(err) => return Err(failed(Error::Io(err))),
        }
    }
}

/// Polls `work` to its end, or `None` if `deadline` passes first. The timer is looked at only
/// while the work waits: a write or read that is ready at once costs no timer poll.
async fn before<T>(
    timer: &mut Pin<Box<Sleep>>,
    deadline: tokio::time::Instant,
    mut work: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Option<T> {
    std::future::poll_fn(|cx| match work(cx) {
        Poll::Pending => expired(timer.as_mut(), deadline, cx).map(|()| None),
        Poll::Ready(done) => Poll::Ready(Some(done)),
    })
    .await
}

/// Polls `timer` as the timer of `deadline`, which it may be set before but never after: ready
/// once `deadline` has passed. A timer kept across requests is set this way lazily: when it
/// fires at an earlier deadline, it is moved to this one then, instead of at every request
/// (`Sleep::reset` turns the deadline into a tick of Tokio's wheel, ~120 instructions).
pub(crate) fn expired(
    mut timer: Pin<&mut Sleep>,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        std::task::ready!(timer.as_mut().poll(cx));
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

/// How a response head is to be read.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    /// The request was `HEAD`: no body follows whatever the head says.
    head_only: bool,
    /// The fields are wanted as [`RawFields`].
    raw_fields: bool,
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    /// The fields, unless they are in `raw`.
    headers: HeaderMap,
    raw: Option<Box<RawFields>>,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a final response head from the front of `buf` and removes it (with any interim heads
/// before it); `None` when more bytes are needed.
fn parse_head(buf: &mut BytesMut, reading: Reading) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised: zeroing 100 fields (3.2 KB) for every response cost more than parsing
        // a typical head.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Head("more than 100 header fields"));
            }
            Err(_) => return Err(Error::Head("not an HTTP/1.x response head")),
        };
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Error::Head("bad status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Head("101 to a request that asked for no upgrade"));
            }
            buf.advance(len);
            continue;
        }
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Offsets of names and values in `buf`, so that the head can be frozen and its values
        // shared rather than copied.
        let base = buf.as_ptr() as usize;
        // (A head is at most MAX_HEAD bytes, so u32 offsets are enough, and half the stack.)
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = response.headers.len();
        let mut length: Option<u64> = None;
        let (mut chunked, mut coded, mut close, mut keep_alive) = (false, false, false, false);
        // Hop-by-hop fields are left out as the fields are taken (they never reach the client),
        // which saves inserting them and `proxy::answer` a pass to remove them.
        // `names_fields` is set when `Connection` names a field of its own: then a map is built
        // whole and stripped the general way.
        let mut names_fields = false;
        // Fields left out, by index: hop-by-hop ones, and lengths said again or overridden.
        let mut hop_by_hop = 0u128;
        let mut extra_lengths = 0u128;
        let mut lengths = 0u128;
        // The upstream's own `X-Request-Id`: the gateway names the request in every response
        // itself, and adds its line to the bytes of a head passed through (which would then
        // hold two).
        let mut request_ids = 0u128;
        let mut dated = false;
        for (index, (span, header)) in spans.iter_mut().zip(response.headers.iter()).enumerate() {
            let offset = |at: *const u8, len: usize| {
                let start = at as usize - base;
                (start as u32, (start + len) as u32)
            };
            let (name_start, name_end) = offset(header.name.as_ptr(), header.name.len());
            let (value_start, value_end) = offset(header.value.as_ptr(), header.value.len());
            *span = (name_start, name_end, value_start, value_end);
            if is_hop_by_hop(header.name) {
                hop_by_hop |= 1 << index;
            }
            if header.name.len() == 12 && header.name.eq_ignore_ascii_case("x-request-id") {
                request_ids |= 1 << index;
            }
            if header.name.eq_ignore_ascii_case("content-length") {
                let value = parse_length(header.value)
                    .ok_or(Error::Head("Content-Length is not a number"))?;
                if length.is_some_and(|seen| seen != value) {
                    return Err(Error::Head("conflicting Content-Length values"));
                }
                if length.is_some() {
                    // The same again: said once.
                    extra_lengths |= 1 << index;
                }
                length = Some(value);
                lengths |= 1 << index;
            } else if header.name.len() == 4 && header.name.eq_ignore_ascii_case("date") {
                dated = true;
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                coded = true;
                chunked = last_token(header.value).eq_ignore_ascii_case(b"chunked");
            } else if header.name.eq_ignore_ascii_case("connection") {
                for token in header.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    let closes = token.eq_ignore_ascii_case(b"close");
                    let keeps = token.eq_ignore_ascii_case(b"keep-alive");
                    close |= closes;
                    keep_alive |= keeps;
                    names_fields |= !(closes || keeps || token.is_empty());
                }
            }
        }
        if coded {
            // A transfer coding overrides a length (RFC 9112 section 6.3), which would
            // otherwise frame the client's response wrongly.
            extra_lengths |= lengths;
        }
        // With fields named in `Connection`, it stays for `strip_hop_by_hop` to read.
        let skip = extra_lengths | request_ids | if names_fields { 0 } else { hop_by_hop };
        let head = buf.split_to(len).freeze();
        let spans = &spans[..count];
        let (headers, raw) = if reading.raw_fields && !names_fields {
            let raw = RawFields {
                lines: field_lines(&head, spans, skip),
                length: length.filter(|_| !coded),
                dated,
            };
            (HeaderMap::new(), Some(Box::new(raw)))
        } else {
            (field_map(&head, spans, skip, names_fields)?, None)
        };
        let bodiless = reading.head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framing = match (bodiless, coded, chunked, length) {
            (true, ..) => Framing::Length(0),
            (false, true, true, _) => Framing::Chunked,
            (false, true, false, _) => Framing::Close,
            (false, false, _, Some(length)) => Framing::Length(length),
            (false, false, _, None) => Framing::Close,
        };
        let persistent = match version {
            Version::HTTP_10 => keep_alive && !close,
            _ => !close,
        };
        // A message framed both ways may have been read differently by a cache between us and
        // the upstream: its connection is not used again.
        let keep_alive =
            persistent && !(coded && length.is_some()) && !matches!(framing, Framing::Close);
        return Ok(Some(Head {
            status,
            version,
            headers,
            raw,
            framing,
            keep_alive,
        }));
    }
}

/// The fields of a head as a map, those marked in `skip` left out. When `Connection` names
/// fields of its own (`names_fields`), the hop-by-hop ones are removed the general way
/// afterwards.
fn field_map(
    head: &Bytes,
    spans: &[(u32, u32, u32, u32)],
    skip: u128,
    names_fields: bool,
) -> Result<HeaderMap, Error> {
    // Room for the fields the gateway adds (`x-request-id`), so the map does not grow.
    let mut headers = HeaderMap::with_capacity(spans.len() + 2);
    for (index, &(name_start, name_end, value_start, value_end)) in spans.iter().enumerate() {
        if skip & 1 << index != 0 {
            continue;
        }
        let (name_start, name_end) = (name_start as usize, name_end as usize);
        let (value_start, value_end) = (value_start as usize, value_end as usize);
        let name = HeaderName::from_bytes(&head[name_start..name_end])
            .map_err(|_| Error::Head("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| Error::Head("bad header value"))?;
        headers.append(name, value);
    }
    if names_fields {
        crate::proxy::strip_hop_by_hop(&mut headers);
    }
    Ok(headers)
}

/// The field lines of a head as the client is sent them, those marked in `skip` left out.
/// httparse has checked names (tokens) and values (no control characters) as `HeaderName` and
/// `HeaderValue` would. Each line is copied as it came (the name's case kept, as HTTP allows),
/// up to the end of its value, then `\r\n`: a run of lines that already end that way is copied
/// at once.
fn field_lines(head: &[u8], spans: &[(u32, u32, u32, u32)], skip: u128) -> Vec<u8> {
    // Room for the lines the gateway adds (`x-request-id`) without growing.
    let mut lines = Vec::with_capacity(head.len() + 64);
    // The run of kept lines not copied yet.
    let mut run: Option<(usize, usize)> = None;
    for (index, &(name_start, _, _, value_end)) in spans.iter().enumerate() {
        let (start, end) = (name_start as usize, value_end as usize);
        if skip & 1 << index != 0 {
            if let Some((from, to)) = run.take() {
                lines.extend_from_slice(&head[from..to]);
                lines.extend_from_slice(b"\r\n");
            }
            continue;
        }
        run = match run {
            // The previous value ends with exactly `\r\n` before this name: one run.
            Some((from, to)) if start == to + 2 && &head[to..start] == b"\r\n" => Some((from, end)),
            Some((from, to)) => {
                lines.extend_from_slice(&head[from..to]);
                lines.extend_from_slice(b"\r\n");
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((from, to)) = run {
        lines.extend_from_slice(&head[from..to]);
        lines.extend_from_slice(b"\r\n");
    }
    lines
}

/// Whether a field is hop-by-hop by name (RFC 9110 section 7.6.1, and `Proxy-Connection`,
/// `Keep-Alive`): the fixed set `proxy::strip_hop_by_hop` removes.
fn is_hop_by_hop(name: &str) -> bool {
    // By length first: most names are of none of these lengths, and the rest compare once.
    let listed: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        18 => &["proxy-authenticate"],
        19 => &["proxy-authorization"],
        _ => return false,
    };
    listed.iter().any(|known| name.eq_ignore_ascii_case(known))
}

/// A `Content-Length` value: digits only, no sign, no overflow.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, digit| {
        n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// The last comma-separated token of a field value.
fn last_token(value: &[u8]) -> &[u8] {
    value
        .rsplit(|b| *b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// A response body read from the upstream connection.
#[derive(Debug)]
pub struct Body {
    /// The connection, until the body has ended.
    conn: Option<Conn>,
    /// Where the connection goes when the body has ended, if it may be used again.
    pool: Option<Arc<Pool>>,
    state: State,
    /// A read error held back for one poll (see [`Body::poll_frame`]).
    failed: Option<io::Error>,
    /// The head's fields, when they were asked for as bytes ([`Request::raw_fields`]): carried
    /// with the body, which goes wherever the response goes, to the server side that writes it.
    /// Boxed: the response is moved whole several times on its way, and inline these would
    /// make every move a larger copy (~0.5k more instructions in memcpy per request, counted).
    raw_fields: Option<Box<RawFields>>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Bytes left of a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk; the count of trailer bytes so far.
    Trailers(usize),
}

impl Body {
    /// The head's fields as bytes, when they were asked for that way.
    pub fn raw_fields(&mut self) -> &mut Option<Box<RawFields>> {
        &mut self.raw_fields
    }

    /// Ends the body: the connection goes back to the pool if it may be used again and nothing
    /// beyond the body was read from it.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take())
            && conn.buf.is_empty()
        {
            pool.put(conn);
        }
    }

    /// Moves through the buffered bytes of a chunked body from `step`: to the next data frame,
    /// to the end of the body, or as far as they go.
    fn next_chunked(&mut self, mut step: Chunked) -> Result<Decoded, io::Error> {
        let Some(conn) = &mut self.conn else {
            return Ok(Decoded::End);
        };
        let buf = &mut conn.buf;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        loop {
            match step {
                Chunked::Size => {
                    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(bad("chunk size line too long"));
                        }
                        break;
                    };
                    let line = buf[..end]
                        .strip_suffix(b"\r")
                        .ok_or_else(|| bad("chunk size line without CRLF"))?;
                    let digits = line
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
                        return Err(bad("bad chunk size"));
                    }
                    let size = digits
                        .iter()
                        .try_fold(0u64, |n, digit| {
                            let value = (*digit as char).to_digit(16)?;
                            n.checked_mul(16)?.checked_add(u64::from(value))
                        })
                        .ok_or_else(|| bad("chunk size too large"))?;
                    buf.advance(end + 1);
                    step = match size {
                        0 => Chunked::Trailers(0),
                        size => Chunked::Data(size),
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        break;
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = buf.split_to(take).freeze();
                    self.state = State::Chunked(match left - take as u64 {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    });
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        break;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    step = Chunked::Size;
                }
                // Trailer fields are read past, not forwarded: over HTTP/1 they are rare, and
                // hyper's server sends them only to a client that asked for them.
                Chunked::Trailers(seen) => {
                    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
                        if seen + buf.len() > MAX_TRAILERS {
                            return Err(bad("trailers too large"));
                        }
                        break;
                    };
                    let blank = matches!(&buf[..end], b"" | b"\r");
                    buf.advance(end + 1);
                    if blank {
                        return Ok(Decoded::End);
                    }
                    if seen + end + 1 > MAX_TRAILERS {
                        return Err(bad("trailers too large"));
                    }
                    step = Chunked::Trailers(seen + end + 1);
                }
            }
        }
        self.state = State::Chunked(step);
        Ok(Decoded::More)
    }

    /// The next frame, as [`http_body::Body::poll_frame`] without its error delay.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) => {
                    let Some(conn) = &mut self.conn else {
                        return Poll::Ready(None);
                    };
                    if !conn.buf.is_empty() {
                        let take = conn
                            .buf
                            .len()
                            .min(usize::try_from(left).unwrap_or(usize::MAX));
                        let data = conn.buf.split_to(take).freeze();
                        self.state = State::Length(left - take as u64);
                        if left == take as u64 {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => {
                    if let Some(conn) = &mut self.conn
                        && !conn.buf.is_empty()
                    {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(step) => match self.next_chunked(step) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(err) => {
                        self.abandon();
                        return Poll::Ready(Some(Err(err)));
                    }
                },
            }
            // More bytes are needed.
            let Some(conn) = &mut self.conn else {
                return Poll::Ready(None);
            };
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(self.state, State::Close) {
                        self.abandon();
                        return Poll::Ready(None);
                    }
                    self.abandon();
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => {
                    self.abandon();
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }

    /// Ends the body without giving the connection back.
    fn abandon(&mut self) {
        self.state = State::Done;
        self.conn = None;
        self.pool = None;
    }
}

/// Where decoding a chunked body's buffered bytes got to.
enum Decoded {
    Data(Bytes),
    End,
    More,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        match this.poll_next(cx) {
            // hyper's server drops what it has not written yet when a body fails, the response
            // head included. Held back for one turn, the error comes after the head and the
            // bytes before it have gone out, so the client sees the answer cut short, as with
            // hyper's own client, rather than no answer at all.
            Poll::Ready(Some(Err(err))) => {
                this.failed = Some(err);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done if self.failed.is_none() => SizeHint::with_exact(0),
            State::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(text), Reading::default())
    }

    #[test]
    fn hop_by_hop_fields_are_left_out_of_the_map() {
        // The same set `proxy::strip_hop_by_hop` removes, in any case.
        for name in &crate::proxy::HOP_BY_HOP {
            assert!(is_hop_by_hop(name.as_str()), "{name}");
            assert!(is_hop_by_hop(&name.as_str().to_ascii_uppercase()), "{name}");
        }
        for name in ["content-length", "date", "x-upgrade", "tee", "connections"] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
        let parsed = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-sum\r\nX-Kept: 1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.headers.len(), 1, "{:?}", parsed.headers);
        assert_eq!(parsed.headers["x-kept"], "1");
        assert!(matches!(parsed.framing, Framing::Chunked));
        assert!(parsed.keep_alive);

        // A field `Connection` names goes too, and only the fields that must.
        let parsed = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\
             Upgrade: h2c\r\nX-Kept: 1\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let names: Vec<&str> = parsed.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept", "content-length"]);
        assert!(!parsed.keep_alive);
    }

    #[test]
    fn raw_fields_are_the_lines_the_map_holds_as_they_came() {
        // The upstream's own request id is left out too: the gateway adds its own.
        let text = "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\n\
                    Connection: keep-alive\r\nContent-Length: 2\r\ncontent-length: 2\r\n\
                    X-Request-Id: theirs\r\nX-Value:  spaced out \r\n\r\nok";
        let raw_reading = Reading {
            head_only: false,
            raw_fields: true,
        };
        let mut buf = BytesMut::from(text);
        let parsed = parse_head(&mut buf, raw_reading).unwrap().unwrap();
        assert!(parsed.headers.is_empty());
        let raw = parsed.raw.expect("asked for");
        assert_eq!(
            String::from_utf8(raw.lines).unwrap(),
            "Server: up\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\nContent-Length: 2\r\n\
             X-Value:  spaced out\r\n"
        );
        assert_eq!(raw.length, Some(2));
        assert!(raw.dated);
        assert!(matches!(parsed.framing, Framing::Length(2)));
        assert_eq!(&buf[..], b"ok");

        // A length a transfer coding overrides is left out, as from the map.
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
        );
        let raw = parse_head(&mut buf, raw_reading)
            .unwrap()
            .unwrap()
            .raw
            .unwrap();
        assert!(raw.lines.is_empty() && raw.length.is_none() && !raw.dated);

        // A `Connection` that names a field: a map, stripped the general way.
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\nx-kept: 1\r\n\r\n",
        );
        let parsed = parse_head(&mut buf, raw_reading).unwrap().unwrap();
        assert!(parsed.raw.is_none());
        assert_eq!(parsed.headers.len(), 1);
        assert_eq!(parsed.headers["x-kept"], "1");
    }

    #[test]
    fn raw_fields_are_counted_edited_and_mapped_as_their_map_would_be() {
        let mut raw = RawFields {
            lines:
                b"Server: up\r\nX-Twice: 1\r\nx-twice:2\r\nX-Twicer: 3\r\nX-Value:  spaced out\r\n"
                    .to_vec(),
            length: None,
            dated: false,
        };
        assert_eq!(raw.count(), 5);
        // Every line of the name, whatever its case; not a longer name that starts with it.
        raw.remove(&HeaderName::from_static("x-twice"));
        assert_eq!(
            String::from_utf8(raw.lines.clone()).unwrap(),
            "Server: up\r\nX-Twicer: 3\r\nX-Value:  spaced out\r\n"
        );
        raw.remove(&HeaderName::from_static("server"));
        raw.push(
            &HeaderName::from_static("x-added"),
            &HeaderValue::from_static("a"),
        );
        raw.remove(&HeaderName::from_static("absent"));
        assert_eq!(raw.count(), 3);
        let mut map = HeaderMap::new();
        raw.into_map(&mut map);
        assert_eq!(map.len(), 3);
        assert_eq!(map["x-twicer"], "3");
        assert_eq!(map["x-value"], "spaced out");
        assert_eq!(map["x-added"], "a");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |text: &str| head(text).unwrap().unwrap().framing;
        assert!(matches!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        ));
        assert!(matches!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n"
            ),
            Framing::Chunked
        ));
        let both =
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        assert!(!both.unwrap().unwrap().headers.contains_key(CONTENT_LENGTH));
        assert!(matches!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Framing::Close
        ));
        assert!(matches!(framing("HTTP/1.1 200 OK\r\n\r\n"), Framing::Close));
        assert!(matches!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(0)
        ));
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n");
        assert!(matches!(
            parse_head(
                &mut buf,
                Reading {
                    head_only: true,
                    raw_fields: false
                }
            )
            .unwrap()
            .unwrap()
            .framing,
            Framing::Length(0)
        ));
    }

    #[test]
    fn keep_alive_needs_both_sides_and_one_framing() {
        let keep = |text: &str| head(text).unwrap().unwrap().keep_alive;
        assert!(keep("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(keep(
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn interim_answers_are_skipped_and_bad_heads_refused() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
        );
        let parsed = parse_head(&mut buf, Reading::default()).unwrap().unwrap();
        assert_eq!(parsed.status, StatusCode::CREATED);
        assert_eq!(parsed.headers["x-a"], "1");
        assert_eq!(&buf[..], b"ok");
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(head("SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x: 1\r\n".repeat(101));
        assert!(head(&many).is_err());
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_length(b"18446744073709551616"), None);
        assert_eq!(parse_length(b"-1"), None);
        assert_eq!(parse_length(b""), None);
    }
}
