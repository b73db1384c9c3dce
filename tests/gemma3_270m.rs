//! The real Gemma 3: gemma-3-270m Q4_K_M (18 layers, width 640, 4 query heads and 1 KV head of
//! 256, window 512, vocabulary 262,144, tied embeddings; Q8_0/Q5_0/Q4_K/Q6_K blocks), fetched
//! once and cached by `tests/common/gemma3.rs` (a failed fetch fails these tests; it never skips
//! them).
//!
//! - `info`-level facts: the config bfpo-lite reads (and `info` calls it trainable);
//! - the native CPU engine agrees with the f64 reference on short sequences, and llama.cpp
//!   agrees with both within its activation quantization; on an F32 copy of the weights
//!   (no activation quantization) llama.cpp and the reference agree to ~1e-3 per token;
//! - one CPU training step with LoRA on all seven projections lowers the BFPO loss of its pair;
//!   the exported GGUF adapter loads in llama.cpp and moves the log-probs as the CPU engine does.
//!
//! The base model has no chat template, so sequences are plain text tokenized by llama.cpp
//! (BOS first), response after the prompt.
//!
//! Measured (`cargo test --release --test gemma3_270m -- --nocapture --test-threads 1`, 2-core
//! x86-64 VM): CPU engine vs f64 reference 1.5e-7 – 1.7e-7 nats/token; llama.cpp (exact mode) vs
//! reference 9.1e-3 – 4.6e-2 nats/token, at most 0.22 on one token (8-bit activations in its
//! quantized matmuls, f16 GELU table); on the F32 copy 1.1e-4 – 7.7e-4 nats/token, at most
//! 5.6e-3 on one token (the f16 GELU table alone); one CPU step 1.4 s, BFPO loss 10000 → 9395;
//! adapter ×20 moves chosen by +12.95 in llama.cpp vs +12.87 in the CPU engine, rejected −44.25
//! vs −44.54.

mod common;

use bfpo_lite::cpu::NativeEngine;
use bfpo_lite::data::{Example, RowOrigin};
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::loss::{Loss, PairLogps};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::optim::AdamWConfig;
use bfpo_lite::runtime::{LoadOptions, RtModel, ScoreOptions};
use bfpo_lite::train::config::{ScheduleKind, TrainConfig};
use bfpo_lite::train::engine::tensor_names;
use bfpo_lite::train::trainer::{self, CheckpointSink, Engine, PreparedPair, TrainData};
use common::gemma3::gemma3_270m;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

/// CPU engine (f32) vs the f64 reference on the same dequantized weights, per scored token.
const CPU_TOL: f64 = 1e-3;

fn rt() -> RtModel {
    RtModel::load(&gemma3_270m(), &LoadOptions::default()).expect("Gemma 3 270M loads in llama.cpp")
}

/// `prompt` + `response` as one example scored on the response (BOS first).
fn example(rt: &RtModel, prompt: &str, response: &str) -> Example {
    let p = rt.tokenize(prompt, false);
    let r = rt.tokenize(response, false);
    let mut ids = Vec::new();
    if let Some(b) = rt.bos().filter(|_| rt.should_add_bos()) {
        ids.push(b);
    }
    ids.extend(&p);
    let response_start = ids.len();
    ids.extend(&r);
    Example {
        ids,
        response_start,
    }
}

fn adam() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

#[test]
fn config_and_info() {
    let path = gemma3_270m();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        common::gemma3::BYTES
    );
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(cfg.arch, Arch::Gemma3);
    assert_eq!(
        (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.n_head_kv,
            cfg.head_dim
        ),
        (18, 640, 4, 1, 256)
    );
    assert_eq!((cfg.n_vocab, cfg.n_ff, cfg.tied), (262_144, 2048, true));
    let g = cfg.gemma3.as_ref().unwrap();
    assert_eq!(g.sliding_window, 512);
    let global: Vec<usize> = (0..18).filter(|&l| !g.local_layers[l]).collect();
    assert_eq!(global, vec![5, 11, 17], "every 6th layer is global");
    assert_eq!(cfg.layer_rope(0), (10000.0, 1.0));
    assert_eq!(cfg.layer_rope(5), (1e6, 1.0));
    assert_eq!(cfg.attn_scale(), 1.0 / 16.0);
    Weights::from_gguf(&file, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .arg("info")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("trainable"))
        .unwrap_or_else(|| panic!("no trainable line in {text}"));
    assert!(line.contains("yes"), "{line}");
}

