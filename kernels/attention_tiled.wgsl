// Causal grouped-query attention over a padded batch, tiled for GPUs: the same results as
// kernels/attention.wgsl (see there for the layout and the formulas) up to the order of the
// online softmax's rescalings, which here happen once per key tile instead of once per key.
//
// A workgroup owns a block of NA query rows of one sequence and one head: their q·scale is staged
// once in workgroup memory, and the keys and values 0 ..= the block's last valid query stream
// through workgroup memory NB rows at a time. Per key tile: the NA×NB scores (each by one
// invocation, a PA × PB block of them per invocation); then per query row (one invocation each)
// the running max m, the rescale factor c = exp(m_old − m_new), the tile's probabilities
// exp(s − m_new) (0 where masked) and the running sum l = l·c + Σ p in key order; then each
// output element (row, vec4 column), one invocation each, o ← o·c + Σ_j p_j·v_j in key order.
// Deterministic, no atomics, no subgroup operations; rows with i ≥ lens[b] write o = 0, lse = 0.
#include "common.wgsl"

struct Params {
    n_seq: u32,      // sequences B
    seq_len: u32,    // padded length L
    n_head: u32,     // query heads
    n_head_kv: u32,  // KV heads (divides n_head)
    blk_start: u32,  // first block of this dispatch (block kb of NA rows of sequence b: kb·B + b)
    n_blk: u32,      // blocks in this dispatch (× n_head = workgroups)
    scale: f32,      // score scale (1/√head_dim unless the model says otherwise)
    window: u32,     // 0: causal; else query i also sees only keys j with i − j < window
}

const HD4: u32 = ${HD4}u;   // head_dim / 4
const NA: u32 = ${NA}u;     // query rows per workgroup
const NB: u32 = ${NB}u;     // key rows per tile
const PA: u32 = ${PA}u;     // query rows per invocation in the score step
const PB: u32 = ${PB}u;     // key rows per invocation in the score step
const GA: u32 = NA / PA;
const GB: u32 = NB / PB;
const WG: u32 = 32u;        // invocations per workgroup
const RS: u32 = HD4 + 1u;   // padded tile row stride, in vec4
const NOUT: u32 = (NA * HD4 + WG - 1u) / WG;  // output vec4s per invocation
const A_LEN: u32 = NA * RS;
const B_LEN: u32 = NB * RS;
const P_LEN: u32 = NA * NB;

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;       // q: [T, n_head, head_dim] f32 (after rope)
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;       // k: [T, n_head_kv, head_dim] f32 (after rope)
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;       // v: [T, n_head_kv, head_dim] f32
@group(0) @binding(3) var<storage, read> lens: array<u32>;          // lens: [B] u32, each ≤ L
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>; // o: [T, n_head, head_dim] f32
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;     // lse: [T, n_head] f32
@group(0) @binding(6) var<uniform> p: Params;

var<workgroup> qt: array<vec4<f32>, A_LEN>;  // q·scale of the block's rows
var<workgroup> kt: array<vec4<f32>, B_LEN>;  // the key tile
var<workgroup> vt: array<vec4<f32>, B_LEN>;  // the value tile
var<workgroup> st: array<f32, P_LEN>;        // scores, then probabilities, [NA, NB]
var<workgroup> mrow: array<f32, NA>;            // running max per row
var<workgroup> lrow: array<f32, NA>;            // running sum per row
var<workgroup> crow: array<f32, NA>;            // this tile's rescale factor per row

// Row and vec4 column of output n of invocation li (e = li + n·WG).
fn out_at(li: u32, n: u32) -> vec2<u32> {
    let e = li + n * WG;
    return vec2<u32>(e / HD4, e % HD4);
}

