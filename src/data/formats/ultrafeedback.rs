//! UltraFeedback (binarized) rows: `prompt`, `chosen`/`rejected` message lists (+ `score_chosen`,
//! `prompt_id`, `messages`); the chosen response is the last message of `chosen`. No safety labels.

use super::BadRow;
use super::fields::*;
use super::generic::prompt_and_responses;
use crate::data::example::{Pair, RowOrigin};
use serde_json::{Map, Value};

/// An UltraFeedback row (both responses safe: only loaded with `assume_safe` or as a buffer).
pub(super) fn parse_ultrafeedback(
    o: &Map<String, Value>,
    origin: &RowOrigin,
) -> Result<Pair, BadRow> {
    let (p, c, r) = prompt_and_responses(o)?;
    finish(p, ("chosen", c), ("rejected", r), true, true, origin)
}
