// AdamW update (PyTorch semantics), one element per invocation, in place on p, m, v.
// The CPU reference is `train::optim::adamw_update`, which performs these f32 operations in this
// order:
//   g = grad · (clip[1] · grad_scale)              clip[1] = global-norm clip factor
//   p = p · decay                                  decay = 1 − lr·wd (decoupled weight decay)
//   m = m + (1 − β1)·(g − m)
//   v = β2·v + (1 − β2)·g²
//   p = p − step_size · (m / (sqrt(v) / sqrt_bc2 + eps))
//                                                  step_size = lr / (1 − β1^t), sqrt_bc2 = sqrt(1 − β2^t)
// clip[0] is the gradient's global sum of squares (kernels/grad_norm.wgsl); when it is not finite
// the update is skipped entirely (p, m, v unchanged). No backward: this is the optimizer.
#include "common.wgsl"

struct Params {
    n: u32,                // elements of p, m, v and grad
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    grad_scale: f32,       // extra gradient multiplier (e.g. 1 / micro-steps), unitless
    decay: f32,            // 1 − lr·wd
    beta2: f32,            // β2
    one_minus_beta1: f32,  // 1 − β1
    one_minus_beta2: f32,  // 1 − β2
    step_size: f32,        // lr / (1 − β1^t), parameter units per step
    sqrt_bc2: f32,         // sqrt(1 − β2^t)
    eps: f32,              // ε, gradient units
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;        // grad: [n] f32
@group(0) @binding(1) var<storage, read> clip: array<f32>;        // clip: [2] f32 = [Σ g², factor]
@group(0) @binding(2) var<storage, read_write> param: array<f32>; // p: [n] f32
@group(0) @binding(3) var<storage, read_write> m: array<f32>;     // m: [n] f32
@group(0) @binding(4) var<storage, read_write> v: array<f32>;     // v: [n] f32
@group(0) @binding(5) var<uniform> P: Params;

// Finite test on the bits (WGSL implementations may assume no NaN/inf in float comparisons).
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = linear_id(wg, nwg) * 256u + li;
    if (i >= P.n || !is_finite(clip[0])) {
        return;
    }
    let g = grad[i] * (clip[1] * P.grad_scale);
    let p0 = param[i] * P.decay;
    let m1 = m[i] + P.one_minus_beta1 * (g - m[i]);
    let v1 = P.beta2 * v[i] + P.one_minus_beta2 * (g * g);
    let denom = sqrt(v1) / P.sqrt_bc2 + P.eps;
    param[i] = p0 - P.step_size * (m1 / denom);
    m[i] = m1;
    v[i] = v1;
}
