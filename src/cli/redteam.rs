//! `bfpo-lite redteam`: the model answers red-team prompts, a judge labels the answers, and the
//! answers become BFPO safety pairs that `tune --data` reads unchanged.

use anyhow::{Context, bail};
use bfpo_lite::data::Prompt;
use bfpo_lite::eval::{self, Judge, PromptSource};
use bfpo_lite::redteam::{self, Event, PromptItem, RedteamOptions, RedteamReport};
use bfpo_lite::runtime::Sampling;
use indicatif::{ProgressBar, ProgressStyle};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model that answers the prompts (the model you will tune).
    /// A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(long, short = 'm', value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// Harmful prompts: a JSONL file ({"prompt": ..., "category": ...} per line), `advbench`
    /// (AdvBench's 520 behaviours, the training set to use), `uncensorbench` (150 prompts),
    /// `harmbench` (HarmBench's 200 standard behaviours: held out, warned about) or
    /// `donotanswer` (Do-Not-Answer's 939 questions). May be left out when `--benign` is given
    /// (helpfulness pairs only).
    #[arg(long, required_unless_present = "benign")]
    pub prompts: Option<String>,
    /// Benign prompts (`train`: 168 of our own, disjoint from eval's `heldout`; `builtin`; or a
    /// JSONL file): they become both-safe helpfulness pairs.
    #[arg(long)]
    pub benign: Option<String>,
    /// `refusal` (the built-in refusal detector), `refusal-objective` (the detector plus PyRIT's
    /// rule that an answer unrelated to the request is a refusal) or a judge GGUF model.
    #[arg(long, default_value = "refusal")]
    pub judge: String,
    /// How a GGUF judge is prompted: llama-guard or yes-no.
    #[arg(long, default_value = "llama-guard")]
    pub judge_format: String,
    /// Answers sampled per prompt on the plain prompt.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Answers sampled per prompt with the safety system prompt in front (harmful and benign).
    #[arg(long, default_value_t = 1)]
    pub safety_samples: usize,
    /// The safety system prompt (default: a short harmless-assistant instruction).
    #[arg(long)]
    pub safety_system: Option<String>,
    /// Add a written refusal to harmful prompts that got no safe answer (default on).
    #[arg(long, overrides_with = "no_refusal_templates")]
    pub refusal_templates: bool,
    /// Do not add written refusals.
    #[arg(long, overrides_with = "refusal_templates")]
    pub no_refusal_templates: bool,
    /// Add a written refusal to each benign prompt the model did not refuse, as the rejected side
    /// of a both-safe pair (a helpful answer beats a refusal; default on).
    #[arg(long, overrides_with = "no_benign_refusals")]
    pub benign_refusals: bool,
    /// Do not add written refusals to benign prompts.
    #[arg(long, overrides_with = "benign_refusals")]
    pub no_benign_refusals: bool,
    /// Most pairs written per prompt.
    #[arg(long, default_value_t = 3)]
    pub max_pairs_per_prompt: usize,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: u32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// The run's seed: every answer derives its own from it and its prompt.
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// Use at most N prompts of each set (spread evenly over the set).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop on a bad prompt row instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
    /// Output JSONL of pairs (generic rows with provenance); an existing run continues.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Start again: delete OUT and its progress journal first.
    #[arg(long)]
    pub overwrite: bool,
    /// CPU threads per decode.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers to offload to the GPU (builds with the metal/vulkan/cuda features).
    #[arg(long, default_value_t = super::generate::DEFAULT_GPU_LAYERS)]
    pub gpu_layers: u32,
    /// Print the report as JSON on stdout (no progress bars).
    #[arg(long)]
    pub json: bool,
    /// Chat template the model answers with instead of its own: a Jinja file, or a built-in
    /// name (chatml, chatml-smollm2, zephyr, llama3, gemma, gemma3, qwen3); use the one you
    /// will tune with.
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub thinking: super::generate::ThinkingArgs,
}

fn load_set(
    source: PromptSource,
    limit: Option<usize>,
    strict: bool,
    what: &str,
) -> anyhow::Result<(Vec<PromptItem>, eval::PromptSet)> {
    let set = eval::load_prompt_set(&source, limit)
        .with_context(|| format!("loading the {what} prompts ({})", source.name()))?;
    if let Some(s) = set.skipped.first() {
        if strict {
            bail!(
                "{}: {} (--strict stops at the first bad prompt row)",
                s.origin,
                s.reason
            );
        }
    }
    let items = set
        .prompts
        .iter()
        .map(|p| PromptItem {
            prompt: Prompt::Text(p.text.clone()),
            id: p.origin.to_string(),
            category: p.category.clone(),
        })
        .collect();
    Ok((items, set))
}

