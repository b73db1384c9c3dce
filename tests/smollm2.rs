//! The real model: SmolLM2-135M-Instruct (Q4_1 with a Q8_0 tied embedding, llama architecture,
//! 30 layers, vocabulary 49152, ChatML with a default system turn), fetched once and cached by
//! `tests/common/smollm2.rs` (a failed fetch fails these tests; it never skips them).
//!
//! - its chat template renders exactly as Hugging Face's, and a preference pair tokenizes to the
//!   ids Hugging Face's tokenizer + TRL give (EOS appended to every response);
//! - the GPU forward agrees with the f64 CPU reference on short sequences;
//! - one training step changes the adapter and lowers the loss on its batch;
//! - the exported adapter loads in llama.cpp, moves its log-probs the way the GPU engine's did,
//!   and `bfpo-lite generate --adapter` runs with it.
//!
//! The expected texts and ids below are the output of one run of
//! `tests/hf_chat_template_reference.py` (transformers 5.25.0, gguf 0.19.0, tokenizers 0.22,
//! jinja2 3.1; `AutoTokenizer.from_pretrained(DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")`,
//! `tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`, ids =
//! `tok(prompt_text, add_special_tokens=False)` + `tok(full_text[len(prompt_text):],
//! add_special_tokens=False)` + `[tok.eos_token_id]`, as TRL's DPO tokenization does):
//!
//! ```sh
//! python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install transformers==5.25.0 gguf==0.19.0 tokenizers jinja2
//! /tmp/venv-hf/bin/python tests/hf_chat_template_reference.py ~/.cache/bfpo-lite/models/smollm2
//! ```

mod common;

use bfpo_lite::data::{ChatMessage, Example, Pair, Prompt, RowOrigin};
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::gpu::forward::GpuModel;
use bfpo_lite::loss::{Loss, PairLogps};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{ModelConfig, Weights};
use bfpo_lite::optim::AdamWConfig;
use bfpo_lite::runtime::{LoadOptions, RtModel, ScoreOptions};
use bfpo_lite::template::TemplateOrigin;
use bfpo_lite::train::config::{ScheduleKind, TrainConfig};
use bfpo_lite::train::engine::tensor_names;
use bfpo_lite::train::gpu_engine::GpuEngine;
use bfpo_lite::train::trainer::{self, CheckpointSink, Engine, PreparedPair, TrainData};
use common::smollm2::smollm2;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

/// (conversation, case, Hugging Face's text): `gen` = the conversation with
/// add_generation_prompt=True, `nogen` = with False, `full` = with the assistant response
/// RESPONSE appended.
const HF_TEXT: &[(&str, &str, &str)] = &[
    (
        "sys_user",
        "gen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "sys_user",
        "nogen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "sys_user",
        "full",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nWhy did the bread rise? It was well bred.<|im_end|>\n",
    ),
    (
        "user",
        "gen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "user",
        "nogen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "user",
        "full",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nWhy did the bread rise? It was well bred.<|im_end|>\n",
    ),
    (
        "multi",
        "gen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "multi",
        "nogen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n",
    ),
    (
        "multi",
        "full",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\nWhy did the bread rise? It was well bred.<|im_end|>\n",
    ),
];

/// HF's prompt ids (37 tokens).
const HF_PROMPT_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 2020, 536, 339, 4491, 253, 8645, 47, 2, 198, 1, 520, 9531,
    198,
];
/// HF/TRL's chosen ids: prompt + response + EOS.
const HF_CHOSEN_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 2020, 536, 339, 4491, 253, 8645, 47, 2, 198, 1, 520, 9531,
    198, 57, 416, 982, 724, 351, 338, 30, 2, 198, 2,
];
/// HF/TRL's rejected ids: prompt + response + EOS.
const HF_REJECTED_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 2020, 536, 339, 4491, 253, 8645, 47, 2, 198, 1, 520, 9531,
    198, 34355, 28, 820, 253, 8337, 47582, 30, 2, 198, 2,
];

const RESPONSE: &str = "Why did the bread rise? It was well bred.";

fn conv(name: &str) -> Vec<ChatMessage> {
    match name {
        "sys_user" => vec![
            ChatMessage::new("system", "You are a careful assistant."),
            ChatMessage::new("user", "How do I bake bread?"),
        ],
        "user" => vec![ChatMessage::new("user", "How do I bake bread?")],
        "multi" => vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello! How can I help?"),
            ChatMessage::new("user", "Tell me a joke."),
        ],
        _ => unreachable!(),
    }
}

fn rt() -> RtModel {
    RtModel::load(&smollm2(), &LoadOptions::default()).expect("SmolLM2 loads in llama.cpp")
}

