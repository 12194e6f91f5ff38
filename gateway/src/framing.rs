//! A guard in front of hyper's HTTP/1 request parser for the two framing ambiguities hyper
//! settles on its own: `Content-Length` beside `Transfer-Encoding`, and `Content-Length`
//! repeated (equal values, or a list).
//!
//! RFC 9112 section 6.3 lets a server settle both, and hyper does (it reads the body as chunked,
//! or counts the length once), but it then hides them from the service: the extra
//! `Content-Length` is never stored. A gateway on the edge should refuse them instead, because
//! the parties behind and beside it may settle them differently, which is what request smuggling
//! is made of. So the guard watches the bytes hyper reads, follows the framing of each request
//! with the parser hyper itself uses (httparse), and when a head is ambiguous it breaks that
//! head's last byte before hyper sees it (and ends the read with a blank line, which hyper looks
//! for before it parses a head that came in pieces): hyper then answers 400 Bad Request and
//! closes the connection, and nothing of the request reaches a plugin or an upstream.
//!
//! The guard follows a connection only as far as it is sure to agree with hyper. A head it
//! cannot parse (hyper refuses it too), the HTTP/2 preface, an upgrade or `CONNECT` (after
//! which the bytes may be anything; the listener closes such a connection unless the upgrade
//! happened), or a body it cannot follow turn it into a pass-through for the rest of the
//! connection. It never changes a byte of a request it does not refuse.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header slots kept on the stack for parsing a head; more (when `http.max_headers` allows
/// more) are allocated.
const STACK_HEADERS: usize = 100;

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ambiguity {
    /// `Content-Length` and `Transfer-Encoding` in one request.
    LengthWithTransferEncoding,
    /// `Content-Length` more than once, or as a list.
    RepeatedLength,
}

impl Ambiguity {
    fn describe(self) -> &'static str {
        match self {
            Ambiguity::LengthWithTransferEncoding => {
                "Content-Length together with Transfer-Encoding"
            }
            Ambiguity::RepeatedLength => "Content-Length repeated",
        }
    }
}

/// Where the byte stream of a connection is, as far as request framing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests, or inside a head (the bytes so far are in `Tracker::partial`).
    Head,
    /// Inside a body of known length: this many bytes to go.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// No longer following: every byte passes untouched.
    Opaque,
    /// A head was refused; nothing more is read.
    Refused,
}

/// Where a chunked body is, mirroring the states of hyper's chunked decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hexadecimal size; `digits` says whether there was one yet.
    Size { size: u64, digits: bool },
    /// After the size: whitespace or an extension, up to the CR.
    Extension { size: u64 },
    /// Expecting the LF that ends the size line.
    SizeLf { size: u64 },
    /// Inside chunk data: this many bytes to go.
    Data(u64),
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// After the last chunk: the CR of the final empty line, or a trailer field.
    EndCr,
    /// Inside a trailer field, up to its CR.
    Trailer,
    /// Expecting the LF that ends a trailer field.
    TrailerLf,
    /// Expecting the final LF.
    EndLf,
}

/// The framing state of one connection's request stream.
#[derive(Debug)]
pub(crate) struct Tracker {
    state: State,
    /// The bytes of a head that spans reads.
    partial: Vec<u8>,
    max_headers: usize,
    /// Past this many buffered head bytes hyper refuses the head itself (431); the guard stops
    /// buffering.
    max_head: usize,
}

impl Tracker {
    /// A tracker for a new connection, with the limits hyper is given.
    pub(crate) fn new(max_headers: usize, max_head: usize) -> Tracker {
        Tracker {
            state: State::Head,
            partial: Vec::new(),
            max_headers,
            max_head,
        }
    }

    /// A tracker that follows nothing: for connections that are not HTTP/1 (h2 by ALPN).
    pub(crate) fn off() -> Tracker {
        Tracker {
            state: State::Opaque,
            ..Tracker::new(0, 0)
        }
    }

