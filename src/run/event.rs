//! The one progress enum of a run, and the observer that receives it.

pub use super::harmless::HarmlessPoint;
use super::tune::Summary;
use crate::train::metrics::StepMetrics;
pub use crate::train::prepare::SafetyCases;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Receives a run's events (the CLI draws bars or prints JSON lines; a GUI could do anything).
/// Any `FnMut(&Event)` closure is an observer.
pub trait Observer {
    fn event(&mut self, e: &Event);
}

impl<F: FnMut(&Event)> Observer for F {
    fn event(&mut self, e: &Event) {
        self(e)
    }
}

/// Where rows were skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipStage {
    /// Reading the dataset file (bad JSON, missing fields, …).
    Load,
    /// Chat-templating and tokenizing a loaded pair.
    Encode,
}

/// The data of a run after loading and encoding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataLoaded {
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub buffer_pairs: usize,
    /// Rows skipped for any reason (loading or encoding).
    pub rows_skipped: usize,
    /// Longest sequence (prompt + response) in tokens.
    pub longest_sequence: usize,
    pub safety: SafetyCases,
}

/// Progress of a run. Serialized with an `"event"` tag: `{"event": "step", "loss": …}`.
/// New variants may be added (eval, red-team progress): match with a `_` arm.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The model was opened; `chat_template` is the template the data is rendered with.
    ModelOpened {
        path: PathBuf,
        arch: String,
        n_layer: usize,
        chat_template: String,
        /// A fallback renders the conversations (ChatML: no template; llama.cpp's guess: a template
        /// minijinja cannot render).
        template_fallback: bool,
    },
    /// Rows of one file (or pairs, while encoding) were skipped, by reason, with examples.
    RowsSkipped {
        stage: SkipStage,
        /// The dataset file (None for encoding, which spans files: the examples name them).
        file: Option<PathBuf>,
        by_reason: BTreeMap<String, usize>,
        examples: Vec<String>,
    },
    /// Prompts or responses were cut to the length limits.
    Truncated {
        prompts: usize,
        responses: usize,
        max_length: usize,
        max_prompt_length: usize,
    },
    /// Data loaded and encoded.
    DataLoaded(DataLoaded),
    /// Something the user should know that does not stop the run.
    Warning { message: String },
    /// The wgpu engine's device-memory plan (before anything is allocated).
    Plan {
        total_bytes: u64,
        weights_bytes: u64,
        largest_binding: String,
        largest_binding_bytes: u64,
    },
    /// The CPU engine's host-memory plan (before anything is allocated): shown when the engine
    /// is `cpu` or `auto` (which picks the CPU engine on hosts without a usable GPU).
    HostPlan { plan: crate::cpu::engine::HostPlan },
    /// The training engine is ready.
    Engine { description: String },
    /// How the GPU engine holds activations between forward and backward: `kept_layers` of the
    /// `n_layer` layers the backward goes through (from the lowest adapted layer up) keep their
    /// intermediates (`kept_bytes` at the longest micro-step, within `budget_bytes`); the others
    /// are recomputed in the backward.
    Activations {
        budget_bytes: u64,
        kept_layers: usize,
        n_layer: usize,
        kept_bytes: u64,
    },
    /// Reference log-probs of a set: `done` of `total` sequences scored.
    Reference {
        set: String,
        done: usize,
        total: usize,
    },
    /// Reference log-probs of a set reused from the on-disk cache.
    ReferenceCached { set: String, path: PathBuf },
    /// Training continues from a checkpoint.
    Resumed { checkpoint: PathBuf, step: usize },
    /// The optimisation loop starts.
    TrainingStarted { total_steps: usize },
    /// One optimizer step (the metrics also written to metrics.jsonl).
    Step(StepMetrics),
    /// A held-out evaluation.
    Eval(StepMetrics),
    /// A step was skipped (e.g. a non-finite gradient).
    StepSkipped { step: usize, reason: String },
    /// A checkpoint was written.
    CheckpointWritten { step: usize, dir: PathBuf },
    /// Harmlessness evaluation (`--eval-harmful`): `done` of `total` answers of `model` (`base` or
    /// `adapter`) as of `step` generated or judged.
    HarmlessProgress {
        step: usize,
        model: String,
        done: usize,
        total: usize,
    },
    /// The harmless rate of one model (the base at step 0, the adapter at a step), as `eval`
    /// measures it; also recorded in summary.json and curves.svg.
    Harmless(HarmlessPoint),
    /// The run finished (or was interrupted) and its outputs are written; the summary is also in
    /// OUT/summary.json.
    Done(Box<Summary>),
}
