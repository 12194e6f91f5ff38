//! Edge behaviour (issue 5, first part): forwarding headers set by the gateway, believed only from
//! trusted proxies.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use wasmgate_tests::{TestGateway, TestUpstream};

fn manifest(upstream: &TestUpstream, trusted: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\ntrusted_proxies: [{trusted}]\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main }}\n",
        upstream.url()
    )
}

fn spoofed() -> Request<Full<Bytes>> {
    Request::get("/who")
        .header("host", "api.example.com")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "admin.internal")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_client_cannot_forge_where_it_came_from() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "")).await;
    assert_eq!(gateway.send(spoofed()).await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "api.example.com");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;host=api.example.com;proto=http"
    );
    assert_eq!(seen.get_all("x-forwarded-for").iter().count(), 1);
}

#[tokio::test]
async fn a_trusted_proxy_is_believed_and_appended_to() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&manifest(&upstream, "127.0.0.0/8")).await;
    assert_eq!(gateway.send(spoofed()).await.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "admin.internal");
    assert_eq!(
        seen["forwarded"],
        "for=6.6.6.6;proto=https, for=127.0.0.1;host=api.example.com;proto=http"
    );
}

#[tokio::test]
async fn a_bad_trusted_proxy_entry_fails_the_load() {
    let upstream = TestUpstream::start("main").await;
    let Err(err) = TestGateway::try_start(&manifest(&upstream, "\"10.0.0.0/40\"")).await else {
        panic!("the manifest loaded");
    };
    let err = err.to_string();
    assert!(err.contains("manifest.yaml"), "{err}");
    assert!(err.contains("`10.0.0.0/40` in `trusted_proxies`"), "{err}");
}
