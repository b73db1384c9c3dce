//! An on-disk cache of reference log-probs.
//!
//! The reference model (the base GGUF with the LoRA off) never changes during training, so its
//! summed log-probs of every pair's chosen and rejected response are computed once and stored.
//!
//! # Key
//! [`RefCache::key`] is a SHA-256 over, length-prefixed and in this order: a domain tag with the
//! format version, the model's identity (caller-provided bytes, e.g.
//! [`ModelFingerprint::identity`]: file size + SHA-256 of the whole file), a settings string
//! (anything else that changes the numbers: engine, precision, kernel version…), and every
//! pair's chosen and rejected [`Example`] (token ids and `response_start`, which covers the
//! chat template and truncation), in order. Change any of them and the key changes.
//!
//! # File format (`<dir>/<key hex>.refcache`, little-endian)
//! ```text
//! magic    8 bytes  "BFPOREF\0"
//! version  u32      1
//! reserved u32      0
//! key      32 bytes
//! n        u64      number of pairs
//! n × { chosen f64, rejected f64, chosen_tokens u32, rejected_tokens u32 }   (24 bytes each)
//! sha256   32 bytes over everything above
//! ```
//! Writes are atomic (temporary file in the same directory, fsync, rename). A file that is
//! missing, truncated, of another version, for another key or fails its checksum is a cache
//! **miss** with a reason ([`CacheLookup::Miss`]), never a panic.
//!
//! # Model fingerprints
//! [`RefCache::fingerprint`] hashes a model file once and remembers the result in
//! `<dir>/fingerprints.json`, keyed by the canonical path, size, modification time (ns) and,
//! on Unix, device and inode: later calls on an unchanged file cost one `stat`. A file
//! rewritten in place with the same size and the same mtime would fool the memo (tools that
//! preserve mtimes, e.g. `cp -p` over an existing file); delete `fingerprints.json` then.

use super::batch::PairExamples;
use super::example::Example;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"BFPOREF\0";
/// The cache file format version.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 32 + 8;
const RECORD: usize = 24;
const TRAILER: usize = 32;
const FINGERPRINTS: &str = "fingerprints.json";

/// Reference log-probs of one pair: summed over the scored tokens of each response.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefLogps {
    pub chosen: f64,
    pub rejected: f64,
    /// Number of scored tokens of the chosen response.
    pub chosen_tokens: u32,
    pub rejected_tokens: u32,
}

/// A cache key (SHA-256).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.hex())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Errors that stop a cache operation (a bad cache *file* is a miss, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "reference cache {path}: {what}: {source}; check the directory's permissions and free space, or pass another --cache-dir"
    )]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "reference cache: pair {index} has a non-finite log-prob ({value}); not storing it: the reference forward pass is broken"
    )]
    NonFinite { index: usize, value: f64 },
}

/// Why a lookup missed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissReason {
    /// No file for this key.
    Absent,
    /// The file exists but cannot be used; the text says why (with numbers).
    Corrupt(String),
    /// The file could not be read.
    Unreadable(String),
}

impl fmt::Display for MissReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MissReason::Absent => f.write_str("no cached entry"),
            MissReason::Corrupt(s) => write!(f, "cache file unusable: {s}"),
            MissReason::Unreadable(s) => write!(f, "cache file unreadable: {s}"),
        }
    }
}

/// The result of [`RefCache::lookup`].
#[derive(Clone, Debug, PartialEq)]
pub enum CacheLookup {
    Hit(Vec<RefLogps>),
    Miss { path: PathBuf, reason: MissReason },
}

impl CacheLookup {
    pub fn hit(self) -> Option<Vec<RefLogps>> {
        match self {
            CacheLookup::Hit(v) => Some(v),
            CacheLookup::Miss { .. } => None,
        }
    }
}

/// A model file's identity for cache keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFingerprint {
    pub size: u64,
    pub sha256: [u8; 32],
    /// True when this came from the memo file rather than hashing the file now.
    pub from_memo: bool,
}

