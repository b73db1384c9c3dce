//! Hugging Face PEFT LoRA → bfpo-lite [`LoraWeights`] (then a GGUF adapter through
//! [`super::gguf_adapter`]): the inverse of [`super::peft`].
//!
//! Reads `adapter_config.json` and `adapter_model.safetensors` (F32, F16 or BF16). Accepted:
//! `peft_type = "LORA"`, one rank and one alpha for every module, LoRA on the seven projections
//! `model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`, `bias = "none"`,
//! `use_rslora` (converted: rsLoRA scales by `alpha/√r`, so the GGUF alpha is `alpha·√r`).
//! Refused, naming what was found: DoRA (`use_dora`, `lora_magnitude_vector`), `modules_to_save`
//! and any full tensor (e.g. `embed_tokens`, `lm_head`), LoRA on embeddings
//! (`lora_embedding_A/B`), per-module `rank_pattern` / `alpha_pattern`, `fan_in_fan_out`, LoRA
//! biases, other PEFT types and modules outside the seven projections.
//!
//! Llama Q/K rows: PEFT `lora_B` of `q_proj` / `k_proj` is in Hugging Face row order; llama.cpp's
//! converter permutes those weights' rows for its rope, so the GGUF adapter needs
//! [`super::peft::permute_rows`] (by `n_head` for Q, `n_head_kv` for K), exactly what
//! `convert_hf_to_gguf.py` does to the base weights. `lora_A` is unchanged; qwen2/qwen3/gemma3
//! need nothing. Values are copied bit for bit (F32 in, F32 out), so export → import is exact.

use super::peft::{CONFIG_FILE, WEIGHTS_FILE, permute_rows};
use super::{ExportError, check_against};
use crate::gguf::GgmlType;
use crate::gguf::quant::dequantize_vec;
use crate::model::lora::{LoraTensor, LoraWeights, Target};
use crate::model::{Arch, ModelConfig};
use std::collections::BTreeMap;
use std::path::Path;

/// What [`read_peft`] found besides the weights.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PeftImport {
    pub rank: usize,
    /// `lora_alpha` as written in the config.
    pub peft_alpha: f64,
    /// The alpha of the GGUF adapter (`peft_alpha`, or `peft_alpha·√r` for rsLoRA).
    pub alpha: f32,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
    /// safetensors element types seen (`F32`, `F16`, `BF16`).
    pub dtypes: Vec<String>,
    pub n_tensors: usize,
    /// llama `q_proj`/`k_proj` `lora_B` rows were converted to GGUF order.
    pub permuted_qk: bool,
    /// Adapted layers per HF module name.
    pub modules: BTreeMap<String, usize>,
}

fn unsupported(path: &Path, detail: String) -> ExportError {
    ExportError::NotAnAdapter {
        path: path.display().to_string(),
        detail,
    }
}

