//! Whole-model CPU forward and LoRA backward: clear, slow, f64 — the reference every GPU kernel,
//! the GPU training step and the native CPU engine (`crate::cpu`) are checked against, and the
//! model behind `train::engine::RefEngine` (`--engine reference`).
//!
//! Conventions (`docs/gguf.md` §4–§5, verified against llama.cpp for llama and qwen2):
//!
//! ```text
//! x_0      = token_embd[ids]  (· √d, gemma3)                            [T, d]
//! per layer:
//!   n1     = rmsnorm(x, attn_norm)                                     [T, d]
//!   q,k,v  = W·n1 (+ bias, qwen2) (+ (alpha/r)·B·(A·n1), LoRA)          [T, qd] [T, kvd] [T, kvd]
//!   q,k    = per-head rmsnorm(q, q_norm), rmsnorm(k, k_norm)   (qwen3)
//!   q,k    = rope(q), rope(k)          NORM (adjacent pairs) for llama, NEOX (split halves) for qwen
//!   att    = softmax(q·kᵀ/√hd + causal mask)·v, query head h uses KV head h / (n_head/n_head_kv)
//!   h      = x + Wo·att                                                [T, d]
//!   n2     = rmsnorm(h, ffn_norm)
//!   x'     = h + Wdown·(silu(Wgate·n2) ⊙ Wup·n2)
//!
//! gemma3 differs: q,k get per-head norms as qwen3; the q·k factor is `cfg.attn_scale()`; local
//! layers mask keys more than `sliding_window − 1` positions back and use their own rope base;
//!   h      = x + rmsnorm(Wo·att, post_attention_norm)
//!   x'     = h + rmsnorm(Wdown·(gelu_tanh(Wgate·n2) ⊙ Wup·n2), post_ffw_norm)
//! logits   = W_out · rmsnorm(x_L, output_norm)     W_out = output, or token_embd when tied
//! logp_t   = log_softmax(logits_{t−1})[ids_t]      for t ≥ response_start
//! ```
//!
//! Every LoRA-adapted projection computes `y = W·x + (alpha/r)·B·(A·x)` with A `[r, n_in]`, B
//! `[n_out, r]`. With LoRA dropout (training only, `RefModel::lora_grads_dropout`) the branch
//! reads `mask ⊙ x / (1 − p)`, the masks those of `lora::dropout` (a counter hash).
//!
//! All arithmetic is f64; weights are kept as the f32 values they dequantize to (so a real model
//! fits in memory) and widened on use. Activations are row-major `[rows, cols]` flat vectors.
//!
//! The per-op functions (`rmsnorm_fwd`/`rmsnorm_back`, `rope_fwd`/`rope_back`,
//! `attention_fwd`/`attention_back`, `swiglu_fwd`/`swiglu_back`, `linear_fwd`/`linear_back`,
//! `lora_fwd`/`lora_back`, `log_softmax_target_fwd`/`log_softmax_target_back`) are public: they are
//! the one place the GPU forward and backward kernels are checked against. Each backward states
//! its derivative in its doc comment and is checked against central finite differences in
//! `tests/reference_ops.rs`; the whole-model gradient in `tests/reference_grads.rs`.

use crate::data::Example;
use crate::model::lora::dropout::Dropout;
use crate::model::lora::{LoraWeights, Target};
use crate::model::{FfnAct, ModelConfig, Weights};

mod backward;
mod forward;
mod grads;
mod ops;
mod weights;

pub use grads::{LoraGrad, LoraGrads, flatten_lora, unflatten_lora};
pub use ops::*;
pub use weights::{RefLayer, RefWeights};

