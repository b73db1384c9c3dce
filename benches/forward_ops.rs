//! Forward kernels at real model shapes (Qwen2.5-0.5B and Llama-3.2-1B, T = 512), one criterion
//! group per family, each iteration recorded, submitted and waited for (`gpu.sync`).
//!
//! Throughput: memory-bound kernels report bytes moved (criterion prints GB/s); attention and
//! the LM head report FLOPs as "elements" (criterion's elem/s = FLOP/s).
//!
//! `BFPO_BENCH_QUICK=1` shrinks T to 64 and the fused LM head to a 16384-row vocabulary slice
//! (lavapipe is a correctness device: a few GFLOP/s).
//! Run: `cargo bench --bench forward_ops`.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::attention::{AttnShape, attention};
use bfpo_lite::gpu::ops::embedding::embedding;
use bfpo_lite::gpu::ops::logprob::{LmHeadScratch, lm_head_logprobs, logprob_update};
use bfpo_lite::gpu::ops::matmul::GpuWeight;
use bfpo_lite::gpu::ops::rmsnorm::rmsnorm;
use bfpo_lite::gpu::ops::rope::{RopeConfig, rope_inplace};
use bfpo_lite::gpu::ops::swiglu::swiglu;
use bfpo_lite::gpu::test_device;
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::*;

fn bench_rmsnorm(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "rmsnorm");
    for s in &SHAPES {
        let x = random(&gpu, "x", t * s.d, 1);
        let w = random(&gpu, "w", s.d, 2);
        let y = gpu.alloc("y", (t * s.d * 4) as u64).unwrap();
        let r = gpu.alloc("rstd", (t * 4) as u64).unwrap();
        g.throughput(Throughput::Bytes((2 * t * s.d * 4) as u64));
        g.bench_function(BenchmarkId::new(s.name, format!("T{t}xd{}", s.d)), |b| {
            b.iter(|| {
                run(&gpu, |rec| {
                    rmsnorm(&gpu, rec, &x, &w, &y, &r, t, s.d, 1e-6).unwrap()
                })
            })
        });
    }
}

fn bench_rope(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "rope");
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
        let q = random(&gpu, "q", t * s.n_head * s.head_dim, 3);
        g.throughput(Throughput::Bytes(
            (2 * t * s.n_head * s.head_dim * 4) as u64,
        ));
        g.bench_function(
            BenchmarkId::new(s.name, format!("q T{t}x{}x{}", s.n_head, s.head_dim)),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        rope_inplace(&gpu, rec, &cfg, &table, &pos, &q, t, s.n_head, false).unwrap()
                    })
                })
            },
        );
    }
}

fn bench_attention(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "attention");
    for s in &SHAPES {
        let shape = AttnShape::new(1, t, s.n_head, s.n_head_kv, s.head_dim);
        let q = random(&gpu, "q", t * s.n_head * s.head_dim, 4);
        let k = random(&gpu, "k", t * s.n_head_kv * s.head_dim, 5);
        let v = random(&gpu, "v", t * s.n_head_kv * s.head_dim, 6);
        let lens = gpu.upload("lens", &[t as u32]).unwrap();
        let o = gpu
            .alloc("o", (t * s.n_head * s.head_dim * 4) as u64)
            .unwrap();
        let lse = gpu.alloc("lse", (t * s.n_head * 4) as u64).unwrap();
        // Causal: Σ_i (i + 1) key visits per head, 4·head_dim FLOPs each (q·k and p·v).
        let flops = (t * (t + 1) / 2 * s.n_head * s.head_dim * 4) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_function(
            BenchmarkId::new(
                s.name,
                format!("causal L{t} {}/{} heads", s.n_head, s.n_head_kv),
            ),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        attention(&gpu, rec, &shape, &q, &k, &v, &lens, &o, &lse).unwrap()
                    })
                })
            },
        );
    }
}

