//! Training: LoRA state, optimiser, the loop, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod gpu_engine;
pub mod metrics;
pub mod prepare;
pub mod trainer;

// LoRA definitions (in `model/`) and the AdamW math (`optim`) live below `gpu/`; re-exported
// here so `train::lora` and `train::optim` keep working.
pub use crate::model::lora;
pub use crate::optim;
