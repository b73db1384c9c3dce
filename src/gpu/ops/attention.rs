//! Causal grouped-query attention over a padded batch (`kernels/attention.wgsl`), streaming with
//! an online softmax: memory is O(T·heads) (the output and one log-sum-exp per row and head),
//! never an `[L, L]` score matrix.
//!
//! Layout: B sequences padded to L rows (T = B·L); row `t = b·L + i`. Query (b, i) attends keys
//! (b, j ≤ i), and only `i − j < window` with a sliding window (gemma3's local layers); rows
//! `i ≥ lens[b]` produce zeros (and lse 0). Scale `1/√head_dim` by default.

use super::check::{bad_shape, need_words};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of every attention kernel, forward and backward, per-row and tiled
/// (`kernels/attention*.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    /// Sequences B.
    pub n_seq: u32,
    /// Padded length L (rows per sequence).
    pub seq_len: u32,
    /// Query heads.
    pub n_head: u32,
    /// KV heads (divides n_head).
    pub n_head_kv: u32,
    /// First row of this dispatch (tiled: first block; block `kb` of sequence `b` is numbered
    /// `kb · B + b`, so a dispatch holds blocks of similar causal work from every sequence).
    /// Query rows, except in the backward's dk/dv pass: key rows.
    pub row_start: u32,
    /// Rows in this dispatch (tiled: blocks).
    pub n_rows: u32,
    /// Score scale (1/√head_dim unless the model says otherwise).
    pub scale: f32,
    /// 0: causal attention; else query i sees only keys j with `i − j < window` (gemma3's
    /// local layers).
    pub window: u32,
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_seq: usize,
    pub seq_len: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window (0: none), as [`AttentionParams::window`].
    pub window: usize,
}

impl AttnShape {
    /// With the standard scale `1/√head_dim`.
    pub fn new(
        n_seq: usize,
        seq_len: usize,
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
    ) -> AttnShape {
        AttnShape {
            n_seq,
            seq_len,
            n_head,
            n_head_kv,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        }
    }

    /// The same shape with another score scale and a sliding window (`None`: causal only).
    pub fn with_scale_window(self, scale: f32, window: Option<usize>) -> AttnShape {
        AttnShape {
            scale,
            window: window.unwrap_or(0),
            ..self
        }
    }

    /// The first key position query `i` sees.
    pub fn first_key(&self, i: usize) -> usize {
        if self.window == 0 {
            0
        } else {
            (i + 1).saturating_sub(self.window)
        }
    }

    /// Rows T = B·L.
    pub fn n_rows(&self) -> usize {
        self.n_seq * self.seq_len
    }

    /// Checks the shape the kernels support; `op` names the caller in the error.
    pub(crate) fn validate(&self, op: &str) -> Result<(), GpuError> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(4) || self.head_dim > 512 {
            return Err(bad_shape(
                op,
                format!(
                    "head_dim {} is not supported: it must be a multiple of 4 and at most 512",
                    self.head_dim
                ),
            ));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(bad_shape(
                op,
                format!(
                    "n_head {} is not a multiple of n_head_kv {}",
                    self.n_head, self.n_head_kv
                ),
            ));
        }
        Ok(())
    }
}

/// GPU (f32, online softmax) vs the f64 reference for O(1) inputs and L ≲ 300.
pub const ATTENTION_TOL: Tol = Tol::new(5e-6, 1e-5);

/// Multiply-adds one dispatch may do (≈ 0.27 G): keeps each dispatch far below GPU watchdogs.
const MACS_PER_DISPATCH: usize = 1 << 27;

/// Records attention. q, o: `[T, n_head, head_dim]`; k, v: `[T, n_head_kv, head_dim]`;
/// lens: `[B]` u32 (each ≤ L); lse: `[T, n_head]`. All f32 except lens.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    lens: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
) -> Result<(), GpuError> {
    attention_split(gpu, rec, shape, q, k, v, lens, o, lse, usize::MAX)
}

/// Which attention kernel to record (both within [`ATTENTION_TOL`] of the reference,
/// deterministic and independent of the dispatch split; they may differ in the last bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// `kernels/attention.wgsl`: one invocation per (query row, head), its row in registers.
    Rows,
    /// `kernels/attention_tiled.wgsl`: blocks of query rows per workgroup, key / value tiles in
    /// workgroup memory (≤ 16 KiB, [`attention_tiles`]).
    Tiled,
}

