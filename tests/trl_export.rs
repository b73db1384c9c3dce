//! `export-run --to trl`: the Python project it writes, its loss against `bfpo_lite::loss`, and
//! (heavy: about a minute once its venv is cached) a two-step CPU run of its `train.py` on a
//! tiny Hugging Face llama holding the same weights as a GGUF, whose adapter comes back through
//! `import-peft` and scores in the wgpu engine as PEFT scores it in Python.
//!
//! Python: `BFPO_TRL_PYTHON` (a Python with the project's requirements, e.g. a venv made with
//! `pip install -r src/export/trl/requirements.txt`) is used when set. Otherwise the loss test
//! uses `python3` if it has numpy, else a venv with numpy created once under
//! `~/.cache/bfpo-lite/` (`$BFPO_CACHE_DIR` or `$XDG_CACHE_HOME/bfpo-lite` when set); the smoke
//! test creates the full venv there from `requirements.txt` (keyed by its hash).

mod common;

use bfpo_lite::data::batch::{ResponseBudget, TruncationConfig, build_pair_examples};
use bfpo_lite::data::formats::{LoadOptions, load_many};
use bfpo_lite::export::peft::unpermute_rows;
use bfpo_lite::gguf::quant::dequantize_vec;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::loss::{Loss, PairInput, PairLogps};
use bfpo_lite::model::init::CHAT_TEMPLATE;
use bfpo_lite::model::{Arch, ModelConfig};
use bfpo_lite::runtime::{LoadOptions as RtLoadOptions, RtModel};
use bfpo_lite::train::config::TrainConfig;
use bfpo_lite::util::Rng;
use common::models;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

const DEMO_TRAIN: &str = include_str!("../models/demo/train.jsonl");
const DEMO_HELDOUT: &str = include_str!("../models/demo/heldout.jsonl");

