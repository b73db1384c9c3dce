//! A training run as a job: [`TuneJob::from_config`] → [`TuneJob::prepare`] →
//! [`PreparedTune::train`] → [`PreparedTune::finish`].

use super::data::{DataSpec, load_and_encode, longest_sequence};
use super::engine::{adam_config, build_engine, lora_spec};
use super::harmless::{self, HarmlessPoint};
use super::model::{OpenModel, open_model};
use super::{Cancel, Event, Observer, RunError, io_err};
use crate::cpu::engine::HostPlan;
use crate::data::refcache::RefCache;
use crate::eval::EvalOptions;
use crate::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use crate::gpu::memory::{self, Plan, PlanInput};
use crate::loss::Loss;
use crate::model::lora::{LoraSpec, LoraWeights};
use crate::runtime::LoadOptions as RtLoadOptions;
use crate::train::checkpoint::{ADAPTER_FILE, Checkpoint};
use crate::train::config::{EngineKind, PairOrder, TrainConfig};
use crate::train::metrics::{
    MetricsWriter, StepMetrics, curves_svg_with_harmless, read_metrics, truncate_after,
};
use crate::train::prepare::{self, PrepareReport, RefSource};
use crate::train::trainer::{
    self, CheckpointSink, Engine, RankingEval, RecentTrain, TrainData, TrainOutcome, check_resume,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run reports at the end; written to OUT/summary.json.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub model: String,
    pub engine: String,
    pub config: TrainConfig,
    pub data: PrepareReport,
    pub eval_pairs: usize,
    pub buffer_pairs: usize,
    pub reference: Vec<RefSource>,
    pub plan_total_bytes: u64,
    pub steps: usize,
    pub interrupted: bool,
    pub skipped_steps: usize,
    pub tokens: u64,
    pub train_seconds: f64,
    pub total_seconds: f64,
    pub tokens_per_second: f64,
    pub final_train: Option<StepMetrics>,
    /// Loss and BFPO-ranking accuracy over the last steps (what the demo's last line reports).
    pub recent_train: Option<RecentTrain>,
    pub final_eval: Option<StepMetrics>,
    pub heldout_before: Option<RankingEval>,
    pub heldout_after: Option<RankingEval>,
    pub adapter: String,
    /// Harmless rate of generated answers (`--eval-harmful`): the base model at step 0, the
    /// adapter at `--eval-harmful-every` steps and at the end, in step order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub harmless: Vec<HarmlessPoint>,
    /// Where the GPU time went (`TuneJob::profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::gpu::profile::ProfileReport>,
}

/// What `tune --dry-run` reports: the plan and the data, without touching a device.
#[derive(Clone, Debug, Serialize)]
pub struct DryRun {
    /// The wgpu engine's device memory.
    pub plan: Plan,
    /// The CPU engine's host memory (engine `cpu` or `auto`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_plan: Option<HostPlan>,
    pub data: PrepareReport,
    pub train_pairs: usize,
    pub eval_pairs: usize,
}

/// A training run, configured and not yet started.
pub struct TuneJob {
    cfg: TrainConfig,
    resume: Option<PathBuf>,
    assume_safe: bool,
    adapter_type: AdapterDType,
    force: bool,
    profile: bool,
    cancel: Cancel,
    started: Instant,
}

/// Model, data and plan of a run (no device touched yet).
struct Loaded {
    model: OpenModel,
    data: TrainData,
    report: PrepareReport,
    spec: LoraSpec,
    plan: Plan,
    host_plan: Option<HostPlan>,
    harmless: Option<EvalOptions>,
}

impl TuneJob {
    /// Checks the settings (nothing is opened or written yet).
    pub fn from_config(cfg: TrainConfig) -> Result<TuneJob, RunError> {
        cfg.validate()?;
        if cfg.model.is_none() {
            return Err(RunError::NoModel);
        }
        if cfg.data.is_empty() {
            return Err(RunError::NoData);
        }
        super::data::parse_format(&cfg.format)?;
        Loss::parse(&cfg.loss)?;
        Ok(TuneJob {
            cfg,
            resume: None,
            assume_safe: false,
            adapter_type: AdapterDType::F32,
            force: false,
            profile: false,
            cancel: Cancel::new(),
            started: Instant::now(),
        })
    }

