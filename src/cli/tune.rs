//! `bfpo-lite tune`: train a LoRA adapter with BFPO (or IPO/DPO). With no arguments it runs the
//! built-in demo: a tiny quantized model made by `init-model` and a synthetic safety preference
//! set in PKU-SafeRLHF's schema, finishing in under a minute on a laptop CPU.

use anyhow::{Context, bail};
use bfpo_lite::data::batch::TruncationConfig;
use bfpo_lite::data::formats::{Format, LoadOptions};
use bfpo_lite::data::refcache::RefCache;
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::gpu::memory::{self, PlanInput, PlanLimits, fmt_bytes};
use bfpo_lite::model::{Arch, ModelConfig, init};
use bfpo_lite::runtime::{LoadOptions as RtLoadOptions, RtModel};
use bfpo_lite::train::checkpoint::{ADAPTER_FILE, Checkpoint};
use bfpo_lite::train::config::{EngineKind, ScheduleKind, TrainConfig};
use bfpo_lite::train::lora::{LoraSpec, LoraWeights, parse_layers, parse_targets};
use bfpo_lite::train::metrics::{MetricsWriter, curves_svg, read_metrics, truncate_after};
use bfpo_lite::train::prepare::{self, PrepareReport, RefSource};
use bfpo_lite::train::trainer::{self, CheckpointSink, Engine, Event, TrainData, TrainOutcome};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Flags override the `--config` file (CLI wins); unset flags keep the file's or default values.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// GGUF model to tune. Omit --model and --data to run the built-in demo.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Safety preference data (JSONL, .jsonl.gz, .jsonl.xz, Parquet, JSON array); repeatable.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// TOML file with any of the settings below (keys are the long flag names with `_`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder (adapter.gguf, metrics.jsonl, summary.json, curves.svg, checkpoint/).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Continue from a checkpoint folder (OUT/checkpoint); later losses equal an uninterrupted run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Show the memory plan and data summary, then stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite an existing run in OUT.
    #[arg(long)]
    pub force: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Dataset format (default: detected from the fields).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Helpfulness data mixed into every step (BFPO's buffered training); both sides count as safe.
    #[arg(long)]
    pub buffer: Option<PathBuf>,
    #[arg(long)]
    pub buffer_ratio: Option<f64>,
    /// Stop at the first bad row (naming file, line and field) instead of skipping and counting.
    #[arg(long)]
    pub strict: bool,
    /// Treat rows without safety labels (TRL/UltraFeedback/HH) as safe instead of refusing them.
    #[arg(long)]
    pub assume_safe: bool,
    /// bfpo | ipo | dpo, optionally with parameters: `bfpo:tau=0.01,b1=3,alpha=0.5`.
    #[arg(long)]
    pub loss: Option<String>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the LoRA branch input during training (PEFT semantics; default 0).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// LoRA targets: `ffn_down` (default, as the paper), a list like `attn_q,ffn_down`, or `all`.
    #[arg(long)]
    pub targets: Option<String>,
    /// Layers to adapt: `all` or ranges like `0-11`.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long, alias = "lr")]
    pub learning_rate: Option<f64>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Safety pairs per micro-step.
    #[arg(long)]
    pub pairs_per_step: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Recompute reference log-probs even when cached.
    #[arg(long)]
    pub no_ref_cache: bool,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// gpu (wgpu kernels, default) or cpu (the f64 reference model: tiny models only).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// GPU adapter index or name (see `bfpo-lite devices`).
    #[arg(long)]
    pub device: Option<String>,
    /// Adapter tensor type: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub outtype: String,
    /// Time every GPU operation (serialises the work) and report where the time went, per
    /// phase and kernel family, on stderr and in OUT/profile.json.
    #[arg(long)]
    pub profile: bool,
}

/// The built-in demo's model recipe (also documented in models/README.md).
pub fn demo_model_spec() -> init::InitSpec {
    init::InitSpec {
        arch: Arch::Qwen2,
        ty: init::WeightType::Uniform(bfpo_lite::gguf::GgmlType::Q8_0),
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ff: 128,
        tied: true,
        seed: 20_250_408,
        ..init::InitSpec::default()
    }
}

