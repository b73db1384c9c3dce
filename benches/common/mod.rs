//! Shared by the GPU kernel benches: real model shapes, the token count, random inputs, and a
//! criterion group set up for slow devices (lavapipe).
#![allow(dead_code)]

use bfpo_lite::gpu::{Gpu, GpuBuf, Recorder};
use bfpo_lite::model::RopeKind;
use bfpo_lite::util::Rng;
use criterion::Criterion;
use std::time::Duration;

pub struct Shape {
    pub name: &'static str,
    pub d: usize,
    pub ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_base: f32,
    pub rope: RopeKind,
}

pub const SHAPES: [Shape; 2] = [
    Shape {
        name: "qwen2.5-0.5b",
        d: 896,
        ff: 4864,
        n_head: 14,
        n_head_kv: 2,
        head_dim: 64,
        vocab: 151_936,
        rope_base: 1_000_000.0,
        rope: RopeKind::Neox,
    },
    Shape {
        name: "llama-3.2-1b",
        d: 2048,
        ff: 8192,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 64,
        vocab: 128_256,
        rope_base: 500_000.0,
        rope: RopeKind::Norm,
    },
];

pub fn quick() -> bool {
    std::env::var_os("BFPO_BENCH_QUICK").is_some_and(|v| v != "0")
}

pub fn tokens() -> usize {
    if quick() { 64 } else { 512 }
}

pub fn random(gpu: &Gpu, label: &str, n: usize, seed: u64) -> GpuBuf {
    gpu.upload(label, &Rng::new(seed).normal_vec(n, 1.0))
        .unwrap()
}

/// Records with `f`, submits and waits.
pub fn run<'g>(gpu: &'g Gpu, f: impl FnOnce(&mut Recorder<'g>)) {
    let mut rec = gpu.recorder();
    f(&mut rec);
    rec.run("bench").unwrap();
}

pub fn configure<'c>(
    c: &'c mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    g
}
