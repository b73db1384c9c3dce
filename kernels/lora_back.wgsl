// LoRA weight gradients. Forward (per token t, row vectors):
//   u = x·Aᵀ          u: [T, rank], A: [rank, n_in]
//   y = x·Wᵀ + s·u·Bᵀ  B: [n_out, rank], s = alpha / rank
// With dy = ∂L/∂y:
//   ∂L/∂B[o, r] = s·Σ_t dy[t, o]·u[t, r]      grad_b += s·dyᵀ·u          (this kernel)
//   ∂L/∂u[t, r] = s·Σ_o dy[t, o]·B[o, r]      du = s·dy·B                 (lora.wgsl)
//   ∂L/∂A[r, i] = Σ_t du[t, r]·x[t, i]        grad_a += duᵀ·x             (this kernel)
//   ∂L/∂x[t, i] += Σ_r du[t, r]·A[r, i]       dx += du·A                  (lora.wgsl)
//
// This kernel, for one chunk of tokens [c·chunk, min((c + 1)·chunk, T)) per workgroup row c:
//   S_c[b, r] = Σ_{t in chunk c} big[t·s_big + b]·small[t·s_small + r]     b < n_big, r < rank
// (grad_b: big = dy, small = u; grad_a: big = x, small = du), stored at b·g_b + r·g_r either
// as G += alpha·S_0 (flags bit 0, one chunk) or as the partial S_c at c·part_stride in scratch,
// which lora_sum.wgsl then adds into G in chunk order.
//
// A workgroup owns 128 columns b of one chunk: invocation x owns columns x and x + 64
// (neighbouring invocations read neighbouring words of big; all read the same words of small)
// and sums the chunk's tokens in increasing order. No workgroup memory, no barriers: the chunks
// give the parallelism. Deterministic: no atomics, a fixed order that depends only on T and the
// chunk size.

struct Params {
    n_big: u32,       // columns of big
    rank: u32,        // columns of small
    t: u32,           // tokens
    s_big: u32,       // elements per token row of big
    s_small: u32,     // elements per token row of small
    g_b: u32,         // G element stride along b
    g_r: u32,         // G element stride along r
    chunk: u32,       // tokens per chunk
    alpha: f32,       // scale (flags bit 0 only)
    flags: u32,       // bit 0: accumulate alpha·S into G (else write the partial S_c)
    part_stride: u32, // elements per partial in scratch
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> big: array<f32>;       // [T, s_big] f32
// [T, s_small] f32, as vec4<f32> (SMALL_W = 4) when s_small and rank are multiples of 4
@group(0) @binding(1) var<storage, read> small: array<${SMALL_T}>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // G, or the partials
@group(0) @binding(3) var<uniform> p: Params;

const SMALL_W: u32 = ${SMALL_W}; // f32 words per element of small

// small[so + r .. so + r + 4] (so a token row's first word), ranks past the last clamped to it.
// Both branches type-check for either element type; the constant picks one.
fn small4(so: u32, r: u32) -> vec4<f32> {
    if (SMALL_W == 4u) {
        return vec4<f32>(small[(so + min(r, p.rank - 4u)) / 4u]);
    }
    let m = p.rank - 1u;
    return vec4<f32>(
        vec4<f32>(small[so + min(r, m)]).x,
        vec4<f32>(small[so + min(r + 1u, m)]).x,
        vec4<f32>(small[so + min(r + 2u, m)]).x,
        vec4<f32>(small[so + min(r + 3u, m)]).x
    );
}

fn put(c: u32, b: u32, r: u32, s: f32) {
    if (b < p.n_big && r < p.rank) {
        let o = b * p.g_b + r * p.g_r;
        if ((p.flags & 1u) != 0u) {
            out[o] = out[o] + p.alpha * s;
        } else {
            out[c * p.part_stride + o] = s;
        }
    }
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ba = wg.x * 128u + lid.x;
    let bb = ba + 64u;
    // Out-of-range columns and ranks re-read the last valid one and are not written.
    let ca = min(ba, p.n_big - 1u);
    let cb = min(bb, p.n_big - 1u);
    let t0 = wg.y * p.chunk;
    let t1 = min(t0 + p.chunk, p.t);
    // Ranks in blocks of 8 (16 accumulators: few enough for a CPU device's registers).
    for (var r0 = 0u; r0 < p.rank; r0 += 8u) {
        var acc_a: array<vec4<f32>, 2>; // acc_a[q][e]: column ba, rank r0 + 4q + e
        var acc_b: array<vec4<f32>, 2>; // column bb
        for (var q = 0u; q < 2u; q++) {
            acc_a[q] = vec4<f32>(0.0);
            acc_b[q] = vec4<f32>(0.0);
        }
        for (var t = t0; t < t1; t++) {
            let bo = t * p.s_big;
            let va = big[bo + ca];
            let vb = big[bo + cb];
            let so = t * p.s_small;
            for (var q = 0u; q < 2u; q++) {
                let w = small4(so, r0 + 4u * q);
                acc_a[q] += va * w;
                acc_b[q] += vb * w;
            }
        }
        for (var q = 0u; q < 2u; q++) {
            for (var e = 0u; e < 4u; e++) {
                put(wg.y, ba, r0 + 4u * q + e, acc_a[q][e]);
                put(wg.y, bb, r0 + 4u * q + e, acc_b[q][e]);
            }
        }
    }
}
