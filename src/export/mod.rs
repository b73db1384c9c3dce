//! Adapter export: GGUF LoRA, PEFT safetensors, merged GGUF models.
//!
//! * [`gguf_adapter`]: the GGUF LoRA adapter llama.cpp loads (`docs/llama-cpp.md` §5),
//!   with our provenance under `bfpo.*`, and a validating reader.
//! * [`peft`]: `adapter_model.safetensors` + `adapter_config.json` for Hugging Face PEFT.
//! * [`merge`]: a full GGUF model with the update folded into the weights.
//! * [`ollama`]: a `Modelfile` (`FROM` base, `ADAPTER`, `TEMPLATE`, stop tokens) for Ollama.

pub mod gguf_adapter;
pub mod merge;
pub mod ollama;
pub mod peft;
pub mod peft_import;
pub mod trl;

pub use gguf_adapter::{AdapterDType, Provenance, read_adapter, write_adapter};

use crate::gguf::GgufError;
use crate::gguf::quant::QuantError;
use crate::model::ModelConfig;
use crate::model::lora::LoraWeights;
use std::path::PathBuf;

/// Everything that can go wrong while exporting or reading an adapter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{context}: {source}")]
    Quant {
        context: String,
        #[source]
        source: QuantError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a LoRA adapter: {detail}")]
    NotAnAdapter { path: String, detail: String },
    #[error("{path}: tensor {tensor:?}: {detail}")]
    BadTensor {
        path: String,
        tensor: String,
        detail: String,
    },
    #[error(
        "the adapter was trained for architecture {adapter:?} but the model {model_path} is {model:?}; \
         use the base model the adapter was trained on"
    )]
    ArchMismatch {
        adapter: String,
        model: String,
        model_path: String,
    },
    #[error(
        "LoRA tensor for {tensor:?} is [n_out {found_out}, n_in {found_in}] but the model's weight is \
         [n_out {want_out}, n_in {want_in}]; the adapter was trained on a model of another shape"
    )]
    ShapeMismatch {
        tensor: String,
        found_in: usize,
        found_out: usize,
        want_in: usize,
        want_out: usize,
    },
    #[error(
        "LoRA tensor for layer {layer} ({target}) but the model has {n_layer} layers (0-{last}); \
         the adapter was trained on a deeper model",
        last = n_layer.saturating_sub(1)
    )]
    LayerOutOfRange {
        layer: usize,
        target: String,
        n_layer: usize,
    },
    #[error("LoRA tensor {tensor:?}: {detail}")]
    BadLora { tensor: String, detail: String },
    #[error("bad provenance field {field}: {detail}")]
    BadProvenance { field: String, detail: String },
    #[error(
        "the chat template looks like {looks_like}, for which bfpo-lite writes no Ollama template; it writes them for {}; pass --chat-template NAME to choose the format",
        ollama::OLLAMA_FORMATS.join(", ")
    )]
    OllamaFormat { looks_like: String },
    #[error(
        "the base model {model} has no chat template (tokenizer.chat_template), so the Ollama TEMPLATE cannot be chosen; pass --chat-template NAME, one of {}, or a Jinja FILE",
        crate::template::BUILTIN_NAMES.join(", ")
    )]
    NoChatTemplate { model: PathBuf },
    #[error("{path} already exists; pass --force to overwrite it")]
    OutputExists { path: PathBuf },
    #[error("{0}")]
    Other(String),
}

/// Checks that every LoRA tensor is internally consistent (lengths match rank and shape, values
/// finite) and fits `cfg`: layer in range, `(n_in, n_out)` equal to the target's shape.
pub fn check_against(lora: &LoraWeights, cfg: &ModelConfig) -> Result<(), ExportError> {
    check_lora(lora)?;
    for t in &lora.tensors {
        if t.target == crate::model::lora::Target::Output && cfg.tied {
            return Err(ExportError::BadLora {
                tensor: "output.weight".into(),
                detail: "the model ties its embeddings: it has no output.weight to adapt (llama.cpp refuses this adapter too)".into(),
            });
        }
        if t.layer >= cfg.n_layer {
            return Err(ExportError::LayerOutOfRange {
                layer: t.layer,
                target: t.target.gguf_name().to_string(),
                n_layer: cfg.n_layer,
            });
        }
        let (n_in, n_out) = t.target.shape(cfg);
        if (t.n_in, t.n_out) != (n_in, n_out) {
            return Err(ExportError::ShapeMismatch {
                tensor: t.target.tensor_name(t.layer),
                found_in: t.n_in,
                found_out: t.n_out,
                want_in: n_in,
                want_out: n_out,
            });
        }
    }
    Ok(())
}

