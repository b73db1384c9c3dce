//! Backward kernels at real model shapes (Qwen2.5-0.5B and Llama-3.2-1B, T = 512), one criterion
//! group per family, each iteration recorded, submitted and waited for.
//!
//! Throughput: memory-bound kernels report bytes moved (criterion's B/s); attention and the LM
//! head report FLOPs as "elements" (criterion's elem/s = FLOP/s).
//!
//! `BFPO_BENCH_QUICK=1` shrinks T to 64 and the LM head to a 16384-row vocabulary slice
//! (lavapipe does a few GFLOP/s). Run: `cargo bench --bench backward`; the attention backward
//! alone (with SmolLM2-135M's 8 × 256-token batch): `cargo bench --bench backward -- attention_back`.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::attention::AttnShape;
use bfpo_lite::gpu::ops::attention_back::{
    AttnBackKernel, attention_backward, attention_backward_with,
};
use bfpo_lite::gpu::ops::logprob::LmHeadScratch;
use bfpo_lite::gpu::ops::logprob_back::lm_head_backward;
use bfpo_lite::gpu::ops::lora::{GpuLora, lora_backward, lora_forward};
use bfpo_lite::gpu::ops::matmul::GpuWeight;
use bfpo_lite::gpu::ops::rmsnorm_back::rmsnorm_backward;
use bfpo_lite::gpu::ops::rope::RopeConfig;
use bfpo_lite::gpu::ops::rope_back::rope_backward_inplace;
use bfpo_lite::gpu::ops::swiglu_back::swiglu_backward_inplace;
use bfpo_lite::gpu::test_device;
use bfpo_lite::model::lora::{LoraTensor, LoraWeights, Target};
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::*;

fn bench_rmsnorm_back(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "rmsnorm_back");
    for s in &SHAPES {
        let x = random(&gpu, "x", t * s.d, 1);
        let w = random(&gpu, "w", s.d, 2);
        let r = random(&gpu, "rstd", t, 3);
        let dy = random(&gpu, "dy", t * s.d, 4);
        let dx = gpu.alloc("dx", (t * s.d * 4) as u64).unwrap();
        // Reads x, dy, dx; writes dx (accumulate).
        g.throughput(Throughput::Bytes((4 * t * s.d * 4) as u64));
        g.bench_function(BenchmarkId::new(s.name, format!("T{t}xd{}", s.d)), |b| {
            b.iter(|| {
                run(&gpu, |rec| {
                    rmsnorm_backward(&gpu, rec, &x, &w, &r, &dy, &dx, t, s.d, true).unwrap()
                })
            })
        });
    }
}

fn bench_rope_back(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "rope_back");
    for s in &SHAPES {
        let cfg = RopeConfig {
            kind: s.rope,
            base: s.rope_base,
            n_rot: s.head_dim,
            head_dim: s.head_dim,
            pos_scale: 1.0,
            freqs: None,
        };
        let table = cfg.upload_table(&gpu).unwrap();
        let pos: Vec<u32> = (0..t as u32).collect();
        let pos = gpu.upload("pos", &pos).unwrap();
        let dq = random(&gpu, "dq", t * s.n_head * s.head_dim, 5);
        g.throughput(Throughput::Bytes(
            (2 * t * s.n_head * s.head_dim * 4) as u64,
        ));
        g.bench_function(
            BenchmarkId::new(s.name, format!("dq T{t}x{}x{}", s.n_head, s.head_dim)),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        rope_backward_inplace(&gpu, rec, &cfg, &table, &pos, &dq, t, s.n_head)
                            .unwrap()
                    })
                })
            },
        );
    }
}

fn bench_attention_back(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "attention_back");
    for s in &SHAPES {
        let shape = AttnShape::new(1, t, s.n_head, s.n_head_kv, s.head_dim);
        let (qn, kn) = (t * s.n_head * s.head_dim, t * s.n_head_kv * s.head_dim);
        let q = random(&gpu, "q", qn, 6);
        let k = random(&gpu, "k", kn, 7);
        let v = random(&gpu, "v", kn, 8);
        let o = random(&gpu, "o", qn, 9);
        let lse = gpu.upload("lse", &vec![10.0f32; t * s.n_head]).unwrap();
        let dout = random(&gpu, "dout", qn, 10);
        let lens = gpu.upload("lens", &[t as u32]).unwrap();
        let lsed = gpu.alloc("lsed", (t * s.n_head * 8) as u64).unwrap();
        let dq = gpu.alloc("dq", (qn * 4) as u64).unwrap();
        let dk = gpu.alloc("dk", (kn * 4) as u64).unwrap();
        let dv = gpu.alloc("dv", (kn * 4) as u64).unwrap();
        // Causal pairs Σ_i (i + 1) per head; the dq pass does q·k, dO·v, ds·k (6·hd FLOPs per
        // pair) and the dk/dv pass q·k, dO·v, ds·q, p·dO (8·hd): 14·hd per pair.
        let flops = (t * (t + 1) / 2 * s.n_head * s.head_dim * 14) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_function(
            BenchmarkId::new(
                s.name,
                format!("causal L{t} {}/{} heads", s.n_head, s.n_head_kv),
            ),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        attention_backward(
                            &gpu, rec, &shape, &q, &k, &v, &o, &lse, &dout, &lens, &lsed, &dq, &dk,
                            &dv,
                        )
                        .unwrap()
                    })
                })
            },
        );
    }
}

