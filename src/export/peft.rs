//! Hugging Face PEFT export: `adapter_model.safetensors` + `adapter_config.json`, loadable with
//! `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<original HF model>), dir)`.
//!
//! Tensor names: `base_model.model.model.layers.N.<hf module>.lora_A.weight` (shape `[r, n_in]`)
//! and `.lora_B.weight` (`[n_out, r]`), exactly our A and B.
//!
//! Llama Q/K rows. `convert_hf_to_gguf.py` reorders the output rows of HF `q_proj` (by n_head) and
//! `k_proj` (by n_head_kv) so llama.cpp can rope adjacent pairs: within each head of `hd` rows,
//! viewing the HF rows as `(half ∈ {0,1}, i ∈ [0, hd/2))` (row `half·hd/2 + i`), the GGUF row is
//! `2·i + half` (numpy: `reshape(n_head, 2, hd/2, …).swapaxes(1, 2)`). A LoRA trained on the GGUF
//! weights therefore has its `lora_B` rows in GGUF order; PEFT needs HF order, so for llama we
//! apply the inverse, `hf[head][half·hd/2 + i] = gguf[head][2·i + half]`, to the rows of `lora_B`
//! of `q_proj` and `k_proj`. `lora_A` (input side) is unchanged. qwen2/qwen3/gemma3 are not
//! permuted by the converter and need nothing.

use super::gguf_adapter::AdapterDType;
use super::{ExportError, check_against};
use crate::model::lora::{LoraWeights, Target};
use crate::model::{Arch, ModelConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// What PEFT export needs beyond the weights.
#[derive(Clone, Debug, Default)]
pub struct PeftOptions {
    /// Element type of the safetensors (`F32` default, or `F16`).
    pub dtype: AdapterDType,
    /// Hugging Face id or path of the original model (`base_model_name_or_path`), when known.
    pub base_model_name_or_path: Option<String>,
}

/// One PEFT tensor: name, shape, values (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct PeftTensor {
    pub name: String,
    pub shape: [usize; 2],
    pub values: Vec<f32>,
}