    /// Continue from a checkpoint folder (OUT/checkpoint).
    pub fn resume(mut self, checkpoint: Option<PathBuf>) -> Self {
        self.resume = checkpoint;
        self
    }

    /// Label both responses of rows without safety labels safe (`--assume-safe`).
    pub fn assume_safe(mut self, yes: bool) -> Self {
        self.assume_safe = yes;
        self
    }

    /// Tensor type of the written adapter (f32 by default).
    pub fn adapter_type(mut self, t: AdapterDType) -> Self {
        self.adapter_type = t;
        self
    }

    /// Overwrite a finished run in the output folder.
    pub fn force(mut self, yes: bool) -> Self {
        self.force = yes;
        self
    }

    /// Time every GPU operation (this serialises the work) and report, per phase and kernel
    /// family, where the time went: in [`Summary::profile`] and OUT/profile.json.
    pub fn profile(mut self, yes: bool) -> Self {
        self.profile = yes;
        self
    }

    /// Use `cancel` (e.g. set by a Ctrl-C handler) instead of the job's own token.
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// The token that stops this run.
    pub fn cancel_token(&self) -> Cancel {
        self.cancel.clone()
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    fn model_path(&self) -> &Path {
        self.cfg.model.as_deref().unwrap_or(Path::new(""))
    }

    fn check_cancel(&self) -> Result<(), RunError> {
        if self.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        Ok(())
    }

    /// Opens the model, loads and encodes the data and plans device memory.
    fn load(&self, obs: &mut dyn Observer) -> Result<Loaded, RunError> {
        let cfg = &self.cfg;
        // The harmful prompts are read (and the judge found) before anything else.
        let harmless = harmless::check(cfg, self.model_path())?;
        std::fs::create_dir_all(&cfg.out).map_err(io_err("creating", &cfg.out))?;
        let mut model = open_model(
            self.model_path(),
            &RtLoadOptions::default(),
            self.cfg.chat_template.as_deref(),
            self.cfg.enable_thinking,
            obs,
        )?;
        self.check_cancel()?;
        let spec = DataSpec::from_config(cfg, self.assume_safe)?;
        let rt = model.runtime().ok_or(RunError::NoModel)?;
        let (data, report) = load_and_encode(rt, &spec, obs)?;
        model.release_runtime();
        self.check_cancel()?;
        let lora = lora_spec(cfg, &model.config)?;
        let plan = plan_memory(cfg, &model, &data, &lora)?;
        obs.event(&Event::Plan {
            total_bytes: plan.total,
            weights_bytes: plan.item("weights").unwrap_or(0),
            largest_binding: plan.largest_binding.name.clone(),
            largest_binding_bytes: plan.largest_binding.bytes,
        });
        let host_plan = host_plan(cfg, &model, &plan, &data)?;
        if let Some(p) = &host_plan {
            obs.event(&Event::HostPlan { plan: p.clone() });
        }
        Ok(Loaded {
            model,
            data,
            report,
            host_plan,
            spec: lora,
            plan,
            harmless,
        })
    }

    /// Everything [`prepare`](TuneJob::prepare) does before touching a device: the data report
    /// and the memory plan.
    pub fn dry_run(&self, obs: &mut dyn Observer) -> Result<DryRun, RunError> {
        let l = self.load(obs)?;
        Ok(DryRun {
            train_pairs: l.data.train.len(),
            eval_pairs: l.data.eval.len(),
            plan: l.plan,
            host_plan: l.host_plan,
            data: l.report,
        })
    }

    /// Opens the model with its chat template, loads and encodes the data (reporting skipped
    /// rows and safety cases), plans memory, builds the engine and fills the reference
    /// log-probs (from the on-disk cache when it holds them).
    pub fn prepare(self, obs: &mut dyn Observer) -> Result<PreparedTune, RunError> {
        let cfg = &self.cfg;
        let existing = cfg.out.join(ADAPTER_FILE);
        if self.resume.is_none() && existing.exists() && !self.force {
            return Err(RunError::RunExists {
                out: cfg.out.clone(),
                adapter: existing,
            });
        }
        let l = self.load(obs)?;
        let lora = LoraWeights::init(&l.spec, &l.model.config)?;
        if self.profile {
            crate::gpu::profile::start();
        }
        let (mut engine, budget) = build_engine(
            cfg.engine,
            &l.model,
            lora,
            adam_config(cfg),
            cfg.device.as_deref(),
            Some(&l.plan),
            &cfg.activation_memory,
            cfg.threads,
            cfg.prompt_sharing,
        )?;
        obs.event(&Event::Engine {
            description: engine.describe(),
        });
        if let Some(budget_bytes) = budget {
            obs.event(&activations_event(&l.plan, &l.spec, budget_bytes));
        }
        self.check_cancel()?;
        let mut data = l.data;
        let (ref_sources, model_sha256) = self.fill_reference(engine.as_mut(), &mut data, obs)?;
        if cfg.pair_order == PairOrder::SafeFirst {
            for p in data.train.iter_mut().chain(&mut data.eval) {
                p.safe_first();
            }
        }
        let provenance = provenance(cfg, &l.model, model_sha256)?;
        Ok(PreparedTune {
            job: self,
            model: l.model,
            data,
            report: l.report,
            plan: l.plan,
            engine,
            ref_sources,
            provenance,
            outcome: None,
            train_seconds: 0.0,
            harmless: l.harmless,
            harmless_points: Vec::new(),
        })
    }

    /// Reference log-probs of every set, cached on disk, keyed by model, examples and settings.
    /// Returns their sources and the model's SHA-256 (hex).
    fn fill_reference(
        &self,
        engine: &mut dyn Engine,
        data: &mut TrainData,
        obs: &mut dyn Observer,
    ) -> Result<(Vec<RefSource>, String), RunError> {
        let cfg = &self.cfg;
        let cache_dir = cfg
            .cache_dir
            .clone()
            .unwrap_or_else(|| prepare::default_cache_dir(&cfg.out));
        let cache = if cfg.no_ref_cache {
            None
        } else {
            Some(RefCache::open(&cache_dir)?)
        };
        // The model's SHA-256 keys the cache and is recorded in the adapter's provenance.
        let fingerprint = match &cache {
            Some(c) => c.fingerprint(self.model_path())?,
            None => RefCache::open(&cache_dir)?.fingerprint(self.model_path())?,
        };
        let identity = fingerprint.identity();
        let sha: String = fingerprint
            .sha256
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let settings = format!("engine={};ref=adapter-off", engine.cache_identity());
        let batch = (4 * cfg.pairs_per_step).max(8);
        let mut sources = Vec::new();
        for (name, set) in [
            ("train", &mut data.train),
            ("held-out", &mut data.eval),
            ("buffer", &mut data.buffer),
        ] {
            self.check_cancel()?;
            let src = prepare::fill_reference(
                engine,
                cache.as_ref().map(|c| (c, identity.as_slice())),
                &format!("{settings};set={name}"),
                set,
                batch,
                &mut |e| {
                    if let trainer::Event::Reference { done, total } = e {
                        obs.event(&Event::Reference {
                            set: name.to_string(),
                            done,
                            total,
                        });
                    }
                },
            )?;
            if let RefSource::Cache(p) = &src {
                obs.event(&Event::ReferenceCached {
                    set: name.to_string(),
                    path: p.clone(),
                });
            }
            sources.push(src);
        }
        Ok((sources, sha))
    }
}

/// How many layers keep their intermediates at the plan's largest micro-step under `budget`
/// (the engine decides per micro-step with the same rule, so shorter batches may keep more):
/// of the layers the backward visits, from the lowest adapted one up.
fn activations_event(plan: &Plan, lora: &LoraSpec, budget_bytes: u64) -> Event {
    let lowest = lora
        .layers
        .iter()
        .copied()
        .min()
        .unwrap_or(plan.input.cfg.n_layer);
    let k = memory::kept_activations(&plan.input, lowest, budget_bytes);
    Event::Activations {
        budget_bytes,
        kept_layers: k.kept_layers,
        n_layer: k.visited_layers,
        kept_bytes: k.kept_bytes,
    }
}

/// Device memory of a run, before anything is allocated.
fn plan_memory(
    cfg: &TrainConfig,
    model: &OpenModel,
    data: &TrainData,
    lora: &LoraSpec,
) -> Result<Plan, RunError> {
    let mut input = PlanInput::new(
        model.config.clone(),
        model
            .file
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.n_bytes))
            .collect(),
    );
    input.max_len = longest_sequence(data);
    input.pairs_per_step = cfg.pairs_per_step
        + if data.buffer.is_empty() {
            0
        } else {
            ((cfg.pairs_per_step as f64) * cfg.buffer_ratio).round() as usize
        };
    input.rank = cfg.rank;
    input.targets = lora.targets.clone();
    input.lora_layers = lora.layers.len();
    Ok(memory::plan(&input)?)
}

