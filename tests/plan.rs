//! Memory planner: the target configuration (Qwen2.5-0.5B-shaped Q8_0, 1024 tokens, 1 pair per
//! micro-step, rank 16 on all seven projections) with sizes worked out by hand, refusals with
//! their messages, and the `plan` command.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::memory::*;
use bfpo_lite::model::lora::Target;
use std::process::Command;

fn target_input() -> PlanInput {
    let cfg = shape_config("qwen2.5-0.5b").unwrap();
    let w = shape_weights(&cfg, GgmlType::Q8_0);
    PlanInput::new(cfg, w)
}

#[test]
fn qwen05b_target_plans_under_1_5_gb_with_hand_computed_items() {
    let input = target_input();
    assert_eq!(
        (input.max_len, input.pairs_per_step, input.rank),
        (1024, 1, 16)
    );
    assert_eq!(input.targets, Target::ALL.to_vec());
    let p = plan(&input).unwrap();

    // Weights, Q8_0 = 34 bytes per 32 values:
    //   token_embd 151936·896/32·34 = 144,643,072
    //   per layer: q, o 896·896/32·34 = 852,992 each; k, v 128·896/32·34 = 121,856 each;
    //   gate, up, down 4864·896/32·34 = 4,630,528 each; 2 norms 2·896·4 = 7,168;
    //   q/k/v biases (896 + 128 + 128)·4 = 4,608 → 15,853,056 per layer, ×24 = 380,473,344
    //   output_norm 3,584 (tied: no output.weight)
    assert_eq!(p.item("weights"), Some(144_643_072 + 380_473_344 + 3_584));
    // LoRA rank 16 per layer: q, o 16·(896+896); k, v 16·(896+128); gate, up, down
    // 16·(896+4864) → 28,672·2 + 16,384·2 + 92,160·3 = 366,592; ×24 = 8,798,208 params.
    assert_eq!(p.lora_params, 8_798_208);
    assert_eq!(p.item("LoRA A, B"), Some(8_798_208 * 4));
    assert_eq!(p.item("LoRA gradients"), Some(8_798_208 * 4));
    assert_eq!(p.item("Adam moments m, v"), Some(8_798_208 * 8));
    // Checkpoints: 25 × [2 seq · 1024, 896] f32.
    assert_eq!(p.item("layer checkpoints"), Some(25 * 2048 * 896 * 4));
    // Attention streams (no [T, T] matrix): every head at once, no probabilities item.
    assert_eq!(p.head_chunk, 14);
    assert_eq!(p.item("attention probs + grads"), None);
    // Workspaces, per row (gpu::forward::Workspace + gpu::backward): values 5·896 + 2·896 +
    // 2·128 + 3·4864 + 7·16 + 2 + 14 = 21,248; gradients 2·896 + 2·896 + 2·128 + 4864 + 16
    // + 2·14 = 8,748; 2048 rows.
    assert_eq!(p.item("layer workspace (values)"), Some(2048 * 21_248 * 4));
    assert_eq!(
        p.item("layer workspace (gradients)"),
        Some(2048 * 8_748 * 4)
    );
    // LM head chunk [1024, 8192] f32.
    assert_eq!(p.item("LM head logits chunk"), Some(1024 * 8192 * 4));
    // Kernel scratch: the LoRA gradient partials, room for 64 partials of the widest tensor
    // (gate/up/down B or A: 16·4864 f32 = 311,296 B; 64 of them = 19.9 MB) capped at 16 MiB,
    // and the split-K partial sums' 32 MiB bound.
    assert_eq!(p.item("LoRA gradient scratch"), Some(16 << 20));
    assert_eq!(p.item("matmul split-K scratch"), Some(32 << 20));

    let sum: u64 = p.items.iter().map(|i| i.bytes).sum();
    assert_eq!(p.total, sum);
    assert!(p.total <= 1_500_000_000, "total {}", p.total);
    // The embedding is the largest weight (> 128 MiB: split into row chunks); the largest
    // activation buffer is the FFN activation [2048, 4864] f32.
    assert_eq!(p.largest_weight.name, "token_embd.weight");
    assert_eq!(p.largest_weight.bytes, 144_643_072);
    assert_eq!(p.largest_buffer.bytes, 2048 * 4864 * 4);
    assert!(
        p.largest_binding.bytes <= 128 << 20,
        "{:?}",
        p.largest_binding
    );
    p.fits(&PlanLimits::PORTABLE, 1_500_000_000).unwrap();
}

