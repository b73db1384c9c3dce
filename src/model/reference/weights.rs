//! A model's weights as plain f32 arrays (built by hand in tests, random, or dequantized from
//! GGUF).

use crate::model::ModelConfig;
use crate::util::Rng;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Weights as plain f32 arrays
// ---------------------------------------------------------------------------------------------

/// One layer's weights as plain f32 arrays; matrices row-major `[n_out, n_in]` (`y = W·x`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefLayer {
    pub attn_norm: Vec<f32>,  // [d]
    pub wq: Vec<f32>,         // [qd, d]
    pub wk: Vec<f32>,         // [kvd, d]
    pub wv: Vec<f32>,         // [kvd, d]
    pub bq: Option<Vec<f32>>, // [qd]
    pub bk: Option<Vec<f32>>, // [kvd]
    pub bv: Option<Vec<f32>>, // [kvd]
    /// qwen3 per-head RMSNorm weights `[head_dim]`.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: Vec<f32>,       // [d, qd]
    pub ffn_norm: Vec<f32>, // [d]
    pub w_gate: Vec<f32>,   // [ff, d]
    pub w_up: Vec<f32>,     // [ff, d]
    pub w_down: Vec<f32>,   // [d, ff]
    /// gemma3 RMSNorms after the attention and FFN branches `[d]`.
    #[serde(default)]
    pub post_attn_norm: Option<Vec<f32>>,
    #[serde(default)]
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// A whole model's weights as plain f32 arrays (built by hand in tests, or dequantized from GGUF).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefWeights {
    /// `[n_vocab, d]`: row t is the embedding of token t.
    pub token_embd: Vec<f32>,
    pub output_norm: Vec<f32>, // [d]
    /// `[n_vocab, d]`, or `None` when tied (the LM head is `token_embd`).
    pub output: Option<Vec<f32>>,
    pub layers: Vec<RefLayer>,
}

impl RefWeights {
    /// Deterministic random weights for `cfg` (tests): matrices ~ N(0, 1/n_in), norms ~ 1 ± 0.2,
    /// biases ~ N(0, 0.1²), embeddings ~ N(0, 1). Biases, q/k norms and post-norms exist as `cfg` says;
    /// `output` exists unless `cfg.tied`.
    pub fn random(cfg: &ModelConfig, seed: u64) -> RefWeights {
        let (d, qd, kvd, ff, hd) = (
            cfg.n_embd,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.n_ff,
            cfg.head_dim,
        );
        let mut stream = 0u64;
        let mut next = || {
            stream += 1;
            Rng::derive(seed, stream)
        };
        let mat = |rng: &mut Rng, n_out: usize, n_in: usize| {
            rng.normal_vec(n_out * n_in, 1.0 / (n_in as f32).sqrt())
        };
        let norm = |rng: &mut Rng, n: usize| {
            (0..n)
                .map(|_| 1.0 + rng.uniform(-0.2, 0.2))
                .collect::<Vec<f32>>()
        };
        let layers = (0..cfg.n_layer)
            .map(|_| {
                let mut r = next();
                RefLayer {
                    attn_norm: norm(&mut r, d),
                    wq: mat(&mut r, qd, d),
                    wk: mat(&mut r, kvd, d),
                    wv: mat(&mut r, kvd, d),
                    bq: cfg.qkv_bias.then(|| r.normal_vec(qd, 0.1)),
                    bk: cfg.qkv_bias.then(|| r.normal_vec(kvd, 0.1)),
                    bv: cfg.qkv_bias.then(|| r.normal_vec(kvd, 0.1)),
                    q_norm: cfg.qk_norm.then(|| norm(&mut r, hd)),
                    k_norm: cfg.qk_norm.then(|| norm(&mut r, hd)),
                    wo: mat(&mut r, d, qd),
                    ffn_norm: norm(&mut r, d),
                    w_gate: mat(&mut r, ff, d),
                    w_up: mat(&mut r, ff, d),
                    w_down: mat(&mut r, d, ff),
                    post_attn_norm: cfg.post_norms().then(|| norm(&mut r, d)),
                    post_ffn_norm: cfg.post_norms().then(|| norm(&mut r, d)),
                }
            })
            .collect();
        let mut r = next();
        RefWeights {
            token_embd: r.normal_vec(cfg.n_vocab * d, 1.0),
            output_norm: norm(&mut r, d),
            output: (!cfg.tied).then(|| mat(&mut r, cfg.n_vocab, d)),
            layers,
        }
    }
}
