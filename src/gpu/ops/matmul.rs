//! `y = x·Wᵀ (+ bias)` and `dx = dy·W` with W in any supported GGUF type, dequantized in
//! registers (`kernels/dequant.wgsl`, `kernels/matmul.wgsl`, `kernels/matmul_back.wgsl`).
//!
//! Weights stay in their GGUF bytes on the device ([`GpuWeight`]), split by rows into chunk
//! buffers so no binding exceeds the device limit. One pipeline per weight type (the type is a
//! define, not a runtime branch). Every output element is summed by one invocation in a fixed
//! order (no atomics); long jobs are split into several dispatches (over rows, tokens and columns)
//! so none runs long enough to trip a desktop GPU watchdog, and the split depends only on the
//! shapes, so results are bit-for-bit reproducible.
//!
//! Split-K (forward only): a weight with few rows for the device (ffn_down on a big GPU: n_in
//! large, n_out small) leaves most of a GPU idle when each invocation walks all of n_in, so the
//! forward then sums K chunks of n_in in separate workgroups into a scratch buffer and
//! `kernels/matmul_reduce.wgsl` adds the chunks in a fixed order ([`split_k_groups`]). The chunking
//! depends on the weight's shape and the device type, never on the number of tokens: a token's
//! outputs are the same bits whatever else is in the batch. CPU adapters (lavapipe) never split.

use crate::gguf::GgmlType;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder};
use crate::kernel_source;
use crate::model::TensorRef;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bound on the floating-point work of one dispatch (2·tokens·rows·n_in). 2^31 flops is
/// ~10–40 ms on a laptop GPU running these kernels.
pub const MAX_DISPATCH_FLOPS: u64 = 1 << 31;

/// The forward kernel's tile: which entry point of `matmul.wgsl` / `matmul_sg.wgsl` runs, and the
/// weight rows and tokens one workgroup of 32 invocations covers. Both tiles add every output's
/// terms in the same order, so they give identical results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdTile {
    /// `main`: 8 rows × 8 tokens per invocation (256 rows × 8 tokens per workgroup), for GPUs.
    Wide,
    /// `main_narrow`: 4 rows × 16 tokens per invocation (128 rows × 16 tokens per workgroup), for
    /// CPU adapters: on lavapipe it is 9–100 % faster at real shapes (half the weight loads per
    /// output, and accumulators that fit the vector registers; `cargo bench --bench matmul`).
    Narrow,
}

/// Tests set this to force a forward tile (0: the device's, 1: [`FwdTile::Wide`], 2:
/// [`FwdTile::Narrow`]); both give the same bits.
#[doc(hidden)]
pub static TEST_FWD_TILE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl FwdTile {
    /// [`FwdTile::Narrow`] on CPU adapters, [`FwdTile::Wide`] on GPUs. `BFPO_MATMUL_TILE=wide` or
    /// `=narrow` overrides the choice (for benches; other values are ignored).
    pub fn for_gpu(gpu: &Gpu) -> FwdTile {
        match TEST_FWD_TILE.load(Ordering::Relaxed) {
            1 => return FwdTile::Wide,
            2 => return FwdTile::Narrow,
            _ => {}
        }
        use FwdTile::{Narrow, Wide};
        gpu.pick(
            "BFPO_MATMUL_TILE",
            &[("wide", Wide), ("narrow", Narrow)],
            Narrow,
            Wide,
        )
    }

    /// The entry point.
    pub fn entry(self) -> &'static str {
        match self {
            FwdTile::Wide => "main",
            FwdTile::Narrow => "main_narrow",
        }
    }

    /// Weight rows per workgroup.
    pub fn rows(self) -> usize {
        match self {
            FwdTile::Wide => 256,
            FwdTile::Narrow => 128,
        }
    }

    /// Tokens per workgroup.
    pub fn tokens(self) -> usize {
        match self {
            FwdTile::Wide => 8,
            FwdTile::Narrow => 16,
        }
    }
}
/// Rows per workgroup in `matmul_reduce.wgsl` (one token per workgroup).
const REDUCE_ROWS_PER_WG: usize = 64;
/// Split-K target on GPUs: K chunks are added until (rows / 8) × chunks, the forward kernel's
/// invocations per 8 tokens, reaches this. An H200 holds ≈ 270,000 resident invocations; at
/// T = 512 (64 token groups) 2048 gives ≈ 131,000, at T = 2048 four times that. A weight with
/// ≥ 16,384 rows (an LM head) is never split.
pub const SPLIT_K_TARGET: usize = 2048;
/// Shortest K chunk (elements of n_in): each partial sum written and read back costs about as
/// much memory traffic as 8 of the invocation's weight groups, so chunks stay ≥ 32 groups.
pub const SPLIT_K_MIN_CHUNK: usize = 256;
/// Largest scratch for split-K partial sums; longer token ranges are done in token windows.
/// Allocated once per device, on GPUs only; `gpu::memory::plan` counts it.
pub const SPLIT_K_SCRATCH_BYTES: u64 = 32 << 20;
/// Tokens per workgroup in `matmul_back.wgsl`.
const BACK_TOKENS_PER_WG: usize = 16;
/// 8-element groups per workgroup in `matmul_back.wgsl` (one per invocation).
const BACK_GROUPS_PER_WG: usize = 32;

