//! LoRA adapters on the projections of a frozen model: `y = W·x + (alpha/r)·B·(A·x)` with
//! A `[r, n_in]` and B `[n_out, r]` (the orientation of llama.cpp and PEFT), B zero at start.
//!
//! Shared by the model's f64 reference, the GPU and native CPU engines, training and export, so
//! it lives below all of them.

pub mod dropout;

use crate::model::ModelConfig;
use crate::util::Rng;
use serde::{Deserialize, Serialize};

/// A projection LoRA can attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// The LM head `output.weight` (`[n_vocab, d]`; absent when the model ties its embeddings).
    /// Not a per-layer projection: its tensors carry layer 0, it is not in [`Target::ALL`] and
    /// training does not target it (the GPU backward has no LM-head LoRA); adapters that carry
    /// it (llama.cpp loads them) are scored by both engines.
    Output,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::AttnQ,
        Target::AttnK,
        Target::AttnV,
        Target::AttnOutput,
        Target::FfnGate,
        Target::FfnUp,
        Target::FfnDown,
    ];

    /// GGUF tensor stem: `blk.N.<stem>.weight`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::AttnQ => "attn_q",
            Target::AttnK => "attn_k",
            Target::AttnV => "attn_v",
            Target::AttnOutput => "attn_output",
            Target::FfnGate => "ffn_gate",
            Target::FfnUp => "ffn_up",
            Target::FfnDown => "ffn_down",
            Target::Output => "output",
        }
    }

    /// Hugging Face module path under `model.layers.N.` (PEFT naming).
    pub fn hf_module(self) -> &'static str {
        match self {
            Target::AttnQ => "self_attn.q_proj",
            Target::AttnK => "self_attn.k_proj",
            Target::AttnV => "self_attn.v_proj",
            Target::AttnOutput => "self_attn.o_proj",
            Target::FfnGate => "mlp.gate_proj",
            Target::FfnUp => "mlp.up_proj",
            Target::FfnDown => "mlp.down_proj",
            Target::Output => "lm_head",
        }
    }

    /// The short HF name used in PEFT's `target_modules` (`q_proj`, `down_proj`, …).
    pub fn hf_short(self) -> &'static str {
        self.hf_module().rsplit('.').next().unwrap_or_default()
    }

    /// Accepts GGUF stems (`ffn_down`), HF names (`down_proj`) and the aliases `q k v o gate up down`.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().to_ascii_lowercase();
        Target::ALL.into_iter().find(|t| {
            s == t.gguf_name() || s == t.hf_short() || s == t.hf_short().trim_end_matches("_proj")
        })
    }

    /// `(n_in, n_out)` of this projection in a model.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        match self {
            Target::AttnQ => (cfg.n_embd, cfg.q_dim()),
            Target::AttnK | Target::AttnV => (cfg.n_embd, cfg.kv_dim()),
            Target::AttnOutput => (cfg.q_dim(), cfg.n_embd),
            Target::FfnGate | Target::FfnUp => (cfg.n_embd, cfg.n_ff),
            Target::FfnDown => (cfg.n_ff, cfg.n_embd),
            Target::Output => (cfg.n_embd, cfg.n_vocab),
        }
    }

    /// Full GGUF base tensor name for a layer (`output.weight` for [`Target::Output`], whatever
    /// the layer).
    pub fn tensor_name(self, layer: usize) -> String {
        match self {
            Target::Output => "output.weight".into(),
            _ => format!("blk.{layer}.{}.weight", self.gguf_name()),
        }
    }

    /// Whether this is a per-layer projection (everything but [`Target::Output`]).
    pub fn is_layer(self) -> bool {
        self != Target::Output
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(
        "unknown LoRA target {0:?}; choose from attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down (or all)"
    )]
    UnknownTarget(String),
    #[error("bad layer selection {spec:?}: {detail} (the model has {n_layer} layers, 0-{last})", last = n_layer.saturating_sub(1))]
    BadLayers {
        spec: String,
        detail: String,
        n_layer: usize,
    },
    #[error("LoRA rank must be at least 1 (got {0})")]
    BadRank(usize),
}

/// Parses `ffn_down,attn_q` or `all`.
pub fn parse_targets(s: &str) -> Result<Vec<Target>, LoraError> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(Target::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let t = Target::parse(part).ok_or_else(|| LoraError::UnknownTarget(part.to_string()))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(LoraError::UnknownTarget(s.to_string()));
    }
    out.sort();
    Ok(out)
}

