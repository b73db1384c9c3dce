//! Zero-copy views of a model's weights in their GGUF types. (Stub API; implementation pending.)

use super::config::{ModelConfig, ModelError};
use crate::gguf::{GgmlType, GgufFile};

/// A 1-D or 2-D weight in its stored type. For a matrix, `ne = [n_in, n_out]`: `n_out` rows of
/// `n_in` elements (a row-major `(n_out, n_in)` matrix, so `y = W·x`).
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub ne: [usize; 2],
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    pub fn n_in(&self) -> usize {
        self.ne[0]
    }
    pub fn n_out(&self) -> usize {
        self.ne[1]
    }
    /// Dequantized copy, row-major `[n_out, n_in]` (tests and CPU reference only).
    pub fn to_f32(&self) -> Vec<f32> {
        crate::gguf::quant::dequantize_vec(self.ty, self.data, self.ne[0] * self.ne[1])
            .expect("validated at load")
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights<'a> {
    pub attn_norm: TensorRef<'a>,
    pub attn_q: TensorRef<'a>,
    pub attn_k: TensorRef<'a>,
    pub attn_v: TensorRef<'a>,
    pub attn_q_bias: Option<TensorRef<'a>>,
    pub attn_k_bias: Option<TensorRef<'a>>,
    pub attn_v_bias: Option<TensorRef<'a>>,
    /// qwen3 per-head RMSNorm weights ([head_dim]).
    pub attn_q_norm: Option<TensorRef<'a>>,
    pub attn_k_norm: Option<TensorRef<'a>>,
    pub attn_output: TensorRef<'a>,
    pub ffn_norm: TensorRef<'a>,
    pub ffn_gate: TensorRef<'a>,
    pub ffn_up: TensorRef<'a>,
    pub ffn_down: TensorRef<'a>,
}

#[derive(Clone, Debug)]
pub struct Weights<'a> {
    pub token_embd: TensorRef<'a>,
    pub output_norm: TensorRef<'a>,
    /// `None` when tied.
    pub output: Option<TensorRef<'a>>,
    pub layers: Vec<LayerWeights<'a>>,
}

impl<'a> Weights<'a> {
    /// Finds, type-checks and shape-checks every tensor the forward pass uses.
    pub fn from_gguf(_file: &'a GgufFile, _cfg: &ModelConfig) -> Result<Weights<'a>, ModelError> {
        todo!()
    }

    /// The LM head: `output.weight`, or `token_embd.weight` when tied.
    pub fn lm_head(&self) -> TensorRef<'a> {
        self.output.unwrap_or(self.token_embd)
    }
}
