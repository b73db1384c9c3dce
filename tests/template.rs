//! Chat templates rendered as Hugging Face transformers renders them (`src/template`), on
//! written templates: the built-ins (ChatML, SmolLM2's ChatML with a default system turn,
//! Zephyr with `eos_token`, Llama 3 with `bos_token`, Gemma which raises), Jinja features the
//! model templates use, and errors that name the template and the line.
//!
//! Expected texts come from one run of `tests/hf_chat_template_reference.py` (transformers
//! 5.25.0, jinja2 3.1; `tok.apply_chat_template(msgs, chat_template=SRC, tokenize=False,
//! add_generation_prompt=..., bos_token="<s>", eos_token="</s>")` on the Jinja text of
//! `src/template/builtin.rs`), pasted below.

use bfpo_lite::data::ChatMessage;
use bfpo_lite::template::{
    BUILTIN_NAMES, ChatTemplate, SpecialTokens, TemplateError, TemplateOrigin,
};

const RESPONSE: &str = "Why did the bread rise? It was well bred.";

fn conv(name: &str) -> Vec<ChatMessage> {
    match name {
        "sys_user" => vec![
            ChatMessage::new("system", "You are a careful assistant."),
            ChatMessage::new("user", "How do I bake bread?"),
        ],
        "user" => vec![ChatMessage::new("user", "How do I bake bread?")],
        "multi" => vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello! How can I help?"),
            ChatMessage::new("user", "Tell me a joke."),
        ],
        "full" => vec![
            ChatMessage::new("user", "How do I bake bread?"),
            ChatMessage::new("assistant", RESPONSE),
        ],
        _ => unreachable!(),
    }
}

fn tokens() -> SpecialTokens {
    SpecialTokens {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
    }
}

/// (built-in name, case, what transformers rendered); case = conversation/generation prompt.
const HF: &[(&str, &str, &str)] = &[
    (
        "chatml",
        "sys_user/gen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml",
        "sys_user/nogen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "chatml",
        "full",
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nWhy did the bread rise? It was well bred.<|im_end|>\n",
    ),
    (
        "chatml",
        "user/gen",
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml",
        "user/nogen",
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "chatml",
        "multi/gen",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml",
        "multi/nogen",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n",
    ),
    (
        "chatml-smollm2",
        "sys_user/gen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml-smollm2",
        "sys_user/nogen",
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "chatml-smollm2",
        "full",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nWhy did the bread rise? It was well bred.<|im_end|>\n",
    ),
    (
        "chatml-smollm2",
        "user/gen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml-smollm2",
        "user/nogen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n",
    ),
    (
        "chatml-smollm2",
        "multi/gen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml-smollm2",
        "multi/nogen",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n",
    ),
    (
        "zephyr",
        "sys_user/gen",
        "<|system|>\nYou are a careful assistant.</s>\n<|user|>\nHow do I bake bread?</s>\n<|assistant|>\n",
    ),
    (
        "zephyr",
        "sys_user/nogen",
        "<|system|>\nYou are a careful assistant.</s>\n<|user|>\nHow do I bake bread?</s>\n",
    ),
    (
        "zephyr",
        "full",
        "<|user|>\nHow do I bake bread?</s>\n<|assistant|>\nWhy did the bread rise? It was well bred.</s>\n",
    ),
    (
        "zephyr",
        "user/gen",
        "<|user|>\nHow do I bake bread?</s>\n<|assistant|>\n",
    ),
    (
        "zephyr",
        "user/nogen",
        "<|user|>\nHow do I bake bread?</s>\n",
    ),
    (
        "zephyr",
        "multi/gen",
        "<|user|>\nHi</s>\n<|assistant|>\nHello! How can I help?</s>\n<|user|>\nTell me a joke.</s>\n<|assistant|>\n",
    ),
    (
        "zephyr",
        "multi/nogen",
        "<|user|>\nHi</s>\n<|assistant|>\nHello! How can I help?</s>\n<|user|>\nTell me a joke.</s>\n",
    ),
    (
        "llama3",
        "sys_user/gen",
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "llama3",
        "sys_user/nogen",
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>",
    ),
    (
        "llama3",
        "full",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nWhy did the bread rise? It was well bred.<|eot_id|>",
    ),
    (
        "llama3",
        "user/gen",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "llama3",
        "user/nogen",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>",
    ),
    (
        "llama3",
        "multi/gen",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "llama3",
        "multi/nogen",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>",
    ),
    ("gemma", "sys_user/gen", "RAISES: System role not supported"),
    (
        "gemma",
        "sys_user/nogen",
        "RAISES: System role not supported",
    ),
    (
        "gemma",
        "full",
        "<s><start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\nWhy did the bread rise? It was well bred.<end_of_turn>\n",
    ),
    (
        "gemma",
        "user/gen",
        "<s><start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\n",
    ),
    (
        "gemma",
        "user/nogen",
        "<s><start_of_turn>user\nHow do I bake bread?<end_of_turn>\n",
    ),
    (
        "gemma",
        "multi/gen",
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello! How can I help?<end_of_turn>\n<start_of_turn>user\nTell me a joke.<end_of_turn>\n<start_of_turn>model\n",
    ),
    (
        "gemma",
        "multi/nogen",
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello! How can I help?<end_of_turn>\n<start_of_turn>user\nTell me a joke.<end_of_turn>\n",
    ),
];

