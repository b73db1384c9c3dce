//! Settings of a training run: read from a TOML `--config` file, then overridden by command-line
//! flags (the CLI wins). Every field has a default, so an empty file is a valid config.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error(
        "unknown recipe `{name}`: the built-in recipes are {known}; or pass --config FILE.toml"
    )]
    UnknownRecipe { name: String, known: String },
    #[error("invalid setting {key} = {value}: {detail}")]
    Invalid {
        key: &'static str,
        value: String,
        detail: String,
    },
}

/// Learning-rate schedule shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Which response of a pair is `chosen` when the two differ in safety.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PairOrder {
    /// As the data says: `chosen` is the more helpful response (BFPO's y_hw), whatever its
    /// safety label. BFPO needs this order; DPO and IPO then learn helpfulness only.
    #[default]
    Helpful,
    /// The safe response is `chosen` when exactly one side is safe (the rows are swapped, labels
    /// too); otherwise the more helpful one. This is how DPO/IPO safety baselines (and TRL users)
    /// build safety preferences. BFPO's loss is unchanged by the swap (its label table is
    /// antisymmetric), so BFPO trains the same numbers in either order.
    SafeFirst,
}

/// Which engine computes log-probs and gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The wgpu engine on a real GPU, the native CPU engine when the only adapter is a CPU
    /// driver (lavapipe, SwiftShader) or there is none.
    Auto,
    /// Our WGSL kernels through wgpu (`gpu` is accepted too).
    #[serde(alias = "gpu")]
    #[value(alias = "gpu")]
    Wgpu,
    /// The native CPU engine (SIMD GEMM over dequantized weight panels, threads).
    Cpu,
    /// The f64 CPU reference model (tiny models only: tests and cross-checks).
    Reference,
}

/// The built-in recipes (`tune --recipe NAME`): TOML files of `recipes/`, embedded in the binary
/// so that they work from any directory. `docs/recipe.md` explains each choice.
pub const RECIPES: &[(&str, &str)] = &[("safety", include_str!("../../recipes/safety.toml"))];