/// A weight matrix uploaded as its raw GGUF bytes: `n_out` rows of `n_in` elements. Rows are
/// split into chunks (separate buffers) so no binding exceeds the device limit.
#[derive(Debug)]
pub struct GpuWeight {
    pub name: String,
    pub ty: GgmlType,
    pub n_in: usize,
    pub n_out: usize,
    pub chunks: Vec<WeightChunk>,
}

/// Rows `[row_start, row_start + n_rows)` of a weight, in one buffer.
#[derive(Debug)]
pub struct WeightChunk {
    pub buf: GpuBuf,
    pub row_start: usize,
    pub n_rows: usize,
}

fn bad(context: impl Into<String>, detail: impl Into<String>) -> GpuError {
    GpuError::Validation {
        context: context.into(),
        detail: detail.into(),
    }
}

impl GpuWeight {
    /// Uploads a weight as stored (no f32 copy), split into chunks under the binding limit.
    pub fn upload(gpu: &Gpu, t: &TensorRef<'_>) -> Result<GpuWeight, GpuError> {
        Self::upload_raw(gpu, t.name, t.ty, t.n_in(), t.n_out(), t.data)
    }

    /// Uploads raw block bytes of an `[n_out, n_in]` matrix of type `ty`.
    pub fn upload_raw(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        n_in: usize,
        n_out: usize,
        bytes: &[u8],
    ) -> Result<GpuWeight, GpuError> {
        Self::upload_chunked(gpu, name, ty, n_in, n_out, bytes, usize::MAX)
    }

    /// As [`GpuWeight::upload_raw`], with at most `max_rows` rows per chunk (besides the device
    /// limit). Tests use it to exercise the multi-chunk paths on small matrices.
    pub fn upload_chunked(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        n_in: usize,
        n_out: usize,
        bytes: &[u8],
        max_rows: usize,
    ) -> Result<GpuWeight, GpuError> {
        let ctx = || format!("uploading weight {name}");
        let row_bytes = check_shape(name, ty, n_in, n_out)?;
        let expected = row_bytes * n_out;
        if bytes.len() != expected {
            return Err(bad(
                ctx(),
                format!(
                    "{} bytes of data for a [{n_out}, {n_in}] {ty} matrix, expected {expected} ({n_out} rows of {row_bytes} bytes)",
                    bytes.len()
                ),
            ));
        }
        let limit = gpu.max_binding().min(gpu.max_buffer());
        let per_chunk = rows_per_chunk(row_bytes, limit, max_rows).ok_or_else(|| {
            GpuError::BindingTooLarge {
                what: format!("one row of weight {name}"),
                bytes: row_bytes as u64,
                limit,
            }
        })?;
        let mut chunks = Vec::with_capacity(n_out.div_ceil(per_chunk).max(1));
        let mut row = 0;
        while row < n_out {
            let n = per_chunk.min(n_out - row);
            let buf = gpu.upload_bytes(
                &format!("{name}[{row}..{}]", row + n),
                &bytes[row * row_bytes..(row + n) * row_bytes],
            )?;
            chunks.push(WeightChunk {
                buf,
                row_start: row,
                n_rows: n,
            });
            row += n;
        }
        Ok(GpuWeight {
            name: name.to_string(),
            ty,
            n_in,
            n_out,
            chunks,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buf.size).sum()
    }

    /// Bytes per row in the GGUF layout.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.n_in).expect("checked at upload")
    }

    /// The chunks overlapping `rows`, each with the overlapping row range in global rows.
    fn chunks_in(&self, rows: &Range<usize>) -> impl Iterator<Item = (&WeightChunk, Range<usize>)> {
        self.chunks.iter().filter_map(move |c| {
            let lo = rows.start.max(c.row_start);
            let hi = rows.end.min(c.row_start + c.n_rows);
            (lo < hi).then_some((c, lo..hi))
        })
    }
}

