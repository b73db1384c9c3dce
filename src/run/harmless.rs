//! The harmlessness part of `eval` inside a training run (`tune --eval-harmful PROMPTS`):
//! answers to harmful prompts are generated with llama.cpp (greedy, seeded) and judged, for the
//! base model (step 0), for the adapter every `eval_harmful_every` steps when asked, and for the
//! tuned adapter at the end. The figures go into [`Event::Harmless`], `summary.json` and
//! `curves.svg`.

use super::{Event, Observer, RunError, io_err};
use crate::eval::{
    EvalError, EvalEvent, EvalOptions, JudgeFormat, JudgeSpec, PromptSource, load_prompt_set,
    run_eval,
};
use crate::train::config::TrainConfig;
use crate::train::metrics::HarmlessMark;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every point measured so far, one JSON object per line (OUT/harmless.jsonl), so a resumed run
/// keeps its mid-run points.
pub const HARMLESS_FILE: &str = "harmless.jsonl";

/// Appends `points` to `path`, one JSON line each.
pub(crate) fn append(path: &Path, points: &[HarmlessPoint]) -> Result<(), RunError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    for p in points {
        let line = serde_json::to_string(p).unwrap_or_default();
        writeln!(f, "{line}").map_err(io_err("writing", path))?;
    }
    Ok(())
}

/// The adapter's points up to `step` (a checkpoint's) from `path`, which is rewritten to hold
/// only them; a missing file gives none.
pub(crate) fn resume_points(path: &Path, step: usize) -> Result<Vec<HarmlessPoint>, RunError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("reading", path)(e)),
    };
    let mut kept = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: HarmlessPoint = serde_json::from_str(line).map_err(|e| RunError::Metrics {
            path: path.to_path_buf(),
            detail: format!("line {}: {e}", i + 1),
        })?;
        if p.model == "adapter" && p.step <= step {
            kept.push(p);
        }
    }
    std::fs::remove_file(path).map_err(io_err("removing", path))?;
    append(path, &kept)?;
    Ok(kept)
}

/// The harmlessness of one model at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HarmlessPoint {
    /// Optimizer step of the adapter (0 = the base model).
    pub step: usize,
    /// `base` or `adapter`.
    pub model: String,
    /// The prompt set (file name, `harmbench` or `donotanswer`).
    pub prompts: String,
    pub judge: String,
    /// Prompts answered and judged.
    pub n: usize,
    /// Answers judged safe.
    pub harmless: usize,
    /// `harmless / n`.
    pub harmless_rate: f64,
    /// 95 % Wilson interval of the harmless rate.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Answers that refuse (the refusal phrase list), of `n`.
    pub refusals: usize,
    pub refusal_rate: f64,
    pub max_tokens: usize,
    /// Seconds the evaluation of this model took (generation and judging).
    pub seconds: f64,
}

impl HarmlessPoint {
    pub fn mark(&self) -> HarmlessMark {
        HarmlessMark {
            step: self.step,
            rate: self.harmless_rate,
            lo: self.ci_low,
            hi: self.ci_high,
        }
    }
}

/// The evaluation settings of a run, checked before anything is trained: the prompt set is read
/// (a missing or empty file fails here) and the judge exists. `None` when not asked for.
pub(crate) fn check(cfg: &TrainConfig, model: &Path) -> Result<Option<EvalOptions>, RunError> {
    let Some(spec) = cfg.eval_harmful.as_deref() else {
        return Ok(None);
    };
    let source = PromptSource::harmful(spec);
    load_prompt_set(&source, cfg.eval_harmful_limit)?;
    let judge = if cfg.eval_judge.eq_ignore_ascii_case("refusal") {
        JudgeSpec::Refusal
    } else if cfg.eval_judge.eq_ignore_ascii_case("refusal-objective") {
        JudgeSpec::RefusalObjective
    } else {
        let path = PathBuf::from(&cfg.eval_judge);
        if !path.is_file() {
            return Err(RunError::Eval(EvalError::Io {
                path,
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "--eval-judge is neither `refusal`, `refusal-objective` nor an existing GGUF file",
                ),
            }));
        }
        JudgeSpec::Model {
            path,
            format: JudgeFormat::parse(&cfg.eval_judge_format)?,
        }
    };
    let mut o = EvalOptions::new(model, source);
    o.judge = judge;
    o.max_tokens = cfg.eval_max_tokens;
    o.limit = cfg.eval_harmful_limit;
    o.seed = cfg.seed as u32;
    // Answers rendered as the training data was.
    o.chat_template = cfg.chat_template.clone();
    o.enable_thinking = cfg.enable_thinking;
    Ok(Some(o))
}

/// Evaluates the base model (when `base` is true) and `adapter` (when given) as of `step`,
/// emitting one [`Event::Harmless`] per model and returning the points in that order.
pub(crate) fn evaluate(
    opts: &EvalOptions,
    base: bool,
    adapter: Option<&Path>,
    step: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<HarmlessPoint>, RunError> {
    let mut o = opts.clone();
    o.adapters = adapter.map(|a| vec![a.to_path_buf()]).unwrap_or_default();
    let label = if adapter.is_some() { "adapter" } else { "base" };
    let mut on = |e: &EvalEvent| {
        if let EvalEvent::Progress { done, total } = e {
            obs.event(&Event::HarmlessProgress {
                step,
                model: label.to_string(),
                done: *done,
                total: *total,
            });
        }
    };
    let out = run_eval(&o, &mut on)?;
    let r = out.report;
    let prompts = opts.harmful.name();
    let mut points = Vec::new();
    for m in &r.models {
        let is_base = m.adapter.is_none();
        if is_base && !base {
            continue;
        }
        let h = &m.harmless;
        let k = h.k.unwrap_or(0);
        let refusals = m.harmful_refusal.k.unwrap_or(0);
        let p = HarmlessPoint {
            step: if is_base { 0 } else { step },
            model: if is_base { "base" } else { "adapter" }.to_string(),
            prompts: prompts.clone(),
            judge: r.judge.clone(),
            n: h.n,
            harmless: k,
            harmless_rate: h.value,
            ci_low: h.lo,
            ci_high: h.hi,
            refusals,
            refusal_rate: m.harmful_refusal.value,
            max_tokens: r.settings.max_tokens,
            seconds: m.seconds.values().sum(),
        };
        obs.event(&Event::Harmless(p.clone()));
        points.push(p);
    }
    Ok(points)
}
