//! Rotary position embedding in place on `[T, n_heads, head_dim]`, NORM (adjacent pairs, llama)
//! or NEOX (split halves, qwen2/3), with `rope_base`, `n_rot` (dims ≥ n_rot pass through), a
//! position scale (linear scaling) and llama-3 `rope_freqs` divisors:
//! `θ_i = pos · pos_scale · base^(−2i/n_rot) / freqs[i]`. Positions come from a `[T]` u32 buffer.
//!
//! The per-frequency factor `pos_scale · base^(−2i/n_rot) / freqs[i]` is computed once in f64 on
//! the CPU ([`RopeConfig::inv_freq`]) and uploaded as a `[n_rot/2]` f32 table; the kernel
//! multiplies by the position in f32 and range-reduces before `sin`/`cos`, so the only error
//! growing with position is the f32 rounding of θ itself (≈ 1.2e-7·θ).

use super::check::{bad_shape, need_words};
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;
use crate::model::{ModelConfig, RopeKind};
use crate::util::Tol;

/// Params of `kernels/rope.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RopeParams {
    /// Tokens T.
    pub n_rows: u32,
    /// Heads per row.
    pub n_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Rotated dims per head (even, ≤ head_dim).
    pub n_rot: u32,
    /// 0 = NORM, 1 = NEOX.
    pub neox: u32,
    /// +1 forward, −1 inverse rotation (backward).
    pub sign: f32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// The rope hyperparameters of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub kind: RopeKind,
    pub base: f32,
    pub n_rot: usize,
    pub head_dim: usize,
    /// Positions are multiplied by this (1 / linear scaling factor).
    pub pos_scale: f32,
    /// llama-3 per-frequency divisors, `[n_rot/2]`.
    pub freqs: Option<Vec<f32>>,
}

impl RopeConfig {
    pub fn from_model(cfg: &ModelConfig) -> RopeConfig {
        RopeConfig {
            kind: cfg.rope_kind,
            base: cfg.rope_base,
            n_rot: cfg.n_rot,
            head_dim: cfg.head_dim,
            pos_scale: cfg.rope_pos_scale,
            freqs: cfg.rope_freqs.clone(),
        }
    }

    /// Checks n_rot (even, ≤ head_dim) and the length of `freqs`.
    pub fn validate(&self) -> Result<(), GpuError> {
        if self.n_rot % 2 != 0 || self.n_rot > self.head_dim {
            return Err(bad_shape(
                "rope",
                format!(
                    "n_rot {} must be even and at most head_dim {}",
                    self.n_rot, self.head_dim
                ),
            ));
        }
        if let Some(f) = &self.freqs
            && f.len() != self.n_rot / 2
        {
            return Err(bad_shape(
                "rope",
                format!(
                    "rope_freqs has {} entries, expected n_rot/2 = {}",
                    f.len(),
                    self.n_rot / 2
                ),
            ));
        }
        Ok(())
    }

    /// θ per unit position for each pair, in f64: `pos_scale · base^(−2i/n_rot) / freqs[i]`.
    pub fn inv_freq(&self) -> Vec<f64> {
        (0..self.n_rot / 2)
            .map(|i| {
                let f = self.freqs.as_ref().map_or(1.0, |f| f[i] as f64);
                self.pos_scale as f64 * (self.base as f64).powf(-2.0 * i as f64 / self.n_rot as f64)
                    / f
            })
            .collect()
    }

    /// Uploads the `[n_rot/2]` f32 table the kernel reads (at least one element).
    pub fn upload_table(&self, gpu: &Gpu) -> Result<GpuBuf, GpuError> {
        self.validate()?;
        let t: Vec<f32> = self.inv_freq().iter().map(|&v| v as f32).collect();
        if t.is_empty() {
            gpu.upload("rope inv_freq", &[0.0f32])
        } else {
            gpu.upload("rope inv_freq", &t)
        }
    }
}

/// GPU vs the f64 reference for |x| ≲ 4 and θ ≲ 300 rad: the f32 rounding of θ (≈ 1.2e-7·θ,
/// averaging out in practice: measured max 6e-6 on lavapipe)
/// times |x| plus sin/cos error.
pub const ROPE_TOL: Tol = Tol::new(5e-5, 1e-6);

