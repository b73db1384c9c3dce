//! One evaluation: generate answers with the base model and each adapter, judge them, and
//! measure what helpfulness kept.

use super::EvalError;
use super::helpful::{self, DriftFigures, McFigures, McSet, RankingFigures};
use super::judge::{Judge, JudgeFormat, ModelJudge, RefusalJudge};
use super::prompts::{EvalPrompt, PromptSet, PromptSource, load_prompt_set, spread};
use super::stats::Figure;
use crate::data::{LoadOptions as PairLoadOptions, Prompt};
use crate::runtime::{AdapterId, GenerateOptions, LoadOptions, RtModel, Sampling, ScoreOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

/// Which judge decides safety.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JudgeSpec {
    /// The refusal phrase list.
    Refusal,
    /// The refusal phrase list plus PyRIT's off-topic rule ([`super::ObjectiveRefusalJudge`]).
    RefusalObjective,
    /// A chat GGUF judge model.
    Model { path: PathBuf, format: JudgeFormat },
}

/// Everything an evaluation needs.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub model: PathBuf,
    /// Adapters evaluated one at a time, side by side with the base.
    pub adapters: Vec<PathBuf>,
    /// llama.cpp adapter scale (effective factor `scale · alpha / rank`).
    pub adapter_scale: f32,
    pub harmful: PromptSource,
    pub benign: Option<PromptSource>,
    pub judge: JudgeSpec,
    pub max_tokens: usize,
    /// At most this many prompts per set (and pairs, questions), spread over the set.
    pub limit: Option<usize>,
    pub seed: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Held-out preference pairs (any format `tune` reads, with safety labels).
    pub pairs: Option<PathBuf>,
    /// Multiple-choice JSONL.
    pub mc: Option<PathBuf>,
    pub threads: Option<usize>,
    pub gpu_layers: u32,
    /// Chat template instead of the model's own (`--chat-template FILE|NAME`).
    pub chat_template: Option<String>,
    /// The template's `enable_thinking` (`None`: undefined, the template's default).
    pub enable_thinking: Option<bool>,
}

impl EvalOptions {
    /// Defaults: refusal judge, greedy, 128 new tokens, seed 42, no limit.
    pub fn new(model: impl Into<PathBuf>, harmful: PromptSource) -> EvalOptions {
        EvalOptions {
            model: model.into(),
            adapters: Vec::new(),
            adapter_scale: 1.0,
            harmful,
            benign: None,
            judge: JudgeSpec::Refusal,
            max_tokens: 128,
            limit: None,
            seed: 42,
            temperature: 0.0,
            pairs: None,
            mc: None,
            threads: None,
            gpu_layers: 0,
            chat_template: None,
            enable_thinking: None,
        }
    }
}

/// What part of the evaluation is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    GenerateHarmful,
    GenerateBenign,
    JudgeHarmful,
    JudgeBenign,
    Pairs,
    Drift,
    MultipleChoice,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::GenerateHarmful => "generate (harmful)",
            Phase::GenerateBenign => "generate (benign)",
            Phase::JudgeHarmful => "judge (harmful)",
            Phase::JudgeBenign => "judge (benign)",
            Phase::Pairs => "score pairs",
            Phase::Drift => "drift/KL",
            Phase::MultipleChoice => "multiple choice",
        }
    }
}

/// Progress of an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalEvent {
    /// A prompt set, pairs file or multiple-choice file was read.
    Loaded(SetInfo),
    /// The judge is ready.
    JudgeReady { name: String },
    /// A phase starts for a model (`total` items).
    Started {
        model: String,
        phase: Phase,
        total: usize,
    },
    /// `done` of `total` items of the current phase.
    Progress { done: usize, total: usize },
    /// A phase ended.
    Finished {
        model: String,
        phase: Phase,
        seconds: f64,
    },
}

/// A set as the report records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetInfo {
    /// `harmful`, `benign`, `pairs` or `mc`.
    pub role: String,
    pub name: String,
    pub provenance: String,
    /// Items used.
    pub n: usize,
    /// Usable items before `--limit`.
    pub available: usize,
    pub rows_read: usize,
    pub skipped: usize,
    pub skipped_by_reason: BTreeMap<String, usize>,
    /// The first few skipped rows as `file:line: reason`.
    pub skipped_examples: Vec<String>,
    pub categories: BTreeMap<String, usize>,
}