/// Rows per chunk buffer for rows of `row_bytes` under a binding/buffer `limit` (each chunk is
/// padded to a multiple of 4 bytes, and kept under 2 GiB because kernels use u32 byte offsets),
/// at most `max_rows`; `None` if not even one row fits.
pub fn rows_per_chunk(row_bytes: usize, limit: u64, max_rows: usize) -> Option<usize> {
    let limit = limit.min(1 << 31).saturating_sub(4);
    let n = (limit / row_bytes as u64) as usize;
    (n > 0).then_some(n.min(max_rows.max(1)))
}

/// Checks that an `[n_out, n_in]` matrix of type `ty` is something the kernels handle and returns
/// its row size in bytes.
fn check_shape(name: &str, ty: GgmlType, n_in: usize, n_out: usize) -> Result<usize, GpuError> {
    let ctx = || format!("uploading weight {name}");
    if n_in == 0 || n_out == 0 {
        return Err(bad(
            ctx(),
            format!("empty [{n_out}, {n_in}] matrix: both dimensions must be at least 1"),
        ));
    }
    let row_bytes = ty.row_bytes(n_in).ok_or_else(|| {
        bad(
            ctx(),
            format!(
                "rows of {n_in} elements are not a whole number of {}-element {ty} blocks",
                ty.block_elems()
            ),
        )
    })?;
    if !n_in.is_multiple_of(8) {
        return Err(bad(
            ctx(),
            format!(
                "the GPU matmul kernels need rows whose length is a multiple of 8; {ty} rows here have {n_in} elements"
            ),
        ));
    }
    Ok(row_bytes)
}

fn type_define(ty: GgmlType) -> [(&'static str, String); 1] {
    [("WTYPE", ty.name().to_string())]
}

fn check_len(
    what: &str,
    buf: &GpuBuf,
    words: usize,
    shape: impl FnOnce() -> String,
) -> Result<(), GpuError> {
    if (buf.size as usize) < words * 4 {
        return Err(bad(
            format!("recording {what}"),
            format!(
                "buffer {:?} holds {} bytes but {} needs {} bytes ({})",
                buf.label,
                buf.size,
                what,
                words * 4,
                shape()
            ),
        ));
    }
    Ok(())
}

/// Params of `kernels/matmul.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    /// Elements per weight row (multiple of 8).
    pub n_in: u32,
    /// Bytes per weight row.
    pub row_bytes: u32,
    /// First weight row of the dispatch, relative to the chunk buffer.
    pub row0: u32,
    /// Weight rows in the dispatch.
    pub n_rows: u32,
    /// First token.
    pub t0: u32,
    /// Tokens in the dispatch.
    pub n_tokens: u32,
    /// Elements per row of y.
    pub y_stride: u32,
    /// Column of y that row0 writes.
    pub y_col0: u32,
    /// Bias index of row0.
    pub bias0: u32,
    /// Bit 0: accumulate into y; bit 1: add bias.
    pub flags: u32,
    /// 8-element groups per K chunk (workgroup z sums groups `z·k_groups ..`); n_in / 8 unsplit.
    pub k_groups: u32,
    /// Elements of y between the outputs of consecutive K chunks (0 unsplit).
    pub z_stride: u32,
}

/// Params of `kernels/matmul_reduce.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulReduceParams {
    /// Rows (outputs per token) in the dispatch.
    pub n_rows: u32,
    /// Tokens in the dispatch.
    pub n_tokens: u32,
    /// K chunks to add.
    pub n_parts: u32,
    /// Elements between consecutive chunks of the partial sums.
    pub part_stride: u32,
    /// Elements per row of y.
    pub y_stride: u32,
    /// Column of y that row 0 writes.
    pub y_col0: u32,
    /// Bias index of row 0.
    pub bias0: u32,
    /// Bit 0: accumulate into y; bit 1: add bias.
    pub flags: u32,
}

/// How the forward matmul splits its sum over n_in (split-K, see `kernels/matmul.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitK {
    /// The device rule: [`split_k_groups`] with [`split_k_target`].
    Auto,
    /// One pass over the whole of n_in (the single-dispatch kernel).
    Never,
    /// K chunks of this many elements (rounded up to a multiple of 8; ≥ n_in means unsplit).
    Chunk(usize),
}

/// The split-K target of this device: [`SPLIT_K_TARGET`] on GPUs, 0 (never split) on CPU
/// adapters (lavapipe, SwiftShader), whose few cores are kept busy by any real shape and which
/// only pay for the extra pass. It depends on the device alone.
pub fn split_k_target(gpu: &Gpu) -> usize {
    if gpu.is_cpu_adapter() {
        0
    } else {
        SPLIT_K_TARGET
    }
}

