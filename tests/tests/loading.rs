//! Loading a manifest: `wasmgate check` and `wasmgate run` refuse bad input with the file, line,
//! route and plugin named, and accept the bundled example.

use std::path::Path;
use std::process::{Command, Output};

use wasmgate_tests::{
    CliGateway, TestUpstream, assert_snapshot, plugin, plugin_dir, workspace_root, write_manifest,
};

fn cli(args: &[&str], manifest: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
        .args(args)
        .arg("-c")
        .arg(manifest)
        .env("RUST_LOG", "error")
        .output()
        .expect("running wasmgate")
}

/// A manifest with one plugin (name, file stem) and one route through it that takes every path.
fn one_plugin_manifest(
    upstream: &TestUpstream,
    (plugin, stem): (&str, &str),
    route: &str,
    config: &str,
) -> String {
    format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nplugins:\n  {plugin}: {{ source: \"{{plugins}}/{stem}.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: {route}, match: {{ prefix: / }}, upstream: main, plugins: [{{ name: {plugin}, config: {config} }}] }}\n",
        upstream.url()
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const BAD_CONFIG: &str = r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  probe: { source: "{plugins}/probe_plugin.wasm" }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - name: fine
    match: { prefix: /fine }
    upstream: main
    plugins:
      - { name: probe, config: { tag: ok } }
  - name: broken
    match: { prefix: /broken }
    upstream: main
    plugins:
      - { name: probe, config: { tag: "" } }
      - { name: probe, config: { tga: typo } }
"#;

#[test]
fn a_bad_plugin_config_fails_check_and_run_naming_file_line_route_and_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), BAD_CONFIG);
    let shown = manifest.display().to_string();
    for command in ["check", "run"] {
        let output = cli(&[command], &manifest);
        assert_eq!(output.status.code(), Some(1), "{command} must fail");
        let err = stderr(&output);
        // Every error, each with its location.
        assert!(
            err.contains(&format!(
                "{shown}:17: route `broken`: plugin `probe`: invalid config: `tag` must not be empty"
            )),
            "{command}: {err}"
        );
        assert!(
            err.contains(&format!(
                "{shown}:18: route `broken`: plugin `probe`: invalid config: unknown field `tga`"
            )),
            "{command}: {err}"
        );
        assert!(!err.contains("route `fine`"), "{command}: {err}");
    }
}

#[test]
fn a_missing_or_invalid_wasm_file_fails_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("garbage.wasm"), b"\0asm but not really").unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  missing: { source: nowhere/missing.wasm }
  garbage: { source: garbage.wasm }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - name: r
    match: { prefix: / }
    upstream: main
    plugins: [{ name: missing }, { name: garbage }]
"#,
    );
    let output = cli(&["check"], &manifest);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    // Relative sources resolve against the manifest's folder, and the error names the result.
    let missing = dir.path().join("nowhere/missing.wasm");
    assert!(
        err.contains(&format!(
            "plugin `missing`: cannot read `{}`",
            missing.display()
        )),
        "{err}"
    );
    let garbage = dir.path().join("garbage.wasm");
    assert!(
        err.contains(&format!(
            "plugin `garbage`: `{}` is not a valid WebAssembly component",
            garbage.display()
        )),
        "{err}"
    );
}

#[test]
fn a_relative_plugin_path_resolves_against_the_manifest_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    std::fs::copy(plugin("header_rewrite"), dir.path().join("plugins/hr.wasm")).unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  hr: { source: plugins/hr.wasm }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - name: r
    match: { prefix: / }
    upstream: main
    plugins: [{ name: hr, config: { request: { set: { x-a: b } } } }]
"#,
    );
    // Run from elsewhere, so that only the manifest's folder can explain success.
    let output = Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
        .current_dir(std::env::temp_dir())
        .args(["check", "-c"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("OK"));
}

