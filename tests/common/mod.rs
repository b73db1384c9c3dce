//! Shared helpers for integration tests: one `pub mod` line per helper module.
#![allow(dead_code, unused_imports)]

pub mod gemma3;
pub mod gpu;
pub mod models;
pub mod smollm2;
pub mod tune;
