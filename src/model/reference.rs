//! Whole-model CPU forward and LoRA backward: clear, slow, f64 — the reference every GPU kernel
//! and the GPU training step are checked against.
//!
//! Conventions (`shared/reference/gguf.md` §4–§5, verified against llama.cpp for llama and qwen2):
//!
//! ```text
//! x_0      = token_embd[ids]                                           [T, d]
//! per layer:
//!   n1     = rmsnorm(x, attn_norm)                                     [T, d]
//!   q,k,v  = W·n1 (+ bias, qwen2) (+ (alpha/r)·B·(A·n1), LoRA)          [T, qd] [T, kvd] [T, kvd]
//!   q,k    = per-head rmsnorm(q, q_norm), rmsnorm(k, k_norm)   (qwen3)
//!   q,k    = rope(q), rope(k)          NORM (adjacent pairs) for llama, NEOX (split halves) for qwen
//!   att    = softmax(q·kᵀ/√hd + causal mask)·v, query head h uses KV head h / (n_head/n_head_kv)
//!   h      = x + Wo·att                                                [T, d]
//!   n2     = rmsnorm(h, ffn_norm)
//!   x'     = h + Wdown·(silu(Wgate·n2) ⊙ Wup·n2)
//! logits   = W_out · rmsnorm(x_L, output_norm)     W_out = output, or token_embd when tied
//! logp_t   = log_softmax(logits_{t−1})[ids_t]      for t ≥ response_start
//! ```
//!
//! Every LoRA-adapted projection computes `y = W·x + (alpha/r)·B·(A·x)` with A `[r, n_in]`, B
//! `[n_out, r]`. With LoRA dropout (training only, `RefModel::lora_grads_dropout`) the branch
//! reads `mask ⊙ x / (1 − p)`, the masks those of `gpu::ops::dropout` (a counter hash).
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
use crate::gpu::ops::dropout::Dropout;
use crate::model::{ModelConfig, RopeKind, Weights};
use crate::train::lora::{LoraWeights, Target};
use crate::util::Rng;
use serde::{Deserialize, Serialize};

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
    /// biases ~ N(0, 0.1²), embeddings ~ N(0, 1). Biases and q/k norms exist as `cfg` says;
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

// ---------------------------------------------------------------------------------------------
// Per-op references (f64, row-major)
// ---------------------------------------------------------------------------------------------

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y = x·Wᵀ + bias`: x `[rows, n_in]`, W `[n_out, n_in]`, bias `[n_out]` → y `[rows, n_out]`.
pub fn linear_fwd(
    x: &[f64],
    n_in: usize,
    w: &[f32],
    n_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    assert_eq!(w.len(), n_out * n_in, "linear_fwd: weight shape");
    assert_eq!(x.len() % n_in, 0, "linear_fwd: input shape");
    let rows = x.len() / n_in;
    let mut y = vec![0.0; rows * n_out];
    for t in 0..rows {
        let xr = &x[t * n_in..(t + 1) * n_in];
        for o in 0..n_out {
            let wr = &w[o * n_in..(o + 1) * n_in];
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for (&wi, &xi) in wr.iter().zip(xr) {
                acc += wi as f64 * xi;
            }
            y[t * n_out + o] = acc;
        }
    }
    y
}

/// Backward of [`linear_fwd`] with respect to its input: `dx = dy·W`, i.e.
/// `dx[t,i] = Σ_o dy[t,o]·W[o,i]` (W and bias are frozen).
pub fn linear_back(dy: &[f64], n_in: usize, w: &[f32], n_out: usize) -> Vec<f64> {
    assert_eq!(w.len(), n_out * n_in, "linear_back: weight shape");
    let rows = dy.len() / n_out;
    let mut dx = vec![0.0; rows * n_in];
    for t in 0..rows {
        let dxr = &mut dx[t * n_in..(t + 1) * n_in];
        for o in 0..n_out {
            let g = dy[t * n_out + o];
            if g == 0.0 {
                continue;
            }
            for (d, &wi) in dxr.iter_mut().zip(&w[o * n_in..(o + 1) * n_in]) {
                *d += g * wi as f64;
            }
        }
    }
    dx
}

/// LoRA branch forward: `z = x·Aᵀ` `[rows, r]` and `y = scale·z·Bᵀ` `[rows, n_out]`; returns
/// `(y, z)` (z is what the backward needs). A `[r, n_in]`, B `[n_out, r]`.
pub fn lora_fwd(
    x: &[f64],
    n_in: usize,
    a: &[f64],
    b: &[f64],
    rank: usize,
    n_out: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), rank * n_in, "lora_fwd: A shape");
    assert_eq!(b.len(), n_out * rank, "lora_fwd: B shape");
    let rows = x.len() / n_in;
    let mut z = vec![0.0; rows * rank];
    for t in 0..rows {
        let xr = &x[t * n_in..(t + 1) * n_in];
        for k in 0..rank {
            z[t * rank + k] = dot(&a[k * n_in..(k + 1) * n_in], xr);
        }
    }
    let mut y = vec![0.0; rows * n_out];
    for t in 0..rows {
        let zr = &z[t * rank..(t + 1) * rank];
        for o in 0..n_out {
            y[t * n_out + o] = scale * dot(&b[o * rank..(o + 1) * rank], zr);
        }
    }
    (y, z)
}

/// Gradients of the LoRA branch of [`lora_fwd`], from `dy` `[rows, n_out]`:
///
/// ```text
/// dz = scale·dy·B                      dz[t,k] = scale·Σ_o dy[t,o]·B[o,k]       [rows, r]
/// dB = scale·dyᵀ·z                     dB[o,k] = scale·Σ_t dy[t,o]·z[t,k]       [n_out, r]
/// dA = dzᵀ·x                           dA[k,i] = Σ_t dz[t,k]·x[t,i]             [r, n_in]
/// dx = dz·A                            dx[t,i] = Σ_k dz[t,k]·A[k,i]             [rows, n_in]
/// ```
/// Returns `(dx, dA, dB)`; dx is only the LoRA branch's share (add the base `linear_back`).
#[allow(clippy::too_many_arguments)]
pub fn lora_back(
    x: &[f64],
    z: &[f64],
    dy: &[f64],
    n_in: usize,
    a: &[f64],
    b: &[f64],
    rank: usize,
    n_out: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / n_in;
    let mut dz = vec![0.0; rows * rank];
    let mut db = vec![0.0; n_out * rank];
    for t in 0..rows {
        for o in 0..n_out {
            let g = scale * dy[t * n_out + o];
            for k in 0..rank {
                dz[t * rank + k] += g * b[o * rank + k];
                db[o * rank + k] += g * z[t * rank + k];
            }
        }
    }
    let mut da = vec![0.0; rank * n_in];
    let mut dx = vec![0.0; rows * n_in];
    for t in 0..rows {
        let xr = &x[t * n_in..(t + 1) * n_in];
        for k in 0..rank {
            let g = dz[t * rank + k];
            let ar = &a[k * n_in..(k + 1) * n_in];
            for i in 0..n_in {
                da[k * n_in + i] += g * xr[i];
                dx[t * n_in + i] += g * ar[i];
            }
        }
    }
    (dx, da, db)
}

