//! LM head fused with the per-token log-prob of the target (`kernels/logprob.wgsl`).
//!
//! The vocabulary is processed in column chunks: `matmul_rows` writes a `[N, chunk]` logits
//! buffer, and the `logprob` kernel merges it into a running (max, sum-exp, target logit) per row.
//! After the last chunk, `lse = max + ln(sum)` and `logp = target logit − lse`. Memory is
//! `N × chunk` floats for the logits plus O(N); never a `[N × V]` matrix.

use super::check::{bad_shape, need_words};
use super::lora::{GpuLoraTensor, lora_head_down, lora_head_up};
use super::matmul::{GpuWeight, matmul_rows};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;
use std::ops::Range;

/// Params of `kernels/logprob.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LogprobParams {
    /// Rows N.
    pub n_rows: u32,
    /// Columns in this chunk (row stride of the logits buffer).
    pub n_cols: u32,
    /// Vocabulary index of chunk column 0.
    pub col_start: u32,
    /// 1: add `bias[col_start + c]`.
    pub has_bias: u32,
    /// 1: initialise the running state from this chunk.
    pub first: u32,
    /// 1: write logp and lse after merging.
    pub last: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// GPU f32 (online, tree-merged) vs the f64 reference, for logits of magnitude ≲ 100 and
/// vocabularies ≲ 10⁴: errors scale with |logit| · 1e-7 and ln(V) · 1e-7.
pub const LOGPROB_TOL: Tol = Tol::new(2e-5, 2e-6);

/// Records the merge of one logits chunk (`logits` `[n_rows, cols.len()]`, vocabulary columns
/// `cols`) into the running `state` `[n_rows, 4]`; `first` initialises it, `last` writes
/// `logp` `[n_rows]` and `lse` `[n_rows]`. targets: `[n_rows]` u32; bias: `[V]` f32 or `None`.
#[allow(clippy::too_many_arguments)]
pub fn logprob_update(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    logits: &GpuBuf,
    bias: Option<&GpuBuf>,
    targets: &GpuBuf,
    state: &GpuBuf,
    logp: &GpuBuf,
    lse: &GpuBuf,
    n_rows: usize,
    cols: Range<usize>,
    first: bool,
    last: bool,
) -> Result<(), GpuError> {
    if n_rows == 0 {
        return Ok(());
    }
    if cols.is_empty() {
        return Err(bad_shape(
            "logprob",
            format!("empty vocabulary chunk {cols:?}"),
        ));
    }
    let shape = format!("logprob of {n_rows} rows, vocabulary chunk {cols:?}");
    need_words("logprob", logits, n_rows * cols.len(), &shape)?;
    if let Some(b) = bias {
        need_words("logprob", b, cols.end, &shape)?;
    }
    need_words("logprob", targets, n_rows, &shape)?;
    need_words("logprob", state, n_rows * 4, &shape)?;
    need_words("logprob", logp, n_rows, &shape)?;
    need_words("logprob", lse, n_rows, &shape)?;
    let p = gpu.pipeline(&kernel_source!("logprob"), "main", &[])?;
    let params = LogprobParams {
        n_rows: n_rows as u32,
        n_cols: cols.len() as u32,
        col_start: cols.start as u32,
        has_bias: bias.is_some() as u32,
        first: first as u32,
        last: last as u32,
        _pad0: 0,
        _pad1: 0,
    };
    rec.dispatch(
        &p,
        &[
            Bind::Whole(logits),
            // A bias binding must exist even when unused; the logits stand in for it.
            Bind::Whole(bias.unwrap_or(logits)),
            Bind::Whole(targets),
            Bind::Whole(state),
            Bind::Whole(logp),
            Bind::Whole(lse),
        ],
        &params,
        groups(n_rows as u32),
    )
}

/// Vocabulary chunks for an LM head of `n_vocab` rows over `n_rows` tokens: at most
/// `max_cols` columns each, never straddling a weight chunk (`weight_chunks` = row starts of
/// each weight chunk, ascending, starting at 0).
pub fn vocab_chunks(n_vocab: usize, max_cols: usize, weight_chunks: &[usize]) -> Vec<Range<usize>> {
    let max_cols = max_cols.max(1);
    let mut bounds: Vec<usize> = weight_chunks
        .iter()
        .copied()
        .filter(|&s| s < n_vocab)
        .collect();
    bounds.push(n_vocab);
    if bounds[0] != 0 {
        bounds.insert(0, 0);
    }
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let mut s = w[0];
        while s < w[1] {
            let e = (s + max_cols).min(w[1]);
            out.push(s..e);
            s = e;
        }
    }
    out
}

