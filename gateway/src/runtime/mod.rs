//! The Wasm runtime: one engine for the process, plugins compiled once per manifest load, and a
//! fresh instance per plugin per request.
//!
//! Three lifecycle stages:
//! - **start-up** ([`Runtime::new`]): the engine with its pooling allocator, the linker with the
//!   gateway's imports, and the epoch ticker that enforces call deadlines;
//! - **manifest load** ([`Runtime::load`]): each plugin compiled, its imports checked against
//!   what plugins are granted, and pre-instantiated ([`LoadedPlugin`]); then each use's config
//!   checked by a throw-away instance;
//! - **per request** ([`LoadedPlugin::instantiate`]): a store with the plugin's memory cap and a
//!   deadline per call, an instance from the pre-instantiated component, dropped with the
//!   request. No request ever sees another's instance, so nothing a plugin keeps in its globals
//!   outlives the request, and a trap can only ever poison the instance that trapped.

mod bindings;
pub mod budget;
pub mod cache;
pub mod exchange;
pub mod fixed;
mod host;
mod preinit;
mod sync_io;
mod values;
pub use host::PLUGIN_LOG_TARGET;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Instance, InstancePre, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreContextMut,
    Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::metrics::PluginMetrics;

use self::bindings::{Action, ImmediateResponse, PluginWorld, WitReadSet, fiber, plain};
use self::budget::Limiter;
pub use self::budget::{FailureCounters, FailureKind, PluginBudget, PluginError};
pub use self::cache::{CacheStats, LoadSession, WasmDigest};
pub use self::exchange::{Exchange, Phase};
pub use self::preinit::{PreinitJob, PreinitSlot, Preinitialized};
pub use self::values::ReadSet;

/// How often the epoch advances: the granularity of plugin deadlines, and how long a plugin call
/// runs before it yields to other requests.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The most native stack a plugin's code may use before its call traps (Wasmtime's default,
/// stated here because [`PLUGIN_THREAD_STACK`] is sized from it).
pub const MAX_WASM_STACK: usize = 512 << 10;

/// The stack of every thread the gateway starts that calls plugins (the workers, the reload
/// thread). A plain call ([`CallMode`]) runs the plugin on the calling thread's own stack, so
/// that stack must hold [`MAX_WASM_STACK`] beside the gateway's frames below the call and a host
/// function's above it; otherwise a plugin that recurses overflows the thread instead of
/// trapping, and the process aborts. Rust's default (2 MiB) is enough, but `RUST_MIN_STACK` can
/// lower it: with 256 KiB, one such request aborted the gateway.
pub const PLUGIN_THREAD_STACK: usize = 8 * MAX_WASM_STACK;

/// The largest memory cap a plugin may be given; the pooling allocator reserves slots this big.
pub const MAX_PLUGIN_MEMORY: u64 = 256 << 20;

/// Most plugin instances alive at once, across all plugins and requests, unless
/// `WASMGATE_INSTANCE_SLOTS` says otherwise.
pub const MAX_INSTANCES: u32 = 2000;

/// The environment variable that sets how many instance slots the pooling allocator reserves.
/// Every slot reserves address space for its memories (gigabytes each, almost none of it ever
/// touched), so a process under an address-space limit (`ulimit -v`, or valgrind) needs fewer.
pub const INSTANCE_SLOTS_VAR: &str = "WASMGATE_INSTANCE_SLOTS";

/// The instance slots to reserve: [`MAX_INSTANCES`], or the number in [`INSTANCE_SLOTS_VAR`].
fn instance_slots() -> wasmtime::Result<u32> {
    match std::env::var(INSTANCE_SLOTS_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(MAX_INSTANCES),
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(slots @ 1..=100_000) => Ok(slots),
            _ => Err(wasmtime::format_err!(
                "{INSTANCE_SLOTS_VAR} must be a number of instance slots from 1 to 100000, not `{text}`"
            )),
        },
        Err(err) => Err(wasmtime::format_err!("{INSTANCE_SLOTS_VAR}: {err}")),
    }
}

/// How much of a slot's linear memory stays mapped between instances, when only the pages an
/// instance wrote are reset (Linux 6.7 and later, with the `PAGEMAP_SCAN` ioctl): a bound on
/// the resident memory a slot keeps, far above what a bundled plugin writes per request
/// (~25 KiB).
const KEEP_RESIDENT: usize = 4 << 20;

/// The same for a slot's tables.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Instances made ahead ([`Ahead`]) may hold at most one in this many of the engine's instance
/// slots.
const AHEAD_SHARE: u32 = 8;

/// How much of a plugin's stderr (where a Rust panic message goes) is kept for the failure report.
const STDERR_CAPTURE: usize = 4 << 10;

