//! Row-wise ops of the CPU engine (f32; reductions in f64 or in a fixed order): RMSNorm, RoPE,
//! SwiGLU, GeGLU, causal GQA attention (optionally within a sliding window) (flash-style: only a per-row log-sum-exp is kept, probabilities
//! are recomputed in the backward, memory linear in sequence length), each forward with its
//! backward. The derivatives are those of `model::reference` (documented there), which the tests
//! compare against. Every op is independent per row (attention: per query row over its keys in
//! position order), so results do not depend on batch composition or thread count.

use super::gemm::sgemm;
use super::mat::{Mat, SendPtr};
use crate::model::reference::RopeParams;
use rayon::prelude::*;

/// Where each packed sequence's rows are: sequence `s` is rows `start[s]..start[s]+len[s]`,
/// row `start[s] + t` at position t.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Seqs {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

impl Seqs {
    pub fn from_lens(lens: &[usize]) -> Seqs {
        let mut start = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &l in lens {
            start.push(at);
            at += l;
        }
        Seqs {
            start,
            len: lens.to_vec(),
        }
    }
    pub fn total(&self) -> usize {
        self.len.iter().sum()
    }
    /// The position of every row.
    pub fn positions(&self) -> Vec<usize> {
        self.len.iter().flat_map(|&l| 0..l).collect()
    }
}

/// RMSNorm of every length-`n` chunk of the first `rows·width` values: `y = x·r·w`,
/// `r = (mean(x²) + eps)^(−1/2)` (sum of squares in f64).
pub fn rmsnorm(x: &[f32], n: usize, w: &[f32], eps: f32, y: &mut [f32]) {
    y.par_chunks_mut(n * 64)
        .zip(x.par_chunks(n * 64))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_exact_mut(n).zip(xb.chunks_exact(n)) {
                let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
                let r = (1.0 / (ss / n as f64 + eps as f64).sqrt()) as f32;
                for i in 0..n {
                    yr[i] = xr[i] * r * w[i];
                }
            }
        });
}

/// Backward of [`rmsnorm`]: `dx (+)= r·g − (r³/n)·x·Σ g·x`, `g = dy ⊙ w`.
pub fn rmsnorm_back(
    x: &[f32],
    n: usize,
    w: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    acc: bool,
) {
    dx.par_chunks_mut(n * 64)
        .zip(x.par_chunks(n * 64).zip(dy.par_chunks(n * 64)))
        .for_each(|(db, (xb, gb))| {
            for ((dr, xr), gr) in db
                .chunks_exact_mut(n)
                .zip(xb.chunks_exact(n))
                .zip(gb.chunks_exact(n))
            {
                let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
                let r = 1.0 / (ss / n as f64 + eps as f64).sqrt();
                let gx: f64 = (0..n)
                    .map(|i| gr[i] as f64 * w[i] as f64 * xr[i] as f64)
                    .sum();
                let c = (r * r * r / n as f64 * gx) as f32;
                let r = r as f32;
                for j in 0..n {
                    let v = r * gr[j] * w[j] - c * xr[j];
                    if acc { dr[j] += v } else { dr[j] = v }
                }
            }
        });
}

/// cos/sin of every (position, frequency), computed in f64 from [`RopeParams::theta`].
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub p: RopeParams,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(p: &RopeParams, max_pos: usize) -> RopeTable {
        let half = p.n_rot / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for i in 0..half {
                let th = p.theta(pos, i);
                cos.push(th.cos() as f32);
                sin.push(th.sin() as f32);
            }
        }
        RopeTable {
            p: p.clone(),
            half,
            cos,
            sin,
        }
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of every row in place (`inverse`: by −θ, the backward).
    pub fn apply(&self, x: &mut Mat, n_head: usize, hd: usize, pos: &[usize], inverse: bool) {
        let width = n_head * hd;
        let s = if inverse { -1.0f32 } else { 1.0 };
        x.data[..pos.len() * width]
            .par_chunks_mut(width)
            .zip(pos.par_iter())
            .for_each(|(row, &p)| {
                let (c, sn) = (
                    &self.cos[p * self.half..(p + 1) * self.half],
                    &self.sin[p * self.half..(p + 1) * self.half],
                );
                for h in 0..n_head {
                    let hr = &mut row[h * hd..(h + 1) * hd];
                    for i in 0..self.half {
                        let (ia, ib) = self.p.pair(i);
                        let (a, b) = (hr[ia], hr[ib]);
                        let si = s * sn[i];
                        hr[ia] = a * c[i] - b * si;
                        hr[ib] = a * si + b * c[i];
                    }
                }
            });
    }
}

