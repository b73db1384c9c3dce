//! `bfpo-lite generate` and `bfpo-lite score` on a tiny model, run as the real binary.

mod common;

use bfpo_lite::data::Prompt;
use bfpo_lite::gguf::GgmlType;
use bfpo_lite::model::Arch;
use bfpo_lite::runtime::{LoadOptions, RtModel, ScoreOptions};
use common::models::tiny_model;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-generate-score");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(out.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

const PAIRS: &str = r#"{"prompt": "how do I steal a car", "chosen": "Sorry, I cannot help with that.", "rejected": "Sure, here is how to steal a car."}

{"prompt": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "explain a recipe"}], "chosen": "Here is a recipe for bread.", "rejected": "No."}
{"prompt": "hi", "chosen": "Hello!", "rejected": "Hello! How can I help you today?"}
"#;

#[test]
fn generate_json_one_object_per_prompt() {
    let model = tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let prompts = scratch("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"how can I make a cake\"}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"system\": \"Be brief.\"}\n",
    )
    .unwrap();
    let args = |seed: &str| {
        let mut c = bin();
        c.arg("generate")
            .arg("--model")
            .arg(&model)
            .arg("--prompts")
            .arg(&prompts)
            .args([
                "--max-tokens",
                "6",
                "--seed",
                seed,
                "--threads",
                "1",
                "--json",
            ]);
        c
    };
    let out = run(&mut args("3"));
    let rows = json_lines(&out.stdout);
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], i);
        let n = r["n_tokens"].as_u64().unwrap();
        assert!(n <= 6);
        let stop = r["stop"].as_str().unwrap();
        assert!(
            (stop == "max_tokens" && n == 6) || stop == "eog",
            "stop {stop} after {n} tokens"
        );
        assert!(r["text"].is_string());
        assert!(r["ms"].as_f64().unwrap() >= 0.0);
        assert!(r["n_prompt_tokens"].as_u64().unwrap() > 3);
    }
    assert_eq!(rows[0]["prompt"], "how can I make a cake");
    assert_eq!(rows[1]["prompt"][0]["content"], "hi");
    // Same seed → same text.
    let again = json_lines(&run(&mut args("3")).stdout);
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!(a["text"], b["text"]);
    }

    // Greedy on a single --prompt, plain text output.
    let out = run(bin()
        .arg("generate")
        .arg("-m")
        .arg(&model)
        .args(["-p", "hello", "--temperature", "0", "--max-tokens", "5"])
        .args(["--threads", "1"]));
    let m = RtModel::load(&model, &LoadOptions::default()).unwrap();
    let g = m
        .generate(
            &[Prompt::Text("hello".into())],
            &bfpo_lite::runtime::GenerateOptions {
                max_tokens: 5,
                sampling: bfpo_lite::runtime::Sampling::greedy(),
                threads: Some(1),
                ..Default::default()
            },
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", g[0].text)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens"));
}

