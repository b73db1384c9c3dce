//! How well does a judge's refusal verdict agree with people? Human refusal labels and the
//! judge's agreement, precision and recall on them.
//!
//! The labels are PyRIT's refusal-scorer evaluation sets (`pyrit==1.1.0`, MIT; vendored byte
//! for byte under `data/prompts/pyrit_refusal/`, see `data/prompts/SOURCE.md`): CSV files whose
//! first lines are `#` comments (`# dataset_version=…`), then a header with at least
//! `objective`, `assistant_response` and `human_score` (`1` = the response is a refusal, `0` =
//! it is not; PyRIT counts an off-topic answer, one that does not address the objective, as a
//! refusal). Fields are RFC 4180: quoted fields may hold commas, `""` and line breaks.
//!
//! A bad row (a field count that differs from the header's, a `human_score` that is not 0 or
//! 1, an unterminated quote) is skipped and counted with its `file:line` (the line the record
//! starts on), like the prompt loaders do. [`validate`] judges every labelled response with the
//! user's objective as the prompt, with refusal as the positive class:
//! agreement = (TP + TN) / n, precision = TP / (TP + FP), recall = TP / (TP + FN), each with its
//! Wilson interval. Identical (objective, response) rows that appear in several files (PyRIT's
//! `mini_refusal.csv` repeats rows of the others) count once in the combined figure and once in
//! each file's own.

use super::EvalError;
use super::judge::Judge;
use super::prompts::SkippedPrompt;
use super::stats::Figure;
use crate::data::RowOrigin;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

const PYRIT_FILES: [(&str, &str); 3] = [
    (
        "data/prompts/pyrit_refusal/refusal.csv",
        include_str!("../../data/prompts/pyrit_refusal/refusal.csv"),
    ),
    (
        "data/prompts/pyrit_refusal/refusal_extra.csv",
        include_str!("../../data/prompts/pyrit_refusal/refusal_extra.csv"),
    ),
    (
        "data/prompts/pyrit_refusal/mini_refusal.csv",
        include_str!("../../data/prompts/pyrit_refusal/mini_refusal.csv"),
    ),
];

/// One human-labelled response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelledResponse {
    /// What the user asked for (given to the judge as the prompt).
    pub objective: String,
    pub response: String,
    /// The person's verdict: the response is a refusal.
    pub human_refusal: bool,
    pub origin: RowOrigin,
}

/// A loaded label file with what was skipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelSet {
    pub name: String,
    pub rows: Vec<LabelledResponse>,
    /// Records seen after the header.
    pub rows_read: usize,
    pub skipped: Vec<SkippedPrompt>,
}

/// PyRIT's three human refusal-label files, embedded in the binary.
pub fn pyrit_refusal_labels() -> Vec<LabelSet> {
    PYRIT_FILES
        .iter()
        .map(|(file, text)| parse_refusal_csv(text, file))
        .collect()
}

/// Reads a label file in PyRIT's format from disk.
pub fn load_refusal_csv(path: &Path) -> Result<LabelSet, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(parse_refusal_csv(&text, &path.display().to_string()))
}

/// One CSV record: its fields and the line it starts on (1-based), or why it is bad.
type Record = (usize, Result<Vec<String>, String>);

/// Splits CSV text into records (RFC 4180). Never fails: an unterminated quote makes the rest
/// of the text one bad record.
fn csv_records(text: &str, first_line: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = first_line;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut at_field_start = true;
        let mut bad = None;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    bad = Some("unterminated quoted field".to_string());
                }
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push('\n');
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if at_field_start => {
                    quoted = true;
                    at_field_start = false;
                }
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    at_field_start = true;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                _ => {
                    field.push(c);
                    at_field_start = false;
                }
            }
        }
        fields.push(field);
        if fields.len() == 1 && fields[0].trim().is_empty() && bad.is_none() {
            continue; // a blank line is not a record
        }
        out.push((start, bad.map_or(Ok(fields), Err)));
    }
    out
}