    /// Follows `bytes`, the next bytes of the stream. If they complete an ambiguous head, its
    /// last byte is overwritten (so hyper's parser refuses it) and the ambiguity is returned
    /// with where the head ends in `bytes`; nothing after it is looked at.
    pub(crate) fn inspect(&mut self, bytes: &mut [u8]) -> Option<(Ambiguity, usize)> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                State::Opaque | State::Refused => return None,
                State::Length(left) => {
                    let available = (bytes.len() - at) as u64;
                    if available < left {
                        self.state = State::Length(left - available);
                        return None;
                    }
                    at += left as usize;
                    self.state = State::Head;
                }
                State::Chunked(chunk) => {
                    let (next, used) = step_chunked(chunk, &bytes[at..]);
                    self.state = next;
                    at += used;
                }
                State::Head => {
                    let earlier = self.partial.len();
                    let parsed = if earlier == 0 {
                        parse_head(&bytes[at..], self.max_headers)
                    } else {
                        self.partial.extend_from_slice(&bytes[at..]);
                        parse_head(&self.partial, self.max_headers)
                    };
                    match parsed {
                        Parsed::Partial => {
                            if earlier == 0 {
                                self.partial.extend_from_slice(&bytes[at..]);
                            }
                            if self.partial.len() > self.max_head {
                                self.give_up();
                            }
                            return None;
                        }
                        Parsed::Invalid => {
                            self.give_up();
                            return None;
                        }
                        Parsed::Complete { len, next } => {
                            // The head's bytes in this read end here.
                            let end = at + (len - earlier);
                            self.partial.clear();
                            match next {
                                Err(ambiguity) => {
                                    // A NUL where the head's final LF was: hyper's parser
                                    // (the same httparse) fails on it and answers 400.
                                    bytes[end - 1] = 0;
                                    self.state = State::Refused;
                                    return Some((ambiguity, end));
                                }
                                Ok(state) => {
                                    self.state = state;
                                    at = end;
                                }
                            }
                        }
                    }
                }
            }
        }
        None
    }

    fn give_up(&mut self) {
        self.state = State::Opaque;
        self.partial = Vec::new();
    }

    /// Whether a head was refused.
    fn refused(&self) -> bool {
        self.state == State::Refused
    }
}

/// What parsing the bytes of a head gave.
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Not a request head hyper would take (or the HTTP/2 preface).
    Invalid,
    /// A whole head of `len` bytes, and what follows it: a state, or a refusal.
    Complete {
        len: usize,
        next: Result<State, Ambiguity>,
    },
}

fn parse_head(bytes: &[u8], max_headers: usize) -> Parsed {
    // Uninitialised: this runs for every request head, and zeroing the fields cost more than
    // parsing a typical head.
    if max_headers <= STACK_HEADERS {
        let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse_head_into(bytes, &mut headers[..max_headers])
    } else {
        let mut headers = Vec::with_capacity(max_headers);
        headers.resize_with(max_headers, MaybeUninit::uninit);
        parse_head_into(bytes, &mut headers)
    }
}

fn parse_head_into<'b>(
    bytes: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Parsed {
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(bytes, headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let http11 = request.version == Some(1);
    let mut lengths = 0usize;
    let mut length = None;
    let mut listed = false;
    let mut encodings = 0usize;
    let mut chunked = false;
    let mut upgrade = request.method == Some("CONNECT");
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            listed |= header.value.contains(&b',');
            length = parse_length(header.value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings += 1;
            // Chunked must be the last coding; hyper refuses anything else.
            chunked = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade |= http11;
        }
    }
    let next = if lengths > 0 && encodings > 0 {
        Err(Ambiguity::LengthWithTransferEncoding)
    } else if lengths > 1 || listed {
        Err(Ambiguity::RepeatedLength)
    } else if upgrade {
        Ok(State::Opaque)
    } else if encodings > 0 {
        if encodings == 1 && chunked && http11 {
            Ok(State::Chunked(Chunk::Size {
                size: 0,
                digits: false,
            }))
        } else {
            // hyper refuses these (400); nothing to follow.
            Ok(State::Opaque)
        }
    } else if lengths == 1 {
        match length {
            Some(0) => Ok(State::Head),
            Some(n) => Ok(State::Length(n)),
            None => Ok(State::Opaque),
        }
    } else {
        Ok(State::Head)
    };
    Parsed::Complete { len, next }
}

/// A `Content-Length` value as hyper reads it: decimal digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &digit| {
        n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Follows a chunked body over `bytes`; returns the state after them and how many were used