/// 8-element groups per K chunk for a weight of `n_out` rows of `n_in` elements: `n_in / 8` (no
/// split) when `target` is 0 or `n_out / 8` already reaches it, else the fewest chunks (each at
/// least [`SPLIT_K_MIN_CHUNK`] elements) that bring `(n_out / 8) × chunks` to `target`. It
/// depends on the weight's shape and the target only, never on the number of tokens, so a
/// token's outputs do not depend on what else is in the batch.
pub fn split_k_groups(n_in: usize, n_out: usize, target: usize) -> usize {
    let n_groups = n_in / 8;
    let octets = n_out.div_ceil(8);
    if target == 0 || octets >= target {
        return n_groups;
    }
    let chunks = target.div_ceil(octets).min(n_in / SPLIT_K_MIN_CHUNK).max(1);
    n_groups.div_ceil(chunks)
}

/// Tests set this (K-chunk length in elements, 0 = off) to make [`SplitK::Auto`] split every
/// weight, so whole-model forwards run the split-K path on a device whose rule never splits.
#[doc(hidden)]
pub static TEST_SPLIT_K_CHUNK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

fn k_groups_for(gpu: &Gpu, w: &GpuWeight, split: SplitK) -> usize {
    let n_groups = w.n_in / 8;
    let forced = TEST_SPLIT_K_CHUNK.load(Ordering::Relaxed);
    match split {
        SplitK::Auto if forced > 0 => forced.div_ceil(8).clamp(1, n_groups),
        SplitK::Auto => split_k_groups(w.n_in, w.n_out, split_k_target(gpu)),
        SplitK::Never => n_groups,
        SplitK::Chunk(e) => e.div_ceil(8).clamp(1, n_groups),
    }
}

/// Params of `kernels/matmul_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulBackParams {
    /// Elements per weight row (multiple of 8) = elements per row of dx.
    pub n_in: u32,
    /// Bytes per weight row.
    pub row_bytes: u32,
    /// First weight row, relative to the chunk buffer.
    pub row0: u32,
    /// Weight rows summed by the dispatch.
    pub n_rows: u32,
    /// First token.
    pub t0: u32,
    /// Tokens in the dispatch.
    pub n_tokens: u32,
    /// Elements per row of dy.
    pub dy_stride: u32,
    /// Column of dy that row0 reads.
    pub dy_col0: u32,
    /// First 8-element group of dx columns.
    pub g0: u32,
    /// 8-element groups in the dispatch.
    pub n_groups: u32,
    /// Bit 0: accumulate into dx.
    pub flags: u32,
    pub _pad: u32,
}

