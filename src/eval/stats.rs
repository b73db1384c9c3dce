//! Proportions and means with 95 % intervals.
//!
//! Rates (harmless rate, over-refusal, accuracies) use the **Wilson score interval**
//! (Wilson 1927): with `p̂ = k/n` and `z = 1.959964` (the 97.5 % normal quantile),
//!
//! ```text
//! centre = (p̂ + z²/(2n)) / (1 + z²/n)
//! half   = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/(4n²))
//! ```
//!
//! It stays inside [0, 1] and is sensible at k = 0 and k = n, where the normal ("Wald")
//! interval collapses to a point. Means (log-prob drift, KL) use the normal approximation over
//! the per-prompt values: `mean ± z · sd/√n` (sample standard deviation).

use serde::{Deserialize, Serialize};

/// The two-sided 95 % normal quantile.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A figure with its sample size and 95 % interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The point estimate (a rate in [0, 1], or a mean).
    pub value: f64,
    /// Sample size (prompts, pairs, questions).
    pub n: usize,
    /// Successes, for rates.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub k: Option<usize>,
    /// Lower end of the 95 % interval.
    pub lo: f64,
    /// Upper end of the 95 % interval.
    pub hi: f64,
    /// `wilson95` (rates) or `normal95` (means over prompts).
    pub interval: String,
}

impl Figure {
    /// A rate `k / n` with its Wilson interval. `n = 0` gives NaN value and the interval [0, 1].
    pub fn rate(k: usize, n: usize) -> Figure {
        let (lo, hi) = wilson(k, n);
        Figure {
            value: if n == 0 {
                f64::NAN
            } else {
                k as f64 / n as f64
            },
            n,
            k: Some(k),
            lo,
            hi,
            interval: "wilson95".into(),
        }
    }

    /// The mean of `xs` with a normal-approximation interval over the values.
    pub fn mean(xs: &[f64]) -> Figure {
        let (value, lo, hi) = mean_interval(xs);
        Figure {
            value,
            n: xs.len(),
            k: None,
            lo,
            hi,
            interval: "normal95".into(),
        }
    }
}

/// Wilson score interval (95 %) of `k` successes in `n` trials; `(0, 1)` when `n = 0`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    wilson_z(k, n, Z95)
}

/// Wilson score interval with a chosen normal quantile `z`.
pub fn wilson_z(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let k = k.min(n);
    let nf = n as f64;
    let p = k as f64 / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = z / denom * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
    // Exact ends at k = 0 and k = n (the formula gives them up to rounding).
    let lo = if k == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// `(mean, lo, hi)`: mean ± z·sd/√n; NaNs for no values, a point interval for one value.
pub fn mean_interval(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, mean, mean);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = Z95 * (var / n as f64).sqrt();
    (mean, mean - half, mean + half)
}

/// `log(Σ exp(x))`, stable.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}
