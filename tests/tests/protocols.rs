//! TLS and protocols (issue 5): TLS termination with HTTP/2 by ALPN and HTTP/1.1 fallback,
//! upstreams over TLS and HTTP/2, and WebSocket upgrades that pass only through an allowing
//! chain. Certificates are made in the test with rcgen.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::{TestCert, TestGateway, TestUpstream};

fn manifest(listener_tls: &str, upstreams: &str, routes: &str) -> String {
    format!(
        r#"version: 1
listeners:
  - {{ name: public, bind: "127.0.0.1:0" {listener_tls} }}
reload: {{ watch: false }}
plugins:
  deny: {{ source: "{{plugins}}/deny_plugin.wasm" }}
upstreams:
{upstreams}routes:
{routes}"#
    )
}

fn tls(cert: &TestCert) -> String {
    format!(
        ", tls: {{ cert: \"{}\", key: \"{}\" }}",
        cert.cert.display(),
        cert.key.display()
    )
}

const ALL: &str = "  - { name: all, match: { prefix: / }, upstream: main }\n";

/// Connects over TLS offering `alpn`, and returns what the server chose.
async fn connect_tls(
    gateway: &TestGateway,
    cert: &TestCert,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = cert.connector(alpn).connect(name, tcp).await.unwrap();
    let chosen = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (stream, chosen)
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn tls_termination_negotiates_http2_and_falls_back_to_http1() {
    let cert = TestCert::new();
    let upstream = TestUpstream::start("main").await;
    let upstreams = format!(
        "  main: {{ targets: [{{ url: \"{}\" }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest(&tls(&cert), &upstreams, ALL)).await;

    // HTTP/2 by ALPN.
    let (stream, chosen) = connect_tls(&gateway, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("https://localhost/over-h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/over-h2");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(
        seen.headers["forwarded"]
            .to_str()
            .unwrap()
            .contains("proto=https")
    );

    // HTTP/1.1 by ALPN, and with no ALPN at all.
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let (stream, chosen) = connect_tls(&gateway, &cert, alpn).await;
        assert_eq!(chosen.as_deref(), alpn.first().copied());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let response = sender.send_request(get("/over-h1")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_11);
    }

    // Plain HTTP on the TLS port gets no answer but a closed connection.
    let plain = wasmgate_tests::raw_exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
}

#[tokio::test]
async fn a_reload_rotates_certificates_without_a_restart() {
    let first = TestCert::new();
    let upstream = TestUpstream::start("main").await;
    let upstreams = format!(
        "  main: {{ targets: [{{ url: \"{}\" }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest(&tls(&first), &upstreams, ALL)).await;
    let trusts = |cert: &TestCert| {
        let connector = cert.connector(&[b"http/1.1"]);
        let addr = gateway.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(trusts(&first).await);

    // New files in place of the old: served from the next reload on.
    let second = TestCert::new();
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    assert!(trusts(&first).await, "rotated before the reload");
    gateway.gateway().reload().await.unwrap();
    assert!(trusts(&second).await);
    assert!(!trusts(&first).await);

    // A broken key fails the reload, and the served certificate stays.
    std::fs::write(&first.key, "not a key").unwrap();
    let err = gateway.gateway().reload().await.unwrap_err().to_string();
    assert!(err.contains("listener `public`"), "{err}");
    assert!(trusts(&second).await);
}

#[tokio::test]
async fn a_bad_certificate_fails_the_start_naming_listener_and_file() {
    let cert = TestCert::new();
    std::fs::write(&cert.key, "not a key").unwrap();
    let upstream = TestUpstream::start("main").await;
    let upstreams = format!(
        "  main: {{ targets: [{{ url: \"{}\" }}] }}\n",
        upstream.url()
    );
    let Err(err) = TestGateway::try_start(&manifest(&tls(&cert), &upstreams, ALL)).await else {
        panic!("the gateway started with a broken key");
    };
    let err = err.to_string();
    assert!(err.contains("listener `public`"), "{err}");
    assert!(err.contains("key.pem"), "{err}");

    // `wasmgate check` reads the files too.
    let dir = tempfile::tempdir().unwrap();
    let path = wasmgate_tests::write_manifest(dir.path(), &manifest(&tls(&cert), &upstreams, ALL));
    let err = wasmgate::check(&path).await.unwrap_err().to_string();
    assert!(err.contains("manifest.yaml:3: listener `public`"), "{err}");
}

#[tokio::test]
async fn upstreams_over_tls_with_a_configured_ca_and_over_http2() {
    let cert = TestCert::new();
    let secure = TestUpstream::start_tls("secure", cert.acceptor(&[b"h2", b"http/1.1"])).await;
    let h2c = TestUpstream::start("h2c").await;
    let upstreams = format!(
        "  secure: {{ tls: {{ ca: \"{}\" }}, targets: [{{ url: \"{}\" }}] }}\n  untrusted: {{ targets: [{{ url: \"{}\" }}] }}\n  h2c: {{ http2: true, targets: [{{ url: \"{}\" }}] }}\n",
        cert.cert.display(),
        secure.url(),
        secure.url(),
        h2c.url()
    );
    let routes = "  - { name: secure, match: { prefix: /secure }, upstream: secure }\n  - { name: untrusted, match: { prefix: /untrusted }, upstream: untrusted }\n  - { name: h2c, match: { prefix: /h2c }, upstream: h2c }\n";
    let gateway = TestGateway::start(&manifest("", &upstreams, routes)).await;

    let response = gateway.get("x", "/secure").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-upstream"), "secure");
    // hyper-rustls offered h2 by ALPN and the upstream took it.
    assert_eq!(response.header("x-version"), "HTTP/2.0");

    // The system roots do not know the test CA: the handshake fails, and that is a 502.
    let before = secure.seen().len();
    assert_eq!(
        gateway.get("x", "/untrusted").await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(secure.seen().len(), before);

    let response = gateway.get("x", "/h2c").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-version"), "HTTP/2.0");
}

#[tokio::test]
async fn websockets_pass_only_after_the_chain_allows_them() {
    let upstream = TestUpstream::start("main").await;
    let upstreams = format!(
        "  main: {{ targets: [{{ url: \"{}\" }}] }}\n",
        upstream.url()
    );
    let routes =
        "  - { name: ws, match: { path: /ws }, upstream: main, plugins: [{ name: deny }] }\n";
    let gateway = TestGateway::start(&manifest("", &upstreams, routes)).await;

    let handshake = |allow: bool| {
        let mut request = Request::get(format!("ws://{}/ws", gateway.addr))
            .header("host", "x")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header(
                "sec-websocket-key",
                tokio_tungstenite::tungstenite::handshake::client::generate_key(),
            );
        if allow {
            request = request.header("x-allow", "yes");
        }
        request.body(()).unwrap()
    };

    // Refused by the chain: no upgrade, and the upstream never hears of it.
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let refused = tokio_tungstenite::client_async(handshake(false), tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    assert!(upstream.seen().is_empty());

    // Allowed: an echo round trip through the gateway.
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async(handshake(true), tcp)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through the gateway"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("an echo")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    socket.close(None).await.unwrap();
    assert_eq!(upstream.last().uri, "/ws");

    // An ordinary request on the same route still works, and gets no upgrade.
    let response = gateway
        .send(
            Request::get("/ws")
                .header("host", "x")
                .header("x-allow", "yes")
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await;
    // (The test upstream answers 400 to a /ws request that asks for no upgrade.)
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
}