/// The WASI interfaces every plugin may import. Rust's standard library imports all of these
/// whether a plugin uses them or not; each store's WASI context makes them harmless: no
/// preopened directory, an empty environment, stdin empty, stdout discarded, stderr captured for
/// failure reports. Everything else outside `wasmgate:plugin` (sockets, HTTP, ...) is refused.
const GRANTED_WASI: [&str; 20] = [
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Whether a plugin may import the interface `name` (`ns:pkg/iface@version`).
fn is_granted(name: &str) -> bool {
    let unversioned = name.split('@').next().unwrap_or(name);
    unversioned.starts_with("wasmgate:plugin/") || GRANTED_WASI.contains(&unversioned)
}

/// The process-wide Wasm engine and linker.
pub struct Runtime {
    engine: Engine,
    /// `wasmtime-wasi`'s definitions as they are: some async, so every call runs on a fiber.
    linker: Linker<PluginState>,
    /// The same with the async `wasi:io` functions redefined as plain ones ([`sync_io`]), for
    /// the plugins whose calls can skip the fiber.
    plain_linker: Linker<PluginState>,
    compiled: cache::MemoryCache,
    /// Pre-initialised images of the plugin uses being served ([`preinit`]).
    images: preinit::Registry,
    /// Compiled functions, kept while images are being made.
    functions: Arc<preinit::FunctionCache>,
    ticker: EpochTicker,
    reset_in_place: bool,
    /// How many more instances may be made ahead ([`Ahead`]), engine-wide.
    ahead_budget: Arc<AtomicU32>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine, links the gateway's imports and starts the epoch ticker.
    pub fn new() -> wasmtime::Result<Runtime> {
        let slots = instance_slots()?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            // A component instantiates several core modules: its main module and the shims
            // that lower its imports.
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .total_stacks(slots)
            .max_memory_size(MAX_PLUGIN_MEMORY as usize);
        let reset_in_place = PoolingAllocationConfig::is_pagemap_scan_available();
        if reset_in_place {
            // A slot's memory is reset for its next instance by copying back only the pages the
            // last one wrote (found with the `PAGEMAP_SCAN` ioctl), and they stay mapped. Left
            // at the default, every instance's memories and tables were handed back with
            // `madvise` (8.5 calls per request for the three-plugin chain) and the next instance
            // faulted every page it touched in again (19 faults per request): 37 % of the CPU of
            // a request with a fresh instance per plugin (docs/performance.md, "Session 11").
            // Without the ioctl (older kernels), Wasmtime would reset the lowest
            // `keep_resident` bytes whole, which for a Rust plugin is mostly stack it never
            // touched: the default stays then.
            pool.linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(TABLE_KEEP_RESIDENT)
                .pagemap_scan(wasmtime::Enabled::Yes);
        }

        let functions = Arc::new(preinit::FunctionCache::default());
        let mut config = Config::new();
        config.enable_incremental_compilation(functions.clone())?;
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if std::env::var_os("WASMGATE_PERF_MAP").is_some() {
            // For profiling: plugin code gets names in `perf report` (/tmp/perf-PID.map).
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // The async flavour: the sync one drives its streams with a nested Tokio runtime, which
        // panics when called from a Tokio worker.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        PluginWorld::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
        let mut plain_linker = linker.clone();
        sync_io::define(&mut plain_linker)?;

        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime {
            engine,
            linker,
            plain_linker,
            compiled: cache::MemoryCache::default(),
            images: preinit::Registry::default(),
            functions,
            ticker,
            reset_in_place,
            // An instance made ahead holds a slot of the engine's pool while it waits: an eighth
            // of them at most, so that idle ones can never starve the requests of slots.
            ahead_budget: Arc::new(AtomicU32::new(slots / AHEAD_SHARE)),
        })
    }

    /// A holder for one plugin use's instance made ahead, drawing on the engine-wide budget.
    pub fn ahead(&self) -> Ahead {
        Ahead {
            ready: std::sync::Mutex::new(None),
            making: AtomicBool::new(false),
            budget: self.ahead_budget.clone(),
        }
    }

    /// Whether an instance slot's memory is reset for the next instance in place, only the pages
    /// the last instance wrote copied back (Linux 6.7 and later), rather than handed back to the
    /// kernel and faulted in again.
    pub fn resets_memory_in_place(&self) -> bool {
        self.reset_in_place
    }

    /// Compiles a plugin (or takes it from a cache), checks what it imports, and
    /// pre-instantiates it. `pin`, when given, is the SHA-256 (hex) the file must have.
    /// `session` records the components this load uses, so that a file declared several times
    /// (with different budgets, say) is compiled once.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        pin: Option<&str>,
        budget: PluginBudget,
        session: &mut LoadSession,
        metrics: PluginMetrics,
    ) -> Result<LoadedPlugin, String> {
        let shown = path.display();
        if budget.memory > MAX_PLUGIN_MEMORY {
            return Err(format!(
                "memory cap {} exceeds the gateway's maximum of {MAX_PLUGIN_MEMORY} bytes",
                budget.memory
            ));
        }
        let bytes = std::fs::read(path).map_err(|err| format!("cannot read `{shown}`: {err}"))?;
        let digest = WasmDigest::of(&bytes);
        if let Some(pin) = pin
            && !pin.eq_ignore_ascii_case(&digest.to_hex())
        {
            return Err(format!(
                "`{shown}` has sha256 {}, but the manifest pins {pin}",
                digest.to_hex()
            ));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(format!("`{shown}` is not WebAssembly (no `\\0asm` header)"));
        }
        // Kept for the load's pre-initialisation jobs, which need the very bytes checked here.
        let bytes = session
            .sources
            .entry(digest)
            .or_insert_with(|| Arc::from(bytes))
            .clone();
        let component = self
            .component(&bytes, digest, session)
            .map_err(|err| format!("`{shown}` is not a valid WebAssembly component: {err:#}"))?;
        let refused: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .filter(|(import, _)| !is_granted(import))
            .map(|(import, _)| format!("`{import}`"))
            .collect();
        if !refused.is_empty() {
            return Err(format!(
                "`{shown}` imports {}, which plugins are not granted",
                refused.join(", ")
            ));
        }
        let (pre, calls) = self
            .link(&component, Arc::default())
            .map_err(|err| match err {
                LinkError::Link(err) => format!("`{shown}` cannot be linked: {err:#}"),
                LinkError::NotAPlugin(err) => format!(
                    "`{shown}` is not a wasmgate plugin (world wasmgate:plugin/plugin@0.2.x): {err:#}"
                ),
            })?;
        Ok(LoadedPlugin {
            name: Arc::from(name),
            digest,
            engine: self.engine.clone(),
            pre,
            calls: Arc::new(calls),
            budget,
            live: Arc::new(AtomicU32::new(0)),
            failures: FailureCounters::default(),
            metrics,
            ticker: self.ticker.shared.clone(),
        })
    }
}

/// Why a compiled component could not be made ready to instantiate.
enum LinkError {
    /// Its imports do not match the gateway's.
    Link(wasmtime::Error),
    /// It lacks the plugin world's exports.
    NotAPlugin(wasmtime::Error),
}

impl Runtime {
    /// Pre-instantiates a plugin's component (or an image of it) with the linker its imports
    /// allow (plain calls unless something it imports may wait) and finds its exports. `slow`
    /// is the plugin's switch to calls on a fiber.
    fn link(
        &self,
        component: &Component,
        slow: Arc<AtomicBool>,
    ) -> Result<(InstancePre<PluginState>, CallMode), LinkError> {
        let plain = !sync_io::needs_fiber(&self.engine, component);
        let linker = if plain {
            &self.plain_linker
        } else {
            &self.linker
        };
        let pre = linker.instantiate_pre(component).map_err(LinkError::Link)?;
        // `handler-with-values` is optional (plugins built before contract 0.2.3 lack it), but
        // one that is there must be whole.
        let with_values = component
            .get_export_index(None, WITH_VALUES_EXPORT)
            .is_some();
        let fiber = Exports {
            handler: fiber::HandlerIndices::new(&pre).map_err(LinkError::NotAPlugin)?,
            values: match with_values {
                true => Some(fiber::WithValuesIndices::new(&pre).map_err(LinkError::NotAPlugin)?),
                false => None,
            },
        };
        // `handler-with-fixed-edits` likewise (0.2.4); asked once per use, on a fiber.
        let fixed = match component.get_export_index(None, WITH_FIXED_EDITS_EXPORT) {
            Some(_) => {
                Some(fiber::WithFixedEditsIndices::new(&pre).map_err(LinkError::NotAPlugin)?)
            }
            None => None,
        };
        let plain = match plain {
            true => Some(Exports {
                handler: plain::HandlerIndices::new(&pre).map_err(LinkError::NotAPlugin)?,
                values: match with_values {
                    true => {
                        Some(plain::WithValuesIndices::new(&pre).map_err(LinkError::NotAPlugin)?)
                    }
                    false => None,
                },
            }),
            false => None,
        };
        Ok((
            pre,
            CallMode {
                fiber,
                plain,
                fixed,
                slow,
            },
        ))
    }

