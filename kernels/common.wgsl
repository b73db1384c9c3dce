// Shared helpers. Dispatches larger than 65,535 workgroups per dimension are split over x and y
// (see `gpu::buffer::groups`); kernels recover the flat workgroup index with `linear_id`.

// Flat index of this workgroup in a dispatch laid out by `gpu::buffer::groups`.
fn linear_id(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}
