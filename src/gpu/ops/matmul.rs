//! `y = x·Wᵀ (+ bias)` and `dx = dy·W` with W in any supported GGUF type, dequantized in
//! registers. (Stub API — implementation pending; signatures are what other code builds on.)

use crate::gguf::GgmlType;
use crate::gpu::{Gpu, GpuBuf, GpuError, Recorder};
use crate::model::TensorRef;
use std::ops::Range;

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

impl GpuWeight {
    /// Uploads a weight as stored (no f32 copy), split into chunks under the binding limit.
    pub fn upload(_gpu: &Gpu, _t: &TensorRef<'_>) -> Result<GpuWeight, GpuError> {
        todo!()
    }

    /// Uploads raw block bytes of an `[n_out, n_in]` matrix of type `ty`.
    pub fn upload_raw(
        _gpu: &Gpu,
        _name: &str,
        _ty: GgmlType,
        _n_in: usize,
        _n_out: usize,
        _bytes: &[u8],
    ) -> Result<GpuWeight, GpuError> {
        todo!()
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buf.size).sum()
    }
}

/// Records `y[t, :] = x[t, :]·Wᵀ (+ bias)` for `t < n_tokens` (or `+=` when `accumulate`).
/// x: `[n_tokens, n_in]` f32, y: `[n_tokens, n_out]` f32, bias: `[n_out]` f32.
pub fn matmul(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _x: &GpuBuf,
    _w: &GpuWeight,
    _bias: Option<&GpuBuf>,
    _y: &GpuBuf,
    _n_tokens: usize,
    _accumulate: bool,
) -> Result<(), GpuError> {
    todo!()
}

/// Records `y[t, r - rows.start] = x[t, :]·W[r, :]` for rows `r` in `rows` (LM-head vocabulary
/// chunks). y: `[n_tokens, rows.len()]` f32.
pub fn matmul_rows(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _x: &GpuBuf,
    _w: &GpuWeight,
    _rows: Range<usize>,
    _y: &GpuBuf,
    _n_tokens: usize,
) -> Result<(), GpuError> {
    todo!()
}

/// Records `dx[t, :] (+)= dy[t, :]·W` (the weight used transposed). dy: `[n_tokens, n_out]`.
pub fn matmul_back_input(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _dy: &GpuBuf,
    _w: &GpuWeight,
    _dx: &GpuBuf,
    _n_tokens: usize,
    _accumulate: bool,
) -> Result<(), GpuError> {
    todo!()
}

/// Records `dx[t, :] (+)= Σ_{r ∈ rows} dy[t, r - rows.start]·W[r, :]` (LM-head chunks).
/// dy: `[n_tokens, rows.len()]`.
pub fn matmul_rows_back_input(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _dy: &GpuBuf,
    _w: &GpuWeight,
    _rows: Range<usize>,
    _dx: &GpuBuf,
    _n_tokens: usize,
    _accumulate: bool,
) -> Result<(), GpuError> {
    todo!()
}
