// Per-token log-prob of the target over a vocabulary processed in column chunks, with a running
// (max, sum-exp, target logit) per row, so no [T × V] logits matrix is ever stored.
//
// For a chunk of columns [col_start, col_start + n_cols) with z = logits + bias:
//   m_c = max_c z_c,  s_c = Σ_c exp(z_c − m_c)
//   merged with the running (m, s):  m' = max(m, m_c),  s' = s·exp(m − m') + s_c·exp(m_c − m')
//   the target logit is taken from the chunk that holds the target column.
// On the last chunk: lse = m + ln s and logp = z_target − lse (lse is kept for the backward pass:
// dlogits = w·(onehot(target) − exp(z − lse))).
//
// One workgroup per row; each invocation keeps an online (max, sum) over a strided set of
// columns, then a fixed-order tree merges the 256 partials (deterministic).
#include "common.wgsl"

struct Params {
    n_rows: u32,     // rows N
    n_cols: u32,     // columns in this chunk (row stride of `logits`)
    col_start: u32,  // vocabulary index of chunk column 0
    has_bias: u32,   // 1: add bias[col_start + c]
    first: u32,      // 1: initialise the running state from this chunk
    last: u32,       // 1: write logp and lse after merging
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;       // logits: [N, n_cols] f32 (this chunk)
@group(0) @binding(1) var<storage, read> bias: array<f32>;         // bias: [V] f32 (unused when has_bias = 0)
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // targets: [N] u32 vocabulary ids
@group(0) @binding(3) var<storage, read_write> state: array<vec4<f32>>; // state: [N] (max, sum-exp, target logit, 0)
@group(0) @binding(4) var<storage, read_write> logp: array<f32>;   // logp: [N] f32 (written on the last chunk)
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;    // lse: [N] f32 (written on the last chunk)
@group(0) @binding(6) var<uniform> p: Params;

const WG: u32 = 256u;
const NEG: f32 = -3.0e38;
var<workgroup> pm: array<f32, WG>;
var<workgroup> ps: array<f32, WG>;

fn z(row: u32, c: u32) -> f32 {
    var v = logits[row * p.n_cols + c];
    if (p.has_bias != 0u) {
        v += bias[p.col_start + c];
    }
    return v;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = linear_id(wg, nwg);
    if (row >= p.n_rows) {
        return;
    }
    var m = NEG;
    var s = 0.0;
    for (var c = li; c < p.n_cols; c += WG) {
        let v = z(row, c);
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
    }
    pm[li] = m;
    ps[li] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            let m1 = pm[li];
            let m2 = pm[li + stride];
            let mm = max(m1, m2);
            ps[li] = ps[li] * exp(m1 - mm) + ps[li + stride] * exp(m2 - mm);
            pm[li] = mm;
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let mc = pm[0];
        let sc = ps[0];
        var st = vec4<f32>(mc, sc, 0.0, 0.0);
        if (p.first == 0u) {
            st = state[row];
            let mm = max(st.x, mc);
            st.y = st.y * exp(st.x - mm) + sc * exp(mc - mm);
            st.x = mm;
        }
        let tgt = targets[row];
        if (tgt >= p.col_start && tgt < p.col_start + p.n_cols) {
            st.z = z(row, tgt - p.col_start);
        }
        state[row] = st;
        if (p.last != 0u) {
            let l = st.x + log(st.y);
            lse[row] = l;
            logp[row] = st.z - l;
        }
    }
}
