//! The foundation, end to end: routing, per-route chains of real Wasm plugins, the upstream
//! call and the gateway's own errors, over real sockets.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use wasmgate_tests::{TestGateway, TestUpstream, pattern, send_h2};

const HEAD: &str = r#"
version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  header-rewrite: { source: "{plugins}/header_rewrite.wasm" }
  probe: { source: "{plugins}/probe_plugin.wasm" }
  body-probe: { source: "{plugins}/probe_plugin.wasm", body: true }
  contract-020: { source: "{plugins}/contract_0_2_0_plugin.wasm" }
  frugal-probe: { source: "{plugins}/probe_plugin.wasm", host_calls: 4 }
  pooled-probe: { source: "{plugins}/probe_plugin.wasm", host_calls: 4, isolation: pooled }
"#;

fn manifest(upstream: &TestUpstream, routes: &str) -> String {
    format!(
        "{HEAD}upstreams:\n  main: {{ targets: [{{ url: \"{}\" }}], timeout: 300ms }}\nroutes:\n{routes}",
        upstream.url()
    )
}

/// A route whose request phase tags the request with the route's name.
fn tagged_route(name: &str, matcher: &str) -> String {
    format!(
        "  - name: {name}\n    match: {matcher}\n    upstream: main\n    plugins:\n      - name: header-rewrite\n        config: {{ request: {{ set: {{ x-route: {name} }} }} }}\n"
    )
}

#[tokio::test]
async fn routes_by_host_path_parameters_and_method_with_documented_precedence() {
    let upstream = TestUpstream::start("main").await;
    let routes = [
        tagged_route("any-host", "{ prefix: / }"),
        tagged_route("wildcard-host", "{ host: \"*.example.com\", prefix: / }"),
        tagged_route("exact-host", "{ host: api.example.com, prefix: /v1 }"),
        tagged_route("user-by-id", "{ path: \"/users/{id}\" }"),
        tagged_route("user-me", "{ path: /users/me }"),
        tagged_route("user-files", "{ path: \"/users/{id}/{*rest}\" }"),
        tagged_route("items-any", "{ path: /items }"),
        tagged_route("items-post", "{ path: /items, methods: [POST] }"),
        tagged_route("delete-only", "{ path: /gone, methods: [DELETE] }"),
    ]
    .concat();
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;

    let cases = [
        ("GET", "api.example.com", "/v1/orders", "exact-host"),
        ("GET", "API.example.com:8443", "/v1", "exact-host"),
        // The exact host has no route for /v2: the wildcard group answers.
        ("GET", "api.example.com", "/v2", "wildcard-host"),
        ("GET", "www.example.com", "/v1/orders", "wildcard-host"),
        ("GET", "other.test", "/v1/orders", "any-host"),
        // Literal over parameter over catch-all.
        ("GET", "other.test", "/users/me", "user-me"),
        ("GET", "other.test", "/users/42", "user-by-id"),
        (
            "GET",
            "other.test",
            "/users/42/avatars/big.png",
            "user-files",
        ),
        // A route listing the method comes before one taking any method.
        ("POST", "other.test", "/items", "items-post"),
        ("GET", "other.test", "/items", "items-any"),
        // The most specific route does not take GET: a less specific one does.
        ("GET", "other.test", "/gone", "any-host"),
        ("DELETE", "other.test", "/gone", "delete-only"),
    ];
    for (method, host, path, expected) in cases {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .body(Full::default())
            .unwrap();
        let response = gateway.send(request).await;
        assert_eq!(response.status, StatusCode::OK, "{method} {host}{path}");
        let seen = upstream.last();
        assert_eq!(seen.headers["x-route"], expected, "{method} {host}{path}");
        assert_eq!(seen.uri, path, "the path is forwarded as routed");
    }
}