/// The attention backward at SmolLM2-135M's shape in a training batch: 8 sequences × 256 tokens,
/// 9 query heads / 3 KV heads of 64 (the same with or without `BFPO_BENCH_QUICK`), in both
/// forms of the kernel.
fn bench_attention_back_smollm2(c: &mut Criterion) {
    let gpu = test_device();
    let (n_seq, l, nh, nkv, hd) = (8, 256, 9, 3, 64);
    let t = n_seq * l;
    let mut g = configure(c, "attention_back");
    let shape = AttnShape::new(n_seq, l, nh, nkv, hd);
    let (qn, kn) = (t * nh * hd, t * nkv * hd);
    let q = random(&gpu, "q", qn, 6);
    let k = random(&gpu, "k", kn, 7);
    let v = random(&gpu, "v", kn, 8);
    let o = random(&gpu, "o", qn, 9);
    let lse = gpu.upload("lse", &vec![10.0f32; t * nh]).unwrap();
    let dout = random(&gpu, "dout", qn, 10);
    let lens = gpu.upload("lens", &vec![l as u32; n_seq]).unwrap();
    let lsed = gpu.alloc("lsed", (t * nh * 8) as u64).unwrap();
    let dq = gpu.alloc("dq", (qn * 4) as u64).unwrap();
    let dk = gpu.alloc("dk", (kn * 4) as u64).unwrap();
    let dv = gpu.alloc("dv", (kn * 4) as u64).unwrap();
    // As in `bench_attention_back`: 14·hd FLOPs per causal pair and head.
    let flops = (n_seq * l * (l + 1) / 2 * nh * hd * 14) as u64;
    g.throughput(Throughput::Elements(flops));
    // Both forms, whichever the adapter picks by default (`AttnBackKernel::for_gpu`).
    for kernel in [AttnBackKernel::Rows, AttnBackKernel::Tiled] {
        g.bench_function(
            BenchmarkId::new(
                "smollm2-135m",
                format!("{kernel:?} causal B{n_seq}xL{l} {nh}/{nkv} heads"),
            ),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        attention_backward_with(
                            &gpu,
                            rec,
                            &shape,
                            &q,
                            &k,
                            &v,
                            &o,
                            &lse,
                            &dout,
                            &lens,
                            &lsed,
                            &dq,
                            &dk,
                            &dv,
                            kernel,
                            usize::MAX,
                        )
                        .unwrap()
                    })
                })
            },
        );
    }
}

fn bench_swiglu_back(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "swiglu_back");
    for s in &SHAPES {
        let n = t * s.ff;
        let dy = random(&gpu, "dy", n, 11);
        let gate = random(&gpu, "gate", n, 12);
        let up = random(&gpu, "up", n, 13);
        // Reads dy, gate, up; writes gate, up. (Repeated runs differentiate their own output:
        // values change but the work does not.)
        g.throughput(Throughput::Bytes((5 * n * 4) as u64));
        g.bench_function(BenchmarkId::new(s.name, format!("T{t}xff{}", s.ff)), |b| {
            b.iter(|| {
                run(&gpu, |rec| {
                    swiglu_backward_inplace(&gpu, rec, &dy, &gate, &up, n).unwrap()
                })
            })
        });
    }
}

fn f16_table(n_rows: usize, d: usize, seed: u64) -> Vec<u8> {
    let v: Vec<half::f16> = Rng::new(seed)
        .normal_vec(n_rows * d, 0.02)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    bytemuck::cast_slice(&v).to_vec()
}

