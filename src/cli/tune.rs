//! `bfpo-lite tune`: train a LoRA adapter with BFPO (or IPO/DPO). With no arguments it runs the
//! built-in demo: a tiny quantized model made by `init-model` and a synthetic safety preference
//! set in PKU-SafeRLHF's schema, finishing in under a minute on a laptop CPU.

use super::generate::ThinkingArgs;
use super::print_out;
use anyhow::Context;
use bfpo_lite::data::formats::Format;
use bfpo_lite::export::gguf_adapter::AdapterDType;
use bfpo_lite::gpu::memory::fmt_bytes;
use bfpo_lite::run::demo::{demo_config, demo_train_pairs, write_demo};
use bfpo_lite::run::{Cancel, Event, SkipStage, Summary, TuneJob};
use bfpo_lite::train::config::{EngineKind, PairOrder, ScheduleKind, TrainConfig};
use bfpo_lite::train::metrics::StepMetrics;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Flags override the `--config` file (CLI wins); unset flags keep the file's or default values.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// GGUF model to tune. Omit --model and --data to run the built-in demo.
    /// A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(long, value_parser = super::hub::model_arg)]
    pub model: Option<PathBuf>,
    /// Safety preference data (JSONL, .jsonl.gz, .jsonl.xz, Parquet, JSON array); repeatable.
    /// Rows need safety labels (PKU-SafeRLHF, red-team, generic rows with chosen_safe and
    /// rejected_safe); helpfulness-only rows (TRL, UltraFeedback, HH) need --assume-safe or go
    /// in --buffer. A path, or a Hugging Face dataset in the local cache: org/name[:FILE].
    #[arg(long, value_parser = super::hub::data_arg)]
    pub data: Vec<PathBuf>,
    /// TOML file with any of the settings below (keys are the long flag names with `_`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A built-in recipe as the base settings: `safety` (BFPO safety tuning of a small chat model
    /// with a helpfulness buffer; recipes/safety.toml, explained in docs/recipe.md). Flags override it
    #[arg(long, conflicts_with = "config")]
    pub recipe: Option<String>,
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
    /// Print the run's events as JSON lines on stdout (one object per line with an "event" tag;
    /// the last, "done", carries the summary of summary.json).
    #[arg(long)]
    pub json: bool,
    /// Dataset format (default: detected from the fields).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    #[arg(long, value_parser = super::hub::data_arg)]
    pub eval_data: Option<PathBuf>,
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Helpfulness data mixed into every step (BFPO's buffered training): TRL, UltraFeedback or HH
    /// rows, both responses counted as safe.
    #[arg(long, value_parser = super::hub::data_arg)]
    pub buffer: Option<PathBuf>,
    #[arg(long)]
    pub buffer_ratio: Option<f64>,
    /// Stop at the first bad row (naming file, line and field) instead of skipping and counting.
    #[arg(long)]
    pub strict: bool,
    /// Label both responses of --data rows without safety labels (TRL, UltraFeedback, HH) safe
    /// instead of refusing them; on such pairs BFPO trains as IPO (helpfulness only).
    #[arg(long)]
    pub assume_safe: bool,
    /// Chat template instead of the model's own: a Jinja file, or a built-in name (chatml,
    /// chatml-smollm2, zephyr, llama3, gemma, gemma3, qwen3).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub thinking: ThinkingArgs,
    /// bfpo | ipo | dpo, optionally with parameters: `bfpo:tau=0.01,b1=3,alpha=0.5`.
    #[arg(long)]
    pub loss: Option<String>,
    /// Which side of a pair whose responses differ in safety is `chosen`: `helpful` (as the data
    /// says, BFPO's order) or `safe-first` (the safe side: the DPO/IPO safety baseline; BFPO's
    /// loss is the same in either order)
    #[arg(long, value_enum)]
    pub pair_order: Option<PairOrder>,
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
    /// Safety pairs per micro-step (TRL's per_device_train_batch_size); an optimiser step
    /// takes this × --grad-accum pairs.
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
    /// Harmful prompts (JSONL file of prompts, `harmbench`, `donotanswer`, `advbench` or
    /// `uncensorbench`; evaluate on `harmbench`, the held-out set): answer them with
    /// the base model and the tuned adapter and judge them, as `eval` does; the harmless rate
    /// goes into summary.json and curves.svg.
    #[arg(long, value_name = "PROMPTS")]
    pub eval_harmful: Option<String>,
    /// Also evaluate harmlessness every N steps during training (generation is slow, so this is
    /// separate from --eval-every; default 0: base and end only).
    #[arg(long, value_name = "N")]
    pub eval_harmful_every: Option<usize>,
    /// At most N harmful prompts, spread over the set.
    #[arg(long, value_name = "N")]
    pub eval_harmful_limit: Option<usize>,
    /// New tokens per answer in the harmlessness evaluation (default 64).
    #[arg(long, value_name = "N")]
    pub eval_max_tokens: Option<usize>,
    /// Judge of the harmlessness evaluation: `refusal` (default), `refusal-objective` or a chat
    /// GGUF judge model.
    #[arg(long, value_name = "refusal|refusal-objective|J.gguf")]
    pub eval_judge: Option<String>,
    /// How a GGUF judge is prompted: `llama-guard` (default) or `yes-no`.
    #[arg(long)]
    pub eval_judge_format: Option<String>,
    /// Recompute reference log-probs even when cached.
    #[arg(long)]
    pub no_ref_cache: bool,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// auto (default: wgpu on a real GPU, else the native CPU engine), wgpu, cpu (native CPU
    /// engine), or reference (the f64 reference model: tiny models only).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// Worker threads of the CPU engine (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// CPU engine: compute each pair's prompt twice, once per response, instead of once (the
    /// numbers are the same bits either way; for measuring what sharing saves).
    #[arg(long)]
    pub no_prompt_sharing: bool,
    /// GPU adapter index or name (see `bfpo-lite devices`).
    #[arg(long)]
    pub device: Option<String>,
    /// Device memory for keeping layers' activations between forward and backward: `auto`
    /// (2 GiB on a GPU, a quarter of free host memory up to 8 GiB on a CPU Vulkan driver), a
    /// size (`6GiB`), or `0` to recompute every layer (activation checkpointing, TRL's
    /// gradient_checkpointing). Layers that do not fit are recomputed; results are identical.
    #[arg(long, value_name = "SIZE")]
    pub activation_memory: Option<String>,
    /// Adapter tensor type: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub outtype: String,
    /// Time every GPU operation (serialises the work) and report where the time went, per
    /// phase and kernel family, on stderr and in OUT/profile.json.
    #[arg(long)]
    pub profile: bool,
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
        eval_harmful_every,
        eval_max_tokens,
        eval_judge,
        eval_judge_format,
        engine,
        loss,
        pair_order,
        out
    );
    if a.eval_harmful.is_some() {
        cfg.eval_harmful = a.eval_harmful.clone();
    }
    if a.eval_harmful_limit.is_some() {
        cfg.eval_harmful_limit = a.eval_harmful_limit;
    }
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
    if a.no_prompt_sharing {
        cfg.prompt_sharing = false;
    }
    if a.threads.is_some() {
        cfg.threads = a.threads;
    }
    if let Some(m) = &a.activation_memory {
        cfg.activation_memory = m.clone();
    }
    if a.chat_template.is_some() {
        cfg.chat_template = a.chat_template.clone();
    }
    if let Some(t) = a.thinking.value() {
        cfg.enable_thinking = Some(t);
    }
    cfg.strict |= a.strict;
    cfg.no_ref_cache |= a.no_ref_cache;
}

