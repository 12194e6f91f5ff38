//! Everything built from one manifest: compiled plugins, upstream pools, routes and the router.
//!
//! A snapshot is immutable once built. The proxy reads the current one through an `ArcSwap`, so a
//! later reload can build a new snapshot off the request path and swap it in whole; a request
//! keeps the snapshot it started with until it ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use tokio_util::task::TaskTracker;

use crate::forwarded::TrustedProxies;
use crate::manifest::{
    AdminSpec, FailurePolicy, HttpSpec, Isolation, ListenerSpec, Manifest, ManifestError,
    ManifestErrors, ReloadSpec, ShutdownSpec,
};
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::{RouteMatch, Router, RouterBuilder};
use crate::runtime::fixed::FixedEdits;
use crate::runtime::{
    Ahead, AheadClaim, CacheStats, InstancePool, Lease, LoadSession, LoadedPlugin, Phases,
    PluginBudget, PluginError, PreinitJob, PreinitSlot, Preinitialized, Runtime,
};
use crate::upstream::Upstream;

/// What outlives every snapshot: the metrics registry and the tasks that run after a response
/// (completion phases), which a graceful shutdown waits for.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Work left running after a response, tracked so that a drain can wait for it.
    pub background: TaskTracker,
    /// The span exporter, when the manifest configures one.
    pub telemetry: Option<Arc<crate::trace::Telemetry>>,
}

/// A route ready to serve.
#[derive(Debug)]
pub struct Route {
    /// The route's name.
    pub name: Arc<str>,
    /// Where requests go.
    pub upstream: Arc<Upstream>,
    /// Removed from the front of the path before forwarding.
    pub strip_prefix: Option<String>,
    /// Longest wait for the upstream's response head.
    pub timeout: Duration,
    /// Longest time for the whole upstream exchange.
    pub request_timeout: Option<Duration>,
    /// Which of the upstream's clients this route uses (they differ by connect timeout).
    pub client: usize,
    /// The plugin chain, in request-phase order. Shared, so that a completion phase that runs
    /// after the response can take its links along.
    pub chain: Vec<Arc<ChainLink>>,
    /// Whether a plugin in the chain reads bodies, so bodies are buffered.
    pub buffer_body: bool,
    /// Whether the chain is only fixed edits (contract 0.2.4): no phase of it is called and
    /// none reads a body. Its requests take the bare path, the gateway making the edits on the
    /// way (`proxy::handle`).
    pub fixed_only: bool,
    /// The route's metric series.
    pub metrics: RouteMetrics,
}

/// One plugin in a route's chain, with the configuration this route gives it.
#[derive(Debug)]
pub struct ChainLink {
    /// The compiled plugin.
    pub plugin: Arc<LoadedPlugin>,
    /// The configuration, as the JSON text handed to `configure`.
    pub config: String,
    /// What a failure of this plugin does to the request.
    pub on_failure: FailurePolicy,
    /// Configured instances kept between requests, when the plugin's isolation is `pooled`.
    pub pool: Option<Arc<InstancePool>>,
    /// The phases the plugin asks for with this configuration, as it answered when the manifest
    /// loaded. A request takes an instance only for these phases, and gives it back after the
    /// last one.
    pub phases: Phases,
    /// The header edits that are the whole of the plugin's request or response phase with this
    /// configuration, as it answered when the manifest loaded: such a phase is not called, the
    /// gateway makes the edits in the plugin's place.
    pub fixed: FixedEdits,
    /// The plugin pre-initialised with this configuration, for a fresh instance per request
    /// without `configure` (`isolation: per-request`, when a phase of it is called; made in
    /// the background after the load).
    pub preinit: Option<Arc<PreinitSlot>>,
    /// The next request's fresh instance, made after a response (a per-request use whose
    /// request or response phase is called: what a completion phase takes is made after the
    /// response anyway).
    pub ahead: Option<Ahead>,
}

impl ChainLink {
    /// Whether every phase the plugin asks for with this configuration is fixed edits: it is
    /// never called for a request.
    pub fn fixed_only(&self) -> bool {
        !self.phases.complete
            && (!self.phases.request || self.fixed.request.is_some())
            && (!self.phases.response || self.fixed.response.is_some())
    }

