//! Loading and encoding the pairs of a run: dataset files → [`Pair`]s (with a per-file report of
//! skipped rows) → held-out split → chat template + tokens → [`TrainData`], reporting every
//! skipped row, truncation and the safety cases as [`Event`]s.

use super::{DataLoaded, Event, Observer, RunError, SkipStage};
use crate::data::Pair;
use crate::data::batch::TruncationConfig;
use crate::data::formats::{Format, LoadOptions};
use crate::runtime::RtModel;
use crate::train::config::TrainConfig;
use crate::train::prepare::{self, LoadReportSummary, PrepareReport, safety_mix};
use crate::train::trainer::{PreparedPair, TrainData};
use std::path::PathBuf;

pub use crate::train::prepare::{encode_pairs, load, split};

/// Which files make up a run's data and how to read them.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// Safety preference data (split into train and held-out by `eval_fraction`).
    pub train: Vec<PathBuf>,
    /// Extra held-out pairs.
    pub eval: Option<PathBuf>,
    pub eval_fraction: f64,
    /// Helpfulness pairs (BFPO's buffer): both responses count as safe.
    pub buffer: Option<PathBuf>,
    pub format: Format,
    pub strict: bool,
    /// Label both responses of rows without safety labels safe (TRL, UltraFeedback, HH).
    pub assume_safe: bool,
    pub truncation: TruncationConfig,
    /// Seed of the held-out split.
    pub seed: u64,
}

impl DataSpec {
    /// The data settings of a training configuration.
    pub fn from_config(cfg: &TrainConfig, assume_safe: bool) -> Result<DataSpec, RunError> {
        Ok(DataSpec {
            train: cfg.data.clone(),
            eval: cfg.eval_data.clone(),
            eval_fraction: cfg.eval_fraction,
            buffer: cfg.buffer.clone(),
            format: parse_format(&cfg.format)?,
            strict: cfg.strict,
            assume_safe,
            truncation: TruncationConfig {
                max_length: cfg.max_length,
                max_prompt_length: cfg.max_prompt_length,
                ..Default::default()
            },
            seed: cfg.seed,
        })
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            format: self.format,
            strict: self.strict,
            assume_safe: self.assume_safe,
            ..Default::default()
        }
    }
}

/// A dataset format by name (`auto`, `pku`, `redteam`, `generic`, `trl`, `ultrafeedback`, `hh`).
pub fn parse_format(s: &str) -> Result<Format, RunError> {
    let f = match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Format::Auto,
        "pku" => Format::Pku,
        "redteam" => Format::Redteam,
        "generic" => Format::Generic,
        "trl" => Format::Trl,
        "ultrafeedback" => Format::Ultrafeedback,
        "hh" => Format::Hh,
        _ => return Err(RunError::Format(s.to_string())),
    };
    Ok(f)
}

/// Pairs loaded from the files of a [`DataSpec`], before encoding.
#[derive(Clone, Debug, Default)]
pub struct LoadedData {
    pub train: Vec<Pair>,
    pub eval: Vec<Pair>,
    pub buffer: Vec<Pair>,
    pub loads: Vec<LoadReportSummary>,
}

/// Loads and splits the files of `spec` (no model needed).
pub fn load_data(spec: &DataSpec) -> Result<LoadedData, RunError> {
    let opts = spec.load_options();
    let (pairs, mut loads) = load(&spec.train, &opts)?;
    let (train, mut eval) = split(pairs, spec.eval_fraction, spec.seed)?;
    if let Some(e) = &spec.eval {
        let (p, l) = load(std::slice::from_ref(e), &opts)?;
        loads.extend(l);
        eval.extend(p);
    }
    let buffer = match &spec.buffer {
        Some(b) => {
            let bopts = LoadOptions {
                assume_safe: true,
                format: Format::Auto,
                ..opts.clone()
            };
            let (p, l) = load(std::slice::from_ref(b), &bopts)?;
            loads.extend(l);
            p
        }
        None => Vec::new(),
    };
    Ok(LoadedData {
        train,
        eval,
        buffer,
        loads,
    })
}