/// No model, data, config or checkpoint: the built-in demo.
fn is_demo(a: &Args) -> bool {
    a.model.is_none()
        && a.data.is_empty()
        && a.config.is_none()
        && a.recipe.is_none()
        && a.resume.is_none()
}

/// The run's settings: `--config`, else the checkpoint's run, else the demo's or the defaults;
/// then the flags.
fn load_config(args: &Args) -> anyhow::Result<TrainConfig> {
    let mut cfg = if let Some(p) = &args.config {
        TrainConfig::from_toml_file(p)?
    } else if let Some(r) = &args.recipe {
        TrainConfig::recipe(r)?
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
    } else if is_demo(args) {
        demo_config()
    } else {
        TrainConfig::default()
    };
    apply_overrides(&mut cfg, args);
    resolve_hub_refs(&mut cfg)?;
    Ok(cfg)
}

/// Hugging Face cache references in a config file (`model = "org/name"`, `data = [...]`)
/// become the cached files' paths, as on the command line.
fn resolve_hub_refs(cfg: &mut TrainConfig) -> anyhow::Result<()> {
    use super::hub::resolve_config_path as resolve;
    use bfpo_lite::util::hf_cache::RepoKind::{Dataset, Model};
    if let Some(m) = &cfg.model {
        cfg.model = Some(resolve(m, Model).context("model")?);
    }
    for d in cfg.data.iter_mut() {
        *d = resolve(d, Dataset).context("data")?;
    }
    if let Some(e) = &cfg.eval_data {
        cfg.eval_data = Some(resolve(e, Dataset).context("eval_data")?);
    }
    if let Some(b) = &cfg.buffer {
        cfg.buffer = Some(resolve(b, Dataset).context("buffer")?);
    }
    let judge = cfg.eval_judge.to_ascii_lowercase();
    if judge != "refusal" && judge != "refusal-objective" {
        let path = resolve(Path::new(&cfg.eval_judge), Model).context("eval_judge")?;
        cfg.eval_judge = path.display().to_string();
    }
    Ok(())
}

