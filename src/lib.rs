//! bfpo-lite: safety-tune small quantized GGUF language models with BFPO LoRA on one consumer
//! GPU, with our own WGSL kernels (wgpu) and llama.cpp as tokenizer, generator and oracle.
//!
//! The library never prints: it returns values and reports progress through callbacks or
//! `tracing`; the `bfpo-lite` binary decides what a person sees.

pub mod data;
pub mod eval;
pub mod export;
pub mod gguf;
pub mod gpu;
pub mod loss;
pub mod model;
pub mod redteam;
pub mod runtime;
pub mod train;
pub mod util;

/// The crate version, recorded in exported adapters.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
