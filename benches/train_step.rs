//! One whole LoRA training step on the GPU — `forward_train` (policy forward with checkpoints),
//! `backward` (per-layer recompute + backward, LoRA gradients), AdamW with global-norm clipping —
//! at Qwen2.5-0.5B and Llama-3.2-1B shapes, rank 16 on all seven targets, one preference pair
//! (2 sequences × T = 512 tokens, response from T/4). The model is synthetic: random Q8_0
//! matrices (one layer's bytes shared by every layer), built in memory; the reference
//! log-probs are assumed cached (no reference forward in the step).
//!
//! Throughput is reported as tokens (criterion's elem/s = tokens/s). FLOPs per token ≈ 6·N
//! (N = matrix parameters, LM head included: forward 2N, input gradients 2N, recompute 2N;
//! attention and LoRA not counted), printed once per shape so GFLOP/s = tokens/s × 6N.
//!
//! Env (lavapipe does a few GFLOP/s): `BFPO_BENCH_QUICK=1` = 1 layer, T = 64, a 16384-token
//! vocabulary; or set `BFPO_BENCH_LAYERS`, `BFPO_BENCH_T`, `BFPO_BENCH_VOCAB` individually.
//! Run: `cargo bench --bench train_step`.

use bfpo_lite::data::Example;
use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::quantize;
use bfpo_lite::gpu::backward::{backward, forward_train};
use bfpo_lite::gpu::forward::{GpuLayer, GpuModel};
use bfpo_lite::gpu::ops::adamw::GpuAdamW;
use bfpo_lite::gpu::ops::lora::GpuLora;
use bfpo_lite::gpu::ops::matmul::GpuWeight;
use bfpo_lite::gpu::ops::rope::RopeConfig;
use bfpo_lite::gpu::{Gpu, test_device};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig, RopeKind};
use bfpo_lite::optim::AdamWConfig;
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

fn quick() -> bool {
    std::env::var_os("BFPO_BENCH_QUICK").is_some_and(|v| v != "0")
}

#[allow(clippy::too_many_arguments)]
fn config(
    arch: Arch,
    d: usize,
    ff: usize,
    layers: usize,
    n_head: usize,
    n_head_kv: usize,
    vocab: usize,
    rope_base: f32,
) -> ModelConfig {
    let (layers, vocab) = if quick() {
        (1, vocab.min(16_384))
    } else {
        (layers, vocab)
    };
    ModelConfig {
        arch,
        name: None,
        n_vocab: env_usize("BFPO_BENCH_VOCAB").unwrap_or(vocab),
        n_embd: d,
        n_layer: env_usize("BFPO_BENCH_LAYERS").unwrap_or(layers),
        n_head,
        n_head_kv,
        head_dim: d / n_head,
        n_ff: ff,
        n_ctx_train: 4096,
        rms_eps: 1e-6,
        rope_kind: if arch == Arch::Llama {
            RopeKind::Norm
        } else {
            RopeKind::Neox
        },
        rope_base,
        n_rot: d / n_head,
        rope_pos_scale: 1.0,
        rope_freqs: None,
        tied: true,
        qkv_bias: arch == Arch::Qwen2,
        qk_norm: false,
        gemma3: None,
    }
}

fn q8(gpu: &Gpu, name: &str, n_in: usize, n_out: usize, seed: u64) -> GpuWeight {
    let std = 1.0 / (n_in as f32).sqrt();
    let bytes = quantize(
        GgmlType::Q8_0,
        &Rng::new(seed).normal_vec(n_in * n_out, std),
    )
    .unwrap();
    GpuWeight::upload_raw(gpu, name, GgmlType::Q8_0, n_in, n_out, &bytes).unwrap()
}

