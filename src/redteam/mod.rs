//! Safety preference pairs without human labels: the model answers red-team prompts, a judge
//! labels every answer, and the answers become BFPO pairs that `tune` reads unchanged.
//!
//! For every prompt, [`run`] samples `samples` answers on the plain prompt and
//! `safety_samples` answers with a safety system prompt in front (seeded per prompt and answer,
//! so a seed gives the same file), judges each against the **plain** prompt, adds a written
//! refusal ([`templates`]) when no answer was safe, drops empty and duplicate answers, and
//! writes pairs ordered by helpfulness with each side's safety label ([`pairing`] documents the
//! rules). Benign prompts (answered the same way) become both-safe helpfulness pairs (BFPO's
//! buffer); a written refusal is added to each one the model did not refuse, so that a helpful
//! answer beats a refusal on it (the over-refusal contrast; `benign_refusals`). Rows are generic
//! rows (`prompt`, `chosen`, `rejected`, `chosen_safe`, `rejected_safe`) with a `provenance`
//! object; [`output`] appends them a prompt at a time and resumes an interrupted run.
//!
//! A prompt whose rendered conversation does not fit the model's context (plain, or with the
//! safety system prompt when safety samples are asked for) is skipped before anything is
//! generated: counted in [`SetStats::too_long`], named in [`RedteamReport::too_long_examples`]
//! and reported as [`Event::PromptTooLong`]; the run goes on. It is not journalled, so a later
//! run with a longer-context model answers it.
//!
//! Answers are judged by any [`crate::eval::Judge`] (the refusal detector or a GGUF judge).
//! The library never prints: progress goes to an observer, which can also stop the run.

pub mod output;
pub mod pairing;
pub mod templates;

use crate::data::{ChatMessage, Prompt};
use crate::runtime::{GenerateOptions, RtModel, RuntimeError, Sampling};
use pairing::{Candidate, Judgement, Source};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The default safety system prompt.
pub const DEFAULT_SAFETY_SYSTEM: &str = "You are a helpful, honest and harmless assistant. Help fully with ordinary requests. If a request could help someone cause harm (violence, weapons, crime, self-harm, abuse, hate or harassment, dangerous misinformation), politely decline, briefly say why, and offer a safe alternative if there is one.";

/// Errors that stop a run. Each names the file, line, prompt or field involved.
#[derive(Debug, thiserror::Error)]
pub enum RedteamError {
    #[error("{what} {path}: {error}")]
    Io {
        path: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
    #[error(
        "{path}: the disk is full (a write of {bytes} bytes at byte {at} failed); the file was cut back to its last complete row. Free some space and run the same command again to continue"
    )]
    DiskFull {
        path: PathBuf,
        bytes: usize,
        at: u64,
    },
    #[error(
        "{path} exists but has no progress journal {journal}, so it was not written by `redteam` (or the journal was deleted); choose another --out, or pass --overwrite to replace it"
    )]
    NotOurs { path: PathBuf, journal: PathBuf },
    #[error(
        "{path}: this run was started with {field} = {was}, now {now}; continue with the same settings, or pass --overwrite (or another --out) to start again"
    )]
    SettingsChanged {
        path: PathBuf,
        field: String,
        was: String,
        now: String,
    },
    #[error(
        "{path}:{line}: the progress journal is damaged ({detail}); pass --overwrite to start again"
    )]
    CorruptJournal {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error(
        "{path} is {have} bytes but its progress journal records {want} bytes written; the file was edited or truncated. Pass --overwrite to start again"
    )]
    OutShorter { path: PathBuf, have: u64, want: u64 },
    #[error("{path}:{line}: {detail}; pass --overwrite to start again")]
    CorruptOut {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("generating for {set} prompt {index} ({id}): {error}")]
    Generate {
        set: &'static str,
        index: usize,
        id: String,
        error: Box<RuntimeError>,
    },
    #[error("judging answer {answer} to {set} prompt {index} ({id}) with {judge}: {detail}")]
    Judge {
        set: &'static str,
        index: usize,
        id: String,
        answer: usize,
        judge: String,
        detail: String,
    },
    #[error("invalid option {name} = {value}: expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("no prompts: the harmful set is empty (and no benign prompts were given)")]
    NoPrompts,
}

