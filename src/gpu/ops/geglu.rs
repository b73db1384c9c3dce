//! GeGLU `y = gelu_tanh(gate) ⊙ up` (gemma3's FFN activation, `kernels/geglu.wgsl`) and its
//! in-place backward (`kernels/geglu_back.wgsl`, derivative at its top), tested against the f64
//! reference (`model::reference::geglu_fwd` / `geglu_back`). Not yet wired into the GPU graph:
//! the wgpu engine refuses gemma3 (`gpu::forward::GpuModel::from_weights`).

use super::check::{narrow, need_words, wide};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::util::Tol;

/// Params of `kernels/geglu.wgsl` and `kernels/geglu_back.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GegluParams {
    /// Elements.
    pub n: u32,
    pub _pad: [u32; 3],
}

/// GPU f32 `tanh` and products vs f64.
pub const GEGLU_TOL: Tol = Tol::new(2e-6, 5e-6);

/// Records `y[i] = gelu_tanh(gate[i])·up[i]` for `i < n`. gate, up, y: `[n]` f32 (y distinct).
pub fn geglu(
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
    let shape = format!("geglu of {n} elements");
    need_words("geglu", gate, n, &shape)?;
    need_words("geglu", up, n, &shape)?;
    need_words("geglu", y, n, &shape)?;
    let p = gpu.pipeline(&kernel_source!("geglu"), "main", &[])?;
    rec.dispatch(
        &p,
        &[Bind::Whole(gate), Bind::Whole(up), Bind::Whole(y)],
        &GegluParams {
            n: n as u32,
            _pad: [0; 3],
        },
        groups((n as u32).div_ceil(256)),
    )
}

/// Records `(gate, up) ← (dg, du)` for `dy` (all `[n]` f32, three distinct buffers).
pub fn geglu_backward_inplace(
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
    let shape = format!("geglu backward of {n} elements");
    need_words("geglu backward", dy, n, &shape)?;
    need_words("geglu backward", gate, n, &shape)?;
    need_words("geglu backward", up, n, &shape)?;
    let p = gpu.pipeline(&kernel_source!("geglu_back"), "main", &[])?;
    rec.dispatch(
        &p,
        &[Bind::Whole(dy), Bind::Whole(gate), Bind::Whole(up)],
        &GegluParams {
            n: n as u32,
            _pad: [0; 3],
        },
        groups((n as u32).div_ceil(256)),
    )
}

/// CPU reference of [`geglu`]: [`crate::model::reference::geglu_fwd`] in f64.
pub fn geglu_ref(gate: &[f32], up: &[f32]) -> Vec<f32> {
    narrow(crate::model::reference::geglu_fwd(&wide(gate), &wide(up)))
}

/// CPU reference of [`geglu_backward_inplace`]: [`crate::model::reference::geglu_back`] in f64;
/// returns `(dg, du)`.
pub fn geglu_backward_ref(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (dg, du) = crate::model::reference::geglu_back(&wide(gate), &wide(up), &wide(dy));
    (narrow(dg), narrow(du))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<GegluParams>(), 16);
        assert_eq!(std::mem::align_of::<GegluParams>(), 4);
    }

    fn run(gpu: &Gpu, g: &[f32], u: &[f32]) -> Vec<f32> {
        let gb = gpu.upload("gate", g).unwrap();
        let ub = gpu.upload("up", u).unwrap();
        let yb = gpu.alloc("y", (g.len() * 4) as u64).unwrap();
        let mut rec = gpu.recorder();
        geglu(gpu, &mut rec, &gb, &ub, &yb, g.len()).unwrap();
        rec.run("geglu test").unwrap();
        gpu.read::<f32>(&yb).unwrap()[..g.len()].to_vec()
    }

    fn run_back(gpu: &Gpu, g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let db = gpu.upload("dy", dy).unwrap();
        let gb = gpu.upload("gate", g).unwrap();
        let ub = gpu.upload("up", u).unwrap();
        let mut rec = gpu.recorder();
        geglu_backward_inplace(gpu, &mut rec, &db, &gb, &ub, g.len()).unwrap();
        rec.run("geglu backward test").unwrap();
        (
            gpu.read::<f32>(&gb).unwrap()[..g.len()].to_vec(),
            gpu.read::<f32>(&ub).unwrap()[..g.len()].to_vec(),
        )
    }

    #[test]
    fn geglu_matches_reference_at_awkward_sizes() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(43);
        for n in [1usize, 255, 257, 1001] {
            let g = rng.normal_vec(n, 4.0);
            let u = rng.normal_vec(n, 1.0);
            let dy = rng.normal_vec(n, 1.0);
            assert_close(
                &format!("geglu n {n}"),
                &run(&gpu, &g, &u),
                &geglu_ref(&g, &u),
                GEGLU_TOL,
            );
            let (dg, du) = run_back(&gpu, &g, &u, &dy);
            let (wg, wu) = geglu_backward_ref(&g, &u, &dy);
            assert_close(&format!("geglu dg n {n}"), &dg, &wg, GEGLU_TOL);
            assert_close(&format!("geglu du n {n}"), &du, &wu, GEGLU_TOL);
        }
    }

    #[test]
    fn geglu_fixed_and_extreme_cases() {
        // gelu(0) = 0; gelu(±200) = 200 / 0 without NaN; gelu(1) = 0.8411919906…
        let gpu = crate::gpu::test_device();
        let got = run(&gpu, &[0.0, 1.0, -200.0, 200.0], &[5.0, 2.0, 1.0, 0.5]);
        let want = [0.0, 0.841_191_990_608_276_8 * 2.0, 0.0, 100.0];
        assert_close("geglu fixed", &got, &want, GEGLU_TOL);
        let (dg, du) = run_back(&gpu, &[-200.0, 200.0], &[1.0, 1.0], &[1.0, 1.0]);
        assert_close("geglu dg tails", &dg, &[0.0, 1.0], GEGLU_TOL);
        assert_close("geglu du tails", &du, &[0.0, 200.0], GEGLU_TOL);
    }
}