#[test]
fn sizes_scale_with_the_settings() {
    let base = plan(&target_input()).unwrap();
    let mut two = target_input();
    two.pairs_per_step = 2;
    let two = plan(&two).unwrap();
    for name in ["layer checkpoints", "layer workspace (values)"] {
        assert_eq!(
            two.item(name).unwrap(),
            2 * base.item(name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(two.item("weights"), base.item("weights"));
    let mut down = target_input();
    down.targets = vec![Target::FfnDown];
    down.rank = 8;
    let down = plan(&down).unwrap();
    // ffn_down rank 8: 8·(4864 + 896) per layer × 24.
    assert_eq!(down.lora_params, 8 * (4864 + 896) * 24);
    let mut full = target_input();
    full.checkpointing = false;
    let full = plan(&full).unwrap();
    assert!(full.total > base.total + 2_000_000_000, "{}", full.total);
}

#[test]
fn refuses_a_device_that_is_too_small_and_says_what_to_reduce() {
    let p = plan(&target_input()).unwrap();
    let e = p.fits(&PlanLimits::PORTABLE, 1 << 30).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, PlanError::OutOfMemory { need, have, .. } if need == p.total && have == 1 << 30)
    );
    assert!(msg.contains("1.00 GiB is available"), "{msg}");
    assert!(msg.contains("--max-length (now 1024)"), "{msg}");
    assert!(msg.contains("--pairs-per-step (now 1)"), "{msg}");
    assert!(msg.contains("--rank (now 16)"), "{msg}");
    // Weights alone over the budget: a different remedy.
    let msg = p
        .fits(&PlanLimits::PORTABLE, 400 << 20)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("the weights alone need"), "{msg}");
}

#[test]
fn refuses_bindings_and_buffers_over_the_limits() {
    // 8192 tokens: the FFN activation [2·8192, 4864] f32 is 304 MiB > 128 MiB.
    let mut long = target_input();
    long.max_len = 8192;
    let p = plan(&long).unwrap();
    let e = p.fits(&PlanLimits::PORTABLE, u64::MAX).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, PlanError::BindingTooLarge { bytes, .. } if bytes >= 256 << 20),
        "{msg}"
    );
    assert!(msg.contains("134217728 bytes"), "{msg}");
    assert!(msg.contains("--max-length"), "{msg}");
    // A device whose buffers are smaller than the 39,845,888-byte FFN activation [2048, 4864].
    let p = plan(&target_input()).unwrap();
    let small = PlanLimits {
        max_storage_buffer_binding_size: 128 << 20,
        max_buffer_size: 32 << 20,
    };
    let e = p.fits(&small, u64::MAX).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, PlanError::BufferTooLarge { .. }), "{msg}");
    assert!(
        msg.contains("39845888 bytes") && msg.contains("--pairs-per-step (now 1)"),
        "{msg}"
    );
    // Nonsense input.
    let mut zero = target_input();
    zero.max_len = 0;
    assert!(plan(&zero).unwrap_err().to_string().contains("max length"));
}

#[test]
fn every_shape_plans() {
    for s in SHAPES {
        let cfg = shape_config(s).unwrap();
        assert_eq!(cfg.q_dim() % cfg.head_dim, 0);
        let p = plan(&PlanInput::new(
            cfg.clone(),
            shape_weights(&cfg, GgmlType::Q4_K),
        ))
        .unwrap();
        assert!(p.total > 0 && p.lora_params > 0, "{s}");
    }
    assert!(shape_config("gpt-5").is_none());
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
}