/// Ctrl-C asks the run to stop (it checkpoints); a second Ctrl-C exits at once.
fn install_ctrlc(cancel: &Cancel) {
    let cancel = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if cancel.cancel() {
            std::process::exit(130);
        }
    });
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let demo = is_demo(&args);
    let mut cfg = load_config(&args)?;
    if demo {
        write_demo(&mut cfg)?;
        if !args.json {
            eprintln!(
                "bfpo-lite demo: BFPO on a tiny Q8_0 qwen2 model ({}) with {} synthetic safety pairs; outputs in {}",
                cfg.model
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                demo_train_pairs(),
                cfg.out.display()
            );
        }
    }
    let dtype = AdapterDType::parse(&args.outtype)
        .with_context(|| format!("--outtype {}: use f32 or f16", args.outtype))?;
    let job = TuneJob::from_config(cfg)?
        .resume(args.resume.clone())
        .assume_safe(args.assume_safe)
        .adapter_type(dtype)
        .force(args.force || demo)
        .profile(args.profile);
    install_ctrlc(&job.cancel_token());
    let mut view = View::new(args.json);
    let mut obs = |e: &Event| view.show(e);
    if args.dry_run {
        let d = job.dry_run(&mut obs)?;
        // With --json every line of stdout is one JSON object (the events, then this).
        let text = if args.json {
            serde_json::to_string(&serde_json::json!({"event": "dry_run", "dry_run": d}))?
        } else {
            serde_json::to_string_pretty(&d)?
        };
        return print_out(&format!("{text}\n"));
    }
    let out = job.config().out.clone();
    let mut prepared = job.prepare(&mut obs)?;
    prepared.train(&mut obs)?;
    let summary = prepared.finish(&mut obs)?;
    drop(view);
    if !args.json {
        print_summary(&summary, &out);
    }
    Ok(())
}

/// Renders a run's events: progress bars and text on stderr, or JSON lines on stdout.
struct View {
    json: bool,
    bar: Option<ProgressBar>,
    /// Set when stdout is closed: the JSON output ends, the run goes on.
    json_closed: bool,
}

impl View {
    fn new(json: bool) -> View {
        View {
            json,
            bar: None,
            json_closed: false,
        }
    }

    fn show(&mut self, e: &Event) {
        if self.json {
            self.json_line(e);
        } else {
            self.text(e);
        }
    }

