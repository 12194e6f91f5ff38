//! wasmgate's own HTTP/1.1 server side (issue 6, session 9): kept-alive and pipelined requests,
//! bodies that arrive in pieces, response framing it chooses itself (a length, chunks, none for
//! `HEAD`), `Date` and `Connection: close`, and the hand-over to hyper's server for what it does
//! not serve, in the middle of a connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_tests::{TestGateway, TestUpstream, pattern, raw_statuses};

fn manifest(upstream: &TestUpstream) -> String {
    format!(
        r#"version: 1
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
reload: {{ watch: false }}
plugins: {{}}
upstreams:
  main: {{ targets: [{{ url: "{}" }}] }}
routes:
  - {{ name: all, match: {{ prefix: / }}, upstream: main }}
"#,
        upstream.url()
    )
}

/// A gateway in front of a test upstream, and a connection to it on which `first` was sent.
async fn connected(first: &[u8]) -> (TestUpstream, TestGateway, tokio::net::TcpStream) {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(first).await.unwrap();
    (upstream, gateway, stream)
}

/// Reads until the server closes the connection (or 5 s pass, which fails the test).
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received));
    read.await
        .expect("the server closed the connection")
        .expect("reading");
    String::from_utf8(received).expect("UTF-8 responses")
}

/// The responses in `text`, each as its head (lower-cased) and what follows it up to the next
/// response.
fn responses(text: &str) -> Vec<(String, &str)> {
    let starts: Vec<usize> = text.match_indices("HTTP/1.1 ").map(|(at, _)| at).collect();
    let mut out = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        let message = &text[start..end];
        let (head, body) = message.split_once("\r\n\r\n").expect("a whole head");
        out.push((head.to_ascii_lowercase(), body));
    }
    out
}

/// One kept-alive connection carries pipelined requests: a body that arrives in two pieces, a
/// `HEAD` whose response declares a length but carries no body, and a last request that asks
/// for the connection to close, which it then does. Every response has a `Date`.
#[tokio::test]
async fn a_kept_alive_connection_serves_pipelined_requests_and_split_bodies() {
    let (upstream, _gateway, mut stream) = connected(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhell").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(b"o body\nHEAD /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    let answers = responses(&text);
    assert_eq!(raw_statuses(&text), ["200", "200", "200", "200"], "{text}");
    for (head, _) in &answers {
        assert!(head.contains("\r\ndate: "), "{head}");
    }
    assert_eq!(answers[0].1, "");
    assert_eq!(answers[1].1, "hello body\n", "the body, echoed whole");
    assert!(
        answers[2].0.contains("content-length: 5"),
        "{}",
        answers[2].0
    );
    assert_eq!(answers[2].1, "", "no body after the HEAD response");
    assert!(
        answers[3].0.contains("connection: close"),
        "{}",
        answers[3].0
    );
    assert_eq!(answers[3].1.as_bytes(), pattern(3));
    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|seen| seen.uri.as_str()).collect();
    assert_eq!(paths, ["/one", "/two", "/bytes/5", "/bytes/3"]);
    assert_eq!(seen[1].body_len, 11);
}

/// A response whose length nobody knows ahead (the upstream streams it) is sent in chunks.
#[tokio::test]
async fn a_response_of_unknown_length_is_chunked() {
    let (_upstream, _gateway, mut stream) = connected(b"POST /stream-echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world").await;
    let text = read_to_close(&mut stream).await;
    let answers = responses(&text);
    assert_eq!(answers.len(), 1, "{text}");
    let (head, mut body) = (&answers[0].0, answers[0].1);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let mut decoded = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("a hexadecimal size");
        if size == 0 {
            assert_eq!(rest, "\r\n", "the last chunk ends the body");
            break;
        }
        decoded.push_str(&rest[..size]);
        body = rest[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after a chunk");
    }
    assert_eq!(decoded, "hello world");
}

/// Requests the server side does not serve itself (here `Expect: 100-continue`, then HTTP/1.0)
/// are served by hyper's server from there on, on the same connection, with the bytes already
/// read handed over.
#[tokio::test]
async fn requests_it_does_not_serve_go_to_hyper_on_the_same_connection() {
    let (upstream, _gateway, mut stream) = connected(b"GET /own HTTP/1.1\r\nHost: x\r\n\r\nPOST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n").await;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("100 Continue") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("hyper asks for the body")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    stream
        .write_all(b"abcGET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let rest = read_to_close(&mut stream).await;
    let text = format!("{}{rest}", String::from_utf8_lossy(&seen));
    assert_eq!(raw_statuses(&text), ["200", "100", "200"], "{text}");
    assert!(text.contains("HTTP/1.0 200"), "{text}");
    let paths: Vec<String> = upstream.seen().into_iter().map(|seen| seen.uri).collect();
    assert_eq!(paths, ["/own", "/expect", "/old"]);
    assert_eq!(upstream.seen()[1].body_len, 3);
}