/// A random Q8_0 model of `cfg`'s shape on the device.
fn synthetic_model(gpu: &Gpu, cfg: &ModelConfig) -> GpuModel {
    let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    let ones = |n: usize| gpu.upload("norm", &vec![1.0f32; n]).unwrap();
    let bias = |n: usize, seed: u64| {
        cfg.qkv_bias.then(|| {
            gpu.upload("bias", &Rng::new(seed).normal_vec(n, 0.1))
                .unwrap()
        })
    };
    // One layer's quantized bytes, uploaded once per layer (the work does not depend on values).
    let layer = |il: usize| GpuLayer {
        attn_norm: ones(d),
        q: q8(gpu, &format!("blk.{il}.attn_q"), d, q, 1),
        k: q8(gpu, &format!("blk.{il}.attn_k"), d, kv, 2),
        v: q8(gpu, &format!("blk.{il}.attn_v"), d, kv, 3),
        q_bias: bias(q, 4),
        k_bias: bias(kv, 5),
        v_bias: bias(kv, 6),
        q_norm: None,
        k_norm: None,
        o: q8(gpu, &format!("blk.{il}.attn_output"), q, d, 7),
        ffn_norm: ones(d),
        gate: q8(gpu, &format!("blk.{il}.ffn_gate"), d, ff, 8),
        up: q8(gpu, &format!("blk.{il}.ffn_up"), d, ff, 9),
        down: q8(gpu, &format!("blk.{il}.ffn_down"), ff, d, 10),
    };
    let rope = RopeConfig::from_model(cfg);
    let rope_table = rope.upload_table(gpu).unwrap();
    GpuModel {
        cfg: cfg.clone(),
        token_embd: q8(gpu, "token_embd", d, cfg.n_vocab, 11),
        output: None,
        output_norm: ones(d),
        output_bias: None,
        layers: (0..cfg.n_layer).map(layer).collect(),
        rope,
        rope_table,
    }
}

/// Matrix parameters per token's forward: layers + LM head.
fn n_matrix_params(cfg: &ModelConfig) -> usize {
    let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    cfg.n_layer * (d * q + 2 * d * kv + q * d + 3 * d * ff) + d * cfg.n_vocab
}

/// Process CPU seconds (user + system, all threads: lavapipe's workers run in this process).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One step (forward with checkpoints, backward, AdamW) on `examples`.
fn step(gpu: &Gpu, model: &GpuModel, lora: &GpuLora, opt: &mut GpuAdamW, examples: &[Example]) {
    let mut rec = gpu.recorder();
    lora.zero_grads(&mut rec);
    rec.submit();
    let (_seqs, state) = forward_train(model, gpu, examples, lora, None).unwrap();
    let w: Vec<f32> = (0..examples.len())
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    backward(model, gpu, state, &w, lora).unwrap();
    let mut rec = gpu.recorder();
    let params: Vec<_> = lora.tensors.iter().flat_map(|t| [&t.a, &t.b]).collect();
    let grads: Vec<_> = lora
        .tensors
        .iter()
        .flat_map(|t| [&t.grad_a, &t.grad_b])
        .collect();
    opt.record_step(gpu, &mut rec, &params, &grads, 1e-6, 1.0, Some(1.0))
        .unwrap();
    rec.submit();
    opt.finish_step(gpu).unwrap();
}

/// `BFPO_BENCH_SCALING=1`: step time of a SmolLM2-135M-shaped model (`BFPO_BENCH_LAYERS`, default
/// 2 layers; `BFPO_BENCH_VOCAB`, default 49152) with one pair, LoRA on ffn_down, against the
/// sequence length (128 → 1024, rank 16) and the rank (8 → 64, T = 256). Prints wall and CPU
/// seconds per step (the latter is what to compare on a loaded machine).
fn scaling(gpu: &Gpu) {
    let mut cfg = config(Arch::Llama, 576, 1536, 2, 9, 3, 49_152, 1e5);
    cfg.qkv_bias = false;
    let model = synthetic_model(gpu, &cfg);
    let run = |t: usize, rank: usize| {
        let spec = LoraSpec {
            targets: vec![Target::FfnDown],
            layers: (0..cfg.n_layer).collect(),
            rank,
            alpha: rank as f32,
            dropout: 0.0,
            seed: 1,
        };
        let lora = GpuLora::upload(gpu, &LoraWeights::random(&spec, &cfg, 0.01).unwrap()).unwrap();
        let sizes: Vec<usize> = lora
            .tensors
            .iter()
            .flat_map(|t| [lora.rank * t.n_in, t.n_out * lora.rank])
            .collect();
        let mut opt = GpuAdamW::new(gpu, AdamWConfig::default(), &sizes).unwrap();
        let mut rng = Rng::new(2);
        let examples: Vec<Example> = (0..2)
            .map(|_| Example {
                ids: (0..t)
                    .map(|_| rng.below(cfg.n_vocab as u64) as u32)
                    .collect(),
                response_start: t / 2,
            })
            .collect();
        step(gpu, &model, &lora, &mut opt, &examples); // warm-up
        let (w0, c0) = (std::time::Instant::now(), cpu_seconds());
        let n = 2;
        for _ in 0..n {
            step(gpu, &model, &lora, &mut opt, &examples);
        }
        let (wall, cpu) = (w0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "scaling L{} vocab {} T {t}x2 rank {rank}: {:.3} s wall/step, {:.3} s CPU/step",
            cfg.n_layer,
            cfg.n_vocab,
            wall / n as f64,
            cpu / n as f64
        );
    };
    for t in [128, 256, 512, 1024] {
        run(t, 16);
    }
    for rank in [8, 32, 64] {
        run(256, rank);
    }
}

