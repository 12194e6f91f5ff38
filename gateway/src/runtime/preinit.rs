//! Pre-initialised images: a plugin configured once, its memory made the starting image of every
//! later instance.
//!
//! With `isolation: per-request` every request gets a fresh instance, and a fresh instance used
//! to run `configure` first: for the bundled plugins about a fifth of what the instance cost
//! (parsing the config, building keys and tables; docs/performance.md, "Session 13"). Here each
//! plugin use is configured once more, off the request path, by Wizer: the component is
//! instrumented, instantiated, configured with the use's config, and its memories and globals
//! are written into a new component, which is compiled and pre-instantiated. An instance of that
//! component starts where the configured one stood, without any call, and is still a fresh
//! instance: nothing one request leaves reaches another.
//!
//! What cannot carry over refuses the image, and the use goes on configuring an instance per
//! request, as before: a host resource the plugin still holds after `configure` (a WASI stream,
//! say: its handle would point at nothing in a new instance), or a key list it prepared (kept by
//! the host, per instance). A plugin whose `configure` reads the clock or random numbers gets the
//! values it read at load in every instance.
//!
//! Images live in memory only: a configured memory holds the config, secrets included, so it is
//! never written to the plugin cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Instance, InstancePre, Lift, WasmList};
use wasmtime::{CacheStore, Store};

use super::bindings::fiber;
use super::{
    CallMode, LinkError, LoadedPlugin, Phase, Phases, PluginState, ReadSet, Runtime, Ticking,
};

/// Cranelift's compiled functions, by its own key, kept while images are being made: an image,
/// and the instrumented component it is made from, have the very functions of the plugin, so
/// of the two compiles an image takes, the second (and both, for the next image of the same
/// plugin) mostly reuse the first's work. Empty and bypassed otherwise, so that it holds no
/// memory while the gateway just serves.
#[derive(Debug, Default)]
pub(super) struct FunctionCache {
    /// Batches of images being made now.
    batches: AtomicUsize,
    functions: Mutex<HashMap<Vec<u8>, Arc<[u8]>>>,
}

impl FunctionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<[u8]>>> {
        // A map is left consistent whatever panics elsewhere.
        self.functions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn begin_batch(&self) {
        self.batches.fetch_add(1, Ordering::AcqRel);
    }

    fn end_batch(&self) {
        if self.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.lock() = HashMap::new();
        }
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        if self.batches.load(Ordering::Acquire) == 0 {
            return None;
        }
        let found = self.lock().get(key).cloned()?;
        Some(Cow::Owned(found.to_vec()))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        if self.batches.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lock().insert(key.to_vec(), Arc::from(value));
        true
    }
}

/// A plugin use's pre-initialised component, ready to instantiate.
pub struct Preinitialized {
    pub(super) pre: InstancePre<PluginState>,
    pub(super) calls: Arc<CallMode>,
    pub(super) phases: Phases,
    pub(super) auth: bool,
    /// What the plugin reads with this configuration, as the instance the image was made from
    /// said (`handler-with-values.reads`).
    pub(super) reads: Option<Arc<ReadSet>>,
}

/// Where a plugin use's image arrives: empty while it is being made; then the image, or nothing
/// when it could not be made (the use then configures an instance per request).
#[derive(Default)]
pub struct PreinitSlot(OnceLock<Option<Preinitialized>>);

impl std::fmt::Debug for PreinitSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.get() {
            None => "pending",
            Some(Some(_)) => "ready",
            Some(None) => "refused",
        };
        f.debug_tuple("PreinitSlot").field(&state).finish()
    }
}

impl PreinitSlot {
    /// The image, once made.
    pub fn image(&self) -> Option<&Preinitialized> {
        self.0.get().and_then(Option::as_ref)
    }

    /// Whether the attempt to make the image has ended, made or not.
    pub fn settled(&self) -> bool {
        self.0.get().is_some()
    }
}

/// Identifies an image: the component, the memory cap it was configured under, and the config.
/// A hash rather than the config itself, so that the registry keeps no second copy of secrets.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ImageKey([u8; 32]);

impl ImageKey {
    fn of(plugin: &LoadedPlugin, config: &str) -> ImageKey {
        let mut hash = Sha256::new();
        hash.update(plugin.digest.0);
        hash.update(plugin.budget.memory.to_le_bytes());
        hash.update(config.as_bytes());
        ImageKey(hash.finalize().into())
    }
}

