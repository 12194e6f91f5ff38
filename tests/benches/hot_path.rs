//! Criterion benchmarks of the per-request hot path: one plugin invocation as the proxy makes it
//! (a fresh instance, configured or started from the use's pre-initialised image, a request
//! phase that reads two headers and sets one, then release), its parts, and route matching among
//! 1,000 routes.
//!
//! Run with `cargo bench -p wasmgate-tests --bench hot_path`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Method};
use wasmgate::forwarded::ClientAddr;
use wasmgate::manifest::MatchSpec;
use wasmgate::metrics::Metrics;
use wasmgate::router::{RouteMatch, RouterBuilder};
use wasmgate::runtime::fixed::{self, FixedEdits};
use wasmgate::runtime::{
    Decision, Exchange, InstancePool, Lease, LoadSession, LoadedPlugin, Phases, PluginBudget,
    Runtime,
};

/// The binary's allocator: a plugin call allocates on both sides of the sandbox (the exchange,
/// strings lifted out of the guest), and what that costs is the binary's, not the system
/// allocator's.
#[global_allocator]
static ALLOCATOR: wasmgate::allocator::MiMalloc = wasmgate::allocator::MiMalloc;

/// api-key's benchmark configuration: one consumer, whose key is `bench-key` (its SHA-256).
const API_KEY_CONFIG: &str = r#"{"keys":[{"consumer":"bench","sha256":"b0962662e937d44c699c8305d90cbf190b3150c59b13863d1380b5cc3c711bb7"}]}"#;

/// header-rewrite's benchmark configuration: one header set each way.
const REWRITE_CONFIG: &str =
    r#"{"request":{"set":{"x-gateway":"wasmgate"}},"response":{"set":{"x-served-by":"wasmgate"}}}"#;

fn budget() -> PluginBudget {
    PluginBudget {
        deadline: Duration::from_millis(50),
        memory: 16 << 20,
        instances: 512,
        host_calls: 10_000,
        headers: 100,
        header_value: 8 << 10,
        log_line: 8 << 10,
        body: 1 << 20,
        body_access: false,
    }
}

/// Loads a built plugin by its file stem, as a manifest load would.
fn load(runtime: &Runtime, metrics: &Metrics, name: &str, stem: &str) -> LoadedPlugin {
    runtime
        .load(
            name,
            &wasmgate_tests::plugin(stem),
            None,
            budget(),
            &mut LoadSession::default(),
            metrics.plugin(name),
        )
        .unwrap()
}

/// Makes a request's exchange from `parts` each time it is called, as the proxy does per
/// request (same client, route and request id every time).
fn exchanges(parts: http::request::Parts) -> impl Fn() -> Box<Exchange> {
    let client = Arc::new(ClientAddr::new("127.0.0.1:50000".parse().unwrap()));
    let route: Arc<str> = Arc::from("bench");
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    move || {
        Box::new(Exchange::new(
            parts.clone(),
            client.clone(),
            route.clone(),
            id.clone(),
        ))
    }
}

fn plugin_invocation(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Runtime::new().unwrap();
    let plugin = load(&runtime, &Metrics::new(), "bench", "bench_plugin");
    let (parts, ()) = http::Request::get("/users/42")
        .header("x-a", "alpha")
        .header("x-b", "beta")
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts();
    let exchange = exchanges(parts);

    let mut group = c.benchmark_group("plugin");
    group.bench_function(
        "fresh instance + configure + on_request (per request)",
        |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut instance = plugin.instantiate("null").await.unwrap();
                    let (exchange, decision) = instance.on_request(exchange()).await;
                    assert!(matches!(decision, Ok(Decision::Continue)));
                    exchange
                })
            })
        },
    );
    group.bench_function("fresh instance + configure", |b| {
        b.iter(|| tokio.block_on(async { plugin.instantiate("null").await.unwrap() }))
    });
    // isolation: per-request, as the proxy serves it once the use's image is made: a fresh
    // instance that starts configured.
    let bytes = std::fs::read(wasmgate_tests::plugin("bench_plugin")).unwrap();
    let image = tokio
        .block_on(runtime.preinitialize(&plugin, &bytes, "null"))
        .unwrap();
    group.bench_function(
        "fresh instance from the pre-initialised image + on_request (per request)",
        |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut instance = plugin.instantiate_preinitialized(&image).await.unwrap();
                    let (exchange, decision) = instance.on_request(exchange()).await;
                    assert!(matches!(decision, Ok(Decision::Continue)));
                    exchange
                })
            })
        },
    );
    group.bench_function("fresh instance from the pre-initialised image", |b| {
        b.iter(|| {
            tokio.block_on(async { plugin.instantiate_preinitialized(&image).await.unwrap() })
        })
    });
    let mut warm = tokio.block_on(plugin.instantiate("null")).unwrap();
    group.bench_function("on_request on a live instance (2 reads, 1 write)", |b| {
        b.iter(|| {
            tokio.block_on(async {
                let (exchange, decision) = warm.on_request(exchange()).await;
                assert!(matches!(decision, Ok(Decision::Continue)));
                exchange
            })
        })
    });
    // The same call, with the two headers read through host calls (each one out of the
    // sandbox and, to place the string, back in), as before contract 0.2.3.
    let mut host_reads = tokio
        .block_on(plugin.instantiate(r#"{"host_reads": true}"#))
        .unwrap();
    group.bench_function(
        "on_request on a live instance, reads through host calls (2 reads, 1 write)",
        |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let (exchange, decision) = host_reads.on_request(exchange()).await;
                    assert!(matches!(decision, Ok(Decision::Continue)));
                    exchange
                })
            })
        },
    );
    // The fixture's response phase is the SDK's default, which does nothing: what entering and
    // leaving a plugin costs, apart from any host call.
    group.bench_function("empty call on a live instance (no host calls)", |b| {
        b.iter(|| {
            tokio.block_on(async {
                let (exchange, outcome) = warm.on_response(exchange()).await;
                assert!(outcome.is_ok());
                exchange
            })
        })
    });
    group.bench_function("exchange construction alone", |b| b.iter(&exchange));

    // isolation: pooled, as the proxy does it: take a configured instance from the pool, run the
    // request phase, give it back.
    let pool = Arc::new(InstancePool::new(8));
    group.bench_function("pooled: acquire + on_request + release", |b| {
        b.iter(|| {
            tokio.block_on(async {
                let mut lease = Lease::acquire(&plugin, "null", Some(&pool), None)
                    .await
                    .unwrap();
                let (exchange, decision) = lease.on_request(exchange()).await;
                assert!(matches!(decision, Ok(Decision::Continue)));
                exchange
            })
        })
    });
    group.finish();
}