impl ModelFingerprint {
    /// Bytes to pass to [`RefCache::key`]: `"gguf size=<n> sha256=<hex>"`.
    pub fn identity(&self) -> Vec<u8> {
        format!("gguf size={} sha256={}", self.size, hex(&self.sha256)).into_bytes()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct MemoEntry {
    size: u64,
    mtime_ns: u128,
    dev: u64,
    ino: u64,
    sha256: String,
}

/// The reference log-prob cache in one directory.
#[derive(Clone, Debug)]
pub struct RefCache {
    dir: PathBuf,
}

fn put_bytes(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

fn put_example(h: &mut Sha256, e: &Example) {
    h.update((e.response_start as u64).to_le_bytes());
    h.update((e.ids.len() as u64).to_le_bytes());
    for id in &e.ids {
        h.update(id.to_le_bytes());
    }
}

impl RefCache {
    /// Opens (creating if needed) a cache directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<RefCache, CacheError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
            path: dir.clone(),
            what: "cannot create the directory",
            source,
        })?;
        Ok(RefCache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a dataset's reference log-probs (see the module documentation).
    pub fn key(model_identity: &[u8], pairs: &[PairExamples], settings: &str) -> CacheKey {
        Self::key_from_iter(
            model_identity,
            pairs.iter().map(|p| (&p.chosen, &p.rejected)),
            settings,
        )
    }

    /// [`RefCache::key`] over any sequence of (chosen, rejected) examples.
    pub fn key_from_iter<'a>(
        model_identity: &[u8],
        pairs: impl IntoIterator<Item = (&'a Example, &'a Example)>,
        settings: &str,
    ) -> CacheKey {
        let mut h = Sha256::new();
        put_bytes(
            &mut h,
            format!("bfpo-lite refcache v{FORMAT_VERSION}").as_bytes(),
        );
        put_bytes(&mut h, model_identity);
        put_bytes(&mut h, settings.as_bytes());
        let mut n = 0u64;
        for (c, r) in pairs {
            put_example(&mut h, c);
            put_example(&mut h, r);
            n += 1;
        }
        h.update(n.to_le_bytes());
        CacheKey(h.finalize().into())
    }

    /// Where the entry of `key` lives.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.refcache", key.hex()))
    }

    /// The cached log-probs of `key`, or None on any miss (see [`RefCache::lookup`]).
    pub fn load(&self, key: &CacheKey) -> Option<Vec<RefLogps>> {
        self.lookup(key).hit()
    }

    /// Looks `key` up, saying why on a miss.
    pub fn lookup(&self, key: &CacheKey) -> CacheLookup {
        let path = self.path(key);
        let miss = |reason| CacheLookup::Miss {
            path: path.clone(),
            reason,
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return miss(MissReason::Absent),
            Err(e) => return miss(MissReason::Unreadable(e.to_string())),
        };
        match decode(&bytes, key) {
            Ok(v) => CacheLookup::Hit(v),
            Err(why) => miss(MissReason::Corrupt(why)),
        }
    }

    /// Stores `values` under `key` atomically; returns the file's path.
    pub fn store(&self, key: &CacheKey, values: &[RefLogps]) -> Result<PathBuf, CacheError> {
        for (index, v) in values.iter().enumerate() {
            for x in [v.chosen, v.rejected] {
                if !x.is_finite() {
                    return Err(CacheError::NonFinite { index, value: x });
                }
            }
        }
        let path = self.path(key);
        write_atomic(&path, &encode(key, values))?;
        Ok(path)
    }

