// SwiGLU: y[i] = silu(gate[i]) · up[i], silu(z) = z·σ(z) = z / (1 + e^(−z)), for i < n.
// (For z → −∞, e^(−z) overflows to +inf and z / inf = −0: the correct limit.)
#include "common.wgsl"

struct Params {
    n: u32,  // elements (T · n_ff)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> gate: array<f32>;     // gate: [T, n_ff] f32
@group(0) @binding(1) var<storage, read> up: array<f32>;       // up: [T, n_ff] f32
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // y: [T, n_ff] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i < p.n) {
        let z = gate[i];
        y[i] = z / (1.0 + exp(-z)) * up[i];
    }
}
