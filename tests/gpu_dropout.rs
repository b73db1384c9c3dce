//! LoRA dropout (PEFT semantics, training only) through the whole model: GPU `forward_train` +
//! `backward` with a dropout mask vs the CPU reference with the same counter-hash masks
//! (`RefModel::lora_grads_dropout`); p = 0 is bit-identical to no dropout; the reference's
//! dropout gradients match central finite differences of its dropout forward with the mask fixed
//! (so the GPU recompute, which must regenerate the forward's mask, is checked end to end).

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::gpu::Gpu;
use bfpo_lite::gpu::backward::{backward, forward_train};
use bfpo_lite::gpu::forward::GpuModel;
use bfpo_lite::gpu::ops::dropout::Dropout;
use bfpo_lite::gpu::ops::lora::GpuLora;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::util::{Rng, Tol, assert_close};

const SEQ_WEIGHTS: [f32; 3] = [0.7, -1.3, 0.4];
/// As tests/gpu_backward.rs: per-sequence log-probs, f32 GPU vs f64 reference.
const LOGP_TOL: Tol = Tol::new(2e-3, 1e-4);

const DROP: Dropout = Dropout {
    p: 0.3,
    seed: 0xC0FFEE,
    counter: 5,
};

struct Loaded {
    cfg: ModelConfig,
    gpu_model: GpuModel,
    reference: RefModel,
}

fn load(gpu: &Gpu) -> Loaded {
    let path = common::models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let file = GgufFile::open(&path).unwrap();
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

fn lora_for(cfg: &ModelConfig) -> LoraWeights {
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout: DROP.p,
        seed: 11,
    };
    LoraWeights::random(&spec, cfg, 0.3).unwrap()
}

/// Three sequences of different lengths (padding) and response starts.
fn examples(n_vocab: usize) -> Vec<Example> {
    let mut rng = Rng::new(9);
    let mut ex = |len: usize, response_start: usize| Example {
        ids: (0..len).map(|_| rng.below(n_vocab as u64) as u32).collect(),
        response_start,
    };
    vec![ex(9, 4), ex(14, 6), ex(5, 1)]
}

fn gpu_grads(
    gpu: &Gpu,
    m: &GpuModel,
    lora: &GpuLora,
    exs: &[Example],
    d: Option<Dropout>,
) -> (Vec<f64>, Vec<f32>) {
    let mut rec = gpu.recorder();
    lora.zero_grads(&mut rec);
    rec.submit();
    let (seqs, state) = forward_train(m, gpu, exs, lora, d).unwrap();
    backward(m, gpu, state, &SEQ_WEIGHTS, lora).unwrap();
    let mut g = Vec::new();
    for t in &lora.tensors {
        let a: Vec<f32> = gpu
            .read_range(&t.grad_a, 0, (lora.rank * t.n_in * 4) as u64)
            .unwrap();
        let b: Vec<f32> = gpu
            .read_range(&t.grad_b, 0, (t.n_out * lora.rank * 4) as u64)
            .unwrap();
        g.extend(a);
        g.extend(b);
    }
    (seqs.iter().map(|s| s.logp).collect(), g)
}