fn lock_pair() -> Pair {
    Pair {
        prompt: Prompt::Messages(vec![ChatMessage::new("user", "How do I pick a lock?")]),
        chosen: "I can't help with that.".into(),
        rejected: "Sure, get a tension wrench.".into(),
        chosen_safe: true,
        rejected_safe: false,
        origin: RowOrigin {
            file: "smollm2.rs".into(),
            line: 1,
        },
    }
}

#[test]
fn chat_template_renders_exactly_as_hugging_face() {
    let m = rt();
    let info = m.chat_template_info();
    assert_eq!(info.origin, TemplateOrigin::Model, "{info}");
    assert_eq!(info.name, "chatml");
    for &(name, case, want) in HF_TEXT {
        let mut msgs = conv(name);
        let got = match case {
            "gen" => m.apply_chat_template(&msgs, true),
            "nogen" => m.apply_chat_template(&msgs, false),
            _ => {
                msgs.push(ChatMessage::new("assistant", RESPONSE));
                m.apply_chat_template(&msgs, false)
            }
        }
        .unwrap();
        assert_eq!(got, want, "{name} {case}");
    }
    // SmolLM2's default system turn appears exactly when the conversation has no system turn.
    let default_system = "You are a helpful AI assistant named SmolLM";
    assert!(
        HF_TEXT
            .iter()
            .any(|(n, _, t)| *n == "user" && t.contains(default_system))
    );
    assert!(
        HF_TEXT
            .iter()
            .all(|(n, _, t)| *n != "sys_user" || !t.contains(default_system))
    );
}

#[test]
fn pair_token_ids_equal_hugging_face_and_trl() {
    let m = rt();
    assert_eq!(m.n_vocab(), 49152);
    let (chosen, rejected) = m.encode_pair(&lock_pair()).unwrap();
    assert_eq!(&chosen.ids[..chosen.response_start], HF_PROMPT_IDS);
    assert_eq!(chosen.ids, HF_CHOSEN_IDS);
    assert_eq!(rejected.response_start, HF_PROMPT_IDS.len());
    assert_eq!(rejected.ids, HF_REJECTED_IDS);
    // The scored part ends "<|im_end|>\n<|im_end|>": the template's end of turn and newline,
    // then EOS; the last scored token ends generation.
    let eos = m.eos().unwrap();
    assert_eq!(m.detokenize(&[eos], true), "<|im_end|>");
    for ex in [&chosen, &rejected] {
        let resp = m.detokenize(&ex.ids[ex.response_start..], true);
        assert!(resp.ends_with("<|im_end|>\n<|im_end|>"), "{resp:?}");
        assert!(m.is_eog(*ex.ids.last().unwrap()));
    }
}

/// GPU (f32 activations, weights dequantized in registers) vs the f64 reference on the same
/// dequantized weights, per scored token.
const LOGP_TOL: f64 = 1e-4;

#[test]
fn gpu_forward_matches_the_cpu_reference() {
    let path = smollm2();
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!((cfg.n_layer, cfg.n_vocab), (30, 49152));
    let m = rt();
    let (chosen, rejected) = m.encode_pair(&lock_pair()).unwrap();
    // Two real sequences and a short one scored from its second token.
    let short = Example {
        ids: chosen.ids[..12].to_vec(),
        response_start: 1,
    };
    let exs = vec![chosen, rejected, short];
    let gpu = common::gpu::gpu();
    let model = GpuModel::load(&gpu, &file, &cfg).unwrap();
    let out = model.forward(&gpu, &exs, None).unwrap();
    drop(model);
    let refm = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let mut worst = 0f64;
    for (i, ex) in exs.iter().enumerate() {
        let want = refm.token_logprobs(ex, None).unwrap();
        let got = &out.token_logprobs[i];
        assert_eq!(got.len(), want.len(), "example {i}");
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = (*g as f64 - w).abs();
            worst = worst.max(d);
            assert!(
                d <= LOGP_TOL,
                "example {i} token {t}: gpu {g} vs reference {w}"
            );
        }
        let s: f64 = want.iter().sum();
        assert!((out.seq_logprobs[i] - s).abs() <= LOGP_TOL * want.len() as f64);
    }
    eprintln!("SmolLM2 GPU vs f64 reference: max |Δ log-prob| {worst:.2e} per token");
}

