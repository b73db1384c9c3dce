//! One launcher per kernel family, each beside its CPU reference and tests.

pub mod adamw;
pub mod add;
pub mod lora;
pub mod matmul;