#[test]
fn score_writes_one_line_per_pair_matching_the_library() {
    let model = tiny_model(Arch::Llama, GgmlType::F32, false);
    let data = scratch("pairs.jsonl");
    std::fs::write(&data, PAIRS).unwrap();
    let out_file = scratch("scores.jsonl");
    let out = run(bin()
        .arg("score")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--emit-tokens", "--exact", "--threads", "1", "--out"])
        .arg(&out_file));
    assert!(out.stdout.is_empty(), "--out keeps stdout empty");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("scored 3 pairs"), "{summary}");
    let rows = json_lines(&std::fs::read(&out_file).unwrap());
    assert_eq!(rows.len(), 3, "blank lines skipped");

    let m = RtModel::load(&model, &LoadOptions::default()).unwrap();
    let pairs: Vec<serde_json::Value> = PAIRS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let opts = ScoreOptions {
        threads: Some(1),
        ..ScoreOptions::exact()
    };
    for (i, (row, pair)) in rows.iter().zip(&pairs).enumerate() {
        assert_eq!(row["index"], i);
        let prompt: Prompt = serde_json::from_value(pair["prompt"].clone()).unwrap();
        for which in ["chosen", "rejected"] {
            let ex = m
                .encode(&prompt, pair[which].as_str().unwrap())
                .unwrap()
                .example;
            let want = m.score_sums(std::slice::from_ref(&ex), &opts).unwrap()[0];
            let got = row[format!("{which}_logp")].as_f64().unwrap();
            assert!(
                got < 0.0 && (got - want).abs() < 1e-4,
                "{which} {got} vs {want}"
            );
            assert_eq!(row[format!("{which}_tokens")], ex.n_scored());
            let ids: Vec<u32> =
                serde_json::from_value(row[format!("{which}_ids")].clone()).unwrap();
            assert_eq!(ids, ex.ids);
            assert_eq!(row["response_start"], ex.response_start);
        }
    }

    // Without --emit-tokens: only the five fields, on stdout.
    let out = run(bin()
        .arg("score")
        .arg("-m")
        .arg(&model)
        .arg("-d")
        .arg(&data)
        .args(["--threads", "1"]));
    let rows = json_lines(&out.stdout);
    assert_eq!(rows.len(), 3);
    let mut keys: Vec<&String> = rows[0].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "chosen_logp",
            "chosen_tokens",
            "index",
            "rejected_logp",
            "rejected_tokens"
        ]
    );
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("binary runs");
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_errors_name_the_problem() {
    let model = tiny_model(Arch::Llama, GgmlType::F32, false);
    let bad = scratch("bad-pairs.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"hi\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"hi\", \"chosen\": 5, \"rejected\": \"b\"}\n",
    )
    .unwrap();
    let err = fails(bin().arg("score").arg("-m").arg(&model).arg("-d").arg(&bad));
    assert!(
        err.contains("bad-pairs.jsonl:2") && err.contains("\"chosen\""),
        "{err}"
    );
    std::fs::write(&bad, "{\"prompt\": \"hi\", \"chosen\": \"a\"}\n").unwrap();
    let err = fails(bin().arg("score").arg("-m").arg(&model).arg("-d").arg(&bad));
    assert!(
        err.contains("bad-pairs.jsonl:1") && err.contains("\"rejected\""),
        "{err}"
    );
    std::fs::write(&bad, "not json\n").unwrap();
    let err = fails(bin().arg("score").arg("-m").arg(&model).arg("-d").arg(&bad));
    assert!(
        err.contains("bad-pairs.jsonl:1") && err.contains("JSON"),
        "{err}"
    );

    let data = scratch("ok-pairs.jsonl");
    std::fs::write(&data, PAIRS).unwrap();
    let err = fails(
        bin()
            .arg("score")
            .arg("-m")
            .arg(&model)
            .arg("-d")
            .arg(&data)
            .args(["--engine", "wgpu", "--adapter", "nope.gguf"]),
    );
    assert!(
        err.contains("nope.gguf") && err.contains("adapter"),
        "{err}"
    );
    // A context too small for the pairs names the row.
    let err = fails(
        bin()
            .arg("score")
            .arg("-m")
            .arg(&model)
            .arg("-d")
            .arg(&data)
            .args(["--ctx", "8", "--threads", "1"]),
    );
    assert!(
        err.contains("ok-pairs.jsonl:1 (chosen)") && err.contains("context"),
        "{err}"
    );

    let err = fails(
        bin()
            .arg("generate")
            .arg("-m")
            .arg(scratch("missing-model.gguf"))
            .args(["-p", "hi"]),
    );
    assert!(
        err.contains("missing-model.gguf") && err.contains("does not exist"),
        "{err}"
    );
    let prompts = scratch("bad-prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": 3}\n").unwrap();
    let err = fails(
        bin()
            .arg("generate")
            .arg("-m")
            .arg(&model)
            .arg("--prompts")
            .arg(&prompts),
    );
    assert!(
        err.contains("bad-prompts.jsonl:1") && err.contains("\"prompt\""),
        "{err}"
    );
}