/// √(2/π) and the cubic coefficient of the tanh approximation of GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

fn gelu_tanh(z: f32) -> f32 {
    0.5 * z * (1.0 + (GELU_C * (z + GELU_A * z * z * z)).tanh())
}

/// `s = gelu_tanh(g) ⊙ u` (GeGLU, gemma3).
pub fn geglu(g: &Mat, u: &Mat, s: &mut Mat) {
    s.data
        .par_chunks_mut(4096)
        .zip(g.data.par_chunks(4096).zip(u.data.par_chunks(4096)))
        .for_each(|(sb, (gb, ub))| {
            for i in 0..sb.len() {
                sb[i] = gelu_tanh(gb[i]) * ub[i];
            }
        });
}

/// Backward of [`geglu`]: `dg = ds·u·gelu_tanh'(g)`, `du = ds·gelu_tanh(g)`, with
/// `gelu_tanh'(z) = ½(1 + t) + ½z(1 − t²)·c·(1 + 3a·z²)`, t = tanh(c·(z + a·z³)).
pub fn geglu_back(g: &Mat, u: &Mat, ds: &Mat, dg: &mut Mat, du: &mut Mat) {
    dg.data
        .par_chunks_mut(4096)
        .zip(du.data.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dgb, dub))| {
            let o = c * 4096;
            for i in 0..dgb.len() {
                let (z, uv, d) = (g.data[o + i], u.data[o + i], ds.data[o + i]);
                let t = (GELU_C * (z + GELU_A * z * z * z)).tanh();
                let grad = 0.5 * (1.0 + t)
                    + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * z * z);
                dgb[i] = d * uv * grad;
                dub[i] = d * 0.5 * z * (1.0 + t);
            }
        });
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// `s = silu(g) ⊙ u`.
pub fn swiglu(g: &Mat, u: &Mat, s: &mut Mat) {
    s.data
        .par_chunks_mut(4096)
        .zip(g.data.par_chunks(4096).zip(u.data.par_chunks(4096)))
        .for_each(|(sb, (gb, ub))| {
            for i in 0..sb.len() {
                sb[i] = gb[i] * sigmoid(gb[i]) * ub[i];
            }
        });
}

/// Backward of [`swiglu`]: `dg = ds·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = ds·silu(g)`.
pub fn swiglu_back(g: &Mat, u: &Mat, ds: &Mat, dg: &mut Mat, du: &mut Mat) {
    dg.data
        .par_chunks_mut(4096)
        .zip(du.data.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dgb, dub))| {
            let o = c * 4096;
            for i in 0..dgb.len() {
                let (gv, uv, d) = (g.data[o + i], u.data[o + i], ds.data[o + i]);
                let sg = sigmoid(gv);
                dgb[i] = d * uv * sg * (1.0 + gv * (1.0 - sg));
                dub[i] = d * gv * sg;
            }
        });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums in a fixed order (vectorizes; same bits everywhere).
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Attention shapes: query heads, KV heads, head dimension; the factor on q·k and the sliding
/// window (query i sees keys j with `i − j < window`; `None`: all earlier keys).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub hd: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