/// Loads, splits and encodes the data of `spec` with `rt`'s chat template and tokenizer.
/// Emits [`Event::RowsSkipped`], [`Event::Truncated`], [`Event::Warning`] and
/// [`Event::DataLoaded`].
pub fn load_and_encode(
    rt: &RtModel,
    spec: &DataSpec,
    obs: &mut dyn Observer,
) -> Result<(TrainData, PrepareReport), RunError> {
    let loaded = load_data(spec)?;
    let mut report = PrepareReport {
        loads: loaded.loads,
        ..Default::default()
    };
    let trunc = &spec.truncation;
    let data = TrainData {
        train: encode_pairs(rt, &loaded.train, trunc, spec.strict, &mut report)?,
        eval: encode_pairs(rt, &loaded.eval, trunc, spec.strict, &mut report)?,
        buffer: encode_pairs(rt, &loaded.buffer, trunc, spec.strict, &mut report)?,
    };
    report.safety = prepare::SafetyCases {
        train: safety_mix(&data.train),
        eval: safety_mix(&data.eval),
        buffer: safety_mix(&data.buffer),
    };
    report_data(spec, &data, &report, obs);
    Ok((data, report))
}

/// The longest sequence of any set, in tokens (at least 1).
pub fn longest_sequence(data: &TrainData) -> usize {
    data.train
        .iter()
        .chain(&data.eval)
        .chain(&data.buffer)
        .map(|p: &PreparedPair| p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(1)
}

fn report_data(spec: &DataSpec, data: &TrainData, report: &PrepareReport, obs: &mut dyn Observer) {
    obs.event(&Event::DataLoaded(DataLoaded {
        train_pairs: data.train.len(),
        eval_pairs: data.eval.len(),
        buffer_pairs: data.buffer.len(),
        rows_skipped: report.skipped(),
        longest_sequence: longest_sequence(data),
        safety: report.safety,
    }));
    for l in &report.loads {
        if !l.skipped_by_reason.is_empty() {
            obs.event(&Event::RowsSkipped {
                stage: SkipStage::Load,
                file: Some(l.path.clone()),
                by_reason: l.skipped_by_reason.clone(),
                examples: l.examples.clone(),
            });
        }
    }
    if !report.encode_skipped.is_empty() {
        obs.event(&Event::RowsSkipped {
            stage: SkipStage::Encode,
            file: None,
            by_reason: report.encode_skipped.clone(),
            examples: report.encode_examples.clone(),
        });
    }
    let t = &report.truncation;
    if t.prompts_truncated + t.responses_truncated > 0 {
        obs.event(&Event::Truncated {
            prompts: t.prompts_truncated,
            responses: t.responses_truncated,
            max_length: spec.truncation.max_length,
            max_prompt_length: spec.truncation.max_prompt_length,
        });
    }
    for message in safety_warnings(spec, report) {
        obs.event(&Event::Warning { message });
    }
}

/// Warnings about safety labels that make BFPO something else: Anthropic HH `harmless-base`
/// loaded as helpfulness-only data, and training data without a single pair that ranks safety.
pub fn safety_warnings(spec: &DataSpec, report: &PrepareReport) -> Vec<String> {
    let mut out = Vec::new();
    for l in &report.loads {
        let harmless = l
            .path
            .to_string_lossy()
            .to_ascii_lowercase()
            .contains("harmless");
        if l.format == "hh" && harmless && spec.train.contains(&l.path) {
            out.push(format!(
                "{} looks like Anthropic HH harmless-base: its chosen response is the more harmless one, but HH rows carry no safety labels, so --assume-safe labels both responses safe and BFPO trains on them as plain IPO (a helpfulness ranking), learning no safety from them. Label the pairs (chosen_safe/rejected_safe) to train safety, or give the file as --buffer",
                l.path.display()
            ));
        }
    }
    let t = &report.safety.train;
    let n = t.both_safe + t.only_chosen_safe + t.only_rejected_safe + t.both_unsafe;
    if n > 0 && t.both_safe == n {
        out.push(format!(
            "all {n} training pairs are labelled safe on both sides: on them BFPO's loss is IPO's and the adapter learns no safety ranking; train on pairs with safety labels (PKU-SafeRLHF, red-team data) and put helpfulness-only data in --buffer"
        ));
    }
    out
}
