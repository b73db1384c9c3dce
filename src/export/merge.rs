//! Merged model: a full GGUF with `W' = W + (alpha/r)·B·A` folded into every adapted weight.
//!
//! Each adapted tensor is dequantized, updated in f32 and stored as F16 (default) or re-quantized
//! to a chosen type with our no-clip round-to-nearest quantizers (`gguf::quant`). Every other
//! tensor keeps its bytes (borrowed from the memory-mapped model) and all metadata is copied
//! unchanged, in order.
//!
//! Re-quantizing can erase a small update: a 4-bit block type rounds each weight to one of 16
//! levels, and an update smaller than the rounding step mostly disappears. The report gives, per
//! tensor, ‖ΔW‖, the quantization error ‖Q(W+ΔW) − (W+ΔW)‖, their ratio, and the relative error
//! of the update as stored, `‖(Q(W+ΔW) − Q(W)) − ΔW‖ / ‖ΔW‖`: the merged tensor against the base
//! re-quantized the same way (0 = the update is stored exactly; near or above 1 = what remains of
//! it is rounding noise).

use super::{ExportError, check_against, check_arch};
use crate::gguf::quant::{dequantize_vec, quantize};
use crate::gguf::{GgmlType, GgufFile, GgufWriter};
use crate::model::ModelConfig;
use crate::model::lora::LoraWeights;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Per-tensor numbers of a merge.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorMerge {
    pub name: String,
    pub in_type: String,
    pub out_type: String,
    /// ‖W‖ (Frobenius, of the dequantized base weight).
    pub weight_norm: f64,
    /// ‖ΔW‖ = ‖(alpha/r)·B·A‖.
    pub delta_norm: f64,
    /// ‖Q(W+ΔW) − (W+ΔW)‖ for the output type (0 for F32).
    pub quant_error_norm: f64,
    /// ‖ΔW‖ / ‖Q(W+ΔW) − (W+ΔW)‖ (infinite when the output type is exact).
    pub update_to_error: f64,
    /// ‖(Q(W+ΔW) − Q(W)) − ΔW‖ / ‖ΔW‖: relative error of the update as stored (0 for F32).
    pub update_rel_error: f64,
}

/// What [`merge`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MergeReport {
    pub out_type: String,
    pub tensors: Vec<TensorMerge>,
    /// Tensors copied unchanged.
    pub n_copied: usize,
    /// Things a person should read (the CLI prints them).
    pub warnings: Vec<String>,
}

/// Below this `update_to_error`, a tensor gets its own warning.
pub const WEAK_UPDATE_RATIO: f64 = 1.0;

fn is_4bit(t: GgmlType) -> bool {
    matches!(t, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K)
}

