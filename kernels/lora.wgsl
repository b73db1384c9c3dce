// Small f32 products for LoRA, y = W·x + s·B·(A·x) with A [rank, n_in], B [n_out, rank]:
//   forward   u = x·Aᵀ             (u: [T, rank], kept for backward)        this file
//             y += s·u·Bᵀ                                                    lora_up.wgsl
//   backward  du = s·dy·B                                                    this file
//             dx (+)= du·A   (the input-gradient half; weight gradients: lora_back.wgsl)
//                                                                            lora_up.wgsl
// both compute the strided product
//   C[i, j] = (accumulate ? C[i, j] : 0) + alpha·Σ_{k < K} X[i·sxi + k·sxk]·Y[y_off + k·syk + j·syj]
// with C[i, j] at i·c_stride + j, for i < M (tokens), j < N.
//
// Here (K long: n_in or n_out; N = rank): a workgroup owns 16 tokens and every column; its 16
// k-lanes split the reduction (lane kl sums the k-quads kl, kl + 16, … in increasing order, so
// neighbouring lanes read neighbouring vec4s of X and of A), then the 16 partial sums of each
// C[i, j] are added in lane order through workgroup memory (one barrier pair per 16 columns:
// barriers are what a CPU device pays for).
// Deterministic (no atomics, fixed order), and a token's C row depends only on that
// token's X row: never on the other tokens of the batch.

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

@group(0) @binding(0) var<storage, read> xm: array<${X_T}>;    // X (see strides)
@group(0) @binding(1) var<storage, read> ym: array<${Y_T}>;    // Y (see strides)
@group(0) @binding(2) var<storage, read_write> c: array<f32>;  // C: [M, c_stride] f32
@group(0) @binding(3) var<uniform> p: Params;

// Defines: X_W = 4 reads X as vec4<f32> (X_T; rows of whole vec4s along k: sxk = 1, sxi and K
// multiples of 4), else 1 (f32). Y_MODE = 1 reads Y as vec4<f32> along k (A: syk = 1; syj, y_off
// and K multiples of 4), 2 as vec4<f32> along j (B: syj = 1; syk, y_off and N multiples of 4),
// 0 as f32. Every load type-checks for either element type; the constants pick one.
const X_W: u32 = ${X_W};
const Y_MODE: u32 = ${Y_MODE};

const KL: u32 = 16u; // k-lanes; lane kl owns k = 4kl .. 4kl + 3, then 64 further on, …
const TL: u32 = 8u;  // token lanes; lane tl owns tokens tl and tl + 8 of the workgroup's 16

// red[(kl·16 + token)·4 + q]: columns 4q..4q + 3 of one lane's partial sums; 1024 vec4 = 16 KiB
var<workgroup> red: array<vec4<f32>, 1024>;

// X[o + (k .. k + 4)·sxk], zero past K (X_W = 4: o and k multiples of 4, sxk = 1).
fn xq(o: u32, k: u32) -> vec4<f32> {
    if (X_W == 4u) {
        return vec4<f32>(xm[(o + k) / 4u]);
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let kk = k + e;
        v[e] = select(0.0, vec4<f32>(xm[o + min(kk, p.k - 1u) * p.sxk]).x, kk < p.k);
    }
    return v;
}

fn y1(o: u32) -> f32 {
    return vec4<f32>(ym[o]).x;
}

// Y[o .. o + 4] (o a multiple of 4; Y_MODE 1 or 2).
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

@compute @workgroup_size(128)
fn down(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let kl = lid % KL;
    let tl = lid / KL;
    let i0 = wg.x * 2u * TL;
    // Out-of-range tokens and columns re-read the last valid one and are not written.
    let xa = min(i0 + tl, p.m - 1u) * p.sxi;
    let xb = min(i0 + tl + TL, p.m - 1u) * p.sxi;
    for (var j0 = 0u; j0 < p.n; j0 += 16u) {
        var yj: array<u32, 16>; // Y offset of column j0 + e (Y_MODE 0, 1)
        for (var e = 0u; e < 16u; e++) {
            yj[e] = p.y_off + min(j0 + e, p.n - 1u) * p.syj;
        }
        var yq: array<u32, 4>; // Y offset of columns j0 + 4q .. + 3 (Y_MODE 2)
        for (var q = 0u; q < 4u; q++) {
            yq[q] = p.y_off + min(j0 + 4u * q, p.n - 4u);
        }
        var acc_a: array<vec4<f32>, 4>; // acc_a[q][e]: token tl, column j0 + 4q + e
        var acc_b: array<vec4<f32>, 4>; // token tl + 8
        for (var q = 0u; q < 4u; q++) {
            acc_a[q] = vec4<f32>(0.0);
            acc_b[q] = vec4<f32>(0.0);
        }
        for (var k = 4u * kl; k < p.k; k += 4u * KL) {
            let va = xq(xa, k);
            let vb = xq(xb, k);
            if (Y_MODE == 1u) {
                // A rows: four k of one column per load; one dot product per column.
                for (var q = 0u; q < 4u; q++) {
                    let w0 = y4(yj[4u * q] + k);
                    let w1 = y4(yj[4u * q + 1u] + k);
                    let w2 = y4(yj[4u * q + 2u] + k);
                    let w3 = y4(yj[4u * q + 3u] + k);
                    acc_a[q] += vec4<f32>(dot(va, w0), dot(va, w1), dot(va, w2), dot(va, w3));
                    acc_b[q] += vec4<f32>(dot(vb, w0), dot(vb, w1), dot(vb, w2), dot(vb, w3));
                }
            } else {
                for (var e = 0u; e < 4u; e++) {
                    let yk = min(k + e, p.k - 1u) * p.syk;
                    for (var q = 0u; q < 4u; q++) {
                        var w: vec4<f32>;
                        if (Y_MODE == 2u) {
                            // B rows: four columns of one k per load.
                            w = y4(yq[q] + yk);
                        } else {
                            w = vec4<f32>(
                                y1(yk + yj[4u * q]),
                                y1(yk + yj[4u * q + 1u]),
                                y1(yk + yj[4u * q + 2u]),
                                y1(yk + yj[4u * q + 3u])
                            );
                        }
                        acc_a[q] += va[e] * w;
                        acc_b[q] += vb[e] * w;
                    }
                }
            }
        }
        // Sum the 16 k-lanes' partials in lane order: one invocation per (token, 4 columns).
        for (var q = 0u; q < 4u; q++) {
            red[(kl * 16u + tl) * 4u + q] = acc_a[q];
            red[(kl * 16u + tl + TL) * 4u + q] = acc_b[q];
        }
        workgroupBarrier();
        if (lid < 64u) {
            var s = vec4<f32>(0.0);
            for (var l = 0u; l < KL; l++) {
                s += red[l * 64u + lid];
            }
            let tok = lid / 4u;
            let j = j0 + 4u * (lid % 4u);
            for (var e = 0u; e < 4u; e++) {
                store(i0 + tok, j + e, s[e]);
            }
        }
        workgroupBarrier();
    }
}
