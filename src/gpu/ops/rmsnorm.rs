//! RMSNorm `y = x / sqrt(mean(x²) + eps) · w` over rows, keeping the per-row `1/rms` (rstd) for
//! the backward pass. Kernel: `kernels/rmsnorm.wgsl` (one workgroup per row, tree reduction;
//! [`norm_workgroup`] invocations per workgroup).

use super::check::{narrow, need_words, wide};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/rmsnorm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RmsNormParams {
    /// Rows.
    pub n_rows: u32,
    /// Elements per row.
    pub dim: u32,
    /// Added to mean(x²) inside the square root.
    pub eps: f32,
    pub _pad0: u32,
}

/// Tests set this to force the workgroup size of the RMSNorm kernels (0: the device's).
#[doc(hidden)]
pub static TEST_NORM_WORKGROUP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Invocations per workgroup of `kernels/rmsnorm.wgsl` and `kernels/rmsnorm_back.wgsl`: 256 on
/// GPUs, 8 on CPU adapters. lavapipe runs a workgroup as SIMD groups of 8 that switch at every
/// barrier, so 8 invocations (one SIMD group) and 4 barriers per row cost far less than 256 and
/// 9 (the loads are the same); the tree's shape changes the sum's rounding, so results are
/// deterministic per device, not across devices.
pub fn norm_workgroup(gpu: &Gpu) -> u32 {
    match TEST_NORM_WORKGROUP.load(std::sync::atomic::Ordering::Relaxed) {
        0 if gpu.is_cpu_adapter() => 8,
        0 => 256,
        n => n,
    }
}

/// GPU (f32, tree-summed) vs the f64 reference, for rows of ≤ a few thousand O(1) values.
pub const RMSNORM_TOL: Tol = Tol::new(2e-6, 2e-6);

/// Records `y[r, :] = x[r, :] · rstd[r] · w` and `rstd[r] = 1/sqrt(mean(x[r, :]²) + eps)` for
/// `r < n_rows`. x, y: `[n_rows, dim]` f32; w: `[dim]` f32; rstd: `[n_rows]` f32.
/// `x` and `y` must be different buffers.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    w: &GpuBuf,
    y: &GpuBuf,
    rstd: &GpuBuf,
    n_rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), GpuError> {
    if n_rows == 0 {
        return Ok(());
    }
    let shape = format!("rmsnorm [{n_rows}, {dim}]");
    need_words("rmsnorm", x, n_rows * dim, &shape)?;
    need_words("rmsnorm", w, dim, &shape)?;
    need_words("rmsnorm", y, n_rows * dim, &shape)?;
    need_words("rmsnorm", rstd, n_rows, &shape)?;
    let wg = [("WG", norm_workgroup(gpu).to_string())];
    let p = gpu.pipeline(&kernel_source!("rmsnorm"), "main", &wg)?;
    let params = RmsNormParams {
        n_rows: n_rows as u32,
        dim: dim as u32,
        eps,
        _pad0: 0,
    };
    rec.dispatch(
        &p,
        &[
            Bind::Whole(x),
            Bind::Whole(w),
            Bind::Whole(y),
            Bind::Whole(rstd),
        ],
        &params,
        groups(n_rows as u32),
    )
}

/// CPU reference: `y` from [`crate::model::reference::rmsnorm_fwd`] (f64) and the per-row
/// `rstd` the kernel also writes; returns `(y [n_rows, dim], rstd [n_rows])`.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let y = crate::model::reference::rmsnorm_fwd(&wide(x), dim, w, eps as f64);
    let rstd = x
        .chunks_exact(dim)
        .map(|row| {
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
            (1.0 / (ms + eps as f64).sqrt()) as f32
        })
        .collect();
    (narrow(y), rstd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<RmsNormParams>(), 16);
        assert_eq!(std::mem::align_of::<RmsNormParams>(), 4);
    }

    fn run(gpu: &Gpu, x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
        let n_rows = x.len() / dim;
        let xb = gpu.upload("x", x).unwrap();
        let wb = gpu.upload("w", w).unwrap();
        let yb = gpu.alloc("y", (x.len() * 4) as u64).unwrap();
        let rb = gpu.alloc("rstd", (n_rows * 4) as u64).unwrap();
        let mut rec = gpu.recorder();
        rmsnorm(gpu, &mut rec, &xb, &wb, &yb, &rb, n_rows, dim, eps).unwrap();
        rec.run("rmsnorm test").unwrap();
        let y: Vec<f32> = gpu.read(&yb).unwrap();
        let r: Vec<f32> = gpu.read(&rb).unwrap();
        (y[..x.len()].to_vec(), r[..n_rows].to_vec())
    }

    #[test]
    fn rmsnorm_matches_reference_at_awkward_sizes() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(11);
        for (n_rows, dim) in [(1usize, 1usize), (3, 7), (5, 255), (2, 257), (17, 600)] {
            let x = rng.normal_vec(n_rows * dim, 1.5);
            let w: Vec<f32> = (0..dim).map(|_| rng.uniform(0.5, 1.5)).collect();
            let (gy, gr) = run(&gpu, &x, &w, dim, 1e-5);
            let (wy, wr) = rmsnorm_ref(&x, &w, dim, 1e-5);
            assert_close(
                &format!("rmsnorm y [{n_rows},{dim}]"),
                &gy,
                &wy,
                RMSNORM_TOL,
            );
            assert_close(
                &format!("rmsnorm rstd [{n_rows},{dim}]"),
                &gr,
                &wr,
                RMSNORM_TOL,
            );
        }
    }

    #[test]
    fn rmsnorm_fixed_case() {
        // Row (3, 4): mean(x²) = 12.5, eps = 0 → rstd = 1/√12.5; y = (3, 4)·rstd·(1, 2).
        // Row (0, 0) with eps = 0.25: rstd = 2, y = 0.
        let gpu = crate::gpu::test_device();
        let (y, r) = run(&gpu, &[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let rs = 1.0 / 12.5f64.sqrt();
        assert_close("fixed y", &y, &[3.0 * rs, 8.0 * rs], RMSNORM_TOL);
        assert_close("fixed rstd", &r, &[rs], RMSNORM_TOL);
        let (y, r) = run(&gpu, &[0.0, 0.0], &[1.0, 2.0], 2, 0.25);
        assert_close("zero row y", &y, &[0.0f32, 0.0], Tol::new(0.0, 0.0));
        assert_close("zero row rstd", &r, &[2.0f32], RMSNORM_TOL);
    }

    #[test]
    fn too_small_buffer_is_an_error() {
        let gpu = crate::gpu::test_device();
        let x = gpu.upload("x", &[1.0f32; 6]).unwrap();
        let w = gpu.upload("w", &[1.0f32; 3]).unwrap();
        let y = gpu.alloc("y", 16).unwrap();
        let r = gpu.alloc("r", 8).unwrap();
        let mut rec = gpu.recorder();
        let e = rmsnorm(&gpu, &mut rec, &x, &w, &y, &r, 2, 3, 1e-5).unwrap_err();
        assert!(
            e.to_string().contains("\"y\" holds 4") && e.to_string().contains("needs 6"),
            "{e}"
        );
    }
}
