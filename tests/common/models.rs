//! The tiny-model factory every integration test uses.
//!
//! `tiny_model(arch, ty, tied)` (or `model(&spec)` for any [`InitSpec`]) returns the path of a
//! deterministic random-weight GGUF written by `bfpo_lite::model::init`. Each distinct spec is
//! written once per test process (the first caller builds it; concurrent callers wait on a lock
//! and reuse it) into `CARGO_TARGET_TMPDIR/models/`, through a temporary file and a rename, so
//! parallel tests and parallel test binaries never see a half-written file. The file name carries
//! a hash of the whole spec, so different specs never collide.

use bfpo_lite::model::Arch;
use bfpo_lite::model::init::{self, InitSpec, InitSummary, WeightType};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Folder holding the generated models of this test run.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("models")
}

/// A stable file name for a spec: readable prefix + hash of every field.
pub fn file_name(spec: &InitSpec) -> String {
    let json = serde_json::to_string(spec).expect("InitSpec serializes");
    let hash = Sha256::digest(json.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-d{}-l{}-{hex}.gguf",
        spec.arch.name(),
        spec.ty,
        if spec.tied { "tied" } else { "untied" },
        spec.dim,
        spec.layers
    )
}

type Entry = Arc<OnceLock<(PathBuf, InitSummary)>>;

fn registry() -> &'static Mutex<HashMap<String, Entry>> {
    static REG: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Writes `spec` (once per process) and returns its path and build summary.
pub fn model_with_summary(spec: &InitSpec) -> (PathBuf, InitSummary) {
    let name = file_name(spec);
    let entry = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.clone())
        .or_default()
        .clone();
    entry
        .get_or_init(|| {
            let dir = models_dir();
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let path = dir.join(&name);
            let summary = init::write(spec, &path)
                .unwrap_or_else(|e| panic!("init-model {spec:?} failed: {e}"));
            (path, summary)
        })
        .clone()
}

/// Path of the model for `spec`.
pub fn model(spec: &InitSpec) -> PathBuf {
    model_with_summary(spec).0
}

/// Path of a default-shaped tiny model (dim 64, 2 layers, 4 heads, 2 KV heads, ff 128, ctx 256).
pub fn tiny_model(arch: Arch, ty: impl Into<WeightType>, tied: bool) -> PathBuf {
    model(&InitSpec::tiny(arch, ty, tied))
}

/// A tiny model whose matrices all fit 256-element K-quant blocks (dim 256, ff 512, 4 heads of
/// 64, 2 KV heads), so `q4_k`/`q5_k`/`q6_k`/`q4_k_m` produce real K-quant tensors without fallbacks.
pub fn tiny_kquant_model(arch: Arch, ty: impl Into<WeightType>, tied: bool) -> PathBuf {
    model(&InitSpec {
        dim: 256,
        ff: 512,
        ..InitSpec::tiny(arch, ty, tied)
    })
}
