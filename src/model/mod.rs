//! Model hyperparameters, tensor names and weight views, LoRA definitions (targets, shapes,
//! weights, the dropout mask), the `init-model` fixture factory, and a clear, slow f64 reference
//! forward/backward: the model of the `reference` engine and the yardstick the GPU and native CPU
//! engines are tested against.

pub mod arch;
pub mod config;
pub mod init;
pub mod lora;
pub mod reference;
pub mod weights;

pub use arch::{Arch, RopeKind};
pub use config::{FfnAct, Gemma3Params, ModelConfig, ModelError};
pub use weights::{LayerWeights, TensorRef, Weights};
