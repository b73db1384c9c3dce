// Residual add, in place: x[i] += y[i] for i < n.
// Backward: dL/dx passes through unchanged and dL/dy = dL/dx, so no backward kernel is needed.
#include "common.wgsl"

struct Params {
    n: u32,     // elements
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> y: array<f32>;        // y: [n] f32
@group(0) @binding(1) var<storage, read_write> x: array<f32>;  // x: [n] f32, updated in place
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i < p.n) {
        x[i] = x[i] + y[i];
    }
}
