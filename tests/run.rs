//! The run as a library (`bfpo_lite::run`): a whole `TuneJob` on a tiny model with the CPU
//! engine, its events (and their JSON form), cancellation with a checkpoint and resume, and the
//! safety labels of helpfulness-only data.

mod common;

use bfpo_lite::run::{Event, RunError, TuneJob};
use bfpo_lite::train::config::TrainConfig;

use common::tune::{config, demo_file, tiny};

/// Events as the CLI's `--json` prints them: one JSON object per event with an "event" tag.
fn json(e: &Event) -> serde_json::Value {
    let line = serde_json::to_string(e).unwrap();
    assert!(!line.contains('\n'));
    serde_json::from_str(&line).unwrap()
}

#[test]
fn tune_job_prepares_trains_and_finishes_with_one_event_stream() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(tiny(), demo_file("heldout.jsonl"), dir.path());
    let mut events = Vec::new();
    let mut obs = |e: &Event| events.push(json(e));
    let mut run = TuneJob::from_config(cfg)
        .unwrap()
        .prepare(&mut obs)
        .unwrap();
    let n_train = run.data().train.len();
    let safety = run.report().safety.train;
    let outcome = run.train(&mut obs).unwrap().clone();
    assert_eq!(outcome.steps, 4);
    let summary = run.finish(&mut obs).unwrap();
    assert_eq!(summary.steps, 4);
    assert!(dir.path().join("adapter.gguf").exists());
    assert!(dir.path().join("summary.json").exists());

    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for k in ["model_opened", "data_loaded", "plan", "engine", "reference"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    assert_eq!(
        kinds.iter().filter(|k| **k == "step").count(),
        4,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"done"));
    let done = events.last().unwrap();
    assert_eq!(done["steps"], 4);
    assert_eq!(done["adapter"], summary.adapter.as_str());
    // The per-safety-case counts are shown: in the event, the data report and summary.json.
    let loaded = events.iter().find(|e| e["event"] == "data_loaded").unwrap();
    assert_eq!(loaded["train_pairs"], n_train);
    let cases = &loaded["safety"]["train"];
    let total: u64 = [
        "both_safe",
        "only_chosen_safe",
        "only_rejected_safe",
        "both_unsafe",
    ]
    .iter()
    .map(|k| cases[k].as_u64().unwrap())
    .sum();
    assert_eq!(total as usize, n_train);
    assert_eq!(cases["only_chosen_safe"], safety.only_chosen_safe);
    assert!(
        safety.only_chosen_safe + safety.only_rejected_safe > 0,
        "{safety:?}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(saved["data"]["safety"]["train"], *cases);
    assert_eq!(
        saved["data"]["loads"][0]["safety"]["both_safe"],
        cases["both_safe"]
    );
}

#[test]
fn cancel_stops_training_with_a_checkpoint_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(tiny(), demo_file("heldout.jsonl"), dir.path());
    let job = TuneJob::from_config(cfg.clone()).unwrap();
    let cancel = job.cancel_token();
    let mut obs = |e: &Event| {
        if let Event::Step(m) = e
            && m.step == 2
        {
            cancel.cancel();
        }
    };
    let mut run = job.prepare(&mut obs).unwrap();
    let out = run.train(&mut obs).unwrap();
    assert!(out.interrupted);
    assert_eq!(out.steps, 2);
    let s = run.finish(&mut |_: &Event| {}).unwrap();
    assert!(s.interrupted);
    let ck = dir.path().join("checkpoint");
    assert!(ck.join("state.json").exists());

    let mut resumed = None;
    let mut steps = Vec::new();
    let mut obs = |e: &Event| match e {
        Event::Resumed { step, .. } => resumed = Some(*step),
        Event::Step(m) => steps.push(m.step),
        _ => {}
    };
    let job = TuneJob::from_config(cfg).unwrap().resume(Some(ck));
    let mut run = job.prepare(&mut obs).unwrap();
    let out = run.train(&mut obs).unwrap();
    assert!(!out.interrupted);
    assert_eq!(out.steps, 4);
    assert_eq!(resumed, Some(2));
    assert_eq!(steps, vec![3, 4]);

    // A job cancelled before it starts stops before touching the data.
    let dir2 = tempfile::tempdir().unwrap();
    let job =
        TuneJob::from_config(config(tiny(), demo_file("heldout.jsonl"), dir2.path())).unwrap();
    job.cancel_token().cancel();
    let err = job.prepare(&mut |_: &Event| {}).err().unwrap();
    assert!(matches!(err, RunError::Cancelled), "{err}");
}

const UF: &str = r#"{"prompt": "Write a haiku", "prompt_id": "a", "chosen": [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Soft rain on the roof"}], "rejected": [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "No."}], "messages": [], "score_chosen": 8.0, "score_rejected": 2.0}
{"prompt": "Name a fruit", "prompt_id": "b", "chosen": [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "An apple."}], "rejected": [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "A chair."}], "messages": [], "score_chosen": 9.0, "score_rejected": 1.0}
"#;

const HH: &str = r#"{"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with breaking into places.", "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Insert a tension wrench and rake the pins."}
{"chosen": "\n\nHuman: Say something mean.\n\nAssistant: I'd rather say something kind.", "rejected": "\n\nHuman: Say something mean.\n\nAssistant: You are worthless."}
"#;

/// Helpfulness-only rows (UltraFeedback, HH) in --data are refused without --assume-safe, with
/// an error naming both ways out; with it, the run warns that BFPO is IPO on them, and HH
/// harmless-base is named as losing its safety ranking.
#[test]
fn helpfulness_only_data_needs_assume_safe_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let uf = dir.path().join("ultrafeedback.jsonl");
    std::fs::write(&uf, UF).unwrap();
    let hh_dir = dir.path().join("harmless-base");
    std::fs::create_dir_all(&hh_dir).unwrap();
    let hh = hh_dir.join("train.jsonl");
    std::fs::write(&hh, HH).unwrap();
    for data in [&uf, &hh] {
        let out = dir.path().join("run");
        let cfg = TrainConfig {
            max_steps: 1,
            ..config(tiny(), data.clone(), &out)
        };
        let err = TuneJob::from_config(cfg.clone())
            .unwrap()
            .dry_run(&mut |_: &Event| {})
            .err()
            .unwrap();
        let msg = format!("{err}");
        assert!(
            msg.contains(&format!("{}:1", data.display()))
                && msg.contains("--assume-safe")
                && msg.contains("--buffer"),
            "{msg}"
        );
        let mut warnings = Vec::new();
        let d = TuneJob::from_config(cfg)
            .unwrap()
            .assume_safe(true)
            .dry_run(&mut |e: &Event| {
                if let Event::Warning { message } = e {
                    warnings.push(message.clone())
                }
            })
            .unwrap();
        assert_eq!(d.data.safety.train.both_safe, d.train_pairs);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("IPO") && w.contains("--buffer")),
            "{warnings:?}"
        );
        let harmless = warnings.iter().any(|w| w.contains("harmless-base"));
        assert_eq!(harmless, data == &hh, "{warnings:?}");
    }
}
