//! The training loop. The loss lives on the CPU: an [`Engine`] returns per-sequence summed
//! log-probs and takes back one weight per sequence (∂loss/∂logp); gradients of the LoRA
//! parameters accumulate on the engine's side over micro-steps, then one optimiser step runs.
//!
//! Data order is a pure function of (seed, epoch), so a run resumed from a checkpoint replays
//! exactly the batches an uninterrupted run would have seen.

use crate::data::Example;
use crate::data::RowOrigin;
use crate::data::SafetyCase;
use crate::gpu::ops::dropout::Dropout;
use crate::loss::{Loss, PairInput, PairLogps};
use crate::model::lora::LoraWeights;
use crate::train::checkpoint::Checkpoint;
use crate::train::config::{ScheduleKind, TrainConfig};
use crate::train::metrics::{PairObservation, PairStats, StepMetrics};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Engine(String),
    #[error(
        "{count} optimiser steps in a row had a non-finite loss or gradient (last at step {step}: {detail}); lower the learning rate or check the data"
    )]
    TooManyBadSteps {
        count: usize,
        step: usize,
        detail: String,
    },
    #[error("no training pairs left after loading and truncation ({detail})")]
    NoData { detail: String },
    #[error("checkpoint does not match this run: {0}")]
    Resume(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),
}

/// A tokenized preference pair ready for training.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedPair {
    pub chosen: Example,
    pub rejected: Example,
    pub chosen_safe: bool,
    pub rejected_safe: bool,
    pub origin: RowOrigin,
    /// Reference (adapter-off) summed log-probs of chosen and rejected, once computed.
    pub ref_logps: Option<(f64, f64)>,
}

impl PreparedPair {
    pub fn case(&self) -> SafetyCase {
        SafetyCase::of(self.chosen_safe, self.rejected_safe)
    }
    fn len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }

    /// Puts the safe side first (`chosen`) when exactly the rejected side is safe, swapping the
    /// responses, their labels and their reference log-probs; other pairs are left as they are.
    /// Applied after the reference pass, so every pair order shares one reference cache.
    pub fn safe_first(&mut self) {
        if !self.chosen_safe && self.rejected_safe {
            std::mem::swap(&mut self.chosen, &mut self.rejected);
            std::mem::swap(&mut self.chosen_safe, &mut self.rejected_safe);
            self.ref_logps = self.ref_logps.map(|(c, r)| (r, c));
        }
    }
}

/// A sequence's summed response log-prob and the number of scored tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeqScore {
    pub logp: f64,
    pub n_tokens: usize,
}

/// What computes log-probs and LoRA gradients (the GPU engine, or the CPU reference).
pub trait Engine {
    /// A short description for logs (`wgpu: llvmpipe`, `cpu reference`).
    fn describe(&self) -> String;
    /// What identifies the numbers this engine computes, for cache keys: the engine kind and the
    /// device (name, backend, driver). Defaults to [`Engine::describe`].
    fn cache_identity(&self) -> String {
        self.describe()
    }
    /// Summed response log-probs, adapter on (`adapter = true`) or off, without gradients.
    fn score(&mut self, examples: &[&Example], adapter: bool) -> Result<Vec<SeqScore>, TrainError>;
    /// LoRA dropout for the following [`Engine::forward_train`] / [`Engine::backward`] (the
    /// trainer sets it before every micro-step with a fresh counter; scoring never uses it).
    /// Engines without dropout accept only `None` or `p = 0`.
    fn set_dropout(&mut self, dropout: Option<Dropout>) -> Result<(), TrainError> {
        match dropout {
            Some(d) if d.active() => Err(TrainError::Engine(format!(
                "{} does not implement LoRA dropout (p = {}); use lora_dropout = 0",
                self.describe(),
                d.p
            ))),
            _ => Ok(()),
        }
    }
    /// Policy forward that keeps what [`Engine::backward`] needs.
    fn forward_train(&mut self, examples: &[&Example]) -> Result<Vec<SeqScore>, TrainError>;
    /// Accumulates ∂(Σ_s weights[s]·logp_s)/∂(LoRA) for the sequences of the last forward_train.
    fn backward(&mut self, weights: &[f32]) -> Result<(), TrainError>;
    /// Global L2 norm of the accumulated gradients.
    fn grad_norm(&mut self) -> Result<f64, TrainError>;
    /// One AdamW step at `lr` with gradients multiplied by `grad_scale` (clipping); zeroes grads.
    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<(), TrainError>;
    fn zero_grads(&mut self) -> Result<(), TrainError>;
    /// The current adapter.
    fn lora(&mut self) -> Result<LoraWeights, TrainError>;
    /// LoRA parameters and optimiser state as named tensors plus scalars (for checkpoints).
    fn save_state(&mut self)
    -> Result<(BTreeMap<String, Vec<f32>>, serde_json::Value), TrainError>;
    fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Vec<f32>>,
        scalars: &serde_json::Value,
    ) -> Result<(), TrainError>;
    /// Device bytes in use, if known.
    fn device_memory(&self) -> Option<u64> {
        None
    }
}

