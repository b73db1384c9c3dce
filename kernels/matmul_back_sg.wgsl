// matmul_back.wgsl with dy loaded through subgroups: for eight rows of a token, lane k of every
// subgroup (k < 8) loads row r + k's dy (one load, neighbouring lanes reading neighbouring words)
// and subgroupBroadcast hands all 8 to every lane. Needs the SUBGROUP feature and subgroups of at
// least 8 lanes (the launcher checks both and falls back to matmul_back.wgsl). Same sums in the
// same order as matmul_back.wgsl: identical results.
#include "matmul_back_common.wgsl"

@group(0) @binding(0) var<storage, read> dy: array<f32>;          // dy: [T, dy_stride] f32

fn dy8(d: u32, r: u32, k: u32) -> E8 {
    let v = dy[d + r + k];
    return E8(
        vec4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u)),
        vec4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)),
    );
}

@compute @workgroup_size(32)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    matmul_back_body(wg, lid, sid & 7u);
}
