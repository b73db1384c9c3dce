//! One launcher per kernel family, each beside its CPU reference and tests.

pub mod adamw;
pub mod add;
pub mod attention;
pub(crate) mod check;
pub mod embedding;
pub mod logprob;
pub mod lora;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
