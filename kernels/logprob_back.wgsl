// Backward of the LM-head log-prob (kernels/logprob.wgsl) for one vocabulary chunk, in place on
// the recomputed logits chunk. For row n with target t_n, seed weight w_n (the weight of the
// row's sequence) and z = logits + bias:
//   logp_n = z_{t_n} − lse_n,   lse_n = ln Σ_c exp(z_c)   (lse from the forward pass)
//   ∂(w_n·logp_n)/∂z_c = w_n·(onehot(t_n)_c − exp(z_c − lse_n))
// The caller then adds dlogits·W[chunk] into the gradient of the normed hidden rows.
#include "common.wgsl"

struct Params {
    n_rows: u32,     // rows N
    n_cols: u32,     // columns in this chunk (row stride of `logits`)
    col_start: u32,  // vocabulary index of chunk column 0
    has_bias: u32,   // 1: add bias[col_start + c]
}

@group(0) @binding(0) var<storage, read> bias: array<f32>;          // bias: [V] f32 (unused when has_bias = 0)
@group(0) @binding(1) var<storage, read> targets: array<u32>;       // targets: [N] u32 vocabulary ids
@group(0) @binding(2) var<storage, read> lse: array<f32>;           // lse: [N] f32 (forward)
@group(0) @binding(3) var<storage, read> roww: array<f32>;          // roww: [N] f32 seed weight per row
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;  // logits: [N, n_cols] f32 in, dlogits out
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg) * 256u + li;
    if (g >= p.n_rows * p.n_cols) {
        return;
    }
    let row = g / p.n_cols;
    let c = g % p.n_cols;
    var z = logits[g];
    if (p.has_bias != 0u) {
        z += bias[p.col_start + c];
    }
    var onehot = 0.0;
    if (targets[row] == p.col_start + c) {
        onehot = 1.0;
    }
    logits[g] = roww[row] * (onehot - exp(z - lse[row]));
}
