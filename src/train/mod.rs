//! Training: LoRA state, optimiser, the loop, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod gpu_engine;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod prepare;
pub mod trainer;
