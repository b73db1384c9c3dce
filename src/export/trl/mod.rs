//! `export-run --to trl`: a bfpo-lite run as a self-contained Python project on Hugging Face TRL
//! + accelerate (one GPU, DDP on N GPUs, DeepSpeed ZeRO-3).
//!
//! The project (see [`write_project`]):
//!
//! | file | what |
//! |---|---|
//! | `train.py` | TRL `DPOTrainer` subclass: BFPO loss, safety+buffer batches, precomputed reference |
//! | `bfpo_loss.py` | the loss and truncation as bfpo-lite computes them (no torch import) |
//! | `bfpo_config.json` | [`TrlSettings`]: loss, LoRA, optimiser, truncation, HF model id |
//! | `data/{train,eval,buffer}.jsonl` | [`TrlRow`]s: TRL conversational prompt/chosen/rejected + safety labels + bfpo-lite's token ids |
//! | `requirements.txt`, `requirements-deepspeed.txt` | pinned versions |
//! | `accelerate/{single_gpu,multi_gpu,deepspeed_zero3}.yaml` | launch configs |
//! | `README.md` | the three launch commands and the way back (`import-peft`) |
//!
//! The Python files are static text embedded here (`src/export/trl/*.py`); everything specific
//! to a run is in `bfpo_config.json` and the data.

use super::ExportError;
use crate::data::{ChatMessage, Pair};
use crate::loss::Loss;
use crate::model::lora::{parse_layers, parse_targets};
use crate::train::config::{ScheduleKind, TrainConfig};
use crate::train::trainer::PreparedPair;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const TRAIN_PY: &str = include_str!("train.py");
pub const LOSS_PY: &str = include_str!("bfpo_loss.py");
pub const REQUIREMENTS: &str = include_str!("requirements.txt");
pub const REQUIREMENTS_DEEPSPEED: &str = include_str!("requirements-deepspeed.txt");
pub const ACCELERATE_SINGLE: &str = include_str!("accelerate/single_gpu.yaml");
pub const ACCELERATE_MULTI: &str = include_str!("accelerate/multi_gpu.yaml");
pub const ACCELERATE_ZERO3: &str = include_str!("accelerate/deepspeed_zero3.yaml");

/// The pinned TRL version `train.py` was written against.
pub const TRL_VERSION: &str = "1.16.0";

/// `bfpo_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrlSettings {
    /// Hugging Face model id or path (`--hf-model`).
    pub hf_model: String,
    /// `{"kind": "bfpo", "tau": .., "b1": .., "alpha": ..}` (serde form of [`Loss`]).
    pub loss: Loss,
    pub lora: LoraSettings,
    pub train: TrainSettings,
    pub truncation: TruncationSettings,
    pub source: SourceInfo,
}

/// PEFT `LoraConfig` arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    /// HF short names (`q_proj`, `down_proj`, …).
    pub target_modules: Vec<String>,
    /// `None` = every layer.
    pub layers_to_transform: Option<Vec<usize>>,
}

/// Optimiser and batching, in `transformers.TrainingArguments` terms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub learning_rate: f64,
    /// `cosine`, `linear` or `constant_with_warmup`.
    pub lr_scheduler_type: String,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub epochs: usize,
    /// 0 = run the epochs.
    pub max_steps: usize,
    /// Safety pairs per micro-batch (per GPU).
    pub pairs_per_step: usize,
    /// Buffer pairs per micro-batch (per GPU): `round(pairs_per_step · buffer_ratio)`, at least
    /// 1 when a buffer exists (bfpo-lite's rule).
    pub buffer_pairs_per_step: usize,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
    pub save_every: usize,
    pub eval_every: usize,
}

/// bfpo-lite's truncation (`data::batch::TruncationConfig`); `bfpo_loss.truncate_pair` mirrors it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TruncationSettings {
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub keep_prompt_prefix: usize,
    /// `trl` or `remaining`.
    pub response_budget: String,
}

/// Where the project came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub run_dir: String,
    pub model_gguf: String,
    pub datasets: Vec<String>,
    pub bfpo_lite_version: String,
    pub trl_version: String,
    /// The run's whole `config.toml`, for the record.
    pub config: TrainConfig,
}