/// RMSNorm of each row of length `n`: `y = x / sqrt(mean(x²) + eps) · w`.
pub fn rmsnorm_fwd(x: &[f64], n: usize, w: &[f32], eps: f64) -> Vec<f64> {
    assert_eq!(w.len(), n, "rmsnorm_fwd: weight shape");
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let r = 1.0 / (dot(xr, xr) / n as f64 + eps).sqrt();
        for i in 0..n {
            yr[i] = xr[i] * r * w[i] as f64;
        }
    }
    y
}

/// Backward of [`rmsnorm_fwd`] with respect to x (w is frozen). Per row, with
/// `r = (mean(x²) + eps)^(−1/2)` and `g_i = dy_i·w_i`:
///
/// ```text
/// ∂r/∂x_j = −r³·x_j/n      y_i = x_i·r·w_i
/// dx_j = r·g_j − (r³/n)·x_j·Σ_i g_i·x_i
/// ```
pub fn rmsnorm_back(x: &[f64], n: usize, w: &[f32], eps: f64, dy: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), dy.len(), "rmsnorm_back: shapes");
    let mut dx = vec![0.0; x.len()];
    for ((xr, dyr), dxr) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        let r = 1.0 / (dot(xr, xr) / n as f64 + eps).sqrt();
        let gx: f64 = (0..n).map(|i| dyr[i] * w[i] as f64 * xr[i]).sum();
        let c = r * r * r / n as f64 * gx;
        for j in 0..n {
            dxr[j] = r * dyr[j] * w[j] as f64 - c * xr[j];
        }
    }
    dx
}

/// Rotary position embedding parameters (see `gguf.md` §5.1).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub kind: RopeKind,
    /// Rotated dimensions per head (even, ≤ head_dim); dims ≥ n_rot pass through.
    pub n_rot: usize,
    pub base: f64,
    /// Positions are multiplied by this (linear scaling: 1/factor).
    pub pos_scale: f64,
    /// llama3 per-frequency divisors `[n_rot/2]`.
    pub freqs: Option<Vec<f64>>,
}

impl RopeParams {
    pub fn from_config(cfg: &ModelConfig) -> RopeParams {
        RopeParams {
            kind: cfg.rope_kind,
            n_rot: cfg.n_rot,
            base: cfg.rope_base as f64,
            pos_scale: cfg.rope_pos_scale as f64,
            freqs: cfg
                .rope_freqs
                .as_ref()
                .map(|f| f.iter().map(|&v| v as f64).collect()),
        }
    }

    /// `θ_i(pos) = pos·pos_scale · base^(−2i/n_rot) / freqs[i]`, i ∈ [0, n_rot/2).
    pub fn theta(&self, pos: usize, i: usize) -> f64 {
        let inv = self.base.powf(-2.0 * i as f64 / self.n_rot as f64);
        let f = self.freqs.as_ref().map_or(1.0, |f| f[i]);
        pos as f64 * self.pos_scale * inv / f
    }

    /// Index pair rotated together for frequency i: NORM `(2i, 2i+1)`, NEOX `(i, i + n_rot/2)`.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.kind {
            RopeKind::Norm => (2 * i, 2 * i + 1),
            RopeKind::Neox => (i, i + self.n_rot / 2),
        }
    }
}

fn rope_apply(x: &[f64], n_head: usize, head_dim: usize, p: &RopeParams, sign: f64) -> Vec<f64> {
    let width = n_head * head_dim;
    assert_eq!(x.len() % width, 0, "rope: shape");
    assert!(
        p.n_rot <= head_dim && p.n_rot.is_multiple_of(2),
        "rope: n_rot"
    );
    let mut y = x.to_vec();
    for (pos, row) in y.chunks_exact_mut(width).enumerate() {
        for h in 0..n_head {
            let hr = &mut row[h * head_dim..(h + 1) * head_dim];
            for i in 0..p.n_rot / 2 {
                let th = sign * p.theta(pos, i);
                let (c, s) = (th.cos(), th.sin());
                let (ia, ib) = p.pair(i);
                let (a, b) = (hr[ia], hr[ib]);
                hr[ia] = a * c - b * s;
                hr[ib] = a * s + b * c;
            }
        }
    }
    y
}

/// RoPE on `x` `[T, n_head·head_dim]`; row t is at position t. Each pair (a, b) becomes
/// `(a·cosθ − b·sinθ, a·sinθ + b·cosθ)`.
pub fn rope_fwd(x: &[f64], n_head: usize, head_dim: usize, p: &RopeParams) -> Vec<f64> {
    rope_apply(x, n_head, head_dim, p, 1.0)
}

