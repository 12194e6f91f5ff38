//! The bundled policy plugins through the gateway, with their compiled wasm: api-key,
//! access-log, cors and header-rewrite's placeholders.

use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use wasmgate_tests::{CliGateway, ScriptedUpstream, Step, TestGateway, TestUpstream};

/// `printf %s k-alice | sha256sum`
const ALICE_KEY_SHA256: &str = "8fab151ebfe45da0ce0c2a951f8bba063f8668389b08a793acf59f301a6dbd57";

fn sha256_hex(text: &str) -> String {
    // The tests compute the hash the operator would, rather than trusting the constant.
    let output = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(output.stdout).unwrap()[..64].to_string()
}

fn manifest(upstream: &TestUpstream) -> String {
    let alice = sha256_hex("k-alice");
    format!(
        r#"version: 1
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
plugins:
  access-log: {{ source: "{{plugins}}/access_log.wasm" }}
  api-key: {{ source: "{{plugins}}/api_key.wasm" }}
  cors: {{ source: "{{plugins}}/cors.wasm" }}
  header-rewrite: {{ source: "{{plugins}}/header_rewrite.wasm" }}
upstreams:
  main: {{ targets: [{{ url: "{upstream}" }}] }}
routes:
  - name: keyed
    match: {{ prefix: /keyed }}
    upstream: main
    plugins:
      - name: access-log
        config: {{ headers: [user-agent, authorization, x-api-key] }}
      - name: api-key
        config:
          keys: [{{ consumer: alice, sha256: "{alice}" }}]
          forward_consumer: x-consumer
      - name: header-rewrite
        config:
          request:
            set: {{ x-client: "{{client_addr}}", x-rid: "{{request_id}}", x-who: "{{property.consumer}}@{{route}}" }}
            rename: {{ x-legacy: x-modern }}
          response:
            set: {{ x-echo-ua: "{{header.user-agent}}" }}
            rename: {{ x-upstream: x-origin-server }}
  - name: keyed-query
    match: {{ prefix: /q }}
    upstream: main
    plugins:
      - name: api-key
        config: {{ keys: [{{ consumer: alice, sha256: "{alice}" }}], query: api_key }}
  - name: streamed
    match: {{ path: /stream-echo }}
    upstream: main
    plugins: [{{ name: access-log }}]
  - name: big
    match: {{ prefix: /bytes }}
    upstream: main
    plugins: [{{ name: access-log }}]
  - name: web
    match: {{ prefix: /web }}
    upstream: main
    plugins:
      - name: cors
        config:
          allow_origins: ["https://app.example.com", "https://*.example.org"]
          allow_methods: [GET, PUT]
          allow_headers: [content-type, x-token]
          expose_headers: [x-request-id]
          allow_credentials: true
          max_age: 600
"#,
        upstream = upstream.url()
    )
}

