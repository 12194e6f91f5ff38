//! Listeners and connections: accepts clients and hands each request to the proxy with the
//! current snapshot; reloads and graceful shutdown.
//!
//! A request loads the current snapshot once, when it arrives, and keeps that `Arc` until its
//! last phase has run, so a reload (which builds a whole new snapshot off the request path and
//! swaps it in) can never make a request run part of its chain on one manifest and part on
//! another.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listener::{CertStore, Connections, accept_loop};
use crate::manifest::{
    AdminSpec, ListenerSpec, Manifest, ManifestError, ManifestErrors, TracingSpec,
};
use crate::runtime::Runtime;
use crate::snapshot::{Services, Snapshot};
use crate::trace::Telemetry;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The manifest, or a plugin it names, is invalid.
    #[error("{0}")]
    Manifest(#[from] ManifestErrors),
    /// The Wasm engine could not be created.
    #[error("cannot create the Wasm runtime: {0:#}")]
    Runtime(wasmtime::Error),
    /// The worker threads could not be started.
    #[error("cannot start the worker threads: {0}")]
    Threads(std::io::Error),
    /// A listener could not bind its address.
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address it tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Loads a manifest and everything it names, as `wasmgate check` does: parses it, compiles
/// every plugin and runs each plugin's validation of each configuration it is given. Returns
/// the warnings.
pub async fn check(manifest_path: &Path) -> Result<Vec<ManifestError>, StartError> {
    let manifest = Manifest::load(manifest_path)?;
    load_certificates(&manifest)?;
    let runtime = Runtime::new().map_err(StartError::Runtime)?;
    Ok(Snapshot::build(&manifest, &runtime, &Services::default())
        .await?
        .warnings)
}

/// Reads every TLS listener's certificate and key, by listener name; reports every pair that
/// fails.
fn load_certificates(manifest: &Manifest) -> Result<Vec<(String, Arc<CertStore>)>, ManifestErrors> {
    let mut stores = Vec::new();
    let mut errors = Vec::new();
    for listener in &manifest.spec.listeners {
        let spec = &listener.value;
        if let Some(tls) = &spec.tls {
            match CertStore::load(tls, manifest.base_dir()) {
                Ok(store) => stores.push((spec.name.clone(), store)),
                Err(message) => errors.push(
                    ManifestError::new(
                        &manifest.path,
                        format!("listener `{}`: {message}", spec.name),
                    )
                    .at_line(listener.referenced.line()),
                ),
            }
        }
    }
    if errors.is_empty() {
        Ok(stores)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    stop_accepting: watch::Sender<bool>,
    accept_loops: Vec<JoinHandle<Connections>>,
    /// Dropping it stops watching the manifest's folder.
    _watcher: Option<crate::reload::FolderWatcher>,
    /// Dropping it ends the extra worker threads' runtimes (after a drain, nothing is left on
    /// them).
    _threads: WorkerThreads,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("listeners", &self.listeners)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request in flight finished.
    Clean,
    /// The drain timeout passed with requests still in flight; they were cut.
    TimedOut,
}

impl Gateway {
    /// Loads the manifest, compiles its plugins, binds its listeners and starts serving, all on
    /// the calling task's runtime.
    pub async fn start(manifest_path: &Path) -> Result<Gateway, StartError> {
        Gateway::start_with_workers(manifest_path, 1).await
    }

    /// Like [`Gateway::start`], serving every listener on `workers` threads: the calling
    /// runtime's, and `workers - 1` threads of their own, each with a current-thread Tokio
    /// runtime and its own socket on the listener's address (`SO_REUSEPORT`, so the kernel
    /// spreads connections over them). A connection stays on the thread that accepted it.
    pub async fn start_with_workers(
        manifest_path: &Path,
        workers: usize,
    ) -> Result<Gateway, StartError> {
        let workers = workers.max(1);
        // Nothing is served yet, so compiling plugins on this worker holds up no request.
        let manifest = Manifest::load(manifest_path)?;
        let runtime = Runtime::new().map_err(StartError::Runtime)?;
        let telemetry = match &manifest.spec.tracing {
            Some(spec) => Some(Arc::new(Telemetry::start(spec).map_err(|message| {
                ManifestErrors(vec![ManifestError::new(manifest_path, message)])
            })?)),
            None => None,
        };
        let services = Services {
            telemetry,
            ..Services::default()
        };
        let started = Instant::now();
        let snapshot = Snapshot::build(&manifest, &runtime, &services).await?;
        tracing::info!(
            manifest = %manifest_path.display(),
            sha256 = %snapshot.manifest_digest,
            elapsed_ms = started.elapsed().as_millis() as u64,
            compiled = snapshot.cache.compiled,
            from_disk_cache = snapshot.cache.disk,
            "manifest loaded"
        );
        for warning in &snapshot.warnings {
            tracing::warn!("{warning}");
        }
        let runtime = Arc::new(runtime);
        snapshot.activate(&runtime);
        let listener_specs = snapshot.listeners.clone();
        let admin_spec = snapshot.admin.clone();
        let reload_spec = snapshot.reload.clone();
        let certificates = load_certificates(&manifest)?;
        let shared = Arc::new(Shared {
            certificates,
            snapshot: ArcSwap::from_pointee(snapshot),
            runtime,
            services,
            manifest_path: manifest_path.to_path_buf(),
            listeners: listener_specs.clone(),
            admin: admin_spec.clone(),
            tracing: manifest.spec.tracing.clone(),
            draining: AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
        });

        let (stop_accepting, _) = watch::channel(false);
        let threads = WorkerThreads::start(workers - 1).map_err(StartError::Threads)?;
        let mut listeners = Vec::new();
        let mut accept_loops = Vec::new();
        for spec in &listener_specs {
            let tls = match shared
                .certificates
                .iter()
                .find(|(name, _)| *name == spec.name)
            {
                Some((_, store)) => Some(store.acceptor().map_err(|message| {
                    ManifestErrors(vec![ManifestError::new(
                        manifest_path,
                        format!("listener `{}`: {message}", spec.name),
                    )])
                })?),
                None => None,
            };
            let failed = |source| StartError::Bind {
                name: spec.name.clone(),
                addr: spec.bind,
                source,
            };
            let reuse_port = workers > 1;
            let first = bind_socket(spec.bind, reuse_port).map_err(failed)?;
            let addr = first.local_addr().map_err(failed)?;
            // Port 0 picks a port once; the other threads' sockets share it.
            let mut others = Vec::new();
            for _ in 1..workers {
                others.push(bind_socket(addr, true).map_err(failed)?);
            }
            let listener = first.listen(LISTEN_BACKLOG).map_err(failed)?;
            tracing::info!(listener = %spec.name, %addr, tls = tls.is_some(), workers, "listening");
            listeners.push((spec.name.clone(), addr));
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                tls.clone(),
                shared.clone(),
                stop_accepting.subscribe(),
            )));
            for (socket, handle) in others.into_iter().zip(&threads.handles) {
                let (tls, shared, stop) = (tls.clone(), shared.clone(), stop_accepting.subscribe());
                let name = spec.name.clone();
                accept_loops.push(handle.spawn(async move {
                    match socket.listen(LISTEN_BACKLOG) {
                        Ok(listener) => accept_loop(listener, tls, shared, stop).await,
                        Err(err) => {
                            tracing::error!(listener = %name, error = %err, "a worker thread cannot listen");
                            Connections::none()
                        }
                    }
                }));
            }
        }
        let admin = match &admin_spec {
            Some(spec) => {
                let (listener, addr) = bind("admin", spec.bind).await?;
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "the admin listener is not on loopback: anyone who reaches it can reload the gateway");
                }
                tracing::info!(listener = %"admin", %addr, "listening");
                tokio::spawn(crate::admin::serve(
                    listener,
                    shared.clone(),
                    stop_accepting.subscribe(),
                ));
                Some(addr)
            }
            None => None,
        };
        let watcher = if reload_spec.watch {
            let dir = manifest.base_dir();
            match crate::reload::FolderWatcher::start(dir, reload_spec.debounce, shared.clone()) {
                Ok(watcher) => Some(watcher),
                Err(message) => {
                    // SIGHUP and `POST /reload` still work: not a reason to refuse to serve.
                    tracing::warn!(
                        dir = %dir.display(),
                        "cannot watch the manifest's folder ({message}); reload with SIGHUP or POST /reload"
                    );
                    None
                }
            }
        } else {
            None
        };
        Ok(Gateway {
            shared,
            listeners,
            admin,
            stop_accepting,
            accept_loops,
            _watcher: watcher,
            _threads: threads,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
    }

    /// The admin listener's address, if the manifest declares one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The snapshot being served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Every listener's name and address.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.services.metrics
    }

    /// Reloads the manifest and every plugin it names, as SIGHUP does.
    pub async fn reload(&self) -> Result<ReloadReport, ManifestErrors> {
        self.shared.reload().await
    }

    /// Stops accepting connections at once. Connections already open are closed as their
    /// tasks end. For an orderly stop, see [`Gateway::drain`].
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        for task in self.accept_loops {
            let _ = task.await;
        }
    }

    /// Stops gracefully: readiness turns 503 at once; connections are still accepted for the
    /// manifest's `shutdown.delay`, so that load balancers can stop sending; then listeners
    /// close, HTTP/1.1 connections close after their response in flight, HTTP/2 connections
    /// get GOAWAY, and completion phases finish; all within `shutdown.drain_timeout`.
    pub async fn drain(self) -> Drained {
        let spec = self.shared.snapshot.load().shutdown.clone();
        self.shared.draining.store(true, Ordering::Release);
        tracing::info!(delay = ?spec.delay, drain_timeout = ?spec.drain_timeout, "draining");
        tokio::time::sleep(spec.delay).await;
        let _ = self.stop_accepting.send(true);
        let drain = async {
            let mut closing = Vec::new();
            for task in self.accept_loops {
                if let Ok(connections) = task.await {
                    closing.push(connections.close());
                }
            }
            for connections in closing {
                connections.await;
            }
            let background = &self.shared.services.background;
            background.close();
            background.wait().await;
            if let Some(telemetry) = &self.shared.services.telemetry {
                telemetry.shutdown().await;
            }
        };
        match tokio::time::timeout(spec.drain_timeout, drain).await {
            Ok(()) => {
                tracing::info!("drained");
                Drained::Clean
            }
            Err(_) => {
                tracing::warn!(
                    "drain timeout passed with requests still in flight; stopping anyway"
                );
                Drained::TimedOut
            }
        }
    }

    /// Serves until SIGINT or SIGTERM, then drains. SIGHUP reloads the manifest. A second
    /// SIGINT or SIGTERM during the drain returns at once with `None`. Install `signals` before
    /// starting the gateway: a SIGHUP that arrives before there is a handler ends the process.
    pub async fn run_until_signal(self, signals: Signals) -> Option<Drained> {
        let Signals {
            mut hangup,
            mut terminate,
            mut interrupt,
        } = signals;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let shared = self.shared.clone();
                    tokio::spawn(async move { let _ = shared.reload().await; });
                }
                _ = Signals::stop(&mut terminate, &mut interrupt) => break,
            }
        }
        tokio::select! {
            drained = self.drain() => Some(drained),
            _ = Signals::stop(&mut terminate, &mut interrupt) => {
                tracing::warn!("second stop signal: exiting without waiting");
                None
            }
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The SHA-256 of the manifest now served.
    pub manifest_digest: String,
    /// How long loading took.
    pub elapsed: Duration,
    /// Plugins compiled for this load (not found in memory or on disk).
    pub compiled: u32,
}

