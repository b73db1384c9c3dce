//! Backward of causal GQA attention (`kernels/attention_back_delta.wgsl`,
//! `kernels/attention_back.wgsl`; the derivatives are written at the top of the latter).
//!
//! Three dispatch families, all deterministic (every output element is summed by one invocation
//! in a fixed order, no atomics), none storing an `[L, L]` matrix: probabilities are recomputed
//! from the forward's per-row log-sum-exp.
//! 1. `D = rowsum(dO ⊙ O)` per (row, head), packed with lse into `lsed` `[T, n_head, 2]`;
//! 2. `dq`, one workgroup per (block of query rows, head), streaming tiles of keys in order;
//! 3. `dk`, `dv`, one workgroup per (block of key rows, KV head), streaming tiles of queries
//!    (the group's heads, then queries in order).
//!
//! Passes 2 and 3 come in two forms ([`AttnBackKernel`]), chosen per adapter: on GPUs
//! `kernels/attention_back.wgsl`, tiled (FlashAttention-2-style backward: the block's own rows
//! and each streamed tile sit in workgroup memory, ≤ 16 KiB by [`attention_back_tiles`], shared by
//! the workgroup's 32 invocations); on CPU adapters (lavapipe) `kernels/attention_back_rows.wgsl`,
//! one invocation per row with its row in registers, which is faster there (workgroup memory is
//! no faster than a cached load on a CPU, and the tiles' copies and barriers cost). In both, each
//! output element is summed by one invocation in a fixed order.

use super::attention::{AttentionParams, AttnShape, dispatch_attention};
use super::check::need_words;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/attention_back_delta.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnDeltaParams {
    /// Rows × heads (T · n_head).
    pub n: u32,
    /// head_dim / 4.
    pub hd4: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Params of `kernels/attention_back.wgsl` and `attention_back_rows.wgsl`: the forward's.
pub type AttnBackParams = AttentionParams;

/// GPU (f32, recomputed probabilities from an f32 lse) vs the f64 reference, O(1) inputs,
/// L ≲ 64: gradients are sums of ≤ L·group terms of size O(1).
pub const ATTENTION_BACK_TOL: Tol = Tol::new(2e-5, 5e-5);

/// Multiply-adds one dispatch may do (as in the forward): short dispatches on any GPU.
const MACS_PER_DISPATCH: usize = 1 << 27;

/// Workgroup memory the tiled kernel may use: WebGPU's default
/// `maxComputeWorkgroupStorageSize`, so the same tiles (and the same bits) on every adapter.
pub const ATTENTION_BACK_WG_BYTES: usize = 16 << 10;

/// Workgroup memory (bytes) of `kernels/attention_back.wgsl` with `na` own rows, `nb` streamed
/// rows and `head_dim`: four tiles of padded rows (head_dim + 4 floats), (lse, D) per query row
/// of a tile, and the P and dS tiles.
pub fn attention_back_wg_bytes(head_dim: usize, na: usize, nb: usize) -> usize {
    let row = (head_dim / 4 + 1) * 16;
    2 * (na + nb) * row + 8 * na.max(nb) + 8 * na * nb
}

/// Tile sizes `(own rows, streamed rows)` of the tiled backward for `head_dim`: the largest of a
/// fixed list whose workgroup memory fits [`ATTENTION_BACK_WG_BYTES`] (8 × 16 at head_dim 64,
/// 2 × 1 at head_dim 512). Of two tiles of one size, fewer own rows is preferred: twice the
/// workgroups and half the streamed tiles per workgroup (the longest workgroup, the first key
/// block of the dk/dv pass, bounds a dispatch on a GPU with few sequences).
pub fn attention_back_tiles(head_dim: usize) -> (usize, usize) {
    const CANDIDATES: [(usize, usize); 9] = [
        (16, 16),
        (8, 16),
        (8, 8),
        (8, 4),
        (4, 4),
        (4, 2),
        (2, 2),
        (2, 1),
        (1, 1),
    ];
    CANDIDATES
        .into_iter()
        .find(|&(na, nb)| attention_back_wg_bytes(head_dim, na, nb) <= ATTENTION_BACK_WG_BYTES)
        .unwrap_or((1, 1))
}

/// Invocations per workgroup of `kernels/attention_back.wgsl`.
const WORKGROUP: usize = 32;

/// Pairs `(own rows, streamed rows)` each invocation computes in the pair step, so the
/// `WORKGROUP` invocations cover the `na × nb` tile (all four are powers of two).
fn pair_blocking(na: usize, nb: usize) -> (usize, usize) {
    match (na * nb).div_ceil(WORKGROUP) {
        0 | 1 => (1, 1),
        2 => (2, 1),
        4 => (2, 2),
        _ => (4, 2),
    }
}

/// Which form of the dq and dk/dv passes to record (both exact to [`ATTENTION_BACK_TOL`],
/// deterministic, and independent of the dispatch split; they may differ from each other in
/// the last bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnBackKernel {
    /// `kernels/attention_back_rows.wgsl`: one invocation per (row, head), rows in registers.
    Rows,
    /// `kernels/attention_back.wgsl`: blocks of rows per workgroup, tiles in workgroup memory.
    Tiled,
}

