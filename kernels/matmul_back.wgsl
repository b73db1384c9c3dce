// Input gradient of y = x·Wᵀ:  ∂L/∂x[t, i] = Σ_r ∂L/∂y[t, r]·W[r, i]   (dx = dy·W).
// (The weight gets no gradient: it is frozen; LoRA gradients live in lora_back.wgsl.)
//
// dx[t, i] = (accumulate ? dx[t, i] : 0) + Σ_{r ∈ [row0, row0 + n_rows)} dy[t, dy_col0 + r − row0]·W[r, i]
// for tokens [t0, t0 + n_tokens) and 8-element groups [g0, g0 + n_groups) of i. W (${WTYPE}) is
// dequantized in registers. Each invocation owns 8 consecutive i × TB tokens and sums over r in
// increasing order, four rows per step (then the < 4 left one by one): deterministic. Workgroup
// (16, 4) → 128 i × 4·TB tokens. Longer row ranges are split by the launcher into consecutive
// dispatches that accumulate in a fixed order.
#include "dequant.wgsl"

const TB: u32 = 4u; // tokens per invocation

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

@compute @workgroup_size(16, 4)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let gl = wg.x * 16u + lid.x;            // relative to g0
    let t_first = (wg.y * 4u + lid.y) * TB; // relative to t0
    if (gl >= p.n_groups || t_first >= p.n_tokens) {
        return;
    }
    let g = p.g0 + gl;
    var dyrow: array<u32, TB>;
    for (var b = 0u; b < TB; b++) {
        dyrow[b] = (p.t0 + min(t_first + b, p.n_tokens - 1u)) * p.dy_stride + p.dy_col0;
    }
    var lo: array<vec4<f32>, TB>;
    var hi: array<vec4<f32>, TB>;
    for (var b = 0u; b < TB; b++) {
        lo[b] = vec4<f32>(0.0);
        hi[b] = vec4<f32>(0.0);
    }
    var base = p.row0 * p.row_bytes;
    let n_rows4 = p.n_rows & ~3u;
    var r = 0u;
    for (; r < n_rows4; r += 4u) {
        let w0 = dq8_${WTYPE}(base, g);
        let w1 = dq8_${WTYPE}(base + p.row_bytes, g);
        let w2 = dq8_${WTYPE}(base + 2u * p.row_bytes, g);
        let w3 = dq8_${WTYPE}(base + 3u * p.row_bytes, g);
        for (var b = 0u; b < TB; b++) {
            let o = dyrow[b] + r;
            let d = vec4<f32>(dy[o], dy[o + 1u], dy[o + 2u], dy[o + 3u]);
            lo[b] += d.x * w0.lo + d.y * w1.lo + d.z * w2.lo + d.w * w3.lo;
            hi[b] += d.x * w0.hi + d.y * w1.hi + d.z * w2.hi + d.w * w3.hi;
        }
        base += 4u * p.row_bytes;
    }
    for (; r < p.n_rows; r++) {
        let w = dq8_${WTYPE}(base, g);
        for (var b = 0u; b < TB; b++) {
            let d = dy[dyrow[b] + r];
            lo[b] += d * w.lo;
            hi[b] += d * w.hi;
        }
        base += p.row_bytes;
    }
    let n4 = p.n_in / 4u;
    for (var b = 0u; b < TB; b++) {
        let t = t_first + b;
        if (t >= p.n_tokens) {
            break;
        }
        let o = (p.t0 + t) * n4 + 2u * g;
        if ((p.flags & 1u) != 0u) {
            dx[o] = dx[o] + lo[b];
            dx[o + 1u] = dx[o + 1u] + hi[b];
        } else {
            dx[o] = lo[b];
            dx[o + 1u] = hi[b];
        }
    }
}
