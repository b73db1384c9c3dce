//! `bfpo-lite eval`: harmless rate, over-refusal and helpfulness kept, base vs each adapter.

use super::generate::DEFAULT_GPU_LAYERS;
use anyhow::Context;
use bfpo_lite::eval::{
    EvalEvent, EvalOptions, JudgeFormat, JudgeSpec, PromptSource, run_eval, write_outputs,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (the base). A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(long, short = 'm', value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// GGUF LoRA adapter to evaluate beside the base (repeat for several).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Adapter scale (llama.cpp applies scale · alpha / rank).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    /// Harmful prompts: `harmbench` (200, MIT; the held-out set), `donotanswer` (939,
    /// Apache-2.0, with categories), `advbench` (520, MIT), `uncensorbench` (150, MIT) or a
    /// JSONL file with "prompt" and optionally "category" per line.
    #[arg(long)]
    pub harmful: String,
    /// Benign prompts for the over-refusal rate: `heldout` (248 of our own with categories,
    /// 108 of them benign but risky-sounding; includes `builtin`), `builtin` (126), `train`
    /// (168, for redteam's helpfulness pairs) or a JSONL file.
    #[arg(long)]
    pub benign: Option<String>,
    /// Judge: `refusal` (refusal phrase list), `refusal-objective` (the list plus PyRIT's rule
    /// that an answer unrelated to the request is a refusal; see `eval-judge`) or a chat GGUF
    /// judge model.
    #[arg(long, default_value = "refusal")]
    pub judge: String,
    /// How a GGUF judge is prompted: `llama-guard` (Llama Guard 3) or `yes-no`.
    #[arg(long, default_value = "llama-guard")]
    pub judge_format: String,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// At most N prompts per set (also pairs and questions), spread evenly over the set.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Random seed (used when --temperature > 0).
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// Sampling temperature; 0 = greedy (default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Held-out preference pairs with safety labels (any format `tune` reads): BFPO-ranking
    /// and safety-ranking accuracy.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Multiple-choice JSONL ("question", "choices", "answer"): accuracy by log-likelihood.
    #[arg(long)]
    pub mc: Option<PathBuf>,
    /// Output folder for report.json, report.md, samples.jsonl, samples.md and eval.svg.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Print report.json on stdout instead of the table; no progress bars.
    #[arg(long)]
    pub json: bool,
    /// CPU threads per decode (default: 1 for models under 20 M parameters, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers to offload to the GPU (builds with the metal/vulkan/cuda features).
    #[arg(long, default_value_t = DEFAULT_GPU_LAYERS)]
    pub gpu_layers: u32,
    /// Chat template instead of the model's own: a Jinja file, or a built-in name (chatml,
    /// chatml-smollm2, zephyr, llama3, gemma, gemma3, qwen3); use the one the adapter was
    /// trained with.
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub thinking: super::generate::ThinkingArgs,
}

impl Args {
    /// The library options these flags describe.
    pub fn options(&self) -> anyhow::Result<EvalOptions> {
        let judge = if self.judge.eq_ignore_ascii_case("refusal") {
            JudgeSpec::Refusal
        } else if self.judge.eq_ignore_ascii_case("refusal-objective") {
            JudgeSpec::RefusalObjective
        } else {
            JudgeSpec::Model {
                path: super::hub::model_arg(&self.judge)
                    .map_err(|e| anyhow::anyhow!("--judge: {e}"))?,
                format: JudgeFormat::parse(&self.judge_format)?,
            }
        };
        let mut o = EvalOptions::new(&self.model, PromptSource::harmful(&self.harmful));
        o.adapters = self.adapter.clone();
        o.adapter_scale = self.scale;
        o.benign = self.benign.as_deref().map(PromptSource::benign);
        o.judge = judge;
        o.max_tokens = self.max_tokens;
        o.limit = self.limit;
        o.seed = self.seed;
        o.temperature = self.temperature;
        o.pairs = self.pairs.clone();
        o.mc = self.mc.clone();
        o.threads = self.threads;
        o.gpu_layers = self.gpu_layers;
        o.chat_template = self.chat_template.clone();
        o.enable_thinking = self.thinking.value();
        Ok(o)
    }
}

/// One line per loaded set on stderr, with why rows were skipped.
fn print_set(set: &bfpo_lite::eval::run::SetInfo) {
    let noun = match set.role.as_str() {
        "pairs" => "pairs",
        "mc" => "questions",
        _ => "prompts",
    };
    eprintln!(
        "{} set {}: {} {noun}{} ({} rows read, {} skipped)",
        set.role,
        set.name,
        set.n,
        if set.n < set.available {
            format!(" of {}", set.available)
        } else {
            String::new()
        },
        set.rows_read,
        set.skipped
    );
    for (reason, n) in &set.skipped_by_reason {
        eprintln!("  skipped {n} × {reason}");
    }
    for e in set.skipped_examples.iter().take(3) {
        eprintln!("  e.g. {e}");
    }
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let opts = args.options()?;
    let show = !args.json && std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let t0 = Instant::now();
    let mut on = |ev: &EvalEvent| match ev {
        EvalEvent::Loaded(set) => {
            if !args.json {
                print_set(set);
            }
        }
        EvalEvent::JudgeReady { name } => {
            if !args.json {
                eprintln!("judge: {name}");
            }
        }
        EvalEvent::Started {
            model,
            phase,
            total,
        } => {
            if show {
                let b = ProgressBar::with_draw_target(
                    Some(*total as u64),
                    ProgressDrawTarget::stderr(),
                );
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>28} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_prefix(format!("{model}: {}", phase.label()));
                bar = Some(b);
            }
        }
        EvalEvent::Progress { done, .. } => {
            if let Some(b) = &bar {
                b.set_position(*done as u64);
            }
        }
        EvalEvent::Finished {
            model,
            phase,
            seconds,
        } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            if !args.json {
                eprintln!("{model}: {} done in {seconds:.1} s", phase.label());
            }
        }
    };
    let out = run_eval(&opts, &mut on).with_context(|| {
        format!(
            "evaluating {} on {}",
            args.model.display(),
            opts.harmful.name()
        )
    })?;
    let written = write_outputs(&args.out, &out)
        .with_context(|| format!("writing the report to {}", args.out.display()))?;
    if args.json {
        let json = serde_json::to_string(&out.report)?;
        super::print_out(&format!("{json}\n"))?;
    } else {
        super::print_out(&bfpo_lite::eval::report::markdown(&out.report))?;
        eprintln!(
            "wrote {}, {}, {}, {} in {:.1} s",
            written.report_json.display(),
            written.report_md.display(),
            written.samples.display(),
            written.svg.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
