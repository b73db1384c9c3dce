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

use super::example::{ChatMessage, Pair, Prompt, RowOrigin};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        match (p.chosen_safe, p.rejected_safe) {
            (true, true) => self.both_safe += 1,
            (true, false) => self.only_chosen_safe += 1,
            (false, true) => self.only_rejected_safe += 1,
            (false, false) => self.both_unsafe += 1,
        }
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

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let t: String = s.chars().take(57).collect();
        format!("{t}...")
    } else {
        s
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn field_list(obj: &Map<String, Value>) -> String {
    obj.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a Value, BadRow> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(BadRow::missing(field)),
        Some(v) => Ok(v),
    }
}

fn get_text(obj: &Map<String, Value>, field: &str) -> Result<String, BadRow> {
    match get(obj, field)? {
        Value::String(s) => nonempty(field, s.clone()),
        v => Err(BadRow::new(
            field,
            "not a string",
            format!("got {}: {}", type_name(v), short(v)),
        )),
    }
}

fn nonempty(field: &str, s: String) -> Result<String, BadRow> {
    if s.trim().is_empty() {
        Err(BadRow::new(field, "empty text", format!("{s:?}")))
    } else {
        Ok(s)
    }
}

/// A safety flag: a boolean, 0/1, or the strings "true"/"false".
fn get_flag(obj: &Map<String, Value>, field: &str) -> Result<bool, BadRow> {
    let v = get(obj, field)?;
    let bad = || {
        BadRow::new(
            field,
            "not a boolean safety flag",
            format!("expected true/false or 1/0, got {}", short(v)),
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Ok(true),
            Some(0.0) => Ok(false),
            _ => Err(bad()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// An integer id among `allowed` (an integer, an integral float, or a numeric string).
fn get_id(obj: &Map<String, Value>, field: &str, allowed: &[i64]) -> Result<i64, BadRow> {
    let v = get(obj, field)?;
    let want = allowed
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    let id = match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match id {
        Some(i) if allowed.contains(&i) => Ok(i),
        _ => Err(BadRow::new(
            field,
            format!("not {want}"),
            format!("got {}", short(v)),
        )),
    }
}

fn parse_messages(field: &str, v: &Value) -> Result<Vec<ChatMessage>, BadRow> {
    let Value::Array(items) = v else {
        return Err(BadRow::new(
            field,
            "not a string or a list of messages",
            format!("got {}: {}", type_name(v), short(v)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let bad = |what: &str| {
            BadRow::new(
                field,
                "malformed message",
                format!("message {i}: {what}: {}", short(m)),
            )
        };
        let Value::Object(o) = m else {
            return Err(bad("not a {role, content} object"));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.clone(),
            _ => return Err(bad("`role` missing or not a string")),
        };
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(bad("`role` must be system, user or assistant"));
        }
        let content = match o.get("content") {
            Some(Value::String(c)) => c.clone(),
            _ => return Err(bad("`content` missing or not a string")),
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// A response field: a string, or a message list whose last message is the assistant's reply
/// (returned with the messages before it).
fn parse_response(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<(Vec<ChatMessage>, String), BadRow> {
    match get(obj, field)? {
        Value::String(s) => Ok((Vec::new(), s.clone())),
        v => {
            let mut msgs = parse_messages(field, v)?;
            let Some(last) = msgs.pop() else {
                return Err(BadRow::new(field, "empty message list", ""));
            };
            if last.role != "assistant" {
                return Err(BadRow::new(
                    field,
                    "last message is not from the assistant",
                    format!("role {:?}", last.role),
                ));
            }
            Ok((msgs, last.content))
        }
    }
}

fn check_prompt_messages(field: &str, msgs: Vec<ChatMessage>) -> Result<Prompt, BadRow> {
    match msgs.last() {
        None => Err(BadRow::new(field, "empty prompt", "no messages")),
        Some(m) if m.role != "user" => Err(BadRow::new(
            field,
            "prompt does not end with a user message",
            format!("last role {:?}", m.role),
        )),
        Some(_) if msgs.iter().all(|m| m.content.trim().is_empty()) => {
            Err(BadRow::new(field, "empty prompt", "all messages are blank"))
        }
        Some(_) => Ok(Prompt::Messages(msgs)),
    }
}

/// TRL's implicit prompt for strings: the longest common prefix, cut back to just after the
/// last whitespace inside it so no word is split.
fn split_common_prefix(a: &str, b: &str) -> (String, String, String) {
    let mut end = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            break;
        }
        end = i + ca.len_utf8();
    }
    if end < a.len() || end < b.len() {
        // Differ (or one is a prefix of the other): back off to a word boundary.
        let cut = a[..end]
            .rfind(char::is_whitespace)
            .map(|i| i + a[i..].chars().next().map_or(1, char::len_utf8))
            .unwrap_or(0);
        end = cut;
    }
    (
        a[..end].to_string(),
        a[end..].to_string(),
        b[end..].to_string(),
    )
}

/// Split an HH-RLHF transcript at its last "Assistant:" turn: (earlier turns, last reply).
fn split_hh(field: &str, text: &str) -> Result<(Vec<ChatMessage>, String), BadRow> {
    const H: &str = "\n\nHuman:";
    const A: &str = "\n\nAssistant:";
    let owned;
    let t = if text.starts_with("\n\n") {
        text
    } else {
        owned = format!("\n\n{}", text.trim_start());
        &owned
    };
    // Turn boundaries in order.
    let mut marks: Vec<(usize, &str)> = t
        .match_indices(H)
        .map(|(i, _)| (i, "user"))
        .chain(t.match_indices(A).map(|(i, _)| (i, "assistant")))
        .collect();
    marks.sort_by_key(|m| m.0);
    let bad = |what: &str| BadRow::new(field, "malformed Human/Assistant transcript", what);
    if marks.first().map(|m| m.0) != Some(0) {
        return Err(bad("does not start with a Human: turn"));
    }
    let mut turns = Vec::with_capacity(marks.len());
    for (k, &(start, role)) in marks.iter().enumerate() {
        let hdr = if role == "user" { H.len() } else { A.len() };
        let end = marks.get(k + 1).map_or(t.len(), |m| m.0);
        turns.push(ChatMessage::new(role, t[start + hdr..end].trim()));
    }
    match turns.last() {
        Some(m) if m.role == "assistant" => {}
        _ => return Err(bad("no Assistant: turn at the end")),
    }
    let reply = turns.pop().unwrap().content;
    if turns.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(bad(
            "the last Assistant: turn does not follow a Human: turn",
        ));
    }
    Ok((turns, reply))
}

fn finish(
    prompt: Prompt,
    chosen: (&str, String),
    rejected: (&str, String),
    chosen_safe: bool,
    rejected_safe: bool,
    origin: &RowOrigin,
) -> Result<Pair, BadRow> {
    let c = nonempty(chosen.0, chosen.1)?;
    let r = nonempty(rejected.0, rejected.1)?;
    if c == r {
        return Err(BadRow::new(
            "",
            "identical chosen and rejected responses",
            format!("{} and {}", chosen.0, rejected.0),
        ));
    }
    Ok(Pair {
        prompt,
        chosen: c,
        rejected: r,
        chosen_safe,
        rejected_safe,
        origin: origin.clone(),
    })
}

fn parse_pku(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let better = get_id(o, "better_response_id", &[0, 1])?;
    let (w, l) = if better == 0 { (0, 1) } else { (1, 0) };
    let (fw, fl) = (format!("response_{w}"), format!("response_{l}"));
    let chosen = get_text(o, &fw)?;
    let rejected = get_text(o, &fl)?;
    let sw = get_flag(o, &format!("is_response_{w}_safe"))?;
    let sl = get_flag(o, &format!("is_response_{l}_safe"))?;
    finish(
        Prompt::Text(prompt),
        (&fw, chosen),
        (&fl, rejected),
        sw,
        sl,
        origin,
    )
}

fn parse_redteam(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let w = get_id(o, "better_modelout", &[1, 2])?;
    let l = 3 - w;
    let (fw, fl) = (format!("modeloutput{w}"), format!("modeloutput{l}"));
    let chosen = get_text(o, &fw)?;
    let rejected = get_text(o, &fl)?;
    let sw = get_flag(o, &format!("is_modelout{w}_safe"))?;
    let sl = get_flag(o, &format!("is_modelout{l}_safe"))?;
    finish(
        Prompt::Text(prompt),
        (&fw, chosen),
        (&fl, rejected),
        sw,
        sl,
        origin,
    )
}

/// Prompt and responses of generic / TRL / UltraFeedback rows.
fn prompt_and_responses(o: &Map<String, Value>) -> Result<(Prompt, String, String), BadRow> {
    let (pc, c) = parse_response(o, "chosen")?;
    let (pr, r) = parse_response(o, "rejected")?;
    if !pc.is_empty() || !pr.is_empty() {
        if pc != pr {
            return Err(BadRow::new(
                "rejected",
                "conversation differs from chosen before the final assistant message",
                format!("{} vs {} earlier messages", pc.len(), pr.len()),
            ));
        }
        return Ok((check_prompt_messages("chosen", pc)?, c, r));
    }
    match o.get("prompt") {
        Some(Value::String(s)) => Ok((Prompt::Text(nonempty("prompt", s.clone())?), c, r)),
        Some(v @ Value::Array(_)) => {
            let msgs = parse_messages("prompt", v)?;
            Ok((check_prompt_messages("prompt", msgs)?, c, r))
        }
        Some(v) if !v.is_null() => Err(BadRow::new(
            "prompt",
            "not a string or a list of messages",
            format!("got {}: {}", type_name(v), short(v)),
        )),
        _ => {
            // TRL implicit prompt, string form.
            let (p, c2, r2) = split_common_prefix(&c, &r);
            if p.trim().is_empty() {
                return Err(BadRow::new(
                    "prompt",
                    "missing field (and chosen/rejected share no prefix to use as an implicit prompt)",
                    "",
                ));
            }
            Ok((Prompt::Text(p), c2, r2))
        }
    }
}

/// Safety flags of generic rows: `chosen_safe` or `is_chosen_safe` (and the same for
/// rejected). Returns None when neither side has any flag.
fn generic_flags(o: &Map<String, Value>) -> Result<Option<(bool, bool)>, BadRow> {
    let pick = |a: &'static str, b: &'static str| {
        if o.get(a).is_some_and(|v| !v.is_null()) {
            Some(a)
        } else if o.get(b).is_some_and(|v| !v.is_null()) {
            Some(b)
        } else {
            None
        }
    };
    let fc = pick("chosen_safe", "is_chosen_safe");
    let fr = pick("rejected_safe", "is_rejected_safe");
    match (fc, fr) {
        (None, None) => Ok(None),
        (Some(c), Some(r)) => Ok(Some((get_flag(o, c)?, get_flag(o, r)?))),
        (None, Some(_)) => Err(BadRow::missing("chosen_safe")),
        (Some(_), None) => Err(BadRow::missing("rejected_safe")),
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
        Format::Pku => parse_pku(o, origin)?,
        Format::Redteam => parse_redteam(o, origin)?,
        Format::Generic | Format::Trl => {
            let flags = generic_flags(o)?;
            let (sw, sl) = match (flags, format) {
                (Some(f), _) => f,
                (None, Format::Generic) => return Err(BadRow::missing("chosen_safe").into()),
                (None, _) if assume_safe => (true, true),
                (None, _) => return Err(missing_flags(origin, format)),
            };
            let (p, c, r) = prompt_and_responses(o)?;
            finish(p, ("chosen", c), ("rejected", r), sw, sl, origin)?
        }
        // Helpfulness-only datasets: no safety labels, so the same rule as unlabelled TRL rows.
        Format::Ultrafeedback | Format::Hh if !assume_safe => {
            return Err(missing_flags(origin, format));
        }
        Format::Ultrafeedback => {
            let (p, c, r) = prompt_and_responses(o)?;
            finish(p, ("chosen", c), ("rejected", r), true, true, origin)?
        }
        Format::Hh => {
            let text = |f: &str| match get(o, f)? {
                Value::String(s) => Ok(s.clone()),
                v => Err(BadRow::new(
                    f,
                    "not a string",
                    format!("got {}: {}", type_name(v), short(v)),
                )),
            };
            let (pc, c) = split_hh("chosen", &text("chosen")?)?;
            let (pr, r) = split_hh("rejected", &text("rejected")?)?;
            if pc != pr {
                return Err(BadRow::new(
                    "rejected",
                    "transcript differs from chosen before the last Assistant turn",
                    format!("{} vs {} earlier turns", pc.len(), pr.len()),
                )
                .into());
            }
            let p = check_prompt_messages("chosen", pc)?;
            finish(p, ("chosen", c), ("rejected", r), true, true, origin)?
        }
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

/// Accumulates rows into pairs and the report.
struct Sink<'a> {
    opts: &'a LoadOptions,
    path: &'a Path,
    file: Arc<str>,
    format: Option<Format>,
    pairs: Vec<Pair>,
    rows_read: usize,
    skipped: BTreeMap<String, usize>,
    examples: Vec<SkippedRow>,
    first_reason: Option<String>,
    done: bool,
}

impl Sink<'_> {
    fn origin(&self, line: usize) -> RowOrigin {
        RowOrigin {
            file: self.file.clone(),
            line,
        }
    }

    fn bad(&mut self, origin: RowOrigin, b: BadRow) -> Result<(), LoadError> {
        if self.opts.strict {
            return Err(LoadError::BadRow {
                origin,
                field: if b.field.is_empty() {
                    "(row)".into()
                } else {
                    b.field
                },
                reason: b.reason,
                detail: b.detail,
            });
        }
        let key = b.key();
        *self.skipped.entry(key.clone()).or_default() += 1;
        if self.first_reason.is_none() {
            self.first_reason = Some(format!("{origin}: {key}"));
        }
        if self.examples.len() < self.opts.max_examples {
            self.examples.push(SkippedRow {
                origin,
                reason: key,
                detail: b.detail,
            });
        }
        Ok(())
    }

    /// One row as JSON text (JSONL line or array element).
    fn text_row(&mut self, line: usize, text: &str) -> Result<(), LoadError> {
        self.rows_read += 1;
        let origin = self.origin(line);
        match serde_json::from_str::<Value>(text) {
            Ok(v) => self.value_row(origin, v),
            Err(e) => self.bad(origin, BadRow::new("", "invalid JSON", e.to_string())),
        }
    }

    fn value_row(&mut self, origin: RowOrigin, v: Value) -> Result<(), LoadError> {
        let format = match self.format {
            Some(f) => f,
            None => {
                // The first JSON object fixes the format.
                if !v.is_object() {
                    return self.bad(
                        origin,
                        BadRow::new("", "row is not a JSON object", type_name(&v)),
                    );
                }
                let f = if self.opts.format == Format::Auto {
                    detect_format(&v).ok_or_else(|| LoadError::CannotDetect {
                        origin: origin.clone(),
                        fields: v.as_object().map(field_list).unwrap_or_default(),
                    })?
                } else {
                    check_forced(&v, self.opts.format, &origin)?;
                    self.opts.format
                };
                self.format = Some(f);
                f
            }
        };
        match parse_row(&v, format, &origin, self.opts.assume_safe) {
            Ok(p) => {
                self.pairs.push(p);
                if self.opts.limit.is_some_and(|l| self.pairs.len() >= l) {
                    self.done = true;
                }
                Ok(())
            }
            Err(RowError::Bad(b)) => self.bad(origin, b),
            Err(RowError::Fatal(e)) => Err(e),
        }
    }
}

fn head_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned()
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const PARQUET_MAGIC: &[u8] = b"PAR1";

/// Loads preference pairs from a file (see the module documentation).
pub fn load_pairs(path: &Path, opts: &LoadOptions) -> Result<LoadedPairs, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 8];
    let n = {
        let mut f = File::open(path).map_err(io)?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]).map_err(io)? {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    let head = &head[..n];
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ext_claim = |ext: &str, magic: &[u8], what: &'static str| -> Result<(), LoadError> {
        if name.ends_with(ext) && !head.starts_with(magic) {
            Err(LoadError::WrongMagic {
                path: path.to_path_buf(),
                extension: ext.to_string(),
                expected: what,
                head: head_string(head),
            })
        } else {
            Ok(())
        }
    };
    ext_claim(".gz", GZIP_MAGIC, "gzip")?;
    ext_claim(".xz", XZ_MAGIC, "xz")?;
    ext_claim(".parquet", PARQUET_MAGIC, "Parquet (PAR1)")?;

    let mut sink = Sink {
        opts,
        path,
        file: Arc::from(path.display().to_string()),
        format: None,
        pairs: Vec::new(),
        rows_read: 0,
        skipped: BTreeMap::new(),
        examples: Vec::new(),
        first_reason: None,
        done: false,
    };
    let (container, compression) = if head.starts_with(PARQUET_MAGIC) {
        read_parquet(path, &mut sink)?;
        (Container::Parquet, Compression::None)
    } else {
        let file = File::open(path).map_err(io)?;
        let (reader, compression): (Box<dyn Read>, Compression) = if head.starts_with(GZIP_MAGIC) {
            (
                Box::new(flate2::read::MultiGzDecoder::new(file)),
                Compression::Gzip,
            )
        } else if head.starts_with(XZ_MAGIC) {
            (
                Box::new(xz2::read::XzDecoder::new_multi_decoder(file)),
                Compression::Xz,
            )
        } else {
            (Box::new(file), Compression::None)
        };
        let container = read_json(BufReader::new(reader), compression, &mut sink)?;
        (container, compression)
    };
    finish_load(sink, container, compression)
}

fn finish_load(
    sink: Sink<'_>,
    container: Container,
    compression: Compression,
) -> Result<LoadedPairs, LoadError> {
    if sink.rows_read == 0 {
        return Err(LoadError::Empty {
            path: sink.path.to_path_buf(),
        });
    }
    if sink.pairs.is_empty() {
        return Err(LoadError::NoValidRows {
            path: sink.path.to_path_buf(),
            rows_read: sink.rows_read,
            first_reason: sink.first_reason.unwrap_or_default(),
        });
    }
    let report = LoadReport {
        path: sink.path.to_path_buf(),
        format: sink.format.unwrap_or(sink.opts.format),
        container,
        compression,
        rows_read: sink.rows_read,
        pairs_loaded: sink.pairs.len(),
        skipped_by_reason: sink.skipped,
        examples: sink.examples,
        truncated_by_limit: sink.done,
        safety: SafetyMix::of(&sink.pairs),
    };
    Ok(LoadedPairs {
        pairs: sink.pairs,
        report,
    })
}

fn read_json(
    mut r: impl BufRead,
    compression: Compression,
    sink: &mut Sink<'_>,
) -> Result<Container, LoadError> {
    let path = sink.path.to_path_buf();
    let read_err = |line, source| LoadError::Read {
        path: path.clone(),
        line,
        compression,
        source,
    };
    // Peek at the first non-blank byte (after an optional UTF-8 BOM).
    let mut buf = Vec::new();
    let mut line = 0usize;
    let first = loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| read_err(line + 1, e))?;
        if n == 0 {
            return Ok(Container::JsonLines); // empty: reported by finish_load
        }
        line += 1;
        if line == 1 && buf.starts_with(&[0xef, 0xbb, 0xbf]) {
            buf.drain(..3);
        }
        if let Some(&b) = buf.iter().find(|b| !b.is_ascii_whitespace()) {
            break b;
        }
    };
    if first == b'[' {
        let mut all = std::mem::take(&mut buf);
        r.read_to_end(&mut all).map_err(|e| read_err(line, e))?;
        let text = String::from_utf8(all).map_err(|e| LoadError::Json {
            path: path.clone(),
            line: line + count_lines(&e.as_bytes()[..e.utf8_error().valid_up_to()]),
            message: "invalid UTF-8".into(),
        })?;
        read_json_array(&text, line, sink)?;
        return Ok(Container::JsonArray);
    }
    loop {
        let text = String::from_utf8_lossy(&buf);
        let t = text.trim();
        if !t.is_empty() {
            if std::str::from_utf8(&buf).is_err() {
                sink.rows_read += 1;
                let origin = sink.origin(line);
                sink.bad(origin, BadRow::new("", "invalid UTF-8", ""))?;
            } else {
                sink.text_row(line, t)?;
            }
            if sink.done {
                break;
            }
        }
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| read_err(line + 1, e))?;
        if n == 0 {
            break;
        }
        line += 1;
    }
    Ok(Container::JsonLines)
}

fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// Splits a top-level JSON array into its elements' text (with the line each starts on) and
/// feeds them to the sink one by one, so one malformed element is one bad row.
fn read_json_array(text: &str, first_line: usize, sink: &mut Sink<'_>) -> Result<(), LoadError> {
    let err = |line, message: &str| LoadError::Json {
        path: sink.path.to_path_buf(),
        line,
        message: message.to_string(),
    };
    let bytes = text.as_bytes();
    let mut line = first_line;
    let mut i = bytes
        .iter()
        .position(|&b| b == b'[')
        .expect("caller saw '['")
        + 1;
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    let mut start: Option<(usize, usize)> = None; // (byte, line) of the current element
    let mut closed = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                start.get_or_insert((i, line));
            }
            b'{' | b'[' => {
                depth += 1;
                start.get_or_insert((i, line));
            }
            b'}' | b']' if depth > 0 => depth -= 1,
            b',' | b']' if depth == 0 => {
                match start.take() {
                    Some((s, l)) => sink.text_row(l, text[s..i].trim())?,
                    None if b == b',' => {
                        sink.rows_read += 1;
                        let origin = sink.origin(line);
                        sink.bad(
                            origin,
                            BadRow::new("", "invalid JSON", "empty array element"),
                        )?;
                    }
                    None => {}
                }
                if sink.done {
                    return Ok(());
                }
                if b == b']' {
                    closed = true;
                    i += 1;
                    break;
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => {
                start.get_or_insert((i, line));
            }
        }
        i += 1;
    }
    if !closed {
        return Err(err(
            line,
            "unterminated JSON array (missing `]`); the file may be truncated",
        ));
    }
    if let Some(off) = bytes[i..].iter().position(|b| !b.is_ascii_whitespace()) {
        let l = line + count_lines(&bytes[i..i + off]);
        return Err(err(
            l,
            "unexpected content after the closing `]` of the JSON array",
        ));
    }
    Ok(())
}

