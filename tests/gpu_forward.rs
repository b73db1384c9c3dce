//! Whole-model GPU forward vs the f64 CPU reference model (`bfpo_lite::model::reference`) on
//! `init-model` tiny models: llama, qwen2 and qwen3, tied and untied, every weight type; batched
//! vs one by one; a zero-B LoRA is bit-identical to the base; a random LoRA vs the reference;
//! checkpointed layer inputs reproduce under recompute; bad input errors.

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::gpu::forward::{
    ForwardError, GpuBatch, GpuModel, LayerInputs, ScoreBatching, Workspace, WorkspaceSpec,
};
use bfpo_lite::gpu::ops::lora::GpuLora;
use bfpo_lite::model::init::{InitSpec, WeightType};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::util::Rng;
use bfpo_lite::util::close::compare;
use bfpo_lite::util::{Tol, assert_close};
use std::path::Path;

/// GPU (f32 activations, f32 weights dequantized in registers) vs the f64 reference on the same
/// dequantized weights. Log-probs of a random tiny model are O(ln V) ≈ 6; measured max |Δ| on
/// lavapipe is 1.4e-6 – 3.7e-6 over every architecture and type.
const LOGP_TOL: Tol = Tol::new(2e-5, 0.0);

struct Loaded {
    file: GgufFile,
    cfg: ModelConfig,
}

fn load(path: &Path) -> Loaded {
    let file = GgufFile::open(path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    Loaded { file, cfg }
}

/// Examples of different lengths (one of length 1 with nothing scored, one fully scored).
fn examples(n_vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    let mut ex = |len: usize, start: usize| Example {
        ids: (0..len).map(|_| rng.below(n_vocab as u64) as u32).collect(),
        response_start: start,
    };
    vec![
        ex(11, 4),
        ex(5, 1),
        ex(17, 9),
        ex(1, 1),
        ex(8, 7),
        ex(40, 30),
    ]
}

fn reference(l: &Loaded) -> RefModel {
    let w = Weights::from_gguf(&l.file, &l.cfg).unwrap();
    RefModel::new(&l.cfg, &w).unwrap()
}

/// GPU vs reference on one model; returns max |Δ log-prob|.
fn check_model(spec: &InitSpec, lora: Option<&LoraWeights>) -> f64 {
    let gpu = common::gpu::gpu();
    let l = load(&common::models::model(spec));
    let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
    let exs = examples(l.cfg.n_vocab, 7);
    let glora = lora.map(|w| GpuLora::upload(&gpu, w).unwrap());
    let out = model.forward(&gpu, &exs, glora.as_ref()).unwrap();
    let refm = reference(&l);
    let mut got = Vec::new();
    let mut want = Vec::new();
    for (i, ex) in exs.iter().enumerate() {
        let r = refm.token_logprobs(ex, lora).unwrap();
        assert_eq!(out.token_logprobs[i].len(), ex.n_scored(), "example {i}");
        assert_eq!(r.len(), ex.n_scored());
        let s: f64 = r.iter().sum();
        assert!(
            (out.seq_logprobs[i] - s).abs() <= LOGP_TOL.abs * (1 + r.len()) as f64,
            "{spec:?} example {i}: sum {} vs {s}",
            out.seq_logprobs[i]
        );
        got.extend_from_slice(&out.token_logprobs[i]);
        want.extend(r);
    }
    let what = format!(
        "{} {} {} d{}",
        spec.arch.name(),
        spec.ty,
        if spec.tied { "tied" } else { "untied" },
        spec.dim
    );
    assert_close(&what, &got, &want, LOGP_TOL);
    let err = compare(&got, &want, LOGP_TOL).max_abs_err;
    eprintln!(
        "{what}: max |Δ log-prob| vs CPU reference = {err:.3e} over {} tokens",
        got.len()
    );
    err
}

const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
];

#[test]
fn forward_matches_reference_llama_qwen2_float_and_legacy_types() {
    let mut i = 0;
    for arch in [Arch::Llama, Arch::Qwen2] {
        for ty in TYPES.iter().copied().chain([GgmlType::Q5_1]) {
            // Alternate tied/untied over the types; F32 runs both.
            let ties: &[bool] = if ty == GgmlType::F32 {
                &[false, true]
            } else {
                &[i % 2 == 0]
            };
            for &tied in ties {
                check_model(&InitSpec::tiny(arch, ty, tied), None);
            }
            i += 1;
        }
    }
}

