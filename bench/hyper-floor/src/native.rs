//! Two more floors, to size what a proxy core of wasmgate's own could save (docs/performance.md,
//! session 5): `native-client` keeps hyper's server and replaces the pooled client with one
//! written here (keep-alive connections owned by the request's own task, heads parsed with
//! httparse, no connection task, no channel); `raw` drops hyper on both sides (heads parsed with
//! httparse and copied between reused buffers, as nginx does). Both handle what the benchmark
//! sends (bodiless requests, `Content-Length` responses) and little else: they are yardsticks,
//! not proxies.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Idle keep-alive connections to the upstream.
pub struct Pool {
    idle: Mutex<Vec<TcpStream>>,
    addr: SocketAddr,
}

impl Pool {
    pub fn new(addr: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(Vec::new()),
            addr,
        })
    }

    async fn take(&self) -> io::Result<TcpStream> {
        let idle = self.idle.lock().expect("pool lock").pop();
        match idle {
            Some(stream) => Ok(stream),
            None => {
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                Ok(stream)
            }
        }
    }

    fn put(&self, stream: TcpStream) {
        self.idle.lock().expect("pool lock").push(stream);
    }
}

/// A response head and where its body starts and ends in the buffer.
struct Head {
    status: u16,
    headers: Vec<(http::HeaderName, (usize, usize))>,
    head_len: usize,
    body_len: usize,
}

/// Reads one response (head and `Content-Length` body) from `stream` into `buf`.
async fn read_response(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Head> {
    loop {
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response.parse(buf).map_err(io::Error::other)?;
        let httparse::Status::Complete(head_len) = parsed else {
            continue;
        };
        let base = buf.as_ptr() as usize;
        let mut body_len = 0;
        let mut kept = Vec::with_capacity(response.headers.len());
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                body_len = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| io::Error::other("bad content-length"))?;
            }
            if header.name.eq_ignore_ascii_case("connection")
                || header.name.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            let name =
                http::HeaderName::from_bytes(header.name.as_bytes()).map_err(io::Error::other)?;
            let start = header.value.as_ptr() as usize - base;
            kept.push((name, (start, start + header.value.len())));
        }
        let status = response.code.unwrap_or(502);
        while buf.len() < head_len + body_len {
            if stream.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        return Ok(Head {
            status,
            headers: kept,
            head_len,
            body_len,
        });
    }
}

/// hyper's server, this file's client.
pub async fn forward(
    pool: Arc<Pool>,
    request: Request<Incoming>,
) -> io::Result<Response<Full<Bytes>>> {
    let (parts, _body) = request.into_parts();
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut stream = pool.take().await?;
    stream.write_all(&head).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let parsed = read_response(&mut stream, &mut buf).await?;
    pool.put(stream);
    let whole = buf.freeze();
    let mut response = Response::new(Full::new(
        whole.slice(parsed.head_len..parsed.head_len + parsed.body_len),
    ));
    *response.status_mut() = http::StatusCode::from_u16(parsed.status).map_err(io::Error::other)?;
    let headers = response.headers_mut();
    for (name, (start, end)) in parsed.headers {
        let value = http::HeaderValue::from_maybe_shared(whole.slice(start..end))
            .map_err(io::Error::other)?;
        headers.append(name, value);
    }
    Ok(response)
}

/// No hyper: one client connection, its requests relayed one at a time.
pub async fn raw(mut client: TcpStream, pool: Arc<Pool>) -> io::Result<()> {
    let mut input = BytesMut::with_capacity(8192);
    let mut out = Vec::with_capacity(1024);
    let mut answer = BytesMut::with_capacity(4096);
    loop {
        // A whole request head.
        let head_len = loop {
            if !input.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut request = httparse::Request::new(&mut headers);
                if let httparse::Status::Complete(len) =
                    request.parse(&input).map_err(io::Error::other)?
                {
                    out.clear();
                    out.extend_from_slice(request.method.unwrap_or("GET").as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(request.path.unwrap_or("/").as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    for header in request.headers.iter() {
                        if header.name.eq_ignore_ascii_case("connection") {
                            continue;
                        }
                        out.extend_from_slice(header.name.as_bytes());
                        out.extend_from_slice(b": ");
                        out.extend_from_slice(header.value);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"\r\n");
                    break len;
                }
            }
            if client.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
        };
        input.advance(head_len);
        let mut upstream = pool.take().await?;
        upstream.write_all(&out).await?;
        answer.clear();
        let parsed = read_response(&mut upstream, &mut answer).await?;
        pool.put(upstream);
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parsed.status.to_string().as_bytes());
        out.extend_from_slice(b" OK\r\n");
        for (name, (start, end)) in &parsed.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&answer[*start..*end]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&answer[parsed.head_len..parsed.head_len + parsed.body_len]);
        client.write_all(&out).await?;
    }
}
