//! The manifest: the YAML file that declares listeners, plugins, upstreams and routes.
//!
//! This module only parses and checks what can be checked from the text alone (types, unknown
//! fields, references between sections, duplicate names). Compiling plugins and running their
//! config validation happens when a [`Snapshot`](crate::snapshot::Snapshot) is built from it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use crate::normalize::{Ambiguous, PathRules};

/// The only manifest version this gateway reads.
pub const MANIFEST_VERSION: u32 = 1;

/// A parsed manifest, with the file it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where the manifest was read from; relative plugin paths resolve against its folder.
    pub path: PathBuf,
    /// Its contents.
    pub spec: ManifestSpec,
    /// The SHA-256 of the text, hex: what `GET /config` reports, to tell which manifest is served.
    pub digest: String,
}

/// The manifest's top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSpec {
    /// Format version; must be 1.
    pub version: u32,
    /// Sockets the gateway accepts client connections on. Every route is served on every listener.
    pub listeners: Vec<Spanned<ListenerSpec>>,
    /// Defaults for the budgets of every plugin; a plugin declaration may override them.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// How client requests are read and checked: path normalisation, size limits, timeouts.
    #[serde(default)]
    pub http: HttpSpec,
    /// Plugins, declared once by name and used by any number of routes.
    #[serde(default)]
    pub plugins: BTreeMap<String, Spanned<PluginSpec>>,
    /// Upstream services, by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamSpec>>,
    /// Routes, tried in the precedence order documented in the README (not file order).
    #[serde(default)]
    pub routes: Vec<Spanned<RouteSpec>>,
    /// The admin listener (`/status`, `/status/ready`, `/metrics`, `POST /reload`, `GET
    /// /config`). Without this section there is none.
    #[serde(default)]
    pub admin: Option<Spanned<AdminSpec>>,
    /// How the manifest is reloaded while serving.
    #[serde(default)]
    pub reload: ReloadSpec,
    /// How the gateway stops on SIGTERM or SIGINT.
    #[serde(default)]
    pub shutdown: ShutdownSpec,
    /// Addresses and networks (`10.0.0.0/8`) of proxies in front of the gateway, whose
    /// `X-Forwarded-*` and `Forwarded` headers are believed and appended to. From any other
    /// client those headers are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Span export over OTLP. Without it, `traceparent` passes through unchanged.
    #[serde(default)]
    pub tracing: Option<TracingSpec>,
    /// A folder where compiled plugins are kept across restarts (relative to the manifest's
    /// folder). Without it, plugins are compiled at every start.
    #[serde(default)]
    pub plugin_cache: Option<PathBuf>,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Address to bind; loopback unless you mean to expose reloads and metrics.
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// Span export.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSpec {
    /// The OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces` (JSON encoding).
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How often queued spans are sent.
    #[serde(default = "default_export_interval", with = "humantime_serde")]
    pub export_interval: Duration,
}

fn default_service_name() -> String {
    "wasmgate".into()
}

fn default_export_interval() -> Duration {
    Duration::from_secs(5)
}

