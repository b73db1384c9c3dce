//! Gemma 3 on `init-model` tiny models (dim 64, 2 layers: layer 0 local with a window of 4,
//! layer 1 global; rope bases 1e4 local / 1e6 global): the config read from GGUF, errors naming a
//! missing key or tensor, llama.cpp (the oracle) against the f64 reference with and without an
//! exported GGUF adapter, PEFT names for `Gemma3ForCausalLM` (and import back), `info` calling it
//! trainable.
//!
//! Tolerances (max |Δ log-prob| over the 23 scored tokens, 24-token sequences, so most queries of
//! the local layer see only 4 keys), measured with
//! `cargo test --release --test gemma3 -- --nocapture`:
//! * F32 base: base alone 9.2e-4 – 1.6e-3, with an F32 adapter 1.1e-3 – 1.4e-3 (adapter effect
//!   0.84 – 1.0 nats). Larger than llama's ~3e-6
//!   (`tests/export_llama.rs`) because ggml's CPU GELU reads a table of f16 values at the
//!   f16-rounded input (`ggml-cpu/vec.h`, `GGML_GELU_FP16`): a relative error up to ~1e-3 per
//!   activation, where we compute tanh-GELU in f32/f64 → `TOL_F32` = 5e-3.
//! * Q8_0 base: 6.7e-2 base, 4.9e-2 with the adapter: llama.cpp quantizes the activations to
//!   Q8_0 as for the other architectures (`docs/llama-cpp.md` §3) → `TOL_Q8`; the adapter's
//!   effect (0.97) must be 3× larger.

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, read_adapter, write_adapter};
use bfpo_lite::export::peft::{PeftOptions, peft_config, peft_tensors, write_peft};
use bfpo_lite::export::peft_import::read_peft;
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use bfpo_lite::model::init::InitSpec;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, ModelError, RopeKind, Weights};
use bfpo_lite::runtime::{LoadOptions, RtModel, ScoreOptions};
use common::models;
use std::process::Command;

const TOL_F32: f64 = 5e-3;
const TOL_Q8: f64 = 0.3;
const MIN_EFFECT: f64 = 0.05;

fn example(n_vocab: usize) -> Example {
    let ids: Vec<u32> = (0..24u32)
        .map(|i| 3 + (i * 7919 + 13) % (n_vocab as u32 - 3))
        .collect();
    Example {
        ids,
        response_start: 1,
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn lora_for(cfg: &ModelConfig, seed: u64) -> LoraWeights {
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed,
    };
    LoraWeights::random(&spec, cfg, 0.05).unwrap()
}

fn llama_logprobs(rt: &RtModel, ex: &Example) -> Vec<f64> {
    rt.score_f64(
        std::slice::from_ref(ex),
        &ScoreOptions::exact(),
        &mut |_, _| {},
    )
    .unwrap()
    .remove(0)
}

/// Every key and tensor of `src` except `skip_keys` / `skip_tensors`.
fn copy<'a>(src: &'a GgufFile, skip_keys: &[&str], skip_tensors: &[&str]) -> GgufWriter<'a> {
    let mut w = GgufWriter::new();
    for (k, v) in src.kvs() {
        if !skip_keys.contains(&k.as_str()) {
            w.set(k.clone(), v.clone());
        }
    }
    for t in src.tensors() {
        if !skip_tensors.contains(&t.name.as_str()) {
            w.add_tensor(t.name.clone(), &t.ne, t.type_id, src.tensor_bytes(t))
                .unwrap();
        }
    }
    w
}

fn load_err(file: &GgufFile) -> String {
    let r: Result<(), ModelError> = ModelConfig::from_gguf(file).and_then(|c| {
        Weights::from_gguf(file, &c)?;
        Ok(())
    });
    r.expect_err("expected an error").to_string()
}

