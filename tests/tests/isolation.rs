//! `isolation: pooled`: configured instances are reused between requests, and an instance whose
//! call failed never is. (The default, a fresh instance per request, is shown in budgets.rs:
//! a secret stashed in a global never reaches another request.)

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use wasmgate_tests::{TestGateway, TestUpstream};

fn manifest(upstream: &TestUpstream) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  stash: {{ source: \"{{plugins}}/misbehave_plugin.wasm\", isolation: pooled }}\n  trap: {{ source: \"{{plugins}}/misbehave_plugin.wasm\", isolation: pooled }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: stash, match: {{ prefix: /stash }}, upstream: main, plugins: [{{ name: stash, config: {{ mode: stash }} }}] }}\n  - {{ name: trap, match: {{ prefix: /trap }}, upstream: main, plugins: [{{ name: trap, config: {{ mode: trap-if-asked }} }}] }}\n",
        upstream.url()
    )
}

fn idle(gateway: &TestGateway, path: &str) -> usize {
    let snapshot = gateway.gateway().snapshot();
    let route = snapshot.route(None, path, &Method::GET).expect("a route");
    route.chain[0].pool.as_ref().expect("pooled").idle()
}

#[tokio::test]
async fn a_pooled_instance_serves_the_next_request_with_its_globals() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    let with_auth = |token: &'static str| {
        Request::get("/stash")
            .header("authorization", token)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    assert_eq!(
        gateway.send(with_auth("Bearer one")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        idle(&gateway, "/stash"),
        1,
        "the instance went back to the pool"
    );
    assert_eq!(
        gateway.send(with_auth("Bearer two")).await.status,
        StatusCode::OK
    );
    // The same instance served both: what it kept from the first request is still there. This
    // is the price of `pooled`, and why it is not the default.
    assert_eq!(upstream.last().headers["x-stolen"], "Bearer one");
    assert_eq!(idle(&gateway, "/stash"), 1);
}

#[tokio::test]
async fn a_pooled_instance_that_failed_is_dropped_not_reused() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream)).await;
    assert_eq!(gateway.get("x", "/trap").await.status, StatusCode::OK);
    assert_eq!(idle(&gateway, "/trap"), 1);
    let trapped = gateway
        .send(
            Request::get("/trap")
                .header("x-trap", "1")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(trapped.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(idle(&gateway, "/trap"), 0, "the trapped instance is gone");
    for _ in 0..3 {
        assert_eq!(gateway.get("x", "/trap").await.status, StatusCode::OK);
    }
    assert_eq!(idle(&gateway, "/trap"), 1, "a new instance took its place");
}
