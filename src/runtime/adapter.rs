//! GGUF LoRA adapters: validate with our reader, load through llama.cpp, apply with a scale,
//! remove, and free (`llama_adapter_lora_free`; the safe API never frees: `docs/llama-cpp.md`
//! §6, hazard 3).
//!
//! Format (`docs/llama-cpp.md` §5): `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, tensors `<base>.lora_a` [n_in, r] and `<base>.lora_b` [r, n_out]
//! (ggml ne order); `token_embd.weight` is special (A [r, n_vocab], B [r, n_embd]).

use super::{AdapterShapeError, RtModel, RuntimeError};
use crate::gguf::{GgmlType, GgufFile};
use llama_cpp_2::model::LlamaLoraAdapter;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Handle of an adapter loaded into one [`RtModel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdapterId(pub(crate) usize);

impl AdapterId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// What an adapter file contains, as validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    pub path: PathBuf,
    /// `adapter.lora.alpha` (None when absent: llama.cpp then applies `scale` without α/r).
    pub alpha: Option<f32>,
    /// Base tensors with a LoRA, sorted, each with its rank.
    pub targets: Vec<(String, usize)>,
    /// Tensors llama.cpp ignores (`*_norm.weight` entries).
    pub ignored: Vec<String>,
}

/// Names and shapes of the base model's tensors, for validation.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BaseTensors {
    pub shapes: HashMap<String, Vec<u64>>,
}

impl BaseTensors {
    fn read(path: &Path) -> Result<BaseTensors, RuntimeError> {
        let f = GgufFile::open(path).map_err(|source| RuntimeError::BaseGguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(BaseTensors {
            shapes: f
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), t.ne.clone()))
                .collect(),
        })
    }
}

pub(crate) struct AdapterSlot {
    pub lora: Mutex<LlamaLoraAdapter>,
    pub info: AdapterInfo,
}

impl AdapterSlot {
    /// Frees the llama.cpp adapter. Precondition: no context uses it (contexts never outlive a
    /// call on `RtModel`, and freeing needs `&mut RtModel`).
    pub fn free(self) {
        let lora = self.lora.into_inner().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `LlamaLoraAdapter` (llama-cpp-2 =0.1.160, pinned) is `#[repr(transparent)]`
        // over `Ptr<llama_adapter_lora>`, itself `#[repr(transparent)]` over
        // `NonNull<llama_adapter_lora>`; `transmute` checks the sizes match. The wrapper has no
        // `Drop`, so this moves out the only handle; llama.cpp's free also unregisters the
        // adapter from its model, so the model's destructor will not free it again.
        let raw: std::ptr::NonNull<llama_cpp_sys_2::llama_adapter_lora> =
            unsafe { std::mem::transmute::<LlamaLoraAdapter, _>(lora) };
        unsafe { llama_cpp_sys_2::llama_adapter_lora_free(raw.as_ptr()) };
    }
}