impl SetInfo {
    fn of_prompts(role: &str, s: &PromptSet) -> SetInfo {
        SetInfo {
            role: role.into(),
            name: s.name.clone(),
            provenance: s.provenance.clone(),
            n: s.len(),
            available: s.available,
            rows_read: s.rows_read,
            skipped: s.skipped.len(),
            skipped_by_reason: s.skipped_by_reason(),
            skipped_examples: s
                .skipped
                .iter()
                .take(5)
                .map(|k| format!("{}: {}", k.origin, k.reason))
                .collect(),
            categories: if s.has_categories() {
                s.category_counts()
            } else {
                BTreeMap::new()
            },
        }
    }
}

/// One generated and judged answer (one line of `samples.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub model: String,
    /// `harmful` or `benign`.
    pub set: String,
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub category: Option<String>,
    pub answer: String,
    /// `safe` or `unsafe`.
    pub verdict: String,
    pub refused: bool,
    pub judge: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub p_unsafe: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub judge_category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub matched: Option<String>,
    /// `file:line` of the prompt.
    pub origin: String,
    pub n_tokens: usize,
    /// Why generation stopped (`eog`, `max_tokens`, …).
    pub stop: String,
}

/// The figures of one model (the base or base + one adapter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// `base` or the adapter's file stem.
    pub name: String,
    pub adapter: Option<PathBuf>,
    /// Judged safe on harmful prompts.
    pub harmless: Figure,
    pub harmless_by_category: BTreeMap<String, Figure>,
    /// Refusals on harmful prompts (phrase list).
    pub harmful_refusal: Figure,
    /// Refusals on benign prompts (lower is better).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub over_refusal: Option<Figure>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub over_refusal_by_category: BTreeMap<String, Figure>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ranking: Option<RankingFigures>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drift: Option<DriftFigures>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mc: Option<McFigures>,
    /// Answer tokens generated.
    pub tokens_generated: usize,
    /// Seconds per phase.
    pub seconds: BTreeMap<String, f64>,
}

/// Settings recorded in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    pub max_tokens: usize,
    pub limit: Option<usize>,
    pub seed: u32,
    pub temperature: f32,
    pub greedy: bool,
    pub adapter_scale: f32,
}

/// `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub bfpo_lite_version: String,
    pub model: PathBuf,
    pub judge: String,
    pub settings: EvalSettings,
    pub sets: Vec<SetInfo>,
    pub models: Vec<ModelReport>,
    /// Benign prompts whose base answer could not be re-encoded for drift/KL.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drift_skipped: Option<usize>,
    pub seconds_total: f64,
}

/// The evaluation's results: the report and every sample.
#[derive(Clone, Debug)]
pub struct EvalOutput {
    pub report: EvalReport,
    pub samples: Vec<Sample>,
}

/// A unique display name per adapter: its file stem, suffixed `#k` when two share one.
fn adapter_names(paths: &[PathBuf]) -> Vec<String> {
    let stems: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "adapter".into())
        })
        .collect();
    stems
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s == "base" || stems.iter().filter(|t| *t == s).count() > 1 {
                format!("{s}#{}", i + 1)
            } else {
                s.clone()
            }
        })
        .collect()
}

fn rt(what: String) -> impl FnOnce(crate::runtime::RuntimeError) -> EvalError {
    move |error| EvalError::Runtime { what, error }
}

/// Runs an evaluation (see the module docs); `on` sees every [`EvalEvent`].
/// The evaluation's inputs, loaded before any model so bad files fail first.
struct Inputs {
    harmful: PromptSet,
    benign: Option<PromptSet>,
    pairs: Option<crate::data::LoadedPairs>,
    mc: Option<McSet>,
    /// What was loaded, as reported.
    sets: Vec<SetInfo>,
}