#[tokio::test]
async fn api_key_admits_known_keys_and_records_the_consumer() {
    assert_eq!(
        sha256_hex("k-alice"),
        ALICE_KEY_SHA256,
        "the documented hash"
    );
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    let request = Request::get("/keyed/orders")
        .header("x-api-key", "k-alice")
        .header("x-consumer", "mallory")
        .header("x-legacy", "v1")
        .header("user-agent", "tests/1")
        .body(Full::default())
        .unwrap();
    let response = gateway.send(request).await;
    assert_eq!(response.status, StatusCode::OK);
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("x-api-key"),
        "the key stays at the gateway"
    );
    let consumer: Vec<_> = seen.headers.get_all("x-consumer").iter().collect();
    assert_eq!(consumer, ["alice"], "the client's claim was replaced");
    // header-rewrite placeholders, read after api-key ran.
    assert_eq!(seen.headers["x-who"], "alice@keyed");
    assert!(
        seen.headers["x-client"]
            .to_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(seen.headers["x-rid"], response.header("x-request-id"));
    assert_eq!(seen.headers["x-modern"], "v1");
    assert!(!seen.headers.contains_key("x-legacy"));
    assert_eq!(response.header("x-echo-ua"), "tests/1");
    assert_eq!(response.header("x-origin-server"), "main");
    assert_eq!(response.header("x-upstream"), "");

    for key in [None, Some("k-bob"), Some("")] {
        let mut request = Request::get("/keyed/orders");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let response = gateway.send(request.body(Full::default()).unwrap()).await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(response.text(), "{\"error\":\"unauthorized\"}\n");
    }
    let two_keys = Request::get("/keyed/orders")
        .header("x-api-key", "k-alice")
        .header("x-api-key", "k-alice")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        gateway.send(two_keys).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(upstream.seen().len(), 1);

    let by_query = gateway
        .send(
            Request::get("/q?api_key=k-alice")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(by_query.status, StatusCode::OK);
    let wrong = gateway
        .send(
            Request::get("/q?api_key=nope")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn plain_api_keys_are_refused_at_load() {
    let upstream = TestUpstream::start("main").await;
    let text = manifest(&upstream).replacen(
        &format!(
            "keys: [{{ consumer: alice, sha256: \"{}\" }}]\n          forward_consumer",
            sha256_hex("k-alice")
        ),
        "keys: [{ consumer: alice, key: k-alice }]\n          forward_consumer",
        1,
    );
    let err = load_error(&text).await;
    assert!(
        err.contains(
            "route `keyed`: plugin `api-key`: invalid config: keys[0]: a plain `key` is refused"
        ),
        "{err}"
    );
}

/// A plugin that says it decides who may pass but asks for no request phase would let every
/// request through unchecked (the gateway skips phases a plugin does not ask for): refused at
/// load, naming the route and the plugin.
#[tokio::test]
async fn an_auth_plugin_without_a_request_phase_is_refused_at_load() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  hollow: { source: \"{plugins}/hollow_auth_plugin.wasm\" }\n",
        "  - { name: guarded, match: { prefix: / }, upstream: main, plugins: [{ name: hollow }] }\n",
    );
    let err = load_error(&text).await;
    assert!(
        err.contains("route `guarded`: plugin `hollow`:")
            && err.contains("asks for no request phase"),
        "{err}"
    );
}

/// A header rewrite with fixed values is made by the gateway in the plugin's place (contract
/// 0.2.4, fixed edits), so a plugin after it in the chain sees its edits, and one before it in the
/// response phase (reverse order) sees them too; one with a placeholder is still called.
#[tokio::test]
async fn fixed_edits_are_made_at_the_plugins_place_in_the_chain() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  fixed: { source: \"{plugins}/header_rewrite.wasm\" }\n  echo: { source: \"{plugins}/header_rewrite.wasm\" }\n",
        "  - { name: ordered, match: { prefix: / }, upstream: main, plugins: [{ name: echo, config: { response: { set: { x-echo: \"{header.x-order}\" } } } }, { name: fixed, config: { request: { remove: [x-drop], set: { x-order: first }, add: { x-list: b } }, response: { set: { x-fixed: made } } } }, { name: echo, config: { request: { set: { x-seen: \"{header.x-order}\" } } } }] }\n",
    );
    let gateway = TestGateway::start(&text).await;
    let request = Request::get("/a")
        .header("x-drop", "gone")
        .header("x-list", "a")
        .header("x-order", "client")
        .body(Full::default())
        .unwrap();
    let response = gateway.send(request).await;
    assert_eq!(response.status, StatusCode::OK);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-drop"), "{:?}", seen.headers);
    assert_eq!(seen.headers["x-order"], "first");
    let list: Vec<_> = seen.headers.get_all("x-list").iter().collect();
    assert_eq!(list, ["a", "b"]);
    // The third plugin ran after the fixed edits of the second.
    assert_eq!(seen.headers["x-seen"], "first");
    assert_eq!(response.header("x-fixed"), "made");
    // The first plugin's response phase reads the request as the chain left it.
    assert_eq!(response.header("x-echo"), "first");
}

/// A chain that is only fixed edits takes the bare path, the edits made on the way: the request's
/// in chain order (one of a forwarding header on the forwarding headers, as the chain would
/// see them), the response's in reverse order on the upstream's head as it came (set replacing
/// every line of a name whatever its case, remove taking them all).
#[tokio::test]
async fn a_chain_of_fixed_edits_only_makes_them_as_the_chain_would() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  first: { source: \"{plugins}/header_rewrite.wasm\" }\n  second: { source: \"{plugins}/header_rewrite.wasm\", isolation: per-request }\n",
        "  - { name: fixed, match: { prefix: / }, upstream: main, plugins: [{ name: first, config: { request: { remove: [x-drop], set: { x-order: first }, add: { x-list: b } }, response: { remove: [x-version], set: { x-upstream: replaced, x-order: first } } } }, { name: second, config: { request: { remove: [x-forwarded-host], set: { x-order: second } }, response: { set: { x-order: second }, add: { x-list: b } } } }] }\n",
    );
    let gateway = TestGateway::start(&text).await;
    // `second` is per request, but no request ever takes an instance of it: no image is made.
    assert_eq!(gateway.preinitialized().await, 0);
    for _ in 0..2 {
        let request = Request::get("/a")
            .header("x-drop", "gone")
            .header("x-list", "a")
            .header("x-order", "client")
            .body(Full::default())
            .unwrap();
        let response = gateway.send(request).await;
        assert_eq!(response.status, StatusCode::OK);
        let seen = upstream.last();
        assert!(!seen.headers.contains_key("x-drop"), "{:?}", seen.headers);
        assert_eq!(seen.headers["x-order"], "second");
        let list: Vec<_> = seen.headers.get_all("x-list").iter().collect();
        assert_eq!(list, ["a", "b"]);
        // Removed by an edit; the other forwarding headers still sent.
        assert!(!seen.headers.contains_key("x-forwarded-host"));
        assert!(
            seen.headers["x-forwarded-for"]
                .to_str()
                .unwrap()
                .starts_with("127.0.0.1")
        );
        assert_eq!(seen.headers["x-forwarded-proto"], "http");
        assert!(seen.headers.contains_key("forwarded"));

        // The response phase runs in reverse: the first plugin's set is the last made.
        assert_eq!(response.header("x-order"), "first");
        assert_eq!(response.header("x-upstream"), "replaced");
        assert_eq!(response.headers.get_all("x-upstream").iter().count(), 1);
        assert!(!response.headers.contains_key("x-version"));
        assert_eq!(response.header("x-list"), "b");
        assert!(!response.header("x-request-id").is_empty());
    }
}

