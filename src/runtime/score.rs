//! Scoring: per-token log-probs (natural log) of each example's response tokens.
//!
//! Examples are packed into multi-sequence batches (distinct `seq_id`s in one `llama_decode`,
//! unified KV cache, the cache cleared between batches); logits are requested only at the
//! positions that predict response tokens, and log-softmax is computed in f64 from each row.

use super::{CtxSpec, RtModel, RuntimeError};
use crate::data::Example;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

/// Logit rows held at once are capped at this many bytes (rows × n_vocab × 4).
const LOGITS_BUDGET_BYTES: usize = 256 << 20;

/// How to score.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreOptions {
    /// Exact numerics: F32 KV cache and flash attention off (parity tests; slower on GPUs).
    pub exact: bool,
    /// Tokens per decode (several examples share a decode up to this many tokens; a longer
    /// example gets a decode of its own).
    pub batch_tokens: usize,
    /// Examples (sequences) per decode, at most 256.
    pub max_seqs: usize,
    /// Longest example accepted; default: the model's training context.
    pub n_ctx: Option<usize>,
    /// Threads per decode; default: [`RtModel::auto_threads`].
    pub threads: Option<usize>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            exact: false,
            batch_tokens: 512,
            max_seqs: 32,
            n_ctx: None,
            threads: None,
        }
    }
}

impl ScoreOptions {
    /// Defaults with exact numerics (F32 KV cache, flash attention off).
    pub fn exact() -> Self {
        ScoreOptions {
            exact: true,
            ..Default::default()
        }
    }
}

/// `log softmax(row)[target]`, computed in f64 with a running maximum.
pub fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[target] as f64 - max - sum.ln()
}

impl RtModel {
    /// Per-token log-probs of every example's response tokens: `out[e][k]` is
    /// `log p(ids[response_start + k] | ids[..response_start + k])`.
    pub fn score(
        &self,
        examples: &[Example],
        opts: &ScoreOptions,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        Ok(self
            .score_f64(examples, opts, &mut |_, _| {})?
            .into_iter()
            .map(|v| v.into_iter().map(|x| x as f32).collect())
            .collect())
    }

    /// Summed response log-prob of every example (accumulated in f64).
    pub fn score_sums(
        &self,
        examples: &[Example],
        opts: &ScoreOptions,
    ) -> Result<Vec<f64>, RuntimeError> {
        self.score_sums_with_progress(examples, opts, &mut |_, _| {})
    }

