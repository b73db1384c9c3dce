//! CPU dequantize / quantize throughput at a real model shape (Qwen2.5-0.5B `ffn_down` is
//! 4864 × 896; `ffn_up`/`gate` are 896 × 4864: the same 4.36 M elements).

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::{dequantize, quantize};
use bfpo_lite::util::Rng;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const N: usize = 896 * 4864;

fn bench(c: &mut Criterion) {
    let x = Rng::new(1).normal_vec(N, 0.02);
    let mut g = c.benchmark_group("quant_896x4864");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    for ty in GgmlType::ALL {
        let q = quantize(ty, &x).expect("quantize");
        let mut out = vec![0.0f32; N];
        g.bench_function(format!("dequantize/{ty}"), |b| {
            b.iter(|| dequantize(ty, std::hint::black_box(&q), &mut out).unwrap())
        });
        g.bench_function(format!("quantize/{ty}"), |b| {
            b.iter(|| quantize(ty, std::hint::black_box(&x)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
