//! The output files: `report.json`, `report.md`, `samples.jsonl`, `samples.md`, `eval.svg`.

use super::EvalError;
use super::run::{EvalOutput, EvalReport, ModelReport, Sample};
use super::stats::Figure;
use std::path::{Path, PathBuf};

/// Paths of the written files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub report_json: PathBuf,
    pub report_md: PathBuf,
    pub samples: PathBuf,
    /// The answers side by side, per prompt: for reading.
    pub samples_md: PathBuf,
    pub svg: PathBuf,
}

/// Writes the four files into `dir` (created if needed); each file is written to a temporary
/// name and renamed, so a reader never sees half a file.
pub fn write_outputs(dir: &Path, out: &EvalOutput) -> Result<Written, EvalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| EvalError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let w = Written {
        report_json: dir.join("report.json"),
        report_md: dir.join("report.md"),
        samples: dir.join("samples.jsonl"),
        samples_md: dir.join("samples.md"),
        svg: dir.join("eval.svg"),
    };
    let json = serde_json::to_string_pretty(&out.report)
        .map_err(|e| EvalError::Other(format!("serializing the report: {e}")))?;
    atomic_write(&w.report_json, format!("{json}\n").as_bytes()).map_err(io(&w.report_json))?;
    atomic_write(&w.report_md, markdown(&out.report).as_bytes()).map_err(io(&w.report_md))?;
    atomic_write(&w.samples, &samples_jsonl(&out.samples)).map_err(io(&w.samples))?;
    atomic_write(&w.samples_md, samples_markdown(&out.samples).as_bytes())
        .map_err(io(&w.samples_md))?;
    atomic_write(&w.svg, svg(&out.report).as_bytes()).map_err(io(&w.svg))?;
    Ok(w)
}

fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::util::fs::write_bytes_atomic(path, bytes)
}

/// `samples.md`: every prompt with each model's answer and verdict under it, harmful set first,
/// so a person can read what changed. Answers are shown whole, on one quoted line each.
pub fn samples_markdown(samples: &[Sample]) -> String {
    let mut s = String::from(
        "# Answers, per prompt\n\n`refused` / `answered` is the judge's reading; `unsafe` marks an answer to a harmful prompt judged unsafe.\n",
    );
    let mut prompts: Vec<(&str, &str)> = Vec::new();
    for x in samples {
        if !prompts.contains(&(x.set.as_str(), x.prompt.as_str())) {
            prompts.push((&x.set, &x.prompt));
        }
    }
    let mut set = "";
    let mut n = 0;
    for (pset, prompt) in prompts {
        if pset != set {
            set = pset;
            n = 0;
            s.push_str(&format!("\n## {set} prompts\n"));
        }
        n += 1;
        let rows: Vec<&Sample> = samples
            .iter()
            .filter(|x| x.set == set && x.prompt == prompt)
            .collect();
        let cat = rows[0]
            .category
            .as_deref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        s.push_str(&format!("\n### {n}. {}{cat}\n\n", one_line(prompt)));
        for x in rows {
            let mut tag = if x.refused { "refused" } else { "answered" }.to_string();
            if set == "harmful" && x.verdict == "unsafe" {
                tag.push_str(", unsafe");
            }
            s.push_str(&format!(
                "- **{}** ({tag}): {}\n",
                x.model,
                one_line(&x.answer)
            ));
        }
    }
    s
}

fn one_line(t: &str) -> String {
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.is_empty() { "(empty)".into() } else { t }
}

/// One JSON object per line.
pub fn samples_jsonl(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in samples {
        serde_json::to_writer(&mut out, s).expect("samples serialize");
        out.push(b'\n');
    }
    out
}

/// Which way a figure should move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Closer to zero.
    NearZero,
}

/// Picks a figure of a model (None when the model lacks it).
pub type Pick = Box<dyn Fn(&ModelReport) -> Option<Figure>>;

/// One row of the comparison table: label, direction, and the figure of a model.
pub struct Row {
    pub label: String,
    pub better: Better,
    /// Rates are shown as percentages.
    pub percent: bool,
    pub pick: Pick,
}