#[test]
fn builtins_render_exactly_as_transformers() {
    let mut seen = std::collections::BTreeSet::new();
    for &(name, case, want) in HF {
        seen.insert(name);
        let t = ChatTemplate::builtin(name).unwrap();
        let (conv_name, add_gen) = match case.split_once('/') {
            Some((c, g)) => (c, g == "gen"),
            None => (case, false),
        };
        let got = t.render(&conv(conv_name), add_gen, &tokens());
        match want.strip_prefix("RAISES: ") {
            Some(msg) => match got {
                Err(TemplateError::Raised { message, .. }) => assert_eq!(message, msg),
                other => panic!("{name} {case}: expected the template to raise, got {other:?}"),
            },
            None => assert_eq!(got.unwrap(), want, "{name} {case}"),
        }
    }
    // Every built-in is covered: these here, the vendored gemma3 and qwen3 in
    // tests/template_hf.rs.
    assert_eq!(seen.len() + 2, BUILTIN_NAMES.len());
}

#[test]
fn chatml_smollm2_adds_its_default_system_turn_only_without_one() {
    let t = ChatTemplate::builtin("chatml-smollm2").unwrap();
    let tk = tokens();
    let default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    assert!(
        t.render(&conv("user"), true, &tk)
            .unwrap()
            .starts_with(default)
    );
    assert!(
        !t.render(&conv("sys_user"), true, &tk)
            .unwrap()
            .contains("SmolLM")
    );
}

#[test]
fn zephyr_closes_every_turn_with_the_eos_token_variable() {
    let t = ChatTemplate::builtin("zephyr").unwrap();
    for eos in ["</s>", "<|endoftext|>"] {
        let tk = SpecialTokens {
            bos_token: None,
            eos_token: Some(eos.into()),
        };
        let full = t.render(&conv("full"), false, &tk).unwrap();
        assert_eq!(
            full,
            format!("<|user|>\nHow do I bake bread?{eos}\n<|assistant|>\n{RESPONSE}{eos}\n")
        );
        // The prompt is a prefix of the full conversation (exact prompt/response split).
        let prompt = t.render(&conv("full")[..1], true, &tk).unwrap();
        assert!(full.starts_with(&prompt), "{prompt:?} / {full:?}");
    }
}

#[test]
fn llama3_starts_with_the_bos_token_variable_and_trims_content() {
    let t = ChatTemplate::builtin("llama3").unwrap();
    let msgs = vec![ChatMessage::new("user", "  padded \n")];
    for bos in ["<s>", "<|begin_of_text|>"] {
        let tk = SpecialTokens {
            bos_token: Some(bos.into()),
            eos_token: None,
        };
        let got = t.render(&msgs, false, &tk).unwrap();
        assert_eq!(
            got,
            format!("{bos}<|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>")
        );
    }
}

