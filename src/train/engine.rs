//! Engines for the training loop: [`RefEngine`] runs the f64 CPU reference model (tiny models:
//! tests and cross-checks); [`HostAdapter`] is the host-side LoRA, gradient and AdamW state it
//! shares with the native CPU engine (`crate::cpu::NativeEngine`). The GPU engine lives in
//! `gpu_engine.rs`.

use crate::data::Example;
use crate::gpu::ops::dropout::Dropout;
use crate::model::lora::LoraWeights;
use crate::model::reference::{RefModel, flatten_lora, unflatten_lora};
use crate::optim::{AdamW, AdamWConfig, global_norm};
use crate::train::trainer::{Engine, SeqScore, TrainError};
use std::collections::BTreeMap;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Engine(e.to_string())
}

/// Names of checkpoint tensors: `"<gguf tensor>.lora_a"` / `.lora_b`, with `.adam_m` / `.adam_v`.
pub fn tensor_names(lora: &LoraWeights) -> Vec<(String, String)> {
    lora.tensors
        .iter()
        .map(|t| {
            let base = t.target.tensor_name(t.layer);
            (format!("{base}.lora_a"), format!("{base}.lora_b"))
        })
        .collect()
}

/// Packs parameters and moments (each in `flatten_lora` order) into named checkpoint tensors.
pub fn pack_state(lora: &LoraWeights, m: &[f32], v: &[f32]) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    let mut off = 0;
    for (t, (na, nb)) in lora.tensors.iter().zip(tensor_names(lora)) {
        for (name, data) in [(na, &t.a), (nb, &t.b)] {
            let n = data.len();
            out.insert(format!("{name}.adam_m"), m[off..off + n].to_vec());
            out.insert(format!("{name}.adam_v"), v[off..off + n].to_vec());
            out.insert(name, data.clone());
            off += n;
        }
    }
    out
}

/// Inverse of [`pack_state`]: fills `lora` and returns (m, v). Errors name a missing tensor or a
/// length mismatch.
pub fn unpack_state(
    tensors: &BTreeMap<String, Vec<f32>>,
    lora: &mut LoraWeights,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let (mut m, mut v) = (Vec::new(), Vec::new());
    let names = tensor_names(lora);
    for (t, (na, nb)) in lora.tensors.iter_mut().zip(names) {
        for (name, dst) in [(na, &mut t.a), (nb, &mut t.b)] {
            let get = |k: &str| {
                tensors
                    .get(k)
                    .ok_or_else(|| TrainError::Resume(format!("checkpoint lacks tensor {k}")))
            };
            let p = get(&name)?;
            if p.len() != dst.len() {
                return Err(TrainError::Resume(format!(
                    "tensor {name} has {} values, this run's adapter has {}",
                    p.len(),
                    dst.len()
                )));
            }
            dst.copy_from_slice(p);
            m.extend_from_slice(get(&format!("{name}.adam_m"))?);
            v.extend_from_slice(get(&format!("{name}.adam_v"))?);
        }
    }
    Ok((m, v))
}

/// Errors when `lora` holds a tensor training cannot update: a LoRA on `output.weight` (the LM
/// head) is scored by both engines but has no backward pass.
pub fn check_trainable(lora: &LoraWeights) -> Result<(), TrainError> {
    if lora
        .tensors
        .iter()
        .any(|t| t.target == crate::model::lora::Target::Output)
    {
        return Err(TrainError::Engine(
            "the adapter has a LoRA on output.weight: it can be scored (score --engine wgpu), not trained; train the per-layer targets".into(),
        ));
    }
    Ok(())
}

/// An adapter trained on the host: LoRA parameters, their accumulated gradients (in
/// `flatten_lora` order) and the AdamW state. The reference engine and the native CPU engine
/// share it, so their optimizer steps and checkpoints are the same code.
pub struct HostAdapter {
    pub lora: LoraWeights,
    pub opt: AdamW,
    pub grads: Vec<f32>,
}

impl HostAdapter {
    /// Refuses adapters training cannot update ([`check_trainable`]); zero gradients and moments.
    pub fn new(lora: LoraWeights, adam: AdamWConfig) -> Result<HostAdapter, TrainError> {
        check_trainable(&lora)?;
        let n = flatten_lora(&lora).len();
        Ok(HostAdapter {
            lora,
            opt: AdamW::new(adam, n).map_err(err)?,
            grads: vec![0.0; n],
        })
    }

    pub fn grad_norm(&self) -> f64 {
        global_norm(&self.grads)
    }

