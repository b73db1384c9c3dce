// matmul.wgsl with x loaded through subgroups: for each 8-element group of a token, lane k of
// every subgroup (k < 8) loads element 8g + k (one load, neighbouring lanes reading neighbouring
// words) and subgroupBroadcast hands all 8 to every lane, instead of every lane loading all 8.
// Needs the SUBGROUP feature and subgroups of at least 8 lanes (the launcher checks both and
// falls back to matmul.wgsl). Same sums in the same order as matmul.wgsl: identical results,
// split over K chunks (workgroup z) exactly as matmul.wgsl is (see its header).
#include "matmul_common.wgsl"

@group(0) @binding(0) var<storage, read> x: array<f32>;  // x: [T, n_in] f32

fn x_row_len() -> u32 {
    return p.n_in;
}

struct X1 {
    l: vec4<f32>,
    h: vec4<f32>,
}

// Elements 8g..8g+7 of the x row at offset r, from lanes 0..7 of the subgroup.
fn bc(r: u32, g: u32, k: u32) -> X1 {
    let v = x[r + 8u * g + k];
    return X1(
        vec4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u)),
        vec4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)),
    );
}

fn load_x4(r0: u32, r1: u32, r2: u32, r3: u32, g: u32, k: u32) -> X4 {
    let a = bc(r0, g, k);
    let b = bc(r1, g, k);
    let c = bc(r2, g, k);
    let d = bc(r3, g, k);
    return X4(a.l, b.l, c.l, d.l, a.h, b.h, c.h, d.h);
}

@compute @workgroup_size(32)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    matmul_body(wg, lid, sid & 7u);
}

@compute @workgroup_size(32)
fn main_narrow(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    matmul_body_narrow(wg, lid, sid & 7u);
}
