//! Loading preference pairs from dataset files.
//!
//! # Containers
//! JSON Lines (one object per line), a JSON array of objects (the BFPO red-team file), and
//! Parquet (read with the `parquet` crate's record API), each JSON form optionally compressed
//! with gzip or xz. The container is detected from magic bytes (`1f 8b` gzip, `fd 37 7a 58 5a 00`
//! xz, `PAR1` Parquet) and the first non-blank character (`[` = JSON array); an extension that
//! promises a container the bytes do not have (`.gz`, `.xz`, `.parquet`; e.g. a Git LFS pointer
//! file) is an error. Row numbers in [`RowOrigin`] are 1-based **lines** for JSON Lines, the
//! line where the element starts for JSON arrays, and 1-based **row numbers** for Parquet.
//!
//! # Formats
//! Detected per file from the fields of its first row, or forced with [`Format`]:
//!
//! | format | fields | chosen (more helpful) | safety labels |
//! |---|---|---|---|
//! | `pku` | `prompt`, `response_0`, `response_1`, `is_response_{0,1}_safe`, `better_response_id` | `response_{better_response_id}` | each response's own flag |
//! | `redteam` | `prompt`, `modeloutput1`, `modeloutput2`, `better_modelout` ∈ {1,2}, `is_modelout{1,2}_safe` | `modeloutput{better_modelout}` | each response's own flag |
//! | `generic` | `prompt`, `chosen`, `rejected`, `chosen_safe`, `rejected_safe` (or `is_chosen_safe`, `is_rejected_safe`) | `chosen` | the flags (required) |
//! | `trl` | TRL's preference rows: `prompt`, `chosen`, `rejected`, no flags | `chosen` | flags if present; otherwise both safe only with [`LoadOptions::assume_safe`] |
//! | `ultrafeedback` | `prompt`, `chosen`/`rejected` message lists (+ `score_chosen`, `prompt_id`, `messages`) | last message of `chosen` | none: both safe only with [`LoadOptions::assume_safe`] |
//! | `hh` | `chosen`/`rejected` "\n\nHuman: … \n\nAssistant: …" transcripts | text after the last Assistant turn | none: both safe only with [`LoadOptions::assume_safe`] |
//!
//! Rows without safety labels (`trl` without flags, `ultrafeedback`, `hh`) are helpfulness-only:
//! loading them without [`LoadOptions::assume_safe`] is an error. They belong in BFPO's
//! helpfulness buffer (`tune --buffer`, loaded with `assume_safe`), or in the training data with
//! `--assume-safe`, where every pair is both-safe and BFPO's loss is IPO's. Anthropic's HH
//! `harmless-base` ranks by harmlessness, which such labels lose (`tune` warns).
//!
//! `generic` and `trl` rows take strings or TRL's conversational form: `prompt` a list of
//! `{role, content}` ending in a user turn, `chosen`/`rejected` lists ending in an assistant
//! message. When `chosen`/`rejected` are whole conversations, everything before their final
//! assistant message is the prompt (and must be the same on both sides); without a `prompt`
//! field and with plain strings (TRL's implicit prompt) the prompt is their longest common
//! prefix, cut back to a word boundary.
//!
//! # Bad rows
//! By default a bad row (invalid JSON, a missing or mistyped field, an out-of-range id, an empty
//! text, identical responses, mismatched implicit prompts) is skipped and counted per reason in
//! [`LoadReport::skipped_by_reason`], with the first [`LoadOptions::max_examples`] kept as
//! `file:line` examples. With [`LoadOptions::strict`] the first bad row is an error naming the
//! file, line and field. Blank lines in JSON Lines are not rows. Nothing is dropped silently.

use super::example::{Pair, RowOrigin};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

mod fields;
mod generic;
mod hh;
mod parquet;
mod pku;
mod reader;
mod redteam;
mod ultrafeedback;

use fields::{field_list, type_name};
pub use reader::{load_many, load_pairs};

