//! Backward of SwiGLU `y = silu(g)⊙u` (`kernels/swiglu_back.wgsl`, derivative at its top),
//! in place: the gate buffer becomes `dg`, the up buffer `du`.

use super::check::need_words;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/swiglu_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SwigluBackParams {
    /// Elements.
    pub n: u32,
    pub _pad: [u32; 3],
}

/// GPU f32 `exp` and products vs f64.
pub const SWIGLU_BACK_TOL: Tol = Tol::new(2e-6, 5e-6);

/// Records `(gate, up) ← (dg, du)` for `dy` (all `[n]` f32, three distinct buffers).
pub fn swiglu_backward_inplace(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    dy: &GpuBuf,
    gate: &GpuBuf,
    up: &GpuBuf,
    n: usize,
) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    let shape = format!("swiglu backward of {n} elements");
    need_words("swiglu backward", dy, n, &shape)?;
    need_words("swiglu backward", gate, n, &shape)?;
    need_words("swiglu backward", up, n, &shape)?;
    let p = gpu.pipeline(&kernel_source!("swiglu_back"), "main", &[])?;
    rec.dispatch(
        &p,
        &[Bind::Whole(dy), Bind::Whole(gate), Bind::Whole(up)],
        &SwigluBackParams {
            n: n as u32,
            _pad: [0; 3],
        },
        groups((n as u32).div_ceil(256)),
    )
}

/// CPU reference: [`crate::model::reference::swiglu_back`] in f64; returns `(dg, du)`.
pub fn swiglu_backward_ref(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (dg, du) = crate::model::reference::swiglu_back(&wide(gate), &wide(up), &wide(dy));
    (
        dg.into_iter().map(|v| v as f32).collect(),
        du.into_iter().map(|v| v as f32).collect(),
    )
}