/// The three-plugin chain of the load benchmark (api-key, header-rewrite, access-log), pooled:
/// request phase in order, response phase in reverse, access-log's completion phase.
fn three_plugin_chain(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Runtime::new().unwrap();
    let metrics = Metrics::new();
    let load = |name: &str, stem: &str| load(&runtime, &metrics, name, stem);
    let chain = [
        (load("api-key", "api_key"), API_KEY_CONFIG.to_string()),
        (
            load("header-rewrite", "header_rewrite"),
            REWRITE_CONFIG.to_string(),
        ),
        (load("access-log", "access_log"), "null".to_string()),
    ];
    let pools: Vec<Arc<InstancePool>> = (0..3).map(|_| Arc::new(InstancePool::new(8))).collect();
    let key = "bench-key";
    let (parts, ()) = http::Request::get("/users/42")
        .header("x-api-key", key)
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts();
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let exchange = exchanges(parts);

    // What each use fixes (contract 0.2.4), asked once as a manifest load asks it.
    let uses: Vec<(Phases, FixedEdits)> = tokio.block_on(async {
        let mut answers = Vec::new();
        for ((plugin, config), pool) in chain.iter().zip(&pools) {
            let mut lease = Lease::acquire(plugin, config, Some(pool), None)
                .await
                .unwrap();
            let fixed = lease.ask_fixed().await.unwrap().unwrap_or_default();
            answers.push((lease.phases(), fixed));
        }
        answers
    });
    assert!(
        uses[1].1.request.is_some() && uses[1].1.response.is_some(),
        "header-rewrite fixes both phases with this configuration"
    );

    // `made`: fixed edits are made in the plugin's place, as the proxy makes them, instead of
    // calling the phase; a plugin whose phases are all fixed then takes no instance. Without
    // it every phase a plugin asks for is called (the proxy before contract 0.2.4).
    let run = |made: bool| {
        let exchange = &exchange;
        let (chain, pools, uses, response) = (&chain, &pools, &uses, &response);
        async move {
            let mut exchange = exchange();
            let mut calls = 0;
            let mut ran = Vec::with_capacity(3);
            for (((plugin, config), pool), (phases, fixed)) in chain.iter().zip(pools).zip(uses) {
                let (phases, fixed) = (*phases, made.then_some(fixed));
                let all_fixed = fixed.is_some_and(|f| {
                    !phases.complete
                        && (!phases.request || f.request.is_some())
                        && (!phases.response || f.response.is_some())
                });
                let mut lease = match all_fixed {
                    true => None,
                    false => Some(
                        Lease::acquire(plugin, config, Some(pool), None)
                            .await
                            .unwrap(),
                    ),
                };
                if phases.request {
                    match (fixed.and_then(|f| f.request.as_deref()), &mut lease) {
                        (Some(edits), _) => {
                            fixed::apply(edits, &mut exchange.request.headers, 0, 100).unwrap()
                        }
                        (None, Some(lease)) => {
                            let (returned, decision) = lease.on_request(exchange).await;
                            exchange = returned;
                            calls += 1;
                            match decision {
                                Ok(Decision::Continue) => {}
                                other => panic!("the chain refused the request: {other:?}"),
                            }
                        }
                        (None, None) => unreachable!("a called phase has an instance"),
                    }
                }
                ran.push((phases, fixed, lease));
            }
            exchange.response = Some(response.clone());
            for (_, fixed, lease) in ran.iter_mut().rev().filter(|r| r.0.response) {
                match (fixed.and_then(|f| f.response.as_deref()), lease) {
                    (Some(edits), _) => {
                        let headers = &mut exchange.response_mut().unwrap().headers;
                        fixed::apply(edits, headers, 0, 100).unwrap();
                    }
                    (None, Some(lease)) => {
                        let (returned, outcome) = lease.on_response(exchange).await;
                        exchange = returned;
                        calls += 1;
                        outcome.unwrap();
                    }
                    (None, None) => unreachable!("a called phase has an instance"),
                }
            }
            for (_, _, lease) in ran.iter_mut().rev() {
                if let Some(lease) = lease.as_mut().filter(|l| l.phases().complete) {
                    let (returned, outcome) = lease.on_complete(exchange).await;
                    exchange = returned;
                    calls += 1;
                    outcome.unwrap();
                }
            }
            (exchange, calls)
        }
    };
    // Check once that the chain lets the request through, makes header-rewrite's edits and
    // makes the calls the proxy would, so the bench measures the real path: api-key's request
    // phase and access-log's completion, and header-rewrite's two phases unless they are made.
    for (made, expected_calls) in [(false, 4), (true, 2)] {
        let (exchange, calls) = tokio.block_on(run(made));
        assert_eq!(calls, expected_calls, "made: {made}");
        assert_eq!(exchange.request.headers["x-gateway"], "wasmgate");
        assert_eq!(
            exchange.response.as_ref().unwrap().headers["x-served-by"],
            "wasmgate"
        );
    }
    c.bench_function(
        "chain/api-key + header-rewrite + access-log, pooled, the phases each asks for",
        |b| b.iter(|| tokio.block_on(run(false))),
    );
    c.bench_function(
        "chain/api-key + header-rewrite + access-log, pooled, as the proxy runs it (fixed edits made, not called)",
        |b| b.iter(|| tokio.block_on(run(true))),
    );
}

