//! Field access shared by the formats: typed getters whose errors name the field and say what
//! was found, chat message lists, and the pair builder that rejects empty or identical responses.

use super::BadRow;
use crate::data::example::{ChatMessage, Pair, Prompt, RowOrigin};
use serde_json::{Map, Value};

pub(super) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let t: String = s.chars().take(57).collect();
        format!("{t}...")
    } else {
        s
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(super) fn field_list(obj: &Map<String, Value>) -> String {
    obj.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a Value, BadRow> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(BadRow::missing(field)),
        Some(v) => Ok(v),
    }
}

pub(super) fn get_text(obj: &Map<String, Value>, field: &str) -> Result<String, BadRow> {
    match get(obj, field)? {
        Value::String(s) => nonempty(field, s.clone()),
        v => Err(BadRow::new(
            field,
            "not a string",
            format!("got {}: {}", type_name(v), short(v)),
        )),
    }
}

pub(super) fn nonempty(field: &str, s: String) -> Result<String, BadRow> {
    if s.trim().is_empty() {
        Err(BadRow::new(field, "empty text", format!("{s:?}")))
    } else {
        Ok(s)
    }
}

/// A safety flag: a boolean, 0/1, or the strings "true"/"false".
pub(super) fn get_flag(obj: &Map<String, Value>, field: &str) -> Result<bool, BadRow> {
    let v = get(obj, field)?;
    let bad = || {
        BadRow::new(
            field,
            "not a boolean safety flag",
            format!("expected true/false or 1/0, got {}", short(v)),
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Ok(true),
            Some(0.0) => Ok(false),
            _ => Err(bad()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// An integer id among `allowed` (an integer, an integral float, or a numeric string).
pub(super) fn get_id(
    obj: &Map<String, Value>,
    field: &str,
    allowed: &[i64],
) -> Result<i64, BadRow> {
    let v = get(obj, field)?;
    let want = allowed
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    let id = match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match id {
        Some(i) if allowed.contains(&i) => Ok(i),
        _ => Err(BadRow::new(
            field,
            format!("not {want}"),
            format!("got {}", short(v)),
        )),
    }
}

pub(super) fn parse_messages(field: &str, v: &Value) -> Result<Vec<ChatMessage>, BadRow> {
    let Value::Array(items) = v else {
        return Err(BadRow::new(
            field,
            "not a string or a list of messages",
            format!("got {}: {}", type_name(v), short(v)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let bad = |what: &str| {
            BadRow::new(
                field,
                "malformed message",
                format!("message {i}: {what}: {}", short(m)),
            )
        };
        let Value::Object(o) = m else {
            return Err(bad("not a {role, content} object"));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.clone(),
            _ => return Err(bad("`role` missing or not a string")),
        };
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(bad("`role` must be system, user or assistant"));
        }
        let content = match o.get("content") {
            Some(Value::String(c)) => c.clone(),
            _ => return Err(bad("`content` missing or not a string")),
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// A response field: a string, or a message list whose last message is the assistant's reply
/// (returned with the messages before it).
pub(super) fn parse_response(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<(Vec<ChatMessage>, String), BadRow> {
    match get(obj, field)? {
        Value::String(s) => Ok((Vec::new(), s.clone())),
        v => {
            let mut msgs = parse_messages(field, v)?;
            let Some(last) = msgs.pop() else {
                return Err(BadRow::new(field, "empty message list", ""));
            };
            if last.role != "assistant" {
                return Err(BadRow::new(
                    field,
                    "last message is not from the assistant",
                    format!("role {:?}", last.role),
                ));
            }
            Ok((msgs, last.content))
        }
    }
}

pub(super) fn check_prompt_messages(field: &str, msgs: Vec<ChatMessage>) -> Result<Prompt, BadRow> {
    match msgs.last() {
        None => Err(BadRow::new(field, "empty prompt", "no messages")),
        Some(m) if m.role != "user" => Err(BadRow::new(
            field,
            "prompt does not end with a user message",
            format!("last role {:?}", m.role),
        )),
        Some(_) if msgs.iter().all(|m| m.content.trim().is_empty()) => {
            Err(BadRow::new(field, "empty prompt", "all messages are blank"))
        }
        Some(_) => Ok(Prompt::Messages(msgs)),
    }
}

pub(super) fn finish(
    prompt: Prompt,
    chosen: (&str, String),
    rejected: (&str, String),
    chosen_safe: bool,
    rejected_safe: bool,
    origin: &RowOrigin,
) -> Result<Pair, BadRow> {
    let c = nonempty(chosen.0, chosen.1)?;
    let r = nonempty(rejected.0, rejected.1)?;
    if c == r {
        return Err(BadRow::new(
            "",
            "identical chosen and rejected responses",
            format!("{} and {}", chosen.0, rejected.0),
        ));
    }
    Ok(Pair {
        prompt,
        chosen: c,
        rejected: r,
        chosen_safe,
        rejected_safe,
        origin: origin.clone(),
    })
}

/// The rest of a row with a text `prompt` and two numbered responses, each with its own safety
/// flag (PKU-SafeRLHF, the BFPO red-team JSON): `winner` and `loser` are the response numbers,
/// `text(i)` and `safe(i)` the names of response i's text and safety fields.
pub(super) fn numbered_pair(
    o: &Map<String, Value>,
    origin: &RowOrigin,
    prompt: String,
    (winner, loser): (i64, i64),
    text: impl Fn(i64) -> String,
    safe: impl Fn(i64) -> String,
) -> Result<Pair, BadRow> {
    let (fw, fl) = (text(winner), text(loser));
    let chosen = get_text(o, &fw)?;
    let rejected = get_text(o, &fl)?;
    let sw = get_flag(o, &safe(winner))?;
    let sl = get_flag(o, &safe(loser))?;
    finish(
        Prompt::Text(prompt),
        (&fw, chosen),
        (&fl, rejected),
        sw,
        sl,
        origin,
    )
}
