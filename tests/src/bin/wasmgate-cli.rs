//! The `wasmgate` command line, built inside this package so that its tests can run it as a
//! process (`CARGO_BIN_EXE_wasmgate-cli`). Same code as the real binary: both call
//! `wasmgate::cli::main`.

fn main() -> std::process::ExitCode {
    wasmgate::cli::main()
}