fn bench_lm_head_back(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "lm_head_back");
    for s in &SHAPES {
        let vocab = if quick() { 16_384 } else { s.vocab };
        let w = GpuWeight::upload_raw(
            &gpu,
            "lm_head",
            GgmlType::F16,
            s.d,
            vocab,
            &f16_table(vocab, s.d, 14),
        )
        .unwrap();
        let scratch = LmHeadScratch::new(&gpu, t, vocab, 64 << 20).unwrap();
        let x = random(&gpu, "x", t * s.d, 15);
        let mut rng = Rng::new(16);
        let targets: Vec<u32> = (0..t).map(|_| rng.below(vocab as u64) as u32).collect();
        let targets = gpu.upload("targets", &targets).unwrap();
        let lse = gpu.upload("lse", &vec![12.0f32; t]).unwrap();
        let roww = gpu.upload("roww", &vec![0.5f32; t]).unwrap();
        let dx = gpu.alloc("dx", (t * s.d * 4) as u64).unwrap();
        // Logits recompute (2·T·d·V) + dx = dlogits·W (2·T·d·V).
        g.throughput(Throughput::Elements((4 * t * s.d * vocab) as u64));
        g.bench_function(
            BenchmarkId::new(s.name, format!("F16 T{t}xV{vocab}")),
            |b| {
                b.iter(|| {
                    // Not through `run`: the LM head submits between vocabulary chunks, so its
                    // recorder must borrow this very device.
                    let mut rec = gpu.recorder();
                    lm_head_backward(
                        &gpu, &mut rec, &x, &w, None, &targets, &lse, &roww, &scratch, &dx, t,
                    )
                    .unwrap();
                    rec.run("bench").unwrap();
                })
            },
        );
    }
}

/// LoRA forward (`u = A·x`, `y += s·u·Bᵀ`) and backward (`grad_b`, `du`, `grad_a`, `dx`) on
/// one adapted projection. Always SmolLM2-135M's ffn_down (T = 1024 = 8 sequences of 128 tokens,
/// 1536 → 576, rank 16; T = 128 with `BFPO_BENCH_QUICK`); `BFPO_BENCH_LORA_LARGE=1` adds
/// GPU-sized shapes (T = 4096, rank 16 and 64, up to Llama-3.2-1B's 8192 → 2048). Throughput is
/// FLOPs (forward 2·T·r·(n_in + n_out), backward twice that) as "elements".
/// Run: `cargo bench --bench backward -- lora`.
fn bench_lora(c: &mut Criterion) {
    let gpu = test_device();
    let mut shapes = vec![(
        "smollm2-135m ffn_down",
        if quick() { 128 } else { 1024 },
        1536,
        576,
        16,
    )];
    if std::env::var_os("BFPO_BENCH_LORA_LARGE").is_some_and(|v| v != "0") {
        shapes.extend([
            ("smollm2-135m ffn_down", 4096, 1536, 576, 16),
            ("smollm2-135m ffn_down", 4096, 1536, 576, 64),
            ("llama-3.2-1b ffn_down", 4096, 8192, 2048, 16),
            ("llama-3.2-1b ffn_up", 4096, 2048, 8192, 16),
        ]);
    }
    let mut g = configure(c, "lora");
    for (name, t, n_in, n_out, rank) in shapes {
        let mut rng = Rng::new(21);
        let lw = LoraWeights {
            rank,
            alpha: rank as f32,
            tensors: vec![LoraTensor {
                layer: 0,
                target: Target::FfnDown,
                n_in,
                n_out,
                a: rng.normal_vec(rank * n_in, 1.0 / (n_in as f32).sqrt()),
                b: rng.normal_vec(n_out * rank, 1.0 / (rank as f32).sqrt()),
            }],
        };
        let gl = GpuLora::upload(&gpu, &lw).unwrap();
        let lt = &gl.tensors[0];
        let s = gl.scale();
        let x = random(&gpu, "x", t * n_in, 22);
        let y = random(&gpu, "y", t * n_out, 23);
        let dy = random(&gpu, "dy", t * n_out, 24);
        let dx = random(&gpu, "dx", t * n_in, 25);
        let u = gpu.alloc("u", (t * rank * 4) as u64).unwrap();
        let du = gpu.alloc("du", (t * rank * 4) as u64).unwrap();
        let flops = (2 * t * rank * (n_in + n_out)) as u64;
        let id = format!("T{t} {n_in}x{n_out} r{rank}");
        g.throughput(Throughput::Elements(flops));
        g.bench_function(BenchmarkId::new(format!("{name} fwd"), &id), |b| {
            b.iter(|| {
                run(&gpu, |rec| {
                    lora_forward(&gpu, rec, lt, rank, s, &x, &u, &y, t).unwrap()
                })
            })
        });
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(BenchmarkId::new(format!("{name} bwd"), &id), |b| {
            b.iter(|| {
                run(&gpu, |rec| {
                    lora_backward(&gpu, rec, lt, rank, s, &x, &u, &dy, &du, &dx, t).unwrap()
                })
            })
        });
    }
}

criterion_group!(
    benches,
    bench_lora,
    bench_rmsnorm_back,
    bench_rope_back,
    bench_attention_back,
    bench_attention_back_smollm2,
    bench_swiglu_back,
    bench_lm_head_back
);
criterion_main!(benches);