impl TrlSettings {
    /// Settings of a run: `cfg` is its `config.toml`, `n_layer` the model's layer count.
    pub fn from_run(
        cfg: &TrainConfig,
        hf_model: &str,
        n_layer: usize,
        run_dir: &Path,
        has_buffer: bool,
    ) -> Result<TrlSettings, ExportError> {
        let other = |e: String| ExportError::Other(e);
        let loss =
            Loss::parse(&cfg.loss).map_err(|e| other(format!("loss {:?}: {e}", cfg.loss)))?;
        let targets = parse_targets(&cfg.targets).map_err(|e| other(e.to_string()))?;
        let layers = parse_layers(&cfg.layers, n_layer).map_err(|e| other(e.to_string()))?;
        let trunc = crate::data::batch::TruncationConfig {
            max_length: cfg.max_length,
            max_prompt_length: cfg.max_prompt_length,
            ..Default::default()
        };
        let buffer_pairs_per_step = if has_buffer {
            ((cfg.pairs_per_step as f64) * cfg.buffer_ratio)
                .round()
                .max(1.0) as usize
        } else {
            0
        };
        Ok(TrlSettings {
            hf_model: hf_model.to_string(),
            loss,
            lora: LoraSettings {
                r: cfg.rank,
                lora_alpha: cfg.lora_alpha,
                lora_dropout: cfg.lora_dropout,
                target_modules: targets.iter().map(|t| t.hf_short().to_string()).collect(),
                layers_to_transform: (layers.len() != n_layer).then_some(layers),
            },
            train: TrainSettings {
                learning_rate: cfg.learning_rate,
                lr_scheduler_type: match cfg.schedule {
                    ScheduleKind::Constant => "constant_with_warmup",
                    ScheduleKind::Linear => "linear",
                    ScheduleKind::Cosine => "cosine",
                }
                .into(),
                warmup_ratio: cfg.warmup_ratio,
                weight_decay: cfg.weight_decay,
                adam_beta1: cfg.adam_beta1,
                adam_beta2: cfg.adam_beta2,
                adam_epsilon: cfg.adam_eps,
                max_grad_norm: cfg.max_grad_norm,
                epochs: cfg.epochs,
                max_steps: cfg.max_steps,
                pairs_per_step: cfg.pairs_per_step,
                buffer_pairs_per_step,
                gradient_accumulation_steps: cfg.grad_accum,
                seed: cfg.seed,
                save_every: cfg.save_every,
                eval_every: cfg.eval_every,
            },
            truncation: TruncationSettings {
                max_length: trunc.max_length,
                max_prompt_length: trunc.max_prompt_length,
                keep_prompt_prefix: trunc.keep_prompt_prefix,
                response_budget: match trunc.response_budget {
                    crate::data::batch::ResponseBudget::Trl => "trl",
                    crate::data::batch::ResponseBudget::Remaining => "remaining",
                }
                .into(),
            },
            source: SourceInfo {
                run_dir: run_dir.display().to_string(),
                model_gguf: cfg
                    .model
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                datasets: cfg.data.iter().map(|p| p.display().to_string()).collect(),
                bfpo_lite_version: crate::VERSION.to_string(),
                trl_version: TRL_VERSION.to_string(),
                config: cfg.clone(),
            },
        })
    }
}

/// One line of `data/*.jsonl`: TRL's conversational preference format plus BFPO's safety labels
/// and the exact token ids bfpo-lite trains on (chat template applied, truncated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrlRow {
    /// The conversation up to the user turn the responses answer.
    pub prompt: Vec<ChatMessage>,
    /// The more helpful response (BFPO's y_hw).
    pub chosen: String,
    /// The less helpful response.
    pub rejected: String,
    pub is_chosen_safe: bool,
    pub is_rejected_safe: bool,
    /// Prompt tokens (through the assistant header), after truncation.
    pub prompt_ids: Vec<u32>,
    /// Scored tokens of the chosen response (with the end-of-turn tokens), after truncation.
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// `file:line` of the source row.
    pub origin: String,
}

/// Joins loaded pairs with their tokenized, truncated form (matched by `file:line`; pairs that
/// failed to encode have no prepared form and are left out, as in training).
pub fn rows(pairs: &[Pair], prepared: &[PreparedPair]) -> Result<Vec<TrlRow>, ExportError> {
    let by_origin: HashMap<String, &Pair> =
        pairs.iter().map(|p| (p.origin.to_string(), p)).collect();
    prepared
        .iter()
        .map(|pp| {
            let origin = pp.origin.to_string();
            let pair = by_origin.get(&origin).ok_or_else(|| {
                ExportError::Other(format!("{origin}: tokenized pair without its source row"))
            })?;
            let (c, r) = (&pp.chosen, &pp.rejected);
            if c.ids[..c.response_start] != r.ids[..r.response_start] {
                return Err(ExportError::Other(format!(
                    "{origin}: chosen and rejected have different prompt tokens"
                )));
            }
            Ok(TrlRow {
                prompt: pair.prompt.messages(),
                chosen: pair.chosen.clone(),
                rejected: pair.rejected.clone(),
                is_chosen_safe: pp.chosen_safe,
                is_rejected_safe: pp.rejected_safe,
                prompt_ids: c.ids[..c.response_start].to_vec(),
                chosen_ids: c.ids[c.response_start..].to_vec(),
                rejected_ids: r.ids[r.response_start..].to_vec(),
                origin,
            })
        })
        .collect()
}