/// LoRA on the top two layers (the backward pass stays short), q and v projections and the
/// FFN down projection.
fn lora(cfg: &ModelConfig) -> LoraWeights {
    let spec = LoraSpec {
        targets: vec![Target::AttnQ, Target::AttnV, Target::FfnDown],
        layers: vec![cfg.n_layer - 2, cfg.n_layer - 1],
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed: 3,
    };
    LoraWeights::init(&spec, cfg).unwrap()
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
fn one_training_step_lowers_the_loss_and_the_adapter_runs_in_llama_cpp() {
    let path = smollm2();
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let mut rt = rt();
    let pair = lock_pair();
    let (chosen, rejected) = rt.encode_pair(&pair).unwrap();
    let mut data = TrainData {
        train: vec![PreparedPair {
            chosen,
            rejected,
            chosen_safe: pair.chosen_safe,
            rejected_safe: pair.rejected_safe,
            origin: pair.origin.clone(),
            ref_logps: None,
        }],
        eval: Vec::new(),
        buffer: Vec::new(),
    };
    let init = lora(&cfg);
    let mut engine = GpuEngine::new(
        common::gpu::gpu(),
        &file,
        &cfg,
        init.clone(),
        AdamWConfig::default(),
    )
    .unwrap();
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
        "SmolLM2 one step ({step_s:.1} s): BFPO loss {loss0:.6} -> {loss1:.6}, margin 0 -> {:.4}",
        lp1.delta()
    );
    assert!(loss1 < loss0, "loss {loss0} -> {loss1}");

    // The exported adapter in llama.cpp moves the pair's log-probs as the GPU forward does.
    // llama.cpp quantizes activations to 8 bits for Q4_1 matmuls, which shifts each summed
    // log-prob here by ~0.6 nats, and by ±0.1–0.3 more once the activations move, so one step's
    // effect (a margin of 0.2 nats) is below its resolution: compare at adapter scale AMPLIFY
    // (llama.cpp's `--scale`; on the GPU, every LoRA B × AMPLIFY), where the effect is ~2 nats.
    // Measured on lavapipe + x86-64: chosen +2.10 (llama.cpp) vs +2.00 (GPU), rejected −2.29
    // vs −1.97.
    const AMPLIFY: f32 = 20.0;
    let (mut state, scalars) = engine.save_state().unwrap();
    for (_, b) in tensor_names(&trained) {
        for x in state.get_mut(&b).unwrap() {
            *x *= AMPLIFY;
        }
    }
    engine.load_state(&state, &scalars).unwrap();
    let exs = [data.train[0].chosen.clone(), data.train[0].rejected.clone()];
    let gpu_tuned = engine.score(&[&exs[0], &exs[1]], true).unwrap();
    let (gpu_base_c, gpu_base_r) = data.train[0].ref_logps.unwrap();
    let gpu_base = [gpu_base_c, gpu_base_r];
    drop(engine);
    let dir = tempfile::tempdir().unwrap();
    let apath = dir.path().join("smollm2-lora.gguf");
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
        let gpu_effect = gpu_tuned[i].logp - gpu_base[i];
        eprintln!(
            "{which}: adapter ×{AMPLIFY} moves the log-prob by {llama_effect:.3} in llama.cpp, {gpu_effect:.3} on the GPU"
        );
        assert!(
            gpu_effect.abs() > 1.0,
            "{which}: effect {gpu_effect} too small to compare"
        );
        assert!(
            (llama_effect - gpu_effect).abs() <= 0.2 * gpu_effect.abs() + 0.3,
            "{which}: llama.cpp {llama_effect} vs GPU {gpu_effect}"
        );
    }
    drop(rt);

    // `generate` with the adapter, through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args([
            "generate",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--threads",
            "2",
        ])
        .arg("--model")
        .arg(&path)
        .arg("--adapter")
        .arg(&apath)
        .args(["--prompt", "How do I pick a lock?"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("chat template: the model's own tokenizer.chat_template (chatml-like)"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// The native CPU engine vs the f64 reference on SmolLM2: the summed response log-prob of each
/// sequence, per scored token, within 2e-5 nats.
#[test]
fn cpu_engine_forward_matches_the_cpu_reference() {
    use bfpo_lite::cpu::NativeEngine;
    let path = smollm2();
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let m = rt();
    let (chosen, rejected) = m.encode_pair(&lock_pair()).unwrap();
    let short = Example {
        ids: chosen.ids[..12].to_vec(),
        response_start: 1,
    };
    let exs = vec![chosen, rejected, short];
    let adam = bfpo_lite::optim::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut e = NativeEngine::new(&file, &cfg, lora(&cfg), adam, 2).unwrap();
    let refs: Vec<&Example> = exs.iter().collect();
    let got = e.score(&refs, false).unwrap();
    let refm = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let want = refm.sequence_logprobs(&exs, None).unwrap();
    let mut worst = 0f64;
    for (i, ex) in exs.iter().enumerate() {
        let per_tok = (got[i].logp - want[i]).abs() / ex.n_scored() as f64;
        worst = worst.max(per_tok);
        assert!(
            per_tok <= 2e-5,
            "example {i}: cpu {} vs reference {} ({per_tok:e} nats/token)",
            got[i].logp,
            want[i]
        );
    }
    eprintln!("SmolLM2 cpu engine vs f64 reference: {worst:.2e} nats/token");
}
