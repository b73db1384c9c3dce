// Backward of causal GQA attention (kernels/attention.wgsl), recomputing the probabilities from
// the forward's per-row log-sum-exp (no [L, L] matrix is stored). Per query head h with KV head
// g = h / (n_head / n_head_kv), query row i and key row j ≤ i of the same sequence (i, j < len):
//   S[i,j]  = scale·q_i·k_j,   P[i,j] = exp(S[i,j] − lse_i)
//   dP[i,j] = dO_i·v_j,        D_i = Σ_j P[i,j]·dP[i,j] = dO_i·O_i   (attention_back_delta.wgsl)
//   dS[i,j] = P[i,j]·(dP[i,j] − D_i)
//   dq_i    = scale·Σ_{j≤i} dS[i,j]·k_j
//   dk_j    = scale·Σ_{h ∈ group(g)} Σ_{j≤i<len} dS[i,j]·q_i
//   dv_j    = Σ_{h ∈ group(g)} Σ_{j≤i<len} P[i,j]·dO_i
// Padding rows (i ≥ len) get zero gradients. With a nonzero window, pairs with i − j ≥ window
// are masked too (P = 0).
//
// The per-row form, for CPU adapters (lavapipe), where each invocation's q / dO (or k / v) row
// and accumulators live in registers and workgroup memory is no faster than a cached global
// load; GPUs run the tiled kernels/attention_back.wgsl (same derivatives, same bind-group layout
// and params). PASS 0 computes dq, one invocation per (query row,
// head), looping keys in order; PASS 1 computes dk and dv, one invocation per (key row, KV head),
// looping the group's heads and then the queries in order. No atomics: deterministic. Both
// passes are reachable from `main`, so both use the same bind-group layout (PASS 0 binds any
// spare buffer as out_b).
#include "common.wgsl"

struct Params {
    n_seq: u32,      // sequences B
    seq_len: u32,    // padded length L
    n_head: u32,     // query heads
    n_head_kv: u32,  // KV heads (divides n_head)
    row_start: u32,  // first row of this dispatch (query rows in PASS 0, key rows in PASS 1)
    n_rows: u32,     // rows in this dispatch
    scale: f32,      // score scale (1/√head_dim unless the model says otherwise)
    window: u32,     // 0: causal; else query i also sees only keys j with i − j < window
}

const HD4: u32 = ${HD4}u;   // head_dim / 4
const PASS: u32 = ${PASS}u; // 0: dq; 1: dk, dv

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;          // q: [T, n_head, head_dim] f32 (after rope)
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;          // k: [T, n_head_kv, head_dim] f32 (after rope)
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;          // v: [T, n_head_kv, head_dim] f32
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;       // dout: [T, n_head, head_dim] f32
@group(0) @binding(4) var<storage, read> lsed: array<vec2<f32>>;       // lsed: [T, n_head] (lse, D)
@group(0) @binding(5) var<storage, read> lens: array<u32>;             // lens: [B] u32
@group(0) @binding(6) var<storage, read_write> out_a: array<vec4<f32>>; // PASS 0: dq [T, n_head, hd]; PASS 1: dk [T, n_head_kv, hd]
@group(0) @binding(7) var<storage, read_write> out_b: array<vec4<f32>>; // PASS 1: dv [T, n_head_kv, hd] (PASS 0: unused)
@group(0) @binding(8) var<uniform> p: Params;

fn dq_pass(g: u32) {
    let h = g / p.n_rows;
    let t = p.row_start + g % p.n_rows;
    let b = t / p.seq_len;
    let i = t % p.seq_len;
    let qo = (t * p.n_head + h) * HD4;
    var acc: array<vec4<f32>, HD4>;
    for (var d = 0u; d < HD4; d++) {
        acc[d] = vec4<f32>(0.0);
    }
    if (i < lens[b]) {
        let kvh = h / (p.n_head / p.n_head_kv);
        var qv: array<vec4<f32>, HD4>;
        var dov: array<vec4<f32>, HD4>;
        for (var d = 0u; d < HD4; d++) {
            qv[d] = q[qo + d] * p.scale;
            dov[d] = dout[qo + d];
        }
        let ld = lsed[t * p.n_head + h];
        let row0 = b * p.seq_len;
        var j_first = 0u;
        if (p.window != 0u && i + 1u > p.window) {
            j_first = i + 1u - p.window;
        }
        for (var j = j_first; j <= i; j++) {
            let ko = ((row0 + j) * p.n_head_kv + kvh) * HD4;
            var s4 = vec4<f32>(0.0);
            var dp4 = vec4<f32>(0.0);
            for (var d = 0u; d < HD4; d++) {
                s4 += qv[d] * k[ko + d];
                dp4 += dov[d] * v[ko + d];
            }
            let s = (s4.x + s4.y) + (s4.z + s4.w);
            let dp = (dp4.x + dp4.y) + (dp4.z + dp4.w);
            let pr = exp(s - ld.x);
            let ds = pr * (dp - ld.y);
            for (var d = 0u; d < HD4; d++) {
                acc[d] += ds * k[ko + d];
            }
        }
    }
    for (var d = 0u; d < HD4; d++) {
        out_a[qo + d] = acc[d] * p.scale;
    }
}

fn dkv_pass(g: u32) {
    let kvh = g / p.n_rows;
    let t = p.row_start + g % p.n_rows;
    let b = t / p.seq_len;
    let j = t % p.seq_len;
    let ko = (t * p.n_head_kv + kvh) * HD4;
    var dk: array<vec4<f32>, HD4>;
    var dv: array<vec4<f32>, HD4>;
    for (var d = 0u; d < HD4; d++) {
        dk[d] = vec4<f32>(0.0);
        dv[d] = vec4<f32>(0.0);
    }
    let len = lens[b];
    if (j < len) {
        var kv: array<vec4<f32>, HD4>;
        var vv: array<vec4<f32>, HD4>;
        for (var d = 0u; d < HD4; d++) {
            kv[d] = k[ko + d];
            vv[d] = v[ko + d];
        }
        let group = p.n_head / p.n_head_kv;
        let row0 = b * p.seq_len;
        for (var hh = 0u; hh < group; hh++) {
            let h = kvh * group + hh;
            var i_end = len;
            if (p.window != 0u) {
                i_end = min(len, j + p.window);
            }
            for (var i = j; i < i_end; i++) {
                let qo = ((row0 + i) * p.n_head + h) * HD4;
                var s4 = vec4<f32>(0.0);
                var dp4 = vec4<f32>(0.0);
                for (var d = 0u; d < HD4; d++) {
                    s4 += (q[qo + d] * p.scale) * kv[d];
                    dp4 += dout[qo + d] * vv[d];
                }
                let s = (s4.x + s4.y) + (s4.z + s4.w);
                let dp = (dp4.x + dp4.y) + (dp4.z + dp4.w);
                let ld = lsed[(row0 + i) * p.n_head + h];
                let pr = exp(s - ld.x);
                let ds = pr * (dp - ld.y);
                for (var d = 0u; d < HD4; d++) {
                    dk[d] += ds * q[qo + d];
                    dv[d] += pr * dout[qo + d];
                }
            }
        }
    }
    for (var d = 0u; d < HD4; d++) {
        out_a[ko + d] = dk[d] * p.scale;
        out_b[ko + d] = dv[d];
    }
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg) * 64u + li;
    if (PASS == 0u) {
        if (g < p.n_rows * p.n_head) {
            dq_pass(g);
        }
    } else {
        if (g < p.n_rows * p.n_head_kv) {
            dkv_pass(g);
        }
    }
}