/// The data of a project.
#[derive(Clone, Debug, Default)]
pub struct TrlData {
    pub train: Vec<TrlRow>,
    pub eval: Vec<TrlRow>,
    pub buffer: Vec<TrlRow>,
}

/// What [`write_project`] wrote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrlSummary {
    pub files: Vec<String>,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub buffer_pairs: usize,
    pub hf_model: String,
    pub trl_version: String,
}

fn write(dir: &Path, rel: &str, text: &str) -> Result<(), ExportError> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ExportError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(&path, text).map_err(|source| ExportError::Io { path, source })
}

fn jsonl(rows: &[TrlRow]) -> Result<String, ExportError> {
    let mut s = String::new();
    for r in rows {
        s += &serde_json::to_string(r)
            .map_err(|e| ExportError::Other(format!("{}: cannot encode: {e}", r.origin)))?;
        s.push('\n');
    }
    Ok(s)
}

/// Writes the project into the existing, empty directory `dir` (use
/// [`super::write_atomically`] for an all-or-nothing output).
pub fn write_project(
    dir: &Path,
    settings: &TrlSettings,
    data: &TrlData,
) -> Result<TrlSummary, ExportError> {
    if data.train.is_empty() {
        return Err(ExportError::Other(
            "the run has no training pairs to export".into(),
        ));
    }
    let mut files = Vec::new();
    let mut put = |rel: &str, text: &str| -> Result<(), ExportError> {
        write(dir, rel, text)?;
        files.push(rel.to_string());
        Ok(())
    };
    put("train.py", TRAIN_PY)?;
    put("bfpo_loss.py", LOSS_PY)?;
    put("requirements.txt", REQUIREMENTS)?;
    put("requirements-deepspeed.txt", REQUIREMENTS_DEEPSPEED)?;
    put("accelerate/single_gpu.yaml", ACCELERATE_SINGLE)?;
    put("accelerate/multi_gpu.yaml", ACCELERATE_MULTI)?;
    put("accelerate/deepspeed_zero3.yaml", ACCELERATE_ZERO3)?;
    let json = serde_json::to_string_pretty(settings)
        .map_err(|e| ExportError::Other(format!("cannot encode bfpo_config.json: {e}")))?;
    put("bfpo_config.json", &(json + "\n"))?;
    put("data/train.jsonl", &jsonl(&data.train)?)?;
    if !data.eval.is_empty() {
        put("data/eval.jsonl", &jsonl(&data.eval)?)?;
    }
    if !data.buffer.is_empty() {
        put("data/buffer.jsonl", &jsonl(&data.buffer)?)?;
    }
    put("README.md", &readme(settings, data))?;
    Ok(TrlSummary {
        files,
        train_pairs: data.train.len(),
        eval_pairs: data.eval.len(),
        buffer_pairs: data.buffer.len(),
        hf_model: settings.hf_model.clone(),
        trl_version: TRL_VERSION.to_string(),
    })
}