/// Reloading.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSpec {
    /// Reload when anything in the manifest's folder changes. SIGHUP and `POST /reload` always
    /// work.
    pub watch: bool,
    /// How long the folder must be quiet before a change is acted on: an editor's save or a
    /// ConfigMap update is several events.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadSpec {
    fn default() -> Self {
        ReloadSpec {
            watch: true,
            debounce: Duration::from_millis(200),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSpec {
    /// How long the gateway keeps accepting connections after the signal while `/status/ready`
    /// answers 503, so that load balancers stop sending new traffic first.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// The longest wait for requests in flight to finish; past it the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSpec {
    fn default() -> Self {
        ShutdownSpec {
            delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Name used in logs.
    pub name: String,
    /// Address to bind, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    pub bind: SocketAddr,
    /// Terminate TLS on this listener (HTTP/2 and HTTP/1.1 offered by ALPN).
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

/// A listener's certificate and key, PEM files relative to the manifest's folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Global defaults for plugin budgets and request handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSpec {
    /// Longest time one plugin call (configure, request or response phase) may run, time spent
    /// in host calls included.
    #[serde(with = "humantime_serde")]
    pub plugin_deadline: Duration,
    /// Most linear memory one plugin instance may grow to, in bytes or with a unit (`16MiB`).
    pub plugin_memory: ByteSize,
    /// Most instances of one plugin alive at once; past it, requests get a fast 503.
    pub plugin_instances: u32,
    /// Most host calls a plugin may make in one call.
    pub plugin_host_calls: u32,
    /// Most headers a request or response may have after a plugin's edits.
    pub plugin_headers: u32,
    /// Longest header value a plugin may write.
    pub plugin_header_value: ByteSize,
    /// Longest log line a plugin may write.
    pub plugin_log_line: ByteSize,
    /// Largest request body buffered for plugins that read bodies; a larger one gets 413. Also
    /// the largest body a plugin may hand the gateway.
    pub max_body: ByteSize,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            plugin_deadline: Duration::from_millis(50),
            plugin_memory: ByteSize(16 << 20),
            plugin_instances: 512,
            plugin_host_calls: 10_000,
            plugin_headers: 100,
            plugin_header_value: ByteSize(8 << 10),
            plugin_log_line: ByteSize(8 << 10),
            max_body: ByteSize(1 << 20),
        }
    }
}

/// How client requests are read and checked before routing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSpec {
    /// Merge runs of `/` in paths (`//admin` is `/admin`).
    pub merge_slashes: bool,
    /// `%2F` in a path: `reject` (400) or `keep` (as an escape, not a separator).
    pub encoded_slashes: Ambiguous,
    /// `\` or `%5C` in a path: `reject` (400) or `keep` (as an escape).
    pub backslashes: Ambiguous,
    /// Longest request target (path and query); longer gets 414.
    pub max_uri_length: ByteSize,
    /// Most request header fields; more gets 431.
    pub max_headers: u32,
    /// Most bytes of request header names and values together; more gets 431.
    pub max_header_bytes: ByteSize,
    /// Largest request body; larger gets 413, before the upstream is contacted when
    /// `Content-Length` says so, and as soon as the limit is passed otherwise.
    pub max_request_body: ByteSize,
    /// Longest wait for a whole request head on an HTTP/1.1 connection, counted from the
    /// connection opening or the previous response: it also bounds keep-alive idle time there.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is closed (HTTP/2: GOAWAY).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for HttpSpec {
    fn default() -> Self {
        HttpSpec {
            merge_slashes: true,
            encoded_slashes: Ambiguous::Reject,
            backslashes: Ambiguous::Reject,
            max_uri_length: ByteSize(8 << 10),
            max_headers: 100,
            max_header_bytes: ByteSize(32 << 10),
            max_request_body: ByteSize(16 << 20),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 100,
        }
    }
}

impl HttpSpec {
    /// The path normalisation rules.
    pub fn path_rules(&self) -> PathRules {
        PathRules {
            merge_slashes: self.merge_slashes,
            encoded_slashes: self.encoded_slashes,
            backslashes: self.backslashes,
        }
    }
}

/// A plugin declaration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Path to the component (`.wasm`), relative to the manifest's folder.
    pub source: PathBuf,
    /// Whether the plugin may read and replace request bodies. Routes that use such a plugin
    /// buffer bodies up to `limits.max_body`; other routes stream them untouched.
    #[serde(default)]
    pub body: bool,
    /// Overrides `limits.plugin_deadline` for this plugin.
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// Overrides `limits.plugin_memory` for this plugin.
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Overrides `limits.plugin_instances` for this plugin.
    #[serde(default)]
    pub instances: Option<u32>,
    /// Overrides `limits.plugin_host_calls` for this plugin.
    #[serde(default)]
    pub host_calls: Option<u32>,
    /// The SHA-256 (hex) the file must have; any other content refuses to load.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Whether each request gets a fresh instance, or configured instances are reused.
    #[serde(default)]
    pub isolation: Isolation,
}

