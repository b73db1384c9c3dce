// Scatter rows: dst[rows[n], :] = src[n, :] for n < n_rows (the transpose of gather_rows.wgsl,
// used to route the gradient of the scored rows back into the [T, d] residual stream). `rows`
// holds distinct indices, so no two invocations write the same element; dst rows not listed
// keep their contents (the caller zeroes dst first).
#include "common.wgsl"

struct Params {
    n_rows: u32,  // rows N of src
    dim: u32,     // elements per row
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;        // src: [N, dim] f32
@group(0) @binding(1) var<storage, read> rows: array<u32>;       // rows: [N] u32 distinct dst rows
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;  // dst: [T, dim] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg) * 256u + li;
    if (g >= p.n_rows * p.dim) {
        return;
    }
    let n = g / p.dim;
    let i = g % p.dim;
    dst[rows[n] * p.dim + i] = src[g];
}