/// Scratch for [`lm_head_logprobs`]: the logits chunk and the running state.
#[derive(Clone, Debug)]
pub struct LmHeadScratch {
    /// `[max_rows, max_cols]` f32.
    pub logits: GpuBuf,
    /// When not empty, one `[max_rows, cols]` buffer per vocabulary chunk ([`Self::chunks`]):
    /// the forward writes each chunk's logits to its own buffer and keeps them, so the backward
    /// ([`super::logprob_back::lm_head_backward`]) need not recompute them.
    pub kept: Vec<GpuBuf>,
    /// `[max_rows, 4]` f32.
    pub state: GpuBuf,
    pub max_rows: usize,
    pub max_cols: usize,
}

impl LmHeadScratch {
    /// The vocabulary chunks of `w` this scratch processes, in order: at most `max_cols` wide and
    /// never straddling a weight chunk. The forward and the backward both use this.
    pub fn chunks(&self, w: &GpuWeight) -> Vec<Range<usize>> {
        let starts: Vec<usize> = w.chunks.iter().map(|c| c.row_start).collect();
        vocab_chunks(w.n_out, self.max_cols, &starts)
    }

    /// Errors (naming `op`) when `n_rows` exceeds what the scratch holds.
    pub fn check_rows(&self, n_rows: usize, op: &str) -> Result<(), GpuError> {
        if n_rows > self.max_rows {
            return Err(bad_shape(
                op,
                format!("{n_rows} rows but the scratch holds {} rows", self.max_rows),
            ));
        }
        Ok(())
    }

    /// Allocates scratch for up to `max_rows` rows, with the chunk width chosen so the logits
    /// buffer stays ≤ `budget_bytes` and ≤ the device's binding limit.
    pub fn new(
        gpu: &Gpu,
        max_rows: usize,
        n_vocab: usize,
        budget_bytes: u64,
    ) -> Result<LmHeadScratch, GpuError> {
        let max_rows = max_rows.max(1);
        let cap = budget_bytes.min(gpu.max_binding()) / (4 * max_rows as u64);
        let max_cols = (cap as usize).clamp(1, n_vocab.max(1));
        Ok(LmHeadScratch {
            logits: gpu.alloc("lm-head logits chunk", (max_rows * max_cols * 4) as u64)?,
            kept: Vec::new(),
            state: gpu.alloc("lm-head state", (max_rows * 16) as u64)?,
            max_rows,
            max_cols,
        })
    }

    /// Bytes of keeping every chunk's logits for `w` ([`Self::keep_logits`]).
    pub fn kept_logits_bytes(&self, w: &GpuWeight) -> u64 {
        self.chunks(w)
            .iter()
            .map(|c| (self.max_rows * c.len() * 4) as u64)
            .sum()
    }

    /// Allocates one buffer per vocabulary chunk of `w` so that the forward keeps the logits
    /// for the backward (see [`Self::kept`]).
    pub fn keep_logits(&mut self, gpu: &Gpu, w: &GpuWeight) -> Result<(), GpuError> {
        self.kept = self
            .chunks(w)
            .iter()
            .map(|c| gpu.alloc("kept lm-head logits", (self.max_rows * c.len() * 4) as u64))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// The buffer chunk `i`'s logits go to: its kept buffer, else the shared chunk buffer.
    pub fn chunk_logits(&self, i: usize) -> &GpuBuf {
        self.kept.get(i).unwrap_or(&self.logits)
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.logits.size + self.state.size + self.kept.iter().map(|b| b.size).sum::<u64>()
    }
}

/// A LoRA on the LM head for [`lm_head_logprobs`]: the adapter tensor, its rank and scale, and
/// scratch `u` of ≥ `[n_rows, rank]` f32.
#[derive(Clone, Copy, Debug)]
pub struct HeadLora<'a> {
    pub tensor: &'a GpuLoraTensor,
    pub rank: usize,
    pub scale: f32,
    pub u: &'a GpuBuf,
}

/// Records the fused LM head: for every vocabulary chunk, `logits = x·W[chunk]ᵀ` then the
/// running log-softmax merge. x: `[n_rows, n_embd]` f32 (already final-normed); w: the LM
/// head `[n_vocab, n_embd]`; bias: `[n_vocab]` f32 or `None`; targets: `[n_rows]` u32.
/// Writes logp `[n_rows]` and lse `[n_rows]`.
///
/// The recorder is submitted after every chunk but the last (everything recorded before this
/// call goes first, order is kept), so no single submission runs long on a real GPU; the caller
/// submits the last chunk with whatever it records next.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprobs<'g>(
    gpu: &'g Gpu,
    rec: &mut Recorder<'g>,
    x: &GpuBuf,
    w: &GpuWeight,
    bias: Option<&GpuBuf>,
    targets: &GpuBuf,
    scratch: &LmHeadScratch,
    logp: &GpuBuf,
    lse: &GpuBuf,
    n_rows: usize,
) -> Result<(), GpuError> {
    lm_head_logprobs_lora(
        gpu, rec, x, w, bias, None, targets, scratch, logp, lse, n_rows,
    )
}

