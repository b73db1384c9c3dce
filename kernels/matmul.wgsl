// y[t, c] = (accumulate ? y[t, c] : 0) + Σ_i x[t, i]·W[r, i] (+ bias[r]), with W in its GGUF type
// (${WTYPE}), dequantized in registers 8 elements at a time (dequant.wgsl).
//
// One dispatch covers weight rows [row0, row0 + n_rows) of one chunk buffer and tokens
// [t0, t0 + n_tokens); row r goes to y column y_col0 + (r − row0). Each invocation computes a
// register block of RB rows × TB tokens and sums each output over i in a fixed order: results are
// deterministic. Workgroup (16, 4) → 16·RB rows × 4·TB tokens.
#include "dequant.wgsl"

const RB: u32 = 4u; // rows per invocation
const TB: u32 = 8u; // tokens per invocation

struct Params {
    n_in: u32,      // elements per weight row (multiple of 8)
    row_bytes: u32, // bytes per weight row
    row0: u32,      // first weight row of this dispatch, relative to the chunk buffer
    n_rows: u32,    // weight rows in this dispatch
    t0: u32,        // first token
    n_tokens: u32,  // tokens in this dispatch
    y_stride: u32,  // elements per row of y
    y_col0: u32,    // y column of row0
    bias0: u32,     // bias index of row0
    flags: u32,     // bit 0: accumulate into y; bit 1: add bias
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;  // x: [T, n_in] f32
@group(0) @binding(1) var<storage, read> wq: array<u32>;       // W chunk: raw GGUF rows
@group(0) @binding(2) var<storage, read> bias: array<f32>;     // bias: [n_out] f32 (unused without flag)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // y: [T, y_stride] f32
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(16, 4)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r_first = (wg.x * 16u + lid.x) * RB;  // relative to row0
    let t_first = (wg.y * 4u + lid.y) * TB;   // relative to t0
    if (r_first >= p.n_rows || t_first >= p.n_tokens) {
        return;
    }
    // Rows and tokens past the end re-read the last valid one and are not written.
    var base: array<u32, RB>;
    for (var a = 0u; a < RB; a++) {
        base[a] = (p.row0 + min(r_first + a, p.n_rows - 1u)) * p.row_bytes;
    }
    var xrow: array<u32, TB>;
    let n4 = p.n_in / 4u;
    for (var b = 0u; b < TB; b++) {
        xrow[b] = (p.t0 + min(t_first + b, p.n_tokens - 1u)) * n4;
    }
    var acc: array<vec4<f32>, TB>; // acc[b][a]: token b, row a
    for (var b = 0u; b < TB; b++) {
        acc[b] = vec4<f32>(0.0);
    }
    let n_groups = p.n_in / 8u;
    for (var g = 0u; g < n_groups; g++) {
        let w0 = dq8_${WTYPE}(base[0], g);
        let w1 = dq8_${WTYPE}(base[1], g);
        let w2 = dq8_${WTYPE}(base[2], g);
        let w3 = dq8_${WTYPE}(base[3], g);
        for (var b = 0u; b < TB; b++) {
            let xl = x[xrow[b] + 2u * g];
            let xh = x[xrow[b] + 2u * g + 1u];
            acc[b] += vec4<f32>(
                dot(w0.lo, xl) + dot(w0.hi, xh),
                dot(w1.lo, xl) + dot(w1.hi, xh),
                dot(w2.lo, xl) + dot(w2.hi, xh),
                dot(w3.lo, xl) + dot(w3.hi, xh),
            );
        }
    }
    for (var b = 0u; b < TB; b++) {
        let t = t_first + b;
        if (t >= p.n_tokens) {
            break;
        }
        let yrow = (p.t0 + t) * p.y_stride + p.y_col0;
        for (var a = 0u; a < RB; a++) {
            let r = r_first + a;
            if (r >= p.n_rows) {
                break;
            }
            var v = acc[b][a];
            if ((p.flags & 2u) != 0u) {
                v += bias[p.bias0 + r];
            }
            if ((p.flags & 1u) != 0u) {
                v += y[yrow + r];
            }
            y[yrow + r] = v;
        }
    }
}
