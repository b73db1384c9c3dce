//! Training: the loop and the [`trainer::Engine`] trait, the f64 reference engine and the
//! adapter state it shares with the native CPU engine (`engine`; the CPU engine itself is
//! `crate::cpu`), the GPU engine (`gpu_engine`), config, data preparation, checkpoints and
//! metrics.

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
