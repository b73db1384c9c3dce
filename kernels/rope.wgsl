// Rotary position embedding, in place on x: [n_rows, n_heads, head_dim] f32.
// For row t at position pos[t], head h and pair i < n_rot/2:
//   θ = f32(pos[t]) · inv_freq[i]        (inv_freq[i] = pos_scale · base^(−2i/n_rot) / freqs[i],
//                                          computed in f64 on the CPU)
//   (a, b) ← (a·cosθ − sign·b·sinθ, sign·a·sinθ + b·cosθ)
// NORM pairs adjacent dims (2i, 2i+1); NEOX pairs split halves (i, i + n_rot/2); dims ≥ n_rot
// are untouched. sign = +1 forward; −1 applies the inverse rotation (the backward pass:
// dL/dx = Rᵀ·dL/dy with R orthogonal).
#include "common.wgsl"

struct Params {
    n_rows: u32,   // tokens T
    n_heads: u32,  // heads per row
    head_dim: u32, // elements per head
    n_rot: u32,    // rotated dims per head (even, ≤ head_dim)
    neox: u32,     // 0 = NORM (adjacent pairs), 1 = NEOX (split halves)
    sign: f32,     // +1 forward, −1 inverse rotation
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> pos: array<u32>;        // pos: [n_rows] u32
@group(0) @binding(1) var<storage, read> inv_freq: array<f32>;   // inv_freq: [n_rot/2] f32 (radians per position)
@group(0) @binding(2) var<storage, read_write> x: array<f32>;    // x: [n_rows, n_heads, head_dim] f32, in place
@group(0) @binding(3) var<uniform> p: Params;

// 2π split for Cody–Waite range reduction: TWO_PI_HI = 201/32 has 8 significant bits, so
// k·TWO_PI_HI is exact for |k| < 2^16 (positions up to ~400k at the lowest frequency 1).
const TWO_PI: f32 = 6.283185307179586;
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let half = p.n_rot / 2u;
    let g = linear_id(wg, nwg) * 256u + li;
    if (g >= p.n_rows * p.n_heads * half) {
        return;
    }
    let i = g % half;
    let th = g / half;  // t · n_heads + h
    let t = th / p.n_heads;
    let theta = f32(pos[t]) * inv_freq[i];
    let k = round(theta / TWO_PI);
    let r = (theta - k * TWO_PI_HI) - k * TWO_PI_LO;
    let c = cos(r);
    let s = p.sign * sin(r);
    let base = th * p.head_dim;
    var ia = base + 2u * i;
    var ib = ia + 1u;
    if (p.neox != 0u) {
        ia = base + i;
        ib = ia + half;
    }
    let a = x[ia];
    let b = x[ib];
    x[ia] = a * c - b * s;
    x[ib] = a * s + b * c;
}