/// GGUF (llama.cpp) row order → Hugging Face row order for a row-major `[n_heads·hd, cols]`
/// matrix of a llama `q_proj`/`k_proj` output side. Errors when the rows do not split into
/// `n_heads` heads of even size.
pub fn unpermute_rows(m: &[f32], n_heads: usize, cols: usize) -> Result<Vec<f32>, ExportError> {
    let (hd, half) = head_dims(m.len(), n_heads, cols)?;
    let mut out = vec![0.0f32; m.len()];
    for h in 0..n_heads {
        for part in 0..2 {
            for i in 0..half {
                let hf = h * hd + part * half + i;
                let gg = h * hd + 2 * i + part;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&m[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Hugging Face row order → GGUF row order (what `convert_hf_to_gguf.py` does); the inverse of
/// [`unpermute_rows`].
pub fn permute_rows(m: &[f32], n_heads: usize, cols: usize) -> Result<Vec<f32>, ExportError> {
    let (hd, half) = head_dims(m.len(), n_heads, cols)?;
    let mut out = vec![0.0f32; m.len()];
    for h in 0..n_heads {
        for part in 0..2 {
            for i in 0..half {
                let hf = h * hd + part * half + i;
                let gg = h * hd + 2 * i + part;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&m[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn head_dims(len: usize, n_heads: usize, cols: usize) -> Result<(usize, usize), ExportError> {
    let rows = len.checked_div(cols).unwrap_or(0);
    if n_heads == 0 || cols == 0 || rows * cols != len || !rows.is_multiple_of(n_heads) {
        return Err(ExportError::Other(format!(
            "cannot split a matrix of {len} values with {cols} columns into {n_heads} heads"
        )));
    }
    let hd = rows / n_heads;
    if !hd.is_multiple_of(2) {
        return Err(ExportError::Other(format!(
            "head size {hd} is odd; llama Q/K rows come in rope pairs"
        )));
    }
    Ok((hd, hd / 2))
}

/// The PEFT tensors of `lora` for the model `cfg` (names sorted, llama Q/K un-permuted).
pub fn peft_tensors(lora: &LoraWeights, cfg: &ModelConfig) -> Result<Vec<PeftTensor>, ExportError> {
    check_against(lora, cfg)?;
    if lora
        .tensors
        .iter()
        .any(|t| t.target == crate::model::lora::Target::Output)
    {
        return Err(ExportError::BadLora {
            tensor: "output.weight".into(),
            detail: "PEFT export of a LoRA on the LM head (lm_head) is not supported; export it as a GGUF adapter".into(),
        });
    }
    let r = lora.rank;
    let mut out = Vec::with_capacity(2 * lora.tensors.len());
    for t in &lora.tensors {
        let module = format!(
            "base_model.model.model.layers.{}.{}",
            t.layer,
            t.target.hf_module()
        );
        let b = match (cfg.arch, t.target) {
            (Arch::Llama, Target::AttnQ) => unpermute_rows(&t.b, cfg.n_head, r)?,
            (Arch::Llama, Target::AttnK) => unpermute_rows(&t.b, cfg.n_head_kv, r)?,
            _ => t.b.clone(),
        };
        out.push(PeftTensor {
            name: format!("{module}.lora_A.weight"),
            shape: [r, t.n_in],
            values: t.a.clone(),
        });
        out.push(PeftTensor {
            name: format!("{module}.lora_B.weight"),
            shape: [t.n_out, r],
            values: b,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn json_number(x: f32) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        serde_json::Value::from(x as i64)
    } else {
        serde_json::Value::from(x as f64)
    }
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// The `adapter_config.json` PEFT reads. When the adapted (layer, target) pairs are a full grid,
/// `target_modules` lists the HF short names (plus `layers_to_transform` unless every layer is
/// adapted); otherwise it is a regex matching exactly the adapted module names.
pub fn peft_config(
    lora: &LoraWeights,
    cfg: &ModelConfig,
    base_model_name_or_path: Option<&str>,
) -> serde_json::Value {
    let layers: BTreeSet<usize> = lora.tensors.iter().map(|t| t.layer).collect();
    let targets: BTreeSet<Target> = lora.tensors.iter().map(|t| t.target).collect();
    let full_grid = layers.len() * targets.len() == lora.tensors.len();
    let (target_modules, layers_to_transform) = if full_grid {
        let names: Vec<&str> = targets.iter().map(|t| t.hf_short()).collect();
        let ltt = if layers.len() == cfg.n_layer {
            serde_json::Value::Null
        } else {
            serde_json::json!(layers.iter().collect::<Vec<_>>())
        };
        (serde_json::json!(names), ltt)
    } else {
        let mut names: Vec<String> = lora
            .tensors
            .iter()
            .map(|t| {
                regex_escape(&format!(
                    "model.layers.{}.{}",
                    t.layer,
                    t.target.hf_module()
                ))
            })
            .collect();
        names.sort();
        (
            serde_json::Value::String(format!("^(?:{})$", names.join("|"))),
            serde_json::Value::Null,
        )
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": json_number(lora.alpha),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Serializes the tensors to safetensors bytes (metadata `format = pt`, as transformers expects).
pub fn peft_safetensors(
    tensors: &[PeftTensor],
    dtype: AdapterDType,
) -> Result<Vec<u8>, ExportError> {
    let err = |e: safetensors::SafeTensorError| {
        ExportError::Other(format!("cannot serialize PEFT safetensors: {e}"))
    };
    let mut bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let data = crate::gguf::quant::quantize(dtype.ggml(), &t.values).map_err(|source| {
            ExportError::Quant {
                context: t.name.clone(),
                source,
            }
        })?;
        bytes.push((&t.name, t.shape.to_vec(), data));
    }
    let st_dtype = match dtype {
        AdapterDType::F32 => safetensors::Dtype::F32,
        AdapterDType::F16 => safetensors::Dtype::F16,
    };
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, data) in &bytes {
        views.push((
            *name,
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), data).map_err(err)?,
        ));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::tensor::serialize(views, Some(meta)).map_err(err)
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into the existing directory
/// `dir` (use [`super::write_atomically`] for an all-or-nothing output directory).
pub fn write_peft(
    dir: &Path,
    lora: &LoraWeights,
    cfg: &ModelConfig,
    opts: &PeftOptions,
) -> Result<PeftSummary, ExportError> {
    let tensors = peft_tensors(lora, cfg)?;
    let st = peft_safetensors(&tensors, opts.dtype)?;
    let config = peft_config(lora, cfg, opts.base_model_name_or_path.as_deref());
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io { path: p, source }
    };
    let wp = dir.join(WEIGHTS_FILE);
    std::fs::write(&wp, &st).map_err(io(&wp))?;
    let cp = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| ExportError::Other(format!("cannot encode {CONFIG_FILE}: {e}")))?;
    std::fs::write(&cp, text + "\n").map_err(io(&cp))?;
    let mut per_module: BTreeMap<String, usize> = BTreeMap::new();
    for t in &lora.tensors {
        *per_module
            .entry(t.target.hf_short().to_string())
            .or_default() += 1;
    }
    Ok(PeftSummary {
        n_tensors: tensors.len(),
        bytes: st.len(),
        unpermuted_qk: cfg.arch == Arch::Llama
            && lora
                .tensors
                .iter()
                .any(|t| matches!(t.target, Target::AttnQ | Target::AttnK)),
        modules: per_module,
    })
}

/// What [`write_peft`] wrote.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PeftSummary {
    pub n_tensors: usize,
    pub bytes: usize,
    /// llama `q_proj`/`k_proj` `lora_B` rows were converted to Hugging Face order.
    pub unpermuted_qk: bool,
    /// Adapted layers per HF module name.
    pub modules: BTreeMap<String, usize>,
}