fn warn_skipped(set: &eval::PromptSet, json: bool) {
    if set.skipped.is_empty() || json {
        return;
    }
    eprintln!(
        "warning: {}: skipped {} of {} prompt rows:",
        set.name,
        set.skipped.len(),
        set.rows_read
    );
    for (reason, n) in set.skipped_by_reason() {
        eprintln!("  {n} × {reason}");
    }
    for s in set.skipped.iter().take(5) {
        eprintln!("  e.g. {}: {}", s.origin, s.reason);
    }
}

/// The harmful and benign prompt sets `args` names (empty where not given), with warnings for a
/// held-out set and skipped rows.
#[allow(clippy::type_complexity)]
fn load_prompts(
    args: &Args,
) -> anyhow::Result<(
    (Vec<PromptItem>, Option<eval::PromptSet>),
    (Vec<PromptItem>, Option<eval::PromptSet>),
)> {
    let load = |source: Option<PromptSource>, role: &str| -> anyhow::Result<_> {
        Ok(match source {
            Some(src) => {
                let (items, set) = load_set(src, args.limit, args.strict, role)?;
                (items, Some(set))
            }
            None => (Vec::new(), None),
        })
    };
    let harmful = load(
        args.prompts.as_deref().map(PromptSource::harmful),
        "harmful",
    )?;
    let benign = load(args.benign.as_deref().map(PromptSource::benign), "benign")?;
    for (source, what) in [
        (
            args.prompts.as_deref().map(PromptSource::harmful),
            "--prompts",
        ),
        (args.benign.as_deref().map(PromptSource::benign), "--benign"),
    ] {
        if let Some(source) = source.filter(|s| s.held_out()) {
            if !args.json {
                eprintln!(
                    "warning: {what} {} is a held-out evaluation set; pairs made from it should not be trained on if you evaluate on it (train on advbench / uncensorbench and benign `train`)",
                    source.name()
                );
            }
        }
    }
    for set in harmful.1.iter().chain(&benign.1) {
        warn_skipped(set, args.json);
    }
    Ok((harmful, benign))
}

impl Args {
    /// The library options these flags describe, for the sets `harmful_name` and `benign_name`.
    fn options(&self, harmful_name: String, benign_name: String) -> RedteamOptions {
        RedteamOptions {
            samples: self.samples,
            safety_samples: self.safety_samples,
            max_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
                ..Sampling::default()
            },
            safety_system: self
                .safety_system
                .clone()
                .unwrap_or_else(|| redteam::DEFAULT_SAFETY_SYSTEM.to_string()),
            refusal_templates: !self.no_refusal_templates,
            benign_refusals: !self.no_benign_refusals,
            max_pairs_per_prompt: self.max_pairs_per_prompt,
            threads: self.threads,
            harmful_name,
            benign_name,
        }
    }
}

/// The progress bar of a run: prompts done, the prompt and answer being written.
struct Progress<'a> {
    bar: ProgressBar,
    tokens: u64,
    args: &'a Args,
}

impl<'a> Progress<'a> {
    fn new(args: &'a Args) -> anyhow::Result<Progress<'a>> {
        let bar = if args.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} prompts {msg} ({eta})",
            )?
            .progress_chars("=> "),
        );
        bar.set_prefix("redteam");
        Ok(Progress {
            bar,
            tokens: 0,
            args,
        })
    }

    fn on(&mut self, e: &Event) {
        let bar = &self.bar;
        match e {
            Event::Start {
                harmful,
                benign,
                already_done,
                cut_out_bytes,
            } => {
                bar.set_length((harmful + benign) as u64);
                bar.set_position(*already_done as u64);
                if *already_done > 0 {
                    bar.println(format!(
                        "continuing {}: {already_done} prompts already done{}",
                        self.args.out.display(),
                        if *cut_out_bytes > 0 {
                            format!(", {cut_out_bytes} bytes of an interrupted prompt dropped")
                        } else {
                            String::new()
                        }
                    ));
                }
            }
            Event::PromptStart { set, id, .. } => bar.set_message(format!("{set} {id}")),
            Event::Token { .. } => {
                self.tokens += 1;
                if self.tokens.is_multiple_of(16) {
                    bar.tick();
                }
            }
            Event::Answer { answer, of, .. } => {
                bar.set_message(format!("answer {}/{of}", answer + 1));
            }
            Event::PromptDone { .. } => bar.inc(1),
            Event::PromptTooLong {
                set,
                id,
                tokens,
                n_ctx,
                ..
            } => {
                bar.inc(1);
                if !self.args.json {
                    bar.println(format!(
                        "skipped {set} prompt {id}: {tokens} tokens do not fit the context of {n_ctx}"
                    ));
                }
            }
        }
    }
}

