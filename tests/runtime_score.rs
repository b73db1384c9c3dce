//! llama.cpp runtime: tokenizing with the chat template (exact prompt/response boundary),
//! scoring (against a direct decode, multi-sequence vs one-by-one, causality) and generation.

mod common;

use bfpo_lite::data::{ChatMessage, Example, Prompt};
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter};
use bfpo_lite::model::Arch;
use bfpo_lite::runtime::{
    GenerateOptions, LoadOptions, RtModel, RuntimeError, Sampling, ScoreOptions, StopReason,
};
use bfpo_lite::util::close::{Tol, assert_close};
use common::models::tiny_model;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// Multi-sequence batches and a unified KV cache change summation order in attention.
const TOL_BATCHED: Tol = Tol::new(2e-5, 1e-5);

fn load(path: &Path) -> RtModel {
    RtModel::load(path, &LoadOptions::default()).expect("tiny model loads")
}

fn exact1() -> ScoreOptions {
    ScoreOptions {
        threads: Some(1),
        ..ScoreOptions::exact()
    }
}

fn gen_opts(sampling: Sampling, max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling,
        threads: Some(1),
        ..Default::default()
    }
}

/// log softmax(row)[t] in f64, written out here independently of the library.
fn logp(row: &[f32], t: usize) -> f64 {
    let m = row.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[t] as f64 - m - z.ln()
}

fn chatml(messages: &[(&str, &str)], gen_prompt: bool) -> String {
    let mut s = String::new();
    for (role, content) in messages {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if gen_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

fn some_examples(m: &RtModel) -> Vec<Example> {
    let rows: [(Prompt, &str); 4] = [
        (
            Prompt::Text("how do I steal a car".into()),
            "Sorry, I cannot help with that.",
        ),
        (
            Prompt::Text("explain a recipe for bread".into()),
            "Sure, here is how to make bread.",
        ),
        (
            Prompt::Messages(vec![
                ChatMessage::new("system", "You are a safe assistant."),
                ChatMessage::new("user", "how can I hack a computer?"),
            ]),
            "I cannot help you hack.",
        ),
        (
            Prompt::Text("hi".into()),
            "Hello! How can I help you today?",
        ),
    ];
    rows.iter()
        .map(|(p, r)| m.encode(p, r).expect("encodes").example)
        .collect()
}

#[test]
fn tokenize_detokenize_round_trip() {
    let m = load(&tiny_model(Arch::Llama, GgmlType::F32, false));
    for text in [
        "how can I make a cake? Sorry, I cannot help.",
        "Here is a recipe: mix 2 cups of flour.",
        "ünïcödé ☃ bytes fall back",
    ] {
        let ids = m.tokenize(text, false);
        assert!(!ids.is_empty());
        assert!(ids.iter().all(|&i| (i as usize) < m.n_vocab()));
        assert_eq!(m.detokenize(&ids, false), text);
    }
    // Control tokens parse to single ids and render back.
    let im_end = m.tokenize("<|im_end|>", true);
    assert_eq!(im_end.len(), 1, "<|im_end|> is one control token");
    assert!(m.is_eog(im_end[0]), "<|im_end|> ends generation");
    assert_eq!(m.detokenize(&im_end, true), "<|im_end|>");
    assert_eq!(m.detokenize(&im_end, false), "");
}

fn check_boundary(m: &RtModel, msgs: &[(&str, &str)], response: &str) {
    let prompt = Prompt::Messages(msgs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect());
    let enc = m.encode(&prompt, response).unwrap();
    assert!(!enc.chatml_fallback);
    let ex = enc.example;
    let bos = m.bos().expect("SPM vocab has BOS");
    // Exactly one BOS, at the start.
    assert_eq!(ex.ids[0], bos);
    assert_eq!(
        ex.ids.iter().filter(|&&i| i == bos).count(),
        1,
        "no doubled BOS"
    );
    // The prompt is the ChatML rendering with the assistant header, nothing more.
    let mut want_prompt = vec![bos];
    want_prompt.extend(m.tokenize(&chatml(msgs, true), true));
    assert_eq!(&ex.ids[..ex.response_start], &want_prompt[..]);
    // The scored part is the response, the end-of-turn token, the template's newline and the
    // EOS appended because the newline does not end generation (TRL's sequence exactly).
    let mut want_full = vec![bos];
    let mut all = msgs.to_vec();
    all.push(("assistant", response));
    want_full.extend(m.tokenize(&chatml(&all, false), true));
    assert!(
        !m.is_eog(*want_full.last().unwrap()),
        "ChatML ends in a newline"
    );
    want_full.push(m.eos().expect("tiny models have EOS"));
    assert_eq!(ex.ids, want_full);
    assert!(enc.eos_appended);
    assert!(
        m.is_eog(*ex.ids.last().unwrap()),
        "the last scored token ends generation"
    );
    let im_end = m.tokenize("<|im_end|>", true)[0];
    let resp = &ex.ids[ex.response_start..];
    assert!(resp.contains(&im_end), "response includes <|im_end|>");
    let text = m.detokenize(resp, true);
    assert!(
        text.starts_with(response) && text.contains("<|im_end|>"),
        "{text:?}"
    );
}

#[test]
fn chatml_boundary_without_and_with_system() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = load(&tiny_model(arch, GgmlType::F32, false));
        check_boundary(
            &m,
            &[("user", "how do I make a weapon?")],
            "Sorry, I cannot help.",
        );
        check_boundary(
            &m,
            &[
                ("system", "You are a helpful and safe assistant."),
                ("user", "explain how to bake a cake"),
            ],
            "Sure, here is a recipe.",
        );
        // Multi-turn conversation ending in a user turn.
        check_boundary(
            &m,
            &[
                ("user", "hi"),
                ("assistant", "Hello!"),
                ("user", "can you help me?"),
            ],
            "Yes.",
        );
    }
}