impl AttnKernel {
    /// [`AttnKernel::Rows`] on CPU adapters (lavapipe, where workgroup memory is no faster than
    /// a cached load and the tiles' copies and barriers cost), else [`AttnKernel::Tiled`].
    /// `BFPO_ATTN=rows` or `=tiled` overrides the choice (other values are ignored).
    pub fn for_gpu(gpu: &Gpu) -> AttnKernel {
        use AttnKernel::{Rows, Tiled};
        gpu.pick(
            "BFPO_ATTN",
            &[("rows", Rows), ("tiled", Tiled)],
            Rows,
            Tiled,
        )
    }
}

/// Workgroup memory (bytes) of `kernels/attention_tiled.wgsl` with `na` query rows and `nb` key
/// rows per tile: q, k and v tiles of padded rows (head_dim + 4 floats), the score tile and three
/// floats per query row.
pub fn attention_wg_bytes(head_dim: usize, na: usize, nb: usize) -> usize {
    let row = (head_dim / 4 + 1) * 16;
    (na + 2 * nb) * row + 4 * na * nb + 12 * na
}

/// Tile sizes `(query rows, key rows)` of the tiled attention for `head_dim`: the largest of a
/// fixed list within 16 KiB of workgroup memory (WebGPU's default limit).
pub fn attention_tiles(head_dim: usize) -> (usize, usize) {
    const CANDIDATES: [(usize, usize); 9] = [
        (16, 16),
        (16, 8),
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
        .find(|&(na, nb)| attention_wg_bytes(head_dim, na, nb) <= 16 << 10)
        .unwrap_or((1, 1))
}

/// [`attention`] with at most `rows_per_dispatch` query rows per dispatch, in the form
/// [`AttnKernel::for_gpu`] picks.
#[allow(clippy::too_many_arguments)]
pub fn attention_split(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    lens: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    let kernel = AttnKernel::for_gpu(gpu);
    attention_with(
        gpu,
        rec,
        shape,
        q,
        k,
        v,
        lens,
        o,
        lse,
        kernel,
        rows_per_dispatch,
    )
}

/// [`attention`] in the form `kernel` with at most `rows_per_dispatch` query rows per dispatch
/// (tiled: rounded down to whole blocks, at least one; a dispatch also stops at
/// `MACS_PER_DISPATCH` multiply-adds of causal work).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    lens: &GpuBuf,
    o: &GpuBuf,
    lse: &GpuBuf,
    kernel: AttnKernel,
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    shape.validate("attention")?;
    let t = shape.n_rows();
    if t == 0 || shape.n_head == 0 {
        return Ok(());
    }
    let s = format!(
        "attention B {} × L {}, {} heads / {} KV heads of {}",
        shape.n_seq, shape.seq_len, shape.n_head, shape.n_head_kv, shape.head_dim
    );
    need_words("attention", q, t * shape.n_head * shape.head_dim, &s)?;
    need_words("attention", k, t * shape.n_head_kv * shape.head_dim, &s)?;
    need_words("attention", v, t * shape.n_head_kv * shape.head_dim, &s)?;
    need_words("attention", lens, shape.n_seq, &s)?;
    need_words("attention", o, t * shape.n_head * shape.head_dim, &s)?;
    need_words("attention", lse, t * shape.n_head, &s)?;
    if kernel == AttnKernel::Tiled {
        return record_tiled(gpu, rec, shape, [q, k, v, lens, o, lse], rows_per_dispatch);
    }
    let p = gpu.pipeline(
        &kernel_source!("attention"),
        "main",
        &[("HD4", (shape.head_dim / 4).to_string())],
    )?;
    let per_row = (shape.n_head * shape.seq_len * shape.head_dim * 2).max(1);
    let step = rows_per_dispatch.min(MACS_PER_DISPATCH / per_row).max(1);
    let mut start = 0;
    while start < t {
        let n = step.min(t - start);
        let g = groups(((n * shape.n_head) as u32).div_ceil(64));
        dispatch_attention(rec, &p, shape, &[q, k, v, lens, o, lse], start, n, g)?;
        start += n;
    }
    Ok(())
}

