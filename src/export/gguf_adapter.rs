//! GGUF LoRA adapters as llama.cpp loads them (`docs/llama-cpp.md` §5), and a
//! validating reader.
//!
//! Metadata: `general.architecture` (the base model's), `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha` (f32, always written: llama.cpp reads a missing
//! alpha as 0, which means "no alpha/r scaling"), then our provenance under `bfpo.*`
//! ([`Provenance`]).
//!
//! Tensors, for each adapted projection `W` = `blk.N.<stem>.weight` (ne `[n_in, n_out]`):
//! `blk.N.<stem>.weight.lora_a` with ne `[n_in, r]` and `.lora_b` with ne `[r, n_out]`, F32 or
//! F16. In row-major terms these are exactly our A `[r, n_in]` and B `[n_out, r]`, so the bytes
//! are written as they are. llama.cpp applies `y = W·x + (alpha/r)·B·(A·x)` with `r = lora_b.ne[0]`.
//!
//! Never written: a `token_embd` LoRA (aborts llama.cpp on a tied model: `docs/llama-cpp.md` §6,
//! hazard 1; LoRA targets here are the seven projections only), and no Q/K row permutation (an
//! adapter trained on GGUF weights is already in llama.cpp's row order; `docs/gguf.md` §5.2).

use super::{ExportError, check_against, check_lora};
use crate::gguf::quant::{dequantize_vec, quantize};
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use crate::model::ModelConfig;
use crate::model::lora::{LoraTensor, LoraWeights, Target};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const KEY_ARCH: &str = "general.architecture";
pub const KEY_GENERAL_TYPE: &str = "general.type";
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_ALPHA: &str = "adapter.lora.alpha";

pub const KEY_LOSS: &str = "bfpo.loss";
/// Prefix of loss hyperparameters: `bfpo.loss.<name>` (f64).
pub const PREFIX_LOSS_PARAM: &str = "bfpo.loss.";
/// Prefix of training hyperparameters: `bfpo.train.<name>` (f64).
pub const PREFIX_TRAIN_PARAM: &str = "bfpo.train.";
pub const KEY_STEPS: &str = "bfpo.steps";
pub const KEY_BASE_NAME: &str = "bfpo.base_model.name";
pub const KEY_BASE_SHA256: &str = "bfpo.base_model.sha256";
pub const KEY_DATASETS: &str = "bfpo.datasets";
pub const KEY_VERSION: &str = "bfpo.version";

/// Where an adapter came from; the trainer fills it, [`write_adapter`] stores it under `bfpo.*`
/// and [`read_adapter`] gives it back. Every field is optional so adapters made by other tools
/// (no `bfpo.*` keys) read as `Provenance::default()`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Loss name (`bfpo`, `ipo`, `dpo`): `bfpo.loss`.
    pub loss: Option<String>,
    /// Loss hyperparameters (beta, tau, label smoothing, …): `bfpo.loss.<name>` as f64.
    pub loss_params: BTreeMap<String, f64>,
    /// Training hyperparameters (learning rate, batch size, epochs, seed, …):
    /// `bfpo.train.<name>` as f64.
    pub train_params: BTreeMap<String, f64>,
    /// Optimizer steps taken: `bfpo.steps` (u64).
    pub steps: Option<u64>,
    /// Base model name (`general.name` of the base, or its file name): `bfpo.base_model.name`.
    pub base_model_name: Option<String>,
    /// SHA-256 of the base model file, 64 lowercase hex digits: `bfpo.base_model.sha256`.
    pub base_model_sha256: Option<String>,
    /// Training dataset names or paths: `bfpo.datasets` (array of strings).
    pub datasets: Vec<String>,
    /// bfpo-lite version that wrote the adapter: `bfpo.version`. `None` when writing means
    /// "this build" ([`crate::VERSION`]).
    pub version: Option<String>,
}

