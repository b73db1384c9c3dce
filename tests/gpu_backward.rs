//! Whole-model GPU backward on `init-model` tiny models: LoRA gradients of
//! `J = Σ_s w_s·logp_s` (w of mixed signs) from `gpu::backward` vs (a) the CPU reference model's
//! analytic gradients (`RefModel::lora_grads`, f64) and (b) central finite differences of the
//! GPU forward; B = 0 reproduces the base log-probs bit for bit; determinism; accumulation.
//!
//! Models: llama and qwen2, tied and untied, F32, Q8_0 and Q4_K weights (Q4_K on the dim-256
//! model so every matrix is a real K-quant), LoRA on all seven targets of both layers with
//! random nonzero A and B. Batches mix lengths (padding) and response starts.

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::gpu::Gpu;
use bfpo_lite::gpu::backward::{backward, forward_train, forward_train_keeping, layers_to_keep};
use bfpo_lite::gpu::forward::GpuModel;
use bfpo_lite::gpu::ops::dropout::Dropout;
use bfpo_lite::gpu::ops::lora::GpuLora;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::util::close::compare;
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::path::Path;

/// Sequence weights of mixed signs (one per example of [`examples`]).
const SEQ_WEIGHTS: [f32; 3] = [0.7, -1.3, 0.4];

/// GPU (f32 activations) vs the f64 reference: the per-sequence log-probs (sums of ~10 token
/// log-probs of magnitude ~7).
const LOGP_TOL: Tol = Tol::new(2e-3, 1e-4);

struct Loaded {
    cfg: ModelConfig,
    gpu_model: GpuModel,
    reference: RefModel,
}

fn load(gpu: &Gpu, path: &Path) -> Loaded {
    let file = GgufFile::open(path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let gpu_model = GpuModel::load(gpu, &file, &cfg).unwrap();
    let w = Weights::from_gguf(&file, &cfg).unwrap();
    let reference = RefModel::new(&cfg, &w).unwrap();
    Loaded {
        cfg,
        gpu_model,
        reference,
    }
}

/// Random nonzero A and B (B std 0.3, A the usual Kaiming-uniform) on all seven targets.
fn lora_for(cfg: &ModelConfig, seed: u64, b_std: f32) -> LoraWeights {
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed,
    };
    LoraWeights::random(&spec, cfg, b_std).unwrap()
}

/// Three sequences of different lengths (so two are padded) and response starts.
fn examples(n_vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    let mut ex = |len: usize, response_start: usize| Example {
        ids: (0..len).map(|_| rng.below(n_vocab as u64) as u32).collect(),
        response_start,
    };
    vec![ex(9, 4), ex(14, 6), ex(5, 1)]
}

/// Zeroes the gradients, runs forward_train + backward, returns (per-seq logp, flat grads in
/// `LoraGrads::flatten` order: per tensor A then B).
fn gpu_grads(
    gpu: &Gpu,
    m: &GpuModel,
    lora: &GpuLora,
    exs: &[Example],
    w: &[f32],
) -> (Vec<f64>, Vec<f32>) {
    let mut rec = gpu.recorder();
    lora.zero_grads(&mut rec);
    rec.submit();
    let (seqs, state) = forward_train(m, gpu, exs, lora, None).unwrap();
    backward(m, gpu, state, w, lora).unwrap();
    (seqs.iter().map(|s| s.logp).collect(), read_grads(gpu, lora))
}

fn read_grads(gpu: &Gpu, lora: &GpuLora) -> Vec<f32> {
    let mut out = Vec::new();
    for t in &lora.tensors {
        let a: Vec<f32> = gpu
            .read_range(&t.grad_a, 0, (lora.rank * t.n_in * 4) as u64)
            .unwrap();
        let b: Vec<f32> = gpu
            .read_range(&t.grad_b, 0, (t.n_out * lora.rank * 4) as u64)
            .unwrap();
        out.extend(a);
        out.extend(b);
    }
    out
}