/// Records one dispatch of an attention kernel (forward or backward, either form) over `n`
/// rows or blocks from `start`, binding `bufs` whole in order.
pub(super) fn dispatch_attention(
    rec: &mut Recorder<'_>,
    p: &std::sync::Arc<crate::gpu::registry::Pipeline>,
    shape: &AttnShape,
    bufs: &[&GpuBuf],
    start: usize,
    n: usize,
    groups: [u32; 3],
) -> Result<(), GpuError> {
    let params = AttentionParams {
        n_seq: shape.n_seq as u32,
        seq_len: shape.seq_len as u32,
        n_head: shape.n_head as u32,
        n_head_kv: shape.n_head_kv as u32,
        row_start: start as u32,
        n_rows: n as u32,
        scale: shape.scale,
        window: u32::try_from(shape.window).unwrap_or(u32::MAX),
    };
    let binds: Vec<Bind<'_>> = bufs.iter().map(|&b| Bind::Whole(b)).collect();
    rec.dispatch(p, &binds, &params, groups)
}

/// Invocations per workgroup of `kernels/attention_tiled.wgsl`.
const TILED_WORKGROUP: usize = 32;

/// The tiled kernel's dispatches; `bufs`: q, k, v, lens, o, lse (checked by the caller).
fn record_tiled(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    shape: &AttnShape,
    bufs: [&GpuBuf; 6],
    rows_per_dispatch: usize,
) -> Result<(), GpuError> {
    let [q, k, v, lens, o, lse] = bufs;
    let (nh, hd, l) = (shape.n_head, shape.head_dim, shape.seq_len);
    let (na, nb) = attention_tiles(hd);
    let (pa, pb) = match (na * nb).div_ceil(TILED_WORKGROUP) {
        0 | 1 => (1, 1),
        2 => (2, 1),
        4 => (2, 2),
        _ => (4, 2),
    };
    let hd4 = hd / 4;
    let subs = [
        ("HD4", hd4.to_string()),
        ("NA", na.to_string()),
        ("NB", nb.to_string()),
        ("PA", pa.to_string()),
        ("PB", pb.to_string()),
    ];
    let p = gpu.pipeline(&kernel_source!("attention_tiled"), "main", &subs)?;
    let max_blocks = (rows_per_dispatch / na).max(1);
    // Block kb of sequence b is numbered kb·B + b; its causal multiply-adds (all heads).
    let block_macs = |blk: usize| nh * na * ((blk / shape.n_seq) * na + na).min(l) * hd * 2;
    let total = shape.n_seq * l.div_ceil(na);
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
        let g = groups(((end - start) * nh) as u32);
        dispatch_attention(
            rec,
            &p,
            shape,
            &[q, k, v, lens, o, lse],
            start,
            end - start,
            g,
        )?;
        start = end;
    }
    Ok(())
}