const DEMO_TRAIN: &str = include_str!("../../models/demo/train.jsonl");
const DEMO_HELDOUT: &str = include_str!("../../models/demo/heldout.jsonl");

/// The demo's training settings.
pub fn demo_config() -> TrainConfig {
    TrainConfig {
        out: PathBuf::from("runs/demo"),
        rank: 8,
        lora_alpha: 16.0,
        targets: "all".into(),
        learning_rate: 2e-2,
        warmup_ratio: 0.05,
        epochs: 1,
        pairs_per_step: 4,
        grad_accum: 1,
        max_length: 256,
        max_prompt_length: 128,
        save_every: 0,
        eval_every: 26,
        ..TrainConfig::default()
    }
}

fn apply_overrides(cfg: &mut TrainConfig, a: &Args) {
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { cfg.$f = v; } )* };
    }
    set!(
        eval_fraction,
        buffer_ratio,
        rank,
        lora_alpha,
        lora_dropout,
        targets,
        layers,
        learning_rate,
        schedule,
        warmup_ratio,
        weight_decay,
        max_grad_norm,
        epochs,
        max_steps,
        pairs_per_step,
        grad_accum,
        max_length,
        max_prompt_length,
        seed,
        save_every,
        eval_every,
        engine,
        loss,
        out
    );
    if a.model.is_some() {
        cfg.model = a.model.clone();
    }
    if !a.data.is_empty() {
        cfg.data = a.data.clone();
    }
    if let Some(f) = a.format {
        cfg.format = format!("{f:?}").to_lowercase();
    }
    if a.eval_data.is_some() {
        cfg.eval_data = a.eval_data.clone();
    }
    if a.buffer.is_some() {
        cfg.buffer = a.buffer.clone();
    }
    if a.cache_dir.is_some() {
        cfg.cache_dir = a.cache_dir.clone();
    }
    if a.device.is_some() {
        cfg.device = a.device.clone();
    }
    cfg.strict |= a.strict;
    cfg.no_ref_cache |= a.no_ref_cache;
}

fn parse_format(s: &str) -> anyhow::Result<Format> {
    <Format as clap::ValueEnum>::from_str(s, true)
        .map_err(|_| anyhow::anyhow!("unknown dataset format {s:?}; use auto, pku, redteam, generic, trl, ultrafeedback or hh"))
}

fn setup_demo(cfg: &mut TrainConfig) -> anyhow::Result<()> {
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let model = out.join("demo-model.gguf");
    init::write(&demo_model_spec(), &model)
        .with_context(|| format!("writing the demo model {}", model.display()))?;
    let data_dir = out.join("demo-data");
    std::fs::create_dir_all(&data_dir)?;
    let train = data_dir.join("train.jsonl");
    let heldout = data_dir.join("heldout.jsonl");
    std::fs::write(&train, DEMO_TRAIN)?;
    std::fs::write(&heldout, DEMO_HELDOUT)?;
    cfg.model = Some(model);
    cfg.data = vec![train];
    cfg.eval_data = Some(heldout);
    Ok(())
}