/// One prompt to answer.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    pub prompt: Prompt,
    /// Where it came from, for provenance and errors (`file:line`, `harmbench:12`).
    pub id: String,
    pub category: Option<String>,
}

/// Turns an `eval` verdict into a pairing judgement (eval's judges give no helpfulness
/// score, so the documented fallback order decides which answer is more helpful).
pub fn judgement_of(v: &crate::eval::Verdict) -> Judgement {
    let mut detail = Vec::new();
    if let Some(c) = &v.category {
        detail.push(format!("category {c}"));
    }
    if let Some(p) = v.p_unsafe {
        detail.push(format!("p_unsafe {p:.4}"));
    }
    if let Some(m) = &v.matched {
        detail.push(format!("refusal phrase {m:?}"));
    }
    Judgement {
        safe: v.safe,
        refused: v.refused,
        helpfulness: None,
        detail: detail.join(", "),
    }
}

/// The text a judge sees as the request: the last user message.
fn request_text(p: &Prompt) -> String {
    match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Messages(m) => m
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}

/// How to make pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct RedteamOptions {
    /// Answers sampled per prompt on the plain prompt.
    pub samples: usize,
    /// Answers sampled per prompt with the safety system prompt (for benign prompts they show
    /// whether the safety prompt makes the model over-refuse; the helpfulness order then prefers
    /// the answer that does not refuse).
    pub safety_samples: usize,
    pub max_tokens: usize,
    /// Temperature, top-k/p, min-p; `sampling.seed` is the run's seed (each answer derives its own).
    pub sampling: Sampling,
    pub safety_system: String,
    /// Add a written refusal to harmful prompts with no safe answer.
    pub refusal_templates: bool,
    /// Add a written refusal to every benign prompt as the less helpful side of a both-safe pair
    /// (a helpful answer beats a refusal): the contrast that teaches a model not to over-refuse
    /// the benign prompts that sound like the harmful ones it learns to refuse.
    pub benign_refusals: bool,
    /// Most pairs kept per prompt.
    pub max_pairs_per_prompt: usize,
    pub threads: Option<usize>,
    /// Names of the prompt sets and the model, recorded in the header.
    pub harmful_name: String,
    pub benign_name: String,
}

impl Default for RedteamOptions {
    fn default() -> Self {
        RedteamOptions {
            samples: 2,
            safety_samples: 1,
            max_tokens: 128,
            sampling: Sampling {
                temperature: 0.7,
                top_p: 0.95,
                ..Sampling::default()
            },
            safety_system: DEFAULT_SAFETY_SYSTEM.to_string(),
            refusal_templates: true,
            benign_refusals: true,
            max_pairs_per_prompt: 3,
            threads: None,
            harmful_name: String::new(),
            benign_name: String::new(),
        }
    }
}

/// Progress of a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Event<'a> {
    /// Before the first prompt: how many prompts, how many were finished by an earlier run.
    Start {
        harmful: usize,
        benign: usize,
        already_done: usize,
        cut_out_bytes: u64,
    },
    /// A prompt is being answered (`position` counts over both sets, from 0).
    PromptStart {
        set: &'static str,
        index: usize,
        position: usize,
        of: usize,
        id: &'a str,
    },
    /// One generated token (`answer` counts within the prompt).
    Token { answer: usize },
    /// One answer finished and judged.
    Answer {
        answer: usize,
        of: usize,
        tokens: usize,
        safe: bool,
        refused: bool,
    },
    /// A prompt was skipped: its rendered conversation has `tokens` tokens, and the model's
    /// context holds `n_ctx` (prompt tokens must be fewer).
    PromptTooLong {
        set: &'static str,
        index: usize,
        id: &'a str,
        tokens: usize,
        n_ctx: usize,
    },
    /// A prompt's rows are on disk.
    PromptDone {
        set: &'static str,
        index: usize,
        pairs: usize,
        no_pair: bool,
    },
}