/// Loads the harmful and benign prompts, the held-out pairs and the multiple-choice questions
/// `opts` names, reporting each set as it loads.
fn load_inputs(opts: &EvalOptions, on: &mut dyn FnMut(&EvalEvent)) -> Result<Inputs, EvalError> {
    let harmful = load_prompt_set(&opts.harmful, opts.limit)?;
    let mut sets = vec![SetInfo::of_prompts("harmful", &harmful)];
    on(&EvalEvent::Loaded(sets[0].clone()));
    let benign = match &opts.benign {
        Some(src) => {
            let b = load_prompt_set(src, opts.limit)?;
            sets.push(SetInfo::of_prompts("benign", &b));
            on(&EvalEvent::Loaded(sets.last().expect("pushed").clone()));
            Some(b)
        }
        None => None,
    };
    let pairs = match &opts.pairs {
        Some(path) => {
            let loaded =
                crate::data::load_pairs(path, &PairLoadOptions::default()).map_err(|e| {
                    EvalError::Other(format!("reading held-out pairs {}: {e}", path.display()))
                })?;
            if loaded.pairs.is_empty() {
                return Err(EvalError::Other(format!(
                    "held-out pairs {}: no usable pairs ({})",
                    path.display(),
                    loaded.report
                )));
            }
            Some(loaded)
        }
        None => None,
    };
    let mc = match &opts.mc {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
                path: path.clone(),
                error,
            })?;
            let mut set = helpful::parse_mc(&text, &path.display().to_string());
            if set.questions.is_empty() {
                return Err(EvalError::Other(format!(
                    "multiple-choice file {} has no usable questions ({} rows read, {} skipped{}); each line needs \"question\", \"choices\" (≥ 2 strings) and \"answer\"",
                    path.display(),
                    set.rows_read,
                    set.skipped.len(),
                    set.skipped
                        .first()
                        .map(|(o, r)| format!("; e.g. {o}: {r}"))
                        .unwrap_or_default()
                )));
            }
            let available = set.questions.len();
            if let Some(l) = opts.limit {
                set.questions = spread(std::mem::take(&mut set.questions), l);
            }
            sets.push(mc_info(&set, available));
            on(&EvalEvent::Loaded(sets.last().expect("pushed").clone()));
            Some(set)
        }
        None => None,
    };

    Ok(Inputs {
        harmful,
        benign,
        pairs,
        mc,
        sets,
    })
}

/// Encodes the held-out pairs (at most `limit`, spread over the set) with the model's template
/// and reports the set; refuses a set of which none could be encoded.
fn encode_heldout(
    model: &RtModel,
    lp: &crate::data::LoadedPairs,
    limit: Option<usize>,
    sets: &mut Vec<SetInfo>,
    on: &mut dyn FnMut(&EvalEvent),
) -> Result<helpful::EncodedPairs, EvalError> {
    let mut chosen = lp.pairs.clone();
    if let Some(l) = limit {
        chosen = spread(chosen, l);
    }
    let enc = helpful::encode_pairs(model, &chosen);
    let mut by_reason = lp.report.skipped_by_reason.clone();
    for (_, r) in &enc.skipped {
        *by_reason.entry(format!("cannot encode: {r}")).or_insert(0) += 1;
    }
    let info = SetInfo {
        role: "pairs".into(),
        name: lp.report.path.display().to_string(),
        provenance: format!("held-out pairs ({})", lp.report.format),
        n: enc.pairs.len(),
        available: lp.pairs.len(),
        rows_read: lp.report.rows_read,
        skipped: lp.report.skipped() + enc.skipped.len(),
        skipped_by_reason: by_reason,
        skipped_examples: lp
            .report
            .examples
            .iter()
            .map(|e| format!("{}: {} ({})", e.origin, e.reason, e.detail))
            .chain(enc.skipped.iter().map(|(o, r)| format!("{o}: {r}")))
            .take(5)
            .collect(),
        categories: BTreeMap::new(),
    };
    if enc.pairs.is_empty() {
        return Err(EvalError::Other(format!(
            "held-out pairs {}: none could be encoded with the model's chat template; e.g. {}",
            info.name,
            info.skipped_examples.first().cloned().unwrap_or_default()
        )));
    }
    sets.push(info.clone());
    on(&EvalEvent::Loaded(info));
    Ok(enc)
}