/// Checks `adapter_config.json`; returns (rank, alpha, use_rslora, base model).
fn read_config(path: &Path) -> Result<(usize, f64, bool, Option<String>), ExportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        unsupported(
            path,
            format!(
                "not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    let bad = |detail: String| unsupported(path, detail);
    let field = |k: &str| c.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        Some(other) => {
            return Err(bad(format!(
                "peft_type is {other:?}; only LORA adapters can become GGUF LoRA adapters"
            )));
        }
        None => return Err(bad("peft_type is missing (expected \"LORA\")".into())),
    }
    if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err(bad(
            "use_dora is true: DoRA adds a per-column magnitude that llama.cpp's LoRA adapters cannot express; train with use_dora=false or merge the adapter in Python".into(),
        ));
    }
    if let Some(m) = field("modules_to_save") {
        let empty = m.as_array().is_some_and(|a| a.is_empty());
        if !empty {
            return Err(bad(format!(
                "modules_to_save = {m}: fully trained modules (e.g. embed_tokens, lm_head) are not a LoRA and a GGUF adapter cannot carry them"
            )));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(p) = field(key)
            && p.as_object().is_some_and(|o| !o.is_empty())
        {
            return Err(bad(format!(
                "{key} = {p}: per-module ranks/alphas are not supported (a GGUF adapter has one alpha and bfpo-lite one rank); retrain with a single r and lora_alpha"
            )));
        }
    }
    if field("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
        return Err(bad(
            "fan_in_fan_out is true (Conv1D models such as GPT-2); only Linear projections of llama/qwen models are supported".into(),
        ));
    }
    match field("bias").and_then(|v| v.as_str()) {
        None | Some("none") => {}
        Some(b) => {
            return Err(bad(format!(
                "bias = {b:?}: trained biases are not part of a GGUF LoRA adapter; use bias=\"none\""
            )));
        }
    }
    if let Some(tp) = field("target_parameters")
        && tp.as_array().is_some_and(|a| !a.is_empty())
    {
        return Err(bad(format!(
            "target_parameters = {tp}: LoRA on raw parameters (MoE experts) is not supported"
        )));
    }
    let rank = field("r")
        .and_then(|v| v.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r is missing or not a positive integer".into()))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .filter(|a| a.is_finite())
        .ok_or_else(|| bad("lora_alpha is missing or not a finite number".into()))?;
    let rslora = field("use_rslora").and_then(|v| v.as_bool()) == Some(true);
    let base = field("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok((rank, alpha, rslora, base))
}

/// `base_model.model.model.layers.N.<module>.lora_{A,B}[.<adapter>].weight` → (N, target, is_b).
/// Errors name the tensor and say what kind of module it is.
fn parse_name(name: &str) -> Result<(usize, Target, bool), String> {
    if name.contains("lora_magnitude_vector") {
        return Err(format!(
            "{name}: a DoRA magnitude vector; DoRA adapters are not supported"
        ));
    }
    if name.contains("lora_embedding_A") || name.contains("lora_embedding_B") {
        return Err(format!(
            "{name}: a LoRA on the token embedding (embed_tokens); only the attention and FFN projections are supported"
        ));
    }
    let inner = name.strip_prefix("base_model.model.").unwrap_or(name);
    let Some(rest) = inner.strip_prefix("model.layers.") else {
        let what = if inner.contains("embed_tokens") {
            "the token embedding (embed_tokens)"
        } else if inner.contains("lm_head") {
            "the LM head (lm_head)"
        } else if inner.contains("norm") {
            "a norm"
        } else {
            "a module outside the transformer layers"
        };
        return Err(format!(
            "{name}: {what} is not supported; only LoRA on q/k/v/o_proj and gate/up/down_proj converts to a GGUF adapter"
        ));
    };
    let (layer, rest) = rest
        .split_once('.')
        .ok_or_else(|| format!("{name}: no layer number"))?;
    let layer: usize = layer
        .parse()
        .map_err(|_| format!("{name}: layer {layer:?} is not a number"))?;
    let (module, is_b, tail) = if let Some((m, t)) = rest.split_once(".lora_A.") {
        (m, false, t)
    } else if let Some((m, t)) = rest.split_once(".lora_B.") {
        (m, true, t)
    } else if rest.ends_with(".bias") {
        return Err(format!(
            "{name}: a trained bias; only LoRA A/B matrices are supported (bias=\"none\")"
        ));
    } else {
        return Err(format!(
            "{name}: not a LoRA A/B matrix (a fully trained module from modules_to_save?); only LoRA on the projections is supported"
        ));
    };
    // PEFT saves `lora_A.weight`; some tools keep the adapter name: `lora_A.default.weight`.
    if !(tail == "weight" || tail.ends_with(".weight") && !tail[..tail.len() - 7].contains('.')) {
        return Err(format!(
            "{name}: unexpected tensor after lora_{}",
            if is_b { "B" } else { "A" }
        ));
    }
    let target = Target::ALL
        .into_iter()
        .find(|t| t.hf_module() == module)
        .ok_or_else(|| {
            format!(
                "{name}: LoRA on {module:?} is not supported; supported modules are self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj"
            )
        })?;
    Ok((layer, target, is_b))
}

/// One LoRA half as read: tensor name, shape, values.
type Half = (String, Vec<usize>, Vec<f32>);

/// Reads a PEFT LoRA directory for the model `cfg` into [`LoraWeights`] in GGUF orientation
/// (llama Q/K `lora_B` rows permuted), checked against the model's shapes.
pub fn read_peft(dir: &Path, cfg: &ModelConfig) -> Result<(LoraWeights, PeftImport), ExportError> {
    let cpath = dir.join(CONFIG_FILE);
    let (rank, peft_alpha, use_rslora, base) = read_config(&cpath)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).map_err(|source| ExportError::Io {
        path: wpath.clone(),
        source,
    })?;
    let label = wpath.display().to_string();
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ExportError::NotAnAdapter {
            path: label.clone(),
            detail: format!("not a safetensors file: {e}"),
        })?;
    let bad = |tensor: &str, detail: String| ExportError::BadTensor {
        path: label.clone(),
        tensor: tensor.to_string(),
        detail,
    };
    let mut halves: BTreeMap<(usize, Target), [Option<Half>; 2]> = BTreeMap::new();
    let mut dtypes = std::collections::BTreeSet::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    if names.is_empty() {
        return Err(ExportError::NotAnAdapter {
            path: label.clone(),
            detail: "it holds no tensors".into(),
        });
    }
    for name in &names {
        let (layer, target, is_b) =
            parse_name(name).map_err(|detail| ExportError::NotAnAdapter {
                path: label.clone(),
                detail,
            })?;
        let view = st.tensor(name).map_err(|e| bad(name, e.to_string()))?;
        let ty = match view.dtype() {
            safetensors::Dtype::F32 => GgmlType::F32,
            safetensors::Dtype::F16 => GgmlType::F16,
            safetensors::Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(bad(
                    name,
                    format!("has dtype {other:?}; LoRA tensors must be F32, F16 or BF16"),
                ));
            }
        };
        dtypes.insert(format!("{:?}", view.dtype()));
        let shape = view.shape().to_vec();
        if shape.len() != 2 || shape.contains(&0) {
            return Err(bad(
                name,
                format!("has shape {shape:?}; a LoRA half must be a non-empty 2-D matrix"),
            ));
        }
        let values = dequantize_vec(ty, view.data(), shape[0] * shape[1])
            .map_err(|e| bad(name, e.to_string()))?;
        let slot = &mut halves.entry((layer, target)).or_default()[is_b as usize];
        if slot.is_some() {
            return Err(bad(
                name,
                "appears twice (two adapters in one file?)".into(),
            ));
        }
        *slot = Some((name.clone(), shape, values));
    }
    let mut tensors = Vec::with_capacity(halves.len());
    let mut modules: BTreeMap<String, usize> = BTreeMap::new();
    let mut permuted = false;
    for ((layer, target), [a, b]) in halves {
        let module = format!("model.layers.{layer}.{}", target.hf_module());
        let (an, ashape, av) = a.ok_or_else(|| bad(&module, "has lora_B but no lora_A".into()))?;
        let (bn, bshape, bv) = b.ok_or_else(|| bad(&module, "has lora_A but no lora_B".into()))?;
        if ashape[0] != rank {
            return Err(bad(
                &an,
                format!(
                    "has shape {ashape:?} but adapter_config.json says r = {rank} (lora_A must be [r, in_features])"
                ),
            ));
        }
        if bshape[1] != rank {
            return Err(bad(
                &bn,
                format!(
                    "has shape {bshape:?} but adapter_config.json says r = {rank} (lora_B must be [out_features, r])"
                ),
            ));
        }
        let (n_in, n_out) = (ashape[1], bshape[0]);
        let b = match (cfg.arch, target) {
            (Arch::Llama, Target::AttnQ) => {
                permuted = true;
                permute_rows(&bv, cfg.n_head, rank).map_err(|e| bad(&bn, e.to_string()))?
            }
            (Arch::Llama, Target::AttnK) => {
                permuted = true;
                permute_rows(&bv, cfg.n_head_kv, rank).map_err(|e| bad(&bn, e.to_string()))?
            }
            _ => bv,
        };
        *modules.entry(target.hf_short().to_string()).or_default() += 1;
        tensors.push(LoraTensor {
            layer,
            target,
            n_in,
            n_out,
            a: av,
            b,
        });
    }
    let alpha = if use_rslora {
        (peft_alpha * (rank as f64).sqrt()) as f32
    } else {
        peft_alpha as f32
    };
    let lora = LoraWeights {
        rank,
        alpha,
        tensors,
    };
    check_against(&lora, cfg)?;
    let summary = PeftImport {
        rank,
        peft_alpha,
        alpha,
        use_rslora,
        base_model_name_or_path: base,
        dtypes: dtypes.into_iter().collect(),
        n_tensors: names.len(),
        permuted_qk: permuted,
        modules,
    };
    Ok((lora, summary))
}

