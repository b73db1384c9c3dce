//! Generic rows (`prompt`, `chosen`, `rejected` with `chosen_safe`/`rejected_safe` or
//! `is_chosen_safe`/`is_rejected_safe`) and TRL preference rows (the same fields, flags optional):
//! strings or conversational message lists, explicit or implicit prompts.

use super::fields::*;
use super::{BadRow, RowError};
use super::{Format, missing_flags};
use crate::data::example::{Pair, Prompt, RowOrigin};
use serde_json::{Map, Value};

/// Prompt and responses of generic / TRL / UltraFeedback rows.
pub(super) fn prompt_and_responses(
    o: &Map<String, Value>,
) -> Result<(Prompt, String, String), BadRow> {
    let (pc, c) = parse_response(o, "chosen")?;
    let (pr, r) = parse_response(o, "rejected")?;
    if !pc.is_empty() || !pr.is_empty() {
        if pc != pr {
            return Err(BadRow::new(
                "rejected",
                "conversation differs from chosen before the final assistant message",
                format!("{} vs {} earlier messages", pc.len(), pr.len()),
            ));
        }
        return Ok((check_prompt_messages("chosen", pc)?, c, r));
    }
    match o.get("prompt") {
        Some(Value::String(s)) => Ok((Prompt::Text(nonempty("prompt", s.clone())?), c, r)),
        Some(v @ Value::Array(_)) => {
            let msgs = parse_messages("prompt", v)?;
            Ok((check_prompt_messages("prompt", msgs)?, c, r))
        }
        Some(v) if !v.is_null() => Err(BadRow::new(
            "prompt",
            "not a string or a list of messages",
            format!("got {}: {}", type_name(v), short(v)),
        )),
        _ => {
            // TRL implicit prompt, string form.
            let (p, c2, r2) = split_common_prefix(&c, &r);
            if p.trim().is_empty() {
                return Err(BadRow::new(
                    "prompt",
                    "missing field (and chosen/rejected share no prefix to use as an implicit prompt)",
                    "",
                ));
            }
            Ok((Prompt::Text(p), c2, r2))
        }
    }
}

/// Safety flags of generic rows: `chosen_safe` or `is_chosen_safe` (and the same for
/// rejected). Returns None when neither side has any flag.
pub(super) fn generic_flags(o: &Map<String, Value>) -> Result<Option<(bool, bool)>, BadRow> {
    let pick = |a: &'static str, b: &'static str| {
        if o.get(a).is_some_and(|v| !v.is_null()) {
            Some(a)
        } else if o.get(b).is_some_and(|v| !v.is_null()) {
            Some(b)
        } else {
            None
        }
    };
    let fc = pick("chosen_safe", "is_chosen_safe");
    let fr = pick("rejected_safe", "is_rejected_safe");
    match (fc, fr) {
        (None, None) => Ok(None),
        (Some(c), Some(r)) => Ok(Some((get_flag(o, c)?, get_flag(o, r)?))),
        (None, Some(_)) => Err(BadRow::missing("chosen_safe")),
        (Some(_), None) => Err(BadRow::missing("rejected_safe")),
    }
}

/// TRL's implicit prompt for strings: the longest common prefix, cut back to just after the
/// last whitespace inside it so no word is split.
pub(super) fn split_common_prefix(a: &str, b: &str) -> (String, String, String) {
    let mut end = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            break;
        }
        end = i + ca.len_utf8();
    }
    if end < a.len() || end < b.len() {
        // Differ (or one is a prefix of the other): back off to a word boundary.
        let cut = a[..end]
            .rfind(char::is_whitespace)
            .map(|i| i + a[i..].chars().next().map_or(1, char::len_utf8))
            .unwrap_or(0);
        end = cut;
    }
    (
        a[..end].to_string(),
        a[end..].to_string(),
        b[end..].to_string(),
    )
}

/// A generic (flags required) or TRL (flags optional; without them both safe only with
/// `assume_safe`) row.
pub(super) fn parse_generic(
    o: &Map<String, Value>,
    format: Format,
    origin: &RowOrigin,
    assume_safe: bool,
) -> Result<Pair, RowError> {
    let flags = generic_flags(o)?;
    let (sw, sl) = match (flags, format) {
        (Some(f), _) => f,
        (None, Format::Generic) => return Err(BadRow::missing("chosen_safe").into()),
        (None, _) if assume_safe => (true, true),
        (None, _) => return Err(missing_flags(origin, format)),
    };
    let (p, c, r) = prompt_and_responses(o)?;
    Ok(finish(p, ("chosen", c), ("rejected", r), sw, sl, origin)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_cuts_at_word_boundary() {
        let (p, c, r) = split_common_prefix("The sky is blue.", "The sky is green.");
        assert_eq!(
            (p.as_str(), c.as_str(), r.as_str()),
            ("The sky is ", "blue.", "green.")
        );
        let (p, c, r) = split_common_prefix("Say hello there", "Say help me");
        assert_eq!(
            (p.as_str(), c.as_str(), r.as_str()),
            ("Say ", "hello there", "help me")
        );
        let (p, _, _) = split_common_prefix("abc", "xyz");
        assert_eq!(p, "");
    }
}
