// Input gradient of y = x·Wᵀ:  ∂L/∂x[t, i] = Σ_r ∂L/∂y[t, r]·W[r, i]   (dx = dy·W).
// (The weight gets no gradient: it is frozen; LoRA gradients live in lora_back.wgsl.)
//
// dx[t, i] = (accumulate ? dx[t, i] : 0) + Σ_{r ∈ [row0, row0 + n_rows)} dy[t, dy_col0 + r − row0]·W[r, i]
// for tokens [t0, t0 + n_tokens) and 8-element groups [g0, g0 + n_groups) of i. W (${WTYPE}) is
// dequantized in registers.
//
// Layout: a workgroup of 32 invocations owns 32 consecutive 8-element groups of i (invocation l
// takes group l: neighbouring invocations read neighbouring words of each weight row) and 16
// consecutive tokens. Every dequantized weight group is used for 16 tokens from registers, and
// the dy element of a (token, row) is the same address in every invocation (a broadcast). Each
// output is summed over r in increasing order: deterministic. Longer row ranges are split by the
// launcher into consecutive dispatches that accumulate in a fixed order. Out-of-range groups and
// tokens are clamped (the same control flow everywhere) and not written.
#include "matmul_back_common.wgsl"

@group(0) @binding(0) var<storage, read> dy: array<f32>;          // dy: [T, dy_stride] f32

fn dy8(d: u32, r: u32, k: u32) -> E8 {
    let o = d + r;
    return E8(vec4<f32>(dy[o], dy[o + 1u], dy[o + 2u], dy[o + 3u]),
              vec4<f32>(dy[o + 4u], dy[o + 5u], dy[o + 6u], dy[o + 7u]));
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    matmul_back_body(wg, lid, 0u);
}
