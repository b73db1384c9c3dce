//! `--model` and `--data` of every command: a local path, or a Hugging Face cache reference
//! (`org/name` or `org/name:FILE`) resolved in the local hub cache with no network
//! (`bfpo_lite::util::hf_cache`). clap calls these as value parsers, so each command gets the
//! resolved path and the error, listing what is cached, names the flag.

use bfpo_lite::util::hf_cache::{RepoKind, resolve_arg};
use std::path::{Path, PathBuf};

/// A GGUF model: a path, or `org/name[:FILE.gguf]` in the hub cache.
pub fn model_arg(spec: &str) -> Result<PathBuf, String> {
    resolve_arg(spec, RepoKind::Model).map_err(|e| e.to_string())
}

/// A data file: a path, or a dataset `org/name[:FILE]` in the hub cache.
pub fn data_arg(spec: &str) -> Result<PathBuf, String> {
    resolve_arg(spec, RepoKind::Dataset).map_err(|e| e.to_string())
}

/// The same for a path read from a config file (`model = "org/name"` in a tune config).
pub fn resolve_config_path(path: &Path, kind: RepoKind) -> anyhow::Result<PathBuf> {
    let spec = path.to_string_lossy();
    Ok(resolve_arg(&spec, kind)?)
}