/// Records the rotation of `x` `[n_rows, n_heads, head_dim]` in place, positions `pos` `[n_rows]`
/// u32, table from [`RopeConfig::upload_table`]. `inverse` applies the transpose (backward).
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    cfg: &RopeConfig,
    table: &GpuBuf,
    pos: &GpuBuf,
    x: &GpuBuf,
    n_rows: usize,
    n_heads: usize,
    inverse: bool,
) -> Result<(), GpuError> {
    cfg.validate()?;
    let n = n_rows * n_heads * (cfg.n_rot / 2);
    if n == 0 {
        return Ok(());
    }
    let shape = format!("rope [{n_rows}, {n_heads}, {}]", cfg.head_dim);
    need_words("rope", pos, n_rows, &shape)?;
    need_words("rope", table, cfg.n_rot / 2, &shape)?;
    need_words("rope", x, n_rows * n_heads * cfg.head_dim, &shape)?;
    let p = gpu.pipeline(&kernel_source!("rope"), "main", &[])?;
    let params = RopeParams {
        n_rows: n_rows as u32,
        n_heads: n_heads as u32,
        head_dim: cfg.head_dim as u32,
        n_rot: cfg.n_rot as u32,
        neox: (cfg.kind == RopeKind::Neox) as u32,
        sign: if inverse { -1.0 } else { 1.0 },
        _pad0: 0,
        _pad1: 0,
    };
    rec.dispatch(
        &p,
        &[Bind::Whole(pos), Bind::Whole(table), Bind::Whole(x)],
        &params,
        groups((n as u32).div_ceil(256)),
    )
}

