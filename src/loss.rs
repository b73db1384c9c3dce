//! Preference losses (BFPO, IPO, DPO) as pure functions of per-pair scalars, with analytic
//! gradients.
//!
//! Every loss here is a function of four numbers per pair, the **summed** response log-probs
//! of the policy and of the frozen reference on the chosen (more helpful, BFPO's y_hw) and the
//! rejected (less helpful, y_hl) response, through the log-ratio margin
//!
//! ```text
//! Δ = (lp_θ(chosen) − lp_ref(chosen)) − (lp_θ(rejected) − lp_ref(rejected))
//! ```
//!
//! | loss | per pair | dL/dΔ | target Δ* |
//! |---|---|---|---|
//! | BFPO | `(Δ − g/τ)²`, `g = b1·b3·s_w − b3·s_l − α`, `b3 = 1/(b1 − 1)` | `2(Δ − g/τ)` | `g/τ` |
//! | IPO  | `(Δ − 1/(2τ))²` | `2(Δ − 1/(2τ))` | `1/(2τ)` |
//! | DPO  | `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` | `β(−(1−ε)σ(−βΔ) + εσ(βΔ))` | `log((1−ε)/ε)/β` if ε > 0 |
//!
//! BFPO is computed exactly as the official code does (`wx-zhang/bfpo`,
//! `src/alignment/trainer/bfpo.py`): the target is `g/τ` on Δ itself (not `(τΔ − g)²`, which has
//! 1e4× smaller gradients at τ = 0.01), on summed (not length-averaged) log-probs, and the batch
//! loss is the mean over pairs. With both responses safe BFPO equals IPO with the same τ.
//!
//! Only the policy log-probs carry gradients: `dL/dlp_θ(chosen) = dL/dΔ` and
//! `dL/dlp_θ(rejected) = −dL/dΔ`. The reference is frozen.
//!
//! Rewards for metrics follow TRL's names: `rewards/chosen = s·(lp_θ(chosen) − lp_ref(chosen))`
//! with `s = τ` (BFPO, IPO) or `β` (DPO).

use std::fmt;
use std::str::FromStr;

/// Default BFPO/IPO temperature τ (the official BFPO recipe's `beta: 0.01`).
pub const DEFAULT_TAU: f64 = 0.01;
/// Default BFPO b1 (so b3 = 1/2 and b1·b3 = 3/2).
pub const DEFAULT_B1: f64 = 3.0;
/// Default BFPO shift α.
pub const DEFAULT_ALPHA: f64 = 0.5;
/// Default DPO β (TRL's default).
pub const DEFAULT_BETA: f64 = 0.1;

/// Errors from building or applying a loss.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    #[error(
        "unknown loss `{0}`: expected `bfpo`, `ipo` or `dpo`, optionally with parameters, e.g. `bfpo:tau=0.01,b1=3,alpha=0.5`, `ipo:tau=0.01`, `dpo:beta=0.1,eps=0.0`"
    )]
    UnknownLoss(String),
    #[error(
        "loss `{loss}`: unknown parameter `{param}` (allowed: {allowed}); write e.g. `{loss}:{allowed_example}`"
    )]
    UnknownParam {
        loss: &'static str,
        param: String,
        allowed: &'static str,
        allowed_example: &'static str,
    },
    #[error("loss `{loss}`: parameter `{param}` has value `{value}`, which is not a number")]
    NotANumber {
        loss: &'static str,
        param: String,
        value: String,
    },
    #[error("loss `{loss}`: parameter `{param}` = {value} is out of range: {requirement}")]
    OutOfRange {
        loss: &'static str,
        param: &'static str,
        value: f64,
        requirement: &'static str,
    },
    #[error(
        "pair {index} of the batch has a non-finite log-prob (policy chosen {policy_chosen}, policy rejected {policy_rejected}, reference chosen {ref_chosen}, reference rejected {ref_rejected}): the forward pass produced NaN/inf; lower the learning rate or check the model and data"
    )]
    NonFinite {
        index: usize,
        policy_chosen: f64,
        policy_rejected: f64,
        ref_chosen: f64,
        ref_rejected: f64,
    },
    #[error("empty batch: a batch loss needs at least one pair")]
    EmptyBatch,
}