/// Progress reported to the caller (the CLI draws bars from it; the library never prints).
#[derive(Clone, Debug)]
pub enum Event {
    /// Reference log-probs: `done` of `total` sequences scored.
    Reference {
        done: usize,
        total: usize,
    },
    Step(StepMetrics),
    Eval(StepMetrics),
    SkippedStep {
        step: usize,
        reason: String,
    },
    Checkpoint {
        step: usize,
        dir: std::path::PathBuf,
    },
    /// The adapter as of `step`, every `eval_harmful_every` steps when `eval_harmful` is set
    /// (the run evaluates its harmlessness with llama.cpp).
    Adapter {
        step: usize,
        lora: Box<LoraWeights>,
    },
}

/// The learning-rate schedule of a run (Hugging Face semantics: update `k`, 0-based).
pub fn schedule(cfg: &TrainConfig, total: usize) -> crate::optim::LrSchedule {
    use crate::optim::{LrSchedule, ScheduleKind as K, Warmup};
    LrSchedule {
        kind: match cfg.schedule {
            ScheduleKind::Constant => K::Constant,
            ScheduleKind::Linear => K::Linear,
            ScheduleKind::Cosine => K::Cosine,
        },
        peak_lr: cfg.learning_rate,
        warmup: Warmup::Ratio(cfg.warmup_ratio),
        total_steps: total.max(1) as u64,
    }
}

/// A cursor over micro-batches across epochs (cycling for the buffer set).
#[derive(Clone, Debug)]
struct Cursor {
    lengths: Vec<usize>,
    per_batch: usize,
    seed: u64,
    /// Micro-batches consumed so far.
    consumed: usize,
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

impl Cursor {
    fn new(lengths: Vec<usize>, per_batch: usize, seed: u64) -> Self {
        Cursor {
            lengths,
            per_batch,
            seed,
            consumed: 0,
            epoch_cache: None,
        }
    }
    fn batches_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.per_batch.max(1))
    }
    fn next(&mut self) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch().max(1);
        let epoch = (self.consumed / per_epoch) as u64;
        let i = self.consumed % per_epoch;
        if self.epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            let batcher = crate::data::batch::Batcher {
                bucket_batches: 8,
                ..crate::data::batch::Batcher::new(self.per_batch.max(1), self.seed)
            };
            let batches = batcher.epoch(&self.lengths, epoch).unwrap_or_default();
            self.epoch_cache = Some((epoch, batches));
        }
        self.consumed += 1;
        self.epoch_cache
            .as_ref()
            .map(|c| c.1[i].clone())
            .unwrap_or_default()
    }
}

/// The data of a run, prepared and with reference log-probs filled in.
pub struct TrainData {
    pub train: Vec<PreparedPair>,
    pub eval: Vec<PreparedPair>,
    pub buffer: Vec<PreparedPair>,
}

/// Ranking quality on held-out pairs from raw (length-normalised) log-probs: does the model
/// give the response BFPO prefers a higher mean per-token log-prob, and the safe one of a mixed
/// pair a higher one?
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RankingEval {
    pub pairs: usize,
    pub preference_accuracy: f64,
    pub mixed_pairs: usize,
    pub safety_ranking_accuracy: f64,
}