    /// An instance for one request: from the pool, or a fresh one: made ahead
    /// ([`ChainLink::make_ahead`]) or started now, from the pre-initialised image once it is
    /// ready, configured for the request until then.
    pub async fn acquire(&self) -> Result<Lease, PluginError> {
        let image = self.image();
        let fresh = match (&self.ahead, image) {
            (Some(ahead), Some(_)) => Some(ahead),
            _ => None,
        };
        if let Some(lease) = fresh.and_then(Ahead::take) {
            self.plugin.metrics().fresh_instance(true);
            return Ok(lease);
        }
        let lease = Lease::acquire(&self.plugin, &self.config, self.pool.as_ref(), image).await?;
        if fresh.is_some() {
            self.plugin.metrics().fresh_instance(false);
        }
        Ok(lease)
    }

    /// Makes the next request's fresh instance, off any request's path, for each link of
    /// `chain` that takes one ahead and has none ready or being made. Called once a response
    /// has been handed on: the work then runs after the connection's task has written it, while
    /// the client reads it, instead of while the upstream (which may share the CPU) answers.
    pub fn make_ahead(chain: &[Arc<ChainLink>]) {
        let due: Vec<(Arc<ChainLink>, AheadClaim)> = chain
            .iter()
            .filter_map(|link| {
                link.image()?;
                let claim = link.ahead.as_ref()?.claim()?;
                Some((link.clone(), claim))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for (link, claim) in due {
                if let (Some(ahead), Some(image)) = (&link.ahead, link.image()) {
                    ahead.make(claim, &link.plugin, image).await;
                }
            }
        });
    }

    /// The use's pre-initialised image, once it is made.
    fn image(&self) -> Option<&Preinitialized> {
        self.preinit.as_deref().and_then(PreinitSlot::image)
    }

    /// The instance for a later phase: the one held since an earlier phase of the request, or
    /// one taken now when this is the plugin's first.
    pub async fn keep_or_acquire(&self, held: Option<Lease>) -> Result<Lease, PluginError> {
        match held {
            Some(lease) => Ok(lease),
            None => self.acquire().await,
        }
    }
}

/// The most idle instances one pooled plugin use keeps. Each holds a slot of the engine's
/// instance pool and its touched memory, so the bound is modest: enough for the concurrency a
/// route sees on a few cores.
const MAX_IDLE_PER_USE: u32 = 32;

/// The immutable result of loading a manifest.
#[derive(Debug)]
pub struct Snapshot {
    /// The listeners the manifest declares.
    pub listeners: Vec<ListenerSpec>,
    /// Largest body buffered for plugins.
    pub max_body: u64,
    /// How client requests are read and checked. An `Arc`, so that connections can tell cheaply
    /// whether a reload changed it.
    pub http: Arc<HttpSpec>,
    /// Problems that do not stop the manifest from loading, such as an auth plugin set to fail
    /// open.
    pub warnings: Vec<ManifestError>,
    /// The admin listener, if the manifest declares one.
    pub admin: Option<AdminSpec>,
    /// How reloads are triggered.
    pub reload: ReloadSpec,
    /// How the gateway stops.
    pub shutdown: ShutdownSpec,
    /// The SHA-256 of the manifest text this snapshot was built from.
    pub manifest_digest: String,
    /// When the snapshot was built.
    pub loaded_at: SystemTime,
    /// Where its plugins' compiled code came from.
    pub cache: CacheStats,
    /// Metrics, completion tasks.
    pub services: Services,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: TrustedProxies,
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// The images this load found neither made nor being made, until
    /// [`Snapshot::preinitialize`] hands them to a background thread.
    preinit_jobs: std::sync::Mutex<Vec<PreinitJob>>,
    upstreams: Vec<Arc<Upstream>>,
    routes: Vec<Route>,
    router: Router,
}

