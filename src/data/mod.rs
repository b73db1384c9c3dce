//! Preference data: dataset formats, tokenized examples, batches and the reference cache.

pub mod batch;
pub mod example;
pub mod formats;
pub mod refcache;

pub use example::{ChatMessage, Example, Pair, Prompt, RowOrigin};