#[test]
fn config_of_a_tiny_gemma3() {
    let file = GgufFile::open(&models::tiny_model(Arch::Gemma3, GgmlType::F32, true)).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(cfg.arch, Arch::Gemma3);
    assert_eq!(cfg.rope_kind, RopeKind::Neox);
    assert!(cfg.qk_norm && cfg.post_norms() && cfg.tied && !cfg.qkv_bias);
    let g = cfg.gemma3.as_ref().unwrap();
    assert_eq!(g.sliding_window, 4);
    assert_eq!(g.local_layers, vec![true, false]);
    assert_eq!(cfg.attn_window(0), Some(4));
    assert_eq!(cfg.attn_window(1), None);
    assert_eq!(cfg.layer_rope(0), (10000.0, 1.0));
    assert_eq!(cfg.layer_rope(1), (1e6, 1.0));
    assert_eq!(cfg.attn_scale(), 1.0 / 4.0); // head size 16
    assert_eq!(cfg.embd_scale(), 8.0); // √64
    let w = Weights::from_gguf(&file, &cfg).unwrap();
    assert!(w.layers.iter().all(|l| l.post_attn_norm.is_some()
        && l.post_ffn_norm.is_some()
        && l.attn_q_norm.is_some()));
    // Every tensor of the file is used, and the parameter count agrees.
    assert_eq!(w.all().len(), file.tensors().len());
    let n: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(cfg.n_params(), n);
    // init-model's scales: next-token distributions neither uniform nor one-hot. Tied, the
    // head reads back the √d-scaled input embedding that dominates the residual stream, so the
    // model leans towards repeating its input token (lower entropy than untied).
    for (tied, lo) in [(false, 0.2), (true, 0.05)] {
        let file = GgufFile::open(&models::tiny_model(Arch::Gemma3, GgmlType::F32, tied)).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let m = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
        let logits = m.logits(&example(cfg.n_vocab).ids, None).unwrap();
        let entropy = |l: &[f64]| {
            let mx = l.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = l.iter().map(|v| (v - mx).exp()).sum();
            -l.iter()
                .map(|v| {
                    let p = (v - mx).exp() / z;
                    if p > 0.0 { p * p.ln() } else { 0.0 }
                })
                .sum::<f64>()
        };
        let frac = logits.iter().map(|l| entropy(l)).sum::<f64>()
            / logits.len() as f64
            / (cfg.n_vocab as f64).ln();
        eprintln!("gemma3 tied={tied}: mean entropy {frac:.3} of ln(vocab)");
        assert!(
            (lo..=0.9).contains(&frac),
            "tied={tied}: mean entropy {frac:.3} of ln(vocab)"
        );
    }
}

/// llama.cpp's rule without `sliding_window_pattern`: every 6th layer (5, 11, …) is global.
#[test]
fn default_pattern_makes_every_sixth_layer_global() {
    let spec = InitSpec {
        layers: 7,
        ..InitSpec::tiny(Arch::Gemma3, GgmlType::F32, true)
    };
    let src = GgufFile::open(&models::model(&spec)).unwrap();
    let w = copy(&src, &["gemma3.attention.sliding_window_pattern"], &[]);
    let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let local = &cfg.gemma3.as_ref().unwrap().local_layers;
    assert_eq!(local, &vec![true, true, true, true, true, false, true]);
    // A per-layer array, as newer converters write it.
    let mut w = copy(&src, &[], &[]);
    w.set(
        "gemma3.attention.sliding_window_pattern",
        Value::Array(
            bfpo_lite::gguf::ValueType::Bool,
            [false, true, true, false, true, true, true]
                .into_iter()
                .map(Value::Bool)
                .collect(),
        ),
    );
    let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(
        cfg.gemma3.unwrap().local_layers,
        vec![false, true, true, false, true, true, true]
    );
}

#[test]
fn missing_keys_and_tensors_are_named() {
    let src = GgufFile::open(&models::tiny_model(Arch::Gemma3, GgmlType::F32, true)).unwrap();
    for key in [
        "gemma3.attention.sliding_window",
        "gemma3.attention.layer_norm_rms_epsilon",
        "gemma3.embedding_length",
        "gemma3.attention.head_count",
    ] {
        let file = GgufFile::from_bytes(copy(&src, &[key], &[]).to_bytes()).unwrap();
        let e = load_err(&file);
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains("missing"), "{key}: {e}");
    }
    for t in [
        "blk.1.post_ffw_norm.weight",
        "blk.0.post_attention_norm.weight",
        "blk.0.attn_k_norm.weight",
    ] {
        let file = GgufFile::from_bytes(copy(&src, &[], &[t]).to_bytes()).unwrap();
        let e = load_err(&file);
        assert!(e.contains(t), "{t}: {e}");
    }
    let mut w = copy(&src, &[], &[]);
    w.set("gemma3.attention.sliding_window_pattern", Value::U32(1));
    let e = load_err(&GgufFile::from_bytes(w.to_bytes()).unwrap());
    assert!(
        e.contains("sliding_window_pattern") && e.contains("no layer is local"),
        "{e}"
    );
    let mut w = copy(&src, &[], &[]);
    w.set("gemma3.final_logit_softcapping", Value::F32(30.0));
    let e = load_err(&GgufFile::from_bytes(w.to_bytes()).unwrap());
    assert!(e.contains("final_logit_softcapping"), "{e}");
    let mut w = copy(&src, &[], &[]);
    w.set("general.architecture", Value::String("gemma2".into()));
    let e = load_err(&GgufFile::from_bytes(w.to_bytes()).unwrap());
    assert!(
        e.contains("\"gemma2\"") && e.contains("gemma3") && e.contains("qwen3"),
        "{e}"
    );
}