impl Snapshot {
    /// Compiles every plugin, checks every plugin use's configuration and builds the routes.
    /// Returns every problem found, not just the first.
    pub async fn build(
        manifest: &Manifest,
        runtime: &Runtime,
        services: &Services,
    ) -> Result<Snapshot, ManifestErrors> {
        let file = manifest.path.as_path();
        let spec = &manifest.spec;
        let metrics = &services.metrics;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();

        let mut plugins: BTreeMap<String, Arc<LoadedPlugin>> = BTreeMap::new();
        let mut session =
            LoadSession::new(spec.plugin_cache.as_deref().map(|p| manifest.resolve(p)));
        for (name, declared) in &spec.plugins {
            let limits = &spec.limits;
            let budget = PluginBudget {
                deadline: declared.value.deadline.unwrap_or(limits.plugin_deadline),
                memory: declared.value.memory.unwrap_or(limits.plugin_memory).0,
                instances: declared.value.instances.unwrap_or(limits.plugin_instances),
                host_calls: declared
                    .value
                    .host_calls
                    .unwrap_or(limits.plugin_host_calls),
                headers: limits.plugin_headers,
                header_value: clamp_u32(limits.plugin_header_value.0),
                log_line: clamp_u32(limits.plugin_log_line.0),
                body: limits.max_body.0,
                body_access: declared.value.body,
            };
            let path = manifest.resolve(&declared.value.source);
            let pin = declared.value.sha256.as_deref();
            let plugin_metrics = metrics.plugin(name);
            match runtime.load(name, &path, pin, budget, &mut session, plugin_metrics) {
                Ok(plugin) => {
                    plugins.insert(name.clone(), Arc::new(plugin));
                }
                Err(message) => errors.push(
                    ManifestError::new(file, message)
                        .at_line(declared.referenced.line())
                        .for_plugin(name),
                ),
            }
        }

        let trusted_proxies =
            TrustedProxies::parse(&spec.trusted_proxies).unwrap_or_else(|message| {
                errors.push(ManifestError::new(file, message));
                TrustedProxies::default()
            });

        let mut upstreams = BTreeMap::new();
        for (name, declared) in &spec.upstreams {
            // Routes that override the connect timeout get a client (and pool) of their own.
            let connect_timeouts: Vec<Duration> = spec
                .routes
                .iter()
                .filter(|r| r.value.upstream == *name)
                .filter_map(|r| r.value.connect_timeout)
                .collect();
            let built = Upstream::new(
                name,
                &declared.value,
                manifest.base_dir(),
                metrics,
                &connect_timeouts,
            );
            match built {
                Ok(upstream) => {
                    upstreams.insert(name.as_str(), Arc::new(upstream));
                }
                Err(message) => errors.push(
                    ManifestError::new(file, format!("upstream `{name}`: {message}"))
                        .at_line(declared.referenced.line()),
                ),
            }
        }

        let mut routes = Vec::with_capacity(spec.routes.len());
        let mut router = RouterBuilder::default();
        let mut preinit_jobs = Vec::new();
        for spanned in &spec.routes {
            let route = &spanned.value;
            let line = spanned.referenced.line();
            if let Err(message) = router.add(routes.len(), &route.matcher) {
                errors.push(
                    ManifestError::new(file, message)
                        .at_line(line)
                        .in_route(&route.name),
                );
            }
            let mut chain = Vec::with_capacity(route.plugins.len());
            for used in &route.plugins {
                let Some(plugin) = plugins.get(used.value.name.as_str()) else {
                    continue; // Reported when the plugin failed to load.
                };
                let config = match &used.value.config {
                    None => Ok("null".to_string()),
                    Some(config) => {
                        resolve_references(config.clone(), manifest).map(|c| c.to_string())
                    }
                };
                let config = match config {
                    Ok(config) => config,
                    Err(message) => {
                        errors.push(
                            ManifestError::new(file, message)
                                .at_line(used.referenced.line())
                                .in_route(&route.name)
                                .for_plugin(&used.value.name),
                        );
                        continue;
                    }
                };
                let here = || {
                    ManifestError::new(file, "")
                        .at_line(used.referenced.line())
                        .in_route(&route.name)
                        .for_plugin(&used.value.name)
                };
                let pooled = spec
                    .plugins
                    .get(used.value.name.as_str())
                    .is_some_and(|p| p.value.isolation == Isolation::Pooled);
                let max_idle = MAX_IDLE_PER_USE.min(plugin.budget().instances) as usize;
                let pool = pooled.then(|| Arc::new(InstancePool::new(max_idle)));
                // A throw-away instance runs the plugin's own validation of this config and says
                // which phases it wants. (Not kept for a pool: it would hold one of the plugin's
                // instance slots while the other routes using the plugin are checked.)
                let mut phases = Phases::default();
                let mut fixed = FixedEdits::default();
                let mut configured = false;
                match plugin.instantiate(&config).await {
                    Ok(mut instance) => {
                        configured = true;
                        if instance.is_auth() && used.value.on_failure == FailurePolicy::FailOpen {
                            warnings.push(ManifestError {
                                message: "an auth plugin is set to fail open: when it fails, requests pass unchecked".into(),
                                ..here()
                            });
                        }
                        phases = instance.phases();
                        match instance.ask_fixed().await {
                            Ok(answer) => fixed = answer.unwrap_or_default(),
                            Err(err) => errors.push(ManifestError {
                                message: err.to_string(),
                                ..here()
                            }),
                        }
                    }
                    Err(err) => errors.push(ManifestError {
                        message: err.to_string(),
                        ..here()
                    }),
                }
                // Only for a phase that is called: fixed edits need no instance.
                let called = (phases.request && fixed.request.is_none())
                    || (phases.response && fixed.response.is_none());
                // Per-request uses get an image, made after the load (`preinitialize`), unless
                // no request ever takes an instance of them; a config the plugin refused gets
                // none (the load fails anyway).
                let takes_instances = called || phases.complete;
                let preinit = match (configured && takes_instances, &pool, session.source(plugin)) {
                    (true, None, Some(bytes)) => {
                        let (slot, job) = runtime.preinit_slot(plugin, &config, bytes, &route.name);
                        preinit_jobs.extend(job);
                        Some(slot)
                    }
                    _ => None,
                };
                let ahead = (preinit.is_some() && called).then(|| runtime.ahead());
                chain.push(Arc::new(ChainLink {
                    plugin: plugin.clone(),
                    config,
                    on_failure: used.value.on_failure,
                    pool,
                    phases,
                    fixed,
                    preinit,
                    ahead,
                }));
            }
            let Some(upstream) = upstreams.get(route.upstream.as_str()) else {
                continue; // Reported by the manifest check or the upstream's own error.
            };
            routes.push(Route {
                name: Arc::from(route.name.as_str()),
                upstream: upstream.clone(),
                strip_prefix: route.strip_prefix.clone(),
                timeout: route.timeout.unwrap_or(upstream.timeout),
                request_timeout: route.request_timeout.or(upstream.request_timeout),
                client: upstream.client_index(route.connect_timeout),
                buffer_body: chain.iter().any(|link| link.plugin.budget().body_access),
                fixed_only: !chain.is_empty()
                    && chain
                        .iter()
                        .all(|link| link.fixed_only() && !link.plugin.budget().body_access),
                chain,
                metrics: metrics.route(&route.name),
            });
        }

        if !errors.is_empty() {
            // Plugins and upstreams were visited by name: report in file order.
            errors.sort_by_key(|err| err.line);
            return Err(ManifestErrors(errors));
        }
        runtime.commit(&session);
        Ok(Snapshot {
            listeners: spec.listeners.iter().map(|l| l.value.clone()).collect(),
            max_body: spec.limits.max_body.0,
            http: Arc::new(spec.http.clone()),
            warnings,
            admin: spec.admin.as_ref().map(|a| a.value.clone()),
            reload: spec.reload.clone(),
            shutdown: spec.shutdown.clone(),
            manifest_digest: manifest.digest.clone(),
            loaded_at: SystemTime::now(),
            cache: session.stats,
            services: services.clone(),
            trusted_proxies,
            plugins,
            preinit_jobs: std::sync::Mutex::new(preinit_jobs),
            upstreams: upstreams.into_values().collect(),
            routes,
            router: router.build(),
        })
    }