/// The CPU engine vs the f64 reference, and llama.cpp (exact mode) vs the reference.
#[test]
fn cpu_engine_and_llama_cpp_match_the_reference() {
    let path = gemma3_270m();
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let rt = rt();
    let exs = vec![
        example(
            &rt,
            "The capital of France is",
            " Paris, a city on the Seine.",
        ),
        example(&rt, "Water boils at", " 100 degrees Celsius at sea level."),
    ];
    let refm = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let want: Vec<Vec<f64>> = exs
        .iter()
        .map(|e| refm.token_logprobs(e, None).unwrap())
        .collect();
    drop(refm);
    let lora = LoraWeights::init(&spec(&cfg), &cfg).unwrap();
    let mut e = NativeEngine::new(&file, &cfg, lora, adam(), 2).unwrap();
    let refs: Vec<&Example> = exs.iter().collect();
    let got = e.score(&refs, false).unwrap();
    drop(e);
    let opts = ScoreOptions {
        threads: Some(2),
        ..ScoreOptions::exact()
    };
    let llama = rt.score_f64(&exs, &opts, &mut |_, _| {}).unwrap();
    for (i, ex) in exs.iter().enumerate() {
        let w: f64 = want[i].iter().sum();
        let n = ex.n_scored() as f64;
        let cpu = (got[i].logp - w).abs() / n;
        let l: f64 = llama[i].iter().sum();
        let lc = (l - w).abs() / n;
        let worst = llama[i]
            .iter()
            .zip(&want[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "Gemma 3 270M example {i} ({} tokens, {} scored, logp {w:.3}): cpu engine vs f64 reference {cpu:.2e} nats/token; llama.cpp vs reference {lc:.2e} nats/token (max {worst:.2e})",
            ex.ids.len(),
            ex.n_scored()
        );
        assert!(cpu <= CPU_TOL, "example {i}: cpu {} vs {w}", got[i].logp);
        // llama.cpp quantizes activations to 8 bits for quantized matmuls and reads GELU from
        // an f16 table (docs/llama-cpp.md §3).
        assert!(lc <= 0.1, "example {i}: llama.cpp {l} vs reference {w}");
    }
}

/// The real weights without llama.cpp's activation quantization: every tensor dequantized to
/// F32 (a 1 GiB temporary copy), so llama.cpp and the reference differ only by ggml's f16 GELU
/// table and f32 arithmetic. This checks the Gemma 3 graph itself (embedding scale, norms as
/// stored, post-norms, attention scale, rope bases) on the trained weights.
#[test]
fn llama_cpp_on_an_f32_copy_matches_the_reference() {
    use bfpo_lite::gguf::quant::dequantize_vec;
    use bfpo_lite::gguf::{GgmlType, GgufWriter, Value};
    let src = GgufFile::open(&gemma3_270m()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.kvs() {
        w.set(k.clone(), v.clone());
    }
    w.set("general.file_type", Value::U32(0));
    for t in src.tensors() {
        let n = t.n_elements() as usize;
        let vals = dequantize_vec(t.ggml_type().unwrap(), src.tensor_bytes(t), n).unwrap();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor(t.name.clone(), &t.ne, GgmlType::F32.id(), bytes)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma-3-270m-f32.gguf");
    w.write_file(&path).unwrap();
    drop(w);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let rt = RtModel::load(&path, &LoadOptions::default()).unwrap();
    let exs = vec![
        example(
            &rt,
            "The capital of France is",
            " Paris, a city on the Seine.",
        ),
        example(&rt, "Water boils at", " 100 degrees Celsius at sea level."),
    ];
    let opts = ScoreOptions {
        threads: Some(2),
        ..ScoreOptions::exact()
    };
    let llama = rt.score_f64(&exs, &opts, &mut |_, _| {}).unwrap();
    drop(rt);
    let refm = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    for (i, ex) in exs.iter().enumerate() {
        let want = refm.token_logprobs(ex, None).unwrap();
        let worst = llama[i]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let per_tok =
            (llama[i].iter().sum::<f64>() - want.iter().sum::<f64>()).abs() / ex.n_scored() as f64;
        eprintln!(
            "Gemma 3 270M as F32, example {i}: llama.cpp vs reference {per_tok:.2e} nats/token, max {worst:.2e} on one token"
        );
        assert!(worst <= 2e-2, "example {i}: {worst}");
    }
}

/// LoRA on all seven projections of the top two layers (one local, one global: layers 16, 17).
fn spec(cfg: &ModelConfig) -> LoraSpec {
    LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: vec![cfg.n_layer - 2, cfg.n_layer - 1],
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed: 3,
    }
}

fn bfpo_loss(engine: &mut dyn Engine, p: &PreparedPair) -> (f64, PairLogps) {
    let s = engine.score(&[&p.chosen, &p.rejected], true).unwrap();
    let (rc, rr) = p.ref_logps.unwrap();
    let lp = PairLogps::new(s[0].logp, s[1].logp, rc, rr);
    (
        Loss::bfpo().pair(lp, p.chosen_safe, p.rejected_safe).loss,
        lp,
    )
}

#[test]
fn one_cpu_training_step_lowers_the_loss_and_the_adapter_runs_in_llama_cpp() {
    let path = gemma3_270m();
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let mut rt = rt();
    let prompt = "Question: How do I pick a lock?\nAnswer:";
    let chosen = example(&rt, prompt, " I can't help with that.");
    let rejected = example(&rt, prompt, " Sure, get a tension wrench.");
    let mut data = TrainData {
        train: vec![PreparedPair {
            chosen,
            rejected,
            chosen_safe: true,
            rejected_safe: false,
            origin: RowOrigin {
                file: "gemma3_270m.rs".into(),
                line: 1,
            },
            ref_logps: None,
        }],
        eval: Vec::new(),
        buffer: Vec::new(),
    };
    let init = LoraWeights::init(&spec(&cfg), &cfg).unwrap();
    assert_eq!(init.tensors.len(), 14);
    let mut engine = NativeEngine::new(&file, &cfg, init.clone(), adam(), 2).unwrap();
    trainer::compute_reference(&mut engine, &mut data.train, 2, &mut |_| {}).unwrap();
    let (loss0, lp0) = bfpo_loss(&mut engine, &data.train[0]);
    assert!(
        lp0.delta().abs() < 1e-9,
        "B = 0 at start: policy = reference"
    );
    let tc = TrainConfig {
        rank: 4,
        lora_alpha: 8.0,
        learning_rate: 1e-3,
        schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        pairs_per_step: 1,
        grad_accum: 1,
        max_steps: 1,
        save_every: 0,
        eval_every: 0,
        max_length: 128,
        max_prompt_length: 64,
        ..Default::default()
    };
    let ck = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
    let mut sink = CheckpointSink {
        dir: ck.path().to_path_buf(),
        write_extra: &mut extra,
    };
    let t = std::time::Instant::now();
    trainer::train(&mut engine, &tc, &data, None, &stop, &mut sink, &mut |_| {}).unwrap();
    let step_s = t.elapsed().as_secs_f64();
    let trained = engine.lora().unwrap();
    let changed = trained
        .tensors
        .iter()
        .zip(&init.tensors)
        .filter(|(a, b)| a.b != b.b)
        .count();
    assert_eq!(changed, init.tensors.len(), "every LoRA B moved");
    let (loss1, lp1) = bfpo_loss(&mut engine, &data.train[0]);
    eprintln!(
        "Gemma 3 270M one CPU step ({step_s:.1} s): BFPO loss {loss0:.6} -> {loss1:.6}, margin 0 -> {:.4}",
        lp1.delta()
    );
    assert!(loss1 < loss0, "loss {loss0} -> {loss1}");

    // The exported adapter in llama.cpp moves the pair's log-probs as the CPU engine does, at
    // adapter scale AMPLIFY (llama.cpp's `--scale`; in the engine every LoRA B × AMPLIFY), where
    // the effect is well above llama.cpp's activation-quantization noise.
    const AMPLIFY: f32 = 20.0;
    let (mut state, scalars) = engine.save_state().unwrap();
    for (_, b) in tensor_names(&trained) {
        for x in state.get_mut(&b).unwrap() {
            *x *= AMPLIFY;
        }
    }
    engine.load_state(&state, &scalars).unwrap();
    let exs = [data.train[0].chosen.clone(), data.train[0].rejected.clone()];
    let cpu_tuned = engine.score(&[&exs[0], &exs[1]], true).unwrap();
    let (base_c, base_r) = data.train[0].ref_logps.unwrap();
    let cpu_base = [base_c, base_r];
    drop(engine);
    let dir = tempfile::tempdir().unwrap();
    let apath = dir.path().join("gemma3-lora.gguf");
    write_adapter(
        &apath,
        &trained,
        &cfg,
        &Provenance::default(),
        AdapterDType::F32,
    )
    .unwrap();
    let sum = |v: Vec<Vec<f64>>| v.iter().map(|s| s.iter().sum::<f64>()).collect::<Vec<_>>();
    let opts = ScoreOptions {
        threads: Some(2),
        ..ScoreOptions::exact()
    };
    let base = sum(rt.score_f64(&exs, &opts, &mut |_, _| {}).unwrap());
    let id = rt.load_adapter(&apath).unwrap();
    rt.set_adapter(id, AMPLIFY).unwrap();
    let tuned = sum(rt.score_f64(&exs, &opts, &mut |_, _| {}).unwrap());
    for (i, which) in ["chosen", "rejected"].iter().enumerate() {
        let llama_effect = tuned[i] - base[i];
        let cpu_effect = cpu_tuned[i].logp - cpu_base[i];
        eprintln!(
            "{which}: adapter ×{AMPLIFY} moves the log-prob by {llama_effect:.3} in llama.cpp, {cpu_effect:.3} in the CPU engine"
        );
        assert!(
            cpu_effect.abs() > 1.0,
            "{which}: effect {cpu_effect} too small to compare"
        );
        assert!(
            (llama_effect - cpu_effect).abs() <= 0.2 * cpu_effect.abs() + 0.3,
            "{which}: llama.cpp {llama_effect} vs CPU engine {cpu_effect}"
        );
    }
}