/// Tests set this to run the matmuls without subgroups on a device that has them (both kernels
/// of each direction give identical results).
#[doc(hidden)]
pub static TEST_NO_SUBGROUPS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the matmuls load x (forward, `matmul_sg.wgsl`) and dy (backward,
/// `matmul_back_sg.wgsl`) through subgroup broadcasts: the device has subgroups of ≥ 8 lanes.
pub fn use_subgroups(gpu: &Gpu) -> bool {
    gpu.features.contains(wgpu::Features::SUBGROUP)
        && gpu.info.subgroup_min_size >= 8
        && !TEST_NO_SUBGROUPS.load(Ordering::Relaxed)
}

/// A lower binding limit for tests (0 = none), so token windows are exercised on small data.
/// Lowering it only adds windows; results are unchanged.
#[doc(hidden)]
pub static TEST_BINDING_LIMIT: AtomicU64 = AtomicU64::new(0);

fn binding_limit(gpu: &Gpu) -> u64 {
    match TEST_BINDING_LIMIT.load(Ordering::Relaxed) {
        0 => gpu.max_binding(),
        l => l.min(gpu.max_binding()),
    }
}

/// Tokens per dispatch so that every token-major binding (`[tokens, width]` f32 for each width in
/// `widths`) fits under the binding limit: all `n_tokens` if they fit, else a multiple of 64
/// tokens and of `offset_alignment / 4` (so window offsets are aligned for any width).
pub(crate) fn token_window(
    gpu: &Gpu,
    what: &str,
    n_tokens: usize,
    widths: &[usize],
) -> Result<usize, GpuError> {
    let limit = binding_limit(gpu);
    let per_token = widths.iter().copied().max().unwrap_or(1).max(1) as u64 * 4;
    if n_tokens as u64 * per_token <= limit {
        return Ok(n_tokens);
    }
    let unit = (gpu.offset_alignment() as usize / 4).max(64);
    let tw = (limit / per_token) as usize / unit * unit;
    if tw == 0 {
        return Err(GpuError::BindingTooLarge {
            what: format!("{unit} tokens of {what}"),
            bytes: unit as u64 * per_token,
            limit,
        });
    }
    Ok(tw)
}

/// Splits `0..n` into pieces of at most `step` (a positive multiple of `unit` unless it is all).
pub(crate) fn pieces(n: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
    let step = step.max(1);
    (0..n.div_ceil(step)).map(move |i| i * step..((i + 1) * step).min(n))
}

fn round_down(v: usize, unit: usize) -> usize {
    (v / unit * unit).max(unit)
}

/// Records forward dispatches for global weight rows `rows`, writing row r to y column
/// `y_col0 + (r - rows.start)`.
#[allow(clippy::too_many_arguments)]
fn forward(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuWeight,
    rows: Range<usize>,
    bias: Option<&GpuBuf>,
    y: &GpuBuf,
    y_stride: usize,
    y_col0: usize,
    n_tokens: usize,
    accumulate: bool,
    split: SplitK,
) -> Result<(), GpuError> {
    let what = format!("matmul with {}", w.name);
    if n_tokens == 0 || rows.is_empty() {
        return Ok(());
    }
    check_len(&what, x, n_tokens * w.n_in, || {
        format!("x: [{n_tokens}, {}] f32", w.n_in)
    })?;
    check_len(&what, y, n_tokens * y_stride, || {
        format!("y: [{n_tokens}, {y_stride}] f32")
    })?;
    if let Some(b) = bias {
        check_len(&what, b, rows.end, || format!("bias: [{}] f32", w.n_out))?;
    }
    let kernel = if use_subgroups(gpu) {
        kernel_source!("matmul_sg")
    } else {
        kernel_source!("matmul")
    };
    let tile = FwdTile::for_gpu(gpu);
    let pipe = gpu.pipeline(&kernel, tile.entry(), &type_define(w.ty))?;
    let row_bytes = w.row_bytes();
    let n_groups = w.n_in / 8;
    // K chunks are workgroup z: at most 65,535 of them.
    let k_groups = k_groups_for(gpu, w, split).max(n_groups.div_ceil(65_535));
    let n_parts = n_groups.div_ceil(k_groups);
    let flops_per_row_token = 2 * w.n_in as u64;
    // Rows per dispatch with all tokens; if even one workgroup of rows is too much, split tokens
    // (in multiples of 64, so window offsets stay aligned).
    let budget = (MAX_DISPATCH_FLOPS / flops_per_row_token) as usize; // row·tokens per dispatch
    let row_step = round_down(budget / n_tokens, tile.rows());
    let mut tok_step = round_down(budget / row_step, 64).min(token_window(
        gpu,
        &what,
        n_tokens,
        &[w.n_in, y_stride],
    )?);
    // Split-K: the partial sums of a dispatch, [n_parts, tokens, rows] f32, go to a scratch
    // buffer of at most SPLIT_K_SCRATCH_BYTES (and the binding limit); fewer tokens per dispatch
    // when needed. Token windows change no result: every output is summed the same way.
    let scratch = if n_parts > 1 {
        let per_token = (n_parts * row_step.min(rows.len()) * 4) as u64;
        let cap = SPLIT_K_SCRATCH_BYTES.min(binding_limit(gpu));
        if (tok_step as u64) * per_token > cap {
            let unit = (gpu.offset_alignment() as usize / 4).max(64);
            let tw = (cap / per_token) as usize / unit * unit;
            if tw == 0 {
                return Err(GpuError::BindingTooLarge {
                    what: format!("split-K partial sums of {unit} tokens of {what}"),
                    bytes: unit as u64 * per_token,
                    limit: cap,
                });
            }
            tok_step = tw;
        }
        // The reduce kernel has one workgroup row per token (at most 65,535).
        tok_step = tok_step.min(65_472);
        let bytes = per_token * tok_step.min(n_tokens) as u64;
        Some(gpu.scratch("matmul split-K partial sums", bytes)?)
    } else {
        None
    };
    let reduce = match scratch {
        Some(_) => Some(gpu.pipeline(&kernel_source!("matmul_reduce"), "main", &[])?),
        None => None,
    };
    let bias_bind = match bias {
        Some(b) => Bind::Range(b, 0, (rows.end * 4) as u64),
        None => Bind::Range(x, 0, 4),
    };
    let flags = accumulate as u32 | (bias.is_some() as u32) << 1;
    for (chunk, grows) in w.chunks_in(&rows) {
        let local = grows.start - chunk.row_start..grows.end - chunk.row_start;
        for rp in pieces(local.len(), row_step) {
            for tp in pieces(n_tokens, tok_step) {
                let groups = [
                    rp.len().div_ceil(tile.rows()) as u32,
                    tp.len().div_ceil(tile.tokens()) as u32,
                    n_parts as u32,
                ];
                let xw = (w.n_in * 4) as u64;
                let yw = (y_stride * 4) as u64;
                let (t0, nt) = (tp.start as u64, tp.len() as u64);
                let x_bind = Bind::Range(x, t0 * xw, nt * xw);
                let y_bind = Bind::Range(y, t0 * yw, nt * yw);
                let y_col = y_col0 + grows.start - rows.start + rp.start;
                let bias0 = grows.start + rp.start;
                let mut params = MatmulParams {
                    n_in: w.n_in as u32,
                    row_bytes: row_bytes as u32,
                    row0: (local.start + rp.start) as u32,
                    n_rows: rp.len() as u32,
                    t0: 0,
                    n_tokens: tp.len() as u32,
                    y_stride: y_stride as u32,
                    y_col0: y_col as u32,
                    bias0: bias0 as u32,
                    flags,
                    k_groups: k_groups as u32,
                    z_stride: 0,
                };
                let (Some(part), Some(reduce)) = (&scratch, &reduce) else {
                    let binds = [x_bind, Bind::Whole(&chunk.buf), bias_bind, y_bind];
                    rec.dispatch(&pipe, &binds, &params, groups)?;
                    continue;
                };
                // Pass 1: chunk z's partial sums to part[z, t, r] (no bias, no accumulate).
                let stride = tp.len() * rp.len();
                let part_bind = Bind::Range(part, 0, (n_parts * stride * 4) as u64);
                params.y_stride = rp.len() as u32;
                params.y_col0 = 0;
                params.flags = 0;
                params.z_stride = stride as u32;
                let binds = [x_bind, Bind::Whole(&chunk.buf), bias_bind, part_bind];
                rec.dispatch(&pipe, &binds, &params, groups)?;
                // Pass 2: y (+)= Σ_z part[z] in increasing z (+ bias).
                let rparams = MatmulReduceParams {
                    n_rows: rp.len() as u32,
                    n_tokens: tp.len() as u32,
                    n_parts: n_parts as u32,
                    part_stride: stride as u32,
                    y_stride: y_stride as u32,
                    y_col0: y_col as u32,
                    bias0: bias0 as u32,
                    flags,
                };
                let rgroups = [
                    rp.len().div_ceil(REDUCE_ROWS_PER_WG) as u32,
                    tp.len() as u32,
                    1,
                ];
                rec.dispatch(reduce, &[part_bind, bias_bind, y_bind], &rparams, rgroups)?;
            }
        }
    }
    Ok(())
}

/// Records backward-input dispatches summing over global weight rows `rows`, reading row r from
/// dy column `dy_col0 + (r - rows.start)`.
#[allow(clippy::too_many_arguments)]
fn back_input(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    dy: &GpuBuf,
    dy_stride: usize,
    w: &GpuWeight,
    rows: Range<usize>,
    dx: &GpuBuf,
    n_tokens: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let what = format!("matmul backward with {}", w.name);
    if n_tokens == 0 {
        return Ok(());
    }
    check_len(&what, dy, n_tokens * dy_stride, || {
        format!("dy: [{n_tokens}, {dy_stride}] f32")
    })?;
    let dx_bytes = n_tokens * w.n_in * 4;
    check_len(&what, dx, n_tokens * w.n_in, || {
        format!("dx: [{n_tokens}, {}] f32", w.n_in)
    })?;
    if rows.is_empty() {
        if !accumulate {
            rec.clear(dx, 0, dx_bytes as u64);
        }
        return Ok(());
    }
    let kernel = if use_subgroups(gpu) {
        kernel_source!("matmul_back_sg")
    } else {
        kernel_source!("matmul_back")
    };
    let pipe = gpu.pipeline(&kernel, "main", &type_define(w.ty))?;
    let row_bytes = w.row_bytes();
    let n_groups = w.n_in / 8;
    // Work per dispatch = 2 · rows · tokens · 8 · groups. Prefer whole rows of dx (all groups,
    // all tokens) and split the row sum; split tokens and then groups only when needed.
    let budget = MAX_DISPATCH_FLOPS / 16; // rows · tokens · groups per dispatch
    let per_rt = budget / n_groups as u64; // rows · tokens
    let tok_step = if per_rt >= (n_tokens * 8) as u64 {
        n_tokens
    } else {
        round_down((per_rt / 8) as usize, 64).min(n_tokens)
    }
    .min(token_window(gpu, &what, n_tokens, &[w.n_in, dy_stride])?);
    let row_step = ((per_rt / tok_step as u64) as usize).max(8);
    let grp_step = if (row_step * tok_step * n_groups) as u64 <= budget {
        n_groups
    } else {
        round_down(
            (budget / (row_step * tok_step) as u64) as usize,
            BACK_GROUPS_PER_WG,
        )
    };
    let mut first = true;
    for (chunk, grows) in w.chunks_in(&rows) {
        let local = grows.start - chunk.row_start..grows.end - chunk.row_start;
        for rp in pieces(local.len(), row_step) {
            for tp in pieces(n_tokens, tok_step) {
                for gp in pieces(n_groups, grp_step) {
                    let params = MatmulBackParams {
                        n_in: w.n_in as u32,
                        row_bytes: row_bytes as u32,
                        row0: (local.start + rp.start) as u32,
                        n_rows: rp.len() as u32,
                        t0: 0,
                        n_tokens: tp.len() as u32,
                        dy_stride: dy_stride as u32,
                        dy_col0: (grows.start - rows.start + rp.start) as u32,
                        g0: gp.start as u32,
                        n_groups: gp.len() as u32,
                        flags: (accumulate || !first) as u32,
                        _pad: 0,
                    };
                    let groups = [
                        gp.len().div_ceil(BACK_GROUPS_PER_WG) as u32,
                        tp.len().div_ceil(BACK_TOKENS_PER_WG) as u32,
                        1,
                    ];
                    let (dyw, dxw) = ((dy_stride * 4) as u64, (w.n_in * 4) as u64);
                    let (t0, nt) = (tp.start as u64, tp.len() as u64);
                    rec.dispatch(
                        &pipe,
                        &[
                            Bind::Range(dy, t0 * dyw, nt * dyw),
                            Bind::Whole(&chunk.buf),
                            Bind::Range(dx, t0 * dxw, nt * dxw),
                        ],
                        &params,
                        groups,
                    )?;
                }
            }
            first = false;
        }
    }
    Ok(())
}

/// Records `y[t, :] = x[t, :]·Wᵀ (+ bias)` for `t < n_tokens` (or `+=` when `accumulate`).
/// x: `[n_tokens, n_in]` f32, y: `[n_tokens, n_out]` f32, bias: `[n_out]` f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuWeight,
    bias: Option<&GpuBuf>,
    y: &GpuBuf,
    n_tokens: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    matmul_split(gpu, rec, x, w, bias, y, n_tokens, accumulate, SplitK::Auto)
}

