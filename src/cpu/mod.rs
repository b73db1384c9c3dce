//! The native CPU engine: bfpo-lite's forward and backward on hosts without a usable GPU.
//!
//! f32 activations, gradients and optimizer state; the weights stay quantized in the
//! memory-mapped GGUF file and are dequantized in cache-sized panels right before each product
//! ([`gemm`]: the pure-Rust `gemm` crate, runtime SIMD dispatch, AVX-512 kernels enabled); rayon
//! threads own fixed output blocks, so results are the same bits whatever the thread count
//! ([`gemm`] explains the rule). Sequences are packed without padding between them; only the LM
//! head's scored rows (response tokens) go through the vocabulary, in chunks, with a streaming
//! log-sum-exp.
//!
//! Layout, one concern per file as in `gpu/`: [`mat`] (padded activation matrix), [`gemm`]
//! (products against quantized and dense weights), [`ops`] (RMSNorm, RoPE, SwiGLU, attention,
//! each with its backward), [`model`] (layers, LM head, tapes), [`share`] (prompt sharing: a prefix common to several sequences
//! is computed once, exactly), [`engine`] (the
//! [`Engine`](crate::train::trainer::Engine) implementation: scoring, training forward/backward,
//! AdamW). The engine is checked against `model::reference` (the f64 reference) in
//! `tests/cpu_engine.rs`: log-probs, LoRA gradients, dropout and determinism.

pub mod engine;
pub mod gemm;
pub mod mat;
pub mod model;
pub mod ops;
pub mod share;

pub use engine::NativeEngine;
pub use mat::Mat;
pub use model::CpuModel;

/// What the CPU engine refuses, with the numbers that explain it.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cpu engine: the model cannot be read: {0}")]
    Model(String),
    #[error("cpu engine does not support {0}")]
    Unsupported(String),
    #[error("cpu engine: adapter does not fit the model: {0}")]
    BadAdapter(String),
    #[error("cpu engine: bad input: {0}")]
    BadInput(String),
    #[error("cpu engine: cannot start {threads} threads: {detail}")]
    Threads { threads: usize, detail: String },
    #[error(
        "cpu engine: this step needs about {need_mib} MiB of host memory but {avail_mib} MiB are available; reduce --pairs-per-step or --max-length, or set --activation-memory lower (layers are then recomputed)"
    )]
    DoesNotFit { need_mib: u64, avail_mib: u64 },
}

/// Threads the CPU engine uses by default: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux; `None` elsewhere).
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
