//! Per-op references (f64, row-major): each forward with its backward, the derivative stated in
//! the backward's doc comment. The GPU kernels are checked against these.

use crate::model::{ModelConfig, RopeKind};

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

/// Rotary position embedding parameters (see `docs/gguf.md` §5.1).
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

    /// The rope of layer `l` (gemma3's local layers have their own base and no scaling).
    pub fn for_layer(cfg: &ModelConfig, l: usize) -> RopeParams {
        let (base, pos_scale) = cfg.layer_rope(l);
        RopeParams {
            base: base as f64,
            pos_scale: pos_scale as f64,
            ..RopeParams::from_config(cfg)
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
#[allow(clippy::too_many_arguments)]
fn attention_probs(
    q: &[f64],
    k: &[f64],
    t_len: usize,
    h: usize,
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
    o: AttnOpts,
) -> Vec<f64> {
    let kvh = h / (n_head / n_head_kv);
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let mut p = vec![0.0; t_len * t_len];
    for i in 0..t_len {
        let qi = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
        let row = &mut p[i * t_len..(i + 1) * t_len];
        let lo = o.first_key(i);
        let mut m = f64::NEG_INFINITY;
        for j in lo..=i {
            let kj = &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
            row[j] = dot(qi, kj) * o.scale;
            m = m.max(row[j]);
        }
        let mut sum = 0.0;
        for v in &mut row[lo..=i] {
            *v = (*v - m).exp();
            sum += *v;
        }
        for v in &mut row[lo..=i] {
            *v /= sum;
        }
    }
    p
}

/// Attention options beyond the causal mask: the factor on q·k and an optional sliding window
/// (query i sees keys j with `i − j < window`, gemma3's local layers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOpts {
    pub scale: f64,
    pub window: Option<usize>,
}

impl AttnOpts {
    /// Plain causal attention with the `1/√hd` factor.
    pub fn causal(hd: usize) -> AttnOpts {
        AttnOpts {
            scale: 1.0 / (hd as f64).sqrt(),
            window: None,
        }
    }

    /// The first key position query `i` sees.
    pub fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w.max(1)),
            None => 0,
        }
    }
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
    attention_fwd_opts(q, k, v, n_head, n_head_kv, hd, AttnOpts::causal(hd))
}

/// [`attention_fwd`] with another factor on q·k and an optional sliding window: masked
/// positions (j < i + 1 − window) get probability 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_opts(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
    opts: AttnOpts,
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
        let p = attention_probs(q, k, t_len, h, n_head, n_head_kv, hd, opts);
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
    attention_back_opts(q, k, v, dout, n_head, n_head_kv, hd, AttnOpts::causal(hd))
}

/// Backward of [`attention_fwd_opts`]: [`attention_back`] with `1/√hd` replaced by
/// `opts.scale`; masked pairs have P = 0 and so contribute nothing.
#[allow(clippy::too_many_arguments)]
pub fn attention_back_opts(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
    opts: AttnOpts,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let t_len = q.len() / qw;
    assert_eq!(dout.len(), q.len(), "attention_back: dout shape");
    let scale = opts.scale;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for h in 0..n_head {
        let g = h / (n_head / n_head_kv);
        let p = attention_probs(q, k, t_len, h, n_head, n_head_kv, hd, opts);
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

/// √(2/π), the constant of the tanh approximation of GELU.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;

/// `gelu_tanh(z) = ½·z·(1 + tanh(c·(z + a·z³)))`, c = √(2/π), a = 0.044715.
pub fn gelu_tanh(z: f64) -> f64 {
    0.5 * z * (1.0 + (GELU_C * (z + GELU_A * z * z * z)).tanh())
}

/// `gelu_tanh'(z) = ½·(1 + t) + ½·z·(1 − t²)·c·(1 + 3a·z²)`, t = tanh(c·(z + a·z³)).
pub fn gelu_tanh_grad(z: f64) -> f64 {
    let t = (GELU_C * (z + GELU_A * z * z * z)).tanh();
    0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * z * z)
}

/// GeGLU (gemma3): `s = gelu_tanh(g) ⊙ u`, elementwise.
pub fn geglu_fwd(g: &[f64], u: &[f64]) -> Vec<f64> {
    assert_eq!(g.len(), u.len(), "geglu: shapes");
    g.iter().zip(u).map(|(&g, &u)| gelu_tanh(g) * u).collect()
}

/// Backward of [`geglu_fwd`]: `dg = ds·u·gelu_tanh'(g)`, `du = ds·gelu_tanh(g)`. Returns
/// `(dg, du)`.
pub fn geglu_back(g: &[f64], u: &[f64], ds: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let dg = (0..g.len())
        .map(|i| ds[i] * u[i] * gelu_tanh_grad(g[i]))
        .collect();
    let du = (0..g.len()).map(|i| ds[i] * gelu_tanh(g[i])).collect();
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
