//! Supported architectures and their rope conventions.

use serde::{Deserialize, Serialize};

/// Architectures bfpo-lite can train (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3/3.1/3.2, Mistral, SmolLM2, TinyLlama: NORM rope, optional `rope_freqs`.
    Llama,
    /// Qwen2 / Qwen2.5: NEOX rope, Q/K/V biases, often tied embeddings.
    Qwen2,
    /// Qwen3: NEOX rope, per-head RMSNorm on Q and K, no QKV bias.
    Qwen3,
    /// Gemma 3 (270M, 1B, …): NEOX rope, per-head Q/K norms, post-norms, GeGLU, embedding scaled
    /// by √d, interleaved sliding-window and global attention (`ModelConfig::gemma3`).
    Gemma3,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama (Llama 2/3/3.1/3.2, Mistral, SmolLM2, TinyLlama), qwen2 (Qwen2, Qwen2.5), qwen3, gemma3 (Gemma 3 text models)";

    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    pub fn rope_kind(self) -> RopeKind {
        match self {
            Arch::Llama => RopeKind::Norm,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => RopeKind::Neox,
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeKind {
    /// Adjacent pairs `(2i, 2i+1)` (llama; GGUF Q/K rows are pre-permuted for this).
    Norm,
    /// Split halves `(i, i + n_rot/2)` (qwen2, qwen3, gemma3).
    Neox,
}