/// A training run's settings. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- inputs and outputs
    pub model: Option<PathBuf>,
    /// Safety preference data files (JSONL, .gz, .xz, Parquet, JSON array).
    pub data: Vec<PathBuf>,
    /// Dataset format: auto, pku, redteam, generic, trl, ultrafeedback, hh.
    pub format: String,
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out for evaluation when `eval_data` is not given.
    pub eval_fraction: f64,
    /// Helpfulness buffer mixed into every step (BFPO's buffered training).
    pub buffer: Option<PathBuf>,
    /// Buffer pairs per safety pair in each step.
    pub buffer_ratio: f64,
    pub out: PathBuf,
    /// Stop at the first bad row instead of skipping and counting it.
    pub strict: bool,
    /// Chat template instead of the model's own: a Jinja file or a built-in name
    /// (`chatml`, `chatml-smollm2`, `zephyr`, `llama3`, `gemma`, `gemma3`, `qwen3`).
    pub chat_template: Option<String>,
    /// The chat template's `enable_thinking` variable (Qwen3): unset leaves the template's own
    /// default (Qwen3: thinking on); `false` renders an empty `<think>` block after the
    /// generation prompt.
    pub enable_thinking: Option<bool>,
    // --- loss
    /// `bfpo`, `ipo` or `dpo`, optionally with parameters (`bfpo:tau=0.01,b1=3,alpha=0.5`).
    pub loss: String,
    /// Which side of a mixed-safety pair is `chosen`: `helpful` (as the data says) or
    /// `safe-first` (the safe side; the DPO/IPO safety baseline).
    pub pair_order: PairOrder,
    // --- LoRA
    pub rank: usize,
    pub lora_alpha: f32,
    /// Comma list of attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, or `all`.
    pub targets: String,
    /// `all` or ranges like `0-11,14`.
    pub layers: String,
    pub lora_dropout: f32,
    // --- optimisation
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    /// Warmup as a fraction of the total steps.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    pub epochs: usize,
    /// Stop after this many optimiser steps (0 = run the epochs).
    pub max_steps: usize,
    /// Safety pairs per micro-step.
    pub pairs_per_step: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub seed: u64,
    // --- bookkeeping
    pub save_every: usize,
    pub eval_every: usize,
    /// Recompute reference log-probs even if cached.
    pub no_ref_cache: bool,
    /// Where reference log-probs are cached (default: `<out>/../.bfpo-cache` or the user cache).
    pub cache_dir: Option<PathBuf>,
    pub engine: EngineKind,
    /// Worker threads of the CPU engine (default: every core).
    pub threads: Option<usize>,
    /// CPU engine: compute a prefix that several sequences of a micro-batch begin with (a
    /// pair's prompt) once. Exact (the same bits as off), so on by default.
    pub prompt_sharing: bool,
    /// GPU adapter index or name.
    pub device: Option<String>,
    /// Stop after this many non-finite steps in a row.
    pub max_bad_steps: usize,
    /// Device memory for keeping layers' intermediates between the forward and the backward
    /// pass (`auto`, a size such as `4GiB`, or `0`): layers that do not fit are recomputed in
    /// the backward (activation checkpointing). `0` recomputes every layer, as TRL's
    /// `gradient_checkpointing=True`; the numbers are the same bits either way.
    pub activation_memory: String,
    // --- harmlessness evaluation (the generative part of `eval`)
    /// Harmful prompts to answer and judge: a JSONL file of prompts, `harmbench` or
    /// `donotanswer`. The base model (step 0) and the tuned adapter (last step) are evaluated.
    pub eval_harmful: Option<String>,
    /// Also evaluate the adapter every this many steps during training (0 = only base and end).
    pub eval_harmful_every: usize,
    /// At most this many harmful prompts, spread over the set.
    pub eval_harmful_limit: Option<usize>,
    /// New tokens generated per answer.
    pub eval_max_tokens: usize,
    /// Judge: `refusal` (refusal phrase list) or a chat GGUF judge model.
    pub eval_judge: String,
    /// How a GGUF judge is prompted: `llama-guard` or `yes-no`.
    pub eval_judge_format: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            data: Vec::new(),
            format: "auto".into(),
            eval_data: None,
            eval_fraction: 0.0,
            buffer: None,
            buffer_ratio: 1.0,
            out: PathBuf::from("runs/bfpo"),
            strict: false,
            chat_template: None,
            enable_thinking: None,
            loss: "bfpo".into(),
            pair_order: PairOrder::Helpful,
            rank: 16,
            lora_alpha: 32.0,
            targets: "ffn_down".into(),
            layers: "all".into(),
            lora_dropout: 0.0,
            learning_rate: 1e-4,
            schedule: ScheduleKind::Cosine,
            warmup_ratio: 0.1,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: 0,
            pairs_per_step: 2,
            grad_accum: 4,
            max_length: 1024,
            max_prompt_length: 512,
            seed: 42,
            save_every: 100,
            eval_every: 50,
            no_ref_cache: false,
            cache_dir: None,
            engine: EngineKind::Auto,
            threads: None,
            prompt_sharing: true,
            device: None,
            max_bad_steps: 3,
            activation_memory: "auto".into(),
            eval_harmful: None,
            eval_harmful_every: 0,
            eval_harmful_limit: None,
            eval_max_tokens: 64,
            eval_judge: "refusal".into(),
            eval_judge_format: "llama-guard".into(),
        }
    }
}

/// Settings a resumed run may change: they decide where and how often things are written or
/// where caches live, never the numbers of the run. Every other setting must stay as the
/// checkpoint was written with (see [`TrainConfig::resume_changes`]).
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "out",
    "save_every",
    "eval_every",
    "no_ref_cache",
    "cache_dir",
    "device",
    "threads",
    "prompt_sharing",
    "max_bad_steps",
    "activation_memory",
    "eval_harmful",
    "eval_harmful_every",
    "eval_harmful_limit",
    "eval_max_tokens",
    "eval_judge",
    "eval_judge_format",
];