#[test]
fn a_raising_template_names_itself_the_line_and_its_message() {
    let src = "{% for m in messages %}\n{% if m.role == 'system' %}\n{{ raise_exception('no system turns, please') }}\n{% endif %}{{ m.content }}\n{% endfor %}";
    let t = ChatTemplate::new("my-template.jinja", src, TemplateOrigin::Model).unwrap();
    assert_eq!(
        t.render(&conv("user"), false, &tokens()).unwrap(),
        "How do I bake bread?\n"
    );
    let e = t.render(&conv("sys_user"), false, &tokens()).unwrap_err();
    assert!(
        matches!(&e, TemplateError::Raised { line: Some(3), message, .. } if message == "no system turns, please"),
        "{e:?}"
    );
    assert!(!e.is_engine_limitation());
    let msg = e.to_string();
    assert!(
        msg.contains("my-template.jinja")
            && msg.contains("line 3")
            && msg.contains("no system turns"),
        "{msg}"
    );
}

#[test]
fn syntax_and_render_errors_name_the_template_and_line() {
    let e = ChatTemplate::new(
        "broken",
        "{% for m in messages %}\n{{ m.content }\n",
        TemplateOrigin::Model,
    )
    .unwrap_err();
    assert!(
        matches!(e, TemplateError::Syntax { line: Some(2), .. }),
        "{e:?}"
    );
    assert!(e.is_engine_limitation());
    assert!(e.to_string().contains("broken, line 2"), "{e}");
    // An unknown filter fails when the template is compiled or rendered: either way an engine
    // limitation, which makes the runtime fall back to llama.cpp's guess for model templates.
    let r = ChatTemplate::new(
        "odd",
        "line one\n{{ messages | no_such_filter }}",
        TemplateOrigin::Model,
    )
    .and_then(|t| t.render(&conv("user"), false, &tokens()));
    let e = r.unwrap_err();
    assert!(e.is_engine_limitation(), "{e:?}");
    assert!(e.to_string().contains("odd, line 2"), "{e}");
}

#[test]
fn python_methods_loop_controls_and_globals_hf_templates_use() {
    // .strip(), .startswith(), loop controls ({% continue %}, {% break %}), namespace,
    // `tools is none`, strftime_now, tojson.
    let src = r#"{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- if m.content.startswith('Tell') %}{% break %}{% endif -%}
[{{ m.role }}:{{ m['content'].strip() }}]{% set ns.n = ns.n + 1 %}
{%- endfor -%}
n={{ ns.n }} tools={{ tools is none }} year={{ strftime_now('%Y') | length }} {{ {'a': 1} | tojson }}"#;
    let t = ChatTemplate::new("features", src, TemplateOrigin::Model).unwrap();
    let mut msgs = conv("multi");
    msgs.insert(0, ChatMessage::new("system", "sys"));
    msgs[1].content = "  Hi  ".into();
    let got = t.render(&msgs, false, &tokens()).unwrap();
    assert_eq!(
        got,
        // What transformers' `_compile_jinja_template(src).render(messages=..., tools=None,
        // documents=None, add_generation_prompt=False)` gives (Python booleans print `True`).
        "[user:Hi][assistant:Hello! How can I help?]n=2 tools=True year=4 {\"a\": 1}"
    );
}

#[test]
fn resolve_takes_files_and_names_and_lists_names_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.jinja");
    std::fs::write(&f, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let t = ChatTemplate::resolve(f.to_str().unwrap()).unwrap();
    assert_eq!(t.origin(), &TemplateOrigin::File(f.clone()));
    assert_eq!(
        t.render(&conv("user"), true, &tokens()).unwrap(),
        "How do I bake bread?"
    );
    assert!(t.info().to_string().contains("t.jinja"));
    for name in BUILTIN_NAMES {
        let t = ChatTemplate::resolve(name).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::Builtin(name.to_string()));
        assert!(!t.info().is_fallback());
    }
    let e = ChatTemplate::resolve("no-such-template").unwrap_err();
    assert!(matches!(e, TemplateError::Unknown { .. }));
    assert!(e.to_string().contains("zephyr"), "{e}");
    let e = ChatTemplate::resolve(dir.path().join("missing.jinja").to_str().unwrap()).unwrap_err();
    assert!(matches!(e, TemplateError::Read { .. }), "{e:?}");
}