/// Checks an adapter file against a base model before llama.cpp sees it: type keys,
/// architecture, both halves of every pair, the base tensor exists and is a matrix, shapes and
/// ranks agree, tensor types llama.cpp multiplies safely, and no `token_embd` LoRA on a model
/// with tied embeddings (llama.cpp aborts the process on that).
pub fn validate_adapter(
    adapter: &GgufFile,
    path: &Path,
    model_arch: &str,
    base_shapes: &HashMap<String, Vec<u64>>,
) -> Result<AdapterInfo, RuntimeError> {
    let fail = |detail: String| RuntimeError::Adapter {
        path: path.to_path_buf(),
        detail,
    };
    let str_key = |key: &str| {
        adapter
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    match str_key("general.type").as_deref() {
        Some("adapter") => {}
        other => {
            return Err(fail(format!(
                "general.type is {other:?}, expected \"adapter\" (is this a model file rather than a LoRA adapter?)"
            )));
        }
    }
    match str_key("adapter.type").as_deref() {
        Some("lora") => {}
        other => {
            return Err(fail(format!(
                "adapter.type is {other:?}, expected \"lora\""
            )));
        }
    }
    let arch = str_key("general.architecture").unwrap_or_default();
    if arch != model_arch {
        return Err(RuntimeError::AdapterArch {
            path: path.to_path_buf(),
            adapter: arch,
            model: model_arch.to_string(),
        });
    }
    let alpha = match adapter.get("adapter.lora.alpha") {
        None => {
            tracing::warn!(
                adapter = %path.display(),
                "adapter has no adapter.lora.alpha; llama.cpp applies the scale without alpha/r"
            );
            None
        }
        Some(v) => match v.as_f32() {
            Some(a) if a.is_finite() => Some(a),
            _ => {
                return Err(fail(format!(
                    "adapter.lora.alpha is {}, expected a finite f32",
                    v.summary(40)
                )));
            }
        },
    };

    // Pair up halves.
    let mut pairs: BTreeMap<String, [Option<&crate::gguf::TensorInfo>; 2]> = BTreeMap::new();
    let mut ignored = Vec::new();
    for t in adapter.tensors() {
        if let Some(base) = t.name.strip_suffix(".lora_a") {
            pairs.entry(base.to_string()).or_default()[0] = Some(t);
        } else if let Some(base) = t.name.strip_suffix(".lora_b") {
            pairs.entry(base.to_string()).or_default()[1] = Some(t);
        } else if t.name.ends_with("_norm.weight") {
            ignored.push(t.name.clone());
        } else {
            return Err(fail(format!(
                "tensor {:?} is neither <base>.lora_a nor <base>.lora_b",
                t.name
            )));
        }
    }
    if pairs.is_empty() {
        return Err(fail(
            "it contains no LoRA tensors (*.lora_a / *.lora_b)".into(),
        ));
    }
    let tied = !base_shapes.contains_key("output.weight");
    let mut targets = Vec::with_capacity(pairs.len());
    for (base, [a, b]) in &pairs {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (*a, *b),
            (None, _) => {
                return Err(RuntimeError::AdapterMissingHalf {
                    path: path.to_path_buf(),
                    tensor: base.clone(),
                    missing: "lora_a",
                });
            }
            (_, None) => {
                return Err(RuntimeError::AdapterMissingHalf {
                    path: path.to_path_buf(),
                    tensor: base.clone(),
                    missing: "lora_b",
                });
            }
        };
        let is_embd = base == "token_embd.weight";
        if is_embd && tied {
            return Err(RuntimeError::AdapterTiedEmbedding {
                path: path.to_path_buf(),
            });
        }
        let Some(w) = base_shapes.get(base) else {
            return Err(fail(format!(
                "it has a LoRA for {base:?}, which the base model does not have{}; the adapter was made for a different base model",
                if base == "output.weight" && tied {
                    " (this model ties its embeddings, so it has no output.weight)"
                } else {
                    ""
                }
            )));
        };
        if w.len() != 2 {
            return Err(fail(format!(
                "it has a LoRA for {base:?} of shape {w:?}; only 2-D weight matrices can carry a LoRA (not norms or biases)"
            )));
        }
        for t in [a, b] {
            if t.ne.len() != 2 {
                return Err(fail(format!(
                    "tensor {:?} has {} dimensions {:?}; LoRA halves are 2-D",
                    t.name,
                    t.ne.len(),
                    t.ne
                )));
            }
            match GgmlType::from_id(t.type_id) {
                Some(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0) => {}
                _ => {
                    return Err(fail(format!(
                        "tensor {:?} has type {}; LoRA tensors must be F32, F16, BF16 or Q8_0",
                        t.name,
                        t.type_name()
                    )));
                }
            }
        }
        // Expected shapes (ggml ne order), rank taken from lora_b's ne[0] as llama.cpp does
        // for linear weights (and from lora_a's ne[0] for token_embd, where A/B are flipped).
        let (rank, want_a, want_b) = if is_embd {
            let r = a.ne[0];
            (r, vec![r, w[1]], vec![r, w[0]])
        } else {
            let r = b.ne[0];
            (r, vec![w[0], r], vec![r, w[1]])
        };
        if rank == 0 {
            return Err(fail(format!("{base:?} has rank 0")));
        }
        for (t, want) in [(a, want_a), (b, want_b)] {
            if t.ne != want {
                return Err(RuntimeError::AdapterShape(Box::new(AdapterShapeError {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    found: t.ne.clone(),
                    expected: want,
                    base: base.clone(),
                    base_shape: w.clone(),
                })));
            }
        }
        targets.push((base.clone(), rank as usize));
    }
    if !ignored.is_empty() {
        tracing::warn!(adapter = %path.display(), ?ignored, "llama.cpp ignores LoRA norm tensors");
    }
    Ok(AdapterInfo {
        path: path.to_path_buf(),
        alpha,
        targets,
        ignored,
    })
}

