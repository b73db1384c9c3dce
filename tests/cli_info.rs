//! `bfpo-lite info` (text, `--json`, `--tensors`) on trainable and non-trainable models, and
//! `bfpo-lite init-model` through the binary.

mod common;

use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use bfpo_lite::model::Arch;
use bfpo_lite::model::init::{self, InitSpec, WeightType};
use common::models;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
}

/// Runs the binary; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().expect("run bfpo-lite");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn info_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", path.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(&args);
    assert!(ok, "info --json failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// Copies a model, applying `edit` to the writer (keys) and replacing tensors.
fn edited(src: &Path, dst: &Path, skip: &[&str], edit: impl FnOnce(&mut GgufWriter)) {
    let file = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in file.kvs() {
        w.set(k.clone(), v.clone());
    }
    for t in file.tensors() {
        if !skip.contains(&t.name.as_str()) {
            w.add_tensor(t.name.clone(), &t.ne, t.type_id, file.tensor_bytes(t))
                .unwrap();
        }
    }
    edit(&mut w);
    w.write_file(dst).unwrap();
}

#[test]
fn info_text_on_a_trainable_model() {
    let path = models::tiny_model(Arch::Qwen2, GgmlType::F16, true);
    let file = GgufFile::open(&path).unwrap();
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    let (ok, out, err) = run(&["info", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    let n_vocab = init::vocab(0).len();
    for needle in [
        "qwen2".to_string(),
        "dim 64, 2 layers, 4 heads (2 KV, head size 16), ff 128".into(),
        format!("vocab {n_vocab}"),
        "Q/K/V biases".into(),
        "tied".into(),
        "F16 ×15".into(), // 2 × 7 matrices + token_embd
        "F32 ×11".into(), // 2 × (2 norms + 3 biases) + output_norm
        format!("{n_vocab} tokens, chat template: yes"),
        "llama (SentencePiece)".into(),
        "trainable      yes".into(),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }
    // Thousands separators: 123,456.
    let grouped = n_params
        .to_string()
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        out.contains(&grouped),
        "parameter count {grouped} not in:\n{out}"
    );
}

#[test]
fn info_json_and_tensors() {
    let spec = InitSpec {
        dim: 256,
        ff: 512,
        ..InitSpec::tiny(Arch::Llama, WeightType::Q4KM, false)
    };
    let path = models::model(&spec);
    let file = GgufFile::open(&path).unwrap();
    let v = info_json(&path, &[]);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["trainable"], true);
    assert!(v["reason"].is_null());
    assert_eq!(v["tied"], false);
    assert_eq!(v["config"]["n_embd"], 256);
    assert_eq!(v["config"]["n_ff"], 512);
    assert_eq!(v["config"]["rope_kind"], "Norm");
    assert_eq!(v["hyperparameters"]["embedding_length"], "256");
    assert_eq!(v["tokenizer"]["model"], "llama");
    assert_eq!(v["tokenizer"]["n_tokens"], init::vocab(0).len());
    assert_eq!(v["tokenizer"]["chat_template"], true);
    assert_eq!(v["n_tensors"], file.tensors().len());
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(v["n_params"], n_params);
    assert!(v.get("tensors").is_none(), "tensors only with --tensors");
    // Type mix: Q4_K, Q6_K (output + layer-1 attn_v/ffn_down), F32 norms; counts add up.
    let mix = v["type_mix"].as_array().unwrap();
    let count = |ty: &str| {
        mix.iter()
            .find(|m| m["type"] == ty)
            .map_or(0, |m| m["count"].as_u64().unwrap())
    };
    assert_eq!((count("Q4_K"), count("Q6_K"), count("F32")), (13, 3, 5));
    let bytes: u64 = mix.iter().map(|m| m["bytes"].as_u64().unwrap()).sum();
    assert_eq!(bytes, file.tensors().iter().map(|t| t.n_bytes).sum::<u64>());

    let v = info_json(&path, &["--tensors"]);
    let rows = v["tensors"].as_array().unwrap();
    assert_eq!(rows.len(), file.tensors().len());
    for (row, t) in rows.iter().zip(file.tensors()) {
        assert_eq!(row["name"], t.name.as_str());
        assert_eq!(row["type"], t.type_name().as_str());
        assert_eq!(row["bytes"], t.n_bytes);
        let shape: Vec<u64> = serde_json::from_value(row["shape"].clone()).unwrap();
        assert_eq!(shape, t.ne);
    }

    let (ok, out, _) = run(&["info", path.to_str().unwrap(), "--tensors"]);
    assert!(ok);
    for t in file.tensors() {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(t.name.as_str()))
            .unwrap_or_else(|| panic!("{} not listed:\n{out}", t.name));
        assert!(
            line.contains(&t.type_name()) && line.contains(&format!("{:?}", t.ne)),
            "{line}"
        );
    }
}

