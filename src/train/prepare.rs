//! From dataset files to training pairs: load (formats), chat-template and tokenize through
//! llama.cpp (runtime), truncate, split off held-out pairs, and fill reference log-probs from the
//! on-disk cache or the engine. Nothing is dropped silently: every skipped row is counted with a
//! reason and the first few `file:line` examples are kept.

use crate::data::batch::{TruncationConfig, TruncationStats, build_pair_examples, split_heldout};
use crate::data::formats::{LoadError, LoadOptions, LoadReport, SafetyMix, load_many};
use crate::data::refcache::{RefCache, RefLogps};
use crate::data::{Example, Pair};
use crate::runtime::RtModel;
use crate::train::trainer::{Engine, Event, PreparedPair, TrainError, compute_reference};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{origin}: {detail}")]
    Encode { origin: String, detail: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{0}")]
    Other(String),
}

/// Rows that made it no further than loading, and why.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PrepareReport {
    pub loads: Vec<LoadReportSummary>,
    /// Pairs whose text could not be tokenized into a valid example, by reason.
    pub encode_skipped: BTreeMap<String, usize>,
    /// First few skipped pairs (`file:line: reason`).
    pub encode_examples: Vec<String>,
    pub truncation: TruncationSummary,
    pub pairs: usize,
    /// Pairs in each of BFPO's four safety cases, per set, after encoding.
    pub safety: SafetyCases,
}

/// Pairs in each of BFPO's four safety cases, per set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SafetyCases {
    pub train: SafetyMix,
    pub eval: SafetyMix,
    pub buffer: SafetyMix,
}

/// The safety cases of encoded pairs.
pub fn safety_mix(pairs: &[PreparedPair]) -> SafetyMix {
    let mut m = SafetyMix::default();
    for p in pairs {
        m.add_case(
            crate::data::SafetyCase::of(p.chosen_safe, p.rejected_safe),
            1,
        );
    }
    m
}

/// The parts of a [`LoadReport`] worth printing and saving.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReportSummary {
    pub path: PathBuf,
    pub format: String,
    pub rows_read: usize,
    pub pairs_loaded: usize,
    pub skipped_by_reason: BTreeMap<String, usize>,
    pub examples: Vec<String>,
    /// The loaded pairs in each of BFPO's four safety cases.
    pub safety: SafetyMix,
}

impl From<&LoadReport> for LoadReportSummary {
    fn from(r: &LoadReport) -> Self {
        LoadReportSummary {
            path: r.path.clone(),
            format: format!("{:?}", r.format).to_lowercase(),
            rows_read: r.rows_read,
            pairs_loaded: r.pairs_loaded,
            skipped_by_reason: r.skipped_by_reason.clone(),
            examples: r
                .examples
                .iter()
                .map(|s| format!("{}: {} ({})", s.origin, s.reason, s.detail))
                .collect(),
            safety: r.safety,
        }
    }
}

/// Serializable truncation numbers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TruncationSummary {
    pub prompts_truncated: usize,
    pub responses_truncated: usize,
    pub prompt_tokens_dropped: usize,
    pub response_tokens_dropped: usize,
    pub max_sequence_length: usize,
}

impl From<&TruncationStats> for TruncationSummary {
    fn from(t: &TruncationStats) -> Self {
        TruncationSummary {
            prompts_truncated: t.prompts_truncated,
            responses_truncated: t.responses_truncated,
            prompt_tokens_dropped: t.prompt_tokens_dropped,
            response_tokens_dropped: t.response_tokens_dropped,
            max_sequence_length: t.max_sequence_length,
        }
    }
}

impl PrepareReport {
    /// Total rows skipped for any reason (loading or encoding).
    pub fn skipped(&self) -> usize {
        self.loads
            .iter()
            .map(|l| l.skipped_by_reason.values().sum::<usize>())
            .sum::<usize>()
            + self.encode_skipped.values().sum::<usize>()
    }
}

/// Loads pair files.
pub fn load(
    files: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(Vec<Pair>, Vec<LoadReportSummary>), PrepareError> {
    let (pairs, reports) = load_many(files, opts)?;
    Ok((pairs, reports.iter().map(LoadReportSummary::from).collect()))
}

/// Tokenizes and truncates pairs. With `strict`, the first pair that cannot be encoded stops
/// with an error naming its `file:line`; otherwise it is skipped and counted.
pub fn encode_pairs(
    rt: &RtModel,
    pairs: &[Pair],
    trunc: &TruncationConfig,
    strict: bool,
    report: &mut PrepareReport,
) -> Result<Vec<PreparedPair>, PrepareError> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut stats = TruncationStats::default();
    for (i, pair) in pairs.iter().enumerate() {
        let res = rt
            .encode_pair(pair)
            .map_err(|e| ("encode", e.to_string()))
            .and_then(|(c, r)| {
                let prompt = &c.ids[..c.response_start];
                if r.ids[..r.response_start] != *prompt {
                    return Err((
                        "prompt-mismatch",
                        "chosen and rejected render the prompt differently".to_string(),
                    ));
                }
                build_pair_examples(
                    i,
                    prompt,
                    &c.ids[c.response_start..],
                    &r.ids[r.response_start..],
                    trunc,
                )
                .map_err(|e| ("truncate", e.to_string()))
            });
        match res {
            Ok(ex) => {
                stats.add(&ex);
                out.push(PreparedPair {
                    chosen: ex.chosen,
                    rejected: ex.rejected,
                    chosen_safe: pair.chosen_safe,
                    rejected_safe: pair.rejected_safe,
                    origin: pair.origin.clone(),
                    ref_logps: None,
                });
            }
            Err((reason, detail)) => {
                if strict {
                    return Err(PrepareError::Encode {
                        origin: pair.origin.to_string(),
                        detail,
                    });
                }
                *report.encode_skipped.entry(reason.to_string()).or_default() += 1;
                if report.encode_examples.len() < 5 {
                    report
                        .encode_examples
                        .push(format!("{}: {reason}: {detail}", pair.origin));
                }
            }
        }
    }
    report.truncation = TruncationSummary::from(&stats);
    report.pairs += out.len();
    Ok(out)
}