impl AttnShape {
    /// The usual shape: scale `1/√hd`, no window.
    pub fn causal(n_head: usize, n_head_kv: usize, hd: usize) -> AttnShape {
        AttnShape {
            n_head,
            n_head_kv,
            hd,
            scale: 1.0 / (hd as f32).sqrt(),
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

/// Query rows per attention block: each block's scores against its keys are one product.
pub const QB: usize = 64;

/// Head `c` (width `hd`) of rows `s0..s0+len` of `m`, transposed to `[hd, len]` row-major.
fn head_t(m: &Mat, s0: usize, len: usize, c: usize, hd: usize) -> Vec<f32> {
    let mut t = vec![0f32; hd * len];
    for j in 0..len {
        for (d, &x) in m.row(s0 + j)[c * hd..(c + 1) * hd].iter().enumerate() {
            t[d * len + j] = x;
        }
    }
    t
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// Causal GQA attention over packed sequences: q `[R, n_head·hd]`, k, v `[R, n_head_kv·hd]` →
/// out `[R, n_head·hd]` and the log-sum-exp of every (row, head) `[R·n_head]` (kept for the
/// backward). Tasks are (sequence, head); each runs its sequence in blocks of [`QB`] query rows:
/// the scores of a block against its keys (from the first key its first row sees, through its
/// last row: all earlier keys, or the sliding window of [`AttnShape`]) are one product,
/// then a row-wise softmax (masked above the diagonal; sum in f64), then one product with V.
/// Blocks start at the sequence's first row, so a row's result depends only on its sequence.
/// Memory: `QB × len` scores per task (linear in sequence length).
pub fn attention(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    seqs: &Seqs,
    sh: AttnShape,
    out: &mut Mat,
    lse: &mut [f32],
) {
    attention_skipping(q, k, v, seqs, sh, out, lse, &vec![0; seqs.len.len()]);
}

/// [`attention`] whose output is not needed for the first `skip[s]` rows of sequence `s` (rows
/// another sequence computes: prompt sharing): whole blocks of them are skipped and left as
/// they are; every other row gets exactly the bits [`attention`] gives it (blocks still start at
/// the sequence's first row).
#[allow(clippy::too_many_arguments)]
pub fn attention_skipping(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    seqs: &Seqs,
    sh: AttnShape,
    out: &mut Mat,
    lse: &mut [f32],
    skip: &[usize],
) {
    let AttnShape {
        n_head,
        n_head_kv,
        hd,
        scale,
        ..
    } = sh;
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let op = SendPtr(out.data.as_mut_ptr());
    let lp = SendPtr(lse.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..seqs.len.len())
        .flat_map(|s| (0..n_head).map(move |h| (s, h)))
        .collect();
    tasks.par_iter().for_each(|&(s, h)| {
        let (s0, len) = (seqs.start[s], seqs.len[s]);
        if len == 0 {
            return;
        }
        let g = h / (n_head / n_head_kv);
        let kt = head_t(k, s0, len, g, hd);
        let mut sc = vec![0f32; QB * len];
        let mut o = vec![0f32; QB * hd];
        for i0 in (0..len).step_by(QB) {
            // Keys j0..i1: from the first key the block's first row sees to its last row.
            let (b, i1, j0) = (QB.min(len - i0), (i0 + QB).min(len), sh.first_key(i0));
            if i1 <= skip[s] {
                continue;
            }
            let nk = i1 - j0;
            // SAFETY: shapes and strides address q's rows s0+i0.., kt and sc as sized above.
            unsafe {
                sgemm(
                    b,
                    nk,
                    hd,
                    sc.as_mut_ptr(),
                    nk,
                    false,
                    q.data.as_ptr().add((s0 + i0) * qw + h * hd),
                    qw,
                    1,
                    kt.as_ptr().add(j0),
                    len,
                    1,
                    scale,
                );
            }
            let mut stats = [(0f32, 0f64); QB];
            for r in 0..b {
                let row = &mut sc[r * nk..(r + 1) * nk];
                // Row r sees keys lo..=i0+r, at columns lo−j0..n.
                let (lo, n) = (sh.first_key(i0 + r) - j0, i0 + r + 1 - j0);
                let m = row[lo..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0f64;
                for x in &mut row[lo..n] {
                    *x = (*x - m).exp();
                    l += *x as f64;
                }
                row[..lo].iter_mut().for_each(|x| *x = 0.0);
                row[n..].iter_mut().for_each(|x| *x = 0.0);
                stats[r] = (m, l);
            }
            // SAFETY: as above, with v's rows s0+j0..s0+i1 and o [b, hd].
            unsafe {
                sgemm(
                    b,
                    hd,
                    nk,
                    o.as_mut_ptr(),
                    hd,
                    false,
                    sc.as_ptr(),
                    nk,
                    1,
                    v.data.as_ptr().add((s0 + j0) * kw + g * hd),
                    kw,
                    1,
                    1.0,
                );
            }
            for (r, &(m, l)) in stats.iter().enumerate().take(b) {
                let row = s0 + i0 + r;
                let inv = (1.0 / l) as f32;
                // SAFETY: (row, head h) is written by this task only.
                unsafe {
                    let dst = op.get().add(row * qw + h * hd);
                    for (d, &x) in o[r * hd..(r + 1) * hd].iter().enumerate() {
                        *dst.add(d) = x * inv;
                    }
                    *lp.get().add(row * n_head + h) = m + (l.ln() as f32);
                }
            }
        }
    });
}

/// Backward of [`attention`] (see `model::reference::attention_back`): probabilities are
/// recomputed from `lse`, block by block as in the forward. Tasks are (sequence, KV head): each
/// owns dk, dv of its KV head (accumulated over its query heads and blocks in order) and dq of
/// the query heads that read it. Per block of query rows `i0..i0+b` against its keys `j0..i1` (see [`attention`]):
///
/// ```text
/// P  = exp(scale·Q·Kᵀ − lse)        (0 above the diagonal)
/// dP = dO·Vᵀ,   dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale
/// dQ = dS·K,    dK += dSᵀ·Q,        dV += Pᵀ·dO
/// ```
/// dq, dk, dv are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_back(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    out: &Mat,
    lse: &[f32],
    dout: &Mat,
    seqs: &Seqs,
    sh: AttnShape,
    dq: &mut Mat,
    dk: &mut Mat,
    dv: &mut Mat,
) {
    let AttnShape {
        n_head,
        n_head_kv,
        hd,
        scale,
        ..
    } = sh;
    let (qw, kw) = (n_head * hd, n_head_kv * hd);
    let group = n_head / n_head_kv;
    dq.data.iter_mut().for_each(|x| *x = 0.0);
    dk.data.iter_mut().for_each(|x| *x = 0.0);
    dv.data.iter_mut().for_each(|x| *x = 0.0);
    let (dqp, dkp, dvp) = (
        SendPtr(dq.data.as_mut_ptr()),
        SendPtr(dk.data.as_mut_ptr()),
        SendPtr(dv.data.as_mut_ptr()),
    );
    let tasks: Vec<(usize, usize)> = (0..seqs.len.len())
        .flat_map(|s| (0..n_head_kv).map(move |g| (s, g)))
        .collect();
    tasks.par_iter().for_each(|&(s, g)| {
        let (s0, len) = (seqs.start[s], seqs.len[s]);
        if len == 0 {
            return;
        }
        let (kt, vt) = (head_t(k, s0, len, g, hd), head_t(v, s0, len, g, hd));
        let mut p = vec![0f32; QB * len];
        let mut dp = vec![0f32; QB * len];
        for h in g * group..(g + 1) * group {
            for i0 in (0..len).step_by(QB) {
                let (b, i1, j0) = (QB.min(len - i0), (i0 + QB).min(len), sh.first_key(i0));
                let nk = i1 - j0;
                let (qb, dob) = (
                    q.data[(s0 + i0) * qw..].as_ptr(),
                    dout.data[(s0 + i0) * qw..].as_ptr(),
                );
                // SAFETY (every product below): pointers and strides address the rows of this
                // sequence and the buffers sized above; dq/dk/dv slices belong to this task.
                unsafe {
                    sgemm(
                        b,
                        nk,
                        hd,
                        p.as_mut_ptr(),
                        nk,
                        false,
                        qb.add(h * hd),
                        qw,
                        1,
                        kt.as_ptr().add(j0),
                        len,
                        1,
                        scale,
                    );
                    sgemm(
                        b,
                        nk,
                        hd,
                        dp.as_mut_ptr(),
                        nk,
                        false,
                        dob.add(h * hd),
                        qw,
                        1,
                        vt.as_ptr().add(j0),
                        len,
                        1,
                        1.0,
                    );
                }
                for r in 0..b {
                    let row = s0 + i0 + r;
                    let (lo, n) = (sh.first_key(i0 + r) - j0, i0 + r + 1 - j0);
                    let li = lse[row * n_head + h];
                    let di = dot(
                        &dout.row(row)[h * hd..(h + 1) * hd],
                        &out.row(row)[h * hd..(h + 1) * hd],
                    );
                    let (pr, dr) = (&mut p[r * nk..(r + 1) * nk], &mut dp[r * nk..(r + 1) * nk]);
                    for j in lo..n {
                        pr[j] = (pr[j] - li).exp();
                        dr[j] = pr[j] * (dr[j] - di) * scale;
                    }
                    for buf in [pr, dr] {
                        buf[..lo].iter_mut().for_each(|x| *x = 0.0);
                        buf[n..].iter_mut().for_each(|x| *x = 0.0);
                    }
                }
                let (pt, dst) = (
                    transpose(&p[..b * nk], b, nk),
                    transpose(&dp[..b * nk], b, nk),
                );
                unsafe {
                    sgemm(
                        b,
                        hd,
                        nk,
                        dqp.get().add((s0 + i0) * qw + h * hd),
                        qw,
                        false,
                        dp.as_ptr(),
                        nk,
                        1,
                        k.data.as_ptr().add((s0 + j0) * kw + g * hd),
                        kw,
                        1,
                        1.0,
                    );
                    sgemm(
                        nk,
                        hd,
                        b,
                        dkp.get().add((s0 + j0) * kw + g * hd),
                        kw,
                        true,
                        dst.as_ptr(),
                        b,
                        1,
                        qb.add(h * hd),
                        qw,
                        1,
                        1.0,
                    );
                    sgemm(
                        nk,
                        hd,
                        b,
                        dvp.get().add((s0 + j0) * kw + g * hd),
                        kw,
                        true,
                        pt.as_ptr(),
                        b,
                        1,
                        dob.add(h * hd),
                        qw,
                        1,
                        1.0,
                    );
                }
            }
        }
    });
}
