//! GGUF writer whose output llama.cpp's strict loader accepts (`docs/gguf.md` §1.1).
//!
//! Layout written: magic, version 3, counts, KVs in insertion order, tensor infos, zero padding to
//! the alignment, then the tensors contiguous in declared order, each padded with zeros to the
//! alignment, so tensor i has data offset Σ_{j<i} PAD(nbytes_j).

use super::read::{GgufError, MAGIC, MAX_DIMS, align_up, tensor_n_bytes};
use super::value::{Value, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_TENSOR_NAME};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

const ALIGNMENT_KEY: &str = "general.alignment";

struct PendingTensor<'a> {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF v3 file: metadata, then tensors contiguous in declared order, each padded to the
/// alignment. Tensor data may borrow (e.g. from a memory-mapped source model).
pub struct GgufWriter<'a> {
    alignment: u64,
    kvs: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_names: HashMap<String, usize>,
    /// The first invalid value or alignment given to `set`/`with_alignment` (reported on write).
    deferred: Option<String>,
}

/// Checks that a value can be encoded: array elements match the declared element type, which is
/// not itself an array.
fn check_value(key: &str, v: &Value) -> Result<(), String> {
    if let Value::Array(elem, items) = v {
        if *elem == ValueType::Array {
            return Err(format!(
                "metadata key {key:?}: nested arrays are not allowed in GGUF"
            ));
        }
        if let Some((k, bad)) = items
            .iter()
            .enumerate()
            .find(|(_, x)| x.value_type() != *elem)
        {
            return Err(format!(
                "metadata key {key:?}: array of {} has a {} at element {k}",
                elem.name(),
                bad.value_type().name()
            ));
        }
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (no type id); arrays write element type, count and elements.
fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(elem, items) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            key_index: HashMap::new(),
            tensors: Vec::new(),
            tensor_names: HashMap::new(),
            deferred: None,
        }
    }

    /// Writes `general.alignment` (u32) when `alignment != 32`. An alignment that is not a power
    /// of two fitting in a u32 is reported by `write_to`/`write_file`/`try_to_bytes`.
    pub fn with_alignment(alignment: u64) -> Self {
        let mut w = Self::new();
        match u32::try_from(alignment) {
            Ok(a) => {
                w.set(ALIGNMENT_KEY, Value::U32(a));
            }
            Err(_) => {
                w.deferred = Some(format!(
                    "alignment {alignment} does not fit in a u32 (general.alignment is a u32)"
                ));
            }
        }
        w
    }

    /// The tensor-data alignment this writer uses.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Adds or replaces a key (keys keep their first insertion position).
    ///
    /// Setting `general.alignment` changes the alignment (it must be a u32 power of two; when it
    /// is 32 the key is not written, as llama.cpp's default). A malformed value (an array whose
    /// elements do not all have its element type, or a nested array) is reported when writing.
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        let key = key.into();
        if let Err(e) = check_value(&key, &value) {
            self.deferred.get_or_insert(e);
            return self;
        }
        if key == ALIGNMENT_KEY {
            match value {
                Value::U32(a) if a.is_power_of_two() => {
                    self.alignment = a as u64;
                    if a as u64 == DEFAULT_ALIGNMENT {
                        self.remove(ALIGNMENT_KEY);
                        return self;
                    }
                }
                ref other => {
                    self.deferred.get_or_insert(format!(
                        "general.alignment must be a u32 power of two, got {} {}",
                        other.value_type().name(),
                        other.summary(32)
                    ));
                    return self;
                }
            }
        }
        match self.key_index.get(&key) {
            Some(&i) => self.kvs[i].1 = value,
            None => {
                self.key_index.insert(key.clone(), self.kvs.len());
                self.kvs.push((key, value));
            }
        }
        self
    }

    /// Removes a key if present.
    pub fn remove(&mut self, key: &str) -> &mut Self {
        if let Some(i) = self.key_index.remove(key) {
            self.kvs.remove(i);
            for v in self.key_index.values_mut() {
                if *v > i {
                    *v -= 1;
                }
            }
        }
        self
    }

    /// The value set for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.kvs[i].1)
    }

    /// Adds a tensor; checks the name length, dims, and that `data.len()` matches ne and type.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ne: &[u64],
        type_id: u32,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let data = data.into();
        let invalid = |detail: String| GgufError::Invalid {
            what: format!("tensor {name:?}"),
            offset: 0,
            detail: format!("cannot add to GGUF writer: {detail}"),
        };
        if name.len() >= MAX_TENSOR_NAME {
            return Err(invalid(format!(
                "name is {} bytes; must be shorter than {MAX_TENSOR_NAME} (GGML_MAX_NAME)",
                name.len()
            )));
        }
        if self.tensor_names.contains_key(&name) {
            return Err(invalid("a tensor with this name was already added".into()));
        }
        if ne.is_empty() || ne.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "{} dimensions given; 1 to {MAX_DIMS} allowed",
                ne.len()
            )));
        }
        let n_bytes = tensor_n_bytes(ne, type_id).map_err(invalid)?;
        if data.len() as u64 != n_bytes {
            return Err(invalid(format!(
                "data is {} bytes but ne {ne:?} of type {} needs {n_bytes} bytes",
                data.len(),
                super::types::type_name(type_id)
            )));
        }
        self.tensor_names.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor {
            name,
            ne: ne.to_vec(),
            type_id,
            data,
        });
        Ok(self)
    }

    fn check(&self) -> Result<(), GgufError> {
        match &self.deferred {
            Some(e) => Err(GgufError::Other(format!("GGUF writer: {e}"))),
            None => Ok(()),
        }
    }

    /// Everything before the data section: header, KVs, tensor infos, padding.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_string(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for &n in &t.ne {
                out.extend_from_slice(&n.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += self.padded(t.data.len() as u64);
        }
        let end = self.padded(out.len() as u64);
        out.resize(end as usize, 0);
        out
    }

    fn padded(&self, n: u64) -> u64 {
        // Sizes come from in-memory buffers, far below u64::MAX.
        align_up(n, self.alignment).unwrap_or(u64::MAX)
    }

    /// Writes the whole file to `w`; returns the number of bytes written.
    pub fn write_to<W: std::io::Write>(&self, w: &mut W) -> Result<u64, GgufError> {
        self.check()?;
        let io = |source| GgufError::Io {
            path: "<GGUF writer output>".into(),
            source,
        };
        let header = self.header();
        w.write_all(&header).map_err(io)?;
        let mut total = header.len() as u64;
        for t in &self.tensors {
            w.write_all(&t.data).map_err(io)?;
            let n = t.data.len() as u64;
            let pad = self.padded(n) - n;
            std::io::copy(&mut std::io::Read::take(std::io::repeat(0), pad), w).map_err(io)?;
            total += n + pad;
        }
        Ok(total)
    }

    /// The whole file in memory, or the first invalid value/alignment given to `set`.
    pub fn try_to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// The whole file in memory.
    ///
    /// # Panics
    /// If `set` or `with_alignment` was given something that cannot be encoded (a mixed or
    /// nested array, a bad alignment); use [`GgufWriter::try_to_bytes`] to get that as an error.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self.try_to_bytes() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Writes to `path` through a temporary file in the same folder and a rename
    /// ([`crate::util::fs::write_atomic`]).
    pub fn write_file(&self, path: &Path) -> Result<(), GgufError> {
        use crate::util::fs::{AtomicError, write_atomic};
        self.check()?;
        write_atomic(path, |mut w| self.write_to(&mut w).map(|_| ())).map_err(|e| match e {
            AtomicError::Io { path, source } => GgufError::Io { path, source },
            AtomicError::Write(GgufError::Io { source, .. }) => GgufError::Io {
                path: path.to_path_buf(),
                source,
            },
            AtomicError::Write(other) => other,
        })
    }
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for GgufWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("alignment", &self.alignment)
            .field("n_kv", &self.kvs.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}
