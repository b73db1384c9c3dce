//! The native CPU engine's products at real model shapes: `matmul_fwd` (quantized weights
//! dequantized in panels, y = x·Wᵀ) and `matmul_back` (dx = dy·W), against the machine's f32 GEMM
//! ceiling measured the same way (`gemm` crate on already-f32 matrices in its fastest layout, all
//! threads, one call).
//! Throughput is in flops (2·T·n_in·n_out), so criterion's "elem/s" reads as FLOP/s.
//!
//! Env: `BFPO_BENCH_T` (rows, default 512), `BFPO_BENCH_SECS` (measurement seconds, default 3),
//! `BFPO_BENCH_THREADS` (default: all cores). `cargo bench --bench cpu -- 'qwen0.5b'`.

use bfpo_lite::cpu::Mat;
use bfpo_lite::cpu::gemm::{QMat, matmul_back, matmul_fwd};
use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::quantize;
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

const SHAPES: &[(&str, usize, usize)] = &[
    ("smollm2_ffn_up", 576, 1536),
    ("smollm2_ffn_down", 1536, 576),
    ("qwen0.5b_ffn_up", 896, 4864),
    ("qwen0.5b_ffn_down", 4864, 896),
    ("llama1b_ffn_up", 2048, 8192),
];

const TYPES: &[GgmlType] = &[
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::F32,
];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(-0.5, 0.5)).collect()
}

fn bench(c: &mut Criterion) {
    let t = env("BFPO_BENCH_T", 512);
    let threads = env("BFPO_BENCH_THREADS", bfpo_lite::cpu::default_threads());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("cpu");
    g.measurement_time(Duration::from_secs(env("BFPO_BENCH_SECS", 3) as u64));
    g.sample_size(10);
    let mut rng = Rng::new(1);
    for &(label, n_in, n_out) in SHAPES {
        let flops = 2 * t as u64 * n_in as u64 * n_out as u64;
        g.throughput(Throughput::Elements(flops));
        let w = random(n_in * n_out, &mut rng);
        let mut x = Mat::zeros(t, n_in);
        x.data[..t * n_in].copy_from_slice(&random(t * n_in, &mut rng));
        let mut dy = Mat::zeros(t, n_out);
        dy.data[..t * n_out].copy_from_slice(&random(t * n_out, &mut rng));
        // The ceiling: one multi-threaded f32 GEMM of the same shape, with the weight already
        // f32 and laid out the way the crate runs fastest (row-major along the output: the
        // column-major layout runs at about half the speed for these shapes).
        let mut wt = vec![0f32; n_in * n_out];
        for o in 0..n_out {
            for c in 0..n_in {
                wt[c * n_out + o] = w[o * n_in + c];
            }
        }
        let mut y = vec![0f32; t * n_out];
        g.bench_function(
            BenchmarkId::new(format!("sgemm_f32_ceiling/{label}"), t),
            |b| {
                b.iter(|| unsafe {
                    gemm::gemm(
                        t,
                        n_out,
                        n_in,
                        y.as_mut_ptr(),
                        1,
                        n_out as isize,
                        false,
                        x.data.as_ptr(),
                        1,
                        n_in as isize,
                        wt.as_ptr(),
                        1,
                        n_out as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                })
            },
        );
        for &ty in TYPES {
            if n_in % ty.block_elems() != 0 {
                continue;
            }
            let bytes = quantize(ty, &w).unwrap();
            let q = QMat {
                ty,
                n_in,
                n_out,
                data: &bytes,
            };
            let mut ym = Mat::zeros(t, n_out);
            g.bench_function(BenchmarkId::new(format!("fwd/{ty}/{label}"), t), |b| {
                b.iter(|| pool.install(|| matmul_fwd(&q, &x, &mut ym, false)))
            });
            let mut dx = Mat::zeros(t, n_in);
            g.bench_function(BenchmarkId::new(format!("back/{ty}/{label}"), t), |b| {
                b.iter(|| pool.install(|| matmul_back(&q, &dy, &mut dx, false)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
