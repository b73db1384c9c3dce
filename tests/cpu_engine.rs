//! The native CPU engine (`bfpo_lite::cpu`) against the f64 reference model on `init-model`
//! tiny models: per-sequence log-probs on every supported weight type and on llama, qwen2
//! (biases), qwen3 (q/k norms) and gemma3 (post-norms, GeGLU, sliding window), tied and untied; LoRA gradients (all seven targets, random
//! nonzero A and B, weights of mixed signs) against the reference's analytic gradients; LoRA
//! dropout against the reference's dropout forward/backward; and the determinism rules: the same
//! bits with 1 and 2 threads, and a sequence's log-prob independent of the batch it is in (so the
//! reference log-probs and the step-0 policy log-probs are equal).

mod common;

use bfpo_lite::cpu::NativeEngine;
use bfpo_lite::data::Example;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::init::{InitSpec, WeightType};
use bfpo_lite::model::lora::dropout::Dropout;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::optim::AdamWConfig;
use bfpo_lite::train::trainer::Engine;
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::path::Path;

const SEQ_WEIGHTS: [f32; 3] = [0.7, -1.3, 0.4];

/// f32 activations vs f64: per-sequence log-prob sums (~10 tokens of magnitude ~7).
const LOGP_TOL: Tol = Tol::new(2e-3, 1e-4);

fn adam() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

fn lora_for(cfg: &ModelConfig, seed: u64, b_std: f32, dropout: f32) -> LoraWeights {
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout,
        seed,
    };
    LoraWeights::random(&spec, cfg, b_std).unwrap()
}

fn examples(n_vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    let mut ex = |len: usize, response_start: usize| Example {
        ids: (0..len).map(|_| rng.below(n_vocab as u64) as u32).collect(),
        response_start,
    };
    // 70 rows in all: more than one 64-row block, so padding and block edges are crossed.
    vec![ex(19, 4), ex(37, 6), ex(14, 1)]
}

struct Loaded {
    file: GgufFile,
    cfg: ModelConfig,
    reference: RefModel,
}