/// Checks GPU gradients against the reference; returns the max error relative to the largest
/// gradient magnitude (the measure reported).
fn check_vs_reference(arch: Arch, ty: GgmlType, tied: bool, kquant: bool) -> f64 {
    let gpu = common::gpu::gpu();
    let path = if kquant {
        common::models::tiny_kquant_model(arch, ty, tied)
    } else {
        common::models::tiny_model(arch, ty, tied)
    };
    let m = load(&gpu, &path);
    let lora = lora_for(&m.cfg, 7, 0.3);
    let glora = GpuLora::upload(&gpu, &lora).unwrap();
    let exs = examples(m.cfg.n_vocab, 3);
    let (glogp, g) = gpu_grads(&gpu, &m.gpu_model, &glora, &exs, &SEQ_WEIGHTS);
    let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();
    let (rlogp, rg) = m.reference.lora_grads(&exs, &w64, &lora).unwrap();
    let what = format!("{arch:?} {ty:?} tied={tied}");
    assert_close(&format!("{what}: per-seq logp"), &glogp, &rlogp, LOGP_TOL);
    let want = rg.flatten();
    assert_eq!(g.len(), want.len(), "{what}: gradient layout");
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    assert!(scale > 1e-3, "{what}: gradients vanish ({scale:e})");
    // Errors measured against the largest gradient: f32 activations through two layers and a
    // ~1k vocabulary put them at ≈ 1.5e-6 of it (measured on lavapipe; quantized weights are
    // dequantized identically on both sides). A wrong sign, a missed term or a transposed
    // index gives O(1).
    let tol = Tol::new(1e-4 * scale, 1e-4);
    assert_close(&format!("{what}: LoRA grads vs reference"), &g, &want, tol);
    let r = compare(&g, &want, Tol::new(f64::INFINITY, 0.0));
    r.max_abs_err / scale
}

