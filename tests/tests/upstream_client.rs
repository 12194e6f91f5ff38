//! wasmgate's own HTTP/1.1 client for plain-HTTP upstreams (issue 6, session 5): keep-alive
//! reuse, idle connections the upstream closed, and every way an HTTP/1 response can be framed,
//! against a hand-written upstream that answers exactly as told.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmgate_tests::{TestGateway, pattern};

/// An HTTP/1.1 upstream that answers by path, keeps connections alive unless the answer says
/// otherwise, closes a connection that stays idle for `idle_close`, and counts connections and
/// requests.
struct RawUpstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start(idle_close: Duration) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (counted, served) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, served.clone(), idle_close));
            }
        });
        RawUpstream {
            addr,
            connections,
            requests,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection until an answer closes it or it stays idle too long.
async fn serve(mut stream: TcpStream, requests: Arc<AtomicUsize>, idle_close: Duration) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(idle_close, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        requests.fetch_add(1, Ordering::SeqCst);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let (mut answer, close) = answer(&path, &body);
        if head.starts_with("HEAD ") {
            // The head alone: the blank line ends it.
            let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            answer.truncate(end + 4);
        }
        if stream.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}

/// The bytes to answer a path with, and whether to close the connection after them.
fn answer(path: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let plain = |text: &[u8]| {
        let mut out =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", text.len()).into_bytes();
        out.extend_from_slice(text);
        out
    };
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
                .to_vec(),
            false,
        ),
        "/chunked-and-length" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            false,
        ),
        "/until-close" => (
            b"HTTP/1.1 200 OK\r\nx-framing: none\r\n\r\nread until the end".to_vec(),
            true,
        ),
        "/connection-close" => (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\nlast".to_vec(),
            false,
        ),
        "/http10" => (
            b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold".to_vec(),
            false,
        ),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
        "/hop-by-hop" => (
            b"HTTP/1.1 200 OK\r\nServer: Raw\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: 1\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\ncontent-length: 2\r\nContent-Length: 2\r\nTrailer: x-sum\r\n\r\nok"
                .to_vec(),
            false,
        ),
        "/connection-names" => (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nX-Kept: 1\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
            false,
        ),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 7\r\n\r\ncreated"
                .to_vec(),
            false,
        ),
        "/large" => (plain(&pattern(300_000)), false),
        "/echo" => (plain(body), false),
        _ => (plain(path.as_bytes()), false),
    }
}

fn manifest(upstream: &RawUpstream) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nupstreams:\n  main: {{ targets: [{{ url: \"http://{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main }}\n",
        upstream.addr
    )
}

fn request(method: Method, path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test]
async fn connections_are_kept_alive_and_closed_ones_replaced() {
    let upstream = RawUpstream::start(Duration::from_millis(150)).await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    for i in 0..10 {
        let response = gateway.get("x", &format!("/n/{i}")).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.text(), format!("/n/{i}"));
    }
    assert_eq!(upstream.connections(), 1, "one kept-alive connection");

    // The upstream closes the idle connection. A POST is not sent twice, so it only succeeds
    // if the closed connection is noticed before it is used.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let response = gateway
        .send(request(Method::POST, "/echo", b"posted once"))
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "posted once");
    assert_eq!(upstream.connections(), 2);
    for _ in 0..5 {
        assert_eq!(gateway.get("x", "/again").await.status, StatusCode::OK);
    }
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.requests(), 16, "no request was sent twice");
}