/// Converts a Parquet record field to JSON (strings as strings, lists as arrays, groups as
/// objects; binary that is valid UTF-8 as a string).
fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => Value::from(*n),
        F::Short(n) => Value::from(*n),
        F::Int(n) => Value::from(*n),
        F::Long(n) => Value::from(*n),
        F::UByte(n) => Value::from(*n),
        F::UShort(n) => Value::from(*n),
        F::UInt(n) => Value::from(*n),
        F::ULong(n) => Value::from(*n),
        F::Float16(x) => Value::from(f64::from(*x)),
        F::Float(x) => Value::from(f64::from(*x)),
        F::Double(x) => Value::from(*x),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(format!("<{} bytes of binary>", b.len())),
        },
        F::Group(row) => row_to_json(row),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_to_json).collect()),
        F::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        other => Value::String(other.to_string()),
    }
}

fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(k, v)| (k.clone(), field_to_json(v)))
            .collect(),
    )
}

fn read_parquet(path: &Path, sink: &mut Sink<'_>) -> Result<(), LoadError> {
    use parquet::file::reader::SerializedFileReader;
    let perr = |row, message: String| LoadError::Parquet {
        path: path.to_path_buf(),
        row,
        message,
    };
    let file = File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| perr(None, e.to_string()))?;
    // The record API panics (`unimplemented!`) on a few exotic column types; turn that into an
    // error instead of taking the process down.
    let mut iter = reader.into_iter();
    let mut row_no = 0usize;
    loop {
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| iter.next()));
        let item = match next {
            Ok(None) => break,
            Ok(Some(item)) => item,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unsupported column type".into());
                return Err(perr(Some(row_no + 1), msg));
            }
        };
        row_no += 1;
        let row = item.map_err(|e| perr(Some(row_no), e.to_string()))?;
        sink.rows_read += 1;
        let origin = sink.origin(row_no);
        sink.value_row(origin, row_to_json(&row))?;
        if sink.done {
            break;
        }
    }
    Ok(())
}

