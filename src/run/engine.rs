//! Choosing and building a training engine: the GPU engine (our WGSL kernels through wgpu) or
//! the CPU engine (the f64 reference model, tiny models only).

use super::{OpenModel, RunError};
use crate::gpu::memory::{Plan, PlanLimits};
use crate::gpu::{DeviceOptions, Gpu};
use crate::model::ModelConfig;
use crate::model::lora::{LoraSpec, LoraWeights, parse_layers, parse_targets};
use crate::model::reference::RefModel;
use crate::optim::AdamWConfig;
use crate::train::config::{EngineKind, TrainConfig};
use crate::train::engine::CpuEngine;
use crate::train::gpu_engine::GpuEngine;
use crate::train::trainer::Engine;
use std::sync::Arc;

/// The LoRA layout of a configuration (targets, layers, rank, alpha, dropout, seed).
pub fn lora_spec(cfg: &TrainConfig, model: &ModelConfig) -> Result<LoraSpec, RunError> {
    Ok(LoraSpec {
        targets: parse_targets(&cfg.targets)?,
        layers: parse_layers(&cfg.layers, model.n_layer)?,
        rank: cfg.rank,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        seed: cfg.seed,
    })
}

/// AdamW settings of a configuration.
pub fn adam_config(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    }
}

/// Opens a GPU by index or name (`None`: the best adapter wgpu finds).
pub fn open_gpu(device: Option<&str>) -> Result<Arc<Gpu>, RunError> {
    Ok(Gpu::new(&DeviceOptions {
        selector: device.map(str::to_string),
    })?)
}

/// Builds the engine `kind` for `model` with a fresh adapter `lora`. The GPU engine first
/// checks `plan` against the device's reported limits (wgpu does not report device memory).
pub fn build_engine(
    kind: EngineKind,
    model: &OpenModel,
    lora: LoraWeights,
    adam: AdamWConfig,
    device: Option<&str>,
    plan: Option<&Plan>,
) -> Result<Box<dyn Engine>, RunError> {
    match kind {
        EngineKind::Cpu => {
            let w =
                crate::model::Weights::from_gguf(&model.file, &model.config).map_err(|source| {
                    RunError::Model {
                        path: model.path.clone(),
                        source,
                    }
                })?;
            let m = RefModel::from_weights(&model.config, &w)?;
            Ok(Box::new(CpuEngine::new(m, lora, adam)?))
        }
        EngineKind::Gpu => {
            let gpu = open_gpu(device)?;
            if let Some(plan) = plan {
                let limits = PlanLimits {
                    max_storage_buffer_binding_size: gpu.max_binding(),
                    max_buffer_size: gpu.max_buffer(),
                };
                plan.fits(&limits, u64::MAX).map_err(RunError::DoesNotFit)?;
            }
            Ok(Box::new(GpuEngine::new(
                gpu,
                &model.file,
                &model.config,
                lora,
                adam,
            )?))
        }
    }
}