#[test]
fn forward_matches_reference_kquant_models() {
    // K-quants need rows that are multiples of 256: dim 256, ff 512 (short sequences).
    let types = [
        WeightType::Uniform(GgmlType::Q4_K),
        WeightType::Uniform(GgmlType::Q5_K),
        WeightType::Uniform(GgmlType::Q6_K),
        WeightType::Q4KM,
    ];
    for (i, ty) in types.into_iter().enumerate() {
        let arch = if i % 2 == 0 { Arch::Llama } else { Arch::Qwen2 };
        let spec = InitSpec {
            dim: 256,
            ff: 512,
            ..InitSpec::tiny(arch, ty, i < 2)
        };
        check_model(&spec, None);
    }
}

#[test]
fn forward_matches_reference_qwen3_and_llama3_rope_freqs() {
    check_model(&InitSpec::tiny(Arch::Qwen3, GgmlType::F32, true), None);
    check_model(&InitSpec::tiny(Arch::Qwen3, GgmlType::Q8_0, false), None);
    let spec = InitSpec {
        rope_freqs: true,
        rope_base: 500_000.0,
        ..InitSpec::tiny(Arch::Llama, GgmlType::F16, true)
    };
    check_model(&spec, None);
}

fn lora_spec(cfg: &ModelConfig, rank: usize) -> LoraSpec {
    LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank,
        alpha: 2.0 * rank as f32,
        dropout: 0.0,
        seed: 3,
    }
}

#[test]
fn forward_with_random_lora_matches_reference() {
    for (arch, tied) in [(Arch::Llama, false), (Arch::Qwen2, true)] {
        let spec = InitSpec::tiny(arch, GgmlType::F16, tied);
        let l = load(&common::models::model(&spec));
        let lora = LoraWeights::random(&lora_spec(&l.cfg, 4), &l.cfg, 0.05).unwrap();
        check_model(&spec, Some(&lora));
    }
}

#[test]
fn zero_b_lora_is_bit_identical_to_base() {
    let gpu = common::gpu::gpu();
    let spec = InitSpec::tiny(Arch::Qwen2, GgmlType::Q8_0, false);
    let l = load(&common::models::model(&spec));
    let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
    let exs = examples(l.cfg.n_vocab, 11);
    let lora = LoraWeights::init(&lora_spec(&l.cfg, 8), &l.cfg).unwrap();
    let glora = GpuLora::upload(&gpu, &lora).unwrap();
    let base = model.forward(&gpu, &exs, None).unwrap();
    let with = model.forward(&gpu, &exs, Some(&glora)).unwrap();
    for (a, b) in base.token_logprobs.iter().zip(&with.token_logprobs) {
        let a: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
        let b: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
        assert_eq!(a, b, "B = 0 must reproduce the base log-probs bit for bit");
    }
    assert_eq!(base.seq_logprobs, with.seq_logprobs);
}

#[test]
fn batched_equals_one_by_one() {
    let gpu = common::gpu::gpu();
    for spec in [
        InitSpec::tiny(Arch::Llama, GgmlType::Q4_0, true),
        InitSpec::tiny(Arch::Qwen2, GgmlType::F32, false),
    ] {
        let l = load(&common::models::model(&spec));
        let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
        let exs = examples(l.cfg.n_vocab, 13);
        let batched = model.forward(&gpu, &exs, None).unwrap();
        for (i, ex) in exs.iter().enumerate() {
            let one = model.forward(&gpu, std::slice::from_ref(ex), None).unwrap();
            assert_eq!(
                one.token_logprobs[0], batched.token_logprobs[i],
                "{spec:?}: example {i} alone vs in a padded batch"
            );
        }
    }
}

