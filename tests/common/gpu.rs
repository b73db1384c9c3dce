//! The shared GPU device for integration tests (fails loudly without an adapter).

pub use bfpo_lite::gpu::test_device as gpu;