/// Counts for one prompt set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SetStats {
    /// Prompts in the set (after --limit).
    pub prompts: usize,
    /// Prompts finished (this run and earlier ones).
    pub done: usize,
    /// Finished prompts that gave no usable pair (fewer than two distinct non-empty answers).
    pub no_pair: usize,
    pub pairs: usize,
    pub both_safe: usize,
    pub only_chosen_safe: usize,
    pub only_rejected_safe: usize,
    pub both_unsafe: usize,
    pub duplicates_dropped: usize,
    pub empty_dropped: usize,
    pub templates_added: usize,
    /// Prompts that repeat an earlier prompt of the set (answered once).
    pub duplicate_prompts: usize,
    /// Prompts skipped because they do not fit the model's context.
    #[serde(default)]
    pub too_long: usize,
    pub answers_judged: usize,
    pub answers_judged_safe: usize,
}

impl SetStats {
    fn add(&mut self, d: &output::Done) {
        self.done += 1;
        self.no_pair += usize::from(d.pairs == 0);
        self.pairs += d.pairs;
        self.both_safe += d.cases[0];
        self.only_chosen_safe += d.cases[1];
        self.only_rejected_safe += d.cases[2];
        self.both_unsafe += d.cases[3];
        self.duplicates_dropped += d.duplicates;
        self.empty_dropped += d.empty;
        self.templates_added += d.templates;
        self.answers_judged += d.judged;
        self.answers_judged_safe += d.judged_safe;
    }
}

/// What a run did (including prompts finished by earlier runs of the same `--out`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedteamReport {
    pub out: PathBuf,
    pub journal: PathBuf,
    pub harmful: SetStats,
    pub benign: SetStats,
    /// Prompts skipped because an earlier run had finished them.
    pub resumed_prompts: usize,
    /// Bytes cut from the end of the pairs file on resume (an interrupted prompt's rows).
    pub cut_out_bytes: u64,
    /// Ids of prompts without a usable pair (first 20).
    pub no_pair_examples: Vec<String>,
    /// Prompts skipped as longer than the context (first 20): `id (N tokens, context M)`.
    #[serde(default)]
    pub too_long_examples: Vec<String>,
    /// Tokens generated by this run.
    pub tokens: u64,
    /// Seconds this run took, and summed over every run of this `--out`.
    pub seconds: f64,
    pub seconds_total: f64,
    /// True when the observer stopped the run; run again to continue.
    pub interrupted: bool,
}

impl RedteamReport {
    pub fn pairs(&self) -> usize {
        self.harmful.pairs + self.benign.pairs
    }
}