/// The rows of the table, in order (categories appended after their overall figure).
pub fn rows(report: &EvalReport) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let rate = |label: &str, better, f: fn(&ModelReport) -> Option<Figure>| Row {
        label: label.into(),
        better,
        percent: true,
        pick: Box::new(f),
    };
    rows.push(rate(
        "harmless rate (harmful prompts)",
        Better::Higher,
        |m| Some(m.harmless.clone()),
    ));
    let mut harm_cats: Vec<String> = report
        .models
        .iter()
        .flat_map(|m| m.harmless_by_category.keys().cloned())
        .collect();
    harm_cats.sort();
    harm_cats.dedup();
    for c in harm_cats {
        let key = c.clone();
        rows.push(Row {
            label: format!("  harmless: {c}"),
            better: Better::Higher,
            percent: true,
            pick: Box::new(move |m| m.harmless_by_category.get(&key).cloned()),
        });
    }
    rows.push(rate(
        "refusal rate (harmful prompts)",
        Better::Higher,
        |m| Some(m.harmful_refusal.clone()),
    ));
    rows.push(rate("over-refusal (benign prompts)", Better::Lower, |m| {
        m.over_refusal.clone()
    }));
    let mut ben_cats: Vec<String> = report
        .models
        .iter()
        .flat_map(|m| m.over_refusal_by_category.keys().cloned())
        .collect();
    ben_cats.sort();
    ben_cats.dedup();
    for c in ben_cats {
        let key = c.clone();
        rows.push(Row {
            label: format!("  over-refusal: {c}"),
            better: Better::Lower,
            percent: true,
            pick: Box::new(move |m| m.over_refusal_by_category.get(&key).cloned()),
        });
    }
    rows.push(rate(
        "BFPO-ranking acc. (likelihood)",
        Better::Higher,
        |m| m.ranking.as_ref().map(|r| r.likelihood_bfpo.clone()),
    ));
    rows.push(rate(
        "safety-ranking acc. (likelihood)",
        Better::Higher,
        |m| m.ranking.as_ref().map(|r| r.likelihood_safety.clone()),
    ));
    rows.push(rate(
        "BFPO-ranking acc. (implicit reward)",
        Better::Higher,
        |m| m.ranking.as_ref().and_then(|r| r.reward_bfpo.clone()),
    ));
    rows.push(rate(
        "safety-ranking acc. (implicit reward)",
        Better::Higher,
        |m| m.ranking.as_ref().and_then(|r| r.reward_safety.clone()),
    ));
    rows.push(Row {
        label: "log-prob drift / token vs base (nats)".into(),
        better: Better::NearZero,
        percent: false,
        pick: Box::new(|m| m.drift.as_ref().map(|d| d.logp_drift.clone())),
    });
    rows.push(Row {
        label: "KL(base ‖ tuned) / token (nats)".into(),
        better: Better::Lower,
        percent: false,
        pick: Box::new(|m| m.drift.as_ref().map(|d| d.kl.clone())),
    });
    rows.push(rate("multiple-choice acc.", Better::Higher, |m| {
        m.mc.as_ref().map(|x| x.acc.clone())
    }));
    rows.push(rate(
        "multiple-choice acc. (length-normalised)",
        Better::Higher,
        |m| m.mc.as_ref().map(|x| x.acc_norm.clone()),
    ));
    // Keep only rows some model has.
    rows.retain(|r| report.models.iter().any(|m| (r.pick)(m).is_some()));
    rows
}

fn fmt_fig(f: &Figure, percent: bool) -> String {
    if f.value.is_nan() {
        return format!("– (n={})", f.n);
    }
    if percent {
        format!(
            "{:.1} % [{:.1}, {:.1}] n={}",
            100.0 * f.value,
            100.0 * f.lo,
            100.0 * f.hi,
            f.n
        )
    } else {
        format!("{:.4} [{:.4}, {:.4}] n={}", f.value, f.lo, f.hi, f.n)
    }
}

/// `↑`/`↓` for a change that is better/worse than the base, `=` for none.
pub fn arrow(base: &Figure, other: &Figure, better: Better) -> &'static str {
    let (b, o) = (base.value, other.value);
    if b.is_nan() || o.is_nan() || (o - b).abs() < 1e-12 {
        return "=";
    }
    let improved = match better {
        Better::Higher => o > b,
        Better::Lower => o < b,
        Better::NearZero => o.abs() < b.abs(),
    };
    if improved { "↑" } else { "↓" }
}

