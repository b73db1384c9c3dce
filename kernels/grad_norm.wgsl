// Global gradient norm for clipping, deterministic (fixed-order sums, no atomics), two passes:
//   partial: workgroup w sums the squares of x[w·4096 .. (w+1)·4096) → out[slot + w]
//            (thread l adds x[base + l + 256·j], j = 0..15, in order; then a fixed tree)
//   finish:  one workgroup sums x = partials[0 .. n) (thread l adds x[l + 256·j] in order; tree)
//            → out[0] = Σ g², out[1] = clip factor
//            factor = min(1, max_norm / (sqrt(Σ g²) + 1e-6)) when max_norm > 0 (PyTorch), else 1;
//            a non-finite Σ g² gives factor 0, and the AdamW kernel skips its update.
// CPU reference: `train::optim::{global_norm, clip_factor}` (f64).
#include "common.wgsl"

const WG: u32 = 256u;
const PER_THREAD: u32 = 16u; // WG · PER_THREAD = 4096 = gpu::memory::NORM_CHUNK

struct Params {
    n: u32,         // partial: elements of x; finish: number of partials
    slot: u32,      // partial: index in `out` of this dispatch's first partial
    max_norm: f32,  // finish: clip threshold in gradient-norm units (≤ 0: no clipping)
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;         // partial: grads [n]; finish: partials [n]
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // partial: partials; finish: [2]
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> acc: array<f32, 256>;

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// Sums acc[0..256) into acc[0] in a fixed order.
fn tree(li: u32) {
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            acc[li] = acc[li] + acc[li + stride];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let w = linear_id(wg, nwg);
    let base = w * WG * PER_THREAD;
    if (base >= p.n) {
        return; // surplus workgroup of a 2-D split (uniform per workgroup)
    }
    var s = 0.0;
    for (var j = 0u; j < PER_THREAD; j = j + 1u) {
        let i = base + j * WG + li;
        if (i < p.n) {
            let g = x[i];
            s = s + g * g;
        }
    }
    acc[li] = s;
    tree(li);
    if (li == 0u) {
        out[p.slot + w] = acc[0];
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) li: u32) {
    var s = 0.0;
    for (var i = li; i < p.n; i = i + WG) {
        s = s + x[i];
    }
    acc[li] = s;
    tree(li);
    if (li == 0u) {
        let total = acc[0];
        var factor = 1.0;
        if (!is_finite(total)) {
            factor = 0.0;
        } else if (p.max_norm > 0.0) {
            factor = min(1.0, p.max_norm / (sqrt(total) + 1e-6));
        }
        out[0] = total;
        out[1] = factor;
    }
}
