//! Model hyperparameters, tensor names and weight views, the `init-model` fixture factory, and
//! a clear, slow CPU reference forward/backward used by tests.

pub mod arch;
pub mod config;
pub mod init;
pub mod lora;
pub mod reference;
pub mod weights;

pub use arch::{Arch, RopeKind};
pub use config::{ModelConfig, ModelError};
pub use weights::{LayerWeights, TensorRef, Weights};