/// Element type of the written LoRA tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterDType {
    #[default]
    F32,
    F16,
}

impl AdapterDType {
    pub fn parse(s: &str) -> Option<AdapterDType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(AdapterDType::F32),
            "f16" => Some(AdapterDType::F16),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            AdapterDType::F32 => GgmlType::F32,
            AdapterDType::F16 => GgmlType::F16,
        }
    }
}

fn check_param_name(field: &str, name: &str) -> Result<(), ExportError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(ExportError::BadProvenance {
            field: format!("{field}[{name:?}]"),
            detail: "names must be non-empty and use only a-z, 0-9 and _ (they become GGUF keys)"
                .into(),
        });
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Provenance {
    /// Adds the `bfpo.*` keys to `w`.
    fn write_to(&self, w: &mut GgufWriter<'_>) -> Result<(), ExportError> {
        if let Some(loss) = &self.loss {
            w.set(KEY_LOSS, Value::String(loss.clone()));
        }
        for (k, &v) in &self.loss_params {
            check_param_name("loss_params", k)?;
            w.set(format!("{PREFIX_LOSS_PARAM}{k}"), Value::F64(v));
        }
        for (k, &v) in &self.train_params {
            check_param_name("train_params", k)?;
            w.set(format!("{PREFIX_TRAIN_PARAM}{k}"), Value::F64(v));
        }
        if let Some(steps) = self.steps {
            w.set(KEY_STEPS, Value::U64(steps));
        }
        if let Some(name) = &self.base_model_name {
            w.set(KEY_BASE_NAME, Value::String(name.clone()));
        }
        if let Some(sha) = &self.base_model_sha256 {
            if !is_sha256_hex(sha) {
                return Err(ExportError::BadProvenance {
                    field: "base_model_sha256".into(),
                    detail: format!(
                        "{sha:?} is not 64 lowercase hex digits (a SHA-256 of the base model file)"
                    ),
                });
            }
            w.set(KEY_BASE_SHA256, Value::String(sha.clone()));
        }
        if !self.datasets.is_empty() {
            w.set(KEY_DATASETS, Value::string_array(self.datasets.clone()));
        }
        let version = self.version.as_deref().unwrap_or(crate::VERSION);
        w.set(KEY_VERSION, Value::String(version.to_string()));
        Ok(())
    }

    /// Reads the `bfpo.*` keys; absent keys stay `None`/empty, unknown `bfpo.*` keys are ignored
    /// (newer writers), a known key of the wrong type is an error.
    fn read_from(file: &GgufFile) -> Result<Provenance, ExportError> {
        let wrong = |key: &str, expected: &str, v: &Value| ExportError::BadProvenance {
            field: key.to_string(),
            detail: format!(
                "has type {} ({}), expected {expected}",
                v.value_type().name(),
                v.summary(40)
            ),
        };
        let string = |key: &str| -> Result<Option<String>, ExportError> {
            match file.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(wrong(key, "string", v)),
            }
        };
        let mut p = Provenance {
            loss: string(KEY_LOSS)?,
            base_model_name: string(KEY_BASE_NAME)?,
            base_model_sha256: string(KEY_BASE_SHA256)?,
            version: string(KEY_VERSION)?,
            ..Provenance::default()
        };
        if let Some(v) = file.get(KEY_STEPS) {
            p.steps = Some(v.as_u64().ok_or_else(|| wrong(KEY_STEPS, "u64", v))?);
        }
        if let Some(v) = file.get(KEY_DATASETS) {
            let items = v
                .as_array()
                .ok_or_else(|| wrong(KEY_DATASETS, "array of strings", v))?;
            for it in items {
                let s = it
                    .as_str()
                    .ok_or_else(|| wrong(KEY_DATASETS, "array of strings", v))?;
                p.datasets.push(s.to_string());
            }
        }
        for (k, v) in file.kvs() {
            let (map, name) = if let Some(name) = k.strip_prefix(PREFIX_LOSS_PARAM) {
                (&mut p.loss_params, name)
            } else if let Some(name) = k.strip_prefix(PREFIX_TRAIN_PARAM) {
                (&mut p.train_params, name)
            } else {
                continue;
            };
            let x = match v {
                Value::String(_) | Value::Array(..) | Value::Bool(_) => None,
                v => v.as_f64(),
            };
            map.insert(name.to_string(), x.ok_or_else(|| wrong(k, "a number", v))?);
        }
        Ok(p)
    }
}

