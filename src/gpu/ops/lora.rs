//! LoRA on the GPU: forward `y += s·B(A·x)`, backward `dA`, `dB` and the input gradient.
//!
//! Kernels: a strided f32 product, `kernels/lora.wgsl` for the long reductions `u = x·Aᵀ` and
//! `du = s·dy·B` (a workgroup's 16 k-lanes split the reduction, then add their partials in lane
//! order) and `kernels/lora_up.wgsl` for `y += s·u·Bᵀ` and `dx += du·A` (rank-long sums, many
//! columns); `kernels/lora_back.wgsl` for the weight gradients, reductions over tokens
//! split into fixed chunks (partials in a scratch buffer shared by the adapter's tensors), added
//! in chunk order by `kernels/lora_sum.wgsl`. The derivatives are written at the top of
//! `lora_back.wgsl`. Every sum runs in a fixed order (no atomics), so results are deterministic,
//! and a token's forward output depends only on that token's input row.

use crate::gpu::ops::matmul::{pieces, token_window};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder};
use crate::kernel_source;
use crate::model::lora::{LoraTensor, LoraWeights, Target};
use std::ops::Range;
use std::sync::Arc;

/// Token chunks of the weight-gradient reductions: at most this many partials…
const MAX_CHUNKS: usize = 64;
/// …of at least this many tokens each.
const MIN_CHUNK: usize = 64;
/// Upper bound of the shared gradient scratch (bytes); fewer chunks fit larger tensors.
const MAX_SCRATCH: u64 = 16 << 20;

/// Bytes of an adapter's shared gradient scratch (partial sums of the chunked token reductions)
/// when its widest trained A or B holds `widest` f32 (rank × the longer side): room for
/// [`MAX_CHUNKS`] partials, capped at 16 MiB unless one partial is larger. The device's binding
/// limit caps it further. `gpu::memory::plan` counts it.
pub fn grad_scratch_bytes(widest: u64) -> u64 {
    (MAX_CHUNKS as u64 * widest * 4).min(MAX_SCRATCH.max(widest * 4))
}

/// One adapted projection on the device: A `[rank, n_in]`, B `[n_out, rank]`, their gradient
/// accumulators (same shapes), all f32.
#[derive(Debug)]
pub struct GpuLoraTensor {
    pub layer: usize,
    pub target: Target,
    pub n_in: usize,
    pub n_out: usize,
    pub a: GpuBuf,
    pub b: GpuBuf,
    pub grad_a: GpuBuf,
    pub grad_b: GpuBuf,
    /// Partial sums of the weight gradients, shared by all tensors of the adapter (dispatches
    /// run in recording order, so one at a time uses it).
    scratch: Arc<GpuBuf>,
}

/// A whole adapter on the device.
#[derive(Debug)]
pub struct GpuLora {
    pub rank: usize,
    pub alpha: f32,
    pub tensors: Vec<GpuLoraTensor>,
}

fn bad(context: impl Into<String>, detail: impl Into<String>) -> GpuError {
    GpuError::Validation {
        context: context.into(),
        detail: detail.into(),
    }
}

impl GpuLora {
    pub fn upload(gpu: &Gpu, w: &LoraWeights) -> Result<GpuLora, GpuError> {
        if w.rank == 0 {
            return Err(bad("uploading the LoRA adapter", "rank is 0"));
        }
        // The LM head's tensor (scored, never trained) needs none.
        let widest = w
            .tensors
            .iter()
            .filter(|t| t.target != Target::Output)
            .map(|t| w.rank * t.n_in.max(t.n_out))
            .max()
            .unwrap_or(1) as u64;
        let scratch_bytes = grad_scratch_bytes(widest).min(gpu.max_binding());
        let scratch = Arc::new(gpu.alloc("lora.grad_scratch", scratch_bytes)?);
        let mut tensors = Vec::with_capacity(w.tensors.len());
        for t in &w.tensors {
            let name = format!("lora.blk.{}.{}", t.layer, t.target.gguf_name());
            let (na, nb) = (w.rank * t.n_in, t.n_out * w.rank);
            if t.a.len() != na || t.b.len() != nb {
                return Err(bad(
                    format!("uploading LoRA tensor {name}"),
                    format!(
                        "A has {} values and B {}, expected {na} ([{}, {}]) and {nb} ([{}, {}])",
                        t.a.len(),
                        t.b.len(),
                        w.rank,
                        t.n_in,
                        t.n_out,
                        w.rank
                    ),
                ));
            }
            tensors.push(GpuLoraTensor {
                layer: t.layer,
                target: t.target,
                n_in: t.n_in,
                n_out: t.n_out,
                a: gpu.upload(&format!("{name}.a"), &t.a)?,
                b: gpu.upload(&format!("{name}.b"), &t.b)?,
                grad_a: gpu.alloc(&format!("{name}.grad_a"), (na * 4) as u64)?,
                grad_b: gpu.alloc(&format!("{name}.grad_b"), (nb * 4) as u64)?,
                scratch: scratch.clone(),
            });
        }
        Ok(GpuLora {
            rank: w.rank,
            alpha: w.alpha,
            tensors,
        })
    }

