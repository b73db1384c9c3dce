//! Small shared utilities: a deterministic RNG and float comparison with named tolerances.

pub mod close;
pub mod rng;
pub mod runtime_dir;
pub mod size;

pub use close::{Tol, assert_close};
pub use rng::Rng;