/// In a chain with called phases the upstream's response fields stay as it sent them until a
/// plugin reads or edits them: fixed edits are made on them as they are, a plugin called after
/// sees those edits, and fields nobody touched reach the client unchanged.
#[tokio::test]
async fn response_fields_are_mapped_only_for_the_plugin_that_reads_them() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  rewrite: { source: \"{plugins}/header_rewrite.wasm\" }\n",
        "  - { name: renamed, match: { prefix: /renamed }, upstream: main, plugins: [{ name: rewrite, config: { response: { rename: { x-from-fixed: x-renamed } } } }, { name: rewrite, config: { response: { remove: [x-version], set: { x-from-fixed: made } } } }] }\n  - { name: untouched, match: { prefix: /untouched }, upstream: main, plugins: [{ name: rewrite, config: { request: { set: { x-route: \"{route}\" } } } }] }\n",
    );
    let gateway = TestGateway::start(&text).await;
    for _ in 0..2 {
        let response = gateway.get("localhost", "/renamed").await;
        assert_eq!(response.status, StatusCode::OK);
        // Made on the bytes, then read by the plugin called after it.
        assert_eq!(response.header("x-renamed"), "made");
        assert!(!response.headers.contains_key("x-from-fixed"));
        assert!(!response.headers.contains_key("x-version"));
        assert_eq!(response.header("x-upstream"), "main");
        assert!(!response.header("x-request-id").is_empty());

        let response = gateway.get("localhost", "/untouched").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(upstream.last().headers["x-route"], "untouched");
        assert_eq!(response.header("x-upstream"), "main");
        assert_eq!(response.header("x-version"), "HTTP/1.1");
        assert_eq!(response.headers.get_all("x-upstream").iter().count(), 1);
        assert!(!response.header("x-request-id").is_empty());
    }
}