fn load(path: &Path) -> Loaded {
    let file = GgufFile::open(path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let reference = {
        let w = Weights::from_gguf(&file, &cfg).unwrap();
        RefModel::new(&cfg, &w).unwrap()
    };
    Loaded {
        file,
        cfg,
        reference,
    }
}

fn engine(m: &Loaded, lora: LoraWeights, threads: usize) -> NativeEngine {
    NativeEngine::new(&m.file, &m.cfg, lora, adam(), threads).unwrap()
}

fn refs(exs: &[Example]) -> Vec<&Example> {
    exs.iter().collect()
}

/// Log-probs (adapter off and on) and gradients vs the reference; returns the gradient error
/// relative to the largest gradient.
fn check(path: &Path, what: &str) -> f64 {
    let m = load(path);
    let lora = lora_for(&m.cfg, 7, 0.3, 0.0);
    let exs = examples(m.cfg.n_vocab, 3);
    let mut e = engine(&m, lora.clone(), 2);
    let base: Vec<f64> = e
        .score(&refs(&exs), false)
        .unwrap()
        .iter()
        .map(|s| s.logp)
        .collect();
    let want_base = m.reference.sequence_logprobs(&exs, None).unwrap();
    assert_close(&format!("{what}: base logp"), &base, &want_base, LOGP_TOL);
    let lp: Vec<f64> = e
        .forward_train(&refs(&exs))
        .unwrap()
        .iter()
        .map(|s| s.logp)
        .collect();
    e.backward(&SEQ_WEIGHTS).unwrap();
    let (got_g, _) = {
        let st = e.save_state().unwrap();
        (grads_of(&mut e), st)
    };
    let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();
    let (rlp, rg) = m.reference.lora_grads(&exs, &w64, &lora).unwrap();
    assert_close(&format!("{what}: adapted logp"), &lp, &rlp, LOGP_TOL);
    let want = rg.flatten();
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    assert!(scale > 1e-3, "{what}: gradients vanish ({scale:e})");
    let tol = Tol::new(1e-4 * scale, 1e-4);
    assert_close(
        &format!("{what}: LoRA grads vs reference"),
        &got_g,
        &want,
        tol,
    );
    got_g
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The accumulated gradients, read through an SGD-free probe: one optimizer step at lr 0 would
/// zero them, so they are taken from the engine's state difference instead (AdamW moment m after
/// one step with beta1 = 0.9 is 0.1·g).
fn grads_of(e: &mut NativeEngine) -> Vec<f32> {
    e.optimizer_step(0.0, 1.0).unwrap();
    let (t, _) = e.save_state().unwrap();
    let lora = e.lora().unwrap();
    let mut out = Vec::new();
    for tt in &lora.tensors {
        let base = tt.target.tensor_name(tt.layer);
        for part in ["lora_a", "lora_b"] {
            let m = &t[&format!("{base}.{part}.adam_m")];
            out.extend(m.iter().map(|v| v / 0.1));
        }
    }
    out
}

#[test]
fn matches_reference_llama_f32_untied() {
    check(
        &common::models::tiny_model(Arch::Llama, GgmlType::F32, false),
        "llama f32",
    );
}

#[test]
fn matches_reference_qwen2_q8_0_tied() {
    check(
        &common::models::tiny_model(Arch::Qwen2, GgmlType::Q8_0, true),
        "qwen2 q8_0",
    );
}

#[test]
fn matches_reference_qwen3_f16_untied() {
    check(
        &common::models::tiny_model(Arch::Qwen3, GgmlType::F16, false),
        "qwen3 f16",
    );
}

#[test]
fn matches_reference_gemma3_f32_tied() {
    check(
        &common::models::tiny_model(Arch::Gemma3, GgmlType::F32, true),
        "gemma3 f32",
    );
}

#[test]
fn matches_reference_gemma3_q8_0_untied() {
    check(
        &common::models::tiny_model(Arch::Gemma3, GgmlType::Q8_0, false),
        "gemma3 q8_0",
    );
}

#[test]
fn matches_reference_gemma3_q4_k_m_tied() {
    check(
        &common::models::tiny_kquant_model(Arch::Gemma3, WeightType::Q4KM, true),
        "gemma3 q4_k_m",
    );
}

#[test]
fn matches_reference_llama_q4_k_tied() {
    check(
        &common::models::tiny_kquant_model(Arch::Llama, GgmlType::Q4_K, true),
        "llama q4_k",
    );
}

/// Every supported weight type, base log-probs only (llama, qwen2, gemma3).
#[test]
fn base_logprobs_every_type() {
    for ty in [
        GgmlType::F16,
        GgmlType::Q4_K,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
            let path = common::models::model(&InitSpec {
                dim: 256,
                ff: 512,
                ..InitSpec::tiny(arch, ty, false)
            });
            let m = load(&path);
            let exs = examples(m.cfg.n_vocab, 5);
            let lora = lora_for(&m.cfg, 1, 0.0, 0.0);
            let mut e = engine(&m, lora, 2);
            let got: Vec<f64> = e
                .score(&refs(&exs), false)
                .unwrap()
                .iter()
                .map(|s| s.logp)
                .collect();
            let want = m.reference.sequence_logprobs(&exs, None).unwrap();
            let n_tok: usize = exs.iter().map(|x| x.n_scored()).sum();
            let per_tok = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
                / n_tok as f64;
            assert!(
                per_tok <= 1e-3,
                "{arch:?} {ty:?}: {per_tok:e} nats/token vs reference"
            );
        }
    }
}

#[test]
fn dropout_matches_reference() {
    let m = load(&common::models::tiny_model(
        Arch::Llama,
        GgmlType::Q8_0,
        false,
    ));
    let lora = lora_for(&m.cfg, 9, 0.3, 0.25);
    let exs = examples(m.cfg.n_vocab, 4);
    let d = Dropout {
        p: 0.25,
        seed: 11,
        counter: 3,
    };
    let mut e = engine(&m, lora.clone(), 2);
    e.set_dropout(Some(d)).unwrap();
    let lp: Vec<f64> = e
        .forward_train(&refs(&exs))
        .unwrap()
        .iter()
        .map(|s| s.logp)
        .collect();
    e.backward(&SEQ_WEIGHTS).unwrap();
    let g = grads_of(&mut e);
    let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();
    let (rlp, rg) = m
        .reference
        .lora_grads_dropout(&exs, &w64, &lora, Some(d))
        .unwrap();
    assert_close("dropout logp", &lp, &rlp, LOGP_TOL);
    let want = rg.flatten();
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    assert_close("dropout grads", &g, &want, Tol::new(1e-4 * scale, 1e-4));
}

/// Same bits with 1 and 2 threads (log-probs and gradients); recomputing layers in the backward
/// (activation budget 0) gives the same bits as keeping them.
fn check_same_bits(arch: Arch, tied: bool) {
    let m = load(&common::models::tiny_model(arch, GgmlType::Q4_1, tied));
    let lora = lora_for(&m.cfg, 2, 0.3, 0.0);
    let exs = examples(m.cfg.n_vocab, 8);
    let run = |threads: usize, budget: u64| {
        let mut e = engine(&m, lora.clone(), threads).with_activation_memory(budget);
        let lp: Vec<u64> = e
            .forward_train(&refs(&exs))
            .unwrap()
            .iter()
            .map(|s| s.logp.to_bits())
            .collect();
        e.backward(&SEQ_WEIGHTS).unwrap();
        let g: Vec<u32> = grads_of(&mut e).iter().map(|v| v.to_bits()).collect();
        (lp, g)
    };
    let one = run(1, u64::MAX);
    assert_eq!(one, run(2, u64::MAX), "{arch:?}: 1 vs 2 threads");
    assert_eq!(one, run(2, 0), "{arch:?}: kept vs recomputed layers");
}

#[test]
fn same_bits_across_thread_counts_and_recompute() {
    check_same_bits(Arch::Qwen2, false);
}

/// The same for gemma3 (post-norms, GeGLU, the sliding window, two rope tables).
#[test]
fn gemma3_same_bits_across_thread_counts_and_recompute() {
    check_same_bits(Arch::Gemma3, true);
}

/// A sequence scored alone, in another batch, adapter off or with B = 0, gives the same bits.
#[test]
fn logprob_independent_of_batch() {
    let m = load(&common::models::tiny_model(
        Arch::Llama,
        GgmlType::Q8_0,
        true,
    ));
    let lora = lora_for(&m.cfg, 3, 0.0, 0.0);
    let exs = examples(m.cfg.n_vocab, 6);
    let mut e = engine(&m, lora, 2);
    let all = e.score(&refs(&exs), false).unwrap();
    for (i, ex) in exs.iter().enumerate() {
        let alone = e.score(&[ex], false).unwrap();
        assert_eq!(
            alone[0].logp.to_bits(),
            all[i].logp.to_bits(),
            "example {i} alone vs in the batch"
        );
    }
    let reversed: Vec<&Example> = exs.iter().rev().collect();
    let rev = e.score(&reversed, false).unwrap();
    let train = e.forward_train(&refs(&exs)).unwrap();
    for i in 0..exs.len() {
        assert_eq!(
            rev[exs.len() - 1 - i].logp.to_bits(),
            all[i].logp.to_bits(),
            "reordered batch"
        );
        assert_eq!(
            train[i].logp.to_bits(),
            all[i].logp.to_bits(),
            "B = 0 policy vs reference"
        );
    }
}

/// Pairs that share their prompt, as `tune` packs them: chosen and rejected after one prompt,
/// a rejected response that begins with the chosen one's first tokens (the common prefix runs
/// past the prompt), a sequence wholly a prefix of another, and one sharing nothing.
fn shared_examples(n_vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    let mut toks =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(n_vocab as u64) as u32).collect() };
    let (p1, p2) = (toks(23), toks(70));
    let cat = |a: &[u32], b: &[u32]| -> Vec<u32> { [a, b].concat() };
    let c1 = toks(17);
    let r1 = cat(&c1[..5], &toks(9));
    let c2 = toks(30);
    let ex = |ids: Vec<u32>, response_start: usize| Example {
        ids,
        response_start,
    };
    vec![
        ex(cat(&p1, &c1), 23),
        ex(cat(&p1, &r1), 23),
        ex(cat(&p2, &c2), 70),
        ex(cat(&p2, &toks(45)), 70),
        ex(p2[..50].to_vec(), 40),
        ex(toks(12), 3),
    ]
}