/// Everything a run prints at the end and writes to summary.json.
#[derive(serde::Serialize)]
struct Summary<'a> {
    model: String,
    engine: String,
    config: &'a TrainConfig,
    data: &'a PrepareReport,
    eval_pairs: usize,
    buffer_pairs: usize,
    reference: Vec<RefSource>,
    plan_total_bytes: u64,
    steps: usize,
    interrupted: bool,
    skipped_steps: usize,
    tokens: u64,
    train_seconds: f64,
    total_seconds: f64,
    tokens_per_second: f64,
    final_train: Option<bfpo_lite::train::metrics::StepMetrics>,
    final_eval: Option<bfpo_lite::train::metrics::StepMetrics>,
    heldout_before: Option<trainer::RankingEval>,
    heldout_after: Option<trainer::RankingEval>,
    adapter: String,
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let demo = args.model.is_none()
        && args.data.is_empty()
        && args.config.is_none()
        && args.resume.is_none();
    let mut cfg = if let Some(p) = &args.config {
        TrainConfig::from_toml_file(p)?
    } else if let Some(ck) = &args.resume {
        let run_dir = ck.parent().unwrap_or(Path::new("."));
        let saved = run_dir.join("config.toml");
        TrainConfig::from_toml_file(&saved).with_context(|| {
            format!(
                "--resume {} reads the run's settings from {}",
                ck.display(),
                saved.display()
            )
        })?
    } else if demo {
        demo_config()
    } else {
        TrainConfig::default()
    };
    apply_overrides(&mut cfg, &args);
    if args.resume.is_none() && !args.dry_run {
        let existing = cfg.out.join(ADAPTER_FILE);
        if existing.exists() && !args.force && !demo {
            bail!(
                "{} already holds a finished run ({}); use --force to overwrite, --resume {}/checkpoint to continue, or another --out",
                cfg.out.display(),
                existing.display(),
                cfg.out.display()
            );
        }
    }
    if demo {
        setup_demo(&mut cfg)?;
        eprintln!(
            "bfpo-lite demo: BFPO on a tiny Q8_0 qwen2 model ({}) with {} synthetic safety pairs; outputs in {}",
            cfg.model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            DEMO_TRAIN.lines().count(),
            cfg.out.display()
        );
    }
    cfg.validate()?;
    let model_path = cfg
        .model
        .clone()
        .context("no model: pass --model MODEL.gguf (or run `bfpo-lite tune` with no arguments for the demo)")?;
    if cfg.data.is_empty() {
        bail!(
            "no training data: pass --data FILE (PKU-SafeRLHF rows, BFPO red-team JSON, or prompt/chosen/rejected rows with safety labels)"
        );
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;

    // Model: shape for the planner, vocabulary and chat template through llama.cpp.
    let file =
        GgufFile::open(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let mcfg = ModelConfig::from_gguf(&file)
        .with_context(|| format!("{} cannot be trained", model_path.display()))?;
    let rt = RtModel::load(&model_path, &RtLoadOptions::default())
        .with_context(|| format!("loading {} in llama.cpp", model_path.display()))?;

    // Data.
    let opts = LoadOptions {
        format: parse_format(&cfg.format)?,
        strict: cfg.strict,
        assume_safe: args.assume_safe,
        ..Default::default()
    };
    let trunc = TruncationConfig {
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        ..Default::default()
    };
    let mut report = PrepareReport::default();
    let (pairs, loads) = prepare::load(&cfg.data, &opts)?;
    report.loads.extend(loads);
    let (train_pairs, mut eval_pairs) = prepare::split(pairs, cfg.eval_fraction, cfg.seed)?;
    if let Some(e) = &cfg.eval_data {
        let (p, l) = prepare::load(std::slice::from_ref(e), &opts)?;
        report.loads.extend(l);
        eval_pairs.extend(p);
    }
    let buffer_pairs = match &cfg.buffer {
        Some(b) => {
            let bopts = LoadOptions {
                assume_safe: true,
                format: Format::Auto,
                ..opts.clone()
            };
            let (p, l) = prepare::load(std::slice::from_ref(b), &bopts)?;
            report.loads.extend(l);
            p
        }
        None => Vec::new(),
    };
    let mut data = TrainData {
        train: prepare::encode_pairs(&rt, &train_pairs, &trunc, cfg.strict, &mut report)?,
        eval: prepare::encode_pairs(&rt, &eval_pairs, &trunc, cfg.strict, &mut report)?,
        buffer: prepare::encode_pairs(&rt, &buffer_pairs, &trunc, cfg.strict, &mut report)?,
    };
    drop(rt);
    let max_len = data
        .train
        .iter()
        .chain(&data.eval)
        .chain(&data.buffer)
        .map(|p| p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(1);
    eprintln!(
        "data: {} training pairs, {} held-out, {} buffer; {} rows skipped; longest sequence {} tokens",
        data.train.len(),
        data.eval.len(),
        data.buffer.len(),
        report.skipped(),
        max_len
    );
    for l in &report.loads {
        for (reason, n) in &l.skipped_by_reason {
            eprintln!("  skipped {n} row(s) of {}: {reason}", l.path.display());
        }
        for ex in l.examples.iter().take(3) {
            eprintln!("    e.g. {ex}");
        }
    }
    for (reason, n) in &report.encode_skipped {
        eprintln!("  skipped {n} pair(s) while tokenizing: {reason}");
    }
    for ex in report.encode_examples.iter().take(3) {
        eprintln!("    e.g. {ex}");
    }
    if report.truncation.prompts_truncated + report.truncation.responses_truncated > 0 {
        eprintln!(
            "  truncated: {} prompt(s), {} pair(s) with a cut response (--max-length {}, --max-prompt-length {})",
            report.truncation.prompts_truncated,
            report.truncation.responses_truncated,
            cfg.max_length,
            cfg.max_prompt_length
        );
    }

    // Memory plan, before allocating anything on the device.
    let targets = parse_targets(&cfg.targets)?;
    let layers = parse_layers(&cfg.layers, mcfg.n_layer)?;
    let mut input = PlanInput::new(
        mcfg.clone(),
        file.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.n_bytes))
            .collect(),
    );
    input.max_len = max_len;
    input.pairs_per_step = cfg.pairs_per_step
        + if data.buffer.is_empty() {
            0
        } else {
            ((cfg.pairs_per_step as f64) * cfg.buffer_ratio).round() as usize
        };
    input.rank = cfg.rank;
    input.targets = targets.clone();
    input.lora_layers = layers.len();
    let plan = memory::plan(&input)?;
    eprintln!(
        "memory plan: {} on the device ({} weights as stored); largest binding {} ({})",
        fmt_bytes(plan.total),
        fmt_bytes(plan.item("weights").unwrap_or(0)),
        fmt_bytes(plan.largest_binding.bytes),
        plan.largest_binding.name
    );
    if args.dry_run {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"plan": plan, "data": report, "train_pairs": data.train.len(), "eval_pairs": data.eval.len()})
            )?
        );
        return Ok(());
    }

    // Engine.
    if args.profile {
        bfpo_lite::gpu::profile::start();
    }
    let spec = LoraSpec {
        targets,
        layers,
        rank: cfg.rank,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        seed: cfg.seed,
    };
    let lora = LoraWeights::init(&spec, &mcfg)?;
    let adam = bfpo_lite::train::optim::AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let mut engine: Box<dyn Engine> = match cfg.engine {
        EngineKind::Cpu => {
            let w = bfpo_lite::model::Weights::from_gguf(&file, &mcfg)?;
            let m = bfpo_lite::model::reference::RefModel::from_weights(&mcfg, &w)?;
            Box::new(bfpo_lite::train::engine::CpuEngine::new(m, lora, adam)?)
        }
        EngineKind::Gpu => make_gpu_engine(&file, &mcfg, lora, adam, &cfg, &plan)?,
    };
    eprintln!("engine: {}", engine.describe());

    // Reference log-probs: cached on disk, keyed by model, examples and settings.
    let cache_dir = cfg
        .cache_dir
        .clone()
        .unwrap_or_else(|| prepare::default_cache_dir(&cfg.out));
    let cache = if cfg.no_ref_cache {
        None
    } else {
        Some(RefCache::open(&cache_dir)?)
    };
    // The model's SHA-256 keys the cache and is recorded in the adapter's provenance.
    let fingerprint = match &cache {
        Some(c) => c.fingerprint(&model_path)?,
        None => RefCache::open(&cache_dir)?.fingerprint(&model_path)?,
    };
    let identity = fingerprint.identity();
    let model_sha256: String = fingerprint
        .sha256
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let settings = format!("engine={:?};ref=adapter-off", cfg.engine);
    let score_batch = (4 * cfg.pairs_per_step).max(8);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({eta})")?
            .progress_chars("=> "),
    );
    bar.set_prefix("reference");
    let mut ref_sources = Vec::new();
    for (name, set) in [
        ("train", &mut data.train),
        ("held-out", &mut data.eval),
        ("buffer", &mut data.buffer),
    ] {
        let src = prepare::fill_reference(
            engine.as_mut(),
            cache.as_ref().map(|c| (c, identity.as_slice())),
            &format!("{settings};set={name}"),
            set,
            score_batch,
            &mut |e| {
                if let Event::Reference { done, total } = e {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                }
            },
        )?;
        if let RefSource::Cache(p) = &src {
            eprintln!("reference log-probs ({name}): reused from {}", p.display());
        }
        ref_sources.push(src);
    }
    bar.finish_and_clear();

    // Train.
    let metrics_path = cfg.out.join("metrics.jsonl");
    let resume = match &args.resume {
        Some(dir) => {
            let ck = Checkpoint::load(dir)?;
            truncate_after(&metrics_path, ck.meta.step).map_err(anyhow::Error::msg)?;
            eprintln!("resuming from {} at step {}", dir.display(), ck.meta.step);
            Some(ck)
        }
        None => {
            if metrics_path.exists() {
                std::fs::remove_file(&metrics_path)?;
            }
            None
        }
    };
    std::fs::write(cfg.out.join("config.toml"), cfg.to_toml())?;
    let mut metrics = MetricsWriter::append(&metrics_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let total = trainer::total_steps(&cfg, data.train.len());
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({eta})")?
            .progress_chars("=> "),
    );
    bar.set_prefix("training");
    let loss_params = match bfpo_lite::loss::Loss::parse(&cfg.loss)? {
        bfpo_lite::loss::Loss::Bfpo { tau, b1, alpha } => {
            vec![("tau", tau), ("b1", b1), ("alpha", alpha)]
        }
        bfpo_lite::loss::Loss::Ipo { tau } => vec![("tau", tau)],
        bfpo_lite::loss::Loss::Dpo {
            beta,
            label_smoothing,
        } => vec![("beta", beta), ("label_smoothing", label_smoothing)],
    };
    let prov = Provenance {
        loss: Some(
            bfpo_lite::loss::Loss::parse(&cfg.loss)?
                .kind()
                .name()
                .to_string(),
        ),
        loss_params: loss_params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        base_model_sha256: Some(model_sha256),
        steps: None,
        base_model_name: Some(mcfg.name.clone().unwrap_or_else(|| {
            model_path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        })),
        datasets: cfg.data.iter().map(|p| p.display().to_string()).collect(),
        train_params: [
            ("learning_rate", cfg.learning_rate),
            ("rank", cfg.rank as f64),
            ("pairs_per_step", cfg.pairs_per_step as f64),
            ("grad_accum", cfg.grad_accum as f64),
            ("seed", cfg.seed as f64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    };
    let dtype = AdapterDType::parse(&args.outtype)
        .with_context(|| format!("--outtype {}: use f32 or f16", args.outtype))?;
    let mut write_extra = |dir: &Path, lora: &LoraWeights, step: usize| -> Result<(), String> {
        let p = Provenance {
            steps: Some(step as u64),
            ..prov.clone()
        };
        write_adapter(&dir.join(ADAPTER_FILE), lora, &mcfg, &p, dtype).map_err(|e| e.to_string())
    };
    let mut sink = CheckpointSink {
        dir: cfg.out.join("checkpoint"),
        write_extra: &mut write_extra,
    };
    let mut write_err: Option<std::io::Error> = None;
    let t_train = Instant::now();
    let outcome: TrainOutcome = trainer::train(
        engine.as_mut(),
        &cfg,
        &data,
        resume,
        &stop,
        &mut sink,
        &mut |e| match e {
            Event::Step(m) => {
                bar.set_position(m.step as u64);
                bar.set_message(format!(
                    "loss {:.4e} margin {:+.3} acc {:.2} {:.0} tok/s",
                    m.loss,
                    m.rewards_margins,
                    m.accuracy_bfpo.unwrap_or(0.0),
                    m.tokens_per_second.unwrap_or(0.0)
                ));
                if let Err(err) = metrics.write(&m) {
                    write_err.get_or_insert(err);
                }
            }
            Event::Eval(m) => {
                bar.println(format!(
                    "  eval @ step {}: loss {:.4e}, margin {:+.3}, BFPO-ranking accuracy {:.3}",
                    m.step,
                    m.loss,
                    m.rewards_margins,
                    m.accuracy_bfpo.unwrap_or(f64::NAN)
                ));
                if let Err(err) = metrics.write(&m) {
                    write_err.get_or_insert(err);
                }
            }
            Event::SkippedStep { step, reason } => {
                bar.println(format!("  step {step} skipped: {reason}"))
            }
            Event::Checkpoint { step, dir } => {
                bar.set_message(format!("checkpoint at step {step} in {}", dir.display()))
            }
            Event::Reference { .. } => {}
        },
    )?;
    bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e).context("writing metrics.jsonl");
    }
    let train_seconds = t_train.elapsed().as_secs_f64();

    // Outputs.
    let adapter_path = cfg.out.join(ADAPTER_FILE);
    let lora = engine.lora()?;
    write_adapter(
        &adapter_path,
        &lora,
        &mcfg,
        &Provenance {
            steps: Some(outcome.steps as u64),
            ..prov.clone()
        },
        dtype,
    )?;
    let records = read_metrics(&metrics_path).map_err(anyhow::Error::msg)?;
    std::fs::write(
        cfg.out.join("curves.svg"),
        curves_svg(
            &records,
            &format!("bfpo-lite: {} on {}", cfg.loss, model_path.display()),
        ),
    )?;
    let summary = Summary {
        model: model_path.display().to_string(),
        engine: engine.describe(),
        config: &cfg,
        data: &report,
        eval_pairs: data.eval.len(),
        buffer_pairs: data.buffer.len(),
        reference: ref_sources,
        plan_total_bytes: plan.total,
        steps: outcome.steps,
        interrupted: outcome.interrupted,
        skipped_steps: outcome.skipped_steps,
        tokens: outcome.tokens,
        train_seconds,
        total_seconds: t_start.elapsed().as_secs_f64(),
        tokens_per_second: outcome.tokens as f64 / train_seconds.max(1e-9),
        final_train: outcome.final_train.clone(),
        final_eval: outcome.final_eval.clone(),
        heldout_before: outcome.eval_before,
        heldout_after: outcome.eval_after,
        adapter: adapter_path.display().to_string(),
    };
    let json = serde_json::to_string_pretty(&summary)?;
    std::fs::write(cfg.out.join("summary.json"), &json)?;
    if let Some(p) = bfpo_lite::gpu::profile::take() {
        eprint!("{p}");
        std::fs::write(
            cfg.out.join("profile.json"),
            serde_json::to_string_pretty(&p)?,
        )?;
    }
    if args.json {
        println!("{json}");
        return Ok(());
    }
    print_summary(&summary, &cfg.out);
    Ok(())
}

