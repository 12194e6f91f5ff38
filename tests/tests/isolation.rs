//! `isolation: pooled`: configured instances are reused between requests, and an instance whose
//! call failed never is. (The default, a fresh instance per request, is shown in budgets.rs:
//! a secret stashed in a global never reaches another request.) And what a fresh instance
//! costs the kernel: its slot's memory is reset in place, not faulted in again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use wasmgate::forwarded::ClientAddr;
use wasmgate::metrics::Metrics;
use wasmgate::runtime::{Decision, Exchange, LoadSession, PluginBudget, Runtime};
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

/// Minor page faults the calling thread has taken so far.
fn thread_page_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux's /proc");
    // After the command name (which may hold spaces), minflt is the 8th field.
    let (_, fields) = stat.rsplit_once(')').expect("a stat line");
    let minflt = fields.split_whitespace().nth(7).expect("minflt");
    minflt.parse().expect("a number")
}

/// With a fresh instance per request (the default), each request's instance takes a slot the
/// previous one left. Its memory is reset by copying back the pages the last instance wrote, and
/// they stay mapped: handed back to the kernel instead, every page a request touches faulted in
/// again, about six per instance of this plugin (19 per request for the benchmark's chain).
#[test]
fn a_fresh_instance_takes_its_slot_without_faulting_its_memory_in_again() {
    let runtime = Runtime::new().unwrap();
    if !runtime.resets_memory_in_place() {
        eprintln!("skipped: this kernel lacks PAGEMAP_SCAN (Linux 6.7), so slots are decommitted");
        return;
    }
    let budget = PluginBudget {
        deadline: Duration::from_millis(500),
        memory: 16 << 20,
        instances: 8,
        host_calls: 1000,
        headers: 100,
        header_value: 8 << 10,
        log_line: 8 << 10,
        body: 1 << 20,
        body_access: false,
    };
    let plugin = runtime
        .load(
            "bench",
            &wasmgate_tests::plugin("bench_plugin"),
            None,
            budget,
            &mut LoadSession::default(),
            Metrics::new().plugin("bench"),
        )
        .unwrap();
    let (parts, ()) = Request::get("/users/42")
        .header("x-a", "alpha")
        .header("x-b", "beta")
        .body(())
        .unwrap()
        .into_parts();
    let client = Arc::new(ClientAddr::new("127.0.0.1:50000".parse().unwrap()));
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    // On this thread, so that its own fault count is the one that moves.
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let request = || {
        tokio.block_on(async {
            let exchange = Exchange::new(parts.clone(), client.clone(), Arc::from("r"), id.clone());
            let mut instance = plugin.instantiate("null").await.unwrap();
            let (exchange, decision) = instance.on_request(Box::new(exchange)).await;
            assert!(matches!(decision, Ok(Decision::Continue)));
            assert_eq!(exchange.request.headers["x-c"], "9");
        })
    };
    // The first instances map their slot and fill the host's own caches and allocator pages.
    for _ in 0..10 {
        request();
    }
    let before = thread_page_faults();
    const INSTANCES: u64 = 50;
    for _ in 0..INSTANCES {
        request();
    }
    let faults = thread_page_faults() - before;
    assert!(
        faults < INSTANCES,
        "{faults} page faults for {INSTANCES} fresh instances: slot memory is faulted in again"
    );
}
