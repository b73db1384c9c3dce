//! Adapter export: GGUF LoRA, PEFT safetensors, merged GGUF models.

pub mod gguf_adapter;
pub mod merge;
pub mod peft;
