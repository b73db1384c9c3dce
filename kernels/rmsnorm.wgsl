// RMSNorm over the last dimension, one workgroup per row:
//   rstd[r] = 1 / sqrt(mean_i(x[r, i]²) + eps)
//   y[r, i] = x[r, i] · rstd[r] · w[i]
// rstd is kept for the backward pass. The sum of squares is a fixed-order tree reduction
// (deterministic). Also used per head for qwen3's Q/K norms (rows = T·n_head, dim = head_dim).
#include "common.wgsl"

struct Params {
    n_rows: u32,  // rows
    dim: u32,     // elements per row
    eps: f32,     // added to mean(x²) inside the square root
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;           // x: [n_rows, dim] f32
@group(0) @binding(1) var<storage, read> w: array<f32>;           // w: [dim] f32
@group(0) @binding(2) var<storage, read_write> y: array<f32>;     // y: [n_rows, dim] f32
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;  // rstd: [n_rows] f32
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = ${WG}u; // invocations per workgroup (a power of two; rmsnorm::norm_workgroup)
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = linear_id(wg, nwg);
    if (row >= p.n_rows) {
        return;
    }
    let base = row * p.dim;
    var s = 0.0;
    for (var i = li; i < p.dim; i += WG) {
        let v = x[base + i];
        s += v * v;
    }
    partial[li] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    let r = 1.0 / sqrt(partial[0] / f32(p.dim) + p.eps);
    for (var i = li; i < p.dim; i += WG) {
        y[base + i] = x[base + i] * r * w[i];
    }
    if (li == 0u) {
        rstd[row] = r;
    }
}
