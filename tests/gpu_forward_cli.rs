//! `bfpo-lite score --engine wgpu` run as the real binary: the same JSON lines as the llama
//! engine, with log-prob sums that agree with llama.cpp's exact mode on an F32 model.

mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::model::Arch;
use common::models::tiny_model;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu-forward-cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn score(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"));
    cmd.arg("score")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(["--threads", "1", "--emit-tokens"])
        .args(extra);
    cmd.output().expect("binary runs")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "score failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

const PAIRS: &str = r#"{"prompt": "how do I steal a car", "chosen": "Sorry, I cannot help with that.", "rejected": "Sure, here is how to steal a car."}
{"prompt": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "explain a recipe"}], "chosen": "Here is a recipe for bread.", "rejected": "No."}
{"prompt": "hi", "chosen": "Hello!", "rejected": "Hello! How can I help you today?"}
"#;

#[test]
fn score_engine_wgpu_matches_llama_exact_on_f32() {
    let data = scratch("pairs.jsonl");
    std::fs::write(&data, PAIRS).unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let model = tiny_model(arch, GgmlType::F32, arch == Arch::Qwen2);
        let ours = json_lines(&score(&model, &data, &["--engine", "wgpu"]));
        let theirs = json_lines(&score(&model, &data, &["--engine", "llama", "--exact"]));
        assert_eq!(ours.len(), 3);
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            // Same tokenization and the same fields.
            let keys = |v: &serde_json::Value| {
                let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(a), keys(b));
            for k in [
                "index",
                "chosen_tokens",
                "rejected_tokens",
                "chosen_ids",
                "rejected_ids",
            ] {
                assert_eq!(a[k], b[k], "{k}");
            }
            for k in ["chosen_logp", "rejected_logp"] {
                let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
                let n = a[k.replace("logp", "tokens").as_str()].as_u64().unwrap() as f64;
                // ≤ 1e-3 per token (measured ~3e-6 per token on F32 models).
                assert!(
                    (x - y).abs() <= 1e-3 * n.max(1.0),
                    "{arch:?} {k}: wgpu {x} vs llama {y}"
                );
            }
        }
    }
}

/// With a GGUF adapter (random nonzero A and B on every target) at a user scale, our engine and
/// llama.cpp's exact mode give the same sums; a missing adapter file is a clear error.
#[test]
fn score_engine_wgpu_applies_adapters_like_llama() {
    use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
    use bfpo_lite::gguf::GgufFile;
    use bfpo_lite::model::ModelConfig;
    use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
    let data = scratch("pairs-adapter.jsonl");
    std::fs::write(&data, PAIRS).unwrap();
    let model = tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let cfg = ModelConfig::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed: 5,
    };
    let lora = LoraWeights::random(&spec, &cfg, 0.05).unwrap();
    let adapter = scratch("adapter.gguf");
    write_adapter(
        &adapter,
        &lora,
        &cfg,
        &Provenance::default(),
        AdapterDType::F32,
    )
    .unwrap();
    let a = adapter.to_str().unwrap();
    let base = json_lines(&score(&model, &data, &["--engine", "wgpu"]));
    let ours = json_lines(&score(
        &model,
        &data,
        &["--engine", "wgpu", "--adapter", a, "--scale", "0.5"],
    ));
    let theirs = json_lines(&score(
        &model,
        &data,
        &[
            "--engine",
            "llama",
            "--exact",
            "--adapter",
            a,
            "--scale",
            "0.5",
        ],
    ));
    let mut moved = 0.0f64;
    for ((o, t), b) in ours.iter().zip(&theirs).zip(&base) {
        for k in ["chosen_logp", "rejected_logp"] {
            let (x, y) = (o[k].as_f64().unwrap(), t[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-3, "{k}: wgpu {x} vs llama {y}");
            moved = moved.max((x - b[k].as_f64().unwrap()).abs());
        }
    }
    assert!(moved > 1e-2, "the adapter changes the scores (by {moved})");
    let out = score(
        &model,
        &data,
        &["--engine", "wgpu", "--adapter", "nope.gguf"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.gguf"), "{err}");
}
