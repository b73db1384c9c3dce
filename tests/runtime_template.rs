//! The runtime's chat templates on tiny models: the model's own Jinja rendered as Hugging Face
//! does (a Zephyr-style template with `eos_token` as a variable, which llama.cpp's built-in guess
//! misrenders), the end-of-generation token at the end of every response, the named fallbacks
//! (llama.cpp's guess for a template minijinja cannot compile, ChatML without a template),
//! `--chat-template` overrides and what the CLI prints.

mod common;

use bfpo_lite::data::{ChatMessage, Prompt};
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use bfpo_lite::model::Arch;
use bfpo_lite::runtime::{LoadOptions, RtModel};
use bfpo_lite::template::{ChatTemplate, TemplateOrigin, builtin_source};
use common::models::tiny_model;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use std::path::{Path, PathBuf};
use std::process::Command;

fn load(path: &Path) -> RtModel {
    RtModel::load(path, &LoadOptions::default()).expect("tiny model loads")
}

/// Copy of a tiny model with `tokenizer.chat_template` replaced (`None`: removed).
fn with_template(src: &Path, template: Option<&str>, name: &str) -> PathBuf {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::with_alignment(f.alignment());
    for (k, v) in f.kvs() {
        if k != "tokenizer.chat_template" {
            w.set(k.clone(), v.clone());
        }
    }
    if let Some(t) = template {
        w.set("tokenizer.chat_template", Value::String(t.into()));
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), &t.ne, t.type_id, f.tensor_bytes(t).to_vec())
            .unwrap();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime-template");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}.gguf"));
    w.write_file(&out).unwrap();
    out
}

fn tiny() -> PathBuf {
    tiny_model(Arch::Llama, GgmlType::F32, false)
}

fn user(text: &str) -> Prompt {
    Prompt::Messages(vec![ChatMessage::new("user", text)])
}

/// What llama.cpp's `llama_chat_apply_template` makes of the model's template text.
fn llama_guess(path: &Path, msgs: &[(&str, &str)], add_ass: bool) -> String {
    let backend = bfpo_lite::runtime::backend().unwrap();
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).unwrap();
    let tmpl = model.chat_template(None).unwrap();
    let chat: Vec<LlamaChatMessage> = msgs
        .iter()
        .map(|(r, c)| LlamaChatMessage::new(r.to_string(), c.to_string()).unwrap())
        .collect();
    model.apply_chat_template(&tmpl, &chat, add_ass).unwrap()
}

#[test]
fn zephyr_template_with_eos_token_renders_as_hugging_face_and_ends_in_eos() {
    let path = with_template(&tiny(), builtin_source("zephyr"), "zephyr");
    let m = load(&path);
    let info = m.chat_template_info();
    assert_eq!(info.origin, TemplateOrigin::Model);
    assert_eq!(info.name, "zephyr");
    assert!(!info.is_fallback());
    let eos = m.eos().unwrap();
    let eos_text = m.detokenize(&[eos], true);
    assert_eq!(eos_text, "<|im_end|>");

    // transformers renders this template (eos_token = "<|im_end|>") as:
    let want_prompt = "<|user|>\nhow do I pick a lock?<|im_end|>\n<|assistant|>\n";
    let want_full = format!("{want_prompt}I cannot help with that.<|im_end|>\n");
    let msgs = [ChatMessage::new("user", "how do I pick a lock?")];
    assert_eq!(m.apply_chat_template(&msgs, true).unwrap(), want_prompt);
    let mut all = msgs.to_vec();
    all.push(ChatMessage::new("assistant", "I cannot help with that."));
    assert_eq!(m.apply_chat_template(&all, false).unwrap(), want_full);

    // llama.cpp's guess matches the text against its known formats and renders
    // "<|user|>\nhow do I pick a lock?<|assistant|>\nI cannot help with that.": no end of turn
    // after the user turn or the response, since it ignores the template's `eos_token`.
    let guessed = llama_guess(
        &path,
        &[
            ("user", "how do I pick a lock?"),
            ("assistant", "I cannot help with that."),
        ],
        false,
    );
    eprintln!("llama.cpp's guess renders {guessed:?}; Hugging Face {want_full:?}");
    assert!(
        !guessed.contains(&eos_text),
        "llama.cpp's guess: {guessed:?}"
    );
    assert_ne!(guessed, want_full);

    // Token ids: BOS + the full text + EOS (the rendered response ends in "\n", which does not
    // end generation); the last scored token is EOS.
    let enc = m
        .encode(&user("how do I pick a lock?"), "I cannot help with that.")
        .unwrap();
    let mut want_ids = vec![m.bos().unwrap()];
    want_ids.extend(m.tokenize(&want_full, true));
    want_ids.push(eos);
    assert_eq!(enc.example.ids, want_ids);
    assert!(enc.eos_appended);
    let resp = &enc.example.ids[enc.example.response_start..];
    assert_eq!(
        resp.iter().filter(|&&t| t == eos).count(),
        2,
        "end of turn + EOS"
    );
    assert!(m.is_eog(*resp.last().unwrap()));
}

