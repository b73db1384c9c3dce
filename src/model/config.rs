//! Hyperparameters read from GGUF metadata. (Stub API; implementation pending.)

use super::arch::{Arch, RopeKind};
use crate::gguf::{GgufError, GgufFile};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "architecture {found:?} is not supported; supported: {supported}. Convert or pick a model of a supported architecture"
    )]
    UnsupportedArch {
        found: String,
        supported: &'static str,
    },
    #[error("model is missing tensor {name:?}")]
    MissingTensor { name: String },
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("invalid hyperparameter {key}: {detail}")]
    BadHyperparameter { key: String, detail: String },
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: Option<String>,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head dimension of Q and K (and V).
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_kind: RopeKind,
    pub rope_base: f32,
    /// Rotated dimensions per head (≤ head_dim).
    pub n_rot: usize,
    /// Positions are multiplied by this (1 / linear scaling factor; 1.0 without scaling).
    pub rope_pos_scale: f32,
    /// llama3-style per-frequency divisors from `rope_freqs.weight` ([n_rot/2]), if present.
    pub rope_freqs: Option<Vec<f32>>,
    /// No `output.weight`: the LM head reuses `token_embd.weight`.
    pub tied: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

impl ModelConfig {
    pub fn from_gguf(_file: &GgufFile) -> Result<ModelConfig, ModelError> {
        todo!()
    }

    /// Total parameters (elements of all tensors).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
