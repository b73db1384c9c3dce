//! Training metrics: one record per step with TRL's names where they exist, written as JSONL, and
//! a dependency-free SVG plot of the training curves.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

use crate::data::SafetyCase;

/// Accumulates per-pair statistics into the numbers of one step or one evaluation.
#[derive(Clone, Debug, Default)]
pub struct PairStats {
    n: usize,
    loss: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    reward_acc: f64,
    logp_chosen: f64,
    logp_rejected: f64,
    case_n: [usize; 4],
    case_correct: [usize; 4],
}

/// One pair's numbers as the trainer sees them.
#[derive(Clone, Copy, Debug)]
pub struct PairObservation {
    pub loss: f64,
    /// τ·(log π − log π_ref) of the chosen response (β for DPO).
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
    pub case: SafetyCase,
}

impl PairStats {
    pub fn add(&mut self, o: PairObservation) {
        self.n += 1;
        self.loss += o.loss;
        self.reward_chosen += o.reward_chosen;
        self.reward_rejected += o.reward_rejected;
        let margin = o.reward_chosen - o.reward_rejected;
        if margin > 0.0 {
            self.reward_acc += 1.0;
        }
        self.logp_chosen += o.logp_chosen;
        self.logp_rejected += o.logp_rejected;
        let i = o.case as usize;
        self.case_n[i] += 1;
        // Correct when the implicit reward orders the pair as BFPO's global ranking does.
        let correct = if o.case.prefers_chosen() {
            margin > 0.0
        } else {
            margin < 0.0
        };
        if correct {
            self.case_correct[i] += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Pairs whose implicit reward orders them as BFPO's global ranking wants.
    pub fn bfpo_correct(&self) -> usize {
        self.case_correct.iter().sum()
    }

    /// Fills the pair-derived fields of a record (means over the pairs seen).
    ///
    /// `loss` is the mean per-pair loss; the trainer replaces it with the step's objective
    /// (safety half + buffer half) and fills `loss/safety` and `loss/buffer`.
    pub fn fill(&self, m: &mut StepMetrics) {
        let n = self.n.max(1) as f64;
        m.loss = self.loss / n;
        m.rewards_chosen = self.reward_chosen / n;
        m.rewards_rejected = self.reward_rejected / n;
        m.rewards_margins = (self.reward_chosen - self.reward_rejected) / n;
        m.rewards_accuracies = self.reward_acc / n;
        m.logps_chosen = self.logp_chosen / n;
        m.logps_rejected = self.logp_rejected / n;
        let acc = |i: usize| {
            (self.case_n[i] > 0).then(|| self.case_correct[i] as f64 / self.case_n[i] as f64)
        };
        m.accuracy_both_safe = acc(0);
        m.accuracy_helpful_safe = acc(1);
        m.accuracy_helpful_unsafe = acc(2);
        m.accuracy_both_unsafe = acc(3);
        let total: usize = self.case_correct.iter().sum();
        m.accuracy_bfpo = Some(total as f64 / n);
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// `train` or `eval`.
    pub split: String,
    pub step: usize,
    pub epoch: f64,
    /// The objective: for a training step with a helpfulness buffer, BFPO(safety batch) +
    /// BFPO(buffer batch), averaged over the micro-steps.
    pub loss: f64,
    /// The safety half of a training step's loss.
    #[serde(
        rename = "loss/safety",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub loss_safety: Option<f64>,
    /// The buffer half of a training step's loss (absent without a buffer).
    #[serde(
        rename = "loss/buffer",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub loss_buffer: Option<f64>,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// Fraction of pairs ordered as BFPO's global ranking wants, overall and per safety case.
    #[serde(
        rename = "accuracy/bfpo",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accuracy_bfpo: Option<f64>,
    #[serde(
        rename = "accuracy/both_safe",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accuracy_both_safe: Option<f64>,
    #[serde(
        rename = "accuracy/helpful_safe",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accuracy_helpful_safe: Option<f64>,
    #[serde(
        rename = "accuracy/helpful_unsafe",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accuracy_helpful_unsafe: Option<f64>,
    #[serde(
        rename = "accuracy/both_unsafe",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accuracy_both_unsafe: Option<f64>,
    /// Gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub learning_rate: Option<f64>,
    /// Tokens processed per second in this step: every token of every sequence (prompt and
    /// response, chosen and rejected), as TRL counts them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_second: Option<f64>,
    /// Tokens processed so far (counted as for `tokens_per_second`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub num_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub elapsed_seconds: Option<f64>,
}

/// Appends records to a JSONL file (flushed per line so a crash keeps what was written).
pub struct MetricsWriter {
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn append(path: &Path) -> std::io::Result<MetricsWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(MetricsWriter {
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.file, m)?;
        self.file.write_all(b"\n")?;
        self.file.flush()
    }
}

/// Reads a metrics file back (skipping nothing: a malformed line is an error naming it).
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Truncates `metrics.jsonl` to the records with `step <= last_step` (used on resume so the file
/// matches the checkpoint exactly).
pub fn truncate_after(path: &Path, last_step: usize) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<StepMetrics> = read_metrics(path)?
        .into_iter()
        .filter(|m| m.step <= last_step)
        .collect();
    let mut out = String::new();
    for m in &kept {
        out.push_str(&serde_json::to_string(m).map_err(|e| e.to_string())?);
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    title: &str,
    series: &[Series<'_>],
    fixed: Option<(f64, f64)>,
) {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    out.push_str(&format!(
        "<g><rect x='{x0}' y='{y0}' width='{w}' height='{h}' fill='white' stroke='#888'/>\n<text x='{}' y='{}' font-size='14' font-weight='bold'>{title}</text>\n",
        x0 + 6.0,
        y0 - 6.0
    ));
    if pts.is_empty() {
        out.push_str(&format!(
            "<text x='{}' y='{}' font-size='12'>no data</text></g>\n",
            x0 + 10.0,
            y0 + 20.0
        ));
        return;
    }
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut ymin, mut ymax) = fixed.unwrap_or_else(|| {
        pts.iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)))
    });
    if (ymax - ymin).abs() < 1e-12 {
        ymin -= 1.0;
        ymax += 1.0;
    }
    let xspan = (xmax - xmin).max(1e-12);
    let sx = |x: f64| x0 + 40.0 + (x - xmin) / xspan * (w - 50.0);
    let sy = |y: f64| y0 + h - 20.0 - (y - ymin) / (ymax - ymin) * (h - 30.0);
    for (v, anchor) in [(ymin, "start"), (ymax, "start")] {
        out.push_str(&format!(
            "<text x='{}' y='{}' font-size='10' text-anchor='{anchor}' fill='#444'>{}</text>\n",
            x0 + 2.0,
            sy(v) + 3.0,
            fmt_num(v)
        ));
    }
    out.push_str(&format!(
        "<text x='{}' y='{}' font-size='10' fill='#444'>step {}</text><text x='{}' y='{}' font-size='10' text-anchor='end' fill='#444'>{}</text>\n",
        x0 + 40.0,
        y0 + h - 5.0,
        fmt_num(xmin),
        x0 + w - 10.0,
        y0 + h - 5.0,
        fmt_num(xmax)
    ));
    if ymin < 0.0 && ymax > 0.0 {
        out.push_str(&format!(
            "<line x1='{}' x2='{}' y1='{y}' y2='{y}' stroke='#ccc'/>\n",
            sx(xmin),
            sx(xmax),
            y = sy(0.0)
        ));
    }
    let legend_w = 170.0;
    let mut legend = format!(
        "<rect x='{}' y='{}' width='{legend_w}' height='{}' fill='white' fill-opacity='0.85' stroke='#ccc'/>\n",
        x0 + w - legend_w - 8.0,
        y0 + 4.0,
        13.0 * series.len() as f64 + 6.0
    );
    for (k, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if path.is_empty() {
            continue;
        }
        let dash = if s.dashed {
            " stroke-dasharray='5,3'"
        } else {
            ""
        };
        if path.len() == 1 {
            out.push_str(&format!(
                "<circle cx='{}' r='3' fill='{}'/>\n",
                path[0].replace(',', "' cy='"),
                s.color
            ));
        } else {
            out.push_str(&format!(
                "<polyline fill='none' stroke='{}' stroke-width='1.5'{dash} points='{}'/>\n",
                s.color,
                path.join(" ")
            ));
        }
        legend.push_str(&format!(
            "<text x='{}' y='{}' font-size='11' fill='{}'>{}</text>\n",
            x0 + w - legend_w - 2.0,
            y0 + 14.0 + 13.0 * k as f64,
            s.color,
            s.name
        ));
    }
    out.push_str(&legend);
    out.push_str("</g>\n");
}

/// Trailing moving average over `window` points (per-step values over a few pairs are noisy).
fn smooth(points: Vec<(f64, f64)>, window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    (0..points.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(window);
            let ys = &points[lo..=i];
            (
                points[i].0,
                ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64,
            )
        })
        .collect()
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || (v != 0.0 && v.abs() < 0.01) {
        format!("{v:.2e}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders loss, reward margins and accuracies by safety case as a standalone SVG.
pub fn curves_svg(records: &[StepMetrics], title: &str) -> String {
    curves_svg_with_harmless(records, title, &[])
}

/// One harmlessness measurement for the curves: step, harmless rate and its 95 % interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HarmlessMark {
    pub step: usize,
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
}

/// [`curves_svg`] with a fourth panel, the harmless rate of generated answers (with its 95 %
/// interval) at the steps it was measured, when `harmless` is not empty.
pub fn curves_svg_with_harmless(
    records: &[StepMetrics],
    title: &str,
    harmless: &[HarmlessMark],
) -> String {
    let panels = if harmless.is_empty() { 3.0 } else { 4.0 };
    let pick = |split: &str, f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|m| m.split == split)
            .filter_map(|m| f(m).map(|v| (m.step as f64, v)))
            .collect()
    };
    let n_train = records.iter().filter(|m| m.split == "train").count();
    let win = (n_train / 20).max(1);
    let train_label = if win > 1 {
        format!("train (mean of {win} steps)")
    } else {
        "train".to_string()
    };
    let train = |f: &dyn Fn(&StepMetrics) -> Option<f64>| smooth(pick("train", f), win);
    let (w, h) = (900.0, 260.0);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{}' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='#fafafa'/>\n<text x='10' y='22' font-size='16'>{}</text>\n",
        panels * (h + 40.0) + 40.0,
        xml_escape(title)
    );
    panel(
        &mut out,
        10.0,
        60.0,
        w - 20.0,
        h,
        "loss",
        &[
            Series {
                name: &train_label,
                color: "#1f77b4",
                dashed: false,
                points: train(&|m| Some(m.loss)),
            },
            Series {
                name: "held-out",
                color: "#d62728",
                dashed: true,
                points: pick("eval", &|m| Some(m.loss)),
            },
        ],
        None,
    );
    panel(
        &mut out,
        10.0,
        60.0 + h + 40.0,
        w - 20.0,
        h,
        "reward margin (chosen − rejected)",
        &[
            Series {
                name: &train_label,
                color: "#1f77b4",
                dashed: false,
                points: train(&|m| Some(m.rewards_margins)),
            },
            Series {
                name: "held-out",
                color: "#d62728",
                dashed: true,
                points: pick("eval", &|m| Some(m.rewards_margins)),
            },
        ],
        None,
    );
    let colors = ["#2ca02c", "#1f77b4", "#d62728", "#9467bd"];
    let mut acc = Vec::new();
    for (i, case) in SafetyCase::ALL.iter().enumerate() {
        let f = move |m: &StepMetrics| match case {
            SafetyCase::BothSafe => m.accuracy_both_safe,
            SafetyCase::OnlyChosenSafe => m.accuracy_helpful_safe,
            SafetyCase::OnlyRejectedSafe => m.accuracy_helpful_unsafe,
            SafetyCase::BothUnsafe => m.accuracy_both_unsafe,
        };
        acc.push(Series {
            name: case.metric_key(),
            color: colors[i],
            dashed: false,
            points: train(&f),
        });
    }
    acc.push(Series {
        name: "held-out (all)",
        color: "#333",
        dashed: true,
        points: pick("eval", &|m| m.accuracy_bfpo),
    });
    panel(
        &mut out,
        10.0,
        60.0 + 2.0 * (h + 40.0),
        w - 20.0,
        h,
        &format!(
            "accuracy by safety case (train{}) and held-out",
            if win > 1 {
                format!(", mean of {win} steps")
            } else {
                String::new()
            }
        ),
        &acc,
        Some((0.0, 1.0)),
    );
    if !harmless.is_empty() {
        let pts = |f: &dyn Fn(&HarmlessMark) -> f64| -> Vec<(f64, f64)> {
            harmless.iter().map(|m| (m.step as f64, f(m))).collect()
        };
        panel(
            &mut out,
            10.0,
            60.0 + 3.0 * (h + 40.0),
            w - 20.0,
            h,
            "harmless rate of generated answers (judged), 95 % Wilson interval",
            &[
                Series {
                    name: "harmless rate",
                    color: "#2ca02c",
                    dashed: false,
                    points: pts(&|m| m.rate),
                },
                Series {
                    name: "95 % low",
                    color: "#98df8a",
                    dashed: true,
                    points: pts(&|m| m.lo),
                },
                Series {
                    name: "95 % high",
                    color: "#98df8a",
                    dashed: true,
                    points: pts(&|m| m.hi),
                },
            ],
            Some((0.0, 1.0)),
        );
    }
    out.push_str("</svg>\n");
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(loss: f64, rc: f64, rr: f64, case: SafetyCase) -> PairObservation {
        PairObservation {
            loss,
            reward_chosen: rc,
            reward_rejected: rr,
            logp_chosen: -10.0,
            logp_rejected: -12.0,
            case,
        }
    }

    #[test]
    fn stats_follow_trl_names_and_bfpo_ranking() {
        let mut s = PairStats::default();
        s.add(obs(1.0, 0.2, 0.1, SafetyCase::BothSafe)); // margin +0.1: correct (prefers chosen)
        s.add(obs(3.0, 0.1, 0.3, SafetyCase::OnlyRejectedSafe)); // margin −0.2: correct (prefers rejected)
        s.add(obs(2.0, 0.1, 0.3, SafetyCase::OnlyChosenSafe)); // margin −0.2: wrong
        let mut m = StepMetrics::default();
        s.fill(&mut m);
        assert!((m.loss - 2.0).abs() < 1e-12);
        assert!((m.rewards_margins - (-0.3 / 3.0)).abs() < 1e-12);
        assert!((m.rewards_accuracies - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.accuracy_both_safe, Some(1.0));
        assert_eq!(m.accuracy_helpful_unsafe, Some(1.0));
        assert_eq!(m.accuracy_helpful_safe, Some(0.0));
        assert_eq!(m.accuracy_both_unsafe, None);
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains("\"rewards/margins\"")
                && json.contains("\"accuracy/helpful_unsafe\":1.0"),
            "{json}"
        );
        assert!(
            !json.contains("both_unsafe"),
            "absent cases are omitted: {json}"
        );
    }

    #[test]
    fn jsonl_round_trip_truncate_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::append(&path).unwrap();
        for step in 1..=5 {
            let m = StepMetrics {
                split: "train".into(),
                step,
                loss: 10.0 / step as f64,
                accuracy_both_safe: Some(step as f64 / 5.0),
                ..Default::default()
            };
            w.write(&m).unwrap();
        }
        drop(w);
        let back = read_metrics(&path).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back[2].loss, 10.0 / 3.0);
        truncate_after(&path, 3).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 3);
        let svg = curves_svg(&back, "demo <run>");
        assert!(
            svg.starts_with("<svg")
                && svg.contains("<polyline")
                && svg.contains("demo &lt;run&gt;")
        );
        assert_eq!(svg.matches("<g>").count(), 3);
        std::fs::write(&path, "{not json}\n").unwrap();
        assert!(read_metrics(&path).unwrap_err().contains("metrics.jsonl:1"));
    }
}