/// A fresh instance per request of each bundled plugin of the benchmark chains, with its
/// benchmark configuration: configured per request, and started from the use's pre-initialised
/// image (what `isolation: per-request` serves once the image is made).
fn bundled_fresh_instances(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Runtime::new().unwrap();
    let metrics = Metrics::new();
    let secret = "0123456789abcdef0123456789abcdef-bench";
    let jwt_config = format!(
        r#"{{"algorithms":["HS256"],"keys":[{{"secret":"{secret}"}}],"issuers":["bench"]}}"#
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "bench", "iss": "bench", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    let (parts, ()) = http::Request::get("/users/42")
        .header("x-api-key", "bench-key")
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts();
    let exchange = exchanges(parts);
    for (stem, config) in [
        ("api_key", API_KEY_CONFIG),
        ("header_rewrite", REWRITE_CONFIG),
        ("jwt_auth", jwt_config.as_str()),
    ] {
        let plugin = load(&runtime, &metrics, stem, stem);
        let bytes = std::fs::read(wasmgate_tests::plugin(stem)).unwrap();
        let image = tokio
            .block_on(runtime.preinitialize(&plugin, &bytes, config))
            .unwrap();
        let mut group = c.benchmark_group(format!("fresh/{stem}"));
        group.bench_function("instance + configure + on_request", |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut instance = plugin.instantiate(config).await.unwrap();
                    let (exchange, decision) = instance.on_request(exchange()).await;
                    assert!(matches!(decision, Ok(Decision::Continue)), "{decision:?}");
                    exchange
                })
            })
        });
        group.bench_function("instance from the image + on_request", |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut instance = plugin.instantiate_preinitialized(&image).await.unwrap();
                    let (exchange, decision) = instance.on_request(exchange()).await;
                    assert!(matches!(decision, Ok(Decision::Continue)), "{decision:?}");
                    exchange
                })
            })
        });
        group.finish();
    }
}

fn route_matching(c: &mut Criterion) {
    let mut builder = RouterBuilder::default();
    for i in 0..1000 {
        let spec = MatchSpec {
            host: (i % 4 == 0).then(|| format!("api{}.example.com", i % 10)),
            path: (i % 2 == 0).then(|| format!("/service{i}/items/{{id}}")),
            prefix: (i % 2 == 1).then(|| format!("/service{i}")),
            methods: (i % 3 == 0).then(|| vec!["GET".to_string(), "POST".to_string()]),
        };
        builder.add(i, &spec).unwrap();
    }
    let router = builder.build();
    c.bench_function("router/lookup among 1000 routes", |b| {
        b.iter(|| {
            let found = router.lookup(
                Some("api4.example.com"),
                "/service998/items/7",
                &Method::GET,
            );
            assert!(matches!(found, RouteMatch::Found(_)));
        })
    });
}

criterion_group!(
    benches,
    plugin_invocation,
    three_plugin_chain,
    bundled_fresh_instances,
    route_matching
);
criterion_main!(benches);