#[test]
fn score_groups_examples_and_keeps_their_order() {
    let gpu = common::gpu::gpu();
    let spec = InitSpec::tiny(Arch::Qwen2, GgmlType::F16, true);
    let l = load(&common::models::model(&spec));
    let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
    let exs = examples(l.cfg.n_vocab, 19);
    let all = model.forward(&gpu, &exs, None).unwrap();
    let mut calls = Vec::new();
    let batching = ScoreBatching {
        batch_tokens: 30,
        max_seqs: 2,
    };
    let scored = model
        .score(&gpu, &exs, None, batching, &mut |d, n| calls.push((d, n)))
        .unwrap();
    assert_eq!(
        scored, all,
        "grouped scoring must equal one padded batch, in input order"
    );
    assert!(calls.len() >= 3, "expected several batches, got {calls:?}");
    assert_eq!(calls.last(), Some(&(exs.len(), exs.len())));
    // A bad example is reported with its input index before anything runs.
    let mut bad = exs.clone();
    bad[4].ids[0] = l.cfg.n_vocab as u32 + 5;
    let e = model
        .score(&gpu, &bad, None, batching, &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(
            e,
            ForwardError::TokenOutOfRange {
                index: 4,
                pos: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn checkpointed_layer_inputs_recompute_bit_for_bit() {
    // The backward pass recomputes each layer from its checkpointed input: running layer i again
    // from checkpoint i must give checkpoint i + 1 exactly, and the log-probs must not depend on
    // whether checkpoints are kept.
    let gpu = common::gpu::gpu();
    let spec = InitSpec::tiny(Arch::Llama, GgmlType::F16, false);
    let l = load(&common::models::model(&spec));
    let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
    let exs = examples(l.cfg.n_vocab, 17);
    let lora = LoraWeights::random(&lora_spec(&l.cfg, 2), &l.cfg, 0.05).unwrap();
    let glora = GpuLora::upload(&gpu, &lora).unwrap();
    let batch = GpuBatch::new(&gpu, &l.cfg, &exs).unwrap();
    let ws = Workspace::new(
        &gpu,
        &l.cfg,
        &WorkspaceSpec::for_batch(&batch, Some(&glora)),
    )
    .unwrap();
    let ck = LayerInputs::new(&gpu, &l.cfg, batch.n_rows()).unwrap();
    let with = model
        .forward_batch(&gpu, &ws, &batch, Some(&glora), Some(&ck))
        .unwrap();
    let without = model
        .forward_batch(&gpu, &ws, &batch, Some(&glora), None)
        .unwrap();
    assert_eq!(with, without);
    let out = gpu.alloc("recomputed", ck.bufs[1].size).unwrap();
    for il in 0..l.cfg.n_layer {
        let mut rec = gpu.recorder();
        model
            .layer_forward(
                &gpu,
                &mut rec,
                il,
                &batch,
                &ws,
                &ck.bufs[il],
                &out,
                Some(&glora),
            )
            .unwrap();
        rec.run("recompute").unwrap();
        let n = batch.n_rows() * l.cfg.n_embd * 4;
        let a: Vec<u32> = gpu.read_range(&out, 0, n as u64).unwrap();
        let b: Vec<u32> = gpu.read_range(&ck.bufs[il + 1], 0, n as u64).unwrap();
        assert!(a == b, "layer {il}: recompute differs from the checkpoint");
    }
}

#[test]
fn bad_examples_are_clear_errors() {
    let gpu = common::gpu::gpu();
    let l = load(&common::models::tiny_model(
        Arch::Llama,
        GgmlType::F32,
        true,
    ));
    let model = GpuModel::load(&gpu, &l.file, &l.cfg).unwrap();
    let v = l.cfg.n_vocab as u32;
    let e = model
        .forward(
            &gpu,
            &[Example {
                ids: vec![1, 2, v],
                response_start: 1,
            }],
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, ForwardError::TokenOutOfRange { pos: 2, .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("token id {v} at position 2")),
        "{e}"
    );
    let e = model
        .forward(
            &gpu,
            &[Example {
                ids: vec![1, 2],
                response_start: 0,
            }],
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("response_start 0"), "{e}");
    assert!(
        model
            .forward(&gpu, &[], None)
            .unwrap()
            .token_logprobs
            .is_empty()
    );
}