#[test]
fn plan_command_prints_json_and_refuses_with_a_message() {
    let out = bin()
        .args([
            "plan",
            "--shape",
            "qwen2.5-0.5b",
            "--type",
            "q8_0",
            "--json",
        ])
        .args(["--device-mem", "1.5GB"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fits"], true);
    let total = v["plan"]["total"].as_u64().unwrap();
    assert_eq!(total, plan(&target_input()).unwrap().total);

    let out = bin()
        .args(["plan", "--shape", "qwen2.5-0.5b", "--device-mem", "1GiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1.00 GiB is available") && err.contains("--max-length (now 1024)"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("layer checkpoints") && text.contains("total"),
        "{text}"
    );

    let out = bin().args(["plan", "--shape", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("known shapes: qwen2.5-0.5b"));
}

#[test]
fn plan_command_reads_a_gguf_model() {
    use bfpo_lite::gguf::GgufFile;
    use bfpo_lite::model::Arch;
    use bfpo_lite::model::init::{InitSpec, build};
    let (w, _) = build(&InitSpec::tiny(Arch::Qwen2, GgmlType::Q8_0, true)).unwrap();
    let bytes = w.to_bytes();
    let stored: u64 = GgufFile::from_bytes(bytes.clone())
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.n_bytes)
        .sum();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    let out = bin()
        .args(["plan", "--model"])
        .arg(&path)
        .args([
            "--max-length",
            "64",
            "--rank",
            "4",
            "--targets",
            "ffn_down,q",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["plan"]["items"].as_array().unwrap();
    let weights = items.iter().find(|i| i["name"] == "weights").unwrap();
    assert_eq!(weights["bytes"].as_u64().unwrap(), stored);
    // 2 layers × rank 4 × (ffn_down 128 + 64, attn_q 64 + 64).
    assert_eq!(
        v["plan"]["lora_params"].as_u64().unwrap(),
        2 * 4 * (192 + 128)
    );
    let out = bin()
        .args(["plan", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));
}

/// `plan --activation-memory` reports the GPU engine's kept layers: whole layers within the
/// budget, counted from the lowest adapted layer up, with the bytes of the engine's rule.
#[test]
fn plan_command_reports_kept_activations() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = bin()
            .args(["plan", "--shape", "qwen2.5-0.5b", "--max-length", "256"])
            .args(["--pairs-per-step", "2", "--targets", "ffn_down", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let cfg = bfpo_lite::gpu::memory::shape_config("qwen2.5-0.5b").unwrap();
    let rows = 2 * 2 * 256;
    let per_layer = bfpo_lite::gpu::forward::Workspace::layer_bytes(&cfg, rows, 16, 1);
    // Room for exactly 5 layers (and a bit).
    let budget = (5 * per_layer + per_layer / 2).to_string();
    let v = run(&["--activation-memory", &budget]);
    let a = &v["activations"];
    assert_eq!(a["kept_layers"], 5, "{a}");
    assert_eq!(a["visited_layers"], cfg.n_layer, "{a}");
    assert_eq!(a["kept_bytes"].as_u64().unwrap(), 5 * per_layer, "{a}");
    // Adapters on the top 4 layers only: the backward visits 4, all fit.
    let top = format!("{}-{}", cfg.n_layer - 4, cfg.n_layer - 1);
    let v = run(&["--activation-memory", &budget, "--layers", &top]);
    assert_eq!(v["activations"]["kept_layers"], 4);
    assert_eq!(v["activations"]["visited_layers"], 4);
    // 0 keeps nothing; the default is `auto` on a GPU (2 GiB).
    let v = run(&["--activation-memory", "0"]);
    assert_eq!(v["activations"]["kept_layers"], 0);
    let v = run(&[]);
    assert_eq!(v["activations"]["budget_bytes"].as_u64().unwrap(), 2 << 30);
}

#[test]
fn host_plan_is_linear_in_rows_and_refuses_with_what_to_reduce() {
    use bfpo_lite::cpu::NativeEngine;
    use bfpo_lite::cpu::engine::{HostPlan, min_host_bytes};
    let cfg = shape_config("qwen2.5-0.5b").unwrap();
    let f = |rows| min_host_bytes(&cfg, rows, rows, 2, true);
    // Linear in the packed rows (multiples of the 64-row block): equal increments.
    assert_eq!(f(2048) - f(1024), f(3072) - f(2048));
    assert!(f(1024) > 0);
    let p = HostPlan::new(&cfg, 500 << 20, 1000, 2);
    assert_eq!(p.rows, 1000);
    assert_eq!(p.min_bytes, f(1000));
    assert_eq!(
        p.all_tapes_bytes,
        1024 * NativeEngine::tape_bytes_per_row(&cfg) * cfg.n_layer as u64
    );
    let tight = HostPlan {
        available_bytes: Some(p.min_bytes - 1),
        ..p.clone()
    };
    let err = tight.check().unwrap_err().to_string();
    assert!(
        err.contains("MiB of host memory")
            && err.contains("reduce --pairs-per-step or --max-length"),
        "{err}"
    );
    let roomy = HostPlan {
        available_bytes: Some(p.min_bytes),
        ..p
    };
    assert!(roomy.check().is_ok());
}

/// `tune --dry-run` on the built-in demo: the CPU engine's host plan covers the longest
/// micro-step, `2 · pairs per step` sequences of the longest length (`--pairs-per-step` is per
/// micro-step; `--grad-accum` repeats micro-steps and does not shrink them).
#[test]
fn tune_dry_run_reports_the_cpu_host_plan_of_the_longest_micro_step() {
    let rows = |pairs: &str, accum: &str| -> u64 {
        let out = bin()
            .args(["tune", "--engine", "cpu", "--dry-run", "--json"])
            .args(["--pairs-per-step", pairs, "--grad-accum", accum])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        let hp = &v["dry_run"]["host_plan"];
        assert!(hp["min_bytes"].as_u64().unwrap() > 0, "{hp}");
        assert!(hp["weights_mapped_bytes"].as_u64().unwrap() > 0, "{hp}");
        hp["rows"].as_u64().unwrap()
    };
    let two = rows("2", "1");
    assert_eq!(
        two % 4,
        0,
        "2 pairs = 4 sequences of the longest length: {two}"
    );
    assert_eq!(rows("4", "1"), 2 * two);
    assert_eq!(rows("4", "2"), 2 * two);
}
