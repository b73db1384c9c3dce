//! Checkpoints: a directory holding `state.json` (step, data position, RNG, optimiser scalars,
//! run settings), `tensors.safetensors` (LoRA A/B and optimiser moments, f32, by name) and
//! `adapter.gguf` (written by the trainer with the export writer, so a checkpoint is usable as is).
//!
//! Saving never leaves a moment without a complete checkpoint. The new checkpoint is written to
//! the sibling `.<name>.tmp` (every file fsynced, `state.json` last, then the directory); the old
//! one is renamed to `.<name>.old`, the new one to `<name>`, then `.old` is removed, with the
//! parent directory fsynced after each rename. A crash at any point leaves `<name>` complete, or
//! a complete `.tmp` (new) or `.old` (previous) beside it: [`Checkpoint::load`] picks that one,
//! and the next save finishes the interrupted swap before it starts.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not usable: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything a checkpoint holds besides large tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Format version of this layout.
    pub version: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// Free-form state owned by the trainer (data position, RNG, optimiser scalars, settings).
    pub state: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// Named f32 tensors (LoRA A/B, optimiser moments), in name order.
    pub tensors: BTreeMap<String, Vec<f32>>,
}

pub const STATE_FILE: &str = "state.json";
pub const TENSORS_FILE: &str = "tensors.safetensors";
pub const ADAPTER_FILE: &str = "adapter.gguf";
const VERSION: u32 = 1;

/// (parent, `.<name>.tmp`, `.<name>.old`) of a checkpoint directory.
fn siblings(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "ckpt".into());
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    (parent, tmp, old)
}

/// Finishes or undoes an interrupted save so that `dir` holds the newest complete checkpoint
/// and no leftovers remain.
fn recover(dir: &Path) -> Result<(), CheckpointError> {
    let (parent, tmp, old) = siblings(dir);
    if !is_complete(dir) {
        // Interrupted between moving the old checkpoint aside and renaming the new one in.
        if let Some(src) = [&tmp, &old].into_iter().find(|d| is_complete(d)) {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io(dir))?;
            }
            std::fs::rename(src, dir).map_err(io(dir))?;
            sync_dir(&parent)?;
        }
    }
    for d in [&tmp, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io(d))?;
        }
    }
    Ok(())
}

/// Whether `dir` holds a readable `state.json` of this layout version (written last, after
/// every other file is on disk).
fn is_complete(dir: &Path) -> bool {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<CheckpointMeta>(&b).ok())
        .is_some_and(|m| m.version == VERSION)
}

/// fsyncs every file under `dir` (recursively) and the directories themselves.
fn sync_tree(dir: &Path) -> Result<(), CheckpointError> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = e.map_err(io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
    }
    sync_dir(dir)
}

