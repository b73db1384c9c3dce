//! `ModelConfig::from_gguf` and `Weights::from_gguf` on init-model files of every architecture,
//! and the errors for files bfpo-lite cannot train: other architectures, missing keys or tensors,
//! unsupported tensor types, wrong shapes, per-layer arrays, unsupported rope scaling, extra
//! tensors.

mod common;

use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use bfpo_lite::model::init::{self, InitSpec};
use bfpo_lite::model::{Arch, ModelConfig, ModelError, RopeKind, Weights};
use common::models;

/// Copies every key and every tensor (except `skip`) of `src` into a new writer.
fn copy<'a>(src: &'a GgufFile, skip: &[&str]) -> GgufWriter<'a> {
    let mut w = GgufWriter::new();
    for (k, v) in src.kvs() {
        w.set(k.clone(), v.clone());
    }
    for t in src.tensors() {
        if !skip.contains(&t.name.as_str()) {
            w.add_tensor(t.name.clone(), &t.ne, t.type_id, src.tensor_bytes(t))
                .unwrap();
        }
    }
    w
}

fn reopen(w: &GgufWriter) -> GgufFile {
    GgufFile::from_bytes(w.to_bytes()).unwrap()
}

fn open(spec: &InitSpec) -> GgufFile {
    GgufFile::open(&models::model(spec)).unwrap()
}

/// Config, then weights: the first error of either.
fn load(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let cfg = ModelConfig::from_gguf(file)?;
    Weights::from_gguf(file, &cfg)?;
    Ok(cfg)
}

fn load_err(file: &GgufFile) -> String {
    match load(file) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configs_of_generated_models() {
    let n_vocab = init::vocab(0).len();
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        for tied in [false, true] {
            let spec = InitSpec::tiny(arch, GgmlType::F32, tied);
            let file = open(&spec);
            let cfg = ModelConfig::from_gguf(&file).unwrap();
            let label = format!("{} tied={tied}", arch.name());
            assert_eq!(cfg.arch, arch, "{label}");
            assert_eq!(
                (
                    cfg.n_embd,
                    cfg.n_layer,
                    cfg.n_head,
                    cfg.n_head_kv,
                    cfg.n_ff,
                    cfg.n_ctx_train
                ),
                (64, 2, 4, 2, 128, 256),
                "{label}"
            );
            assert_eq!(
                (cfg.head_dim, cfg.n_rot, cfg.n_vocab),
                (16, 16, n_vocab),
                "{label}"
            );
            assert_eq!((cfg.q_dim(), cfg.kv_dim()), (64, 32));
            assert_eq!(cfg.rms_eps, 1e-5);
            assert_eq!(cfg.rope_base, 10000.0);
            assert_eq!(cfg.rope_pos_scale, 1.0);
            assert_eq!(cfg.rope_freqs, None);
            let expected_rope = if arch == Arch::Llama {
                RopeKind::Norm
            } else {
                RopeKind::Neox
            };
            assert_eq!(cfg.rope_kind, expected_rope, "{label}");
            assert_eq!(cfg.tied, tied, "{label}");
            assert_eq!(cfg.qkv_bias, arch == Arch::Qwen2, "{label}");
            assert_eq!(cfg.qk_norm, arch == Arch::Qwen3, "{label}");
            assert!(cfg.name.as_deref().unwrap().contains(arch.name()));

            let w = Weights::from_gguf(&file, &cfg).unwrap();
            assert_eq!(w.layers.len(), 2);
            assert_eq!(
                w.lm_head().name,
                if tied {
                    "token_embd.weight"
                } else {
                    "output.weight"
                }
            );
            assert_eq!(w.token_embd.ne, [64, n_vocab]);
            let l = &w.layers[1];
            assert_eq!(
                (l.attn_q.ne, l.attn_k.ne, l.attn_output.ne),
                ([64, 64], [64, 32], [64, 64])
            );
            assert_eq!((l.ffn_gate.ne, l.ffn_down.ne), ([64, 128], [128, 64]));
            assert_eq!(l.attn_q_bias.is_some(), arch == Arch::Qwen2);
            assert_eq!(
                l.attn_v_bias.map(|b| b.ne),
                (arch == Arch::Qwen2).then_some([32, 1])
            );
            assert_eq!(
                l.attn_k_norm.map(|b| b.ne),
                (arch == Arch::Qwen3).then_some([16, 1])
            );
            assert_eq!(l.attn_norm.ty, GgmlType::F32);
            // Every tensor of the file is accounted for, and the parameter count agrees.
            assert_eq!(w.all().len(), file.tensors().len(), "{label}");
            let n: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
            assert_eq!(cfg.n_params(), n, "{label}");
        }
    }
}

