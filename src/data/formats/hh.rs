//! Anthropic HH-RLHF rows: `chosen`/`rejected` "\n\nHuman: … \n\nAssistant: …" transcripts. No
//! safety labels (harmless-base ranks by harmlessness, helpful-base by helpfulness).

use super::fields::*;
use super::{BadRow, RowError};
use crate::data::example::{ChatMessage, Pair, RowOrigin};
use serde_json::{Map, Value};

/// Split an HH-RLHF transcript at its last "Assistant:" turn: (earlier turns, last reply).
pub(super) fn split_hh(field: &str, text: &str) -> Result<(Vec<ChatMessage>, String), BadRow> {
    const H: &str = "\n\nHuman:";
    const A: &str = "\n\nAssistant:";
    let owned;
    let t = if text.starts_with("\n\n") {
        text
    } else {
        owned = format!("\n\n{}", text.trim_start());
        &owned
    };
    // Turn boundaries in order.
    let mut marks: Vec<(usize, &str)> = t
        .match_indices(H)
        .map(|(i, _)| (i, "user"))
        .chain(t.match_indices(A).map(|(i, _)| (i, "assistant")))
        .collect();
    marks.sort_by_key(|m| m.0);
    let bad = |what: &str| BadRow::new(field, "malformed Human/Assistant transcript", what);
    if marks.first().map(|m| m.0) != Some(0) {
        return Err(bad("does not start with a Human: turn"));
    }
    let mut turns = Vec::with_capacity(marks.len());
    for (k, &(start, role)) in marks.iter().enumerate() {
        let hdr = if role == "user" { H.len() } else { A.len() };
        let end = marks.get(k + 1).map_or(t.len(), |m| m.0);
        turns.push(ChatMessage::new(role, t[start + hdr..end].trim()));
    }
    match turns.last() {
        Some(m) if m.role == "assistant" => {}
        _ => return Err(bad("no Assistant: turn at the end")),
    }
    let reply = turns.pop().unwrap().content;
    if turns.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(bad(
            "the last Assistant: turn does not follow a Human: turn",
        ));
    }
    Ok((turns, reply))
}

/// An HH-RLHF row: the prompt is the transcript before the last Assistant turn (the same on both
/// sides), the responses are the last replies. Both responses safe: only loaded with
/// `assume_safe` or as a buffer.
pub(super) fn parse_hh(o: &Map<String, Value>, origin: &RowOrigin) -> Result<Pair, RowError> {
    let text = |f: &str| match get(o, f)? {
        Value::String(s) => Ok(s.clone()),
        v => Err(BadRow::new(
            f,
            "not a string",
            format!("got {}: {}", type_name(v), short(v)),
        )),
    };
    let (pc, c) = split_hh("chosen", &text("chosen")?)?;
    let (pr, r) = split_hh("rejected", &text("rejected")?)?;
    if pc != pr {
        return Err(BadRow::new(
            "rejected",
            "transcript differs from chosen before the last Assistant turn",
            format!("{} vs {} earlier turns", pc.len(), pr.len()),
        )
        .into());
    }
    let p = check_prompt_messages("chosen", pc)?;
    Ok(finish(
        p,
        ("chosen", c),
        ("rejected", r),
        true,
        true,
        origin,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_transcript_split() {
        let t =
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks";
        let (turns, reply) = split_hh("chosen", t).unwrap();
        assert_eq!(reply, "fine, thanks");
        assert_eq!(
            turns,
            vec![
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "hello"),
                ChatMessage::new("user", "how are you?"),
            ]
        );
        assert!(split_hh("chosen", "\n\nHuman: only a question").is_err());
        assert!(split_hh("chosen", "no markers at all").is_err());
    }
}
