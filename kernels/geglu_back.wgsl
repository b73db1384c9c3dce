// Backward of GeGLU (kernels/geglu.wgsl), in place: y = gelu_tanh(g)·u,
//   t = tanh(c·(g + a·g³)), gelu_tanh(g) = ½·g·(1 + t),
//   gelu_tanh'(g) = ½·(1 + t) + ½·g·(1 − t²)·c·(1 + 3a·g²)
//   dg = dy·u·gelu_tanh'(g)        (written over gate)
//   du = dy·gelu_tanh(g)           (written over up)
// With s = ½·(1 + t) = σ(2·c·(g + a·g³)) and ½·(1 − t²) = 2·s·(1 − s) (as in the forward, no
// cancellation in 1 + t):  gelu_tanh(g) = g·s,  gelu_tanh'(g) = s + 2·g·s·(1 − s)·c·(1 + 3a·g²).
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

const GELU_C: f32 = 0.7978845608;
const GELU_A: f32 = 0.044715;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i < p.n) {
        let g = gate[i];
        let u = up[i];
        let d = dy[i];
        let s = 1.0 / (1.0 + exp(-2.0 * GELU_C * (g + GELU_A * g * g * g)));
        let grad = s + 2.0 * g * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * GELU_A * g * g);
        gate[i] = d * u * grad;
        up[i] = d * g * s;
    }
}