    /// [`RtModel::score_sums`] reporting `(examples done, total)` after every decode.
    pub fn score_sums_with_progress(
        &self,
        examples: &[Example],
        opts: &ScoreOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f64>, RuntimeError> {
        Ok(self
            .score_f64(examples, opts, progress)?
            .into_iter()
            .map(|v| v.into_iter().sum())
            .collect())
    }

    /// Per-token log-probs in f64 (see [`RtModel::score`]), with progress.
    pub fn score_f64(
        &self,
        examples: &[Example],
        opts: &ScoreOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f64>>, RuntimeError> {
        self.check_score_options(opts)?;
        let limit = opts.n_ctx.unwrap_or_else(|| self.n_ctx_train()).max(1);
        for (i, ex) in examples.iter().enumerate() {
            if ex.response_start == 0 || ex.response_start > ex.ids.len() {
                return Err(RuntimeError::BadExample {
                    index: i,
                    detail: format!(
                        "response_start {} is outside 1..={} (the example has {} tokens)",
                        ex.response_start,
                        ex.ids.len(),
                        ex.ids.len()
                    ),
                });
            }
            if ex.ids.len() > limit {
                return Err(RuntimeError::TooLong {
                    index: i,
                    len: ex.ids.len(),
                    n_ctx: limit,
                });
            }
            self.check_ids(i, &ex.ids)?;
        }
        let mut out: Vec<Vec<f64>> = examples
            .iter()
            .map(|e| Vec::with_capacity(e.n_scored()))
            .collect();
        if examples.is_empty() {
            return Ok(out);
        }

        let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let n_batch = opts.batch_tokens.max(longest);
        let max_outputs = (LOGITS_BUDGET_BYTES / (self.n_vocab().max(1) * 4)).max(1);
        let batches = pack(examples, opts.batch_tokens, opts.max_seqs, max_outputs);
        let n_seq_max = batches.iter().map(|r| r.len()).max().unwrap_or(1);
        let mut ctx = self.new_context(CtxSpec {
            n_ctx: n_batch,
            n_batch,
            n_ubatch: opts.batch_tokens.min(n_batch),
            n_seq_max,
            exact: opts.exact,
            threads: opts.threads.unwrap_or_else(|| self.auto_threads()),
            kv_unified: true,
        })?;
        let mut batch = LlamaBatch::new(n_batch, 1);
        let mut done = 0;
        for range in batches {
            let n_out: usize = examples[range.clone()].iter().map(|e| e.n_scored()).sum();
            if n_out == 0 {
                done += range.len();
                progress(done, examples.len());
                continue;
            }
            ctx.clear_kv_cache();
            batch.clear();
            // (example index, batch index of its first scored-predicting row)
            let mut rows = Vec::with_capacity(range.len());
            for (slot, e) in range.clone().enumerate() {
                let ex = &examples[e];
                let base = batch.n_tokens() as usize;
                for (p, &t) in ex.ids.iter().enumerate() {
                    let wants = p + 1 >= ex.response_start && p + 1 < ex.ids.len();
                    batch
                        .add(LlamaToken(t as i32), p as i32, &[slot as i32], wants)
                        .map_err(|err| RuntimeError::Decode {
                            n_tokens: batch.n_tokens() as usize,
                            detail: format!("building the batch: {err}"),
                        })?;
                }
                rows.push((e, base));
            }
            let n_tokens = batch.n_tokens() as usize;
            ctx.decode(&mut batch).map_err(|err| RuntimeError::Decode {
                n_tokens,
                detail: err.to_string(),
            })?;
            for (e, base) in rows {
                let ex = &examples[e];
                for p in ex.response_start - 1..ex.ids.len() - 1 {
                    let row = ctx.get_logits_ith((base + p) as i32);
                    let lp = log_softmax_at(row, ex.ids[p + 1] as usize);
                    if !lp.is_finite() {
                        let value = row
                            .iter()
                            .copied()
                            .find(|x| !x.is_finite())
                            .unwrap_or(f32::NAN);
                        return Err(RuntimeError::NonFinite {
                            index: e,
                            position: p,
                            value,
                        });
                    }
                    out[e].push(lp);
                }
            }
            done += range.len();
            progress(done, examples.len());
        }
        Ok(out)
    }

    /// Logits at every position of one sequence: `[ids.len(), n_vocab]` row-major, row `i`
    /// predicting token `i + 1`. With `exact`, F32 KV cache and no flash attention.
    pub fn logits(&self, ids: &[u32], exact: bool) -> Result<Vec<f32>, RuntimeError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let limit = self.n_ctx_train().max(1);
        if ids.len() > limit {
            return Err(RuntimeError::TooLong {
                index: 0,
                len: ids.len(),
                n_ctx: limit,
            });
        }
        self.check_ids(0, ids)?;
        let n = ids.len();
        let mut ctx = self.new_context(CtxSpec {
            n_ctx: n,
            n_batch: n,
            n_ubatch: n,
            n_seq_max: 1,
            exact,
            threads: self.auto_threads(),
            kv_unified: false,
        })?;
        let mut batch = LlamaBatch::new(n, 1);
        for (p, &t) in ids.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), p as i32, &[0], true)
                .map_err(|err| RuntimeError::Decode {
                    n_tokens: n,
                    detail: format!("building the batch: {err}"),
                })?;
        }
        ctx.decode(&mut batch).map_err(|err| RuntimeError::Decode {
            n_tokens: n,
            detail: err.to_string(),
        })?;
        let n_vocab = self.n_vocab();
        let mut out = Vec::with_capacity(n * n_vocab);
        for i in 0..n {
            out.extend_from_slice(ctx.get_logits_ith(i as i32));
        }
        Ok(out)
    }

    fn check_score_options(&self, opts: &ScoreOptions) -> Result<(), RuntimeError> {
        if opts.batch_tokens == 0 {
            return Err(RuntimeError::InvalidOption {
                name: "batch_tokens",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        if opts.max_seqs == 0 || opts.max_seqs > 256 {
            return Err(RuntimeError::InvalidOption {
                name: "max_seqs",
                value: opts.max_seqs.to_string(),
                expected: "1..=256 (llama.cpp's LLAMA_MAX_SEQ)",
            });
        }
        if opts.threads == Some(0) {
            return Err(RuntimeError::InvalidOption {
                name: "threads",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

/// Greedy packing in order: a batch takes examples while they fit `batch_tokens` tokens,
/// `max_seqs` sequences and `max_outputs` logit rows; an example that alone exceeds a limit
/// gets a batch of its own.
fn pack(
    examples: &[Example],
    batch_tokens: usize,
    max_seqs: usize,
    max_outputs: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let (mut toks, mut outs) = (0usize, 0usize);
    for (i, e) in examples.iter().enumerate() {
        let fits = i - start < max_seqs
            && toks + e.ids.len() <= batch_tokens
            && outs + e.n_scored() <= max_outputs;
        if !fits && i > start {
            out.push(start..i);
            start = i;
            toks = 0;
            outs = 0;
        }
        toks += e.ids.len();
        outs += e.n_scored();
    }
    if start < examples.len() {
        out.push(start..examples.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, start: usize) -> Example {
        Example {
            ids: vec![1; len],
            response_start: start,
        }
    }

    #[test]
    fn packing_respects_every_limit_and_keeps_order() {
        let exs = vec![ex(5, 2), ex(5, 2), ex(20, 1), ex(3, 1), ex(3, 1), ex(3, 1)];
        let b = pack(&exs, 10, 2, 1000);
        assert_eq!(b, vec![0..2, 2..3, 3..5, 5..6]);
        // outputs limit: n_scored 3, 3 → max_outputs 5 splits them
        let b = pack(&exs[..2], 100, 8, 5);
        assert_eq!(b, vec![0..1, 1..2]);
        assert!(pack(&[], 10, 2, 10).is_empty());
    }

    #[test]
    fn log_softmax_matches_direct_formula() {
        let row = [1.0f32, 2.0, 3.0, -1.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        for t in 0..4 {
            let want = (row[t] as f64).exp().ln() - z.ln();
            assert!((log_softmax_at(&row, t) - want).abs() < 1e-12);
        }
        // large logits do not overflow
        let big = [1000.0f32, 1000.0];
        assert!((log_softmax_at(&big, 0) - (0.5f64).ln()).abs() < 1e-12);
    }
}
