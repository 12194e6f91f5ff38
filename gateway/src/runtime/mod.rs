//! The Wasm runtime: one engine for the process, plugins compiled once per manifest load, and a
//! fresh instance per plugin per request.
//!
//! Three lifecycle stages:
//! - **start-up** ([`Runtime::new`]): the engine with its pooling allocator, the linker with the
//!   gateway's imports, and the epoch ticker that enforces call deadlines;
//! - **manifest load** ([`Runtime::load`]): each plugin compiled and pre-instantiated
//!   ([`LoadedPlugin`]), then each use's config checked by a throw-away instance;
//! - **per request** ([`LoadedPlugin::instantiate`]): a store with the plugin's memory cap and a
//!   deadline per call, an instance from the pre-instantiated component, dropped with the
//!   request. No request ever sees another's instance, so nothing a plugin keeps in its globals
//!   outlives the request, and a trap can only ever poison the instance that trapped.

mod bindings;
pub mod exchange;
mod host;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use self::bindings::{Action, ImmediateResponse, PluginWorld, PluginWorldPre};
pub use self::exchange::{Exchange, Phase};

/// How often the epoch advances: the granularity of plugin deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The largest memory cap a plugin may be given; the pooling allocator reserves slots this big.
pub const MAX_PLUGIN_MEMORY: u64 = 256 << 20;

/// Most plugin instances alive at once, across all plugins and requests.
pub const MAX_INSTANCES: u32 = 2000;

/// The process-wide Wasm engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    _ticker: EpochTicker,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine, links the gateway's imports and starts the epoch ticker.
    pub fn new() -> wasmtime::Result<Runtime> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(MAX_INSTANCES)
            // A Rust component has its main module, the WASI adapter and a few shims.
            .total_core_instances(MAX_INSTANCES * 8)
            .total_memories(MAX_INSTANCES * 2)
            .total_tables(MAX_INSTANCES * 4)
            .max_memory_size(MAX_PLUGIN_MEMORY as usize);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // WASI is linked because Rust's standard library imports it, but each store's WASI
        // context grants nothing: no files, no sockets, no environment, stdio discarded.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        PluginWorld::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;

        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime {
            engine,
            linker,
            _ticker: ticker,
        })
    }

    /// Compiles and pre-instantiates a plugin component.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        budget: PluginBudget,
    ) -> Result<LoadedPlugin, String> {
        let bytes = std::fs::read(path)
            .map_err(|err| format!("cannot read `{}`: {err}", path.display()))?;
        let component = Component::new(&self.engine, &bytes).map_err(|err| {
            format!(
                "`{}` is not a valid WebAssembly component: {err:#}",
                path.display()
            )
        })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|err| format!("`{}` cannot be linked: {err:#}", path.display()))?;
        let pre = PluginWorldPre::new(pre).map_err(|err| {
            format!(
                "`{}` is not a wasmgate plugin (world wasmgate:plugin/plugin@0.1.0): {err:#}",
                path.display()
            )
        })?;
        if budget.memory > MAX_PLUGIN_MEMORY {
            return Err(format!(
                "memory cap {} exceeds the gateway's maximum of {MAX_PLUGIN_MEMORY} bytes",
                budget.memory
            ));
        }
        Ok(LoadedPlugin {
            name: Arc::from(name),
            engine: self.engine.clone(),
            pre,
            deadline_ticks: ticks(budget.deadline),
            memory: budget.memory as usize,
            body: budget.body,
        })
    }
}

