//! LoRA on the GPU: forward `y += s·B(A·x)`, backward `dA`, `dB` and the input gradient.
//! (Stub API — implementation pending; signatures are what other code builds on.)

use crate::gpu::{Gpu, GpuBuf, GpuError, Recorder};
use crate::train::lora::{LoraWeights, Target};

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
}

/// A whole adapter on the device.
#[derive(Debug)]
pub struct GpuLora {
    pub rank: usize,
    pub alpha: f32,
    pub tensors: Vec<GpuLoraTensor>,
}

impl GpuLora {
    pub fn upload(_gpu: &Gpu, _w: &LoraWeights) -> Result<GpuLora, GpuError> {
        todo!()
    }
    /// Reads A and B back.
    pub fn download(&self, _gpu: &Gpu) -> Result<LoraWeights, GpuError> {
        todo!()
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
    pub fn zero_grads(&self, _rec: &mut Recorder<'_>) {
        todo!()
    }
}

/// Records `u = A·x` (u: `[n_tokens, rank]`, kept for backward) and `y += scale·B·u`.
pub fn lora_forward(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _t: &GpuLoraTensor,
    _rank: usize,
    _scale: f32,
    _x: &GpuBuf,
    _u: &GpuBuf,
    _y: &GpuBuf,
    _n_tokens: usize,
) -> Result<(), GpuError> {
    todo!()
}

/// Given `x` `[n_tokens, n_in]`, `u = A·x` and `dy` `[n_tokens, n_out]`: records
/// `grad_b += scale·dyᵀ·u`, `du = scale·dy·B` (scratch `[n_tokens, rank]`),
/// `grad_a += duᵀ·x`, and `dx += du·A`. Deterministic (fixed-order sums, no atomics).
pub fn lora_backward(
    _gpu: &Gpu,
    _rec: &mut Recorder<'_>,
    _t: &GpuLoraTensor,
    _rank: usize,
    _scale: f32,
    _x: &GpuBuf,
    _u: &GpuBuf,
    _dy: &GpuBuf,
    _du: &GpuBuf,
    _dx: &GpuBuf,
    _n_tokens: usize,
) -> Result<(), GpuError> {
    todo!()
}