pub fn run_eval(
    opts: &EvalOptions,
    on: &mut dyn FnMut(&EvalEvent),
) -> Result<EvalOutput, EvalError> {
    let t_all = Instant::now();
    if opts.max_tokens == 0 {
        return Err(EvalError::InvalidOption {
            name: "max-tokens",
            value: "0".into(),
            expected: "at least 1",
        });
    }
    // Inputs first: bad files fail before any model loads.
    let Inputs {
        harmful,
        benign,
        pairs,
        mc,
        mut sets,
    } = load_inputs(opts, on)?;

    let load = LoadOptions {
        n_gpu_layers: opts.gpu_layers,
    };
    let mut model = RtModel::load(&opts.model, &load)
        .map_err(rt(format!("loading model {}", opts.model.display())))?;
    if let Some(spec) = &opts.chat_template {
        let t = crate::template::ChatTemplate::resolve(spec)
            .map_err(|e| EvalError::Other(format!("--chat-template {spec}: {e}")))?;
        model.set_chat_template(t);
    }
    model.set_enable_thinking(opts.enable_thinking);
    let mut adapter_ids: Vec<AdapterId> = Vec::new();
    for a in &opts.adapters {
        let id = model.load_adapter(a).map_err(rt(format!(
            "loading adapter {} for model {}",
            a.display(),
            opts.model.display()
        )))?;
        adapter_ids.push(id);
    }
    let judge: Box<dyn Judge> = match &opts.judge {
        JudgeSpec::Refusal => Box::new(RefusalJudge),
        JudgeSpec::RefusalObjective => Box::new(super::ObjectiveRefusalJudge),
        JudgeSpec::Model { path, format } => {
            let mut j = ModelJudge::load(path, *format, &load)?;
            j.set_threads(opts.threads);
            Box::new(j)
        }
    };
    let judge_name = judge.name();
    on(&EvalEvent::JudgeReady {
        name: judge_name.clone(),
    });

    // Pairs are encoded once with the model's template (same tokenizer for every variant).
    let prepared = match &pairs {
        Some(lp) => Some((lp, encode_heldout(&model, lp, opts.limit, &mut sets, on)?)),
        None => None,
    };

    let gen_opts = GenerateOptions {
        max_tokens: opts.max_tokens,
        sampling: Sampling {
            temperature: opts.temperature,
            seed: opts.seed,
            ..Sampling::default()
        },
        n_ctx: None,
        threads: opts.threads,
    };
    let score_opts = ScoreOptions {
        threads: opts.threads,
        ..ScoreOptions::default()
    };

    let mut variants: Vec<(String, Option<(PathBuf, AdapterId)>)> = vec![("base".into(), None)];
    for ((p, id), name) in opts
        .adapters
        .iter()
        .zip(&adapter_ids)
        .zip(adapter_names(&opts.adapters))
    {
        variants.push((name, Some((p.clone(), *id))));
    }

    let mut samples = Vec::new();
    let mut models = Vec::new();
    let mut base_pair_scores: Option<Vec<(f64, f64)>> = None;
    let mut drift_examples: Option<Vec<crate::data::Example>> = None;
    let mut drift_skipped = None;
    for (name, adapter) in &variants {
        match adapter {
            Some((_, id)) => model
                .set_adapter(*id, opts.adapter_scale)
                .map_err(rt(format!("activating adapter {name}")))?,
            None => model.clear_adapter(),
        }
        let mut seconds = BTreeMap::new();
        let mut tokens_generated = 0usize;
        let mut timed = |phase: Phase,
                         seconds: &mut BTreeMap<String, f64>,
                         t: Instant,
                         on: &mut dyn FnMut(&EvalEvent)| {
            let s = t.elapsed().as_secs_f64();
            seconds.insert(phase.label().to_string(), s);
            on(&EvalEvent::Finished {
                model: name.clone(),
                phase,
                seconds: s,
            });
        };

        // Harmful prompts.
        let h = generate_and_judge(
            &model,
            name,
            "harmful",
            &harmful.prompts,
            &gen_opts,
            judge.as_ref(),
            (Phase::GenerateHarmful, Phase::JudgeHarmful),
            &mut seconds,
            &mut timed,
            on,
        )?;
        tokens_generated += h.iter().map(|s| s.n_tokens).sum::<usize>();
        let harmless = rate_of(&h, |s| s.verdict == "safe");
        let harmful_refusal = rate_of(&h, |s| s.refused);
        let harmless_by_category = by_category(&h, |s| s.verdict == "safe");

        // Benign prompts.
        let (mut over_refusal, mut over_refusal_by_category) = (None, BTreeMap::new());
        let mut benign_samples = Vec::new();
        if let Some(b) = &benign {
            benign_samples = generate_and_judge(
                &model,
                name,
                "benign",
                &b.prompts,
                &gen_opts,
                judge.as_ref(),
                (Phase::GenerateBenign, Phase::JudgeBenign),
                &mut seconds,
                &mut timed,
                on,
            )?;
            tokens_generated += benign_samples.iter().map(|s| s.n_tokens).sum::<usize>();
            over_refusal = Some(rate_of(&benign_samples, |s| s.refused));
            over_refusal_by_category = by_category(&benign_samples, |s| s.refused);
        }

        // Held-out pairs.
        let mut ranking = None;
        if let Some((_, enc)) = &prepared {
            let t = Instant::now();
            on(&EvalEvent::Started {
                model: name.clone(),
                phase: Phase::Pairs,
                total: enc.pairs.len(),
            });
            let scores =
                helpful::score_pairs(&model, &enc.pairs, &score_opts, &mut |done, total| {
                    on(&EvalEvent::Progress { done, total })
                })
                .map_err(rt(format!("scoring held-out pairs with {name}")))?;
            ranking = Some(helpful::pair_ranking(
                &enc.pairs,
                &scores,
                adapter.as_ref().and(base_pair_scores.as_deref()),
            ));
            if adapter.is_none() {
                base_pair_scores = Some(scores);
            }
            timed(Phase::Pairs, &mut seconds, t, on);
        }

        // Multiple choice.
        let mut mc_fig = None;
        if let Some(set) = &mc {
            let t = Instant::now();
            on(&EvalEvent::Started {
                model: name.clone(),
                phase: Phase::MultipleChoice,
                total: set.questions.len(),
            });
            mc_fig = Some(helpful::multiple_choice(
                &model,
                &set.questions,
                &score_opts,
                &mut |done, total| on(&EvalEvent::Progress { done, total }),
            )?);
            timed(Phase::MultipleChoice, &mut seconds, t, on);
        }

        // Drift and KL against the base, on the base's benign answers.
        let mut drift = None;
        match adapter {
            None if benign.is_some() => {
                let answers: Vec<(String, String)> = benign_samples
                    .iter()
                    .map(|s| (s.prompt.clone(), s.answer.clone()))
                    .collect();
                let (exs, skipped) = helpful::answer_examples(&model, &answers);
                drift_skipped = Some(skipped);
                drift_examples = Some(exs);
            }
            Some((_, id)) => {
                if let Some(exs) = &drift_examples {
                    let t = Instant::now();
                    on(&EvalEvent::Started {
                        model: name.clone(),
                        phase: Phase::Drift,
                        total: exs.len(),
                    });
                    drift = Some(
                        helpful::drift_and_kl(
                            &mut model,
                            *id,
                            opts.adapter_scale,
                            exs,
                            &mut |done, total| on(&EvalEvent::Progress { done, total }),
                        )
                        .map_err(rt(format!("drift/KL of {name} against the base")))?,
                    );
                    timed(Phase::Drift, &mut seconds, t, on);
                }
            }
            None => {}
        }

        samples.extend(h);
        samples.extend(benign_samples);
        models.push(ModelReport {
            name: name.clone(),
            adapter: adapter.as_ref().map(|(p, _)| p.clone()),
            harmless,
            harmless_by_category,
            harmful_refusal,
            over_refusal,
            over_refusal_by_category,
            ranking,
            drift,
            mc: mc_fig,
            tokens_generated,
            seconds,
        });
    }
    model.clear_adapter();

    Ok(EvalOutput {
        report: EvalReport {
            bfpo_lite_version: crate::VERSION.to_string(),
            model: opts.model.clone(),
            judge: judge_name,
            settings: EvalSettings {
                max_tokens: opts.max_tokens,
                limit: opts.limit,
                seed: opts.seed,
                temperature: opts.temperature,
                greedy: opts.temperature <= 0.0,
                adapter_scale: opts.adapter_scale,
            },
            sets,
            models,
            drift_skipped,
            seconds_total: t_all.elapsed().as_secs_f64(),
        },
        samples,
    })
}

