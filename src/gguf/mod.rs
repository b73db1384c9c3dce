//! GGUF files: reading (memory-mapped, validated), writing, type ids and CPU (de)quantization.
//!
//! Layout facts: `docs/gguf.md`. The reader validates every count, length and offset
//! against the file size before allocating, and never panics on malformed input.

pub mod quant;
pub mod read;
pub mod types;
pub mod value;
pub mod write;

pub use read::{GgufError, GgufFile, TensorInfo};
pub use types::{GgmlType, TypeInfo, type_info, type_name};
pub use value::{Value, ValueType};
pub use write::GgufWriter;

/// Default tensor-data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_NAME`: tensor names must be shorter than this many bytes.
pub const MAX_TENSOR_NAME: usize = 64;
