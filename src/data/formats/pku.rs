//! PKU-SafeRLHF rows: `prompt`, `response_0`, `response_1`, `is_response_{0,1}_safe`,
//! `better_response_id` (the more helpful response is chosen; each keeps its own safety flag).

use super::BadRow;
use super::fields::*;
use crate::data::example::{Pair, Prompt, RowOrigin};
use serde_json::{Map, Value};

pub(super) fn parse_pku(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let better = get_id(o, "better_response_id", &[0, 1])?;
    let (w, l) = if better == 0 { (0, 1) } else { (1, 0) };
    let (fw, fl) = (format!("response_{w}"), format!("response_{l}"));
    let chosen = get_text(o, &fw)?;
    let rejected = get_text(o, &fl)?;
    let sw = get_flag(o, &format!("is_response_{w}_safe"))?;
    let sl = get_flag(o, &format!("is_response_{l}_safe"))?;
    finish(
        Prompt::Text(prompt),
        (&fw, chosen),
        (&fl, rejected),
        sw,
        sl,
        origin,
    )
}
