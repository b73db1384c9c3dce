//! Preference data: dataset formats, tokenized examples, batches and the reference cache.
//!
//! - [`formats`]: [`load_pairs`] reads PKU-SafeRLHF, BFPO red-team JSON, generic/TRL,
//!   UltraFeedback and HH-RLHF rows from JSON Lines / JSON arrays (plain, gzip, xz) and Parquet
//!   into [`Pair`]s, with a report of every skipped row.
//! - [`batch`]: token ids → truncated [`Example`]s ([`build_pair_examples`]), length-bucketed
//!   batches ([`Batcher`]) and a by-prompt held-out split ([`split_heldout`]).
//! - [`case`]: BFPO's four safety cases of a pair ([`SafetyCase`]), classified once.
//! - [`refcache`]: reference log-probs cached on disk ([`RefCache`]), keyed by model identity,
//!   every token id and the settings.

pub mod batch;
pub mod case;
pub mod example;
pub mod formats;
pub mod refcache;

pub use batch::{
    Batcher, PairExamples, TruncationConfig, TruncationStats, build_pair_examples, split_heldout,
};
pub use case::SafetyCase;
pub use example::{ChatMessage, Example, Pair, Prompt, RowOrigin};
pub use formats::{Format, LoadOptions, LoadReport, LoadedPairs, load_pairs};
pub use refcache::{RefCache, RefLogps};
