//! Memory-mapped GGUF reader with validation.
//!
//! Layout: `docs/gguf.md` §1. Every count and length is checked against the bytes
//! that remain before anything is allocated, and all size arithmetic is checked, so malformed
//! input yields a [`GgufError`] naming the key or tensor and the byte offset, never a panic.
//! Memory use is bounded by a small multiple of the file size: a decoded [`Value`] takes 32
//! bytes, so the worst case (an array of `u8`/`i8`/`bool`) is about 32 bytes per file byte of
//! metadata; tensor data is never copied.

use super::types::{GgmlType, type_info};
use super::value::{Value, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_TENSOR_NAME};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// The magic bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

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
    #[error(
        "GGUF version field at offset 4 reads {raw:#010x}, which is version {swapped} byte-swapped: \
         this is a big-endian GGUF file, which bfpo-lite (like llama.cpp on little-endian \
         machines) does not read; convert it with gguf-py's gguf_convert_endian"
    )]
    BigEndian { raw: u32, swapped: u32 },
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
    /// Number of elements (product of `ne`; saturates instead of overflowing for hand-made infos).
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().fold(1u64, |a, &b| a.saturating_mul(b))
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

/// Bytes of a tensor of type `type_id` with dimensions `ne`, or a description of why it has none
/// (unknown type, `ne[0]` not a multiple of the block, overflow). Shared with the writer.
pub(crate) fn tensor_n_bytes(ne: &[u64], type_id: u32) -> Result<u64, String> {
    let info = type_info(type_id).ok_or_else(|| {
        format!(
            "type id {type_id} ({}) has no known block layout",
            super::types::type_name(type_id)
        )
    })?;
    for (i, &n) in ne.iter().enumerate() {
        if n > i64::MAX as u64 {
            return Err(format!("ne[{i}] = {n} does not fit in an i64"));
        }
    }
    let ne0 = ne.first().copied().unwrap_or(1);
    if ne0 % info.block_elems != 0 {
        return Err(format!(
            "ne[0] = {ne0} is not a multiple of the {} block size {}",
            info.name, info.block_elems
        ));
    }
    // ggml requires the element count (ignoring zero dims) to fit in an i64.
    let mut n_elem: u64 = 1;
    let mut n_nonzero: u64 = 1;
    for &n in ne {
        n_elem = n_elem.saturating_mul(n);
        n_nonzero = n_nonzero
            .checked_mul(n.max(1))
            .filter(|&v| v <= i64::MAX as u64)
            .ok_or_else(|| format!("element count of ne {ne:?} overflows an i64"))?;
    }
    (n_elem / info.block_elems)
        .checked_mul(info.block_bytes)
        .ok_or_else(|| format!("byte size of ne {ne:?} as {} overflows a u64", info.name))
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A validated GGUF file, memory-mapped (or held in memory), with zero-copy tensor views.
pub struct GgufFile {
    backing: Backing,
    path: Option<PathBuf>,
    version: u32,
    alignment: u64,
    data_start: u64,
    kvs: Vec<(String, Value)>,
    /// File offset of each KV record (same order as `kvs`).
    kv_offsets: Vec<u64>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.bytes().len())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .field("n_kv", &self.kvs.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let backing = if len == 0 {
            // Zero-length maps are not portable; an empty file fails validation anyway.
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only. As with every mmap-based model loader (llama.cpp
            // included), the file must not be truncated or modified while it is open; bfpo-lite
            // writes its own outputs through a temporary file and a rename, never in place.
            Backing::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        let mut f = GgufFile::parse(backing)?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }

    /// Validates a GGUF file held in memory (tests, fuzzing, small adapters).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<GgufFile, GgufError> {
        let parsed = Parser::new(backing.bytes()).parse()?;
        Ok(GgufFile {
            backing,
            path: None,
            version: parsed.version,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
            kvs: parsed.kvs,
            kv_offsets: parsed.kv_offsets,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    /// The path given to [`GgufFile::open`], `None` for [`GgufFile::from_bytes`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor-data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Whole file bytes.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// Metadata in file order.
    pub fn kvs(&self) -> &[(String, Value)] {
        &self.kvs
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.kvs[i].1)
    }

    /// File offset where the KV record of `key` starts.
    pub fn kv_offset(&self, key: &str) -> Option<u64> {
        self.key_index.get(key).map(|&i| self.kv_offsets[i])
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| GgufError::WrongKeyType {
            key: key.to_string(),
            expected: "string",
            found: v.value_type().name(),
        })
    }

    /// An integer value that fits in a u32 (any integer type is accepted, as converters vary).
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        match v {
            Value::U8(_)
            | Value::I8(_)
            | Value::U16(_)
            | Value::I16(_)
            | Value::U32(_)
            | Value::I32(_)
            | Value::U64(_)
            | Value::I64(_) => v.as_u32().ok_or_else(|| GgufError::Invalid {
                what: format!("metadata key {key:?}"),
                offset: self.kv_offset(key).unwrap_or(0),
                detail: format!(
                    "{} value {} does not fit in a u32",
                    v.value_type().name(),
                    v.summary(32)
                ),
            }),
            _ => Err(GgufError::WrongKeyType {
                key: key.to_string(),
                expected: "u32",
                found: v.value_type().name(),
            }),
        }
    }

    /// A float value (f32, f64 or an integer, converted to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        match v {
            Value::Bool(_) | Value::String(_) | Value::Array(..) => Err(GgufError::WrongKeyType {
                key: key.to_string(),
                expected: "f32",
                found: v.value_type().name(),
            }),
            _ => v.as_f32().ok_or_else(|| GgufError::WrongKeyType {
                key: key.to_string(),
                expected: "f32",
                found: v.value_type().name(),
            }),
        }
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Zero-copy bytes of a tensor, or an error when `t` does not lie within this file (possible
    /// only for a [`TensorInfo`] that did not come from this file).
    pub fn try_tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8], GgufError> {
        let bytes = self.bytes();
        let range = self
            .data_start
            .checked_add(t.offset)
            .and_then(|s| Some(s..s.checked_add(t.n_bytes)?))
            .and_then(|r| Some(usize::try_from(r.start).ok()?..usize::try_from(r.end).ok()?));
        range
            .and_then(|r| bytes.get(r))
            .ok_or_else(|| GgufError::Invalid {
                what: format!("tensor {:?}", t.name),
                offset: t.info_offset,
                detail: format!(
                    "data at offset {} + {} ({} bytes) lies outside the {}-byte file",
                    self.data_start,
                    t.offset,
                    t.n_bytes,
                    bytes.len()
                ),
            })
    }

    /// Zero-copy bytes of a tensor (validated to lie within the file).
    ///
    /// # Panics
    /// Only when `t` did not come from this file and lies outside it; use
    /// [`GgufFile::try_tensor_bytes`] for hand-made infos.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        match self.try_tensor_bytes(t) {
            Ok(b) => b,
            Err(e) => panic!("tensor_bytes called with a TensorInfo from another file: {e}"),
        }
    }

    /// Bytes of the tensor called `name`, if present.
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_bytes(t))
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_start: u64,
    kvs: Vec<(String, Value)>,
    kv_offsets: Vec<u64>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Parser<'b> {
    buf: &'b [u8],
    pos: usize,
}