/// The CPU engine's host-memory plan for engines `cpu` and `auto` (None for the others); an
/// explicit `--engine cpu` run whose longest micro-step cannot fit is refused here, before the
/// engine exists, with what to reduce.
fn host_plan(
    cfg: &TrainConfig,
    model: &OpenModel,
    plan: &Plan,
    data: &TrainData,
) -> Result<Option<HostPlan>, RunError> {
    if !matches!(cfg.engine, EngineKind::Cpu | EngineKind::Auto) {
        return Ok(None);
    }
    let per_step = cfg.pairs_per_step
        + if data.buffer.is_empty() {
            0
        } else {
            ((cfg.pairs_per_step as f64) * cfg.buffer_ratio).round() as usize
        };
    // `pairs_per_step` is per micro-step: gradient accumulation repeats it, never splits it.
    let rows = 2 * per_step * longest_sequence(data);
    let threads = cfg.threads.unwrap_or_else(crate::cpu::default_threads);
    let hp = HostPlan::new(
        &model.config,
        plan.item("weights").unwrap_or(0),
        rows,
        threads,
    );
    if cfg.engine == EngineKind::Cpu {
        hp.check().map_err(|e| {
            RunError::Train(crate::train::trainer::TrainError::Engine(e.to_string()))
        })?;
    }
    Ok(Some(hp))
}