    fn json_line(&mut self, e: &Event) {
        use std::io::Write;
        if self.json_closed {
            return;
        }
        let line = serde_json::to_string(e).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            self.json_closed = true;
        }
    }

    /// A bar with the run's style, replacing any previous one.
    fn bar(&mut self, prefix: &'static str, len: u64) -> &ProgressBar {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let b = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({eta})")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_prefix(prefix);
        self.bar.insert(b)
    }

    /// Prints a line above the bar (or plainly without one).
    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn text(&mut self, e: &Event) {
        match e {
            Event::ModelOpened { chat_template, .. } => {
                self.line(format!("chat template: {chat_template}"));
            }
            Event::DataLoaded(d) => {
                self.line(format!(
                    "data: {} training pairs, {} held-out, {} buffer; {} rows skipped; longest sequence {} tokens",
                    d.train_pairs, d.eval_pairs, d.buffer_pairs, d.rows_skipped, d.longest_sequence
                ));
                for (set, m, n) in [
                    ("training", &d.safety.train, d.train_pairs),
                    ("held-out", &d.safety.eval, d.eval_pairs),
                    ("buffer", &d.safety.buffer, d.buffer_pairs),
                ] {
                    if n > 0 {
                        self.line(format!(
                            "  safety cases ({set}): {} both safe, {} safe chosen / unsafe rejected, {} unsafe chosen / safe rejected, {} both unsafe",
                            m.both_safe, m.only_chosen_safe, m.only_rejected_safe, m.both_unsafe
                        ));
                    }
                }
            }
            Event::RowsSkipped {
                stage,
                file,
                by_reason,
                examples,
            } => {
                for (reason, n) in by_reason {
                    self.line(match (stage, file) {
                        (SkipStage::Load, Some(f)) => {
                            format!("  skipped {n} row(s) of {}: {reason}", f.display())
                        }
                        _ => format!("  skipped {n} pair(s) while tokenizing: {reason}"),
                    });
                }
                for ex in examples.iter().take(3) {
                    self.line(format!("    e.g. {ex}"));
                }
            }
            _ => self.text_progress(e),
        }
    }

    fn text_progress(&mut self, e: &Event) {
        match e {
            Event::Truncated {
                prompts,
                responses,
                max_length,
                max_prompt_length,
            } => self.line(format!(
                "  truncated: {prompts} prompt(s), {responses} pair(s) with a cut response (--max-length {max_length}, --max-prompt-length {max_prompt_length})"
            )),
            Event::Warning { message } => self.line(format!("warning: {message}")),
            Event::Plan {
                total_bytes,
                weights_bytes,
                largest_binding,
                largest_binding_bytes,
            } => self.line(format!(
                "memory plan (wgpu engine): {} on the device ({} weights as stored); largest binding {} ({})",
                fmt_bytes(*total_bytes),
                fmt_bytes(*weights_bytes),
                fmt_bytes(*largest_binding_bytes),
                largest_binding
            )),
            Event::HostPlan { plan } => self.line(format!(
                "memory plan (cpu engine): {} of weights mapped from the file; the longest micro-step ({} rows) needs at least {} on the heap, {} more to keep every layer's activations (within --activation-memory){}",
                fmt_bytes(plan.weights_mapped_bytes),
                plan.rows,
                fmt_bytes(plan.min_bytes),
                fmt_bytes(plan.all_tapes_bytes),
                plan.available_bytes
                    .map(|a| format!("; {} available", fmt_bytes(a)))
                    .unwrap_or_default()
            )),
            Event::Engine { description } => self.line(format!("engine: {description}")),
            Event::Activations {
                budget_bytes,
                kept_layers,
                n_layer,
                kept_bytes,
            } => self.line(if kept_layers == n_layer {
                format!(
                    "activations: all {n_layer} layers the backward visits keep theirs ({} at the longest micro-step; --activation-memory {})",
                    fmt_bytes(*kept_bytes),
                    fmt_bytes(*budget_bytes)
                )
            } else {
                format!(
                    "activations: {kept_layers} of the {n_layer} layers the backward visits keep theirs ({} at the longest micro-step; --activation-memory {}), the other {} are recomputed",
                    fmt_bytes(*kept_bytes),
                    fmt_bytes(*budget_bytes),
                    n_layer - kept_layers
                )
            }),
            Event::Reference { done, total, .. } => {
                let b = match &self.bar {
                    Some(b) if b.prefix() == "reference" => b,
                    _ => self.bar("reference", *total as u64),
                };
                b.set_length(*total as u64);
                b.set_position(*done as u64);
            }
            Event::ReferenceCached { set, path } => self.line(format!(
                "reference log-probs ({set}): reused from {}",
                path.display()
            )),
            Event::Resumed { checkpoint, step } => self.line(format!(
                "resuming from {} at step {step}",
                checkpoint.display()
            )),
            Event::TrainingStarted { total_steps } => {
                self.bar("training", *total_steps as u64);
            }
            _ => self.text_training(e),
        }
    }

    fn text_training(&mut self, e: &Event) {
        match e {
            Event::Step(m) => {
                if let Some(b) = &self.bar {
                    b.set_position(m.step as u64);
                    b.set_message(step_message(m));
                }
            }
            Event::Eval(m) => self.line(format!(
                "  eval @ step {}: loss {:.4e}, margin {:+.3}, BFPO-ranking accuracy {:.3}",
                m.step,
                m.loss,
                m.rewards_margins,
                m.accuracy_bfpo.unwrap_or(f64::NAN)
            )),
            Event::StepSkipped { step, reason } => {
                self.line(format!("  step {step} skipped: {reason}"))
            }
            Event::HarmlessProgress {
                model, done, total, ..
            } => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("harmlessness eval ({model}): {done}/{total}"));
                }
            }
            Event::Harmless(p) => self.line(format!(
                "  harmless @ step {} ({}): {:.3} [95% {:.3}–{:.3}] ({}/{} judged safe by {}; refusals {:.3}) on {} in {:.1}s",
                p.step,
                p.model,
                p.harmless_rate,
                p.ci_low,
                p.ci_high,
                p.harmless,
                p.n,
                p.judge,
                p.refusal_rate,
                p.prompts,
                p.seconds
            )),
            Event::CheckpointWritten { step, dir } => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("checkpoint at step {step} in {}", dir.display()));
                }
            }
            Event::Done(_) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn step_message(m: &StepMetrics) -> String {
    format!(
        "loss {:.4e} margin {:+.3} acc {:.2} {:.0} tok/s",
        m.loss,
        m.rewards_margins,
        m.accuracy_bfpo.unwrap_or(0.0),
        m.tokens_per_second.unwrap_or(0.0)
    )
}

