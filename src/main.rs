//! The `bfpo-lite` binary: parse the command line, run the library, print errors.

mod cli;

use clap::Parser;

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
