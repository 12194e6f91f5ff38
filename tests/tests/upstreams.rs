//! Upstream pools and resilience (issue 5): weights, least-outstanding, passive and active
//! health, retries, timeouts, and how upstream failures reach the client.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use wasmgate_tests::{ScriptedUpstream, Step, TestGateway, TestUpstream, refusing_url};

fn manifest(upstream: &str, routes: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nupstreams:\n{upstream}routes:\n{routes}"
    )
}

fn one_upstream(upstream: &TestUpstream, routes: &str) -> String {
    manifest(
        &format!(
            "  main: {{ targets: [{{ url: \"{}\" }}] }}\n",
            upstream.url()
        ),
        routes,
    )
}

fn one_route(upstream: &str) -> String {
    manifest(
        upstream,
        "  - { name: all, match: { prefix: / }, upstream: main }\n",
    )
}

fn targets(urls: &[(String, u32)]) -> String {
    urls.iter()
        .map(|(url, weight)| format!("{{ url: \"{url}\", weight: {weight} }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn get(gateway: &TestGateway, path: &str) -> StatusCode {
    gateway.get("x", path).await.status
}

#[tokio::test]
async fn weights_spread_round_robin_traffic() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let upstream = format!(
        "  main: {{ targets: [{}] }}\n",
        targets(&[(a.url(), 3), (b.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    for _ in 0..40 {
        assert_eq!(get(&gateway, "/w").await, StatusCode::OK);
    }
    assert_eq!((a.served(), b.served()), (30, 10));
}

#[tokio::test]
async fn least_outstanding_avoids_a_busy_target() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let upstream = format!(
        "  main: {{ balance: least-outstanding, targets: [{}] }}\n",
        targets(&[(a.url(), 1), (b.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    let slow = gateway.get("x", "/delay/1500");
    let quick = async {
        // Let the slow request reach its target first.
        for _ in 0..200 {
            if a.served() + b.served() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..6 {
            assert_eq!(get(&gateway, "/quick").await, StatusCode::OK);
        }
    };
    let (slow, ()) = tokio::join!(slow, quick);
    assert_eq!(slow.status, StatusCode::OK);
    let busy = if a.seen().iter().any(|s| s.uri.starts_with("/delay")) {
        &a
    } else {
        &b
    };
    // Every quick request went to the target that was not busy.
    assert_eq!(busy.served(), 1);
    assert_eq!(a.served() + b.served(), 7);
}

#[tokio::test]
async fn a_dying_target_costs_no_idempotent_request() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let upstream = format!(
        "  main: {{ retries: 2, passive_health: {{ failures: 2, ejection: 1m }}, targets: [{}] }}\n",
        targets(&[(a.url(), 1), (b.url(), 1), (c.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    for _ in 0..12 {
        assert_eq!(get(&gateway, "/before").await, StatusCode::OK);
    }
    assert_eq!((a.served(), b.served(), c.served()), (4, 4, 4));

    let b_addr = b.addr;
    drop(b); // Its listener and every open connection go.
    let mut failed = 0;
    for _ in 0..60 {
        // Concurrent clients as well as sequential ones.
        let (x, y) = tokio::join!(get(&gateway, "/after"), get(&gateway, "/after"));
        failed += [x, y].iter().filter(|s| **s != StatusCode::OK).count();
    }
    assert_eq!(failed, 0, "idempotent requests failed while a target died");
    assert_eq!(a.served() + c.served(), 12 - 4 + 120);

    // The dead target is held out, and the metric says so.
    let metrics = gateway.gateway().metrics().encode();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("wasmgate_upstream_target_healthy") && l.contains(&b_addr.to_string())
        })
        .expect("a health series for the dead target");
    assert!(line.ends_with(" 0"), "{line}");
}

#[tokio::test]
async fn only_idempotent_requests_are_retried() {
    let alive = TestUpstream::start("alive").await;
    let upstream = format!(
        "  main: {{ retries: 1, passive_health: {{ failures: 0 }}, targets: [{}] }}\n",
        targets(&[(refusing_url().await, 1), (alive.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = gateway
            .send(
                Request::post("/create")
                    .header("host", "x")
                    .body(Full::new(Bytes::from_static(b"payload")))
                    .unwrap(),
            )
            .await;
        statuses.push(response.status.as_u16());
    }
    // Round robin alternates: every other POST met the refusing target, and was not retried.
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 502, 502]);
    for _ in 0..4 {
        assert_eq!(get(&gateway, "/read").await, StatusCode::OK);
    }
    // PUT and DELETE are idempotent; with a body known in full they are retried too.
    for _ in 0..2 {
        let response = gateway
            .send(
                Request::delete("/thing")
                    .header("host", "x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(response.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn active_health_checks_take_targets_out_and_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let upstream = format!(
        "  main:\n    targets: [{}]\n    health_check: {{ path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1 }}\n",
        targets(&[(a.url(), 1), (b.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    b.set_healthy(false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = b.served();
    for _ in 0..10 {
        assert_eq!(get(&gateway, "/x").await, StatusCode::OK);
    }
    assert_eq!(b.served(), before, "an unhealthy target got traffic");

    a.set_healthy(false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let response = gateway.get("x", "/x").await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.text(), "no healthy upstream");

    a.set_healthy(true);
    b.set_healthy(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (a_before, b_before) = (a.served(), b.served());
    for _ in 0..10 {
        assert_eq!(get(&gateway, "/x").await, StatusCode::OK);
    }
    assert_eq!((a.served() - a_before, b.served() - b_before), (5, 5));
}

#[tokio::test]
async fn upstream_failures_map_to_502_504_and_never_pass_as_complete() {
    let stalls = ScriptedUpstream::start(vec![Step::Sleep(Duration::from_secs(5))]).await;
    let resets = ScriptedUpstream::start(vec![Step::Reset]).await;
    let lies = ScriptedUpstream::start(vec![
        Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b".to_vec()),
        Step::Reset,
    ])
    .await;
    let bad_chunks = ScriptedUpstream::start(vec![Step::Write(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec(),
    )])
    .await;
    let mut trickle = vec![Step::Write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n".to_vec(),
    )];
    for _ in 0..20 {
        trickle.push(Step::Write(b"x".to_vec()));
        trickle.push(Step::Sleep(Duration::from_millis(100)));
    }
    let trickles = ScriptedUpstream::start(trickle).await;
    let slow_head = ScriptedUpstream::start(vec![
        Step::Sleep(Duration::from_millis(800)),
        Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
    ])
    .await;
    let refused = refusing_url().await;
    let upstreams = format!(
        "  stalls: {{ timeout: 300ms, targets: [{{ url: \"{}\" }}] }}\n  resets: {{ targets: [{{ url: \"{}\" }}] }}\n  lies: {{ targets: [{{ url: \"{}\" }}] }}\n  chunks: {{ targets: [{{ url: \"{}\" }}] }}\n  trickles: {{ request_timeout: 500ms, targets: [{{ url: \"{}\" }}] }}\n  slow-head: {{ targets: [{{ url: \"{}\" }}] }}\n  refused: {{ targets: [{{ url: \"{refused}\" }}] }}\n",
        stalls.url(),
        resets.url(),
        lies.url(),
        bad_chunks.url(),
        trickles.url(),
        slow_head.url()
    );
    let routes = "  - { name: stalls, match: { prefix: /stalls }, upstream: stalls }\n  - { name: resets, match: { prefix: /resets }, upstream: resets }\n  - { name: lies, match: { prefix: /lies }, upstream: lies }\n  - { name: chunks, match: { prefix: /chunks }, upstream: chunks }\n  - { name: trickles, match: { prefix: /trickles }, upstream: trickles }\n  - { name: slow-head, match: { prefix: /slow-head }, upstream: slow-head, request_timeout: 400ms }\n  - { name: slow-head-ok, match: { prefix: /patient }, upstream: slow-head }\n  - { name: refused, match: { prefix: /refused }, upstream: refused }\n";
    let gateway = TestGateway::start(&manifest(&upstreams, routes)).await;

    assert_eq!(get(&gateway, "/refused").await, StatusCode::BAD_GATEWAY);
    assert_eq!(get(&gateway, "/resets").await, StatusCode::BAD_GATEWAY);
    // A reset is retried (GET), on the only target there is, within the bound.
    assert_eq!(resets.requests(), 3);
    assert_eq!(get(&gateway, "/stalls").await, StatusCode::GATEWAY_TIMEOUT);
    // A timeout is not retried.
    assert_eq!(stalls.requests(), 1);
    assert_eq!(
        get(&gateway, "/slow-head").await,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(get(&gateway, "/patient").await, StatusCode::OK);

    // Bodies cut short by the upstream are cut short for the client too.
    for path in ["/lies", "/chunks", "/trickles"] {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let request = Request::get(format!("http://{}{path}", gateway.addr))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
            .await
            .expect("the body ended");
        assert!(body.is_err(), "{path}: a cut body arrived as complete");
    }
}

#[tokio::test]
async fn a_kept_alive_connection_bounds_each_request_by_its_own_deadline() {
    // wasmgate's client keeps one timer per upstream connection, moved to an earlier deadline
    // at once and to a later one only when it fires at the one it has: a later deadline, an
    // earlier one, and one later than a deadline the timer was already waiting for. Routes
    // differ only in their timeout, so they share the upstream's pool, and the gateway serves
    // on the test's one thread, so on one connection while it stays open.
    let upstream = TestUpstream::start("main").await;
    let routes = "  - { name: patient, match: { prefix: /delay/30 }, upstream: main, timeout: 10s }\n  - { name: hasty, match: { prefix: /delay/1500 }, upstream: main, timeout: 300ms }\n  - { name: quick, match: { prefix: /delay/0 }, upstream: main, timeout: 200ms }\n  - { name: middling, match: { prefix: /delay/1600 }, upstream: main, timeout: 700ms }\n";
    let gateway = TestGateway::start(&one_upstream(&upstream, routes)).await;

    assert_eq!(get(&gateway, "/delay/30").await, StatusCode::OK);
    assert_eq!(get(&gateway, "/delay/30").await, StatusCode::OK);
    assert_eq!(upstream.connections(), 1, "the connection was reused");

    // An earlier deadline than the 10 s the connection's timer was set to.
    let started = std::time::Instant::now();
    assert_eq!(
        get(&gateway, "/delay/1500").await,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert!(started.elapsed() < Duration::from_millis(1400));

    // The timed-out connection is not reused. Its replacement's timer waits for 200 ms, then is
    // set to 700 ms from a later start: it must fire then, neither at the 200 ms it was
    // waiting for nor never.
    assert_eq!(get(&gateway, "/delay/0").await, StatusCode::OK);
    assert_eq!(upstream.connections(), 2);
    let started = std::time::Instant::now();
    assert_eq!(
        get(&gateway, "/delay/1600").await,
        StatusCode::GATEWAY_TIMEOUT
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_millis(1500),
        "timed out after {waited:?}"
    );
    assert_eq!(upstream.connections(), 2, "the same connection timed out");

    // And the gateway goes on serving.
    assert_eq!(get(&gateway, "/delay/30").await, StatusCode::OK);
}

#[tokio::test]
async fn a_route_can_shorten_the_connect_timeout() {
    // A listener whose accept queue is full and never drained: further SYNs are dropped, so a
    // connection attempt hangs rather than being refused.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    let upstream = format!(
        "  main: {{ connect_timeout: 30s, passive_health: {{ failures: 0 }}, targets: [{{ url: \"http://{addr}\" }}] }}\n"
    );
    let routes =
        "  - { name: hasty, match: { prefix: / }, upstream: main, connect_timeout: 300ms }\n";
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let started = std::time::Instant::now();
    let response = gateway
        .send(
            Request::post("/x")
                .header("host", "x")
                .body(Full::new(Bytes::from_static(b"not retried")))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the upstream's 30 s applied, not the route's 300 ms"
    );
    drop(listener);
}

#[tokio::test]
async fn a_reload_keeps_what_was_learnt_of_target_health() {
    let good = TestUpstream::start("good").await;
    let bad = ScriptedUpstream::start(vec![Step::Reset]).await;
    let upstream = format!(
        "  main: {{ passive_health: {{ failures: 1, ejection: 1m }}, targets: [{}] }}\n",
        targets(&[(bad.url(), 1), (good.url(), 1)])
    );
    let gateway = TestGateway::start(&one_route(&upstream)).await;
    // The first request meets the bad target, which is ejected; its retry succeeds.
    assert_eq!(get(&gateway, "/x").await, StatusCode::OK);
    assert_eq!(bad.requests(), 1);

    gateway.gateway().reload().await.unwrap();
    for _ in 0..10 {
        assert_eq!(get(&gateway, "/x").await, StatusCode::OK);
    }
    assert_eq!(bad.requests(), 1, "the reload forgot the ejection");
}
