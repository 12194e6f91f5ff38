//! Start-up cost of a manifest with the five bundled plugins: compiling them from scratch against
//! reading them from the on-disk compiled-plugin cache (`plugin_cache`). Each iteration uses a
//! fresh engine, as a restarted process would, so the in-memory cache plays no part.
//!
//! Run with `cargo bench -p wasmgate-tests --bench startup`.

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmgate::manifest::Manifest;
use wasmgate::runtime::Runtime;
use wasmgate::snapshot::{Services, Snapshot};

fn manifest(dir: &Path, cache: Option<&Path>) -> Manifest {
    let plugins = wasmgate_tests::plugin_dir().display().to_string();
    let cache = cache
        .map(|c| format!("plugin_cache: \"{}\"\n", c.display()))
        .unwrap_or_default();
    let text = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\n{cache}plugins:\n  jwt: {{ source: \"{plugins}/jwt_auth.wasm\" }}\n  key: {{ source: \"{plugins}/api_key.wasm\" }}\n  log: {{ source: \"{plugins}/access_log.wasm\" }}\n  rewrite: {{ source: \"{plugins}/header_rewrite.wasm\" }}\n  cors: {{ source: \"{plugins}/cors.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"http://127.0.0.1:9\" }}] }}\nroutes:\n  - {{ name: r, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: log }}, {{ name: rewrite, config: {{ request: {{ set: {{ x-a: b }} }} }} }}] }}\n"
    );
    let path = dir.join("manifest.yaml");
    std::fs::write(&path, text).unwrap();
    Manifest::load(&path).unwrap()
}

fn startup(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cold = manifest(dir.path(), None);
    let warm = manifest(dir.path(), Some(&cache));
    let build = |manifest: &Manifest| {
        let runtime = Runtime::new().unwrap();
        let snapshot = tokio
            .block_on(Snapshot::build(manifest, &runtime, &Services::default()))
            .unwrap();
        drop(snapshot);
    };
    // Fill the cache once.
    build(&warm);

    let mut group = c.benchmark_group("startup_five_plugins");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    group.bench_function("compile", |b| b.iter(|| build(&cold)));
    group.bench_function("disk_cache", |b| b.iter(|| build(&warm)));
    group.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