/// The process signals the gateway acts on: SIGHUP (reload), SIGTERM and SIGINT (drain; a
/// second one exits at once).
#[derive(Debug)]
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers; from then on these signals no longer end the process by default.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn stop(terminate: &mut Signal, interrupt: &mut Signal) {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM"),
            _ = interrupt.recv() => tracing::info!("SIGINT"),
        }
    }
}

/// Binds a listener and returns it with the address it got (port 0 picks one).
/// The listen backlog of client listeners (as `TcpListener::bind` uses).
const LISTEN_BACKLOG: u32 = 1024;

/// A socket bound to `addr`, not yet listening; with `reuse_port`, other sockets may bind the
/// same address and the kernel spreads connections over them.
fn bind_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    Ok(socket)
}

/// Threads that each run a current-thread Tokio runtime for accept loops and their
/// connections. Dropping this ends them, and waits (briefly) for each to write the log lines it
/// still buffers.
struct WorkerThreads {
    handles: Vec<tokio::runtime::Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Disconnected once every thread has written its last log lines. (In a mutex only so that
    /// the gateway stays `Sync`; it is used once, by `drop`.)
    ended: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping [`WorkerThreads`] waits for the threads' last log lines.
const WORKER_END_WAIT: Duration = Duration::from_secs(1);

impl WorkerThreads {
    fn start(count: usize) -> std::io::Result<WorkerThreads> {
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        let (ending, ended) = std::sync::mpsc::channel::<()>();
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::log_output::flush)
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            let ending = ending.clone();
            std::thread::Builder::new()
                .name(format!("wasmgate-worker-{}", i + 1))
                .stack_size(crate::runtime::PLUGIN_THREAD_STACK)
                .spawn(move || {
                    // Runs the tasks spawned onto it until the gateway lets go, buffering
                    // its log lines between waits.
                    let logs = crate::log_output::BufferGuard::install();
                    let _ = runtime.block_on(stopped);
                    drop(logs);
                    drop(ending);
                })?;
        }
        Ok(WorkerThreads {
            handles,
            stop: stops,
            ended: std::sync::Mutex::new(ended),
        })
    }
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        self.stop.clear();
        // Every sender gone (the threads are done) or the wait is over; nothing is ever sent.
        if let Ok(ended) = self.ended.get_mut() {
            let _ = ended.recv_timeout(WORKER_END_WAIT);
        }
    }
}

