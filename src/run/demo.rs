//! The built-in demo: a tiny quantized model made by `init-model` and a synthetic safety
//! preference set in PKU-SafeRLHF's schema (models/demo/), trained with BFPO in under a minute
//! on a laptop CPU. The recipe is documented in models/README.md.

use super::{RunError, io_err};
use crate::gguf::GgmlType;
use crate::model::{Arch, init};
use crate::train::config::TrainConfig;
use std::path::{Path, PathBuf};

/// The demo's training pairs (JSON Lines, PKU-SafeRLHF schema).
pub const DEMO_TRAIN: &str = include_str!("../../models/demo/train.jsonl");
/// The demo's held-out pairs.
pub const DEMO_HELDOUT: &str = include_str!("../../models/demo/heldout.jsonl");

/// The demo model's recipe.
pub fn demo_model_spec() -> init::InitSpec {
    init::InitSpec {
        arch: Arch::Qwen2,
        ty: init::WeightType::Uniform(GgmlType::Q8_0),
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ff: 128,
        tied: true,
        seed: 20_250_408,
        ..init::InitSpec::default()
    }
}

/// The demo's training settings (model and data not yet set: see [`write_demo`]).
pub fn demo_config() -> TrainConfig {
    TrainConfig {
        out: PathBuf::from("runs/demo"),
        rank: 8,
        lora_alpha: 16.0,
        targets: "all".into(),
        learning_rate: 2e-2,
        warmup_ratio: 0.05,
        epochs: 1,
        pairs_per_step: 4,
        grad_accum: 1,
        max_length: 256,
        max_prompt_length: 128,
        save_every: 0,
        eval_every: 26,
        ..TrainConfig::default()
    }
}

/// Number of training pairs in the demo set.
pub fn demo_train_pairs() -> usize {
    DEMO_TRAIN.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Writes the demo model (`OUT/demo-model.gguf`) and data (`OUT/demo-data/`) under `cfg.out`
/// and points `cfg` at them.
pub fn write_demo(cfg: &mut TrainConfig) -> Result<(), RunError> {
    let out = cfg.out.clone();
    std::fs::create_dir_all(&out).map_err(io_err("creating", &out))?;
    let model = out.join("demo-model.gguf");
    init::write(&demo_model_spec(), &model).map_err(|source| RunError::Demo {
        path: model.clone(),
        source,
    })?;
    let data_dir = out.join("demo-data");
    std::fs::create_dir_all(&data_dir).map_err(io_err("creating", &data_dir))?;
    let train = data_dir.join("train.jsonl");
    let heldout = data_dir.join("heldout.jsonl");
    write(&train, DEMO_TRAIN)?;
    write(&heldout, DEMO_HELDOUT)?;
    cfg.model = Some(model);
    cfg.data = vec![train];
    cfg.eval_data = Some(heldout);
    Ok(())
}

/// The demo's complete configuration with outputs in `out` (model and data written there).
pub fn demo(out: &Path) -> Result<TrainConfig, RunError> {
    let mut cfg = TrainConfig {
        out: out.to_path_buf(),
        ..demo_config()
    };
    write_demo(&mut cfg)?;
    Ok(cfg)
}

fn write(path: &Path, text: &str) -> Result<(), RunError> {
    std::fs::write(path, text).map_err(io_err("writing", path))
}