    /// Reads A and B back.
    pub fn download(&self, gpu: &Gpu) -> Result<LoraWeights, GpuError> {
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let a: Vec<f32> = gpu.read_range(&t.a, 0, (self.rank * t.n_in * 4) as u64)?;
            let b: Vec<f32> = gpu.read_range(&t.b, 0, (t.n_out * self.rank * 4) as u64)?;
            tensors.push(LoraTensor {
                layer: t.layer,
                target: t.target,
                n_in: t.n_in,
                n_out: t.n_out,
                a,
                b,
            });
        }
        Ok(LoraWeights {
            rank: self.rank,
            alpha: self.alpha,
            tensors,
        })
    }

    pub fn get(&self, layer: usize, target: Target) -> Option<&GpuLoraTensor> {
        self.tensors
            .iter()
            .find(|t| t.layer == layer && t.target == target)
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Records zeroing of every gradient accumulator.
    pub fn zero_grads(&self, rec: &mut Recorder<'_>) {
        for t in &self.tensors {
            rec.clear(&t.grad_a, 0, t.grad_a.size);
            rec.clear(&t.grad_b, 0, t.grad_b.size);
        }
    }
}

/// Params of `kernels/lora.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LoraGemmParams {
    /// Rows of C.
    pub m: u32,
    /// Columns of C.
    pub n: u32,
    /// Reduction length.
    pub k: u32,
    /// X element stride along i.
    pub sxi: u32,
    /// X element stride along k.
    pub sxk: u32,
    /// Y element stride along k.
    pub syk: u32,
    /// Y element stride along j.
    pub syj: u32,
    /// Elements per row of C.
    pub c_stride: u32,
    /// Scale of the product.
    pub alpha: f32,
    /// Bit 0: accumulate into C.
    pub flags: u32,
    /// First Y element (the LM head's B rows of a vocabulary chunk).
    pub y_off: u32,
    pub _pad: u32,
}

/// Params of `kernels/lora_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LoraGradParams {
    /// Columns of the token-major `big` input (`dy` or `x`).
    pub n_big: u32,
    /// Columns of the token-major `small` input (`u` or `du`): the rank.
    pub rank: u32,
    /// Tokens (reduction length).
    pub t: u32,
    /// Elements per token row of `big`.
    pub s_big: u32,
    /// Elements per token row of `small`.
    pub s_small: u32,
    /// G element stride along the big dimension.
    pub g_b: u32,
    /// G element stride along the rank.
    pub g_r: u32,
    /// Tokens per chunk.
    pub chunk: u32,
    /// Scale of the product (direct accumulation only).
    pub alpha: f32,
    /// Bit 0: accumulate `alpha·S` into G (one chunk) instead of writing partials.
    pub flags: u32,
    /// Elements per partial in the scratch buffer.
    pub part_stride: u32,
    pub _pad: u32,
}

/// Params of `kernels/lora_sum.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LoraSumParams {
    /// Elements of G.
    pub size: u32,
    /// Partials.
    pub n: u32,
    /// Scale of the sum.
    pub alpha: f32,
    pub _pad: u32,
}

/// Which product: `Down` (`kernels/lora.wgsl`) for long reductions into `rank` columns, `Up`
/// (`kernels/lora_up.wgsl`) for rank-long reductions into many columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Down,
    Up,
}