async fn bind(name: &str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// Certificates read by a reload, to serve once the reload has succeeded.
type Rotation<'s> = Vec<(&'s Arc<CertStore>, Arc<rustls::sign::CertifiedKey>)>;

/// State shared by every connection, the admin listener and the reloader.
pub(crate) struct Shared {
    pub(crate) snapshot: ArcSwap<Snapshot>,
    runtime: Arc<Runtime>,
    pub(crate) services: Services,
    manifest_path: PathBuf,
    /// Fixed at start-up: sockets are not re-bound by a reload.
    listeners: Vec<ListenerSpec>,
    /// TLS listeners' certificates, by listener name: re-read by every reload.
    certificates: Vec<(String, Arc<CertStore>)>,
    admin: Option<AdminSpec>,
    tracing: Option<TracingSpec>,
    pub(crate) draining: AtomicBool,
    /// One reload at a time; a trigger arriving during a reload waits and then loads the newest
    /// files.
    reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Reloads the manifest: parses it, builds a whole snapshot on a thread of its own (plugin
    /// compilation is CPU-bound and would stall the requests sharing a Tokio worker), and swaps
    /// it in. On failure the old snapshot keeps serving and every error is logged.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<ReloadReport, ManifestErrors> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let outcome = self.build_next().await;
        let metrics = &self.services.metrics;
        match outcome {
            Ok((snapshot, certificates)) => {
                for (store, key) in certificates {
                    store.install(key);
                }
                metrics.reloaded(true);
                for warning in &snapshot.warnings {
                    tracing::warn!("{warning}");
                }
                let report = ReloadReport {
                    manifest_digest: snapshot.manifest_digest.clone(),
                    elapsed: started.elapsed(),
                    compiled: snapshot.cache.compiled,
                };
                let snapshot = Arc::new(snapshot);
                snapshot.inherit_health(&self.snapshot.load());
                snapshot.activate(&self.runtime);
                self.snapshot.store(snapshot);
                tracing::info!(
                    sha256 = %report.manifest_digest,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    compiled = report.compiled,
                    "manifest reloaded"
                );
                Ok(report)
            }
            Err(errors) => {
                metrics.reloaded(false);
                for error in &errors.0 {
                    tracing::error!("{error}");
                }
                tracing::error!(
                    errors = errors.0.len(),
                    "reload failed; still serving the previous manifest"
                );
                Err(errors)
            }
        }
    }

