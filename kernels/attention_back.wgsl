// Backward of causal GQA attention (kernels/attention.wgsl), recomputing the probabilities from
// the forward's per-row log-sum-exp (no [L, L] matrix is stored). Per query head h with KV head
// g = h / (n_head / n_head_kv), query row i and key row j ≤ i of the same sequence (i, j < len):
//   S[i,j]  = scale·q_i·k_j,   P[i,j] = exp(S[i,j] − lse_i)
//   dP[i,j] = dO_i·v_j,        D_i = Σ_j P[i,j]·dP[i,j] = dO_i·O_i   (attention_back_delta.wgsl)
//   dS[i,j] = P[i,j]·(dP[i,j] − D_i)
//   dq_i    = scale·Σ_{j≤i} dS[i,j]·k_j
//   dk_j    = Σ_{h ∈ group(g)} Σ_{j≤i<len} dS[i,j]·(scale·q_i)
//   dv_j    = Σ_{h ∈ group(g)} Σ_{j≤i<len} P[i,j]·dO_i
// Padding rows (i ≥ len) get zero gradients.
//
// Tiled (FlashAttention-2-style backward). A workgroup owns a block of NA rows of one sequence
// and one head ("own" rows): PASS 0 owns query rows of a query head and computes their dq;
// PASS 1 owns key rows of a KV head and computes their dk and dv. Its own rows (q·scale and dO,
// or k and v) are staged once in workgroup memory; the other side is streamed through
// workgroup memory NB rows at a time (PASS 0: the keys j ≤ the block's last query, in order;
// PASS 1: for each head of the group in order, the queries i ≥ the block's first key, in order).
// For each streamed tile, the NA×NB probabilities and dS are computed (each by one invocation)
// into workgroup memory, then each own output element (row, vec4 of head_dim) is accumulated by
// one invocation over the tile's rows in order. Every output element is thus summed by one
// invocation in a fixed order that depends only on the sequence and the tile sizes (not on how
// the launcher splits dispatches): deterministic, no atomics. Masked pairs (j > i, i ≥ len, or
// i − j ≥ window when the window is nonzero)
// contribute exact zeros. Tile rows are padded by one vec4 (row stride HD4 + 1) so neighbouring
// invocations reading different rows hit different banks. No subgroup operations.
//
// Both passes are reachable from `main`, so both use the same bind-group layout (PASS 0 binds any
// spare buffer as out_b).
#include "common.wgsl"

struct Params {
    n_seq: u32,      // sequences B
    seq_len: u32,    // padded length L
    n_head: u32,     // query heads
    n_head_kv: u32,  // KV heads (divides n_head)
    blk_start: u32,  // first block of this dispatch (block kb of NA own rows of sequence b: kb·B + b)
    n_blk: u32,      // blocks in this dispatch (× heads of the pass = workgroups)
    scale: f32,      // score scale (1/√head_dim unless the model says otherwise)
    window: u32,     // 0: causal; else query i also sees only keys j with i − j < window
}

const HD4: u32 = ${HD4}u;   // head_dim / 4
const PASS: u32 = ${PASS}u; // 0: dq; 1: dk, dv
const NA: u32 = ${NA}u;     // own rows per workgroup
const NB: u32 = ${NB}u;     // streamed rows per tile
const PA: u32 = ${PA}u;     // own rows per invocation in the pair step
const PB: u32 = ${PB}u;     // streamed rows per invocation in the pair step
const GA: u32 = NA / PA;    // groups of own rows (invocation li < GA·GB takes li / GB)
const GB: u32 = NB / PB;    // groups of streamed rows (li % GB)
const WG: u32 = 32u;        // invocations per workgroup
const RS: u32 = HD4 + 1u;   // padded tile row stride, in vec4
const NOUT: u32 = (NA * HD4 + WG - 1u) / WG;  // own output vec4s per invocation
const A_LEN: u32 = NA * RS;
const B_LEN: u32 = NB * RS;
const LD_LEN: u32 = max(NA, NB);
const P_LEN: u32 = NA * NB;

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;          // q: [T, n_head, head_dim] f32 (after rope)
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;          // k: [T, n_head_kv, head_dim] f32 (after rope)
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;          // v: [T, n_head_kv, head_dim] f32
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;       // dout: [T, n_head, head_dim] f32
@group(0) @binding(4) var<storage, read> lsed: array<vec2<f32>>;       // lsed: [T, n_head] (lse, D)
@group(0) @binding(5) var<storage, read> lens: array<u32>;             // lens: [B] u32
@group(0) @binding(6) var<storage, read_write> out_a: array<vec4<f32>>; // PASS 0: dq [T, n_head, hd]; PASS 1: dk [T, n_head_kv, hd]
@group(0) @binding(7) var<storage, read_write> out_b: array<vec4<f32>>; // PASS 1: dv [T, n_head_kv, hd] (PASS 0: unused)
@group(0) @binding(8) var<uniform> p: Params;

