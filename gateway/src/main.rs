//! The `wasmgate` binary; everything it does lives in [`wasmgate::cli`].

fn main() -> std::process::ExitCode {
    wasmgate::cli::main()
}
