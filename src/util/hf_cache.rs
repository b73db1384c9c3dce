//! Hugging Face cache references: `org/name` or `org/name:FILE` for `--model` and `--data`,
//! resolved in the local hub cache the way the `huggingface_hub` client lays it out, with no
//! network.
//!
//! The cache directory is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (the client's own
//! order). In it a model repo is `models--org--name/` and a dataset `datasets--org--name/`, each
//! with `refs/main` (the commit the `main` branch pointed at when downloaded),
//! `snapshots/<commit>/<path in the repo>` (symlinks into `blobs/`, or plain files where the
//! file system has no symlinks) and `blobs/<hash>`.
//!
//! Without `:FILE` the single `.gguf` of a model snapshot, or the single data file (JSONL,
//! JSON, Parquet, optionally `.gz`/`.xz`) of a dataset snapshot, is taken; several or none is an
//! error listing them. Errors list what the cache holds. A local path that exists is always
//! taken as the path ([`resolve_arg`]).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// Which kind of hub repository a reference names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The folder prefix in the cache (`models`, `datasets`).
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    /// What a file of this kind is, for "the single …" messages.
    fn wanted(self) -> &'static str {
        match self {
            RepoKind::Model => ".gguf file",
            RepoKind::Dataset => "data file (.jsonl, .json, .parquet, optionally .gz/.xz)",
        }
    }
    /// True for files this kind picks without `:FILE`.
    fn is_candidate(self, rel: &str) -> bool {
        let lower = rel.to_ascii_lowercase();
        match self {
            RepoKind::Model => lower.ends_with(".gguf"),
            RepoKind::Dataset => {
                let name = lower.rsplit('/').next().unwrap_or(&lower);
                let base = name
                    .strip_suffix(".gz")
                    .or_else(|| name.strip_suffix(".xz"))
                    .unwrap_or(name);
                let data = base.ends_with(".jsonl")
                    || base.ends_with(".json")
                    || base.ends_with(".parquet");
                // Hub metadata, not rows.
                data && !base.starts_with("dataset_info") && !base.starts_with("dataset_infos")
            }
        }
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// `org/name` or `org/name:FILE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo: String,
    /// A path inside the repository.
    pub file: Option<String>,
}

impl HubRef {
    /// Parses `org/name[:FILE]`: exactly one `/` in the repo part, both parts of letters,
    /// digits, `-`, `_` and `.` (not starting with `.`). Anything else is not a reference.
    pub fn parse(spec: &str) -> Option<HubRef> {
        let (repo, file) = match spec.split_once(':') {
            Some((r, f)) => (r, Some(f)),
            None => (spec, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !part_ok(org) || !part_ok(name) {
            return None;
        }
        let file = match file {
            Some(f) if f.is_empty() || f.starts_with('/') || f.split('/').any(|c| c == "..") => {
                return None;
            }
            f => f.map(str::to_string),
        };
        Some(HubRef {
            repo: repo.to_string(),
            file,
        })
    }

    /// The repository's folder name in the cache (`models--org--name`).
    pub fn folder(&self, kind: RepoKind) -> String {
        format!("{}--{}", kind.prefix(), self.repo.replace('/', "--"))
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}:{file}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Why a reference does not resolve. Each names the reference and the cache, and lists what
/// is there.
#[derive(Debug, thiserror::Error)]
pub enum HfCacheError {
    #[error(
        "no Hugging Face cache directory: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set"
    )]
    NoCacheDir,
    #[error(
        "{spec} is not a local file, and the Hugging Face cache {cache} has no {kind} {repo}; cached {kind}s: {}{}",
        list_or_none(cached),
        download_hint(*kind, repo)
    )]
    NotCached {
        spec: String,
        repo: String,
        kind: RepoKind,
        cache: PathBuf,
        cached: Vec<String>,
    },
    #[error("{kind} {repo} in the Hugging Face cache has no snapshot at {dir}{}", download_hint(*kind, repo))]
    NoSnapshot {
        repo: String,
        kind: RepoKind,
        dir: PathBuf,
    },
    #[error(
        "{kind} {repo} has several snapshots in {dir} and no refs/main to choose one: {}",
        snapshots.join(", ")
    )]
    AmbiguousSnapshot {
        repo: String,
        kind: RepoKind,
        dir: PathBuf,
        snapshots: Vec<String>,
    },
    #[error(
        "{kind} {repo} (snapshot {snapshot}) has no file {file}; its cached files: {}",
        list_or_none(files)
    )]
    NoFile {
        repo: String,
        kind: RepoKind,
        file: String,
        snapshot: PathBuf,
        files: Vec<String>,
    },
    #[error(
        "{kind} {repo} has {path} in its snapshot but the file it points to is missing (an interrupted download?){}",
        download_hint(*kind, repo)
    )]
    MissingBlob {
        repo: String,
        kind: RepoKind,
        path: PathBuf,
    },
    #[error(
        "{kind} {repo} (snapshot {snapshot}) has no {}; its cached files: {}; pass {repo}:FILE",
        kind.wanted(),
        list_or_none(files)
    )]
    NoCandidate {
        repo: String,
        kind: RepoKind,
        snapshot: PathBuf,
        files: Vec<String>,
    },
    #[error(
        "{kind} {repo} has several of a {}: {}; pass one as {repo}:FILE",
        kind.wanted(),
        candidates.join(", ")
    )]
    Ambiguous {
        repo: String,
        kind: RepoKind,
        candidates: Vec<String>,
    },
    #[error("reading the Hugging Face cache at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn download_hint(kind: RepoKind, repo: &str) -> String {
    let flag = match kind {
        RepoKind::Model => "",
        RepoKind::Dataset => " --repo-type dataset",
    };
    format!(" (download it with `hf download {repo}{flag}`, or pass a local path)")
}