fn bench_swiglu(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "swiglu");
    for s in &SHAPES {
        let n = t * s.ff;
        let gate = random(&gpu, "gate", n, 7);
        let up = random(&gpu, "up", n, 8);
        let y = gpu.alloc("y", (n * 4) as u64).unwrap();
        g.throughput(Throughput::Bytes((3 * n * 4) as u64));
        g.bench_function(BenchmarkId::new(s.name, format!("T{t}xff{}", s.ff)), |b| {
            b.iter(|| run(&gpu, |rec| swiglu(&gpu, rec, &gate, &up, &y, n).unwrap()))
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

fn bench_embedding(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "embedding");
    for s in &SHAPES {
        let table = GpuWeight::upload_raw(
            &gpu,
            "token_embd",
            GgmlType::F16,
            s.d,
            s.vocab,
            &f16_table(s.vocab, s.d, 9),
        )
        .unwrap();
        let mut rng = Rng::new(10);
        let ids: Vec<u32> = (0..t).map(|_| rng.below(s.vocab as u64) as u32).collect();
        let ids = gpu.upload("ids", &ids).unwrap();
        let x = gpu.alloc("x", (t * s.d * 4) as u64).unwrap();
        g.throughput(Throughput::Bytes((t * s.d * (2 + 4)) as u64));
        g.bench_function(
            BenchmarkId::new(s.name, format!("F16 T{t}xd{}", s.d)),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        embedding(&gpu, rec, &table, &ids, &x, t).unwrap()
                    })
                })
            },
        );
    }
}

fn bench_logprob(c: &mut Criterion) {
    let gpu = test_device();
    let t = tokens();
    let mut g = configure(c, "logprob");
    for s in &SHAPES {
        // The merge kernel alone on one 64 MiB-budget chunk.
        let scratch = LmHeadScratch::new(&gpu, t, s.vocab, 64 << 20).unwrap();
        let cols = scratch.max_cols;
        let logits = random(&gpu, "logits", t * cols, 11);
        let mut rng = Rng::new(12);
        let targets: Vec<u32> = (0..t).map(|_| rng.below(cols as u64) as u32).collect();
        let targets = gpu.upload("targets", &targets).unwrap();
        let logp = gpu.alloc("logp", (t * 4) as u64).unwrap();
        let lse = gpu.alloc("lse", (t * 4) as u64).unwrap();
        g.throughput(Throughput::Bytes((t * cols * 4) as u64));
        g.bench_function(
            BenchmarkId::new(s.name, format!("merge T{t}x{cols}")),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        logprob_update(
                            &gpu,
                            rec,
                            &logits,
                            None,
                            &targets,
                            &scratch.state,
                            &logp,
                            &lse,
                            t,
                            0..cols,
                            true,
                            true,
                        )
                        .unwrap()
                    })
                })
            },
        );
        // The fused LM head (matmul chunks + merge), F16 weights, over the whole vocabulary (the
        // first 16384 rows with BFPO_BENCH_QUICK: lavapipe needs ~1 min per full-vocabulary pass).
        let vocab = if quick() { 16_384 } else { s.vocab };
        let w = GpuWeight::upload_raw(
            &gpu,
            "lm_head",
            GgmlType::F16,
            s.d,
            vocab,
            &f16_table(vocab, s.d, 13),
        )
        .unwrap();
        let x = random(&gpu, "x", t * s.d, 14);
        g.throughput(Throughput::Elements((2 * t * s.d * vocab) as u64));
        g.bench_function(
            BenchmarkId::new(s.name, format!("lm head F16 T{t}xV{vocab}")),
            |b| {
                b.iter(|| {
                    run(&gpu, |rec| {
                        lm_head_logprobs(
                            &gpu, rec, &x, &w, None, &targets, &scratch, &logp, &lse, t,
                        )
                        .unwrap()
                    })
                })
            },
        );
    }
}

criterion_group!(
    benches,
    bench_rmsnorm,
    bench_rope,
    bench_attention,
    bench_swiglu,
    bench_embedding,
    bench_logprob
);
criterion_main!(benches);