/// Splits loaded pairs into (train, held-out) by prompt.
pub fn split(
    pairs: Vec<Pair>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Pair>, Vec<Pair>), PrepareError> {
    if fraction <= 0.0 {
        return Ok((pairs, Vec::new()));
    }
    let s =
        split_heldout(&pairs, fraction, seed).map_err(|e| PrepareError::Other(e.to_string()))?;
    let pick = |idx: &[usize]| idx.iter().map(|&i| pairs[i].clone()).collect::<Vec<_>>();
    Ok((pick(&s.train), pick(&s.heldout)))
}

/// Where reference log-probs came from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RefSource {
    /// Read from the cache file.
    Cache(PathBuf),
    /// Computed now (and stored at the path, when caching is on).
    Computed(Option<PathBuf>),
}

/// The version of the code that computes reference log-probs: the crate version and a SHA-256
/// of every WGSL kernel source (git-independent), e.g. `bfpo-lite 0.1.0 kernels-sha256=ab12…`.
pub fn code_version() -> String {
    let k: String = crate::gpu::registry::kernels_sha256()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("bfpo-lite {} kernels-sha256={k}", env!("CARGO_PKG_VERSION"))
}

/// The settings string the reference cache is keyed with: the caller's `settings`, the
/// [`code_version`] and the engine's [`Engine::cache_identity`] (kind, device name, driver), so
/// an upgrade or another device never reuses stale reference log-probs.
pub fn reference_settings(engine: &dyn Engine, settings: &str) -> String {
    format!(
        "{settings};code={};engine={}",
        code_version(),
        engine.cache_identity()
    )
}

/// Fills every pair's reference log-probs, from `cache` when it holds an entry for exactly these
/// examples, this model, these settings, this code version and this engine/device (see
/// [`reference_settings`]); otherwise with the engine (adapter off), then stores.
pub fn fill_reference(
    engine: &mut dyn Engine,
    cache: Option<(&RefCache, &[u8])>,
    settings: &str,
    pairs: &mut [PreparedPair],
    batch: usize,
    on_event: &mut dyn FnMut(Event),
) -> Result<RefSource, PrepareError> {
    if pairs.is_empty() {
        return Ok(RefSource::Computed(None));
    }
    let settings = reference_settings(engine, settings);
    let key = cache.map(|(_, id)| {
        RefCache::key_from_iter(
            id,
            pairs.iter().map(|p| (&p.chosen, &p.rejected)),
            &settings,
        )
    });
    if let (Some((c, _)), Some(k)) = (cache, key.as_ref())
        && let Some(values) = c.load(k)
        && values.len() == pairs.len()
    {
        for (p, v) in pairs.iter_mut().zip(&values) {
            p.ref_logps = Some((v.chosen, v.rejected));
        }
        return Ok(RefSource::Cache(c.path(k)));
    }
    for p in pairs.iter_mut() {
        p.ref_logps = None;
    }
    compute_reference(engine, pairs, batch, on_event)?;
    let stored = match (cache, key) {
        (Some((c, _)), Some(k)) => {
            let values: Vec<RefLogps> = pairs
                .iter()
                .map(|p| {
                    let (c, r) = p.ref_logps.unwrap_or((f64::NAN, f64::NAN));
                    RefLogps {
                        chosen: c,
                        rejected: r,
                        chosen_tokens: p.chosen.n_scored() as u32,
                        rejected_tokens: p.rejected.n_scored() as u32,
                    }
                })
                .collect();
            Some(
                c.store(&k, &values)
                    .map_err(|e| PrepareError::Other(e.to_string()))?,
            )
        }
        _ => None,
    };
    Ok(RefSource::Computed(stored))
}

/// The examples of a set of pairs, chosen then rejected for each pair.
pub fn sequences(pairs: &[PreparedPair]) -> Vec<&Example> {
    pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect()
}

/// The default cache directory: `$BFPO_CACHE_DIR`, else `$XDG_CACHE_HOME/bfpo-lite`, else
/// `~/.cache/bfpo-lite`, else `<out>/.cache`.
pub fn default_cache_dir(out: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("BFPO_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("bfpo-lite");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("bfpo-lite");
    }
    out.join(".cache")
}