/// [`lm_head_logprobs`] with a LoRA on `output.weight`: `logits += s·B[chunk]·(A·x)`, with
/// `u = A·x` once and then per chunk (see [`lora_head_down`], [`lora_head_up`]).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprobs_lora<'g>(
    gpu: &'g Gpu,
    rec: &mut Recorder<'g>,
    x: &GpuBuf,
    w: &GpuWeight,
    bias: Option<&GpuBuf>,
    lora: Option<HeadLora<'_>>,
    targets: &GpuBuf,
    scratch: &LmHeadScratch,
    logp: &GpuBuf,
    lse: &GpuBuf,
    n_rows: usize,
) -> Result<(), GpuError> {
    scratch.check_rows(n_rows, "lm head")?;
    if let Some(l) = &lora {
        lora_head_down(gpu, rec, l.tensor, l.rank, x, l.u, n_rows)?;
    }
    let chunks = scratch.chunks(w);
    let n = chunks.len();
    if lora.is_some() && !scratch.kept.is_empty() {
        return Err(crate::gpu::ops::check::bad_shape(
            "lm head",
            "kept logits with a LoRA on the LM head (the backward has no LM-head LoRA)".into(),
        ));
    }
    for (i, cols) in chunks.into_iter().enumerate() {
        let logits = scratch.chunk_logits(i);
        matmul_rows(gpu, rec, x, w, cols.clone(), logits, n_rows)?;
        if let Some(l) = &lora {
            lora_head_up(
                gpu,
                rec,
                l.tensor,
                l.rank,
                l.scale,
                l.u,
                logits,
                n_rows,
                cols.clone(),
            )?;
        }
        logprob_update(
            gpu,
            rec,
            logits,
            bias,
            targets,
            &scratch.state,
            logp,
            lse,
            n_rows,
            cols,
            i == 0,
            i + 1 == n,
        )?;
        if i + 1 < n {
            std::mem::replace(rec, gpu.recorder()).submit();
        }
    }
    Ok(())
}

