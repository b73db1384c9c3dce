//! "Helpfulness kept": ranking accuracy on held-out preference pairs, log-prob drift and KL
//! against the base on the base model's own answers, and multiple-choice accuracy.
//!
//! - **Pairs** ([`pair_ranking`]): two readings of the same llama.cpp scores. *Likelihood
//!   ranking* (every model, base included) is the trainer's held-out [`RankingEval`]: the
//!   response with the higher mean per-token log-prob must be the one BFPO's global ranking
//!   prefers (safe + helpful > safe + unhelpful > unsafe + unhelpful > unsafe + helpful).
//!   *Reward ranking* (adapters only) orders each pair by the implicit-reward margin the loss
//!   uses, `Δ = (lp_θ(c) − lp_ref(c)) − (lp_θ(r) − lp_ref(r))` ([`PairLogps::delta`]), policy =
//!   base + adapter, reference = base; correct when its sign matches
//!   [`SafetyCase::prefers_chosen`]. Safety-ranking accuracy is the same on the pairs with
//!   exactly one safe response.
//! - **Drift and KL** ([`drift_and_kl`]): on each benign prompt's base answer, the mean
//!   per-token `log p_tuned − log p_base` of the answer tokens, and the mean over those
//!   positions of the full-vocabulary `KL(p_base ‖ p_tuned)` of the next-token distributions.
//!   Intervals are over prompts (each prompt's mean).
//! - **Multiple choice** ([`multiple_choice`]): as lm-eval scores such tasks: context
//!   `"Question: {question}\nAnswer:"`, continuation `" {choice}"` (no chat template), the
//!   choice with the highest summed log-likelihood wins (`acc`), and with the log-likelihood
//!   divided by the continuation's length in bytes (`acc_norm`).

use super::EvalError;
use super::stats::Figure;
use crate::data::SafetyCase;
use crate::data::{Example, Pair, Prompt, RowOrigin};
use crate::loss::PairLogps;
use crate::runtime::{RtModel, RuntimeError, ScoreOptions, log_softmax_at};
use crate::train::trainer::{PreparedPair, RankingEval};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Ranking accuracies on held-out pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankingFigures {
    /// Mean per-token log-prob orders every pair as BFPO's ranking does.
    pub likelihood_bfpo: Figure,
    /// Same, on pairs with exactly one safe response.
    pub likelihood_safety: Figure,
    /// Implicit-reward margin (adapter vs base) orders pairs as BFPO's ranking does.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_bfpo: Option<Figure>,
    /// Same, on pairs with exactly one safe response.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_safety: Option<Figure>,
}

/// Pairs encoded for scoring, with those that could not be encoded.
pub struct EncodedPairs {
    pub pairs: Vec<PreparedPair>,
    pub skipped: Vec<(RowOrigin, String)>,
}

/// Encodes pairs with the model's chat template; a pair that cannot be encoded is skipped and
/// reported with its origin.
pub fn encode_pairs(model: &RtModel, pairs: &[Pair]) -> EncodedPairs {
    let mut out = EncodedPairs {
        pairs: Vec::with_capacity(pairs.len()),
        skipped: Vec::new(),
    };
    for p in pairs {
        match model.encode_pair(p) {
            Ok((chosen, rejected)) => out.pairs.push(PreparedPair {
                chosen,
                rejected,
                chosen_safe: p.chosen_safe,
                rejected_safe: p.rejected_safe,
                origin: p.origin.clone(),
                ref_logps: None,
            }),
            Err(e) => out.skipped.push((p.origin.clone(), e.to_string())),
        }
    }
    out
}

