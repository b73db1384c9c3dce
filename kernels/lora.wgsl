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
// k-lanes split the reduction (lane kl sums k = kl, kl + 16, … in increasing order, so
// neighbouring lanes read neighbouring words of X and of A), then the 16 partial sums of each
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

@group(0) @binding(0) var<storage, read> xm: array<f32>;       // X (see strides)
@group(0) @binding(1) var<storage, read> ym: array<f32>;       // Y (see strides)
@group(0) @binding(2) var<storage, read_write> c: array<f32>;  // C: [M, c_stride] f32
@group(0) @binding(3) var<uniform> p: Params;

// ---- down: long reduction, 16 columns at a time --------------------------------------------

const KL: u32 = 16u; // k-lanes
const TL: u32 = 8u;  // token lanes; lane tl owns tokens tl and tl + 8 of the workgroup's 16

// red[(kl·16 + token)·4 + q]: columns 4q..4q + 3 of one lane's partial sums; 1024 vec4 = 16 KiB
var<workgroup> red: array<vec4<f32>, 1024>;

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
        var yj: array<u32, 16>;
        for (var e = 0u; e < 16u; e++) {
            yj[e] = p.y_off + min(j0 + e, p.n - 1u) * p.syj;
        }
        var acc_a: array<vec4<f32>, 4>; // acc_a[q][e]: token tl, column j0 + 4q + e
        var acc_b: array<vec4<f32>, 4>; // token tl + 8
        for (var q = 0u; q < 4u; q++) {
            acc_a[q] = vec4<f32>(0.0);
            acc_b[q] = vec4<f32>(0.0);
        }
        for (var k = kl; k < p.k; k += KL) {
            let va = xm[xa + k * p.sxk];
            let vb = xm[xb + k * p.sxk];
            let yk = k * p.syk;
            for (var q = 0u; q < 4u; q++) {
                let w = vec4<f32>(
                    ym[yk + yj[4u * q]],
                    ym[yk + yj[4u * q + 1u]],
                    ym[yk + yj[4u * q + 2u]],
                    ym[yk + yj[4u * q + 3u]]
                );
                acc_a[q] += va * w;
                acc_b[q] += vb * w;
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
