// y[t, c] = (accumulate ? y[t, c] : 0) + Σ_i x[t, i]·W[r, i] (+ bias[r]), with W in its GGUF type
// (${WTYPE}), dequantized in registers 8 elements at a time (dequant.wgsl).
//
// One dispatch covers weight rows [row0, row0 + n_rows) of one chunk buffer and tokens
// [t0, t0 + n_tokens); row r goes to y column y_col0 + (r − row0).
//
// Layout: a workgroup of 32 invocations owns 256 rows and 8 consecutive tokens. Invocation l
// computes rows l, l + 32, …, l + 224 (neighbouring invocations take neighbouring rows) for all 8
// tokens: every x element loaded is used for 8 rows and every dequantized weight group for 8
// tokens, from registers (64 outputs per invocation). The x addresses are the same in every
// invocation of a workgroup (a broadcast; matmul_sg.wgsl instead loads each x element once per
// subgroup and broadcasts it with subgroupBroadcast). That is the GPU tile (entry point `main`);
// CPU adapters run `main_narrow` (matmul_common.wgsl's matmul_body_narrow: 4 rows × 16 tokens per
// invocation, 128 rows × 16 tokens per workgroup), which adds the same terms in the same order.
// There is no early return: out-of-range rows and
// tokens are clamped to the last valid one (the same control flow everywhere) and not written.
// Each output is summed over i in increasing 8-element groups: results are deterministic.
//
// Split-K (matmul_common.wgsl): when a weight has few rows for the device (ffn_down shapes on a
// big GPU), the launcher adds a third grid dimension over chunks of n_in: workgroup z walks only
// its chunk and writes a partial sum to a scratch buffer, and matmul_reduce.wgsl adds the chunks
// in increasing order. The chunking depends on the weight's shape and the device, never on T.
#include "matmul_common.wgsl"

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;  // x: [T, n_in] f32

fn x_row_len() -> u32 {
    return p.n_in / 4u;
}

fn load_x4(r0: u32, r1: u32, r2: u32, r3: u32, g: u32, k: u32) -> X4 {
    let o = 2u * g;
    return X4(x[r0 + o], x[r1 + o], x[r2 + o], x[r3 + o],
              x[r0 + o + 1u], x[r1 + o + 1u], x[r2 + o + 1u], x[r3 + o + 1u]);
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    matmul_body(wg, lid, 0u);
}

@compute @workgroup_size(32)
fn main_narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    matmul_body_narrow(wg, lid, 0u);
}