/// `C[i, j] (+)= alpha·Σ_k X[i·sxi + k·sxk]·Y[k·syk + j·syj]`, C `[m, n]` row-major.
#[allow(clippy::too_many_arguments)]
fn gemm(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    entry: Entry,
    x: Bind<'_>,
    y: Bind<'_>,
    c: Bind<'_>,
    mnk: (usize, usize, usize),
    strides: (usize, usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) -> Result<(), GpuError> {
    gemm_at(gpu, rec, entry, x, y, 0, c, mnk, strides, alpha, accumulate)
}

/// [`gemm`] reading Y from element `y_off` on: `Y[y_off + k·syk + j·syj]`.
#[allow(clippy::too_many_arguments)]
fn gemm_at(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    entry: Entry,
    x: Bind<'_>,
    y: Bind<'_>,
    y_off: usize,
    c: Bind<'_>,
    (m, n, k): (usize, usize, usize),
    (sxi, sxk, syk, syj): (usize, usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) -> Result<(), GpuError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let pipe = match entry {
        Entry::Down => {
            // vec4 loads where rows hold whole vec4s: x/dy rows along k, A rows along k (u) or B
            // rows along the rank (du).
            let xv = sxk == 1 && sxi.is_multiple_of(4) && k.is_multiple_of(4);
            let y_mode = if syk == 1
                && syj.is_multiple_of(4)
                && y_off.is_multiple_of(4)
                && k.is_multiple_of(4)
            {
                1
            } else if syj == 1
                && syk.is_multiple_of(4)
                && y_off.is_multiple_of(4)
                && n.is_multiple_of(4)
            {
                2
            } else {
                0
            };
            let defines = [
                ("X_T", if xv { "vec4<f32>" } else { "f32" }.to_string()),
                ("X_W", if xv { "4u" } else { "1u" }.to_string()),
                (
                    "Y_T",
                    if y_mode > 0 { "vec4<f32>" } else { "f32" }.to_string(),
                ),
                ("Y_MODE", format!("{y_mode}u")),
            ];
            gpu.pipeline(&kernel_source!("lora"), "down", &defines)?
        }
        Entry::Up => {
            // vec4 loads where the rows hold whole vec4s (ranks 8, 16, 32, 64, …).
            let xv = sxk == 1 && sxi.is_multiple_of(4) && k.is_multiple_of(4);
            let y_mode = if syk == 1
                && syj.is_multiple_of(4)
                && y_off.is_multiple_of(4)
                && k.is_multiple_of(4)
            {
                1 // B rows along the rank (y += s·u·Bᵀ)
            } else if syj == 1
                && syk.is_multiple_of(4)
                && y_off.is_multiple_of(4)
                && n.is_multiple_of(4)
            {
                2 // A rows along the columns (dx += du·A)
            } else {
                0
            };
            let ty = |v: bool| if v { "vec4<f32>" } else { "f32" }.to_string();
            let defines = [
                ("X_T", ty(xv)),
                ("X_W", if xv { "4u" } else { "1u" }.to_string()),
                ("Y_T", ty(y_mode > 0)),
                ("Y_MODE", format!("{y_mode}u")),
            ];
            gpu.pipeline(&kernel_source!("lora_up"), "main", &defines)?
        }
    };
    let groups = match entry {
        // 16 tokens per workgroup, all columns.
        Entry::Down => [m.div_ceil(16) as u32, 1, 1],
        // 128 columns × 32 tokens per workgroup.
        Entry::Up => [n.div_ceil(128) as u32, m.div_ceil(32) as u32, 1],
    };
    let params = LoraGemmParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        sxi: sxi as u32,
        sxk: sxk as u32,
        syk: syk as u32,
        syj: syj as u32,
        c_stride: n as u32,
        alpha,
        flags: accumulate as u32,
        y_off: y_off as u32,
        _pad: 0,
    };
    rec.dispatch(&pipe, &[x, y, c], &params, groups)
}

/// Chunks of the token reduction for a gradient of `words` elements over `t` tokens, with room
/// for `scratch_words` of partials: `(tokens per chunk, chunks)`. Depends only on these numbers,
/// so the summation order is fixed.
fn chunking(t: usize, words: usize, scratch_words: usize) -> (usize, usize) {
    let fit = (scratch_words / words.max(1)).max(1);
    let want = t.div_ceil(MIN_CHUNK).clamp(1, MAX_CHUNKS).min(fit);
    let chunk = t.div_ceil(want).max(1);
    (chunk, t.div_ceil(chunk).max(1))
}

