//! From token ids to training batches: truncation into [`Example`]s, length-bucketed batches of
//! pair indices, and a deterministic held-out split.
//!
//! Tokenization (chat template, BOS/EOS) is the runtime's job; this module takes the token ids
//! of a prompt and of its two responses.
//!
//! # Truncation ([`TruncationConfig`], TRL 0.7.7 `tokenize_row` with `truncation_mode = keep_end`)
//! With `L = max_length`, `P = max_prompt_length` and `R = max(|chosen|, |rejected|)`:
//! 1. if `|prompt| + R > L`, the prompt keeps its **last** `P` tokens (after the first
//!    `keep_prompt_prefix` tokens, which are always kept, e.g. a BOS the template emitted);
//! 2. if still `|prompt| + R > L`, each response keeps its **first** `L − P` tokens
//!    ([`ResponseBudget::Trl`], what the BFPO authors ran) or `L − |prompt|` tokens
//!    ([`ResponseBudget::Remaining`], which uses the space a short prompt leaves).
//!
//! Every sequence then has at most `L` tokens. What was cut is counted in [`Truncation`] and
//! summed over a dataset in [`TruncationStats`].
//!
//! # Batches ([`Batcher`])
//! Each epoch: shuffle the pair indices (seeded by `(seed, epoch)`), cut them into buckets of
//! `bucket_batches × batch_size`, sort each bucket by length (longest first), cut the buckets
//! into batches, and shuffle the order of the batches. Pairs of similar length share a batch
//! (less padding) while the order stays random. Every index appears exactly once per epoch
//! (unless `drop_last` drops the final short batch).
//!
//! # Held-out split ([`split_heldout`])
//! By prompt, so that no held-out prompt is trained on: prompts are ordered by a seeded SHA-256
//! of their content and taken until the held-out part holds `round(fraction × pairs)` pairs.
//! The split depends only on the seed and the pairs' contents, not on their order in the file.

use super::example::{Example, Pair};
use crate::util::Rng;
use sha2::{Digest, Sha256};

/// Errors from building examples, batches or splits.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error(
        "--max-prompt-length {max_prompt_length} must be at least 1 and less than --max-length {max_length} (and keep_prompt_prefix {keep_prompt_prefix} less than it)"
    )]
    BadLengths {
        max_length: usize,
        max_prompt_length: usize,
        keep_prompt_prefix: usize,
    },
    #[error(
        "pair {index}: the prompt has no tokens; the first response token must be predicted from something (add BOS or a chat template)"
    )]
    EmptyPrompt { index: usize },
    #[error(
        "pair {index}: the {side} response has no tokens; it would contribute nothing to the loss"
    )]
    EmptyResponse { index: usize, side: &'static str },
    #[error("batch size must be at least 1 (got {0})")]
    BatchSize(usize),
    #[error("held-out fraction {0} must be in [0, 1)")]
    Fraction(f64),
}

/// Which responses' length limit applies in step 2 of truncation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseBudget {
    /// `max_length − max_prompt_length` (TRL 0.7.7, the BFPO authors' runs).
    #[default]
    Trl,
    /// `max_length − |truncated prompt|`.
    Remaining,
}

/// Length limits (`--max-length 1024 --max-prompt-length 512`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TruncationConfig {
    pub max_length: usize,
    pub max_prompt_length: usize,
    /// Leading prompt tokens never cut (e.g. 1 to keep a BOS); they count toward
    /// `max_prompt_length`.
    pub keep_prompt_prefix: usize,
    pub response_budget: ResponseBudget,
}

impl Default for TruncationConfig {
    fn default() -> Self {
        TruncationConfig {
            max_length: 1024,
            max_prompt_length: 512,
            keep_prompt_prefix: 0,
            response_budget: ResponseBudget::Trl,
        }
    }
}

impl TruncationConfig {
    pub fn validate(&self) -> Result<(), BatchError> {
        if self.max_prompt_length == 0
            || self.max_prompt_length >= self.max_length
            || self.keep_prompt_prefix >= self.max_prompt_length
        {
            return Err(BatchError::BadLengths {
                max_length: self.max_length,
                max_prompt_length: self.max_prompt_length,
                keep_prompt_prefix: self.keep_prompt_prefix,
            });
        }
        Ok(())
    }