/// How far apart a plugin's requests are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// A fresh instance per request, configured for it and dropped after it: nothing a plugin
    /// keeps in its globals reaches another request.
    #[default]
    PerRequest,
    /// Configured instances are kept and reused by later requests (one request at a time each):
    /// no instantiation or `configure` per request, but the plugin's globals live on between
    /// requests. An instance whose call failed or was cut off is never reused.
    Pooled,
}

/// An upstream service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// Servers that can answer.
    pub targets: Vec<TargetSpec>,
    /// How a target is chosen for each request.
    #[serde(default)]
    pub balance: Balance,
    /// Longest wait for the response head after the request was sent (504 past it).
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest time for the whole exchange, from sending the request to the response body's
    /// end: 504 before the head; past the head, the response is cut (never shown complete).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Longest wait for a TCP connection to a target (504 past it); a TLS handshake that stalls
    /// counts against `timeout`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How many times a failed request is tried again on another target: only idempotent
    /// methods with no body or a buffered one, only when the failure came before any of the
    /// response (refused, reset, closed), never after a timeout.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Ejection of a target that keeps failing.
    #[serde(default)]
    pub passive_health: PassiveHealthSpec,
    /// Probes that take a target out of rotation while it fails them.
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// TLS to `https://` targets.
    #[serde(default)]
    pub tls: Option<UpstreamTlsSpec>,
    /// Speak HTTP/2 to the targets: with prior knowledge to `http://` ones (h2c), and requiring
    /// it by ALPN from `https://` ones. Without it, `https://` targets may still pick HTTP/2
    /// by ALPN.
    #[serde(default)]
    pub http2: bool,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_retries() -> u32 {
    2
}

/// How a target is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// In turn, in proportion to the targets' weights (smooth weighted round robin).
    #[default]
    RoundRobin,
    /// The target with the fewest requests in progress for its weight.
    LeastOutstanding,
}

/// Passive health: consecutive failures eject a target for a while.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthSpec {
    /// Consecutive failures (refused, reset, timed out) that eject a target; 0 never ejects.
    pub failures: u32,
    /// How long an ejected target gets no traffic; then it is tried again, and ejected again at
    /// its next failure.
    #[serde(with = "humantime_serde")]
    pub ejection: Duration,
}

impl Default for PassiveHealthSpec {
    fn default() -> Self {
        PassiveHealthSpec {
            failures: 5,
            ejection: Duration::from_secs(10),
        }
    }
}

/// Active health: an HTTP probe per target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// The path probed with GET; a 2xx or 3xx answer is healthy.
    pub path: String,
    /// Time between probes of one target.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Longest wait for a probe's answer.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed probes that take a target out.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive passed probes that bring it back.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_threshold() -> u32 {
    2
}

/// TLS to an upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// A PEM file of CA certificates to trust instead of the system's roots (relative to the
    /// manifest's folder).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// One server of an upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Base URL, `http://host:port` or `https://host:port`.
    pub url: String,
    /// Its share of the traffic, 1 to 1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// A route: which requests it takes, where they go, and the chain they pass through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name, used in logs and errors and shown to plugins.
    pub name: String,
    /// Which requests this route takes.
    #[serde(rename = "match")]
    pub matcher: MatchSpec,
    /// Name of the upstream in `upstreams`.
    pub upstream: String,
    /// A prefix removed from the path before it is forwarded, e.g. `/api`.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Overrides the upstream's `timeout` (response head) for this route.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Overrides the upstream's `request_timeout` (whole exchange) for this route.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Overrides the upstream's `connect_timeout` for this route.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// The chain: request phase in this order, response phase in reverse.
    #[serde(default)]
    pub plugins: Vec<Spanned<PluginUseSpec>>,
}