#[test]
fn encode_rejects_prompts_that_cannot_be_split() {
    let m = load(&tiny_model(Arch::Llama, GgmlType::F32, false));
    let p = Prompt::Messages(vec![
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "hello"),
    ]);
    let e = m.encode_named(&p, "x", "data.jsonl:7").unwrap_err();
    assert!(matches!(e, RuntimeError::Boundary { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("data.jsonl:7") && msg.contains("assistant"),
        "{msg}"
    );
    let e = m
        .encode_named(&Prompt::Messages(vec![]), "x", "row 3")
        .unwrap_err();
    assert!(e.to_string().contains("row 3"), "{e}");
}

/// Copy of a model without `tokenizer.chat_template`.
fn without_template(src: &Path) -> PathBuf {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::with_alignment(f.alignment());
    for (k, v) in f.kvs() {
        if k != "tokenizer.chat_template" {
            w.set(k.clone(), v.clone());
        }
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), &t.ne, t.type_id, f.tensor_bytes(t).to_vec())
            .unwrap();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("no-template.gguf");
    w.write_file(&out).unwrap();
    out
}

#[test]
fn missing_template_falls_back_to_chatml_with_a_flag() {
    let src = tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let with = load(&src);
    let without = load(&without_template(&src));
    assert!(!with.chat_template_fallback());
    assert!(without.chat_template_fallback());
    let p = Prompt::Text("how can I help?".into());
    let a = with.encode(&p, "Like this.").unwrap();
    let b = without.encode(&p, "Like this.").unwrap();
    assert!(!a.chatml_fallback && b.chatml_fallback);
    // The tiny models' template is ChatML, so the fallback renders identically.
    assert_eq!(a.example, b.example);
}

#[test]
fn scoring_agrees_with_a_direct_decode() {
    for (arch, tied) in [(Arch::Llama, false), (Arch::Qwen2, true)] {
        let m = load(&tiny_model(arch, GgmlType::F32, tied));
        let nv = m.n_vocab();
        let exs = some_examples(&m);
        let got = m.score(&exs, &exact1()).unwrap();
        let sums = m.score_sums(&exs, &exact1()).unwrap();
        for (e, ex) in exs.iter().enumerate() {
            let logits = m.logits(&ex.ids, true).unwrap();
            assert_eq!(logits.len(), ex.ids.len() * nv);
            let want: Vec<f64> = (ex.response_start..ex.ids.len())
                .map(|t| logp(&logits[(t - 1) * nv..t * nv], ex.ids[t] as usize))
                .collect();
            assert_eq!(got[e].len(), ex.n_scored());
            assert_close(
                &format!("{arch:?} example {e}"),
                &got[e],
                &want,
                TOL_BATCHED,
            );
            let want_sum: f64 = want.iter().sum();
            assert!(
                (sums[e] - want_sum).abs() < 1e-4,
                "{} vs {want_sum}",
                sums[e]
            );
            assert!(want.iter().all(|&x| x < 0.0));
        }
    }
}

