//! HTTP hardening (issue 5): raw-socket clients sending malformed, ambiguous and oversized
//! requests, and spellings of a protected path; each asserts both the client's answer and what
//! the capturing upstream received.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_tests::{
    TestGateway, TestUpstream, http1_connection, raw_exchange, raw_status, raw_statuses,
};

const QUIET: Duration = Duration::from_millis(1500);

fn manifest(upstream: &TestUpstream, http: &str) -> String {
    format!(
        r#"version: 1
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
reload: {{ watch: false }}
http: {{ {http} }}
plugins:
  deny: {{ source: "{{plugins}}/deny_plugin.wasm" }}
upstreams:
  main: {{ targets: [{{ url: "{}" }}] }}
routes:
  - {{ name: admin-host, match: {{ host: admin.example }}, upstream: main, plugins: [{{ name: deny }}] }}
  - {{ name: admin, match: {{ prefix: /admin }}, upstream: main, plugins: [{{ name: deny }}] }}
  - {{ name: public, match: {{ prefix: / }}, upstream: main }}
"#,
        upstream.url()
    )
}

#[tokio::test]
async fn ambiguous_framing_and_hosts_are_refused_and_never_forwarded() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;
    let cases: &[(&str, &str)] = &[
        (
            "conflicting Content-Length",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        ),
        (
            "Content-Length list",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd",
        ),
        (
            "chunked twice",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "a coding after chunked",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "no chunked at all",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "space before the colon",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd",
        ),
        (
            "obsolete line folding",
            "GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  2\r\n\r\n",
        ),
        (
            "bad chunk size",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
        ),
        (
            "duplicate Host",
            "GET /a HTTP/1.1\r\nHost: x\r\nHost: admin.example\r\n\r\n",
        ),
        ("missing Host", "GET /a HTTP/1.1\r\n\r\n"),
        ("invalid Host", "GET /a HTTP/1.1\r\nHost: a b\r\n\r\n"),
        (
            "credentials in Host",
            "GET /a HTTP/1.1\r\nHost: u@x\r\n\r\n",
        ),
    ];
    for (name, request) in cases {
        let response = raw_exchange(gateway.addr, request.as_bytes(), QUIET).await;
        assert_eq!(raw_status(&response), 400, "{name}: {response}");
    }
    assert!(
        upstream.seen().is_empty(),
        "the upstream received {:?}",
        upstream.seen()
    );

    // A bad chunk after a good one: the client gets 400, and the upstream, which was already
    // streaming, never receives a complete request.
    let late = "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n0\r\n\r\n";
    let response = raw_exchange(gateway.addr, late.as_bytes(), QUIET).await;
    assert_eq!(raw_status(&response), 400, "{response}");
    assert!(upstream.seen().iter().all(|seen| seen.body_len == 0));
}

/// The two ambiguities hyper would settle itself (RFC 9112 section 6.3 lets it: it reads the
/// body as chunked, or counts an equal length once) are refused by the framing guard in front of
/// it, on a fresh connection and after good requests on a kept-alive one, and the requests
/// smuggled behind them are never read.
#[tokio::test]
async fn length_with_chunked_and_repeated_lengths_are_refused() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;

    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let ambiguous = [
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    ];
    for request in ambiguous {
        let response = raw_exchange(
            gateway.addr,
            format!("{request}{smuggled}").as_bytes(),
            QUIET,
        )
        .await;
        assert_eq!(raw_status(&response), 400, "{request}: {response}");
        assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());

    // Good requests first on the same connection (a length, chunks with an extension and a
    // trailer, a body that looks like an ambiguous head), then an ambiguous one.
    let decoy = "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    let pipeline = format!(
        "POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{decoy}\
         POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};note=1\r\n{decoy}\r\n0\r\nX-Check: 1\r\n\r\n\
         {}{smuggled}",
        decoy.len(),
        decoy.len(),
        ambiguous[0],
    );
    let response = raw_exchange(gateway.addr, pipeline.as_bytes(), QUIET).await;
    assert_eq!(raw_statuses(&response), ["200", "200", "400"], "{response}");
    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|seen| seen.uri.as_str()).collect();
    assert_eq!(paths, ["/one", "/two"]);
    assert!(
        seen.iter().all(|seen| seen.body_len == decoy.len()),
        "{seen:?}"
    );
}

