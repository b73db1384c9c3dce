//! The GPU engine: our WGSL forward/backward through wgpu, LoRA state and AdamW on the device.
//! Only per-sequence log-probs come back to the CPU each micro-step, one weight per sequence goes
//! down, and the gradient norm is read once per optimiser step.

use crate::data::Example;
use crate::gguf::GgufFile;
use crate::gpu::backward::{TrainState, backward, forward_train_keeping};
use crate::gpu::forward::GpuModel;
use crate::gpu::ops::adamw::GpuAdamW;
use crate::gpu::ops::dropout::Dropout;
use crate::gpu::ops::lora::GpuLora;
use crate::gpu::profile;
use crate::gpu::{Gpu, GpuBuf};
use crate::model::ModelConfig;
use crate::model::lora::LoraWeights;
use crate::model::reference::flatten_lora;
use crate::optim::{AdamW, AdamWConfig};
use crate::train::engine::{pack_state, unpack_state};
use crate::train::trainer::{Engine, SeqScore, TrainError};
use std::collections::BTreeMap;
use std::sync::Arc;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Engine(e.to_string())
}

/// Model, adapter and optimiser state on one GPU.
pub struct GpuEngine {
    gpu: Arc<Gpu>,
    model: GpuModel,
    lora: GpuLora,
    /// Shapes of the adapter (values are stale; `lora()` downloads the current ones).
    template: LoraWeights,
    opt: GpuAdamW,
    state: Option<TrainState>,
    dropout: Option<Dropout>,
    /// Device bytes a training forward may spend keeping layers' intermediates (the backward
    /// recomputes the layers that do not fit).
    activation_memory: u64,
    /// Layers kept by the last training forward.
    kept_layers: usize,
}

impl GpuEngine {
    /// Uploads the model (weights as stored) and the adapter, and zeroes the optimiser state.
    pub fn new(
        gpu: Arc<Gpu>,
        file: &GgufFile,
        cfg: &ModelConfig,
        lora: LoraWeights,
        adam: AdamWConfig,
    ) -> Result<GpuEngine, TrainError> {
        crate::train::engine::check_trainable(&lora)?;
        let model = GpuModel::load(&gpu, file, cfg).map_err(err)?;
        let glora = GpuLora::upload(&gpu, &lora).map_err(err)?;
        model.check_lora(&glora).map_err(err)?;
        let opt = GpuAdamW::new(&gpu, adam, &Self::sizes(&lora)).map_err(err)?;
        Ok(GpuEngine {
            gpu,
            model,
            lora: glora,
            template: lora,
            opt,
            state: None,
            dropout: None,
            activation_memory: 0,
            kept_layers: 0,
        })
    }

    /// Lets a training forward keep layers' intermediates in up to `bytes` of device memory
    /// instead of recomputing them in the backward (default 0: every layer recomputed).
    /// Results are the same bits either way.
    pub fn with_activation_memory(mut self, bytes: u64) -> GpuEngine {
        self.activation_memory = bytes;
        self
    }

    /// Layers whose intermediates the last training forward kept.
    pub fn kept_layers(&self) -> usize {
        self.kept_layers
    }

    fn sizes(lora: &LoraWeights) -> Vec<usize> {
        lora.tensors
            .iter()
            .flat_map(|t| [t.a.len(), t.b.len()])
            .collect()
    }

    fn params_and_grads(&self) -> (Vec<&GpuBuf>, Vec<&GpuBuf>) {
        let p = self
            .lora
            .tensors
            .iter()
            .flat_map(|t| [&t.a, &t.b])
            .collect();
        let g = self
            .lora
            .tensors
            .iter()
            .flat_map(|t| [&t.grad_a, &t.grad_b])
            .collect();
        (p, g)
    }
}

fn owned(examples: &[&Example]) -> Vec<Example> {
    examples.iter().map(|e| (*e).clone()).collect()
}

impl Engine for GpuEngine {
    fn describe(&self) -> String {
        format!("wgpu: {} ({:?})", self.gpu.info.name, self.gpu.info.backend)
    }

    fn cache_identity(&self) -> String {
        let i = &self.gpu.info;
        format!(
            "wgpu: {} ({:?}); driver {} {}",
            i.name, i.backend, i.driver, i.driver_info
        )
    }

    fn score(&mut self, examples: &[&Example], adapter: bool) -> Result<Vec<SeqScore>, TrainError> {
        profile::set_phase("score");
        let out = self
            .model
            .forward(&self.gpu, &owned(examples), adapter.then_some(&self.lora))
            .map_err(err)?;
        Ok(out
            .seq_logprobs
            .iter()
            .zip(examples)
            .map(|(&logp, e)| SeqScore {
                logp,
                n_tokens: e.n_scored(),
            })
            .collect())
    }

