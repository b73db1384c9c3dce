//! The `bfpo-lite` binary: parse the command line, run the library, print errors.

mod cli;

use clap::Parser;

/// mimalloc instead of the system allocator. The CPU engine allocates and frees each layer's
/// activation matrices (tens of MiB) on every micro-step from several threads; glibc's
/// per-thread arenas fragment under that (peak RSS 2.7 or 4.4 GiB at random for the same
/// Qwen2.5-0.5B-shape run; 3.0 GiB with mimalloc). `MIMALLOC_PURGE_DELAY=-1` (keep freed
/// memory instead of returning it after 10 ms) saves page-fault time (docs/cpu-engine.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any thread or GPU driver starts: a private XDG_RUNTIME_DIR when the environment
    // has none (Mesa would print "XDG_RUNTIME_DIR is invalid" on every run otherwise).
    let current = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
    if let Some(dir) = bfpo_lite::util::runtime_dir::private_runtime_dir(current.as_deref()) {
        // SAFETY: the process is single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