/// Builds the merged model (a writer borrowing the unchanged tensors from `model`) and its report.
/// `out_type` = `None` stores merged tensors as F16.
pub fn merge<'m>(
    model: &'m GgufFile,
    model_label: &Path,
    adapter_arch: &str,
    lora: &LoraWeights,
    out_type: Option<GgmlType>,
) -> Result<(GgufWriter<'m>, MergeReport), ExportError> {
    let cfg = ModelConfig::from_gguf(model)?;
    check_arch(adapter_arch, &cfg, model_label)?;
    check_against(lora, &cfg)?;
    let out_type = out_type.unwrap_or(GgmlType::F16);
    let scale = lora.scale();
    let by_name: HashMap<String, &crate::model::lora::LoraTensor> = lora
        .tensors
        .iter()
        .map(|t| (t.target.tensor_name(t.layer), t))
        .collect();

    let mut w = GgufWriter::new();
    for (k, v) in model.kvs() {
        w.set(k.clone(), v.clone());
    }
    let mut report = MergeReport {
        out_type: out_type.to_string(),
        tensors: Vec::new(),
        n_copied: 0,
        warnings: Vec::new(),
    };
    for info in model.tensors() {
        let Some(lt) = by_name.get(&info.name) else {
            w.add_tensor(
                info.name.clone(),
                &info.ne,
                info.type_id,
                model.try_tensor_bytes(info)?,
            )?;
            report.n_copied += 1;
            continue;
        };
        let in_ty = info.ggml_type()?;
        let n = lt.n_in * lt.n_out;
        if info.ne.len() != 2 || info.ne[0] as usize != lt.n_in || info.ne[1] as usize != lt.n_out {
            return Err(ExportError::ShapeMismatch {
                tensor: info.name.clone(),
                found_in: lt.n_in,
                found_out: lt.n_out,
                want_in: info.ne.first().copied().unwrap_or(0) as usize,
                want_out: info.ne.get(1).copied().unwrap_or(0) as usize,
            });
        }
        let quant_err = |source| ExportError::Quant {
            context: format!("{} ({in_ty} → {out_type})", info.name),
            source,
        };
        let base = dequantize_vec(in_ty, model.try_tensor_bytes(info)?, n).map_err(quant_err)?;
        // ΔW [n_out, n_in] row-major = the ggml layout of a [n_in, n_out] tensor.
        let delta = lt.delta(lora.rank, scale);
        let merged: Vec<f32> = base.iter().zip(&delta).map(|(w, d)| w + d).collect();
        let bytes = quantize(out_type, &merged).map_err(quant_err)?;
        let stored = dequantize_vec(out_type, &bytes, n).map_err(quant_err)?;
        // Q(W): the base stored the same way, to see what the update changes after rounding.
        let base_q = if out_type == GgmlType::F32 {
            base.clone()
        } else {
            let q = quantize(out_type, &base).map_err(quant_err)?;
            dequantize_vec(out_type, &q, n).map_err(quant_err)?
        };

        let (mut wn, mut dn, mut qe, mut ue) = (0f64, 0f64, 0f64, 0f64);
        for i in 0..n {
            let (b, bq, d, m, s) = (
                base[i] as f64,
                base_q[i] as f64,
                delta[i] as f64,
                merged[i] as f64,
                stored[i] as f64,
            );
            wn += b * b;
            dn += d * d;
            qe += (s - m) * (s - m);
            ue += (s - bq - d) * (s - bq - d);
        }
        let (wn, dn_sqrt, qe) = (wn.sqrt(), dn.sqrt(), qe.sqrt());
        let ratio = if qe == 0.0 {
            f64::INFINITY
        } else {
            dn_sqrt / qe
        };
        let rel = if dn == 0.0 { 0.0 } else { ue.sqrt() / dn_sqrt };
        if ratio < WEAK_UPDATE_RATIO {
            report.warnings.push(format!(
                "{}: the update (‖ΔW‖ = {dn_sqrt:.3e}) is smaller than the {out_type} rounding error \
                 ({qe:.3e}); the update stored in the merged weight is off by {:.0}% of its size",
                info.name,
                rel * 100.0
            ));
        }
        report.tensors.push(TensorMerge {
            name: info.name.clone(),
            in_type: in_ty.to_string(),
            out_type: out_type.to_string(),
            weight_norm: wn,
            delta_norm: dn_sqrt,
            quant_error_norm: qe,
            update_to_error: ratio,
            update_rel_error: rel,
        });
        w.add_tensor(info.name.clone(), &info.ne, out_type.id(), bytes)?;
    }
    if is_4bit(out_type) {
        report.warnings.insert(
            0,
            format!(
                "re-quantizing merged weights to {out_type} (4-bit) can erase a small LoRA update; \
                 check the per-tensor ratios, or keep the base model and load the adapter \
                 (--format gguf) instead"
            ),
        );
    }
    Ok((w, report))
}

/// Merges and writes to `out` (through a temporary file and a rename).
pub fn write_merged(
    model_path: &Path,
    adapter_arch: &str,
    lora: &LoraWeights,
    out_type: Option<GgmlType>,
    out: &Path,
) -> Result<MergeReport, ExportError> {
    let model = GgufFile::open(model_path)?;
    let (w, report) = merge(&model, model_path, adapter_arch, lora, out_type)?;
    w.write_file(out)?;
    Ok(report)
}