/// Names of the two halves of the LoRA on a base tensor.
pub fn lora_names(base: &str) -> (String, String) {
    (format!("{base}.lora_a"), format!("{base}.lora_b"))
}

fn encode(dtype: AdapterDType, v: &[f32], context: &str) -> Result<Vec<u8>, ExportError> {
    quantize(dtype.ggml(), v).map_err(|source| ExportError::Quant {
        context: context.to_string(),
        source,
    })
}

/// Builds the adapter file in memory (a writer owning its tensor bytes). Checks every LoRA
/// tensor against `cfg` first (layer, shape, lengths, finite values).
pub fn build_adapter(
    lora: &LoraWeights,
    cfg: &ModelConfig,
    prov: &Provenance,
    dtype: AdapterDType,
) -> Result<GgufWriter<'static>, ExportError> {
    check_against(lora, cfg)?;
    let mut w = GgufWriter::new();
    w.set(KEY_ARCH, Value::String(cfg.arch.name().to_string()));
    w.set(KEY_GENERAL_TYPE, Value::String("adapter".into()));
    w.set(KEY_ADAPTER_TYPE, Value::String("lora".into()));
    w.set(KEY_ALPHA, Value::F32(lora.alpha));
    prov.write_to(&mut w)?;

    let mut order: Vec<&LoraTensor> = lora.tensors.iter().collect();
    order.sort_by_key(|t| (t.layer, t.target));
    let r = lora.rank as u64;
    for t in order {
        let base = t.target.tensor_name(t.layer);
        let (na, nb) = lora_names(&base);
        // A [r, n_in] row-major == ggml ne [n_in, r]; B [n_out, r] row-major == ne [r, n_out].
        let a = encode(dtype, &t.a, &na)?;
        let b = encode(dtype, &t.b, &nb)?;
        w.add_tensor(na, &[t.n_in as u64, r], dtype.ggml().id(), a)?;
        w.add_tensor(nb, &[r, t.n_out as u64], dtype.ggml().id(), b)?;
    }
    Ok(w)
}

/// Writes `lora` as a GGUF LoRA adapter for the model described by `cfg` to `path`, through a
/// temporary file in the same folder and a rename (a crash never leaves a half-written file).
pub fn write_adapter(
    path: &Path,
    lora: &LoraWeights,
    cfg: &ModelConfig,
    prov: &Provenance,
    dtype: AdapterDType,
) -> Result<(), ExportError> {
    build_adapter(lora, cfg, prov, dtype)?.write_file(path)?;
    Ok(())
}

/// The adapter as bytes (tests, in-memory use).
pub fn adapter_to_bytes(
    lora: &LoraWeights,
    cfg: &ModelConfig,
    prov: &Provenance,
    dtype: AdapterDType,
) -> Result<Vec<u8>, ExportError> {
    Ok(build_adapter(lora, cfg, prov, dtype)?.try_to_bytes()?)
}

/// Reads a GGUF LoRA adapter: its weights, provenance and `general.architecture`.
///
/// Validates the adapter keys, that every tensor is `blk.N.<projection>.weight.lora_{a,b}` with
/// both halves present, 2-D, F32/F16/BF16, `a.ne[1] == b.ne[0]` (the rank) and one rank for the
/// whole file. A missing or zero `adapter.lora.alpha` means, in llama.cpp, scale = 1; it is read
/// as `alpha = rank` so that [`LoraWeights::scale`] gives the same 1. Shapes against a model are
/// checked separately ([`super::check_against`]).
pub fn read_adapter(path: &Path) -> Result<(LoraWeights, Provenance, String), ExportError> {
    let file = GgufFile::open(path)?;
    read_adapter_file(&file, &path.display().to_string())
}