/// llama.cpp and the f64 reference agree on base log-probs and with an exported adapter (all 7
/// targets, both layers), on tied and untied F32 models and a Q8_0 model.
#[test]
fn llama_cpp_agrees_with_the_reference_with_and_without_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (GgmlType::F32, true),
        (GgmlType::F32, false),
        (GgmlType::Q8_0, true),
    ];
    for (k, (ty, tied)) in cases.into_iter().enumerate() {
        let label = format!("gemma3 {ty} {}", if tied { "tied" } else { "untied" });
        let path = models::tiny_model(Arch::Gemma3, ty, tied);
        let file = GgufFile::open(&path).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let reference = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
        let ex = example(cfg.n_vocab);
        let mut rt = RtModel::load(&path, &LoadOptions::default()).unwrap();
        let base_llama = llama_logprobs(&rt, &ex);
        let base_ref = reference.token_logprobs(&ex, None).unwrap();
        let base_err = max_diff(&base_llama, &base_ref);
        let tol = if ty == GgmlType::F32 { TOL_F32 } else { TOL_Q8 };
        let lora = lora_for(&cfg, 40 + k as u64);
        let apath = dir.path().join(format!("{k}.gguf"));
        write_adapter(
            &apath,
            &lora,
            &cfg,
            &Provenance::default(),
            AdapterDType::F32,
        )
        .unwrap();
        let (stored, _, arch) = read_adapter(&apath).unwrap();
        assert_eq!(arch, "gemma3");
        let id = rt.load_adapter(&apath).unwrap();
        rt.set_adapter(id, 1.0).unwrap();
        let got = llama_logprobs(&rt, &ex);
        rt.clear_adapter();
        let want = reference.token_logprobs(&ex, Some(&stored)).unwrap();
        let err = max_diff(&got, &want);
        let effect = max_diff(&want, &base_ref);
        eprintln!(
            "{label}: max |Δlogp| llama.cpp vs reference: base {base_err:.2e}, with adapter {err:.2e}; adapter effect {effect:.2e}"
        );
        assert!(base_err <= tol, "{label}: base {base_err} > {tol}");
        assert!(err <= tol, "{label}: adapter {err} > {tol}");
        assert!(
            effect > MIN_EFFECT.max(3.0 * tol),
            "{label}: adapter effect only {effect}"
        );
    }
}

/// The local layer matters: with a window longer than the sequence (and the global rope base on
/// local layers too) the model is all-global in effect; llama.cpp agrees with the reference
/// there as well, and its log-probs differ from the window-4 model's by far more than the
/// tolerance. (A pattern with no local layer at all makes llama.cpp abort on load.)
#[test]
fn the_sliding_window_is_what_llama_cpp_does() {
    let spec = InitSpec {
        sliding_window: 64,
        rope_base_local: 1e6,
        ..InitSpec::tiny(Arch::Gemma3, GgmlType::F32, true)
    };
    let path = models::model(&spec);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(cfg.attn_window(0), Some(64));
    let reference = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let ex = example(cfg.n_vocab);
    let rt = RtModel::load(&path, &LoadOptions::default()).unwrap();
    let wide = llama_logprobs(&rt, &ex);
    let err = max_diff(&wide, &reference.token_logprobs(&ex, None).unwrap());
    assert!(err <= TOL_F32, "window 64: {err}");
    let narrow_path = models::tiny_model(Arch::Gemma3, GgmlType::F32, true);
    let narrow = llama_logprobs(
        &RtModel::load(&narrow_path, &LoadOptions::default()).unwrap(),
        &ex,
    );
    let d = max_diff(&wide, &narrow);
    eprintln!(
        "window 64 vs window 4 in llama.cpp: max |Δlogp| {d:.2e}; window 64 vs reference {err:.2e}"
    );
    assert!(
        d > 10.0 * TOL_F32,
        "the window changes log-probs by only {d}"
    );
}

