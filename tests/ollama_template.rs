//! The Ollama TEMPLATEs `export --format ollama` writes render a conversation exactly as the
//! Hugging Face chat template of their format does (BOS aside: Ollama's runner adds it).
//!
//! Ollama executes a TEMPLATE with Go's `text/template`. `tests/data/ollama_go_rendered.json`
//! holds what Go 1.19 rendered for each template (`scripts/ollama_template_render.go`, run by the
//! ignored test below: `cargo test --release --test ollama_template -- --ignored` with `go` on
//! PATH). The suite checks, without Go, that the templates are still the ones Go rendered and
//! that Go's renderings equal our (transformers-exact) rendering of the built-in templates.

use bfpo_lite::data::ChatMessage;
use bfpo_lite::export::ollama::OllamaFormat;
use bfpo_lite::template::{ChatTemplate, SpecialTokens};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/ollama_go_rendered.json"
);
const EOS: &str = "</s>";
const BOS: &str = "<BOS>";

/// (name, format, built-in whose rendering it must match, enable_thinking).
const CASES: &[(&str, OllamaFormat, &str, Option<bool>)] = &[
    ("chatml", OllamaFormat::Chatml, "chatml", None),
    ("qwen3", OllamaFormat::Chatml, "qwen3", None),
    ("qwen3-nothink", OllamaFormat::Chatml, "qwen3", Some(false)),
    ("llama3", OllamaFormat::Llama3, "llama3", None),
    ("gemma3", OllamaFormat::Gemma, "gemma3", None),
    ("zephyr", OllamaFormat::Zephyr, "zephyr", None),
];

fn conversations() -> BTreeMap<&'static str, Vec<ChatMessage>> {
    let m = ChatMessage::new;
    BTreeMap::from([
        ("user", vec![m("user", "How do I bake bread?")]),
        (
            "sys_user",
            vec![
                m("system", "You are a careful assistant."),
                m("user", "How do I bake bread?"),
            ],
        ),
        (
            "multi",
            vec![
                m("user", "Hi"),
                m("assistant", "Hello! How can I help?"),
                m("user", "Tell me a joke."),
            ],
        ),
        (
            "sys_multi",
            vec![
                m("system", "Be brief."),
                m("user", "Hi"),
                m("assistant", "Hello!"),
                m("user", "A joke?"),
            ],
        ),
    ])
}

fn templates() -> BTreeMap<&'static str, String> {
    CASES
        .iter()
        .map(|&(name, f, _, thinking)| (name, f.template(EOS, thinking == Some(false))))
        .collect()
}

#[test]
fn ollama_templates_render_as_the_hugging_face_templates_do() {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let tokens = SpecialTokens {
        bos_token: Some(BOS.into()),
        eos_token: Some(EOS.into()),
    };
    let mut compared = 0;
    let texts = templates();
    for &(name, _, builtin, thinking) in CASES {
        let text = &texts[name];
        assert_eq!(
            fx["templates"][name].as_str(),
            Some(text.as_str()),
            "{name}: the template changed since Go rendered it; rerun the ignored test"
        );
        let mut hf = ChatTemplate::builtin(builtin).unwrap();
        hf.set_enable_thinking(thinking);
        for (conv, msgs) in conversations() {
            let want = hf.render(&msgs, true, &tokens).unwrap();
            let want = want.strip_prefix(BOS).unwrap_or(&want);
            let got = fx["rendered"][name][conv].as_str().unwrap();
            assert_eq!(got, want, "{name} {conv}: Go's rendering differs from HF's");
            compared += 1;
        }
    }
    assert_eq!(compared, CASES.len() * conversations().len());
}

/// Records the fixture with Go's text/template (needs `go` on PATH).
#[test]
#[ignore]
fn record_go_renderings() {
    use std::io::Write;
    let convs: BTreeMap<&str, Value> = conversations()
        .into_iter()
        .map(|(k, ms)| {
            let v: Vec<Value> = ms
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            (k, Value::from(v))
        })
        .collect();
    let input = json!({"templates": templates(), "conversations": convs});
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/ollama_template_render.go"
    );
    let mut child = std::process::Command::new("go")
        .args(["run", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("go on PATH (apt-get install golang-go)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let rendered: Value = serde_json::from_slice(&out.stdout).unwrap();
    let go = String::from_utf8(
        std::process::Command::new("go")
            .arg("version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let fx = json!({
        "go": go.trim(),
        "templates": templates(),
        "rendered": rendered,
    });
    std::fs::write(FIXTURE, serde_json::to_string_pretty(&fx).unwrap() + "\n").unwrap();
}