#[tokio::test]
async fn a_path_whose_routes_take_other_methods_is_405() {
    let upstream = TestUpstream::start("main").await;
    let routes = tagged_route("delete-only", "{ path: /gone, methods: [DELETE] }");
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    let response = gateway.get("x.test", "/gone").await;
    assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.text(), "method not allowed");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn no_route_is_404() {
    let upstream = TestUpstream::start("main").await;
    let routes = tagged_route("only", "{ host: api.example.com, path: /only }");
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    let response = gateway.get("api.example.com", "/elsewhere").await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert_eq!(response.text(), "no route");
    let response = gateway.get("other.test", "/only").await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn plugins_edit_the_request_the_upstream_sees_and_the_response_the_client_sees() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: rewrite
    match: { prefix: / }
    upstream: main
    plugins:
      - name: header-rewrite
        config:
          request:
            set: { x-gateway: wasmgate }
            add: { x-added: one }
            remove: [x-secret]
          response:
            set: { x-served-by: wasmgate }
            remove: [x-upstream]
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let response = gateway
        .send(
            Request::get("/anything?x=1")
                .header("x-secret", "hunter2")
                .header("x-added", "zero")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-served-by"), "wasmgate");
    assert_eq!(
        response.header("x-upstream"),
        "",
        "removed in the response phase"
    );

    let seen = upstream.last();
    assert_eq!(seen.uri, "/anything?x=1");
    assert_eq!(seen.headers["x-gateway"], "wasmgate");
    assert!(!seen.headers.contains_key("x-secret"));
    let added: Vec<_> = seen.headers.get_all("x-added").iter().collect();
    assert_eq!(added, ["zero", "one"]);
}

#[tokio::test]
async fn chain_order_is_manifest_order_and_reversed_for_responses() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: chained
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: probe, config: { tag: a } }
      - { name: probe, config: { tag: b } }
      - { name: probe, config: { tag: c } }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let response = gateway.get("x.test", "/").await;
    assert_eq!(response.status, StatusCode::OK);
    // Each use of the same plugin got its own config, and ran in order.
    assert_eq!(upstream.last().headers["x-chain"], "a,b,c");
    assert_eq!(response.header("x-chain"), "c,b,a");
}

#[tokio::test]
async fn a_short_circuit_reaches_the_client_and_the_upstream_sees_nothing() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: guarded
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: probe, config: { tag: logger } }
      - { name: probe, config: { tag: guard, respond: { status: 401, body: "no entry" } } }
      - { name: probe, config: { tag: never } }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let response = gateway.get("x.test", "/private").await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    assert_eq!(response.text(), "no entry");
    assert_eq!(response.header("x-responder"), "guard");
    // The plugin before the guard saw the 401 in its response phase; the guard itself and the
    // plugin after it have none.
    assert_eq!(response.header("x-seen-status-logger"), "401");
    assert_eq!(response.header("x-chain"), "logger");
    assert_eq!(response.header("x-seen-status-never"), "");
    assert!(upstream.seen().is_empty(), "the upstream was never called");
}

#[tokio::test]
async fn two_routes_with_different_chains_behave_differently() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: open
    match: { prefix: /open }
    upstream: main
    plugins:
      - { name: probe, config: { tag: open-tag } }
  - name: closed
    match: { prefix: /closed }
    upstream: main
    plugins:
      - { name: probe, config: { tag: closed-tag, respond: { status: 403 } } }
  - name: bare
    match: { prefix: /bare }
    upstream: main
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let open = gateway.get("x.test", "/open/x").await;
    assert_eq!(open.status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-chain"], "open-tag");
    let closed = gateway.get("x.test", "/closed/x").await;
    assert_eq!(closed.status, StatusCode::FORBIDDEN);
    let bare = gateway.get("x.test", "/bare").await;
    assert_eq!(bare.status, StatusCode::OK);
    assert!(!upstream.last().headers.contains_key("x-chain"));
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn properties_are_shared_along_the_chain_and_not_across_requests() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: auth-then-log
    match: { prefix: /with }
    upstream: main
    plugins:
      - { name: probe, config: { tag: auth, set_property: { subject: alice } } }
      - { name: probe, config: { tag: log, property_to_header: { subject: x-subject } } }
  - name: log-only
    match: { prefix: /without }
    upstream: main
    plugins:
      - { name: probe, config: { tag: log, property_to_header: { subject: x-subject } } }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    gateway.get("x.test", "/with").await;
    assert_eq!(upstream.last().headers["x-subject"], "alice");
    gateway.get("x.test", "/without").await;
    assert_eq!(upstream.last().headers["x-subject"], "<unset>");
}