#[test]
fn a_malformed_manifest_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        "version: 1\nlisteners: [{ name: public, bind: \"127.0.0.1:0\" }]\nroutes:\n  - name: r\n    upstreem: x\n",
    );
    let output = cli(&["check"], &manifest);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains(&manifest.display().to_string()), "{err}");
    assert!(err.contains("upstreem"), "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn check_accepts_the_bundled_example() {
    // The example names the plugins where the build puts them.
    wasmgate_tests::plugin_dir();
    let example = workspace_root().join("examples/gateway.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
        .args(["check", "-c"])
        .arg(&example)
        .env("DEMO_JWT_SECRET", "a-demo-secret-for-the-check-test-0123")
        .output()
        .expect("running wasmgate");
    assert!(output.status.success(), "{}", stderr(&output));
}

#[tokio::test]
async fn run_serves_and_logs_where_it_listens() {
    let upstream = TestUpstream::start("main").await;
    let manifest = one_plugin_manifest(&upstream, ("probe", "probe_plugin"), "r", "{ tag: p }");
    // `start` finds the listening address in the log, or fails.
    let mut gateway = CliGateway::start(env!("CARGO_BIN_EXE_wasmgate-cli"), &manifest, &[]).await;
    let response = gateway
        .send(
            http::Request::get("/hello")
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, http::StatusCode::OK);
    assert_eq!(upstream.last().uri, "/hello");
    // The plugin's log call comes out in the gateway's log, tagged with plugin and route.
    let logged = gateway.line_containing("probe p saw GET /hello").await;
    assert!(
        logged.contains("plugin=\"probe\"") && logged.contains("route=\"r\""),
        "{logged}"
    );
    gateway.stop().await;
}

#[test]
fn version_prints_the_crate_version() {
    let output = Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.trim().ends_with(env!("CARGO_PKG_VERSION")), "{text}");
}

/// `check`'s whole output, with the machine's paths replaced.
fn check_output(dir: &Path, manifest: &Path) -> (Option<i32>, String) {
    let output = cli(&["check"], manifest);
    let text = format!(
        "{}{}",
        stderr(&output),
        String::from_utf8_lossy(&output.stdout)
    )
    .replace(&plugin_dir().display().to_string(), "$PLUGINS")
    .replace(&dir.display().to_string(), "$DIR");
    (output.status.code(), text)
}

#[test]
fn check_refuses_components_that_are_not_plugins_or_import_what_is_not_granted() {
    let dir = tempfile::tempdir().unwrap();
    // A core module, an empty component (no world at all), and bytes that are not wasm.
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.path().join("empty.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    std::fs::write(dir.path().join("garbage.wasm"), b"not wasm at all").unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  sockets: { source: "{plugins}/sockets_plugin.wasm" }
  core: { source: core.wasm }
  empty: { source: empty.wasm }
  garbage: { source: garbage.wasm }
  missing: { source: missing.wasm }
  huge: { source: "{plugins}/probe_plugin.wasm", memory: 1GiB }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - name: r
    match: { prefix: / }
    upstream: main
    plugins: [{ name: sockets }, { name: core }, { name: empty }]
"#,
    );
    let (code, text) = check_output(dir.path(), &manifest);
    assert_eq!(code, Some(1), "{text}");
    assert_snapshot("check-refused-components", &text);
}

#[test]
fn check_warns_when_an_auth_plugin_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  deny: { source: "{plugins}/deny_plugin.wasm" }
  probe: { source: "{plugins}/probe_plugin.wasm" }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - name: careless
    match: { prefix: /careless }
    upstream: main
    plugins:
      - { name: probe, config: { tag: p }, on_failure: fail-open }
      - { name: deny, on_failure: fail-open }
  - name: careful
    match: { prefix: /careful }
    upstream: main
    plugins:
      - { name: deny }
"#,
    );
    let (code, text) = check_output(dir.path(), &manifest);
    assert_eq!(code, Some(0), "{text}");
    assert_snapshot("check-auth-fail-open", &text);
}

#[tokio::test]
async fn the_operator_log_reports_a_failure_in_full_and_the_client_gets_only_the_id() {
    let upstream = TestUpstream::start("main").await;
    let manifest = one_plugin_manifest(
        &upstream,
        ("crashy", "misbehave_plugin"),
        "fragile",
        "{ mode: panic }",
    );
    let mut gateway = CliGateway::start(env!("CARGO_BIN_EXE_wasmgate-cli"), &manifest, &[]).await;
    let response = gateway
        .send(
            http::Request::get("/boom")
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status, http::StatusCode::INTERNAL_SERVER_ERROR);
    let id = response.header("x-request-id").to_string();
    assert_eq!(
        response.text(),
        format!("internal error; request id {id}\n")
    );
    // The record names everything the operator needs; the guest backtrace and the panic
    // message follow it on the lines after.
    let mut log = gateway.line_containing("plugin failed").await;
    while !log.contains("misbehave: deliberate panic") {
        log.push('\n');
        log.push_str(&gateway.line_containing("").await);
    }
    for expected in [
        "route=\"fragile\"",
        "plugin=\"crashy\"",
        "phase=\"request\"",
        "kind=\"trap\"",
        &format!("request_id=\"{id}\""),
        "wasm backtrace",
    ] {
        assert!(log.contains(expected), "missing {expected} in:\n{log}");
    }
    gateway.stop().await;
}