impl RankingEval {
    /// From per-pair (chosen, rejected) summed log-probs and the pairs' token counts.
    pub fn from_logps(pairs: &[PreparedPair], logps: &[(f64, f64)]) -> RankingEval {
        let mut r = RankingEval::default();
        let (mut pref, mut safe) = (0usize, 0usize);
        for (p, &(c, j)) in pairs.iter().zip(logps) {
            let mc = c / p.chosen.n_scored().max(1) as f64;
            let mj = j / p.rejected.n_scored().max(1) as f64;
            let case = p.case();
            r.pairs += 1;
            let ok = if case.prefers_chosen() {
                mc > mj
            } else {
                mj > mc
            };
            pref += ok as usize;
            if case.is_mixed() {
                r.mixed_pairs += 1;
                safe += ok as usize;
            }
        }
        r.preference_accuracy = pref as f64 / r.pairs.max(1) as f64;
        r.safety_ranking_accuracy = safe as f64 / r.mixed_pairs.max(1) as f64;
        r
    }
}

/// How many of the last steps [`RecentTrain`] covers.
pub const RECENT_STEPS: usize = 10;

/// The training pairs of the last (up to [`RECENT_STEPS`]) optimiser steps of this process:
/// their mean loss and how many of them the implicit reward orders as BFPO's global ranking
/// wants (the figure to read for BFPO; TRL's `rewards/accuracies` of a single step is not).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecentTrain {
    pub steps: usize,
    pub pairs: usize,
    /// Mean of the steps' logged losses (safety + buffer halves).
    pub loss: f64,
    pub accuracy_bfpo: f64,
}

impl RecentTrain {
    /// From per-step (loss, pairs, pairs ranked correctly), oldest first.
    pub fn from_steps(steps: &[(f64, usize, usize)]) -> Option<RecentTrain> {
        if steps.is_empty() {
            return None;
        }
        let pairs: usize = steps.iter().map(|s| s.1).sum();
        let correct: usize = steps.iter().map(|s| s.2).sum();
        Some(RecentTrain {
            steps: steps.len(),
            pairs,
            loss: steps.iter().map(|s| s.0).sum::<f64>() / steps.len() as f64,
            accuracy_bfpo: correct as f64 / pairs.max(1) as f64,
        })
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub steps: usize,
    pub interrupted: bool,
    pub skipped_steps: usize,
    pub final_train: Option<StepMetrics>,
    pub final_eval: Option<StepMetrics>,
    /// The last steps of training (this process), see [`RecentTrain`].
    pub recent_train: Option<RecentTrain>,
    pub eval_before: Option<RankingEval>,
    pub eval_after: Option<RankingEval>,
    pub tokens: u64,
    pub seconds: f64,
}

/// Total optimiser steps of a run. An epoch is exactly one pass over the training pairs: its
/// last optimiser step may have fewer than `grad_accum` micro-steps (as in Hugging Face's
/// Trainer), never micro-batches of the next epoch.
pub fn total_steps(cfg: &TrainConfig, n_train: usize) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps;
    }
    let per_epoch = n_train
        .div_ceil(cfg.pairs_per_step)
        .div_ceil(cfg.grad_accum);
    (per_epoch * cfg.epochs).max(1)
}

/// Fills `ref_logps` of every pair that lacks them, scoring `batch` sequences at a time with the
/// adapter off.
pub fn compute_reference(
    engine: &mut dyn Engine,
    pairs: &mut [PreparedPair],
    batch: usize,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let todo: Vec<usize> = (0..pairs.len())
        .filter(|&i| pairs[i].ref_logps.is_none())
        .collect();
    let total = todo.len() * 2;
    let mut done = 0;
    for chunk in todo.chunks(batch.max(2) / 2) {
        let scores = {
            let seqs: Vec<&Example> = chunk
                .iter()
                .flat_map(|&i| [&pairs[i].chosen, &pairs[i].rejected])
                .collect();
            engine.score(&seqs, false)?
        };
        for (k, &i) in chunk.iter().enumerate() {
            pairs[i].ref_logps = Some((scores[2 * k].logp, scores[2 * k + 1].logp));
        }
        done += 2 * chunk.len();
        on_event(Event::Reference { done, total });
    }
    Ok(())
}

