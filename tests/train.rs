//! The training pipeline end to end on tiny models: exact stop-and-resume, the reference cache,
//! bad rows, and the built-in demo learning what it should.

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::data::batch::TruncationConfig;
use bfpo_lite::data::formats::LoadOptions;
use bfpo_lite::data::refcache::RefCache;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::optim::AdamWConfig;
use bfpo_lite::runtime::{LoadOptions as RtLoad, RtModel};
use bfpo_lite::train::checkpoint::Checkpoint;
use bfpo_lite::train::config::TrainConfig;
use bfpo_lite::train::engine::RefEngine;
use bfpo_lite::train::gpu_engine::GpuEngine;
use bfpo_lite::train::prepare::{self, PrepareReport, RefSource};
use bfpo_lite::train::trainer::{
    self, CheckpointSink, Engine, Event, SeqScore, TrainData, TrainError,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/demo")
        .join(name)
}

/// A small, fixed slice of the demo data, tokenized with a tiny model's template.
fn data(model: &Path, n_train: usize, n_eval: usize) -> TrainData {
    let rt = RtModel::load(model, &RtLoad::default()).unwrap();
    let trunc = TruncationConfig {
        max_length: 128,
        max_prompt_length: 64,
        ..Default::default()
    };
    let mut report = PrepareReport::default();
    let opts = LoadOptions::default();
    let (train, _) = prepare::load(&[demo_file("train.jsonl")], &opts).unwrap();
    let (eval, _) = prepare::load(&[demo_file("heldout.jsonl")], &opts).unwrap();
    let train = prepare::encode_pairs(&rt, &train[..n_train], &trunc, true, &mut report).unwrap();
    let eval = prepare::encode_pairs(&rt, &eval[..n_eval], &trunc, true, &mut report).unwrap();
    TrainData {
        train,
        eval,
        buffer: Vec::new(),
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        rank: 4,
        lora_alpha: 8.0,
        targets: "attn_v,ffn_down".into(),
        learning_rate: 5e-3,
        pairs_per_step: 2,
        grad_accum: 2,
        max_steps: 8,
        save_every: 0,
        eval_every: 0,
        max_length: 128,
        max_prompt_length: 64,
        ..Default::default()
    }
}

fn lora(cfg: &ModelConfig, tc: &TrainConfig) -> LoraWeights {
    let spec = LoraSpec {
        targets: vec![Target::AttnV, Target::FfnDown],
        layers: (0..cfg.n_layer).collect(),
        rank: tc.rank,
        alpha: tc.lora_alpha,
        dropout: 0.0,
        seed: tc.seed,
    };
    LoraWeights::init(&spec, cfg).unwrap()
}

fn cpu_engine(model: &Path, tc: &TrainConfig) -> RefEngine {
    let file = GgufFile::open(model).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let w = Weights::from_gguf(&file, &cfg).unwrap();
    RefEngine::new(
        RefModel::from_weights(&cfg, &w).unwrap(),
        lora(&cfg, tc),
        AdamWConfig::default(),
    )
    .unwrap()
}

fn gpu_engine(model: &Path, tc: &TrainConfig) -> GpuEngine {
    let file = GgufFile::open(model).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    GpuEngine::new(
        common::gpu::gpu(),
        &file,
        &cfg,
        lora(&cfg, tc),
        AdamWConfig::default(),
    )
    .unwrap()
}

