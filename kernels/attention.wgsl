// Causal grouped-query attention over a padded batch, streaming (online softmax): the [L, L]
// score matrix is never stored.
//
// B sequences padded to L rows each (T = B·L); row t = b·L + i is query i of sequence b.
// Query (b, i) with i < lens[b] attends keys (b, j) for j ≤ i (and i − j < window when the
// window is nonzero: gemma3's sliding-window layers); query head h reads KV head
// h / (n_head / n_head_kv) (contiguous groups). Per (row, head):
//   s_j = scale · q·k_j,  m = max_j s_j,  l = Σ_j exp(s_j − m)
//   o   = Σ_j exp(s_j − m)·v_j / l,       lse = m + ln l   (kept for the backward pass)
// Rows with i ≥ lens[b] write o = 0 and lse = 0.
//
// This is the per-row form, for CPU adapters (lavapipe); GPUs run kernels/attention_tiled.wgsl
// (`AttnKernel`). One invocation per (query row, head), holding q and the output accumulator in
// registers; neighbouring invocations share a head and read the same keys. A dispatch covers query rows
// [row_start, row_start + n_rows) for all heads (the launcher splits long work).
#include "common.wgsl"

struct Params {
    n_seq: u32,      // sequences B
    seq_len: u32,    // padded length L (rows per sequence)
    n_head: u32,     // query heads
    n_head_kv: u32,  // KV heads (divides n_head)
    row_start: u32,  // first query row of this dispatch
    n_rows: u32,     // query rows in this dispatch
    scale: f32,      // score scale (1/√head_dim unless the model says otherwise)
    window: u32,     // 0: causal; else query i also sees only keys j with i − j < window
}

// head_dim / 4 (head_dim is a multiple of 4); the pipeline is specialised per head size.
const HD4: u32 = ${HD4}u;

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;       // q: [T, n_head, head_dim] f32 (after rope)
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;       // k: [T, n_head_kv, head_dim] f32 (after rope)
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;       // v: [T, n_head_kv, head_dim] f32
@group(0) @binding(3) var<storage, read> lens: array<u32>;          // lens: [B] u32, each ≤ L
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>; // o: [T, n_head, head_dim] f32
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;     // lse: [T, n_head] f32
@group(0) @binding(6) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg) * 64u + li;
    if (g >= p.n_rows * p.n_head) {
        return;
    }
    let h = g / p.n_rows;
    let t = p.row_start + g % p.n_rows;
    let b = t / p.seq_len;
    let i = t % p.seq_len;
    let qo = (t * p.n_head + h) * HD4;
    if (i >= lens[b]) {
        for (var d = 0u; d < HD4; d++) {
            o[qo + d] = vec4<f32>(0.0);
        }
        lse[t * p.n_head + h] = 0.0;
        return;
    }
    let kvh = h / (p.n_head / p.n_head_kv);
    var qv: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    for (var d = 0u; d < HD4; d++) {
        qv[d] = q[qo + d] * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = -3.0e38;
    var l = 0.0;
    let row0 = b * p.seq_len;
    var j_first = 0u;
    if (p.window != 0u && i + 1u > p.window) {
        j_first = i + 1u - p.window;
    }
    for (var j = j_first; j <= i; j++) {
        let ko = ((row0 + j) * p.n_head_kv + kvh) * HD4;
        var s4 = vec4<f32>(0.0);
        for (var d = 0u; d < HD4; d++) {
            s4 += qv[d] * k[ko + d];
        }
        let s = (s4.x + s4.y) + (s4.z + s4.w);
        if (s > m) {
            let c = exp(m - s);
            l *= c;
            for (var d = 0u; d < HD4; d++) {
                acc[d] *= c;
            }
            m = s;
        }
        let e = exp(s - m);
        l += e;
        for (var d = 0u; d < HD4; d++) {
            acc[d] += e * v[ko + d];
        }
    }
    let inv = 1.0 / l;
    for (var d = 0u; d < HD4; d++) {
        o[qo + d] = acc[d] * inv;
    }
    lse[t * p.n_head + h] = m + log(l);
}