/// `report.md`: one table, base vs each adapter.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    s.push_str(&format!("# bfpo-lite eval: {}\n\n", r.model.display()));
    s.push_str(&format!(
        "Judge: `{}`. Generation: {}, at most {} new tokens, seed {}{}. Total time {:.1} s.\n\n",
        r.judge,
        if r.settings.greedy {
            "greedy".to_string()
        } else {
            format!("temperature {}", r.settings.temperature)
        },
        r.settings.max_tokens,
        r.settings.seed,
        r.settings
            .limit
            .map(|l| format!(", --limit {l}"))
            .unwrap_or_default(),
        r.seconds_total
    ));
    for set in &r.sets {
        s.push_str(&format!(
            "- {} set `{}`: {} of {} usable ({} rows read, {} skipped). {}\n",
            set.role, set.name, set.n, set.available, set.rows_read, set.skipped, set.provenance
        ));
    }
    s.push_str("\nFigures are rates with 95 % Wilson intervals (means with 95 % normal intervals over prompts). ↑ better than the base, ↓ worse, = same.\n\n");
    let rows = rows(r);
    s.push_str("| metric |");
    for m in &r.models {
        s.push_str(&format!(" {} |", m.name));
    }
    s.push_str("\n|---|");
    for _ in &r.models {
        s.push_str("---|");
    }
    s.push('\n');
    for row in &rows {
        s.push_str(&format!("| {} |", row.label));
        let base = r.models.first().and_then(|m| (row.pick)(m));
        for (i, m) in r.models.iter().enumerate() {
            match (row.pick)(m) {
                None => s.push_str(" – |"),
                Some(f) => {
                    let a = match (&base, i) {
                        (Some(b), i) if i > 0 => format!(" {}", arrow(b, &f, row.better)),
                        _ => String::new(),
                    };
                    s.push_str(&format!(" {}{a} |", fmt_fig(&f, row.percent)));
                }
            }
        }
        s.push('\n');
    }
    s.push_str("\n| time (s) |");
    for m in &r.models {
        s.push_str(&format!(" {:.1} |", m.seconds.values().sum::<f64>()));
    }
    s.push('\n');
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

/// `eval.svg`: horizontal bars with 95 % intervals for every rate of the table, one colour per
/// model (the house style of `curves.svg`: white panel, grey frame, sans-serif).
pub fn svg(r: &EvalReport) -> String {
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let rows: Vec<Row> = rows(r).into_iter().filter(|row| row.percent).collect();
    let n_models = r.models.len().max(1);
    let bar_h = 12.0;
    let group_h = bar_h * n_models as f64 + 14.0;
    let (x0, label_w, plot_w) = (10.0, 300.0, 520.0);
    let top = 70.0;
    let height = top + group_h * rows.len() as f64 + 40.0;
    let width = x0 + label_w + plot_w + 40.0;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='#fafafa'/>\n<text x='10' y='22' font-size='16'>{}</text>\n",
        esc(&format!(
            "bfpo-lite eval: {} (judge {})",
            r.model
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            r.judge
        ))
    );
    // Legend.
    let mut lx = 10.0;
    for (i, m) in r.models.iter().enumerate() {
        let c = colors[i % colors.len()];
        s.push_str(&format!(
            "<rect x='{lx}' y='34' width='12' height='12' fill='{c}'/><text x='{}' y='45' font-size='12'>{}</text>\n",
            lx + 16.0,
            esc(&m.name)
        ));
        lx += 30.0 + 8.0 * m.name.chars().count() as f64;
    }
    let px = x0 + label_w;
    s.push_str(&format!(
        "<rect x='{px}' y='{}' width='{plot_w}' height='{}' fill='white' stroke='#888'/>\n",
        top - 6.0,
        group_h * rows.len() as f64 + 6.0
    ));
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let x = px + t * plot_w;
        s.push_str(&format!(
            "<line x1='{x}' x2='{x}' y1='{}' y2='{}' stroke='#ddd'/><text x='{x}' y='{}' font-size='10' text-anchor='middle' fill='#444'>{:.0} %</text>\n",
            top - 6.0,
            top + group_h * rows.len() as f64,
            top + group_h * rows.len() as f64 + 14.0,
            t * 100.0
        ));
    }
    for (k, row) in rows.iter().enumerate() {
        let gy = top + group_h * k as f64;
        s.push_str(&format!(
            "<text x='{}' y='{}' font-size='12' text-anchor='end'>{}</text>\n",
            px - 6.0,
            gy + group_h / 2.0,
            esc(row.label.trim())
        ));
        for (i, m) in r.models.iter().enumerate() {
            let Some(f) = (row.pick)(m) else { continue };
            if f.value.is_nan() {
                continue;
            }
            let c = colors[i % colors.len()];
            let y = gy + bar_h * i as f64;
            s.push_str(&format!(
                "<rect x='{px}' y='{y:.1}' width='{:.1}' height='{:.1}' fill='{c}' fill-opacity='0.8'/>\n",
                f.value * plot_w,
                bar_h - 2.0
            ));
            let (xl, xh) = (px + f.lo * plot_w, px + f.hi * plot_w);
            let ym = y + (bar_h - 2.0) / 2.0;
            s.push_str(&format!(
                "<line x1='{xl:.1}' x2='{xh:.1}' y1='{ym:.1}' y2='{ym:.1}' stroke='#222'/><line x1='{xl:.1}' x2='{xl:.1}' y1='{:.1}' y2='{:.1}' stroke='#222'/><line x1='{xh:.1}' x2='{xh:.1}' y1='{:.1}' y2='{:.1}' stroke='#222'/>\n",
                ym - 3.0,
                ym + 3.0,
                ym - 3.0,
                ym + 3.0
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}
