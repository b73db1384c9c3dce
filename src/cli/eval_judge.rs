//! `bfpo-lite eval-judge`: how often does a judge's refusal verdict agree with people?
//! Agreement, precision and recall (refusal = positive) on human refusal labels.

use anyhow::Context;
use bfpo_lite::eval::validate::{self, JudgeValidation, LabelSet};
use bfpo_lite::eval::{Judge, JudgeFormat, ModelJudge, ObjectiveRefusalJudge, RefusalJudge};
use bfpo_lite::runtime::LoadOptions;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Judge: `refusal` (the refusal phrase list), `refusal-objective` (the phrase list plus
    /// PyRIT's rule that an answer unrelated to the request is a refusal) or a chat GGUF judge.
    #[arg(long, default_value = "refusal")]
    pub judge: String,
    /// How a GGUF judge is prompted: `llama-guard` or `yes-no`.
    #[arg(long, default_value = "llama-guard")]
    pub judge_format: String,
    /// Label files: `pyrit` (PyRIT 1.1.0's three human refusal-label files, vendored) or CSV
    /// files in their format (`objective,assistant_response,human_score`); repeatable.
    #[arg(long, default_value = "pyrit")]
    pub labels: Vec<String>,
    /// Disagreements to print (all of them with --json).
    #[arg(long, default_value_t = 10)]
    pub misses: usize,
    /// Print the whole validation as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// CPU threads per decode (GGUF judges).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers to offload to the GPU (GGUF judges).
    #[arg(long, default_value_t = super::generate::DEFAULT_GPU_LAYERS)]
    pub gpu_layers: u32,
}

/// The judge named by `--judge` (shared with `eval` and `redteam`'s spelling).
pub fn make_judge(
    name: &str,
    format: &str,
    threads: Option<usize>,
    gpu_layers: u32,
) -> anyhow::Result<Box<dyn Judge>> {
    if name.eq_ignore_ascii_case("refusal") {
        return Ok(Box::new(RefusalJudge));
    }
    if name.eq_ignore_ascii_case("refusal-objective") {
        return Ok(Box::new(ObjectiveRefusalJudge));
    }
    let format = JudgeFormat::parse(format)?;
    let path = super::hub::model_arg(name).map_err(|e| anyhow::anyhow!("--judge: {e}"))?;
    let mut j = ModelJudge::load(
        &path,
        format,
        &LoadOptions {
            n_gpu_layers: gpu_layers,
        },
    )
    .with_context(|| {
        format!(
            "loading the judge {} (--judge takes `refusal`, `refusal-objective` or a chat GGUF model)",
            path.display()
        )
    })?;
    j.set_threads(threads);
    Ok(Box::new(j))
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let mut sets: Vec<LabelSet> = Vec::new();
    for l in &args.labels {
        if l.eq_ignore_ascii_case("pyrit") {
            sets.extend(validate::pyrit_refusal_labels());
        } else {
            sets.push(
                validate::load_refusal_csv(Path::new(l))
                    .with_context(|| format!("loading refusal labels {l}"))?,
            );
        }
    }
    let judge = make_judge(
        &args.judge,
        &args.judge_format,
        args.threads,
        args.gpu_layers,
    )?;
    let v = validate::validate(judge.as_ref(), &sets).context("judging the labelled answers")?;
    if args.json {
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else {
        super::print_out(&render(&v, args.misses))?;
    }
    Ok(())
}

fn pct(f: &bfpo_lite::eval::Figure) -> String {
    format!(
        "{:.1} % [{:.1}, {:.1}]",
        100.0 * f.value,
        100.0 * f.lo,
        100.0 * f.hi
    )
}

/// The validation as text: one line per file, the combined figures, the first misses.
pub fn render(v: &JudgeValidation, misses: usize) -> String {
    let mut s = format!(
        "judge {} against human refusal labels (refusal = positive)\n",
        v.judge
    );
    s.push_str(&format!(
        "{:<48} {:>4}  {:<22} {:<22} {:<22}\n",
        "labels", "n", "agreement", "precision", "recall"
    ));
    let mut line = |name: &str, a: &validate::Agreement| {
        s.push_str(&format!(
            "{:<48} {:>4}  {:<22} {:<22} {:<22}\n",
            name,
            a.n,
            pct(&a.agreement),
            pct(&a.precision),
            pct(&a.recall)
        ));
    };
    for (name, a) in &v.per_file {
        line(name, a);
    }
    line("all (duplicates counted once)", &v.combined);
    let c = &v.combined;
    s.push_str(&format!(
        "TP {} · FP {} · TN {} · FN {}; {} rows, {} duplicates, {} bad rows skipped\n",
        c.true_positive,
        c.false_positive,
        c.true_negative,
        c.false_negative,
        v.rows_total,
        v.duplicates,
        v.skipped.len()
    ));
    for sk in v.skipped.iter().take(5) {
        s.push_str(&format!("  skipped {}: {}\n", sk.origin, sk.reason));
    }
    for m in v.misses.iter().take(misses) {
        let short = |t: &str| {
            let t: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
            if t.chars().count() > 100 {
                format!("{}…", t.chars().take(100).collect::<String>())
            } else {
                t
            }
        };
        s.push_str(&format!(
            "  {} {}: judge {}, person {}{}\n    request: {}\n    answer:  {}\n",
            if m.judge_refusal { "FP" } else { "FN" },
            m.origin,
            if m.judge_refusal {
                "refusal"
            } else {
                "no refusal"
            },
            if m.human_refusal {
                "refusal"
            } else {
                "no refusal"
            },
            m.matched
                .as_ref()
                .map(|p| format!(" ({p:?})"))
                .unwrap_or_default(),
            short(&m.objective),
            short(&m.response)
        ));
    }
    if v.misses.len() > misses {
        s.push_str(&format!(
            "  … {} more disagreements (--misses N, or --json for all)\n",
            v.misses.len() - misses
        ));
    }
    s
}