/// [`read_adapter`] on an open file; `label` names it in errors.
pub fn read_adapter_file(
    file: &GgufFile,
    label: &str,
) -> Result<(LoraWeights, Provenance, String), ExportError> {
    let not = |detail: String| ExportError::NotAnAdapter {
        path: label.to_string(),
        detail,
    };
    let str_key = |key: &str| -> Result<String, ExportError> {
        match file.get(key) {
            None => Err(not(format!("metadata key {key:?} is missing"))),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(not(format!(
                "metadata key {key:?} has type {}, expected string",
                v.value_type().name()
            ))),
        }
    };
    let general_type = str_key(KEY_GENERAL_TYPE)?;
    if general_type != "adapter" {
        return Err(not(format!(
            "general.type is {general_type:?}, expected \"adapter\" (is this a model file? \
             pass the adapter as the first argument and the base model with --model)"
        )));
    }
    let adapter_type = str_key(KEY_ADAPTER_TYPE)?;
    if adapter_type != "lora" {
        return Err(not(format!(
            "adapter.type is {adapter_type:?}; only \"lora\" adapters are supported"
        )));
    }
    let arch = str_key(KEY_ARCH)?;
    let alpha = match file.get(KEY_ALPHA) {
        None => None,
        Some(v) => match v {
            Value::String(_) | Value::Array(..) | Value::Bool(_) => None,
            v => v.as_f32(),
        }
        .map(Some)
        .ok_or_else(|| {
            not(format!(
                "adapter.lora.alpha has type {}, expected f32",
                v.value_type().name()
            ))
        })?,
    };
    let prov = Provenance::read_from(file)?;

    let bad = |tensor: &str, detail: String| ExportError::BadTensor {
        path: label.to_string(),
        tensor: tensor.to_string(),
        detail,
    };
    // (layer, target) -> (a, b) tensor infos
    let mut halves: BTreeMap<(usize, Target), [Option<&crate::gguf::TensorInfo>; 2]> =
        BTreeMap::new();
    for t in file.tensors() {
        let (base, which) = if let Some(b) = t.name.strip_suffix(".lora_a") {
            (b, 0)
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            (b, 1)
        } else {
            return Err(bad(
                &t.name,
                "is not a LoRA tensor (names must end in .lora_a or .lora_b)".into(),
            ));
        };
        let (layer, target) = parse_base_name(base).ok_or_else(|| {
            bad(
                &t.name,
                format!(
                    "LoRA on {base:?} is not supported: bfpo-lite reads LoRAs on \
                     blk.N.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}}.weight \
                     and output.weight only"
                ),
            )
        })?;
        let slot = &mut halves.entry((layer, target)).or_default()[which];
        if slot.is_some() {
            return Err(bad(&t.name, "appears twice".into()));
        }
        *slot = Some(t);
    }
    if halves.is_empty() {
        return Err(not("it holds no LoRA tensors".into()));
    }

    let mut rank: Option<(usize, String)> = None;
    let mut tensors = Vec::with_capacity(halves.len());
    for ((layer, target), [a, b]) in halves {
        let base = target.tensor_name(layer);
        let (na, nb) = lora_names(&base);
        let a = a.ok_or_else(|| bad(&nb, format!("has no matching {na:?}")))?;
        let b = b.ok_or_else(|| bad(&na, format!("has no matching {nb:?}")))?;
        let [n_in, r_a] = dims2(a).map_err(|d| bad(&na, d))?;
        let [r_b, n_out] = dims2(b).map_err(|d| bad(&nb, d))?;
        if r_a != r_b {
            return Err(bad(
                &na,
                format!(
                    "lora_a ne is [{n_in}, {r_a}] and lora_b ne is [{r_b}, {n_out}]: the ranks \
                     (lora_a.ne[1], lora_b.ne[0]) differ (is lora_a transposed?)"
                ),
            ));
        }
        match &rank {
            None => rank = Some((r_a, na.clone())),
            Some((r0, first)) if *r0 != r_a => {
                return Err(bad(
                    &na,
                    format!(
                        "has rank {r_a} but {first:?} has rank {r0}; bfpo-lite needs one rank per adapter"
                    ),
                ));
            }
            _ => {}
        }
        let a_vals = read_floats(file, a).map_err(|d| bad(&na, d))?;
        let b_vals = read_floats(file, b).map_err(|d| bad(&nb, d))?;
        tensors.push(LoraTensor {
            layer,
            target,
            n_in,
            n_out,
            a: a_vals,
            b: b_vals,
        });
    }
    let rank = rank.map(|r| r.0).unwrap_or(1);
    let alpha = match alpha {
        Some(a) if a != 0.0 => a,
        _ => rank as f32,
    };
    let lora = LoraWeights {
        rank,
        alpha,
        tensors,
    };
    check_lora(&lora)?;
    Ok((lora, prov, arch))
}