    /// Starts what runs beside requests while this snapshot is served: the upstreams' active
    /// health checks, and the making of its plugins' pre-initialised images. Call on the
    /// serving runtime once the snapshot is swapped in; the checks end when the snapshot is
    /// dropped, and so do images not yet begun.
    pub fn activate(&self, runtime: &Arc<Runtime>) {
        for upstream in &self.upstreams {
            upstream.start_health_checks();
        }
        let jobs = std::mem::take(
            &mut *self
                .preinit_jobs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        runtime.preinitialize_in_background(jobs);
    }

    /// Takes over the health the previous snapshot learnt of the upstreams and targets both
    /// have. Call before [`Snapshot::activate`].
    pub fn inherit_health(&self, previous: &Snapshot) {
        for upstream in &self.upstreams {
            if let Some(old) = previous.upstream(&upstream.name) {
                upstream.inherit_health(old);
            }
        }
    }

    /// Every per-request plugin use's pre-initialised image slot, with its route and plugin
    /// names.
    pub fn preinit_slots(&self) -> impl Iterator<Item = (&str, &str, &Arc<PreinitSlot>)> {
        self.routes.iter().flat_map(|route| {
            route.chain.iter().filter_map(|link| {
                let slot = link.preinit.as_ref()?;
                Some((&*route.name, link.plugin.name(), slot))
            })
        })
    }

    /// An upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The routes' names, in manifest order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|route| &*route.name)
    }

