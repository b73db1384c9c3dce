//! Small shared utilities: a deterministic RNG, float comparison with named tolerances, size
//! parsing (`size`), atomic file writes (`fs`) and a private `XDG_RUNTIME_DIR` for the binary (`runtime_dir`).

pub mod close;
pub mod fs;
pub mod hf_cache;
pub mod rng;
pub mod runtime_dir;
pub mod size;

pub use close::{Tol, assert_close};
pub use rng::Rng;
