//! A whole job as library calls, shared by the `tune` command (and `plan` and `score`, for the
//! engine and device), the demo and any program that embeds bfpo-lite. The `eval` and `redteam`
//! commands are library calls of their own (`eval::run_eval`, `redteam::run`); a training run
//! uses eval's generation and judges for `tune --eval-harmful` ([`harmless`]).
//!
//! A training run is three calls on a [`TuneJob`]:
//!
//! ```text
//! TuneJob::from_config(cfg)?      settings checked, nothing opened
//!   .prepare(&mut observer)?      model + chat template, data (loaded, encoded, reported),
//!                                 memory plan, engine, reference log-probs (cached on disk)
//!   .train(&mut observer)?        the optimisation loop (checkpoints, metrics.jsonl)
//!   .finish(&mut observer)?       adapter.gguf, curves.svg, summary.json -> Summary
//! ```
//!
//! Progress is one [`Event`] enum given to an [`Observer`]; the library never prints. Events
//! serialize to JSON (`tune --json` prints one per line). A [`Cancel`] token (Ctrl-C in the CLI)
//! stops preparation between stages and training at the next step, with a checkpoint.
//!
//! The pieces are public on their own: [`model::open_model`] (a model with its chat template),
//! [`data`] (load and encode pairs with a report), [`engine`] (choose and build a training
//! engine), and [`demo`] (the built-in demo's model and data).

pub mod card;
pub mod data;
pub mod demo;
pub mod engine;
pub mod event;
pub mod harmless;
pub mod model;
pub mod tune;

pub use event::{DataLoaded, Event, Observer, SafetyCases, SkipStage};
pub use harmless::HarmlessPoint;
pub use model::{OpenModel, open_model};
pub use tune::{DryRun, PreparedTune, Summary, TuneJob};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cancellation token: cloneable, set from any thread (a Ctrl-C handler), honoured by the run
/// between preparation stages and at every training step.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the run to stop; returns whether it had already been asked.
    pub fn cancel(&self) -> bool {
        self.0.swap(true, Ordering::SeqCst)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself (what [`crate::train::trainer::train`] polls).
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }
}

/// Errors of a run. Each names the file or setting involved; the CLI adds a hint.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "no model: pass --model MODEL.gguf (or run `bfpo-lite tune` with no arguments for the demo)"
    )]
    NoModel,
    #[error(
        "no training data: pass --data FILE (PKU-SafeRLHF rows, BFPO red-team JSON, or prompt/chosen/rejected rows with safety labels)"
    )]
    NoData,
    #[error(
        "{out} already holds a finished run ({adapter}); use --force to overwrite, --resume {out}/checkpoint to continue, or another --out"
    )]
    RunExists { out: PathBuf, adapter: PathBuf },
    #[error("reading {path}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: crate::gguf::GgufError,
    },
    #[error("{path} cannot be trained")]
    Model {
        path: PathBuf,
        #[source]
        source: crate::model::ModelError,
    },
    #[error("loading {path} in llama.cpp")]
    Runtime {
        path: PathBuf,
        #[source]
        source: crate::runtime::RuntimeError,
    },
    #[error("--chat-template {spec}")]
    ChatTemplate {
        spec: String,
        #[source]
        source: crate::template::TemplateError,
    },
    #[error(
        "unknown dataset format {0:?}; use auto, pku, redteam, generic, trl, ultrafeedback or hh"
    )]
    Format(String),
    #[error("adapter type {0:?}: use f32 or f16")]
    OutType(String),
    #[error(transparent)]
    Prepare(#[from] crate::train::prepare::PrepareError),
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
    #[error(transparent)]
    Plan(#[from] crate::gpu::memory::PlanError),
    #[error("this run does not fit the GPU's limits")]
    DoesNotFit(#[source] crate::gpu::memory::PlanError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Reference(#[from] crate::model::reference::RefError),
    #[error(transparent)]
    Train(#[from] crate::train::trainer::TrainError),
    #[error(transparent)]
    Config(#[from] crate::train::config::ConfigError),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error(transparent)]
    Cache(#[from] crate::data::refcache::CacheError),
    #[error(transparent)]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error("writing the demo model {path}")]
    Demo {
        path: PathBuf,
        #[source]
        source: crate::model::init::InitError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Metrics { path: PathBuf, detail: String },
    #[error("--eval-harmful: {0}")]
    Eval(#[from] crate::eval::EvalError),
    #[error("cancelled before training started")]
    Cancelled,
}

/// `Io` errors with the file named.
pub(crate) fn io_err(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> RunError {
    let path = path.to_path_buf();
    move |source| RunError::Io { what, path, source }
}