fn print_summary(s: &Summary<'_>, out: &Path) {
    let status = if s.interrupted {
        "interrupted (checkpoint saved)"
    } else {
        "done"
    };
    println!(
        "\n{status}: {} steps in {:.1} s ({:.0} tokens/s, {} skipped); total {:.1} s",
        s.steps, s.train_seconds, s.tokens_per_second, s.skipped_steps, s.total_seconds
    );
    if let Some(m) = &s.final_train {
        println!(
            "last step: loss {:.4e}, reward margin {:+.4}, reward accuracy {:.3}",
            m.loss, m.rewards_margins, m.rewards_accuracies
        );
    }
    if let (Some(b), Some(a)) = (&s.heldout_before, &s.heldout_after) {
        println!(
            "\nheld-out pairs ({}; {} with one safe and one unsafe response):",
            a.pairs, a.mixed_pairs
        );
        println!("  {:<44} {:>8} {:>8}", "", "before", "after");
        println!(
            "  {:<44} {:>8.3} {:>8.3}",
            "preference accuracy (BFPO ranking)", b.preference_accuracy, a.preference_accuracy
        );
        println!(
            "  {:<44} {:>8.3} {:>8.3}",
            "safety-ranking accuracy (safe above unsafe)",
            b.safety_ranking_accuracy,
            a.safety_ranking_accuracy
        );
        println!("  (ranked by mean per-token log-prob of each response under the model)");
    }
    if let Some(e) = &s.final_eval {
        println!(
            "held-out implicit reward: margin {:+.4}, BFPO-ranking accuracy {:.3}",
            e.rewards_margins,
            e.accuracy_bfpo.unwrap_or(f64::NAN)
        );
    }
    println!(
        "\nwrote {}/adapter.gguf, metrics.jsonl, summary.json, curves.svg, checkpoint/",
        out.display()
    );
    println!(
        "try it: bfpo-lite generate --model {} --adapter {} --prompt \"...\"",
        s.model, s.adapter
    );
}