/// File that the exported `train.py` writes beside the PEFT adapter: the loss and settings it
/// trained with, carried into the GGUF adapter's `bfpo.*` provenance by [`read_provenance`].
pub const RUN_INFO_FILE: &str = "bfpo_run.json";

/// Provenance from `DIR/bfpo_run.json` when present (`{"loss": "bfpo", "loss_params": {..},
/// "train_params": {..}, "steps": N, "datasets": [..]}`); `Ok(None)` when absent.
pub fn read_provenance(dir: &Path) -> Result<Option<super::Provenance>, ExportError> {
    let path = dir.join(RUN_INFO_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ExportError::Io {
        path: path.clone(),
        source,
    })?;
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct RunInfo {
        loss: Option<String>,
        loss_params: BTreeMap<String, f64>,
        train_params: BTreeMap<String, f64>,
        steps: Option<u64>,
        base_model_name: Option<String>,
        datasets: Vec<String>,
    }
    let r: RunInfo = serde_json::from_str(&text).map_err(|e| ExportError::BadProvenance {
        field: path.display().to_string(),
        detail: format!("{e} (line {}, column {})", e.line(), e.column()),
    })?;
    Ok(Some(super::Provenance {
        loss: r.loss,
        loss_params: r.loss_params,
        train_params: r.train_params,
        steps: r.steps,
        base_model_name: r.base_model_name,
        datasets: r.datasets,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight").unwrap(),
            (3, Target::FfnDown, true)
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
                .unwrap(),
            (0, Target::AttnQ, false)
        );
        let e = parse_name("base_model.model.model.embed_tokens.weight").unwrap_err();
        assert!(e.contains("embed_tokens"), "{e}");
        let e = parse_name("base_model.model.model.embed_tokens.lora_embedding_A").unwrap_err();
        assert!(e.contains("embed_tokens"), "{e}");
        let e = parse_name("base_model.model.lm_head.weight").unwrap_err();
        assert!(e.contains("lm_head"), "{e}");
        let e = parse_name("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector")
            .unwrap_err();
        assert!(e.contains("DoRA"), "{e}");
        let e = parse_name("base_model.model.model.layers.1.mlp.down_proj.weight").unwrap_err();
        assert!(e.contains("modules_to_save"), "{e}");
        let e = parse_name("base_model.model.model.layers.1.self_attn.rotary.lora_A.weight")
            .unwrap_err();
        assert!(e.contains("self_attn.rotary"), "{e}");
    }
}