/// [`matmul`] with the split over n_in chosen by the caller (tests and benches compare the
/// paths; [`SplitK::Auto`] is what [`matmul`] uses).
#[allow(clippy::too_many_arguments)]
pub fn matmul_split(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuWeight,
    bias: Option<&GpuBuf>,
    y: &GpuBuf,
    n_tokens: usize,
    accumulate: bool,
    split: SplitK,
) -> Result<(), GpuError> {
    forward(
        gpu,
        rec,
        x,
        w,
        0..w.n_out,
        bias,
        y,
        w.n_out,
        0,
        n_tokens,
        accumulate,
        split,
    )
}

fn check_rows(w: &GpuWeight, rows: &Range<usize>) -> Result<(), GpuError> {
    if rows.start > rows.end || rows.end > w.n_out {
        return Err(bad(
            format!("recording a row-range matmul with {}", w.name),
            format!(
                "rows {}..{} are outside the weight's {} rows",
                rows.start, rows.end, w.n_out
            ),
        ));
    }
    Ok(())
}

/// Records `y[t, r - rows.start] = x[t, :]·W[r, :]` for rows `r` in `rows` (LM-head vocabulary
/// chunks). y: `[n_tokens, rows.len()]` f32.
pub fn matmul_rows(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuWeight,
    rows: Range<usize>,
    y: &GpuBuf,
    n_tokens: usize,
) -> Result<(), GpuError> {
    check_rows(w, &rows)?;
    let stride = rows.len();
    forward(
        gpu,
        rec,
        x,
        w,
        rows,
        None,
        y,
        stride,
        0,
        n_tokens,
        false,
        SplitK::Auto,
    )
}