/// Parses a PyRIT refusal-label CSV (`file` names it in origins). Never fails: bad rows are
/// skipped and counted; a file without the needed header columns has every row skipped.
pub fn parse_refusal_csv(text: &str, file: &str) -> LabelSet {
    let file_arc: Arc<str> = Arc::from(file);
    let origin = |line| RowOrigin {
        file: file_arc.clone(),
        line,
    };
    let mut set = LabelSet {
        name: file.to_string(),
        rows: Vec::new(),
        rows_read: 0,
        skipped: Vec::new(),
    };
    // Leading `#` comment lines (and blank lines) come before the header.
    let mut offset = 0;
    let mut first_line = 1;
    for l in text.split_inclusive('\n') {
        let t = l.trim_start_matches('\u{feff}').trim();
        if t.is_empty() || t.starts_with('#') {
            offset += l.len();
            first_line += 1;
        } else {
            break;
        }
    }
    let mut records = csv_records(&text[offset..], first_line).into_iter();
    let Some((hline, header)) = records.next() else {
        return set;
    };
    let header = match header {
        Ok(h) => h,
        Err(reason) => {
            set.skipped.push(SkippedPrompt {
                origin: origin(hline),
                reason: format!("header: {reason}"),
            });
            return set;
        }
    };
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let cols = (
        col("objective"),
        col("assistant_response"),
        col("human_score"),
    );
    for (line, rec) in records {
        set.rows_read += 1;
        let skip = |reason: String| SkippedPrompt {
            origin: origin(line),
            reason,
        };
        let fields = match rec {
            Ok(f) => f,
            Err(reason) => {
                set.skipped.push(skip(reason));
                continue;
            }
        };
        let (Some(oc), Some(rc), Some(sc)) = cols else {
            set.skipped.push(skip(
                "the header lacks objective, assistant_response or human_score".into(),
            ));
            continue;
        };
        if fields.len() != header.len() {
            set.skipped.push(skip(format!(
                "{} fields, the header has {}",
                fields.len(),
                header.len()
            )));
            continue;
        }
        let human_refusal = match fields[sc].trim() {
            "1" | "1.0" | "true" | "True" => true,
            "0" | "0.0" | "false" | "False" => false,
            other => {
                set.skipped
                    .push(skip(format!("human_score {other:?} is not 0 or 1")));
                continue;
            }
        };
        if fields[oc].trim().is_empty() {
            set.skipped.push(skip("objective is blank".into()));
            continue;
        }
        set.rows.push(LabelledResponse {
            objective: fields[oc].clone(),
            response: fields[rc].clone(),
            human_refusal,
            origin: origin(line),
        });
    }
    set
}

/// A disagreement between judge and person.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Miss {
    pub origin: RowOrigin,
    pub human_refusal: bool,
    pub judge_refusal: bool,
    /// The refusal phrase (or rule) that matched, when the judge said refusal.
    pub matched: Option<String>,
    pub objective: String,
    pub response: String,
}

/// Agreement of a judge's refusal verdicts with human labels (refusal = positive class).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub n: usize,
    pub true_positive: usize,
    pub false_positive: usize,
    pub true_negative: usize,
    pub false_negative: usize,
    pub agreement: Figure,
    pub precision: Figure,
    pub recall: Figure,
}

impl Agreement {
    fn from_counts(tp: usize, fp: usize, tn: usize, fnn: usize) -> Agreement {
        let n = tp + fp + tn + fnn;
        Agreement {
            n,
            true_positive: tp,
            false_positive: fp,
            true_negative: tn,
            false_negative: fnn,
            agreement: Figure::rate(tp + tn, n),
            precision: Figure::rate(tp, tp + fp),
            recall: Figure::rate(tp, tp + fnn),
        }
    }
}

/// A judge validated on label sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeValidation {
    pub judge: String,
    /// Each file on its own, by name.
    pub per_file: Vec<(String, Agreement)>,
    /// All files, identical (objective, response) rows counted once.
    pub combined: Agreement,
    /// Rows in all files before duplicates were removed.
    pub rows_total: usize,
    pub duplicates: usize,
    /// Skipped (bad) rows of all files.
    pub skipped: Vec<SkippedPrompt>,
    /// Every disagreement of the combined set, in file order.
    pub misses: Vec<Miss>,
}

/// Judges every labelled response (the objective as the prompt) and compares the judge's
/// `refused` with the person's label.
pub fn validate(judge: &dyn Judge, sets: &[LabelSet]) -> Result<JudgeValidation, EvalError> {
    let mut per_file = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut combined = [0usize; 4];
    let mut misses = Vec::new();
    let mut rows_total = 0;
    let mut skipped = Vec::new();
    for set in sets {
        let mut c = [0usize; 4];
        skipped.extend(set.skipped.iter().cloned());
        for row in &set.rows {
            rows_total += 1;
            let v = judge.judge(&row.objective, &row.response)?;
            let slot = match (row.human_refusal, v.refused) {
                (true, true) => 0,
                (false, true) => 1,
                (false, false) => 2,
                (true, false) => 3,
            };
            c[slot] += 1;
            if seen.insert((row.objective.as_str(), row.response.as_str())) {
                combined[slot] += 1;
                if slot % 2 == 1 {
                    misses.push(Miss {
                        origin: row.origin.clone(),
                        human_refusal: row.human_refusal,
                        judge_refusal: v.refused,
                        matched: v.matched.clone(),
                        objective: row.objective.clone(),
                        response: row.response.clone(),
                    });
                }
            }
        }
        per_file.push((
            set.name.clone(),
            Agreement::from_counts(c[0], c[1], c[2], c[3]),
        ));
    }
    let combined = Agreement::from_counts(combined[0], combined[1], combined[2], combined[3]);
    Ok(JudgeValidation {
        judge: judge.name(),
        per_file,
        duplicates: rows_total - combined.n,
        combined,
        rows_total,
        skipped,
        misses,
    })
}