/// `G[b·g_b + r·g_r] += alpha·Σ_t big[t·s_big + b]·small[t·s_small + r]` for `b < n_big`,
/// `r < rank`: per token chunk into `scratch`, then summed in chunk order (one chunk: directly).
#[allow(clippy::too_many_arguments)]
fn grad(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    big: Bind<'_>,
    small: Bind<'_>,
    g: Bind<'_>,
    scratch: &GpuBuf,
    (n_big, rank, t): (usize, usize, usize),
    (s_big, s_small): (usize, usize),
    (g_b, g_r): (usize, usize),
    alpha: f32,
) -> Result<(), GpuError> {
    if n_big == 0 || rank == 0 || t == 0 {
        return Ok(());
    }
    let words = n_big * rank;
    let (chunk, n_chunks) = chunking(t, words, (scratch.size / 4) as usize);
    // Token rows of `small` as vec4 when they hold whole vec4s (ranks 8, 16, 32, 64, …).
    let vec4 = rank.is_multiple_of(4) && s_small.is_multiple_of(4);
    let defines = [
        (
            "SMALL_T",
            if vec4 { "vec4<f32>" } else { "f32" }.to_string(),
        ),
        ("SMALL_W", if vec4 { "4u" } else { "1u" }.to_string()),
    ];
    let pipe = gpu.pipeline(&kernel_source!("lora_back"), "main", &defines)?;
    let params = LoraGradParams {
        n_big: n_big as u32,
        rank: rank as u32,
        t: t as u32,
        s_big: s_big as u32,
        s_small: s_small as u32,
        g_b: g_b as u32,
        g_r: g_r as u32,
        chunk: chunk as u32,
        alpha,
        flags: (n_chunks == 1) as u32,
        part_stride: words as u32,
        _pad: 0,
    };
    let groups = [n_big.div_ceil(128) as u32, n_chunks as u32, 1];
    if n_chunks == 1 {
        return rec.dispatch(&pipe, &[big, small, g], &params, groups);
    }
    let part = Bind::Range(scratch, 0, (n_chunks * words * 4) as u64);
    rec.dispatch(&pipe, &[big, small, part], &params, groups)?;
    let sum = gpu.pipeline(&kernel_source!("lora_sum"), "main", &[])?;
    let sp = LoraSumParams {
        size: words as u32,
        n: n_chunks as u32,
        alpha,
        _pad: 0,
    };
    rec.dispatch(
        &sum,
        &[Bind::Range(scratch, 0, (n_chunks * words * 4) as u64), g],
        &sp,
        [words.div_ceil(256) as u32, 1, 1],
    )
}

fn check(what: &str, name: &str, buf: &GpuBuf, elems: usize, shape: &str) -> Result<(), GpuError> {
    if (buf.size as usize) < elems * 4 {
        return Err(bad(
            format!("recording {what}"),
            format!(
                "buffer {:?} ({name}) holds {} bytes, needs {} for {shape} f32",
                buf.label,
                buf.size,
                elems * 4
            ),
        ));
    }
    Ok(())
}

fn check_tensor(what: &str, t: &GpuLoraTensor, rank: usize) -> Result<(), GpuError> {
    check(
        what,
        "A",
        &t.a,
        rank * t.n_in,
        &format!("[{rank}, {}]", t.n_in),
    )?;
    check(
        what,
        "B",
        &t.b,
        t.n_out * rank,
        &format!("[{}, {rank}]", t.n_out),
    )
}