/// What can be wrong with the inputs of the reference model.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error(
        "reference model: tensor {name} has {found} values, expected {expected} ({shape}) for this config"
    )]
    BadShape {
        name: String,
        found: usize,
        expected: usize,
        shape: String,
    },
    #[error("reference model: config is invalid: {0}")]
    BadConfig(String),
    #[error(
        "example {example}: token id {id} at position {pos} is outside the vocabulary of {n_vocab} tokens"
    )]
    TokenOutOfRange {
        example: usize,
        pos: usize,
        id: u32,
        n_vocab: usize,
    },
    #[error(
        "example {example}: response_start {response_start} must be between 1 and the length {len}"
    )]
    BadResponseStart {
        example: usize,
        response_start: usize,
        len: usize,
    },
    #[error("an empty token sequence has no logits; give at least one token")]
    EmptySequence,
    #[error("LoRA tensor blk.{layer}.{target}: {detail}")]
    BadLora {
        layer: usize,
        target: &'static str,
        detail: String,
    },
    #[error("{what} has {len} values, not a whole number of rows of {width}")]
    BadActivation {
        what: &'static str,
        len: usize,
        width: usize,
    },
    #[error("layer {layer} does not exist (the model has {n_layer} layers)")]
    BadLayer { layer: usize, n_layer: usize },
    #[error("{n_weights} sequence weights given for {n_examples} examples; give one per example")]
    WeightCount { n_weights: usize, n_examples: usize },
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// A LoRA tensor widened to f64, for one projection.
pub(super) struct Adapter {
    idx: usize,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// The adapters of a model, indexed `[layer][target]`.
pub(super) struct Adapters {
    rank: usize,
    scale: f64,
    /// Per layer, by `Target as usize`; [`Target::Output`] (the LM head) sits in layer 0.
    by: Vec<[Option<Adapter>; 8]>,
    /// LoRA dropout (training only) and the global row of the current sequence's first token
    /// (`b·L`, as in the GPU batch), so the masks match `gpu::ops::dropout`.
    drop: Option<Dropout>,
    row0: usize,
}

impl Adapters {
    fn none(n_layer: usize) -> Adapters {
        Adapters {
            rank: 0,
            scale: 0.0,
            by: (0..n_layer).map(|_| Default::default()).collect(),
            drop: None,
            row0: 0,
        }
    }

    /// `mask ⊙ x / (1 − p)` for the LoRA input of `(layer, target)` (x itself without dropout).
    fn dropped(&self, layer: usize, target: Target, x: &[f64], n_in: usize) -> Vec<f64> {
        match self.drop.filter(|d| d.active()) {
            None => x.to_vec(),
            Some(d) => {
                let inv = d.inv_keep() as f64;
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let (r, c) = (i / n_in, i % n_in);
                        if d.keep(layer, target, self.row0 + r, c) {
                            v * inv
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        }
    }

    fn get(&self, layer: usize, t: Target) -> Option<&Adapter> {
        self.by[layer][t as usize].as_ref()
    }
}

/// Saved activations of one layer for one sequence (all `[T, ·]`).
pub(super) struct LayerTape {
    x: Vec<f64>,
    n1: Vec<f64>,
    /// q/k before the qwen3 head norms (only kept when `qk_norm`).
    q_pre: Vec<f64>,
    k_pre: Vec<f64>,
    /// q, k after norm and rope; v.
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    att: Vec<f64>,
    h: Vec<f64>,
    n2: Vec<f64>,
    g: Vec<f64>,
    u: Vec<f64>,
    s: Vec<f64>,
    /// gemma3: the attention output `Wo·att` and the FFN output before their post-norms (empty
    /// otherwise).
    o: Vec<f64>,
    f: Vec<f64>,
    /// LoRA `z = A·x` per target (`[T, r]`), empty where no adapter.
    z: [Vec<f64>; 7],
}

/// The whole-model CPU reference. Owns f32 copies of the weights.
#[derive(Clone, Debug)]
pub struct RefModel {
    cfg: ModelConfig,
    w: RefWeights,
    /// Per layer (gemma3's local and global layers differ).
    rope: Vec<RopeParams>,
}

fn add_into(dst: &mut [f64], src: &[f64]) {
    assert_eq!(dst.len(), src.len());
    for (a, b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}
