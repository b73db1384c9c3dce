// Attention backward, step 1 of 3 (see attention_back.wgsl): per (row t, query head h)
//   D[t, h] = Σ_j P[t, j]·(dO[t]·V_j) = dO[t]·O[t]      (since O[t] = Σ_j P[t, j]·V_j)
// packed with the forward's log-sum-exp as lsed[t, h] = (lse[t, h], D[t, h]) for the next steps.
#include "common.wgsl"

struct Params {
    n: u32,    // rows × heads (T · n_head)
    hd4: u32,  // head_dim / 4
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> o: array<vec4<f32>>;         // o: [T, n_head, head_dim] f32 (forward output)
@group(0) @binding(1) var<storage, read> dout: array<vec4<f32>>;      // dout: [T, n_head, head_dim] f32
@group(0) @binding(2) var<storage, read> lse: array<f32>;             // lse: [T, n_head] f32 (forward)
@group(0) @binding(3) var<storage, read_write> lsed: array<vec2<f32>>; // lsed: [T, n_head] (lse, D)
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg) * 256u + li;
    if (g >= p.n) {
        return;
    }
    var s4 = vec4<f32>(0.0);
    for (var d = 0u; d < p.hd4; d++) {
        s4 += o[g * p.hd4 + d] * dout[g * p.hd4 + d];
    }
    lsed[g] = vec2<f32>(lse[g], (s4.x + s4.y) + (s4.z + s4.w));
}