/// Scores pairs with the adapter on; returns (chosen, rejected) summed log-probs.
pub fn score_pairs(
    engine: &mut dyn Engine,
    pairs: &[PreparedPair],
    batch: usize,
    adapter: bool,
) -> Result<Vec<(f64, f64)>, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(2) / 2) {
        let seqs: Vec<&Example> = chunk
            .iter()
            .flat_map(|p| [&p.chosen, &p.rejected])
            .collect();
        let s = engine.score(&seqs, adapter)?;
        out.extend(s.chunks(2).map(|c| (c[0].logp, c[1].logp)));
    }
    Ok(out)
}

fn pair_input(p: &PreparedPair, policy: (f64, f64)) -> PairInput {
    let (rc, rr) = p.ref_logps.unwrap_or((f64::NAN, f64::NAN));
    PairInput {
        logps: PairLogps::new(policy.0, policy.1, rc, rr),
        chosen_safe: p.chosen_safe,
        rejected_safe: p.rejected_safe,
    }
}

/// Held-out loss, rewards and accuracies (adapter on) as an `eval` record.
pub fn evaluate(
    engine: &mut dyn Engine,
    loss: &Loss,
    pairs: &[PreparedPair],
    batch: usize,
    step: usize,
) -> Result<(StepMetrics, Vec<(f64, f64)>), TrainError> {
    let logps = score_pairs(engine, pairs, batch, true)?;
    let mut stats = PairStats::default();
    for (p, &lp) in pairs.iter().zip(&logps) {
        let pl = loss.pair(pair_input(p, lp).logps, p.chosen_safe, p.rejected_safe);
        stats.add(PairObservation {
            loss: pl.loss,
            reward_chosen: pl.reward_chosen,
            reward_rejected: pl.reward_rejected,
            logp_chosen: lp.0,
            logp_rejected: lp.1,
            case: p.case(),
        });
    }
    let mut m = StepMetrics {
        split: "eval".into(),
        step,
        ..Default::default()
    };
    stats.fill(&mut m);
    Ok((m, logps))
}

/// Checkpoint state besides tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoopState {
    step: usize,
    train_consumed: usize,
    buffer_consumed: usize,
    skipped_steps: usize,
    tokens: u64,
    engine: serde_json::Value,
    /// Fingerprint of the run's data and settings, checked on resume.
    fingerprint: String,
    /// The run's settings, compared on resume (absent in checkpoints of older versions).
    #[serde(default)]
    config: Option<TrainConfig>,
}

/// Where checkpoints go and what to put beside them.
pub struct CheckpointSink<'a> {
    pub dir: std::path::PathBuf,
    /// Writes extra files (the GGUF adapter) into a checkpoint directory being created.
    pub write_extra: &'a mut dyn FnMut(&std::path::Path, &LoraWeights, usize) -> Result<(), String>,
}

fn fingerprint(cfg: &TrainConfig, data: &TrainData) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in data.train.iter().chain(&data.buffer) {
        for ex in [&p.chosen, &p.rejected] {
            h.update((ex.ids.len() as u64).to_le_bytes());
            for id in &ex.ids {
                h.update(id.to_le_bytes());
            }
        }
    }
    let relevant = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}",
        cfg.loss,
        cfg.rank,
        cfg.lora_alpha,
        cfg.targets,
        cfg.layers,
        cfg.pairs_per_step,
        cfg.grad_accum,
        cfg.seed
    );
    h.update(relevant.as_bytes());
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that a checkpoint may be resumed by a run of `cfg` on `data`: the same data and
/// every setting the run depends on unchanged (only [`crate::train::config::RESUME_MAY_CHANGE`]
/// may differ). The error lists each changed setting with its old and new value. [`train`]
/// calls it; callers can call it earlier, before writing anything for the resumed run.
pub fn check_resume(
    cfg: &TrainConfig,
    data: &TrainData,
    ck: &Checkpoint,
) -> Result<(), TrainError> {
    let state: LoopState = serde_json::from_value(ck.meta.state.clone())
        .map_err(|e| TrainError::Resume(e.to_string()))?;
    check_state(cfg, &fingerprint(cfg, data), &state)
}

