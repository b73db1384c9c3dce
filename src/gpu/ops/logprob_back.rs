//! Backward of the fused LM head + per-token log-prob (`kernels/logprob_back.wgsl`, derivative
//! at its top), and the row scatter that routes the scored rows' gradient back into the
//! `[T, d]` residual stream (`kernels/scatter_rows.wgsl`).
//!
//! [`lm_head_backward`] walks the same vocabulary chunks as the forward: it recomputes the
//! logits chunk `x·W[chunk]ᵀ` (unless the forward kept every chunk, `LmHeadScratch::kept`),
//! turns it in place into `dlogits = w_n·(onehot − exp(z − lse))`
//! from the forward's log-sum-exp, and adds `dlogits·W[chunk]` into `dx`. Memory: the forward's
//! `[N, chunk]` scratch; never `[N × V]`. Deterministic: fixed chunk order, no atomics.

use super::check::{bad_shape, need_words};
use super::logprob::LmHeadScratch;
use super::matmul::{GpuWeight, matmul_rows, matmul_rows_back_input};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;
use std::ops::Range;

/// Params of `kernels/logprob_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LogprobBackParams {
    /// Rows N.
    pub n_rows: u32,
    /// Columns in this chunk.
    pub n_cols: u32,
    /// Vocabulary index of chunk column 0.
    pub col_start: u32,
    /// 1: add `bias[col_start + c]`.
    pub has_bias: u32,
}

/// Params of `kernels/scatter_rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ScatterParams {
    /// Rows N of the source.
    pub n_rows: u32,
    /// Elements per row.
    pub dim: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// `dlogits` from an f32 lse and f32 logits vs f64: `|w|·exp(z − lse)·(|z| + |lse|)·1e-7`.
pub const LOGPROB_BACK_TOL: Tol = Tol::new(1e-6, 2e-5);

/// Records, in place on `logits` `[n_rows, cols.len()]`: `logits ← roww[n]·(onehot(targets[n])
/// − exp(logits + bias − lse[n]))`. bias: `[V]` or `None`; targets `[n_rows]` u32; lse, roww:
/// `[n_rows]` f32.
#[allow(clippy::too_many_arguments)]
pub fn logprob_backward_chunk(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    bias: Option<&GpuBuf>,
    targets: &GpuBuf,
    lse: &GpuBuf,
    roww: &GpuBuf,
    logits: &GpuBuf,
    n_rows: usize,
    cols: Range<usize>,
) -> Result<(), GpuError> {
    if n_rows == 0 {
        return Ok(());
    }
    if cols.is_empty() {
        return Err(bad_shape(
            "logprob backward",
            format!("empty vocabulary chunk {cols:?}"),
        ));
    }
    let shape = format!("logprob backward of {n_rows} rows, vocabulary chunk {cols:?}");
    let op = "logprob backward";
    if let Some(b) = bias {
        need_words(op, b, cols.end, &shape)?;
    }
    need_words(op, targets, n_rows, &shape)?;
    need_words(op, lse, n_rows, &shape)?;
    need_words(op, roww, n_rows, &shape)?;
    need_words(op, logits, n_rows * cols.len(), &shape)?;
    let n = n_rows * cols.len();
    if n > u32::MAX as usize {
        return Err(bad_shape(
            op,
            format!("{n} logits in one chunk exceed 2³² − 1; use a smaller chunk"),
        ));
    }
    let p = gpu.pipeline(&kernel_source!("logprob_back"), "main", &[])?;
    rec.dispatch(
        &p,
        &[
            // A bias binding must exist even when unused; the lse stands in for it.
            Bind::Whole(bias.unwrap_or(lse)),
            Bind::Whole(targets),
            Bind::Whole(lse),
            Bind::Whole(roww),
            Bind::Whole(logits),
        ],
        &LogprobBackParams {
            n_rows: n_rows as u32,
            n_cols: cols.len() as u32,
            col_start: cols.start as u32,
            has_bias: bias.is_some() as u32,
        },
        groups((n as u32).div_ceil(256)),
    )
}

