// Backward of SwiGLU (kernels/swiglu.wgsl), in place: y = silu(g)·u, silu(z) = z·σ(z),
//   silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
//   dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))      (written over gate)
//   du = dy·silu(g) = dy·g·σ(g)             (written over up)
// Each invocation reads g and u before writing, so the forward values can be overwritten.
#include "common.wgsl"

struct Params {
    n: u32,  // elements (T · n_ff)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> dy: array<f32>;          // dy: [T, n_ff] f32
@group(0) @binding(1) var<storage, read_write> gate: array<f32>;  // gate: [T, n_ff] f32 in, dgate out
@group(0) @binding(2) var<storage, read_write> up: array<f32>;    // up: [T, n_ff] f32 in, dup out
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i < p.n) {
        let g = gate[i];
        let u = up[i];
        let d = dy[i];
        let sg = 1.0 / (1.0 + exp(-g));
        gate[i] = d * u * sg * (1.0 + g * (1.0 - sg));
        up[i] = d * g * sg;
    }
}