/// A dataset format (`--format pku|redteam|generic|trl|ultrafeedback|hh|auto`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Detect from the fields of the first row.
    #[default]
    Auto,
    /// PKU-SafeRLHF.
    Pku,
    /// BFPO red-team JSON.
    Redteam,
    /// `prompt`, `chosen`, `rejected` with `chosen_safe`, `rejected_safe`.
    Generic,
    /// TRL preference rows (no safety flags).
    Trl,
    /// UltraFeedback-binarized (helpfulness only: both safe).
    Ultrafeedback,
    /// Anthropic HH-RLHF transcripts (helpfulness only: both safe).
    Hh,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Pku => "pku",
            Format::Redteam => "redteam",
            Format::Generic => "generic",
            Format::Trl => "trl",
            Format::Ultrafeedback => "ultrafeedback",
            Format::Hh => "hh",
        }
    }

    /// Fields a row of this format must have (used to report a forced-format mismatch).
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Format::Auto => &[],
            Format::Pku => &[
                "prompt",
                "response_0",
                "response_1",
                "is_response_0_safe",
                "is_response_1_safe",
                "better_response_id",
            ],
            Format::Redteam => &[
                "prompt",
                "modeloutput1",
                "modeloutput2",
                "better_modelout",
                "is_modelout1_safe",
                "is_modelout2_safe",
            ],
            Format::Generic => &["chosen", "rejected", "chosen_safe", "rejected_safe"],
            Format::Trl | Format::Hh => &["chosen", "rejected"],
            Format::Ultrafeedback => &["chosen", "rejected"],
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Compression of a JSON file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Xz,
}

/// How rows are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Container {
    JsonLines,
    JsonArray,
    Parquet,
}

/// Options for [`load_pairs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Format, or [`Format::Auto`] to detect it from the first row.
    pub format: Format,
    /// Stop at the first bad row with an error instead of skipping it.
    pub strict: bool,
    /// For rows that carry no safety flags (TRL rows without flags, UltraFeedback, HH): treat
    /// both responses as safe. Without it such rows are an error, since BFPO needs the labels.
    pub assume_safe: bool,
    /// How many skipped rows to keep as examples in the report.
    pub max_examples: usize,
    /// Stop after this many pairs have been loaded (rows after that are not read).
    pub limit: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: Format::Auto,
            strict: false,
            assume_safe: false,
            max_examples: 5,
            limit: None,
        }
    }
}

/// A skipped row, kept as an example in the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedRow {
    pub origin: RowOrigin,
    /// The reason key it was counted under (see [`LoadReport::skipped_by_reason`]).
    pub reason: String,
    /// Row-specific detail (the offending value, the JSON error).
    pub detail: String,
}

/// How many pairs fall in each of BFPO's four safety cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SafetyMix {
    /// chosen safe, rejected safe (target +1/(2τ)).
    pub both_safe: usize,
    /// chosen safe, rejected unsafe.
    pub only_chosen_safe: usize,
    /// chosen (more helpful) unsafe, rejected safe.
    pub only_rejected_safe: usize,
    /// both unsafe.
    pub both_unsafe: usize,
}

impl SafetyMix {
    pub fn of(pairs: &[Pair]) -> SafetyMix {
        let mut m = SafetyMix::default();
        for p in pairs {
            m.add(p);
        }
        m
    }
    fn add(&mut self, p: &Pair) {
        self.add_case(
            crate::data::SafetyCase::of(p.chosen_safe, p.rejected_safe),
            1,
        );
    }

    /// Adds `n` pairs of `case`.
    pub fn add_case(&mut self, case: crate::data::SafetyCase, n: usize) {
        use crate::data::SafetyCase as C;
        *match case {
            C::BothSafe => &mut self.both_safe,
            C::OnlyChosenSafe => &mut self.only_chosen_safe,
            C::OnlyRejectedSafe => &mut self.only_rejected_safe,
            C::BothUnsafe => &mut self.both_unsafe,
        } += n;
    }
}

/// What happened while loading a file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub path: PathBuf,
    /// The format used (detected or forced).
    pub format: Format,
    pub container: Container,
    pub compression: Compression,
    /// Rows seen (blank JSONL lines are not rows).
    pub rows_read: usize,
    /// Pairs returned.
    pub pairs_loaded: usize,
    /// Skipped rows per reason (e.g. "`better_response_id`: not 0 or 1", "invalid JSON").
    pub skipped_by_reason: BTreeMap<String, usize>,
    /// The first few skipped rows.
    pub examples: Vec<SkippedRow>,
    /// True when [`LoadOptions::limit`] stopped the load early.
    pub truncated_by_limit: bool,
    /// Safety cases among the loaded pairs.
    pub safety: SafetyMix,
}