fn mc_info(set: &McSet, available: usize) -> SetInfo {
    SetInfo {
        role: "mc".into(),
        name: set.name.clone(),
        provenance: "multiple-choice questions (lm-eval style log-likelihood)".into(),
        n: set.questions.len(),
        available,
        rows_read: set.rows_read,
        skipped: set.skipped.len(),
        skipped_by_reason: set.skipped_by_reason(),
        skipped_examples: set
            .skipped
            .iter()
            .take(5)
            .map(|(o, r)| format!("{o}: {r}"))
            .collect(),
        categories: BTreeMap::new(),
    }
}

fn rate_of(samples: &[Sample], f: impl Fn(&Sample) -> bool) -> Figure {
    Figure::rate(samples.iter().filter(|s| f(s)).count(), samples.len())
}

fn by_category(samples: &[Sample], f: impl Fn(&Sample) -> bool) -> BTreeMap<String, Figure> {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for s in samples {
        if let Some(c) = &s.category {
            let e = counts.entry(c.clone()).or_default();
            e.0 += f(s) as usize;
            e.1 += 1;
        }
    }
    counts
        .into_iter()
        .map(|(c, (k, n))| (c, Figure::rate(k, n)))
        .collect()
}

type Timer<'a> =
    dyn FnMut(Phase, &mut BTreeMap<String, f64>, Instant, &mut dyn FnMut(&EvalEvent)) + 'a;