/// Records `dst[rows[n], :] = src[n, :]` for `n < n_rows` (rows distinct; other dst rows are
/// untouched). src: `[n_rows, dim]` f32; rows: `[n_rows]` u32; dst: `[T, dim]` f32.
pub fn scatter_rows(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    src: &GpuBuf,
    rows: &GpuBuf,
    dst: &GpuBuf,
    n_rows: usize,
    dim: usize,
) -> Result<(), GpuError> {
    if n_rows == 0 || dim == 0 {
        return Ok(());
    }
    let shape = format!("scatter of {n_rows} rows of {dim}");
    need_words("scatter_rows", src, n_rows * dim, &shape)?;
    need_words("scatter_rows", rows, n_rows, &shape)?;
    let p = gpu.pipeline(&kernel_source!("scatter_rows"), "main", &[])?;
    rec.dispatch(
        &p,
        &[Bind::Whole(src), Bind::Whole(rows), Bind::Whole(dst)],
        &ScatterParams {
            n_rows: n_rows as u32,
            dim: dim as u32,
            _pad0: 0,
            _pad1: 0,
        },
        groups(((n_rows * dim) as u32).div_ceil(256)),
    )
}

/// Records the LM-head backward: `dx (=) Σ_chunks dlogits_chunk·W[chunk]` with
/// `dlogits = roww[n]·(onehot(targets[n]) − softmax(x·Wᵀ + bias))`, using the forward's `lse`.
/// x: `[n_rows, n_embd]` f32 (the final-normed rows the forward scored); w: the LM head;
/// dx: `[n_rows, n_embd]` f32 (overwritten). `scratch.logits` is clobbered.
///
/// As the forward, the recorder is submitted after every chunk but the last (order is kept), so
/// no single submission runs long on a real GPU; the caller submits the last chunk.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward<'g>(
    gpu: &'g Gpu,
    rec: &mut Recorder<'g>,
    x: &GpuBuf,
    w: &GpuWeight,
    bias: Option<&GpuBuf>,
    targets: &GpuBuf,
    lse: &GpuBuf,
    roww: &GpuBuf,
    scratch: &LmHeadScratch,
    dx: &GpuBuf,
    n_rows: usize,
) -> Result<(), GpuError> {
    if n_rows == 0 {
        return Ok(());
    }
    scratch.check_rows(n_rows, "lm head backward")?;
    let chunks = scratch.chunks(w);
    let n = chunks.len();
    for (i, cols) in chunks.into_iter().enumerate() {
        // Kept by the forward (same kernel, same inputs: the same bits), else recomputed.
        let logits = scratch.chunk_logits(i);
        if scratch.kept.is_empty() {
            matmul_rows(gpu, rec, x, w, cols.clone(), logits, n_rows)?;
        }
        logprob_backward_chunk(
            gpu,
            rec,
            bias,
            targets,
            lse,
            roww,
            logits,
            n_rows,
            cols.clone(),
        )?;
        matmul_rows_back_input(gpu, rec, logits, w, cols, dx, n_rows, i > 0)?;
        if i + 1 < n {
            std::mem::replace(rec, gpu.recorder()).submit();
        }
    }
    Ok(())
}

/// CPU reference of [`lm_head_backward`] in f64 ([`crate::model::reference`]'s
/// `log_softmax_target_back` then `dx = dlogits·W`): w `[V, d]` f32 (dequantized).
pub fn lm_head_backward_ref(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    targets: &[u32],
    roww: &[f32],
    d: usize,
) -> Vec<f32> {
    let n_vocab = w.len() / d;
    let mut dx = vec![0.0f32; x.len()];
    for (n, xr) in x.chunks_exact(d).enumerate() {
        let logits: Vec<f64> = (0..n_vocab)
            .map(|o| {
                let s: f64 = xr
                    .iter()
                    .zip(&w[o * d..(o + 1) * d])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                s + bias.map_or(0.0, |b| b[o] as f64)
            })
            .collect();
        let dl = crate::model::reference::log_softmax_target_back(
            &logits,
            targets[n] as usize,
            roww[n] as f64,
        );
        for i in 0..d {
            let s: f64 = (0..n_vocab).map(|o| dl[o] * w[o * d + i] as f64).sum();
            dx[n * d + i] = s as f32;
        }
    }
    dx
}