/// Records `u = A·x` (u: `[n_tokens, rank]`, kept for backward) and `y += scale·B·u`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    t: &GpuLoraTensor,
    rank: usize,
    scale: f32,
    x: &GpuBuf,
    u: &GpuBuf,
    y: &GpuBuf,
    n_tokens: usize,
) -> Result<(), GpuError> {
    let what = format!("LoRA forward of blk.{}.{}", t.layer, t.target.gguf_name());
    check_tensor(&what, t, rank)?;
    let nt = n_tokens;
    check(&what, "x", x, nt * t.n_in, &format!("[{nt}, {}]", t.n_in))?;
    check(&what, "u", u, nt * rank, &format!("[{nt}, {rank}]"))?;
    check(&what, "y", y, nt * t.n_out, &format!("[{nt}, {}]", t.n_out))?;
    let tw = token_window(gpu, &what, nt, &[t.n_in, t.n_out, rank])?;
    let a = Bind::Range(&t.a, 0, (rank * t.n_in * 4) as u64);
    let b = Bind::Range(&t.b, 0, (t.n_out * rank * 4) as u64);
    for w in pieces(nt, tw) {
        let n = w.len();
        let xw = win(x, &w, t.n_in);
        let uw = win(u, &w, rank);
        // u[t, r] = Σ_i x[t, i]·A[r, i]
        gemm(
            gpu,
            rec,
            Entry::Down,
            xw,
            a,
            uw,
            (n, rank, t.n_in),
            (t.n_in, 1, 1, t.n_in),
            1.0,
            false,
        )?;
        // y[t, o] += s·Σ_r u[t, r]·B[o, r]
        gemm(
            gpu,
            rec,
            Entry::Up,
            uw,
            b,
            win(y, &w, t.n_out),
            (n, t.n_out, rank),
            (rank, 1, 1, rank),
            scale,
            true,
        )?;
    }
    Ok(())
}

/// LoRA on the LM head (`output.weight`), first half: `u = A·x` for the `n_rows` normed rows
/// x `[n_rows, n_embd]` → u `[n_rows, rank]`. The second half, per vocabulary chunk, is
/// [`lora_head_up`].
pub fn lora_head_down(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    t: &GpuLoraTensor,
    rank: usize,
    x: &GpuBuf,
    u: &GpuBuf,
    n_rows: usize,
) -> Result<(), GpuError> {
    let what = "LoRA forward of output.weight";
    check_tensor(what, t, rank)?;
    check(
        what,
        "x",
        x,
        n_rows * t.n_in,
        &format!("[{n_rows}, {}]", t.n_in),
    )?;
    check(what, "u", u, n_rows * rank, &format!("[{n_rows}, {rank}]"))?;
    // u[i, r] = Σ_k x[i, k]·A[r, k]
    gemm(
        gpu,
        rec,
        Entry::Down,
        Bind::Range(x, 0, (n_rows * t.n_in * 4) as u64),
        Bind::Range(&t.a, 0, (rank * t.n_in * 4) as u64),
        Bind::Range(u, 0, (n_rows * rank * 4) as u64),
        (n_rows, rank, t.n_in),
        (t.n_in, 1, 1, t.n_in),
        1.0,
        false,
    )
}

/// LoRA on the LM head, second half for the vocabulary columns `cols`:
/// `logits[i, j] += scale·Σ_r u[i, r]·B[cols.start + j, r]`, logits `[n_rows, cols.len()]` (the
/// LM head's logits chunk), u `[n_rows, rank]` from [`lora_head_down`], B `[n_vocab, rank]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_head_up(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    t: &GpuLoraTensor,
    rank: usize,
    scale: f32,
    u: &GpuBuf,
    logits: &GpuBuf,
    n_rows: usize,
    cols: Range<usize>,
) -> Result<(), GpuError> {
    let what = "LoRA forward of output.weight";
    check_tensor(what, t, rank)?;
    if cols.end > t.n_out {
        return Err(bad(
            what,
            format!("vocabulary chunk {cols:?} beyond the {} rows of B", t.n_out),
        ));
    }
    check(what, "u", u, n_rows * rank, &format!("[{n_rows}, {rank}]"))?;
    let nc = cols.len();
    check(
        what,
        "logits",
        logits,
        n_rows * nc,
        &format!("[{n_rows}, {nc}]"),
    )?;
    gemm_at(
        gpu,
        rec,
        Entry::Up,
        Bind::Range(u, 0, (n_rows * rank * 4) as u64),
        Bind::Range(&t.b, 0, (t.n_out * rank * 4) as u64),
        cols.start * rank,
        Bind::Range(logits, 0, (n_rows * nc * 4) as u64),
        (n_rows, nc, rank),
        (rank, 1, 1, rank),
        scale,
        true,
    )
}