/// What a route matches. `path` and `prefix` are exclusive; with neither, the route takes every
/// path.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Exact host (`api.example.com`) or a wildcard for subdomains (`*.example.com`). The port of
    /// the request's host is ignored. Without it, any host.
    #[serde(default)]
    pub host: Option<String>,
    /// A path template: literal (`/health`), with parameters (`/users/{id}`), or ending in a
    /// catch-all (`/files/{*rest}`).
    #[serde(default)]
    pub path: Option<String>,
    /// A path prefix on segment boundaries: `/api` takes `/api`, `/api/` and `/api/x`, not
    /// `/apix`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Methods taken (upper case). Without it, every method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
}

/// A plugin's place in a route's chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginUseSpec {
    /// Name of the plugin in `plugins`.
    pub name: String,
    /// Configuration handed to the plugin, as JSON, when the manifest loads.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// What happens to the request when the plugin fails (traps, runs out of time or memory,
    /// breaches a cap).
    #[serde(default)]
    pub on_failure: FailurePolicy,
}

/// What a plugin failure does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The request ends with a 5xx that carries the request id and nothing else.
    #[default]
    FailClosed,
    /// The plugin is skipped for this request (its edits undone), and that is logged and
    /// counted.
    FailOpen,
}

/// A size in bytes, written as a number or with a unit: `512`, `64KiB`, `16MiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as 512, 64KiB or 16MiB"))?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB or GiB)"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