/// Reads log lines until one holds `needle`, asserting that none on the way (nor that one) holds
/// a raw terminal escape or starts with the record a plugin tried to forge.
async fn clean_line_containing(gateway: &mut CliGateway, needle: &str) -> String {
    loop {
        let line = gateway.line_containing("").await;
        assert!(
            !line.contains('\u{1b}'),
            "a raw escape reached the log: {line:?}"
        );
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z"),
            "a plugin forged a log record: {line:?}"
        );
        if line.contains(needle) {
            return line;
        }
    }
}

#[tokio::test]
async fn plugins_cannot_forge_or_colour_operator_log_lines() {
    // Plugin log lines are written without the log writer's own escaping (the host escapes
    // them); everything else keeps it. Both must hold: a line a plugin logs, and a panic message
    // that reaches the failure record.
    let upstream = TestUpstream::start("main").await;
    let manifest = format!(
        "version: 1\nlisteners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nplugins:\n  forger: {{ source: \"{{plugins}}/misbehave_plugin.wasm\" }}\nupstreams:\n  main: {{ targets: [{{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: logs, match: {{ prefix: /logs }}, upstream: main, plugins: [{{ name: forger, config: {{ mode: forge-log }} }}] }}\n  - {{ name: panics, match: {{ prefix: /panics }}, upstream: main, plugins: [{{ name: forger, config: {{ mode: panic-forged }} }}] }}\n",
        upstream.url()
    );
    let mut gateway = CliGateway::start(env!("CARGO_BIN_EXE_wasmgate-cli"), &manifest, &[]).await;
    let get = |path: &'static str| http::Request::get(path).body(Default::default()).unwrap();

    assert_eq!(
        gateway.send(get("/logs")).await.status,
        http::StatusCode::OK
    );
    let logged = clean_line_containing(&mut gateway, "forged").await;
    assert!(
        logged.contains(" wasmgate::plugin: forged\\u{a}2026-01-01"),
        "{logged}"
    );
    assert!(logged.contains("\\u{1b}[31mred"), "{logged}");

    assert_eq!(
        gateway.send(get("/panics")).await.status,
        http::StatusCode::INTERNAL_SERVER_ERROR
    );
    let failed = clean_line_containing(&mut gateway, "plugin failed").await;
    assert!(failed.contains("kind=\"trap\""), "{failed}");
    // The panic message is in the record, escaped, on the same line.
    assert!(failed.contains("fake line "), "{failed}");
    gateway.stop().await;
}

#[test]
fn instance_slots_can_be_lowered_and_a_bad_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("header_rewrite"), dir.path().join("hr.wasm")).unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"version: 1
listeners: [{ name: public, bind: "127.0.0.1:0" }]
plugins:
  hr: { source: hr.wasm }
upstreams:
  main: { targets: [{ url: "http://127.0.0.1:9" }] }
routes:
  - { name: r, match: { prefix: / }, upstream: main, plugins: [{ name: hr, config: null }] }
"#,
    );
    let check = |slots: &str| {
        Command::new(env!("CARGO_BIN_EXE_wasmgate-cli"))
            .args(["check", "-c"])
            .arg(&manifest)
            .env("WASMGATE_INSTANCE_SLOTS", slots)
            .output()
            .expect("running wasmgate")
    };
    // Under an address-space limit: two slots reserve a few gigabytes, not terabytes.
    let few = check("2");
    assert!(few.status.success(), "{}", stderr(&few));
    for bad in ["0", "lots", "100001"] {
        let output = check(bad);
        assert_eq!(output.status.code(), Some(1), "{bad}");
        let err = stderr(&output);
        assert!(
            err.contains(&format!(
                "WASMGATE_INSTANCE_SLOTS must be a number of instance slots from 1 to 100000, not `{bad}`"
            )),
            "{bad}: {err}"
        );
    }
}