/// The four summed response log-probs of one pair (natural log, summed over scored tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairLogps {
    /// lp_θ(chosen): policy (LoRA on), more helpful response.
    pub policy_chosen: f64,
    /// lp_θ(rejected): policy, less helpful response.
    pub policy_rejected: f64,
    /// lp_ref(chosen): reference (LoRA off), more helpful response.
    pub ref_chosen: f64,
    /// lp_ref(rejected): reference, less helpful response.
    pub ref_rejected: f64,
}

impl PairLogps {
    pub fn new(
        policy_chosen: f64,
        policy_rejected: f64,
        ref_chosen: f64,
        ref_rejected: f64,
    ) -> Self {
        PairLogps {
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
        }
    }

    /// Δ = (lp_θ(c) − lp_ref(c)) − (lp_θ(r) − lp_ref(r)).
    pub fn delta(&self) -> f64 {
        (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)
    }

    fn is_finite(&self) -> bool {
        self.policy_chosen.is_finite()
            && self.policy_rejected.is_finite()
            && self.ref_chosen.is_finite()
            && self.ref_rejected.is_finite()
    }
}

/// The loss of one pair, its gradient with respect to the two policy log-probs, and metrics.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairLoss {
    /// Per-pair loss.
    pub loss: f64,
    /// ∂loss/∂lp_θ(chosen).
    pub d_policy_chosen: f64,
    /// ∂loss/∂lp_θ(rejected).
    pub d_policy_rejected: f64,
    /// The margin Δ.
    pub delta: f64,
    /// The Δ at which this pair's loss is minimal, where one exists (BFPO, IPO, DPO with ε > 0).
    pub target: Option<f64>,
    /// `s·(lp_θ(chosen) − lp_ref(chosen))`, s = τ or β (TRL's `rewards/chosen`).
    pub reward_chosen: f64,
    /// `s·(lp_θ(rejected) − lp_ref(rejected))` (TRL's `rewards/rejected`).
    pub reward_rejected: f64,
}

/// Which loss, for command-line flags (`--loss bfpo|ipo|dpo`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    Bfpo,
    Ipo,
    Dpo,
}

impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Bfpo => "bfpo",
            LossKind::Ipo => "ipo",
            LossKind::Dpo => "dpo",
        }
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A preference loss with its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Loss {
    /// BFPO: `(Δ − g/τ)²`, `g = b1·b3·s_w − b3·s_l − α`, `b3 = 1/(b1 − 1)`.
    Bfpo { tau: f64, b1: f64, alpha: f64 },
    /// IPO: `(Δ − 1/(2τ))²`.
    Ipo { tau: f64 },
    /// DPO: `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` (ε = label smoothing, 0 = plain DPO).
    Dpo { beta: f64, label_smoothing: f64 },
}

impl Default for Loss {
    fn default() -> Self {
        Loss::bfpo()
    }
}