#[tokio::test]
async fn properties_and_the_requests_own_fields_read_in_one_call() {
    let upstream = TestUpstream::start("main").await;
    let keys = [
        "subject",
        "wasmgate.method",
        "wasmgate.path",
        "wasmgate.query",
        "wasmgate.route",
        "wasmgate.client_addr",
        "wasmgate.request_id",
        "never-set",
    ];
    let too_many: Vec<String> = (0..65).map(|i| format!("key{i}")).collect();
    let routes = format!(
        r#"
  - name: fields
    match: {{ prefix: /fields }}
    upstream: main
    plugins:
      - {{ name: probe, config: {{ tag: auth, set_property: {{ subject: alice }} }} }}
      - {{ name: probe, config: {{ tag: log, read_many: [{}] }} }}
  - name: greedy
    match: {{ prefix: /greedy }}
    upstream: main
    plugins:
      - {{ name: probe, config: {{ tag: greedy, read_many: [{}] }} }}
"#,
        keys.join(", "),
        too_many.join(", ")
    );
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    // A prepared key list (contract 0.2.2) reads what `get-many` reads, for this request: the
    // list is kept by the instance, which serves the requests after the first.
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let response = gateway.get("x.test", "/fields/again").await;
        assert_eq!(response.status, StatusCode::OK);
        let seen = upstream.last();
        let prepared = seen.headers["x-prepared"].to_str().unwrap();
        assert_eq!(prepared, seen.headers["x-many"].to_str().unwrap());
        let request_id = seen.headers["x-request-id"].to_str().unwrap();
        assert!(prepared.contains(request_id), "{prepared}");
        request_ids.push(request_id.to_string());
    }
    request_ids.dedup();
    assert_eq!(request_ids.len(), 3);
    let response = gateway.get("x.test", "/fields/x?y=1").await;
    assert_eq!(response.status, StatusCode::OK);
    let seen = upstream.last();
    let many = seen.headers["x-many"].to_str().unwrap().to_string();
    // One call for all the keys reads what one call per key reads.
    assert_eq!(many, seen.headers["x-each"].to_str().unwrap());
    let values: Vec<&str> = many.split('|').collect();
    let request_id = seen.headers["x-request-id"].to_str().unwrap();
    assert_eq!(values[..5], ["alice", "GET", "/fields/x", "y=1", "fields"]);
    assert!(values[5].starts_with("127.0.0.1:"), "{many}");
    assert_eq!(values[6], request_id);
    assert_eq!(values[7], "<unset>");

    // Past the cap of 64 keys (here at `prepare`, the first read) the plugin is stopped, and its
    // request goes no further.
    let before = upstream.seen().len();
    let refused = gateway.get("x.test", "/greedy").await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(upstream.seen().len(), before);
}

