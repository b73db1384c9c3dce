// Second pass of the split-K forward matmul (matmul.wgsl / matmul_sg.wgsl with several K chunks):
// y[t, c] = (accumulate ? y[t, c] : 0) + Σ_z part[z, t, r] (+ bias[r]), the partial sums of the
// n_parts K chunks added in increasing z (a fixed order: results are deterministic and do not
// depend on the number of tokens), then the bias, then the old y, as the unsplit kernel does.
//
// Layout: part is [n_parts, n_tokens, n_rows] f32 (part_stride = n_tokens·n_rows elements per
// chunk). One invocation per output: workgroup (x, t) covers rows 64x .. 64x + 63 of token t, so
// neighbouring invocations read and write neighbouring words. Row r goes to y column y_col0 + r.

struct Params {
    n_rows: u32,      // rows (outputs per token) in this dispatch
    n_tokens: u32,    // tokens in this dispatch
    n_parts: u32,     // K chunks to add
    part_stride: u32, // elements between chunks in part
    y_stride: u32,    // elements per row of y
    y_col0: u32,      // y column of row 0
    bias0: u32,       // bias index of row 0
    flags: u32,       // bit 0: accumulate into y; bit 1: add bias
}

@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read> bias: array<f32>;     // unused without flag
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // y: [T, y_stride] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x * 64u + lid.x;
    let t = wg.y;
    if (r >= p.n_rows || t >= p.n_tokens) {
        return;
    }
    var v = 0.0;
    var i = t * p.n_rows + r;
    for (var z = 0u; z < p.n_parts; z++) {
        v += part[i];
        i += p.part_stride;
    }
    if ((p.flags & 2u) != 0u) {
        v += bias[p.bias0 + r];
    }
    let o = t * p.y_stride + p.y_col0 + r;
    if ((p.flags & 1u) != 0u) {
        v += y[o];
    }
    y[o] = v;
}
