//! Training: LoRA state, optimiser, the loop, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod gpu_engine;
pub mod metrics;
pub mod prepare;
pub mod trainer;

// LoRA definitions and the AdamW math live below `gpu/` and `model/`; re-exported here so
// `train::lora` and `train::optim` keep working.
pub use crate::{lora, optim};