/// The rows `tokens` of a token-major `[T, width]` f32 buffer, as a binding window.
fn win<'a>(buf: &'a GpuBuf, tokens: &Range<usize>, width: usize) -> Bind<'a> {
    let row = (width * 4) as u64;
    Bind::Range(buf, tokens.start as u64 * row, tokens.len() as u64 * row)
}

/// Given `x` `[n_tokens, n_in]`, `u = A·x` and `dy` `[n_tokens, n_out]`: records
/// `grad_b += scale·dyᵀ·u`, `du = scale·dy·B` (scratch `[n_tokens, rank]`),
/// `grad_a += duᵀ·x`, and `dx += du·A`. Deterministic (fixed-order sums, no atomics).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    t: &GpuLoraTensor,
    rank: usize,
    scale: f32,
    x: &GpuBuf,
    u: &GpuBuf,
    dy: &GpuBuf,
    du: &GpuBuf,
    dx: &GpuBuf,
    n_tokens: usize,
) -> Result<(), GpuError> {
    lora_backward_into(gpu, rec, t, rank, scale, x, u, dy, du, dx, n_tokens, true)
}

/// [`lora_backward`] with the choice of `dx += du·A` (`accumulate_dx`) or `dx = du·A`. `dx` may
/// be the same buffer as `x`: each token window of `x` is read (for `grad_a`) before that window
/// of `dx` is written. Used by LoRA dropout, where `x` is `drop(x)` and `du·A` is masked before
/// it joins the input gradient.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_into(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    t: &GpuLoraTensor,
    rank: usize,
    scale: f32,
    x: &GpuBuf,
    u: &GpuBuf,
    dy: &GpuBuf,
    du: &GpuBuf,
    dx: &GpuBuf,
    n_tokens: usize,
    accumulate_dx: bool,
) -> Result<(), GpuError> {
    let what = format!("LoRA backward of blk.{}.{}", t.layer, t.target.gguf_name());
    check_tensor(&what, t, rank)?;
    let nt = n_tokens;
    let (n_in, n_out) = (t.n_in, t.n_out);
    check(&what, "x", x, nt * n_in, &format!("[{nt}, {n_in}]"))?;
    check(&what, "u", u, nt * rank, &format!("[{nt}, {rank}]"))?;
    check(&what, "dy", dy, nt * n_out, &format!("[{nt}, {n_out}]"))?;
    check(&what, "du", du, nt * rank, &format!("[{nt}, {rank}]"))?;
    check(&what, "dx", dx, nt * n_in, &format!("[{nt}, {n_in}]"))?;
    check(&what, "grad_a", &t.grad_a, rank * n_in, "[rank, n_in]")?;
    check(&what, "grad_b", &t.grad_b, n_out * rank, "[n_out, rank]")?;
    // Token windows keep every token-major binding under the device limit; the weight
    // gradients accumulate window after window in a fixed order.
    let tw = token_window(gpu, &what, nt, &[n_in, n_out, rank])?;
    let a = Bind::Range(&t.a, 0, (rank * n_in * 4) as u64);
    let b = Bind::Range(&t.b, 0, (n_out * rank * 4) as u64);
    let ga = Bind::Range(&t.grad_a, 0, (rank * n_in * 4) as u64);
    let gb = Bind::Range(&t.grad_b, 0, (n_out * rank * 4) as u64);
    for w in pieces(nt, tw) {
        let n = w.len();
        let (xw, uw, dyw, duw) = (
            win(x, &w, n_in),
            win(u, &w, rank),
            win(dy, &w, n_out),
            win(du, &w, rank),
        );
        // grad_b[o, r] += s·Σ_t dy[t, o]·u[t, r]
        grad(
            gpu,
            rec,
            dyw,
            uw,
            gb,
            &t.scratch,
            (n_out, rank, n),
            (n_out, rank),
            (rank, 1),
            scale,
        )?;
        // du[t, r] = s·Σ_o dy[t, o]·B[o, r]
        gemm(
            gpu,
            rec,
            Entry::Down,
            dyw,
            b,
            duw,
            (n, rank, n_out),
            (n_out, 1, rank, 1),
            scale,
            false,
        )?;
        // grad_a[r, i] += Σ_t du[t, r]·x[t, i]
        grad(
            gpu,
            rec,
            xw,
            duw,
            ga,
            &t.scratch,
            (n_in, rank, n),
            (n_in, rank),
            (1, n_in),
            1.0,
        )?;
        // dx[t, i] += Σ_r du[t, r]·A[r, i]
        gemm(
            gpu,
            rec,
            Entry::Up,
            duw,
            a,
            win(dx, &w, n_in),
            (n, n_in, rank),
            (rank, 1, n_in, 1),
            1.0,
            accumulate_dx,
        )?;
    }
    Ok(())
}

