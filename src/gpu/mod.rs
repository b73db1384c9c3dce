//! Our own forward and backward passes in WGSL through wgpu (Vulkan, Metal, DX12).
//!
//! `device` picks the adapter and owns the shared device; `registry` compiles kernels from
//! `kernels/*.wgsl` once; `buffer` holds tensors, uploads, readbacks and batched dispatches;
//! `ops/` has one launcher per kernel family, each with its CPU reference and tests; `forward`
//! and `backward` are the whole-model passes; `memory` plans a run's device memory before
//! anything is allocated; `profile` is an opt-in breakdown of GPU time per kernel family.
//!
//! The wgpu, WGSL and lavapipe facts this relies on (requested limits, binding sizes, packed
//! halves, subgroups, watchdogs): `docs/wgpu.md`.

pub mod backward;
pub mod buffer;
pub mod device;
pub mod forward;
pub mod memory;
pub mod ops;
pub mod profile;
pub mod registry;

pub use buffer::{Bind, GpuBuf, Recorder, groups};
pub use device::{AdapterSummary, DeviceOptions, Gpu, GpuError};
pub use registry::{KernelSource, Pipeline};

/// The shared device for tests and benches. Panics with instructions when no adapter exists:
/// GPU tests must never skip silently.
#[doc(hidden)]
pub fn test_device() -> std::sync::Arc<Gpu> {
    match Gpu::shared() {
        Ok(g) => g,
        Err(e) => panic!(
            "GPU tests need a wgpu adapter: {e}\nOn Debian/Ubuntu install lavapipe (software Vulkan): sudo apt-get install mesa-vulkan-drivers"
        ),
    }
}