/// The guard stops following a connection at an upgrade request, so one that is refused (here
/// by the chain) closes instead of carrying on unguarded.
#[tokio::test]
async fn a_refused_upgrade_closes_the_connection() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;
    let request = "GET /admin HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
                   POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd";
    let response = raw_exchange(gateway.addr, request.as_bytes(), QUIET).await;
    assert_eq!(raw_status(&response), 401, "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    assert!(upstream.seen().is_empty());
}

/// `Expect: 100-continue`, the body sent only after the interim answer, then more requests on
/// the same connection: the guard follows a body that arrives late and in pieces.
#[tokio::test]
async fn a_body_sent_after_100_continue_keeps_the_connection_in_step() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    for piece in [&b"01234"[..], b"56789"] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = read_until(&mut stream, "\r\n\r\n").await;
    assert_eq!(raw_status(&first), 200, "{first}");
    // Whatever body the upstream's answer carries, the next request on this connection is
    // read as a request (a second POST whose body looks like an ambiguous head, then a GET).
    let decoy = "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    let more = format!(
        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{decoy}GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        decoy.len()
    );
    stream.write_all(more.as_bytes()).await.unwrap();
    let mut rest = String::new();
    let _ = tokio::time::timeout(QUIET, stream.read_to_string(&mut rest)).await;
    assert_eq!(raw_statuses(&rest), ["200", "200"], "{first}{rest}");
    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|seen| seen.uri.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
    assert_eq!(seen[0].body_len, 10);
    assert_eq!(seen[1].body_len, decoy.len());
}

