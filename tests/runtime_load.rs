//! llama.cpp loads every model `init-model` writes (arch × type × tied) and decodes a ChatML
//! prompt to finite logits; bad files get clear errors instead of aborts.

mod common;

use bfpo_lite::data::Prompt;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::Arch;
use bfpo_lite::model::init::WeightType;
use bfpo_lite::runtime::{LoadOptions, RtModel, RuntimeError};
use common::models::{tiny_kquant_model, tiny_model};
use std::path::{Path, PathBuf};

const TYPES: [&str; 8] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m",
];

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Loads the model, encodes a ChatML prompt and checks every logit is finite and not constant.
fn decodes(path: &Path, what: &str) {
    let m = RtModel::load(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{what}: llama.cpp failed to load: {e}"));
    let f = GgufFile::open(path).unwrap();
    assert_eq!(
        m.arch(),
        f.get_str("general.architecture").unwrap(),
        "{what}"
    );
    assert!(
        !m.chat_template_fallback(),
        "{what}: init-model writes a chat template"
    );
    let ids = m
        .encode_prompt(&Prompt::Text("how can I make a cake?".into()))
        .unwrap();
    let logits = m.logits(&ids, false).unwrap();
    assert_eq!(logits.len(), ids.len() * m.n_vocab(), "{what}");
    assert!(
        logits.iter().all(|x| x.is_finite()),
        "{what}: non-finite logits"
    );
    let last = &logits[(ids.len() - 1) * m.n_vocab()..];
    let (lo, hi) = last
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    assert!(hi - lo > 1e-3, "{what}: logits are constant");
}

fn has_type(path: &Path, ty: GgmlType) -> bool {
    let f = GgufFile::open(path).unwrap();
    f.tensors().iter().any(|t| t.type_id == ty.id())
}

#[test]
fn llama_cpp_loads_every_arch_type_and_tying() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        for ty in TYPES {
            for tied in [false, true] {
                let wt = WeightType::parse(ty).unwrap();
                let path = tiny_model(arch, wt, tied);
                decodes(&path, &format!("{arch:?} {ty} tied={tied}"));
            }
        }
    }
}

#[test]
fn llama_cpp_loads_true_k_quant_models() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        for (ty, want) in [
            ("q4_k", GgmlType::Q4_K),
            ("q6_k", GgmlType::Q6_K),
            ("q4_k_m", GgmlType::Q4_K),
        ] {
            let tied = arch == Arch::Qwen2;
            let path = tiny_kquant_model(arch, WeightType::parse(ty).unwrap(), tied);
            assert!(
                has_type(&path, want),
                "{arch:?} {ty}: expected real {want:?} tensors at dim 256"
            );
            if ty == "q4_k_m" {
                assert!(has_type(&path, GgmlType::Q6_K), "q4_k_m mixes in Q6_K");
            }
            decodes(&path, &format!("{arch:?} {ty} dim 256 tied={tied}"));
        }
    }
}

#[test]
fn missing_and_non_gguf_files_get_clear_errors() {
    let missing = scratch("does-not-exist.gguf");
    let e = RtModel::load(&missing, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, RuntimeError::ModelNotFound { .. }), "{e}");
    assert!(e.to_string().contains("does-not-exist.gguf"), "{e}");

    let text = scratch("not-a-model.gguf");
    std::fs::write(&text, "hello, I am a text file\n").unwrap();
    let e = RtModel::load(&text, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, RuntimeError::NotGguf { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");

    let empty = scratch("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = RtModel::load(&empty, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, RuntimeError::NotGguf { .. }), "{e}");

    // A real model cut in half: GGUF magic, but llama.cpp must refuse it (not abort).
    let src = std::fs::read(tiny_model(Arch::Llama, GgmlType::F32, false)).unwrap();
    let cut = scratch("truncated.gguf");
    std::fs::write(&cut, &src[..src.len() / 2]).unwrap();
    let e = RtModel::load(&cut, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, RuntimeError::ModelLoad { .. }), "{e}");
    assert!(e.to_string().contains("truncated.gguf"), "{e}");

    // The model still works after those failures.
    decodes(
        &tiny_model(Arch::Llama, GgmlType::F32, false),
        "after errors",
    );
}