/// `log σ(x)`, stable for every finite x.
fn log_sigmoid(x: f64) -> f64 {
    // log σ(x) = −softplus(−x) = min(x, 0) − log1p(exp(−|x|))
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `σ(x)`, stable for every finite x.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Loss {
    /// BFPO with the official defaults τ = 0.01, b1 = 3, α = 0.5.
    pub fn bfpo() -> Loss {
        Loss::Bfpo {
            tau: DEFAULT_TAU,
            b1: DEFAULT_B1,
            alpha: DEFAULT_ALPHA,
        }
    }

    /// IPO with τ = 0.01.
    pub fn ipo() -> Loss {
        Loss::Ipo { tau: DEFAULT_TAU }
    }

    /// DPO with β = 0.1, no label smoothing.
    pub fn dpo() -> Loss {
        Loss::Dpo {
            beta: DEFAULT_BETA,
            label_smoothing: 0.0,
        }
    }

    /// The default loss of a kind.
    pub fn of_kind(kind: LossKind) -> Loss {
        match kind {
            LossKind::Bfpo => Loss::bfpo(),
            LossKind::Ipo => Loss::ipo(),
            LossKind::Dpo => Loss::dpo(),
        }
    }

    pub fn kind(&self) -> LossKind {
        match self {
            Loss::Bfpo { .. } => LossKind::Bfpo,
            Loss::Ipo { .. } => LossKind::Ipo,
            Loss::Dpo { .. } => LossKind::Dpo,
        }
    }

    /// Parses `bfpo`, `ipo`, `dpo`, optionally followed by `:name=value,…`:
    /// `bfpo:tau=0.01,b1=3,alpha=0.5`, `ipo:tau=0.05`, `dpo:beta=0.1,eps=0.1`
    /// (`label_smoothing` is accepted for `eps`, `beta` for the τ of BFPO/IPO). Names are
    /// case-insensitive. The result is validated.
    pub fn parse(s: &str) -> Result<Loss, LossError> {
        let s = s.trim();
        let (name, params) = match s.split_once(':') {
            Some((n, p)) => (n.trim(), p.trim()),
            None => (s, ""),
        };
        let kind = match name.to_ascii_lowercase().as_str() {
            "bfpo" => LossKind::Bfpo,
            "ipo" => LossKind::Ipo,
            "dpo" => LossKind::Dpo,
            _ => return Err(LossError::UnknownLoss(s.to_string())),
        };
        let mut loss = Loss::of_kind(kind);
        for item in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            let lname = kind.name();
            let number = |v: &str| -> Result<f64, LossError> {
                v.parse::<f64>().map_err(|_| LossError::NotANumber {
                    loss: lname,
                    param: key.clone(),
                    value: v.to_string(),
                })
            };
            match (&mut loss, key.as_str()) {
                (Loss::Bfpo { tau, .. } | Loss::Ipo { tau }, "tau" | "beta") => {
                    *tau = number(value)?
                }
                (Loss::Bfpo { b1, .. }, "b1") => *b1 = number(value)?,
                (Loss::Bfpo { alpha, .. }, "alpha") => *alpha = number(value)?,
                (Loss::Dpo { beta, .. }, "beta") => *beta = number(value)?,
                (
                    Loss::Dpo {
                        label_smoothing, ..
                    },
                    "eps" | "label_smoothing",
                ) => *label_smoothing = number(value)?,
                _ => {
                    let (allowed, allowed_example) = match kind {
                        LossKind::Bfpo => ("tau, b1, alpha", "tau=0.01,b1=3,alpha=0.5"),
                        LossKind::Ipo => ("tau", "tau=0.01"),
                        LossKind::Dpo => ("beta, eps", "beta=0.1,eps=0.0"),
                    };
                    return Err(LossError::UnknownParam {
                        loss: lname,
                        param: key,
                        allowed,
                        allowed_example,
                    });
                }
            }
        }
        loss.validate()?;
        Ok(loss)
    }

    /// Checks the hyperparameters: τ, β > 0 and finite; b1 ≠ 1 (b3 = 1/(b1−1)); α finite;
    /// 0 ≤ ε < 0.5.
    pub fn validate(&self) -> Result<(), LossError> {
        let positive = |loss, param, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(LossError::OutOfRange {
                    loss,
                    param,
                    value: v,
                    requirement: "must be a finite number > 0",
                })
            }
        };
        match *self {
            Loss::Bfpo { tau, b1, alpha } => {
                positive("bfpo", "tau", tau)?;
                if !b1.is_finite() || (b1 - 1.0).abs() < 1e-12 {
                    return Err(LossError::OutOfRange {
                        loss: "bfpo",
                        param: "b1",
                        value: b1,
                        requirement: "must be finite and differ from 1 (b3 = 1/(b1 − 1)); the paper uses 3",
                    });
                }
                if !alpha.is_finite() {
                    return Err(LossError::OutOfRange {
                        loss: "bfpo",
                        param: "alpha",
                        value: alpha,
                        requirement: "must be finite; the paper uses 0.5",
                    });
                }
            }
            Loss::Ipo { tau } => positive("ipo", "tau", tau)?,
            Loss::Dpo {
                beta,
                label_smoothing,
            } => {
                positive("dpo", "beta", beta)?;
                if !(0.0..0.5).contains(&label_smoothing) {
                    return Err(LossError::OutOfRange {
                        loss: "dpo",
                        param: "eps",
                        value: label_smoothing,
                        requirement: "label smoothing must be in [0, 0.5)",
                    });
                }
            }
        }
        Ok(())
    }

    /// The scale s of the logged rewards `s·(lp_θ − lp_ref)`: τ for BFPO/IPO, β for DPO.
    pub fn reward_scale(&self) -> f64 {
        match *self {
            Loss::Bfpo { tau, .. } | Loss::Ipo { tau } => tau,
            Loss::Dpo { beta, .. } => beta,
        }
    }

    /// BFPO's label `g = b1·b3·s_w − b3·s_l − α` (None for IPO and DPO).
    pub fn bfpo_label(&self, safe_w: bool, safe_l: bool) -> Option<f64> {
        match *self {
            Loss::Bfpo { b1, alpha, .. } => {
                let b3 = 1.0 / (b1 - 1.0);
                let sw = if safe_w { 1.0 } else { 0.0 };
                let sl = if safe_l { 1.0 } else { 0.0 };
                Some(b1 * b3 * sw - b3 * sl - alpha)
            }
            _ => None,
        }
    }

    /// The margin Δ* at which a pair's loss is minimal, where one exists.
    pub fn target(&self, safe_w: bool, safe_l: bool) -> Option<f64> {
        match *self {
            Loss::Bfpo { tau, .. } => self.bfpo_label(safe_w, safe_l).map(|g| g / tau),
            Loss::Ipo { tau } => Some(1.0 / (2.0 * tau)),
            Loss::Dpo {
                beta,
                label_smoothing: eps,
            } => (eps > 0.0).then(|| ((1.0 - eps) / eps).ln() / beta),
        }
    }

    /// Loss, gradient and metrics of one pair. `safe_w` / `safe_l` are the safety labels of
    /// the chosen (more helpful) and rejected response (true = safe); only BFPO uses them.
    /// Non-finite inputs give a non-finite loss (use [`Loss::batch`] to get an error instead).
    pub fn pair(&self, lp: PairLogps, safe_w: bool, safe_l: bool) -> PairLoss {
        let delta = lp.delta();
        let target = self.target(safe_w, safe_l);
        let (loss, d_delta) = match *self {
            Loss::Bfpo { .. } | Loss::Ipo { .. } => {
                let t = target.expect("BFPO and IPO always have a target");
                let r = delta - t;
                (r * r, 2.0 * r)
            }
            Loss::Dpo {
                beta,
                label_smoothing: eps,
            } => {
                let z = beta * delta;
                let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
                // d/dz[−log σ(z)] = −σ(−z); d/dz[−log σ(−z)] = σ(z).
                let d = beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z));
                (loss, d)
            }
        };
        let s = self.reward_scale();
        PairLoss {
            loss,
            d_policy_chosen: d_delta,
            d_policy_rejected: -d_delta,
            delta,
            target,
            reward_chosen: s * (lp.policy_chosen - lp.ref_chosen),
            reward_rejected: s * (lp.policy_rejected - lp.ref_rejected),
        }
    }

    /// The batch loss: the mean of the per-pair losses, its gradient with respect to every
    /// policy log-prob (the per-pair gradients divided by the number of pairs) and TRL-style
    /// metrics. Errors on an empty batch or a non-finite log-prob (naming the pair).
    pub fn batch(&self, pairs: &[PairInput]) -> Result<BatchLoss, LossError> {
        if pairs.is_empty() {
            return Err(LossError::EmptyBatch);
        }
        let n = pairs.len() as f64;
        let mut out = BatchLoss {
            loss: 0.0,
            d_policy_chosen: Vec::with_capacity(pairs.len()),
            d_policy_rejected: Vec::with_capacity(pairs.len()),
            pairs: Vec::with_capacity(pairs.len()),
            metrics: BatchMetrics::default(),
        };
        let m = &mut out.metrics;
        let (mut n_safe, mut n_unsafe) = (0usize, 0usize);
        for (index, p) in pairs.iter().enumerate() {
            if !p.logps.is_finite() {
                return Err(LossError::NonFinite {
                    index,
                    policy_chosen: p.logps.policy_chosen,
                    policy_rejected: p.logps.policy_rejected,
                    ref_chosen: p.logps.ref_chosen,
                    ref_rejected: p.logps.ref_rejected,
                });
            }
            let pl = self.pair(p.logps, p.chosen_safe, p.rejected_safe);
            out.loss += pl.loss / n;
            out.d_policy_chosen.push(pl.d_policy_chosen / n);
            out.d_policy_rejected.push(pl.d_policy_rejected / n);
            m.reward_chosen += pl.reward_chosen / n;
            m.reward_rejected += pl.reward_rejected / n;
            m.margin += (pl.reward_chosen - pl.reward_rejected) / n;
            m.accuracy += if pl.reward_chosen > pl.reward_rejected {
                1.0 / n
            } else {
                0.0
            };
            m.logps_chosen += p.logps.policy_chosen / n;
            m.logps_rejected += p.logps.policy_rejected / n;
            m.delta += pl.delta / n;
            if let Some(t) = pl.target {
                m.target_gap += (pl.delta - t).abs() / n;
            }
            // Rewards of safe and unsafe responses, with a real mask (not the official code's
            // integer-gather bug).
            for (safe, reward) in [
                (p.chosen_safe, pl.reward_chosen),
                (p.rejected_safe, pl.reward_rejected),
            ] {
                if safe {
                    m.safe_reward += reward;
                    n_safe += 1;
                } else {
                    m.unsafe_reward += reward;
                    n_unsafe += 1;
                }
            }
            out.pairs.push(pl);
        }
        m.safe_reward = if n_safe > 0 {
            m.safe_reward / n_safe as f64
        } else {
            f64::NAN
        };
        m.unsafe_reward = if n_unsafe > 0 {
            m.unsafe_reward / n_unsafe as f64
        } else {
            f64::NAN
        };
        m.n_safe_responses = n_safe;
        m.n_unsafe_responses = n_unsafe;
        Ok(out)
    }
}

