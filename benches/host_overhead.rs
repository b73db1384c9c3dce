//! Host cost of recording and submitting GPU work, apart from the kernels: how many tiny
//! dispatches (a 64-element add) per second the host can record (`record`: build the bind
//! groups and params, then drop the recorder unsubmitted) and record + submit + wait for
//! (`submit`), in recorders of 64 dispatches (about one layer's worth). On a real GPU a
//! training step is ~1–2 thousand dispatches, so 10 µs per dispatch is 10–20 ms per step.
//! criterion's elem/s = dispatches per second.
//! Run: `cargo bench --bench host_overhead`.

use bfpo_lite::gpu::ops::add::add_inplace;
use bfpo_lite::gpu::test_device;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::*;

const PER_RECORDER: usize = 64;
const RECORDERS: usize = 16;

fn bench_overhead(c: &mut Criterion) {
    let gpu = test_device();
    let x = random(&gpu, "x", 64, 1);
    let y = random(&gpu, "y", 64, 2);
    let mut g = configure(c, "host_overhead");
    g.throughput(Throughput::Elements((PER_RECORDER * RECORDERS) as u64));
    g.bench_function("record", |b| {
        b.iter(|| {
            for _ in 0..RECORDERS {
                let mut rec = gpu.recorder();
                for _ in 0..PER_RECORDER {
                    add_inplace(&gpu, &mut rec, &x, &y, 64).unwrap();
                }
                std::hint::black_box(rec.len());
            }
        })
    });
    g.bench_function("submit", |b| {
        b.iter(|| {
            for _ in 0..RECORDERS {
                let mut rec = gpu.recorder();
                for _ in 0..PER_RECORDER {
                    add_inplace(&gpu, &mut rec, &x, &y, 64).unwrap();
                }
                rec.submit();
            }
            gpu.sync("bench").unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_overhead);
criterion_main!(benches);