/// Records `dx[t, :] (+)= dy[t, :]·W` (the weight used transposed). dy: `[n_tokens, n_out]`.
pub fn matmul_back_input(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    dy: &GpuBuf,
    w: &GpuWeight,
    dx: &GpuBuf,
    n_tokens: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    back_input(
        gpu,
        rec,
        dy,
        w.n_out,
        w,
        0..w.n_out,
        dx,
        n_tokens,
        accumulate,
    )
}

/// Records `dx[t, :] (+)= Σ_{r ∈ rows} dy[t, r - rows.start]·W[r, :]` (LM-head chunks).
/// dy: `[n_tokens, rows.len()]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_back_input(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    dy: &GpuBuf,
    w: &GpuWeight,
    rows: Range<usize>,
    dx: &GpuBuf,
    n_tokens: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    check_rows(w, &rows)?;
    let stride = rows.len();
    back_input(gpu, rec, dy, stride, w, rows, dx, n_tokens, accumulate)
}

// ---- CPU references (f64 accumulation) ------------------------------------------------------

/// `y[t, o] = Σ_i x[t, i]·w[o, i] (+ bias[o])`, w row-major `[n_out, n_in]` f32 (dequantized).
pub fn matmul_ref(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n_tokens: usize,
    n_in: usize,
    n_out: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n_tokens * n_out];
    for t in 0..n_tokens {
        let xr = &x[t * n_in..(t + 1) * n_in];
        for o in 0..n_out {
            let wr = &w[o * n_in..(o + 1) * n_in];
            let mut s: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            if let Some(b) = bias {
                s += b[o] as f64;
            }
            y[t * n_out + o] = s as f32;
        }
    }
    y
}

