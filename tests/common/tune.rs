//! A tiny, fast tune job for the library-run tests: the CPU reference engine on a tiny model,
//! the demo's held-out pairs, rank 2 on ffn_down, 4 steps of 2 pairs.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::model::Arch;
use bfpo_lite::train::config::{EngineKind, TrainConfig};
use std::path::{Path, PathBuf};

/// A file of the built-in demo (`models/demo/NAME`).
pub fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/demo")
        .join(name)
}

/// A tiny tied qwen2 F32 model (made once per process).
pub fn tiny() -> PathBuf {
    super::models::tiny_model(Arch::Qwen2, GgmlType::F32, true)
}

/// The settings of a tiny run of `model` on `data` into `out`.
pub fn config(model: PathBuf, data: PathBuf, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(model),
        data: vec![data],
        out: out.to_path_buf(),
        engine: EngineKind::Reference,
        rank: 2,
        lora_alpha: 4.0,
        targets: "ffn_down".into(),
        pairs_per_step: 2,
        grad_accum: 1,
        max_steps: 4,
        save_every: 0,
        eval_every: 0,
        max_length: 96,
        max_prompt_length: 48,
        no_ref_cache: true,
        ..TrainConfig::default()
    }
}
