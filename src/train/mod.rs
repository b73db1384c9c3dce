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