impl AttnBackKernel {
    /// The faster form on `gpu`: [`AttnBackKernel::Rows`] on CPU adapters (lavapipe on 2
    /// shared cores: 1.5–1.7 s vs 1.7–1.8 s tiled at SmolLM2's 8 × 256 tokens,
    /// `benches/backward.rs`), else [`AttnBackKernel::Tiled`]. `BFPO_ATTN_BACK=rows` or `=tiled` overrides the choice (to
    /// compare the two on one adapter; other values are ignored).
    pub fn for_gpu(gpu: &Gpu) -> AttnBackKernel {
        use AttnBackKernel::{Rows, Tiled};
        gpu.pick(
            "BFPO_ATTN_BACK",
            &[("rows", Rows), ("tiled", Tiled)],
            Rows,
            Tiled,
        )
    }
}

/// Records the attention backward. Inputs: q `[T, n_head, hd]` and k, v `[T, n_head_kv, hd]`
/// (what the forward read, after rope), o `[T, n_head, hd]` and lse `[T, n_head]` (what it
/// wrote), dout `[T, n_head, hd]`, lens `[B]` u32. Scratch: lsed `[T, n_head, 2]`. Outputs
/// (overwritten): dq `[T, n_head, hd]`, dk, dv `[T, n_head_kv, hd]`. All f32 except lens.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
    dout: &GpuBuf,
    lens: &GpuBuf,
    lsed: &GpuBuf,
    dq: &GpuBuf,
    dk: &GpuBuf,
    dv: &GpuBuf,
) -> Result<(), GpuError> {
    attention_backward_split(
        gpu,
        rec,
        shape,
        q,
        k,
        v,
        o,
        lse,
        dout,
        lens,
        lsed,
        dq,
        dk,
        dv,
        usize::MAX,
    )
}

/// [`attention_backward`] with at most `rows_per_dispatch` rows per dq / dk-dv dispatch (see
/// [`attention_backward_with`]), in the form [`AttnBackKernel::for_gpu`] picks.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_split(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
    dout: &GpuBuf,
    lens: &GpuBuf,
    lsed: &GpuBuf,
    dq: &GpuBuf,
    dk: &GpuBuf,
    dv: &GpuBuf,
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    let kernel = AttnBackKernel::for_gpu(gpu);
    attention_backward_with(
        gpu,
        rec,
        shape,
        q,
        k,
        v,
        o,
        lse,
        dout,
        lens,
        lsed,
        dq,
        dk,
        dv,
        kernel,
        rows_per_dispatch,
    )
}

/// [`attention_backward`] in the form `kernel`, with at most `rows_per_dispatch` rows per dq /
/// dk-dv dispatch (tiled: rounded down to whole blocks of [`attention_back_tiles`]`.0` rows, at
/// least one block); a dispatch also stops at `MACS_PER_DISPATCH` multiply-adds (tiled: of
/// causal work). The results do not depend on the split.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
    dout: &GpuBuf,
    lens: &GpuBuf,
    lsed: &GpuBuf,
    dq: &GpuBuf,
    dk: &GpuBuf,
    dv: &GpuBuf,
    kernel: AttnBackKernel,
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    shape.validate("attention backward")?;
    let t = shape.n_rows();
    if t == 0 || shape.n_head == 0 {
        return Ok(());
    }
    let (nh, nkv, hd) = (shape.n_head, shape.n_head_kv, shape.head_dim);
    let s = format!(
        "attention backward B {} × L {}, {nh} heads / {nkv} KV heads of {hd}",
        shape.n_seq, shape.seq_len
    );
    let op = "attention backward";
    need_words(op, q, t * nh * hd, &s)?;
    need_words(op, k, t * nkv * hd, &s)?;
    need_words(op, v, t * nkv * hd, &s)?;
    need_words(op, o, t * nh * hd, &s)?;
    need_words(op, lse, t * nh, &s)?;
    need_words(op, dout, t * nh * hd, &s)?;
    need_words(op, lens, shape.n_seq, &s)?;
    need_words(op, lsed, t * nh * 2, &s)?;
    need_words(op, dq, t * nh * hd, &s)?;
    need_words(op, dk, t * nkv * hd, &s)?;
    need_words(op, dv, t * nkv * hd, &s)?;

    let pd = gpu.pipeline(&kernel_source!("attention_back_delta"), "main", &[])?;
    let n = t * nh;
    rec.dispatch(
        &pd,
        &[
            Bind::Whole(o),
            Bind::Whole(dout),
            Bind::Whole(lse),
            Bind::Whole(lsed),
        ],
        &AttnDeltaParams {
            n: n as u32,
            hd4: (hd / 4) as u32,
            _pad0: 0,
            _pad1: 0,
        },
        groups((n as u32).div_ceil(256)),
    )?;

    if kernel == AttnBackKernel::Rows {
        return record_rows(
            gpu,
            rec,
            shape,
            [q, k, v, dout, lsed, lens, dq, dk, dv],
            rows_per_dispatch,
        );
    }
    let (na, nb) = attention_back_tiles(hd);
    let (pa, pb) = pair_blocking(na, nb);
    let hd4 = hd / 4;
    let l = shape.seq_len;
    let nblk = l.div_ceil(na);
    let max_blocks = (rows_per_dispatch / na).max(1);
    let subs = [
        ("HD4", hd4.to_string()),
        ("NA", na.to_string()),
        ("NB", nb.to_string()),
        ("PA", pa.to_string()),
        ("PB", pb.to_string()),
    ];
    for pass in 0..2u32 {
        let mut c = subs.to_vec();
        c.push(("PASS", pass.to_string()));
        let p = gpu.pipeline(&kernel_source!("attention_back"), "main", &c)?;
        let (out_a, out_b, heads) = if pass == 0 {
            (dq, dk, nh)
        } else {
            (dk, dv, nkv)
        };
        // Causal multiply-adds of one block (all heads): pairs × (q·k, dO·v, and one or two
        // accumulations) ≤ 4·hd per pair.
        let block_macs = |blk: usize| -> usize {
            let r0 = (blk / shape.n_seq) * na;
            let partners = if pass == 0 { (r0 + na).min(l) } else { l - r0 };
            nh * na * partners * hd * 4
        };
        let total = shape.n_seq * nblk;
        let mut start = 0;
        while start < total {
            let mut end = start + 1;
            let mut macs = block_macs(start);
            while end < total && end - start < max_blocks {
                let m = block_macs(end);
                if macs + m > MACS_PER_DISPATCH {
                    break;
                }
                macs += m;
                end += 1;
            }
            let blocks = end - start;
            let bufs = [q, k, v, dout, lsed, lens, out_a, out_b];
            let g = groups((blocks * heads) as u32);
            dispatch_attention(rec, &p, shape, &bufs, start, blocks, g)?;
            start = end;
        }
    }
    Ok(())
}

