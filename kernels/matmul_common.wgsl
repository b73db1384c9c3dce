// Shared body of matmul.wgsl and matmul_sg.wgsl (see their headers). The including kernel
// declares binding 0 (x), `x_row_len()` (x's row length in its own element type) and
// `load_x4(r0, r1, r2, r3, g, k) -> X4` (elements 8g..8g+7 of four x rows at offsets r0..r3).
//
// Split-K: workgroup z sums only the 8-element groups [z·k_groups, (z + 1)·k_groups) of each row
// and writes its outputs z·z_stride elements further into y. Unsplit dispatches have one z and
// k_groups = n_in / 8. Split ones write per-chunk partial sums into a scratch buffer (flags 0)
// that matmul_reduce.wgsl then adds up in increasing z, so every output is still a fixed-order sum.
#include "dequant.wgsl"

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
    k_groups: u32,  // 8-element groups per K chunk (workgroup z: groups z·k_groups ..)
    z_stride: u32,  // elements of y between the outputs of consecutive K chunks
}

@group(0) @binding(1) var<storage, read> wq: array<u32>;       // W chunk: raw GGUF rows
@group(0) @binding(2) var<storage, read> bias: array<f32>;     // bias: [n_out] f32 (unused without flag)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // y: [T, y_stride] f32
@group(0) @binding(4) var<uniform> p: Params;

// Eight elements of x for four tokens: lo[b] = elements 8g..8g+3 of token b, hi[b] = 8g+4..8g+7.
struct X4 {
    l0: vec4<f32>, l1: vec4<f32>, l2: vec4<f32>, l3: vec4<f32>,
    h0: vec4<f32>, h1: vec4<f32>, h2: vec4<f32>, h3: vec4<f32>,
}

// The 8-element partial dot products of one weight group with four tokens.
fn dot4(w: W8, v: X4) -> vec4<f32> {
    return vec4<f32>(dot(w.lo, v.l0) + dot(w.hi, v.h0), dot(w.lo, v.l1) + dot(w.hi, v.h1),
                     dot(w.lo, v.l2) + dot(w.hi, v.h2), dot(w.lo, v.l3) + dot(w.hi, v.h3));
}

fn store(z0: u32, r: u32, t_first: u32, acc: vec4<f32>) {
    if (r >= p.n_rows) {
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let t = t_first + k;
        if (t < p.n_tokens) {
            let o = z0 + (p.t0 + t) * p.y_stride + p.y_col0 + r;
            var v = acc[k];
            if ((p.flags & 2u) != 0u) {
                v += bias[p.bias0 + r];
            }
            if ((p.flags & 1u) != 0u) {
                v += y[o];
            }
            y[o] = v;
        }
    }
}

// The kernel body for GPUs (entry point `main`): 8 rows × 8 tokens per invocation; `k` is the
// invocation's lane mod 8 (used by the subgroup x loader).
fn matmul_body(wg: vec3<u32>, lid: vec3<u32>, k: u32) {
    let r = wg.x * 256u + lid.x; // rows r, r + 32, …, r + 224, relative to row0
    let t = wg.y * 8u;           // tokens t .. t + 7, relative to t0
    let last = p.n_rows - 1u;
    let b0 = (p.row0 + min(r, last)) * p.row_bytes;
    let b1 = (p.row0 + min(r + 32u, last)) * p.row_bytes;
    let b2 = (p.row0 + min(r + 64u, last)) * p.row_bytes;
    let b3 = (p.row0 + min(r + 96u, last)) * p.row_bytes;
    let b4 = (p.row0 + min(r + 128u, last)) * p.row_bytes;
    let b5 = (p.row0 + min(r + 160u, last)) * p.row_bytes;
    let b6 = (p.row0 + min(r + 192u, last)) * p.row_bytes;
    let b7 = (p.row0 + min(r + 224u, last)) * p.row_bytes;
    let n4 = x_row_len();
    let tl = p.n_tokens - 1u;
    let x0 = (p.t0 + t) * n4;
    let x1 = (p.t0 + min(t + 1u, tl)) * n4;
    let x2 = (p.t0 + min(t + 2u, tl)) * n4;
    let x3 = (p.t0 + min(t + 3u, tl)) * n4;
    let x4 = (p.t0 + min(t + 4u, tl)) * n4;
    let x5 = (p.t0 + min(t + 5u, tl)) * n4;
    let x6 = (p.t0 + min(t + 6u, tl)) * n4;
    let x7 = (p.t0 + min(t + 7u, tl)) * n4;
    // acc<row><token quad>
    var a0 = vec4<f32>(0.0); var c0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0); var c4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    let g_first = wg.z * p.k_groups;
    let g_end = min(g_first + p.k_groups, p.n_in / 8u);
    for (var g = g_first; g < g_end; g++) {
        let u = load_x4(x0, x1, x2, x3, g, k);
        let v = load_x4(x4, x5, x6, x7, g, k);
        var w = dq8_${WTYPE}(b0, g); a0 += dot4(w, u); c0 += dot4(w, v);
        w = dq8_${WTYPE}(b1, g); a1 += dot4(w, u); c1 += dot4(w, v);
        w = dq8_${WTYPE}(b2, g); a2 += dot4(w, u); c2 += dot4(w, v);
        w = dq8_${WTYPE}(b3, g); a3 += dot4(w, u); c3 += dot4(w, v);
        w = dq8_${WTYPE}(b4, g); a4 += dot4(w, u); c4 += dot4(w, v);
        w = dq8_${WTYPE}(b5, g); a5 += dot4(w, u); c5 += dot4(w, v);
        w = dq8_${WTYPE}(b6, g); a6 += dot4(w, u); c6 += dot4(w, v);
        w = dq8_${WTYPE}(b7, g); a7 += dot4(w, u); c7 += dot4(w, v);
    }
    let z0 = wg.z * p.z_stride;
    store(z0, r, t, a0); store(z0, r, t + 4u, c0);
    store(z0, r + 32u, t, a1); store(z0, r + 32u, t + 4u, c1);
    store(z0, r + 64u, t, a2); store(z0, r + 64u, t + 4u, c2);
    store(z0, r + 96u, t, a3); store(z0, r + 96u, t + 4u, c3);
    store(z0, r + 128u, t, a4); store(z0, r + 128u, t + 4u, c4);
    store(z0, r + 160u, t, a5); store(z0, r + 160u, t + 4u, c5);
    store(z0, r + 192u, t, a6); store(z0, r + 192u, t + 4u, c6);
    store(z0, r + 224u, t, a7); store(z0, r + 224u, t + 4u, c7);
}