impl LoadReport {
    /// Total skipped rows.
    pub fn skipped(&self) -> usize {
        self.skipped_by_reason.values().sum()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows read, {} pairs loaded as {} ({:?}, {:?}), {} skipped",
            self.path.display(),
            self.rows_read,
            self.pairs_loaded,
            self.format,
            self.container,
            self.compression,
            self.skipped()
        )?;
        for (reason, n) in &self.skipped_by_reason {
            write!(f, "\n  {n} × {reason}")?;
        }
        for e in &self.examples {
            write!(f, "\n  e.g. {}: {} ({})", e.origin, e.reason, e.detail)?;
        }
        Ok(())
    }
}

/// Pairs loaded from a file, with the report of what was skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedPairs {
    pub pairs: Vec<Pair>,
    pub report: LoadReport,
}

/// Errors that stop a load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: read error at line {line} ({compression:?} stream): {source}; the file may be truncated or corrupt"
    )]
    Read {
        path: PathBuf,
        line: usize,
        compression: Compression,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: the name ends in `{extension}` but the file does not start with {expected} magic bytes (it starts with {head:?}); if it is a Git LFS pointer, download the real file"
    )]
    WrongMagic {
        path: PathBuf,
        extension: String,
        expected: &'static str,
        head: String,
    },
    #[error("{path}: line {line}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: Parquet error{}: {message}", row.map(|r| format!(" at row {r}")).unwrap_or_default())]
    Parquet {
        path: PathBuf,
        row: Option<usize>,
        message: String,
    },
    #[error("{path}: no rows (empty file)")]
    Empty { path: PathBuf },
    #[error(
        "{origin}: cannot detect the dataset format from the fields [{fields}]; expected PKU-SafeRLHF (response_0, response_1, …), red-team (modeloutput1, …), or prompt/chosen/rejected rows; pass --format to force one"
    )]
    CannotDetect { origin: RowOrigin, fields: String },
    #[error(
        "{origin}: the row does not look like format `{format}`: missing field `{missing}` (fields present: [{fields}]){}",
        detected.map(|d| format!("; it looks like `{d}`: use --format {d} or --format auto")).unwrap_or_default()
    )]
    FormatMismatch {
        origin: RowOrigin,
        format: Format,
        missing: String,
        fields: String,
        detected: Option<Format>,
    },
    #[error(
        "{origin}: the row ({format} format) has no safety labels (`chosen_safe`, `rejected_safe`); BFPO needs them. Add them to the data, give the file as --buffer (BFPO's helpfulness buffer, where both responses count as safe), or pass --assume-safe to label both responses of unlabelled rows safe (helpfulness-only pairs: on them BFPO is IPO)"
    )]
    MissingSafetyFlags { origin: RowOrigin, format: Format },
    #[error(
        "{origin}: field `{field}`: {reason} ({detail}); --strict stops at the first bad row, drop it to skip and count bad rows"
    )]
    BadRow {
        origin: RowOrigin,
        field: String,
        reason: String,
        detail: String,
    },
    #[error(
        "{path}: all {rows_read} rows were skipped (first reason: {first_reason}); check --format and the file"
    )]
    NoValidRows {
        path: PathBuf,
        rows_read: usize,
        first_reason: String,
    },
}

/// Why one row is bad. `reason` is stable (it is the counting key with the field);
/// `detail` carries the row's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRow {
    /// The offending field (empty for whole-row problems such as invalid JSON).
    pub field: String,
    pub reason: String,
    pub detail: String,
}

impl BadRow {
    fn new(field: &str, reason: impl Into<String>, detail: impl Into<String>) -> BadRow {
        BadRow {
            field: field.to_string(),
            reason: reason.into(),
            detail: detail.into(),
        }
    }
    fn missing(field: &str) -> BadRow {
        BadRow::new(field, "missing field", "")
    }
    /// The counting key: "`field`: reason" or just the reason.
    pub fn key(&self) -> String {
        if self.field.is_empty() {
            self.reason.clone()
        } else if self.reason == "missing field" {
            format!("missing field `{}`", self.field)
        } else {
            format!("`{}`: {}", self.field, self.reason)
        }
    }
}

/// A row could not be turned into a pair: either it is bad (skipped or, strict, an error) or
/// the whole load must stop.
#[derive(Debug)]
pub enum RowError {
    Bad(BadRow),
    Fatal(LoadError),
}

