//! Backward of RoPE: the rotation R(θ) of each pair is orthogonal, so `dx = R(θ)ᵀ·dy = R(−θ)·dy`
//! (NORM and NEOX alike; dims ≥ n_rot pass the gradient through). This is the forward kernel
//! `kernels/rope.wgsl` run with `sign = −1` (its header states the derivative), so the backward
//! uses exactly the forward's angles: no second copy of the angle code to drift.

use super::rope::{RopeConfig, rope_inplace};
use crate::gpu::{Gpu, GpuBuf, GpuError, Recorder};
use crate::model::reference::RopeParams;

/// Records `dx ← R(θ)ᵀ·dx` in place on `[n_rows, n_heads, head_dim]`, positions `pos` `[n_rows]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward_inplace(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    cfg: &RopeConfig,
    table: &GpuBuf,
    pos: &GpuBuf,
    dx: &GpuBuf,
    n_rows: usize,
    n_heads: usize,
) -> Result<(), GpuError> {
    rope_inplace(gpu, rec, cfg, table, pos, dx, n_rows, n_heads, true)
}

/// CPU reference for one sequence (row t at position t): [`crate::model::reference::rope_back`].
pub fn rope_backward_ref(dy: &[f32], n_heads: usize, cfg: &RopeConfig) -> Vec<f32> {
    let p = RopeParams {
        kind: cfg.kind,
        n_rot: cfg.n_rot,
        base: cfg.base as f64,
        pos_scale: cfg.pos_scale as f64,
        freqs: cfg
            .freqs
            .as_ref()
            .map(|f| f.iter().map(|&v| v as f64).collect()),
    };
    let wide: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
    crate::model::reference::rope_back(&wide, n_heads, cfg.head_dim, &p)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}