    /// A loaded plugin, by its name in the manifest.
    pub fn plugin(&self, name: &str) -> Option<&Arc<LoadedPlugin>> {
        self.plugins.get(name)
    }

    /// Finds the route for a request.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
    ) -> Result<&Route, RouteMatch> {
        match self.router.lookup(host, path, method) {
            RouteMatch::Found(index) => Ok(&self.routes[index]),
            other => Err(other),
        }
    }
}

fn clamp_u32(bytes: u64) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Replaces references in a plugin's config with what they name, so that secrets need not be
/// written in the manifest: `{ $env: NAME }` becomes the value of the gateway's environment
/// variable, `{ $file: path }` the text of a file (relative to the manifest's folder). The plugin
/// sees only the values.
fn resolve_references(
    mut value: serde_json::Value,
    manifest: &Manifest,
) -> Result<serde_json::Value, String> {
    fn walk(value: &mut serde_json::Value, manifest: &Manifest, at: &str) -> Result<(), String> {
        use serde_json::Value;
        match value {
            Value::Object(map)
                if map.len() == 1 && (map.contains_key("$env") || map.contains_key("$file")) =>
            {
                let (kind, target) = map.iter().next().expect("one entry");
                let Some(target) = target.as_str() else {
                    return Err(format!("config `{at}`: `{kind}` takes a string"));
                };
                let resolved = if kind == "$env" {
                    std::env::var(target).map_err(|_| {
                        format!("config `{at}`: environment variable `{target}` is not set")
                    })?
                } else {
                    let path = manifest.resolve(std::path::Path::new(target));
                    std::fs::read_to_string(&path).map_err(|err| {
                        format!("config `{at}`: cannot read `{}`: {err}", path.display())
                    })?
                };
                *value = Value::String(resolved);
            }
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    let path = if at.is_empty() {
                        key.clone()
                    } else {
                        format!("{at}.{key}")
                    };
                    walk(item, manifest, &path)?;
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item, manifest, &format!("{at}[{i}]"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    walk(&mut value, manifest, "")?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_to_environment_and_file_values() {
        let dir = std::env::temp_dir().join(format!("wasmgate-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("jwks.json"), "{\"keys\":[]}").unwrap();
        let manifest = Manifest {
            path: dir.join("gw.yaml"),
            spec: serde_saphyr::from_str("version: 1\nlisteners: []\n").unwrap(),
            digest: String::new(),
        };
        let config = serde_json::json!({
            "keys": [{ "secret": { "$env": "PATH" } }],
            "jwks": { "$file": "jwks.json" },
            "plain": { "$other": 1 },
        });
        let resolved = resolve_references(config, &manifest).unwrap();
        assert_eq!(
            resolved["keys"][0]["secret"],
            std::env::var("PATH").unwrap()
        );
        assert_eq!(resolved["jwks"], "{\"keys\":[]}");
        assert_eq!(resolved["plain"], serde_json::json!({ "$other": 1 }));

        let missing = serde_json::json!({ "a": [{ "b": { "$env": "WASMGATE_SURELY_UNSET" } }] });
        assert_eq!(
            resolve_references(missing, &manifest).unwrap_err(),
            "config `a[0].b`: environment variable `WASMGATE_SURELY_UNSET` is not set"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