/// The project's README: what it is, the three launch commands, and the way back.
pub fn readme(s: &TrlSettings, data: &TrlData) -> String {
    let gguf = if s.source.model_gguf.is_empty() {
        "MODEL.gguf".to_string()
    } else {
        s.source.model_gguf.clone()
    };
    format!(
        r#"# BFPO on TRL + accelerate

Written by `bfpo-lite export-run --to trl` (bfpo-lite {ver}) from the run `{run}`.
It trains the same LoRA ({loss}; rank {r}, alpha {alpha}, dropout {dropout}, modules {modules})
on the Hugging Face model `{hf}` with TRL {trl}'s `DPOTrainer`, on one GPU, N GPUs (DDP) or
DeepSpeed ZeRO-3.

Data: {nt} safety pairs (`data/train.jsonl`), {nb} helpfulness-buffer pairs (`data/buffer.jsonl`),
{ne} held-out pairs (`data/eval.jsonl`). Each row holds the prompt as chat messages, the more
helpful (`chosen`) and less helpful (`rejected`) response, their safety labels
(`is_chosen_safe`, `is_rejected_safe`) and the token ids bfpo-lite trained on (chat template
applied, truncated to {ml} tokens with at most {mp} prompt tokens, `keep_end`).

## Setup

```sh
python3 -m venv .venv && . .venv/bin/activate
pip install -r requirements.txt          # + requirements-deepspeed.txt for ZeRO-3
```

## Launch

```sh
# one GPU (or the CPU when there is none)
accelerate launch --config_file accelerate/single_gpu.yaml train.py
# N GPUs on one machine, data parallel
accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes N train.py
# DeepSpeed ZeRO-3: model, gradients and optimizer state sharded over N GPUs
accelerate launch --config_file accelerate/deepspeed_zero3.yaml --num_processes N train.py
```

`python train.py --help` lists the options (`--max-steps`, `--model`, `--tokenize hf`, …).
Batches per GPU: {p} safety + {nbuf} buffer pairs, gradient accumulation {ga}; with N GPUs the
effective batch is N times larger, so scale the learning rate or the accumulation accordingly.

## Back to bfpo-lite

```sh
bfpo-lite import-peft output/adapter --model {gguf} --out adapter.gguf
bfpo-lite score --model {gguf} --adapter adapter.gguf --data data/eval.jsonl
```

## What matches bfpo-lite, and what does not

* Same loss (`bfpo_loss.py`): summed response log-probs, target g/τ, the run's τ/b1/α; batch loss
  = mean over safety pairs + mean over buffer pairs.
* Same sequences: bfpo-lite's token ids (`--tokenize bfpo`, the default). The HF model must have
  the GGUF's vocabulary (the model the GGUF was converted from). `--tokenize hf` re-renders the text
  with the HF tokenizer's chat template and truncates as bfpo-lite does.
* Reference log-probs: computed once before training with the adapter off, on the HF model in
  its training precision (not bfpo-lite's quantized GGUF), as TRL's `precompute_ref_log_probs`.
* Not the same: the base weights (full precision here, quantized in bfpo-lite), the order of the
  batches, the LoRA initialisation draw, and the learning-rate schedule's step arithmetic
  (`transformers`' schedulers).
"#,
        ver = s.source.bfpo_lite_version,
        run = s.source.run_dir,
        loss = s.loss,
        r = s.lora.r,
        alpha = s.lora.lora_alpha,
        dropout = s.lora.lora_dropout,
        modules = s.lora.target_modules.join(", "),
        hf = s.hf_model,
        trl = TRL_VERSION,
        nt = data.train.len(),
        nb = data.buffer.len(),
        ne = data.eval.len(),
        ml = s.truncation.max_length,
        mp = s.truncation.max_prompt_length,
        p = s.train.pairs_per_step,
        nbuf = s.train.buffer_pairs_per_step,
        ga = s.train.gradient_accumulation_steps,
        gguf = gguf,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_run() {
        let cfg = TrainConfig {
            loss: "ipo:tau=0.05".into(),
            targets: "attn_q,ffn_down".into(),
            layers: "1,3".into(),
            schedule: ScheduleKind::Linear,
            pairs_per_step: 3,
            buffer_ratio: 0.5,
            ..TrainConfig::default()
        };
        let s = TrlSettings::from_run(&cfg, "org/m", 4, Path::new("runs/x"), true).unwrap();
        assert_eq!(s.loss, Loss::Ipo { tau: 0.05 });
        assert_eq!(s.lora.target_modules, vec!["q_proj", "down_proj"]);
        assert_eq!(s.lora.layers_to_transform, Some(vec![1, 3]));
        assert_eq!(s.train.lr_scheduler_type, "linear");
        // round(3 · 0.5) = 2 buffer pairs per micro-batch; none without a buffer; at least 1.
        assert_eq!(s.train.buffer_pairs_per_step, 2);
        let none = TrlSettings::from_run(&cfg, "org/m", 4, Path::new("r"), false).unwrap();
        assert_eq!(none.train.buffer_pairs_per_step, 0);
        let tiny = TrainConfig {
            buffer_ratio: 0.1,
            ..cfg.clone()
        };
        let t = TrlSettings::from_run(&tiny, "org/m", 4, Path::new("r"), true).unwrap();
        assert_eq!(t.train.buffer_pairs_per_step, 1);
        // Every layer → no layers_to_transform; a bad layer list is an error naming it.
        let all = TrainConfig {
            layers: "all".into(),
            ..cfg.clone()
        };
        let a = TrlSettings::from_run(&all, "org/m", 4, Path::new("r"), false).unwrap();
        assert_eq!(a.lora.layers_to_transform, None);
        let bad = TrainConfig {
            layers: "0-9".into(),
            ..cfg
        };
        let e = TrlSettings::from_run(&bad, "org/m", 4, Path::new("r"), false).unwrap_err();
        assert!(e.to_string().contains("layer 9 does not exist"), "{e}");
        // The JSON train.py reads: the loss as {"kind": .., params}.
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["loss"], serde_json::json!({"kind": "ipo", "tau": 0.05}));
    }
}
