//! LoRA dropout (PEFT semantics, training only): the LoRA branch of an adapted projection reads
//! `drop(x) = mask ⊙ x / (1 − p)` instead of `x`, so `y = W·x + s·B·A·drop(x)`.
//!
//! The mask is a counter-based hash (`kernels/dropout.wgsl`, mirrored bit for bit by
//! [`dropout_hash`]): element `(row, col)` of the input of tensor `(layer, target)` at step
//! counter `counter` is kept iff `hash(seed, counter, tag, row, col) >= threshold` with
//! `threshold = ⌊p·2³²⌋`. There is no RNG state: the backward's recompute, the CPU reference and a
//! resumed run all reproduce the same mask.

use crate::gpu::ops::matmul::{pieces, token_window};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder};
use crate::kernel_source;
use crate::model::lora::Target;
pub use crate::model::lora::dropout::{Dropout, dropout_hash, mix32, tag};

/// Params of `kernels/dropout.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropoutParams {
    pub n_rows: u32,
    pub n_cols: u32,
    pub row0: u32,
    pub seed: u32,
    pub counter: u32,
    pub tag: u32,
    pub threshold: u32,
    pub inv_keep: f32,
    pub flags: u32,
    pub _pad: [u32; 3],
}

/// Records `out (+)= mask ⊙ x / (1 − p)` over `[n_rows, n_cols]` token-major f32 buffers for the
/// mask of `(layer, target)`. With `accumulate = false` this writes the LoRA input `drop(x)`;
/// with `accumulate = true` it adds the masked input gradient of the LoRA branch to `dx`.
#[allow(clippy::too_many_arguments)]
pub fn dropout_apply(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    d: &Dropout,
    layer: usize,
    target: Target,
    x: &GpuBuf,
    out: &GpuBuf,
    n_rows: usize,
    n_cols: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let what = format!("LoRA dropout of blk.{layer}.{}", target.gguf_name());
    let need = (n_rows * n_cols * 4) as u64;
    for (name, b) in [("x", x), ("out", out)] {
        if b.size < need {
            return Err(GpuError::Validation {
                context: format!("recording {what}"),
                detail: format!(
                    "buffer {:?} ({name}) holds {} bytes, needs {need} for [{n_rows}, {n_cols}] f32",
                    b.label, b.size
                ),
            });
        }
    }
    if n_rows == 0 || n_cols == 0 {
        return Ok(());
    }
    if !(0.0..1.0).contains(&d.p) {
        return Err(GpuError::Validation {
            context: format!("recording {what}"),
            detail: format!("dropout p = {} is outside [0, 1)", d.p),
        });
    }
    let pipe = gpu.pipeline(&kernel_source!("dropout"), "main", &[])?;
    let tw = token_window(gpu, &what, n_rows, &[n_cols])?.min(65_535);
    let row = (n_cols * 4) as u64;
    for w in pieces(n_rows, tw) {
        let params = DropoutParams {
            n_rows: w.len() as u32,
            n_cols: n_cols as u32,
            row0: w.start as u32,
            seed: d.seed,
            counter: d.counter,
            tag: tag(layer, target),
            threshold: d.threshold(),
            inv_keep: d.inv_keep(),
            flags: accumulate as u32,
            _pad: [0; 3],
        };
        let (off, len) = (w.start as u64 * row, w.len() as u64 * row);
        rec.dispatch(
            &pipe,
            &[Bind::Range(x, off, len), Bind::Range(out, off, len)],
            &params,
            [n_cols.div_ceil(64) as u32, w.len() as u32, 1],
        )?;
    }
    Ok(())
}

