//! The optimiser side of a training step, as deterministic CPU code (what the reference and
//! native CPU engines run, and the reference the GPU kernels are checked against): AdamW with
//! bias correction and decoupled weight decay, global-norm gradient clipping (reporting the
//! pre-clip norm), a gradient accumulator, and learning-rate schedules with linear warmup.
//!
//! Semantics follow PyTorch `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_`, and the
//! Hugging Face `transformers` schedules, which is what the BFPO authors ran
//! (`docs/bfpo.md`, "Scale pitfalls"; `docs/bfpo-training.md` §4):
//!
//! ```text
//! t      = step + 1                                   (1 for the first update)
//! g      = grad · grad_scale                          grad_scale = clip factor (× any 1/n)
//! p      = p · (1 − lr·wd)                            decoupled weight decay
//! m      = m + (1 − β1)·(g − m)                       (= β1·m + (1 − β1)·g, torch's lerp)
//! v      = β2·v + (1 − β2)·g²
//! p      = p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
//! ```
//!
//! Parameters, gradients and both moments are f32, as on the GPU; the per-step scalars
//! ([`AdamWScalars`]) are computed once in f64 and rounded to f32, and the per-element update
//! ([`adamw_update`]) is the exact sequence of f32 operations the WGSL kernel performs.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{what} has {got} values, expected {expected} (one per trainable parameter)")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error(
        "the gradient norm is {norm} (not finite); the step was not applied. Lower the learning rate, enable clipping, or look for a bad example"
    )]
    NonFiniteGradient { norm: f64 },
    #[error("learning-rate schedule: {0}")]
    BadSchedule(String),
    #[error("AdamW: {0}")]
    BadConfig(String),
}