/// `blk.N.<stem>.weight` → (N, target); `output.weight` (the LM head) → (0, Target::Output).
pub fn parse_base_name(base: &str) -> Option<(usize, Target)> {
    if base == "output.weight" {
        return Some((0, Target::Output));
    }
    let rest = base.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = n.parse().ok()?;
    let stem = rest.strip_suffix(".weight")?;
    let target = Target::ALL.into_iter().find(|t| t.gguf_name() == stem)?;
    Some((layer, target))
}

/// ne of a 2-D tensor (trailing dims of 1 allowed).
fn dims2(t: &crate::gguf::TensorInfo) -> Result<[usize; 2], String> {
    if t.ne.len() < 2 || t.ne[2..].iter().any(|&d| d != 1) {
        return Err(format!("has ne {:?}; a LoRA half must be 2-D", t.ne));
    }
    let conv = |d: u64| usize::try_from(d).map_err(|_| format!("dimension {d} is too large"));
    let d = [conv(t.ne[0])?, conv(t.ne[1])?];
    if d[0] == 0 || d[1] == 0 {
        return Err(format!("has an empty dimension: ne {:?}", t.ne));
    }
    Ok(d)
}

fn read_floats(file: &GgufFile, t: &crate::gguf::TensorInfo) -> Result<Vec<f32>, String> {
    let ty = match GgmlType::from_id(t.type_id) {
        Some(ty @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)) => ty,
        _ => {
            return Err(format!(
                "has type {}; LoRA tensors must be F32, F16 or BF16",
                t.type_name()
            ));
        }
    };
    let bytes = file.try_tensor_bytes(t).map_err(|e| e.to_string())?;
    dequantize_vec(ty, bytes, t.n_elements() as usize).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names() {
        assert_eq!(
            parse_base_name("blk.12.ffn_down.weight"),
            Some((12, Target::FfnDown))
        );
        assert_eq!(parse_base_name("blk.0.attn_q.bias"), None);
        assert_eq!(parse_base_name("token_embd.weight"), None);
        assert_eq!(parse_base_name("blk.x.attn_q.weight"), None);
        assert_eq!(parse_base_name("blk.1.attn_norm.weight"), None);
    }

    #[test]
    fn dtype_parse() {
        assert_eq!(AdapterDType::parse("F16"), Some(AdapterDType::F16));
        assert_eq!(AdapterDType::parse("f32"), Some(AdapterDType::F32));
        assert_eq!(AdapterDType::parse("q8_0"), None);
    }
}