/// Reads from `stream` until `end` has been seen (or a quiet spell), returning what was read.
async fn read_until(stream: &mut tokio::net::TcpStream, end: &str) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains(end) {
        match tokio::time::timeout(QUIET, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buffer[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn limits_answer_414_431_and_413() {
    let upstream = TestUpstream::start("main").await;
    let http =
        "max_uri_length: 256, max_headers: 20, max_header_bytes: 2KiB, max_request_body: 1KiB";
    let gateway = TestGateway::start(&manifest(&upstream, http)).await;
    let send = |request: String| async move {
        raw_status(&raw_exchange(gateway.addr, request.as_bytes(), QUIET).await)
    };

    let long_path = format!("/{}", "a".repeat(300));
    assert_eq!(
        send(format!("GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n")).await,
        414
    );
    let many: String = (0..25).map(|i| format!("x-h{i}: 1\r\n")).collect();
    assert_eq!(
        send(format!("GET /a HTTP/1.1\r\nHost: x\r\n{many}\r\n")).await,
        431
    );
    let big = "b".repeat(3000);
    assert_eq!(
        send(format!(
            "GET /a HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n"
        ))
        .await,
        431
    );
    assert!(upstream.seen().is_empty());

    // Declared too large: refused before the upstream is contacted.
    let body = "c".repeat(2000);
    assert_eq!(
        send(format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{body}"
        ))
        .await,
        413
    );
    assert!(upstream.seen().is_empty());
    assert_eq!(upstream.connections(), 0);

    // Chunked and too large: refused once the limit is passed; the upstream, which was
    // receiving it, never gets a complete body.
    let chunk = "d".repeat(800);
    let chunked = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    assert_eq!(send(chunked).await, 413);
    assert!(upstream.seen().iter().all(|seen| seen.body_len == 0));

    // Within every limit: through.
    let fine = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    assert_eq!(send(fine).await, 200);
    assert_eq!(upstream.last().body_len, 800);
}

#[tokio::test]
async fn no_spelling_of_a_protected_path_bypasses_its_chain() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;
    let spellings = [
        "/admin",
        "/admin/",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin/x",
        "/%61dmin",
        "/%61%64%6d%69%6e/users",
        "/admin%2fusers",
        "/public/..%2fadmin",
        "/public%2f..%2fadmin",
        "/public\\..\\admin",
        "/public%5c..%5cadmin",
        "/public/..;/admin",
        "/public/.;/admin",
        "/public/../../../admin",
        "/admin/%00",
        "/public/%zz/../admin",
        "///admin///x",
    ];
    for path in spellings {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n");
        let response = raw_exchange(gateway.addr, request.as_bytes(), QUIET).await;
        let status = raw_status(&response);
        assert!(status == 401 || status == 400, "{path}: {response}");
    }
    // Absolute-form targets name the host: it decides the route and reaches the upstream.
    let sneaky =
        "GET http://admin.example/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n";
    assert_eq!(
        raw_status(&raw_exchange(gateway.addr, sneaky.as_bytes(), QUIET).await),
        401
    );
    let plain =
        "GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\nConnection: close\r\n\r\n";
    assert_eq!(
        raw_status(&raw_exchange(gateway.addr, plain.as_bytes(), QUIET).await),
        200
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["host"], "public.example");
    assert!(
        seen.iter().all(|s| !s.uri.contains("admin")),
        "an admin path reached the upstream without its chain: {seen:?}"
    );

    // Allowed through the chain, the upstream receives exactly the path routing decided on.
    let allowed = "GET /public/../%61dmin//users/./42?q=%2e%2e HTTP/1.1\r\nHost: public.example\r\nx-allow: yes\r\nConnection: close\r\n\r\n";
    assert_eq!(
        raw_status(&raw_exchange(gateway.addr, allowed.as_bytes(), QUIET).await),
        200
    );
    assert_eq!(upstream.last().uri, "/admin/users/42?q=%2e%2e");
}

#[tokio::test]
async fn path_rules_are_configurable() {
    let upstream = TestUpstream::start("main").await;
    let http = "merge_slashes: false, encoded_slashes: keep, backslashes: keep";
    let gateway = TestGateway::start(&manifest(&upstream, http)).await;
    let request = "GET /files//a%2fb/c\\d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(gateway.addr, request.as_bytes(), QUIET).await;
    assert_eq!(raw_status(&response), 200, "{response}");
    assert_eq!(upstream.last().uri, "/files//a%2Fb/c%5Cd");
}

#[tokio::test]
async fn each_request_head_is_waited_for_from_the_response_before_it() {
    // A connection keeps one head-wait timer, moved to a request's deadline only when it fires
    // at an earlier one. Its first deadline is 600 ms from the accept; the second head comes
    // after that, but within 600 ms of the first response, and must be served.
    let upstream = TestUpstream::start("main").await;
    let http = "header_read_timeout: 600ms, idle_timeout: 600ms";
    let gateway = TestGateway::start(&manifest(&upstream, http)).await;
    let (mut sender, connection) =
        http1_connection::<http_body_util::Empty<bytes::Bytes>>(gateway.addr).await;
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "x")
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    for path in ["/first", "/second"] {
        tokio::time::sleep(Duration::from_millis(350)).await;
        let response = sender.send_request(get(path)).await;
        let response = response.unwrap_or_else(|err| panic!("{path}: {err}"));
        assert_eq!(response.status(), 200, "{path}");
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
    }
    assert_eq!(upstream.seen().len(), 2);
    // Left idle, it is still closed.
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle connection was closed")
        .unwrap();
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let upstream = TestUpstream::start("main").await;
    let http = "header_read_timeout: 300ms, idle_timeout: 300ms, max_concurrent_streams: 3";
    let gateway = TestGateway::start(&manifest(&upstream, http)).await;

    // An HTTP/1.1 connection idle after its response is closed.
    let mut idle = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    idle.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection stayed open");
    assert_eq!(raw_status(&String::from_utf8_lossy(&received)), 200);

    // A head that never ends: the connection is closed without a request reaching anyone.
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buffer))
        .await
        .expect("the gateway closed the slow connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        upstream.seen().len(),
        1,
        "only the idle connection's request"
    );

    // An HTTP/2 connection with nothing in progress is closed (GOAWAY) after the idle timeout.
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get("http://x/a")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    let closed = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle HTTP/2 connection was closed");
    assert!(closed.is_ok());

    // The HTTP/2 stream limit is what the gateway announces.
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(stream).await.unwrap();
    let (announced, limit) = tokio::sync::watch::channel(0usize);
    tokio::spawn(std::future::poll_fn(move |cx| {
        let polled = std::pin::Pin::new(&mut connection).poll(cx);
        let _ = announced.send(connection.max_concurrent_send_streams());
        polled
    }));
    let mut client = client.ready().await.unwrap();
    let request = http::Request::get("http://x/a").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    assert_eq!(*limit.borrow(), 3);
}