/// The gateway names the request in every response: an upstream's own `X-Request-Id` is
/// replaced, not sent beside it, whether the head passes through as bytes or is mapped.
#[tokio::test]
async fn the_upstreams_request_id_is_replaced_on_every_kind_of_route() {
    let upstream = ScriptedUpstream::start(vec![Step::Write(
        b"HTTP/1.1 200 OK\r\nX-Request-Id: theirs\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
            .to_vec(),
    )])
    .await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  rewrite: { source: \"{plugins}/header_rewrite.wasm\" }\n",
        "  - { name: bare, match: { prefix: /bare }, upstream: main }\n  - { name: fixed, match: { prefix: /fixed }, upstream: main, plugins: [{ name: rewrite, config: { response: { set: { x-fixed: \"1\" } } } }] }\n  - { name: called, match: { prefix: /called }, upstream: main, plugins: [{ name: rewrite, config: { request: { set: { x-route: \"{route}\" } } } }] }\n  - { name: mapped, match: { prefix: /mapped }, upstream: main, plugins: [{ name: rewrite, config: { response: { set: { x-route: \"{route}\" } } } }] }\n",
    );
    let gateway = TestGateway::start(&text).await;
    for path in ["/bare", "/fixed", "/called", "/mapped"] {
        let response = gateway.get("localhost", path).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
        let ids: Vec<_> = response.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids.len(), 1, "{path}: {ids:?}");
        assert_ne!(ids[0], "theirs", "{path}");
        assert_eq!(response.header("x-kept"), "1", "{path}");
        assert_eq!(response.text(), "ok", "{path}");
    }
}

/// A chain of fixed edits that could take a message past the plugins' header cap goes the
/// chain's way, with the plugin's failure policy: fail-closed answers 500, fail-open passes
/// the message on without that plugin's edits. One that cannot is made as usual.
#[tokio::test]
async fn fixed_edits_past_the_header_cap_follow_the_failure_policy() {
    let upstream = TestUpstream::start("main").await;
    let many = "{ x-one: \"1\", x-two: \"2\", x-three: \"3\", x-four: \"4\", x-five: \"5\", x-six: \"6\" }";
    let route = |name: &str, phase: &str, policy: &str| {
        format!(
            "  - {{ name: {name}, match: {{ prefix: /{name} }}, upstream: main, plugins: [{{ name: rewrite, config: {{ {phase}: {{ add: {many} }} }}, on_failure: {policy} }}] }}\n"
        )
    };
    let routes = [
        route("request-closed", "request", "fail-closed"),
        route("request-open", "request", "fail-open"),
        route("response-closed", "response", "fail-closed"),
        route("response-open", "response", "fail-open"),
        "  - { name: few, match: { prefix: /few }, upstream: main, plugins: [{ name: rewrite, config: { request: { add: { x-one: \"1\" } }, response: { add: { x-one: \"1\" } } } }] }\n".into(),
    ];
    let text = small_manifest(
        &upstream.url(),
        "limits: { plugin_headers: 9 }\n",
        "  rewrite: { source: \"{plugins}/header_rewrite.wasm\" }\n",
        &routes.concat(),
    );
    let gateway = TestGateway::start(&text).await;
    let get = |path: &'static str| {
        let request = Request::get(path)
            .header("x-a", "1")
            .header("x-b", "1")
            .header("x-c", "1")
            .body(Full::default())
            .unwrap();
        gateway.send(request)
    };

    // host, x-request-id, three client headers and four forwarding ones: 9 + 6 > 9.
    let refused = get("/request-closed").await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(upstream.served(), 0);
    let passed = get("/request-open").await;
    assert_eq!(passed.status, StatusCode::OK);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-one"), "{:?}", seen.headers);
    assert_eq!(seen.headers["x-a"], "1");

    // x-upstream, x-version, content-length and date: 4 + 6 > 9.
    let refused = get("/response-closed").await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        refused.text().starts_with("internal error"),
        "{}",
        refused.text()
    );
    let passed = get("/response-open").await;
    assert_eq!(passed.status, StatusCode::OK);
    assert!(!passed.headers.contains_key("x-one"));
    assert_eq!(passed.header("x-upstream"), "main");
    assert_eq!(
        gateway.failures("rewrite", wasmgate::runtime::FailureKind::Cap),
        4
    );

    let few = gateway
        .send(Request::get("/few").body(Full::default()).unwrap())
        .await;
    assert_eq!(few.status, StatusCode::OK);
    assert_eq!(few.header("x-one"), "1");
    assert_eq!(upstream.last().headers["x-one"], "1");
}