/// The hub cache directory from the environment, in `huggingface_hub`'s order.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

/// [`hub_cache_dir`] with the environment given as a lookup (empty values count as unset).
pub fn hub_cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")) {
        return Some(d);
    }
    let home = get("HF_HOME")
        .or_else(|| get("XDG_CACHE_HOME").map(|x| x.join("huggingface")))
        .or_else(|| get("HOME").map(|h| h.join(".cache/huggingface")))?;
    Some(home.join("hub"))
}

/// `--model`/`--data` as given: an existing path as is; else, if it reads as a reference
/// (`org/name[:FILE]`), the file it names in the hub cache; else the path as is (the command
/// then reports it missing).
pub fn resolve_arg(spec: &str, kind: RepoKind) -> Result<PathBuf, HfCacheError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(r) = HubRef::parse(spec) else {
        return Ok(path.to_path_buf());
    };
    let cache = hub_cache_dir().ok_or(HfCacheError::NoCacheDir)?;
    resolve(&cache, &r, kind, spec)
}

/// The file `r` names in the cache at `cache` (`spec` is the text the user gave, for errors).
pub fn resolve(
    cache: &Path,
    r: &HubRef,
    kind: RepoKind,
    spec: &str,
) -> Result<PathBuf, HfCacheError> {
    let repo_dir = cache.join(r.folder(kind));
    if !repo_dir.is_dir() {
        return Err(HfCacheError::NotCached {
            spec: spec.to_string(),
            repo: r.repo.clone(),
            kind,
            cache: cache.to_path_buf(),
            cached: cached_repos(cache, kind),
        });
    }
    let snapshot = snapshot_dir(&repo_dir, r, kind)?;
    let files = snapshot_files(&snapshot)?;
    let rel = match &r.file {
        Some(f) => {
            if !files.contains(f) {
                return Err(HfCacheError::NoFile {
                    repo: r.repo.clone(),
                    kind,
                    file: f.clone(),
                    snapshot,
                    files,
                });
            }
            f.clone()
        }
        None => {
            let candidates: Vec<String> = files
                .iter()
                .filter(|f| kind.is_candidate(f))
                .cloned()
                .collect();
            match candidates.len() {
                1 => candidates.into_iter().next().expect("one"),
                0 => {
                    return Err(HfCacheError::NoCandidate {
                        repo: r.repo.clone(),
                        kind,
                        snapshot,
                        files,
                    });
                }
                _ => {
                    return Err(HfCacheError::Ambiguous {
                        repo: r.repo.clone(),
                        kind,
                        candidates,
                    });
                }
            }
        }
    };
    let path = snapshot.join(&rel);
    // A snapshot entry is a symlink into blobs/: it must lead to a file.
    if !path.is_file() {
        return Err(HfCacheError::MissingBlob {
            repo: r.repo.clone(),
            kind,
            path,
        });
    }
    Ok(path)
}

