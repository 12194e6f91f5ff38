//! The `wasmgate` command line, kept in the library so that tests can run the very same code
//! as the binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// An API gateway whose policies run as sandboxed WebAssembly components.
#[derive(Parser)]
#[command(name = "wasmgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written: `text` for people, `json` for log collectors. Levels are
    /// filtered by `RUST_LOG` (default `info`).
    #[arg(
        long,
        global = true,
        env = "WASMGATE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the routes of a manifest until SIGINT or SIGTERM, then drains. SIGHUP reloads
    /// the manifest.
    Run {
        /// The manifest file.
        #[arg(short, long, env = "WASMGATE_CONFIG")]
        config: PathBuf,
        /// Threads serving connections, each with its own event loop and its own socket per
        /// listener (default: one per CPU).
        #[arg(long, env = "WASMGATE_WORKERS")]
        workers: Option<usize>,
    },
    /// Loads a manifest and every plugin it names, checks every plugin configuration, and
    /// reports every problem found. Exits 0 when there is none.
    Check {
        /// The manifest file.
        #[arg(short, long, env = "WASMGATE_CONFIG")]
        config: PathBuf,
    },
}

/// Parses the process arguments, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    // The main thread's runtime is single-threaded: it serves connections as the first worker
    // (`--workers` adds more threads, each with a runtime of its own), and runs the admin
    // listener, signals and reloads. A thread per event loop with no task stealing costs less
    // per request than a multi-threaded runtime (docs/performance.md).
    // This thread buffers its log lines (`log_output`), written whenever its event loop waits.
    let logs = crate::log_output::BufferGuard::install();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::log_output::flush)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };

    let code = match cli.command {
        Command::Check { config } => match runtime.block_on(crate::check(&config)) {
            Ok(warnings) => {
                crate::log_output::flush();
                for warning in warnings {
                    eprintln!("warning: {warning}");
                }
                println!("OK: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                crate::log_output::flush();
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, workers } => runtime.block_on(async {
            let workers = workers.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            // Before anything else: a SIGHUP that arrived while plugins compile must not end the
            // process, and a SIGTERM then must still drain once serving.
            let signals = match crate::server::Signals::install() {
                Ok(signals) => signals,
                Err(err) => {
                    eprintln!("cannot install signal handlers: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match crate::Gateway::start_with_workers(&config, workers).await {
                Ok(gateway) => match gateway.run_until_signal(signals).await {
                    // A drain that timed out still ends the process normally: the operator
                    // chose the timeout, and the log says what was cut.
                    Some(_) => ExitCode::SUCCESS,
                    None => ExitCode::from(130),
                },
                Err(err) => {
                    // The log lines that led here come first.
                    crate::log_output::flush();
                    eprintln!("{err}");
                    ExitCode::FAILURE
                }
            }
        }),
    };
    drop(logs);
    code
}

/// Log lines to stderr, filtered by `RUST_LOG` (default `info`). Two writers: plugin log lines,
/// whose every field the gateway has escaped or checked already
/// ([`crate::runtime::PLUGIN_LOG_TARGET`]), are written as they are; every other line has its
/// fields escaped by the writer. That escaping goes character by character, and an access-log
/// plugin writes a line per request: skipping it where it has been done saves about 2 % of the
/// CPU of a request through a logging chain (docs/performance.md, session 5).
fn init_logs(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};

    use crate::log_output::{LogOutput, LogTime, PluginLines};

    let from_plugin =
        |meta: &tracing::Metadata<'_>| meta.target() == crate::runtime::PLUGIN_LOG_TARGET;
    // Colour codes only for a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A function, not a closure: each layer sits on a different subscriber type.
    fn writer<S>(
        ansi: bool,
    ) -> fmt::Layer<
        S,
        fmt::format::DefaultFields,
        fmt::format::Format<fmt::format::Full, LogTime>,
        LogOutput,
    > {
        fmt::layer()
            .with_writer(LogOutput)
            .with_ansi(ansi)
            .with_timer(LogTime)
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The per-target filters below say how verbose they may be: without a hint they count as
    // "anything", the subscriber's maximum level becomes TRACE, and `init` has the `log` bridge
    // pass every `log` record on. wasmtime writes several dozen trace and debug records per
    // instantiation; each was bridged, dispatched and refused by the filter, ~20k instructions per
    // request with a fresh instance per plugin (docs/performance.md, session 9).
    let max = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let only_plugins = move || filter_fn(from_plugin).with_max_level_hint(max);
    let no_plugins = move || filter_fn(move |meta| !from_plugin(meta)).with_max_level_hint(max);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(writer(ansi).with_filter(no_plugins()))
            // Plugin lines: in colour for a terminal, else the same text written directly.
            .with(ansi.then(|| {
                writer(ansi)
                    .with_ansi_sanitization(false)
                    .with_filter(only_plugins())
            }))
            .with((!ansi).then(|| {
                // The host writes these lines itself (`log_output::plugin_line`), in this
                // layer's format; the layer stays for events emitted otherwise.
                crate::log_output::write_plugin_lines_directly();
                fmt::layer()
                    .with_writer(LogOutput)
                    .event_format(PluginLines)
                    .with_filter(only_plugins())
            }))
            .init(),
        LogFormat::Json => registry
            .with(
                writer(ansi)
                    .json()
                    .flatten_event(true)
                    .with_filter(no_plugins()),
            )
            .with(
                writer(ansi)
                    .json()
                    .flatten_event(true)
                    .with_ansi_sanitization(false)
                    .with_filter(only_plugins()),
            )
            .init(),
    }
}
