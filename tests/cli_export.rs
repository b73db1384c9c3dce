//! `bfpo-lite export` through the binary: every format from an adapter file and from a
//! checkpoint directory, refusal to overwrite without `--force` (existing output untouched),
//! and clear errors for another architecture, another shape, missing tensors and bad types.

mod common;

use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, read_adapter, write_adapter};
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter};
use bfpo_lite::model::init::InitSpec;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig};
use common::models;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(args)
        .output()
        .expect("run bfpo-lite");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a random adapter for `model` into `dir/name`; returns its path and weights.
fn adapter_for(model: &Path, dir: &Path, name: &str) -> (PathBuf, LoraWeights) {
    let cfg = ModelConfig::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: vec![0, 1],
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        seed: 5,
    };
    let lora = LoraWeights::random(&spec, &cfg, 0.05).unwrap();
    let path = dir.join(name);
    let prov = Provenance {
        loss: Some("bfpo".into()),
        steps: Some(9),
        ..Provenance::default()
    };
    write_adapter(&path, &lora, &cfg, &prov, AdapterDType::F32).unwrap();
    (path, lora)
}

#[test]
fn exports_every_format_from_file_and_checkpoint_dir() {
    let model = models::tiny_model(Arch::Llama, GgmlType::Q8_0, true);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt-9");
    std::fs::create_dir(&ckpt).unwrap();
    let (adapter, lora) = adapter_for(&model, &ckpt, "adapter.gguf");

    // gguf → gguf f16, from the checkpoint directory.
    let out = dir.path().join("a16.gguf");
    let (ok, stdout, err) = run(&[
        "export",
        s(&ckpt),
        "--model",
        s(&model),
        "--format",
        "gguf",
        "--outtype",
        "f16",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("14 LoRA tensors") && stdout.contains("bfpo"),
        "{stdout}"
    );
    let f = GgufFile::open(&out).unwrap();
    assert!(f.tensors().iter().all(|t| t.type_id == GgmlType::F16.id()));
    let (back, prov, arch) = read_adapter(&out).unwrap();
    assert_eq!((arch.as_str(), back.rank, back.alpha), ("llama", 2, 4.0));
    assert_eq!((prov.loss.as_deref(), prov.steps), (Some("bfpo"), Some(9)));
    assert_eq!(back.tensors.len(), lora.tensors.len());

    // peft, JSON summary.
    let peft_dir = dir.path().join("peft");
    let (ok, stdout, err) = run(&[
        "export",
        s(&adapter),
        "--model",
        s(&model),
        "--format",
        "peft",
        "--out",
        s(&peft_dir),
        "--hf-model",
        "org/tiny",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["peft"]["n_tensors"], 28);
    assert_eq!(j["peft"]["unpermuted_qk"], true);
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["base_model_name_or_path"], "org/tiny");
    assert!(peft_dir.join("adapter_model.safetensors").is_file());

    // merged, default F16, with the per-tensor table.
    let merged = dir.path().join("merged.gguf");
    let (ok, stdout, err) = run(&[
        "export",
        s(&adapter),
        "--model",
        s(&model),
        "--format",
        "merged",
        "--out",
        s(&merged),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("merged 14 tensors into F16"), "{stdout}");
    assert!(stdout.contains("blk.1.ffn_down.weight"), "{stdout}");
    let m = GgufFile::open(&merged).unwrap();
    assert_eq!(
        m.tensor("blk.0.attn_q.weight").unwrap().type_id,
        GgmlType::F16.id()
    );
    assert_eq!(
        m.tensor("token_embd.weight").unwrap().type_id,
        GgmlType::Q8_0.id()
    );

    // merged to Q4_0 warns about 4 bits.
    let (ok, stdout, err) = run(&[
        "export",
        s(&adapter),
        "--model",
        s(&model),
        "--format",
        "merged",
        "--outtype",
        "q4_0",
        "--out",
        s(&dir.path().join("m4.gguf")),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("warning:") && stdout.contains("4-bit"),
        "{stdout}"
    );

    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn refuses_to_overwrite_without_force() {
    let model = models::tiny_model(Arch::Qwen2, GgmlType::F32, false);
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = adapter_for(&model, dir.path(), "adapter.gguf");

    for (format, is_dir) in [("gguf", false), ("merged", false), ("peft", true)] {
        let out = dir.path().join(format!("out-{format}"));
        if is_dir {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("keep.txt"), b"old").unwrap();
        } else {
            std::fs::write(&out, b"old contents").unwrap();
        }
        let args = [
            "export",
            s(&adapter),
            "--model",
            s(&model),
            "--format",
            format,
            "--out",
            s(&out),
        ];
        let (ok, _, err) = run(&args);
        assert!(!ok);
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        if is_dir {
            assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"old");
        } else {
            assert_eq!(std::fs::read(&out).unwrap(), b"old contents");
        }

        let mut forced = args.to_vec();
        forced.push("--force");
        let (ok, _, err) = run(&forced);
        assert!(ok, "{format}: {err}");
        if is_dir {
            assert!(
                !out.join("keep.txt").exists(),
                "the old directory is replaced"
            );
            assert!(out.join("adapter_config.json").is_file());
        } else {
            GgufFile::open(&out).unwrap();
        }
    }
}

/// Writes an adapter for a llama model with one tensor's lora_b removed.
fn drop_tensor(src: &Path, dst: &Path, drop: &str) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.kvs() {
        w.set(k.clone(), v.clone());
    }
    for t in f.tensors() {
        if t.name != drop {
            w.add_tensor(t.name.clone(), &t.ne, t.type_id, f.tensor_bytes(t))
                .unwrap();
        }
    }
    w.write_file(dst).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_outputs_untouched() {
    let llama = models::tiny_model(Arch::Llama, GgmlType::F32, true);
    let qwen = models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let wide = models::model(&InitSpec {
        dim: 128,
        ..InitSpec::tiny(Arch::Llama, GgmlType::F32, true)
    });
    let dir = tempfile::tempdir().unwrap();
    let (qwen_adapter, _) = adapter_for(&qwen, dir.path(), "qwen.gguf");
    let (wide_adapter, _) = adapter_for(&wide, dir.path(), "wide.gguf");
    let (llama_adapter, _) = adapter_for(&llama, dir.path(), "llama.gguf");
    let broken = dir.path().join("broken.gguf");
    drop_tensor(&llama_adapter, &broken, "blk.1.ffn_up.weight.lora_b");
    let out = dir.path().join("out.gguf");

    let export = |input: &Path, model: &Path, extra: &[&str]| {
        let mut args = vec!["export", s(input), "--model", s(model), "--out", s(&out)];
        args.extend_from_slice(extra);
        let (ok, _, err) = run(&args);
        assert!(!ok, "export {input:?} on {model:?} should fail");
        err
    };

    let e = export(&qwen_adapter, &llama, &[]);
    assert!(e.contains("\"qwen2\"") && e.contains("\"llama\""), "{e}");
    let e = export(&wide_adapter, &llama, &["--format", "merged"]);
    assert!(e.contains("n_in 128") && e.contains("n_in 64"), "{e}");
    let e = export(&broken, &llama, &["--format", "peft"]);
    assert!(
        e.contains("blk.1.ffn_up.weight.lora_a") && e.contains("no matching"),
        "{e}"
    );
    // The model given as the adapter.
    let e = export(&llama, &llama, &[]);
    assert!(
        e.contains("general.type") || e.contains("not a LoRA adapter"),
        "{e}"
    );
    let e = export(&llama_adapter, &llama, &["--outtype", "q8_0"]);
    assert!(e.contains("f32 or f16"), "{e}");
    let e = export(
        &llama_adapter,
        &llama,
        &["--format", "merged", "--outtype", "q3_k"],
    );
    assert!(e.contains("q3_k") && e.contains("supported"), "{e}");
    let empty = dir.path().join("empty-ckpt");
    std::fs::create_dir(&empty).unwrap();
    let e = export(&empty, &llama, &[]);
    assert!(e.contains("adapter.gguf"), "{e}");
    assert!(!out.exists(), "no output after failures");
}
