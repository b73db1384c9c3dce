//! BFPO red-team rows: `prompt`, `modeloutput1`, `modeloutput2`, `better_modelout` in {1, 2},
//! `is_modelout{1,2}_safe`.

use super::BadRow;
use super::fields::*;
use crate::data::example::{Pair, Prompt, RowOrigin};
use serde_json::{Map, Value};

pub(super) fn parse_redteam(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, BadRow> {
    let prompt = get_text(o, "prompt")?;
    let w = get_id(o, "better_modelout", &[1, 2])?;
    let l = 3 - w;
    let (fw, fl) = (format!("modeloutput{w}"), format!("modeloutput{l}"));
    let chosen = get_text(o, &fw)?;
    let rejected = get_text(o, &fl)?;
    let sw = get_flag(o, &format!("is_modelout{w}_safe"))?;
    let sl = get_flag(o, &format!("is_modelout{l}_safe"))?;
    finish(
        Prompt::Text(prompt),
        (&fw, chosen),
        (&fl, rejected),
        sw,
        sl,
        origin,
    )
}