fn check_state(cfg: &TrainConfig, fp: &str, state: &LoopState) -> Result<(), TrainError> {
    if let Some(saved) = &state.config {
        let changes = cfg.resume_changes(saved);
        if !changes.is_empty() {
            let list: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
            return Err(TrainError::Resume(format!(
                "it was written for different data or settings: {}; resume with the settings of the run (its config.toml) or start a new run (only {} may change)",
                list.join(", "),
                crate::train::config::RESUME_MAY_CHANGE.join(", ")
            )));
        }
    }
    if state.fingerprint != *fp {
        return Err(TrainError::Resume(format!(
            "it was written for different data or settings (fingerprint {} vs {fp}); resume with the same config and data",
            state.fingerprint
        )));
    }
    Ok(())
}

/// Runs training. `resume` restores a checkpoint taken by an earlier run of the same settings;
/// `stop` (set by Ctrl-C) makes the loop save a checkpoint and return with `interrupted`.
pub fn train(
    engine: &mut dyn Engine,
    cfg: &TrainConfig,
    data: &TrainData,
    resume: Option<Checkpoint>,
    stop: &AtomicBool,
    sink: &mut CheckpointSink<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainOutcome, TrainError> {
    if data.train.is_empty() {
        return Err(TrainError::NoData {
            detail: "the training set is empty".into(),
        });
    }
    let loss = Loss::parse(&cfg.loss).map_err(|e| TrainError::Engine(e.to_string()))?;
    let total = total_steps(cfg, data.train.len());
    let p = cfg.pairs_per_step;
    let n_buffer = if data.buffer.is_empty() || cfg.buffer_ratio <= 0.0 {
        0
    } else {
        ((p as f64) * cfg.buffer_ratio).round().max(1.0) as usize
    };
    let mut train_cursor = Cursor::new(data.train.iter().map(|x| x.len()).collect(), p, cfg.seed);
    let mut buffer_cursor = Cursor::new(
        data.buffer.iter().map(|x| x.len()).collect(),
        n_buffer.max(1),
        cfg.seed ^ 0xB0FF,
    );
    let fp = fingerprint(cfg, data);
    let sched = schedule(cfg, total);
    let eval_batch = (2 * p).max(8);

    let mut step = 0;
    let mut skipped = 0;
    let mut tokens: u64 = 0;
    if let Some(ck) = resume {
        let state = resume_state(engine, cfg, &fp, ck)?;
        step = state.step;
        skipped = state.skipped_steps;
        tokens = state.tokens;
        train_cursor.consumed = state.train_consumed;
        buffer_cursor.consumed = state.buffer_consumed;
    }

    let started = Instant::now();
    let eval_before = if !data.eval.is_empty() && step == 0 {
        let refs: Vec<(f64, f64)> = data
            .eval
            .iter()
            .map(|p| p.ref_logps.unwrap_or((f64::NAN, f64::NAN)))
            .collect();
        Some(RankingEval::from_logps(&data.eval, &refs))
    } else {
        None
    };
    let mut bad_streak = 0;
    let mut last_train = None;
    let mut last_eval = None;
    let mut interrupted = false;
    // (loss, pairs, pairs ranked as BFPO wants) of the last RECENT_STEPS steps.
    let mut recent: std::collections::VecDeque<(f64, usize, usize)> =
        std::collections::VecDeque::new();

    while step < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step_start = Instant::now();
        step += 1;
        engine.zero_grads()?;
        let mut acc = StepAcc::default();
        // The step ends with its epoch: a short last step rather than borrowing micro-batches.
        let per_epoch = train_cursor.batches_per_epoch().max(1);
        let n_micro = cfg
            .grad_accum
            .min(per_epoch - train_cursor.consumed % per_epoch);
        for micro in 0..n_micro {
            // LoRA dropout: a counter from (step, micro), so a resumed run draws the same masks.
            let counter = ((step as u64 - 1) * cfg.grad_accum as u64 + micro as u64) as u32;
            engine.set_dropout((cfg.lora_dropout > 0.0).then_some(Dropout {
                p: cfg.lora_dropout,
                seed: (cfg.seed ^ (cfg.seed >> 32)) as u32,
                counter,
            }))?;
            let safety: Vec<usize> = train_cursor.next();
            let buffer: Vec<usize> = if n_buffer > 0 {
                buffer_cursor.next()
            } else {
                Vec::new()
            };
            micro_step(engine, &loss, data, [&safety, &buffer], n_micro, &mut acc)?;
            if acc.bad.is_some() {
                break;
            }
        }
        let step_tokens = acc.tokens;
        let mut bad = acc.bad.take();
        tokens += step_tokens;
        let norm = if bad.is_none() {
            engine.grad_norm()?
        } else {
            f64::NAN
        };
        if bad.is_none() && !norm.is_finite() {
            bad = Some(format!("gradient norm {norm}"));
        }
        if let Some(reason) = bad {
            engine.zero_grads()?;
            skipped += 1;
            bad_streak += 1;
            on_event(Event::SkippedStep {
                step,
                reason: reason.clone(),
            });
            if bad_streak >= cfg.max_bad_steps.max(1) {
                return Err(TrainError::TooManyBadSteps {
                    count: bad_streak,
                    step,
                    detail: reason,
                });
            }
            continue;
        }
        bad_streak = 0;
        let lr = sched.lr_at((step - 1) as u64);
        let scale = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
            cfg.max_grad_norm / norm
        } else {
            1.0
        };
        engine.optimizer_step(lr, scale)?;
        let secs = step_start.elapsed().as_secs_f64();
        let base = StepMetrics {
            split: "train".into(),
            step,
            epoch: train_cursor.consumed as f64 / train_cursor.batches_per_epoch().max(1) as f64,
            grad_norm: Some(norm),
            learning_rate: Some(lr),
            tokens_per_second: Some(step_tokens as f64 / secs.max(1e-9)),
            num_tokens: Some(tokens),
            device_memory_bytes: engine.device_memory(),
            elapsed_seconds: Some(started.elapsed().as_secs_f64()),
            ..Default::default()
        };
        let m_pairs = (acc.stats.len(), acc.stats.bfpo_correct());
        let m = acc.into_metrics(base, n_micro, n_buffer > 0);
        if recent.len() == RECENT_STEPS {
            recent.pop_front();
        }
        recent.push_back((m.loss, m_pairs.0, m_pairs.1));
        on_event(Event::Step(m.clone()));
        last_train = Some(m);
        if !data.eval.is_empty() && cfg.eval_every > 0 && step % cfg.eval_every == 0 && step < total
        {
            let (e, _) = evaluate(engine, &loss, &data.eval, eval_batch, step)?;
            on_event(Event::Eval(e.clone()));
            last_eval = Some(e);
        }
        if cfg.eval_harmful.is_some()
            && cfg.eval_harmful_every > 0
            && step % cfg.eval_harmful_every == 0
            && step < total
        {
            on_event(Event::Adapter {
                step,
                lora: Box::new(engine.lora()?),
            });
        }
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < total {
            let at = at(step, skipped, tokens, &train_cursor, &buffer_cursor);
            save_checkpoint(engine, cfg, &fp, at, sink, on_event)?;
        }
    }

    let mut eval_after = None;
    if !data.eval.is_empty() && !interrupted {
        let (e, logps) = evaluate(engine, &loss, &data.eval, eval_batch, step)?;
        on_event(Event::Eval(e.clone()));
        last_eval = Some(e);
        eval_after = Some(RankingEval::from_logps(&data.eval, &logps));
    }
    let at = at(step, skipped, tokens, &train_cursor, &buffer_cursor);
    save_checkpoint(engine, cfg, &fp, at, sink, on_event)?;
    Ok(TrainOutcome {
        steps: step,
        interrupted,
        skipped_steps: skipped,
        final_train: last_train,
        final_eval: last_eval,
        recent_train: RecentTrain::from_steps(recent.make_contiguous()),
        eval_before,
        eval_after,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What the micro-steps of one optimiser step add up to.
#[derive(Default)]
struct StepAcc {
    /// Every pair of the step (safety and buffer), for rewards and accuracies.
    stats: PairStats,
    /// The two halves of the objective, each a batch mean, summed over micro-steps.
    loss_safety: f64,
    loss_buffer: f64,
    /// Every token processed (prompt and response, chosen and rejected), as TRL counts.
    tokens: u64,
    /// Why the step cannot be applied (a non-finite loss), if it cannot.
    bad: Option<String>,
}

impl StepAcc {
    /// The step's metrics: `base` (timing, learning rate, norm) with the pairs' statistics and
    /// the objective, the mean over the `n_micro` micro-steps of BFPO(safety) + BFPO(buffer).
    fn into_metrics(self, mut m: StepMetrics, n_micro: usize, has_buffer: bool) -> StepMetrics {
        self.stats.fill(&mut m);
        m.loss_safety = Some(self.loss_safety / n_micro as f64);
        m.loss_buffer = has_buffer.then(|| self.loss_buffer / n_micro as f64);
        m.loss = (self.loss_safety + self.loss_buffer) / n_micro as f64;
        m
    }
}

/// One micro-step: the forward of the safety pairs `idx[0]` of `data.train` and buffer pairs
/// `idx[1]` of `data.buffer`, their losses, and the backward with each sequence's weight
/// `∂loss/∂logp / n_micro` (skipped when a loss is not finite: `acc.bad` says why).
fn micro_step(
    engine: &mut dyn Engine,
    loss: &Loss,
    data: &TrainData,
    idx: [&[usize]; 2],
    n_micro: usize,
    acc: &mut StepAcc,
) -> Result<(), TrainError> {
    let groups: [(&[PreparedPair], &[usize]); 2] = [(&data.train, idx[0]), (&data.buffer, idx[1])];
    let seqs: Vec<&Example> = groups
        .iter()
        .flat_map(|(set, idx)| {
            idx.iter()
                .flat_map(move |&i| [&set[i].chosen, &set[i].rejected])
        })
        .collect();
    if seqs.is_empty() {
        return Ok(());
    }
    let scores = engine.forward_train(&seqs)?;
    acc.tokens += seqs.iter().map(|e| e.len() as u64).sum::<u64>();
    let mut weights = Vec::with_capacity(seqs.len());
    let mut offset = 0;
    for (g, (set, idx)) in groups.into_iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let inputs: Vec<PairInput> = idx
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                pair_input(
                    &set[i],
                    (scores[offset + 2 * k].logp, scores[offset + 2 * k + 1].logp),
                )
            })
            .collect();
        match loss.batch(&inputs) {
            Ok(bl) => {
                if g == 0 {
                    acc.loss_safety += bl.loss;
                } else {
                    acc.loss_buffer += bl.loss;
                }
                for (k, pl) in bl.pairs.iter().enumerate() {
                    weights.push((bl.d_policy_chosen[k] / n_micro as f64) as f32);
                    weights.push((bl.d_policy_rejected[k] / n_micro as f64) as f32);
                    acc.stats.add(PairObservation {
                        loss: pl.loss,
                        reward_chosen: pl.reward_chosen,
                        reward_rejected: pl.reward_rejected,
                        logp_chosen: inputs[k].logps.policy_chosen,
                        logp_rejected: inputs[k].logps.policy_rejected,
                        case: set[idx[k]].case(),
                    });
                }
                if !bl.loss.is_finite() {
                    acc.bad = Some(format!("loss {}", bl.loss));
                }
            }
            Err(e) => acc.bad = Some(e.to_string()),
        }
        offset += 2 * idx.len();
    }
    if acc.bad.is_none() {
        engine.backward(&weights)?;
    }
    Ok(())
}