// Own rows: PASS 0 q·scale and dO; PASS 1 k and v.
var<workgroup> a0: array<vec4<f32>, A_LEN>;
var<workgroup> a1: array<vec4<f32>, A_LEN>;
// Streamed rows: PASS 0 k and v; PASS 1 q·scale and dO.
var<workgroup> b0: array<vec4<f32>, B_LEN>;
var<workgroup> b1: array<vec4<f32>, B_LEN>;
// (lse, D) of the query rows: own (PASS 0) or streamed (PASS 1).
var<workgroup> ld: array<vec2<f32>, LD_LEN>;
// P and dS of the tile, [NA, NB] (P is only used by PASS 1).
var<workgroup> pt: array<f32, P_LEN>;
var<workgroup> dst: array<f32, P_LEN>;

// Computes P and dS for the tile's pairs (own row a, streamed row bb), each invocation a PA × PB
// block of them (own rows ag + m·GA, streamed rows bg + n·GB), so every row read from workgroup
// memory serves PB (or PA) dot products. Query index qi and key index kj come from the pass;
// masked pairs get 0.
fn tile_pairs(li: u32, r0: u32, sb0: u32, len: u32) {
    if (li < GA * GB) {
        let ag = li / GB;
        let bg = li % GB;
        var s4: array<vec4<f32>, PA * PB>;
        var dp4: array<vec4<f32>, PA * PB>;
        for (var c = 0u; c < PA * PB; c++) {
            s4[c] = vec4<f32>(0.0);
            dp4[c] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < HD4; d++) {
            var x0: array<vec4<f32>, PA>;
            var x1: array<vec4<f32>, PA>;
            for (var m = 0u; m < PA; m++) {
                x0[m] = a0[(ag + m * GA) * RS + d];
                x1[m] = a1[(ag + m * GA) * RS + d];
            }
            for (var n = 0u; n < PB; n++) {
                let y0 = b0[(bg + n * GB) * RS + d];
                let y1 = b1[(bg + n * GB) * RS + d];
                for (var m = 0u; m < PA; m++) {
                    s4[m * PB + n] += x0[m] * y0;
                    dp4[m * PB + n] += x1[m] * y1;
                }
            }
        }
        for (var m = 0u; m < PA; m++) {
            for (var n = 0u; n < PB; n++) {
                let a = ag + m * GA;
                let bb = bg + n * GB;
                var qi: u32;
                var kj: u32;
                var l: vec2<f32>;
                if (PASS == 0u) {
                    qi = r0 + a;
                    kj = sb0 + bb;
                    l = ld[a];
                } else {
                    qi = sb0 + bb;
                    kj = r0 + a;
                    l = ld[bb];
                }
                let c = m * PB + n;
                let s = (s4[c].x + s4[c].y) + (s4[c].z + s4[c].w);
                let dp = (dp4[c].x + dp4[c].y) + (dp4[c].z + dp4[c].w);
                let pr = exp(s - l.x);
                let ok = qi < len && kj <= qi && (p.window == 0u || qi - kj < p.window);
                pt[a * NB + bb] = select(0.0, pr, ok);
                dst[a * NB + bb] = select(0.0, pr * (dp - l.y), ok);
            }
        }
    }
}