/// CPU reference (f64 inside), in place on `x` `[pos.len(), n_heads, head_dim]`.
pub fn rope_ref(cfg: &RopeConfig, pos: &[u32], x: &mut [f32], n_heads: usize, inverse: bool) {
    let inv = cfg.inv_freq();
    let half = cfg.n_rot / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let base = (t * n_heads + h) * cfg.head_dim;
            for (i, &f) in inv.iter().enumerate() {
                let theta = p as f64 * f;
                let (s, c) = theta.sin_cos();
                let s = sign * s;
                let (ia, ib) = match cfg.kind {
                    RopeKind::Norm => (base + 2 * i, base + 2 * i + 1),
                    RopeKind::Neox => (base + i, base + i + half),
                };
                let (a, b) = (x[ia] as f64, x[ib] as f64);
                x[ia] = (a * c - b * s) as f32;
                x[ib] = (a * s + b * c) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<RopeParams>(), 32);
        assert_eq!(std::mem::align_of::<RopeParams>(), 4);
    }

    fn run(
        gpu: &Gpu,
        cfg: &RopeConfig,
        pos: &[u32],
        x: &[f32],
        n_heads: usize,
        inverse: bool,
    ) -> Vec<f32> {
        let table = cfg.upload_table(gpu).unwrap();
        let pb = gpu.upload("pos", pos).unwrap();
        let xb = gpu.upload("x", x).unwrap();
        let mut rec = gpu.recorder();
        rope_inplace(
            gpu,
            &mut rec,
            cfg,
            &table,
            &pb,
            &xb,
            pos.len(),
            n_heads,
            inverse,
        )
        .unwrap();
        rec.run("rope test").unwrap();
        gpu.read::<f32>(&xb).unwrap()[..x.len()].to_vec()
    }

    fn cfg(kind: RopeKind, head_dim: usize, n_rot: usize, freqs: Option<Vec<f32>>) -> RopeConfig {
        RopeConfig {
            kind,
            base: 10000.0,
            n_rot,
            head_dim,
            pos_scale: 1.0,
            freqs,
        }
    }

    #[test]
    fn rope_matches_reference_norm_neox_partial_scaled_freqs() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(21);
        let cases = [
            (RopeKind::Norm, 16, 16, None, 1.0f32, 500_000.0f32),
            (RopeKind::Neox, 16, 16, None, 1.0, 1_000_000.0),
            (RopeKind::Norm, 18, 10, None, 0.25, 10000.0), // partial rotation, linear scaling
            (RopeKind::Neox, 18, 10, None, 1.0, 10000.0),
            (
                RopeKind::Norm,
                8,
                8,
                Some(vec![1.0, 2.5, 8.0, 32.0]),
                1.0,
                500_000.0,
            ),
        ];
        for (kind, hd, n_rot, freqs, scale, base) in cases {
            let mut c = cfg(kind, hd, n_rot, freqs);
            c.pos_scale = scale;
            c.base = base;
            let (t, nh) = (37usize, 3usize);
            let pos: Vec<u32> = (0..t).map(|_| rng.below(300) as u32).collect();
            let x = rng.normal_vec(t * nh * hd, 1.0);
            let got = run(&gpu, &c, &pos, &x, nh, false);
            let mut want = x.clone();
            rope_ref(&c, &pos, &mut want, nh, false);
            assert_close(
                &format!("rope {kind:?} hd {hd} n_rot {n_rot}"),
                &got,
                &want,
                ROPE_TOL,
            );
            // dims ≥ n_rot pass through bit for bit
            for row in 0..t * nh {
                for d in n_rot..hd {
                    assert_eq!(got[row * hd + d], x[row * hd + d]);
                }
            }
            // inverse undoes forward
            let back = run(&gpu, &c, &pos, &got, nh, true);
            assert_close("rope inverse ∘ forward", &back, &x, ROPE_TOL);
        }
    }

    #[test]
    fn rope_fixed_case() {
        // One head, head_dim 4, n_rot 4, base 10000: pair 0 has θ = pos, pair 1 θ = pos/100.
        // pos 1, x = (1, 0, 0, 1): NORM rotates (x0, x1) by 1 rad and (x2, x3) by 0.01 rad.
        let gpu = crate::gpu::test_device();
        let c = cfg(RopeKind::Norm, 4, 4, None);
        let got = run(&gpu, &c, &[1], &[1.0, 0.0, 0.0, 1.0], 1, false);
        let want = [1f64.cos(), 1f64.sin(), -(0.01f64.sin()), 0.01f64.cos()];
        assert_close("norm fixed", &got, &want, Tol::new(1e-6, 0.0));
        // NEOX pairs (x0, x2) at θ = 1 and (x1, x3) at θ = 0.01.
        let c = cfg(RopeKind::Neox, 4, 4, None);
        let got = run(&gpu, &c, &[1], &[1.0, 0.0, 0.0, 1.0], 1, false);
        let want = [1f64.cos(), -(0.01f64.sin()), 1f64.sin(), 0.01f64.cos()];
        assert_close("neox fixed", &got, &want, Tol::new(1e-6, 0.0));
        // Position 0 is the identity.
        let got = run(&gpu, &c, &[0], &[0.5, -1.0, 2.0, 3.0], 1, false);
        assert_eq!(got, vec![0.5, -1.0, 2.0, 3.0]);
    }

    #[test]
    fn rope_large_positions_stay_accurate() {
        // θ up to ~8000 rad: the range reduction keeps sin/cos exact up to f32 rounding of θ.
        let gpu = crate::gpu::test_device();
        let c = cfg(RopeKind::Neox, 8, 8, None);
        let pos: Vec<u32> = (0..5).map(|i| 8000 + 13 * i).collect();
        let mut rng = Rng::new(5);
        let x = rng.normal_vec(5 * 8, 1.0);
        let got = run(&gpu, &c, &pos, &x, 1, false);
        let mut want = x.clone();
        rope_ref(&c, &pos, &mut want, 1, false);
        // Worst case 1.2e-7 · 8000 · |x| ≈ 4e-3; measured 3e-5 on lavapipe.
        assert_close("rope large pos", &got, &want, Tol::new(5e-4, 0.0));
    }

    #[test]
    fn bad_config_is_an_error() {
        let gpu = crate::gpu::test_device();
        let c = cfg(RopeKind::Norm, 8, 10, None);
        assert!(
            c.upload_table(&gpu)
                .unwrap_err()
                .to_string()
                .contains("n_rot 10")
        );
        let c = cfg(RopeKind::Norm, 8, 8, Some(vec![1.0]));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("rope_freqs has 1")
        );
    }
}
