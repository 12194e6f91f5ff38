//! Upstream services: their targets, how one is chosen, their health, and the pooled client
//! that reaches them.
//!
//! Choosing a target is lock-free: round robin walks a precomputed smooth weighted schedule
//! with one atomic counter, least-outstanding scans the targets' in-progress counts. A target is
//! skipped while it is ejected (passive health: consecutive failures) or failing its probes
//! (active health).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::{UpstreamBody, full};
use crate::manifest::{Balance, HealthCheckSpec, PassiveHealthSpec, UpstreamSpec};
use crate::metrics::Metrics;

/// Parses a target URL: `http://host:port` or `https://host:port`, with no path, query or
/// credentials.
pub fn parse_target(url: &str) -> Result<(Scheme, Authority), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| format!("target `{url}` is not a URL: {err}"))?;
    let scheme = match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP || *scheme == Scheme::HTTPS => scheme.clone(),
        _ => {
            return Err(format!(
                "target `{url}` must start with http:// or https://"
            ));
        }
    };
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(format!("target `{url}` must not have a path or query"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("target `{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("target `{url}` must not hold credentials"));
    }
    Ok((scheme, authority))
}

/// One server of an upstream.
#[derive(Debug)]
pub struct Target {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Where it listens.
    pub authority: Authority,
    /// Its share of the traffic.
    pub weight: u32,
    /// Its response-time series.
    pub duration: Histogram,
    healthy_gauge: Gauge,
    outstanding: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds since [`ORIGIN`] until which the target is ejected.
    ejected_until: AtomicU64,
    /// What the last probes said (true without probes).
    probe_healthy: AtomicBool,
    /// Idle connections of wasmgate's own HTTP/1.1 client ([`crate::h1`]); used for `http://`
    /// targets of an upstream that does not speak HTTP/2.
    pub pool: Arc<crate::h1::Pool>,
}

impl Target {
    /// Whether the target takes requests; `now_ms` is asked only of a target once ejected
    /// (a clock read per request otherwise, for targets that are nearly always in rotation).
    fn in_rotation(&self, now_ms: impl FnOnce() -> u64) -> bool {
        self.probe_healthy.load(Ordering::Relaxed)
            && match self.ejected_until.load(Ordering::Relaxed) {
                0 => true,
                until => until <= now_ms(),
            }
    }

    /// Requests in progress on this target.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Which targets an attempt must avoid: those already tried (targets past the 64th are never
/// excluded, which only makes a retry less choosy).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried(u64);

impl Tried {
    /// Marks a target tried.
    pub fn add(&mut self, index: usize) {
        if index < 64 {
            self.0 |= 1 << index;
        }
    }

    fn contains(self, index: usize) -> bool {
        index < 64 && self.0 & (1 << index) != 0
    }
}

/// The client every upstream uses: plain HTTP or TLS by the target's scheme.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// An upstream service with its own connection pool.
#[derive(Debug)]
pub struct Upstream {
    /// The upstream's name in the manifest.
    pub name: String,
    targets: Vec<Target>,
    /// Round-robin order: target indices, each as often as its weight, interleaved.
    schedule: Vec<u32>,
    next: AtomicUsize,
    balance: Balance,
    /// Longest wait for the response head.
    pub timeout: Duration,
    /// Longest time for the whole exchange.
    pub request_timeout: Option<Duration>,
    /// Further attempts allowed for a request that may be repeated.
    pub retries: u32,
    /// The HTTP version requests are sent with.
    pub version: Version,
    passive: PassiveHealthSpec,
    health_check: Option<HealthCheckSpec>,
    /// One pooled client per connect timeout in use: the upstream's own first, then those of
    /// routes that override it.
    clients: Vec<(Duration, UpstreamClient)>,
}

impl Upstream {
    /// Builds the upstream; its targets were checked with the manifest. `base_dir` anchors a
    /// configured CA file; `route_connect_timeouts` are the overrides of the routes that use it.
    pub fn new(
        name: &str,
        spec: &UpstreamSpec,
        base_dir: &Path,
        metrics: &Metrics,
        route_connect_timeouts: &[Duration],
    ) -> Result<Upstream, String> {
        let targets = spec
            .targets
            .iter()
            .map(|t| {
                let (scheme, authority) = parse_target(&t.url)?;
                let (duration, healthy_gauge) = metrics.target(name, authority.as_str());
                healthy_gauge.set(1);
                Ok(Target {
                    scheme,
                    weight: t.weight.max(1),
                    duration,
                    healthy_gauge,
                    outstanding: AtomicU32::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    probe_healthy: AtomicBool::new(true),
                    pool: Arc::new(crate::h1::Pool::new(authority.clone())),
                    authority,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let uses_tls = targets.iter().any(|t| t.scheme == Scheme::HTTPS);
        let mut clients = vec![(
            spec.connect_timeout,
            build_client(spec, spec.connect_timeout, uses_tls, base_dir)?,
        )];
        for &timeout in route_connect_timeouts {
            if clients.iter().all(|(t, _)| *t != timeout) {
                clients.push((timeout, build_client(spec, timeout, uses_tls, base_dir)?));
            }
        }
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        Ok(Upstream {
            name: name.to_string(),
            schedule: smooth_schedule(&weights),
            targets,
            next: AtomicUsize::new(0),
            balance: spec.balance,
            timeout: spec.timeout,
            request_timeout: spec.request_timeout,
            retries: spec.retries,
            version: if spec.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            passive: spec.passive_health.clone(),
            health_check: spec.health_check.clone(),
            clients,
        })
    }

    fn now_ms(&self) -> u64 {
        ORIGIN.elapsed().as_millis() as u64
    }

    /// Takes over what `previous` (the same upstream in the snapshot being replaced) learnt of
    /// the targets both have, and their idle connections: ejections, failure counts and probe results, so that a reload does
    /// not send traffic to a target known to be down.
    pub fn inherit_health(&self, previous: &Upstream) {
        for target in &self.targets {
            let Some(old) = previous
                .targets
                .iter()
                .find(|old| old.authority == target.authority && old.scheme == target.scheme)
            else {
                continue;
            };
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            target
                .ejected_until
                .store(load(&old.ejected_until), Ordering::Relaxed);
            target.consecutive_failures.store(
                old.consecutive_failures.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            let healthy = old.probe_healthy.load(Ordering::Relaxed);
            // Probes carry over only where the new manifest still probes.
            if self.health_check.is_some() {
                target.probe_healthy.store(healthy, Ordering::Relaxed);
            }
            let in_rotation = target.in_rotation(|| self.now_ms());
            target.healthy_gauge.set(i64::from(in_rotation));
            if self.speaks_plain_http1(target) {
                target.pool.adopt(&old.pool);
            }
        }
    }

    /// A target for the next attempt, avoiding those already tried when another is in
    /// rotation; `None` when no target is.
    pub fn pick(&self, tried: Tried) -> Option<usize> {
        let now = std::cell::OnceCell::new();
        let usable = |i: usize| self.targets[i].in_rotation(|| *now.get_or_init(|| self.now_ms()));
        let first = match self.balance {
            Balance::RoundRobin => self.pick_round_robin(|i| usable(i) && !tried.contains(i)),
            Balance::LeastOutstanding => {
                self.pick_least_outstanding(|i| usable(i) && !tried.contains(i))
            }
        };
        first.or_else(|| match self.balance {
            Balance::RoundRobin => self.pick_round_robin(usable),
            Balance::LeastOutstanding => self.pick_least_outstanding(usable),
        })
    }

    fn pick_round_robin(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|k| self.schedule[(start + k) % len] as usize)
            .find(|&i| usable(i))
    }

    fn pick_least_outstanding(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.targets.len();
        // Start the scan at a moving point, so that ties are spread rather than all going to
        // the first target.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|k| (start + k) % len)
            .filter(|&i| usable(i))
            .min_by_key(|&i| {
                let target = &self.targets[i];
                // Outstanding per unit of weight, scaled to stay an integer.
                u64::from(target.outstanding()) * 1000 / u64::from(target.weight)
            })
    }

    /// A target by index.
    pub fn target(&self, index: usize) -> &Target {
        &self.targets[index]
    }

    /// Every target.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Counts a request in progress on a target until the guard is dropped.
    pub fn begin(&self, index: usize) -> Outstanding<'_> {
        let target = &self.targets[index];
        target.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(target)
    }

    /// Records that a target answered.
    pub fn succeeded(&self, index: usize) {
        let target = &self.targets[index];
        if target.consecutive_failures.swap(0, Ordering::Relaxed) != 0
            && target.probe_healthy.load(Ordering::Relaxed)
        {
            target.healthy_gauge.set(1);
        }
    }

    /// Records that a target failed (refused, reset, timed out); ejects it once it has failed
    /// `passive_health.failures` times in a row.
    pub fn failed(&self, index: usize) {
        let target = &self.targets[index];
        let failures = target.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.passive.failures > 0 && failures >= self.passive.failures {
            let until = self.now_ms() + self.passive.ejection.as_millis() as u64;
            target.ejected_until.store(until, Ordering::Relaxed);
            target.healthy_gauge.set(0);
            tracing::warn!(
                upstream = %self.name,
                target = target.authority.as_str(),
                failures,
                ejection = ?self.passive.ejection,
                "target ejected after consecutive failures"
            );
        }
    }

    /// The client for a connect timeout (`None`: the upstream's own), as an index for
    /// [`Upstream::client`].
    pub fn client_index(&self, connect_timeout: Option<Duration>) -> usize {
        connect_timeout
            .and_then(|timeout| self.clients.iter().position(|(t, _)| *t == timeout))
            .unwrap_or(0)
    }

    /// A pooled client, by [`Upstream::client_index`].
    pub fn client(&self, index: usize) -> &UpstreamClient {
        &self.client_entry(index).1
    }

    /// The connect timeout of a client, by [`Upstream::client_index`].
    pub fn connect_timeout(&self, index: usize) -> Duration {
        self.client_entry(index).0
    }

    fn client_entry(&self, index: usize) -> &(Duration, UpstreamClient) {
        self.clients.get(index).unwrap_or(&self.clients[0])
    }

    /// Whether requests to `target` may go through wasmgate's own HTTP/1.1 client: a plain
    /// `http://` target of an upstream that speaks HTTP/1.1.
    pub fn speaks_plain_http1(&self, target: &Target) -> bool {
        target.scheme == Scheme::HTTP && self.version == Version::HTTP_11
    }

    /// Starts the active health checks, if configured, on the current runtime. They stop when
    /// the upstream is dropped (its snapshot replaced by a reload).
    pub fn start_health_checks(self: &Arc<Self>) {
        let Some(check) = self.health_check.clone() else {
            return;
        };
        for index in 0..self.targets.len() {
            tokio::spawn(probe_loop(Arc::downgrade(self), index, check.clone()));
        }
    }
}

/// The instant ejection deadlines are counted from: one for the process, so that they compare
/// across snapshots.
static ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// A request in progress on a target.
pub struct Outstanding<'u>(&'u Target);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn probe_loop(upstream: Weak<Upstream>, index: usize, check: HealthCheckSpec) {
    let mut passed = 0u32;
    let mut failed = 0u32;
    let mut interval = tokio::time::interval(check.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        let target = &upstream.targets[index];
        let healthy = probe(&upstream, target, &check).await;
        if healthy {
            passed += 1;
            failed = 0;
        } else {
            failed += 1;
            passed = 0;
        }
        let was = target.probe_healthy.load(Ordering::Relaxed);
        if was && failed >= check.unhealthy_threshold {
            target.probe_healthy.store(false, Ordering::Relaxed);
            target.healthy_gauge.set(0);
            tracing::warn!(upstream = %upstream.name, target = target.authority.as_str(), "target failed its health checks; out of rotation");
        } else if !was && passed >= check.healthy_threshold {
            target.probe_healthy.store(true, Ordering::Relaxed);
            target.consecutive_failures.store(0, Ordering::Relaxed);
            target.ejected_until.store(0, Ordering::Relaxed);
            target.healthy_gauge.set(1);
            tracing::info!(upstream = %upstream.name, target = target.authority.as_str(), "target passed its health checks; back in rotation");
        }
    }
}

async fn probe(upstream: &Upstream, target: &Target, check: &HealthCheckSpec) -> bool {
    let uri = http::Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(check.path.as_str())
        .build();
    let Ok(uri) = uri else {
        return false;
    };
    let mut request = Request::new(UpstreamBody::from(full(bytes::Bytes::new())));
    *request.uri_mut() = uri;
    *request.version_mut() = upstream.version;
    let answer = tokio::time::timeout(check.timeout, upstream.client(0).request(request)).await;
    match answer {
        Ok(Ok(response)) => {
            let status = response.status();
            // Read the (small) body so the connection can be reused.
            let _ = tokio::time::timeout(
                check.timeout,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await;
            status.is_success() || status.is_redirection()
        }
        _ => false,
    }
}

fn build_client(
    spec: &UpstreamSpec,
    connect_timeout: Duration,
    uses_tls: bool,
    base_dir: &Path,
) -> Result<UpstreamClient, String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let tls = if uses_tls {
        tls_config(spec, base_dir)?
    } else {
        // Never used for handshakes: only `http://` targets go through this client.
        client_config(rustls::RootCertStore::empty())?
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if spec.http2 {
        builder.enable_http2().wrap_connector(connector)
    } else {
        builder.enable_all_versions().wrap_connector(connector)
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(spec.http2);
    Ok(client.build(connector))
}

fn tls_config(spec: &UpstreamSpec, base_dir: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match spec.tls.as_ref().and_then(|tls| tls.ca.as_ref()) {
        Some(ca) => {
            let path = base_dir.join(ca);
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| {
                    format!("cannot read CA certificates from {}: {err}", path.display())
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("no usable CA certificate in {}", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no system root certificates found; set `tls.ca` for https targets".into(),
                );
            }
        }
    }
    client_config(roots)
}

fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::listener::provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS setup failed: {err}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Smooth weighted round robin (as nginx does it): each target appears as often as its weight,
/// spread out rather than in runs.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))
            .expect("an upstream has targets");
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_http_or_https_authorities() {
        let (scheme, authority) = parse_target("http://127.0.0.1:9000").unwrap();
        assert_eq!(
            (scheme.as_str(), authority.as_str()),
            ("http", "127.0.0.1:9000")
        );
        assert_eq!(parse_target("https://x:1/").unwrap().0.as_str(), "https");
        assert!(parse_target("http://x:1/base").is_err());
        assert!(parse_target("x:1").is_err());
        assert!(parse_target("ftp://x:1").is_err());
        assert!(parse_target("http://u:p@x:1").is_err());
    }

    #[test]
    fn the_schedule_follows_weights_and_interleaves() {
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        let schedule = smooth_schedule(&[5, 1, 1]);
        assert_eq!(schedule, vec![0, 0, 1, 0, 2, 0, 0]);
        let schedule = smooth_schedule(&[3, 2]);
        assert_eq!(schedule.iter().filter(|&&i| i == 0).count(), 3);
        assert_eq!(schedule, vec![0, 1, 0, 1, 0]);
    }
}
