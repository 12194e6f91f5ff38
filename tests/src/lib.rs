//! The end-to-end test harness: plugins built for wasm32-wasip2, a recording upstream, a gateway
//! started in-process on `127.0.0.1:0`, and a small HTTP client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The guest crates the tests use, built together once per test process.
pub const GUESTS: &[&str] = &[
    "header-rewrite",
    "probe-plugin",
    "misbehave-plugin",
    "sockets-plugin",
    "deny-plugin",
    "sleepy-plugin",
    "hollow-auth-plugin",
    "bench-plugin",
    "jwt-auth",
    "api-key",
    "access-log",
    "cors",
    "contract-0-2-0-plugin",
];

/// The workspace's root folder.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
}

/// Builds every guest crate for wasm32-wasip2 (once per process; cargo makes later builds no-ops)
/// and returns the folder that holds the `.wasm` files.
pub fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        // A target folder of its own: the outer `cargo test` may still hold the main one, and
        // host and guest artifacts never mix.
        let target_dir = root.join("target").join("wasm");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(&target_dir);
        for guest in GUESTS {
            command.args(["-p", guest]);
        }
        let status = command
            .status()
            .expect("running cargo to build the plugins");
        assert!(
            status.success(),
            "building the plugins for wasm32-wasip2 failed"
        );
        target_dir.join("wasm32-wasip2").join("release")
    })
}

/// The path of a built plugin, by its file stem (`header_rewrite`).
pub fn plugin(stem: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{stem}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body length.
    pub body_len: usize,
}

/// A real HTTP/1.1 upstream on `127.0.0.1:0` that records every request.
///
/// - a path with `/slow` in it answers after 10 s (for timeouts);
/// - `/bytes/N` answers with N bytes of a known pattern (see [`pattern`]);
/// - `/delay/MS` answers after MS milliseconds;
/// - `/stream-echo` sends each chunk of the request body back as soon as it arrives;
/// - anything else answers 200 with header `x-upstream: <name>` and echoes the request body.
pub struct TestUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    tls: bool,
    task: JoinHandle<()>,
    /// Every connection's task: dropping the upstream ends them too, as a dying server would.
    connection_tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TestUpstream {
    /// Starts an upstream that names itself `name` in its responses. It speaks HTTP/1.1 and,
    /// with prior knowledge, HTTP/2.
    pub async fn start(name: &'static str) -> TestUpstream {
        TestUpstream::start_with(name, None).await
    }

    /// Like [`TestUpstream::start`], over TLS with the given server configuration.
    pub async fn start_tls(name: &'static str, tls: tokio_rustls::TlsAcceptor) -> TestUpstream {
        TestUpstream::start_with(name, Some(tls)).await
    }

    async fn start_with(
        name: &'static str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connection_tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let record = seen.clone();
        let accepted = connections.clone();
        let health = healthy.clone();
        let tasks = connection_tasks.clone();
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let record = record.clone();
                let health = health.clone();
                let tls = tls.clone();
                let connection = tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let record = record.clone();
                        let healthy = health.load(Ordering::Relaxed);
                        async move {
                            Ok::<_, Infallible>(
                                upstream_answer(name, request, &record, healthy).await,
                            )
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
                tasks.lock().unwrap().push(connection.abort_handle());
            }
        });
        TestUpstream {
            addr,
            seen,
            connections,
            healthy,
            tls: is_tls,
            task,
            connection_tasks,
        }
    }

    /// The base URL, for a manifest.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests seen so far, health probes left out.
    pub fn served(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| !s.uri.starts_with("/health"))
            .count()
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The last request seen.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream saw a request")
    }

    /// Makes `/health` answer 200 (healthy) or 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connection_tasks.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

