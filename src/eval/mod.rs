//! Evaluation: is the tuned model safer, and what did helpfulness pay?
//!
//! - [`judge`]: the [`Judge`] trait, the rule-based [`RefusalJudge`] and GGUF judges
//!   ([`ModelJudge`], Llama Guard 3 or yes/no format, read by log-probabilities).
//! - [`prompts`]: prompt sets (vendored HarmBench and Do-Not-Answer, the built-in benign set,
//!   any JSONL of prompts).
//! - [`stats`]: rates with Wilson intervals, means with normal intervals.
//! - [`helpful`]: ranking accuracy on held-out pairs, log-prob drift and KL against the base,
//!   multiple-choice accuracy.
//! - [`run`]: [`run_eval`], the whole evaluation (base and each adapter side by side).
//! - [`report`]: `report.json`, `report.md`, `samples.jsonl`, `samples.md`, `eval.svg`.
//! - [`validate`]: human refusal labels (PyRIT's, vendored) and a judge's agreement, precision
//!   and recall on them.
//!
//! The library never prints; progress is reported through a callback.

pub mod helpful;
pub mod judge;
pub mod prompts;
pub mod report;
pub mod run;
pub mod stats;
pub mod validate;

pub use judge::{
    Judge, JudgeFormat, ModelJudge, ObjectiveRefusalJudge, REFUSAL_PHRASES, REFUSAL_PREFIXES,
    RefusalJudge, Verdict,
};
pub use prompts::{EvalPrompt, PromptSet, PromptSource, load_prompt_set, parse_prompts};
pub use report::{Written, write_outputs};
pub use run::{
    EvalEvent, EvalOptions, EvalOutput, EvalReport, JudgeSpec, ModelReport, Phase, Sample, run_eval,
};
pub use stats::{Figure, wilson};

use crate::runtime::RuntimeError;
use std::path::PathBuf;

/// Everything that stops an evaluation; messages name the file, line or option.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    // The underlying errors are part of the message (not `#[source]`), so `anyhow`'s `{:#}`
    // does not print them twice.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "prompt set {name} has no usable prompts ({rows} rows read, {skipped} skipped{first_skip}); each line needs a JSON object with a non-empty \"prompt\" string"
    )]
    EmptyPromptSet {
        name: String,
        rows: usize,
        skipped: usize,
        first_skip: String,
    },
    #[error("judge model {path} cannot be used as a judge: {detail}")]
    JudgeNotChat { path: PathBuf, detail: String },
    #[error("{what}: {error}")]
    Runtime { what: String, error: RuntimeError },
    #[error("invalid --{name} {value}: expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Other(String),
}