#[tokio::test]
async fn values_a_plugin_names_are_handed_in_with_the_call_and_read_as_the_gateway_would() {
    let upstream = TestUpstream::start("main").await;
    // The same reads and edits (`probe`'s `echo`), named in `reads` or not: with the values
    // handed in, the request phase makes only its three edits as host calls, so a cap of four
    // holds; reading through host calls under that cap stops the plugin.
    let echo = |declare: bool| {
        format!(
            "echo: {{ headers: [x-one, X-Two, x-three], properties: [subject, wasmgate.path], \
             response_headers: [x-upstream, x-none], declare: {declare} }}"
        )
    };
    let routes = format!(
        r#"
  - name: named
    match: {{ prefix: /named }}
    upstream: main
    plugins:
      - {{ name: probe, config: {{ tag: auth, set_property: {{ subject: alice }} }} }}
      - {{ name: frugal-probe, config: {{ tag: e, {named} }} }}
  - name: named-pooled
    match: {{ prefix: /pooled }}
    upstream: main
    plugins:
      - {{ name: probe, config: {{ tag: auth, set_property: {{ subject: alice }} }} }}
      - {{ name: pooled-probe, config: {{ tag: e, {named} }} }}
  - name: unnamed
    match: {{ prefix: /unnamed }}
    upstream: main
    plugins:
      - {{ name: probe, config: {{ tag: auth, set_property: {{ subject: alice }} }} }}
      - {{ name: probe, config: {{ tag: e, {unnamed} }} }}
  - name: unnamed-capped
    match: {{ prefix: /capped }}
    upstream: main
    plugins:
      - {{ name: frugal-probe, config: {{ tag: e, {unnamed} }} }}
"#,
        named = echo(true),
        unnamed = echo(false),
    );
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    let request = |path: &str| {
        Request::get(path)
            .header("host", "x.test")
            .header("x-one", "a")
            .header("x-two", "b")
            .header("x-two", "c")
            .body(Full::default())
            .unwrap()
    };
    let expected_request = "x-one=a;X-Two=b,c;x-three=;subject=alice;wasmgate.path=/P;\
                            echo=<unset>;GET;q=1;then;x-one=edited;X-Two=b,c;x-three=;\
                            subject=alice;wasmgate.path=/P;echo=set";
    let check = async |path: &str, prefix: &str| {
        let response = gateway.send(request(&format!("{path}?q=1"))).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
        let expected = expected_request.replace("/P", path);
        assert_eq!(
            upstream.last().headers["x-echo"],
            expected.as_str(),
            "{prefix}"
        );
        // The response phase: status and response headers, one edit.
        assert_eq!(
            response.header("x-echo"),
            "200;x-upstream=main;x-none=",
            "{prefix}"
        );
        // The edit reached the upstream too.
        assert_eq!(upstream.last().headers["x-one"], "edited");
    };
    // Configured per request until the image is made, then from the image: both ways.
    check("/named", "named, configured").await;
    assert_eq!(gateway.preinitialized().await, 6);
    for _ in 0..2 {
        check("/named", "named, from the image").await;
        check("/pooled", "named, pooled").await;
        check("/unnamed", "unnamed").await;
    }

    // Without the values handed in, the same reads under the same cap stop the plugin.
    let before = upstream.seen().len();
    let refused = gateway.send(request("/capped?q=1")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(upstream.seen().len(), before);
}

#[tokio::test]
async fn a_plugin_built_against_contract_0_2_0_still_runs() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: old
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: probe, config: { tag: auth, set_property: { subject: alice } } }
      - { name: contract-020 }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let response = gateway.get("x.test", "/old").await;
    assert_eq!(response.status, StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-contract"], "0.2.0");
    assert_eq!(seen.headers["x-subject"], "alice");
}

#[tokio::test]
async fn a_body_reading_plugin_can_replace_the_body() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: shout
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: body-probe, config: { tag: shout, uppercase_body: true } }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let response = gateway
        .send(
            Request::post("/echo")
                .body(Full::new(Bytes::from_static(b"hello, body")))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "HELLO, BODY");
}