fn print_summary(s: &Summary, out: &Path) {
    let status = if s.interrupted {
        "interrupted (checkpoint saved)"
    } else {
        "done"
    };
    println!(
        "\n{status}: {} steps in {:.1} s ({:.0} tokens/s, {} skipped); total {:.1} s",
        s.steps, s.train_seconds, s.tokens_per_second, s.skipped_steps, s.total_seconds
    );
    if let Some(p) = &s.profile {
        eprint!("{p}");
    }
    if let Some(r) = &s.recent_train {
        println!(
            "last {} steps: loss {:.4e}, BFPO-ranking accuracy {:.3} over {} pairs",
            r.steps, r.loss, r.accuracy_bfpo, r.pairs
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
    if let Some(first) = s.harmless.first() {
        println!(
            "\nharmless rate on {} ({} prompts, judge {}, {} new tokens):",
            first.prompts, first.n, first.judge, first.max_tokens
        );
        for p in &s.harmless {
            println!(
                "  step {:>6} {:<8} {:.3} [95% {:.3}–{:.3}]  refusals {:.3}",
                p.step, p.model, p.harmless_rate, p.ci_low, p.ci_high, p.refusal_rate
            );
        }
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
            pair_order: Some(PairOrder::SafeFirst),
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
            activation_memory: Some("3GiB".into()),
            eval_harmful: Some("harmbench".into()),
            eval_harmful_every: Some(19),
            eval_harmful_limit: Some(23),
            eval_max_tokens: Some(29),
            eval_judge: Some("j.gguf".into()),
            eval_judge_format: Some("yes-no".into()),
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
            pair_order: PairOrder::SafeFirst,
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
            activation_memory: "3GiB".into(),
            eval_harmful: Some("harmbench".into()),
            eval_harmful_every: 19,
            eval_harmful_limit: Some(23),
            eval_max_tokens: 29,
            eval_judge: "j.gguf".into(),
            eval_judge_format: "yes-no".into(),
            ..TrainConfig::default()
        };
        assert_eq!(c, want);
    }
}
