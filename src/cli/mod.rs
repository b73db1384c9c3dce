//! Command-line interface: clap definitions, one file per subcommand. Progress bars and all
//! printing live here only.

use clap::{Parser, Subcommand};

pub mod devices;
pub mod eval;
pub mod eval_judge;
pub mod export;
pub mod export_card;
pub mod export_run;
pub mod generate;
pub mod hub;
pub mod import_peft;
pub mod info;
pub mod init_model;
pub mod plan;
pub mod redteam;
pub mod score;
pub mod tune;

#[derive(Parser, Debug)]
#[command(
    name = "bfpo-lite",
    version,
    about = "Safety-tune a quantized GGUF model with BFPO LoRA on one consumer GPU",
    long_about = "Safety-tune a quantized GGUF model with BFPO LoRA on one consumer GPU.\n\nRun `bfpo-lite tune` with no arguments for the built-in demo."
)]
pub struct Cli {
    /// Show library and llama.cpp logs (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Option<Command>,
}

// `tune::Args` is large; the enum is built once per process.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA adapter with BFPO (no arguments: the built-in demo).
    Tune(tune::Args),
    /// Show the device-memory plan of a training run without running it.
    Plan(plan::Args),
    /// Score preference pairs: summed response log-probs of chosen and rejected.
    Score(score::Args),
    /// Generate text from prompts, optionally with an adapter.
    Generate(generate::Args),
    /// Measure harmless rate, over-refusal and helpfulness kept, base vs each adapter.
    Eval(eval::Args),
    /// Validate a judge: agreement, precision and recall against human refusal labels.
    EvalJudge(eval_judge::Args),
    /// Export a trained adapter as GGUF LoRA, PEFT safetensors or a merged model.
    Export(export::Args),
    /// Hand a run over to Hugging Face TRL + accelerate (multi-GPU) as a Python project.
    ExportRun(export_run::Args),
    /// Convert a Hugging Face PEFT LoRA into a GGUF adapter for llama.cpp and `score`.
    ImportPeft(import_peft::Args),
    /// Inspect a GGUF model: architecture, shapes, tensor types, trainability.
    Info(info::Args),
    /// Write a deterministic random-weight model (test fixtures, the demo model).
    InitModel(init_model::Args),
    /// Make safety pairs from the model's own answers to red-team prompts, labelled by a judge.
    Redteam(redteam::Args),
    /// List GPU adapters wgpu can use.
    Devices(devices::Args),
}

/// Installs a `tracing` subscriber on stderr when `-v` is given.
pub fn init_logging(verbose: u8) {
    if verbose == 0 {
        return;
    }
    // Before any model loads: llama.cpp's log lines go to tracing instead of being discarded.
    bfpo_lite::runtime::route_llama_logs_to_tracing();
    let level = match verbose {
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.verbose);
    let verbose = cli.verbose;
    match cli.command {
        None => tune::run(tune::Args::default(), verbose),
        Some(Command::Tune(a)) => tune::run(a, verbose),
        Some(Command::Plan(a)) => plan::run(a, verbose),
        Some(Command::Score(a)) => score::run(a, verbose),
        Some(Command::Generate(a)) => generate::run(a, verbose),
        Some(Command::Eval(a)) => eval::run(a, verbose),
        Some(Command::EvalJudge(a)) => eval_judge::run(a, verbose),
        Some(Command::Export(a)) => export::run(a, verbose),
        Some(Command::ExportRun(a)) => export_run::run(a, verbose),
        Some(Command::ImportPeft(a)) => import_peft::run(a, verbose),
        Some(Command::Info(a)) => info::run(a, verbose),
        Some(Command::InitModel(a)) => init_model::run(a, verbose),
        Some(Command::Redteam(a)) => redteam::run(a, verbose),
        Some(Command::Devices(a)) => devices::run(a, verbose),
    }
}

/// Writes command output to stdout; a closed pipe (`bfpo-lite info … | head`) is not an error.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