/// The images of the manifest being served (and of one being loaded), by key: a reload that
/// keeps a plugin and its config reuses the image instead of making it again. Weak, so an image
/// goes when the last chain link using it does.
#[derive(Default)]
pub(super) struct Registry(Mutex<HashMap<ImageKey, Weak<PreinitSlot>>>);

impl Registry {
    fn slot(&self, key: ImageKey) -> (Arc<PreinitSlot>, bool) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = map.get(&key).and_then(Weak::upgrade) {
            return (slot, false);
        }
        map.retain(|_, slot| slot.strong_count() > 0);
        let slot = Arc::new(PreinitSlot::default());
        map.insert(key, Arc::downgrade(&slot));
        (slot, true)
    }
}

/// An image to make in the background.
pub struct PreinitJob {
    slot: Weak<PreinitSlot>,
    plugin: Arc<LoadedPlugin>,
    config: String,
    bytes: Arc<[u8]>,
    /// A route that uses it, for the log.
    route: Arc<str>,
}

impl std::fmt::Debug for PreinitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreinitJob")
            .field("plugin", &self.plugin.name)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// The image slot for `plugin` configured with `config`: the one an earlier load made or is
    /// making, or a new, empty one with the job that fills it. `bytes` are the plugin's
    /// component, as loaded.
    pub fn preinit_slot(
        &self,
        plugin: &Arc<LoadedPlugin>,
        config: &str,
        bytes: &Arc<[u8]>,
        route: &str,
    ) -> (Arc<PreinitSlot>, Option<PreinitJob>) {
        let (slot, new) = self.images.slot(ImageKey::of(plugin, config));
        let job = new.then(|| PreinitJob {
            slot: Arc::downgrade(&slot),
            plugin: plugin.clone(),
            config: config.to_owned(),
            bytes: bytes.clone(),
            route: Arc::from(route),
        });
        (slot, job)
    }

    /// Makes the images on a thread of their own, one after another (compiling uses every core
    /// already), and returns at once. A job whose chain links are all gone (a reload replaced
    /// them) is skipped.
    pub fn preinitialize_in_background(self: &Arc<Self>, jobs: Vec<PreinitJob>) {
        if jobs.is_empty() {
            return;
        }
        // Benchmarks wait for the second line before they measure (bench/bench.py).
        tracing::info!(
            images = jobs.len(),
            "plugin images: making them in the background"
        );
        // Weak: a gateway that stops (a test's, say) lets its runtime and its engine's address
        // space reservation go while images are still being made.
        let runtime = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("wasmgate-preinit".into())
            .stack_size(super::PLUGIN_THREAD_STACK)
            .spawn(move || {
                let tokio = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(tokio) => tokio,
                    Err(err) => {
                        tracing::warn!("plugins are configured per request: no runtime to pre-initialise them: {err}");
                        return;
                    }
                };
                let functions = match runtime.upgrade() {
                    Some(runtime) => runtime.functions.clone(),
                    None => return,
                };
                functions.begin_batch();
                let started = Instant::now();
                let (mut made, mut refused) = (0, 0);
                for job in jobs {
                    let Some(runtime) = runtime.upgrade() else {
                        break;
                    };
                    match runtime.run_job(&tokio, job) {
                        Some(true) => made += 1,
                        Some(false) => refused += 1,
                        None => {}
                    }
                }
                functions.end_batch();
                tracing::info!(
                    made,
                    refused,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "plugin images settled"
                );
            });
        if let Err(err) = spawned {
            tracing::warn!(
                "plugins are configured per request: no thread to pre-initialise them: {err}"
            );
        }
    }

    /// Makes one image: whether it was made, or `None` when nobody needs it any more.
    fn run_job(&self, tokio: &tokio::runtime::Runtime, job: PreinitJob) -> Option<bool> {
        // The slot is not held while the image is made: once every chain link using it is gone
        // (a reload replaced them, the gateway stopped), the work stops at the next step.
        let wanted = || job.slot.strong_count() > 0;
        if !wanted() {
            return None;
        }
        let started = Instant::now();
        // Wizer asserts what it reads of the instance; a failed read makes it panic (the read's
        // error is the reason then). The slot must settle either way.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio.block_on(self.make(&job.plugin, &job.bytes, &job.config, &wanted))
        }))
        .unwrap_or_else(|_| {
            Err(Unmade::Refused(
                "Wizer failed while making the image".into(),
            ))
        });
        let slot = job.slot.upgrade()?;
        let made = match made {
            Ok(image) => Ok(image),
            Err(Unmade::Refused(reason)) => Err(reason),
            Err(Unmade::Abandoned) => return None,
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let plugin = &*job.plugin.name;
        let route = &*job.route;
        match made {
            Ok(image) => {
                tracing::info!(
                    plugin,
                    route,
                    elapsed_ms,
                    "plugin pre-initialised: fresh instances skip `configure`"
                );
                let _ = slot.0.set(Some(image));
                Some(true)
            }
            Err(reason) => {
                tracing::warn!(
                    plugin,
                    route,
                    elapsed_ms,
                    "plugin not pre-initialised, so each request's instance configures itself: {reason}"
                );
                let _ = slot.0.set(None);
                Some(false)
            }
        }
    }

    /// Makes the image of `plugin` (whose component is `bytes`) configured with `config`.
    pub async fn preinitialize(
        &self,
        plugin: &LoadedPlugin,
        bytes: &[u8],
        config: &str,
    ) -> Result<Preinitialized, String> {
        match self.make(plugin, bytes, config, &|| true).await {
            Ok(image) => Ok(image),
            Err(Unmade::Refused(reason)) => Err(reason),
            // Not with a `wanted` that always says yes.
            Err(Unmade::Abandoned) => Err("abandoned".into()),
        }
    }

    /// [`Runtime::preinitialize`], abandoned between steps once `wanted` says nobody is
    /// waiting for the image any more.
    async fn make(
        &self,
        plugin: &LoadedPlugin,
        bytes: &[u8],
        config: &str,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Preinitialized, Unmade> {
        let still_wanted = || match wanted() {
            true => Ok(()),
            false => Err(Unmade::Abandoned),
        };
        let wizer = wasmtime_wizer::Wizer::new();
        let (cx, instrumented) = wizer
            .instrument_component(bytes)
            .map_err(|err| format!("cannot instrument the component: {err:#}"))?;
        still_wanted()?;
        let component = Component::new(&self.engine, &instrumented)
            .map_err(|err| format!("cannot compile the instrumented component: {err:#}"))?;
        still_wanted()?;
        // On a fiber, always: the thread is this job's alone, and a fiber call can be cut off
        // at its deadline by the epoch like any other.
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|err| format!("cannot link the instrumented component: {err:#}"))?;
        let handler = fiber::HandlerIndices::new(&pre).map_err(|err| format!("{err:#}"))?;
        let calls = Arc::new(CallMode {
            fiber: super::Exports {
                handler: handler.clone(),
                values: None,
            },
            plain: None,
            fixed: None,
            slow: Default::default(),
        });
        let with_values = match component.get_export_index(None, super::WITH_VALUES_EXPORT) {
            Some(_) => Some(fiber::WithValuesIndices::new(&pre).map_err(|err| format!("{err:#}"))?),
            None => None,
        };
        let mut store = plugin.new_store(calls, false);
        let ticking = Ticking::start(&plugin.ticker);
        let configured = async {
            begin(&mut store, Phase::Configure);
            let instance = pre.instantiate_async(&mut store).await?;
            begin(&mut store, Phase::Configure);
            let info = handler
                .load(&mut store, &instance)?
                .call_configure(&mut store, config)
                .await?;
            // Asked here, as every configured instance is asked: the image's instances are
            // never configured, so they could not be asked later.
            let reads = match (&info, &with_values) {
                (Ok(_), Some(with_values)) => {
                    begin(&mut store, Phase::Configure);
                    let reads = with_values
                        .load(&mut store, &instance)?
                        .call_reads(&mut store)
                        .await?;
                    Some(reads)
                }
                _ => None,
            };
            Ok::<_, wasmtime::Error>((instance, info, reads))
        }
        .await;
        let (instance, info, reads) = match configured {
            Ok((instance, Ok(info), reads)) => (instance, info, reads),
            Ok((_, Err(message), _)) => {
                return Err(format!("`configure` refused: {message}").into());
            }
            Err(err) => {
                let failure = super::classify(&mut store, Phase::Configure, err);
                return Err(format!("`configure` failed: {failure}").into());
            }
        };
        let reads = match reads {
            Some(reads) => ReadSet::new(
                reads.request_headers,
                reads.response_headers,
                reads.properties,
            )
            .map_err(|err| format!("`reads` refused: {err}"))?
            .map(Arc::new),
            None => None,
        };
        let state = store.data();
        if !state.table.is_empty() {
            return Err(String::from("the plugin holds a host resource (a WASI stream, say) after `configure`, which a new instance would not have").into());
        }
        if !state.prepared.is_empty() {
            return Err(String::from(
                "the plugin prepared a key list in `configure`; the host keeps those per instance",
            )
            .into());
        }
        begin(&mut store, Phase::Configure);
        let mut access = SnapshotAccess {
            store: &mut store,
            instance,
            failure: None,
        };
        let snapshot = wizer.snapshot_component(&cx, &mut access).await;
        drop(ticking);
        let snapshot = snapshot.map_err(|err| format!("cannot snapshot the instance: {err:#}"))?;
        if let Some(failure) = access.failure {
            return Err(format!("cannot read the instance's state: {failure:#}").into());
        }
        still_wanted()?;

        let component = Component::new(&self.engine, &snapshot)
            .map_err(|err| format!("cannot compile the pre-initialised component: {err:#}"))?;
        let (pre, calls) =
            self.link(&component, plugin.calls.slow.clone())
                .map_err(|err| match err {
                    LinkError::Link(err) | LinkError::NotAPlugin(err) => {
                        format!("cannot link the pre-initialised component: {err:#}")
                    }
                })?;
        Ok(Preinitialized {
            pre,
            calls: Arc::new(calls),
            phases: Phases {
                request: info.on_request,
                response: info.on_response,
                complete: info.on_complete,
            },
            auth: info.auth,
            reads: reads.clone(),
        })
    }
}