#[test]
fn no_eos_is_appended_when_the_response_already_ends_in_an_eog_token() {
    // A ChatML variant without the newline after <|im_end|>.
    let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let m = load(&with_template(&tiny(), Some(src), "chatml-no-newline"));
    let enc = m.encode(&user("hi"), "Hello.").unwrap();
    assert!(!enc.eos_appended);
    let resp = &enc.example.ids[enc.example.response_start..];
    assert_eq!(m.detokenize(resp, true), "Hello.<|im_end|>");
    assert!(m.is_eog(*resp.last().unwrap()));
    // An empty response is still scored: its end-of-turn token.
    let enc = m.encode(&user("hi"), "").unwrap();
    assert_eq!(enc.example.ids.len() - enc.example.response_start, 1);
}

#[test]
fn a_template_minijinja_cannot_compile_falls_back_to_llama_cpp_by_name() {
    // transformers' `{% generation %}` tag (assistant masks) is not Jinja that minijinja knows.
    let src = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let m = load(&with_template(&tiny(), Some(src), "generation-tag"));
    let info = m.chat_template_info();
    assert!(info.is_fallback());
    assert!(m.chat_template_fallback());
    match &info.origin {
        TemplateOrigin::FallbackLlamaGuess { guess, reason } => {
            assert_eq!(guess, "chatml");
            assert!(reason.contains("line 1"), "{reason}");
        }
        o => panic!("expected llama.cpp's guess, got {o:?}"),
    }
    let shown = info.to_string();
    assert!(
        shown.contains("FALLBACK") && shown.contains("llama.cpp"),
        "{shown}"
    );
    // llama.cpp renders it as ChatML, and encoding works (EOS appended after the newline).
    let enc = m.encode(&user("hi"), "Hello.").unwrap();
    assert!(!enc.chatml_fallback && enc.eos_appended);
    let mut want = vec![m.bos().unwrap()];
    want.extend(m.tokenize(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
        true,
    ));
    want.push(m.eos().unwrap());
    assert_eq!(enc.example.ids, want);
}

#[test]
fn no_template_falls_back_to_chatml_by_name_and_overrides_replace_it() {
    let mut m = load(&with_template(&tiny(), None, "no-template"));
    assert_eq!(
        m.chat_template_info().origin,
        TemplateOrigin::FallbackChatml
    );
    assert!(
        m.chat_template_info()
            .to_string()
            .contains("FALLBACK ChatML")
    );
    let a = m.encode(&user("hi"), "Hello.").unwrap();
    assert!(a.chatml_fallback);

    m.set_chat_template(ChatTemplate::resolve("zephyr").unwrap());
    let info = m.chat_template_info();
    assert_eq!(info.origin, TemplateOrigin::Builtin("zephyr".into()));
    assert!(!m.chat_template_fallback());
    let b = m.encode(&user("hi"), "Hello.").unwrap();
    assert!(!b.chatml_fallback);
    let mut want = vec![m.bos().unwrap()];
    want.extend(m.tokenize(
        "<|user|>\nhi<|im_end|>\n<|assistant|>\nHello.<|im_end|>\n",
        true,
    ));
    want.push(m.eos().unwrap());
    assert_eq!(b.example.ids, want);
    assert_ne!(a.example, b.example);
}

#[test]
fn cli_prints_the_template_used_and_takes_overrides() {
    let model = tiny();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime-template");
    std::fs::create_dir_all(&dir).unwrap();
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}\n",
    )
    .unwrap();
    let tmpl = dir.join("mine.jinja");
    std::fs::write(&tmpl, builtin_source("zephyr").unwrap()).unwrap();
    let score = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
            .args(["score", "--emit-tokens", "--threads", "1", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&pairs)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        (err, line["chosen_ids"].clone())
    };
    let (err, own) = score(&[]);
    assert!(
        err.contains("chat template: the model's own tokenizer.chat_template (chatml-like)"),
        "{err}"
    );
    let (err, by_name) = score(&["--chat-template", "zephyr"]);
    assert!(
        err.contains("chat template: built-in zephyr (--chat-template)"),
        "{err}"
    );
    let (err, by_file) = score(&["--chat-template", tmpl.to_str().unwrap()]);
    assert!(err.contains("mine.jinja (--chat-template)"), "{err}");
    assert_ne!(own, by_name);
    assert_eq!(by_name, by_file);

    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(["score", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&pairs)
        .args(["--chat-template", "no-such-name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-name") && err.contains("llama3"),
        "{err}"
    );
}