#[tokio::test]
async fn a_buffered_body_past_the_cap_is_413_before_the_upstream() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: shout
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: body-probe, config: { tag: shout, uppercase_body: true } }
"#;
    let text = manifest(&upstream, routes).replacen(
        "plugins:\n",
        "limits: { max_body: 1KiB }\nplugins:\n",
        1,
    );
    let gateway = TestGateway::start(&text).await;
    let response = gateway
        .send(
            Request::post("/echo")
                .body(Full::new(Bytes::from(vec![b'a'; 4096])))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn several_mebibytes_stream_through_intact_both_ways() {
    let upstream = TestUpstream::start("main").await;
    // A plugin that does not read bodies: they must stream, and no size cap applies.
    let routes = r#"
  - name: big
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: probe, config: { tag: p } }
"#;
    let text = manifest(&upstream, routes).replacen(
        "plugins:\n",
        "limits: { max_body: 1KiB }\nplugins:\n",
        1,
    );
    let gateway = TestGateway::start(&text).await;

    let upload = pattern(6 << 20);
    let response = gateway
        .send(
            Request::post("/echo")
                .body(Full::new(Bytes::from(upload.clone())))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(upstream.last().body_len, upload.len());
    assert!(
        response.body == upload,
        "the echoed upload came back intact"
    );

    let download = gateway.get("x.test", &format!("/bytes/{}", 5 << 20)).await;
    assert_eq!(download.status, StatusCode::OK);
    assert!(
        download.body == pattern(5 << 20),
        "the download arrived intact"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_a_slow_one_504() {
    let upstream = TestUpstream::start("main").await;
    // Take a free port, then free it again: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = r#"
  - name: slow
    match: { prefix: /slow }
    upstream: main
    plugins:
      - { name: probe, config: { tag: watcher } }
  - name: dead
    match: { prefix: /dead }
    upstream: dead
    plugins:
      - { name: probe, config: { tag: watcher } }
"#;
    let text = manifest(&upstream, routes).replace(
        "routes:\n",
        &format!("  dead: {{ targets: [{{ url: \"http://{closed}\" }}] }}\nroutes:\n"),
    );
    let gateway = TestGateway::start(&text).await;

    let dead = gateway.get("x.test", "/dead").await;
    assert_eq!(dead.status, StatusCode::BAD_GATEWAY);
    assert_eq!(dead.text(), "upstream unavailable");
    // Gateway errors pass through the response phase of the chain.
    assert_eq!(dead.header("x-seen-status-watcher"), "502");

    let started = std::time::Instant::now();
    let slow = gateway.get("x.test", "/slow").await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(slow.text(), "upstream timed out");
    assert_eq!(slow.header("x-seen-status-watcher"), "504");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the 300ms timeout applied"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = TestUpstream::start("main").await;
    let routes = tagged_route("h2", "{ prefix: / }");
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    let response = send_h2(
        gateway.addr,
        Request::get("/over-h2").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-upstream"), "main");
    let seen = upstream.last();
    assert_eq!(seen.headers["x-route"], "h2");
    assert_eq!(seen.uri, "/over-h2");
}

#[tokio::test]
async fn prefix_strip_changes_only_the_forwarded_path() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: api
    match: { prefix: /api }
    strip_prefix: /api
    upstream: main
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    gateway.get("x.test", "/api/users/7?full=1").await;
    assert_eq!(upstream.last().uri, "/users/7?full=1");
    gateway.get("x.test", "/api").await;
    assert_eq!(upstream.last().uri, "/");
}

#[tokio::test]
async fn bodies_stream_both_ways_without_being_buffered() {
    let upstream = TestUpstream::start("main").await;
    let routes = r#"
  - name: stream
    match: { prefix: / }
    upstream: main
    plugins:
      - { name: probe, config: { tag: p } }
"#;
    let gateway = TestGateway::start(&manifest(&upstream, routes)).await;
    let (mut sender, _connection) = wasmgate_tests::http1_connection(gateway.addr).await;
    let (mut chunks, body) = http_body_util::channel::Channel::<Bytes>::new(1);
    let request = Request::post("/stream-echo")
        .header("host", "x.test")
        .body(body)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("the response head arrives before the request body ends")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut echoed = response.into_body();
    // Each chunk makes the whole round trip before the next one is sent: a gateway that
    // buffered either body would never return the first.
    for chunk in ["first chunk", "second chunk", "third chunk"] {
        chunks.send_data(Bytes::from(chunk)).await.unwrap();
        let mut received = Vec::new();
        while received.len() < chunk.len() {
            let frame = tokio::time::timeout(Duration::from_secs(5), echoed.frame())
                .await
                .expect("the chunk came back while the request was still open")
                .expect("the response is still open")
                .unwrap();
            received.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(received, chunk.as_bytes());
    }
    drop(chunks);
    assert!(echoed.frame().await.is_none_or(|f| f.is_ok()));
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = TestUpstream::start("main").await;
    let routes = tagged_route("pooled", "{ prefix: / }");
    let gateway = TestGateway::start(&manifest(&upstream, &routes)).await;
    for i in 0..5 {
        let response = gateway.get("x.test", &format!("/n/{i}")).await;
        assert_eq!(response.status, StatusCode::OK);
    }
    assert_eq!(upstream.seen().len(), 5);
    assert_eq!(
        upstream.connections(),
        1,
        "one pooled connection served every request"
    );
}