#[test]
fn dropout_grads_match_reference_and_p_zero_is_bit_identical() {
    let gpu = common::gpu::gpu();
    let m = load(&gpu);
    let lora = lora_for(&m.cfg);
    let glora = GpuLora::upload(&gpu, &lora).unwrap();
    let exs = examples(m.cfg.n_vocab);
    let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();

    let (glogp, g) = gpu_grads(&gpu, &m.gpu_model, &glora, &exs, Some(DROP));
    let (rlogp, rg) = m
        .reference
        .lora_grads_dropout(&exs, &w64, &lora, Some(DROP))
        .unwrap();
    assert_close("dropout: per-seq logp", &glogp, &rlogp, LOGP_TOL);
    let want = rg.flatten();
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    assert!(scale > 1e-3, "gradients vanish ({scale:e})");
    // Same tolerance as tests/gpu_backward.rs (relative to the largest gradient).
    assert_close(
        "dropout: LoRA grads vs reference",
        &g,
        &want,
        Tol::new(1e-4 * scale, 1e-4),
    );

    // Dropout changes the forward, and a new counter draws a new mask.
    let (plain, _) = m.reference.lora_grads(&exs, &w64, &lora).unwrap();
    let other = Dropout {
        counter: DROP.counter + 1,
        ..DROP
    };
    let (rlogp2, _) = m
        .reference
        .lora_grads_dropout(&exs, &w64, &lora, Some(other))
        .unwrap();
    for i in 0..exs.len() {
        assert!(
            (rlogp[i] - plain[i]).abs() > 1e-6,
            "dropout is a no-op on seq {i}"
        );
        assert!(
            (rlogp[i] - rlogp2[i]).abs() > 1e-6,
            "counter does not change the mask (seq {i})"
        );
    }

    // p = 0 is the plain training pass, bit for bit.
    let none = gpu_grads(&gpu, &m.gpu_model, &glora, &exs, None);
    let zero = gpu_grads(
        &gpu,
        &m.gpu_model,
        &glora,
        &exs,
        Some(Dropout { p: 0.0, ..DROP }),
    );
    assert_eq!(
        none.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        zero.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "p = 0 logp"
    );
    assert_eq!(
        none.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        zero.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "p = 0 grads"
    );
    // And the GPU dropout pass is deterministic (the recompute redraws identical masks).
    let again = gpu_grads(&gpu, &m.gpu_model, &glora, &exs, Some(DROP));
    assert_eq!(again.1, g, "dropout pass not reproducible");
}

#[test]
fn reference_dropout_grads_match_finite_differences_with_fixed_mask() {
    let gpu = common::gpu::gpu();
    let m = load(&gpu);
    let lora = lora_for(&m.cfg);
    let exs = examples(m.cfg.n_vocab);
    let w64: Vec<f64> = SEQ_WEIGHTS.iter().map(|&w| w as f64).collect();
    let (_, rg) = m
        .reference
        .lora_grads_dropout(&exs, &w64, &lora, Some(DROP))
        .unwrap();
    let analytic = rg.flatten();
    // J(θ) = Σ_s w_s·logp_s of the dropout forward (the mask is a function of the counter only).
    let zeros = vec![0.0; exs.len()];
    let j = |l: &LoraWeights| -> f64 {
        let (lp, _) = m
            .reference
            .lora_grads_dropout(&exs, &zeros, l, Some(DROP))
            .unwrap();
        lp.iter().zip(&w64).map(|(a, b)| a * b).sum()
    };
    // A few parameters of A and B of two tensors (layer 0 q, layer 1 down).
    let mut rng = Rng::new(3);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut offset = 0;
    for (ti, t) in lora.tensors.iter().enumerate() {
        let (na, nb) = (t.a.len(), t.b.len());
        let pick = (t.layer == 0 && t.target == Target::AttnQ)
            || (t.layer == 1 && t.target == Target::FfnDown);
        if pick {
            for (is_b, n) in [(false, na), (true, nb)] {
                for _ in 0..3 {
                    let i = rng.below(n as u64) as usize;
                    let h = 1e-3f32;
                    let mut lp = lora.clone();
                    let mut lm = lora.clone();
                    let (vp, vm) = if is_b {
                        (&mut lp.tensors[ti].b, &mut lm.tensors[ti].b)
                    } else {
                        (&mut lp.tensors[ti].a, &mut lm.tensors[ti].a)
                    };
                    let x = vp[i];
                    vp[i] = x + h;
                    vm[i] = x - h;
                    let hh = ((x + h) as f64 - (x - h) as f64) / 2.0;
                    want.push((j(&lp) - j(&lm)) / (2.0 * hh));
                    got.push(analytic[offset + if is_b { na } else { 0 } + i] as f32);
                }
            }
        }
        offset += na + nb;
    }
    // f64 central differences with h = 1e-3: truncation error O(h²·|f'''|).
    assert_close("dropout grads vs FD", &got, &want, Tol::new(1e-5, 1e-4));
}