/// BFPO of one pair: `(Δ − g/τ)²` with `g = b1·b3·s_w − b3·s_l − α`, `b3 = 1/(b1 − 1)`
/// (the official defaults are τ = 0.01, b1 = 3, α = 0.5: [`Loss::bfpo`]).
pub fn bfpo(lp: PairLogps, safe_w: bool, safe_l: bool, tau: f64, b1: f64, alpha: f64) -> PairLoss {
    Loss::Bfpo { tau, b1, alpha }.pair(lp, safe_w, safe_l)
}

/// IPO of one pair: `(Δ − 1/(2τ))²`.
pub fn ipo(lp: PairLogps, tau: f64) -> PairLoss {
    Loss::Ipo { tau }.pair(lp, true, true)
}

/// DPO of one pair: `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)`.
pub fn dpo(lp: PairLogps, beta: f64, label_smoothing: f64) -> PairLoss {
    Loss::Dpo {
        beta,
        label_smoothing,
    }
    .pair(lp, true, true)
}

impl FromStr for Loss {
    type Err = LossError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Loss::parse(s)
    }
}

impl fmt::Display for Loss {
    /// The form [`Loss::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Loss::Bfpo { tau, b1, alpha } => write!(f, "bfpo:tau={tau},b1={b1},alpha={alpha}"),
            Loss::Ipo { tau } => write!(f, "ipo:tau={tau}"),
            Loss::Dpo {
                beta,
                label_smoothing,
            } => write!(f, "dpo:beta={beta},eps={label_smoothing}"),
        }
    }
}