/// Backward of [`rope_fwd`]: the rotation R(θ) is orthogonal, so `dx = R(θ)ᵀ·dy = R(−θ)·dy`:
/// `(da, db) = (dy_a·cosθ + dy_b·sinθ, −dy_a·sinθ + dy_b·cosθ)`.
pub fn rope_back(dy: &[f64], n_head: usize, head_dim: usize, p: &RopeParams) -> Vec<f64> {
    rope_apply(dy, n_head, head_dim, p, -1.0)
}

/// Causal softmax attention probabilities of query head h: `P[i,j]` `[T, T]` (0 for j > i).
fn attention_probs(
    q: &[f64],
    k: &[f64],
    t_len: usize,
    h: usize,
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
) -> Vec<f64> {
    let kvh = h / (n_head / n_head_kv);
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut p = vec![0.0; t_len * t_len];
    for i in 0..t_len {
        let qi = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
        let row = &mut p[i * t_len..(i + 1) * t_len];
        let mut m = f64::NEG_INFINITY;
        for j in 0..=i {
            let kj = &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
            row[j] = dot(qi, kj) * scale;
            m = m.max(row[j]);
        }
        let mut sum = 0.0;
        for v in row.iter_mut().take(i + 1) {
            *v = (*v - m).exp();
            sum += *v;
        }
        for v in row.iter_mut().take(i + 1) {
            *v /= sum;
        }
    }
    p
}

/// Causal GQA attention for one sequence: q `[T, n_head·hd]`, k, v `[T, n_head_kv·hd]` →
/// out `[T, n_head·hd]`; `out_h[i] = Σ_{j≤i} P_h[i,j]·v_{kv(h)}[j]`,
/// `P_h[i,·] = softmax_j(q_h[i]·k_{kv(h)}[j]/√hd)`, `kv(h) = h / (n_head/n_head_kv)`.
pub fn attention_fwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
) -> Vec<f64> {
    assert!(
        n_head_kv > 0 && n_head.is_multiple_of(n_head_kv),
        "attention: GQA"
    );
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let t_len = q.len() / qw;
    assert_eq!(k.len(), t_len * kw, "attention: k shape");
    assert_eq!(v.len(), t_len * kw, "attention: v shape");
    let mut out = vec![0.0; t_len * qw];
    for h in 0..n_head {
        let kvh = h / (n_head / n_head_kv);
        let p = attention_probs(q, k, t_len, h, n_head, n_head_kv, hd);
        for i in 0..t_len {
            let o = &mut out[i * qw + h * hd..i * qw + (h + 1) * hd];
            for j in 0..=i {
                let pij = p[i * t_len + j];
                let vj = &v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
                for (oe, &ve) in o.iter_mut().zip(vj) {
                    *oe += pij * ve;
                }
            }
        }
    }
    out
}

