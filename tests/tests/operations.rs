//! Operations: reloads under load, broken reloads, the folder watch, signals, graceful drain, the
//! admin listener, metrics, and the compiled-plugin cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use wasmgate_tests::{CliGateway, TestGateway, TestResponse, TestUpstream, send};

/// Version `n` of a manifest: a header-rewrite sets `x-gen: n` on the request (the upstream
/// records it) and `x-resp-gen: n` on the response; odd versions add a second plugin use to the
/// chain, which sets `x-second: n` on the response.
fn versioned(upstream: &TestUpstream, n: u32, admin: bool) -> String {
    let second = if n % 2 == 1 {
        format!(", {{ name: rewrite, config: {{ response: {{ set: {{ x-second: \"{n}\" }} }} }} }}")
    } else {
        String::new()
    };
    let admin = if admin {
        "admin: { bind: \"127.0.0.1:0\" }\n"
    } else {
        ""
    };
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\n{admin}reload: {{ watch: false }}\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - name: versioned\n    match: {{ prefix: / }}\n    upstream: main\n    plugins: [{{ name: rewrite, config: {{ request: {{ set: {{ x-gen: \"{n}\" }} }}, response: {{ set: {{ x-resp-gen: \"{n}\" }} }} }} }}{second}]\n",
        upstream.url()
    )
}

fn write(gateway: &TestGateway, text: &str) {
    wasmgate_tests::write_manifest(gateway.dir.path(), text);
}

/// The version a response was produced by, after checking that every part of the exchange
/// agrees on it: what the upstream saw, what the response carries, and the chain's shape.
fn version_of(response: &TestResponse, upstream_saw: &HashMap<String, String>) -> u32 {
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let id = response.header("x-request-id");
    let resp: u32 = response.header("x-resp-gen").parse().expect("x-resp-gen");
    let sent = upstream_saw
        .get(id)
        .unwrap_or_else(|| panic!("the upstream saw request {id}"));
    assert_eq!(
        sent,
        &resp.to_string(),
        "request and response phases ran on different snapshots"
    );
    let second = response.header("x-second");
    if resp % 2 == 1 {
        assert_eq!(
            second,
            resp.to_string(),
            "the chain of version {resp} runs two plugins"
        );
    } else {
        assert_eq!(second, "", "the chain of version {resp} runs one plugin");
    }
    resp
}

fn seen_generations(upstream: &TestUpstream) -> HashMap<String, String> {
    upstream
        .seen()
        .into_iter()
        .map(|seen| {
            let header = |name: &str| {
                seen.headers
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            (header("x-request-id"), header("x-gen"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_drop_nothing_and_never_mix_snapshots() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&versioned(&upstream, 0, false)).await;
    let addr = gateway.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            // Keep-alive connections, so that requests ride connections across reloads.
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut responses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let request = Request::get(format!("http://{addr}/anything"))
                    .body(Full::default())
                    .unwrap();
                let response = client.request(request).await.expect("the gateway answered");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("a whole body").to_bytes();
                responses.push(TestResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                });
            }
            responses
        }));
    }

    let reloads = 12;
    for n in 1..=reloads {
        tokio::time::sleep(Duration::from_millis(40)).await;
        if n == reloads / 2 {
            // A broken manifest in the middle of the load: refused, and nothing changes.
            write(
                &gateway,
                &versioned(&upstream, n, false).replace("upstream: main\n", "upstream: gone\n"),
            );
            assert!(gateway.gateway().reload().await.is_err());
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        write(&gateway, &versioned(&upstream, n, false));
        let report = gateway
            .gateway()
            .reload()
            .await
            .expect("the reload succeeds");
        assert_eq!(
            report.compiled, 0,
            "an unchanged plugin is not compiled again"
        );
    }
    tokio::time::sleep(Duration::from_millis(40)).await;
    stop.store(true, Ordering::Relaxed);

    let mut responses = Vec::new();
    for client in clients {
        responses.extend(client.await.expect("a client task"));
    }
    let saw = seen_generations(&upstream);
    let mut versions = std::collections::BTreeSet::new();
    for response in &responses {
        versions.insert(version_of(response, &saw));
    }
    let total = responses.len();
    assert!(total > 100, "only {total} requests ran during the reloads");
    // Versions served: at least the first, the last and some in between.
    assert!(
        versions.contains(&0) && versions.contains(&reloads),
        "{versions:?}"
    );
    assert!(versions.len() > 4, "{versions:?}");
    let after = gateway.get("x", "/after").await;
    assert_eq!(version_of(&after, &seen_generations(&upstream)), reloads);
}

async fn admin(addr: std::net::SocketAddr, method: &str, path: &str) -> TestResponse {
    send(
        addr,
        Request::builder()
            .method(method)
            .uri(path)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_broken_manifest_changes_nothing_and_says_why() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&versioned(&upstream, 2, true)).await;
    let config = admin(gateway.admin(), "GET", "/config").await;
    let before: serde_json::Value = serde_json::from_slice(&config.body).unwrap();

    // A plugin that refuses its config, an unknown upstream and a listener change: every
    // error is reported, and the running snapshot stays.
    let broken = versioned(&upstream, 3, true)
        .replace("x-second: \"3\"", "\"bad\\nname\": \"3\"")
        .replace("upstream: main\n", "upstream: missing\n");
    write(&gateway, &broken);
    let answer = admin(gateway.admin(), "POST", "/reload").await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let report: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(report["result"], "failure");
    let errors = report["errors"].to_string();
    assert!(errors.contains("manifest.yaml:"), "{errors}");
    assert!(errors.contains("route `versioned`"), "{errors}");
    assert!(errors.contains("unknown upstream `missing`"), "{errors}");

    let response = gateway.get("x", "/still").await;
    assert_eq!(version_of(&response, &seen_generations(&upstream)), 2);
    let config = admin(gateway.admin(), "GET", "/config").await;
    let mut after: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    // Its plugin images may have been made meanwhile.
    after["plugin_images"] = before["plugin_images"].clone();
    assert_eq!(
        before, after,
        "a failed reload leaves the loaded manifest as it was"
    );

    // A plugin config the plugin itself refuses is named with its route and plugin.
    let refused = versioned(&upstream, 3, true).replace("x-second: \"3\"", "\"bad\\nname\": \"3\"");
    write(&gateway, &refused);
    let answer = admin(gateway.admin(), "POST", "/reload").await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let errors = answer.text();
    assert!(
        errors.contains("route `versioned`: plugin `rewrite`"),
        "{errors}"
    );

    // Listeners are fixed at start-up, and the error says so.
    let moved = versioned(&upstream, 4, true).replace(
        "name: public, bind: \"127.0.0.1:0\"",
        "name: public, bind: \"127.0.0.1:1\"",
    );
    write(&gateway, &moved);
    let answer = admin(gateway.admin(), "POST", "/reload").await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        answer.text().contains("fixed at start-up"),
        "{}",
        answer.text()
    );

    // A good manifest after all that loads.
    write(&gateway, &versioned(&upstream, 5, true));
    let answer = admin(gateway.admin(), "POST", "/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let response = gateway.get("x", "/now").await;
    assert_eq!(version_of(&response, &seen_generations(&upstream)), 5);
    let config = admin(gateway.admin(), "GET", "/config").await;
    let now: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    assert_ne!(before["sha256"], now["sha256"]);
}

#[tokio::test]
async fn a_manifest_replaced_by_rename_is_picked_up_by_the_folder_watch() {
    let upstream = TestUpstream::start("main").await;
    let watched =
        |n| versioned(&upstream, n, false).replace("watch: false", "watch: true, debounce: 50ms");
    let gateway = TestGateway::start(&watched(0)).await;
    let first = gateway.get("x", "/").await;
    assert_eq!(version_of(&first, &seen_generations(&upstream)), 0);

    // As editors and ConfigMap updates do: a new file renamed over the old one, twice.
    for n in [1, 2] {
        let text = watched(n).replace(
            "{plugins}",
            &wasmgate_tests::plugin_dir().display().to_string(),
        );
        let staged = gateway.dir.path().join(".manifest.yaml.swp");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, gateway.dir.path().join("manifest.yaml")).unwrap();
        let mut seen = 0;
        for _ in 0..100 {
            let response = gateway.get("x", "/").await;
            seen = version_of(&response, &seen_generations(&upstream));
            if seen == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, n, "the watch reloaded version {n} within 10 s");
    }
}

/// Parses `/metrics` with a Prometheus text parser.
async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let response = admin(addr, "GET", "/metrics").await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.header("content-type").contains("openmetrics-text"));
    let lines = response
        .text()
        .lines()
        .map(|l| Ok(l.to_string()))
        .collect::<Vec<_>>();
    prometheus_parse::Scrape::parse(lines.into_iter()).expect("a valid exposition")
}

/// The value of the series `name` with (at least) `labels`; 0 when absent. For a histogram,
/// its count.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matches = |sample: &&prometheus_parse::Sample| {
        labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
    };
    let count_name = format!("{name}_count");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name || s.metric == count_name)
        .filter(matches)
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .fold(0.0, f64::max)
}

/// A plugin is called only in the phases it asks for: access-log only in the completion phase,
/// header-rewrite in the request and response phases, and not even there when its edits are fixed
/// (no placeholder: the gateway makes them, contract 0.2.4); the plugin duration histograms count
/// the calls made.
#[tokio::test]
async fn plugins_are_called_only_in_the_phases_they_ask_for() {
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nadmin: {{ bind: \"127.0.0.1:0\" }}\nreload: {{ watch: false }}\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\n  dynamic: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\n  log: {{ source: \"{{plugins}}/access_log.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: logged, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: log }}, {{ name: rewrite, config: {{ request: {{ set: {{ x-a: b }} }}, response: {{ set: {{ x-b: c }} }} }} }}, {{ name: dynamic, config: {{ request: {{ set: {{ x-route: \"{{route}}\" }} }}, response: {{ set: {{ x-d: e }} }} }} }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest).await;
    for _ in 0..3 {
        let response = gateway.get("x", "/a").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.header("x-b"), "c");
        assert_eq!(response.header("x-d"), "e");
    }
    assert_eq!(upstream.last().headers["x-a"], "b");
    assert_eq!(upstream.last().headers["x-route"], "logged");
    let calls = |scrape: &prometheus_parse::Scrape, plugin: &str, phase: &str| {
        value(
            scrape,
            "wasmgate_plugin_duration_seconds",
            &[("plugin", plugin), ("phase", phase)],
        )
    };
    // The completion phase runs after the response body has gone: wait for it.
    let mut scrape = scrape(gateway.admin()).await;
    for _ in 0..50 {
        if calls(&scrape, "log", "complete") == 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        scrape = self::scrape(gateway.admin()).await;
    }
    assert_eq!(calls(&scrape, "log", "complete"), 3.0);
    assert_eq!(calls(&scrape, "log", "request"), 0.0);
    assert_eq!(calls(&scrape, "log", "response"), 0.0);
    // Fixed edits: made by the gateway, no call.
    assert_eq!(calls(&scrape, "rewrite", "request"), 0.0);
    assert_eq!(calls(&scrape, "rewrite", "response"), 0.0);
    assert_eq!(calls(&scrape, "rewrite", "complete"), 0.0);
    // A placeholder needs the request: that phase is called, the fixed one is not.
    assert_eq!(calls(&scrape, "dynamic", "request"), 3.0);
    assert_eq!(calls(&scrape, "dynamic", "response"), 0.0);
}

#[tokio::test]
async fn metrics_move_with_traffic_traps_and_reloads() {
    let upstream = TestUpstream::start("main").await;
    // The rewrite has a placeholder, so that it is called (fixed values are made by the
    // gateway without a call, and without its metrics and span).
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nadmin: {{ bind: \"127.0.0.1:0\" }}\nreload: {{ watch: false }}\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\n  panicky: {{ source: \"{{plugins}}/misbehave_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: fine, match: {{ prefix: /fine }}, upstream: main, plugins: [{{ name: rewrite, config: {{ request: {{ set: {{ x-a: \"{{route}}\" }} }} }} }}] }}\n  - {{ name: trapping, match: {{ prefix: /trap }}, upstream: main, plugins: [{{ name: panicky, config: {{ mode: panic }} }}] }}\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest).await;
    let metrics = gateway.admin();

    let before = scrape(metrics).await;
    let fine = [("route", "fine"), ("method", "GET"), ("class", "2xx")];
    assert_eq!(value(&before, "wasmgate_requests_total", &fine), 0.0);
    assert_eq!(
        value(
            &before,
            "wasmgate_upstream_target_healthy",
            &[("upstream", "main")]
        ),
        1.0
    );

    for _ in 0..5 {
        assert_eq!(gateway.get("x", "/fine").await.status, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(
            gateway.get("x", "/trap").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let post = gateway
        .send(Request::post("/fine").body(Full::from("x")).unwrap())
        .await;
    assert_eq!(post.status, StatusCode::OK);
    assert_eq!(
        gateway.get("x", "/nowhere").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin(metrics, "POST", "/reload").await.status,
        StatusCode::OK
    );
    std::fs::write(gateway.dir.path().join("manifest.yaml"), "version: [").unwrap();
    assert_eq!(
        admin(metrics, "POST", "/reload").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let after = scrape(metrics).await;
    assert_eq!(value(&after, "wasmgate_requests_total", &fine), 5.0);
    assert_eq!(
        value(
            &after,
            "wasmgate_requests_total",
            &[("route", "fine"), ("method", "POST"), ("class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_requests_total",
            &[("route", "trapping"), ("class", "5xx")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_requests_total",
            &[("route", "(none)"), ("class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_plugin_failures_total",
            &[("plugin", "panicky"), ("kind", "trap")]
        ),
        3.0
    );
    assert_eq!(
        value(&after, "wasmgate_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        value(&after, "wasmgate_reloads_total", &[("result", "failure")]),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_request_duration_seconds",
            &[("route", "fine")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_plugin_duration_seconds",
            &[("plugin", "rewrite"), ("phase", "request")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &after,
            "wasmgate_upstream_duration_seconds",
            &[("upstream", "main")]
        ),
        6.0
    );
    // No route or plugin label ever carries a raw path.
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.labels.values().any(|v| v.contains("nowhere")))
    );

    // Open connections: one held open shows up, and goes when closed.
    let (mut sender, connection) =
        wasmgate_tests::http1_connection::<Full<Bytes>>(gateway.addr).await;
    let response = sender
        .send_request(
            Request::get("/fine")
                .header("host", "x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(value(&scrape(metrics).await, "wasmgate_open_connections", &[]) >= 1.0);
    connection.abort();
    let mut open = 1.0;
    for _ in 0..50 {
        open = value(&scrape(metrics).await, "wasmgate_open_connections", &[]);
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0.0);
}

#[tokio::test]
async fn admin_status_endpoints_answer_and_refuse_wrong_methods() {
    let upstream = TestUpstream::start("main").await;
    let gateway = TestGateway::start(&versioned(&upstream, 0, true)).await;
    let addr = gateway.admin();
    assert_eq!(admin(addr, "GET", "/status").await.status, StatusCode::OK);
    assert_eq!(admin(addr, "GET", "/status/ready").await.text(), "ready\n");
    let wrong = admin(addr, "GET", "/reload").await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), "POST");
    assert_eq!(
        admin(addr, "DELETE", "/metrics").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        admin(addr, "GET", "/nothing").await.status,
        StatusCode::NOT_FOUND
    );
    let config: serde_json::Value =
        serde_json::from_slice(&admin(addr, "GET", "/config").await.body).unwrap();
    let text = std::fs::read(gateway.dir.path().join("manifest.yaml")).unwrap();
    let expected = wasmgate::runtime::WasmDigest::of(&text).to_hex();
    assert_eq!(config["sha256"], expected.as_str());
    assert_eq!(config["routes"], serde_json::json!(["versioned"]));
}

/// A manifest for the process tests: an admin listener, a drain delay, one route.
fn drain_manifest(upstream: &TestUpstream, delay: &str, timeout: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nadmin: {{ bind: \"127.0.0.1:0\" }}\nshutdown: {{ delay: {delay}, drain_timeout: {timeout} }}\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: rewrite, config: {{ response: {{ set: {{ x-gen: one }} }} }} }}] }}\n",
        upstream.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_exits_zero() {
    let upstream = TestUpstream::start("main").await;
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &drain_manifest(&upstream, "600ms", "20s"),
        &[],
    )
    .await;
    let admin_addr = gateway.listener_addr("admin").await;
    let addr = gateway.addr;

    // SIGHUP reloads.
    let text = std::fs::read_to_string(gateway.dir.path().join("manifest.yaml")).unwrap();
    std::fs::write(
        gateway.dir.path().join("manifest.yaml"),
        text.replace("x-gen: one", "x-gen: two"),
    )
    .unwrap();
    gateway.signal("HUP");
    gateway.line_containing("manifest reloaded").await;
    assert_eq!(
        gateway
            .send(Request::get("/").body(Full::default()).unwrap())
            .await
            .header("x-gen"),
        "two"
    );

    // Requests in flight when SIGTERM arrives, each taking 1.5 s at the upstream.
    let finished = Arc::new(AtomicUsize::new(0));
    let mut in_flight = Vec::new();
    for _ in 0..20 {
        let finished = finished.clone();
        in_flight.push(tokio::spawn(async move {
            let response = send(
                addr,
                Request::get("/delay/1500").body(Full::default()).unwrap(),
            )
            .await;
            assert_eq!(response.status, StatusCode::OK);
            assert_eq!(response.header("x-gen"), "two");
            finished.fetch_add(1, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.signal("TERM");
    gateway.line_containing("draining").await;

    // During the delay: not ready, but still serving new connections.
    let ready = admin(admin_addr, "GET", "/status/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let late = send(
        addr,
        Request::get("/during-delay").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(late.status, StatusCode::OK);

    for request in in_flight {
        request
            .await
            .expect("a request in flight finished with 200");
    }
    assert_eq!(finished.load(Ordering::Relaxed), 20);
    assert_eq!(gateway.exit_code(Duration::from_secs(20)).await, Some(0));
    // After the drain nothing listens.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let upstream = TestUpstream::start("main").await;
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &drain_manifest(&upstream, "0s", "60s"),
        &[],
    )
    .await;
    let addr = gateway.addr;
    // Held for 10 s at the upstream: a drain would wait for it.
    let slow = tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        client
            .request(
                Request::get(format!("http://{addr}/slow"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.signal("TERM");
    gateway.line_containing("draining").await;
    let started = std::time::Instant::now();
    gateway.signal("INT");
    let code = gateway.exit_code(Duration::from_secs(5)).await;
    assert_eq!(code, Some(130));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(slow.await.unwrap().is_err(), "the held request was cut");
}

fn cached_manifest(upstream: &TestUpstream, cache: &std::path::Path, pin: Option<&str>) -> String {
    let pin = pin
        .map(|p| format!(", sha256: \"{p}\""))
        .unwrap_or_default();
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugin_cache: \"{}\"\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\"{pin} }}\n  probe: {{ source: \"{{plugins}}/probe_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: t }} }}, {{ name: rewrite, config: {{ response: {{ set: {{ x-cached: \"yes\" }} }} }} }}] }}\n",
        cache.display(),
        upstream.url()
    )
}

fn entries(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    entries.sort();
    entries
}

#[tokio::test]
async fn compiled_plugins_are_cached_on_disk_and_bad_entries_are_rebuilt() {
    use wasmgate::runtime::CacheStats;
    let upstream = TestUpstream::start("main").await;
    let cache = tempfile::tempdir().unwrap();
    let manifest = cached_manifest(&upstream, cache.path(), None);
    let serves = |gateway: TestGateway| async move {
        let response = gateway.get("x", "/").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.header("x-cached"), "yes");
        gateway.gateway().snapshot().cache
    };

    let cold = serves(TestGateway::start(&manifest).await).await;
    assert_eq!(
        cold,
        CacheStats {
            compiled: 2,
            ..CacheStats::default()
        }
    );
    let written = entries(cache.path());
    assert_eq!(written.len(), 2);

    let warm = serves(TestGateway::start(&manifest).await).await;
    assert_eq!(
        warm,
        CacheStats {
            disk: 2,
            ..CacheStats::default()
        }
    );

    // A flipped bit: the checksum catches it; compiled again and rewritten.
    let mut bytes = std::fs::read(&written[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&written[0], &bytes).unwrap();
    // A well-formed entry whose content is not a compiled component: wasmtime refuses it.
    let forged_payload = b"not a wasmtime artifact".to_vec();
    let mut forged = b"WGCWASM1".to_vec();
    forged.extend_from_slice(&wasmgate_sha256(&forged_payload));
    forged.extend_from_slice(&forged_payload);
    std::fs::write(&written[1], &forged).unwrap();

    let repaired = serves(TestGateway::start(&manifest).await).await;
    assert_eq!(
        repaired,
        CacheStats {
            compiled: 2,
            rejected: 2,
            ..CacheStats::default()
        }
    );
    let again = serves(TestGateway::start(&manifest).await).await;
    assert_eq!(
        again,
        CacheStats {
            disk: 2,
            ..CacheStats::default()
        }
    );
}

fn wasmgate_sha256(bytes: &[u8]) -> [u8; 32] {
    wasmgate::runtime::WasmDigest::of(bytes).0
}

#[tokio::test]
async fn a_pinned_plugin_loads_only_with_its_hash() {
    let upstream = TestUpstream::start("main").await;
    let cache = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(wasmgate_tests::plugin("header_rewrite")).unwrap();
    let right = wasmgate::runtime::WasmDigest::of(&wasm).to_hex();
    let gateway = TestGateway::start(&cached_manifest(&upstream, cache.path(), Some(&right))).await;
    assert_eq!(gateway.get("x", "/").await.status, StatusCode::OK);

    let wrong = "0".repeat(64);
    let Err(err) =
        TestGateway::try_start(&cached_manifest(&upstream, cache.path(), Some(&wrong))).await
    else {
        panic!("a mismatched pin refuses to load");
    };
    let err = err.to_string();
    assert!(err.contains("plugin `rewrite`"), "{err}");
    assert!(
        err.contains(&format!(
            "has sha256 {right}, but the manifest pins {wrong}"
        )),
        "{err}"
    );

    let Err(malformed) =
        TestGateway::try_start(&cached_manifest(&upstream, cache.path(), Some("abc"))).await
    else {
        panic!("a malformed pin is refused");
    };
    let malformed = malformed.to_string();
    assert!(malformed.contains("64 hex digits"), "{malformed}");
}

/// An OTLP/HTTP (JSON) collector: keeps every span it is sent.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
        let keep = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let keep = keep.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let keep = keep.clone();
                            async move {
                                assert_eq!(request.uri().path(), "/v1/traces");
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let export: serde_json::Value =
                                    serde_json::from_slice(&body).expect("OTLP JSON");
                                for resource in
                                    export["resourceSpans"].as_array().into_iter().flatten()
                                {
                                    for scope in
                                        resource["scopeSpans"].as_array().into_iter().flatten()
                                    {
                                        for span in scope["spans"].as_array().into_iter().flatten()
                                        {
                                            keep.lock().unwrap().push(span.clone());
                                        }
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    Bytes::from_static(b"{}"),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, spans, task }
    }

    /// The spans of one trace, once `count` of them have arrived (within 10 s).
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let spans: Vec<_> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s["traceId"] == trace_id)
                .cloned()
                .collect();
            if spans.len() >= count {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "fewer than {count} spans of trace {trace_id} arrived: {:?}",
            self.spans.lock().unwrap()
        );
    }
}

fn span<'a>(spans: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
}

#[tokio::test]
async fn traceparent_reaches_the_upstream_with_our_span_as_parent() {
    let collector = Collector::start().await;
    let upstream = TestUpstream::start("main").await;
    // The rewrite has a placeholder, so that it is called (fixed values are made by the
    // gateway without a call, and without its metrics and span).
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\ntracing: {{ otlp_endpoint: \"http://{}/v1/traces\", export_interval: 100ms }}\nplugins:\n  rewrite: {{ source: \"{{plugins}}/header_rewrite.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: traced, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: rewrite, config: {{ request: {{ set: {{ x-a: \"{{route}}\" }} }} }} }}] }}\n",
        collector.addr,
        upstream.url()
    );
    let gateway = TestGateway::start(&manifest).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let response = gateway
        .send(
            Request::get("/orders")
                .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
                .header("tracestate", "vendor=opaque")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    let seen = upstream.last();
    let sent = seen.headers["traceparent"].to_str().unwrap().to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace_id, "the trace continues upstream");
    assert_ne!(
        parts[2], client_span,
        "the upstream's parent is our span, not the client's"
    );
    assert_eq!(parts[3], "01");
    assert_eq!(seen.headers["tracestate"], "vendor=opaque");

    let spans = collector.trace(trace_id, 3).await;
    let server = span(&spans, "GET traced");
    assert_eq!(server["parentSpanId"], client_span);
    let plugin = span(&spans, "plugin rewrite request");
    assert_eq!(plugin["parentSpanId"], server["spanId"]);
    let call = span(&spans, "upstream main");
    assert_eq!(call["parentSpanId"], server["spanId"]);
    assert_eq!(
        call["spanId"], parts[2],
        "the upstream's parent is the upstream-call span"
    );

    // Without a traceparent, a trace starts here.
    gateway.get("x", "/fresh").await;
    let started = upstream.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let fresh_trace = started.split('-').nth(1).unwrap().to_string();
    assert_ne!(fresh_trace, trace_id);
    let spans = collector.trace(&fresh_trace, 3).await;
    assert!(
        span(&spans, "GET traced")["parentSpanId"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
}

#[tokio::test]
async fn without_tracing_traceparent_passes_unchanged_and_logs_carry_the_trace_id() {
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  probe: {{ source: \"{{plugins}}/probe_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: plain, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: logged }} }}] }}\n",
        upstream.url()
    );
    let mut gateway = CliGateway::start(env!("CARGO_BIN_EXE_wasmgate-cli"), &manifest, &[]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let response = gateway
        .send(
            Request::get("/x")
                .header("traceparent", traceparent)
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(upstream.last().headers["traceparent"], traceparent);
    let line = gateway.line_containing("probe logged saw").await;
    assert!(
        line.contains(r#"trace_id="0af7651916cd43dd8448eb211c80319c""#),
        "{line}"
    );
    let request_id = response.header("x-request-id");
    assert!(
        line.contains(&format!(r#"request_id="{request_id}""#)),
        "{line}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_request_id() {
    let upstream = TestUpstream::start("main").await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = wasmgate_tests::write_manifest(
        dir.path(),
        &format!(
            "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  probe: {{ source: \"{{plugins}}/probe_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: plain, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: probe, config: {{ tag: json }} }}] }}\n",
            upstream.url()
        ),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&manifest)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let addr = loop {
        let line = next_json(&mut lines).await;
        if line["message"] == "listening" {
            break line["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let response = send(addr, Request::get("/x").body(Full::default()).unwrap()).await;
    assert_eq!(response.status, StatusCode::OK);
    let logged = loop {
        let line = next_json(&mut lines).await;
        if line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("probe json saw"))
        {
            break line;
        }
    };
    assert_eq!(logged["request_id"], response.header("x-request-id"));
    assert_eq!(logged["route"], "plain");
    assert_eq!(logged["level"], "INFO");
}

async fn next_json(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("a log line in time")
        .unwrap()
        .expect("the gateway is running");
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_to_http2_clients_and_finishes_their_requests() {
    let upstream = TestUpstream::start("main").await;
    let mut gateway = TestGateway::start(&format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nshutdown: {{ delay: 0s, drain_timeout: 10s }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main }}\n",
        upstream.url()
    ))
    .await;
    let addr = gateway.addr;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("an h2c handshake");
    let connection = tokio::spawn(connection);
    let request = move |path: &str| {
        Request::get(format!("http://{addr}{path}"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let mut first = sender.clone();
    let in_flight = tokio::spawn(async move { first.send_request(request("/delay/800")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let drained = tokio::spawn(gateway.take().drain());
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(drained.await.unwrap(), wasmgate::Drained::Clean);
    // GOAWAY ends the connection cleanly, and it takes no new stream.
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the connection closed after GOAWAY")
        .unwrap()
        .expect("closed without a protocol error");
    let mut late = sender;
    assert!(late.send_request(request("/late")).await.is_err());
}

/// Log lines are buffered per event-loop thread (`log_output`): none is lost when the process
/// ends, whichever of its worker threads wrote it, and they arrive while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_log_line_is_written_by_the_time_the_process_exits() {
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nreload: {{ watch: false }}\nplugins:\n  log: {{ source: \"{{plugins}}/access_log.wasm\", isolation: pooled }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: log, config: {{ fields: [path, status] }} }}] }}\n",
        upstream.url()
    );
    let mut gateway = CliGateway::start(
        env!("CARGO_BIN_EXE_wasmgate-cli"),
        &manifest,
        &[("WASMGATE_WORKERS", "3")],
    )
    .await;
    // One line arrives while the gateway idles: nothing waits for a full buffer.
    let first = gateway
        .send(
            Request::get("/counted/first")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    gateway.line_containing("/counted/first").await;
    // A connection per request, so that the kernel spreads them over the worker threads.
    let requests = 60;
    for i in 0..requests {
        let response = gateway
            .send(
                Request::get(format!("/counted/{i}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(response.status, StatusCode::OK);
    }
    gateway.signal("TERM");
    let lines = gateway.remaining_lines().await;
    for i in 0..requests {
        let path = format!("\\\"path\\\":\\\"/counted/{i}\\\"");
        let plain = format!("\"path\":\"/counted/{i}\"");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&path) || l.contains(&plain)),
            "no access log line for request {i}:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(gateway.exit_code(Duration::from_secs(20)).await, Some(0));
}