/// CPU reference (f64 inside, plain two-pass softmax): returns `(o [T, n_head, hd], lse [T, n_head])`.
pub fn attention_ref(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lens: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let (nh, nkv, hd, l) = (shape.n_head, shape.n_head_kv, shape.head_dim, shape.seq_len);
    let t_all = shape.n_rows();
    let mut o = vec![0.0f32; t_all * nh * hd];
    let mut lse = vec![0.0f32; t_all * nh];
    let group = nh / nkv;
    for b in 0..shape.n_seq {
        for i in 0..(lens[b] as usize).min(l) {
            let t = b * l + i;
            for h in 0..nh {
                let kvh = h / group;
                let qv = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                let j0 = shape.first_key(i);
                let scores: Vec<f64> = (j0..=i)
                    .map(|j| {
                        let kr = ((b * l + j) * nkv + kvh) * hd;
                        shape.scale as f64
                            * qv.iter()
                                .zip(&k[kr..kr + hd])
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for d in 0..hd {
                    let mut acc = 0.0f64;
                    for (j, s) in scores.iter().enumerate() {
                        acc +=
                            (s - m).exp() / z * v[((b * l + j0 + j) * nkv + kvh) * hd + d] as f64;
                    }
                    o[(t * nh + h) * hd + d] = acc as f32;
                }
                lse[t * nh + h] = (m + z.ln()) as f32;
            }
        }
    }
    (o, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<AttentionParams>(), 32);
        assert_eq!(std::mem::align_of::<AttentionParams>(), 4);
    }

    fn run(
        gpu: &Gpu,
        shape: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lens: &[u32],
        rows_per_dispatch: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let t = shape.n_rows();
        let qb = gpu.upload("q", q).unwrap();
        let kb = gpu.upload("k", k).unwrap();
        let vb = gpu.upload("v", v).unwrap();
        let lb = gpu.upload("lens", lens).unwrap();
        // Pre-fill outputs with garbage so "rows ≥ length write zeros" is really checked.
        let ob = gpu
            .upload("o", &vec![7.0f32; t * shape.n_head * shape.head_dim])
            .unwrap();
        let sb = gpu.upload("lse", &vec![7.0f32; t * shape.n_head]).unwrap();
        let mut rec = gpu.recorder();
        attention_split(
            gpu,
            &mut rec,
            shape,
            &qb,
            &kb,
            &vb,
            &lb,
            &ob,
            &sb,
            rows_per_dispatch,
        )
        .unwrap();
        rec.run("attention test").unwrap();
        (gpu.read(&ob).unwrap(), gpu.read(&sb).unwrap())
    }

    #[test]
    fn attention_matches_reference_padded_gqa() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(31);
        // (B, L, lens, n_head, n_head_kv, head_dim, rows per dispatch)
        type Case = (usize, usize, Vec<u32>, usize, usize, usize, usize);
        let cases: [Case; 4] = [
            (3, 13, vec![13, 5, 1], 4, 2, 16, usize::MAX),
            (2, 9, vec![0, 9], 3, 3, 8, 4),
            (1, 37, vec![30], 6, 1, 64, 7),
            (4, 5, vec![2, 5, 3, 4], 2, 1, 4, 1),
        ];
        for (b, l, lens, nh, nkv, hd, split) in cases {
            let shape = AttnShape::new(b, l, nh, nkv, hd);
            let t = b * l;
            let q = rng.normal_vec(t * nh * hd, 1.0);
            let k = rng.normal_vec(t * nkv * hd, 1.0);
            let v = rng.normal_vec(t * nkv * hd, 1.0);
            let (go, gl) = run(&gpu, &shape, &q, &k, &v, &lens, split);
            let (wo, wl) = attention_ref(&shape, &q, &k, &v, &lens);
            let what = format!("attention B {b} L {l} heads {nh}/{nkv} hd {hd}");
            assert_close(&format!("{what} o"), &go, &wo, ATTENTION_TOL);
            assert_close(&format!("{what} lse"), &gl, &wl, ATTENTION_TOL);
        }
    }

    #[test]
    fn attention_fixed_case() {
        // One sequence of 2 rows, one head, head_dim 4 (scale 1/2). Row 0 sees only key 0, so
        // o0 = v0 and lse0 = s00. Row 1: q1·k0 = 0, q1·k1 = 2·ln 3, so the scores are (0, ln 3),
        // weights (1/4, 3/4), lse = ln 4.
        let gpu = crate::gpu::test_device();
        let shape = AttnShape::new(1, 2, 1, 1, 4);
        let l3 = 3f32.ln();
        let q = [1.0, 0.0, 0.0, 0.0, 0.0, 2.0 * l3, 0.0, 0.0];
        let k = [2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let (o, lse) = run(&gpu, &shape, &q, &k, &v, &[2], usize::MAX);
        let want_o = [1.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0, 7.0];
        assert_close("fixed o", &o, &want_o, Tol::new(1e-6, 1e-6));
        assert_close(
            "fixed lse",
            &lse,
            &[1.0f64, 4f64.ln()],
            Tol::new(1e-6, 1e-6),
        );
    }

    #[test]
    fn attention_rejects_bad_shapes() {
        let gpu = crate::gpu::test_device();
        let b = gpu.alloc("b", 1024).unwrap();
        let mut rec = gpu.recorder();
        let e = attention(
            &gpu,
            &mut rec,
            &AttnShape::new(1, 2, 4, 3, 8),
            &b,
            &b,
            &b,
            &b,
            &b,
            &b,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("n_head 4 is not a multiple of n_head_kv 3"),
            "{e}"
        );
        let e = attention(
            &gpu,
            &mut rec,
            &AttnShape::new(1, 2, 1, 1, 6),
            &b,
            &b,
            &b,
            &b,
            &b,
            &b,
        )
        .unwrap_err();
        assert!(e.to_string().contains("head_dim 6"), "{e}");
    }
}