    /// A short string of the settings, for cache keys.
    pub fn fingerprint(&self) -> String {
        format!(
            "max_length={} max_prompt_length={} keep_prompt_prefix={} response_budget={:?}",
            self.max_length, self.max_prompt_length, self.keep_prompt_prefix, self.response_budget
        )
    }
}

/// Tokens cut from one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Truncation {
    pub prompt_dropped: usize,
    pub chosen_dropped: usize,
    pub rejected_dropped: usize,
}

impl Truncation {
    pub fn any(&self) -> bool {
        self.prompt_dropped + self.chosen_dropped + self.rejected_dropped > 0
    }
}

/// Truncation summed over a dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TruncationStats {
    pub pairs: usize,
    /// Pairs whose prompt was cut.
    pub prompts_truncated: usize,
    /// Pairs with at least one response cut.
    pub responses_truncated: usize,
    pub prompt_tokens_dropped: usize,
    pub response_tokens_dropped: usize,
    /// Longest sequence (prompt + response) after truncation.
    pub max_sequence_length: usize,
}

impl TruncationStats {
    pub fn add(&mut self, ex: &PairExamples) {
        let t = &ex.truncation;
        self.pairs += 1;
        self.prompts_truncated += usize::from(t.prompt_dropped > 0);
        self.responses_truncated += usize::from(t.chosen_dropped + t.rejected_dropped > 0);
        self.prompt_tokens_dropped += t.prompt_dropped;
        self.response_tokens_dropped += t.chosen_dropped + t.rejected_dropped;
        self.max_sequence_length = self
            .max_sequence_length
            .max(ex.chosen.len())
            .max(ex.rejected.len());
    }
}

/// The two tokenized sequences of a pair.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairExamples {
    /// prompt + chosen (more helpful) response.
    pub chosen: Example,
    /// prompt + rejected response.
    pub rejected: Example,
    pub truncation: Truncation,
}

impl PairExamples {
    /// The padded length this pair needs in a batch.
    pub fn len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the chosen and rejected [`Example`]s of pair `index` (used in error messages) from
/// token ids, truncating as described in the module documentation.
pub fn build_pair_examples(
    index: usize,
    prompt: &[u32],
    chosen: &[u32],
    rejected: &[u32],
    cfg: &TruncationConfig,
) -> Result<PairExamples, BatchError> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(BatchError::EmptyPrompt { index });
    }
    if chosen.is_empty() {
        return Err(BatchError::EmptyResponse {
            index,
            side: "chosen",
        });
    }
    if rejected.is_empty() {
        return Err(BatchError::EmptyResponse {
            index,
            side: "rejected",
        });
    }
    let longer = chosen.len().max(rejected.len());
    let mut t = Truncation::default();
    // 1. Keep the end of the prompt (and its protected prefix).
    let mut p: Vec<u32> = prompt.to_vec();
    if p.len() + longer > cfg.max_length && p.len() > cfg.max_prompt_length {
        let keep_start = cfg.keep_prompt_prefix.min(p.len());
        let keep_end = cfg.max_prompt_length - keep_start;
        let mut kept = prompt[..keep_start].to_vec();
        kept.extend_from_slice(&prompt[prompt.len() - keep_end..]);
        t.prompt_dropped = prompt.len() - kept.len();
        p = kept;
    }
    // 2. Keep the start of each response.
    let (mut c, mut r) = (chosen, rejected);
    if p.len() + longer > cfg.max_length {
        let budget = match cfg.response_budget {
            ResponseBudget::Trl => cfg.max_length - cfg.max_prompt_length,
            ResponseBudget::Remaining => cfg.max_length - p.len(),
        };
        if c.len() > budget {
            t.chosen_dropped = c.len() - budget;
            c = &c[..budget];
        }
        if r.len() > budget {
            t.rejected_dropped = r.len() - budget;
            r = &r[..budget];
        }
    }
    let make = |resp: &[u32]| {
        let mut ids = Vec::with_capacity(p.len() + resp.len());
        ids.extend_from_slice(&p);
        ids.extend_from_slice(resp);
        Example {
            ids,
            response_start: p.len(),
        }
    };
    Ok(PairExamples {
        chosen: make(c),
        rejected: make(r),
        truncation: t,
    })
}

/// Length-bucketed batching of pair indices (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batcher {
    /// Pairs per batch.
    pub batch_size: usize,
    /// Batches per bucket: 1 = sort within each batch only (random lengths per batch); larger
    /// = batches of more similar lengths.
    pub bucket_batches: usize,
    /// Drop the final batch of an epoch if it is shorter than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
}