fn bin(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(args)
        .output()
        .expect("run bfpo-lite");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_llama() -> PathBuf {
    models::tiny_model(Arch::Llama, GgmlType::F32, false)
}

/// A run folder as `tune` leaves it (config.toml naming model and data): 12 safety pairs (some
/// with long prompts so truncation acts), a 5-pair helpfulness buffer without safety labels,
/// 4 held-out pairs, LoRA on every projection.
fn tiny_run(dir: &Path) -> (PathBuf, PathBuf, TrainConfig) {
    let model = tiny_llama();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut train: Vec<&str> = DEMO_TRAIN.lines().take(12).collect();
    let long = r#"{"prompt": "Please tell me, in a few words and with care, as a friend would, how do I paint a small room in my house today?", "response_0": "Move things out, cover the floor, paint the edges first, then use a roller on the walls.", "response_1": "No.", "is_response_0_safe": true, "is_response_1_safe": false, "better_response_id": 0, "safer_response_id": 0}"#;
    train.push(long);
    std::fs::write(data.join("train.jsonl"), train.join("\n") + "\n").unwrap();
    std::fs::write(
        data.join("heldout.jsonl"),
        DEMO_HELDOUT.lines().take(4).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    std::fs::write(
        data.join("buffer.jsonl"),
        [
            (
                "How do I write a letter?",
                "Start with a greeting and end with your name.",
                "Why?",
            ),
            (
                "How do I cook rice?",
                "Rinse it, add water, and cook it for a short time.",
                "No.",
            ),
            (
                "How do I clean a window?",
                "Use water and a soft cloth, then dry it.",
                "I do not know.",
            ),
            (
                "Tell me a story.",
                "Once there was a cat who found a house.",
                "No.",
            ),
            (
                "How do I make tea?",
                "Boil water and pour it over the tea.",
                "Why do you ask?",
            ),
        ]
        .iter()
        .map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
            + "\n",
    )
    .unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = TrainConfig {
        model: Some(model.clone()),
        data: vec![data.join("train.jsonl")],
        eval_data: Some(data.join("heldout.jsonl")),
        buffer: Some(data.join("buffer.jsonl")),
        buffer_ratio: 1.0,
        out: run.clone(),
        rank: 4,
        lora_alpha: 8.0,
        targets: "all".into(),
        learning_rate: 5e-2,
        warmup_ratio: 0.0,
        schedule: bfpo_lite::train::config::ScheduleKind::Constant,
        pairs_per_step: 2,
        grad_accum: 1,
        max_steps: 2,
        max_length: 40,
        max_prompt_length: 24,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    cfg.validate().unwrap();
    std::fs::write(run.join("config.toml"), cfg.to_toml()).unwrap();
    (model, run, cfg)
}

fn export_run(run: &Path, out: &Path) {
    let (ok, stdout, stderr) = bin(&[
        "export-run",
        s(run),
        "--to",
        "trl",
        "--hf-model",
        "org/tiny-llama",
        "--out",
        s(out),
    ]);
    assert!(ok, "export-run failed: {stderr}");
    assert!(stdout.contains("13 training pairs"), "{stdout}");
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn export_run_writes_a_project_on_bfpo_lite_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let (model, run, cfg) = tiny_run(dir.path());
    let out = dir.path().join("trl");
    export_run(&run, &out);
    for f in [
        "train.py",
        "bfpo_loss.py",
        "requirements.txt",
        "requirements-deepspeed.txt",
        "accelerate/single_gpu.yaml",
        "accelerate/multi_gpu.yaml",
        "accelerate/deepspeed_zero3.yaml",
        "bfpo_config.json",
        "data/train.jsonl",
        "data/eval.jsonl",
        "data/buffer.jsonl",
        "README.md",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let req = std::fs::read_to_string(out.join("requirements.txt")).unwrap();
    for pin in [
        "trl==1.16.0",
        "peft==",
        "transformers==",
        "torch==",
        "accelerate==",
    ] {
        assert!(req.contains(pin), "requirements.txt lacks {pin}");
    }
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    for cfg_file in ["single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero3.yaml"] {
        assert!(
            readme.contains(&format!(
                "accelerate launch --config_file accelerate/{cfg_file}"
            )),
            "README lacks the {cfg_file} launch"
        );
    }
    assert!(readme.contains("bfpo-lite import-peft output/adapter"));

    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bfpo_config.json")).unwrap())
            .unwrap();
    assert_eq!(c["hf_model"], "org/tiny-llama");
    assert_eq!(
        c["loss"],
        serde_json::json!({"kind": "bfpo", "tau": 0.01, "b1": 3.0, "alpha": 0.5})
    );
    assert_eq!(c["lora"]["r"], 4);
    assert_eq!(c["lora"]["lora_alpha"], 8.0);
    assert_eq!(
        c["lora"]["target_modules"],
        serde_json::json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );
    assert!(c["lora"]["layers_to_transform"].is_null());
    assert_eq!(c["train"]["pairs_per_step"], 2);
    assert_eq!(c["train"]["buffer_pairs_per_step"], 2);
    assert_eq!(c["train"]["learning_rate"], 5e-2);
    assert_eq!(c["train"]["lr_scheduler_type"], "constant_with_warmup");
    assert_eq!(c["truncation"]["max_length"], 40);
    assert_eq!(c["truncation"]["max_prompt_length"], 24);
    assert_eq!(c["truncation"]["response_budget"], "trl");

    // Every row carries bfpo-lite's own sequence: the chat template through llama.cpp, then
    // the run's truncation.
    let rt = RtModel::load(&model, &RtLoadOptions::default()).unwrap();
    let trunc = TruncationConfig {
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        ..Default::default()
    };
    let mut truncated = 0;
    for (file, src, assume_safe) in [
        ("train", &cfg.data[0], false),
        ("eval", cfg.eval_data.as_ref().unwrap(), false),
        ("buffer", cfg.buffer.as_ref().unwrap(), true),
    ] {
        let rows = read_jsonl(&out.join(format!("data/{file}.jsonl")));
        let opts = LoadOptions {
            assume_safe,
            ..Default::default()
        };
        let (pairs, _) = load_many(std::slice::from_ref(src), &opts).unwrap();
        assert_eq!(rows.len(), pairs.len(), "{file}");
        for (row, pair) in rows.iter().zip(&pairs) {
            assert_eq!(row["origin"], pair.origin.to_string());
            assert_eq!(row["chosen"], pair.chosen.as_str());
            assert_eq!(row["is_chosen_safe"], pair.chosen_safe);
            assert_eq!(row["is_rejected_safe"], pair.rejected_safe);
            assert_eq!(row["prompt"][0]["role"], "user");
            let (c, r) = rt.encode_pair(pair).unwrap();
            let want = build_pair_examples(
                0,
                &c.ids[..c.response_start],
                &c.ids[c.response_start..],
                &r.ids[r.response_start..],
                &trunc,
            )
            .unwrap();
            truncated += want.truncation.any() as usize;
            let p = ids(&row["prompt_ids"]);
            let mut chosen = p.clone();
            chosen.extend(ids(&row["chosen_ids"]));
            let mut rejected = p.clone();
            rejected.extend(ids(&row["rejected_ids"]));
            assert_eq!(chosen, want.chosen.ids, "{file} {}", row["origin"]);
            assert_eq!(rejected, want.rejected.ids, "{file} {}", row["origin"]);
            assert_eq!(p.len(), want.chosen.response_start);
        }
        if file == "buffer" {
            assert!(
                rows.iter()
                    .all(|r| r["is_chosen_safe"] == true && r["is_rejected_safe"] == true)
            );
        }
    }
    assert!(truncated >= 1, "the fixture should exercise truncation");

    // An existing output is kept unless --force.
    let (ok, _, e) = bin(&["export-run", s(&run), "--hf-model", "x/y", "--out", s(&out)]);
    assert!(!ok && e.contains("--force"), "{e}");
    let (ok, _, e) = bin(&[
        "export-run",
        s(&dir.path().join("nope")),
        "--hf-model",
        "x/y",
        "--out",
        s(&dir.path().join("o2")),
    ]);
    assert!(!ok && e.contains("config.toml"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Python environments

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("BFPO_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("bfpo-lite");
    }
    PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache/bfpo-lite")
}

fn python_has(python: &Path, modules: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A venv under the cache, named by the hash of what it installs, created once (through a
/// temporary folder and a rename, so a crash never leaves a half-made venv).
fn cached_venv(label: &str, pip_args: &[&str], key: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let hash: String = Sha256::digest(key.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = cache_root().join(format!("{label}-{hash}"));
    let python = dir.join("bin/python");
    if python.exists() {
        return python;
    }
    std::fs::create_dir_all(cache_root()).unwrap();
    let tmp = cache_root().join(format!(".{label}-{hash}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let t = Instant::now();
    let st = Command::new("python3")
        .args(["-m", "venv", s(&tmp)])
        .status()
        .expect(
            "python3 is needed for the TRL export tests (apt-get install python3 python3-venv)",
        );
    assert!(st.success(), "python3 -m venv {} failed", tmp.display());
    let st = Command::new(tmp.join("bin/pip"))
        .args(["install", "--quiet"])
        .args(pip_args)
        .status()
        .expect("run pip");
    assert!(st.success(), "pip install {pip_args:?} failed");
    let _ = std::fs::rename(&tmp, &dir);
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "created {} in {:.0} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    python
}

/// A Python with numpy: `BFPO_TRL_PYTHON`, else `python3` if it has numpy, else a cached venv.
fn numpy_python() -> PathBuf {
    if let Some(p) = std::env::var_os("BFPO_TRL_PYTHON") {
        return PathBuf::from(p);
    }
    let sys = PathBuf::from("python3");
    if python_has(&sys, "numpy") {
        return sys;
    }
    cached_venv("trl-venv-numpy", &["numpy==2.4.6"], "numpy==2.4.6")
}

/// A Python with the project's pinned requirements: `BFPO_TRL_PYTHON`, else a cached venv.
fn trl_python() -> PathBuf {
    if let Some(p) = std::env::var_os("BFPO_TRL_PYTHON") {
        return PathBuf::from(p);
    }
    let req = bfpo_lite::export::trl::REQUIREMENTS;
    let path = std::env::temp_dir().join(format!("bfpo-trl-req-{}.txt", std::process::id()));
    std::fs::write(&path, req).unwrap();
    cached_venv("trl-venv", &["-r", s(&path)], req)
}

fn run_python(python: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(python)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        python.display()
    );
    text
}

// ---------------------------------------------------------------------------------------------
// The loss

/// Log-probs as a run logs them: sums over 5-200 tokens of per-token log-probs, the policy a
/// few nats from the reference.
fn logged_logps(rng: &mut Rng, n: usize) -> Vec<PairLogps> {
    (0..n)
        .map(|_| {
            let rc = -rng.uniform(5.0, 400.0) as f64;
            let rr = -rng.uniform(5.0, 400.0) as f64;
            PairLogps::new(
                rc + rng.uniform(-30.0, 30.0) as f64,
                rr + rng.uniform(-30.0, 30.0) as f64,
                rc,
                rr,
            )
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn python_loss_equals_bfpo_lite_loss() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("p");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("bfpo_loss.py"),
        bfpo_lite::export::trl::LOSS_PY,
    )
    .unwrap();

    let mut rng = Rng::new(7);
    let losses = [
        Loss::bfpo(),
        Loss::parse("bfpo:tau=0.05,b1=2.5,alpha=0.25").unwrap(),
        Loss::ipo(),
        Loss::parse("dpo:beta=0.1,eps=0.1").unwrap(),
        Loss::dpo(),
    ];
    // (safety pairs, buffer pairs) per case; every case covers the four safety combinations.
    let shapes = [(8, 0), (8, 8), (5, 3), (1, 1)];
    let mut cases = Vec::new();
    let mut expected = Vec::new();
    for loss in losses {
        for &(ns, nb) in &shapes {
            let lps = logged_logps(&mut rng, ns + nb);
            let labels: Vec<(bool, bool)> = (0..ns + nb)
                .map(|i| {
                    if i < ns {
                        (i % 2 == 0, (i / 2) % 2 == 0)
                    } else {
                        (true, true)
                    }
                })
                .collect();
            let inputs: Vec<PairInput> = lps
                .iter()
                .zip(&labels)
                .map(|(&logps, &(c, r))| PairInput {
                    logps,
                    chosen_safe: c,
                    rejected_safe: r,
                })
                .collect();
            let safety = loss.batch(&inputs[..ns]).unwrap();
            let buffer = (nb > 0).then(|| loss.batch(&inputs[ns..]).unwrap());
            let total = safety.loss + buffer.as_ref().map_or(0.0, |b| b.loss);
            let mut per_pair: Vec<f64> = safety.pairs.iter().map(|p| p.loss).collect();
            let mut dc = safety.d_policy_chosen.clone();
            let mut dr = safety.d_policy_rejected.clone();
            if let Some(b) = &buffer {
                per_pair.extend(b.pairs.iter().map(|p| p.loss));
                dc.extend(&b.d_policy_chosen);
                dr.extend(&b.d_policy_rejected);
            }
            let f = |b: bool| if b { 1.0 } else { 0.0 };
            cases.push(serde_json::json!({
                "loss": loss,
                "policy_chosen": lps.iter().map(|l| l.policy_chosen).collect::<Vec<_>>(),
                "policy_rejected": lps.iter().map(|l| l.policy_rejected).collect::<Vec<_>>(),
                "ref_chosen": lps.iter().map(|l| l.ref_chosen).collect::<Vec<_>>(),
                "ref_rejected": lps.iter().map(|l| l.ref_rejected).collect::<Vec<_>>(),
                "chosen_safe": labels.iter().map(|l| f(l.0)).collect::<Vec<_>>(),
                "rejected_safe": labels.iter().map(|l| f(l.1)).collect::<Vec<_>>(),
                "is_buffer": (0..ns + nb).map(|i| f(i >= ns)).collect::<Vec<_>>(),
            }));
            expected.push((loss, total, per_pair, dc, dr, lps));
        }
    }
    // Truncation: random lengths around the limits, both response budgets.
    let mut truncs = Vec::new();
    let mut want_trunc = Vec::new();
    for i in 0..40 {
        let len = |rng: &mut Rng, hi: f32| 1 + rng.uniform(0.0, hi) as usize;
        let (pl, cl, rl) = (
            len(&mut rng, 40.0),
            len(&mut rng, 30.0),
            len(&mut rng, 30.0),
        );
        let seq = |n: usize, base: u32| (0..n as u32).map(|k| base + k).collect::<Vec<u32>>();
        let (p, c, r) = (seq(pl, 1000), seq(cl, 2000), seq(rl, 3000));
        let cfg = TruncationConfig {
            max_length: 32,
            max_prompt_length: 12 + i % 5,
            keep_prompt_prefix: i % 3,
            response_budget: if i % 2 == 0 {
                ResponseBudget::Trl
            } else {
                ResponseBudget::Remaining
            },
        };
        let ex = build_pair_examples(i, &p, &c, &r, &cfg).unwrap();
        truncs.push(serde_json::json!({
            "prompt": p, "chosen": c, "rejected": r,
            "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
            "keep_prompt_prefix": cfg.keep_prompt_prefix,
            "response_budget": if i % 2 == 0 { "trl" } else { "remaining" },
        }));
        want_trunc.push(ex);
    }
    let cases_path = dir.path().join("cases.json");
    std::fs::write(
        &cases_path,
        serde_json::json!({"losses": cases, "truncations": truncs}).to_string(),
    )
    .unwrap();
    let out_path = dir.path().join("out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/trl/loss_check.py");
    let python = numpy_python();
    let log = run_python(
        &python,
        &[s(&script), s(&project), s(&cases_path), s(&out_path)],
        &[],
    );
    assert!(log.contains("OK 20 loss cases, 40 truncations"), "{log}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let has_torch = got["torch"].as_bool().unwrap();
    for (i, ((loss, total, per_pair, dc, dr, lps), g)) in expected
        .iter()
        .zip(got["losses"].as_array().unwrap())
        .enumerate()
    {
        let gl = g["loss"].as_f64().unwrap();
        assert!(
            close(gl, *total),
            "case {i} {loss}: python {gl} vs rust {total}"
        );
        for (k, (a, b)) in g["per_pair"]
            .as_array()
            .unwrap()
            .iter()
            .zip(per_pair)
            .enumerate()
        {
            assert!(
                close(a.as_f64().unwrap(), *b),
                "case {i} pair {k}: {a} vs {b}"
            );
        }
        for (k, (a, l)) in g["delta"].as_array().unwrap().iter().zip(lps).enumerate() {
            assert!(close(a.as_f64().unwrap(), l.delta()), "case {i} delta {k}");
        }
        if has_torch {
            assert!(
                close(g["torch_loss"].as_f64().unwrap(), *total),
                "case {i} torch"
            );
            for (name, want) in [("grad_chosen", dc), ("grad_rejected", dr)] {
                for (k, (a, b)) in g[name].as_array().unwrap().iter().zip(want).enumerate() {
                    assert!(
                        close(a.as_f64().unwrap(), *b),
                        "case {i} {name}[{k}]: {a} vs {b}"
                    );
                }
            }
        }
    }
    for (i, (g, w)) in got["truncations"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&want_trunc)
        .enumerate()
    {
        let p = ids(&g["prompt"]);
        let mut c = p.clone();
        c.extend(ids(&g["chosen"]));
        let mut r = p.clone();
        r.extend(ids(&g["rejected"]));
        assert_eq!(
            (c, r),
            (w.chosen.ids.clone(), w.rejected.ids.clone()),
            "truncation {i}"
        );
    }
    eprintln!(
        "python loss check with {} (torch gradients: {has_torch})",
        python.display()
    );
}

// ---------------------------------------------------------------------------------------------
// The smoke test

/// The GGUF's weights under Hugging Face llama names (Q/K rows un-permuted) plus its
/// hyperparameters, vocabulary and chat template, for tests/trl/make_hf_llama.py.
fn write_hf_inputs(model: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let file = GgufFile::open(model).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    let get = |name: &str| -> Vec<f32> {
        let t = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        dequantize_vec(
            GgmlType::from_id(t.type_id).unwrap(),
            file.tensor_bytes(t),
            t.n_elements() as usize,
        )
        .unwrap()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![cfg.n_vocab, cfg.n_embd],
            get("token_embd.weight"),
        ),
        (
            "model.norm.weight".into(),
            vec![cfg.n_embd],
            get("output_norm.weight"),
        ),
        (
            "lm_head.weight".into(),
            vec![cfg.n_vocab, cfg.n_embd],
            get("output.weight"),
        ),
    ];
    for l in 0..cfg.n_layer {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        let h = |s: &str| format!("model.layers.{l}.{s}.weight");
        let (d, q, kv, f) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        tensors.push((h("input_layernorm"), vec![d], get(&b("attn_norm"))));
        tensors.push((h("post_attention_layernorm"), vec![d], get(&b("ffn_norm"))));
        tensors.push((
            h("self_attn.q_proj"),
            vec![q, d],
            unpermute_rows(&get(&b("attn_q")), cfg.n_head, d).unwrap(),
        ));
        tensors.push((
            h("self_attn.k_proj"),
            vec![kv, d],
            unpermute_rows(&get(&b("attn_k")), cfg.n_head_kv, d).unwrap(),
        ));
        tensors.push((h("self_attn.v_proj"), vec![kv, d], get(&b("attn_v"))));
        tensors.push((h("self_attn.o_proj"), vec![d, q], get(&b("attn_output"))));
        tensors.push((h("mlp.gate_proj"), vec![f, d], get(&b("ffn_gate"))));
        tensors.push((h("mlp.up_proj"), vec![f, d], get(&b("ffn_up"))));
        tensors.push((h("mlp.down_proj"), vec![d, f], get(&b("ffn_down"))));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, bytemuck::cast_slice(&v).to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    let weights = dir.join("weights.safetensors");
    std::fs::write(
        &weights,
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
    let tokens: Vec<String> = file
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let id = |k: &str| file.get(k).and_then(|v| v.as_u64()).unwrap();
    let meta = serde_json::json!({
        "vocab_size": cfg.n_vocab,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.n_ctx_train,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "unk_token_id": id("tokenizer.ggml.unknown_token_id"),
        "pad_token_id": id("tokenizer.ggml.unknown_token_id"),
        "tokens": tokens,
        "chat_template": CHAT_TEMPLATE,
    });
    let meta_path = dir.join("meta.json");
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    (meta_path, weights)
}

/// `score --engine wgpu` log-probs, and the token ids it scored (as prompt/chosen/rejected ids).
fn score_wgpu(
    model: &Path,
    adapter: Option<&Path>,
    data: &Path,
) -> (Vec<(f64, f64)>, Vec<serde_json::Value>) {
    let mut args = vec![
        "score",
        "--engine",
        "wgpu",
        "--emit-tokens",
        "--model",
        s(model),
        "--data",
        s(data),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let (ok, stdout, stderr) = bin(&args);
    assert!(ok, "score: {stderr}");
    let mut scores = Vec::new();
    let mut rows = Vec::new();
    for l in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        scores.push((
            v["chosen_logp"].as_f64().unwrap(),
            v["rejected_logp"].as_f64().unwrap(),
        ));
        let rs = v["response_start"].as_u64().unwrap() as usize;
        let rr = v["rejected_response_start"]
            .as_u64()
            .map_or(rs, |x| x as usize);
        assert_eq!(rs, rr, "prompts differ");
        let (c, r) = (ids(&v["chosen_ids"]), ids(&v["rejected_ids"]));
        assert_eq!(c[..rs], r[..rs]);
        rows.push(serde_json::json!({
            "prompt_ids": &c[..rs], "chosen_ids": &c[rs..], "rejected_ids": &r[rs..],
        }));
    }
    (scores, rows)
}

/// Heavy (torch, transformers, TRL, PEFT, accelerate on the CPU): the first run creates the
/// cached venv from requirements.txt (~6 GB, 2–9 minutes, see docs/multi-gpu.md); later runs
/// take about a minute. `BFPO_TRL_PYTHON=/path/to/venv/bin/python` uses an existing venv.
#[test]
fn train_py_two_steps_on_cpu_then_import_and_score() {
    let python = trl_python();
    let dir = tempfile::tempdir().unwrap();
    let (model, run, _) = tiny_run(dir.path());
    let project = dir.path().join("trl");
    export_run(&run, &project);

    // The same model in Hugging Face format, written with transformers' own classes.
    let hf = dir.path().join("hf");
    let (meta, weights) = write_hf_inputs(&model, dir.path());
    let script = |n: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/trl")
            .join(n)
    };
    let hf_home = dir.path().join("hf-home");
    let envs = [
        ("CUDA_VISIBLE_DEVICES", ""),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HOME", s(&hf_home)),
        ("TQDM_DISABLE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ];
    run_python(
        &python,
        &[
            s(&script("make_hf_llama.py")),
            s(&meta),
            s(&weights),
            s(&hf),
        ],
        &envs,
    );

    // Two steps through accelerate with the project's single-GPU config (CPU here).
    let output = dir.path().join("output");
    let t = Instant::now();
    let log = run_python(
        &python,
        &[
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            s(&project.join("accelerate/single_gpu.yaml")),
            s(&project.join("train.py")),
            "--model",
            s(&hf),
            "--output-dir",
            s(&output),
            "--max-steps",
            "2",
        ],
        &envs,
    );
    eprintln!("train.py: 2 steps in {:.1} s", t.elapsed().as_secs_f64());
    // --tokenize hf: the text re-rendered with the HF tokenizer's chat template, truncated by
    // bfpo_loss.truncate_pair; one step must run.
    let log_hf = run_python(
        &python,
        &[
            s(&project.join("train.py")),
            "--model",
            s(&hf),
            "--output-dir",
            s(&dir.path().join("output-hf")),
            "--max-steps",
            "1",
            "--tokenize",
            "hf",
        ],
        &envs,
    );
    assert!(log_hf.contains("(1 steps"), "{log_hf}");
    let adapter_dir = output.join("adapter");
    assert!(
        adapter_dir.join("adapter_model.safetensors").is_file(),
        "{log}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir.join("bfpo_run.json")).unwrap())
            .unwrap();
    assert_eq!(info["steps"], 2, "{log}");
    assert_eq!(info["loss"], "bfpo");
    // Step 1 starts at the reference (Δ = 0), so its loss is mean_safety (g/τ)² + mean_buffer
    // 50²: between 2500 + 2500 and 10000 + 2500 (summed log-probs, target g/τ, buffer mixed in).
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output.join("checkpoint-2/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let first = state["log_history"][0]["loss"].as_f64().unwrap();
    assert!(
        (5000.0..=12500.0).contains(&first),
        "first loss {first}\n{log}"
    );

    // Back to GGUF, then score with bfpo-lite's wgpu engine and with PEFT in Python.
    let adapter = dir.path().join("adapter.gguf");
    let (ok, out, e) = bin(&[
        "import-peft",
        s(&adapter_dir),
        "--model",
        s(&model),
        "--out",
        s(&adapter),
    ]);
    assert!(ok, "{e}");
    assert!(out.contains("rows converted"), "{out}");
    let eval = project.join("data/eval.jsonl");
    let (base_rs, scored) = score_wgpu(&model, None, &eval);
    let (lora_rs, _) = score_wgpu(&model, Some(&adapter), &eval);
    let scored_path = dir.path().join("scored.jsonl");
    std::fs::write(
        &scored_path,
        scored
            .iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let py_scores = dir.path().join("py_scores.json");
    run_python(
        &python,
        &[
            s(&script("score_peft.py")),
            s(&hf),
            s(&adapter_dir),
            s(&scored_path),
            s(&py_scores),
        ],
        &envs,
    );
    let py: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&py_scores).unwrap()).unwrap();
    let pairs = |k: &str| -> Vec<(f64, f64)> {
        py[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let (base_py, lora_py) = (pairs("base"), pairs("adapter"));
    assert_eq!(base_rs.len(), 4);
    let (mut err_base, mut err_lora, mut moved) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..base_rs.len() {
        for (a, b) in [(base_rs[i].0, base_py[i].0), (base_rs[i].1, base_py[i].1)] {
            err_base = err_base.max((a - b).abs() / b.abs().max(1.0));
        }
        for (a, b) in [(lora_rs[i].0, lora_py[i].0), (lora_rs[i].1, lora_py[i].1)] {
            err_lora = err_lora.max((a - b).abs() / b.abs().max(1.0));
        }
        moved = moved
            .max((lora_py[i].0 - base_py[i].0).abs())
            .max((lora_py[i].1 - base_py[i].1).abs());
    }
    eprintln!(
        "relative log-prob error: base {err_base:.2e}, adapter {err_lora:.2e}; adapter moved log-probs by up to {moved:.3} nats"
    );
    assert!(
        err_base < 1e-4,
        "the HF copy of the model scores differently: {err_base}"
    );
    assert!(
        err_lora < 1e-4,
        "the imported adapter scores differently from PEFT: {err_lora}"
    );
    assert!(
        moved > 0.05,
        "two steps did not move the adapter ({moved}): the check is not sensitive"
    );
    // BFPO_TRL_KEEP=DIR keeps the exported project and the HF model (e.g. to run them on a GPU).
    if let Some(keep) = std::env::var_os("BFPO_TRL_KEEP") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for (from, to) in [(&project, "trl"), (&hf, "hf"), (&model, "model.gguf")] {
            let _ = std::fs::remove_dir_all(keep.join(to));
            let st = Command::new("cp")
                .args(["-r", s(from), s(&keep.join(to))])
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
}