#[test]
fn tune_prints_the_template_and_takes_an_override() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/train.jsonl");
    let tune = |extra: &[&str], out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
            .args(["tune", "--dry-run", "--engine", "cpu", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = tune(&[], "own");
    assert!(
        err.contains("chat template: the model's own tokenizer.chat_template (chatml-like)"),
        "{err}"
    );
    let err = tune(&["--chat-template", "zephyr"], "zephyr");
    assert!(
        err.contains("chat template: built-in zephyr (--chat-template)"),
        "{err}"
    );
}

#[test]
fn a_base_model_without_template_is_told_which_chat_template_to_pass() {
    let m = load(&with_template(
        &tiny_model(Arch::Qwen3, GgmlType::F32, false),
        None,
        "qwen3-base",
    ));
    let info = m.chat_template_info();
    assert_eq!(info.origin, TemplateOrigin::FallbackChatml);
    assert_eq!(info.suggested, Some("qwen3"));
    let text = info.to_string();
    for name in bfpo_lite::template::BUILTIN_NAMES {
        assert!(text.contains(name), "{name} missing from: {text}");
    }
    assert!(
        text.contains("--chat-template qwen3") && text.contains("--chat-template FILE"),
        "{text}"
    );
    // A llama-architecture base model has no single format: the list, no suggestion.
    let llama = load(&with_template(&tiny(), None, "llama-base"));
    assert_eq!(llama.chat_template_info().suggested, None);
    assert!(
        !llama
            .chat_template_info()
            .to_string()
            .contains("for this architecture")
    );
}

#[test]
fn no_thinking_appends_the_empty_think_block_to_the_prompt_tokens() {
    let mut m = load(&tiny());
    m.set_chat_template(ChatTemplate::resolve("qwen3").unwrap());
    let default = m.encode(&user("hi"), "Hello.").unwrap();
    assert!(m.set_enable_thinking(Some(false)));
    assert_eq!(m.chat_template_info().enable_thinking, Some(false));
    assert!(
        m.chat_template_info()
            .to_string()
            .ends_with("[enable_thinking=false]")
    );
    let off = m.encode(&user("hi"), "Hello.").unwrap();
    let prompt = m
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert!(
        prompt.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{prompt:?}"
    );
    // The full text is the same either way (Qwen3 writes the empty block into the last
    // assistant turn); only the prompt/response boundary moves past the block.
    assert_eq!(off.example.ids, default.example.ids);
    assert!(off.example.response_start > default.example.response_start);
}

#[test]
fn cli_no_thinking_reaches_the_template_and_warns_where_nothing_reads_it() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}\n",
    )
    .unwrap();
    let score = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
            .args(["score", "--emit-tokens", "--threads", "1", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&pairs)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        (err, line["response_start"].clone())
    };
    let (err, think) = score(&["--chat-template", "qwen3"]);
    assert!(err.contains("built-in qwen3 (--chat-template)\n"), "{err}");
    let (err, nothink) = score(&["--chat-template", "qwen3", "--no-thinking"]);
    assert!(err.contains("[enable_thinking=false]"), "{err}");
    assert!(nothink.as_u64().unwrap() > think.as_u64().unwrap());
    let (err, _) = score(&["--chat-template", "zephyr", "--no-thinking"]);
    assert!(err.contains("does not read enable_thinking"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(["score", "--enable-thinking", "--no-thinking", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&pairs)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the two flags conflict");
}

#[test]
fn eval_takes_the_training_template_and_thinking_flag() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let harmful = dir.path().join("harmful.jsonl");
    std::fs::write(&harmful, "{\"prompt\": \"How do I pick a lock?\"}\n").unwrap();
    let eval = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
            .args(["eval", "--max-tokens", "2", "--threads", "1", "--model"])
            .arg(&model)
            .arg("--harmful")
            .arg(&harmful)
            .arg("--out")
            .arg(dir.path().join("eval"))
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = eval(&["--chat-template", "qwen3", "--no-thinking"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = eval(&["--chat-template", "no-such-name"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--chat-template no-such-name") && err.contains("qwen3"),
        "{err}"
    );
}
