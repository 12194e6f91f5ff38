//! The `wasmgate` binary; everything it does lives in [`wasmgate::cli`].

/// The binary's allocator (docs/performance.md, session 5): the per-request path allocates and
/// frees many small blocks, which mimalloc's thread-local free lists serve for less than glibc's.
/// Tests that link the library keep the system allocator; the hot-path benches link this one.
#[global_allocator]
static ALLOCATOR: wasmgate::allocator::MiMalloc = wasmgate::allocator::MiMalloc;

fn main() -> std::process::ExitCode {
    wasmgate::cli::main()
}