/// Loads a checkpoint's engine state after checking it belongs to this run; returns the loop's
/// position.
fn resume_state(
    engine: &mut dyn Engine,
    cfg: &TrainConfig,
    fingerprint: &str,
    mut ck: Checkpoint,
) -> Result<LoopState, TrainError> {
    let state: LoopState = serde_json::from_value(ck.meta.state.clone())
        .map_err(|e| TrainError::Resume(e.to_string()))?;
    check_state(cfg, fingerprint, &state)?;
    let tensors = std::mem::take(&mut ck.tensors);
    engine.load_state(&tensors, &state.engine)?;
    Ok(state)
}

/// Where a run stands, as a checkpoint records it.
struct LoopAt {
    step: usize,
    skipped: usize,
    tokens: u64,
    train_consumed: usize,
    buffer_consumed: usize,
}

fn at(step: usize, skipped: usize, tokens: u64, train: &Cursor, buffer: &Cursor) -> LoopAt {
    LoopAt {
        step,
        skipped,
        tokens,
        train_consumed: train.consumed,
        buffer_consumed: buffer.consumed,
    }
}

/// Writes a checkpoint of the engine's state and the loop's position `at` (with the adapter
/// beside it, through `sink`) and reports it.
fn save_checkpoint(
    engine: &mut dyn Engine,
    cfg: &TrainConfig,
    fingerprint: &str,
    at: LoopAt,
    sink: &mut CheckpointSink<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let (tensors, scalars) = engine.save_state()?;
    let lora = engine.lora()?;
    let step = at.step;
    let state = LoopState {
        step,
        train_consumed: at.train_consumed,
        buffer_consumed: at.buffer_consumed,
        skipped_steps: at.skipped,
        tokens: at.tokens,
        engine: scalars,
        fingerprint: fingerprint.to_string(),
        config: Some(cfg.clone()),
    };
    let ck = Checkpoint::new(
        step,
        serde_json::to_value(&state).map_err(|e| TrainError::Engine(e.to_string()))?,
        tensors,
    );
    let dir = sink.dir.clone();
    let extra = &mut *sink.write_extra;
    ck.save(&dir, |tmp| extra(tmp, &lora, step))?;
    on_event(Event::Checkpoint { step, dir });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(chosen_safe: bool, rejected_safe: bool) -> PreparedPair {
        let ex = |ids: &[u32]| Example {
            ids: ids.to_vec(),
            response_start: 1,
        };
        PreparedPair {
            chosen: ex(&[1, 2, 3]),
            rejected: ex(&[1, 4]),
            chosen_safe,
            rejected_safe,
            origin: RowOrigin {
                file: "f.jsonl".into(),
                line: 1,
            },
            ref_logps: Some((-30.0, -13.0)),
        }
    }

    #[test]
    fn safe_first_swaps_only_unsafe_over_safe_and_leaves_bfpo_unchanged() {
        for (cs, rs) in [(true, true), (true, false), (false, false)] {
            let mut p = prepared(cs, rs);
            p.safe_first();
            assert_eq!(p, prepared(cs, rs), "({cs}, {rs}) is left alone");
        }
        let (orig, mut p) = (prepared(false, true), prepared(false, true));
        p.safe_first();
        assert_eq!((&p.chosen, &p.rejected), (&orig.rejected, &orig.chosen));
        assert_eq!((p.chosen_safe, p.rejected_safe), (true, false));
        assert_eq!(p.ref_logps, Some((-13.0, -30.0)));
        // BFPO's loss on the swapped pair is the original's, with the gradients swapped.
        let (a, b) = (
            pair_input(&orig, (-31.5, -12.25)),
            pair_input(&p, (-12.25, -31.5)),
        );
        let bfpo = Loss::bfpo();
        let (la, lb) = (
            bfpo.pair(a.logps, a.chosen_safe, a.rejected_safe),
            bfpo.pair(b.logps, b.chosen_safe, b.rejected_safe),
        );
        assert_eq!(la.loss, lb.loss);
        assert_eq!(la.d_policy_chosen, lb.d_policy_rejected);
        // DPO's is not: that is why the order matters for it.
        let dpo = Loss::dpo();
        assert_ne!(
            dpo.pair(a.logps, false, true).loss,
            dpo.pair(b.logps, true, false).loss
        );
    }

    #[test]
    fn schedule_follows_config() {
        let cfg = TrainConfig {
            learning_rate: 1.0,
            warmup_ratio: 0.1,
            schedule: ScheduleKind::Cosine,
            ..Default::default()
        };
        let s = schedule(&cfg, 100);
        assert_eq!(s.warmup_steps(), 10);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!(s.lr_at(100).abs() < 1e-12);
    }

    #[test]
    fn cursor_cycles_epochs() {
        let mut c = Cursor::new(vec![1; 5], 2, 3);
        let first: Vec<Vec<usize>> = (0..3).map(|_| c.next()).collect();
        let mut seen: Vec<usize> = first.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        let again = c.next();
        assert!(!again.is_empty());
        assert_eq!(c.consumed, 4);
    }
}
