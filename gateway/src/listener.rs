//! Client connections: plain or TLS, HTTP/1.1 or HTTP/2, read with the limits and timeouts of
//! the snapshot being served, closed when idle, and closed gracefully on drain.
//!
//! A connection is configured from the snapshot current when it is accepted; a reload that
//! changes the `http` section applies to connections accepted after it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{RequestBody, ResponseBody};
use crate::forwarded::ClientAddr;
use crate::framing::{FramingGuard, Tracker};
use crate::h1_server;
use crate::manifest::{HttpSpec, TlsSpec};
use crate::proxy::Peer;
use crate::server::Shared;

/// A TLS listener's certificate and key, swapped whole when a reload re-reads the files, so
/// that certificates rotate without a restart. Handshakes in progress keep the one they began
/// with.
#[derive(Debug)]
pub struct CertStore {
    spec: TlsSpec,
    base_dir: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// Reads the certificate and key named by `spec`.
    pub fn load(spec: &TlsSpec, base_dir: &Path) -> Result<Arc<CertStore>, String> {
        let current = read_certified_key(spec, base_dir)?;
        Ok(Arc::new(CertStore {
            spec: spec.clone(),
            base_dir: base_dir.to_path_buf(),
            current: ArcSwap::new(current),
        }))
    }

    /// Reads the files again, without serving what was read yet.
    pub fn read(&self) -> Result<Arc<CertifiedKey>, String> {
        read_certified_key(&self.spec, &self.base_dir)
    }

    /// Serves `key` to the handshakes that start from now on.
    pub fn install(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }

