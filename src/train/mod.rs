//! Training: LoRA state, optimiser, the loop, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod trainer;
