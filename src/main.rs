//! The `bfpo-lite` binary: parse the command line, run the library, print errors.

mod cli;

use clap::Parser;

/// mimalloc instead of the system allocator. The CPU engine allocates and frees each layer's
/// activation matrices (tens of MiB) on every micro-step from several threads; glibc's
/// per-thread arenas fragment under that (peak RSS 2.7 or 4.4 GiB at random for the same
/// Qwen2.5-0.5B-shape run). mimalloc with purging off (see [`keep_freed_memory`]) reuses freed
/// memory without returning it to the OS: 3.1 GiB every time, and no page-fault storm.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3 (libmimalloc-sys =0.1.49, pinned in Cargo.toml): the
/// 16th entry of `mi_option_e` in its `mimalloc.h`, between `deprecated_eager_commit_delay` (14)
/// and `use_numa_nodes` (16), which the crate does name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the allocator for reuse instead of going back to the OS after 10 ms
/// (mimalloc's default): returning and re-faulting it cost a third more wall time on the CPU
/// engine (sys time 36 s instead of 9 s for the same run). `MIMALLOC_PURGE_DELAY` still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        const _: () = assert!(libmimalloc_sys::mi_option_use_numa_nodes == 16);
        // SAFETY: sets one integer option of the allocator; no memory is touched.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
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