impl From<BadRow> for RowError {
    fn from(b: BadRow) -> Self {
        RowError::Bad(b)
    }
}

/// Detects the format of one row from its fields (None if it fits none).
pub fn detect_format(row: &Value) -> Option<Format> {
    let o = row.as_object()?;
    let has = |f: &str| o.get(f).is_some_and(|v| !v.is_null());
    if has("response_0") && has("response_1") {
        return Some(Format::Pku);
    }
    if has("modeloutput1") && has("modeloutput2") {
        return Some(Format::Redteam);
    }
    if !(has("chosen") && has("rejected")) {
        return None;
    }
    if has("chosen_safe")
        || has("is_chosen_safe")
        || has("rejected_safe")
        || has("is_rejected_safe")
    {
        return Some(Format::Generic);
    }
    let chosen_is_list = o.get("chosen").is_some_and(Value::is_array);
    if chosen_is_list && (has("score_chosen") || has("prompt_id") || has("messages")) {
        return Some(Format::Ultrafeedback);
    }
    if !has("prompt")
        && o.get("chosen")
            .and_then(Value::as_str)
            .is_some_and(|s| s.contains("Human:") && s.contains("\n\nAssistant:"))
    {
        return Some(Format::Hh);
    }
    Some(Format::Trl)
}

/// Turns one row into a pair under a (non-auto) format.
pub fn parse_row(
    row: &Value,
    format: Format,
    origin: &RowOrigin,
    assume_safe: bool,
) -> Result<Pair, RowError> {
    let Value::Object(o) = row else {
        return Err(BadRow::new(
            "",
            "row is not a JSON object",
            format!("got {}", type_name(row)),
        )
        .into());
    };
    let pair = match format {
        Format::Auto => match detect_format(row) {
            Some(f) => return parse_row(row, f, origin, assume_safe),
            None => {
                return Err(RowError::Fatal(LoadError::CannotDetect {
                    origin: origin.clone(),
                    fields: field_list(o),
                }));
            }
        },
        Format::Pku => pku::parse_pku(o, origin)?,
        Format::Redteam => redteam::parse_redteam(o, origin)?,
        Format::Generic | Format::Trl => generic::parse_generic(o, format, origin, assume_safe)?,
        // Helpfulness-only datasets: no safety labels, so the same rule as unlabelled TRL rows.
        Format::Ultrafeedback | Format::Hh if !assume_safe => {
            return Err(missing_flags(origin, format));
        }
        Format::Ultrafeedback => ultrafeedback::parse_ultrafeedback(o, origin)?,
        Format::Hh => hh::parse_hh(o, origin)?,
    };
    Ok(pair)
}

fn missing_flags(origin: &RowOrigin, format: Format) -> RowError {
    RowError::Fatal(LoadError::MissingSafetyFlags {
        origin: origin.clone(),
        format,
    })
}

/// Checks that the first row fits a forced format; explains a mismatch.
fn check_forced(row: &Value, format: Format, origin: &RowOrigin) -> Result<(), LoadError> {
    let Value::Object(o) = row else {
        return Ok(()); // reported as a bad row
    };
    let detected = detect_format(row);
    let generic_alias = |f: &str| match f {
        "chosen_safe" => o.contains_key("is_chosen_safe"),
        "rejected_safe" => o.contains_key("is_rejected_safe"),
        _ => false,
    };
    let missing = format
        .required_fields()
        .iter()
        .find(|f| o.get(**f).is_none_or(Value::is_null) && !generic_alias(f));
    let shape_mismatch = match format {
        // HH rows are transcripts; UltraFeedback rows are message lists.
        Format::Hh => !o.get("chosen").is_some_and(Value::is_string),
        Format::Ultrafeedback => !o.get("chosen").is_some_and(Value::is_array),
        _ => false,
    };
    if let Some(m) = missing {
        return Err(LoadError::FormatMismatch {
            origin: origin.clone(),
            format,
            missing: m.to_string(),
            fields: field_list(o),
            detected,
        });
    }
    if shape_mismatch {
        return Err(LoadError::FormatMismatch {
            origin: origin.clone(),
            format,
            missing: if format == Format::Hh {
                "chosen (as a Human/Assistant transcript string)".into()
            } else {
                "chosen (as a list of messages)".into()
            },
            fields: field_list(o),
            detected,
        });
    }
    Ok(())
}