#[test]
fn qwen3_head_size_rope_freqs_and_vocab_extra() {
    let spec = InitSpec {
        head_dim: Some(32),
        vocab_extra: 45,
        ..InitSpec::tiny(Arch::Qwen3, GgmlType::F16, false)
    };
    let cfg = load(&open(&spec)).unwrap();
    assert_eq!(
        (cfg.head_dim, cfg.q_dim(), cfg.kv_dim(), cfg.n_rot),
        (32, 128, 64, 32)
    );
    assert_eq!(cfg.n_vocab, init::vocab(0).len() + 45);

    let spec = InitSpec {
        rope_freqs: true,
        ..InitSpec::tiny(Arch::Llama, GgmlType::F32, true)
    };
    let cfg = load(&open(&spec)).unwrap();
    let f = cfg.rope_freqs.expect("rope_freqs.weight read");
    assert_eq!(f.len(), 8);
    assert_eq!((f[0], f[7]), (1.0, 8.0));
    assert!(f.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn rope_scaling_linear_none_and_unsupported() {
    let base = open(&InitSpec::default());
    let with = |kvs: &[(&str, Value)]| {
        let mut w = copy(&base, &[]);
        for (k, v) in kvs {
            w.set(*k, v.clone());
        }
        reopen(&w)
    };
    let s = |x: &str| Value::String(x.into());
    let cfg = load(&with(&[
        ("llama.rope.scaling.type", s("linear")),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
    ]))
    .unwrap();
    assert_eq!(cfg.rope_pos_scale, 0.25);
    let cfg = load(&with(&[("llama.rope.scale_linear", Value::F32(2.0))])).unwrap();
    assert_eq!(cfg.rope_pos_scale, 0.5);
    let cfg = load(&with(&[
        ("llama.rope.scaling.type", s("none")),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
    ]))
    .unwrap();
    assert_eq!(cfg.rope_pos_scale, 1.0);
    let cfg = load(&with(&[("llama.rope.freq_base", Value::F32(500000.0))])).unwrap();
    assert_eq!(cfg.rope_base, 500000.0);
    for kind in ["yarn", "longrope"] {
        let e = load_err(&with(&[
            ("llama.rope.scaling.type", s(kind)),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ]));
        assert!(
            e.contains("llama.rope.scaling.type") && e.contains(kind) && e.contains("linear"),
            "{e}"
        );
    }
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let base = open(&InitSpec::default());
    let mut w = copy(&base, &[]);
    w.set("general.architecture", Value::String("gpt2".into()));
    match ModelConfig::from_gguf(&reopen(&w)) {
        Err(e @ ModelError::UnsupportedArch { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("\"gpt2\"")
                    && m.contains("llama")
                    && m.contains("qwen2")
                    && m.contains("qwen3"),
                "{m}"
            );
        }
        other => panic!("expected UnsupportedArch, got {other:?}"),
    }
}

#[test]
fn missing_keys_are_named() {
    let base = open(&InitSpec::tiny(Arch::Qwen2, GgmlType::F32, true));
    for key in [
        "general.architecture",
        "qwen2.embedding_length",
        "qwen2.block_count",
        "qwen2.attention.head_count",
        "qwen2.context_length",
        "qwen2.attention.layer_norm_rms_epsilon",
    ] {
        let mut w = copy(&base, &[]);
        w.remove(key);
        let e = load_err(&reopen(&w));
        assert!(e.contains(key) && e.contains("missing"), "{key}: {e}");
    }
    // head_count_kv is optional (defaults to head_count: then the K/V shapes no longer match).
    let mut w = copy(&base, &[]);
    w.remove("qwen2.attention.head_count_kv");
    let e = load_err(&reopen(&w));
    assert!(
        e.contains("blk.0.attn_k.weight") && e.contains("[64, 32]") && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let base = open(&InitSpec::default());
    for name in [
        "blk.1.ffn_down.weight",
        "token_embd.weight",
        "output_norm.weight",
    ] {
        match load(&reopen(&copy(&base, &[name]))) {
            Err(ModelError::MissingTensor { name: n }) => assert_eq!(n, name),
            other => panic!("{name}: expected MissingTensor, got {other:?}"),
        }
    }
    // qwen2 needs all three biases once it has one.
    let base = open(&InitSpec::tiny(Arch::Qwen2, GgmlType::F32, false));
    match load(&reopen(&copy(&base, &["blk.1.attn_v.bias"]))) {
        Err(ModelError::MissingTensor { name }) => assert_eq!(name, "blk.1.attn_v.bias"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn unsupported_tensor_type_names_the_tensor_and_the_fix() {
    // dim 256 so that a 256-element IQ2_XXS row fits.
    let spec = InitSpec {
        dim: 256,
        ff: 512,
        ..InitSpec::default()
    };
    let base = open(&spec);
    let name = "blk.0.ffn_up.weight";
    let mut w = copy(&base, &[name]);
    // IQ2_XXS (type 16): 66 bytes per 256 elements; ne [256, 512].
    let bytes = vec![0u8; 66 * 512];
    w.add_tensor(name, &[256, 512], 16, bytes.as_slice())
        .unwrap();
    let e = load_err(&reopen(&w));
    assert!(
        e.contains(name) && e.contains("IQ2_XXS") && e.contains("llama-quantize"),
        "{e}"
    );
    assert!(
        e.contains("Q4_K") && e.contains("Q8_0"),
        "lists supported types: {e}"
    );

    // A quantized norm.
    let name = "blk.1.ffn_norm.weight";
    let mut w = copy(&base, &[name]);
    w.add_tensor(name, &[256], GgmlType::Q8_0.id(), vec![0u8; 34 * 8])
        .unwrap();
    match load(&reopen(&w)) {
        Err(e @ ModelError::BadTensorType { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains(name) && m.contains("Q8_0") && m.contains("F32"),
                "{m}"
            );
        }
        other => panic!("expected BadTensorType, got {other:?}"),
    }
}

#[test]
fn bad_shape_reports_found_and_expected() {
    let base = open(&InitSpec::default());
    let name = "blk.0.attn_q.weight";
    let mut w = copy(&base, &[name]);
    w.add_tensor(name, &[64, 96], GgmlType::F32.id(), vec![0u8; 64 * 96 * 4])
        .unwrap();
    match load(&reopen(&w)) {
        Err(ModelError::BadShape {
            name: n,
            found,
            expected,
        }) => {
            assert_eq!(
                (n.as_str(), found, expected),
                (name, vec![64, 96], vec![64, 64])
            );
        }
        other => panic!("expected BadShape, got {other:?}"),
    }
    // Wrong vocabulary size in the embedding.
    let n_vocab = init::vocab(0).len() as u64;
    let mut w = copy(&base, &["token_embd.weight"]);
    w.add_tensor(
        "token_embd.weight",
        &[64, n_vocab - 1],
        0,
        vec![0u8; 64 * (n_vocab as usize - 1) * 4],
    )
    .unwrap();
    let e = load_err(&reopen(&w));
    assert!(
        e.contains("token_embd.weight") && e.contains(&format!("[64, {n_vocab}]")),
        "{e}"
    );
}

#[test]
fn per_layer_arrays_moe_and_odd_hyperparameters() {
    let base = open(&InitSpec::default());
    let with = |k: &str, v: Value| {
        let mut w = copy(&base, &[]);
        w.set(k, v);
        reopen(&w)
    };
    let arr =
        |xs: &[i32]| Value::Array(ValueType::I32, xs.iter().map(|&x| Value::I32(x)).collect());
    // The same value in every layer is fine; different values are not.
    assert_eq!(
        load(&with("llama.attention.head_count_kv", arr(&[2, 2])))
            .unwrap()
            .n_head_kv,
        2
    );
    let e = load_err(&with("llama.attention.head_count_kv", arr(&[2, 4])));
    assert!(
        e.contains("llama.attention.head_count_kv") && e.contains("[2, 4]"),
        "{e}"
    );
    let e = load_err(&with("llama.feed_forward_length", arr(&[128, 256])));
    assert!(
        e.contains("llama.feed_forward_length") && e.contains("per-layer"),
        "{e}"
    );
    let e = load_err(&with("llama.expert_count", Value::U32(8)));
    assert!(e.contains("mixture-of-experts"), "{e}");
    let e = load_err(&with("llama.attention.head_count_kv", Value::U32(3)));
    assert!(e.contains("3 KV heads"), "{e}");
    let e = load_err(&with(
        "llama.attention.layer_norm_rms_epsilon",
        Value::String("x".into()),
    ));
    assert!(e.contains("layer_norm_rms_epsilon"), "{e}");
    let e = load_err(&with("llama.attention.value_length", Value::U32(8)));
    assert!(e.contains("value_length"), "{e}");
    // n_vocab falls back to the token list, then to token_embd.
    let mut w = copy(&base, &[]);
    w.remove("tokenizer.ggml.tokens");
    assert_eq!(load(&reopen(&w)).unwrap().n_vocab, init::vocab(0).len());
    w.set("llama.vocab_size", Value::U32(5));
    let e = load_err(&reopen(&w));
    assert!(e.contains("token_embd.weight"), "{e}");
}

#[test]
fn tensors_the_forward_pass_would_ignore_are_refused() {
    let base = open(&InitSpec::default());
    for (name, ne, hint) in [
        ("blk.0.attn_output.bias", vec![64u64], "biases"),
        ("blk.0.attn_qkv.weight", vec![64, 128], "fused"),
        ("blk.2.attn_norm.weight", vec![64], "layer 2"),
        ("output.bias", vec![init::vocab(0).len() as u64], "biases"),
    ] {
        let mut w = copy(&base, &[]);
        let n = ne.iter().product::<u64>() as usize;
        w.add_tensor(name, &ne, 0, vec![0u8; 4 * n]).unwrap();
        match load(&reopen(&w)) {
            Err(e @ ModelError::UnsupportedTensor { .. }) => {
                let m = e.to_string();
                assert!(m.contains(name) && m.contains(hint), "{m}");
            }
            other => panic!("{name}: expected UnsupportedTensor, got {other:?}"),
        }
    }
}

#[test]
fn unsupported_architecture_names_the_nearest_supported_one() {
    let base = open(&InitSpec::default());
    let message = |arch: &str| {
        let mut w = copy(&base, &[]);
        w.set("general.architecture", Value::String(arch.into()));
        match ModelConfig::from_gguf(&reopen(&w)) {
            Err(e @ ModelError::UnsupportedArch { .. }) => e.to_string(),
            other => panic!("expected UnsupportedArch, got {other:?}"),
        }
    };
    for (arch, nearest) in [
        ("qwen2moe", "qwen2"),
        ("qwen3moe", "qwen3"),
        ("llama4", "llama"),
        ("mistral", "llama"),
        ("lama", "llama"),
    ] {
        let m = message(arch);
        assert!(
            m.contains(&format!("The nearest supported one is {nearest}.")),
            "{arch}: {m}"
        );
        assert!(m.contains("supported: llama"), "{m}");
    }
    let m = message("gpt2");
    assert!(!m.contains("nearest"), "{m}");
    // Over a list with Gemma 3 in it (as `Arch::SUPPORTED` has once gemma3 lands): the family.
    use bfpo_lite::model::config::nearest_arch;
    let list =
        "llama (Llama 2/3, Mistral, SmolLM2), qwen2 (Qwen2, Qwen2.5), qwen3, gemma3 (Gemma 3)";
    assert_eq!(nearest_arch("gemma2", list).as_deref(), Some("gemma3"));
    assert_eq!(nearest_arch("gemma", list).as_deref(), Some("gemma3"));
    assert_eq!(nearest_arch("mistral3", list).as_deref(), Some("llama"));
    assert_eq!(nearest_arch("phi3", list), None);
}
