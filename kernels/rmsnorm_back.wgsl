// Backward of RMSNorm (kernels/rmsnorm.wgsl) with respect to x (the weight w is frozen).
// Per row, with r = rstd[row] = (mean(x²) + eps)^(−1/2) from the forward and g_i = dy_i·w_i:
//   y_i = x_i·r·w_i,   ∂r/∂x_j = −r³·x_j / n
//   dx_j = r·g_j − (r³/n)·x_j·Σ_i g_i·x_i
// `accumulate` adds into dx (the residual stream's gradient) instead of overwriting it.
// One workgroup per row; Σ_i g_i·x_i is a fixed-order tree reduction (deterministic).
#include "common.wgsl"

struct Params {
    n_rows: u32,      // rows
    dim: u32,         // elements per row (n)
    accumulate: u32,  // 1: dx += …, 0: dx = …
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;        // x: [n_rows, dim] f32 (forward input)
@group(0) @binding(1) var<storage, read> w: array<f32>;        // w: [dim] f32
@group(0) @binding(2) var<storage, read> rstd: array<f32>;     // rstd: [n_rows] f32 (from the forward)
@group(0) @binding(3) var<storage, read> dy: array<f32>;       // dy: [n_rows, dim] f32
@group(0) @binding(4) var<storage, read_write> dx: array<f32>; // dx: [n_rows, dim] f32
@group(0) @binding(5) var<uniform> p: Params;

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
        s += dy[base + i] * w[i] * x[base + i];
    }
    partial[li] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    let r = rstd[row];
    let c = r * r * r / f32(p.dim) * partial[0];
    for (var i = li; i < p.dim; i += WG) {
        let v = r * dy[base + i] * w[i] - c * x[base + i];
        if (p.accumulate != 0u) {
            dx[base + i] += v;
        } else {
            dx[base + i] = v;
        }
    }
}