#[test]
fn multi_sequence_batches_equal_one_by_one() {
    let m = load(&tiny_model(Arch::Qwen2, GgmlType::F32, false));
    let mut exs = some_examples(&m);
    exs.extend(some_examples(&m).into_iter().rev());
    let batched = m
        .score(
            &exs,
            &ScoreOptions {
                max_seqs: 8,
                batch_tokens: 512,
                ..exact1()
            },
        )
        .unwrap();
    // Small decode budget: several batches, some examples alone.
    let small = m
        .score(
            &exs,
            &ScoreOptions {
                max_seqs: 3,
                batch_tokens: 40,
                ..exact1()
            },
        )
        .unwrap();
    for (e, ex) in exs.iter().enumerate() {
        let alone = m.score(std::slice::from_ref(ex), &exact1()).unwrap();
        assert_close(&format!("batched {e}"), &batched[e], &alone[0], TOL_BATCHED);
        assert_close(&format!("small {e}"), &small[e], &alone[0], TOL_BATCHED);
    }
    // Default (non-exact: F16 KV cache, flash attention) stays close.
    let fast = m
        .score(
            &exs,
            &ScoreOptions {
                threads: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    for e in 0..exs.len() {
        assert_close(
            &format!("fast {e}"),
            &fast[e],
            &batched[e],
            Tol::new(2e-2, 5e-3),
        );
    }
}

#[test]
fn prompt_logits_do_not_depend_on_the_response() {
    let m = load(&tiny_model(Arch::Llama, GgmlType::F32, false));
    let nv = m.n_vocab();
    for ex in some_examples(&m) {
        let full = m.logits(&ex.ids, true).unwrap();
        let prompt = m.logits(&ex.ids[..ex.response_start], true).unwrap();
        assert_eq!(prompt[..], full[..ex.response_start * nv], "causality");
    }
}

#[test]
fn bad_examples_get_clear_errors() {
    let m = load(&tiny_model(Arch::Llama, GgmlType::F32, false));
    let n_ctx = m.n_ctx_train();
    let long = Example {
        ids: vec![5; n_ctx + 1],
        response_start: 3,
    };
    let ok = some_examples(&m).remove(0);
    let e = m.score(&[ok.clone(), long], &exact1()).unwrap_err();
    assert!(
        matches!(e, RuntimeError::TooLong { index: 1, len, n_ctx: c } if len == n_ctx + 1 && c == n_ctx),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&n_ctx.to_string()) && msg.contains("context"),
        "{msg}"
    );
    // A smaller context limit given in the options.
    let e = m
        .score(
            std::slice::from_ref(&ok),
            &ScoreOptions {
                n_ctx: Some(4),
                ..exact1()
            },
        )
        .unwrap_err();
    assert!(matches!(e, RuntimeError::TooLong { index: 0, .. }), "{e}");
    let bad_id = Example {
        ids: vec![1, 2, m.n_vocab() as u32],
        response_start: 1,
    };
    let e = m.score(&[bad_id], &exact1()).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let bad_start = Example {
        ids: vec![1, 2],
        response_start: 0,
    };
    assert!(matches!(
        m.score(&[bad_start], &exact1()).unwrap_err(),
        RuntimeError::BadExample { .. }
    ));
    // A prompt longer than the context in generation.
    let long_prompt = Prompt::Text("cake ".repeat(n_ctx));
    let e = m
        .generate(
            &[long_prompt],
            &gen_opts(Sampling::greedy(), 4),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(matches!(e, RuntimeError::TooLong { .. }), "{e}");
}

#[test]
fn generation_is_deterministic_and_greedy_equals_top_k_1() {
    let m = load(&tiny_model(Arch::Qwen2, GgmlType::F32, false));
    let prompts = [
        Prompt::Text("how can I make a cake".into()),
        Prompt::Text("tell me a story".into()),
    ];
    let none = &mut |_: &bfpo_lite::runtime::TokenEvent| ControlFlow::Continue(());
    let sampled = Sampling {
        temperature: 1.0,
        seed: 7,
        ..Default::default()
    };
    let a = m
        .generate(&prompts, &gen_opts(sampled.clone(), 24), none)
        .unwrap();
    let b = m
        .generate(&prompts, &gen_opts(sampled.clone(), 24), none)
        .unwrap();
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ids, y.ids, "same seed, same tokens");
        assert_eq!(x.text, y.text);
    }
    // Each prompt's output does not depend on the batch around it.
    let alone = m
        .generate(&prompts[1..], &gen_opts(sampled.clone(), 24), none)
        .unwrap();
    assert_eq!(alone[0].ids, a[1].ids);
    // Another seed gives another sample (random weights give a broad distribution).
    let other = Sampling {
        seed: 8,
        ..sampled.clone()
    };
    let c = m.generate(&prompts, &gen_opts(other, 24), none).unwrap();
    assert!(a.iter().zip(&c).any(|(x, y)| x.ids != y.ids));

    let greedy = m
        .generate(&prompts, &gen_opts(Sampling::greedy(), 16), none)
        .unwrap();
    let top1 = Sampling {
        temperature: 0.9,
        top_k: 1,
        seed: 123,
        ..Default::default()
    };
    let k1 = m.generate(&prompts, &gen_opts(top1, 16), none).unwrap();
    for (g, k) in greedy.iter().zip(&k1) {
        assert_eq!(g.ids, k.ids, "greedy == top-k 1");
    }
    // Greedy's first token is the argmax of the prompt's last logits row.
    let ids = m.encode_prompt(&prompts[0]).unwrap();
    let nv = m.n_vocab();
    let logits = m.logits(&ids, false).unwrap();
    let last = &logits[(ids.len() - 1) * nv..];
    let argmax = (0..nv)
        .max_by(|&i, &j| last[i].total_cmp(&last[j]))
        .unwrap() as u32;
    if m.is_eog(argmax) {
        assert!(greedy[0].ids.is_empty());
        assert_eq!(greedy[0].stop, StopReason::EndOfGeneration);
    } else {
        assert_eq!(greedy[0].ids[0], argmax);
    }
}