/// One problem found in a manifest, located as precisely as the problem allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based line in the manifest, when known.
    pub line: Option<u64>,
    /// The route concerned, if any.
    pub route: Option<String>,
    /// The plugin concerned, if any.
    pub plugin: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ManifestError {
    /// An error about the manifest as a whole.
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        ManifestError {
            file: file.to_path_buf(),
            line: None,
            route: None,
            plugin: None,
            message: message.into(),
        }
    }

    /// Locates the error at a line (0 means unknown, as serde-saphyr reports it).
    pub fn at_line(mut self, line: u64) -> Self {
        self.line = (line > 0).then_some(line);
        self
    }

    /// Names the route concerned.
    pub fn in_route(mut self, route: &str) -> Self {
        self.route = Some(route.to_string());
        self
    }

    /// Names the plugin concerned.
    pub fn for_plugin(mut self, plugin: &str) -> Self {
        self.plugin = Some(plugin.to_string());
        self
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(route) = &self.route {
            write!(f, "route `{route}`: ")?;
        }
        if let Some(plugin) = &self.plugin {
            write!(f, "plugin `{plugin}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Every problem found in a manifest, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

impl Manifest {
    /// Reads, parses and checks a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestErrors> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ManifestErrors(vec![ManifestError::new(
                path,
                format!("cannot read the manifest: {err}"),
            )])
        })?;
        Manifest::parse(path, &text)
    }

    /// Parses and checks manifest text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestErrors> {
        let spec: ManifestSpec = serde_saphyr::from_str(text).map_err(|err| {
            ManifestErrors(vec![ManifestError::new(path, describe_yaml_error(&err))])
        })?;
        let manifest = Manifest {
            path: path.to_path_buf(),
            spec,
            digest: crate::runtime::WasmDigest::of(text.as_bytes()).to_hex(),
        };
        let errors = manifest.check();
        if errors.is_empty() {
            Ok(manifest)
        } else {
            Err(ManifestErrors(errors))
        }
    }

    /// The folder relative paths resolve against.
    pub fn base_dir(&self) -> &Path {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// Resolves a path from the manifest against its folder.
    pub fn resolve(&self, relative: &Path) -> PathBuf {
        self.base_dir().join(relative)
    }

    /// Checks what the text alone can tell: version, names, references, match syntax.
    fn check(&self) -> Vec<ManifestError> {
        let file = self.path.as_path();
        let spec = &self.spec;
        let mut errors = Vec::new();

        if spec.version != MANIFEST_VERSION {
            errors.push(ManifestError::new(
                file,
                format!(
                    "unsupported manifest version {} (this gateway reads version {MANIFEST_VERSION})",
                    spec.version
                ),
            ));
        }
        if spec.listeners.is_empty() {
            errors.push(ManifestError::new(
                file,
                "no listeners: add at least one under `listeners`",
            ));
        }
        let mut listener_names = std::collections::HashSet::new();
        for listener in &spec.listeners {
            if !listener_names.insert(listener.value.name.as_str()) {
                errors.push(
                    ManifestError::new(
                        file,
                        format!("listener name `{}` is used twice", listener.value.name),
                    )
                    .at_line(listener.referenced.line()),
                );
            }
        }
        for (name, plugin) in &spec.plugins {
            if let Some(pin) = &plugin.value.sha256
                && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                errors.push(
                    ManifestError::new(file, "`sha256` must be 64 hex digits, as sha256sum prints")
                        .at_line(plugin.referenced.line())
                        .for_plugin(name),
                );
            }
        }
        let http = &spec.http;
        let mut http_error = |message: &str| {
            errors.push(ManifestError::new(file, format!("`http`: {message}")));
        };
        if http.max_headers == 0 || http.max_concurrent_streams == 0 {
            http_error("max_headers and max_concurrent_streams must be at least 1");
        }
        if http.max_uri_length.0 == 0 || http.max_header_bytes.0 == 0 {
            http_error("max_uri_length and max_header_bytes must be above zero");
        }
        if http.header_read_timeout.is_zero() || http.idle_timeout.is_zero() {
            http_error("header_read_timeout and idle_timeout must be above zero");
        }
        if let Some(admin) = &spec.admin
            && spec
                .listeners
                .iter()
                .any(|l| l.value.bind == admin.value.bind && admin.value.bind.port() != 0)
        {
            errors.push(
                ManifestError::new(
                    file,
                    format!(
                        "the admin listener's address {} is also a listener's",
                        admin.value.bind
                    ),
                )
                .at_line(admin.referenced.line()),
            );
        }
        for (name, upstream) in &spec.upstreams {
            if upstream.value.targets.is_empty() {
                errors.push(
                    ManifestError::new(file, format!("upstream `{name}` has no targets"))
                        .at_line(upstream.referenced.line()),
                );
            }
            let at = |message: String| {
                ManifestError::new(file, format!("upstream `{name}`: {message}"))
                    .at_line(upstream.referenced.line())
            };
            for target in &upstream.value.targets {
                if let Err(message) = crate::upstream::parse_target(&target.url) {
                    errors.push(at(message));
                }
                if !(1..=1000).contains(&target.weight) {
                    errors.push(at(format!(
                        "target `{}`: weight {} is not between 1 and 1000",
                        target.url, target.weight
                    )));
                }
            }
            if let Some(check) = &upstream.value.health_check {
                if !check.path.starts_with('/') {
                    errors.push(at(format!(
                        "health_check path `{}` must start with `/`",
                        check.path
                    )));
                }
                if check.interval.is_zero() || check.timeout.is_zero() {
                    errors.push(at(
                        "health_check interval and timeout must be above zero".into()
                    ));
                }
                if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
                    errors.push(at("health_check thresholds must be at least 1".into()));
                }
            }
        }

        let mut route_names = std::collections::HashSet::new();
        for route in &spec.routes {
            let line = route.referenced.line();
            let r = &route.value;
            let here = || ManifestError::new(file, "").at_line(line).in_route(&r.name);
            let fail = |message: String| ManifestError { message, ..here() };
            if !route_names.insert(r.name.as_str()) {
                errors.push(fail("the route name is used twice".into()));
            }
            if !spec.upstreams.contains_key(&r.upstream) {
                errors.push(fail(format!(
                    "unknown upstream `{}` (declared: {})",
                    r.upstream,
                    list_names(spec.upstreams.keys())
                )));
            }
            if let Err(message) = crate::router::check_match(&r.matcher) {
                errors.push(fail(message));
            }
            if let Some(strip) = &r.strip_prefix {
                let routed = r.matcher.prefix.as_deref().or(r.matcher.path.as_deref());
                if !strip.starts_with('/') {
                    errors.push(fail(format!("strip_prefix `{strip}` must start with `/`")));
                } else if routed.is_some_and(|p| !p.starts_with(strip.as_str())) {
                    errors.push(fail(format!(
                        "strip_prefix `{strip}` is not a prefix of the route's path"
                    )));
                }
            }
            for used in &r.plugins {
                if !spec.plugins.contains_key(&used.value.name) {
                    errors.push(
                        ManifestError::new(
                            file,
                            format!(
                                "unknown plugin (declared: {})",
                                list_names(spec.plugins.keys())
                            ),
                        )
                        .at_line(used.referenced.line())
                        .in_route(&r.name)
                        .for_plugin(&used.value.name),
                    );
                }
            }
        }
        errors
    }
}