// The kernel body for CPU adapters (entry point `main_narrow`): 4 rows (r, r + 32, r + 64, r + 96)
// × 16 tokens per invocation, so a workgroup owns 128 rows and 16 tokens. On lavapipe every
// invocation is one SIMD lane, each weight load costs a loop over the lanes and the 64
// accumulators must stay in the CPU's vector registers: fewer rows per invocation halve the
// weight loads per output and more tokens spread each decoded weight group over more outputs.
// Each output is the same sum in the same order as in matmul_body: identical results.
fn matmul_body_narrow(wg: vec3<u32>, lid: vec3<u32>, k: u32) {
    let r = wg.x * 128u + lid.x; // rows r, r + 32, r + 64, r + 96, relative to row0
    let t = wg.y * 16u;          // tokens t .. t + 15, relative to t0
    let last = p.n_rows - 1u;
    let b0 = (p.row0 + min(r, last)) * p.row_bytes;
    let b1 = (p.row0 + min(r + 32u, last)) * p.row_bytes;
    let b2 = (p.row0 + min(r + 64u, last)) * p.row_bytes;
    let b3 = (p.row0 + min(r + 96u, last)) * p.row_bytes;
    let n4 = x_row_len();
    let tl = p.n_tokens - 1u;
    let x0 = (p.t0 + t) * n4;
    let x1 = (p.t0 + min(t + 1u, tl)) * n4;
    let x2 = (p.t0 + min(t + 2u, tl)) * n4;
    let x3 = (p.t0 + min(t + 3u, tl)) * n4;
    let x4 = (p.t0 + min(t + 4u, tl)) * n4;
    let x5 = (p.t0 + min(t + 5u, tl)) * n4;
    let x6 = (p.t0 + min(t + 6u, tl)) * n4;
    let x7 = (p.t0 + min(t + 7u, tl)) * n4;
    let x8 = (p.t0 + min(t + 8u, tl)) * n4;
    let x9 = (p.t0 + min(t + 9u, tl)) * n4;
    let x10 = (p.t0 + min(t + 10u, tl)) * n4;
    let x11 = (p.t0 + min(t + 11u, tl)) * n4;
    let x12 = (p.t0 + min(t + 12u, tl)) * n4;
    let x13 = (p.t0 + min(t + 13u, tl)) * n4;
    let x14 = (p.t0 + min(t + 14u, tl)) * n4;
    let x15 = (p.t0 + min(t + 15u, tl)) * n4;
    // acc<row><token quad>
    let z = vec4<f32>(0.0);
    var a0 = z; var c0 = z; var e0 = z; var f0 = z;
    var a1 = z; var c1 = z; var e1 = z; var f1 = z;
    var a2 = z; var c2 = z; var e2 = z; var f2 = z;
    var a3 = z; var c3 = z; var e3 = z; var f3 = z;
    let g_first = wg.z * p.k_groups;
    let g_end = min(g_first + p.k_groups, p.n_in / 8u);
    for (var g = g_first; g < g_end; g++) {
        let u = load_x4(x0, x1, x2, x3, g, k);
        let v = load_x4(x4, x5, x6, x7, g, k);
        let m = load_x4(x8, x9, x10, x11, g, k);
        let n = load_x4(x12, x13, x14, x15, g, k);
        var w = dq8_${WTYPE}(b0, g);
        a0 += dot4(w, u); c0 += dot4(w, v); e0 += dot4(w, m); f0 += dot4(w, n);
        w = dq8_${WTYPE}(b1, g);
        a1 += dot4(w, u); c1 += dot4(w, v); e1 += dot4(w, m); f1 += dot4(w, n);
        w = dq8_${WTYPE}(b2, g);
        a2 += dot4(w, u); c2 += dot4(w, v); e2 += dot4(w, m); f2 += dot4(w, n);
        w = dq8_${WTYPE}(b3, g);
        a3 += dot4(w, u); c3 += dot4(w, v); e3 += dot4(w, m); f3 += dot4(w, n);
    }
    let z0 = wg.z * p.z_stride;
    store(z0, r, t, a0); store(z0, r, t + 4u, c0); store(z0, r, t + 8u, e0); store(z0, r, t + 12u, f0);
    store(z0, r + 32u, t, a1); store(z0, r + 32u, t + 4u, c1);
    store(z0, r + 32u, t + 8u, e1); store(z0, r + 32u, t + 12u, f1);
    store(z0, r + 64u, t, a2); store(z0, r + 64u, t + 4u, c2);
    store(z0, r + 64u, t + 8u, e2); store(z0, r + 64u, t + 12u, f2);
    store(z0, r + 96u, t, a3); store(z0, r + 96u, t + 4u, c3);
    store(z0, r + 96u, t + 8u, e3); store(z0, r + 96u, t + 12u, f3);
}
