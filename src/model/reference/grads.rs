//! LoRA gradients in the layout of the adapter, and the flat parameter vector of an adapter.

use crate::model::lora::{LoraWeights, Target};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// LoRA gradients
// ---------------------------------------------------------------------------------------------

/// Gradient of one LoRA tensor, same layout as [`LoraTensor`](crate::model::lora::LoraTensor): `a` `[r, n_in]`, `b` `[n_out, r]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraGrad {
    pub layer: usize,
    pub target: Target,
    pub n_in: usize,
    pub n_out: usize,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// Gradients of every tensor of a [`LoraWeights`], in the same order as `LoraWeights::tensors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraGrads {
    pub rank: usize,
    pub tensors: Vec<LoraGrad>,
}

impl LoraGrads {
    pub fn zeros_like(lora: &LoraWeights) -> LoraGrads {
        LoraGrads {
            rank: lora.rank,
            tensors: lora
                .tensors
                .iter()
                .map(|t| LoraGrad {
                    layer: t.layer,
                    target: t.target,
                    n_in: t.n_in,
                    n_out: t.n_out,
                    a: vec![0.0; t.a.len()],
                    b: vec![0.0; t.b.len()],
                })
                .collect(),
        }
    }

    /// All gradients in one vector: tensor by tensor in `tensors` order, A then B of each
    /// (the same order as [`flatten_lora`]).
    pub fn flatten(&self) -> Vec<f64> {
        self.tensors
            .iter()
            .flat_map(|t| t.a.iter().chain(&t.b).copied())
            .collect()
    }

    /// Global L2 norm over every element.
    pub fn norm(&self) -> f64 {
        self.flatten().iter().map(|g| g * g).sum::<f64>().sqrt()
    }
}

/// All LoRA parameters in one vector: tensor by tensor, A then B of each.
pub fn flatten_lora(lora: &LoraWeights) -> Vec<f32> {
    lora.tensors
        .iter()
        .flat_map(|t| t.a.iter().chain(&t.b).copied())
        .collect()
}

/// Inverse of [`flatten_lora`]: writes `flat` back into `lora` (lengths must match).
pub fn unflatten_lora(flat: &[f32], lora: &mut LoraWeights) {
    assert_eq!(flat.len(), lora.n_params(), "unflatten_lora: length");
    let mut off = 0;
    for t in &mut lora.tensors {
        let na = t.a.len();
        t.a.copy_from_slice(&flat[off..off + na]);
        off += na;
        let nb = t.b.len();
        t.b.copy_from_slice(&flat[off..off + nb]);
        off += nb;
    }
}