/// (all of them, unless the body ended).
fn step_chunked(mut chunk: Chunk, bytes: &[u8]) -> (State, usize) {
    let mut at = 0;
    while at < bytes.len() {
        if let Chunk::Data(left) = chunk {
            let available = (bytes.len() - at) as u64;
            if available < left {
                return (State::Chunked(Chunk::Data(left - available)), bytes.len());
            }
            at += left as usize;
            chunk = Chunk::DataCr;
            continue;
        }
        let byte = bytes[at];
        at += 1;
        chunk = match (chunk, byte) {
            (Chunk::Size { size, .. }, b) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0);
                match size
                    .checked_mul(16)
                    .and_then(|size| size.checked_add(u64::from(digit)))
                {
                    Some(size) => Chunk::Size { size, digits: true },
                    None => return (State::Opaque, at),
                }
            }
            (Chunk::Size { size, digits: true }, b'\r') => Chunk::SizeLf { size },
            (Chunk::Size { size, digits: true }, b' ' | b'\t' | b';') => Chunk::Extension { size },
            (Chunk::Extension { size }, b'\r') => Chunk::SizeLf { size },
            (Chunk::Extension { .. }, b'\n') => return (State::Opaque, at),
            (Chunk::Extension { size }, _) => Chunk::Extension { size },
            (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::EndCr,
            (Chunk::SizeLf { size }, b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size {
                size: 0,
                digits: false,
            },
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::EndCr | Chunk::Trailer, b'\n') => return (State::Opaque, at),
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndLf, b'\n') => return (State::Head, at),
            // Anything else is an error hyper reports itself, ending the connection.
            _ => return (State::Opaque, at),
        };
    }
    (State::Chunked(chunk), at)
}

/// An HTTP/1 connection's stream with a [`Tracker`] on what is read from it.
pub(crate) struct FramingGuard<I> {
    io: I,
    tracker: Tracker,
    client_addr: SocketAddr,
}