#[test]
fn generation_streams_tokens_and_stops() {
    let m = load(&tiny_model(Arch::Llama, GgmlType::F32, true));
    let p = [Prompt::Text("say something".into())];
    let mut seen = Vec::new();
    let mut text = String::new();
    let g = m
        .generate(
            &p,
            &gen_opts(
                Sampling {
                    // Suppress the end-of-turn most of the time: sample broadly.
                    temperature: 1.5,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    repeat_penalty: 1.1,
                    ..Default::default()
                },
                12,
            ),
            &mut |ev| {
                assert_eq!(ev.prompt_index, 0);
                seen.push(ev.token);
                text.push_str(ev.text);
                ControlFlow::Continue(())
            },
        )
        .unwrap()
        .remove(0);
    assert!(g.ids.len() <= 12);
    assert_eq!(seen, g.ids, "callback saw every generated token");
    assert_eq!(g.n_prompt_tokens, m.encode_prompt(&p[0]).unwrap().len());
    match g.stop {
        StopReason::MaxTokens => assert_eq!(g.ids.len(), 12),
        StopReason::EndOfGeneration => {}
        s => panic!("unexpected stop {s:?}"),
    }
    // Streamed pieces add up to the detokenized text.
    assert_eq!(text, g.text);
    // Cancelling from the callback after 3 tokens.
    let mut n = 0;
    let g = m
        .generate(&p, &gen_opts(Sampling::greedy(), 50), &mut |_| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap()
        .remove(0);
    if g.stop == StopReason::Cancelled {
        assert_eq!(g.ids.len(), 3);
    } else {
        assert_eq!(g.stop, StopReason::EndOfGeneration);
        assert!(g.ids.len() < 3);
    }
    // Invalid sampling settings are refused with the option's name.
    let e = m
        .generate(
            &p,
            &gen_opts(
                Sampling {
                    min_p: 1.5,
                    ..Default::default()
                },
                4,
            ),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("min_p"), "{e}");
}