/// The plugins of the forwarding tests.
const PROBE_AND_REWRITE: &str = "  probe: { source: \"{plugins}/probe_plugin.wasm\" }\n  rewrite: { source: \"{plugins}/header_rewrite.wasm\" }\n";

/// A GET of `path` for the host `x.test`, with no other header.
fn x_test_get(path: &str) -> Request<Full<bytes::Bytes>> {
    Request::get(path)
        .header("host", "x.test")
        .body(Full::default())
        .unwrap()
}

/// The forwarding headers are held aside until a plugin reads or edits one (or reads all
/// headers): a plugin reading them, by a host call or handed in with the call, sees what the
/// upstream gets, and its edits of them are made; a chain that never reads them still sends
/// them, one field each.
#[tokio::test]
async fn plugins_read_and_edit_the_forwarding_headers_the_upstream_gets() {
    let upstream = TestUpstream::start("main").await;
    let echo = |path: &str, declare: bool| {
        format!(
            "  - {{ name: {path}, match: {{ prefix: /{path} }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: e, echo: {{ headers: [x-forwarded-proto, forwarded, x-forwarded-for], declare: {declare} }} }} }}] }}\n"
        )
    };
    let routes = [
        echo("declared", true),
        echo("called", false),
        "  - { name: unread, match: { prefix: /unread }, upstream: main, plugins: [{ name: probe, config: { tag: a } }] }\n".into(),
        "  - { name: all, match: { prefix: /all }, upstream: main, plugins: [{ name: probe, config: { tag: e, echo: { headers: [x-one], declare: false, all_headers: true } } }] }\n".into(),
        "  - { name: placeholder, match: { prefix: /placeholder }, upstream: main, plugins: [{ name: rewrite, config: { request: { set: { x-client: \"{header.x-forwarded-for}|{header.forwarded}\" } } } }] }\n".into(),
        "  - { name: removed, match: { prefix: /removed }, upstream: main, plugins: [{ name: probe, config: { tag: a } }, { name: rewrite, config: { request: { remove: [x-forwarded-host] } } }] }\n".into(),
    ];
    let text = small_manifest(&upstream.url(), "", PROBE_AND_REWRITE, &routes.concat());
    let gateway = TestGateway::start(&text).await;
    let get = |path: &'static str| gateway.send(x_test_get(path));
    let element = "for=127.0.0.1;host=x.test;proto=http";
    // Each forwarding header the upstream got, one field each; `None` for one it did not get.
    let forwarding = |headers: &http::HeaderMap| {
        [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ]
        .map(|name| {
            let values: Vec<_> = headers.get_all(name).iter().collect();
            assert!(values.len() <= 1, "{name}: {values:?}");
            values.first().map(|v| v.to_str().unwrap().to_owned())
        })
    };
    let sent = |proto: &str| {
        [
            Some("127.0.0.1".to_owned()),
            Some(proto.to_owned()),
            Some("x.test".to_owned()),
            Some(element.to_owned()),
        ]
    };

    for path in ["/declared", "/called"] {
        assert_eq!(get(path).await.status, StatusCode::OK, "{path}");
        let seen = upstream.last().headers;
        let read = format!("forwarded={element};x-forwarded-for=127.0.0.1");
        assert_eq!(
            seen["x-echo"],
            format!(
                "x-forwarded-proto=http;{read};echo=<unset>;GET;<none>;then;\
                 x-forwarded-proto=edited;{read};echo=set"
            )
            .as_str(),
            "{path}"
        );
        assert_eq!(forwarding(&seen), sent("edited"), "{path}");
    }

    assert_eq!(get("/unread").await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-chain"], "a");
    assert_eq!(forwarding(&seen), sent("http"));

    // Every header read at once: the forwarding ones among them.
    assert_eq!(get("/all").await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    let all = "all=forwarded,host,x-forwarded-for,x-forwarded-host,x-forwarded-proto,x-request-id";
    assert!(
        seen["x-echo"]
            .to_str()
            .unwrap()
            .starts_with(&format!("x-one=;{all};echo=<unset>")),
        "{:?}",
        seen["x-echo"]
    );
    assert_eq!(forwarding(&seen), sent("http"));

    assert_eq!(get("/placeholder").await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-client"], format!("127.0.0.1|{element}").as_str());
    assert_eq!(forwarding(&seen), sent("http"));

    // A fixed edit after a called plugin: made in the chain, on the forwarding headers too.
    assert_eq!(get("/removed").await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    let [xff, xfp, _, rfc] = sent("http");
    assert_eq!(forwarding(&seen), [xff, xfp, None, rfc]);
}

/// The forwarding headers held aside count against a plugin's header cap as if they were in the
/// request's map, and a fail-open plugin that edited one before it failed leaves them as they
/// were.
#[tokio::test]
async fn forwarding_headers_held_aside_count_against_the_header_cap() {
    let upstream = TestUpstream::start("main").await;
    let routes = [
        // Sets `x-chain`: one header more.
        "  - { name: called, match: { prefix: /called }, upstream: main, plugins: [{ name: probe, config: { tag: a } }] }\n",
        "  - { name: fixed, match: { prefix: /fixed }, upstream: main, plugins: [{ name: rewrite, config: { request: { add: { x-one: \"1\" } } } }] }\n",
        // Replaces a forwarding header's value: no header more.
        "  - { name: replaced, match: { prefix: /replaced }, upstream: main, plugins: [{ name: rewrite, config: { request: { set: { x-forwarded-proto: edited } } } }] }\n",
        // Edits `x-forwarded-proto`, then passes the cap with `x-echo`.
        "  - { name: restored, match: { prefix: /restored }, upstream: main, plugins: [{ name: probe, config: { tag: e, echo: { headers: [x-forwarded-proto], declare: false } }, on_failure: fail-open }] }\n",
    ];
    let text = small_manifest(
        &upstream.url(),
        "limits: { plugin_headers: 6 }\n",
        PROBE_AND_REWRITE,
        &routes.concat(),
    );
    let gateway = TestGateway::start(&text).await;
    let get = |path: &'static str| gateway.send(x_test_get(path));

    // host, x-request-id and the four forwarding headers: 6, the cap; one more passes it.
    for path in ["/called", "/fixed"] {
        let refused = get(path).await;
        assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
    }
    assert_eq!(upstream.served(), 0);
    assert_eq!(
        gateway.failures("probe", wasmgate::runtime::FailureKind::Cap),
        1
    );
    assert_eq!(
        gateway.failures("rewrite", wasmgate::runtime::FailureKind::Cap),
        1
    );

    assert_eq!(get("/replaced").await.status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "edited");

    assert_eq!(get("/restored").await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert!(!seen.contains_key("x-echo"), "{seen:?}");
    for (name, value) in [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "x.test"),
        ("forwarded", "for=127.0.0.1;host=x.test;proto=http"),
    ] {
        assert_eq!(seen.get_all(name).iter().count(), 1, "{name}: {seen:?}");
        assert_eq!(seen[name], value, "{name}");
    }
    assert_eq!(
        gateway.failures("probe", wasmgate::runtime::FailureKind::Cap),
        2
    );
}

/// A fixed edit is checked when the manifest loads, as the imports check an edit: one the
/// gateway would refuse fails the load, naming the route and the plugin, rather than every
/// request.
#[tokio::test]
async fn a_fixed_edit_the_gateway_refuses_fails_the_load() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  rewrite: { source: \"{plugins}/header_rewrite.wasm\" }\n",
        "  - { name: framed, match: { prefix: / }, upstream: main, plugins: [{ name: rewrite, config: { request: { set: { content-length: \"5\" } } } }] }\n",
    );
    let err = load_error(&text).await;
    assert!(
        err.contains("route `framed`: plugin `rewrite`:")
            && err.contains("a fixed request edit: `content-length` is managed by the gateway"),
        "{err}"
    );
}

/// An auth plugin whose request phase claims to be fixed edits would never be called to decide:
/// refused at load, naming the route and the plugin.
#[tokio::test]
async fn an_auth_plugin_with_a_fixed_request_phase_is_refused_at_load() {
    let upstream = TestUpstream::start("main").await;
    let text = small_manifest(
        &upstream.url(),
        "",
        "  deny: { source: \"{plugins}/deny_plugin.wasm\" }\n",
        "  - { name: guarded, match: { prefix: / }, upstream: main, plugins: [{ name: deny, config: { fixed: true } }] }\n",
    );
    let err = load_error(&text).await;
    assert!(
        err.contains("route `guarded`: plugin `deny`:") && err.contains("fixes its request phase"),
        "{err}"
    );
}

/// A manifest with one public listener and one upstream, `main`, at `upstream` (a URL): `extra`
/// top-level lines (limits and the like), then the `plugins` and `routes` entries as given, each
/// line ending in a newline.
fn small_manifest(upstream: &str, extra: &str, plugins: &str, routes: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\n{extra}plugins:\n{plugins}upstreams:\n  main: {{ targets: [{{ url: \"{upstream}\" }}] }}\nroutes:\n{routes}"
    )
}

/// Why the gateway refuses to start with `manifest`; fails the test if it starts.
async fn load_error(manifest: &str) -> String {
    TestGateway::try_start(manifest)
        .await
        .err()
        .expect("refused")
        .to_string()
}

/// The JSON of an access-log line, out of the gateway's log line.
fn access_entry(line: &str) -> Value {
    let start = line.find('{').expect("a JSON object");
    let end = line
        .find("} plugin=")
        .expect("the plugin field after the message")
        + 1;
    serde_json::from_str(&line[start..end]).unwrap_or_else(|err| panic!("{err}: {line}"))
}

#[tokio::test]
async fn access_log_writes_one_redacted_json_line_per_request() {
    let upstream = TestUpstream::start("main").await;
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest(&upstream),
        &[],
    )
    .await;
    let request = Request::get("/keyed/orders?token=s3cret&page=2")
        .header("x-api-key", "k-alice")
        .header("authorization", "Bearer s3cret")
        .header("user-agent", "tests/1")
        .body(Full::default())
        .unwrap();
    let response = gateway.send(request).await;
    assert_eq!(response.status, StatusCode::OK);
    let line = gateway.line_containing("\"route\":\"keyed\"").await;
    assert!(
        !line.contains("s3cret") && !line.contains("k-alice"),
        "secrets never logged: {line}"
    );
    let entry = access_entry(&line);
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/keyed/orders");
    assert_eq!(entry["query"], "token=[redacted]&page=2");
    assert_eq!(entry["consumer"], "alice");
    assert_eq!(entry["request_id"], response.header("x-request-id"));
    assert_eq!(entry["headers"]["authorization"], "[redacted]");
    assert!(entry["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(entry["duration_ms"].as_f64().unwrap() >= entry["upstream_ms"].as_f64().unwrap());
    assert!(entry["time"].as_str().unwrap().ends_with('Z'));

    // The logger sits before api-key: it sees the 401, with no consumer and no upstream time.
    let refused = gateway
        .send(Request::get("/keyed/x").body(Full::default()).unwrap())
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let entry = access_entry(&gateway.line_containing("\"route\":\"keyed\"").await);
    assert_eq!(entry["status"], 401);
    assert!(
        entry.get("consumer").is_none() && entry.get("upstream_ms").is_none(),
        "{entry}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn cors_answers_preflights_and_decorates_allowed_origins_only() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    let preflight = |origin: &str, method: &str, headers: &str| {
        Request::options("/web/items")
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .body(Full::default())
            .unwrap()
    };
    let ok = gateway
        .send(preflight(
            "https://app.example.com",
            "PUT",
            "Content-Type, X-Token",
        ))
        .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(ok.header("access-control-allow-credentials"), "true");
    assert_eq!(ok.header("access-control-allow-methods"), "GET, PUT");
    assert_eq!(
        ok.header("access-control-allow-headers"),
        "content-type, x-token"
    );
    assert_eq!(ok.header("access-control-max-age"), "600");
    let wildcard = gateway
        .send(preflight("https://a.b.example.org", "GET", ""))
        .await;
    assert_eq!(wildcard.status, StatusCode::NO_CONTENT);

    for refused in [
        preflight("https://evil.example.com", "PUT", ""),
        preflight("https://app.example.com", "DELETE", ""),
        preflight("https://app.example.com", "GET", "x-secret"),
    ] {
        let response = gateway.send(refused).await;
        assert_eq!(response.status, StatusCode::FORBIDDEN);
        assert!(
            response
                .headers
                .keys()
                .all(|n| !n.as_str().starts_with("access-control"))
        );
    }
    assert!(
        upstream.seen().is_empty(),
        "preflights are answered by the plugin"
    );

    let actual = |origin: &str| {
        Request::get("/web/items")
            .header("origin", origin)
            .body(Full::default())
            .unwrap()
    };
    let allowed = gateway.send(actual("https://app.example.com")).await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(
        allowed.header("access-control-expose-headers"),
        "x-request-id"
    );
    assert_eq!(allowed.header("vary"), "Origin");
    let other = gateway.send(actual("https://evil.example.com")).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "CORS is enforced by the browser, not by refusing"
    );
    assert!(
        other
            .headers
            .keys()
            .all(|n| !n.as_str().starts_with("access-control"))
    );
}

#[tokio::test]
async fn access_log_counts_the_bytes_actually_sent_and_notices_an_early_end() {
    let upstream = TestUpstream::start("main").await;
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest(&upstream),
        &[],
    )
    .await;

    // A streamed answer has no content-length: the count comes from the body as it was sent.
    let body = "a body that is echoed back in chunks";
    let response = gateway
        .send(
            Request::post("/stream-echo")
                .body(Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-length"), "");
    assert_eq!(response.text(), body);
    let entry = access_entry(&gateway.line_containing("\"route\":\"streamed\"").await);
    assert_eq!(entry["bytes_out"], body.len());
    assert_eq!(entry["bytes_in"], body.len());
    assert_eq!(entry["completed"], true);

    // An upload without content-length is counted as it streams through.
    let (mut sender, _connection) = wasmgate_tests::http1_connection(gateway.addr).await;
    let (mut chunks, upload) = http_body_util::channel::Channel::<bytes::Bytes>::new(2);
    let response = sender.send_request(
        Request::post("/stream-echo")
            .header("host", "x")
            .body(upload)
            .unwrap(),
    );
    let feed = async move {
        for chunk in ["first,", "second,", "third"] {
            chunks.send_data(bytes::Bytes::from(chunk)).await.unwrap();
        }
    };
    let (response, ()) = tokio::join!(response, feed);
    let echoed = http_body_util::BodyExt::collect(response.unwrap().into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&echoed[..], b"first,second,third");
    let entry = access_entry(&gateway.line_containing("\"route\":\"streamed\"").await);
    assert_eq!(entry["bytes_in"], 18, "{entry}");
    assert_eq!(entry["bytes_out"], 18, "{entry}");

    // A client that goes away after the first bytes of 32 MiB.
    let (mut sender, connection) = wasmgate_tests::http1_connection(gateway.addr).await;
    let response = sender
        .send_request(
            Request::get(format!("/bytes/{}", 32 << 20))
                .header("host", "x")
                .body(Full::<bytes::Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut download = response.into_body();
    let first = http_body_util::BodyExt::frame(&mut download)
        .await
        .unwrap()
        .unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(download);
    drop(sender);
    connection.abort();
    let entry = access_entry(&gateway.line_containing("\"route\":\"big\"").await);
    assert_eq!(entry["completed"], false, "{entry}");
    assert!(entry["bytes_out"].as_u64().unwrap() < 32 << 20, "{entry}");
    gateway.stop().await;
}