// ---- CPU references (f64) --------------------------------------------------------------------

/// Shapes of one LoRA application.
#[derive(Clone, Copy, Debug)]
pub struct LoraShape {
    pub n_tokens: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub rank: usize,
}

/// Forward reference: returns `(u, dy_contrib)` with `u = x·Aᵀ` `[T, rank]` and
/// `s·u·Bᵀ` `[T, n_out]` (what `lora_forward` adds to y).
pub fn lora_forward_ref(
    sh: LoraShape,
    a: &[f64],
    b: &[f64],
    x: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let LoraShape {
        n_tokens,
        n_in,
        n_out,
        rank,
    } = sh;
    let mut u = vec![0.0; n_tokens * rank];
    for t in 0..n_tokens {
        for r in 0..rank {
            u[t * rank + r] = (0..n_in).map(|i| x[t * n_in + i] * a[r * n_in + i]).sum();
        }
    }
    let mut y = vec![0.0; n_tokens * n_out];
    for t in 0..n_tokens {
        for o in 0..n_out {
            y[t * n_out + o] = scale
                * (0..rank)
                    .map(|r| u[t * rank + r] * b[o * rank + r])
                    .sum::<f64>();
        }
    }
    (u, y)
}

/// Gradients of `L` given `dy = ∂L/∂y`.
#[derive(Clone, Debug)]
pub struct LoraGrads {
    /// `[rank, n_in]`
    pub grad_a: Vec<f64>,
    /// `[n_out, rank]`
    pub grad_b: Vec<f64>,
    /// `[T, rank]`: `s·dy·B`
    pub du: Vec<f64>,
    /// `[T, n_in]`: the LoRA path's contribution to ∂L/∂x
    pub dx: Vec<f64>,
}