/// Runs training, recording train losses; stops (as Ctrl-C would) after `stop_after` steps.
fn run(
    engine: &mut dyn Engine,
    tc: &TrainConfig,
    data: &TrainData,
    ck_dir: &Path,
    resume: Option<Checkpoint>,
    stop_after: Option<usize>,
) -> (Vec<f64>, trainer::TrainOutcome) {
    let stop = AtomicBool::new(false);
    let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
    let mut sink = CheckpointSink {
        dir: ck_dir.to_path_buf(),
        write_extra: &mut extra,
    };
    let mut losses = Vec::new();
    let out = trainer::train(engine, tc, data, resume, &stop, &mut sink, &mut |e| {
        if let Event::Step(m) = e {
            losses.push(m.loss);
            if Some(m.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    (losses, out)
}

fn with_reference(engine: &mut dyn Engine, data: &mut TrainData) {
    for set in [&mut data.train, &mut data.eval] {
        trainer::compute_reference(engine, set, 8, &mut |_| {}).unwrap();
    }
}

fn check_resume(
    make: &dyn Fn() -> Box<dyn Engine>,
    model: &Path,
    what: &str,
    tc: &TrainConfig,
) -> Vec<f64> {
    let tc = tc.clone();
    let mut d = data(model, 12, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut a = make();
    with_reference(a.as_mut(), &mut d);
    let (full, out) = run(a.as_mut(), &tc, &d, &dir.path().join("a"), None, None);
    assert_eq!(full.len(), 8);
    assert!(!out.interrupted);
    let lora_full = a.lora().unwrap();

    let mut b = make();
    let (first, out_b) = run(b.as_mut(), &tc, &d, &dir.path().join("b"), None, Some(3));
    assert!(
        out_b.interrupted,
        "{what}: the stop flag ends the run with a checkpoint"
    );
    assert_eq!(first, full[..3].to_vec(), "{what}: the same first losses");
    let ck = Checkpoint::load(&dir.path().join("b")).unwrap();
    assert_eq!(ck.meta.step, 3);
    let mut c = make();
    let (rest, out_c) = run(c.as_mut(), &tc, &d, &dir.path().join("b"), Some(ck), None);
    assert_eq!(out_c.steps, 8);
    assert_eq!(
        rest,
        full[3..].to_vec(),
        "{what}: resumed losses equal the uninterrupted run's"
    );
    assert_eq!(
        c.lora().unwrap(),
        lora_full,
        "{what}: the same final adapter, bit for bit"
    );
    full
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run_cpu() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::Q8_0, true);
    let tc = config();
    check_resume(
        &|| Box::new(cpu_engine(&model, &tc)),
        &model,
        "cpu engine",
        &tc,
    );
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run_gpu() {
    let model = common::models::tiny_model(Arch::Llama, GgmlType::F16, false);
    let tc = config();
    check_resume(
        &|| Box::new(gpu_engine(&model, &tc)),
        &model,
        "gpu engine",
        &tc,
    );
}

#[test]
fn dropout_training_resumes_exactly_and_changes_the_run_gpu() {
    // LoRA dropout masks come from (seed, step, micro-step): a resumed run redraws them.
    let model = common::models::tiny_model(Arch::Llama, GgmlType::F16, false);
    let tc = TrainConfig {
        lora_dropout: 0.2,
        ..config()
    };
    let dropped = check_resume(
        &|| Box::new(gpu_engine(&model, &tc)),
        &model,
        "gpu engine, dropout",
        &tc,
    );
    // The same run without dropout: step 1 is equal (B = 0 at init, so the LoRA branch adds
    // nothing), later steps differ (dropout changed the gradients).
    let plain_tc = TrainConfig {
        max_steps: 3,
        ..config()
    };
    let mut d = data(&model, 12, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut e = gpu_engine(&model, &plain_tc);
    with_reference(&mut e, &mut d);
    let (plain, _) = run(&mut e, &plain_tc, &d, dir.path(), None, None);
    assert_eq!(plain[0], dropped[0], "step 1 loss (B = 0)");
    assert!(
        (plain[2] - dropped[2]).abs() > 1e-9,
        "dropout did not change step 3: {} vs {}",
        plain[2],
        dropped[2]
    );
}

#[test]
fn resume_refuses_a_checkpoint_of_other_settings() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let tc = config();
    let mut d = data(&model, 6, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut e = cpu_engine(&model, &tc);
    with_reference(&mut e, &mut d);
    run(
        &mut e,
        &TrainConfig {
            max_steps: 2,
            ..tc.clone()
        },
        &d,
        dir.path(),
        None,
        None,
    );
    let ck = Checkpoint::load(dir.path()).unwrap();
    let other = TrainConfig { seed: 7, ..tc };
    let stop = AtomicBool::new(false);
    let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
    let mut sink = CheckpointSink {
        dir: dir.path().join("x"),
        write_extra: &mut extra,
    };
    let err = trainer::train(
        &mut cpu_engine(&model, &other),
        &other,
        &d,
        Some(ck),
        &stop,
        &mut sink,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Resume(_)), "{err}");
    assert!(
        err.to_string().contains("different data or settings")
            && err.to_string().contains("seed: 42 -> 7"),
        "{err}"
    );
}

/// Wraps an engine to observe it: counts the sequences it scores, records the size of each
/// training forward pass, and returns a NaN log-prob from the forward passes listed in `poison`
/// (0-based call numbers).
struct Probe<E> {
    inner: E,
    scored: usize,
    forward_sizes: Vec<usize>,
    poison: Vec<usize>,
    /// Replaces the inner engine's description (another device, as far as caches can tell).
    device: Option<String>,
}

impl<E> Probe<E> {
    fn new(inner: E) -> Self {
        Probe {
            inner,
            scored: 0,
            forward_sizes: Vec::new(),
            poison: Vec::new(),
            device: None,
        }
    }
}

impl<E: Engine> Engine for Probe<E> {
    fn describe(&self) -> String {
        self.device.clone().unwrap_or_else(|| self.inner.describe())
    }
    fn score(&mut self, ex: &[&Example], adapter: bool) -> Result<Vec<SeqScore>, TrainError> {
        self.scored += ex.len();
        self.inner.score(ex, adapter)
    }
    fn forward_train(&mut self, ex: &[&Example]) -> Result<Vec<SeqScore>, TrainError> {
        let call = self.forward_sizes.len();
        self.forward_sizes.push(ex.len());
        let mut s = self.inner.forward_train(ex)?;
        if self.poison.contains(&call) {
            s[0].logp = f64::NAN;
        }
        Ok(s)
    }
    fn backward(&mut self, w: &[f32]) -> Result<(), TrainError> {
        self.inner.backward(w)
    }
    fn grad_norm(&mut self) -> Result<f64, TrainError> {
        self.inner.grad_norm()
    }
    fn optimizer_step(&mut self, lr: f64, s: f64) -> Result<(), TrainError> {
        self.inner.optimizer_step(lr, s)
    }
    fn zero_grads(&mut self) -> Result<(), TrainError> {
        self.inner.zero_grads()
    }
    fn lora(&mut self) -> Result<LoraWeights, TrainError> {
        self.inner.lora()
    }
    fn save_state(
        &mut self,
    ) -> Result<(BTreeMap<String, Vec<f32>>, serde_json::Value), TrainError> {
        self.inner.save_state()
    }
    fn load_state(
        &mut self,
        t: &BTreeMap<String, Vec<f32>>,
        s: &serde_json::Value,
    ) -> Result<(), TrainError> {
        self.inner.load_state(t, s)
    }
}

#[test]
fn reference_cache_is_reused_and_invalidated() {
    let model = common::models::tiny_model(Arch::Llama, GgmlType::Q8_0, false);
    let tc = config();
    let dir = tempfile::tempdir().unwrap();
    let cache = RefCache::open(dir.path()).unwrap();
    let id = cache.fingerprint(&model).unwrap().identity();
    let mut e = Probe::new(cpu_engine(&model, &tc));
    let fill = |e: &mut Probe<RefEngine>,
                pairs: &mut [trainer::PreparedPair],
                id: &[u8],
                settings: &str| {
        prepare::fill_reference(e, Some((&cache, id)), settings, pairs, 8, &mut |_| {}).unwrap()
    };
    let mut d = data(&model, 5, 0);
    let first = fill(&mut e, &mut d.train, &id, "s");
    assert!(matches!(first, RefSource::Computed(Some(_))), "{first:?}");
    assert_eq!(e.scored, 10, "a first run scores every sequence");
    let want: Vec<_> = d.train.iter().map(|p| p.ref_logps).collect();

    // A second run with the same model, data and settings reads the cache: no forward pass.
    let mut d2 = data(&model, 5, 0);
    let second = fill(&mut e, &mut d2.train, &id, "s");
    assert!(matches!(second, RefSource::Cache(_)), "{second:?}");
    assert_eq!(e.scored, 10, "the second run must not score anything");
    assert_eq!(
        d2.train.iter().map(|p| p.ref_logps).collect::<Vec<_>>(),
        want
    );

    // Each part of the key invalidates it: settings, data, model identity.
    fill(&mut e, &mut d2.train, &id, "other settings");
    assert_eq!(e.scored, 20);
    let mut d3 = data(&model, 4, 0);
    fill(&mut e, &mut d3.train, &id, "s");
    assert_eq!(e.scored, 28);
    let other_model = common::models::tiny_model(Arch::Llama, GgmlType::F16, false);
    let other_id = cache.fingerprint(&other_model).unwrap().identity();
    assert_ne!(other_id, id);
    fill(&mut e, &mut d2.train, &other_id, "s");
    assert_eq!(e.scored, 38);

    // Another device (engine description) does not reuse log-probs computed on this one.
    e.device = Some("wgpu: some other GPU (Metal)".into());
    let other_device = fill(&mut e, &mut d2.train, &id, "s");
    assert!(
        matches!(other_device, RefSource::Computed(Some(_))),
        "{other_device:?}"
    );
    assert_eq!(e.scored, 48, "another device recomputes");
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"));
    c.env(
        "BFPO_CACHE_DIR",
        std::env::temp_dir().join(format!("bfpo-test-cache-{}", std::process::id())),
    );
    c
}

#[test]
fn bad_rows_are_counted_or_stop_a_strict_run() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let good = std::fs::read_to_string(demo_file("train.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(6).collect();
    lines.insert(2, "{\"prompt\": \"hi\", \"response_0\": \"a\"}");
    lines.insert(4, "not json");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let o = bin()
        .args([
            "tune",
            "--engine",
            "cpu",
            "--max-steps",
            "1",
            "--pairs-per-step",
            "2",
            "--grad-accum",
            "1",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("2 rows skipped"), "{stderr}");
    assert!(
        stderr.contains("safety cases (training): "),
        "the pairs per safety case are shown: {stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let skipped: u64 = summary["data"]["loads"][0]["skipped_by_reason"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(skipped, 2, "{summary}");
    assert!(out.join("adapter.gguf").exists());

    let o = bin()
        .args(["tune", "--engine", "cpu", "--strict", "--max-steps", "1"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("strict"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("pairs.jsonl:3"),
        "names file and line: {stderr}"
    );
}

#[test]
fn existing_runs_are_not_overwritten_without_force() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter.gguf"), b"keep me").unwrap();
    let o = bin()
        .args(["tune", "--engine", "cpu", "--max-steps", "1"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(demo_file("heldout.jsonl"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(dir.path().join("adapter.gguf")).unwrap(),
        b"keep me"
    );
}

/// The README's first command: `bfpo-lite tune` with no model or data runs the demo on the GPU
/// engine (lavapipe here) and must learn the safety ranking.
#[test]
fn demo_lowers_the_loss_and_learns_the_safety_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = bin()
        .args(["tune", "--json"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // `--json`: one event per line; the last ("done") carries the summary.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let s = events.last().unwrap();
    assert_eq!(s["event"], "done", "{s}");
    let metrics = bfpo_lite::train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let train: Vec<f64> = metrics
        .iter()
        .filter(|m| m.split == "train")
        .map(|m| m.loss)
        .collect();
    // Per-step losses of 4 pairs are noisy: compare the first and last quarters of the run.
    let k = train.len() / 4;
    let early = train[..k].iter().sum::<f64>() / k as f64;
    let late = train[train.len() - k..].iter().sum::<f64>() / k as f64;
    assert!(
        late < 0.5 * early,
        "loss falls: first {k} steps {early:.1}, last {k} {late:.1}"
    );
    let before = s["heldout_before"]["safety_ranking_accuracy"]
        .as_f64()
        .unwrap();
    let after = s["heldout_after"]["safety_ranking_accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        after >= 0.6 && after > before + 0.2,
        "held-out safety ranking {before} -> {after}"
    );
    let acc = s["final_eval"]["accuracy/bfpo"].as_f64().unwrap();
    assert!(
        acc >= 0.7,
        "held-out BFPO-ranking accuracy of the implicit reward {acc}"
    );
    for f in [
        "adapter.gguf",
        "demo-model.gguf",
        "demo-data/train.jsonl",
        "curves.svg",
        "summary.json",
        "checkpoint/state.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The adapter loads in llama.cpp on the demo model.
    let mut rt = RtModel::load(&out.join("demo-model.gguf"), &RtLoad::default()).unwrap();
    rt.load_adapter(&out.join("adapter.gguf")).unwrap();
}

#[test]
fn non_finite_steps_are_skipped_reported_and_stop_the_run_when_repeated() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let tc = TrainConfig {
        grad_accum: 1,
        max_steps: 6,
        ..config()
    };
    let mut d = data(&model, 12, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut e = Probe {
        poison: vec![1, 4],
        ..Probe::new(cpu_engine(&model, &tc))
    };
    with_reference(&mut e, &mut d);
    let stop = AtomicBool::new(false);
    let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
    let mut sink = CheckpointSink {
        dir: dir.path().join("ck"),
        write_extra: &mut extra,
    };
    let mut skipped = Vec::new();
    let mut steps = Vec::new();
    let out = trainer::train(
        &mut e,
        &tc,
        &d,
        None,
        &stop,
        &mut sink,
        &mut |ev| match ev {
            Event::SkippedStep { step, reason } => skipped.push((step, reason)),
            Event::Step(m) => steps.push(m.step),
            _ => {}
        },
    )
    .unwrap();
    assert_eq!(out.skipped_steps, 2);
    assert_eq!(skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 5]);
    assert!(
        skipped[0].1.contains("non-finite") || skipped[0].1.contains("NaN"),
        "{:?}",
        skipped[0]
    );
    assert_eq!(steps, vec![1, 3, 4, 6], "the other steps still update");
    let lora = e.lora().unwrap();
    assert!(
        lora.tensors
            .iter()
            .all(|t| t.b.iter().all(|x| x.is_finite()))
    );

    // Three bad steps in a row stop the run with a clear error.
    let mut e = Probe {
        poison: vec![0, 1, 2],
        ..Probe::new(cpu_engine(&model, &tc))
    };
    let err = trainer::train(&mut e, &tc, &d, None, &stop, &mut sink, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::TooManyBadSteps {
                count: 3,
                step: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
}

#[test]
fn buffered_training_mixes_one_helpfulness_batch_into_every_step() {
    let model = common::models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let tc = TrainConfig {
        grad_accum: 1,
        max_steps: 4,
        ..config()
    };
    let mut d = data(&model, 8, 0);
    // The buffer: benign pairs only, treated as safe on both sides (as UltraFeedback would be).
    let mut buffer = data(&model, 20, 0).train;
    buffer.retain(|p| p.chosen_safe && p.rejected_safe);
    assert!(buffer.len() >= 3);
    let n_buffer = buffer.len();
    d.buffer = buffer;
    let mut s = Probe::new(cpu_engine(&model, &tc));
    for set in [&mut d.train, &mut d.buffer] {
        trainer::compute_reference(&mut s, set, 8, &mut |_| {}).unwrap();
    }
    s.forward_sizes.clear();
    let dir = tempfile::tempdir().unwrap();
    let (with_buffer, _) = run(&mut s, &tc, &d, &dir.path().join("a"), None, None);
    // pairs_per_step = 2 safety pairs + 2 buffer pairs (ratio 1) = 8 sequences per micro-step.
    assert_eq!(s.forward_sizes, vec![8; 4], "buffer of {n_buffer} pairs");
    let half = TrainConfig {
        buffer_ratio: 0.5,
        ..tc.clone()
    };
    s.forward_sizes.clear();
    run(&mut s, &half, &d, &dir.path().join("b"), None, None);
    assert_eq!(
        s.forward_sizes,
        vec![6; 4],
        "--buffer-ratio 0.5: one buffer pair per two safety pairs"
    );
    d.buffer.clear();
    let mut plain = cpu_engine(&model, &tc);
    let (without, _) = run(&mut plain, &tc, &d, &dir.path().join("c"), None, None);
    assert_ne!(
        with_buffer, without,
        "the buffer batch changes the training losses"
    );
}

/// Issue 11, fix 8: an epoch is exactly one pass. 5 pairs, 2 per micro-step, 2 micro-steps per
/// optimiser step: the epoch's batches are 2 + 2 + 1 pairs, so step 1 runs two micro-steps and
/// step 2 a short one (like Hugging Face's last step); nothing is borrowed from epoch 2.
#[test]
fn an_epoch_is_exactly_one_pass_and_buffer_ratio_zero_mixes_nothing() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let tc = TrainConfig {
        max_steps: 0,
        epochs: 1,
        ..config()
    };
    let mut d = data(&model, 5, 0);
    let mut s = Probe::new(cpu_engine(&model, &tc));
    trainer::compute_reference(&mut s, &mut d.train, 8, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut epochs = Vec::new();
    let stop = AtomicBool::new(false);
    let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
    let mut sink = CheckpointSink {
        dir: dir.path().join("a"),
        write_extra: &mut extra,
    };
    let out = trainer::train(&mut s, &tc, &d, None, &stop, &mut sink, &mut |e| {
        if let Event::Step(m) = e {
            epochs.push(m.epoch);
        }
    })
    .unwrap();
    assert_eq!(out.steps, 2);
    let mut sizes = s.forward_sizes.clone();
    sizes.sort();
    assert_eq!(
        sizes,
        vec![2, 4, 4],
        "one pass over 5 pairs: {:?}",
        s.forward_sizes
    );
    assert_eq!(
        s.forward_sizes.iter().sum::<usize>(),
        2 * 5,
        "every pair exactly once"
    );
    assert_eq!(epochs.last().copied(), Some(1.0), "{epochs:?}");

    // --buffer-ratio 0 with a buffer given: no buffer pair in any micro-step.
    let mut buffer = data(&model, 20, 0).train;
    buffer.retain(|p| p.chosen_safe && p.rejected_safe);
    assert!(!buffer.is_empty());
    d.buffer = buffer;
    trainer::compute_reference(&mut s, &mut d.buffer, 8, &mut |_| {}).unwrap();
    let tc0 = TrainConfig {
        buffer_ratio: 0.0,
        grad_accum: 1,
        max_steps: 2,
        ..config()
    };
    s.forward_sizes.clear();
    run(&mut s, &tc0, &d, &dir.path().join("b"), None, None);
    assert_eq!(
        s.forward_sizes,
        vec![4, 4],
        "buffer ratio 0: safety pairs only"
    );
}

/// Issue 11, fix 6: the logged loss is the whole objective, BFPO(safety batch) + BFPO(buffer
/// batch), with both halves logged as `loss/safety` and `loss/buffer`.
#[test]
fn logged_loss_includes_the_buffer_half() {
    let model = common::models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let tc = TrainConfig {
        grad_accum: 1,
        max_steps: 2,
        ..config()
    };
    let mut d = data(&model, 8, 0);
    let mut buffer = data(&model, 20, 0).train;
    buffer.retain(|p| p.chosen_safe && p.rejected_safe);
    d.buffer = buffer;
    let mut e = cpu_engine(&model, &tc);
    for set in [&mut d.train, &mut d.buffer] {
        trainer::compute_reference(&mut e, set, 8, &mut |_| {}).unwrap();
    }
    let records = |e: &mut RefEngine, d: &TrainData, dir: &Path| {
        let stop = AtomicBool::new(false);
        let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
        let mut sink = CheckpointSink {
            dir: dir.to_path_buf(),
            write_extra: &mut extra,
        };
        let mut out = Vec::new();
        trainer::train(e, &tc, d, None, &stop, &mut sink, &mut |ev| {
            if let Event::Step(m) = ev {
                out.push(serde_json::to_value(&m).unwrap());
            }
        })
        .unwrap();
        out
    };
    let dir = tempfile::tempdir().unwrap();
    let with = records(&mut e, &d, &dir.path().join("a"));
    let mut plain_data = TrainData {
        train: d.train.clone(),
        eval: Vec::new(),
        buffer: Vec::new(),
    };
    plain_data.buffer.clear();
    let without = records(
        &mut cpu_engine(&model, &tc),
        &plain_data,
        &dir.path().join("b"),
    );
    // Step 1: B = 0, so policy = reference; the safety batch is the same in both runs.
    let f = |v: &serde_json::Value, k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("record lacks {k}: {v}"))
    };
    let (safety, buffer) = (f(&with[0], "loss/safety"), f(&with[0], "loss/buffer"));
    assert!(buffer > 0.0, "buffer half {buffer}");
    assert!(
        (safety - f(&without[0], "loss")).abs() < 1e-12,
        "safety half {safety} vs the run without a buffer {}",
        f(&without[0], "loss")
    );
    assert!(
        (f(&with[0], "loss") - (safety + buffer)).abs() < 1e-12,
        "loss = safety + buffer: {} vs {safety} + {buffer}",
        f(&with[0], "loss")
    );
    assert!(without[0].get("loss/buffer").is_none_or(|v| v.is_null()));
    // Rewards and log-probs are averaged over every pair of the step, the buffer's included
    // (at step 1 the safety pairs are the same in both runs).
    assert_ne!(f(&with[0], "logps/chosen"), f(&without[0], "logps/chosen"));
}

/// Issue 11, fix 7: `--resume` with settings the run depends on changed is refused, naming each
/// change (old and new value); bookkeeping settings may change.
#[test]
fn resume_refuses_changed_settings_and_names_them() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let tc = TrainConfig {
        max_steps: 4,
        ..config()
    };
    let mut d = data(&model, 6, 0);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut e = cpu_engine(&model, &tc);
    with_reference(&mut e, &mut d);
    run(&mut e, &tc, &d, &ck, None, Some(2));
    let resume = |other: &TrainConfig| {
        let stop = AtomicBool::new(false);
        let mut extra = |_: &Path, _: &LoraWeights, _: usize| Ok(());
        let mut sink = CheckpointSink {
            dir: dir.path().join("x"),
            write_extra: &mut extra,
        };
        trainer::train(
            &mut cpu_engine(&model, other),
            other,
            &d,
            Some(Checkpoint::load(&ck).unwrap()),
            &stop,
            &mut sink,
            &mut |_| {},
        )
    };
    let changed = TrainConfig {
        learning_rate: 1e-3,
        max_grad_norm: 0.5,
        epochs: 3,
        ..tc.clone()
    };
    let err = resume(&changed).unwrap_err().to_string();
    for want in [
        "learning_rate: 0.005 -> 0.001",
        "max_grad_norm: 1 -> 0.5",
        "epochs: 1 -> 3",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    for (name, c) in [
        (
            "max_steps",
            TrainConfig {
                max_steps: 9,
                ..tc.clone()
            },
        ),
        (
            "warmup_ratio",
            TrainConfig {
                warmup_ratio: 0.3,
                ..tc.clone()
            },
        ),
        (
            "schedule",
            TrainConfig {
                schedule: bfpo_lite::train::config::ScheduleKind::Linear,
                ..tc.clone()
            },
        ),
        (
            "buffer_ratio",
            TrainConfig {
                buffer_ratio: 0.5,
                ..tc.clone()
            },
        ),
        (
            "lora_dropout",
            TrainConfig {
                lora_dropout: 0.1,
                ..tc.clone()
            },
        ),
        (
            "adam_beta2",
            TrainConfig {
                adam_beta2: 0.99,
                ..tc.clone()
            },
        ),
        (
            "weight_decay",
            TrainConfig {
                weight_decay: 0.1,
                ..tc.clone()
            },
        ),
    ] {
        let err = resume(&c).expect_err(name).to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
    // Bookkeeping may change: checkpoint/eval cadence.
    let ok = TrainConfig {
        save_every: 1,
        eval_every: 1,
        ..tc.clone()
    };
    assert_eq!(resume(&ok).unwrap().steps, 4);
}

/// Issue 11, fix 11: the summary reports the BFPO-ranking accuracy over the last steps (not the
/// last step's `rewards/accuracies`), and Mesa's XDG_RUNTIME_DIR complaint never reaches the
/// terminal.
#[test]
fn demo_summary_reports_recent_bfpo_accuracy_and_no_mesa_noise() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = bin()
        .env_remove("XDG_RUNTIME_DIR")
        .args(["tune", "--max-steps", "4"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    assert!(!stdout.contains("reward accuracy"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("last 4 steps"))
        .unwrap_or_else(|| panic!("no 'last 4 steps' line in:\n{stdout}"));
    assert!(line.contains("BFPO-ranking accuracy"), "{line}");
    assert!(line.contains("16 pairs"), "4 steps of 4 pairs: {line}");

    // Any GPU command, XDG_RUNTIME_DIR unset or pointing nowhere.
    for v in [None, Some("/nonexistent/xdg")] {
        let mut c = bin();
        match v {
            None => c.env_remove("XDG_RUNTIME_DIR"),
            Some(p) => c.env("XDG_RUNTIME_DIR", p),
        };
        let o = c.arg("devices").output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{v:?}: {stderr}");
    }
}

/// Issue 11, fix 9: a crash at any point of a checkpoint save leaves a loadable checkpoint (the
/// old one or the new one), and the next save cleans up after it.
#[test]
fn a_crash_at_any_point_of_a_checkpoint_save_leaves_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck_dir = dir.path().join("checkpoint");
    let make = |step: usize| {
        let mut t = BTreeMap::new();
        t.insert("x.lora_a".to_string(), vec![step as f32; 5]);
        Checkpoint::new(step, serde_json::json!({ "step": step }), t)
    };
    let extra =
        |tmp: &Path| std::fs::write(tmp.join("adapter.gguf"), "a").map_err(|e| e.to_string());
    make(1).save(&ck_dir, extra).unwrap();
    let mut stage = 0;
    loop {
        let done = make(2).save_until(&ck_dir, extra, stage).unwrap();
        let back = Checkpoint::load(&ck_dir)
            .unwrap_or_else(|e| panic!("crash after stage {stage}: nothing loadable: {e}"));
        assert!(
            back == make(1) || back == make(2),
            "crash after stage {stage}: a mix: {back:?}"
        );
        // The next save completes and leaves exactly one checkpoint directory.
        make(3).save(&ck_dir, extra).unwrap();
        assert_eq!(Checkpoint::load(&ck_dir).unwrap(), make(3));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["checkpoint".to_string()], "after stage {stage}");
        assert!(ck_dir.join("adapter.gguf").exists());
        make(1).save(&ck_dir, extra).unwrap();
        if done {
            break;
        }
        stage += 1;
    }
    assert!(stage >= 2, "the save has several stages ({stage})");
}

/// Issue 11, fix 4: the reference cache key includes the code version: the crate version and a
/// hash of every kernel file (all of `kernels/*.wgsl`, as on disk), and the engine's device.
#[test]
fn reference_cache_key_covers_the_code_version_and_every_kernel() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    on_disk.sort();
    let built: Vec<(String, String)> = bfpo_lite::gpu::registry::ALL_KERNEL_FILES
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    assert!(on_disk.len() > 10, "{} kernel files", on_disk.len());
    assert_eq!(built, on_disk, "the build embeds every kernels/*.wgsl file");
    let v = prepare::code_version();
    let k: String = bfpo_lite::gpu::registry::kernels_sha256()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        v.contains(env!("CARGO_PKG_VERSION")) && v.contains(&k),
        "{v}"
    );

    // The stored entry's key is the one of the settings with the code version and the device.
    let model = common::models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let tc = config();
    let cdir = tempfile::tempdir().unwrap();
    let cache = RefCache::open(cdir.path()).unwrap();
    let id = cache.fingerprint(&model).unwrap().identity();
    let mut e = cpu_engine(&model, &tc);
    let mut d = data(&model, 2, 0);
    let src = prepare::fill_reference(
        &mut e,
        Some((&cache, &id)),
        "s",
        &mut d.train,
        8,
        &mut |_| {},
    )
    .unwrap();
    let full = prepare::reference_settings(&e, "s");
    assert!(full.contains(&v) && full.contains(&e.describe()), "{full}");
    let key = RefCache::key_from_iter(&id, d.train.iter().map(|p| (&p.chosen, &p.rejected)), &full);
    assert_eq!(src, RefSource::Computed(Some(cache.path(&key))));
}

/// Issue 11, fix 7 through the CLI: `tune --resume` with a changed learning rate stops before it
/// rewrites anything of the run, naming the setting.
#[test]
fn tune_resume_with_changed_settings_stops_before_touching_the_run() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::F32, true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let good = std::fs::read_to_string(demo_file("train.jsonl")).unwrap();
    std::fs::write(&data, good.lines().take(6).collect::<Vec<_>>().join("\n")).unwrap();
    let out = dir.path().join("run");
    let o = bin()
        .args(["tune", "--engine", "cpu", "--max-steps", "2"])
        .args(["--pairs-per-step", "2", "--grad-accum", "1"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = std::fs::read(out.join("config.toml")).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = bin()
        .args(["tune", "--learning-rate", "0.5", "--resume"])
        .arg(out.join("checkpoint"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("learning_rate: 0.0001 -> 0.5"), "{stderr}");
    assert_eq!(std::fs::read(out.join("config.toml")).unwrap(), config);
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
}

/// Issue 20: a CPU-engine `tune` killed with SIGKILL after a checkpoint, then `--resume`d,
/// ends with the adapter of an uninterrupted run, tensor for tensor, bit for bit.
#[test]
fn cpu_tune_killed_with_sigkill_resumes_bit_for_bit() {
    let model = common::models::tiny_model(Arch::Qwen2, GgmlType::Q8_0, true);
    let dir = tempfile::tempdir().unwrap();
    let tune = |out: &Path, steps: usize| {
        let mut c = bin();
        c.args(["tune", "--engine", "cpu", "--threads", "2"])
            .args(["--max-steps", &steps.to_string(), "--save-every", "2"])
            .args(["--pairs-per-step", "2", "--grad-accum", "2"])
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(demo_file("train.jsonl"))
            .arg("--out")
            .arg(out)
            .arg("--force")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let tensors = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let f = bfpo_lite::gguf::GgufFile::open(p).unwrap();
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), f.tensor_bytes(t).to_vec()))
            .collect()
    };
    // A run long enough that the kill lands mid-run (retried longer if it finished first).
    for steps in [60usize, 240, 960] {
        let whole = dir.path().join(format!("whole-{steps}"));
        assert!(tune(&whole, steps).status().unwrap().success());
        let killed = dir.path().join(format!("killed-{steps}"));
        let mut child = tune(&killed, steps).spawn().unwrap();
        let state = killed.join("checkpoint").join("state.json");
        while !state.exists() {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        if killed.join("adapter.gguf").exists() {
            continue; // it finished before the kill: try a longer run
        }
        let o = bin()
            .args(["tune", "--resume"])
            .arg(killed.join("checkpoint"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (
            tensors(&whole.join("adapter.gguf")),
            tensors(&killed.join("adapter.gguf")),
        );
        assert!(!a.is_empty());
        assert_eq!(
            a, b,
            "resumed after SIGKILL vs uninterrupted ({steps} steps)"
        );
        return;
    }
    panic!("every run finished before it could be killed");
}
