//! SwiGLU `y = silu(gate) ⊙ up` (`kernels/swiglu.wgsl`); the residual add is `ops::add` (or a
//! matmul with `accumulate`).

use super::check::{narrow, need_words, wide};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/swiglu.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SwigluParams {
    /// Elements.
    pub n: u32,
    pub _pad: [u32; 3],
}

/// GPU f32 `exp` and division vs f64.
pub const SWIGLU_TOL: Tol = Tol::new(1e-6, 2e-6);

/// Records `y[i] = silu(gate[i])·up[i]` for `i < n`. gate, up, y: `[n]` f32 (y distinct).
pub fn swiglu(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    gate: &GpuBuf,
    up: &GpuBuf,
    y: &GpuBuf,
    n: usize,
) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    let shape = format!("swiglu of {n} elements");
    need_words("swiglu", gate, n, &shape)?;
    need_words("swiglu", up, n, &shape)?;
    need_words("swiglu", y, n, &shape)?;
    let p = gpu.pipeline(&kernel_source!("swiglu"), "main", &[])?;
    let params = SwigluParams {
        n: n as u32,
        _pad: [0; 3],
    };
    rec.dispatch(
        &p,
        &[Bind::Whole(gate), Bind::Whole(up), Bind::Whole(y)],
        &params,
        groups((n as u32).div_ceil(256)),
    )
}

/// `silu(z) = z·σ(z)` in f64.
pub fn silu(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

/// CPU reference: [`crate::model::reference::swiglu_fwd`] in f64.
pub fn swiglu_ref(gate: &[f32], up: &[f32]) -> Vec<f32> {
    narrow(crate::model::reference::swiglu_fwd(&wide(gate), &wide(up)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<SwigluParams>(), 16);
        assert_eq!(std::mem::align_of::<SwigluParams>(), 4);
    }

    fn run(gpu: &Gpu, g: &[f32], u: &[f32]) -> Vec<f32> {
        let gb = gpu.upload("gate", g).unwrap();
        let ub = gpu.upload("up", u).unwrap();
        let yb = gpu.alloc("y", (g.len() * 4) as u64).unwrap();
        let mut rec = gpu.recorder();
        swiglu(gpu, &mut rec, &gb, &ub, &yb, g.len()).unwrap();
        rec.run("swiglu test").unwrap();
        gpu.read::<f32>(&yb).unwrap()[..g.len()].to_vec()
    }

    #[test]
    fn swiglu_matches_reference_at_awkward_sizes() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(41);
        for n in [1usize, 255, 257, 1001] {
            let g = rng.normal_vec(n, 4.0);
            let u = rng.normal_vec(n, 1.0);
            assert_close(
                &format!("swiglu n {n}"),
                &run(&gpu, &g, &u),
                &swiglu_ref(&g, &u),
                SWIGLU_TOL,
            );
        }
    }

    #[test]
    fn swiglu_fixed_case() {
        // silu(0) = 0; silu(ln 3) = ln 3 · 3/4; silu(−200) = −0 (no NaN); silu(200) = 200.
        let gpu = crate::gpu::test_device();
        let l3 = 3f32.ln();
        let got = run(&gpu, &[0.0, l3, -200.0, 200.0], &[5.0, 2.0, 1.0, 0.5]);
        let want = [0.0, l3 as f64 * 0.75 * 2.0, 0.0, 100.0];
        assert_close("swiglu fixed", &got, &want, SWIGLU_TOL);
    }
}