/// CPU reference of [`dropout_apply`] (f64): `out (+)= mask ⊙ x / (1 − p)`.
#[allow(clippy::too_many_arguments)]
pub fn dropout_ref(
    d: &Dropout,
    layer: usize,
    target: Target,
    x: &[f64],
    out: &mut [f64],
    n_rows: usize,
    n_cols: usize,
    accumulate: bool,
) {
    let inv = d.inv_keep() as f64;
    for r in 0..n_rows {
        for c in 0..n_cols {
            let i = r * n_cols + c;
            let v = if d.keep(layer, target, r, c) {
                x[i] * inv
            } else {
                0.0
            };
            out[i] = if accumulate { out[i] + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, Tol, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<DropoutParams>(), 48);
    }

    #[test]
    fn hash_fixed_values_and_threshold() {
        // mix32(0) = 0 (xorshift-multiply keeps zero); the chain of five mixes does not.
        assert_eq!(mix32(0), 0);
        assert_ne!(dropout_hash(0, 0, 0, 0, 0), 0);
        let d = |p| Dropout {
            p,
            seed: 1,
            counter: 0,
        };
        assert_eq!(d(0.0).threshold(), 0);
        assert_eq!(d(0.5).threshold(), 1 << 31);
        assert_eq!(d(0.25).threshold(), 1 << 30);
        // p = 0 keeps everything.
        assert!((0..100).all(|c| d(0.0).keep(0, Target::AttnQ, 3, c)));
    }

    fn run(
        gpu: &Gpu,
        d: &Dropout,
        x: &[f32],
        init: &[f32],
        rows: usize,
        cols: usize,
        acc: bool,
    ) -> Vec<f32> {
        let xb = gpu.upload("x", x).unwrap();
        let ob = gpu.upload("out", init).unwrap();
        let mut rec = gpu.recorder();
        dropout_apply(
            gpu,
            &mut rec,
            d,
            1,
            Target::FfnUp,
            &xb,
            &ob,
            rows,
            cols,
            acc,
        )
        .unwrap();
        rec.run("dropout test").unwrap();
        gpu.read::<f32>(&ob).unwrap()[..rows * cols].to_vec()
    }

    #[test]
    fn gpu_mask_matches_rust_hash_bit_exactly_and_keeps_one_minus_p() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(77);
        for (rows, cols, p) in [(37usize, 131usize, 0.1f32), (5, 67, 0.5), (129, 3, 0.3)] {
            let d = Dropout {
                p,
                seed: 12345,
                counter: 7,
            };
            // x = 1 everywhere reveals the mask: kept → 1/(1−p), dropped → 0.
            let ones = vec![1.0f32; rows * cols];
            let got = run(&gpu, &d, &ones, &vec![0.0; rows * cols], rows, cols, false);
            let mut kept = 0usize;
            for r in 0..rows {
                for c in 0..cols {
                    let g = got[r * cols + c];
                    let k = d.keep(1, Target::FfnUp, r, c);
                    assert_eq!(g != 0.0, k, "mask at ({r}, {c}), p {p}");
                    if k {
                        assert_eq!(g, d.inv_keep(), "scale at ({r}, {c})");
                        kept += 1;
                    }
                }
            }
            let n = (rows * cols) as f64;
            let rate = kept as f64 / n;
            // 5 binomial standard deviations.
            let sd = ((1.0 - p as f64) * p as f64 / n).sqrt();
            assert!(
                (rate - (1.0 - p as f64)).abs() < 5.0 * sd,
                "keep rate {rate} vs {} (n {n})",
                1.0 - p
            );
            // Random x, accumulate mode, against the f64 reference.
            let x = rng.normal_vec(rows * cols, 1.0);
            let init = rng.normal_vec(rows * cols, 1.0);
            for acc in [false, true] {
                let got = run(&gpu, &d, &x, &init, rows, cols, acc);
                let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                let mut want: Vec<f64> = init.iter().map(|&v| v as f64).collect();
                dropout_ref(&d, 1, Target::FfnUp, &xd, &mut want, rows, cols, acc);
                assert_close(
                    &format!("dropout {rows}x{cols} acc {acc}"),
                    &got,
                    &want,
                    Tol::new(1e-6, 1e-6),
                );
            }
        }
        // Different counters, layers and targets give different masks.
        let a = Dropout {
            p: 0.5,
            seed: 1,
            counter: 0,
        };
        let b = Dropout { counter: 1, ..a };
        let differ = (0..256)
            .filter(|&c| a.keep(0, Target::AttnQ, 0, c) != b.keep(0, Target::AttnQ, 0, c))
            .count();
        assert!(
            differ > 64,
            "counter changes the mask ({differ} of 256 differ)"
        );
        let differ = (0..256)
            .filter(|&c| a.keep(0, Target::AttnQ, 0, c) != a.keep(0, Target::AttnK, 0, c))
            .count();
        assert!(
            differ > 64,
            "target changes the mask ({differ} of 256 differ)"
        );
    }
}