#[tokio::test]
async fn every_response_framing_arrives_whole() {
    let upstream = RawUpstream::start(Duration::from_secs(30)).await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;

    let chunked = gateway.get("x", "/chunked").await;
    assert_eq!(chunked.status, StatusCode::OK);
    assert_eq!(chunked.text(), "hello world");

    // Both framings: the chunks count, the length is dropped (and the connection not reused).
    let both = gateway.get("x", "/chunked-and-length").await;
    assert_eq!(both.text(), "hello");
    assert_eq!(gateway.get("x", "/after").await.text(), "/after");
    assert_eq!(upstream.connections(), 2);

    let large = gateway.get("x", "/large").await;
    assert_eq!(large.body.len(), 300_000);
    assert!(
        large.body == pattern(300_000),
        "the large body arrived intact"
    );

    let interim = gateway.get("x", "/interim").await;
    assert_eq!(interim.status, StatusCode::CREATED);
    assert_eq!(interim.text(), "created");

    let empty = gateway.get("x", "/no-content").await;
    assert_eq!(empty.status, StatusCode::NO_CONTENT);
    assert!(empty.body.is_empty());

    let head = gateway.send(request(Method::HEAD, "/sized", b"")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), "6");
    assert!(head.body.is_empty());

    // All of these were answered on the second connection.
    assert_eq!(upstream.connections(), 2);

    // Answers that end their connection: read to the end, and the connection not used again.
    let until_close = gateway.get("x", "/until-close").await;
    assert_eq!(until_close.text(), "read until the end");
    assert_eq!(until_close.header("x-framing"), "none");
    assert_eq!(gateway.get("x", "/after").await.text(), "/after");
    assert_eq!(upstream.connections(), 3);

    assert_eq!(gateway.get("x", "/connection-close").await.text(), "last");
    assert_eq!(gateway.get("x", "/after").await.text(), "/after");
    assert_eq!(upstream.connections(), 4);

    assert_eq!(gateway.get("x", "/http10").await.text(), "old");
    assert_eq!(gateway.get("x", "/after").await.text(), "/after");
    assert_eq!(upstream.connections(), 5);

    // A request body within the client's limit (read whole, then sent on a kept-alive
    // connection), and one past it (streamed by hyper's client).
    let small = gateway
        .send(request(Method::PUT, "/echo", b"small body"))
        .await;
    assert_eq!(small.text(), "small body");
    assert_eq!(upstream.connections(), 5);
    let big: &'static [u8] = Box::leak(pattern(200_000).into_boxed_slice());
    let large = gateway.send(request(Method::PUT, "/echo", big)).await;
    assert_eq!(large.status, StatusCode::OK);
    assert!(large.body == big, "the large request body arrived intact");
}

/// A route without plugins passes the upstream's head on from its bytes (session 10): the same
/// fields go as from a map, hop-by-hop ones and those `Connection` names left out, the length
/// said once, the upstream's `Date` kept, and the gateway's `x-request-id` added.
#[tokio::test]
async fn a_head_passed_through_loses_its_hop_by_hop_fields() {
    let upstream = RawUpstream::start(Duration::from_secs(30)).await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(
            b"GET /hop-by-hop HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /connection-names HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("the gateway closes the connection after the second answer")
        .unwrap();
    let text = String::from_utf8(received).unwrap();
    let second_at = text
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .expect("two answers")
        .0;
    let (first, second) = text.split_at(second_at);
    let lines = |answer: &str| -> Vec<String> {
        let head = answer.split_once("\r\n\r\n").expect("a whole head").0;
        head.lines().skip(1).map(str::to_ascii_lowercase).collect()
    };
    let named = |answer: &str, name: &str| {
        lines(answer)
            .into_iter()
            .filter(|line| line.starts_with(&format!("{name}:")))
            .count()
    };

    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.ends_with("\r\n\r\nok"), "{first}");
    assert!(
        first.contains("\r\nServer: Raw\r\n"),
        "names keep their case: {first}"
    );
    assert!(first.contains("\r\nX-Kept: 1\r\n"), "{first}");
    assert_eq!(named(first, "content-length"), 1, "{first}");
    assert_eq!(named(first, "date"), 1, "{first}");
    assert!(
        first.contains("Date: Mon, 30 Nov 2026 12:00:00 GMT"),
        "{first}"
    );
    assert_eq!(named(first, "x-request-id"), 1, "{first}");
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "trailer",
    ] {
        assert_eq!(named(first, hop), 0, "{hop} in {first}");
    }

    assert!(second.ends_with("\r\n\r\nok"), "{second}");
    assert_eq!(
        named(second, "x-private"),
        0,
        "named in Connection: {second}"
    );
    assert_eq!(named(second, "x-kept"), 1, "{second}");
    // The gateway's own: the client asked for the connection to close.
    assert_eq!(
        lines(second)
            .iter()
            .filter(|l| *l == "connection: close")
            .count(),
        1
    );
    assert_eq!(
        named(second, "date"),
        1,
        "the gateway dates an undated answer"
    );
}

#[tokio::test]
async fn a_reload_keeps_idle_upstream_connections() {
    let upstream = RawUpstream::start(Duration::from_secs(30)).await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    for _ in 0..3 {
        assert_eq!(gateway.get("x", "/before").await.status, StatusCode::OK);
    }
    assert_eq!(upstream.connections(), 1);
    gateway
        .gateway()
        .reload()
        .await
        .expect("the reload succeeds");
    for _ in 0..3 {
        assert_eq!(gateway.get("x", "/after").await.status, StatusCode::OK);
    }
    assert_eq!(
        upstream.connections(),
        1,
        "the new snapshot reused the connection"
    );
}