/// Parses `0-11`, `3,5,7-9` or `all` against a model with `n_layer` layers.
pub fn parse_layers(s: &str, n_layer: usize) -> Result<Vec<usize>, LoraError> {
    let bad = |detail: String| LoraError::BadLayers {
        spec: s.to_string(),
        detail,
        n_layer,
    };
    if s.trim().eq_ignore_ascii_case("all") || s.trim().is_empty() {
        return Ok((0..n_layer).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo
            .parse()
            .map_err(|_| bad(format!("{part:?} is not a number or range")))?;
        let hi: usize = hi
            .parse()
            .map_err(|_| bad(format!("{part:?} is not a number or range")))?;
        if lo > hi {
            return Err(bad(format!("range {part:?} is backwards")));
        }
        if hi >= n_layer {
            return Err(bad(format!("layer {hi} does not exist")));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// What to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub targets: Vec<Target>,
    pub layers: Vec<usize>,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub seed: u64,
}

/// One adapted projection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraTensor {
    pub layer: usize,
    pub target: Target,
    pub n_in: usize,
    pub n_out: usize,
    /// `[rank, n_in]` row-major.
    pub a: Vec<f32>,
    /// `[n_out, rank]` row-major.
    pub b: Vec<f32>,
}

impl LoraTensor {
    /// `ΔW = scale·B·A`, row-major `[n_out, n_in]` (tests, merge).
    pub fn delta(&self, rank: usize, scale: f32) -> Vec<f32> {
        let mut d = vec![0.0f32; self.n_out * self.n_in];
        for o in 0..self.n_out {
            for k in 0..rank {
                let b = self.b[o * rank + k] * scale;
                if b == 0.0 {
                    continue;
                }
                let arow = &self.a[k * self.n_in..(k + 1) * self.n_in];
                for (dst, &a) in d[o * self.n_in..(o + 1) * self.n_in].iter_mut().zip(arow) {
                    *dst += b * a;
                }
            }
        }
        d
    }
}

/// A full adapter: rank, alpha and its tensors (sorted by layer, then target).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraWeights {
    pub rank: usize,
    pub alpha: f32,
    pub tensors: Vec<LoraTensor>,
}

impl LoraWeights {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraTensor> {
        self.tensors
            .iter()
            .find(|t| t.layer == layer && t.target == target)
    }

    pub fn n_params(&self) -> usize {
        self.tensors.iter().map(|t| t.a.len() + t.b.len()).sum()
    }

    /// PEFT's default initialisation: A ~ U(−1/√n_in, 1/√n_in) (Kaiming-uniform with a = √5),
    /// B = 0, so the adapted model starts exactly at the base model.
    pub fn init(spec: &LoraSpec, cfg: &ModelConfig) -> Result<LoraWeights, LoraError> {
        Self::build(spec, cfg, rng_uniform, |_, n| vec![0.0; n])
    }

    /// Random nonzero A and B (tests and export checks), B ~ N(0, b_std²).
    pub fn random(
        spec: &LoraSpec,
        cfg: &ModelConfig,
        b_std: f32,
    ) -> Result<LoraWeights, LoraError> {
        Self::build(spec, cfg, rng_uniform, |rng, n| rng.normal_vec(n, b_std))
    }

    fn build(
        spec: &LoraSpec,
        cfg: &ModelConfig,
        mut init_a: impl FnMut(&mut Rng, (usize, usize)) -> Vec<f32>,
        mut init_b: impl FnMut(&mut Rng, usize) -> Vec<f32>,
    ) -> Result<LoraWeights, LoraError> {
        if spec.rank == 0 {
            return Err(LoraError::BadRank(0));
        }
        let mut tensors = Vec::new();
        let mut targets = spec.targets.clone();
        targets.sort();
        for &layer in &spec.layers {
            if layer >= cfg.n_layer {
                return Err(LoraError::BadLayers {
                    spec: format!("{layer}"),
                    detail: format!("layer {layer} does not exist"),
                    n_layer: cfg.n_layer,
                });
            }
            for &target in &targets {
                let (n_in, n_out) = target.shape(cfg);
                let stream = (layer as u64) << 8 | target as u64;
                let mut rng = Rng::derive(spec.seed, stream);
                let a = init_a(&mut rng, (spec.rank, n_in));
                let b = init_b(&mut rng, n_out * spec.rank);
                tensors.push(LoraTensor {
                    layer,
                    target,
                    n_in,
                    n_out,
                    a,
                    b,
                });
            }
        }
        Ok(LoraWeights {
            rank: spec.rank,
            alpha: spec.alpha,
            tensors,
        })
    }
}

fn rng_uniform(rng: &mut Rng, (rank, n_in): (usize, usize)) -> Vec<f32> {
    let bound = 1.0 / (n_in as f32).sqrt();
    (0..rank * n_in)
        .map(|_| rng.uniform(-bound, bound))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_targets_and_layers() {
        assert_eq!(parse_targets("ffn_down").unwrap(), vec![Target::FfnDown]);
        assert_eq!(
            parse_targets("q_proj, down").unwrap(),
            vec![Target::AttnQ, Target::FfnDown]
        );
        assert_eq!(parse_targets("all").unwrap().len(), 7);
        assert!(parse_targets("embed").is_err());
        assert_eq!(parse_layers("0-2,5", 8).unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_layers("all", 3).unwrap(), vec![0, 1, 2]);
        let e = parse_layers("0-12", 12).unwrap_err().to_string();
        assert!(
            e.contains("layer 12 does not exist") && e.contains("0-11"),
            "{e}"
        );
        assert!(parse_layers("3-1", 8).is_err());
    }

    #[test]
    fn delta_is_scaled_b_times_a() {
        let t = LoraTensor {
            layer: 0,
            target: Target::FfnDown,
            n_in: 3,
            n_out: 2,
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], // rank 2
            b: vec![1.0, 0.0, 0.0, 2.0],
        };
        assert_eq!(t.delta(2, 0.5), vec![0.5, 1.0, 1.5, 4.0, 5.0, 6.0]);
    }
}