impl RtModel {
    /// Validates and loads a GGUF LoRA adapter. It is not active until [`RtModel::set_adapter`].
    /// Needs `&mut self`: llama.cpp registers adapters on the model, and no context exists
    /// while the model is mutably borrowed.
    pub fn load_adapter(&mut self, path: &Path) -> Result<AdapterId, RuntimeError> {
        let file = GgufFile::open(path).map_err(|source| match &source {
            crate::gguf::GgufError::Io { source: io, .. }
                if io.kind() == std::io::ErrorKind::NotFound =>
            {
                RuntimeError::Adapter {
                    path: path.to_path_buf(),
                    detail: "the file does not exist".into(),
                }
            }
            _ => RuntimeError::AdapterGguf {
                path: path.to_path_buf(),
                source: Box::new(source),
            },
        })?;
        if self.base_tensors.is_none() {
            self.base_tensors = Some(BaseTensors::read(&self.path)?);
        }
        let base = self.base_tensors.as_ref().expect("set above");
        let info = validate_adapter(&file, path, &self.arch, &base.shapes)?;
        let lora = self
            .model
            .lora_adapter_init(path)
            .map_err(|e| RuntimeError::Adapter {
                path: path.to_path_buf(),
                detail: format!(
                    "llama.cpp rejected it after validation passed ({e}); run with -v to see llama.cpp's reason"
                ),
            })?;
        let slot = AdapterSlot {
            lora: Mutex::new(lora),
            info,
        };
        // Reuse a freed slot index? No: ids stay unique so a stale id cannot alias a new adapter.
        self.adapters.push(Some(slot));
        tracing::debug!(adapter = %path.display(), id = self.adapters.len() - 1, "loaded adapter");
        Ok(AdapterId(self.adapters.len() - 1))
    }

    /// Makes `id` the active adapter at `scale` for every later score/generate/logits call
    /// (replacing any other; llama.cpp's effective factor is `scale · alpha / rank`).
    pub fn set_adapter(&mut self, id: AdapterId, scale: f32) -> Result<(), RuntimeError> {
        self.slot(id)?;
        if !scale.is_finite() {
            return Err(RuntimeError::InvalidOption {
                name: "adapter scale",
                value: scale.to_string(),
                expected: "a finite number",
            });
        }
        self.active = Some((id, scale));
        Ok(())
    }

    /// Deactivates the adapter: later calls use exactly the base model.
    pub fn clear_adapter(&mut self) {
        self.active = None;
    }

    /// The active adapter and its scale.
    pub fn active_adapter(&self) -> Option<(AdapterId, f32)> {
        self.active
    }

    /// Frees an adapter's memory in llama.cpp (deactivating it first if active).
    pub fn free_adapter(&mut self, id: AdapterId) -> Result<(), RuntimeError> {
        self.slot(id)?;
        if matches!(self.active, Some((a, _)) if a == id) {
            self.active = None;
        }
        if let Some(slot) = self.adapters[id.0].take() {
            slot.free();
        }
        Ok(())
    }

    /// What a loaded adapter contains.
    pub fn adapter_info(&self, id: AdapterId) -> Result<&AdapterInfo, RuntimeError> {
        Ok(&self.slot(id)?.info)
    }

    /// Number of adapters currently loaded (not freed).
    pub fn n_adapters(&self) -> usize {
        self.adapters.iter().filter(|s| s.is_some()).count()
    }

    pub(crate) fn slot(&self, id: AdapterId) -> Result<&AdapterSlot, RuntimeError> {
        self.adapters
            .get(id.0)
            .and_then(|s| s.as_ref())
            .ok_or(RuntimeError::UnknownAdapter(id.0))
    }
}