impl<I> FramingGuard<I> {
    /// Guards `io`, a connection from `client_addr`.
    pub(crate) fn new(io: I, tracker: Tracker, client_addr: SocketAddr) -> FramingGuard<I> {
        FramingGuard {
            io,
            tracker,
            client_addr,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FramingGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.tracker.refused() {
            // hyper answers the broken head and closes; nothing after it is read.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some((ambiguity, end)) = this.tracker.inspect(&mut buf.filled_mut()[before..]) {
            tracing::warn!(
                client = %this.client_addr,
                reason = ambiguity.describe(),
                "request refused: ambiguous framing"
            );
            end_refused_read(buf, before + end);
        }
        Poll::Ready(Ok(()))
    }
}

/// Ends a read at the broken head that ends at `end`, followed by a blank line: hyper parses a
/// head that came in several reads only once it sees a blank line in the new bytes, and the
/// broken one's is gone. Without room for it (never the case with hyper's buffers) hyper waits
/// for the rest of the head until its header read timeout, and never gets the request either.
fn end_refused_read(buf: &mut ReadBuf<'_>, end: usize) {
    const BLANK: &[u8] = b"\r\n\r\n";
    if buf.filled().len() >= end + BLANK.len() {
        buf.filled_mut()[end..end + BLANK.len()].copy_from_slice(BLANK);
        buf.set_filled(end + BLANK.len());
    } else {
        buf.set_filled(end);
        if buf.remaining() >= BLANK.len() {
            buf.put_slice(BLANK);
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FramingGuard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        Tracker::new(100, 64 * 1024)
    }

    /// Feeds `stream` to a new tracker in pieces of `size` bytes, as the guard does; returns
    /// the first refusal with the offset of the byte broken, and the bytes as hyper would see
    /// them.
    fn feed(stream: &[u8], size: usize) -> (Option<(Ambiguity, usize)>, Vec<u8>, State) {
        let mut tracker = tracker();
        let mut seen = Vec::new();
        let mut refusal = None;
        for piece in stream.chunks(size) {
            let mut storage = vec![0u8; piece.len() + 64];
            let mut buf = ReadBuf::new(&mut storage);
            buf.put_slice(piece);
            if let Some((ambiguity, end)) = tracker.inspect(buf.filled_mut()) {
                assert_eq!(buf.filled()[end - 1], 0);
                refusal = Some((ambiguity, seen.len() + end - 1));
                end_refused_read(&mut buf, end);
                seen.extend_from_slice(buf.filled());
                break;
            }
            seen.extend_from_slice(buf.filled());
        }
        (refusal, seen, tracker.state)
    }

    /// Every way of cutting `stream` into equal pieces gives the same answer.
    fn feed_all_ways(stream: &str) -> (Option<(Ambiguity, usize)>, State) {
        let (first, _, state) = feed(stream.as_bytes(), stream.len());
        for size in 1..stream.len() {
            let (refusal, _, other) = feed(stream.as_bytes(), size);
            assert_eq!(refusal, first, "pieces of {size}");
            if refusal.is_none() {
                assert_eq!(other, state, "pieces of {size}");
            }
        }
        (first, state)
    }

    const GOOD: &str = concat!(
        "GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "POST /c HTTP/1.1\r\nHost: x\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
        "5;ext=\"a;b\"\r\nhello\r\n10 \r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n",
        "\r\nPOST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );

    #[test]
    fn follows_lengths_chunks_and_pipelining() {
        let (refusal, state) = feed_all_ways(GOOD);
        assert_eq!(refusal, None);
        assert_eq!(state, State::Head);
    }

    #[test]
    fn refuses_length_with_transfer_encoding_in_any_order_after_good_requests() {
        for ambiguous in [
            "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n",
            "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        ] {
            let stream = format!("{GOOD}{ambiguous}");
            let (refusal, _) = feed_all_ways(&stream);
            let head_end = GOOD.len() + ambiguous.find("\r\n\r\n").unwrap() + 3;
            assert_eq!(
                refusal,
                Some((Ambiguity::LengthWithTransferEncoding, head_end)),
                "{ambiguous}"
            );
        }
    }

    #[test]
    fn refuses_repeated_lengths_equal_or_listed() {
        for ambiguous in [
            "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd",
        ] {
            let (refusal, _) = feed_all_ways(ambiguous);
            assert_eq!(
                refusal.map(|(ambiguity, _)| ambiguity),
                Some(Ambiguity::RepeatedLength)
            );
        }
    }

    /// What hyper is handed is a head its parser refuses, ending with a blank line (which
    /// hyper looks for before parsing a head that came in pieces), however the reads fell.
    #[test]
    fn the_broken_head_is_one_httparse_refuses() {
        for stream in [
            "POST /e HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            // Bare LF line ends, which httparse also takes.
            "POST /e HTTP/1.1\nContent-Length: 4\nContent-Length: 4\n\nabcd",
        ] {
            for size in 1..=stream.len() {
                let (refusal, seen, _) = feed(stream.as_bytes(), size);
                let (_, at) = refusal.expect("refused");
                assert!(seen.ends_with(b"\0\r\n\r\n"), "{size}: {seen:?}");
                assert_eq!(seen.len(), at + 5);
                let mut headers = [httparse::EMPTY_HEADER; 8];
                assert!(httparse::Request::new(&mut headers).parse(&seen).is_err());
            }
        }
    }

    #[test]
    fn a_body_is_never_read_as_a_head() {
        // The ambiguous "head" is inside a body of known length, then inside chunk data.
        let inner = "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let stream = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
            inner.len(),
            inner.len()
        );
        let (refusal, state) = feed_all_ways(&stream);
        assert_eq!(refusal, None);
        assert_eq!(state, State::Head);
    }

    #[test]
    fn stops_following_what_it_cannot_agree_on() {
        for (stream, what) in [
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 preface"),
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                "upgrade",
            ),
            ("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", "CONNECT"),
            ("GET / HTTP/1.1\r\nHost x\r\n\r\n", "bad head"),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "bad chunk",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                "length overflow",
            ),
        ] {
            let smuggled = "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
            let (refusal, _, state) = feed(format!("{stream}{smuggled}").as_bytes(), 4096);
            assert_eq!((refusal, state), (None, State::Opaque), "{what}");
        }
    }

    #[test]
    fn an_oversized_head_is_left_to_hyper() {
        let mut tracker = Tracker::new(100, 1024);
        let mut head = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 2048));
        assert!(tracker.inspect(&mut head).is_none());
        assert_eq!(tracker.state, State::Opaque);
        assert!(tracker.partial.capacity() == 0);
    }
}