fn list_names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// serde-saphyr renders errors with a source snippet; the first line carries the message and
/// its position, which is what a one-line operator error needs.
fn describe_yaml_error(err: &serde_saphyr::Error) -> String {
    let text = err.to_string();
    text.lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid YAML")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestErrors> {
        Manifest::parse(Path::new("gw.yaml"), text)
    }

    const BASE: &str = "version: 1\nlisteners: [{ name: public, bind: \"127.0.0.1:0\" }]\n";

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("512".parse::<ByteSize>(), Ok(ByteSize(512)));
        assert_eq!("64KiB".parse::<ByteSize>(), Ok(ByteSize(64 << 10)));
        assert_eq!("16MiB".parse::<ByteSize>(), Ok(ByteSize(16 << 20)));
        assert!("16MB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn unknown_fields_are_errors_with_a_line() {
        let err = parse(&format!("{BASE}colour: blue\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("gw.yaml: "), "{text}");
        assert!(text.contains("colour"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn references_are_checked_with_route_plugin_and_line() {
        let text = format!(
            "{BASE}upstreams:\n  up: {{ targets: [{{ url: \"http://127.0.0.1:1\" }}] }}\nroutes:\n  - name: r1\n    match: {{ prefix: / }}\n    upstream: nowhere\n    plugins:\n      - name: ghost\n"
        );
        let errors = parse(&text).unwrap_err().0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "gw.yaml:6: route `r1`: unknown upstream `nowhere` (declared: up)"
        );
        assert_eq!(
            errors[1].to_string(),
            "gw.yaml:10: route `r1`: plugin `ghost`: unknown plugin (declared: none)"
        );
    }

    #[test]
    fn http_limits_are_checked() {
        let err = parse(&format!(
            "{BASE}http: {{ max_headers: 0, idle_timeout: 0s }}\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`http`: max_headers"), "{text}");
        assert!(text.contains("idle_timeout must be above zero"), "{text}");
        let err = parse(&format!("{BASE}http: {{ encoded_slashes: decode }}\n")).unwrap_err();
        assert!(err.to_string().contains("decode"), "{err}");
    }

    #[test]
    fn upstream_weights_and_probes_are_checked() {
        let text = format!(
            "{BASE}upstreams:\n  up:\n    targets: [{{ url: \"http://127.0.0.1:1\", weight: 0 }}]\n    health_check: {{ path: health }}\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("weight 0 is not between 1 and 1000"), "{err}");
        assert!(
            err.contains("health_check path `health` must start with `/`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_version_is_refused() {
        let err =
            parse("version: 2\nlisteners: [{ name: a, bind: \"127.0.0.1:0\" }]\n").unwrap_err();
        assert!(
            err.to_string().contains("unsupported manifest version 2"),
            "{err}"
        );
    }
}