    fn set_dropout(&mut self, dropout: Option<Dropout>) -> Result<(), TrainError> {
        self.dropout = dropout;
        Ok(())
    }

    fn forward_train(&mut self, examples: &[&Example]) -> Result<Vec<SeqScore>, TrainError> {
        profile::set_phase("forward");
        // The previous micro-step's state (if a backward never consumed it) is freed first.
        self.state = None;
        let (seqs, state) = forward_train_keeping(
            &self.model,
            &self.gpu,
            &owned(examples),
            &self.lora,
            self.dropout,
            self.activation_memory,
        )
        .map_err(err)?;
        self.kept_layers = state.kept_layers();
        self.state = Some(state);
        Ok(seqs
            .into_iter()
            .map(|s| SeqScore {
                logp: s.logp,
                n_tokens: s.n_tokens,
            })
            .collect())
    }

    fn backward(&mut self, weights: &[f32]) -> Result<(), TrainError> {
        let state = self.state.take().ok_or_else(|| {
            TrainError::Engine("backward without a preceding forward_train".into())
        })?;
        backward(&self.model, &self.gpu, state, weights, &self.lora).map_err(err)
    }

    fn grad_norm(&mut self) -> Result<f64, TrainError> {
        profile::set_phase("optimizer");
        let mut rec = self.gpu.recorder();
        let (_, grads) = self.params_and_grads();
        self.opt
            .norm
            .record(&self.gpu, &mut rec, &grads, None)
            .map_err(err)?;
        rec.run("gradient norm").map_err(err)?;
        let (ss, _) = self.opt.norm.read(&self.gpu).map_err(err)?;
        Ok((ss as f64).sqrt())
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<(), TrainError> {
        profile::set_phase("optimizer");
        let gpu = self.gpu.clone();
        let mut rec = gpu.recorder();
        {
            let (params, grads) = {
                let p: Vec<&GpuBuf> = self
                    .lora
                    .tensors
                    .iter()
                    .flat_map(|t| [&t.a, &t.b])
                    .collect();
                let g: Vec<&GpuBuf> = self
                    .lora
                    .tensors
                    .iter()
                    .flat_map(|t| [&t.grad_a, &t.grad_b])
                    .collect();
                (p, g)
            };
            self.opt
                .record_step(&gpu, &mut rec, &params, &grads, lr, grad_scale, None)
                .map_err(err)?;
        }
        self.lora.zero_grads(&mut rec);
        rec.run("optimiser step").map_err(err)?;
        self.opt.finish_step(&gpu).map_err(err)?;
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<(), TrainError> {
        profile::set_phase("optimizer");
        let mut rec = self.gpu.recorder();
        self.lora.zero_grads(&mut rec);
        rec.run("zeroing gradients").map_err(err)
    }

    fn lora(&mut self) -> Result<LoraWeights, TrainError> {
        self.lora.download(&self.gpu).map_err(err)
    }

    fn save_state(
        &mut self,
    ) -> Result<(BTreeMap<String, Vec<f32>>, serde_json::Value), TrainError> {
        let lora = self.lora()?;
        let st = self.opt.state(&self.gpu).map_err(err)?;
        Ok((
            pack_state(&lora, &st.m, &st.v),
            serde_json::json!({ "adam_step": st.step }),
        ))
    }

    fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Vec<f32>>,
        scalars: &serde_json::Value,
    ) -> Result<(), TrainError> {
        let mut lora = self.template.clone();
        let (m, v) = unpack_state(tensors, &mut lora)?;
        let step = scalars["adam_step"]
            .as_u64()
            .ok_or_else(|| TrainError::Resume("state lacks adam_step".into()))?;
        debug_assert_eq!(flatten_lora(&lora).len(), m.len());
        self.lora = GpuLora::upload(&self.gpu, &lora).map_err(err)?;
        let st = AdamW {
            cfg: self.opt.cfg,
            step,
            m,
            v,
        };
        self.opt = GpuAdamW::from_state(&self.gpu, &st, &Self::sizes(&lora)).map_err(err)?;
        self.template = lora;
        Ok(())
    }

    fn device_memory(&self) -> Option<u64> {
        let lora: u64 = self
            .lora
            .tensors
            .iter()
            .map(|t| t.a.size + t.b.size + t.grad_a.size + t.grad_b.size)
            .sum();
        let opt: u64 = self.opt.m.iter().chain(&self.opt.v).map(|b| b.size).sum();
        Some(self.model.bytes() + lora + opt + self.state.as_ref().map(|s| s.bytes()).unwrap_or(0))
    }
}
