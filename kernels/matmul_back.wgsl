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
#include "dequant.wgsl"

struct Params {
    n_in: u32,      // elements per weight row (multiple of 8) = row length of dx
    row_bytes: u32, // bytes per weight row
    row0: u32,      // first weight row, relative to the chunk buffer
    n_rows: u32,    // weight rows summed by this dispatch
    t0: u32,        // first token
    n_tokens: u32,  // tokens in this dispatch
    dy_stride: u32, // elements per row of dy
    dy_col0: u32,   // dy column of row0
    g0: u32,        // first 8-element group of i
    n_groups: u32,  // 8-element groups in this dispatch
    flags: u32,     // bit 0: accumulate into dx
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> dy: array<f32>;          // dy: [T, dy_stride] f32
@group(0) @binding(1) var<storage, read> wq: array<u32>;          // W chunk: raw GGUF rows
@group(0) @binding(2) var<storage, read_write> dx: array<vec4<f32>>; // dx: [T, n_in] f32
@group(0) @binding(3) var<uniform> p: Params;

// Accumulators of 8 consecutive i for one token.
struct Acc {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn add(a: Acc, d: f32, w: W8) -> Acc {
    return Acc(a.lo + d * w.lo, a.hi + d * w.hi);
}

// Writes (or adds) token t's 8 values of group g, if t is in range.
fn store(t: u32, g: u32, a: Acc) {
    if (t >= p.n_tokens) {
        return;
    }
    let o = (p.t0 + t) * (p.n_in / 4u) + 2u * g;
    if ((p.flags & 1u) != 0u) {
        dx[o] = dx[o] + a.lo;
        dx[o + 1u] = dx[o + 1u] + a.hi;
    } else {
        dx[o] = a.lo;
        dx[o + 1u] = a.hi;
    }
}

// dy offset of token t + k (clamped to the last token), at row0's column.
fn dyrow(t: u32, k: u32) -> u32 {
    return (p.t0 + min(t + k, p.n_tokens - 1u)) * p.dy_stride + p.dy_col0;
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let gl = wg.x * 32u + lid.x;                // relative to g0
    let g = p.g0 + min(gl, p.n_groups - 1u);
    let t = wg.y * 16u;                         // tokens t .. t + 15, relative to t0
    let d0 = dyrow(t, 0u); let d1 = dyrow(t, 1u); let d2 = dyrow(t, 2u); let d3 = dyrow(t, 3u);
    let d4 = dyrow(t, 4u); let d5 = dyrow(t, 5u); let d6 = dyrow(t, 6u); let d7 = dyrow(t, 7u);
    let d8 = dyrow(t, 8u); let d9 = dyrow(t, 9u); let d10 = dyrow(t, 10u); let d11 = dyrow(t, 11u);
    let d12 = dyrow(t, 12u); let d13 = dyrow(t, 13u); let d14 = dyrow(t, 14u); let d15 = dyrow(t, 15u);
    let z = Acc(vec4<f32>(0.0), vec4<f32>(0.0));
    var a0 = z; var a1 = z; var a2 = z; var a3 = z; var a4 = z; var a5 = z; var a6 = z; var a7 = z;
    var a8 = z; var a9 = z; var a10 = z; var a11 = z; var a12 = z; var a13 = z; var a14 = z; var a15 = z;
    var base = p.row0 * p.row_bytes;
    for (var r = 0u; r < p.n_rows; r++) {
        let w = dq8_${WTYPE}(base, g);
        a0 = add(a0, dy[d0 + r], w); a1 = add(a1, dy[d1 + r], w);
        a2 = add(a2, dy[d2 + r], w); a3 = add(a3, dy[d3 + r], w);
        a4 = add(a4, dy[d4 + r], w); a5 = add(a5, dy[d5 + r], w);
        a6 = add(a6, dy[d6 + r], w); a7 = add(a7, dy[d7 + r], w);
        a8 = add(a8, dy[d8 + r], w); a9 = add(a9, dy[d9 + r], w);
        a10 = add(a10, dy[d10 + r], w); a11 = add(a11, dy[d11 + r], w);
        a12 = add(a12, dy[d12 + r], w); a13 = add(a13, dy[d13 + r], w);
        a14 = add(a14, dy[d14 + r], w); a15 = add(a15, dy[d15 + r], w);
        base += p.row_bytes;
    }
    if (gl >= p.n_groups) {
        return;
    }
    store(t, g, a0); store(t + 1u, g, a1); store(t + 2u, g, a2); store(t + 3u, g, a3);
    store(t + 4u, g, a4); store(t + 5u, g, a5); store(t + 6u, g, a6); store(t + 7u, g, a7);
    store(t + 8u, g, a8); store(t + 9u, g, a9); store(t + 10u, g, a10); store(t + 11u, g, a11);
    store(t + 12u, g, a12); store(t + 13u, g, a13); store(t + 14u, g, a14); store(t + 15u, g, a15);
}
