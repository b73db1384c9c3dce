// The second pass of the LoRA weight gradients (lora_back.wgsl): G[i] += alpha·Σ_{c < n} S_c[i]
// for i < size, the partials S_c of consecutive token chunks at c·size, added in chunk order
// (deterministic: no atomics, a fixed order). One invocation per element of G.

struct Params {
    size: u32,  // elements of G
    n: u32,     // partials
    alpha: f32, // scale
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> part: array<f32>;    // [n, size] f32
@group(0) @binding(1) var<storage, read_write> g: array<f32>; // [size] f32, accumulated
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.size) {
        return;
    }
    var s = 0.0;
    for (var c = 0u; c < p.n; c++) {
        s += part[c * p.size + i];
    }
    g[i] = g[i] + p.alpha * s;
}
