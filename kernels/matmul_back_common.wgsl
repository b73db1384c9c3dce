// Shared body of matmul_back.wgsl and matmul_back_sg.wgsl (see their headers). The including
// kernel declares binding 0 (dy: array<f32>) and `dy8(d, r, k) -> E8`, the dy values at offsets
// d + r .. d + r + 7.
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

// Eight dy values of one token (rows r..r+7): l = rows r..r+3, h = rows r+4..r+7.
struct E8 {
    l: vec4<f32>,
    h: vec4<f32>,
}

// The kernel body; `k` is the invocation's lane mod 8 (used by the subgroup dy loader).
fn matmul_back_body(wg: vec3<u32>, lid: vec3<u32>, k: u32) {
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
    var r = 0u;
    // Eight rows at a time: dy8(d, r, k) gives the dy values of rows r..r+7 of one token.
    for (; r + 8u <= p.n_rows; r += 8u) {
        let e0 = dy8(d0, r, k); let e1 = dy8(d1, r, k); let e2 = dy8(d2, r, k); let e3 = dy8(d3, r, k);
        let e4 = dy8(d4, r, k); let e5 = dy8(d5, r, k); let e6 = dy8(d6, r, k); let e7 = dy8(d7, r, k);
        let e8 = dy8(d8, r, k); let e9 = dy8(d9, r, k); let e10 = dy8(d10, r, k); let e11 = dy8(d11, r, k);
        let e12 = dy8(d12, r, k); let e13 = dy8(d13, r, k); let e14 = dy8(d14, r, k); let e15 = dy8(d15, r, k);
        var w: W8;
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 0
        a0 = add(a0, e0.l.x, w); a1 = add(a1, e1.l.x, w); a2 = add(a2, e2.l.x, w); a3 = add(a3, e3.l.x, w);
        a4 = add(a4, e4.l.x, w); a5 = add(a5, e5.l.x, w); a6 = add(a6, e6.l.x, w); a7 = add(a7, e7.l.x, w);
        a8 = add(a8, e8.l.x, w); a9 = add(a9, e9.l.x, w); a10 = add(a10, e10.l.x, w); a11 = add(a11, e11.l.x, w);
        a12 = add(a12, e12.l.x, w); a13 = add(a13, e13.l.x, w); a14 = add(a14, e14.l.x, w); a15 = add(a15, e15.l.x, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 1
        a0 = add(a0, e0.l.y, w); a1 = add(a1, e1.l.y, w); a2 = add(a2, e2.l.y, w); a3 = add(a3, e3.l.y, w);
        a4 = add(a4, e4.l.y, w); a5 = add(a5, e5.l.y, w); a6 = add(a6, e6.l.y, w); a7 = add(a7, e7.l.y, w);
        a8 = add(a8, e8.l.y, w); a9 = add(a9, e9.l.y, w); a10 = add(a10, e10.l.y, w); a11 = add(a11, e11.l.y, w);
        a12 = add(a12, e12.l.y, w); a13 = add(a13, e13.l.y, w); a14 = add(a14, e14.l.y, w); a15 = add(a15, e15.l.y, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 2
        a0 = add(a0, e0.l.z, w); a1 = add(a1, e1.l.z, w); a2 = add(a2, e2.l.z, w); a3 = add(a3, e3.l.z, w);
        a4 = add(a4, e4.l.z, w); a5 = add(a5, e5.l.z, w); a6 = add(a6, e6.l.z, w); a7 = add(a7, e7.l.z, w);
        a8 = add(a8, e8.l.z, w); a9 = add(a9, e9.l.z, w); a10 = add(a10, e10.l.z, w); a11 = add(a11, e11.l.z, w);
        a12 = add(a12, e12.l.z, w); a13 = add(a13, e13.l.z, w); a14 = add(a14, e14.l.z, w); a15 = add(a15, e15.l.z, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 3
        a0 = add(a0, e0.l.w, w); a1 = add(a1, e1.l.w, w); a2 = add(a2, e2.l.w, w); a3 = add(a3, e3.l.w, w);
        a4 = add(a4, e4.l.w, w); a5 = add(a5, e5.l.w, w); a6 = add(a6, e6.l.w, w); a7 = add(a7, e7.l.w, w);
        a8 = add(a8, e8.l.w, w); a9 = add(a9, e9.l.w, w); a10 = add(a10, e10.l.w, w); a11 = add(a11, e11.l.w, w);
        a12 = add(a12, e12.l.w, w); a13 = add(a13, e13.l.w, w); a14 = add(a14, e14.l.w, w); a15 = add(a15, e15.l.w, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 4
        a0 = add(a0, e0.h.x, w); a1 = add(a1, e1.h.x, w); a2 = add(a2, e2.h.x, w); a3 = add(a3, e3.h.x, w);
        a4 = add(a4, e4.h.x, w); a5 = add(a5, e5.h.x, w); a6 = add(a6, e6.h.x, w); a7 = add(a7, e7.h.x, w);
        a8 = add(a8, e8.h.x, w); a9 = add(a9, e9.h.x, w); a10 = add(a10, e10.h.x, w); a11 = add(a11, e11.h.x, w);
        a12 = add(a12, e12.h.x, w); a13 = add(a13, e13.h.x, w); a14 = add(a14, e14.h.x, w); a15 = add(a15, e15.h.x, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 5
        a0 = add(a0, e0.h.y, w); a1 = add(a1, e1.h.y, w); a2 = add(a2, e2.h.y, w); a3 = add(a3, e3.h.y, w);
        a4 = add(a4, e4.h.y, w); a5 = add(a5, e5.h.y, w); a6 = add(a6, e6.h.y, w); a7 = add(a7, e7.h.y, w);
        a8 = add(a8, e8.h.y, w); a9 = add(a9, e9.h.y, w); a10 = add(a10, e10.h.y, w); a11 = add(a11, e11.h.y, w);
        a12 = add(a12, e12.h.y, w); a13 = add(a13, e13.h.y, w); a14 = add(a14, e14.h.y, w); a15 = add(a15, e15.h.y, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 6
        a0 = add(a0, e0.h.z, w); a1 = add(a1, e1.h.z, w); a2 = add(a2, e2.h.z, w); a3 = add(a3, e3.h.z, w);
        a4 = add(a4, e4.h.z, w); a5 = add(a5, e5.h.z, w); a6 = add(a6, e6.h.z, w); a7 = add(a7, e7.h.z, w);
        a8 = add(a8, e8.h.z, w); a9 = add(a9, e9.h.z, w); a10 = add(a10, e10.h.z, w); a11 = add(a11, e11.h.z, w);
        a12 = add(a12, e12.h.z, w); a13 = add(a13, e13.h.z, w); a14 = add(a14, e14.h.z, w); a15 = add(a15, e15.h.z, w);
        w = dq8_${WTYPE}(base, g); base += p.row_bytes; // row r + 7
        a0 = add(a0, e0.h.w, w); a1 = add(a1, e1.h.w, w); a2 = add(a2, e2.h.w, w); a3 = add(a3, e3.h.w, w);
        a4 = add(a4, e4.h.w, w); a5 = add(a5, e5.h.w, w); a6 = add(a6, e6.h.w, w); a7 = add(a7, e7.h.w, w);
        a8 = add(a8, e8.h.w, w); a9 = add(a9, e9.h.w, w); a10 = add(a10, e10.h.w, w); a11 = add(a11, e11.h.w, w);
        a12 = add(a12, e12.h.w, w); a13 = add(a13, e13.h.w, w); a14 = add(a14, e14.h.w, w); a15 = add(a15, e15.h.w, w);
    }
    for (; r < p.n_rows; r++) {
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