/// HF `Gemma3ForCausalLM` module names (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, …),
/// rows as stored (gemma3's NEOX rope needs no un-permutation, unlike llama).
#[test]
fn peft_names_follow_gemma3_for_causal_lm() {
    let file = GgufFile::open(&models::tiny_model(Arch::Gemma3, GgmlType::F32, true)).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let lora = lora_for(&cfg, 3);
    let tensors = peft_tensors(&lora, &cfg).unwrap();
    assert_eq!(tensors.len(), 28);
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for want in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let q = lora.get(0, Target::AttnQ).unwrap();
    let qb = tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        .unwrap();
    assert_eq!(qb.values, q.b, "q_proj lora_B rows must be unchanged");
    assert_eq!(qb.shape, [cfg.q_dim(), 4]);
    let c = peft_config(&lora, &cfg, Some("google/gemma-3-270m"));
    assert_eq!(c["base_model_name_or_path"], "google/gemma-3-270m");
    // Written and read back (import-peft): the same adapter.
    let dir = tempfile::tempdir().unwrap();
    let opts = PeftOptions {
        dtype: AdapterDType::F32,
        base_model_name_or_path: None,
    };
    write_peft(dir.path(), &lora, &cfg, &opts).unwrap();
    let (back, _) = read_peft(dir.path(), &cfg).unwrap();
    assert_eq!(back.tensors.len(), lora.tensors.len());
    for (a, b) in back.tensors.iter().zip(&lora.tensors) {
        assert_eq!((a.layer, a.target), (b.layer, b.target));
        assert_eq!((&a.a, &a.b), (&b.a, &b.b), "{:?} {}", a.target, a.layer);
    }
}

#[test]
fn info_says_a_gemma3_is_trainable() {
    let path = models::tiny_model(Arch::Gemma3, GgmlType::Q8_0, true);
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
    assert!(text.contains("gemma3"), "{text}");
}

/// A whole tune job on a tiny gemma3 with `--engine auto`: it runs on the CPU engine (the wgpu
/// engine has no Gemma 3 kernels), LoRA on all seven projections, and writes the adapter.
#[test]
fn a_tune_job_with_engine_auto_trains_a_gemma3_on_the_cpu_engine() {
    use bfpo_lite::run::{Event, TuneJob};
    use bfpo_lite::train::config::EngineKind;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tune::config(
        models::tiny_model(Arch::Gemma3, GgmlType::Q8_0, true),
        common::tune::demo_file("heldout.jsonl"),
        dir.path(),
    );
    cfg.engine = EngineKind::Auto;
    cfg.targets = "all".into();
    let mut engines = Vec::new();
    let mut obs = |e: &Event| {
        if let Event::Engine { description } = e {
            engines.push(description.clone());
        }
    };
    let mut run = TuneJob::from_config(cfg)
        .unwrap()
        .prepare(&mut obs)
        .unwrap();
    let outcome = run.train(&mut obs).unwrap().clone();
    assert_eq!(outcome.steps, 4);
    run.finish(&mut obs).unwrap();
    assert!(dir.path().join("adapter.gguf").exists());
    assert_eq!(engines.len(), 1, "{engines:?}");
    assert!(engines[0].to_lowercase().contains("cpu"), "{engines:?}");
    let (lora, _, arch) = read_adapter(&dir.path().join("adapter.gguf")).unwrap();
    assert_eq!(arch, "gemma3");
    assert_eq!(lora.tensors.len(), 14, "7 targets × 2 layers");
}

/// The wgpu engine refuses gemma3 with the way out.
#[test]
fn the_wgpu_engine_refuses_gemma3_and_names_the_cpu_engine() {
    let path = models::tiny_model(Arch::Gemma3, GgmlType::F32, true);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let gpu = common::gpu::gpu();
    let e = match bfpo_lite::gpu::forward::GpuModel::load(&gpu, &file, &cfg) {
        Ok(_) => panic!("gemma3 on wgpu must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("gemma3") && e.contains("--engine cpu"), "{e}");
}

/// `export --format merged` on a gemma3: the merged model (F16 matrices) in llama.cpp scores
/// like the base with the adapter, and like the reference with the adapter.
#[test]
fn merged_gemma3_matches_base_plus_adapter() {
    use bfpo_lite::export::merge::write_merged;
    let dir = tempfile::tempdir().unwrap();
    let path = models::tiny_model(Arch::Gemma3, GgmlType::F32, false);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let lora = lora_for(&cfg, 21);
    let mpath = dir.path().join("merged.gguf");
    write_merged(&path, "gemma3", &lora, None, &mpath).unwrap();
    let ex = example(cfg.n_vocab);
    let reference = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let want = reference.token_logprobs(&ex, Some(&lora)).unwrap();
    let base = reference.token_logprobs(&ex, None).unwrap();
    let merged = llama_logprobs(
        &RtModel::load(&mpath, &LoadOptions::default()).unwrap(),
        &ex,
    );
    let err = max_diff(&merged, &want);
    let effect = max_diff(&want, &base);
    eprintln!(
        "gemma3 merged F16 in llama.cpp vs reference + adapter {err:.2e}; adapter effect {effect:.2e}"
    );
    // F16 weights and activations in llama.cpp (tests/export_llama.rs: 4.7e-3 for llama).
    assert!(err <= 2e-2, "{err}");
    assert!(effect > 0.1, "adapter effect only {effect}");
}