/// Backward reference for the LoRA path `y_lora = s·(x·Aᵀ)·Bᵀ`.
pub fn lora_backward_ref(
    sh: LoraShape,
    a: &[f64],
    b: &[f64],
    x: &[f64],
    dy: &[f64],
    scale: f64,
) -> LoraGrads {
    let LoraShape {
        n_tokens,
        n_in,
        n_out,
        rank,
    } = sh;
    let (u, _) = lora_forward_ref(sh, a, b, x, scale);
    let mut grad_b = vec![0.0; n_out * rank];
    for o in 0..n_out {
        for r in 0..rank {
            grad_b[o * rank + r] = scale
                * (0..n_tokens)
                    .map(|t| dy[t * n_out + o] * u[t * rank + r])
                    .sum::<f64>();
        }
    }
    let mut du = vec![0.0; n_tokens * rank];
    for t in 0..n_tokens {
        for r in 0..rank {
            du[t * rank + r] = scale
                * (0..n_out)
                    .map(|o| dy[t * n_out + o] * b[o * rank + r])
                    .sum::<f64>();
        }
    }
    let mut grad_a = vec![0.0; rank * n_in];
    for r in 0..rank {
        for i in 0..n_in {
            grad_a[r * n_in + i] = (0..n_tokens)
                .map(|t| du[t * rank + r] * x[t * n_in + i])
                .sum();
        }
    }
    let mut dx = vec![0.0; n_tokens * n_in];
    for t in 0..n_tokens {
        for i in 0..n_in {
            dx[t * n_in + i] = (0..rank).map(|r| du[t * rank + r] * a[r * n_in + i]).sum();
        }
    }
    LoraGrads {
        grad_a,
        grad_b,
        du,
        dx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<LoraGemmParams>(), 48);
        assert_eq!(std::mem::align_of::<LoraGemmParams>(), 4);
        assert_eq!(std::mem::size_of::<LoraGradParams>(), 48);
        assert_eq!(std::mem::size_of::<LoraSumParams>(), 16);
        assert_eq!(std::mem::align_of::<LoraGradParams>(), 4);
    }

    #[test]
    fn chunking_is_fixed_and_covers_every_token() {
        // SmolLM2 ffn_down's grad_a (rank 16 × 1536) at T = 1024: 16 chunks of 64 tokens.
        assert_eq!(chunking(1024, 16 * 1536, 16 * 16 * 1536), (64, 16));
        // T = 4096: 64 chunks of 64 tokens.
        assert_eq!(chunking(4096, 16 * 1536, 64 * 16 * 1536), (64, 64));
        // Few tokens: one chunk, accumulated directly.
        assert_eq!(chunking(64, 100, 1600), (64, 1));
        assert_eq!(chunking(1, 100, 1600), (1, 1));
        // Scratch for 4 partials only.
        assert_eq!(chunking(4096, 1000, 4999), (1024, 4));
        // No room for partials: one chunk.
        assert_eq!(chunking(4096, 1000, 10), (4096, 1));
        for t in [1, 63, 65, 200, 1000, 4097] {
            let (chunk, n) = chunking(t, 10, 160);
            assert!(
                n <= MAX_CHUNKS && chunk * n >= t && chunk * (n - 1) < t,
                "T = {t}"
            );
        }
    }

    /// The CPU backward against central finite differences of `L = Σ dy ⊙ y_lora` in f64.
    #[test]
    fn cpu_backward_matches_finite_differences() {
        let sh = LoraShape {
            n_tokens: 3,
            n_in: 5,
            n_out: 4,
            rank: 2,
        };
        let mut rng = Rng::new(11);
        let mut v = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.normal() as f64).collect() };
        let a = v(sh.rank * sh.n_in);
        let b = v(sh.n_out * sh.rank);
        let x = v(sh.n_tokens * sh.n_in);
        let dy = v(sh.n_tokens * sh.n_out);
        let scale = 0.75;
        let loss = |a: &[f64], b: &[f64], x: &[f64]| -> f64 {
            let (_, y) = lora_forward_ref(sh, a, b, x, scale);
            y.iter().zip(&dy).map(|(p, q)| p * q).sum()
        };
        let g = lora_backward_ref(sh, &a, &b, &x, &dy, scale);
        let h = 1e-5;
        let fd = |which: usize, idx: usize| -> f64 {
            let (mut ap, mut bp, mut xp) = (a.clone(), b.clone(), x.clone());
            let (mut am, mut bm, mut xm) = (a.clone(), b.clone(), x.clone());
            match which {
                0 => {
                    ap[idx] += h;
                    am[idx] -= h;
                }
                1 => {
                    bp[idx] += h;
                    bm[idx] -= h;
                }
                _ => {
                    xp[idx] += h;
                    xm[idx] -= h;
                }
            }
            (loss(&ap, &bp, &xp) - loss(&am, &bm, &xm)) / (2.0 * h)
        };
        for (which, analytic) in [(0, &g.grad_a), (1, &g.grad_b), (2, &g.dx)] {
            for (idx, &an) in analytic.iter().enumerate() {
                let num = fd(which, idx);
                assert!(
                    (num - an).abs() <= 1e-7 * (1.0 + an.abs()),
                    "tensor {which} index {idx}: analytic {an}, finite difference {num}"
                );
            }
        }
        // du is ∂L/∂u: check it through u = x·Aᵀ by perturbing u directly.
        let (u, _) = lora_forward_ref(sh, &a, &b, &x, scale);
        let loss_u = |u: &[f64]| -> f64 {
            let mut s = 0.0;
            for t in 0..sh.n_tokens {
                for o in 0..sh.n_out {
                    let yv: f64 = (0..sh.rank)
                        .map(|r| u[t * sh.rank + r] * b[o * sh.rank + r])
                        .sum();
                    s += scale * yv * dy[t * sh.n_out + o];
                }
            }
            s
        };
        for idx in 0..u.len() {
            let (mut up, mut um) = (u.clone(), u.clone());
            up[idx] += h;
            um[idx] -= h;
            let num = (loss_u(&up) - loss_u(&um)) / (2.0 * h);
            assert!(
                (num - g.du[idx]).abs() <= 1e-7 * (1.0 + num.abs()),
                "du[{idx}]: analytic {}, finite difference {num}",
                g.du[idx]
            );
        }
    }
}