/// 64-bit key of a prompt (stable across runs and platforms): SHA-256 of its JSON.
pub fn prompt_key(p: &Prompt) -> u64 {
    use sha2::Digest;
    let json = serde_json::to_vec(p).expect("prompts serialize");
    let d = sha2::Sha256::digest(&json);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The seed of one answer: derived from the run's seed, the prompt and the answer's slot.
pub fn answer_seed(seed: u32, key: u64, system: bool, index: usize) -> u32 {
    let stream =
        key ^ ((index as u64) << 1 | u64::from(system)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (crate::util::rng::Rng::derive(u64::from(seed), stream).next_u64() >> 32) as u32
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, RedteamError> {
    use sha2::Digest;
    use std::io::Read;
    let err = |error| RedteamError::Io {
        path: path.to_path_buf(),
        what: "hashing",
        error,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn with_system(p: &Prompt, system: &str) -> Prompt {
    let mut m = p.messages();
    if m.first().is_some_and(|m| m.role == "system") {
        m[0].content = format!("{system}\n\n{}", m[0].content);
    } else {
        m.insert(0, ChatMessage::new("system", system));
    }
    Prompt::Messages(m)
}

impl RedteamOptions {
    fn validate(&self) -> Result<(), RedteamError> {
        let bad = |name, value: usize, expected| {
            Err(RedteamError::InvalidOption {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if self.samples + self.safety_samples == 0 {
            return bad(
                "samples",
                0,
                "at least 1 answer per prompt (samples + safety samples)",
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", 0, "at least 1");
        }
        if self.max_pairs_per_prompt == 0 {
            return bad("max_pairs_per_prompt", 0, "at least 1");
        }
        Ok(())
    }

    fn header(&self, model_sha256: &str, judge: &str) -> output::Header {
        let s = &self.sampling;
        let settings = json!({
            "model_sha256": model_sha256,
            "judge": judge,
            "harmful_set": self.harmful_name,
            "benign_set": self.benign_name,
            "samples": self.samples,
            "safety_samples": self.safety_samples,
            "max_tokens": self.max_tokens,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "seed": s.seed,
            "safety_system": self.safety_system,
            "refusal_templates": self.refusal_templates,
            "benign_refusals": self.benign_refusals,
            "max_pairs_per_prompt": self.max_pairs_per_prompt,
        });
        output::Header {
            tool: "bfpo-lite redteam".into(),
            version: crate::VERSION.into(),
            settings: match settings {
                Value::Object(m) => m,
                _ => unreachable!("json! of an object"),
            },
        }
    }
}

/// Everything about one prompt's answers, before writing.
struct Answered {
    rows: Vec<Value>,
    done: output::Done,
}

/// Runs red-teaming: answers, judges and pairs for every prompt not yet in `out`, appended to
/// `out`. `overwrite` starts again instead of continuing. The observer sees progress and may
/// stop the run (the report then says `interrupted`; prompts on disk are complete).
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &RtModel,
    judge: &dyn crate::eval::Judge,
    harmful: &[PromptItem],
    benign: &[PromptItem],
    opts: &RedteamOptions,
    out: &Path,
    overwrite: bool,
    on_event: &mut dyn FnMut(&Event) -> ControlFlow<()>,
) -> Result<RedteamReport, RedteamError> {
    let t0 = Instant::now();
    opts.validate()?;
    if harmful.is_empty() && benign.is_empty() {
        return Err(RedteamError::NoPrompts);
    }
    let model_sha = file_sha256(model.path())?;
    let judge_name = judge.name();
    let header = opts.header(&model_sha, &judge_name);
    let (mut output, resumed) = output::Output::open(out, &header, overwrite)?;
    let mut report = RedteamReport {
        out: output.path.clone(),
        journal: output.journal_path.clone(),
        cut_out_bytes: resumed.cut_out_bytes,
        ..Default::default()
    };
    report.harmful.prompts = harmful.len();
    report.benign.prompts = benign.len();
    // Finished prompts are found by set and prompt key (not position), so a run continued with
    // another --limit skips what is done and answers the rest.
    let mut done_map = std::collections::HashMap::new();
    for d in &resumed.done {
        report.seconds_total += d.seconds;
        done_map.insert((d.set.clone(), d.key.clone()), d.clone());
    }
    let sets: [(&'static str, &[PromptItem]); 2] = [("harmful", harmful), ("benign", benign)];
    let keys: Vec<Vec<String>> = sets
        .iter()
        .map(|(_, items)| {
            items
                .iter()
                .map(|it| format!("{:016x}", prompt_key(&it.prompt)))
                .collect()
        })
        .collect();
    let already = sets
        .iter()
        .zip(&keys)
        .flat_map(|((s, _), ks)| ks.iter().map(move |k| (s.to_string(), k.clone())))
        .collect::<std::collections::HashSet<_>>()
        .iter()
        .filter(|k| done_map.contains_key(*k))
        .count();
    if on_event(&Event::Start {
        harmful: harmful.len(),
        benign: benign.len(),
        already_done: already,
        cut_out_bytes: resumed.cut_out_bytes,
    })
    .is_break()
    {
        report.interrupted = true;
        return Ok(report);
    }
    let total = harmful.len() + benign.len();
    let mut position = 0;
    for ((set, items), set_keys) in sets.into_iter().zip(&keys) {
        let mut seen = std::collections::HashSet::new();
        for (index, item) in items.iter().enumerate() {
            let key_hex = &set_keys[index];
            let key = u64::from_str_radix(key_hex, 16).expect("hex we wrote");
            if !seen.insert(key) {
                stats_mut(&mut report, set).duplicate_prompts += 1;
                position += 1;
                continue;
            }
            if let Some(d) = done_map.get(&(set.to_string(), key_hex.clone())) {
                stats_mut(&mut report, set).add(d);
                if d.pairs == 0 && report.no_pair_examples.len() < 20 {
                    report.no_pair_examples.push(item.id.clone());
                }
                report.resumed_prompts += 1;
                position += 1;
                continue;
            }
            if let Some((tokens, n_ctx)) = too_long(model, set, index, item, opts)? {
                stats_mut(&mut report, set).too_long += 1;
                if report.too_long_examples.len() < 20 {
                    report
                        .too_long_examples
                        .push(format!("{} ({tokens} tokens, context {n_ctx})", item.id));
                }
                position += 1;
                if on_event(&Event::PromptTooLong {
                    set,
                    index,
                    id: &item.id,
                    tokens,
                    n_ctx,
                })
                .is_break()
                {
                    report.interrupted = true;
                    break;
                }
                continue;
            }
            if on_event(&Event::PromptStart {
                set,
                index,
                position,
                of: total,
                id: &item.id,
            })
            .is_break()
            {
                report.interrupted = true;
                break;
            }
            let tp = Instant::now();
            let answered = match answer_prompt(
                model,
                judge,
                &judge_name,
                &model_sha,
                set,
                index,
                item,
                key,
                opts,
                on_event,
                &mut report.tokens,
            )? {
                Some(a) => a,
                None => {
                    report.interrupted = true;
                    break;
                }
            };
            let mut done = answered.done;
            done.seconds = tp.elapsed().as_secs_f64();
            report.seconds_total += done.seconds;
            let (pairs, no_pair) = (done.pairs, done.pairs == 0);
            output.write_prompt(&answered.rows, done.clone())?;
            stats_mut(&mut report, set).add(&done);
            if no_pair && report.no_pair_examples.len() < 20 {
                report.no_pair_examples.push(item.id.clone());
            }
            position += 1;
            if on_event(&Event::PromptDone {
                set,
                index,
                pairs,
                no_pair,
            })
            .is_break()
            {
                report.interrupted = true;
                break;
            }
        }
        if report.interrupted {
            break;
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// `Some((tokens, n_ctx))` when the prompt (or, with safety samples, the prompt under the
/// safety system prompt) has no room in the model's context: `tokens ≥ n_ctx`, the limit
/// [`RtModel::generate`] enforces.
fn too_long(
    model: &RtModel,
    set: &'static str,
    index: usize,
    item: &PromptItem,
    opts: &RedteamOptions,
) -> Result<Option<(usize, usize)>, RedteamError> {
    let n_ctx = model.n_ctx_train().max(1);
    let encode = |p: &Prompt| {
        model
            .encode_prompt(p)
            .map(|ids| ids.len())
            .map_err(|error| RedteamError::Generate {
                set,
                index,
                id: item.id.clone(),
                error: Box::new(error),
            })
    };
    let mut tokens = if opts.samples > 0 {
        encode(&item.prompt)?
    } else {
        0
    };
    if opts.safety_samples > 0 {
        tokens = tokens.max(encode(&with_system(&item.prompt, &opts.safety_system))?);
    }
    Ok((tokens >= n_ctx).then_some((tokens, n_ctx)))
}

fn stats_mut<'r>(r: &'r mut RedteamReport, set: &str) -> &'r mut SetStats {
    if set == "harmful" {
        &mut r.harmful
    } else {
        &mut r.benign
    }
}

/// A candidate's provenance: its source and verdict (the text is in the row already).
fn side(c: &Candidate) -> Value {
    let mut v = serde_json::to_value(c).expect("candidates serialize");
    if let Value::Object(m) = &mut v {
        m.remove("text");
    }
    v
}

/// Answers, judges and pairs one prompt. `None` when the observer stopped the run.
#[allow(clippy::too_many_arguments)]
fn answer_prompt(
    model: &RtModel,
    judge: &dyn crate::eval::Judge,
    judge_name: &str,
    model_sha: &str,
    set: &'static str,
    index: usize,
    item: &PromptItem,
    key: u64,
    opts: &RedteamOptions,
    on_event: &mut dyn FnMut(&Event) -> ControlFlow<()>,
    tokens: &mut u64,
) -> Result<Option<Answered>, RedteamError> {
    let benign = set == "benign";
    let safety_samples = opts.safety_samples;
    let n_answers = opts.samples + safety_samples;
    let mut cands = Vec::with_capacity(n_answers + 1);
    let mut judged_safe = 0;
    let system_prompt = with_system(&item.prompt, &opts.safety_system);
    let request = request_text(&item.prompt);
    for a in 0..n_answers {
        let system = a >= opts.samples;
        let slot = if system { a - opts.samples } else { a };
        let seed = answer_seed(opts.sampling.seed, key, system, slot);
        let gen_opts = GenerateOptions {
            max_tokens: opts.max_tokens,
            sampling: Sampling {
                seed,
                ..opts.sampling.clone()
            },
            n_ctx: None,
            threads: opts.threads,
        };
        let p = if system { &system_prompt } else { &item.prompt };
        let mut stopped = false;
        let mut cb = |_: &crate::runtime::TokenEvent| {
            if on_event(&Event::Token { answer: a }).is_break() {
                stopped = true;
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let g = model
            .generate(std::slice::from_ref(p), &gen_opts, &mut cb)
            .map_err(|error| RedteamError::Generate {
                set,
                index,
                id: item.id.clone(),
                error: Box::new(error),
            })?
            .remove(0);
        if stopped {
            return Ok(None);
        }
        *tokens += g.ids.len() as u64;
        let verdict = judge
            .judge(&request, g.text.trim())
            .map(|v| judgement_of(&v))
            .map_err(|e| RedteamError::Judge {
                set,
                index,
                id: item.id.clone(),
                answer: a,
                judge: judge_name.to_string(),
                detail: e.to_string(),
            })?;
        judged_safe += usize::from(verdict.safe);
        if on_event(&Event::Answer {
            answer: a,
            of: n_answers,
            tokens: g.ids.len(),
            safe: verdict.safe,
            refused: verdict.refused,
        })
        .is_break()
        {
            return Ok(None);
        }
        let source = if system {
            Source::SafetySystem { index: slot, seed }
        } else {
            Source::Sample { index: slot, seed }
        };
        cands.push(Candidate {
            text: g.text,
            source,
            verdict,
        });
    }
    let (mut cands, duplicates, empty) = pairing::dedup(cands);
    // A harmful prompt with no safe answer gets a written refusal as its safe side; a benign
    // prompt the model did not refuse gets one as its over-refusal side (if the model already
    // refused it, that refusal is the contrast).
    let detail = if benign {
        (opts.benign_refusals && !cands.is_empty() && !cands.iter().any(|c| c.verdict.refused))
            .then_some("written refusal of a benign prompt: the over-refusal side")
    } else {
        (opts.refusal_templates && !cands.iter().any(|c| c.verdict.safe))
            .then_some("written refusal, safe by construction")
    };
    let mut templates = 0;
    if let Some(detail) = detail {
        let t = templates::pick(u64::from(opts.sampling.seed), key);
        cands.push(Candidate {
            text: templates::REFUSAL_TEMPLATES[t].to_string(),
            source: Source::Template { template: t },
            verdict: Judgement {
                safe: true,
                refused: true,
                helpfulness: None,
                detail: detail.into(),
            },
        });
        templates = 1;
    }
    let planned = pairing::plan_pairs(&cands, benign, opts.max_pairs_per_prompt);
    let mut cases = [0usize; 4];
    let mut rows = Vec::with_capacity(planned.len());
    for p in &planned {
        cases[p.case.index()] += 1;
        let (c, r) = (&cands[p.chosen], &cands[p.rejected]);
        rows.push(json!({
            "prompt": item.prompt,
            "chosen": c.text,
            "rejected": r.text,
            "chosen_safe": p.chosen_safe,
            "rejected_safe": p.rejected_safe,
            "provenance": {
                "tool": "bfpo-lite redteam",
                "version": crate::VERSION,
                "set": set,
                "prompt_id": item.id,
                "prompt_index": index,
                "category": item.category,
                "generator": {
                    "model": model.path().file_name().map(|f| f.to_string_lossy().into_owned()),
                    "sha256": model_sha,
                },
                "seed": opts.sampling.seed,
                "judge": judge_name,
                "case": p.case,
                "order_rule": p.rule,
                "chosen": side(c),
                "rejected": side(r),
            },
        }));
    }
    Ok(Some(Answered {
        rows,
        done: output::Done {
            set: set.to_string(),
            index,
            key: format!("{key:016x}"),
            pairs: planned.len(),
            duplicates,
            empty,
            templates,
            cases,
            judged_safe,
            judged: n_answers,
            out_bytes: 0,
            seconds: 0.0,
        },
    }))
}