/// The first index where two bit patterns differ (or the shorter length).
fn same<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Prompt sharing is exact: log-probs (scoring and the training forward, adapter off and on)
/// and gradients (kept and recomputed layers) are the same bits as computing every sequence
/// whole, on llama and on gemma3 (sliding window), and the shared rows were really skipped.
#[test]
fn prompt_sharing_gives_the_unshared_bits() {
    for (arch, ty, tied) in [
        (Arch::Llama, GgmlType::Q4_K, false),
        (Arch::Qwen2, GgmlType::Q8_0, true),
        (Arch::Gemma3, GgmlType::Q4_1, true),
    ] {
        let m = load(&common::models::tiny_model(arch, ty, tied));
        let lora = lora_for(&m.cfg, 5, 0.3, 0.0);
        let exs = shared_examples(m.cfg.n_vocab, 11);
        let weights = [0.7f32, -1.3, 0.4, -0.2, 0.9, 1.1];
        let run = |share: bool, budget: u64| {
            let mut e = engine(&m, lora.clone(), 2)
                .with_prompt_sharing(share)
                .with_activation_memory(budget);
            let bits = |s: Vec<bfpo_lite::train::trainer::SeqScore>| -> Vec<u64> {
                s.iter().map(|s| s.logp.to_bits()).collect()
            };
            let base = bits(e.score(&refs(&exs), false).unwrap());
            let adapted = bits(e.score(&refs(&exs), true).unwrap());
            let train = bits(e.forward_train(&refs(&exs)).unwrap());
            let skipped = e.shared_rows();
            e.backward(&weights).unwrap();
            let g: Vec<u32> = grads_of(&mut e).iter().map(|v| v.to_bits()).collect();
            ((base, adapted, train, g), skipped)
        };
        let (whole, none) = run(false, u64::MAX);
        assert_eq!(none, 0, "{arch:?}: sharing off skips nothing");
        let (shared, skipped) = run(true, u64::MAX);
        // 23 + 70 (p1, p2 shared) + 5 (r1's start) + 50 (the prefix sequence).
        assert_eq!(skipped, 23 + 5 + 70 + 50, "{arch:?}: rows skipped");
        let recomputed = run(true, 0).0;
        for (what, other) in [("kept", &shared), ("recomputed layers", &recomputed)] {
            let parts = [
                ("base log-probs", same(&whole.0, &other.0)),
                ("adapted log-probs", same(&whole.1, &other.1)),
                ("training log-probs", same(&whole.2, &other.2)),
                ("gradients", same(&whole.3, &other.3)),
            ];
            for (part, diff) in parts {
                assert_eq!(
                    diff, None,
                    "{arch:?}, {what}: {part} shared vs whole (first differing index)"
                );
            }
        }
        assert!(
            whole.3.iter().any(|&g| g != 0),
            "{arch:?}: gradients vanish"
        );
    }
}