async fn upstream_answer(
    name: &str,
    mut request: Request<Incoming>,
    record: &Mutex<Vec<Seen>>,
    healthy: bool,
) -> Response<BoxBody<Bytes, Infallible>> {
    if request.uri().path() == "/ws" {
        let answer = websocket_echo(&mut request);
        record
            .lock()
            .unwrap()
            .push(seen(&request.into_parts().0, 0));
        return answer;
    }
    let (parts, body) = request.into_parts();
    let response = Response::builder()
        .header("x-upstream", name)
        .header("x-version", format!("{:?}", parts.version));
    if parts.uri.path().starts_with("/health") {
        record.lock().unwrap().push(seen(&parts, 0));
        let status = if healthy { 200 } else { 503 };
        return response
            .status(status)
            .body(Full::new(Bytes::new()).boxed())
            .expect("a valid response");
    }
    if parts.uri.path() == "/stream-echo" {
        record.lock().unwrap().push(seen(&parts, 0));
        let (mut sender, echoed) = http_body_util::channel::Channel::<Bytes>::new(1);
        tokio::spawn(async move {
            let mut body = body;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data()
                    && sender.send_data(data).await.is_err()
                {
                    return;
                }
            }
        });
        return response.body(echoed.boxed()).expect("a valid response");
    }

    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    record.lock().unwrap().push(seen(&parts, body.len()));
    let path = parts.uri.path();
    if path.contains("/slow") {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let body = match path.strip_prefix("/bytes/") {
        Some(n) => Bytes::from(pattern(n.parse().unwrap_or(0))),
        None => body,
    };
    response
        .body(Full::new(body).boxed())
        .expect("a valid response")
}

/// Accepts a WebSocket upgrade and echoes every message back.
fn websocket_echo(request: &mut Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    use futures_util::{SinkExt, StreamExt};
    let key = request
        .headers()
        .get("sec-websocket-key")
        .map(|key| tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()));
    let Some(accept) = key else {
        return Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()).boxed())
            .expect("a valid response");
    };
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .expect("a valid response")
}

fn seen(parts: &http::request::Parts, body_len: usize) -> Seen {
    Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len,
    }
}

/// `len` bytes of a pattern that shows any reordering, loss or duplication.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 251 % 256) as u8)
        .collect()
}

/// A gateway started in-process from a manifest written to a temporary folder.
pub struct TestGateway {
    gateway: Option<wasmgate::Gateway>,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// The folder holding the manifest.
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Writes the manifest (with `{plugins}` replaced by the plugin folder) and starts a gateway.
    pub async fn start(manifest: &str) -> TestGateway {
        match TestGateway::try_start(manifest).await {
            Ok(gateway) => gateway,
            Err(err) => panic!("the gateway did not start:\n{err}"),
        }
    }

    /// Like [`TestGateway::start`], but returns the start-up error.
    pub async fn try_start(manifest: &str) -> Result<TestGateway, wasmgate::StartError> {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = write_manifest(dir.path(), manifest);
        let gateway = wasmgate::Gateway::start(&path).await?;
        let addr = gateway.listeners()[0].1;
        Ok(TestGateway {
            gateway: Some(gateway),
            addr,
            dir,
        })
    }

    /// The running gateway.
    pub fn gateway(&self) -> &wasmgate::Gateway {
        self.gateway.as_ref().expect("the gateway is running")
    }

    /// Takes the gateway out, to drain or shut it down in the test.
    pub fn take(&mut self) -> wasmgate::Gateway {
        self.gateway.take().expect("the gateway is running")
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.gateway()
            .admin_addr()
            .expect("the manifest declares an admin listener")
    }

    /// Failures of one kind counted for a plugin so far.
    pub fn failures(&self, plugin: &str, kind: wasmgate::runtime::FailureKind) -> u64 {
        let gateway = self.gateway.as_ref().expect("the gateway is running");
        gateway
            .snapshot()
            .plugin(plugin)
            .expect("the plugin is declared")
            .failures()
            .get(kind)
    }