#[test]
fn grads_match_reference_llama_f32_untied() {
    let e = check_vs_reference(Arch::Llama, GgmlType::F32, false, false);
    eprintln!("llama f32 untied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_qwen2_f32_tied() {
    let e = check_vs_reference(Arch::Qwen2, GgmlType::F32, true, false);
    eprintln!("qwen2 f32 tied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_llama_q8_0_tied() {
    let e = check_vs_reference(Arch::Llama, GgmlType::Q8_0, true, false);
    eprintln!("llama q8_0 tied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_qwen2_q8_0_untied() {
    let e = check_vs_reference(Arch::Qwen2, GgmlType::Q8_0, false, false);
    eprintln!("qwen2 q8_0 untied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_llama_q4_k_untied() {
    let e = check_vs_reference(Arch::Llama, GgmlType::Q4_K, false, true);
    eprintln!("llama q4_k untied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_qwen2_q4_k_tied() {
    let e = check_vs_reference(Arch::Qwen2, GgmlType::Q4_K, true, true);
    eprintln!("qwen2 q4_k tied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_qwen3_f32_untied() {
    // qwen3: per-head Q/K RMSNorm between the projections and rope (its backward path).
    let e = check_vs_reference(Arch::Qwen3, GgmlType::F32, false, false);
    eprintln!("qwen3 f32 untied: max |Δgrad| / max|grad| = {e:.2e}");
}

#[test]
fn grads_match_reference_with_a_partial_adapter() {
    // Only some targets, only some layers: the other projections pass gradients through
    // untouched, and the backward stops inside the lowest adapted layer once its adapted
    // projections have their gradients (nothing below them is needed).
    let gpu = common::gpu::gpu();
    let m = load(
        &gpu,
        &common::models::tiny_model(Arch::Llama, GgmlType::Q8_0, false),
    );
    let cases: [(&[Target], &[usize]); 5] = [
        (&[Target::AttnV, Target::FfnUp], &[1]),
        (&[Target::FfnDown], &[1]),
        (&[Target::FfnDown], &[0, 1]),
        (&[Target::FfnGate], &[1]),
        (&[Target::AttnQ, Target::AttnOutput], &[1]),
    ];
    for (targets, layers) in cases {
        let spec = LoraSpec {
            targets: targets.to_vec(),
            layers: layers.to_vec(),
            rank: 3,
            alpha: 6.0,
            dropout: 0.0,
            seed: 4,
        };
        let lora = LoraWeights::random(&spec, &m.cfg, 0.3).unwrap();
        assert_eq!(lora.tensors.len(), targets.len() * layers.len());
        let gl = GpuLora::upload(&gpu, &lora).unwrap();
        let exs = examples(m.cfg.n_vocab, 31);
        let (glogp, g) = gpu_grads(&gpu, &m.gpu_model, &gl, &exs, &SEQ_WEIGHTS);
        let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();
        let (rlogp, rg) = m.reference.lora_grads(&exs, &w64, &lora).unwrap();
        let what = format!("{targets:?} on layers {layers:?}");
        assert_close(&format!("{what}: per-seq logp"), &glogp, &rlogp, LOGP_TOL);
        let want = rg.flatten();
        let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
        assert!(scale > 1e-3, "{what}: gradients vanish ({scale:e})");
        assert_close(
            &format!("{what}: LoRA grads"),
            &g,
            &want,
            Tol::new(1e-4 * scale, 1e-4),
        );
        // Keeping activations (only the layers the backward visits are kept) changes no bit.
        let mut rec = gpu.recorder();
        gl.zero_grads(&mut rec);
        rec.submit();
        let (_, state) =
            forward_train_keeping(&m.gpu_model, &gpu, &exs, &gl, None, u64::MAX).unwrap();
        assert_eq!(
            state.kept_layers(),
            m.cfg.n_layer - layers[0],
            "{what}: layers kept"
        );
        backward(&m.gpu_model, &gpu, state, &SEQ_WEIGHTS, &gl).unwrap();
        let kept = read_grads(&gpu, &gl);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&kept) == bits(&g),
            "{what}: kept activations change the gradients"
        );
    }
}

/// `J(lora)` from the GPU forward (f64 sum of the f32 per-sequence sums).
fn objective(gpu: &Gpu, m: &GpuModel, lora: &LoraWeights, exs: &[Example]) -> f64 {
    let gl = GpuLora::upload(gpu, lora).unwrap();
    let out = m.forward(gpu, exs, Some(&gl)).unwrap();
    out.seq_logprobs
        .iter()
        .zip(SEQ_WEIGHTS)
        .map(|(l, w)| l * w as f64)
        .sum()
}

fn param(l: &mut LoraWeights, ti: usize, is_a: bool, i: usize) -> &mut f32 {
    let t = &mut l.tensors[ti];
    if is_a { &mut t.a[i] } else { &mut t.b[i] }
}

/// Central differences of the GPU forward on randomly chosen parameters. h = 2⁻⁹ (exact in f32
/// around parameters of size ~0.3): measured errors vs h on these models were 4e-3 (2⁻⁶),
/// 1e-3 (2⁻⁷), 2.5e-4 (2⁻⁸) of the largest gradient (truncation, ∝ h²) and ≈ 9e-5 at 2⁻⁹ and
/// 2⁻¹⁰ (the f32 noise floor of the forward). The bound 2e-3 leaves a 20× margin; real bugs
/// (a wrong sign, a missing term) give O(1).
fn check_fd(arch: Arch, ty: GgmlType, tied: bool, kquant: bool, n_params: usize) -> f64 {
    let gpu = common::gpu::gpu();
    let path = if kquant {
        common::models::tiny_kquant_model(arch, ty, tied)
    } else {
        common::models::tiny_model(arch, ty, tied)
    };
    let m = load(&gpu, &path);
    let lora = lora_for(&m.cfg, 9, 0.3);
    let glora = GpuLora::upload(&gpu, &lora).unwrap();
    let exs = examples(m.cfg.n_vocab, 5);
    let (_, g) = gpu_grads(&gpu, &m.gpu_model, &glora, &exs, &SEQ_WEIGHTS);
    let scale = g.iter().fold(0.0f32, |a, &b| a.max(b.abs())) as f64;
    // Parameter index → (tensor, A or B, element), in flatten order.
    let mut index = Vec::new();
    for (ti, t) in lora.tensors.iter().enumerate() {
        index.extend((0..t.a.len()).map(|i| (ti, true, i)));
        index.extend((0..t.b.len()).map(|i| (ti, false, i)));
    }
    // Random parameters with a gradient at least 5% of the largest (so the comparison is of
    // a real signal, not of FD noise), from every kind of tensor over the draws.
    let mut rng = Rng::new(17);
    let h = 1.0f32 / 512.0;
    let mut worst = 0.0f64;
    let mut checked = 0;
    while checked < n_params {
        let p = rng.below(index.len() as u64) as usize;
        if (g[p] as f64).abs() < 0.05 * scale {
            continue;
        }
        let (ti, is_a, i) = index[p];
        let mut plus = lora.clone();
        let mut minus = lora.clone();
        *param(&mut plus, ti, is_a, i) += h;
        *param(&mut minus, ti, is_a, i) -= h;
        let fd = (objective(&gpu, &m.gpu_model, &plus, &exs)
            - objective(&gpu, &m.gpu_model, &minus, &exs))
            / (2.0 * h as f64);
        let err = (fd - g[p] as f64).abs() / scale;
        let t = &lora.tensors[ti];
        assert!(
            err < 2e-3,
            "{arch:?} {ty:?}: FD check of blk.{}.{:?} {} [{i}]: GPU grad {} vs central difference {fd} (error {err:.2e} of max |grad| {scale:.3e})",
            t.layer,
            t.target,
            if is_a { "A" } else { "B" },
            g[p]
        );
        worst = worst.max(err);
        checked += 1;
    }
    worst
}

#[test]
fn grads_match_finite_differences_of_gpu_forward() {
    let e1 = check_fd(Arch::Llama, GgmlType::F32, false, false, 4);
    let e2 = check_fd(Arch::Qwen2, GgmlType::Q8_0, true, false, 4);
    eprintln!(
        "FD of GPU forward: max |fd − grad| / max|grad| = {e1:.2e} (llama f32), {e2:.2e} (qwen2 q8_0)"
    );
}

#[test]
fn zero_b_reproduces_base_logprobs_exactly() {
    let gpu = common::gpu::gpu();
    for (arch, ty, tied) in [
        (Arch::Llama, GgmlType::Q8_0, false),
        (Arch::Qwen2, GgmlType::F32, true),
    ] {
        let m = load(&gpu, &common::models::tiny_model(arch, ty, tied));
        let lora = lora_for(&m.cfg, 11, 0.0);
        assert!(lora.tensors.iter().all(|t| t.b.iter().all(|&b| b == 0.0)));
        assert!(lora.tensors.iter().any(|t| t.a.iter().any(|&a| a != 0.0)));
        let gl = GpuLora::upload(&gpu, &lora).unwrap();
        let exs = examples(m.cfg.n_vocab, 13);
        let base = m.gpu_model.forward(&gpu, &exs, None).unwrap();
        let (seqs, _state) = forward_train(&m.gpu_model, &gpu, &exs, &gl, None).unwrap();
        for (s, (bt, bs)) in seqs
            .iter()
            .zip(base.token_logprobs.iter().zip(&base.seq_logprobs))
        {
            assert_eq!(
                s.token_logps, *bt,
                "{arch:?} {ty:?}: B = 0 changed token log-probs"
            );
            assert_eq!(s.logp.to_bits(), bs.to_bits());
            assert_eq!(s.n_tokens, bt.len());
        }
    }
}

#[test]
fn backward_is_deterministic_and_accumulates() {
    let gpu = common::gpu::gpu();
    let m = load(
        &gpu,
        &common::models::tiny_model(Arch::Qwen2, GgmlType::Q8_0, false),
    );
    let lora = lora_for(&m.cfg, 21, 0.3);
    let gl = GpuLora::upload(&gpu, &lora).unwrap();
    let exs = examples(m.cfg.n_vocab, 23);
    let (l1, g1) = gpu_grads(&gpu, &m.gpu_model, &gl, &exs, &SEQ_WEIGHTS);
    let (l2, g2) = gpu_grads(&gpu, &m.gpu_model, &gl, &exs, &SEQ_WEIGHTS);
    assert!(g1.iter().any(|&v| v != 0.0), "gradients are all zero");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(l1, l2, "log-probs differ between identical runs");
    assert!(
        bits(&g1) == bits(&g2),
        "gradients differ between identical runs"
    );
    // A second backward without zeroing adds the same gradient again: exactly 2·g (x + x is
    // exact in floating point).
    let (_, state) = forward_train(&m.gpu_model, &gpu, &exs, &gl, None).unwrap();
    backward(&m.gpu_model, &gpu, state, &SEQ_WEIGHTS, &gl).unwrap();
    let g3 = read_grads(&gpu, &gl);
    let twice: Vec<f32> = g1.iter().map(|v| 2.0 * v).collect();
    assert!(bits(&g3) == bits(&twice), "gradients do not accumulate");
    // Bad input: one weight per sequence.
    let (_, state) = forward_train(&m.gpu_model, &gpu, &exs, &gl, None).unwrap();
    let e = backward(&m.gpu_model, &gpu, state, &[1.0], &gl).unwrap_err();
    assert!(
        e.to_string()
            .contains("1 sequence weights for a batch of 3 sequences"),
        "{e}"
    );
}

/// Keeping layers' intermediates instead of recomputing them in the backward (all layers, one
/// layer, none) gives the same log-probs and gradients bit for bit, with and without LoRA
/// dropout, on llama, qwen2 and qwen3 (its Q/K head norms have buffers of their own).
#[test]
fn kept_activations_give_the_same_bits_as_recompute() {
    let gpu = common::gpu::gpu();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (arch, ty) in [
        (Arch::Llama, GgmlType::Q8_0),
        (Arch::Qwen2, GgmlType::F32),
        (Arch::Qwen3, GgmlType::F32),
    ] {
        let m = load(&gpu, &common::models::tiny_model(arch, ty, false));
        let lora = lora_for(&m.cfg, 31, 0.3);
        let gl = GpuLora::upload(&gpu, &lora).unwrap();
        let exs = examples(m.cfg.n_vocab, 37);
        let rows = 3 * 14;
        let per_layer = layers_to_keep(&m.cfg, rows, &gl, u64::MAX);
        assert_eq!(
            per_layer, m.cfg.n_layer,
            "an unlimited budget keeps every layer"
        );
        let one_layer = bfpo_lite::gpu::forward::Workspace::layer_bytes(&m.cfg, rows, 4, 7);
        assert_eq!(layers_to_keep(&m.cfg, rows, &gl, one_layer), 1);
        assert_eq!(layers_to_keep(&m.cfg, rows, &gl, one_layer - 1), 0);
        for dropout in [
            None,
            Some(Dropout {
                p: 0.25,
                seed: 9,
                counter: 2,
            }),
        ] {
            let run = |keep: u64| {
                let mut rec = gpu.recorder();
                gl.zero_grads(&mut rec);
                rec.submit();
                let (seqs, state) =
                    forward_train_keeping(&m.gpu_model, &gpu, &exs, &gl, dropout, keep).unwrap();
                let kept = (state.kept_layers(), state.kept_logits());
                let bytes = state.bytes();
                backward(&m.gpu_model, &gpu, state, &SEQ_WEIGHTS, &gl).unwrap();
                let logp: Vec<u64> = seqs.iter().map(|s| s.logp.to_bits()).collect();
                (logp, bits(&read_grads(&gpu, &gl)), kept, bytes)
            };
            let (l0, g0, k0, b0) = run(0);
            let (l1, g1, k1, b1) = run(one_layer);
            let (la, ga, ka, ba) = run(u64::MAX);
            let what = format!("{arch:?} {ty:?} dropout {dropout:?}");
            assert_eq!(
                (k0, k1, ka),
                ((0, false), (1, false), (m.cfg.n_layer, true)),
                "{what}: layers and LM-head logits kept"
            );
            assert!(g0.iter().any(|&b| b != 0), "{what}: gradients are all zero");
            assert_eq!(l0, l1, "{what}: log-probs, one layer kept");
            assert_eq!(l0, la, "{what}: log-probs, all layers kept");
            assert!(g0 == g1, "{what}: gradients differ with one layer kept");
            assert!(g0 == ga, "{what}: gradients differ with all layers kept");
            // The state's byte count grows by exactly the kept layers' intermediates (and the
            // logits [N, V] of the LM head when everything is kept).
            let layer = bfpo_lite::gpu::forward::Workspace::layer_bytes(&m.cfg, rows, 4, 7);
            let n_scored: usize = exs.iter().map(|e| e.ids.len() - e.response_start).sum();
            let logits = (n_scored * m.cfg.n_vocab * 4) as u64;
            assert_eq!(b1 - b0, layer, "{what}: bytes of one kept layer");
            assert_eq!(
                ba - b0,
                layer * m.cfg.n_layer as u64 + logits,
                "{what}: bytes of all layers and the logits"
            );
        }
    }
}
