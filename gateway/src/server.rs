//! Listeners and connections: accepts clients and hands each request to the proxy with the
//! current snapshot.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::manifest::{Manifest, ManifestError, ManifestErrors};
use crate::runtime::Runtime;
use crate::snapshot::Snapshot;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The manifest, or a plugin it names, is invalid.
    #[error("{0}")]
    Manifest(#[from] ManifestErrors),
    /// The Wasm engine could not be created.
    #[error("cannot create the Wasm runtime: {0:#}")]
    Runtime(wasmtime::Error),
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
    let runtime = Runtime::new().map_err(StartError::Runtime)?;
    Ok(Snapshot::build(&manifest, &runtime).await?.warnings)
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Loads the manifest, compiles its plugins, binds its listeners and starts serving.
    pub async fn start(manifest_path: &Path) -> Result<Gateway, StartError> {
        // Nothing is served yet, so compiling plugins on this worker holds up no request.
        let manifest = Manifest::load(manifest_path)?;
        let runtime = Runtime::new().map_err(StartError::Runtime)?;
        let snapshot = Snapshot::build(&manifest, &runtime).await?;

        for warning in &snapshot.warnings {
            tracing::warn!("{warning}");
        }
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            _runtime: runtime,
        });
        let (shutdown, _) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();
        for spec in shared.snapshot.load().listeners.clone() {
            let listener =
                TcpListener::bind(spec.bind)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: spec.name.clone(),
                        addr: spec.bind,
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                name: spec.name.clone(),
                addr: spec.bind,
                source,
            })?;
            tracing::info!(listener = %spec.name, %addr, "listening");
            listeners.push((spec.name.clone(), addr));
            tasks.push(tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                shutdown.subscribe(),
            )));
        }
        Ok(Gateway {
            shared,
            listeners,
            shutdown,
            tasks,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
    }

    /// The snapshot being served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Every listener's name and address.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// Stops accepting connections. Connections already open are closed as their tasks end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Runs until the process receives Ctrl-C or SIGTERM.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// State shared by every connection.
struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Kept alive for as long as any snapshot's plugins may run.
    _runtime: Runtime,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Without a timer this does nothing; with it, slow-header clients are cut off.
        .header_read_timeout(Duration::from_secs(30));
    loop {
        let (stream, client_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let snapshot = shared.snapshot.load_full();
                async move {
                    Ok::<_, Infallible>(crate::proxy::handle(snapshot, request, client_addr).await)
                }
            });
            if let Err(err) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%client_addr, error = %err, "connection ended with an error");
            }
        });
    }
}