/// A stop flag that the first Ctrl-C sets (the run ends after its prompt, resumable) and the
/// second turns into an exit.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    stop
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let ((harmful, hset), (benign, bset)) = load_prompts(&args)?;
    let mut model = super::generate::load_model(&args.model, None, 1.0, args.gpu_layers)?;
    super::generate::choose_chat_template(
        &mut model,
        args.chat_template.as_deref(),
        args.thinking,
    )?;
    let judge: Box<dyn Judge> = super::eval_judge::make_judge(
        &args.judge,
        &args.judge_format,
        args.threads,
        args.gpu_layers,
    )?;
    let opts = args.options(
        hset.as_ref().map(|h| h.name.clone()).unwrap_or_default(),
        bset.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
    );
    let stop = ctrl_c_flag();
    let mut progress = Progress::new(&args)?;
    let mut on_event = |e: &Event| {
        progress.on(e);
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let report = redteam::run(
        &model,
        judge.as_ref(),
        &harmful,
        &benign,
        &opts,
        &args.out,
        args.overwrite,
        &mut on_event,
    )
    .with_context(|| format!("red-teaming into {}", args.out.display()))?;
    progress.bar.finish_and_clear();
    if args.json {
        let skipped = |s: &eval::PromptSet| {
            serde_json::json!({
                "set": s.name,
                "rows_read": s.rows_read,
                "skipped": s.skipped.len(),
                "skipped_by_reason": s.skipped_by_reason(),
                "examples": s.skipped.iter().take(5).map(|s| format!("{}: {}", s.origin, s.reason)).collect::<Vec<_>>(),
            })
        };
        let inputs: Vec<_> = hset.iter().chain(&bset).map(skipped).collect();
        let v = serde_json::json!({"report": report, "judge": judge.name(), "inputs": inputs});
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else {
        eprint!("{}", render(&report, &judge.name()));
    }
    if report.interrupted {
        eprintln!(
            "interrupted; run the same command again to continue from {}",
            report.out.display()
        );
        std::process::exit(130);
    }
    Ok(())
}

/// The report as text.
pub fn render(r: &RedteamReport, judge: &str) -> String {
    let mut s = String::new();
    let h = &r.harmful;
    s.push_str(&format!(
        "{} pairs written to {} (judge: {judge})\n",
        r.pairs(),
        r.out.display()
    ));
    s.push_str(&format!(
        "harmful prompts: {} done of {}, {} without a usable pair; {} answers judged, {} safe; {} written refusals added\n",
        h.done, h.prompts, h.no_pair, h.answers_judged, h.answers_judged_safe, h.templates_added
    ));
    s.push_str("pairs per BFPO case (chosen = more helpful):\n");
    for (name, n) in [
        (
            "safe+helpful over safe+less helpful",
            h.both_safe + r.benign.both_safe,
        ),
        ("safe+helpful over unsafe+less helpful", h.only_chosen_safe),
        (
            "unsafe+helpful over safe+less helpful",
            h.only_rejected_safe,
        ),
        ("unsafe over less helpful unsafe", h.both_unsafe),
    ] {
        s.push_str(&format!("  {n:>6}  {name}\n"));
    }
    if r.benign.prompts > 0 {
        s.push_str(&format!(
            "benign prompts: {} done of {}, {} helpfulness pairs (both safe), {} without a usable pair\n",
            r.benign.done, r.benign.prompts, r.benign.pairs, r.benign.no_pair
        ));
    }
    s.push_str(&format!(
        "dropped: {} duplicate answers, {} empty answers, {} repeated prompts\n",
        h.duplicates_dropped + r.benign.duplicates_dropped,
        h.empty_dropped + r.benign.empty_dropped,
        h.duplicate_prompts + r.benign.duplicate_prompts
    ));
    let too_long = h.too_long + r.benign.too_long;
    if too_long > 0 {
        s.push_str(&format!(
            "skipped {too_long} prompts longer than the context: {}{}\n",
            r.too_long_examples.join(", "),
            if too_long > r.too_long_examples.len() {
                ", …"
            } else {
                ""
            }
        ));
    }
    if !r.no_pair_examples.is_empty() {
        s.push_str(&format!(
            "no usable pair: {}\n",
            r.no_pair_examples.join(", ")
        ));
    }
    s.push_str(&format!(
        "time: {:.1} s this run ({} tokens), {:.1} s over all runs of this file{}\n",
        r.seconds,
        r.tokens,
        r.seconds_total,
        if r.resumed_prompts > 0 {
            format!(
                "; {} prompts were done by an earlier run",
                r.resumed_prompts
            )
        } else {
            String::new()
        }
    ));
    s
}