    /// The fingerprint of a model file (size + SHA-256 of all its bytes), memoized in
    /// `<dir>/fingerprints.json` by (canonical path, size, mtime, device, inode).
    pub fn fingerprint(&self, model: &Path) -> Result<ModelFingerprint, CacheError> {
        let io = |what, source| CacheError::Io {
            path: model.to_path_buf(),
            what,
            source,
        };
        let canon = fs::canonicalize(model).map_err(|e| io("cannot resolve the model path", e))?;
        let meta = fs::metadata(&canon).map_err(|e| io("cannot stat the model file", e))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        let (dev, ino) = dev_ino(&meta);
        let memo_path = self.dir.join(FINGERPRINTS);
        let mut memo: BTreeMap<String, MemoEntry> = fs::read(&memo_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let name = canon.display().to_string();
        let remembered = memo.get(&name).filter(|m| {
            Some(m.mtime_ns) == mtime_ns && m.size == meta.len() && m.dev == dev && m.ino == ino
        });
        if let Some(sha) = remembered.and_then(|m| parse_hex32(&m.sha256)) {
            return Ok(ModelFingerprint {
                size: meta.len(),
                sha256: sha,
                from_memo: true,
            });
        }
        let (size, sha256) =
            sha256_file(&canon).map_err(|e| io("cannot read the model file", e))?;
        if let Some(mt) = mtime_ns {
            memo.insert(
                name,
                MemoEntry {
                    size,
                    mtime_ns: mt,
                    dev,
                    ino,
                    sha256: hex(&sha256),
                },
            );
            // The memo is an optimisation: failing to write it is not an error.
            if let Ok(json) = serde_json::to_vec_pretty(&memo) {
                let _ = write_atomic(&memo_path, &json);
            }
        }
        Ok(ModelFingerprint {
            size,
            sha256,
            from_memo: false,
        })
    }
}

#[cfg(unix)]
fn dev_ino(m: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn dev_ino(_: &fs::Metadata) -> (u64, u64) {
    (0, 0)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Size and SHA-256 of a whole file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().into()))
}

fn encode(key: &CacheKey, values: &[RefLogps]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + RECORD * values.len() + TRAILER);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&key.0);
    b.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        b.extend_from_slice(&v.chosen.to_le_bytes());
        b.extend_from_slice(&v.rejected.to_le_bytes());
        b.extend_from_slice(&v.chosen_tokens.to_le_bytes());
        b.extend_from_slice(&v.rejected_tokens.to_le_bytes());
    }
    let sum: [u8; 32] = Sha256::digest(&b).into();
    b.extend_from_slice(&sum);
    b
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}
fn le_f64(b: &[u8]) -> f64 {
    f64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn decode(b: &[u8], key: &CacheKey) -> Result<Vec<RefLogps>, String> {
    if b.len() < HEADER + TRAILER {
        return Err(format!(
            "{} bytes, shorter than the {} bytes of header and checksum (truncated?)",
            b.len(),
            HEADER + TRAILER
        ));
    }
    if &b[..8] != MAGIC {
        return Err(format!("bad magic {:?} (expected \"BFPOREF\\0\")", &b[..8]));
    }
    let version = le_u32(&b[8..]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    if b[16..48] != key.0 {
        return Err(format!(
            "the file holds key {} (renamed or copied file?)",
            hex(&b[16..48])
        ));
    }
    let n = le_u64(&b[48..]);
    let want = (n as u128) * RECORD as u128 + (HEADER + TRAILER) as u128;
    if want != b.len() as u128 {
        return Err(format!(
            "{} bytes, but {n} pairs need {want} bytes (truncated?)",
            b.len()
        ));
    }
    let body = b.len() - TRAILER;
    let sum: [u8; 32] = Sha256::digest(&b[..body]).into();
    if sum[..] != b[body..] {
        return Err("checksum mismatch (the file is corrupted)".into());
    }
    let mut out = Vec::with_capacity(n as usize);
    for (i, r) in b[HEADER..body].chunks_exact(RECORD).enumerate() {
        let v = RefLogps {
            chosen: le_f64(r),
            rejected: le_f64(&r[8..]),
            chosen_tokens: le_u32(&r[16..]),
            rejected_tokens: le_u32(&r[20..]),
        };
        if !v.chosen.is_finite() || !v.rejected.is_finite() {
            return Err(format!("pair {i} holds a non-finite log-prob"));
        }
        out.push(v);
    }
    Ok(out)
}

/// Writes `bytes` to `path` via a temporary file in the same directory and a rename, so
/// readers see the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    crate::util::fs::write_bytes_atomic(path, bytes).map_err(|source| CacheError::Io {
        path: path.to_path_buf(),
        what: "cannot write atomically (temporary file, sync, rename)",
        source,
    })
}