// Key j is visible from query i: causal, and within the sliding window when there is one.
fn visible(i: u32, j: u32) -> bool {
    return j <= i && (p.window == 0u || i - j < p.window);
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg);
    if (g >= p.n_head * p.n_blk) {
        return;
    }
    let h = g / p.n_blk;
    let blk = p.blk_start + g % p.n_blk;
    let b = blk % p.n_seq;
    let r0 = (blk / p.n_seq) * NA;
    let na = min(NA, p.seq_len - r0);
    let len = min(lens[b], p.seq_len);
    let row0 = b * p.seq_len;
    let kvh = h / (p.n_head / p.n_head_kv);

    for (var e = li; e < NA * HD4; e += WG) {
        let r = e / HD4;
        let d = e % HD4;
        let i = r0 + r;
        var x = vec4<f32>(0.0);
        if (r < na && i < len) {
            x = q[((row0 + i) * p.n_head + h) * HD4 + d] * p.scale;
        }
        qt[r * RS + d] = x;
    }
    for (var r = li; r < NA; r += WG) {
        mrow[r] = -3.0e38;
        lrow[r] = 0.0;
    }
    var acc: array<vec4<f32>, NOUT>;
    for (var n = 0u; n < NOUT; n++) {
        acc[n] = vec4<f32>(0.0);
    }

    let kend = min(r0 + na, len);
    for (var j0 = 0u; j0 < kend; j0 += NB) {
        workgroupBarrier();
        for (var e = li; e < NB * HD4; e += WG) {
            let r = e / HD4;
            let d = e % HD4;
            let j = j0 + r;
            var x0 = vec4<f32>(0.0);
            var x1 = vec4<f32>(0.0);
            if (j < kend) {
                let ko = ((row0 + j) * p.n_head_kv + kvh) * HD4 + d;
                x0 = k[ko];
                x1 = v[ko];
            }
            kt[r * RS + d] = x0;
            vt[r * RS + d] = x1;
        }
        workgroupBarrier();
        // Scores.
        if (li < GA * GB) {
            let ag = li / GB;
            let bg = li % GB;
            var s4: array<vec4<f32>, PA * PB>;
            for (var c = 0u; c < PA * PB; c++) {
                s4[c] = vec4<f32>(0.0);
            }
            for (var d = 0u; d < HD4; d++) {
                var x: array<vec4<f32>, PA>;
                for (var m = 0u; m < PA; m++) {
                    x[m] = qt[(ag + m * GA) * RS + d];
                }
                for (var n = 0u; n < PB; n++) {
                    let y = kt[(bg + n * GB) * RS + d];
                    for (var m = 0u; m < PA; m++) {
                        s4[m * PB + n] += x[m] * y;
                    }
                }
            }
            for (var m = 0u; m < PA; m++) {
                for (var n = 0u; n < PB; n++) {
                    let c = m * PB + n;
                    st[(ag + m * GA) * NB + bg + n * GB] = (s4[c].x + s4[c].y) + (s4[c].z + s4[c].w);
                }
            }
        }
        workgroupBarrier();
        // Online softmax, one invocation per row, keys in order.
        for (var r = li; r < NA; r += WG) {
            let i = r0 + r;
            let m_old = mrow[r];
            var m_new = m_old;
            for (var bb = 0u; bb < NB; bb++) {
                if (i < len && visible(i, j0 + bb)) {
                    m_new = max(m_new, st[r * NB + bb]);
                }
            }
            let c = exp(m_old - m_new);
            var l = lrow[r] * c;
            for (var bb = 0u; bb < NB; bb++) {
                var e = 0.0;
                if (i < len && visible(i, j0 + bb)) {
                    e = exp(st[r * NB + bb] - m_new);
                }
                st[r * NB + bb] = e;
                l += e;
            }
            mrow[r] = m_new;
            lrow[r] = l;
            crow[r] = c;
        }
        workgroupBarrier();
        // o ← o·c + Σ_j p_j·v_j.
        for (var n = 0u; n < NOUT; n++) {
            let at = out_at(li, n);
            if (at.x < NA) {
                var a = acc[n] * crow[at.x];
                for (var bb = 0u; bb < NB; bb++) {
                    a += st[at.x * NB + bb] * vt[bb * RS + at.y];
                }
                acc[n] = a;
            }
        }
    }
    workgroupBarrier();
    for (var n = 0u; n < NOUT; n++) {
        let at = out_at(li, n);
        let i = r0 + at.x;
        if (at.x < na) {
            var x = vec4<f32>(0.0);
            if (i < len) {
                x = acc[n] * (1.0 / lrow[at.x]);
            }
            o[((row0 + i) * p.n_head + h) * HD4 + at.y] = x;
        }
    }
    for (var r = li; r < na; r += WG) {
        let i = r0 + r;
        var x = 0.0;
        if (i < len) {
            x = mrow[r] + log(lrow[r]);
        }
        lse[(row0 + i) * p.n_head + h] = x;
    }
}