/// The adapter's provenance: loss and its parameters, base model, data, training settings.
fn provenance(
    cfg: &TrainConfig,
    model: &OpenModel,
    model_sha256: String,
) -> Result<Provenance, RunError> {
    let loss = Loss::parse(&cfg.loss)?;
    let loss_params = match loss {
        Loss::Bfpo { tau, b1, alpha } => vec![("tau", tau), ("b1", b1), ("alpha", alpha)],
        Loss::Ipo { tau } => vec![("tau", tau)],
        Loss::Dpo {
            beta,
            label_smoothing,
        } => vec![("beta", beta), ("label_smoothing", label_smoothing)],
    };
    Ok(Provenance {
        loss: Some(loss.kind().name().to_string()),
        loss_params: loss_params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        base_model_sha256: Some(model_sha256),
        steps: None,
        base_model_name: Some(model.name()),
        datasets: cfg.data.iter().map(|p| p.display().to_string()).collect(),
        train_params: [
            ("learning_rate", cfg.learning_rate),
            ("rank", cfg.rank as f64),
            ("pairs_per_step", cfg.pairs_per_step as f64),
            ("grad_accum", cfg.grad_accum as f64),
            ("seed", cfg.seed as f64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    })
}

/// The harmlessness of the adapter as of `step`: written to a temporary GGUF adapter in `out`
/// (the same writer as the final adapter), evaluated with llama.cpp, then removed.
fn mid_run_harmless(
    opts: &EvalOptions,
    lora: &LoraWeights,
    mcfg: &crate::model::ModelConfig,
    prov: &Provenance,
    step: usize,
    out: &Path,
    obs: &mut dyn Observer,
) -> Result<Vec<HarmlessPoint>, RunError> {
    let tmp = out.join(format!(".adapter-step{step}.tmp.gguf"));
    write_adapter(&tmp, lora, mcfg, prov, AdapterDType::F32)?;
    let r = harmless::evaluate(opts, false, Some(&tmp), step, obs);
    let _ = std::fs::remove_file(&tmp);
    r
}

/// A run with its model, data, engine and reference log-probs ready.
pub struct PreparedTune {
    job: TuneJob,
    model: OpenModel,
    data: TrainData,
    report: PrepareReport,
    plan: Plan,
    engine: Box<dyn Engine>,
    ref_sources: Vec<RefSource>,
    provenance: Provenance,
    outcome: Option<TrainOutcome>,
    train_seconds: f64,
    harmless: Option<EvalOptions>,
    harmless_points: Vec<HarmlessPoint>,
}

impl PreparedTune {
    pub fn config(&self) -> &TrainConfig {
        &self.job.cfg
    }

    pub fn model(&self) -> &OpenModel {
        &self.model
    }

    pub fn data(&self) -> &TrainData {
        &self.data
    }

    pub fn report(&self) -> &PrepareReport {
        &self.report
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn engine(&mut self) -> &mut dyn Engine {
        self.engine.as_mut()
    }

    pub fn cancel_token(&self) -> Cancel {
        self.job.cancel.clone()
    }

    /// Optimizer steps the run will take.
    pub fn total_steps(&self) -> usize {
        trainer::total_steps(&self.job.cfg, self.data.train.len())
    }

    /// Runs the optimisation loop (resuming when asked), writing OUT/config.toml,
    /// OUT/metrics.jsonl and checkpoints. A cancelled run stops at the next step with a
    /// checkpoint and `interrupted` set.
    pub fn train(&mut self, obs: &mut dyn Observer) -> Result<&TrainOutcome, RunError> {
        let cfg = &self.job.cfg;
        let metrics_path = cfg.out.join("metrics.jsonl");
        let harmless_path = cfg.out.join(harmless::HARMLESS_FILE);
        let resume = match &self.job.resume {
            Some(dir) => {
                let ck = Checkpoint::load(dir)?;
                // Before anything of the run is rewritten (config.toml, metrics.jsonl).
                check_resume(cfg, &self.data, &ck)?;
                truncate_after(&metrics_path, ck.meta.step).map_err(|detail| {
                    RunError::Metrics {
                        path: metrics_path.clone(),
                        detail,
                    }
                })?;
                self.harmless_points = harmless::resume_points(&harmless_path, ck.meta.step)?;
                obs.event(&Event::Resumed {
                    checkpoint: dir.clone(),
                    step: ck.meta.step,
                });
                Some(ck)
            }
            None => {
                if metrics_path.exists() {
                    std::fs::remove_file(&metrics_path)
                        .map_err(io_err("removing", &metrics_path))?;
                }
                if harmless_path.exists() {
                    std::fs::remove_file(&harmless_path)
                        .map_err(io_err("removing", &harmless_path))?;
                }
                None
            }
        };
        let config_path = cfg.out.join("config.toml");
        std::fs::write(&config_path, cfg.to_toml()).map_err(io_err("writing", &config_path))?;
        let mut metrics =
            MetricsWriter::append(&metrics_path).map_err(io_err("opening", &metrics_path))?;
        obs.event(&Event::TrainingStarted {
            total_steps: self.total_steps(),
        });
        let (mcfg, dtype, prov) = (&self.model.config, self.job.adapter_type, &self.provenance);
        let mut write_extra = |dir: &Path, lora: &LoraWeights, step: usize| -> Result<(), String> {
            let p = Provenance {
                steps: Some(step as u64),
                ..prov.clone()
            };
            write_adapter(&dir.join(ADAPTER_FILE), lora, mcfg, &p, dtype).map_err(|e| e.to_string())
        };
        let mut sink = CheckpointSink {
            dir: cfg.out.join("checkpoint"),
            write_extra: &mut write_extra,
        };
        let mut write_err: Option<std::io::Error> = None;
        let mut eval_err: Option<RunError> = None;
        let (harmless_opts, harmless_points) = (&self.harmless, &mut self.harmless_points);
        let t_train = Instant::now();
        let outcome = trainer::train(
            self.engine.as_mut(),
            cfg,
            &self.data,
            resume,
            self.job.cancel.flag(),
            &mut sink,
            &mut |e| {
                let ev = match e {
                    trainer::Event::Step(m) => {
                        if let Err(err) = metrics.write(&m) {
                            write_err.get_or_insert(err);
                        }
                        Event::Step(m)
                    }
                    trainer::Event::Eval(m) => {
                        if let Err(err) = metrics.write(&m) {
                            write_err.get_or_insert(err);
                        }
                        Event::Eval(m)
                    }
                    trainer::Event::SkippedStep { step, reason } => {
                        Event::StepSkipped { step, reason }
                    }
                    trainer::Event::Checkpoint { step, dir } => {
                        Event::CheckpointWritten { step, dir }
                    }
                    trainer::Event::Reference { done, total } => Event::Reference {
                        set: "train".into(),
                        done,
                        total,
                    },
                    trainer::Event::Adapter { step, lora } => {
                        if let (Some(opts), None) = (harmless_opts, &eval_err) {
                            let p = Provenance {
                                steps: Some(step as u64),
                                ..prov.clone()
                            };
                            match mid_run_harmless(opts, &lora, mcfg, &p, step, &cfg.out, obs)
                                .and_then(|pts| {
                                    harmless::append(&harmless_path, &pts)?;
                                    Ok(pts)
                                }) {
                                Ok(pts) => harmless_points.extend(pts),
                                Err(e) => eval_err = Some(e),
                            }
                        }
                        return;
                    }
                };
                obs.event(&ev);
            },
        )?;
        if let Some(e) = eval_err {
            return Err(e);
        }
        if let Some(source) = write_err {
            return Err(RunError::Io {
                what: "writing",
                path: metrics_path,
                source,
            });
        }
        self.train_seconds = t_train.elapsed().as_secs_f64();
        Ok(self.outcome.insert(outcome))
    }

    /// Writes OUT/adapter.gguf (the engine's adapter now), OUT/curves.svg and
    /// OUT/summary.json, emits [`Event::Done`] and returns the summary.
    pub fn finish(mut self, obs: &mut dyn Observer) -> Result<Summary, RunError> {
        let cfg = &self.job.cfg;
        let outcome = self.outcome.take().unwrap_or(TrainOutcome {
            steps: 0,
            interrupted: false,
            skipped_steps: 0,
            final_train: None,
            recent_train: None,
            final_eval: None,
            eval_before: None,
            eval_after: None,
            tokens: 0,
            seconds: 0.0,
        });
        let adapter_path = cfg.out.join(ADAPTER_FILE);
        let lora = self.engine.lora()?;
        write_adapter(
            &adapter_path,
            &lora,
            &self.model.config,
            &Provenance {
                steps: Some(outcome.steps as u64),
                ..self.provenance.clone()
            },
            self.job.adapter_type,
        )?;
        if let Some(opts) = &self.harmless {
            let pts = harmless::evaluate(opts, true, Some(&adapter_path), outcome.steps, obs)?;
            // The final adapter replaces a mid-run point at the same step (an interrupted run).
            self.harmless_points
                .retain(|p| p.model == "adapter" && p.step != outcome.steps);
            self.harmless_points.extend(pts);
            self.harmless_points.sort_by_key(|p| p.step);
            let path = cfg.out.join(harmless::HARMLESS_FILE);
            if path.exists() {
                std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
            }
            harmless::append(&path, &self.harmless_points)?;
        }
        let metrics_path = cfg.out.join("metrics.jsonl");
        let records = read_metrics(&metrics_path).map_err(|detail| RunError::Metrics {
            path: metrics_path.clone(),
            detail,
        })?;
        let curves = cfg.out.join("curves.svg");
        let title = format!("bfpo-lite: {} on {}", cfg.loss, self.model.path.display());
        let marks: Vec<_> = self
            .harmless_points
            .iter()
            .map(HarmlessPoint::mark)
            .collect();
        std::fs::write(&curves, curves_svg_with_harmless(&records, &title, &marks))
            .map_err(io_err("writing", &curves))?;
        let train_seconds = self.train_seconds;
        let summary = Summary {
            model: self.model.path.display().to_string(),
            engine: self.engine.describe(),
            config: cfg.clone(),
            data: self.report,
            eval_pairs: self.data.eval.len(),
            buffer_pairs: self.data.buffer.len(),
            reference: self.ref_sources,
            plan_total_bytes: self.plan.total,
            steps: outcome.steps,
            interrupted: outcome.interrupted,
            skipped_steps: outcome.skipped_steps,
            tokens: outcome.tokens,
            train_seconds,
            total_seconds: self.job.started.elapsed().as_secs_f64(),
            tokens_per_second: outcome.tokens as f64 / train_seconds.max(1e-9),
            final_train: outcome.final_train,
            recent_train: outcome.recent_train,
            final_eval: outcome.final_eval,
            heldout_before: outcome.eval_before,
            heldout_after: outcome.eval_after,
            adapter: adapter_path.display().to_string(),
            harmless: std::mem::take(&mut self.harmless_points),
            profile: crate::gpu::profile::take(),
        };
        if let Some(p) = &summary.profile {
            let path = cfg.out.join("profile.json");
            let json = serde_json::to_string_pretty(p).unwrap_or_default();
            std::fs::write(&path, json).map_err(io_err("writing", &path))?;
        }
        let path = cfg.out.join("summary.json");
        let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
        std::fs::write(&path, json).map_err(io_err("writing", &path))?;
        obs.event(&Event::Done(Box::new(summary.clone())));
        Ok(summary)
    }
}
