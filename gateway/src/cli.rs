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
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    // The main thread's runtime is single-threaded: it serves connections as the first worker
    // (`--workers` adds more threads, each with a runtime of its own), and runs the admin
    // listener, signals and reloads. A thread per event loop with no task stealing costs less
    // per request than a multi-threaded runtime (docs/performance.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };

    match cli.command {
        Command::Check { config } => match runtime.block_on(crate::check(&config)) {
            Ok(warnings) => {
                for warning in warnings {
                    eprintln!("warning: {warning}");
                }
                println!("OK: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
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
                    eprintln!("{err}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}
