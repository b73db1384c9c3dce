//! `bfpo-lite plan`: the device-memory plan of a training run, without running it.

use anyhow::Context;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::gpu::memory::{self, PlanInput, PlanLimits, fmt_bytes};
use bfpo_lite::model::ModelConfig;
use bfpo_lite::model::lora::{parse_layers, parse_targets};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// A GGUF model file to plan for.
    #[arg(long, conflicts_with = "shape", required_unless_present = "shape", value_parser = super::hub::model_arg)]
    pub model: Option<PathBuf>,
    /// Plan for a known model shape without a file: qwen2.5-0.5b, qwen2.5-1.5b, qwen3-0.6b,
    /// llama-3.2-1b, smollm2-135m.
    #[arg(long)]
    pub shape: Option<String>,
    /// Weight type assumed with --shape (every matrix stored in it): f32, f16, bf16, q8_0,
    /// q4_0, q4_k, …
    #[arg(long = "type", default_value = "q8_0")]
    pub ty: String,
    /// Tokens per sequence (prompt + response).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Preference pairs per micro-step (2 sequences each).
    #[arg(long, default_value_t = 1)]
    pub pairs_per_step: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA targets: `all` or a list such as `ffn_down,attn_q` (HF names work too).
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Layers carrying adapters: `all`, `0-11`, `3,5,7-9`.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Vocabulary rows per LM-head chunk.
    #[arg(long, default_value_t = memory::DEFAULT_VOCAB_CHUNK)]
    pub vocab_chunk: usize,
    /// Keep every layer's activations instead of recomputing them (more memory, less compute).
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Budget for keeping activations between forward and backward (`tune --activation-memory`;
    /// default: `auto` on a GPU, 2 GiB): shows how many layers keep theirs on top of the plan.
    #[arg(long, value_name = "SIZE")]
    pub activation_memory: Option<String>,
    /// Check the plan against this much device memory (e.g. 8GiB, 1.5GB, 6000MB).
    #[arg(long)]
    pub device_mem: Option<String>,
    /// Largest storage binding of the device (default 128MiB, the portable value).
    #[arg(long)]
    pub max_binding: Option<String>,
    /// Largest buffer of the device (default 2GiB minus 1 byte).
    #[arg(long)]
    pub max_buffer: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1.5GB` (decimal), `8GiB` (binary), `512MiB`, `1000000`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    bfpo_lite::util::size::parse_size(s).map_err(anyhow::Error::msg)
}

/// The model's configuration, its tensors' stored sizes, and how to name it.
type ModelInput = (ModelConfig, Vec<(String, u64)>, String);

fn model_input(args: &Args) -> anyhow::Result<ModelInput> {
    if let Some(path) = &args.model {
        let file = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg = ModelConfig::from_gguf(&file)
            .with_context(|| format!("reading the model configuration of {}", path.display()))?;
        let weights = file
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.n_bytes))
            .collect();
        return Ok((cfg, weights, path.display().to_string()));
    }
    let name = args.shape.as_deref().unwrap_or_default();
    let cfg = memory::shape_config(name).with_context(|| {
        format!(
            "unknown shape {name:?}; known shapes: {}",
            memory::SHAPES.join(", ")
        )
    })?;
    let ty = GgmlType::parse(&args.ty).with_context(|| {
        format!(
            "unknown weight type {:?}; supported: {}",
            args.ty,
            GgmlType::supported_list()
        )
    })?;
    let weights = memory::shape_weights(&cfg, ty);
    Ok((cfg, weights, format!("{name} shape, {ty} weights")))
}

/// The plan as text on stdout.
fn print_plan(
    what: &str,
    plan: &memory::Plan,
    kept: &memory::KeptActivations,
    budget: u64,
    limits: &PlanLimits,
    fit: &Option<Result<(), memory::PlanError>>,
    device_mem: Option<u64>,
) {
    let i = &plan.input;
    println!("Device-memory plan for {what}");
    println!(
        "  {} tokens/sequence, {} pair(s) per micro-step ({} sequences), rank {} on {} target(s) × {} layer(s), checkpointing {}",
        i.max_len,
        i.pairs_per_step,
        2 * i.pairs_per_step,
        i.rank,
        i.targets.len(),
        i.lora_layers,
        if i.checkpointing { "on" } else { "off" }
    );
    println!();
    let w = plan.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for it in &plan.items {
        println!(
            "  {:<w$}  {:>10}   {}",
            it.name,
            fmt_bytes(it.bytes),
            it.detail
        );
    }
    println!("  {:<w$}  {:>10}", "total", fmt_bytes(plan.total));
    println!(
        "  then, on a GPU, activations kept for the backward: {} of the {} layers it visits ({} within --activation-memory {}){}",
        kept.kept_layers,
        kept.visited_layers,
        fmt_bytes(kept.kept_bytes),
        fmt_bytes(budget),
        if kept.kept_layers < kept.visited_layers {
            "; the others are recomputed"
        } else {
            ""
        }
    );
    println!();
    println!(
        "  largest binding: {} ({}; limit {})",
        plan.largest_binding.name,
        fmt_bytes(plan.largest_binding.bytes),
        fmt_bytes(limits.max_storage_buffer_binding_size)
    );
    println!(
        "  largest buffer:  {} ({}; limit {})",
        plan.largest_buffer.name,
        fmt_bytes(plan.largest_buffer.bytes),
        fmt_bytes(limits.max_buffer_size)
    );
    println!(
        "  largest weight:  {} ({}; split into row chunks under the binding limit)",
        plan.largest_weight.name,
        fmt_bytes(plan.largest_weight.bytes)
    );
    match (fit, device_mem) {
        (Some(Ok(())), Some(m)) => println!("  fits in {}", fmt_bytes(m)),
        (None, _) => println!("  (pass --device-mem SIZE to check it against a device)"),
        _ => {}
    }
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let (cfg, weights, what) = model_input(&args)?;
    let targets = parse_targets(&args.targets)?;
    let layers = parse_layers(&args.layers, cfg.n_layer)?;
    let mut input = PlanInput::new(cfg, weights);
    input.max_len = args.max_length;
    input.pairs_per_step = args.pairs_per_step;
    input.rank = args.rank;
    input.targets = targets;
    input.lora_layers = layers.len();
    input.vocab_chunk = args.vocab_chunk;
    input.checkpointing = !args.no_checkpointing;
    let plan = memory::plan(&input)?;
    let mut limits = PlanLimits::PORTABLE;
    if let Some(s) = &args.max_binding {
        limits.max_storage_buffer_binding_size = parse_size(s)?;
    }
    if let Some(s) = &args.max_buffer {
        limits.max_buffer_size = parse_size(s)?;
    }
    // Kept activations (the GPU engine's rule): of the layers the backward visits, as many as
    // the budget holds at the largest micro-step.
    let budget = match args.activation_memory.as_deref() {
        None | Some("auto") => bfpo_lite::run::engine::AUTO_ACTIVATION_MEMORY_GPU,
        Some(s) => parse_size(s)?,
    };
    let lowest = layers.iter().copied().min().unwrap_or(input.cfg.n_layer);
    let kept = memory::kept_activations(&input, lowest, budget);
    let device_mem = args.device_mem.as_deref().map(parse_size).transpose()?;
    let fit = device_mem.map(|m| plan.fits(&limits, m));

    if args.json {
        let v = serde_json::json!({
            "model": what,
            "plan": plan,
            "limits": limits,
            "device_mem": device_mem,
            "activations": kept,
            "fits": fit.as_ref().map(|r| r.is_ok()),
            "error": fit.as_ref().and_then(|r| r.as_ref().err().map(|e| e.to_string())),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_plan(&what, &plan, &kept, budget, &limits, &fit, device_mem);
    }
    if let Some(Err(e)) = fit {
        return Err(e.into());
    }
    Ok(())
}