fn ticks(deadline: Duration) -> u64 {
    (deadline.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

/// What a plugin may use.
#[derive(Debug, Clone, Copy)]
pub struct PluginBudget {
    /// Longest time one call may run.
    pub deadline: Duration,
    /// Most linear memory an instance may have, in bytes.
    pub memory: u64,
    /// Whether it may read and replace request bodies.
    pub body: bool,
}

/// A compiled, pre-instantiated plugin, shared by every route that uses it.
pub struct LoadedPlugin {
    name: Arc<str>,
    engine: Engine,
    pre: PluginWorldPre<PluginState>,
    deadline_ticks: u64,
    memory: usize,
    body: bool,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("deadline_ticks", &self.deadline_ticks)
            .field("memory", &self.memory)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The plugin's name in the manifest.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the plugin reads request bodies.
    pub fn wants_body(&self) -> bool {
        self.body
    }

    /// Starts an instance and configures it for one route.
    pub fn instantiate(&self, config: &str) -> Result<PluginInstance, PluginError> {
        let state = PluginState {
            exchange: None,
            phase: Phase::Configure,
            plugin: self.name.clone(),
            body_access: self.body,
            limits: StoreLimitsBuilder::new()
                .memory_size(self.memory)
                .trap_on_grow_failure(true)
                .instances(64)
                .build(),
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        let world = self
            .pre
            .instantiate(&mut store)
            .map_err(|err| PluginError::from_wasmtime(Phase::Configure, err))?;
        let mut instance = PluginInstance {
            store,
            world,
            deadline_ticks: self.deadline_ticks,
        };
        instance.store.set_epoch_deadline(self.deadline_ticks);
        let configured = instance
            .world
            .wasmgate_plugin_handler()
            .call_configure(&mut instance.store, config)
            .map_err(|err| PluginError::from_wasmtime(Phase::Configure, err))?;
        configured.map_err(PluginError::Config)?;
        Ok(instance)
    }
}

/// One instance of a plugin, serving one request.
pub struct PluginInstance {
    store: Store<PluginState>,
    world: PluginWorld,
    deadline_ticks: u64,
}

/// What a plugin's request phase decided.
#[derive(Debug)]
pub enum Decision {
    /// Go on to the next plugin and the upstream.
    Continue,
    /// Answer with this response.
    Respond(http::Response<bytes::Bytes>),
}

impl PluginInstance {
    /// The plugin's name in the manifest.
    pub fn plugin_name(&self) -> &str {
        &self.store.data().plugin
    }

    /// Runs the request phase. The exchange comes back whatever happened.
    pub fn on_request(
        &mut self,
        exchange: Box<Exchange>,
    ) -> (Box<Exchange>, Result<Decision, PluginError>) {
        let outcome = self.call(exchange, Phase::Request, |world, store| {
            world.wasmgate_plugin_handler().call_on_request(store)
        });
        match outcome {
            (exchange, Ok(Action::Continue)) => (exchange, Ok(Decision::Continue)),
            (exchange, Ok(Action::Respond(response))) => (exchange, immediate_response(response)),
            (exchange, Err(err)) => (exchange, Err(err)),
        }
    }

    /// Runs the response phase. The exchange, with its response, comes back whatever happened.
    pub fn on_response(
        &mut self,
        exchange: Box<Exchange>,
    ) -> (Box<Exchange>, Result<(), PluginError>) {
        self.call(exchange, Phase::Response, |world, store| {
            world.wasmgate_plugin_handler().call_on_response(store)
        })
    }

    fn call<R>(
        &mut self,
        exchange: Box<Exchange>,
        phase: Phase,
        f: impl FnOnce(&PluginWorld, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> (Box<Exchange>, Result<R, PluginError>) {
        let state = self.store.data_mut();
        state.exchange = Some(exchange);
        state.phase = phase;
        self.store.set_epoch_deadline(self.deadline_ticks);
        let result =
            f(&self.world, &mut self.store).map_err(|err| PluginError::from_wasmtime(phase, err));
        let exchange = self
            .store
            .data_mut()
            .exchange
            .take()
            .expect("the exchange stays in the store for the whole call");
        (exchange, result)
    }
}

/// Checks and converts a plugin's immediate response.
fn immediate_response(response: ImmediateResponse) -> Result<Decision, PluginError> {
    let status =
        http::StatusCode::from_u16(response.status).map_err(|_| PluginError::Contract {
            phase: Phase::Request,
            message: format!("immediate response status {} is not valid", response.status),
        })?;
    let mut built = http::Response::new(bytes::Bytes::from(response.body));
    *built.status_mut() = status;
    for (name, value) in &response.headers {
        let (name, value) = exchange::checked_header(name, value, false).map_err(|message| {
            PluginError::Contract {
                phase: Phase::Request,
                message: format!("immediate response: {message}"),
            }
        })?;
        built.headers_mut().append(name, value);
    }
    Ok(Decision::Respond(built))
}

/// Why a plugin call failed.
#[derive(Debug)]
pub enum PluginError {
    /// The plugin's `configure` refused its configuration.
    Config(String),
    /// The call ran past its deadline.
    Deadline {
        /// The phase that was running.
        phase: Phase,
    },
    /// The plugin trapped (a panic, an out-of-bounds access, a refused memory growth, a
    /// host call made out of phase).
    Trap {
        /// The phase that was running.
        phase: Phase,
        /// wasmtime's description, with the guest backtrace when there is one.
        message: String,
    },
    /// The plugin returned something the gateway cannot use.
    Contract {
        /// The phase that was running.
        phase: Phase,
        /// What was wrong.
        message: String,
    },
}

impl PluginError {
    fn from_wasmtime(phase: Phase, err: wasmtime::Error) -> PluginError {
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Deadline { phase },
            _ => PluginError::Trap {
                phase,
                message: format!("{err:?}"),
            },
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Config(message) => write!(f, "invalid config: {message}"),
            PluginError::Deadline { phase } => {
                write!(f, "{} phase ran past its deadline", phase.as_str())
            }
            PluginError::Trap { phase, message } => {
                write!(f, "trapped in the {} phase: {message}", phase.as_str())
            }
            PluginError::Contract { phase, message } => {
                write!(f, "{} phase: {message}", phase.as_str())
            }
        }
    }
}

impl std::error::Error for PluginError {}

/// The data of a plugin instance's store.
pub struct PluginState {
    exchange: Option<Box<Exchange>>,
    phase: Phase,
    plugin: Arc<str>,
    body_access: bool,
    limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("wasmgate-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