#[allow(clippy::too_many_arguments)]
fn generate_and_judge(
    model: &RtModel,
    name: &str,
    set: &str,
    prompts: &[EvalPrompt],
    gen_opts: &GenerateOptions,
    judge: &dyn Judge,
    phases: (Phase, Phase),
    seconds: &mut BTreeMap<String, f64>,
    timed: &mut Timer<'_>,
    on: &mut dyn FnMut(&EvalEvent),
) -> Result<Vec<Sample>, EvalError> {
    let total = prompts.len();
    let t = Instant::now();
    on(&EvalEvent::Started {
        model: name.to_string(),
        phase: phases.0,
        total,
    });
    let mut gens = Vec::with_capacity(total);
    for (i, p) in prompts.iter().enumerate() {
        let g = model
            .generate(
                std::slice::from_ref(&Prompt::Text(p.text.clone())),
                gen_opts,
                &mut |_| ControlFlow::Continue(()),
            )
            .map_err(rt(format!("generating with {name} for {}", p.origin)))?
            .remove(0);
        gens.push(g);
        on(&EvalEvent::Progress { done: i + 1, total });
    }
    timed(phases.0, seconds, t, on);

    let t = Instant::now();
    on(&EvalEvent::Started {
        model: name.to_string(),
        phase: phases.1,
        total,
    });
    let jname = judge.name();
    let mut out = Vec::with_capacity(total);
    for (i, (p, g)) in prompts.iter().zip(gens).enumerate() {
        let v = judge.judge(&p.text, &g.text).map_err(|e| match e {
            EvalError::Runtime { what, error } => EvalError::Runtime {
                what: format!("{what}, judging {}", p.origin),
                error,
            },
            other => other,
        })?;
        out.push(Sample {
            model: name.to_string(),
            set: set.to_string(),
            prompt: p.text.clone(),
            category: p.category.clone(),
            answer: g.text,
            verdict: if v.safe { "safe" } else { "unsafe" }.into(),
            refused: v.refused,
            judge: jname.clone(),
            p_unsafe: v.p_unsafe,
            judge_category: v.category,
            matched: v.matched,
            origin: p.origin.to_string(),
            n_tokens: g.ids.len(),
            stop: g.stop.as_str().into(),
        });
        on(&EvalEvent::Progress { done: i + 1, total });
    }
    timed(phases.1, seconds, t, on);
    Ok(out)
}
