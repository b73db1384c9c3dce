//! GPU matmul family at real model shapes: forward (`matmul`, LM head via `matmul_rows` in
//! vocabulary chunks) and backward-input, per weight type. Throughput is in flops
//! (2·T·n_in·n_out), so criterion's "elem/s" reads as FLOP/s. Every iteration records, submits and
//! waits for the GPU (an explicit device sync).
//!
//! Env: `BFPO_BENCH_T` (tokens, default 512; use 32–64 on lavapipe), `BFPO_BENCH_SECS`
//! (measurement seconds, default 5). Filter with criterion, e.g.
//! `cargo bench --bench matmul -- 'fwd/Q8_0'`. `BFPO_BENCH_ITERS=N` (with `BFPO_BENCH_FILTER`)
//! skips criterion and prints GFLOP/s per wall second and per CPU second (see `manual`).
//! `BFPO_BENCH_SPLITK` picks the forward's split over n_in: `auto` (default, what `matmul`
//! does on this device), `off` (one pass), or a K-chunk length in elements (e.g. `256`).

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::matmul::{
    GpuWeight, SplitK, matmul_back_input, matmul_rows, matmul_rows_back_input, matmul_split,
};
use bfpo_lite::gpu::{Gpu, GpuBuf, test_device};
use bfpo_lite::util::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

/// (label, n_in, n_out, is the LM head)
const SHAPES: &[(&str, usize, usize, bool)] = &[
    ("smollm2_ffn_up", 576, 1536, false),
    ("smollm2_ffn_down", 1536, 576, false),
    ("qwen0.5b_ffn_up", 896, 4864, false),
    ("qwen0.5b_ffn_down", 4864, 896, false),
    ("qwen0.5b_lm_head", 896, 151_936, true),
    ("llama1b_ffn_up", 2048, 8192, false),
    ("llama1b_ffn_down", 8192, 2048, false),
];

const TYPES: &[GgmlType] = &[
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::F16,
    GgmlType::F32,
];

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

/// `BFPO_BENCH_SPLITK`: `auto` (default), `off`, or a K-chunk length in elements.
fn split_k() -> SplitK {
    match std::env::var("BFPO_BENCH_SPLITK").as_deref() {
        Err(_) | Ok("auto") | Ok("") => SplitK::Auto,
        Ok("off") => SplitK::Never,
        Ok(v) => SplitK::Chunk(v.parse().expect("BFPO_BENCH_SPLITK: auto, off or a number")),
    }
}

fn forward(gpu: &Gpu, c: &Case, t: usize, lm_head: bool) {
    let mut rec = gpu.recorder();
    if lm_head {
        for start in (0..c.w.n_out).step_by(VOCAB_CHUNK) {
            let rows = start..(start + VOCAB_CHUNK).min(c.w.n_out);
            matmul_rows(gpu, &mut rec, &c.x, &c.w, rows, &c.y, t).unwrap();
        }
    } else {
        matmul_split(gpu, &mut rec, &c.x, &c.w, None, &c.y, t, false, split_k()).unwrap();
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

/// Process CPU seconds (user + system, all threads: lavapipe's workers run in this process).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15) at 100 ticks/s
}

/// `BFPO_BENCH_ITERS=N`: instead of criterion, runs each case whose id contains
/// `BFPO_BENCH_FILTER` N times and prints GFLOP/s per wall second and per CPU second (the latter
/// is what to compare on a loaded machine; on lavapipe it is per core).
fn manual(gpu: &Gpu, t: usize, iters: usize) {
    let filter = std::env::var("BFPO_BENCH_FILTER").unwrap_or_default();
    for &(label, n_in, n_out, lm_head) in SHAPES {
        for &ty in TYPES {
            if ty.row_bytes(n_in).is_none() || (lm_head && ty == GgmlType::F32) {
                continue;
            }
            for dir in ["fwd", "back"] {
                let id = format!("{dir}/{ty}/{label}_{n_in}x{n_out}_T{t}");
                if !id.contains(&filter) {
                    continue;
                }
                let y_cols = if lm_head { VOCAB_CHUNK } else { n_out };
                let mut rng = Rng::new(1);
                let bytes = weight_bytes(ty, n_in, n_out);
                let c = Case {
                    w: GpuWeight::upload_raw(gpu, label, ty, n_in, n_out, &bytes).unwrap(),
                    x: gpu.upload("x", &rng.normal_vec(t * n_in, 1.0)).unwrap(),
                    y: gpu.alloc("y", (t * y_cols * 4) as u64).unwrap(),
                    dy: gpu.upload("dy", &rng.normal_vec(t * y_cols, 1.0)).unwrap(),
                    dx: gpu.alloc("dx", (t * n_in * 4) as u64).unwrap(),
                };
                let run = |c: &Case| {
                    if dir == "fwd" {
                        forward(gpu, c, t, lm_head)
                    } else {
                        backward(gpu, c, t, lm_head)
                    }
                };
                run(&c); // warm-up: pipeline compilation
                let (w0, c0) = (std::time::Instant::now(), cpu_seconds());
                for _ in 0..iters {
                    run(&c);
                }
                let (wall, cpu) = (w0.elapsed().as_secs_f64(), cpu_seconds() - c0);
                let gflop = (2 * t * n_in * n_out * iters) as f64 * 1e-9;
                println!(
                    "{id}: {:.2} GFLOP/s wall, {:.2} GFLOP/s per CPU-second ({iters} runs, {wall:.2} s wall, {cpu:.2} s CPU)",
                    gflop / wall,
                    gflop / cpu.max(1e-9)
                );
            }
        }
    }
}

fn bench(cr: &mut Criterion) {
    let gpu = test_device();
    let t = env_usize("BFPO_BENCH_T", 512);
    if let Ok(n) = std::env::var("BFPO_BENCH_ITERS") {
        manual(&gpu, t, n.parse().unwrap_or(3));
        return;
    }
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