/// Backward of [`attention_fwd`]; returns `(dq, dk, dv)`. Per query head h (KV head g = kv(h)),
/// with `S = q·kᵀ/√hd` (masked), `P = softmax(S)`, `O = P·V`:
///
/// ```text
/// dV_g[j] += Σ_i P[i,j]·dO[i]
/// dP[i,j]  = dO[i]·V_g[j]
/// dS[i,j]  = P[i,j]·(dP[i,j] − Σ_j' P[i,j']·dP[i,j'])
/// dQ[i]    = (1/√hd)·Σ_j dS[i,j]·K_g[j]
/// dK_g[j] += (1/√hd)·Σ_i dS[i,j]·Q[i]
/// ```
/// (KV heads shared by a group accumulate the gradients of all its query heads.)
pub fn attention_back(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let t_len = q.len() / qw;
    assert_eq!(dout.len(), q.len(), "attention_back: dout shape");
    let scale = 1.0 / (hd as f64).sqrt();
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for h in 0..n_head {
        let g = h / (n_head / n_head_kv);
        let p = attention_probs(q, k, t_len, h, n_head, n_head_kv, hd);
        let qo = |i: usize| i * qw + h * hd..i * qw + (h + 1) * hd;
        let ko = |j: usize| j * kw + g * hd..j * kw + (g + 1) * hd;
        for i in 0..t_len {
            let doi = &dout[qo(i)];
            // dP[i,j] and the row's Σ_j P·dP
            let dp: Vec<f64> = (0..=i).map(|j| dot(doi, &v[ko(j)])).collect();
            let pdp: f64 = (0..=i).map(|j| p[i * t_len + j] * dp[j]).sum();
            for j in 0..=i {
                let pij = p[i * t_len + j];
                for (dve, &de) in dv[ko(j)].iter_mut().zip(doi) {
                    *dve += pij * de;
                }
                let ds = pij * (dp[j] - pdp) * scale;
                if ds == 0.0 {
                    continue;
                }
                let kj = &k[ko(j)];
                for (dqe, &ke) in dq[qo(i)].iter_mut().zip(kj) {
                    *dqe += ds * ke;
                }
                let qi = &q[qo(i)];
                for (dke, &qe) in dk[ko(j)].iter_mut().zip(qi) {
                    *dke += ds * qe;
                }
            }
        }
    }
    (dq, dk, dv)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// SwiGLU: `s = silu(g) ⊙ u`, `silu(z) = z·σ(z)`, elementwise.
pub fn swiglu_fwd(g: &[f64], u: &[f64]) -> Vec<f64> {
    assert_eq!(g.len(), u.len(), "swiglu: shapes");
    g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

/// Backward of [`swiglu_fwd`]: `silu'(z) = σ(z)·(1 + z·(1 − σ(z)))`, so
/// `dg = ds·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = ds·silu(g)`. Returns `(dg, du)`.
pub fn swiglu_back(g: &[f64], u: &[f64], ds: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = vec![0.0; g.len()];
    let mut du = vec![0.0; g.len()];
    for i in 0..g.len() {
        let sg = sigmoid(g[i]);
        dg[i] = ds[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
        du[i] = ds[i] * g[i] * sg;
    }
    (dg, du)
}

/// `log_softmax(logits)[target] = logits[target] − m − ln Σ_j exp(logits[j] − m)`, m = max.
pub fn log_softmax_target_fwd(logits: &[f64], target: usize) -> f64 {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|&l| (l - m).exp()).sum::<f64>().ln();
    logits[target] - lse
}

/// Gradient of `weight·log_softmax(logits)[target]`:
/// `dlogits = weight·(onehot(target) − softmax(logits))`.
pub fn log_softmax_target_back(logits: &[f64], target: usize, weight: f64) -> Vec<f64> {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter()
        .enumerate()
        .map(|(j, &ej)| weight * ((j == target) as u8 as f64 - ej / sum))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// LoRA gradients
// ---------------------------------------------------------------------------------------------

/// Gradient of one LoRA tensor, same layout as [`LoraTensor`]: `a` `[r, n_in]`, `b` `[n_out, r]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraGrad {
    pub layer: usize,
    pub target: Target,
    pub n_in: usize,
    pub n_out: usize,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// Gradients of every tensor of a [`LoraWeights`], in the same order as `LoraWeights::tensors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraGrads {
    pub rank: usize,
    pub tensors: Vec<LoraGrad>,
}

impl LoraGrads {
    pub fn zeros_like(lora: &LoraWeights) -> LoraGrads {
        LoraGrads {
            rank: lora.rank,
            tensors: lora
                .tensors
                .iter()
                .map(|t| LoraGrad {
                    layer: t.layer,
                    target: t.target,
                    n_in: t.n_in,
                    n_out: t.n_out,
                    a: vec![0.0; t.a.len()],
                    b: vec![0.0; t.b.len()],
                })
                .collect(),
        }
    }

    /// All gradients in one vector: tensor by tensor in `tensors` order, A then B of each
    /// (the same order as [`flatten_lora`]).
    pub fn flatten(&self) -> Vec<f64> {
        self.tensors
            .iter()
            .flat_map(|t| t.a.iter().chain(&t.b).copied())
            .collect()
    }

    /// Global L2 norm over every element.
    pub fn norm(&self) -> f64 {
        self.flatten().iter().map(|g| g * g).sum::<f64>().sqrt()
    }
}

/// All LoRA parameters in one vector: tensor by tensor, A then B of each.
pub fn flatten_lora(lora: &LoraWeights) -> Vec<f32> {
    lora.tensors
        .iter()
        .flat_map(|t| t.a.iter().chain(&t.b).copied())
        .collect()
}

/// Inverse of [`flatten_lora`]: writes `flat` back into `lora` (lengths must match).
pub fn unflatten_lora(flat: &[f32], lora: &mut LoraWeights) {
    assert_eq!(flat.len(), lora.n_params(), "unflatten_lora: length");
    let mut off = 0;
    for t in &mut lora.tensors {
        let na = t.a.len();
        t.a.copy_from_slice(&flat[off..off + na]);
        off += na;
        let nb = t.b.len();
        t.b.copy_from_slice(&flat[off..off + nb]);
        off += nb;
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// A LoRA tensor widened to f64, for one projection.
struct Adapter {
    idx: usize,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// The adapters of a model, indexed `[layer][target]`.
struct Adapters {
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
struct LayerTape {
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
    /// LoRA `z = A·x` per target (`[T, r]`), empty where no adapter.
    z: [Vec<f64>; 7],
}

/// The whole-model CPU reference. Owns f32 copies of the weights.
#[derive(Clone, Debug)]
pub struct RefModel {
    cfg: ModelConfig,
    w: RefWeights,
    rope: RopeParams,
}

impl RefModel {
    /// From GGUF weight views (dequantized with [`TensorRef::to_f32`](crate::model::TensorRef)).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<RefModel, RefError> {
        Self::from_weights(cfg, w)
    }

    /// From GGUF weight views (dequantized with [`TensorRef::to_f32`](crate::model::TensorRef)).
    pub fn from_weights(cfg: &ModelConfig, w: &Weights) -> Result<RefModel, RefError> {
        let layers = w
            .layers
            .iter()
            .map(|l| RefLayer {
                attn_norm: l.attn_norm.to_f32(),
                wq: l.attn_q.to_f32(),
                wk: l.attn_k.to_f32(),
                wv: l.attn_v.to_f32(),
                bq: l.attn_q_bias.map(|t| t.to_f32()),
                bk: l.attn_k_bias.map(|t| t.to_f32()),
                bv: l.attn_v_bias.map(|t| t.to_f32()),
                q_norm: l.attn_q_norm.map(|t| t.to_f32()),
                k_norm: l.attn_k_norm.map(|t| t.to_f32()),
                wo: l.attn_output.to_f32(),
                ffn_norm: l.ffn_norm.to_f32(),
                w_gate: l.ffn_gate.to_f32(),
                w_up: l.ffn_up.to_f32(),
                w_down: l.ffn_down.to_f32(),
            })
            .collect();
        let rw = RefWeights {
            token_embd: w.token_embd.to_f32(),
            output_norm: w.output_norm.to_f32(),
            output: w.output.map(|t| t.to_f32()),
            layers,
        };
        Self::from_parts(cfg.clone(), rw)
    }

    /// From plain f32 arrays; checks every shape against `cfg`.
    pub fn from_parts(cfg: ModelConfig, w: RefWeights) -> Result<RefModel, RefError> {
        let bad = |s: String| Err(RefError::BadConfig(s));
        if cfg.n_head == 0 || cfg.n_head_kv == 0 || !cfg.n_head.is_multiple_of(cfg.n_head_kv) {
            return bad(format!(
                "n_head {} must be a positive multiple of n_head_kv {}",
                cfg.n_head, cfg.n_head_kv
            ));
        }
        if cfg.n_rot > cfg.head_dim || !cfg.n_rot.is_multiple_of(2) {
            return bad(format!(
                "n_rot {} must be even and at most head_dim {}",
                cfg.n_rot, cfg.head_dim
            ));
        }
        if let Some(f) = &cfg.rope_freqs
            && f.len() != cfg.n_rot / 2
        {
            return bad(format!(
                "rope_freqs has {} values, expected n_rot/2 = {}",
                f.len(),
                cfg.n_rot / 2
            ));
        }
        if w.layers.len() != cfg.n_layer {
            return bad(format!(
                "{} layers of weights for n_layer {}",
                w.layers.len(),
                cfg.n_layer
            ));
        }
        if cfg.tied != w.output.is_none() {
            return bad(format!(
                "config says tied = {} but output.weight is {}",
                cfg.tied,
                if w.output.is_some() {
                    "present"
                } else {
                    "absent"
                }
            ));
        }
        let (d, qd, kvd, ff, hd, nv) = (
            cfg.n_embd,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.n_ff,
            cfg.head_dim,
            cfg.n_vocab,
        );
        let check = |name: String, v: &[f32], dims: &[usize]| -> Result<(), RefError> {
            let expected: usize = dims.iter().product();
            if v.len() != expected {
                return Err(RefError::BadShape {
                    name,
                    found: v.len(),
                    expected,
                    shape: format!("{dims:?}"),
                });
            }
            Ok(())
        };
        let check_opt =
            |name: String, v: &Option<Vec<f32>>, want: bool, dims: &[usize]| match (v, want) {
                (Some(v), true) => check(name, v, dims),
                (None, false) => Ok(()),
                (Some(_), false) => Err(RefError::BadConfig(format!(
                    "{name} is present but the config does not use it"
                ))),
                (None, true) => Err(RefError::BadConfig(format!(
                    "{name} is missing but the config needs it"
                ))),
            };
        check("token_embd".into(), &w.token_embd, &[nv, d])?;
        check("output_norm".into(), &w.output_norm, &[d])?;
        if let Some(o) = &w.output {
            check("output".into(), o, &[nv, d])?;
        }
        for (i, l) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}");
            check(n("attn_norm"), &l.attn_norm, &[d])?;
            check(n("attn_q"), &l.wq, &[qd, d])?;
            check(n("attn_k"), &l.wk, &[kvd, d])?;
            check(n("attn_v"), &l.wv, &[kvd, d])?;
            check_opt(n("attn_q.bias"), &l.bq, cfg.qkv_bias, &[qd])?;
            check_opt(n("attn_k.bias"), &l.bk, cfg.qkv_bias, &[kvd])?;
            check_opt(n("attn_v.bias"), &l.bv, cfg.qkv_bias, &[kvd])?;
            check_opt(n("attn_q_norm"), &l.q_norm, cfg.qk_norm, &[hd])?;
            check_opt(n("attn_k_norm"), &l.k_norm, cfg.qk_norm, &[hd])?;
            check(n("attn_output"), &l.wo, &[d, qd])?;
            check(n("ffn_norm"), &l.ffn_norm, &[d])?;
            check(n("ffn_gate"), &l.w_gate, &[ff, d])?;
            check(n("ffn_up"), &l.w_up, &[ff, d])?;
            check(n("ffn_down"), &l.w_down, &[d, ff])?;
        }
        let rope = RopeParams::from_config(&cfg);
        Ok(RefModel { cfg, w, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &RefWeights {
        &self.w
    }

    /// The LM head `[n_vocab, d]`: `output`, or `token_embd` when tied.
    pub fn lm_head(&self) -> &[f32] {
        self.w.output.as_deref().unwrap_or(&self.w.token_embd)
    }

    fn eps(&self) -> f64 {
        self.cfg.rms_eps as f64
    }

    fn check_ids(&self, ids: &[u32], example: usize) -> Result<(), RefError> {
        if ids.is_empty() {
            return Err(RefError::EmptySequence);
        }
        for (pos, &id) in ids.iter().enumerate() {
            if id as usize >= self.cfg.n_vocab {
                return Err(RefError::TokenOutOfRange {
                    example,
                    pos,
                    id,
                    n_vocab: self.cfg.n_vocab,
                });
            }
        }
        Ok(())
    }

    fn check_example(&self, ex: &Example, example: usize) -> Result<(), RefError> {
        self.check_ids(&ex.ids, example)?;
        if ex.response_start < 1 || ex.response_start > ex.ids.len() {
            return Err(RefError::BadResponseStart {
                example,
                response_start: ex.response_start,
                len: ex.ids.len(),
            });
        }
        Ok(())
    }

    fn adapters(&self, lora: Option<&LoraWeights>) -> Result<Adapters, RefError> {
        let mut ad = Adapters::none(self.cfg.n_layer);
        let Some(lora) = lora else {
            return Ok(ad);
        };
        ad.rank = lora.rank;
        ad.scale = lora.scale() as f64;
        for (idx, t) in lora.tensors.iter().enumerate() {
            let bad = |detail: String| RefError::BadLora {
                layer: t.layer,
                target: t.target.gguf_name(),
                detail,
            };
            if t.layer >= self.cfg.n_layer {
                return Err(bad(format!(
                    "layer {} does not exist (the model has {} layers)",
                    t.layer, self.cfg.n_layer
                )));
            }
            if t.target == Target::Output && self.cfg.tied {
                return Err(bad(
                    "this model ties its embeddings: it has no output.weight to adapt".into(),
                ));
            }
            let (n_in, n_out) = t.target.shape(&self.cfg);
            if (t.n_in, t.n_out) != (n_in, n_out) {
                return Err(bad(format!(
                    "shape n_in {} n_out {}, the model needs n_in {n_in} n_out {n_out}",
                    t.n_in, t.n_out
                )));
            }
            if t.a.len() != lora.rank * n_in || t.b.len() != n_out * lora.rank {
                return Err(bad(format!(
                    "A has {} values and B {}, rank {} needs {} and {}",
                    t.a.len(),
                    t.b.len(),
                    lora.rank,
                    lora.rank * n_in,
                    n_out * lora.rank
                )));
            }
            let slot = &mut ad.by[t.layer][t.target as usize];
            if slot.is_some() {
                return Err(bad("appears twice in the adapter".into()));
            }
            *slot = Some(Adapter {
                idx,
                a: t.a.iter().map(|&v| v as f64).collect(),
                b: t.b.iter().map(|&v| v as f64).collect(),
            });
        }
        Ok(ad)
    }

    /// A projection `y = W·x (+ bias) (+ LoRA)`; returns `(y, z)` with z the LoRA `A·x` (empty
    /// without an adapter).
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        ad: &Adapters,
        layer: usize,
        target: Target,
        x: &[f64],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let (n_in, n_out) = target.shape(&self.cfg);
        let mut y = linear_fwd(x, n_in, w, n_out, bias);
        let mut z = Vec::new();
        if let Some(a) = ad.get(layer, target) {
            let xd = ad.dropped(layer, target, x, n_in);
            let (dy, zz) = lora_fwd(&xd, n_in, &a.a, &a.b, ad.rank, n_out, ad.scale);
            for (ye, de) in y.iter_mut().zip(dy) {
                *ye += de;
            }
            z = zz;
        }
        (y, z)
    }

    /// Backward of [`Self::project`]: returns dx, and accumulates the LoRA gradients.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        ad: &Adapters,
        layer: usize,
        target: Target,
        x: &[f64],
        z: &[f64],
        w: &[f32],
        dy: &[f64],
        grads: &mut LoraGrads,
    ) -> Vec<f64> {
        let (n_in, n_out) = target.shape(&self.cfg);
        let mut dx = linear_back(dy, n_in, w, n_out);
        if let Some(a) = ad.get(layer, target) {
            // With dropout the branch saw drop(x): gradients against it, and the branch's input
            // gradient goes back through the same mask (drop is linear in x).
            let xd = ad.dropped(layer, target, x, n_in);
            let (dxl, da, db) = lora_back(&xd, z, dy, n_in, &a.a, &a.b, ad.rank, n_out, ad.scale);
            let dxl = ad.dropped(layer, target, &dxl, n_in);
            add_into(&mut dx, &dxl);
            let g = &mut grads.tensors[a.idx];
            add_into(&mut g.a, &da);
            add_into(&mut g.b, &db);
        }
        dx
    }

    fn embed(&self, ids: &[u32]) -> Vec<f64> {
        let d = self.cfg.n_embd;
        ids.iter()
            .flat_map(|&id| {
                let id = id as usize;
                self.w.token_embd[id * d..(id + 1) * d]
                    .iter()
                    .map(|&v| v as f64)
            })
            .collect()
    }

    /// One layer forward; returns the output and the tape.
    fn layer_fwd(&self, l: usize, x: Vec<f64>, ad: &Adapters) -> (Vec<f64>, LayerTape) {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let eps = self.eps();
        let (d, hd) = (c.n_embd, c.head_dim);
        let n1 = rmsnorm_fwd(&x, d, &w.attn_norm, eps);
        let (q_pre, zq) = self.project(ad, l, Target::AttnQ, &n1, &w.wq, w.bq.as_deref());
        let (k_pre, zk) = self.project(ad, l, Target::AttnK, &n1, &w.wk, w.bk.as_deref());
        let (v, zv) = self.project(ad, l, Target::AttnV, &n1, &w.wv, w.bv.as_deref());
        let (q_n, k_n) = match (&w.q_norm, &w.k_norm) {
            (Some(qn), Some(kn)) => (
                rmsnorm_fwd(&q_pre, hd, qn, eps),
                rmsnorm_fwd(&k_pre, hd, kn, eps),
            ),
            _ => (q_pre.clone(), k_pre.clone()),
        };
        let q = rope_fwd(&q_n, c.n_head, hd, &self.rope);
        let k = rope_fwd(&k_n, c.n_head_kv, hd, &self.rope);
        let att = attention_fwd(&q, &k, &v, c.n_head, c.n_head_kv, hd);
        let (o, zo) = self.project(ad, l, Target::AttnOutput, &att, &w.wo, None);
        let h: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let n2 = rmsnorm_fwd(&h, d, &w.ffn_norm, eps);
        let (g, zg) = self.project(ad, l, Target::FfnGate, &n2, &w.w_gate, None);
        let (u, zu) = self.project(ad, l, Target::FfnUp, &n2, &w.w_up, None);
        let s = swiglu_fwd(&g, &u);
        let (f, zd) = self.project(ad, l, Target::FfnDown, &s, &w.w_down, None);
        let out: Vec<f64> = h.iter().zip(&f).map(|(a, b)| a + b).collect();
        let keep_pre = c.qk_norm;
        let tape = LayerTape {
            x,
            n1,
            q_pre: if keep_pre { q_pre } else { Vec::new() },
            k_pre: if keep_pre { k_pre } else { Vec::new() },
            q,
            k,
            v,
            att,
            h,
            n2,
            g,
            u,
            s,
            // Target order: AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown.
            z: [zq, zk, zv, zo, zg, zu, zd],
        };
        (out, tape)
    }

    /// One layer backward: from `dout` (gradient w.r.t. the layer output) to the gradient w.r.t.
    /// its input; accumulates LoRA gradients.
    fn layer_back(
        &self,
        l: usize,
        tp: &LayerTape,
        dout: Vec<f64>,
        ad: &Adapters,
        grads: &mut LoraGrads,
    ) -> Vec<f64> {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let eps = self.eps();
        let (d, hd) = (c.n_embd, c.head_dim);
        let z = |t: Target| tp.z[t as usize].as_slice();
        // out = h + Wdown·s:  dh = dout + (∂/∂h of the FFN branch)
        let ds = self.project_back(
            ad,
            l,
            Target::FfnDown,
            &tp.s,
            z(Target::FfnDown),
            &w.w_down,
            &dout,
            grads,
        );
        let (dg, du) = swiglu_back(&tp.g, &tp.u, &ds);
        let mut dn2 = self.project_back(
            ad,
            l,
            Target::FfnGate,
            &tp.n2,
            z(Target::FfnGate),
            &w.w_gate,
            &dg,
            grads,
        );
        let dn2u = self.project_back(
            ad,
            l,
            Target::FfnUp,
            &tp.n2,
            z(Target::FfnUp),
            &w.w_up,
            &du,
            grads,
        );
        add_into(&mut dn2, &dn2u);
        let mut dh = dout;
        add_into(&mut dh, &rmsnorm_back(&tp.h, d, &w.ffn_norm, eps, &dn2));
        // h = x + Wo·att
        let datt = self.project_back(
            ad,
            l,
            Target::AttnOutput,
            &tp.att,
            z(Target::AttnOutput),
            &w.wo,
            &dh,
            grads,
        );
        let (dq, dk, dv) = attention_back(&tp.q, &tp.k, &tp.v, &datt, c.n_head, c.n_head_kv, hd);
        let mut dq = rope_back(&dq, c.n_head, hd, &self.rope);
        let mut dk = rope_back(&dk, c.n_head_kv, hd, &self.rope);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            dq = rmsnorm_back(&tp.q_pre, hd, qn, eps, &dq);
            dk = rmsnorm_back(&tp.k_pre, hd, kn, eps, &dk);
        }
        let mut dn1 = self.project_back(
            ad,
            l,
            Target::AttnQ,
            &tp.n1,
            z(Target::AttnQ),
            &w.wq,
            &dq,
            grads,
        );
        let dn1k = self.project_back(
            ad,
            l,
            Target::AttnK,
            &tp.n1,
            z(Target::AttnK),
            &w.wk,
            &dk,
            grads,
        );
        let dn1v = self.project_back(
            ad,
            l,
            Target::AttnV,
            &tp.n1,
            z(Target::AttnV),
            &w.wv,
            &dv,
            grads,
        );
        add_into(&mut dn1, &dn1k);
        add_into(&mut dn1, &dn1v);
        let mut dx = dh;
        add_into(&mut dx, &rmsnorm_back(&tp.x, d, &w.attn_norm, eps, &dn1));
        dx
    }

    /// Runs every layer; returns the final hidden state `x_L` `[T, d]` and the tapes.
    fn trunk(&self, ids: &[u32], ad: &Adapters) -> (Vec<f64>, Vec<LayerTape>) {
        let mut x = self.embed(ids);
        let mut tapes = Vec::with_capacity(self.cfg.n_layer);
        for l in 0..self.cfg.n_layer {
            let (out, tape) = self.layer_fwd(l, x, ad);
            tapes.push(tape);
            x = out;
        }
        (x, tapes)
    }

    fn check_rows(&self, what: &'static str, x: &[f64]) -> Result<(), RefError> {
        let d = self.cfg.n_embd;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            return Err(RefError::BadActivation {
                what,
                len: x.len(),
                width: d,
            });
        }
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> Result<(), RefError> {
        if layer >= self.cfg.n_layer {
            return Err(RefError::BadLayer {
                layer,
                n_layer: self.cfg.n_layer,
            });
        }
        Ok(())
    }

    /// One layer on its own: input `x` `[T, d]` (row t at position t) → output `[T, d]`
    /// (for checking a GPU layer forward).
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &[f64],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        self.check_layer(layer)?;
        self.check_rows("layer input", x)?;
        let ad = self.adapters(lora)?;
        Ok(self.layer_fwd(layer, x.to_vec(), &ad).0)
    }

    /// One layer's backward on its own: from the layer input `x` and the gradient `dout` of its
    /// output, returns the gradient of its input and the gradients of this layer's adapters
    /// (zeros for the other layers' tensors; no tensors without `lora`).
    pub fn layer_backward(
        &self,
        layer: usize,
        x: &[f64],
        dout: &[f64],
        lora: Option<&LoraWeights>,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        self.check_layer(layer)?;
        self.check_rows("layer input", x)?;
        if dout.len() != x.len() {
            return Err(RefError::BadActivation {
                what: "layer output gradient",
                len: dout.len(),
                width: self.cfg.n_embd,
            });
        }
        let ad = self.adapters(lora)?;
        let mut grads = match lora {
            Some(l) => LoraGrads::zeros_like(l),
            None => LoraGrads {
                rank: 0,
                tensors: Vec::new(),
            },
        };
        let (_, tape) = self.layer_fwd(layer, x.to_vec(), &ad);
        let dx = self.layer_back(layer, &tape, dout.to_vec(), &ad, &mut grads);
        Ok((dx, grads))
    }

    /// The residual stream: the input of every layer and the final pre-norm output,
    /// `n_layer + 1` arrays of `[T, d]` (for layer-by-layer parity debugging).
    pub fn hidden_states(
        &self,
        ids: &[u32],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<Vec<f64>>, RefError> {
        self.check_ids(ids, 0)?;
        let ad = self.adapters(lora)?;
        let (x, tapes) = self.trunk(ids, &ad);
        let mut out: Vec<Vec<f64>> = tapes.into_iter().map(|t| t.x).collect();
        out.push(x);
        Ok(out)
    }

    /// Logits at every position, `T` rows of `n_vocab`.
    pub fn logits(
        &self,
        ids: &[u32],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<Vec<f64>>, RefError> {
        self.check_ids(ids, 0)?;
        let ad = self.adapters(lora)?;
        let (x, _) = self.trunk(ids, &ad);
        let d = self.cfg.n_embd;
        let nf = rmsnorm_fwd(&x, d, &self.w.output_norm, self.eps());
        let logits = self.lm_head_fwd(&nf, &ad);
        Ok(logits
            .chunks_exact(self.cfg.n_vocab)
            .map(|r| r.to_vec())
            .collect())
    }

    /// Log-probs of the response tokens: one per token `ids[response_start..]`, token i
    /// predicted from position i − 1.
    pub fn token_logprobs(
        &self,
        ex: &Example,
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        self.check_example(ex, 0)?;
        let ad = self.adapters(lora)?;
        let (x, _) = self.trunk(&ex.ids, &ad);
        Ok(self.head_fwd(&x, ex, &ad).0)
    }

    /// Summed response log-prob of each example.
    pub fn sequence_logprobs(
        &self,
        examples: &[Example],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        for (i, ex) in examples.iter().enumerate() {
            self.check_example(ex, i)?;
        }
        let ad = self.adapters(lora)?;
        Ok(examples
            .iter()
            .map(|ex| {
                let (x, _) = self.trunk(&ex.ids, &ad);
                self.head_fwd(&x, ex, &ad).0.iter().sum()
            })
            .collect())
    }

    /// Final norm + LM head on the scored positions only: returns (per-token log-probs, the
    /// normed rows `nf` of positions `response_start−1 .. T−1`, their logits).
    fn head_fwd(
        &self,
        x: &[f64],
        ex: &Example,
        ad: &Adapters,
    ) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let t_len = ex.ids.len();
        let rows = &x[(ex.response_start - 1) * d..(t_len - 1) * d];
        let nf = rmsnorm_fwd(rows, d, &self.w.output_norm, self.eps());
        let logits: Vec<Vec<f64>> = self
            .lm_head_fwd(&nf, ad)
            .chunks_exact(nv)
            .map(|r| r.to_vec())
            .collect();
        let lp = logits
            .iter()
            .enumerate()
            .map(|(r, lg)| log_softmax_target_fwd(lg, ex.ids[ex.response_start + r] as usize))
            .collect();
        (lp, nf, logits)
    }

    /// The LM head on normed rows `nf` `[R, d]`: `W_out·nf (+ s·B·(A·nf))` with the adapter's
    /// LoRA on `output.weight`, if any → `[R, n_vocab]`.
    fn lm_head_fwd(&self, nf: &[f64], ad: &Adapters) -> Vec<f64> {
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let mut logits = linear_fwd(nf, d, self.lm_head(), nv, None);
        if let Some(a) = ad
            .by
            .first()
            .and_then(|l| l[Target::Output as usize].as_ref())
        {
            let (dy, _) = lora_fwd(nf, d, &a.a, &a.b, ad.rank, nv, ad.scale);
            for (y, e) in logits.iter_mut().zip(dy) {
                *y += e;
            }
        }
        logits
    }

    /// Gradient of `J = Σ_s weights[s] · Σ_t logp_{s,t}` with respect to every LoRA A and B.
    /// Returns the per-sequence summed log-probs and the gradients (same layout as `lora`).
    ///
    /// Chain (per sequence, seed `w = weights[s]`):
    /// `dlogits_t = w·(onehot(ids_{t+1}) − softmax(logits_t))` on scored positions, 0 elsewhere;
    /// `dnf = dlogits·W_out`; `dx_L = rmsnorm_back(dnf)`; then each layer in reverse
    /// (see the private `layer_back`: FFN branch, residual, attention branch, residual).
    pub fn lora_grads(
        &self,
        examples: &[Example],
        weights: &[f64],
        lora: &LoraWeights,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        self.lora_grads_dropout(examples, weights, lora, None)
    }

    /// [`Self::lora_grads`] of the training forward with LoRA dropout (PEFT semantics: the LoRA
    /// branch reads `mask ⊙ x / (1 − p)`), masks as `gpu::backward::forward_train` draws them for
    /// the same batch (example `b` at global rows `b·L ..`, L the longest example). The returned
    /// log-probs are those of that dropout forward.
    pub fn lora_grads_dropout(
        &self,
        examples: &[Example],
        weights: &[f64],
        lora: &LoraWeights,
        dropout: Option<Dropout>,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        if weights.len() != examples.len() {
            return Err(RefError::WeightCount {
                n_weights: weights.len(),
                n_examples: examples.len(),
            });
        }
        for (i, ex) in examples.iter().enumerate() {
            self.check_example(ex, i)?;
        }
        if let Some(t) = lora.tensors.iter().find(|t| t.target == Target::Output) {
            return Err(RefError::BadLora {
                layer: t.layer,
                target: t.target.gguf_name(),
                detail: "LoRA on output.weight is supported for scoring, not training (no LM-head LoRA gradient)".into(),
            });
        }
        let mut ad = self.adapters(Some(lora))?;
        ad.drop = dropout;
        let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut grads = LoraGrads::zeros_like(lora);
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let mut sums = Vec::with_capacity(examples.len());
        for (b, (ex, &wt)) in examples.iter().zip(weights).enumerate() {
            ad.row0 = b * seq_len;
            let (x, tapes) = self.trunk(&ex.ids, &ad);
            let (lp, _nf, logits) = self.head_fwd(&x, ex, &ad);
            sums.push(lp.iter().sum());
            if wt == 0.0 {
                continue;
            }
            let t_len = ex.ids.len();
            let r0 = ex.response_start - 1;
            // dlogits on the scored rows, then dnf = dlogits·W_out.
            let mut dlogits = Vec::with_capacity(logits.len() * nv);
            for (r, lg) in logits.iter().enumerate() {
                let target = ex.ids[ex.response_start + r] as usize;
                dlogits.extend(log_softmax_target_back(lg, target, wt));
            }
            let dnf = linear_back(&dlogits, d, self.lm_head(), nv);
            let mut dx = vec![0.0; t_len * d];
            let rows = &x[r0 * d..(t_len - 1) * d];
            let dxr = rmsnorm_back(rows, d, &self.w.output_norm, self.eps(), &dnf);
            dx[r0 * d..(t_len - 1) * d].copy_from_slice(&dxr);
            for l in (0..self.cfg.n_layer).rev() {
                dx = self.layer_back(l, &tapes[l], dx, &ad, &mut grads);
            }
        }
        Ok((sums, grads))
    }
}

fn add_into(dst: &mut [f64], src: &[f64]) {
    assert_eq!(dst.len(), src.len());
    for (a, b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}
