//! `isolation: pooled`: configured instances are reused between requests, and an instance whose
//! call failed never is. (The default, a fresh instance per request, is shown in budgets.rs:
//! a secret stashed in a global never reaches another request.) What a fresh instance costs the
//! kernel: its slot's memory is reset in place, not faulted in again. And pre-initialised images:
//! a fresh instance starts configured, still apart from every other request.

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

/// A manifest of per-request plugin uses: a probe that stamps when it was configured on `/a`
/// (tag `a_tag`) and `/b` (tag `b_tag`), and the stash on `/stash`.
/// The deadline is generous: these tests are about images, and `configure` at load, on a CI
/// machine busy with other tests, once ran past the 50 ms default and failed the load.
fn preinit_manifest(upstream: &TestUpstream, a_tag: &str, b_tag: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nadmin: {{ bind: \"127.0.0.1:0\" }}\nreload: {{ watch: false }}\nlimits: {{ plugin_deadline: 1s }}\nplugins:\n  probe: {{ source: \"{{plugins}}/probe_plugin.wasm\" }}\n  stash: {{ source: \"{{plugins}}/misbehave_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: a, match: {{ prefix: /a }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: {a_tag}, stamp: true }} }}] }}\n  - {{ name: b, match: {{ prefix: /b }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: {b_tag}, stamp: true }} }}] }}\n  - {{ name: stash, match: {{ prefix: /stash }}, upstream: main, plugins: [{{ name: stash, config: {{ mode: stash }} }}] }}\n",
        upstream.url()
    )
}

/// The time the instance that served `path` was configured, as the probe sent it on.
async fn configured_at(gateway: &TestGateway, upstream: &TestUpstream, path: &str) -> String {
    let response = gateway.get("x", path).await;
    assert_eq!(response.status, StatusCode::OK, "{path}");
    let seen = upstream.last();
    assert!(seen.uri.starts_with(path));
    seen.headers["x-configured-at"].to_str().unwrap().to_owned()
}

/// Sends `token` through the stash plugin on `/stash`, which keeps it in a global and sends on
/// whatever an earlier request left there as `x-stolen`: nothing may arrive.
async fn assert_stash_sees_nothing_earlier(
    gateway: &TestGateway,
    upstream: &TestUpstream,
    token: &str,
) {
    let response = gateway
        .send(
            Request::get("/stash")
                .header("authorization", token)
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(
        !upstream.last().headers.contains_key("x-stolen"),
        "a request saw what an earlier one left in a global"
    );
}

/// Once a per-request use's image is made, each request's instance starts from it: `configure`
/// ran once, at load, not per request (the probe's stamp is the same for every request; without
/// images it differs each time). The instance is still fresh: the stash's global from one
/// request never reaches the next.
#[tokio::test]
async fn a_per_request_instance_starts_from_the_configured_image_and_is_still_fresh() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&preinit_manifest(&upstream, "a", "b")).await;
    assert_eq!(gateway.preinitialized().await, 3, "an image per plugin use");
    let config = wasmgate_tests::send(
        gateway.admin(),
        Request::get("/config").body(Full::default()).unwrap(),
    )
    .await;
    let config: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    assert_eq!(
        config["plugin_images"],
        serde_json::json!({ "ready": 3, "pending": 0, "refused": 0 }),
        "the admin listener says the images are ready"
    );

    let first = configured_at(&gateway, &upstream, "/a").await;
    for _ in 0..4 {
        assert_eq!(configured_at(&gateway, &upstream, "/a").await, first);
    }
    assert_ne!(
        configured_at(&gateway, &upstream, "/b").await,
        first,
        "each use has its own image, configured on its own"
    );
    // The image holds the route's config: the probe marks its passage with its tag.
    assert_eq!(gateway.get("x", "/b").await.status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-chain"], "b");

    for token in ["Bearer one", "Bearer two", "Bearer three"] {
        assert_stash_sees_nothing_earlier(&gateway, &upstream, token).await;
    }
}

/// A plugin that still holds a host resource when `configure` returns (the standard library's
/// stderr stream, opened by a write) gets no image: in a new instance the handle would point at
/// nothing and its next write would trap. Its requests configure an instance each, as before.
#[tokio::test]
async fn a_plugin_holding_a_host_resource_after_configure_is_configured_per_request() {
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  chatty: {{ source: \"{{plugins}}/misbehave_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: chatty, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: chatty, config: {{ mode: stderr }} }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest).await;
    assert_eq!(gateway.preinitialized().await, 0, "no image for it");
    for _ in 0..3 {
        assert_eq!(gateway.get("x", "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        gateway.failures("chatty", wasmgate::runtime::FailureKind::Trap),
        0
    );
}

/// A reload keeps the image of a use whose plugin and config did not change (not made again:
/// the same instances' stamp), and makes a new one for a use whose config did.
#[tokio::test]
async fn a_reload_keeps_the_image_of_an_unchanged_use_and_remakes_a_changed_one() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&preinit_manifest(&upstream, "a", "b")).await;
    assert_eq!(gateway.preinitialized().await, 3);
    let slots = |gateway: &TestGateway| -> Vec<(String, Arc<wasmgate::runtime::PreinitSlot>)> {
        let snapshot = gateway.gateway().snapshot();
        snapshot
            .preinit_slots()
            .map(|(route, _, slot)| (route.to_owned(), slot.clone()))
            .collect()
    };
    let before = slots(&gateway);
    let a_before = configured_at(&gateway, &upstream, "/a").await;
    let b_before = configured_at(&gateway, &upstream, "/b").await;

    wasmgate_tests::write_manifest(gateway.dir.path(), &preinit_manifest(&upstream, "a", "c"));
    gateway.gateway().reload().await.unwrap();
    let after = slots(&gateway);
    for ((route, old), (_, new)) in before.iter().zip(&after) {
        assert_eq!(Arc::ptr_eq(old, new), route != "b", "route {route}");
    }
    assert_eq!(gateway.preinitialized().await, 3);
    assert_eq!(configured_at(&gateway, &upstream, "/a").await, a_before);
    assert_ne!(configured_at(&gateway, &upstream, "/b").await, b_before);
    assert_eq!(upstream.last().headers["x-chain"], "c");
}

/// Whether the first plugin use of the route serving `path` has an instance made ahead, ready.
fn made_ahead(gateway: &TestGateway, path: &str) -> bool {
    let snapshot = gateway.gateway().snapshot();
    let route = snapshot.route(None, path, &Method::GET).expect("a route");
    route.chain[0]
        .ahead
        .as_ref()
        .expect("a per-request use")
        .is_ready()
}

/// Waits (10 s at most) for the route serving `path` to have an instance made ahead: it is made
/// after the previous response, while the client reads it.
async fn wait_made_ahead(gateway: &TestGateway, path: &str, what: &str) {
    let waited = tokio::time::Instant::now();
    while !made_ahead(gateway, path) {
        assert!(waited.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A per-request use's next instance is made ahead, once the response before it has been handed
/// on, and the next request takes it ready (counted as `made="ahead"`; made on the request's
/// path, it would count as `on_request`). It is still a fresh instance: what one request left in
/// a global never reaches the next.
#[tokio::test]
async fn the_next_requests_instance_is_made_ahead_and_is_still_fresh() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&preinit_manifest(&upstream, "a", "b")).await;
    assert_eq!(gateway.preinitialized().await, 3);
    assert!(
        !made_ahead(&gateway, "/stash"),
        "nothing is made before a request asks"
    );
    for (i, token) in ["Bearer one", "Bearer two", "Bearer three", "Bearer four"]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            let what = format!("no instance was made ahead after request {i}");
            wait_made_ahead(&gateway, "/stash", &what).await;
        }
        assert_stash_sees_nothing_earlier(&gateway, &upstream, token).await;
    }
    let metrics = gateway.gateway().snapshot().services.metrics.encode();
    for (made, count) in [("ahead", 3), ("on_request", 1)] {
        let series = format!(
            "wasmgate_plugin_fresh_instances_total{{plugin=\"stash\",made=\"{made}\"}} {count}\n"
        );
        assert!(metrics.contains(&series), "no `{series}` in:\n{metrics}");
    }
}

/// Instances made ahead never take more than half of a plugin's instance cap: with `instances:
/// 2` and two routes using the plugin, only the first route's use gets one; the second's
/// requests make their own (and are served).
#[tokio::test]
async fn instances_made_ahead_leave_half_of_the_plugins_cap_free() {
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  stash: {{ source: \"{{plugins}}/misbehave_plugin.wasm\", instances: 2 }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: one, match: {{ prefix: /one }}, upstream: main, plugins: [{{ name: stash, config: {{ mode: stash }} }}] }}\n  - {{ name: two, match: {{ prefix: /two }}, upstream: main, plugins: [{{ name: stash, config: {{ mode: stash }} }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest).await;
    assert_eq!(gateway.preinitialized().await, 2);
    assert_eq!(gateway.get("x", "/one").await.status, StatusCode::OK);
    wait_made_ahead(&gateway, "/one", "none made for /one").await;
    for _ in 0..3 {
        assert_eq!(gateway.get("x", "/two").await.status, StatusCode::OK);
        // Time for an instance to be made, were it allowed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(made_ahead(&gateway, "/one"));
        assert!(
            !made_ahead(&gateway, "/two"),
            "a second instance made ahead filled the plugin's cap"
        );
    }
}
