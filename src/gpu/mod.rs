//! Our own forward and backward passes in WGSL through wgpu. (Pending.)