/// The dq and dk/dv passes of `kernels/attention_back_rows.wgsl`; `bufs`: q, k, v, dout, lsed,
/// lens, dq, dk, dv (checked by the caller).
fn record_rows(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    bufs: [&GpuBuf; 9],
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    let [q, k, v, dout, lsed, lens, dq, dk, dv] = bufs;
    let t = shape.n_rows();
    let (nh, nkv, hd) = (shape.n_head, shape.n_head_kv, shape.head_dim);
    let per_row = (nh * shape.seq_len * hd * 4).max(1);
    let step = rows_per_dispatch.min(MACS_PER_DISPATCH / per_row).max(1);
    let hd4 = (hd / 4).to_string();
    for pass in 0..2u32 {
        let p = gpu.pipeline(
            &kernel_source!("attention_back_rows"),
            "main",
            &[("HD4", hd4.clone()), ("PASS", pass.to_string())],
        )?;
        let (out_a, out_b, heads) = if pass == 0 {
            (dq, dk, nh)
        } else {
            (dk, dv, nkv)
        };
        let mut start = 0;
        while start < t {
            let rows = step.min(t - start);
            let bufs = [q, k, v, dout, lsed, lens, out_a, out_b];
            let g = groups(((rows * heads) as u32).div_ceil(64));
            dispatch_attention(rec, &p, shape, &bufs, start, rows, g)?;
            start += rows;
        }
    }
    Ok(())
}

/// CPU reference over a padded batch, built on the per-sequence
/// [`crate::model::reference::attention_back_opts`] (f64, with the shape's scale and window):
/// returns `(dq, dk, dv)`; padding rows get 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_ref(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    lens: &[u32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (nh, nkv, hd, l) = (shape.n_head, shape.n_head_kv, shape.head_dim, shape.seq_len);
    let (qw, kw) = (nh * hd, nkv * hd);
    let t_all = shape.n_rows();
    let mut dq = vec![0.0f32; t_all * qw];
    let mut dk = vec![0.0f32; t_all * kw];
    let mut dv = vec![0.0f32; t_all * kw];
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    for (b, &len) in lens.iter().enumerate().take(shape.n_seq) {
        let n = (len as usize).min(l);
        if n == 0 {
            continue;
        }
        let r0 = b * l;
        let opts = crate::model::reference::AttnOpts {
            scale: shape.scale as f64,
            window: (shape.window != 0).then_some(shape.window),
        };
        let (gq, gk, gv) = crate::model::reference::attention_back_opts(
            &wide(&q[r0 * qw..(r0 + n) * qw]),
            &wide(&k[r0 * kw..(r0 + n) * kw]),
            &wide(&v[r0 * kw..(r0 + n) * kw]),
            &wide(&dout[r0 * qw..(r0 + n) * qw]),
            nh,
            nkv,
            hd,
            opts,
        );
        for (d, s) in dq[r0 * qw..(r0 + n) * qw].iter_mut().zip(&gq) {
            *d = *s as f32;
        }
        for (d, s) in dk[r0 * kw..(r0 + n) * kw].iter_mut().zip(&gk) {
            *d = *s as f32;
        }
        for (d, s) in dv[r0 * kw..(r0 + n) * kw].iter_mut().zip(&gv) {
            *d = *s as f32;
        }
    }
    (dq, dk, dv)
}