fn bench_train_step(c: &mut Criterion) {
    let gpu = test_device();
    if std::env::var_os("BFPO_BENCH_SCALING").is_some() {
        scaling(&gpu);
        return;
    }
    let t = env_usize("BFPO_BENCH_T").unwrap_or(if quick() { 64 } else { 512 });
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    let shapes = [
        (
            "qwen2.5-0.5b",
            config(Arch::Qwen2, 896, 4864, 24, 14, 2, 151_936, 1e6),
        ),
        (
            "llama-3.2-1b",
            config(Arch::Llama, 2048, 8192, 16, 32, 8, 128_256, 5e5),
        ),
    ];
    for (name, cfg) in shapes {
        let model = synthetic_model(&gpu, &cfg);
        let spec = LoraSpec {
            targets: Target::ALL.to_vec(),
            layers: (0..cfg.n_layer).collect(),
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            seed: 1,
        };
        let lora = GpuLora::upload(&gpu, &LoraWeights::random(&spec, &cfg, 0.01).unwrap()).unwrap();
        let sizes: Vec<usize> = lora
            .tensors
            .iter()
            .flat_map(|t| [lora.rank * t.n_in, t.n_out * lora.rank])
            .collect();
        let mut opt = GpuAdamW::new(&gpu, AdamWConfig::default(), &sizes).unwrap();
        let mut rng = Rng::new(2);
        let examples: Vec<Example> = (0..2)
            .map(|_| Example {
                ids: (0..t)
                    .map(|_| rng.below(cfg.n_vocab as u64) as u32)
                    .collect(),
                response_start: (t / 4).max(1),
            })
            .collect();
        let n = n_matrix_params(&cfg);
        eprintln!(
            "train_step {name}: {} layers, T {t} × 2 sequences, vocab {}, N = {:.3e} matrix params, ≈ 6N = {:.3e} FLOP/token; GFLOP/s = tokens/s × {:.3e}",
            cfg.n_layer,
            cfg.n_vocab,
            n as f64,
            6.0 * n as f64,
            6.0 * n as f64 / 1e9
        );
        g.throughput(Throughput::Elements((2 * t) as u64));
        g.bench_function(
            BenchmarkId::new(name, format!("L{} T{t}x2 r16", cfg.n_layer)),
            |b| {
                b.iter(|| {
                    let mut rec = gpu.recorder();
                    lora.zero_grads(&mut rec);
                    rec.submit();
                    let (_seqs, state) =
                        forward_train(&model, &gpu, &examples, &lora, None).unwrap();
                    backward(&model, &gpu, state, &[1.0, -1.0], &lora).unwrap();
                    let mut rec = gpu.recorder();
                    let params: Vec<_> = lora.tensors.iter().flat_map(|t| [&t.a, &t.b]).collect();
                    let grads: Vec<_> = lora
                        .tensors
                        .iter()
                        .flat_map(|t| [&t.grad_a, &t.grad_b])
                        .collect();
                    opt.record_step(&gpu, &mut rec, &params, &grads, 1e-6, 1.0, Some(1.0))
                        .unwrap();
                    rec.submit();
                    opt.finish_step(&gpu).unwrap();
                })
            },
        );
    }
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
