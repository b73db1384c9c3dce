//! The vendored Gemma 3 and Qwen3 chat templates (`--chat-template gemma3|qwen3`,
//! `data/templates/`) render exactly as Hugging Face transformers renders them, Qwen3's
//! `enable_thinking` (unset, true, false) and `<think>` handling included.
//!
//! The expected texts are `tests/data/hf_templates.json`, written by
//! `python tests/hf_template_fixtures.py > tests/data/hf_templates.json` with transformers
//! 5.25.0 (the command and versions are in the script's docstring); no Python runs here.

use bfpo_lite::data::ChatMessage;
use bfpo_lite::template::{ChatTemplate, SpecialTokens, TemplateError};
use serde_json::Value;
use sha2::Digest;

fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hf_templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn special(v: &Value) -> SpecialTokens {
    SpecialTokens {
        bos_token: v["bos_token"].as_str().map(str::to_string),
        eos_token: v["eos_token"].as_str().map(str::to_string),
    }
}

#[test]
fn gemma3_and_qwen3_render_exactly_as_transformers() {
    let fx = fixtures();
    let cases = fx["cases"].as_array().unwrap();
    let mut checked = std::collections::BTreeMap::<&str, usize>::new();
    let mut raised = 0;
    for c in cases {
        let name = c["template"].as_str().unwrap();
        let conv = c["conversation"].as_str().unwrap();
        let add_gen = c["add_generation_prompt"].as_bool().unwrap();
        let thinking = c["enable_thinking"].as_bool();
        let mut t = ChatTemplate::builtin(name).unwrap();
        t.set_enable_thinking(thinking);
        let msgs = messages(&fx["conversations"][conv]);
        let got = t.render(&msgs, add_gen, &special(&fx["special_tokens"][name]));
        let what = format!("{name} {conv} gen={add_gen} enable_thinking={thinking:?}");
        match (c["text"].as_str(), c["raises"].as_str()) {
            (Some(want), None) => assert_eq!(got.unwrap(), want, "{what}"),
            (None, Some(msg)) => {
                match got {
                    Err(TemplateError::Raised { message, .. }) => assert_eq!(message, msg),
                    other => panic!("{what}: transformers raised {msg:?}, we gave {other:?}"),
                }
                raised += 1;
            }
            _ => panic!("{what}: malformed fixture"),
        }
        *checked
            .entry(if name == "gemma3" { "gemma3" } else { "qwen3" })
            .or_default() += 1;
    }
    // 9 conversations x 2 (generation prompt) for Gemma 3; x 3 thinking settings for Qwen3.
    assert_eq!(checked["gemma3"], 18);
    assert_eq!(checked["qwen3"], 54);
    assert_eq!(
        raised, 2,
        "Gemma 3 refuses two user turns in a row, with and without a prompt"
    );
}

#[test]
fn qwen3_thinking_flag_changes_only_the_generation_prompt() {
    let toks = SpecialTokens {
        bos_token: None,
        eos_token: Some("<|im_end|>".into()),
    };
    let user = [ChatMessage::new("user", "Hi")];
    let mut t = ChatTemplate::builtin("qwen3").unwrap();
    assert!(t.reads_enable_thinking());
    assert_eq!(t.enable_thinking(), None);
    let default = t.render(&user, true, &toks).unwrap();
    t.set_enable_thinking(Some(true));
    assert_eq!(t.render(&user, true, &toks).unwrap(), default);
    t.set_enable_thinking(Some(false));
    let off = t.render(&user, true, &toks).unwrap();
    assert_eq!(off, format!("{default}<think>\n\n</think>\n\n"));
    // Without a generation prompt the flag changes nothing.
    let no_gen_off = t.render(&user, false, &toks).unwrap();
    t.set_enable_thinking(None);
    assert_eq!(t.render(&user, false, &toks).unwrap(), no_gen_off);
    // Templates that never read it are not affected by it.
    let mut g = ChatTemplate::builtin("gemma3").unwrap();
    assert!(!g.reads_enable_thinking());
    let before = g.render(&user, true, &toks).unwrap();
    g.set_enable_thinking(Some(false));
    assert_eq!(g.render(&user, true, &toks).unwrap(), before);
}

#[test]
fn vendored_templates_match_their_recorded_sha256() {
    // data/templates/SOURCE.md records these; a changed file needs the fixtures rerun.
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/templates/SOURCE.md"
    ))
    .unwrap();
    for name in ["gemma3", "qwen3"] {
        let path = format!("{}/data/templates/{name}.jinja", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap();
        let hex: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            source.contains(&hex),
            "{path}: SHA-256 {hex} is not the one SOURCE.md records"
        );
    }
}
