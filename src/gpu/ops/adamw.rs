//! AdamW on the GPU (`kernels/adamw.wgsl`) and the deterministic global gradient norm that feeds
//! its clip factor (`kernels/grad_norm.wgsl`).
//!
//! One optimizer step is recorded without any readback: grad-norm partials for every gradient
//! buffer → one finishing workgroup writing `[Σ g², clip factor]` to a small buffer → the AdamW
//! kernel on every (param, grad, m, v) set, reading the factor from that buffer. The norm is
//! computed **on the GPU** with fixed-order sums (no atomics), so it is bit-identical from run to
//! run; [`GpuAdamW::finish_step`] reads the 8 bytes back afterwards for logging. A non-finite
//! norm makes the kernel skip the update (parameters and moments unchanged) and `finish_step`
//! report it.
//!
//! CPU references: `optim::{adamw_update, global_norm, clip_factor}`; [`adamw_ref`]
//! mirrors the kernel's use of the clip buffer.

use crate::gpu::memory::NORM_CHUNK;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::optim::{AdamW, AdamWConfig, AdamWScalars, Clip, OptimError, adamw_update};

/// Params of `kernels/adamw.wgsl` (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWParams {
    /// Elements.
    pub n: u32,
    pub _pad: [u32; 3],
    pub grad_scale: f32,
    /// `1 − lr·wd`.
    pub decay: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^t)`.
    pub sqrt_bc2: f32,
    pub eps: f32,
}

impl AdamWParams {
    pub fn new(n: usize, s: &AdamWScalars) -> AdamWParams {
        AdamWParams {
            n: n as u32,
            _pad: [0; 3],
            grad_scale: s.grad_scale,
            decay: s.decay,
            beta2: s.beta2,
            one_minus_beta1: s.one_minus_beta1,
            one_minus_beta2: s.one_minus_beta2,
            step_size: s.step_size,
            sqrt_bc2: s.sqrt_bc2,
            eps: s.eps,
        }
    }
}

/// Params of `kernels/grad_norm.wgsl` (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GradNormParams {
    /// `partial`: elements of the gradient; `finish`: number of partials.
    pub n: u32,
    /// `partial`: first partial slot written.
    pub slot: u32,
    /// `finish`: clip threshold (≤ 0 disables clipping).
    pub max_norm: f32,
    pub _pad: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuOptimError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Optim(#[from] OptimError),
}

/// Records one AdamW update of `n` elements: `param`, `m`, `v` in place from `grad`, with the
/// gradient multiplied by `clip[1]·s.grad_scale`; skipped when `clip[0]` is not finite.
/// clip: `[2]` f32 = `[Σ g², factor]` (from [`GradNorm`], or written by the caller).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    grad: &GpuBuf,
    clip: &GpuBuf,
    param: &GpuBuf,
    m: &GpuBuf,
    v: &GpuBuf,
    n: usize,
    s: &AdamWScalars,
) -> Result<(), GpuError> {
    let p = gpu.pipeline(&kernel_source!("adamw"), "main", &[])?;
    rec.dispatch(
        &p,
        &[
            Bind::Whole(grad),
            Bind::Range(clip, 0, 8),
            Bind::Whole(param),
            Bind::Whole(m),
            Bind::Whole(v),
        ],
        &AdamWParams::new(n, s),
        groups((n as u32).div_ceil(256)),
    )
}

/// CPU reference of [`adamw_step`] (the kernel's use of the clip buffer around
/// [`adamw_update`]): the gradient scale is `clip[1]·s.grad_scale` in f32.
pub fn adamw_ref(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    clip: [f32; 2],
    s: &AdamWScalars,
) {
    if !clip[0].is_finite() {
        return;
    }
    let mut s2 = *s;
    s2.grad_scale = clip[1] * s.grad_scale;
    for i in 0..param.len() {
        adamw_update(&mut param[i], &mut m[i], &mut v[i], grad[i], &s2);
    }
}

/// The global L2 norm of a set of gradient buffers and its clip factor, on the GPU.
#[derive(Debug)]
pub struct GradNorm {
    sizes: Vec<usize>,
    /// First partial slot of each gradient buffer.
    slots: Vec<u32>,
    n_partials: usize,
    /// `[n_partials]` f32.
    partials: GpuBuf,
    /// `[2]` f32: `[Σ g², clip factor]` (the AdamW kernel's `clip` input).
    pub out: GpuBuf,
}

impl GradNorm {
    /// For gradient buffers of `sizes` elements, in the order they will be passed to `record`.
    pub fn new(gpu: &Gpu, sizes: &[usize]) -> Result<GradNorm, GpuError> {
        let mut slots = Vec::with_capacity(sizes.len());
        let mut n = 0usize;
        for &s in sizes {
            slots.push(n as u32);
            n += s.div_ceil(NORM_CHUNK);
        }
        Ok(GradNorm {
            sizes: sizes.to_vec(),
            slots,
            n_partials: n,
            partials: gpu.alloc("grad-norm partials", (n.max(1) * 4) as u64)?,
            out: gpu.alloc("grad-norm out", 8)?,
        })
    }

    /// Records the norm of `grads` (same order and sizes as at construction) and the clip
    /// factor for `max_norm` (`None`: factor 1) into [`Self::out`].
    pub fn record(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder<'_>,
        grads: &[&GpuBuf],
        max_norm: Option<f64>,
    ) -> Result<(), GpuError> {
        assert_eq!(grads.len(), self.sizes.len(), "GradNorm: buffer count");
        let src = kernel_source!("grad_norm");
        let partial = gpu.pipeline(&src, "partial", &[])?;
        let finish = gpu.pipeline(&src, "finish", &[])?;
        for ((g, &n), &slot) in grads.iter().zip(&self.sizes).zip(&self.slots) {
            if n == 0 {
                continue;
            }
            let params = GradNormParams {
                n: n as u32,
                slot,
                max_norm: 0.0,
                _pad: 0,
            };
            rec.dispatch(
                &partial,
                &[Bind::Whole(g), Bind::Whole(&self.partials)],
                &params,
                groups(n.div_ceil(NORM_CHUNK) as u32),
            )?;
        }
        let params = GradNormParams {
            n: self.n_partials as u32,
            slot: 0,
            max_norm: max_norm.unwrap_or(0.0) as f32,
            _pad: 0,
        };
        rec.dispatch(
            &finish,
            &[Bind::Whole(&self.partials), Bind::Whole(&self.out)],
            &params,
            [1, 1, 1],
        )
    }

    /// Reads `(Σ g², clip factor)` back (waits for submitted work).
    pub fn read(&self, gpu: &Gpu) -> Result<(f32, f32), GpuError> {
        let v: Vec<f32> = gpu.read(&self.out)?;
        Ok((v[0], v[1]))
    }
}

/// AdamW state on the device for a list of parameter buffers (e.g. every LoRA A and B, in
/// `flatten_lora` order), with the global-norm clipping that precedes each update.
#[derive(Debug)]
pub struct GpuAdamW {
    pub cfg: AdamWConfig,
    /// Updates applied so far.
    pub step: u64,
    pub sizes: Vec<usize>,
    /// First moments, one buffer per parameter buffer.
    pub m: Vec<GpuBuf>,
    /// Second moments.
    pub v: Vec<GpuBuf>,
    pub norm: GradNorm,
}

impl GpuAdamW {
    /// Zero moments for parameter buffers of `sizes` elements.
    pub fn new(gpu: &Gpu, cfg: AdamWConfig, sizes: &[usize]) -> Result<GpuAdamW, GpuOptimError> {
        Self::from_state(gpu, &AdamW::new(cfg, sizes.iter().sum())?, sizes)
    }

    /// Uploads a CPU state (moments flattened in buffer order), e.g. from a checkpoint.
    pub fn from_state(gpu: &Gpu, st: &AdamW, sizes: &[usize]) -> Result<GpuAdamW, GpuOptimError> {
        st.cfg.validate()?;
        let total: usize = sizes.iter().sum();
        if st.m.len() != total || st.v.len() != total {
            return Err(OptimError::LengthMismatch {
                what: "optimizer state",
                got: st.m.len().min(st.v.len()),
                expected: total,
            }
            .into());
        }
        let (mut m, mut v) = (Vec::new(), Vec::new());
        let mut off = 0;
        for (i, &n) in sizes.iter().enumerate() {
            m.push(gpu.upload(&format!("adam m {i}"), &st.m[off..off + n])?);
            v.push(gpu.upload(&format!("adam v {i}"), &st.v[off..off + n])?);
            off += n;
        }
        Ok(GpuAdamW {
            cfg: st.cfg,
            step: st.step,
            sizes: sizes.to_vec(),
            m,
            v,
            norm: GradNorm::new(gpu, sizes)?,
        })
    }

    /// Reads the state back (for checkpoints), moments flattened in buffer order.
    pub fn state(&self, gpu: &Gpu) -> Result<AdamW, GpuError> {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, &n) in self.sizes.iter().enumerate() {
            m.extend(gpu.read_range::<f32>(&self.m[i], 0, (n * 4) as u64)?);
            v.extend(gpu.read_range::<f32>(&self.v[i], 0, (n * 4) as u64)?);
        }
        Ok(AdamW {
            cfg: self.cfg,
            step: self.step,
            m,
            v,
        })
    }

    /// Records one update: the global norm of `grads` and its clip factor, then AdamW on every
    /// buffer at learning rate `lr` (gradients also multiplied by `grad_scale`). Call
    /// [`Self::finish_step`] after the recorder has run.
    #[allow(clippy::too_many_arguments)]
    pub fn record_step(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder<'_>,
        params: &[&GpuBuf],
        grads: &[&GpuBuf],
        lr: f64,
        grad_scale: f64,
        max_norm: Option<f64>,
    ) -> Result<AdamWScalars, GpuError> {
        assert_eq!(params.len(), self.sizes.len(), "GpuAdamW: param buffers");
        assert_eq!(grads.len(), self.sizes.len(), "GpuAdamW: grad buffers");
        self.norm.record(gpu, rec, grads, max_norm)?;
        let s = AdamWScalars::new(&self.cfg, self.step + 1, lr, grad_scale);
        for i in 0..self.sizes.len() {
            if self.sizes[i] == 0 {
                continue;
            }
            adamw_step(
                gpu,
                rec,
                grads[i],
                &self.norm.out,
                params[i],
                &self.m[i],
                &self.v[i],
                self.sizes[i],
                &s,
            )?;
        }
        self.step += 1;
        Ok(s)
    }

    /// Reads the step's pre-clip gradient norm and clip factor. A non-finite norm means the
    /// kernel skipped the update: the step count is rolled back and the error says so.
    pub fn finish_step(&mut self, gpu: &Gpu) -> Result<Clip, GpuOptimError> {
        let (ss, factor) = self.norm.read(gpu)?;
        let norm = (ss as f64).sqrt();
        if !norm.is_finite() {
            self.step -= 1;
            return Err(OptimError::NonFiniteGradient { norm }.into());
        }
        Ok(Clip {
            pre_clip_norm: norm,
            factor: factor as f64,
        })
    }
}