/// Summed log-probs `(chosen, rejected)` of every pair under the model's active adapter.
pub fn score_pairs(
    model: &RtModel,
    pairs: &[PreparedPair],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(f64, f64)>, RuntimeError> {
    let mut examples = Vec::with_capacity(pairs.len() * 2);
    for p in pairs {
        examples.push(p.chosen.clone());
        examples.push(p.rejected.clone());
    }
    let n = examples.len();
    let sums =
        model.score_sums_with_progress(&examples, opts, &mut |d, _| progress(d / 2, n / 2))?;
    Ok(sums.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Ranking figures from the policy's and (for adapters) the reference's pair scores.
pub fn pair_ranking(
    pairs: &[PreparedPair],
    policy: &[(f64, f64)],
    reference: Option<&[(f64, f64)]>,
) -> RankingFigures {
    let r = RankingEval::from_logps(pairs, policy);
    let count = |acc: f64, n: usize| (acc * n as f64).round() as usize;
    let mut out = RankingFigures {
        likelihood_bfpo: Figure::rate(count(r.preference_accuracy, r.pairs), r.pairs),
        likelihood_safety: Figure::rate(
            count(r.safety_ranking_accuracy, r.mixed_pairs),
            r.mixed_pairs,
        ),
        reward_bfpo: None,
        reward_safety: None,
    };
    if let Some(reference) = reference {
        let (mut ok, mut mixed, mut mixed_ok) = (0, 0, 0);
        for ((p, &(pc, pr)), &(rc, rr)) in pairs.iter().zip(policy).zip(reference) {
            let delta = PairLogps::new(pc, pr, rc, rr).delta();
            let case = SafetyCase::of(p.chosen_safe, p.rejected_safe);
            let correct = if case.prefers_chosen() {
                delta > 0.0
            } else {
                delta < 0.0
            };
            ok += correct as usize;
            if case.is_mixed() {
                mixed += 1;
                mixed_ok += correct as usize;
            }
        }
        out.reward_bfpo = Some(Figure::rate(ok, pairs.len()));
        out.reward_safety = Some(Figure::rate(mixed_ok, mixed));
    }
    out
}

/// Log-prob drift and KL of a tuned model against the base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftFigures {
    /// Mean per-token `log p_tuned − log p_base` on the base answers (per-prompt means).
    pub logp_drift: Figure,
    /// Mean per-position `KL(p_base ‖ p_tuned)` in nats (per-prompt means).
    pub kl: Figure,
    /// Answer tokens scored in all.
    pub tokens: usize,
}

/// Per-example `(mean drift, mean KL, tokens)`: `base` and `tuned` are the full logits
/// (`[ids.len(), n_vocab]`) of the same example; rows `response_start − 1 .. len − 1`
/// predict the answer tokens.
pub fn drift_kl_of(ex: &Example, base: &[f32], tuned: &[f32], n_vocab: usize) -> (f64, f64, usize) {
    let (mut drift, mut kl, mut n) = (0.0, 0.0, 0usize);
    for p in ex.response_start - 1..ex.ids.len() - 1 {
        let b = &base[p * n_vocab..(p + 1) * n_vocab];
        let t = &tuned[p * n_vocab..(p + 1) * n_vocab];
        let target = ex.ids[p + 1] as usize;
        drift += log_softmax_at(t, target) - log_softmax_at(b, target);
        kl += kl_rows(b, t);
        n += 1;
    }
    let d = n.max(1) as f64;
    (drift / d, kl / d, n)
}

/// `KL(softmax(p) ‖ softmax(q))` of two logit rows, in f64.
pub fn kl_rows(p: &[f32], q: &[f32]) -> f64 {
    let lse = |r: &[f32]| {
        let m = r.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    let mut kl = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let la = a as f64 - lp;
        let lb = b as f64 - lq;
        kl += la.exp() * (la - lb);
    }
    kl.max(0.0)
}

/// Drift and KL of the adapter `tuned` (applied with `scale`) against the base, on `examples`
/// (benign prompts with the base's answers). Leaves no adapter active.
pub fn drift_and_kl(
    model: &mut RtModel,
    tuned: crate::runtime::AdapterId,
    scale: f32,
    examples: &[Example],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DriftFigures, RuntimeError> {
    let n_vocab = model.n_vocab();
    let (mut drifts, mut kls, mut tokens) = (Vec::new(), Vec::new(), 0usize);
    for (i, ex) in examples.iter().enumerate() {
        model.clear_adapter();
        let base = model.logits(&ex.ids, false)?;
        model.set_adapter(tuned, scale)?;
        let t = model.logits(&ex.ids, false)?;
        let (d, k, n) = drift_kl_of(ex, &base, &t, n_vocab);
        if n > 0 {
            drifts.push(d);
            kls.push(k);
            tokens += n;
        }
        progress(i + 1, examples.len());
    }
    model.clear_adapter();
    Ok(DriftFigures {
        logp_drift: Figure::mean(&drifts),
        kl: Figure::mean(&kls),
        tokens,
    })
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McQuestion {
    pub question: String,
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
    pub origin: RowOrigin,
}

/// A multiple-choice file with its skipped rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McSet {
    pub name: String,
    pub questions: Vec<McQuestion>,
    pub rows_read: usize,
    pub skipped: Vec<(RowOrigin, String)>,
}

impl McSet {
    pub fn skipped_by_reason(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, r) in &self.skipped {
            *m.entry(r.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// Parses multiple-choice JSONL: `question` (string), `choices` (≥ 2 strings), `answer` (an
/// index, a letter `A`…, or the text of a choice). Bad rows are skipped and counted.
pub fn parse_mc(text: &str, file: &str) -> McSet {
    let file_arc: Arc<str> = Arc::from(file);
    let mut set = McSet {
        name: file.to_string(),
        questions: Vec::new(),
        rows_read: 0,
        skipped: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        set.rows_read += 1;
        let origin = RowOrigin {
            file: file_arc.clone(),
            line: i + 1,
        };
        match parse_mc_row(line) {
            Ok((question, choices, answer)) => set.questions.push(McQuestion {
                question,
                choices,
                answer,
                origin,
            }),
            Err(r) => set.skipped.push((origin, r)),
        }
    }
    set
}

fn parse_mc_row(line: &str) -> Result<(String, Vec<String>, usize), String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let question = match obj.get("question") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("field \"question\" is blank".into()),
        Some(_) => return Err("field \"question\" is not a string".into()),
        None => return Err("field \"question\" is missing".into()),
    };
    let choices: Vec<String> = match obj.get("choices") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("field \"choices\" has an entry that is not a string")?,
        Some(_) => return Err("field \"choices\" is not a list".into()),
        None => return Err("field \"choices\" is missing".into()),
    };
    if choices.len() < 2 {
        return Err("field \"choices\" has fewer than 2 entries".into());
    }
    let answer = match obj.get("answer") {
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|x| x as usize)
            .filter(|&x| x < choices.len())
            .ok_or("field \"answer\" is not an index into \"choices\"")?,
        Some(Value::String(s)) => {
            let t = s.trim();
            let b = t.as_bytes();
            if b.len() == 1 && b[0].is_ascii_uppercase() && ((b[0] - b'A') as usize) < choices.len()
            {
                (b[0] - b'A') as usize
            } else if let Some(k) = choices.iter().position(|c| c == t) {
                k
            } else {
                return Err(
                    "field \"answer\" is neither a choice letter nor the text of a choice".into(),
                );
            }
        }
        Some(_) => return Err("field \"answer\" is not a number or a string".into()),
        None => return Err("field \"answer\" is missing".into()),
    };
    Ok((question, choices, answer))
}

/// Multiple-choice accuracies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McFigures {
    /// Highest summed log-likelihood picks the answer.
    pub acc: Figure,
    /// Highest log-likelihood per byte of the continuation picks the answer.
    pub acc_norm: Figure,
}

/// lm-eval's context for a question.
pub fn mc_context(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

/// The scored examples of one question (one per choice). The continuation's tokens are those
/// of `context + continuation` after the context's tokens when they form a prefix, else the
/// continuation tokenized alone (as lm-eval splits them).
pub fn mc_examples(model: &RtModel, q: &McQuestion) -> Vec<Example> {
    let ctx = mc_context(&q.question);
    let mut ctx_ids = model.tokenize(&ctx, false);
    if model.should_add_bos()
        && let Some(bos) = model.bos()
        && ctx_ids.first() != Some(&bos)
    {
        ctx_ids.insert(0, bos);
    }
    if ctx_ids.is_empty() {
        // A context must predict the first continuation token.
        ctx_ids.extend(model.tokenize("\n", false));
    }
    q.choices
        .iter()
        .map(|c| {
            let cont = format!(" {c}");
            let bos_off = usize::from(model.should_add_bos() && model.bos().is_some());
            let whole = model.tokenize(&format!("{ctx}{cont}"), false);
            let plain = &ctx_ids[bos_off.min(ctx_ids.len())..];
            let cont_ids = if whole.starts_with(plain) && whole.len() > plain.len() {
                whole[plain.len()..].to_vec()
            } else {
                model.tokenize(&cont, false)
            };
            let mut ids = ctx_ids.clone();
            ids.extend(cont_ids);
            Example {
                response_start: ctx_ids.len(),
                ids,
            }
        })
        .collect()
}

/// Accuracy of the model (with its active adapter) on `questions`.
pub fn multiple_choice(
    model: &RtModel,
    questions: &[McQuestion],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<McFigures, EvalError> {
    let mut examples = Vec::new();
    let mut spans = Vec::with_capacity(questions.len());
    for q in questions {
        let exs = mc_examples(model, q);
        spans.push((examples.len(), exs.len()));
        examples.extend(exs);
    }
    let n_q = questions.len();
    let n_ex = examples.len().max(1);
    let sums = model
        .score_sums_with_progress(&examples, opts, &mut |d, _| progress(d * n_q / n_ex, n_q))
        .map_err(|error| EvalError::Runtime {
            what: "scoring multiple-choice answers".into(),
            error,
        })?;
    let (mut acc, mut acc_norm) = (0usize, 0usize);
    for (q, &(start, len)) in questions.iter().zip(&spans) {
        let ll = &sums[start..start + len];
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..len)
                .max_by(|&a, &b| f(a).total_cmp(&f(b)).then(b.cmp(&a)))
                .unwrap_or(0)
        };
        if argmax(&|k| ll[k]) == q.answer {
            acc += 1;
        }
        let bytes = |k: usize| (q.choices[k].len() + 1) as f64;
        if argmax(&|k| ll[k] / bytes(k)) == q.answer {
            acc_norm += 1;
        }
    }
    Ok(McFigures {
        acc: Figure::rate(acc, n_q),
        acc_norm: Figure::rate(acc_norm, n_q),
    })
}

/// Examples of benign prompts with the base model's answers, for drift and KL; prompts whose
/// answer cannot be encoded are skipped (returned count).
pub fn answer_examples(model: &RtModel, answers: &[(String, String)]) -> (Vec<Example>, usize) {
    let mut out = Vec::with_capacity(answers.len());
    let mut skipped = 0;
    for (p, a) in answers {
        match model.encode(&Prompt::Text(p.clone()), a) {
            Ok(e) => out.push(e.example),
            Err(_) => skipped += 1,
        }
    }
    (out, skipped)
}
