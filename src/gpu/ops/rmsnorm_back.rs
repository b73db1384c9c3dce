//! Backward of RMSNorm with respect to its input (`kernels/rmsnorm_back.wgsl`, derivative at its
//! top): `dx = r·(dy⊙w) − (r³/n)·x·Σ(dy⊙w⊙x)` per row, from the forward's kept `rstd`.
//! Also used per head for qwen3's Q/K norms (rows = T·heads, dim = head_dim).

use super::check::need_words;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/rmsnorm_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RmsNormBackParams {
    /// Rows.
    pub n_rows: u32,
    /// Elements per row.
    pub dim: u32,
    /// 1: `dx +=`, 0: `dx =`.
    pub accumulate: u32,
    pub _pad0: u32,
}

/// GPU (f32, tree-summed) vs the f64 reference, O(1) inputs, rows ≲ 10³.
pub const RMSNORM_BACK_TOL: Tol = Tol::new(5e-6, 1e-5);

/// Records `dx[r, :] (+)= rmsnorm_back(x[r, :], w, rstd[r], dy[r, :])` for `r < n_rows`.
/// x, dy, dx: `[n_rows, dim]` f32; w: `[dim]`; rstd: `[n_rows]` (from the forward). `dx` must
/// differ from the inputs.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuBuf,
    rstd: &GpuBuf,
    dy: &GpuBuf,
    dx: &GpuBuf,
    n_rows: usize,
    dim: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    if n_rows == 0 {
        return Ok(());
    }
    let shape = format!("rmsnorm backward [{n_rows}, {dim}]");
    let op = "rmsnorm backward";
    need_words(op, x, n_rows * dim, &shape)?;
    need_words(op, w, dim, &shape)?;
    need_words(op, rstd, n_rows, &shape)?;
    need_words(op, dy, n_rows * dim, &shape)?;
    need_words(op, dx, n_rows * dim, &shape)?;
    let wg = [("WG", super::rmsnorm::norm_workgroup(gpu).to_string())];
    let p = gpu.pipeline(&kernel_source!("rmsnorm_back"), "main", &wg)?;
    rec.dispatch(
        &p,
        &[
            Bind::Whole(x),
            Bind::Whole(w),
            Bind::Whole(rstd),
            Bind::Whole(dy),
            Bind::Whole(dx),
        ],
        &RmsNormBackParams {
            n_rows: n_rows as u32,
            dim: dim as u32,
            accumulate: accumulate as u32,
            _pad0: 0,
        },
        groups(n_rows as u32),
    )
}

/// CPU reference: [`crate::model::reference::rmsnorm_back`] in f64, rounded to f32.
pub fn rmsnorm_backward_ref(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    crate::model::reference::rmsnorm_back(&wide(x), w.len(), w, eps as f64, &wide(dy))
        .into_iter()
        .map(|v| v as f32)
        .collect()
}
