//! PKU-SafeRLHF rows: `prompt`, `response_0`, `response_1`, `is_response_{0,1}_safe`,
//! `better_response_id` (the more helpful response is chosen; each keeps its own safety flag).

use super::BadRow;
use super::fields::*;
use crate::data::example::{Pair, RowOrigin};
use serde_json::{Map, Value};

pub(super) fn parse_pku(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let better = get_id(o, "better_response_id", &[0, 1])?;
    numbered_pair(
        o,
        origin,
        prompt,
        (better, 1 - better),
        |i| format!("response_{i}"),
        |i| format!("is_response_{i}_safe"),
    )
}
