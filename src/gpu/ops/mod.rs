//! One launcher per kernel family, each beside its CPU reference and tests.

pub mod adamw;
pub mod add;
pub mod attention;
pub mod attention_back;
pub(crate) mod check;
pub mod dropout;
pub mod embedding;
pub mod geglu;
pub mod logprob;
pub mod logprob_back;
pub mod lora;
pub mod matmul;
pub mod rmsnorm;
pub mod rmsnorm_back;
pub mod rope;
pub mod rope_back;
pub mod swiglu;
pub mod swiglu_back;
