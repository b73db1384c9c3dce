//! Residual add `x += y` (in place).

use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;

/// Params of `kernels/add.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AddParams {
    /// Elements.
    pub n: u32,
    pub _pad: [u32; 3],
}

/// Records `x[..n] += y[..n]`.
pub fn add_inplace(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    y: &GpuBuf,
    n: usize,
) -> Result<(), GpuError> {
    let p = gpu.pipeline(&kernel_source!("add"), "main", &[])?;
    let params = AddParams {
        n: n as u32,
        _pad: [0; 3],
    };
    rec.dispatch(
        &p,
        &[Bind::Whole(y), Bind::Whole(x)],
        &params,
        groups((n as u32).div_ceil(256)),
    )
}

/// CPU reference.
pub fn add_ref(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, Tol, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<AddParams>(), 16);
        assert_eq!(std::mem::align_of::<AddParams>(), 4);
    }

    #[test]
    fn add_matches_reference_at_awkward_sizes() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(1);
        for n in [1usize, 255, 257, 1000] {
            let x0 = rng.normal_vec(n, 1.0);
            let y0 = rng.normal_vec(n, 1.0);
            let x = gpu.upload("x", &x0).unwrap();
            let y = gpu.upload("y", &y0).unwrap();
            let mut rec = gpu.recorder();
            add_inplace(&gpu, &mut rec, &x, &y, n).unwrap();
            rec.run("add test").unwrap();
            let got: Vec<f32> = gpu.read(&x).unwrap();
            let mut want = x0.clone();
            add_ref(&mut want, &y0);
            assert_close("add", &got[..n], &want, Tol::new(0.0, 0.0));
        }
    }
}
