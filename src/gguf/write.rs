//! GGUF writer whose output llama.cpp's strict loader accepts. (Stub API; implementation pending.)

use super::read::GgufError;
use super::value::Value;
use std::borrow::Cow;
use std::path::Path;

/// Builds a GGUF v3 file: metadata, then tensors contiguous in declared order, each padded to the
/// alignment. Tensor data may borrow (e.g. from a memory-mapped source model).
pub struct GgufWriter<'a> {
    _todo: std::marker::PhantomData<Cow<'a, [u8]>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        todo!()
    }
    /// Writes `general.alignment` (u32) when `alignment != 32`.
    pub fn with_alignment(_alignment: u64) -> Self {
        todo!()
    }
    /// Adds or replaces a key (keys keep their first insertion position).
    pub fn set(&mut self, _key: impl Into<String>, _value: Value) -> &mut Self {
        todo!()
    }
    /// Adds a tensor; checks the name length, dims, and that `data.len()` matches ne and type.
    pub fn add_tensor(
        &mut self,
        _name: impl Into<String>,
        _ne: &[u64],
        _type_id: u32,
        _data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self, GgufError> {
        todo!()
    }
    pub fn write_to<W: std::io::Write>(&self, _w: &mut W) -> Result<u64, GgufError> {
        todo!()
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        todo!()
    }
    /// Writes to `path` through a temporary file in the same folder and a rename.
    pub fn write_file(&self, _path: &Path) -> Result<(), GgufError> {
        todo!()
    }
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}