/// `org/name` of every repository of `kind` in the cache, sorted.
pub fn cached_repos(cache: &Path, kind: RepoKind) -> Vec<String> {
    let prefix = format!("{}--", kind.prefix());
    let Ok(rd) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    let mut repos: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let (org, repo) = rest.split_once("--")?;
            Some(format!("{org}/{repo}"))
        })
        .collect();
    repos.sort();
    repos
}

/// `snapshots/<commit>` of `refs/main`, else the only snapshot.
fn snapshot_dir(repo_dir: &Path, r: &HubRef, kind: RepoKind) -> Result<PathBuf, HfCacheError> {
    let snaps = repo_dir.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let dir = snaps.join(commit.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(HfCacheError::NoSnapshot {
            repo: r.repo.clone(),
            kind,
            dir,
        });
    }
    let mut names: Vec<String> = match std::fs::read_dir(&snaps) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    match names.len() {
        1 => Ok(snaps.join(&names[0])),
        0 => Err(HfCacheError::NoSnapshot {
            repo: r.repo.clone(),
            kind,
            dir: snaps,
        }),
        _ => Err(HfCacheError::AmbiguousSnapshot {
            repo: r.repo.clone(),
            kind,
            dir: snaps,
            snapshots: names,
        }),
    }
}

/// Every file of a snapshot as a `/`-separated path inside the repository, sorted.
fn snapshot_files(snapshot: &Path) -> Result<Vec<String>, HfCacheError> {
    let mut out = Vec::new();
    let mut stack = vec![snapshot.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|source| HfCacheError::Io {
            path: dir.clone(),
            source,
        })?;
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            // Folders are real directories in a snapshot; files are symlinks (possibly broken).
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(snapshot) {
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references_and_leaves_paths_alone() {
        let r = HubRef::parse("acme/tiny-GGUF:q4/model.gguf").unwrap();
        assert_eq!(r.repo, "acme/tiny-GGUF");
        assert_eq!(r.file.as_deref(), Some("q4/model.gguf"));
        assert_eq!(r.folder(RepoKind::Model), "models--acme--tiny-GGUF");
        assert_eq!(
            HubRef::parse("acme/data")
                .unwrap()
                .folder(RepoKind::Dataset),
            "datasets--acme--data"
        );
        for not_ref in [
            "/abs/path.gguf",
            "./rel/x",
            "model.gguf",
            "a/b/c.gguf",
            "a/",
            "acme/x:",
            "acme/x:../../etc/passwd",
            "acme/x y",
        ] {
            assert_eq!(HubRef::parse(not_ref), None, "{not_ref}");
        }
    }

    #[test]
    fn cache_dir_follows_the_hub_clients_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let d = |pairs| hub_cache_dir_from(env(pairs));
        assert_eq!(
            d(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")]),
            Some("/c".into())
        );
        assert_eq!(
            d(&[("HF_HOME", "/h"), ("HOME", "/u")]),
            Some("/h/hub".into())
        );
        assert_eq!(
            d(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")]),
            Some("/x/huggingface/hub".into())
        );
        assert_eq!(
            d(&[("HOME", "/u"), ("HF_HOME", "")]),
            Some("/u/.cache/huggingface/hub".into())
        );
        assert_eq!(d(&[]), None);
    }

    #[test]
    fn dataset_candidates_are_data_files_not_metadata() {
        let k = RepoKind::Dataset;
        for yes in [
            "train.jsonl",
            "data/train-00000.parquet",
            "x.json.gz",
            "a.JSONL.xz",
        ] {
            assert!(k.is_candidate(yes), "{yes}");
        }
        for no in ["README.md", ".gitattributes", "dataset_info.json", "x.csv"] {
            assert!(!k.is_candidate(no), "{no}");
        }
    }
}
