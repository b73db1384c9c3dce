// GeGLU (gemma3): y[i] = gelu_tanh(gate[i]) · up[i] for i < n, with the tanh approximation
//   gelu_tanh(z) = ½·z·(1 + tanh(c·(z + a·z³))), c = √(2/π), a = 0.044715.
// Computed as z·σ(2w), w = c·(z + a·z³), since ½·(1 + tanh w) = σ(2w): no cancellation in
// 1 + tanh w for negative z (a GPU tanh may round to exactly −1 there), and exp overflowing to
// +inf for very negative z gives the exact limit 0 (no NaN).
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

const GELU_C: f32 = 0.7978845608;
const GELU_A: f32 = 0.044715;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i < p.n) {
        let z = gate[i];
        let s = 1.0 / (1.0 + exp(-2.0 * GELU_C * (z + GELU_A * z * z * z)));
        y[i] = z * s * up[i];
    }
}