/// One pair of a batch: its log-probs and safety labels.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairInput {
    pub logps: PairLogps,
    /// Safety of the chosen (more helpful) response.
    pub chosen_safe: bool,
    /// Safety of the rejected (less helpful) response.
    pub rejected_safe: bool,
}

/// Means over a batch, named after TRL's logged metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchMetrics {
    /// `rewards/chosen`.
    pub reward_chosen: f64,
    /// `rewards/rejected`.
    pub reward_rejected: f64,
    /// `rewards/margins`.
    pub margin: f64,
    /// `rewards/accuracies`: fraction with reward_chosen > reward_rejected.
    pub accuracy: f64,
    /// `logps/chosen` (policy).
    pub logps_chosen: f64,
    /// `logps/rejected` (policy).
    pub logps_rejected: f64,
    /// Mean Δ.
    pub delta: f64,
    /// Mean |Δ − Δ*| over pairs that have a target (0 for DPO without smoothing).
    pub target_gap: f64,
    /// Mean reward of the safe responses in the batch (NaN if none).
    pub safe_reward: f64,
    /// Mean reward of the unsafe responses in the batch (NaN if none).
    pub unsafe_reward: f64,
    pub n_safe_responses: usize,
    pub n_unsafe_responses: usize,
}

/// A batch loss: the mean loss, its gradient per pair and metrics.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchLoss {
    /// Mean of the per-pair losses.
    pub loss: f64,
    /// ∂(mean loss)/∂lp_θ(chosen_i), one per pair (per-pair gradient / batch size).
    pub d_policy_chosen: Vec<f64>,
    /// ∂(mean loss)/∂lp_θ(rejected_i).
    pub d_policy_rejected: Vec<f64>,
    /// Per-pair results (unscaled gradients).
    pub pairs: Vec<PairLoss>,
    pub metrics: BatchMetrics,
}