/// Checks a LoRA on its own: rank ≥ 1, finite alpha, buffer lengths, finite values, no
/// duplicate (layer, target).
pub fn check_lora(lora: &LoraWeights) -> Result<(), ExportError> {
    let bad = |tensor: String, detail: String| ExportError::BadLora { tensor, detail };
    if lora.rank == 0 {
        return Err(bad("(adapter)".into(), "rank is 0".into()));
    }
    if !lora.alpha.is_finite() {
        return Err(bad(
            "(adapter)".into(),
            format!("alpha is {} (must be finite)", lora.alpha),
        ));
    }
    let r = lora.rank;
    let mut seen = std::collections::HashSet::new();
    for t in &lora.tensors {
        let name = t.target.tensor_name(t.layer);
        if !seen.insert((t.layer, t.target)) {
            return Err(bad(name, "appears twice in the adapter".into()));
        }
        if t.n_in == 0 || t.n_out == 0 {
            return Err(bad(
                name,
                format!("empty shape n_in {} n_out {}", t.n_in, t.n_out),
            ));
        }
        if t.a.len() != r * t.n_in {
            return Err(bad(
                name,
                format!(
                    "A has {} values, expected rank {r} x n_in {} = {}",
                    t.a.len(),
                    t.n_in,
                    r * t.n_in
                ),
            ));
        }
        if t.b.len() != t.n_out * r {
            return Err(bad(
                name,
                format!(
                    "B has {} values, expected n_out {} x rank {r} = {}",
                    t.b.len(),
                    t.n_out,
                    t.n_out * r
                ),
            ));
        }
        for (half, v) in [("A", &t.a), ("B", &t.b)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(bad(
                    name,
                    format!("{half} holds the non-finite value {} at index {i}", v[i]),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that the adapter's architecture name equals the model's.
pub fn check_arch(
    adapter_arch: &str,
    cfg: &ModelConfig,
    model_path: &std::path::Path,
) -> Result<(), ExportError> {
    if adapter_arch != cfg.arch.name() {
        return Err(ExportError::ArchMismatch {
            adapter: adapter_arch.to_string(),
            model: cfg.arch.name().to_string(),
            model_path: model_path.display().to_string(),
        });
    }
    Ok(())
}

/// Writes an output through a temporary sibling (file or directory) and a rename, so a crash
/// never leaves a half-written `out`. Refuses to replace an existing `out` unless `force`.
///
/// `write` receives the temporary path (for a directory: already created, empty). When `out` is
/// an existing directory and `force` is set, the old directory is moved aside, the new one renamed
/// in, and then the old one deleted. On any error the temporary output is removed and an existing
/// `out` is left untouched.
pub fn write_atomically(
    out: &std::path::Path,
    force: bool,
    is_dir: bool,
    write: impl FnOnce(&std::path::Path) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    use std::path::Path;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io { path: p, source }
    };
    let exists = std::fs::symlink_metadata(out).is_ok();
    if exists && !force {
        return Err(ExportError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if exists && std::fs::metadata(out).map(|m| m.is_dir()).unwrap_or(false) != is_dir {
        return Err(ExportError::Other(format!(
            "{} exists and is a {}, but this export writes a {}; choose another --out",
            out.display(),
            if is_dir { "file" } else { "directory" },
            if is_dir { "directory" } else { "file" },
        )));
    }
    use crate::util::fs::{parent_dir, sibling, sync_dir};
    let parent = parent_dir(out);
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    if out.file_name().is_none() {
        return Err(ExportError::Other(format!(
            "{} has no file name",
            out.display()
        )));
    }
    let tmp = sibling(out, "tmp");
    let cleanup = |p: &Path| {
        if is_dir {
            let _ = std::fs::remove_dir_all(p);
        } else {
            let _ = std::fs::remove_file(p);
        }
    };
    cleanup(&tmp);
    let result = (|| {
        if is_dir {
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        }
        write(&tmp)?;
        if is_dir && exists {
            let old = sibling(out, "old");
            std::fs::rename(out, &old).map_err(io(out))?;
            if let Err(source) = std::fs::rename(&tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(ExportError::Io {
                    path: out.to_path_buf(),
                    source,
                });
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, out).map_err(io(out))?;
        }
        sync_dir(&parent);
        Ok(())
    })();
    if result.is_err() {
        cleanup(&tmp);
    }
    result
}
