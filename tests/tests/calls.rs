//! How plugin calls are made: plainly, on the worker's stack, while a plugin's calls are short
//! and nothing it imports can wait; on a fiber, which yields to other requests at every epoch
//! tick, once one of its calls has run through a tenth of its deadline in ticks, or from the
//! start when it imports something that may wait.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use wasmgate_tests::{CliGateway, TestUpstream, send};

/// A manifest with one listener, the upstream `main`, these plugin lines and these route lines.
fn manifest(upstream: &TestUpstream, plugins: &str, routes: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n{plugins}upstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n{routes}",
        upstream.url()
    )
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "x.test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A gateway with one event loop: a plain call that loops holds it whole until its deadline.
/// After that call, the plugin runs on a fiber and a request on a clean route is answered while
/// the same plugin loops again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_one_call_runs_long_a_plugin_yields_to_other_requests() {
    let upstream = TestUpstream::start("main").await;
    let manifest = manifest(
        &upstream,
        "  looper: { source: \"{plugins}/misbehave_plugin.wasm\", deadline: 2s, host_calls: 500 }\n",
        "  - { name: loop, match: { prefix: /loop }, upstream: main, plugins: [{ name: looper, config: { mode: loop } }] }\n  - { name: clean, match: { prefix: /clean }, upstream: main }\n",
    );
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest,
        &[("WASMGATE_WORKERS", "1")],
    )
    .await;
    let addr = gateway.addr;

    // The first loop is a plain call: it runs to its deadline, and switches the plugin over.
    let first = send(addr, get("/loop/1")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let line = gateway.line_containing("epoch tick").await;
    assert!(line.contains("plugin=looper"), "{line}");

    // The second loop runs on a fiber: the one event loop serves the clean route meanwhile.
    let looping = tokio::spawn(send(addr, get("/loop/2")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let clean = send(addr, get("/clean")).await;
    assert_eq!(clean.status, StatusCode::OK);
    assert!(
        !looping.is_finished(),
        "the clean request waited for the looping plugin's deadline"
    );
    let second = looping.await.unwrap();
    assert_eq!(second.status, StatusCode::INTERNAL_SERVER_ERROR);
    gateway.stop().await;
}

/// A plugin that sleeps imports a clock subscription, which may really wait: it is called on a
/// fiber from its first call, and its sleep works (linked for plain calls, it would trap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_can_wait_is_called_on_a_fiber_and_its_wait_works() {
    let upstream = TestUpstream::start("main").await;
    let manifest = manifest(
        &upstream,
        "  sleepy: { source: \"{plugins}/sleepy_plugin.wasm\" }\n",
        "  - { name: nap, match: { prefix: / }, upstream: main, plugins: [{ name: sleepy, config: { ms: 5 } }] }\n",
    );
    let gateway = wasmgate_tests::TestGateway::start(&manifest).await;
    for i in 0..3 {
        let response = gateway.get("x.test", &format!("/nap/{i}")).await;
        assert_eq!(response.status, StatusCode::OK);
        let seen = upstream.last();
        let slept: u64 = seen.headers["x-slept"].to_str().unwrap().parse().unwrap();
        assert!(slept >= 5, "slept {slept} ms");
    }
}

/// A plain call runs the plugin on the worker's own stack. The gateway gives the threads it
/// starts a stack of their own size, so a plugin that recurses hits its Wasm stack limit and
/// traps, whatever `RUST_MIN_STACK` says (with 256 KiB, the worker overflowed and the process
/// aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursing_plugin_traps_on_a_worker_whatever_rust_min_stack_says() {
    let upstream = TestUpstream::start("main").await;
    let manifest = manifest(
        &upstream,
        "  deep: { source: \"{plugins}/misbehave_plugin.wasm\", deadline: 2s }\n",
        "  - { name: deep, match: { prefix: /deep }, upstream: main, plugins: [{ name: deep, config: { mode: recurse } }] }\n  - { name: clean, match: { prefix: /clean }, upstream: main }\n",
    );
    let gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest,
        &[("WASMGATE_WORKERS", "2"), ("RUST_MIN_STACK", "262144")],
    )
    .await;
    // Each request on a connection of its own: the kernel spreads them over both event loops
    // (all 16 on the same one by chance: one run in 65,536).
    for i in 0..16 {
        let deep = send(gateway.addr, get(&format!("/deep/{i}"))).await;
        assert_eq!(deep.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let clean = send(gateway.addr, get("/clean")).await;
    assert_eq!(clean.status, StatusCode::OK);
    gateway.stop().await;
}