/// Loads several files with the same options and concatenates their pairs (reports kept per
/// file).
pub fn load_many(
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(Vec<Pair>, Vec<LoadReport>), LoadError> {
    let mut pairs = Vec::new();
    let mut reports = Vec::new();
    for p in paths {
        let mut o = opts.clone();
        if let Some(l) = opts.limit {
            o.limit = Some(l.saturating_sub(pairs.len()));
            if o.limit == Some(0) {
                break;
            }
        }
        let lp = load_pairs(p, &o)?;
        pairs.extend(lp.pairs);
        reports.push(lp.report);
    }
    Ok((pairs, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_cuts_at_word_boundary() {
        let (p, c, r) = split_common_prefix("The sky is blue.", "The sky is green.");
        assert_eq!(
            (p.as_str(), c.as_str(), r.as_str()),
            ("The sky is ", "blue.", "green.")
        );
        let (p, c, r) = split_common_prefix("Say hello there", "Say help me");
        assert_eq!(
            (p.as_str(), c.as_str(), r.as_str()),
            ("Say ", "hello there", "help me")
        );
        let (p, _, _) = split_common_prefix("abc", "xyz");
        assert_eq!(p, "");
    }

    #[test]
    fn hh_transcript_split() {
        let t =
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks";
        let (turns, reply) = split_hh("chosen", t).unwrap();
        assert_eq!(reply, "fine, thanks");
        assert_eq!(
            turns,
            vec![
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "hello"),
                ChatMessage::new("user", "how are you?"),
            ]
        );
        assert!(split_hh("chosen", "\n\nHuman: only a question").is_err());
        assert!(split_hh("chosen", "no markers at all").is_err());
    }
}