/// `dx[t, i] = Σ_o dy[t, o]·w[o, i]`, w row-major `[n_out, n_in]` f32 (dequantized).
pub fn matmul_back_input_ref(
    dy: &[f32],
    w: &[f32],
    n_tokens: usize,
    n_in: usize,
    n_out: usize,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; n_tokens * n_in];
    let mut acc = vec![0.0f64; n_in];
    for t in 0..n_tokens {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for o in 0..n_out {
            let d = dy[t * n_out + o] as f64;
            for (a, &wv) in acc.iter_mut().zip(&w[o * n_in..(o + 1) * n_in]) {
                *a += d * wv as f64;
            }
        }
        for (dst, &a) in dx[t * n_in..(t + 1) * n_in].iter_mut().zip(&acc) {
            *dst = a as f32;
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<MatmulParams>(), 48);
        assert_eq!(std::mem::align_of::<MatmulParams>(), 4);
        assert_eq!(std::mem::size_of::<MatmulBackParams>(), 48);
        assert_eq!(std::mem::size_of::<MatmulReduceParams>(), 32);
        assert_eq!(std::mem::align_of::<MatmulBackParams>(), 4);
    }

    #[test]
    fn chunking_under_the_binding_limit() {
        // Tied Qwen2.5-0.5B LM head, Q8_0: 151,936 rows of 896/32·34 = 952 bytes = 144.6 MB.
        let rb = GgmlType::Q8_0.row_bytes(896).unwrap();
        let per = rows_per_chunk(rb, 128 << 20, usize::MAX).unwrap();
        assert_eq!(151_936usize.div_ceil(per), 2);
        assert!((per * rb) as u64 + 4 <= 128 << 20);
        // The same as f16 (1792 B/row): 3 chunks of ≤ 74,898 rows.
        let per = rows_per_chunk(1792, 128 << 20, usize::MAX).unwrap();
        assert_eq!((per, 151_936usize.div_ceil(per)), (74_898, 3));
        assert_eq!(rows_per_chunk(100, 1 << 40, 7), Some(7));
        assert_eq!(rows_per_chunk(100, 64, usize::MAX), None);
    }

    #[test]
    fn split_k_rule() {
        // (n_in, n_out) -> K chunk in elements with the GPU target.
        let chunk = |n_in, n_out| 8 * split_k_groups(n_in, n_out, SPLIT_K_TARGET);
        assert_eq!(chunk(1536, 576), 256); // SmolLM2 ffn_down: 6 chunks
        assert_eq!(chunk(4864, 896), 256); // Qwen2.5-0.5B ffn_down: 19 chunks
        assert_eq!(chunk(8192, 2048), 1024); // Llama-3.2-1B ffn_down: 8 chunks
        assert_eq!(chunk(576, 1536), 288); // SmolLM2 ffn_up: 2 chunks
        assert_eq!(chunk(896, 151_936), 896); // an LM head: unsplit
        assert_eq!(chunk(128, 64), 128); // n_in under two minimum chunks: unsplit
        // CPU adapters: never split.
        assert_eq!(split_k_groups(4864, 896, 0), 4864 / 8);
        // Chunks cover n_in: the last one may be shorter, none is empty.
        for (n_in, n_out) in [(1544, 8), (4864, 896), (2048, 100)] {
            let g = split_k_groups(n_in, n_out, SPLIT_K_TARGET);
            let parts = (n_in / 8).div_ceil(g);
            assert!((parts - 1) * g < n_in / 8 && parts * g >= n_in / 8);
        }
    }

    #[test]
    fn pieces_cover_exactly() {
        let v: Vec<_> = pieces(10, 4).collect();
        assert_eq!(v, vec![0..4, 4..8, 8..10]);
        assert_eq!(pieces(3, 100).collect::<Vec<_>>(), vec![0..3]);
        assert_eq!(round_down(130, 64), 128);
        assert_eq!(round_down(10, 64), 64);
    }
}