/// Why an image was not made.
enum Unmade {
    /// It cannot be: the use configures an instance per request.
    Refused(String),
    /// Nobody waits for it any more.
    Abandoned,
}

impl From<String> for Unmade {
    fn from(reason: String) -> Unmade {
        Unmade::Refused(reason)
    }
}

/// Starts a call's budget afresh, as [`super::PluginInstance::begin`] does.
fn begin(store: &mut Store<PluginState>, phase: Phase) {
    let state = store.data_mut();
    state.phase = phase;
    state.calls = 0;
    state.ran = Duration::ZERO;
    state.running_since = Instant::now();
    store.set_epoch_deadline(1);
}

/// What Wizer's snapshot reads from the instrumented instance, through the exports the
/// instrumentation added. Wizer's trait returns values, not errors: a failed read records the
/// error and returns a zero, and the snapshot is then refused.
struct SnapshotAccess<'a> {
    store: &'a mut Store<PluginState>,
    instance: Instance,
    failure: Option<wasmtime::Error>,
}

impl SnapshotAccess<'_> {
    async fn call<R>(&mut self, instance: &str, func: &str) -> Option<R>
    where
        R: wasmtime::component::ComponentType + Lift + Send + Sync + 'static,
    {
        // Each read gets the deadline afresh: Wizer's work between reads is not the plugin's.
        begin(self.store, Phase::Configure);
        let called = async {
            let missing = || wasmtime::format_err!("no export `{instance}#{func}`");
            let at = self
                .instance
                .get_export_index(&mut *self.store, None, instance)
                .ok_or_else(missing)?;
            let index = self
                .instance
                .get_export_index(&mut *self.store, Some(&at), func)
                .ok_or_else(missing)?;
            let typed = self
                .instance
                .get_typed_func::<(), (R,)>(&mut *self.store, index)?;
            let (value,) = typed.call_async(&mut *self.store, ()).await?;
            Ok::<_, wasmtime::Error>(value)
        }
        .await;
        match called {
            Ok(value) => Some(value),
            Err(err) => {
                // Logged here as well: Wizer may panic on the short read before the error
                // can be returned.
                tracing::warn!(plugin = %self.store.data().plugin, "reading `{instance}#{func}` for the image: {err:#}");
                self.failure.get_or_insert(err);
                None
            }
        }
    }
}

impl wasmtime_wizer::ComponentInstanceState for SnapshotAccess<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        match self.call::<WasmList<u8>>(instance, func).await {
            Some(list) => contents(list.as_le_slice(&*self.store)),
            None => contents(&[]),
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func)
            .await
            .unwrap_or_default()
            .to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func)
            .await
            .unwrap_or_default()
            .to_bits()
    }
}