    /// A TLS acceptor for this certificate, offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS setup failed: {err}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS provider, listeners and upstreams alike: ring, the only one built in.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certified_key(spec: &TlsSpec, base_dir: &Path) -> Result<Arc<CertifiedKey>, String> {
    let cert_path = base_dir.join(&spec.cert);
    let key_path = base_dir.join(&spec.key);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| {
            format!(
                "cannot read certificates from {}: {err}",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|err| {
        format!(
            "cannot read a private key from {}: {err}",
            key_path.display()
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|err| {
        format!(
            "certificate {} and key {} do not make a usable pair: {err}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The connections of one listener, to close them gracefully.
pub struct Connections {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Connections {
    /// A listener that never accepted anything.
    pub fn none() -> Connections {
        Connections {
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Asks every connection to finish: HTTP/1.1 closes after the response in flight, HTTP/2
    /// sends GOAWAY and finishes its streams. Returns when all have closed.
    pub async fn close(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A connection builder for one version of the `http` section.
struct Settings {
    http: Arc<HttpSpec>,
    builder: auto::Builder<TokioExecutor>,
    /// hyper's read buffer, which bounds a request head.
    head_buffer: usize,
}

impl Settings {
    fn new(http: Arc<HttpSpec>) -> Settings {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own read buffer bounds a request head: room for the configured limits, which
        // the proxy checks exactly (431, 414), and never below hyper's minimum.
        let head =
            http.max_header_bytes.0 + http.max_uri_length.0 + 4 * u64::from(http.max_headers);
        let buffer = usize::try_from(head + 4096).unwrap_or(usize::MAX).max(8192);
        builder
            .http1()
            .timer(TokioTimer::new())
            // Without a timer this does nothing; with it, slow-header clients are cut off.
            .header_read_timeout(http.header_read_timeout)
            .max_headers(http.max_headers as usize)
            .max_buf_size(buffer);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(http.max_concurrent_streams)
            // h2 counts 32 bytes of overhead per field.
            .max_header_list_size(
                u32::try_from(head + 32 * u64::from(http.max_headers)).unwrap_or(u32::MAX),
            );
        Settings {
            http,
            builder,
            head_buffer: buffer,
        }
    }

    /// The framing guard for a new HTTP/1 connection, with the limits hyper is given.
    fn tracker(&self) -> Tracker {
        Tracker::new(self.http.max_headers as usize, self.head_buffer)
    }

    /// The same limits, for wasmgate's own HTTP/1.1 server side.
    fn limits(&self) -> h1_server::Limits {
        h1_server::Limits {
            max_headers: self.http.max_headers as usize,
            max_head: self.head_buffer,
            header_read_timeout: self.http.header_read_timeout,
            idle_timeout: self.http.idle_timeout,
        }
    }
}

/// Accepts connections until `stop_accepting` turns true; returns their handle for the drain.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop_accepting: watch::Receiver<bool>,
) -> Connections {
    let connections = Connections {
        stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    let mut settings = Arc::new(Settings::new(shared.snapshot.load().http.clone()));
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
            _ = stop_accepting.changed() => return connections,
        };
        let _ = stream.set_nodelay(true);
        let current = shared.snapshot.load().http.clone();
        if !Arc::ptr_eq(&current, &settings.http) {
            settings = Arc::new(Settings::new(current));
        }
        let connection = Connection {
            shared: shared.clone(),
            settings: settings.clone(),
            client_addr,
            stop: connections.stop.clone(),
        };
        match &tls {
            None => {
                // Plain connections are HTTP/1 until the HTTP/2 preface says otherwise, which
                // wasmgate's own server side hands to hyper.
                connections
                    .tracker
                    .spawn(connection.serve(stream, false, false));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                connections.tracker.spawn(async move {
                    // A handshake is held to the same bound as a request head.
                    let limit = connection.settings.http.header_read_timeout;
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            connection.serve(stream, true, h2).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%client_addr, error = %err, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%client_addr, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// One accepted connection, before it is served.
struct Connection {
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    client_addr: SocketAddr,
    stop: CancellationToken,
}

impl Connection {
    /// Serves the connection: HTTP/1 first with wasmgate's own server side, then with hyper's
    /// from the first request that needs it; HTTP/2 (`h2`, agreed by ALPN) with hyper's.
    async fn serve<I>(self, mut io: I, secure: bool, h2: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            shared,
            settings,
            client_addr,
            stop,
        } = self;
        let open = shared.services.metrics.connection();
        let peer = Peer {
            client: Arc::new(ClientAddr::new(client_addr)),
            secure,
            raw_heads: false,
        };
        let (read, tracker) = if h2 {
            (Bytes::new(), Tracker::off())
        } else {
            let own_peer = Peer {
                raw_heads: true,
                ..peer.clone()
            };
            let own = h1_server::Connection {
                shared: &shared,
                peer: &own_peer,
                limits: settings.limits(),
                stop: &stop,
            };
            match own.serve(&mut io).await {
                h1_server::Outcome::Closed => return,
                // The guard follows from the start of the request handed over.
                h1_server::Outcome::HandOff(read) => (read, settings.tracker()),
            }
        };
        let io = h1_server::Rewind::new(read, io);
        let activity = Arc::new(Activity::new());
        let tracked = activity.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let snapshot = shared.snapshot.load_full();
            let busy = tracked.begin();
            let upgrade = wants_upgrade(&request);
            let is_connect = request.method() == Method::CONNECT;
            let peer = peer.clone();
            let request = Box::new(request.map(RequestBody::Hyper));
            async move {
                let mut response = crate::proxy::handle(snapshot, request, peer).await;
                if upgrade && !upgraded(&response, is_connect) {
                    // The framing guard stopped following this connection at the upgrade
                    // request; one that did not switch protocols ends with this response
                    // rather than carry on unguarded.
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = settings
            .builder
            .serve_connection_with_upgrades(
                TokioIo::new(FramingGuard::new(io, tracker, client_addr)),
                service,
            )
            .into_owned();
        let mut connection = std::pin::pin!(connection);
        let idle_timeout = settings.http.idle_timeout;
        let mut closing = false;
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(err) = ended {
                        tracing::debug!(%client_addr, error = %err, "connection ended with an error");
                    }
                    break;
                }
                _ = stop.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = activity.idle(idle_timeout), if !closing => {
                    tracing::debug!(%client_addr, "idle connection closed");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
        drop(open);
    }
}

/// Whether hyper takes an HTTP/1 `request` as asking to switch protocols: `CONNECT`, or
/// `Upgrade` in HTTP/1.1 (the same test as the framing guard's).
fn wants_upgrade(request: &Request<Incoming>) -> bool {
    match request.version() {
        Version::HTTP_11 => {
            request.method() == Method::CONNECT || request.headers().contains_key(UPGRADE)
        }
        Version::HTTP_10 => request.method() == Method::CONNECT,
        _ => false,
    }
}

/// Whether hyper hands the connection over after `response`.
fn upgraded(response: &Response<ResponseBody>, connect: bool) -> bool {
    response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (connect && response.status().is_success())
}

/// Whether a connection has requests in progress, and since when it has had none.
struct Activity {
    origin: Instant,
    in_flight: AtomicU32,
    /// Milliseconds from `origin` to when the last request in progress ended.
    idle_since: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in progress for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let since = self.idle_since.load(Ordering::Relaxed);
            let deadline = self.origin + Duration::from_millis(since) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.in_flight.load(Ordering::Relaxed) == 0
                && self.idle_since.load(Ordering::Relaxed) == since
            {
                return;
            }
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // Busy now: look again a whole timeout later rather than spin.
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// A request in progress on a connection.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.origin.elapsed().as_millis() as u64;
        self.0.idle_since.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
