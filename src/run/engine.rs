//! Choosing and building a training engine: the GPU engine (our WGSL kernels through wgpu), the
//! native CPU engine (`crate::cpu`), or the f64 reference model (tiny models only); `auto` picks
//! wgpu on a real GPU and the CPU engine when the only adapter is a CPU driver or there is none.

use super::{OpenModel, RunError};
use crate::cpu::NativeEngine;
use crate::gpu::memory::{Plan, PlanLimits};
use crate::gpu::{DeviceOptions, Gpu};
use crate::model::ModelConfig;
use crate::model::lora::{LoraSpec, LoraWeights, parse_layers, parse_targets};
use crate::model::reference::RefModel;
use crate::optim::AdamWConfig;
use crate::train::config::{EngineKind, TrainConfig};
use crate::train::engine::RefEngine;
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

/// What `activation_memory = "auto"` gives: wgpu does not report device memory, so a GPU gets a
/// budget that any GPU able to hold a small model can spare, and a CPU Vulkan driver
/// (lavapipe), whose "device memory" is the host's, a quarter of the host's available memory.
pub const AUTO_ACTIVATION_MEMORY_GPU: u64 = 2 << 30;
/// The cap of the CPU-driver budget of `auto`.
pub const AUTO_ACTIVATION_MEMORY_CPU_MAX: u64 = 8 << 30;

/// Bytes the training forward may keep for the backward under the setting `activation_memory`
/// (`auto`, a size, or `0`) on `gpu` (see [`AUTO_ACTIVATION_MEMORY_GPU`]).
pub fn activation_budget(setting: &str, gpu: &Gpu) -> Result<u64, RunError> {
    if setting.trim() != "auto" {
        return crate::util::size::parse_size(setting).map_err(|detail| {
            RunError::Config(crate::train::config::ConfigError::Invalid {
                key: "activation_memory",
                value: setting.to_string(),
                detail,
            })
        });
    }
    if gpu.is_cpu_adapter() {
        let available = host_available_memory().unwrap_or(4 * AUTO_ACTIVATION_MEMORY_GPU);
        return Ok((available / 4).min(AUTO_ACTIVATION_MEMORY_CPU_MAX));
    }
    Ok(AUTO_ACTIVATION_MEMORY_GPU)
}

use crate::cpu::host_available_memory;

/// The engine `auto` resolves to on this host, and the GPU it opened (wgpu on a real GPU; the CPU
/// engine when wgpu finds no adapter or only a CPU driver such as lavapipe). Opening no GPU needs
/// no Vulkan loader: wgpu then simply reports no adapter.
pub fn resolve_engine(
    kind: EngineKind,
    device: Option<&str>,
) -> Result<(EngineKind, Option<Arc<Gpu>>), RunError> {
    match kind {
        EngineKind::Auto => match open_gpu(device) {
            Ok(gpu) if !gpu.is_cpu_adapter() => Ok((EngineKind::Wgpu, Some(gpu))),
            // A device named explicitly is used even when it is a CPU driver.
            Ok(gpu) if device.is_some() => Ok((EngineKind::Wgpu, Some(gpu))),
            _ => Ok((EngineKind::Cpu, None)),
        },
        EngineKind::Wgpu => Ok((EngineKind::Wgpu, Some(open_gpu(device)?))),
        k => Ok((k, None)),
    }
}

/// Host bytes the CPU engine may keep for the backward under `activation_memory`: `auto` is
/// half of the available host memory (layers beyond it are recomputed), a size is taken as is.
pub fn cpu_activation_budget(setting: &str) -> Result<u64, RunError> {
    if setting.trim() == "auto" {
        return Ok(host_available_memory().map_or(4 << 30, |a| a / 2));
    }
    crate::util::size::parse_size(setting).map_err(|detail| {
        RunError::Config(crate::train::config::ConfigError::Invalid {
            key: "activation_memory",
            value: setting.to_string(),
            detail,
        })
    })
}

/// Builds the engine `kind` for `model` with a fresh adapter `lora` (`auto` is resolved with
/// [`resolve_engine`]). The GPU engine first checks `plan` against the device's reported limits
/// (wgpu does not report device memory) and may keep layers' intermediates in up to
/// `activation_memory` (see [`activation_budget`]); the CPU engine checks the plan's host bytes
/// against the available memory, and shares prompts when `prompt_sharing`. The activation
/// budget in bytes is returned with either.
#[allow(clippy::too_many_arguments)]
pub fn build_engine(
    kind: EngineKind,
    model: &OpenModel,
    lora: LoraWeights,
    adam: AdamWConfig,
    device: Option<&str>,
    plan: Option<&Plan>,
    activation_memory: &str,
    threads: Option<usize>,
    prompt_sharing: bool,
) -> Result<(Box<dyn Engine>, Option<u64>), RunError> {
    // The wgpu engine has no Gemma 3 kernels: `auto` takes the CPU engine for it.
    let kind = if kind == EngineKind::Auto && model.config.gemma3.is_some() {
        EngineKind::Cpu
    } else {
        kind
    };
    let (kind, gpu) = resolve_engine(kind, device)?;
    match kind {
        EngineKind::Reference => {
            let w =
                crate::model::Weights::from_gguf(&model.file, &model.config).map_err(|source| {
                    RunError::Model {
                        path: model.path.clone(),
                        source,
                    }
                })?;
            let m = RefModel::from_weights(&model.config, &w)?;
            Ok((Box::new(RefEngine::new(m, lora, adam)?), None))
        }
        EngineKind::Cpu | EngineKind::Auto => {
            let budget = cpu_activation_budget(activation_memory)?;
            let threads = threads.unwrap_or_else(crate::cpu::default_threads);
            let engine = NativeEngine::new(&model.file, &model.config, lora, adam, threads)?
                .with_activation_memory(budget)
                .with_prompt_sharing(prompt_sharing);
            Ok((Box::new(engine), Some(budget)))
        }
        EngineKind::Wgpu => {
            let gpu = gpu.expect("resolved with a GPU");
            if let Some(plan) = plan {
                let limits = PlanLimits {
                    max_storage_buffer_binding_size: gpu.max_binding(),
                    max_buffer_size: gpu.max_buffer(),
                };
                plan.fits(&limits, u64::MAX).map_err(RunError::DoesNotFit)?;
            }
            let budget = activation_budget(activation_memory, &gpu)?;
            let engine = GpuEngine::new(gpu, &model.file, &model.config, lora, adam)?
                .with_activation_memory(budget);
            Ok((Box::new(engine), Some(budget)))
        }
    }
}