/// CPU reference (f64): `logits` `[N, V]`, optional bias `[V]`, targets `[N]` →
/// `(logp [N], lse [N])`.
pub fn logprob_ref(
    logits: &[f32],
    bias: Option<&[f32]>,
    targets: &[u32],
    n_vocab: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut logp = Vec::with_capacity(targets.len());
    let mut lse = Vec::with_capacity(targets.len());
    for (r, &t) in targets.iter().enumerate() {
        let z: Vec<f64> = (0..n_vocab)
            .map(|c| logits[r * n_vocab + c] as f64 + bias.map_or(0.0, |b| b[c] as f64))
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        lse.push(l);
        logp.push(z[t as usize] - l);
    }
    (logp, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<LogprobParams>(), 32);
        assert_eq!(std::mem::align_of::<LogprobParams>(), 4);
    }

    #[test]
    fn vocab_chunks_respect_weight_chunks() {
        assert_eq!(vocab_chunks(10, 4, &[0]), vec![0..4, 4..8, 8..10]);
        assert_eq!(vocab_chunks(10, 4, &[0, 6]), vec![0..4, 4..6, 6..10]);
        assert_eq!(vocab_chunks(3, 100, &[0]), vec![0..3]);
    }

    /// Runs the chunked kernel on CPU-made logits (each chunk uploaded separately).
    fn run(
        gpu: &Gpu,
        logits: &[f32],
        bias: Option<&[f32]>,
        targets: &[u32],
        n_vocab: usize,
        chunk: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = targets.len();
        let tb = gpu.upload("targets", targets).unwrap();
        let bb = bias.map(|b| gpu.upload("bias", b).unwrap());
        let state = gpu.alloc("state", (n * 16) as u64).unwrap();
        let logp = gpu.alloc("logp", (n * 4) as u64).unwrap();
        let lse = gpu.alloc("lse", (n * 4) as u64).unwrap();
        let chunks = vocab_chunks(n_vocab, chunk, &[0]);
        let k = chunks.len();
        for (i, cols) in chunks.into_iter().enumerate() {
            let mut part = Vec::with_capacity(n * cols.len());
            for r in 0..n {
                part.extend_from_slice(&logits[r * n_vocab + cols.start..r * n_vocab + cols.end]);
            }
            let lb = gpu.upload("logits chunk", &part).unwrap();
            let mut rec = gpu.recorder();
            logprob_update(
                gpu,
                &mut rec,
                &lb,
                bb.as_ref(),
                &tb,
                &state,
                &logp,
                &lse,
                n,
                cols,
                i == 0,
                i + 1 == k,
            )
            .unwrap();
            rec.run("logprob test").unwrap();
        }
        (gpu.read(&logp).unwrap(), gpu.read(&lse).unwrap())
    }

    #[test]
    fn logprob_matches_reference_chunked_with_and_without_bias() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(51);
        for (n, v, chunk, with_bias, offset) in [
            (5usize, 1000usize, 333usize, false, 0.0f32),
            (3, 257, 1000, true, 0.0),
            (4, 999, 256, true, 80.0), // large logits: the running max must keep it stable
            (1, 7, 3, false, -50.0),
        ] {
            let logits: Vec<f32> = rng
                .normal_vec(n * v, 3.0)
                .iter()
                .map(|x| x + offset)
                .collect();
            let bias = with_bias.then(|| rng.normal_vec(v, 1.0));
            // Targets at chunk edges and random places.
            let targets: Vec<u32> = (0..n)
                .map(|i| match i {
                    0 => 0,
                    1 => (chunk.min(v) - 1) as u32,
                    2 => (chunk.min(v - 1)) as u32,
                    _ => rng.below(v as u64) as u32,
                })
                .collect();
            let (gl, gs) = run(&gpu, &logits, bias.as_deref(), &targets, v, chunk);
            let (wl, ws) = logprob_ref(&logits, bias.as_deref(), &targets, v);
            let what = format!("logprob N {n} V {v} chunk {chunk} bias {with_bias}");
            assert_close(&format!("{what} logp"), &gl, &wl, LOGPROB_TOL);
            assert_close(&format!("{what} lse"), &gs, &ws, LOGPROB_TOL);
        }
    }

    #[test]
    fn fused_lm_head_matches_reference_over_chunks() {
        // Q8_0 head of 301 rows split into weight chunks of 100 rows, and a logits budget of
        // 7 rows × 64 columns: vocabulary chunks of 64 that also break at every weight chunk.
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(81);
        let (n, d, v) = (7usize, 64usize, 301usize);
        let wf = rng.normal_vec(v * d, 0.3);
        let ty = crate::gguf::GgmlType::Q8_0;
        let bytes = crate::gguf::quant::quantize(ty, &wf).unwrap();
        let wd = crate::gguf::quant::dequantize_vec(ty, &bytes, v * d).unwrap();
        let w = GpuWeight::upload_chunked(&gpu, "head", ty, d, v, &bytes, 100).unwrap();
        let x = rng.normal_vec(n * d, 1.0);
        let bias = rng.normal_vec(v, 0.5);
        let targets: Vec<u32> = vec![0, 99, 100, 300, 63, 64, 200];
        let scratch = LmHeadScratch::new(&gpu, n, v, (n * 64 * 4) as u64).unwrap();
        assert_eq!(scratch.max_cols, 64);
        let xb = gpu.upload("x", &x).unwrap();
        let bb = gpu.upload("bias", &bias).unwrap();
        let tb = gpu.upload("targets", &targets).unwrap();
        let logp = gpu.alloc("logp", (n * 4) as u64).unwrap();
        let lse = gpu.alloc("lse", (n * 4) as u64).unwrap();
        for with_bias in [false, true] {
            let mut rec = gpu.recorder();
            let b = with_bias.then_some(&bb);
            lm_head_logprobs(&gpu, &mut rec, &xb, &w, b, &tb, &scratch, &logp, &lse, n).unwrap();
            rec.run("lm head test").unwrap();
            // Reference logits in f64 from the dequantized weights.
            let logits: Vec<f32> = (0..n)
                .flat_map(|r| {
                    let (x, wd) = (&x, &wd);
                    (0..v).map(move |c| {
                        (0..d)
                            .map(|i| x[r * d + i] as f64 * wd[c * d + i] as f64)
                            .sum::<f64>() as f32
                    })
                })
                .collect();
            let (wl, ws) = logprob_ref(&logits, with_bias.then_some(&bias[..]), &targets, v);
            let what = format!("fused lm head, bias {with_bias}");
            assert_close(&what, &gpu.read::<f32>(&logp).unwrap(), &wl, LOGPROB_TOL);
            assert_close(&what, &gpu.read::<f32>(&lse).unwrap(), &ws, LOGPROB_TOL);
        }
    }

    #[test]
    fn logprob_fixed_case() {
        // Logits (0, ln 3) split into two one-column chunks: target 1 → ln(3/4), lse = ln 4;
        // target 0 → ln(1/4).
        let gpu = crate::gpu::test_device();
        let l3 = 3f32.ln();
        let (lp, ls) = run(&gpu, &[0.0, l3, 0.0, l3], None, &[1, 0], 2, 1);
        assert_close(
            "fixed logp",
            &lp,
            &[0.75f64.ln(), 0.25f64.ln()],
            Tol::new(1e-6, 0.0),
        );
        assert_close(
            "fixed lse",
            &ls,
            &[4f64.ln(), 4f64.ln()],
            Tol::new(1e-6, 0.0),
        );
    }
}
