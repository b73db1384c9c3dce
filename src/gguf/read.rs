//! Memory-mapped GGUF reader with validation. (Stub API; implementation pending.)

use super::types::GgmlType;
use super::value::Value;
use std::path::{Path, PathBuf};

/// Everything that can be wrong with a GGUF file; each variant names the key or tensor and the
/// byte offset where the problem was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: file is {file_len} bytes, needs {needed} bytes at offset {offset}")]
    Truncated {
        context: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("not a GGUF file: magic bytes {found:02x?} at offset 0 (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} at offset 4 (supported: 2, 3)")]
    BadVersion { version: u32 },
    #[error("{what} at offset {offset}: {detail}")]
    Invalid {
        what: String,
        offset: u64,
        detail: String,
    },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "tensor {tensor:?} has type {type_name}, which bfpo-lite cannot train on; supported: {supported}; re-quantize the model with llama-quantize (e.g. to Q8_0 or Q4_K_M)"
    )]
    UnsupportedType {
        tensor: String,
        type_name: String,
        supported: String,
    },
    #[error("{0}")]
    Other(String),
}

/// One tensor's header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (`ne[0]` = row length).
    pub ne: Vec<u64>,
    pub type_id: u32,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: u64,
    /// Where this tensor's info record starts in the file (for error messages).
    pub info_offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The supported type of this tensor, or a clear error naming it.
    pub fn ggml_type(&self) -> Result<GgmlType, GgufError> {
        GgmlType::from_id(self.type_id).ok_or_else(|| GgufError::UnsupportedType {
            tensor: self.name.clone(),
            type_name: super::types::type_name(self.type_id),
            supported: GgmlType::supported_list(),
        })
    }

    pub fn type_name(&self) -> String {
        super::types::type_name(self.type_id)
    }
}

/// A validated GGUF file, memory-mapped (or held in memory), with zero-copy tensor views.
pub struct GgufFile {
    _todo: (),
}

impl GgufFile {
    pub fn open(_path: &Path) -> Result<GgufFile, GgufError> {
        todo!()
    }
    pub fn from_bytes(_bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        todo!()
    }
    pub fn path(&self) -> Option<&Path> {
        todo!()
    }
    pub fn version(&self) -> u32 {
        todo!()
    }
    pub fn alignment(&self) -> u64 {
        todo!()
    }
    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        todo!()
    }
    /// Whole file bytes.
    pub fn bytes(&self) -> &[u8] {
        todo!()
    }
    /// Metadata in file order.
    pub fn kvs(&self) -> &[(String, Value)] {
        todo!()
    }
    pub fn get(&self, _key: &str) -> Option<&Value> {
        todo!()
    }
    pub fn get_str(&self, _key: &str) -> Result<&str, GgufError> {
        todo!()
    }
    pub fn get_u32(&self, _key: &str) -> Result<u32, GgufError> {
        todo!()
    }
    pub fn get_f32(&self, _key: &str) -> Result<f32, GgufError> {
        todo!()
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        todo!()
    }
    pub fn tensor(&self, _name: &str) -> Option<&TensorInfo> {
        todo!()
    }
    /// Zero-copy bytes of a tensor (validated to lie within the file).
    pub fn tensor_bytes(&self, _t: &TensorInfo) -> &[u8] {
        todo!()
    }
}