    /// Waits until every per-request plugin use of the snapshot being served has its
    /// pre-initialised image made or refused, and returns how many were made.
    pub async fn preinitialized(&self) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let snapshot = self.gateway().snapshot();
            let slots: Vec<_> = snapshot.preinit_slots().collect();
            if slots.iter().all(|(_, _, slot)| slot.settled()) {
                return slots
                    .iter()
                    .filter(|(_, _, slot)| slot.image().is_some())
                    .count();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "plugin images still pending after 120 s: {slots:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a request to the gateway.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> TestResponse {
        send(self.addr, request).await
    }

    /// Sends a GET with a Host header.
    pub async fn get(&self, host: &str, path: &str) -> TestResponse {
        self.send(
            Request::get(path)
                .header("host", host)
                .body(Full::default())
                .unwrap(),
        )
        .await
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            // Stop accepting; open connections end with the test's runtime.
            drop(tokio::spawn(gateway.shutdown()));
        }
    }
}

/// Writes `manifest.yaml` into `dir`, with `{plugins}` replaced by the plugin folder.
pub fn write_manifest(dir: &Path, manifest: &str) -> PathBuf {
    let text = manifest.replace("{plugins}", &plugin_dir().display().to_string());
    let path = dir.join("manifest.yaml");
    std::fs::write(&path, text).expect("writing the manifest");
    path
}

/// A response read whole.
#[derive(Debug)]
pub struct TestResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl TestResponse {
    /// A header's value as text, or "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
            .unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request over HTTP/1.1 to `addr` (the request's URI holds only the path).
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> TestResponse {
    send_with(
        Client::builder(TokioExecutor::new()).build_http(),
        addr,
        request,
    )
    .await
}

/// Sends one request over HTTP/2 without TLS (prior knowledge) to `addr`.
pub async fn send_h2(addr: SocketAddr, request: Request<Full<Bytes>>) -> TestResponse {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    send_with(client, addr, request).await
}

async fn send_with(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> TestResponse {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    parts.uri = format!("http://{addr}{path}").parse().expect("a valid URI");
    let response = client
        .request(Request::from_parts(parts, body))
        .await
        .expect("the gateway answered");
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .expect("reading the response body")
        .to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Compares `actual` with the snapshot `tests/snapshots/<name>.txt`; with `WASMGATE_BLESS=1`,
/// writes it instead. Paths that vary between machines should be replaced first.
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = workspace_root()
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("WASMGATE_BLESS").is_some() {
        std::fs::write(&path, actual).expect("writing the snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run the test with WASMGATE_BLESS=1 to write it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{name} differs from {}:\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// A gateway run as a process (`wasmgate run`), for tests that read its log.
pub struct CliGateway {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    /// The first listener's address, read from the log.
    pub addr: SocketAddr,
    /// The folder holding the manifest.
    pub dir: tempfile::TempDir,
}

impl CliGateway {
    /// Writes the manifest and starts `bin run -c manifest` (the test passes
    /// `env!("CARGO_BIN_EXE_wasmgate-cli")`), with `envs` added to its environment.
    pub async fn start(bin: &str, manifest: &str, envs: &[(&str, &str)]) -> CliGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = write_manifest(dir.path(), manifest);
        let mut child = tokio::process::Command::new(bin)
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the gateway");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut gateway = CliGateway {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr)),
            addr: "127.0.0.1:0".parse().expect("an address"),
            dir,
        };
        let line = gateway.line_containing("addr=").await;
        let at = line.find("addr=").expect("found above") + 5;
        gateway.addr = line[at..]
            .split_whitespace()
            .next()
            .and_then(|addr| addr.parse().ok())
            .expect("the listening address in the log");
        gateway
    }

    /// The address logged for the listener `name` (call before reading past its line).
    pub async fn listener_addr(&mut self, name: &str) -> SocketAddr {
        let line = self.line_containing(&format!("listener={name}")).await;
        let at = line.find("addr=").expect("an address in the line") + 5;
        line[at..]
            .split_whitespace()
            .next()
            .and_then(|addr| addr.parse().ok())
            .expect("the listening address in the log")
    }

    /// The next log line that contains `needle` (within 30 s). When there is none, the panic
    /// shows the lines read on the way, so that a gateway that exited says why.
    pub async fn line_containing(&mut self, needle: &str) -> String {
        let mut skipped = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no log line with {needle:?} in time; read:\n{}",
                        skipped.join("\n")
                    )
                })
                .expect("reading the log")
                .unwrap_or_else(|| {
                    panic!(
                        "the gateway exited before logging {needle:?}; its log:\n{}",
                        skipped.join("\n")
                    )
                });
            if line.contains(needle) {
                return line;
            }
            skipped.push(line);
        }
    }

