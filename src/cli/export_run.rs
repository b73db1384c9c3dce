//! `bfpo-lite export-run RUN_DIR --to trl --hf-model ORG/NAME --out DIR`: hands a run over to
//! Hugging Face TRL + accelerate (one GPU, N GPUs, DeepSpeed ZeRO-3) as a self-contained Python
//! project. The run's data is loaded, chat-templated, tokenized and truncated exactly as `tune`
//! does, so the Python side trains on the same token sequences.

use anyhow::{Context, bail};
use bfpo_lite::data::Pair;
use bfpo_lite::data::batch::TruncationConfig;
use bfpo_lite::data::formats::{Format, LoadOptions};
use bfpo_lite::export::trl::{self, TrlData, TrlSettings};
use bfpo_lite::export::write_atomically;
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::model::ModelConfig;
use bfpo_lite::runtime::{LoadOptions as RtLoadOptions, RtModel};
use bfpo_lite::train::config::TrainConfig;
use bfpo_lite::train::prepare::{self, PrepareReport};
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// Hugging Face TRL (`DPOTrainer`) + PEFT + accelerate.
    #[default]
    Trl,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder written by `bfpo-lite tune` (holds config.toml), or a config TOML file.
    #[arg(value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// What to hand the run to.
    #[arg(long, value_enum, default_value_t = Target::Trl)]
    pub to: Target,
    /// Hugging Face model id (or local path) of the model the GGUF was converted from; GGUF
    /// files do not record it reliably.
    #[arg(long, value_name = "ORG/NAME")]
    pub hf_model: String,
    /// Output folder for the Python project.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The GGUF model (default: `model` of the run's config).
    #[arg(long, value_name = "MODEL.gguf", value_parser = super::hub::model_arg)]
    pub model: Option<PathBuf>,
    /// Treat rows without safety labels as safe (as `tune --assume-safe`).
    #[arg(long)]
    pub assume_safe: bool,
    /// Overwrite an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The run's config: `RUN_DIR/config.toml`, or the file itself.
fn run_config(run: &Path) -> anyhow::Result<(TrainConfig, PathBuf)> {
    let path = if run.is_dir() {
        run.join("config.toml")
    } else {
        run.to_path_buf()
    };
    if !path.is_file() {
        bail!(
            "{} has no config.toml; pass a run folder written by `bfpo-lite tune --out DIR` (or its config.toml)",
            run.display()
        );
    }
    let cfg = TrainConfig::from_toml_file(&path)?;
    cfg.validate()
        .with_context(|| format!("checking {}", path.display()))?;
    Ok((cfg, path))
}

/// The model in llama.cpp with the run's chat template and `enable_thinking`, as `tune`
/// rendered the data.
fn load_runtime(model: &Path, cfg: &TrainConfig, cfg_path: &Path) -> anyhow::Result<RtModel> {
    let mut rt = RtModel::load(model, &RtLoadOptions::default())
        .with_context(|| format!("loading {} in llama.cpp", model.display()))?;
    if let Some(spec) = &cfg.chat_template {
        let t = bfpo_lite::template::ChatTemplate::resolve(spec)
            .with_context(|| format!("chat_template {spec:?} in {}", cfg_path.display()))?;
        rt.set_chat_template(t);
    }
    rt.set_enable_thinking(cfg.enable_thinking);
    Ok(rt)
}

/// The run's training, held-out and buffer pairs, loaded and split exactly as `tune` does, and
/// its truncation settings.
#[allow(clippy::type_complexity)]
fn load_like_tune(
    cfg: &TrainConfig,
    cfg_path: &Path,
    assume_safe: bool,
) -> anyhow::Result<(TruncationConfig, (Vec<Pair>, Vec<Pair>, Vec<Pair>))> {
    let format = <Format as clap::ValueEnum>::from_str(&cfg.format, true).map_err(|_| {
        anyhow::anyhow!(
            "unknown dataset format {:?} in {}",
            cfg.format,
            cfg_path.display()
        )
    })?;
    let opts = LoadOptions {
        format,
        strict: cfg.strict,
        assume_safe,
        ..Default::default()
    };
    let trunc = TruncationConfig {
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        ..Default::default()
    };
    let (pairs, _) = prepare::load(&cfg.data, &opts)?;
    let (train_pairs, mut eval_pairs) = prepare::split(pairs, cfg.eval_fraction, cfg.seed)?;
    if let Some(e) = &cfg.eval_data {
        eval_pairs.extend(prepare::load(std::slice::from_ref(e), &opts)?.0);
    }
    let buffer_pairs = match &cfg.buffer {
        Some(b) => {
            let bopts = LoadOptions {
                assume_safe: true,
                format: Format::Auto,
                ..opts.clone()
            };
            prepare::load(std::slice::from_ref(b), &bopts)?.0
        }
        None => Vec::new(),
    };
    Ok((trunc, (train_pairs, eval_pairs, buffer_pairs)))
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let Target::Trl = args.to;
    let (cfg, cfg_path) = run_config(&args.run)?;
    let model_path = args
        .model
        .clone()
        .or_else(|| cfg.model.clone())
        .with_context(|| {
            format!(
                "{} names no model; pass --model MODEL.gguf",
                cfg_path.display()
            )
        })?;
    if cfg.data.is_empty() {
        bail!("{} names no training data", cfg_path.display());
    }
    let file =
        GgufFile::open(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let mcfg = ModelConfig::from_gguf(&file)
        .with_context(|| format!("{} is not a model bfpo-lite supports", model_path.display()))?;
    let rt = load_runtime(&model_path, &cfg, &cfg_path)?;

    // Data, exactly as `tune` prepares it.
    let (trunc, (train_pairs, eval_pairs, buffer_pairs)) =
        load_like_tune(&cfg, &cfg_path, args.assume_safe)?;
    let mut report = PrepareReport::default();
    let mut data = TrlData::default();
    for (pairs, out) in [
        (&train_pairs, &mut data.train),
        (&eval_pairs, &mut data.eval),
        (&buffer_pairs, &mut data.buffer),
    ] {
        let prepared = prepare::encode_pairs(&rt, pairs, &trunc, cfg.strict, &mut report)?;
        *out = trl::rows(pairs, &prepared)?;
    }
    drop(rt);
    let settings = TrlSettings::from_run(
        &cfg,
        &args.hf_model,
        mcfg.n_layer,
        &args.run,
        !data.buffer.is_empty(),
    )?;
    let mut summary = None;
    write_atomically(&args.out, args.force, true, |tmp| {
        summary = Some(trl::write_project(tmp, &settings, &data)?);
        Ok(())
    })
    .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = summary.expect("written");
    if args.json {
        return super::print_out(&(serde_json::to_string_pretty(&summary)? + "\n"));
    }
    let mut text = format!(
        "wrote {} for TRL {} on {}: {} training pairs, {} buffer, {} held-out",
        args.out.display(),
        summary.trl_version,
        summary.hf_model,
        summary.train_pairs,
        summary.buffer_pairs,
        summary.eval_pairs
    );
    let skipped = report.skipped();
    if skipped > 0 {
        text += &format!(" ({skipped} pair(s) skipped while tokenizing, as in training)");
    }
    text += &format!(
        "\nnext: cd {} && pip install -r requirements.txt && accelerate launch --config_file accelerate/single_gpu.yaml train.py\n",
        args.out.display()
    );
    super::print_out(&text)
}