/// Smallest encodings, used to bound counts before allocating.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // key length, value type, 1-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // name length, n_dims, type, offset

impl<'b> Parser<'b> {
    fn new(buf: &'b [u8]) -> Self {
        Parser { buf, pos: 0 }
    }

    fn file_len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn truncated(&self, context: &dyn Fn() -> String, needed: u64) -> GgufError {
        GgufError::Truncated {
            context: context(),
            offset: self.pos as u64,
            needed,
            file_len: self.file_len(),
        }
    }

    /// Takes `n` bytes, or reports what was being read.
    fn take(&mut self, n: u64, context: &dyn Fn() -> String) -> Result<&'b [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(context, n));
        }
        let start = self.pos;
        let end = start + n as usize; // n <= remaining, so this fits
        self.pos = end;
        Ok(&self.buf[start..end])
    }

    fn array<const N: usize>(
        &mut self,
        context: &dyn Fn() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, context)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, c: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array::<4>(c).map(u32::from_le_bytes)
    }

    fn u64(&mut self, c: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array::<8>(c).map(u64::from_le_bytes)
    }

    fn i64(&mut self, c: &dyn Fn() -> String) -> Result<i64, GgufError> {
        self.array::<8>(c).map(i64::from_le_bytes)
    }

    /// Raw string bytes: `u64 len` then `len` bytes (checked against what remains).
    fn string_bytes(&mut self, c: &dyn Fn() -> String) -> Result<&'b [u8], GgufError> {
        let len_ctx = || format!("{} (string length)", c());
        let len = self.u64(&len_ctx)?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                context: format!("{} (string of {len} bytes)", c()),
                offset: self.pos as u64,
                needed: len,
                file_len: self.file_len(),
            });
        }
        self.take(len, c)
    }

    /// A UTF-8 string (keys and tensor names must be valid UTF-8).
    fn string_strict(&mut self, c: &dyn Fn() -> String) -> Result<String, GgufError> {
        let start = self.pos as u64;
        let bytes = self.string_bytes(c)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(GgufError::Invalid {
                what: c(),
                offset: start,
                detail: format!("not valid UTF-8 ({e})"),
            }),
        }
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        // 1. magic
        let magic: [u8; 4] = self.array(&|| "magic".to_string())?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        // 2. version
        let version = self.u32(&|| "version".to_string())?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(GgufError::BigEndian {
                raw: version,
                swapped: version.swap_bytes(),
            });
        }
        if version != 2 && version != 3 {
            return Err(GgufError::BadVersion { version });
        }
        // 3-4. counts
        let n_tensors_off = self.pos as u64;
        let n_tensors = self.i64(&|| "tensor count".to_string())?;
        let n_kv_off = self.pos as u64;
        let n_kv = self.i64(&|| "metadata key count".to_string())?;
        let n_tensors = self.check_count(
            n_tensors,
            n_tensors_off,
            "tensor count",
            MIN_TENSOR_INFO_BYTES,
        )?;
        let n_kv = self.check_count(n_kv, n_kv_off, "metadata key count", MIN_KV_BYTES)?;

        // 5. key-value pairs
        let mut kvs = Vec::with_capacity(n_kv as usize);
        let mut kv_offsets = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let kv_off = self.pos as u64;
            let key = self.string_strict(&|| format!("metadata key #{i} name"))?;
            let value = self.kv_value(&key, i)?;
            if key_index.contains_key(&key) {
                let first = kv_offsets[key_index[&key]];
                return Err(GgufError::Invalid {
                    what: format!("metadata key {key:?}"),
                    offset: kv_off,
                    detail: format!("duplicate key (first defined at offset {first})"),
                });
            }
            key_index.insert(key.clone(), kvs.len());
            kvs.push((key, value));
            kv_offsets.push(kv_off);
        }

        // alignment
        let alignment = match key_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let off = kv_offsets[i];
                match &kvs[i].1 {
                    Value::U32(a) if *a != 0 && a.is_power_of_two() => *a as u64,
                    Value::U32(a) => {
                        return Err(GgufError::Invalid {
                            what: "metadata key \"general.alignment\"".to_string(),
                            offset: off,
                            detail: format!("alignment {a} is not a power of two"),
                        });
                    }
                    other => {
                        return Err(GgufError::Invalid {
                            what: "metadata key \"general.alignment\"".to_string(),
                            offset: off,
                            detail: format!(
                                "has type {}, must be u32 (a power of two)",
                                other.value_type().name()
                            ),
                        });
                    }
                }
            }
        };

        // 6. tensor infos
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let t = self.tensor_info(i)?;
            if let Some(&j) = tensor_index.get(&t.name) {
                let first: &TensorInfo = &tensors[j];
                return Err(GgufError::Invalid {
                    what: format!("tensor {:?}", t.name),
                    offset: t.info_offset,
                    detail: format!(
                        "duplicate tensor name (first defined at offset {})",
                        first.info_offset
                    ),
                });
            }
            tensor_index.insert(t.name.clone(), tensors.len());
            tensors.push(t);
        }

        // 7. data section
        let infos_end = self.pos as u64;
        let data_start = align_up(infos_end, alignment).ok_or_else(|| GgufError::Invalid {
            what: "data section".to_string(),
            offset: infos_end,
            detail: format!("aligning to {alignment} overflows"),
        })?;
        let file_len = self.file_len();
        for t in &tensors {
            let what = || format!("tensor {:?}", t.name);
            if t.offset % alignment != 0 {
                return Err(GgufError::Invalid {
                    what: what(),
                    offset: t.info_offset,
                    detail: format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                });
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(GgufError::Invalid {
                    what: what(),
                    offset: t.info_offset,
                    detail: format!(
                        "data ({} bytes at data offset {}, file offset {}) extends past the end of the {file_len}-byte file",
                        t.n_bytes,
                        t.offset,
                        data_start.saturating_add(t.offset)
                    ),
                });
            }
        }
        // Non-overlapping: sort by offset and compare each tensor with the furthest-reaching
        // earlier one (zero-byte tensors occupy nothing and cannot overlap).
        let mut order: Vec<usize> = (0..tensors.len())
            .filter(|&i| tensors[i].n_bytes > 0)
            .collect();
        order.sort_by_key(|&i| tensors[i].offset);
        let mut reach: Option<usize> = None; // index of the tensor whose data ends furthest
        for &i in &order {
            let b = &tensors[i];
            if let Some(j) = reach {
                let a = &tensors[j];
                // Both ranges lie within the file, so these sums do not overflow.
                let a_end = a.offset + a.n_bytes;
                if a_end > b.offset {
                    return Err(GgufError::Invalid {
                        what: format!("tensor {:?}", b.name),
                        offset: b.info_offset,
                        detail: format!(
                            "data [{}, {}) overlaps tensor {:?} at [{}, {}) (data offsets)",
                            b.offset,
                            b.offset + b.n_bytes,
                            a.name,
                            a.offset,
                            a_end
                        ),
                    });
                }
            }
            if reach.is_none_or(|j| b.offset + b.n_bytes > tensors[j].offset + tensors[j].n_bytes) {
                reach = Some(i);
            }
        }

        Ok(Parsed {
            version,
            alignment,
            data_start,
            kvs,
            kv_offsets,
            key_index,
            tensors,
            tensor_index,
        })
    }

    /// Rejects negative counts and counts that cannot fit in what remains (`min_each` bytes each).
    fn check_count(
        &self,
        n: i64,
        offset: u64,
        what: &str,
        min_each: u64,
    ) -> Result<u64, GgufError> {
        let n = u64::try_from(n).map_err(|_| GgufError::Invalid {
            what: what.to_string(),
            offset,
            detail: format!("{n} is negative"),
        })?;
        if n.checked_mul(min_each).is_none_or(|m| m > self.remaining()) {
            return Err(GgufError::Invalid {
                what: what.to_string(),
                offset,
                detail: format!(
                    "{n} entries of at least {min_each} bytes each cannot fit in the {} bytes that follow",
                    self.remaining()
                ),
            });
        }
        Ok(n)
    }

    /// The value of KV #`i` (`key` already read): type id, then the value.
    fn kv_value(&mut self, key: &str, i: u64) -> Result<Value, GgufError> {
        let ctx = || format!("metadata key {key:?} (#{i})");
        let type_off = self.pos as u64;
        let type_id = self.u32(&|| format!("{} value type", ctx()))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::Invalid {
            what: ctx(),
            offset: type_off,
            detail: format!("unknown value type id {type_id} (valid: 0..=12)"),
        })?;
        if ty == ValueType::Array {
            let elem_off = self.pos as u64;
            let elem_id = self.u32(&|| format!("{} array element type", ctx()))?;
            let elem = ValueType::from_id(elem_id).ok_or_else(|| GgufError::Invalid {
                what: ctx(),
                offset: elem_off,
                detail: format!("unknown array element type id {elem_id} (valid: 0..=12)"),
            })?;
            if elem == ValueType::Array {
                return Err(GgufError::Invalid {
                    what: ctx(),
                    offset: elem_off,
                    detail: "nested arrays are not allowed in GGUF".to_string(),
                });
            }
            let count_off = self.pos as u64;
            let count = self.u64(&|| format!("{} array length", ctx()))?;
            // A string element needs at least its 8-byte length.
            let min_each = elem.scalar_size().unwrap_or(8);
            if count
                .checked_mul(min_each)
                .is_none_or(|m| m > self.remaining())
            {
                return Err(GgufError::Invalid {
                    what: ctx(),
                    offset: count_off,
                    detail: format!(
                        "array of {count} {} elements needs at least {} bytes but only {} bytes follow",
                        elem.name(),
                        count
                            .checked_mul(min_each)
                            .map_or("more than 2^64".to_string(), |m| m.to_string()),
                        self.remaining()
                    ),
                });
            }
            let mut items = Vec::with_capacity(count as usize);
            for k in 0..count {
                items.push(self.scalar(elem, &|| format!("{} element {k}", ctx()))?);
            }
            Ok(Value::Array(elem, items))
        } else {
            self.scalar(ty, &ctx)
        }
    }

    /// A non-array value of type `ty`.
    fn scalar(&mut self, ty: ValueType, c: &dyn Fn() -> String) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(c)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array::<1>(c)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array::<2>(c)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array::<2>(c)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array::<4>(c)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array::<4>(c)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array::<4>(c)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array::<8>(c)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array::<8>(c)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array::<8>(c)?)),
            ValueType::Bool => {
                let off = self.pos as u64;
                match self.array::<1>(c)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::Invalid {
                            what: c(),
                            offset: off,
                            detail: format!("bool byte is {b}, must be 0 or 1"),
                        });
                    }
                }
            }
            ValueType::String => {
                let off = self.pos as u64;
                let bytes = self.string_bytes(c)?;
                match std::str::from_utf8(bytes) {
                    Ok(s) => Value::String(s.to_string()),
                    Err(e) => {
                        // Some real vocabularies hold tokens that are not valid UTF-8; keep the
                        // file readable but say so.
                        tracing::warn!(
                            "{} at offset {off}: string is not valid UTF-8 ({e}); invalid bytes replaced with U+FFFD",
                            c()
                        );
                        Value::String(String::from_utf8_lossy(bytes).into_owned())
                    }
                }
            }
            ValueType::Array => {
                return Err(GgufError::Invalid {
                    what: c(),
                    offset: self.pos as u64,
                    detail: "nested arrays are not allowed in GGUF".to_string(),
                });
            }
        })
    }

    /// Tensor info #`i`: name, n_dims, ne, type, offset, with every per-tensor rule checked.
    fn tensor_info(&mut self, i: u64) -> Result<TensorInfo, GgufError> {
        let info_offset = self.pos as u64;
        let name = self.string_strict(&|| format!("tensor #{i} name"))?;
        let ctx = || format!("tensor {name:?} (#{i})");
        let invalid = |offset: u64, detail: String| GgufError::Invalid {
            what: format!("tensor {name:?} (#{i})"),
            offset,
            detail,
        };
        if name.len() >= MAX_TENSOR_NAME {
            return Err(invalid(
                info_offset,
                format!(
                    "name is {} bytes; must be shorter than {MAX_TENSOR_NAME} (GGML_MAX_NAME)",
                    name.len()
                ),
            ));
        }
        let dims_off = self.pos as u64;
        let n_dims = self.u32(&|| format!("{} n_dims", ctx()))?;
        if n_dims > MAX_DIMS {
            return Err(invalid(
                dims_off,
                format!("n_dims is {n_dims}, at most {MAX_DIMS} allowed"),
            ));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let off = self.pos as u64;
            let n = self.i64(&|| format!("{} ne[{d}]", ctx()))?;
            let n =
                u64::try_from(n).map_err(|_| invalid(off, format!("ne[{d}] = {n} is negative")))?;
            ne.push(n);
        }
        let type_off = self.pos as u64;
        let type_id = self.u32(&|| format!("{} type", ctx()))?;
        let offset = self.u64(&|| format!("{} data offset", ctx()))?;
        let n_bytes = tensor_n_bytes(&ne, type_id).map_err(|d| invalid(type_off, d))?;
        Ok(TensorInfo {
            name,
            ne,
            type_id,
            offset,
            n_bytes,
            info_offset,
        })
    }
}