    /// Every log line not read yet, up to the process's exit (within 30 s).
    pub async fn remaining_lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .expect("the gateway closed its log in time")
                .expect("reading the log");
            match line {
                Some(line) => lines.push(line),
                None => return lines,
            }
        }
    }

    /// Sends a request.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> TestResponse {
        send(self.addr, request).await
    }

    /// Stops the process.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal (`HUP`, `TERM`, `INT`) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the process is running");
        let status = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -s {name} {pid} failed");
    }

    /// Waits (at most `limit`) for the process to exit and returns its exit code.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the gateway exited in time")
            .expect("waiting for the gateway")
            .code()
    }
}

/// A raw HTTP/1.1 connection to `addr`, for tests that stream bodies frame by frame. The
/// connection runs in the returned task; aborting it closes the socket.
pub async fn http1_connection<B>(
    addr: SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<B>, JoinHandle<()>)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1.1 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// Sends raw bytes on a new connection to `addr` and returns everything read back until the
/// server closes the connection or nothing arrives for `quiet`. For requests that no HTTP
/// client library would send.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting");
    stream.write_all(bytes).await.expect("writing the request");
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 << 10];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// The status code of the first response in raw HTTP/1.1 text, 0 when there is none.
pub fn raw_status(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The status codes of every response in raw HTTP/1.1 text, in order (pipelined answers).
pub fn raw_statuses(responses: &str) -> Vec<&str> {
    responses
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| responses.get(at + 9..at + 12))
        .collect()
}

/// One step of a [`ScriptedUpstream`]'s answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes.
    Write(Vec<u8>),
    /// Wait.
    Sleep(Duration),
    /// Close the connection with a TCP reset.
    Reset,
}

/// An upstream for servers that misbehave: on every connection it reads one request head, then
/// follows its script (write, wait, reset) and closes. For upstreams that reset, stall, trickle
/// or lie about framing.
pub struct ScriptedUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ScriptedUpstream {
    /// Starts it.
    pub async fn start(script: Vec<Step>) -> ScriptedUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("address");
        let requests: Arc<AtomicUsize> = Arc::default();
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                    for step in script {
                        match step {
                            Step::Write(bytes) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Step::Sleep(pause) => tokio::time::sleep(pause).await,
                            Step::Reset => {
                                let _ = stream.set_zero_linger();
                                return;
                            }
                        }
                    }
                });
            }
        });
        ScriptedUpstream {
            addr,
            requests,
            task,
        }
    }

    /// The base URL, for a manifest.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request heads read so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A URL on 127.0.0.1 where nothing listens: connections are refused.
pub async fn refusing_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, made for one test, with its PEM
/// files in a temporary folder.
pub struct TestCert {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
    der: rustls_pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCert {
    /// Generates one.
    pub fn new() -> TestCert {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("a test certificate");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, made.cert.pem()).expect("writing the certificate");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("writing the key");
        TestCert {
            dir,
            cert,
            key,
            der: made.cert.der().clone(),
            key_der: made.signing_key.serialize_der(),
        }
    }

    /// A TLS acceptor serving this certificate, offering `alpn`.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.der.clone()], key)
        .expect("a server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    }

    /// A TLS connector that trusts this certificate and offers `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("a root");
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }
}

impl Default for TestCert {
    fn default() -> Self {
        TestCert::new()
    }
}