// Own output vec4 n of invocation li: (row, vec4 column) = (e / HD4, e % HD4), e = li + n·WG.
// When WG is a multiple of HD4 the column is li % HD4 for every n, so each streamed row is read
// once per invocation.
// `which` 0: dS and streamed tile b0; 1: P and b1.
fn acc_step(li: u32, n: u32, bb: u32, y: vec4<f32>, which: u32) -> vec4<f32> {
    var a: u32;
    var d: u32;
    if (WG % HD4 == 0u) {
        a = li / HD4 + n * (WG / HD4);
        d = li % HD4;
    } else {
        let e = li + n * WG;
        a = e / HD4;
        d = e % HD4;
    }
    if (a >= NA) {
        return vec4<f32>(0.0);
    }
    var w: f32;
    var x: vec4<f32>;
    if (which == 0u) {
        w = dst[a * NB + bb];
        x = b0[bb * RS + d];
    } else {
        w = pt[a * NB + bb];
        x = b1[bb * RS + d];
    }
    if (WG % HD4 == 0u) {
        x = y;
    }
    return w * x;
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = linear_id(wg, nwg);
    var heads = p.n_head_kv;
    if (PASS == 0u) {
        heads = p.n_head;
    }
    if (g >= heads * p.n_blk) {
        return;
    }
    let h = g / p.n_blk;                  // PASS 0: query head; PASS 1: KV head
    let blk = p.blk_start + g % p.n_blk;
    // Blocks are numbered block-major (kb · B + b), so a dispatch holds blocks of similar
    // loop lengths from every sequence.
    let b = blk % p.n_seq;
    let r0 = (blk / p.n_seq) * NA;        // first own row, within the sequence
    let na = min(NA, p.seq_len - r0);     // own rows of this block inside the sequence
    let len = min(lens[b], p.seq_len);
    let row0 = b * p.seq_len;
    let group = p.n_head / p.n_head_kv;
    let hrow = select(p.n_head_kv, p.n_head, PASS == 0u); // heads per row of the own tensors

    // Stage the own rows (zeros past len).
    for (var e = li; e < NA * HD4; e += WG) {
        let r = e / HD4;
        let d = e % HD4;
        let i = r0 + r;
        var x0 = vec4<f32>(0.0);
        var x1 = vec4<f32>(0.0);
        if (r < na && i < len) {
            let o = ((row0 + i) * hrow + h) * HD4 + d;
            if (PASS == 0u) {
                x0 = q[o] * p.scale;
                x1 = dout[o];
            } else {
                x0 = k[o];
                x1 = v[o];
            }
        }
        a0[r * RS + d] = x0;
        a1[r * RS + d] = x1;
    }
    if (PASS == 0u) {
        for (var r = li; r < NA; r += WG) {
            let i = r0 + r;
            var l = vec2<f32>(0.0);
            if (r < na && i < len) {
                l = lsed[(row0 + i) * p.n_head + h];
            }
            ld[r] = l;
        }
    }

    var acc0: array<vec4<f32>, NOUT>;
    var acc1: array<vec4<f32>, NOUT>;
    for (var n = 0u; n < NOUT; n++) {
        acc0[n] = vec4<f32>(0.0);
        acc1[n] = vec4<f32>(0.0);
    }

    if (PASS == 0u) {
        // Keys 0 ..= the block's last valid query, NB at a time.
        let kv = h / group;
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
                    let o = ((row0 + j) * p.n_head_kv + kv) * HD4 + d;
                    x0 = k[o];
                    x1 = v[o];
                }
                b0[r * RS + d] = x0;
                b1[r * RS + d] = x1;
            }
            workgroupBarrier();
            tile_pairs(li, r0, j0, len);
            workgroupBarrier();
            for (var bb = 0u; bb < NB; bb++) {
                let y0 = b0[bb * RS + li % HD4];
                for (var n = 0u; n < NOUT; n++) {
                    acc0[n] += acc_step(li, n, bb, y0, 0u);
                }
            }
        }
    } else {
        // For each query head of the group, queries from the block's first key to len, NB at a
        // time.
        for (var hh = 0u; hh < group; hh++) {
            let qh = h * group + hh;
            for (var i0 = r0; i0 < len; i0 += NB) {
                workgroupBarrier();
                for (var e = li; e < NB * HD4; e += WG) {
                    let r = e / HD4;
                    let d = e % HD4;
                    let i = i0 + r;
                    var x0 = vec4<f32>(0.0);
                    var x1 = vec4<f32>(0.0);
                    if (i < len) {
                        let o = ((row0 + i) * p.n_head + qh) * HD4 + d;
                        x0 = q[o] * p.scale;
                        x1 = dout[o];
                    }
                    b0[r * RS + d] = x0;
                    b1[r * RS + d] = x1;
                }
                for (var r = li; r < NB; r += WG) {
                    let i = i0 + r;
                    var l = vec2<f32>(0.0);
                    if (i < len) {
                        l = lsed[(row0 + i) * p.n_head + qh];
                    }
                    ld[r] = l;
                }
                workgroupBarrier();
                tile_pairs(li, r0, i0, len);
                workgroupBarrier();
                for (var bb = 0u; bb < NB; bb++) {
                    let y0 = b0[bb * RS + li % HD4];
                    let y1 = b1[bb * RS + li % HD4];
                    for (var n = 0u; n < NOUT; n++) {
                        acc0[n] += acc_step(li, n, bb, y0, 0u);
                        acc1[n] += acc_step(li, n, bb, y1, 1u);
                    }
                }
            }
        }
    }

    // Write the own rows inside the sequence (padding rows get the zeros they accumulated).
    for (var n = 0u; n < NOUT; n++) {
        let e = li + n * WG;
        if (e < NA * HD4) {
            let r = e / HD4;
            let d = e % HD4;
            if (r < na) {
                let o = ((row0 + r0 + r) * hrow + h) * HD4 + d;
                if (PASS == 0u) {
                    out_a[o] = acc0[n] * p.scale;
                } else {
                    out_a[o] = acc0[n];
                    out_b[o] = acc1[n];
                }
            }
        }
    }
}
