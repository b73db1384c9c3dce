// Embedding gather with dequantization: for each token t whose id falls in this weight chunk,
//   x[t, :] = dequant(table row ids[t])
// The table is a GpuWeight chunk (raw GGUF rows of n_embd elements, type ${WTYPE}); tokens whose
// id is in another chunk are left untouched (the launcher dispatches once per chunk).
// One invocation per (token, group of 8 elements), decoding with dequant.wgsl.
#include "common.wgsl"
#include "dequant.wgsl"

struct Params {
    n_tokens: u32,   // tokens T
    n_embd: u32,     // elements per row (multiple of 8)
    row_bytes: u32,  // bytes per table row
    row_start: u32,  // vocabulary id of this chunk's first row
    n_rows: u32,     // rows in this chunk
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;            // ids: [T] u32
@group(0) @binding(1) var<storage, read> wq: array<u32>;             // table chunk: raw GGUF rows
@group(0) @binding(2) var<storage, read_write> x: array<vec4<f32>>;  // x: [T, n_embd] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let n_groups = p.n_embd / 8u;
    let gi = linear_id(wg, nwg) * 256u + li;
    if (gi >= p.n_tokens * n_groups) {
        return;
    }
    let t = gi / n_groups;
    let g = gi % n_groups;
    let id = ids[t];
    if (id < p.row_start || id - p.row_start >= p.n_rows) {
        return;
    }
    let w = dq8_${WTYPE}((id - p.row_start) * p.row_bytes, g);
    x[2u * gi] = w.lo;
    x[2u * gi + 1u] = w.hi;
}
