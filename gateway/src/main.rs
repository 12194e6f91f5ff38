//! The `wasmgate` binary; everything it does lives in [`wasmgate::cli`].

mod allocator;

/// The binary's allocator (docs/performance.md, session 5): the per-request path allocates and
/// frees many small blocks, which mimalloc's thread-local free lists serve for less than glibc's.
/// Tests and benches that link the library keep the system allocator.
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

fn main() -> std::process::ExitCode {
    wasmgate::cli::main()
}