/// One setting that differs between a checkpoint's run and the run resuming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingChange {
    /// The TOML key (the long flag name with `_`).
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for SettingChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

/// A setting's value as a person would write it (`0.005`, `1`, `cosine`, `["a.jsonl"]`, `none`).
fn show_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "none".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(i), _) => i.to_string(),
            (None, None, Some(f)) => {
                // f32 settings (lora_alpha, lora_dropout) print as the f32 they are.
                let g = f as f32;
                if g as f64 == f {
                    g.to_string()
                } else {
                    f.to_string()
                }
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

impl TrainConfig {
    /// The settings of `self` (a run resuming) that differ from `saved` (the run that wrote the
    /// checkpoint), in key order, leaving out [`RESUME_MAY_CHANGE`].
    pub fn resume_changes(&self, saved: &TrainConfig) -> Vec<SettingChange> {
        let (Ok(serde_json::Value::Object(new)), Ok(serde_json::Value::Object(old))) =
            (serde_json::to_value(self), serde_json::to_value(saved))
        else {
            return Vec::new();
        };
        let mut keys: Vec<&String> = new.keys().chain(old.keys()).collect();
        keys.sort();
        keys.dedup();
        let null = serde_json::Value::Null;
        keys.into_iter()
            .filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str()))
            .filter_map(|k| {
                let (a, b) = (old.get(k).unwrap_or(&null), new.get(k).unwrap_or(&null));
                (a != b).then(|| SettingChange {
                    key: k.clone(),
                    old: show_value(a),
                    new: show_value(b),
                })
            })
            .collect()
    }

    /// Reads a TOML file (unknown keys are errors, naming the key).
    pub fn from_toml_file(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|detail| ConfigError::Parse {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// A built-in recipe ([`RECIPES`]) by name.
    pub fn recipe(name: &str) -> Result<TrainConfig, ConfigError> {
        let (n, text) =
            RECIPES
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| ConfigError::UnknownRecipe {
                    name: name.to_string(),
                    known: RECIPES
                        .iter()
                        .map(|(n, _)| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        Self::from_toml_str(text).map_err(|detail| ConfigError::Parse {
            path: PathBuf::from(format!("recipes/{n}.toml")),
            detail,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<TrainConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks ranges; errors name the key, the value and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, value: impl ToString, detail: &str) -> ConfigError {
            ConfigError::Invalid {
                key,
                value: value.to_string(),
                detail: detail.to_string(),
            }
        }
        if self.rank == 0 {
            return Err(bad("rank", self.rank, "must be at least 1"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(bad(
                "learning_rate",
                self.learning_rate,
                "must be a positive number",
            ));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(bad(
                "eval_fraction",
                self.eval_fraction,
                "must be in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(bad("warmup_ratio", self.warmup_ratio, "must be in [0, 1]"));
        }
        if self.pairs_per_step == 0 {
            return Err(bad("pairs_per_step", 0, "must be at least 1"));
        }
        if self.activation_memory != "auto" {
            crate::util::size::parse_size(&self.activation_memory).map_err(|detail| {
                ConfigError::Invalid {
                    key: "activation_memory",
                    value: self.activation_memory.clone(),
                    detail,
                }
            })?;
        }
        if self.eval_max_tokens == 0 {
            return Err(bad("eval_max_tokens", 0, "must be at least 1"));
        }
        if self.eval_harmful_limit == Some(0) {
            return Err(bad("eval_harmful_limit", 0, "must be at least 1"));
        }
        if !matches!(
            self.eval_judge_format.to_ascii_lowercase().as_str(),
            "llama-guard" | "llamaguard" | "llama_guard" | "yes-no" | "yesno" | "yes_no"
        ) {
            return Err(bad(
                "eval_judge_format",
                &self.eval_judge_format,
                "must be llama-guard or yes-no",
            ));
        }
        if self.grad_accum == 0 {
            return Err(bad("grad_accum", 0, "must be at least 1"));
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return Err(bad("epochs", 0, "set epochs ≥ 1 or max_steps ≥ 1"));
        }
        if self.max_prompt_length >= self.max_length {
            return Err(bad(
                "max_prompt_length",
                self.max_prompt_length,
                "must be smaller than max_length",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad(
                "lora_dropout",
                self.lora_dropout,
                "must be in [0, 1) (the probability of zeroing a LoRA input; 0 disables dropout)",
            ));
        }
        if self.buffer_ratio < 0.0 || !self.buffer_ratio.is_finite() {
            return Err(bad("buffer_ratio", self.buffer_ratio, "must be ≥ 0"));
        }
        crate::loss::Loss::parse(&self.loss)
            .map_err(|e| bad("loss", &self.loss, &e.to_string()))?;
        crate::model::lora::parse_targets(&self.targets)
            .map_err(|e| bad("targets", &self.targets, &e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_recipes_parse_validate_and_unknown_ones_are_named() {
        for (name, _) in RECIPES {
            let c = TrainConfig::recipe(name).unwrap();
            c.validate().unwrap();
            assert!(
                c.model.is_none() && c.data.is_empty(),
                "{name}: a recipe names no files"
            );
        }
        let s = TrainConfig::recipe("safety").unwrap();
        assert_eq!(
            (s.loss.as_str(), s.pair_order),
            ("bfpo", PairOrder::Helpful)
        );
        assert_eq!(s.buffer_ratio, 1.0);
        let e = TrainConfig::recipe("safe").unwrap_err().to_string();
        assert!(e.contains("`safety`") && e.contains("--config"), "{e}");
        let c = TrainConfig::from_toml_str("pair_order = \"safe-first\"\n").unwrap();
        assert_eq!(c.pair_order, PairOrder::SafeFirst);
    }

    #[test]
    fn toml_round_trip_defaults_and_unknown_keys() {
        let c = TrainConfig::default();
        let back = TrainConfig::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let c = TrainConfig::from_toml_str("rank = 8\nlearning_rate = 5e-5\ntargets = \"all\"\n")
            .unwrap();
        assert_eq!(
            (c.rank, c.learning_rate, c.targets.as_str()),
            (8, 5e-5, "all")
        );
        assert_eq!(c.epochs, 1, "unset keys keep defaults");
        let e = TrainConfig::from_toml_str("rnak = 8\n").unwrap_err();
        assert!(e.contains("rnak"), "{e}");
    }

    #[test]
    fn resume_changes_name_each_setting_with_old_and_new_values() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            learning_rate: 5e-3,
            lora_dropout: 0.1,
            save_every: 7,
            out: "elsewhere".into(),
            activation_memory: "0".into(),
            ..a.clone()
        };
        let c: Vec<String> = b.resume_changes(&a).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            c,
            vec!["learning_rate: 0.0001 -> 0.005", "lora_dropout: 0 -> 0.1"]
        );
        assert!(a.resume_changes(&a).is_empty());
    }

    #[test]
    fn validation_names_key_and_value() {
        let c = TrainConfig {
            max_prompt_length: 2048,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_prompt_length = 2048"), "{e}");
        let c = TrainConfig {
            loss: "ppo".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("loss = ppo"));
        for (m, ok) in [("auto", true), ("0", true), ("6GiB", true), ("lots", false)] {
            let c = TrainConfig {
                activation_memory: m.into(),
                ..Default::default()
            };
            match c.validate() {
                Ok(()) => assert!(ok, "activation_memory = {m} accepted"),
                Err(e) => {
                    assert!(!ok, "activation_memory = {m}: {e}");
                    assert!(e.to_string().contains("activation_memory = lots"), "{e}");
                }
            }
        }
        for p in [0.0f32, 0.1, 0.999] {
            let c = TrainConfig {
                lora_dropout: p,
                ..Default::default()
            };
            c.validate().unwrap();
        }
        for p in [1.0f32, -0.1, 1.5, f32::NAN] {
            let c = TrainConfig {
                lora_dropout: p,
                ..Default::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("lora_dropout = {p}")) && e.contains("[0, 1)"),
                "{e}"
            );
        }
        TrainConfig::default().validate().unwrap();
    }
}
