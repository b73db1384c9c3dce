// Small f32 products for LoRA, y = W·x + s·B·(A·x) with A [rank, n_in], B [n_out, rank]:
//   forward   u = x·Aᵀ             (u: [T, rank], kept for backward)
//             y += s·u·Bᵀ
//   backward  du = s·dy·B, dx += du·A   (the input-gradient half; weight gradients: lora_back.wgsl)
// all as one strided product
//   C[i, j] = (accumulate ? C[i, j] : 0) + alpha·Σ_{k < K} X[i·sxi + k·sxk]·Y[y_off + k·syk + j·syj]
// with C[i, j] at i·c_stride + j, for i < M, j < N. Each invocation owns a 4×4 block of C and sums
// over k in increasing order: deterministic (no atomics).

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

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j0 = gid.x * 4u;
    let i0 = gid.y * 4u;
    if (i0 >= p.m || j0 >= p.n) {
        return;
    }
    // Out-of-range rows/columns re-read the last valid one and are not written.
    var xi: array<u32, 4>;
    var yj: array<u32, 4>;
    for (var a = 0u; a < 4u; a++) {
        xi[a] = min(i0 + a, p.m - 1u) * p.sxi;
        yj[a] = p.y_off + min(j0 + a, p.n - 1u) * p.syj;
    }
    var acc: array<vec4<f32>, 4>; // acc[a][b] = C[i0 + a, j0 + b]
    for (var a = 0u; a < 4u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
    for (var k = 0u; k < p.k; k++) {
        let yk = k * p.syk;
        let yv = vec4<f32>(ym[yk + yj[0]], ym[yk + yj[1]], ym[yk + yj[2]], ym[yk + yj[3]]);
        let xk = k * p.sxk;
        for (var a = 0u; a < 4u; a++) {
            acc[a] += xm[xi[a] + xk] * yv;
        }
    }
    for (var a = 0u; a < 4u; a++) {
        let i = i0 + a;
        if (i >= p.m) {
            break;
        }
        for (var b = 0u; b < 4u; b++) {
            let j = j0 + b;
            if (j >= p.n) {
                break;
            }
            let o = i * p.c_stride + j;
            var v = p.alpha * acc[a][b];
            if ((p.flags & 1u) != 0u) {
                v += c[o];
            }
            c[o] = v;
        }
    }
}
