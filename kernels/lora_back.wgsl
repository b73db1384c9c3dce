// LoRA weight gradients. Forward (per token t, row vectors):
//   u = x·Aᵀ          u: [T, rank], A: [rank, n_in]
//   y = x·Wᵀ + s·u·Bᵀ  B: [n_out, rank], s = alpha / rank
// With dy = ∂L/∂y:
//   ∂L/∂B[o, r] = s·Σ_t dy[t, o]·u[t, r]      grad_b += s·dyᵀ·u          (this kernel)
//   ∂L/∂u[t, r] = s·Σ_o dy[t, o]·B[o, r]      du = s·dy·B                 (lora.wgsl)
//   ∂L/∂A[r, i] = Σ_t du[t, r]·x[t, i]        grad_a += duᵀ·x             (this kernel)
//   ∂L/∂x[t, i] += Σ_r du[t, r]·A[r, i]       dx += du·A                  (lora.wgsl)
//
// This kernel: G[i, j] += alpha·Σ_{t < T} P[t·sp + i]·Q[t·sq + j] for i < M, j < N, G row-major
// [M, N] (token-major inputs, reduction over tokens). Each invocation owns a 4×4 block of G and
// sums over t in increasing order: deterministic (no atomics).

struct Params {
    m: u32,       // rows of G
    n: u32,       // columns of G
    t: u32,       // tokens (reduction length)
    sp: u32,      // elements per token row of P
    sq: u32,      // elements per token row of Q
    alpha: f32,   // scale of the product
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> pm: array<f32>;       // P: [T, sp] f32
@group(0) @binding(1) var<storage, read> qm: array<f32>;       // Q: [T, sq] f32
@group(0) @binding(2) var<storage, read_write> gm: array<f32>; // G: [M, N] f32, accumulated
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j0 = gid.x * 4u;
    let i0 = gid.y * 4u;
    if (i0 >= p.m || j0 >= p.n) {
        return;
    }
    var ii: array<u32, 4>;
    var jj: array<u32, 4>;
    for (var a = 0u; a < 4u; a++) {
        ii[a] = min(i0 + a, p.m - 1u);
        jj[a] = min(j0 + a, p.n - 1u);
    }
    var acc: array<vec4<f32>, 4>; // acc[a][b] = G[i0 + a, j0 + b]
    for (var a = 0u; a < 4u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
    for (var t = 0u; t < p.t; t++) {
        let qo = t * p.sq;
        let qv = vec4<f32>(qm[qo + jj[0]], qm[qo + jj[1]], qm[qo + jj[2]], qm[qo + jj[3]]);
        let po = t * p.sp;
        for (var a = 0u; a < 4u; a++) {
            acc[a] += pm[po + ii[a]] * qv;
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
            let o = i * p.n + j;
            gm[o] = gm[o] + p.alpha * acc[a][b];
        }
    }
}
