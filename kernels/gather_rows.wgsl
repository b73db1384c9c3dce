// Row gather of an f32 matrix: y[n, :] = x[rows[n], :] for n < n_out (e.g. the hidden states of
// the rows whose next token is scored, before the final norm and the LM head).
#include "common.wgsl"

struct Params {
    n_out: u32,  // rows gathered
    dim: u32,    // elements per row
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;          // x: [T, dim] f32
@group(0) @binding(1) var<storage, read> rows: array<u32>;       // rows: [n_out] u32, each < T
@group(0) @binding(2) var<storage, read_write> y: array<f32>;    // y: [n_out, dim] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i >= p.n_out * p.dim) {
        return;
    }
    let n = i / p.dim;
    let c = i % p.dim;
    y[i] = x[rows[n] * p.dim + c];
}