    /// The compiled component for these bytes: from this load, an earlier load, the disk cache,
    /// or compiled now (and then written to the disk cache).
    fn component(
        &self,
        bytes: &[u8],
        digest: WasmDigest,
        session: &mut LoadSession,
    ) -> wasmtime::Result<Component> {
        if let Some(component) = session.used.get(&digest) {
            return Ok(component.clone());
        }
        let (component, origin) = match self.compiled.get(&digest) {
            Some(component) => (component, cache::Origin::Memory),
            None => self.compile(bytes, &digest, session)?,
        };
        match origin {
            cache::Origin::Compiled => session.stats.compiled += 1,
            cache::Origin::Memory => session.stats.memory += 1,
            cache::Origin::Disk => session.stats.disk += 1,
        }
        session.used.insert(digest, component.clone());
        Ok(component)
    }

    fn compile(
        &self,
        bytes: &[u8],
        digest: &WasmDigest,
        session: &mut LoadSession,
    ) -> wasmtime::Result<(Component, cache::Origin)> {
        let Some(dir) = session.disk.clone() else {
            return Ok((
                Component::new(&self.engine, bytes)?,
                cache::Origin::Compiled,
            ));
        };
        match cache::read(&dir, &self.engine, digest) {
            Ok(Some(component)) => return Ok((component, cache::Origin::Disk)),
            Ok(None) => {}
            Err(problem) => {
                session.stats.rejected += 1;
                tracing::warn!("plugin cache: {problem}; compiling again");
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Err(problem) = cache::write(&dir, &self.engine, digest, &component) {
            // The cache only saves time: a read-only folder must not stop the gateway.
            tracing::warn!("plugin cache: {problem}");
        }
        Ok((component, cache::Origin::Compiled))
    }

    /// Records that the load `session` belongs to is now the one being served: its components
    /// are kept in memory for the next load, and those only it no longer uses are let go.
    pub fn commit(&self, session: &LoadSession) {
        self.compiled.replace(session);
    }
}

/// A compiled, pre-instantiated plugin, shared by every route that uses it.
pub struct LoadedPlugin {
    name: Arc<str>,
    /// The SHA-256 of the component's bytes.
    digest: WasmDigest,
    engine: Engine,
    pre: InstancePre<PluginState>,
    calls: Arc<CallMode>,
    budget: PluginBudget,
    /// Instances alive now, against `budget.instances`.
    live: Arc<AtomicU32>,
    failures: FailureCounters,
    metrics: PluginMetrics,
    ticker: Arc<TickerState>,
}

/// How a plugin's calls are made.
///
/// # Calls without a fiber
///
/// An async Wasmtime call runs the guest on a fiber (its own stack) so that it can be suspended:
/// at an epoch tick, to let other requests run, or in a host function that waits. Creating,
/// entering and leaving the fiber is much of what an empty call costs. A plugin whose imports
/// never wait ([`sync_io`]) is called plainly, on the worker's stack, until one of its calls runs
/// through several epoch ticks ([`plain_tick_limit`]): a plain call cannot yield, so that call
/// runs on to its end or its deadline, and every later call of the plugin (until the manifest is
/// loaded again) runs on a fiber and yields at each tick. A slow or looping plugin thus holds a
/// worker for at most one deadline once, then no longer than a tick at a time.
struct CallMode {
    /// The exports, for calls on a fiber.
    fiber: Exports<fiber::HandlerIndices, fiber::WithValuesIndices>,
    /// The exports, for plain calls; `None` when the plugin imports something that may wait.
    plain: Option<Exports<plain::HandlerIndices, plain::WithValuesIndices>>,
    /// `handler-with-fixed-edits`, when the plugin has it (asked on a fiber, once per use).
    fixed: Option<fiber::WithFixedEditsIndices>,
    /// Set when a plain call ran through too many epoch ticks. Shared by the plugin and its
    /// pre-initialised images: the same code is as slow in either.
    slow: Arc<AtomicBool>,
}

/// The name `handler-with-values` is exported under (any later 0.2 version matches it).
const WITH_VALUES_EXPORT: &str = "wasmgate:plugin/handler-with-values@0.2.3";

/// The name `handler-with-fixed-edits` is exported under (any later 0.2 version matches it).
const WITH_FIXED_EDITS_EXPORT: &str = "wasmgate:plugin/handler-with-fixed-edits@0.2.4";

/// A plugin's exports (their indices in the component, or loaded from an instance): `handler`,
/// and `handler-with-values` when the plugin has it.
struct Exports<H, V> {
    handler: H,
    values: Option<V>,
}

/// The exports of one instance, loaded the first time a call needs them: a fresh instance
/// usually makes one or two calls, and loading an export checks its type.
struct Loaded<H, V> {
    handler: Option<H>,
    values: Option<V>,
}

impl<H, V> Default for Loaded<H, V> {
    fn default() -> Self {
        Loaded {
            handler: None,
            values: None,
        }
    }
}

/// Loads, into `$loaded`, the interface a call needs (`handler-with-values` when `$values`)
/// from the `$indices` of the same kind (plain or fiber).
macro_rules! ensure_loaded {
    ($loaded:expr, $indices:expr, $values:expr, $store:expr, $instance:expr) => {{
        let indices = $indices;
        match $values {
            true if $loaded.values.is_none() => {
                let values = indices
                    .values
                    .as_ref()
                    .expect("only a plugin with `handler-with-values` has reads");
                values
                    .load(&mut $store, $instance)
                    .map(|values| $loaded.values = Some(values))
            }
            false if $loaded.handler.is_none() => indices
                .handler
                .load(&mut $store, $instance)
                .map(|handler| $loaded.handler = Some(handler)),
            _ => Ok(()),
        }
    }};
}

impl CallMode {
    /// Whether the next call (or instantiation) can be plain.
    fn plain(&self) -> bool {
        self.plain.is_some() && !self.slow.load(Ordering::Relaxed)
    }
}

/// Calls an export on a [`PluginInstance`]: one of `handler`'s (`$interface` is `handler`) or of
/// `handler-with-values`'s (`values`), plainly or on a fiber as [`PluginInstance::begin`]
/// decided, which also loaded it (the two ways are different generated types, one of them async).
macro_rules! call_export {
    ($instance:expr, $interface:ident, $export:ident $(, $arg:expr)*) => {
        match $instance.store.data().on_fiber {
            false => $instance
                .plain
                .$interface
                .as_ref()
                .expect("`begin` loads the exports a call needs")
                .$export(&mut $instance.store $(, $arg)*),
            true => {
                $instance
                    .fiber
                    .$interface
                    .as_ref()
                    .expect("`begin` loads the exports a call needs")
                    .$export(&mut $instance.store $(, $arg)*)
                    .await
            }
        }
    };
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The plugin's name in the manifest.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's budget.
    pub fn budget(&self) -> &PluginBudget {
        &self.budget
    }

    /// Failures so far, by kind.
    pub fn failures(&self) -> &FailureCounters {
        &self.failures
    }

    /// Counts a failure, here and in the metrics.
    pub fn record_failure(&self, kind: FailureKind) {
        self.failures.record(kind);
        self.metrics.failed(kind);
    }

    /// The plugin's metric series.
    pub fn metrics(&self) -> &PluginMetrics {
        &self.metrics
    }

    /// Starts an instance and configures it for one route. Fails fast with
    /// [`FailureKind::Overloaded`] when the plugin's instance cap is reached.
    pub async fn instantiate(&self, config: &str) -> Result<PluginInstance, PluginError> {
        let mut instance = self.start(&self.pre, &self.calls).await?;
        instance.begin(Phase::Configure, false)?;
        let outcome = call_export!(instance, handler, call_configure, config);
        match instance.finish(Phase::Configure, outcome)? {
            Ok(info) if info.auth && !info.on_request => Err(PluginError {
                kind: FailureKind::Config,
                phase: Phase::Configure,
                detail: "the plugin says it decides who may pass (auth) but asks for no request \
                         phase, so it would let every request through"
                    .into(),
            }),
            Ok(info) => {
                instance.auth = info.auth;
                instance.phases = Phases {
                    request: info.on_request,
                    response: info.on_response,
                    complete: info.on_complete,
                };
                instance.reads = instance.ask_reads().await?;
                Ok(instance)
            }
            Err(message) => Err(PluginError {
                kind: FailureKind::Config,
                phase: Phase::Configure,
                detail: message,
            }),
        }
    }

    /// Starts an instance of the plugin's pre-initialised `image`: configured already, with no
    /// call made. Counts against the plugin's instance cap like any other.
    pub async fn instantiate_preinitialized(
        &self,
        image: &Preinitialized,
    ) -> Result<PluginInstance, PluginError> {
        let mut instance = self.start(&image.pre, &image.calls).await?;
        instance.auth = image.auth;
        instance.phases = image.phases;
        instance.reads = image.reads.clone();
        Ok(instance)
    }

    /// A store for one instance, with the plugin's budget and a fresh WASI context.
    fn new_store(&self, calls: Arc<CallMode>, plain: bool) -> Store<PluginState> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let state = PluginState {
            call_mode: calls,
            on_fiber: !plain,
            exchange: None,
            phase: Phase::Configure,
            plugin: self.name.clone(),
            budget: self.budget,
            calls: 0,
            ran: Duration::ZERO,
            plain_ticks: 0,
            running_since: Instant::now(),
            resumed_at: None,
            failure: None,
            prepared: Vec::new(),
            limiter: Limiter {
                memory: self.budget.memory as usize,
                breached: false,
            },
            wasi: None,
            table: ResourceTable::new(),
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(on_epoch_tick);
        store.set_epoch_deadline(1);
        store
    }

    /// Instantiates `pre` (the plugin's component, or an image of it) in a new store, not yet
    /// configured. Fails fast with [`FailureKind::Overloaded`] when the plugin's instance cap is
    /// reached.
    async fn start(
        &self,
        pre: &InstancePre<PluginState>,
        calls: &Arc<CallMode>,
    ) -> Result<PluginInstance, PluginError> {
        let slot =
            InstanceSlot::take(&self.live, self.budget.instances).ok_or_else(|| PluginError {
                kind: FailureKind::Overloaded,
                phase: Phase::Configure,
                detail: format!("{} instances already running", self.budget.instances),
            })?;
        let plain = calls.plain();
        let mut store = self.new_store(calls.clone(), plain);
        // Start-up code runs here: the deadline must be enforceable already.
        let ticking = Ticking::start(&self.ticker);
        let instantiated = match plain {
            true => pre.instantiate(&mut store),
            false => pre.instantiate_async(&mut store).await,
        };
        drop(ticking);
        let component = match instantiated {
            Ok(instance) => instance,
            Err(err) => return Err(classify(&mut store, Phase::Configure, err)),
        };
        Ok(PluginInstance {
            store,
            component,
            started_plain: plain,
            plain: Loaded::default(),
            fiber: Loaded::default(),
            poisoned: false,
            in_call: None,
            ticker: self.ticker.clone(),
            auth: false,
            phases: Phases::default(),
            reads: None,
            values: Vec::new(),
            _slot: slot,
        })
    }
}

/// Runs at every epoch tick while a plugin's wasm code runs. Past the call's deadline the call
/// traps; before it, the call yields, so that a slow or looping plugin never holds a worker
/// thread for more than a tick at a time. The deadline counts the time the call actually ran,
/// not the time it spent waiting to be resumed, so a busy gateway does not fail innocent
/// plugins.
fn on_epoch_tick(mut store: StoreContextMut<'_, PluginState>) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    let now = Instant::now();
    let ran = state.time_spent(now);
    if ran >= state.budget.deadline {
        let detail = format!("ran past its {:?} deadline", state.budget.deadline);
        state.failure = Some((FailureKind::Deadline, detail));
        return Err(Trap::Interrupt.into());
    }
    state.ran = ran;
    state.running_since = now;
    if !state.on_fiber {
        // A plain call cannot yield: it runs on, to its end or its deadline. Past
        // `plain_ticks` ticks, the plugin's later calls run on a fiber.
        state.plain_ticks += 1;
        if state.plain_ticks >= plain_tick_limit(state.budget.deadline)
            && !state.call_mode.slow.swap(true, Ordering::Relaxed)
        {
            tracing::info!(
                plugin = %state.plugin,
                ticks = state.plain_ticks,
                "a plugin call ran through several epoch ticks without a fiber to yield from; \
                 its calls run on a fiber from now on"
            );
        }
        return Ok(UpdateDeadline::Continue(1));
    }
    let mark = state
        .resumed_at
        .get_or_insert_with(Default::default)
        .clone();
    Ok(UpdateDeadline::YieldCustom(
        1,
        Box::pin(async move {
            tokio::task::yield_now().await;
            mark.store(since_base(Instant::now()), Ordering::Release);
        }),
    ))
}

/// The epoch ticks a plain call may run through before its plugin's calls move to a fiber: a
/// tenth of the deadline, and at least [`MIN_PLAIN_TICKS`].
///
/// Ticks are counted rather than time measured because a worker thread the OS preempts in the
/// middle of a call of a few microseconds (on a busy machine, often) finds the epoch advanced when
/// it resumes, but sees one tick however long it was away; a call that really runs on sees one
/// at every tick. Measured as time, such preemptions moved every plugin of a benchmark to fiber
/// calls within a minute.
fn plain_tick_limit(deadline: Duration) -> u32 {
    let tenth = deadline.as_micros() / 10 / EPOCH_TICK.as_micros().max(1);
    u32::try_from(tenth)
        .unwrap_or(u32::MAX)
        .max(MIN_PLAIN_TICKS)
}

/// The fewest epoch ticks a plain call may run through before its plugin's calls move to a fiber.
const MIN_PLAIN_TICKS: u32 = 3;

/// A fixed instant that resume times are stored relative to, so that they fit an atomic.
static TIME_BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_base(instant: Instant) -> u64 {
    // Never 0, which means "not resumed".
    (instant.saturating_duration_since(*TIME_BASE).as_nanos() as u64).max(1)
}

/// A claim on one of a plugin's instance slots, given back on drop.
struct InstanceSlot(Arc<AtomicU32>);

impl InstanceSlot {
    fn take(live: &Arc<AtomicU32>, cap: u32) -> Option<InstanceSlot> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()
        .map(|_| InstanceSlot(live.clone()))
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One instance of a plugin, serving one request.
pub struct PluginInstance {
    store: Store<PluginState>,
    component: Instance,
    /// Whether the instance was started with a plain call, so that its calls can be plain.
    started_plain: bool,
    /// The exports for plain calls, loaded as calls need them.
    plain: Loaded<plain::Handler, plain::WithValues>,
    /// The exports for calls on a fiber, loaded as calls need them.
    fiber: Loaded<fiber::Handler, fiber::WithValues>,
    /// Set by a failed call: the instance is never entered again.
    poisoned: bool,
    /// Between `begin` and `finish`: a call whose future was dropped (the client went away)
    /// left the guest mid-call, so the instance must not be reused. Keeps the epoch ticking.
    in_call: Option<Ticking>,
    ticker: Arc<TickerState>,
    auth: bool,
    phases: Phases,
    /// What the plugin reads, handed in with each call (`handler-with-values`); `None` for a
    /// plugin without that export or that names nothing.
    reads: Option<Arc<ReadSet>>,
    /// The buffer the values are laid out in, kept for the instance's next call.
    values: Vec<u8>,
    _slot: InstanceSlot,
}

/// The phases a plugin asked for when it was configured (its `plugin-info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phases {
    /// `handler.on-request`.
    pub request: bool,
    /// `handler.on-response`.
    pub response: bool,
    /// `handler.on-complete`.
    pub complete: bool,
}

impl Default for Phases {
    /// What the contract assumes before `configure` has answered.
    fn default() -> Phases {
        Phases {
            request: true,
            response: true,
            complete: false,
        }
    }
}

impl Phases {
    /// Whether the plugin has a phase after the request phase.
    pub fn after_request(self) -> bool {
        self.response || self.complete
    }
}

impl PluginInstance {
    /// Whether the instance can serve another request: no call failed or was cut off.
    fn reusable(&self) -> bool {
        !self.poisoned && self.in_call.is_none()
    }
}

/// Configured instances of one plugin use, kept between requests when the plugin's isolation is
/// `pooled`: a request then skips instantiation and `configure`, at the price of the plugin's
/// globals living on from one request to the next.
pub struct InstancePool {
    // Boxed, here and in a `Lease`: an instance is a few hundred bytes, and unboxed it was
    // copied at every hand-over (pool, lease, the futures that hold it): ~4k instructions per
    // request in memcpy for a chain of three (`bench/instructions.py`).
    #[allow(clippy::vec_box)]
    idle: std::sync::Mutex<Vec<Box<PluginInstance>>>,
    max_idle: usize,
}

impl fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstancePool")
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl InstancePool {
    /// A pool keeping at most `max_idle` idle instances.
    pub fn new(max_idle: usize) -> InstancePool {
        InstancePool {
            idle: std::sync::Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
        }
    }

    /// Instances idle now.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    /// Keeps an idle, configured instance for a later request, unless the pool is full or the
    /// instance cannot be reused.
    fn put(&self, instance: Box<PluginInstance>) {
        if instance.reusable() {
            let mut idle = self.lock();
            if idle.len() < self.max_idle {
                idle.push(instance);
            }
        }
    }

    #[allow(clippy::vec_box)]
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<PluginInstance>>> {
        // Pushing and popping leave the vector consistent whatever panics elsewhere.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The next request's fresh instance of one plugin use, made ahead (`isolation: per-request`
/// with a pre-initialised image).
///
/// Instantiating from the image is most of what a fresh instance costs a request (6 to 15 µs
/// per plugin on the benchmark machines). Made after a response has been handed to the client, it
/// runs while the client reads that response and sends its next request, rather than while the
/// next request waits. The instance is never called before a request takes it, so it is as
/// fresh as one made on the request's path; nothing of one request reaches another.
///
/// One instance at most is kept per use: it is alive, so it counts against the plugin's
/// instance cap (`instances`) like an idle pooled instance, and holds a slot of the engine's
/// pool. None is made while half of the plugin's cap is in use (the next request then makes its
/// own), and all the uses together hold at most an eighth of the engine's slots
/// ([`Runtime::ahead`]).
pub struct Ahead {
    ready: std::sync::Mutex<Option<MadeAhead>>,
    /// Set while an instance is being made (or claimed to be), so that concurrent requests do
    /// not start several.
    making: AtomicBool,
    /// The engine-wide count of instances that may still be made ahead.
    budget: Arc<AtomicU32>,
}

/// An instance waiting in an [`Ahead`], with its share of the budget.
struct MadeAhead {
    instance: Box<PluginInstance>,
    _share: AheadShare,
}

/// One unit of the engine-wide budget of instances made ahead, given back on drop: when the
/// instance is taken by a request, dropped with its use, or could not be made.
struct AheadShare(Arc<AtomicU32>);

impl AheadShare {
    fn take(budget: &Arc<AtomicU32>) -> Option<AheadShare> {
        budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| AheadShare(budget.clone()))
    }
}

impl Drop for AheadShare {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Leave to make one instance ahead ([`Ahead::claim`]).
pub struct AheadClaim(AheadShare);

impl fmt::Debug for AheadClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AheadClaim").finish_non_exhaustive()
    }
}

impl fmt::Debug for Ahead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ahead")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Ahead {
    /// Whether an instance is waiting for a request.
    pub fn is_ready(&self) -> bool {
        self.lock().is_some()
    }

    /// The instance made ahead, if there is one, lent to a request (not pooled afterwards).
    pub fn take(&self) -> Option<Lease> {
        let made = self.lock().take()?;
        Some(Lease {
            instance: Some(made.instance),
            pool: None,
        })
    }

    /// Claims the making of the next instance, when none is waiting, none is being made and the
    /// engine-wide budget allows one; the claim must then be handed to [`Ahead::make`].
    pub fn claim(&self) -> Option<AheadClaim> {
        if self.is_ready() || self.making.swap(true, Ordering::AcqRel) {
            return None;
        }
        match AheadShare::take(&self.budget) {
            Some(share) => Some(AheadClaim(share)),
            None => {
                self.making.store(false, Ordering::Release);
                None
            }
        }
    }

    /// Makes the next instance from `image`, as `claim` allowed, while at least half of the
    /// plugin's instance cap is free: idle instances made ahead for several uses of one plugin
    /// must not take the instances its other uses' requests need. A failure is left for the
    /// request path to meet and report.
    pub async fn make(&self, claim: AheadClaim, plugin: &LoadedPlugin, image: &Preinitialized) {
        let live = u64::from(plugin.live.load(Ordering::Acquire));
        if live * 2 >= u64::from(plugin.budget.instances) {
            tracing::debug!(
                plugin = plugin.name(),
                live,
                "no instance made ahead: half of the plugin's instance cap is in use"
            );
            self.making.store(false, Ordering::Release);
            return;
        }
        match plugin.instantiate_preinitialized(image).await {
            Ok(instance) => {
                *self.lock() = Some(MadeAhead {
                    instance: Box::new(instance),
                    _share: claim.0,
                });
            }
            Err(err) => tracing::debug!(
                plugin = plugin.name(),
                kind = err.kind.as_str(),
                "no instance made ahead"
            ),
        }
        self.making.store(false, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MadeAhead>> {
        // Taking and putting leave the option consistent whatever panics elsewhere.
        self.ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An instance lent to one request; with a pool, it goes back when the lease ends, unless a call
/// failed or was cut off.
pub struct Lease {
    instance: Option<Box<PluginInstance>>,
    pool: Option<Arc<InstancePool>>,
}

impl Lease {
    /// Takes an idle instance from `pool`, or starts a new one: from the pre-initialised
    /// `image` when there is one, or configured with `config` now.
    pub async fn acquire(
        plugin: &LoadedPlugin,
        config: &str,
        pool: Option<&Arc<InstancePool>>,
        image: Option<&Preinitialized>,
    ) -> Result<Lease, PluginError> {
        if let Some(pool) = pool {
            // Bind first: the guard must be gone before the `await` below.
            let idle = pool.lock().pop();
            if let Some(instance) = idle {
                return Ok(Lease {
                    instance: Some(instance),
                    pool: Some(pool.clone()),
                });
            }
        }
        let instance = match image {
            Some(image) => plugin.instantiate_preinitialized(image).await?,
            None => plugin.instantiate(config).await?,
        };
        Ok(Lease {
            instance: Some(Box::new(instance)),
            pool: pool.cloned(),
        })
    }
}

impl std::ops::Deref for Lease {
    type Target = PluginInstance;

    fn deref(&self) -> &PluginInstance {
        self.instance
            .as_ref()
            .expect("present until the lease ends")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PluginInstance {
        self.instance
            .as_mut()
            .expect("present until the lease ends")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (Some(instance), Some(pool)) = (self.instance.take(), &self.pool) {
            pool.put(instance);
        }
    }
}

/// What a plugin's request phase decided.
#[derive(Debug)]
pub enum Decision {
    /// Go on to the next plugin and the upstream.
    Continue,
    /// Answer with this response. Boxed: it is the rare decision, and inline it made every
    /// call's outcome a response's size, copied at each step of its way back to the chain.
    Respond(Box<http::Response<bytes::Bytes>>),
}

impl PluginInstance {
    /// The plugin's name in the manifest.
    pub fn plugin_name(&self) -> &str {
        &self.store.data().plugin
    }

    /// Whether the plugin said, when configured, that it decides who may pass.
    pub fn is_auth(&self) -> bool {
        self.auth
    }

    /// The phases the plugin asked for when configured.
    pub fn phases(&self) -> Phases {
        self.phases
    }

    /// Runs the request phase. The exchange comes back whatever happened.
    pub async fn on_request(
        &mut self,
        exchange: Box<Exchange>,
    ) -> (Box<Exchange>, Result<Decision, PluginError>) {
        self.store.data_mut().exchange = Some(exchange);
        let decision = match self.begin(Phase::Request, self.reads.is_some()) {
            Ok(()) => {
                let outcome = match self.take_values(Phase::Request) {
                    Some(values) => {
                        let outcome = call_export!(self, values, call_on_request, &values);
                        self.values = values;
                        outcome
                    }
                    None => call_export!(self, handler, call_on_request),
                };
                match self.finish(Phase::Request, outcome) {
                    Ok(Action::Continue) => Ok(Decision::Continue),
                    Ok(Action::Respond(response)) => {
                        immediate_response(response, &self.store.data().budget)
                            .inspect_err(|_| self.poisoned = true)
                    }
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        };
        (self.take_exchange(), decision)
    }

    /// Runs the response phase. The exchange, with its response, comes back whatever happened.
    pub async fn on_response(
        &mut self,
        exchange: Box<Exchange>,
    ) -> (Box<Exchange>, Result<(), PluginError>) {
        self.late_phase(exchange, Phase::Response).await
    }

    /// Runs the completion phase. The exchange comes back whatever happened.
    pub async fn on_complete(
        &mut self,
        exchange: Box<Exchange>,
    ) -> (Box<Exchange>, Result<(), PluginError>) {
        self.late_phase(exchange, Phase::Complete).await
    }

    /// The response or completion phase: the calls that return nothing.
    async fn late_phase(
        &mut self,
        exchange: Box<Exchange>,
        phase: Phase,
    ) -> (Box<Exchange>, Result<(), PluginError>) {
        self.store.data_mut().exchange = Some(exchange);
        let outcome = match self.begin(phase, self.reads.is_some()) {
            Ok(()) => {
                let values = self.take_values(phase);
                let outcome = match (&values, phase) {
                    (Some(values), Phase::Complete) => {
                        call_export!(self, values, call_on_complete, values)
                    }
                    (Some(values), _) => call_export!(self, values, call_on_response, values),
                    (None, Phase::Complete) => call_export!(self, handler, call_on_complete),
                    (None, _) => call_export!(self, handler, call_on_response),
                };
                if let Some(values) = values {
                    self.values = values;
                }
                self.finish(phase, outcome)
            }
            Err(err) => Err(err),
        };
        (self.take_exchange(), outcome)
    }

    /// The values the plugin reads, laid out for a call in `phase` in the instance's buffer
    /// (taken out for the call, and put back after it); `None` when the plugin names none.
    fn take_values(&mut self, phase: Phase) -> Option<Vec<u8>> {
        let reads = self.reads.as_ref()?;
        let exchange = self.store.data_mut().exchange.as_deref_mut()?;
        // Their values are looked up in the maps.
        if reads.reads_forwarding_headers() {
            exchange.forwarding_into_map();
        }
        if reads.reads_response_headers() {
            exchange.response_mut();
        }
        let mut values = std::mem::take(&mut self.values);
        reads.encode(exchange, phase, &mut values);
        Some(values)
    }

    /// Asks a configured instance for its plugin's fixed edits (`handler-with-fixed-edits`,
    /// contract 0.2.4), checked as the imports check an edit; `None` for a plugin without that
    /// export. Asked once per use of the plugin, when the manifest loads.
    pub async fn ask_fixed(&mut self) -> Result<Option<fixed::FixedEdits>, PluginError> {
        let calls = self.store.data().call_mode.clone();
        let Some(indices) = &calls.fixed else {
            return Ok(None);
        };
        self.begin(Phase::Configure, false)?;
        let outcome = match indices.load(&mut self.store, &self.component) {
            Ok(exports) => exports.call_fixed(&mut self.store).await,
            Err(err) => Err(err),
        };
        let answer = self.finish(Phase::Configure, outcome)?;
        if self.auth && answer.request.is_some() {
            // The gateway would never call its check: every request would pass.
            return Err(PluginError {
                kind: FailureKind::Config,
                phase: Phase::Configure,
                detail: "the plugin says it decides who may pass (auth) but fixes its request \
                         phase, so it would let every request through"
                    .into(),
            });
        }
        let budget = self.store.data().budget;
        fixed::FixedEdits::check(answer, &budget)
            .map(Some)
            .map_err(|detail| PluginError {
                kind: FailureKind::Config,
                phase: Phase::Configure,
                detail,
            })
    }

    /// Asks a configured instance what its plugin reads (`handler-with-values.reads`), and
    /// checks the answer: a list the gateway refuses fails the configuration.
    async fn ask_reads(&mut self) -> Result<Option<Arc<ReadSet>>, PluginError> {
        if self.store.data().call_mode.fiber.values.is_none() {
            return Ok(None);
        }
        self.begin(Phase::Configure, true)?;
        let outcome = call_export!(self, values, call_reads);
        let WitReadSet {
            request_headers,
            response_headers,
            properties,
        } = self.finish(Phase::Configure, outcome)?;
        match ReadSet::new(request_headers, response_headers, properties) {
            Ok(reads) => Ok(reads.map(Arc::new)),
            Err(detail) => Err(PluginError {
                kind: FailureKind::Config,
                phase: Phase::Configure,
                detail,
            }),
        }
    }

    fn take_exchange(&mut self) -> Box<Exchange> {
        self.store
            .data_mut()
            .exchange
            .take()
            .expect("the exchange stays in the store for the whole call")
    }

    /// Prepares a call: refuses a poisoned instance, resets the per-call budget, decides
    /// whether the call is plain or on a fiber ([`CallMode`]), and loads the exports it needs
    /// (`handler-with-values`'s when `with_values`).
    fn begin(&mut self, phase: Phase, with_values: bool) -> Result<(), PluginError> {
        if self.poisoned {
            return Err(PluginError {
                kind: FailureKind::Trap,
                phase,
                detail: "the instance failed earlier and is not entered again".into(),
            });
        }
        let calls = self.store.data().call_mode.clone();
        let plain = match &calls.plain {
            Some(indices) if self.started_plain && calls.plain() => Some(indices),
            _ => None,
        };
        let loaded: wasmtime::Result<()> = match plain {
            Some(indices) => ensure_loaded!(
                self.plain,
                indices,
                with_values,
                self.store,
                &self.component
            ),
            None => ensure_loaded!(
                self.fiber,
                &calls.fiber,
                with_values,
                self.store,
                &self.component
            ),
        };
        if let Err(err) = loaded {
            self.poisoned = true;
            return Err(classify(&mut self.store, phase, err));
        }
        let plain = plain.is_some();
        let state = self.store.data_mut();
        state.on_fiber = !plain;
        state.phase = phase;
        state.calls = 0;
        state.ran = Duration::ZERO;
        state.plain_ticks = 0;
        state.running_since = Instant::now();
        if let Some(mark) = &state.resumed_at {
            mark.store(0, Ordering::Relaxed);
        }
        self.store.set_epoch_deadline(1);
        self.in_call = Some(Ticking::start(&self.ticker));
        Ok(())
    }

    /// Ends a call: a failure poisons the instance and is classified.
    fn finish<R>(&mut self, phase: Phase, outcome: wasmtime::Result<R>) -> Result<R, PluginError> {
        self.in_call = None;
        outcome.map_err(|err| {
            self.poisoned = true;
            classify(&mut self.store, phase, err)
        })
    }
}

/// Names a failed call's kind: a breach the host recorded, the memory cap, the deadline, or a
/// plain trap (with the guest's panic message, when it wrote one).
fn classify(store: &mut Store<PluginState>, phase: Phase, err: wasmtime::Error) -> PluginError {
    let state = store.data_mut();
    if let Some((kind, detail)) = state.failure.take() {
        return PluginError {
            kind,
            phase,
            detail,
        };
    }
    if state.limiter.breached {
        return PluginError {
            kind: FailureKind::Memory,
            phase,
            detail: format!("{err:?}"),
        };
    }
    let stderr = state.stderr.contents();
    let mut detail = format!("{err:?}");
    if !stderr.is_empty() {
        detail.push_str("\nplugin stderr: ");
        detail.push_str(&String::from_utf8_lossy(&stderr));
    }
    PluginError {
        kind: FailureKind::Trap,
        phase,
        detail,
    }
}

/// Checks and converts a plugin's immediate response.
fn immediate_response(
    response: ImmediateResponse,
    budget: &PluginBudget,
) -> Result<Decision, PluginError> {
    let refuse = |kind, detail: String| PluginError {
        kind,
        phase: Phase::Request,
        detail: format!("immediate response: {detail}"),
    };
    let status = http::StatusCode::from_u16(response.status).map_err(|_| {
        refuse(
            FailureKind::Contract,
            format!("status {} is not valid", response.status),
        )
    })?;
    if response.headers.len() > budget.headers as usize {
        return Err(refuse(
            FailureKind::Cap,
            format!(
                "{} headers, more than the {} allowed",
                response.headers.len(),
                budget.headers
            ),
        ));
    }
    if response.body.len() as u64 > budget.body {
        return Err(refuse(
            FailureKind::Cap,
            format!(
                "a body of {} bytes, more than the {} allowed",
                response.body.len(),
                budget.body
            ),
        ));
    }
    let mut built = http::Response::new(bytes::Bytes::from(response.body));
    *built.status_mut() = status;
    for (name, value) in response.headers {
        if value.len() > budget.header_value as usize {
            return Err(refuse(
                FailureKind::Cap,
                format!("the value of `{name}` is too long"),
            ));
        }
        let (name, value) = exchange::checked_header(&name, value, false)
            .map_err(|m| refuse(FailureKind::Contract, m))?;
        built.headers_mut().append(name, value);
    }
    Ok(Decision::Respond(Box::new(built)))
}

/// The data of a plugin instance's store.
pub struct PluginState {
    /// How the plugin's calls are made; marked slow by the epoch tick of a plain call.
    call_mode: Arc<CallMode>,
    /// Whether the current call runs on a fiber, and so can yield at an epoch tick.
    on_fiber: bool,
    /// Epoch ticks the current call has run through, when it is plain.
    plain_ticks: u32,
    exchange: Option<Box<Exchange>>,
    phase: Phase,
    plugin: Arc<str>,
    budget: PluginBudget,
    /// Host calls made in the current call.
    calls: u32,
    /// Time the current call ran before `running_since`.
    ran: Duration,
    /// When the current call started, or last resumed after a yield.
    running_since: Instant,
    /// Set by the yield future when the call resumes (nanoseconds after [`TIME_BASE`]; 0 while
    /// not resumed). Allocated at the first yield, which most calls never reach.
    resumed_at: Option<Arc<AtomicU64>>,
    /// A breach recorded by a host call, which then traps.
    failure: Option<(FailureKind, String)>,
    /// Key lists the plugin prepared (`properties.prepare`), by handle, for the instance's life.
    prepared: Vec<Box<[host::PropertyKey]>>,
    limiter: Limiter,
    /// Made at the instance's first WASI call: building one costs ~2k instructions (its random
    /// sources are seeded, and `build` leaves a fresh builder behind, seeded too), and a plugin
    /// given a fresh instance per request often makes no WASI call at all.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    /// The plugin's stderr, captured for the failure report.
    stderr: MemoryOutputPipe,
}

impl PluginState {
    /// How long the current call has run, not counting time spent yielded.
    fn time_spent(&mut self, now: Instant) -> Duration {
        if let Some(mark) = &self.resumed_at {
            let resumed = mark.swap(0, Ordering::Acquire);
            if resumed != 0 {
                self.running_since = *TIME_BASE + Duration::from_nanos(resumed);
            }
        }
        self.ran + now.saturating_duration_since(self.running_since)
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let stderr = &self.stderr;
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| WasiCtx::builder().stderr(stderr.clone()).build()),
            table: &mut self.table,
        }
    }
}

/// Ticks without any plugin call in progress before the ticker parks (100 ms).
const IDLE_TICKS_BEFORE_PARKING: u32 = 100;

/// Advances the engine's epoch every [`EPOCH_TICK`] while any plugin code may be running, and
/// sleeps otherwise: an idle gateway does not wake a thousand times a second.
struct EpochTicker {
    shared: Arc<TickerState>,
    thread: Option<thread::JoinHandle<()>>,
}

struct TickerState {
    /// Calls and instantiations in progress.
    active: AtomicU32,
    stop: AtomicBool,
    thread: std::sync::OnceLock<thread::Thread>,
}

impl TickerState {
    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// Keeps the epoch ticking while alive: held across every call into a plugin.
struct Ticking(Arc<TickerState>);

impl Ticking {
    fn start(state: &Arc<TickerState>) -> Ticking {
        if state.active.fetch_add(1, Ordering::AcqRel) == 0 {
            state.wake();
        }
        Ticking(state.clone())
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let shared = Arc::new(TickerState {
            active: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let state = shared.clone();
        let thread = thread::Builder::new()
            .name("wasmgate-epoch".into())
            .spawn(move || {
                let mut idle_ticks = 0;
                while !state.stop.load(Ordering::Acquire) {
                    if state.active.load(Ordering::Acquire) == 0 {
                        idle_ticks += 1;
                    } else {
                        idle_ticks = 0;
                    }
                    // Park only after a quiet spell: under load calls start and end thousands
                    // of times a second, and parking between them would cost a wake-up each.
                    if idle_ticks > IDLE_TICKS_BEFORE_PARKING {
                        // Woken by the first call to start (an unpark before this park makes
                        // it return at once), by `drop`, or spuriously: the loop checks again.
                        thread::park();
                        idle_ticks = 0;
                        continue;
                    }
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        let _ = shared.thread.set(thread.thread().clone());
        EpochTicker {
            shared,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_made_ahead_share_one_engine_wide_budget_and_give_it_back() {
        let budget = Arc::new(AtomicU32::new(2));
        let first = AheadShare::take(&budget).expect("room for two");
        let _second = AheadShare::take(&budget).expect("room for two");
        assert!(AheadShare::take(&budget).is_none(), "the budget is spent");
        drop(first);
        assert!(
            AheadShare::take(&budget).is_some(),
            "a share comes back on drop"
        );

        let ahead = Ahead {
            ready: std::sync::Mutex::new(None),
            making: AtomicBool::new(false),
            budget: Arc::new(AtomicU32::new(0)),
        };
        assert!(ahead.claim().is_none(), "no budget, no claim");
        ahead.budget.store(1, Ordering::Release);
        let claim = ahead
            .claim()
            .expect("a refused claim leaves nothing in the making");
        assert!(ahead.claim().is_none(), "one is being made already");
        drop(claim);
        assert_eq!(ahead.budget.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_plain_call_may_run_a_tenth_of_its_deadline_in_ticks_and_at_least_three() {
        assert_eq!(plain_tick_limit(Duration::from_millis(50)), 5);
        assert_eq!(plain_tick_limit(Duration::from_secs(2)), 200);
        assert_eq!(plain_tick_limit(Duration::from_millis(20)), MIN_PLAIN_TICKS);
        assert_eq!(plain_tick_limit(Duration::ZERO), MIN_PLAIN_TICKS);
        assert_eq!(plain_tick_limit(Duration::MAX), u32::MAX);
    }

    #[test]
    fn only_the_contract_and_the_std_baseline_are_granted() {
        assert!(is_granted("wasmgate:plugin/request@0.2.0"));
        assert!(is_granted("wasi:cli/environment@0.2.6"));
        assert!(is_granted("wasi:filesystem/types@0.2.0"));
        assert!(!is_granted("wasi:sockets/tcp@0.2.6"));
        assert!(!is_granted("wasi:http/outgoing-handler@0.2.6"));
        assert!(!is_granted("evil:thing/steal"));
    }

    #[test]
    fn instance_slots_are_capped_and_given_back() {
        let live = Arc::new(AtomicU32::new(0));
        let a = InstanceSlot::take(&live, 2).unwrap();
        let _b = InstanceSlot::take(&live, 2).unwrap();
        assert!(InstanceSlot::take(&live, 2).is_none());
        drop(a);
        assert!(InstanceSlot::take(&live, 2).is_some());
    }
}
