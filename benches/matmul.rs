//! GPU matmul family at real model shapes: forward (`matmul`, LM head via `matmul_rows` in
//! vocabulary chunks) and backward-input, per weight type. Throughput is in flops
//! (2·T·n_in·n_out), so criterion's "elem/s" reads as FLOP/s. Every iteration records, submits and
//! waits for the GPU (an explicit device sync).
//!
//! Env: `BFPO_BENCH_T` (tokens, default 512; use 32–64 on lavapipe), `BFPO_BENCH_SECS`
//! (measurement seconds, default 5). Filter with criterion, e.g.
//! `cargo bench --bench matmul -- 'fwd/Q8_0'`.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::matmul::{
    GpuWeight, matmul, matmul_back_input, matmul_rows, matmul_rows_back_input,
};
use bfpo_lite::gpu::{Gpu, GpuBuf, test_device};
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

/// (label, n_in, n_out, is the LM head)
const SHAPES: &[(&str, usize, usize, bool)] = &[
    ("qwen0.5b_ffn_up", 896, 4864, false),
    ("qwen0.5b_ffn_down", 4864, 896, false),
    ("qwen0.5b_lm_head", 896, 151_936, true),
    ("llama1b_ffn_up", 2048, 8192, false),
    ("llama1b_ffn_down", 8192, 2048, false),
];

const TYPES: &[GgmlType] = &[GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16, GgmlType::F32];

/// Vocabulary rows per `matmul_rows` call for the LM head (keeps y under the binding limit).
const VOCAB_CHUNK: usize = 16_384;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raw bytes of an `[n_out, n_in]` weight: 64 distinct random rows, repeated (speed does not
/// depend on the values, and quantizing 136 M elements would dominate the run).
fn weight_bytes(ty: GgmlType, n_in: usize, n_out: usize) -> Vec<u8> {
    let distinct = 64.min(n_out);
    let vals = Rng::new(7).normal_vec(distinct * n_in, 1.0 / (n_in as f32).sqrt());
    let rows: Vec<u8> = match ty {
        GgmlType::F32 => bytemuck::cast_slice(&vals).to_vec(),
        GgmlType::F16 => vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => bfpo_lite::gguf::quant::quantize(ty, &vals).expect("quantize"),
    };
    let rb = ty.row_bytes(n_in).unwrap();
    let mut out = Vec::with_capacity(rb * n_out);
    while out.len() < rb * n_out {
        let take = (rb * n_out - out.len()).min(rows.len());
        out.extend_from_slice(&rows[..take]);
    }
    out
}

struct Case {
    w: GpuWeight,
    x: GpuBuf,
    y: GpuBuf,
    dy: GpuBuf,
    dx: GpuBuf,
}

fn forward(gpu: &Gpu, c: &Case, t: usize, lm_head: bool) {
    let mut rec = gpu.recorder();
    if lm_head {
        for start in (0..c.w.n_out).step_by(VOCAB_CHUNK) {
            let rows = start..(start + VOCAB_CHUNK).min(c.w.n_out);
            matmul_rows(gpu, &mut rec, &c.x, &c.w, rows, &c.y, t).unwrap();
        }
    } else {
        matmul(gpu, &mut rec, &c.x, &c.w, None, &c.y, t, false).unwrap();
    }
    rec.run("bench forward").unwrap();
}

fn backward(gpu: &Gpu, c: &Case, t: usize, lm_head: bool) {
    let mut rec = gpu.recorder();
    if lm_head {
        for (i, start) in (0..c.w.n_out).step_by(VOCAB_CHUNK).enumerate() {
            let rows = start..(start + VOCAB_CHUNK).min(c.w.n_out);
            matmul_rows_back_input(gpu, &mut rec, &c.dy, &c.w, rows, &c.dx, t, i > 0).unwrap();
        }
    } else {
        matmul_back_input(gpu, &mut rec, &c.dy, &c.w, &c.dx, t, false).unwrap();
    }
    rec.run("bench backward").unwrap();
}

fn bench(cr: &mut Criterion) {
    let gpu = test_device();
    let t = env_usize("BFPO_BENCH_T", 512);
    let secs = env_usize("BFPO_BENCH_SECS", 5) as u64;
    let mut g = cr.benchmark_group("matmul");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(secs));
    for &(label, n_in, n_out, lm_head) in SHAPES {
        for &ty in TYPES {
            if ty.row_bytes(n_in).is_none() || (lm_head && ty == GgmlType::F32) {
                continue; // K-quants need n_in % 256 == 0; an f32 LM head is not a real case
            }
            let id = format!("{label}_{n_in}x{n_out}_T{t}");
            let y_cols = if lm_head { VOCAB_CHUNK } else { n_out };
            // Built on first use, so a criterion filter skips the upload of unselected cases.
            let case: std::cell::OnceCell<Case> = std::cell::OnceCell::new();
            let make = || {
                let mut rng = Rng::new(1);
                let bytes = weight_bytes(ty, n_in, n_out);
                Case {
                    w: GpuWeight::upload_raw(&gpu, label, ty, n_in, n_out, &bytes).unwrap(),
                    x: gpu.upload("x", &rng.normal_vec(t * n_in, 1.0)).unwrap(),
                    y: gpu.alloc("y", (t * y_cols * 4) as u64).unwrap(),
                    dy: gpu.upload("dy", &rng.normal_vec(t * y_cols, 1.0)).unwrap(),
                    dx: gpu.alloc("dx", (t * n_in * 4) as u64).unwrap(),
                }
            };
            g.throughput(Throughput::Elements((2 * t * n_in * n_out) as u64));
            g.bench_function(BenchmarkId::new(format!("fwd/{ty}"), &id), |b| {
                let c = case.get_or_init(make);
                b.iter(|| forward(&gpu, c, t, lm_head))
            });
            g.bench_function(BenchmarkId::new(format!("back/{ty}"), &id), |b| {
                let c = case.get_or_init(make);
                b.iter(|| backward(&gpu, c, t, lm_head))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
