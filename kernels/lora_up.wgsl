// The rank-long LoRA products (the long ones are in lora.wgsl):
//   forward   y += s·u·Bᵀ      u: [T, rank], B: [n_out, rank]
//   backward  dx (+)= du·A     du: [T, rank], A: [rank, n_in]
//   LM head   logits += s·u·B[chunk]ᵀ
// as the strided product
//   C[i, j] = (accumulate ? C[i, j] : 0) + alpha·Σ_{k < K} X[i·sxi + k·sxk]·Y[y_off + k·syk + j·syj]
// with C[i, j] at i·c_stride + j, for i < M (tokens), j < N, K = rank.
//
// A workgroup owns 32 tokens × 128 columns, each invocation 4 tokens × 4 columns: 32 apart, or
// 4 consecutive ones when Y is read as vec4 along j (Y_MODE 2), so neighbouring invocations
// read and write neighbouring words (or vec4s) of C and of A, and every invocation of a row
// reads the same words of X. Each C[i, j] sums k in increasing order:
// deterministic (no atomics), and a token's row depends only on that token's X row.
//
// Defines: X_W = 4 reads X as vec4<f32> (X_T; X rows are whole vec4s: sxk = 1, sxi and K
// multiples of 4), else 1 (f32). Y_MODE = 1 reads Y as vec4<f32> (Y_T) along k (syk = 1; syj,
// y_off and K multiples of 4: the B of y += s·u·Bᵀ), 2 along j (syj = 1; syk, y_off and N
// multiples of 4: the A of dx += du·A), 0 as f32. Both branches of each load type-check for
// either element type; the constants pick one.

struct Params {
    m: u32,        // rows of C
    n: u32,        // columns of C
    k: u32,        // reduction length
    sxi: u32,      // X element stride along i
    sxk: u32,      // X element stride along k
    syk: u32,      // Y element stride along k
    syj: u32,      // Y element stride along j
    c_stride: u32, // elements per row of C
    alpha: f32,    // scale of the product
    flags: u32,    // bit 0: accumulate into C
    y_off: u32,    // first Y element (the LM head's B rows of a vocabulary chunk)
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> xm: array<${X_T}>;   // X (see strides)
@group(0) @binding(1) var<storage, read> ym: array<${Y_T}>;   // Y (see strides)
@group(0) @binding(2) var<storage, read_write> c: array<f32>; // C: [M, c_stride] f32
@group(0) @binding(3) var<uniform> p: Params;

const X_W: u32 = ${X_W};
const Y_MODE: u32 = ${Y_MODE};

// X[o .. o + 4·sxk by sxk] (o a multiple of 4 when X_W = 4).
fn x4(o: u32) -> vec4<f32> {
    if (X_W == 4u) {
        return vec4<f32>(xm[o / 4u]);
    }
    return vec4<f32>(
        vec4<f32>(xm[o]).x,
        vec4<f32>(xm[o + p.sxk]).x,
        vec4<f32>(xm[o + 2u * p.sxk]).x,
        vec4<f32>(xm[o + 3u * p.sxk]).x
    );
}

fn x1(o: u32) -> f32 {
    if (X_W == 4u) {
        return vec4<f32>(xm[o / 4u])[o % 4u];
    }
    return vec4<f32>(xm[o]).x;
}

fn y1(o: u32) -> f32 {
    return vec4<f32>(ym[o]).x;
}

// Y[o .. o + 4] (Y_MODE 1 or 2, o a multiple of 4).
fn y4(o: u32) -> vec4<f32> {
    return vec4<f32>(ym[o / 4u]);
}

fn store(i: u32, j: u32, acc: f32) {
    if (i < p.m && j < p.n) {
        let o = i * p.c_stride + j;
        var v = p.alpha * acc;
        if ((p.flags & 1u) != 0u) {
            v += c[o];
        }
        c[o] = v;
    }
}

const UC: u32 = 32u; // column lanes (x); lane owns 4 columns of the workgroup's 128
const UT: u32 = 8u;  // token lanes (y); lane owns tokens i + 8a, a < 4, of the workgroup's 32

@compute @workgroup_size(32, 8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let jw = wg.x * 4u * UC;
    let i0 = wg.y * 4u * UT + lid.y;
    // Out-of-range tokens and columns re-read the last valid one and are not written.
    var jc: array<u32, 4>; // the invocation's columns
    var yj: array<u32, 4>;
    var xi: array<u32, 4>;
    for (var a = 0u; a < 4u; a++) {
        if (Y_MODE == 2u) {
            jc[a] = jw + 4u * lid.x + a;
        } else {
            jc[a] = jw + lid.x + a * UC;
        }
        yj[a] = p.y_off + min(jc[a], p.n - 1u) * p.syj;
        xi[a] = min(i0 + a * UT, p.m - 1u) * p.sxi;
    }
    // Y_MODE 2: the first of the 4 consecutive columns (clamped to the last whole vec4).
    let jq = p.y_off + min(jw + 4u * lid.x, p.n - 4u);
    var acc: array<vec4<f32>, 4>; // acc[a][c]: token i0 + 8a, column jc[c]
    for (var a = 0u; a < 4u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
    // k in increasing order: blocks of 4 with Y in registers, then the tail.
    let k4 = p.k - p.k % 4u;
    for (var k0 = 0u; k0 < k4; k0 += 4u) {
        var w: array<vec4<f32>, 4>; // w[e][c] = Y[k0 + e, column c]
        if (Y_MODE == 1u) {
            let c0 = y4(yj[0] + k0);
            let c1 = y4(yj[1] + k0);
            let c2 = y4(yj[2] + k0);
            let c3 = y4(yj[3] + k0);
            w[0] = vec4<f32>(c0.x, c1.x, c2.x, c3.x);
            w[1] = vec4<f32>(c0.y, c1.y, c2.y, c3.y);
            w[2] = vec4<f32>(c0.z, c1.z, c2.z, c3.z);
            w[3] = vec4<f32>(c0.w, c1.w, c2.w, c3.w);
        } else if (Y_MODE == 2u) {
            for (var e = 0u; e < 4u; e++) {
                w[e] = y4(jq + (k0 + e) * p.syk);
            }
        } else {
            for (var e = 0u; e < 4u; e++) {
                let yk = (k0 + e) * p.syk;
                w[e] = vec4<f32>(y1(yk + yj[0]), y1(yk + yj[1]), y1(yk + yj[2]), y1(yk + yj[3]));
            }
        }
        for (var a = 0u; a < 4u; a++) {
            let v = x4(xi[a] + k0 * p.sxk);
            var s = acc[a];
            s += v.x * w[0];
            s += v.y * w[1];
            s += v.z * w[2];
            s += v.w * w[3];
            acc[a] = s;
        }
    }
    for (var k = k4; k < p.k; k++) {
        let yk = k * p.syk;
        var w = vec4<f32>(y1(yk + yj[0]), y1(yk + yj[1]), y1(yk + yj[2]), y1(yk + yj[3]));
        if (Y_MODE == 2u) {
            w = y4(jq + yk);
        }
        for (var a = 0u; a < 4u; a++) {
            acc[a] += x1(xi[a] + k * p.sxk) * w;
        }
    }
    for (var a = 0u; a < 4u; a++) {
        for (var c = 0u; c < 4u; c++) {
            store(i0 + a * UT, jc[c], acc[a][c]);
        }
    }
}