impl Batcher {
    pub fn new(batch_size: usize, seed: u64) -> Batcher {
        Batcher {
            batch_size,
            bucket_batches: 16,
            drop_last: false,
            seed,
        }
    }

    /// The batches of one epoch: lists of indices into `lengths` (a pair's padded length,
    /// [`PairExamples::len`]). Deterministic for `(seed, epoch, lengths)`.
    pub fn epoch(&self, lengths: &[usize], epoch: u64) -> Result<Vec<Vec<usize>>, BatchError> {
        if self.batch_size == 0 {
            return Err(BatchError::BatchSize(0));
        }
        let mut rng = Rng::derive(self.seed, epoch.wrapping_add(0xB47C));
        let mut idx: Vec<usize> = (0..lengths.len()).collect();
        rng.shuffle(&mut idx);
        let bucket = self.batch_size * self.bucket_batches.max(1);
        let mut batches = Vec::with_capacity(lengths.len().div_ceil(self.batch_size));
        for chunk in idx.chunks_mut(bucket) {
            // Stable: equal lengths keep their shuffled order.
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            for b in chunk.chunks(self.batch_size) {
                batches.push(b.to_vec());
            }
        }
        if self.drop_last {
            batches.retain(|b| b.len() == self.batch_size);
        }
        rng.shuffle(&mut batches);
        Ok(batches)
    }
}

/// Padding overhead of a batching: padded tokens / real tokens − 1 (0 = no padding).
pub fn padding_overhead(lengths: &[usize], batches: &[Vec<usize>]) -> f64 {
    let (mut real, mut padded) = (0usize, 0usize);
    for b in batches {
        let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        real += b.iter().map(|&i| lengths[i]).sum::<usize>();
        padded += max * b.len();
    }
    if real == 0 {
        0.0
    } else {
        padded as f64 / real as f64 - 1.0
    }
}

/// Indices of the training and held-out pairs (each ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldoutSplit {
    pub train: Vec<usize>,
    pub heldout: Vec<usize>,
}

/// Splits pairs into training and held-out parts by prompt (see the module documentation).
/// With `fraction > 0` and at least two distinct prompts, the held-out part holds at least one
/// prompt and the training part at least one.
pub fn split_heldout(pairs: &[Pair], fraction: f64, seed: u64) -> Result<HeldoutSplit, BatchError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(BatchError::Fraction(fraction));
    }
    // Group pairs by prompt, keyed by a seeded hash of the prompt's JSON.
    let mut groups: std::collections::BTreeMap<[u8; 32], Vec<usize>> = Default::default();
    for (i, p) in pairs.iter().enumerate() {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(serde_json::to_vec(&p.prompt).expect("prompt serializes"));
        groups.entry(h.finalize().into()).or_default().push(i);
    }
    let want = (fraction * pairs.len() as f64).round() as usize;
    let mut out = HeldoutSplit::default();
    let n_groups = groups.len();
    for (k, (_, members)) in groups.into_iter().enumerate() {
        let take = fraction > 0.0
            && k + 1 < n_groups
            && (out.heldout.len() < want || out.heldout.is_empty());
        if take {
            out.heldout.extend(members);
        } else {
            out.train.extend(members);
        }
    }
    out.train.sort_unstable();
    out.heldout.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_example_from_the_docs() {
        // L = 10, P = 4: prompt 6, responses 7 and 3 ⇒ prompt keeps its last 4, then responses
        // their first 6.
        let cfg = TruncationConfig {
            max_length: 10,
            max_prompt_length: 4,
            ..TruncationConfig::default()
        };
        let e = build_pair_examples(
            0,
            &[1, 2, 3, 4, 5, 6],
            &[10, 11, 12, 13, 14, 15, 16],
            &[20, 21, 22],
            &cfg,
        )
        .unwrap();
        assert_eq!(e.chosen.ids, [3, 4, 5, 6, 10, 11, 12, 13, 14, 15]);
        assert_eq!(e.rejected.ids, [3, 4, 5, 6, 20, 21, 22]);
        assert_eq!(e.chosen.response_start, 4);
        assert_eq!(
            e.truncation,
            Truncation {
                prompt_dropped: 2,
                chosen_dropped: 1,
                rejected_dropped: 0
            }
        );
    }
}