#[test]
fn info_explains_why_a_model_is_not_trainable() {
    let dir = tempfile::tempdir().unwrap();
    let base = models::model(&InitSpec {
        dim: 256,
        ff: 512,
        ..InitSpec::default()
    });

    // Unknown architecture: still described, from the raw keys.
    let gpt2 = dir.path().join("gpt2.gguf");
    edited(&base, &gpt2, &[], |w| {
        for k in ["embedding_length", "block_count", "context_length"] {
            let v = w.get(&format!("llama.{k}")).unwrap().clone();
            w.set(format!("gpt2.{k}"), v);
        }
        w.set("general.architecture", Value::String("gpt2".into()));
    });
    let (ok, out, err) = run(&["info", gpt2.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("trainable      no, because architecture \"gpt2\" is not supported"),
        "{out}"
    );
    assert!(out.contains("embedding_length = 256"), "{out}");
    let v = info_json(&gpt2, &[]);
    assert_eq!(v["trainable"], false);
    assert!(v["config"].is_null());
    assert!(v["reason"].as_str().unwrap().contains("llama"));

    // An IQ2_XXS tensor (type 16: 66 bytes per 256 elements).
    let iq = dir.path().join("iq.gguf");
    let name = "blk.1.ffn_gate.weight";
    edited(&base, &iq, &[name], |w| {
        w.add_tensor(name, &[256, 512], 16, vec![0u8; 66 * 512])
            .unwrap();
    });
    let (ok, out, err) = run(&["info", iq.to_str().unwrap(), "--tensors"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "trainable      no, because tensor \"blk.1.ffn_gate.weight\" has type IQ2_XXS"
        ),
        "{out}"
    );
    assert!(out.contains("IQ2_XXS ×1"), "{out}");
    let v = info_json(&iq, &[]);
    assert_eq!(v["trainable"], false);
    assert!(v["reason"].as_str().unwrap().contains("llama-quantize"));

    // No tokenizer.
    let notok = dir.path().join("notok.gguf");
    edited(&base, &notok, &[], |w| {
        let n = init::vocab(0).len() as u32;
        for k in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            w.remove(k);
        }
        w.set("llama.vocab_size", Value::U32(n));
    });
    let v = info_json(&notok, &[]);
    assert_eq!(v["trainable"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("no tokenizer"),
        "{v}"
    );

    // Not a GGUF at all: an error naming the file.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let (ok, _, err) = run(&["info", junk.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");
}

#[test]
fn init_model_cli_matches_the_library_and_reports_fallbacks() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    let args = |p: &Path| {
        vec![
            "init-model".to_string(),
            "--out".into(),
            p.to_str().unwrap().into(),
            "--arch".into(),
            "qwen2".into(),
            "--type".into(),
            "q4_k".into(),
            "--tied".into(),
            "--seed".into(),
            "11".into(),
        ]
    };
    let out = bin().args(args(&a)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // dim 64 rows cannot hold 256-element Q4_K blocks: every matrix falls back to Q5_0.
    assert!(
        text.contains("fell back") && text.contains("Q4_K → Q5_0"),
        "{text}"
    );
    assert!(text.contains("blk.0.ffn_down.weight"), "{text}");
    bin().args(args(&b)).output().unwrap();
    let lib = init::build(&InitSpec {
        seed: 11,
        ..InitSpec::tiny(Arch::Qwen2, GgmlType::Q4_K, true)
    })
    .unwrap()
    .0
    .to_bytes();
    let (fa, fb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(fa == fb, "two CLI runs differ");
    assert!(fa == lib, "CLI and library differ");

    let (ok, out, _) = run(&[
        "init-model",
        "--out",
        a.to_str().unwrap(),
        "--type",
        "q8_0",
        "--json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["ty"], "q8_0");
    assert_eq!(v["fallbacks"].as_array().unwrap().len(), 0);
    assert_eq!(v["type_mix"]["Q8_0"][0], 16); // token_embd + 2 × 7 + output

    let (ok, _, err) = run(&[
        "init-model",
        "--out",
        a.to_str().unwrap(),
        "--type",
        "iq2_xxs",
    ]);
    assert!(!ok && err.contains("q4_k_m"), "{err}");
    let (ok, _, err) = run(&["init-model", "--out", a.to_str().unwrap(), "--heads", "3"]);
    assert!(!ok && err.contains("heads"), "{err}");
}

#[test]
fn info_tells_a_base_model_which_chat_template_to_pass() {
    let src = models::tiny_model(Arch::Qwen3, GgmlType::F32, false);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("base.gguf");
    let file = GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in file.kvs() {
        if k != "tokenizer.chat_template" {
            w.set(k.clone(), v.clone());
        }
    }
    for t in file.tensors() {
        w.add_tensor(t.name.clone(), &t.ne, t.type_id, file.tensor_bytes(t))
            .unwrap();
    }
    w.write_file(&dst).unwrap();
    let (ok, out, err) = run(&["info", dst.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("chat template: no (a base model?)")
            && out.contains("gemma3, qwen3")
            && out.contains("(for qwen3: --chat-template qwen3)")
            && out.contains("--chat-template FILE"),
        "{out}"
    );
}