/// fsyncs a directory so the names in it (new files, renames) are on disk. A no-op where
/// directories cannot be opened (Windows).
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl Checkpoint {
    pub fn new(step: usize, state: serde_json::Value, tensors: BTreeMap<String, Vec<f32>>) -> Self {
        Checkpoint {
            meta: CheckpointMeta {
                version: VERSION,
                step,
                state,
            },
            tensors,
        }
    }

    /// Writes the checkpoint to `dir` so that a crash at any moment leaves a loadable checkpoint
    /// (the previous one or this one; see the module documentation). `extra` writes more files
    /// (e.g. the adapter) into the new checkpoint before it is put in place.
    pub fn save(
        &self,
        dir: &Path,
        extra: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), CheckpointError> {
        self.save_until(dir, extra, usize::MAX).map(|_| ())
    }

    /// [`Checkpoint::save`] that stops (as a crash would) after stage `stop_after` (0: the new
    /// checkpoint is written to `.<name>.tmp`; 1: the old one moved to `.<name>.old`; 2: the new
    /// one renamed to `<name>`); returns whether the save ran to the end. For crash tests.
    #[doc(hidden)]
    pub fn save_until(
        &self,
        dir: &Path,
        extra: impl FnOnce(&Path) -> Result<(), String>,
        stop_after: usize,
    ) -> Result<bool, CheckpointError> {
        let (parent, tmp, old) = siblings(dir);
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        recover(dir)?;
        // Stage 0: the new checkpoint, complete and on disk, in `tmp`; state.json goes last, so
        // a directory with a readable state.json has everything.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let state =
            serde_json::to_vec_pretty(&self.meta).map_err(|e| CheckpointError::Invalid {
                path: dir.to_path_buf(),
                detail: e.to_string(),
            })?;
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .tensors
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    bytemuck::cast_slice::<f32, u8>(v).to_vec(),
                    v.len(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, n)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| CheckpointError::Invalid {
                        path: dir.to_path_buf(),
                        detail: format!("tensor {k}: {e}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        safetensors::tensor::serialize_to_file(views, None, &tmp.join(TENSORS_FILE)).map_err(
            |e| CheckpointError::Invalid {
                path: dir.to_path_buf(),
                detail: format!("writing tensors: {e}"),
            },
        )?;
        extra(&tmp).map_err(|detail| CheckpointError::Invalid {
            path: dir.to_path_buf(),
            detail,
        })?;
        sync_tree(&tmp)?;
        let state_path = tmp.join(STATE_FILE);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&state_path).map_err(io(&state_path))?;
            f.write_all(&state).map_err(io(&state_path))?;
            f.sync_all().map_err(io(&state_path))?;
        }
        sync_dir(&tmp)?;
        sync_dir(&parent)?;
        if stop_after == 0 {
            return Ok(false);
        }
        // Stage 1: the old checkpoint steps aside (loadable as `.old` until the swap is done).
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(io(dir))?;
            sync_dir(&parent)?;
        }
        if stop_after == 1 {
            return Ok(false);
        }
        // Stage 2: the new one takes its place.
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        sync_dir(&parent)?;
        if stop_after == 2 {
            return Ok(false);
        }
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
            sync_dir(&parent)?;
        }
        Ok(true)
    }

    /// Loads the checkpoint at `dir`. When `dir` is missing or incomplete because a save was
    /// interrupted, loads the complete one that save left beside it (`.<name>.tmp`, the new
    /// checkpoint, else `.<name>.old`, the previous one); the error names `dir` otherwise.
    pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        match Self::load_exact(dir) {
            Ok(c) => Ok(c),
            Err(e) => {
                let (_, tmp, old) = siblings(dir);
                [tmp, old]
                    .iter()
                    .find_map(|d| Self::load_exact(d).ok())
                    .ok_or(e)
            }
        }
    }

    /// Loads exactly the checkpoint directory `dir` (no recovery).
    pub fn load_exact(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let invalid = |detail: String| CheckpointError::Invalid {
            path: dir.to_path_buf(),
            detail,
        };
        let state_path = dir.join(STATE_FILE);
        let state = std::fs::read(&state_path).map_err(io(&state_path))?;
        let meta: CheckpointMeta =
            serde_json::from_slice(&state).map_err(|e| invalid(format!("{STATE_FILE}: {e}")))?;
        if meta.version != VERSION {
            return Err(invalid(format!(
                "layout version {} (this bfpo-lite reads version {VERSION})",
                meta.version
            )));
        }
        let tpath = dir.join(TENSORS_FILE);
        let bytes = std::fs::read(&tpath).map_err(io(&tpath))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(format!("{TENSORS_FILE}: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(invalid(format!(
                    "tensor {name} has dtype {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, data);
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Takes a tensor out by name, or says which is missing.
    pub fn take(&mut self, name: &str, dir: &Path) -> Result<Vec<f32>, CheckpointError> {
        self.tensors
            .remove(name)
            .ok_or_else(|| CheckpointError::Invalid {
                path: dir.to_path_buf(),
                detail: format!("tensor {name:?} is missing"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_is_exact_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let ck_dir = dir.path().join("checkpoint-3");
        let mut t = BTreeMap::new();
        t.insert(
            "blk.0.ffn_down.lora_a".to_string(),
            vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.25],
        );
        t.insert("blk.0.ffn_down.lora_a.adam_m".to_string(), vec![0.1f32; 7]);
        let ck = Checkpoint::new(3, serde_json::json!({"epoch": 1, "rng": [1, 2]}), t);
        ck.save(&ck_dir, |tmp| {
            std::fs::write(tmp.join("extra.txt"), "x").map_err(|e| e.to_string())
        })
        .unwrap();
        let back = Checkpoint::load(&ck_dir).unwrap();
        assert_eq!(back, ck);
        assert!(ck_dir.join("extra.txt").exists());
        // Overwrite in place; no temporary directories are left behind.
        let mut ck2 = ck.clone();
        ck2.meta.step = 4;
        ck2.save(&ck_dir, |_| Ok(())).unwrap();
        assert_eq!(Checkpoint::load(&ck_dir).unwrap().meta.step, 4);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["checkpoint-3".to_string()]);
        // A failing extra step leaves the previous checkpoint untouched.
        let err = ck
            .save(&ck_dir, |_| Err("disk full".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("disk full"), "{err}");
        assert_eq!(Checkpoint::load(&ck_dir).unwrap().meta.step, 4);
    }

    #[test]
    fn corrupt_checkpoints_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = Checkpoint::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        std::fs::write(
            dir.path().join(STATE_FILE),
            "{\"version\": 99, \"step\": 1, \"state\": null}",
        )
        .unwrap();
        let e = Checkpoint::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("version 99"), "{e}");
    }
}