    /// One AdamW step at `lr` with gradients times `grad_scale`; zeroes the gradients.
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<(), TrainError> {
        let mut p = flatten_lora(&self.lora);
        self.opt
            .step(&mut p, &self.grads, lr, grad_scale)
            .map_err(err)?;
        unflatten_lora(&p, &mut self.lora);
        self.zero_grads();
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = 0.0);
    }

    /// Parameters and moments as named tensors, the step count as a scalar.
    pub fn save_state(&self) -> (BTreeMap<String, Vec<f32>>, serde_json::Value) {
        (
            pack_state(&self.lora, &self.opt.m, &self.opt.v),
            serde_json::json!({ "adam_step": self.opt.step }),
        )
    }

    /// Inverse of [`HostAdapter::save_state`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Vec<f32>>,
        scalars: &serde_json::Value,
    ) -> Result<(), TrainError> {
        let (m, v) = unpack_state(tensors, &mut self.lora)?;
        self.opt.m = m;
        self.opt.v = v;
        self.opt.step = scalars["adam_step"]
            .as_u64()
            .ok_or_else(|| TrainError::Resume("state lacks adam_step".into()))?;
        Ok(())
    }
}

/// The CPU reference engine.
pub struct RefEngine {
    model: RefModel,
    state: HostAdapter,
    last: Vec<Example>,
    dropout: Option<Dropout>,
}

impl RefEngine {
    pub fn new(
        model: RefModel,
        lora: LoraWeights,
        adam: AdamWConfig,
    ) -> Result<RefEngine, TrainError> {
        Ok(RefEngine {
            model,
            state: HostAdapter::new(lora, adam)?,
            last: Vec::new(),
            dropout: None,
        })
    }
}

impl Engine for RefEngine {
    fn describe(&self) -> String {
        "cpu reference (f64)".into()
    }

    fn score(&mut self, examples: &[&Example], adapter: bool) -> Result<Vec<SeqScore>, TrainError> {
        let owned: Vec<Example> = examples.iter().map(|e| (*e).clone()).collect();
        let lp = self
            .model
            .sequence_logprobs(&owned, adapter.then_some(&self.state.lora))
            .map_err(err)?;
        Ok(lp
            .into_iter()
            .zip(examples)
            .map(|(logp, e)| SeqScore {
                logp,
                n_tokens: e.n_scored(),
            })
            .collect())
    }

    fn set_dropout(&mut self, dropout: Option<Dropout>) -> Result<(), TrainError> {
        self.dropout = dropout.filter(|d| d.active());
        Ok(())
    }

    fn forward_train(&mut self, examples: &[&Example]) -> Result<Vec<SeqScore>, TrainError> {
        self.last = examples.iter().map(|e| (*e).clone()).collect();
        let Some(d) = self.dropout else {
            return self.score(examples, true);
        };
        // The dropout forward's log-probs (zero weights: no gradient work).
        let zeros = vec![0.0; self.last.len()];
        let (lp, _) = self
            .model
            .lora_grads_dropout(&self.last, &zeros, &self.state.lora, Some(d))
            .map_err(err)?;
        Ok(lp
            .into_iter()
            .zip(examples)
            .map(|(logp, e)| SeqScore {
                logp,
                n_tokens: e.n_scored(),
            })
            .collect())
    }

    fn backward(&mut self, weights: &[f32]) -> Result<(), TrainError> {
        let w: Vec<f64> = weights.iter().map(|&x| x as f64).collect();
        let (_, g) = self
            .model
            .lora_grads_dropout(&self.last, &w, &self.state.lora, self.dropout)
            .map_err(err)?;
        for (acc, x) in self.state.grads.iter_mut().zip(g.flatten()) {
            *acc += x as f32;
        }
        Ok(())
    }

    fn grad_norm(&mut self) -> Result<f64, TrainError> {
        Ok(self.state.grad_norm())
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<(), TrainError> {
        self.state.step(lr, grad_scale)
    }

    fn zero_grads(&mut self) -> Result<(), TrainError> {
        self.state.zero_grads();
        Ok(())
    }

    fn lora(&mut self) -> Result<LoraWeights, TrainError> {
        Ok(self.state.lora.clone())
    }

    fn save_state(
        &mut self,
    ) -> Result<(BTreeMap<String, Vec<f32>>, serde_json::Value), TrainError> {
        Ok(self.state.save_state())
    }

    fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Vec<f32>>,
        scalars: &serde_json::Value,
    ) -> Result<(), TrainError> {
        self.state.load_state(tensors, scalars)
    }
}
