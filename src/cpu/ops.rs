//! Row-wise ops of the CPU engine (f32; reductions in f64 or in a fixed order): RMSNorm, RoPE,
//! SwiGLU, GeGLU, causal GQA attention (optionally within a sliding window) (flash-style: only a per-row log-sum-exp is kept, probabilities
//! are recomputed in the backward, memory linear in sequence length), each forward with its
//! backward. The derivatives are those of `model::reference` (documented there), which the tests
//! compare against. Every op is independent per row (attention: per query row over its keys in
//! position order), so results do not depend on batch composition or thread count.

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

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
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
    /// The first key position query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w.max(1)),
            None => 0,
        }
    }
}

/// Causal GQA attention over packed sequences: q `[R, n_head·hd]`, k, v `[R, n_head_kv·hd]` →
/// out `[R, n_head·hd]` and the log-sum-exp of every (row, head) `[R·n_head]` (kept for the
/// backward). Tasks are (sequence, head).
pub fn attention(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    seqs: &Seqs,
    sh: AttnShape,
    out: &mut Mat,
    lse: &mut [f32],
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
        let g = h / (n_head / n_head_kv);
        let mut p = vec![0f32; len];
        let mut o = vec![0f32; hd];
        for i in 0..len {
            let qi = &q.row(s0 + i)[h * hd..(h + 1) * hd];
            let lo = sh.first_key(i);
            let mut m = f32::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate().take(i + 1).skip(lo) {
                let kj = &k.row(s0 + j)[g * hd..(g + 1) * hd];
                *pj = dot(qi, kj) * scale;
                m = m.max(*pj);
            }
            let mut l = 0f64;
            for pj in p.iter_mut().take(i + 1).skip(lo) {
                *pj = (*pj - m).exp();
                l += *pj as f64;
            }
            o.iter_mut().for_each(|x| *x = 0.0);
            for (j, &pj) in p.iter().enumerate().take(i + 1).skip(lo) {
                axpy(&mut o, pj, &v.row(s0 + j)[g * hd..(g + 1) * hd]);
            }
            let inv = (1.0 / l) as f32;
            // SAFETY: (row s0+i, head h) is written by this task only.
            unsafe {
                let dst = op.get().add((s0 + i) * qw + h * hd);
                for (d, &x) in o.iter().enumerate() {
                    *dst.add(d) = x * inv;
                }
                *lp.get().add((s0 + i) * n_head + h) = m + (l.ln() as f32);
            }
        }
        let _ = kw;
    });
}

/// Backward of [`attention`] (see `model::reference::attention_back`): probabilities are
/// recomputed from `lse`. Tasks are (sequence, KV head): each owns dk, dv of its KV head and dq
/// of the query heads that read it. dq, dk, dv are overwritten.
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
        // This task's slices of dk/dv (KV head g of sequence s) and dq (heads of group g).
        let slice = |p: SendPtr, row: usize, w: usize, c: usize| unsafe {
            std::slice::from_raw_parts_mut(p.get().add(row * w + c * hd), hd)
        };
        for h in g * group..(g + 1) * group {
            for i in 0..len {
                let row = s0 + i;
                let qi = &q.row(row)[h * hd..(h + 1) * hd];
                let doi = &dout.row(row)[h * hd..(h + 1) * hd];
                let oi = &out.row(row)[h * hd..(h + 1) * hd];
                let li = lse[row * n_head + h];
                let di = dot(doi, oi);
                let dqi = slice(dqp, row, qw, h);
                for j in sh.first_key(i)..=i {
                    let kj = &k.row(s0 + j)[g * hd..(g + 1) * hd];
                    let vj = &v.row(s0 + j)[g * hd..(g + 1) * hd];
                    let pij = (dot(qi, kj) * scale - li).exp();
                    let dp = dot(doi, vj);
                    axpy(slice(dvp, s0 + j, kw, g), pij, doi);
                    let ds = pij * (dp - di) * scale;
                    axpy(dqi, ds, kj);
                    axpy(slice(dkp, s0 + j, kw, g), ds, qi);
                }
            }
        }
    });
}
