//! BFPO red-team rows: `prompt`, `modeloutput1`, `modeloutput2`, `better_modelout` in {1, 2},
//! `is_modelout{1,2}_safe`.

use super::BadRow;
use super::fields::*;
use crate::data::example::{Pair, RowOrigin};
use serde_json::{Map, Value};

pub(super) fn parse_redteam(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let better = get_id(o, "better_modelout", &[1, 2])?;
    numbered_pair(
        o,
        origin,
        prompt,
        (better, 3 - better),
        |i| format!("modeloutput{i}"),
        |i| format!("is_modelout{i}_safe"),
    )
}