/// AdamW hyperparameters (defaults: PyTorch's betas and eps, Hugging Face's weight decay 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |s: String| Err(OptimError::BadConfig(s));
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!(
                "betas must be in [0, 1), got {} and {}",
                self.beta1, self.beta2
            ));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad(format!("eps must be positive, got {}", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(format!(
                "weight decay must be ≥ 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// The scalars of one AdamW update, computed in f64 and rounded to f32; the GPU kernel's params
/// uniform carries exactly these values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWScalars {
    /// Multiplies every gradient first: the clip factor (and any accumulation scale).
    pub grad_scale: f32,
    /// `1 − lr·wd`.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 − β1`.
    pub one_minus_beta1: f32,
    /// `1 − β2`.
    pub one_minus_beta2: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^t)`.
    pub sqrt_bc2: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// Scalars for update number `t` (1-based) at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, t: u64, lr: f64, grad_scale: f64) -> AdamWScalars {
        let t = t.max(1) as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2 = 1.0 - cfg.beta2.powi(t);
        AdamWScalars {
            grad_scale: grad_scale as f32,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            step_size: (lr / bc1) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
        }
    }
}

/// One element of an AdamW update, in f32, in the order the WGSL kernel computes it.
#[inline]
pub fn adamw_update(p: &mut f32, m: &mut f32, v: &mut f32, grad: f32, s: &AdamWScalars) {
    let g = grad * s.grad_scale;
    *p *= s.decay;
    *m += s.one_minus_beta1 * (g - *m);
    *v = s.beta2 * *v + s.one_minus_beta2 * (g * g);
    let denom = v.sqrt() / s.sqrt_bc2 + s.eps;
    *p -= s.step_size * (*m / denom);
}

/// AdamW state: the step count and both moments (serializable for exact resume).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates applied so far.
    pub step: u64,
    /// First moment, one per parameter.
    pub m: Vec<f32>,
    /// Second moment, one per parameter.
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, n_params: usize) -> Result<AdamW, OptimError> {
        cfg.validate()?;
        Ok(AdamW {
            cfg,
            step: 0,
            m: vec![0.0; n_params],
            v: vec![0.0; n_params],
        })
    }

    pub fn n_params(&self) -> usize {
        self.m.len()
    }

    /// The scalars of the next update (t = step + 1).
    pub fn next_scalars(&self, lr: f64, grad_scale: f64) -> AdamWScalars {
        AdamWScalars::new(&self.cfg, self.step + 1, lr, grad_scale)
    }

    /// Applies one update to `params` from `grads` (each multiplied by `grad_scale`, e.g. the
    /// clip factor) at learning rate `lr`; returns the scalars used.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        grad_scale: f64,
    ) -> Result<AdamWScalars, OptimError> {
        let n = self.n_params();
        for (what, got) in [("params", params.len()), ("grads", grads.len())] {
            if got != n {
                return Err(OptimError::LengthMismatch {
                    what,
                    got,
                    expected: n,
                });
            }
        }
        let s = self.next_scalars(lr, grad_scale);
        for i in 0..n {
            adamw_update(&mut params[i], &mut self.m[i], &mut self.v[i], grads[i], &s);
        }
        self.step += 1;
        Ok(s)
    }
}

/// Global L2 norm of a gradient: squares summed in f64 in index order (deterministic).
pub fn global_norm(grads: &[f32]) -> f64 {
    grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// The outcome of global-norm clipping.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Clip {
    /// The norm before clipping (log this).
    pub pre_clip_norm: f64,
    /// Multiply every gradient by this: `min(1, max_norm / (norm + 1e-6))` (PyTorch), or 1
    /// without clipping.
    pub factor: f64,
}

/// Clip factor for a gradient of norm `norm`; `max_norm = None` disables clipping. A non-finite
/// norm is an error (no update should be applied).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> Result<Clip, OptimError> {
    if !norm.is_finite() {
        return Err(OptimError::NonFiniteGradient { norm });
    }
    let factor = match max_norm {
        Some(mx) => (mx / (norm + 1e-6)).min(1.0),
        None => 1.0,
    };
    Ok(Clip {
        pre_clip_norm: norm,
        factor,
    })
}

/// Computes the global norm of `grads` and its clip factor (the gradients are not modified: pass
/// `factor` as `grad_scale` to [`AdamW::step`]).
pub fn clip_grad_norm(grads: &[f32], max_norm: Option<f64>) -> Result<Clip, OptimError> {
    clip_factor(global_norm(grads), max_norm)
}

/// How accumulated micro-step gradients are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Sum of the micro-step gradients (when each micro-step's loss is already divided by the
    /// number of pairs in the whole optimizer step).
    Sum,
    /// Mean over micro-steps (Hugging Face's `loss / gradient_accumulation_steps`).
    Mean,
}

/// Sums gradients over micro-steps in f32, in call order (deterministic).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradAccumulator {
    sum: Vec<f32>,
    n_micro: u32,
}

impl GradAccumulator {
    pub fn new(n_params: usize) -> GradAccumulator {
        GradAccumulator {
            sum: vec![0.0; n_params],
            n_micro: 0,
        }
    }

    /// Micro-steps added since the last [`Self::take`].
    pub fn n_micro(&self) -> u32 {
        self.n_micro
    }

    pub fn add(&mut self, grads: &[f32]) -> Result<(), OptimError> {
        if grads.len() != self.sum.len() {
            return Err(OptimError::LengthMismatch {
                what: "micro-step gradient",
                got: grads.len(),
                expected: self.sum.len(),
            });
        }
        for (s, &g) in self.sum.iter_mut().zip(grads) {
            *s += g;
        }
        self.n_micro += 1;
        Ok(())
    }

    /// The combined gradient; resets the accumulator to zero.
    pub fn take(&mut self, reduction: Reduction) -> Vec<f32> {
        let n = self.n_micro.max(1) as f32;
        let out = match reduction {
            Reduction::Sum => self.sum.clone(),
            Reduction::Mean => self.sum.iter().map(|&s| s / n).collect(),
        };
        self.sum.iter_mut().for_each(|s| *s = 0.0);
        self.n_micro = 0;
        out
    }
}

/// The shape of the learning-rate curve after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    /// Linear decay to 0 at `total_steps`.
    Linear,
    /// Half-cosine decay to 0 at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    pub fn parse(s: &str) -> Option<ScheduleKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" => Some(ScheduleKind::Constant),
            "linear" => Some(ScheduleKind::Linear),
            "cosine" => Some(ScheduleKind::Cosine),
            _ => None,
        }
    }
}

/// Linear warmup length, as a step count or a fraction of the total.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    Steps(u64),
    /// `ceil(ratio · total_steps)` steps (Hugging Face `warmup_ratio`).
    Ratio(f64),
}

/// A learning-rate schedule with Hugging Face `transformers` semantics
/// (`get_{constant,linear,cosine}_schedule_with_warmup`).
///
/// [`Self::lr_at`]`(k)` is the rate of update `k`, **0-based** (k = updates already applied).
/// As in Hugging Face, the first update of a run with warmup therefore has rate 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup: Warmup,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |s: String| Err(OptimError::BadSchedule(s));
        if !self.peak_lr.is_finite() || self.peak_lr < 0.0 {
            return bad(format!(
                "learning rate must be a finite number ≥ 0, got {}",
                self.peak_lr
            ));
        }
        if let Warmup::Ratio(r) = self.warmup
            && !(0.0..=1.0).contains(&r)
        {
            return bad(format!("warmup ratio must be in [0, 1], got {r}"));
        }
        if self.total_steps == 0 {
            return bad("total steps must be at least 1".into());
        }
        Ok(())
    }

    pub fn warmup_steps(&self) -> u64 {
        match self.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (r * self.total_steps as f64).ceil() as u64,
        }
    }

    /// Multiplier of `peak_lr` for update `k` (0-based).
    pub fn factor_at(&self, k: u64) -> f64 {
        let w = self.warmup_steps();
        if k < w {
            return k as f64 / w.max(1) as f64;
        }
        let total = self.total_steps;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                (total.saturating_sub(k) as f64 / total.saturating_sub(w).max(1) as f64).max(0.0)
            }
            ScheduleKind::Cosine => {
                // Clamped at 1 past the end (Hugging Face would rise again).
                let progress = ((k - w) as f64 / total.saturating_sub(w).max(1) as f64).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// Learning rate of update `k` (0-based).
    pub fn lr_at(&self, k: u64) -> f64 {
        self.peak_lr * self.factor_at(k)
    }
}