    /// Builds the next snapshot and reads the TLS listeners' certificates again; nothing is
    /// served from either until both have succeeded.
    async fn build_next(self: &Arc<Self>) -> Result<(Snapshot, Rotation<'_>), ManifestErrors> {
        let manifest = Manifest::load(&self.manifest_path)?;
        self.check_fixed(&manifest)?;
        let mut certificates = Vec::new();
        let mut errors = Vec::new();
        for (name, store) in &self.certificates {
            match store.read() {
                Ok(key) => certificates.push((store, key)),
                Err(message) => errors.push(ManifestError::new(
                    &manifest.path,
                    format!("listener `{name}`: {message}"),
                )),
            }
        }
        if !errors.is_empty() {
            return Err(ManifestErrors(errors));
        }
        let snapshot = self.build_snapshot(manifest).await?;
        Ok((snapshot, certificates))
    }

    async fn build_snapshot(
        self: &Arc<Self>,
        manifest: Manifest,
    ) -> Result<Snapshot, ManifestErrors> {
        let (done, result) = tokio::sync::oneshot::channel();
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("wasmgate-reload".into())
            .stack_size(crate::runtime::PLUGIN_THREAD_STACK)
            .spawn(move || {
                let built = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| {
                        ManifestErrors(vec![ManifestError::new(
                            &manifest.path,
                            format!("cannot start the reload thread's runtime: {err}"),
                        )])
                    })
                    .and_then(|runtime| {
                        runtime.block_on(Snapshot::build(
                            &manifest,
                            &shared.runtime,
                            &shared.services,
                        ))
                    });
                let _ = done.send(built);
            });
        let internal = |message: String| {
            ManifestErrors(vec![ManifestError::new(&self.manifest_path, message)])
        };
        if let Err(err) = spawned {
            return Err(internal(format!("cannot start the reload thread: {err}")));
        }
        result
            .await
            .unwrap_or_else(|_| Err(internal("the reload thread panicked".into())))
    }

    /// Listener addresses are bound once, at start-up: a reload that changes them is refused
    /// rather than half applied.
    fn check_fixed(&self, manifest: &Manifest) -> Result<(), ManifestErrors> {
        let file = manifest.path.as_path();
        let mut errors = Vec::new();
        let next: Vec<ListenerSpec> = manifest
            .spec
            .listeners
            .iter()
            .map(|l| l.value.clone())
            .collect();
        if next != self.listeners {
            let describe = |specs: &[ListenerSpec]| {
                specs
                    .iter()
                    .map(|l| format!("{} on {}", l.name, l.bind))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            errors.push(ManifestError::new(
                file,
                format!(
                    "listeners are fixed at start-up (serving: {}; manifest now says: {}); restart the gateway to change them",
                    describe(&self.listeners),
                    describe(&next)
                ),
            ));
        }
        if manifest.spec.tracing != self.tracing {
            errors.push(ManifestError::new(
                file,
                "the `tracing` section is fixed at start-up; restart the gateway to change it",
            ));
        }
        let next_admin = manifest.spec.admin.as_ref().map(|a| a.value.clone());
        if next_admin != self.admin {
            errors.push(ManifestError::new(
                file,
                "the admin listener is fixed at start-up; restart the gateway to change it",
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestErrors(errors))
        }
    }
}