fn make_gpu_engine(
    file: &GgufFile,
    cfg: &ModelConfig,
    lora: LoraWeights,
    adam: bfpo_lite::train::optim::AdamWConfig,
    tc: &TrainConfig,
    plan: &memory::Plan,
) -> anyhow::Result<Box<dyn Engine>> {
    let gpu = bfpo_lite::gpu::Gpu::new(&bfpo_lite::gpu::DeviceOptions {
        selector: tc.device.clone(),
    })?;
    let limits = PlanLimits {
        max_storage_buffer_binding_size: gpu.max_binding(),
        max_buffer_size: gpu.max_buffer(),
    };
    // wgpu does not report device memory; check the limits it does report.
    plan.fits(&limits, u64::MAX)
        .context("this run does not fit the GPU's limits")?;
    Ok(Box::new(bfpo_lite::train::gpu_engine::GpuEngine::new(
        gpu, file, cfg, lora, adam,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag that mirrors a config key must override it (a missing entry would be ignored
    /// silently).
    #[test]
    fn every_flag_overrides_its_config_key() {
        let a = Args {
            model: Some("m.gguf".into()),
            data: vec!["d.jsonl".into()],
            out: Some("o".into()),
            format: Some(Format::Pku),
            eval_data: Some("e.jsonl".into()),
            eval_fraction: Some(0.25),
            buffer: Some("b.parquet".into()),
            buffer_ratio: Some(0.5),
            strict: true,
            loss: Some("ipo".into()),
            rank: Some(3),
            lora_alpha: Some(7.0),
            lora_dropout: Some(0.2),
            targets: Some("attn_q".into()),
            layers: Some("0-1".into()),
            learning_rate: Some(3e-4),
            schedule: Some(ScheduleKind::Linear),
            warmup_ratio: Some(0.3),
            weight_decay: Some(0.01),
            max_grad_norm: Some(2.0),
            epochs: Some(5),
            max_steps: Some(9),
            pairs_per_step: Some(6),
            grad_accum: Some(7),
            max_length: Some(300),
            max_prompt_length: Some(100),
            seed: Some(11),
            save_every: Some(13),
            eval_every: Some(17),
            no_ref_cache: true,
            cache_dir: Some("c".into()),
            engine: Some(EngineKind::Cpu),
            device: Some("1".into()),
            ..Default::default()
        };
        let mut c = TrainConfig::default();
        apply_overrides(&mut c, &a);
        let want = TrainConfig {
            model: Some("m.gguf".into()),
            data: vec!["d.jsonl".into()],
            format: "pku".into(),
            eval_data: Some("e.jsonl".into()),
            eval_fraction: 0.25,
            buffer: Some("b.parquet".into()),
            buffer_ratio: 0.5,
            out: "o".into(),
            strict: true,
            loss: "ipo".into(),
            rank: 3,
            lora_alpha: 7.0,
            targets: "attn_q".into(),
            layers: "0-1".into(),
            lora_dropout: 0.2,
            learning_rate: 3e-4,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.3,
            weight_decay: 0.01,
            max_grad_norm: 2.0,
            epochs: 5,
            max_steps: 9,
            pairs_per_step: 6,
            grad_accum: 7,
            max_length: 300,
            max_prompt_length: 100,
            seed: 11,
            save_every: 13,
            eval_every: 17,
            no_ref_cache: true,
            cache_dir: Some("c".into()),
            engine: EngineKind::Cpu,
            device: Some("1".into()),
            ..TrainConfig::default()
        };
        assert_eq!(c, want);
    }
}
