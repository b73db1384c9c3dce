//! Merged GGUF: adapted weights equal dequant(W) + (alpha/r)·B·A (computed here in f64, not with
//! the library's `delta`) up to the output type's rounding; every other tensor byte-identical;
//! metadata unchanged; the report's norms recomputed independently; warnings for 4-bit types and
//! updates below the rounding error; clear errors for another architecture or shape.

mod common;

use bfpo_lite::export::merge::{merge, write_merged};
use bfpo_lite::gguf::quant::dequantize_vec;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::init::InitSpec;
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig};
use common::models;
use std::path::Path;

fn lora_for(path: &Path, b_std: f32, seed: u64) -> LoraWeights {
    let cfg = ModelConfig::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    let spec = LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: (0..cfg.n_layer).collect(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        seed,
    };
    LoraWeights::random(&spec, &cfg, b_std).unwrap()
}

/// ΔW[o][i] = scale · Σ_k B[o][k]·A[k][i], in f64.
fn delta_f64(t: &bfpo_lite::model::lora::LoraTensor, rank: usize, scale: f64) -> Vec<f64> {
    let mut d = vec![0.0f64; t.n_out * t.n_in];
    for o in 0..t.n_out {
        for i in 0..t.n_in {
            let mut s = 0.0f64;
            for k in 0..rank {
                s += t.b[o * rank + k] as f64 * t.a[k * t.n_in + i] as f64;
            }
            d[o * t.n_in + i] = scale * s;
        }
    }
    d
}

fn deq(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap();
    dequantize_vec(
        t.ggml_type().unwrap(),
        f.tensor_data(name).unwrap(),
        t.n_elements() as usize,
    )
    .unwrap()
}

#[test]
fn f16_merge_folds_the_update_and_copies_everything_else() {
    for (arch, tied) in [(Arch::Llama, false), (Arch::Qwen2, true)] {
        let path = models::tiny_model(arch, GgmlType::Q8_0, tied);
        let lora = lora_for(&path, 0.05, 11);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged.gguf");
        let report = write_merged(&path, arch.name(), &lora, None, &out).unwrap();
        assert_eq!(report.out_type, "F16");
        assert_eq!(report.tensors.len(), lora.tensors.len());

        let base = GgufFile::open(&path).unwrap();
        let merged = GgufFile::open(&out).unwrap();
        assert_eq!(
            base.kvs(),
            merged.kvs(),
            "metadata copied unchanged, in order"
        );
        assert_eq!(base.tensors().len(), merged.tensors().len());
        let scale = lora.alpha as f64 / lora.rank as f64;
        for (bt, mt) in base.tensors().iter().zip(merged.tensors()) {
            assert_eq!((&bt.name, &bt.ne), (&mt.name, &mt.ne));
            let Some(lt) = lora
                .tensors
                .iter()
                .find(|t| t.target.tensor_name(t.layer) == bt.name)
            else {
                assert_eq!(bt.type_id, mt.type_id, "{}", bt.name);
                assert_eq!(
                    base.tensor_data(&bt.name),
                    merged.tensor_data(&mt.name),
                    "{} copied byte for byte",
                    bt.name
                );
                continue;
            };
            assert_eq!(mt.type_id, GgmlType::F16.id(), "{}", bt.name);
            let w = deq(&base, &bt.name);
            let m = deq(&merged, &mt.name);
            let d = delta_f64(lt, lora.rank, scale);
            let mut dn = 0.0f64;
            for i in 0..w.len() {
                let want = w[i] as f64 + d[i];
                // f16 rounding: relative 2^-11 (plus the f32 sum in the library).
                let err = (m[i] as f64 - want).abs();
                assert!(
                    err <= want.abs() * 4.9e-4 + 1e-6,
                    "{}[{i}]: {} vs {want}",
                    bt.name,
                    m[i]
                );
                dn += d[i] * d[i];
            }
            let r = report.tensors.iter().find(|r| r.name == bt.name).unwrap();
            assert!(
                (r.delta_norm - dn.sqrt()).abs() <= 1e-4 * dn.sqrt(),
                "{}",
                bt.name
            );
            assert!(r.delta_norm > 0.0 && r.quant_error_norm > 0.0);
            assert!(
                r.update_rel_error < 0.05,
                "{}: F16 keeps the update ({})",
                bt.name,
                r.update_rel_error
            );
        }
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert!(!merged.tensors().iter().any(|t| t.name.contains("lora")));
    }
}

#[test]
fn f32_merge_is_exact_and_quant_errors_are_measured() {
    let path = models::tiny_model(Arch::Llama, GgmlType::F32, true);
    let lora = lora_for(&path, 0.05, 12);
    let model = GgufFile::open(&path).unwrap();
    let (w, report) = merge(&model, &path, "llama", &lora, Some(GgmlType::F32)).unwrap();
    for r in &report.tensors {
        assert_eq!(r.quant_error_norm, 0.0);
        assert!(r.update_to_error.is_infinite());
        assert!(r.update_rel_error < 1e-6, "{r:?}");
    }
    let merged = GgufFile::from_bytes(w.try_to_bytes().unwrap()).unwrap();
    let t = &lora.tensors[0];
    let name = t.target.tensor_name(t.layer);
    let (b, m) = (deq(&model, &name), deq(&merged, &name));
    let d = t.delta(lora.rank, lora.scale());
    for i in 0..b.len() {
        assert_eq!(m[i], b[i] + d[i]);
    }
}

#[test]
fn four_bit_requantization_warns_and_reports_erased_updates() {
    let path = models::tiny_model(Arch::Llama, GgmlType::Q8_0, true);
    let model = GgufFile::open(&path).unwrap();

    // A tiny update (B ~ N(0, 1e-6²)) vanishes under Q4_0 rounding.
    let small = lora_for(&path, 1e-6, 13);
    let (_, r) = merge(&model, &path, "llama", &small, Some(GgmlType::Q4_0)).unwrap();
    assert!(r.warnings[0].contains("4-bit"), "{:?}", r.warnings);
    assert_eq!(r.warnings.len(), 1 + r.tensors.len(), "{:?}", r.warnings);
    for t in &r.tensors {
        assert!(
            t.update_to_error < 1e-2,
            "{}: {}",
            t.name,
            t.update_to_error
        );
        assert!(
            t.update_rel_error >= 0.99,
            "{}: update error {}",
            t.name,
            t.update_rel_error
        );
    }
    assert!(r.warnings[1].contains("smaller than the Q4_0 rounding error"));

    // A large update survives Q4_0 mostly, with only the general warning.
    let big = lora_for(&path, 2.0, 13);
    let (_, r) = merge(&model, &path, "llama", &big, Some(GgmlType::Q4_0)).unwrap();
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    for t in &r.tensors {
        assert!(t.update_to_error > 1.0 && t.update_rel_error < 0.5, "{t:?}");
    }

    // Q8_0 keeps a moderate update and does not warn about 4 bits.
    let mid = lora_for(&path, 0.05, 13);
    let (_, r) = merge(&model, &path, "llama", &mid, Some(GgmlType::Q8_0)).unwrap();
    assert!(r.warnings.iter().all(|w| !w.contains("4-bit")));
}

#[test]
fn merge_errors_are_clear() {
    let llama = models::tiny_model(Arch::Llama, GgmlType::F32, true);
    let model = GgufFile::open(&llama).unwrap();
    let lora = lora_for(&llama, 0.05, 14);

    let e = merge(&model, &llama, "qwen2", &lora, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"qwen2\"") && e.contains("\"llama\""), "{e}");

    let wide = models::model(&InitSpec {
        dim: 128,
        ..InitSpec::tiny(Arch::Llama, GgmlType::F32, true)
    });
    let wide_lora = lora_for(&wide, 0.05, 14);
    let e = merge(&model, &llama, "llama", &wide_lora, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_in 128") && e.contains("n_in 64"), "{e}");

    // Q4_K needs rows of 256; the tiny model's rows are 64.
    let e = merge(&model, &llama, "llama", &lora, Some(GgmlType::Q4_K))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("256"),
        "{e}"
    );
}

/// The merged model (F32) without an adapter computes what the base model computes with the
/// adapter, in the f64 CPU reference model (F16 merged: within a measured bound).
#[test]
fn merged_model_equals_base_plus_adapter_in_reference_model() {
    use bfpo_lite::model::Weights;
    use bfpo_lite::model::reference::RefModel;
    let path = models::tiny_model(Arch::Qwen2, GgmlType::F32, false);
    let base = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&base).unwrap();
    let lora = lora_for(&path, 0.05, 15);
    let ids: Vec<u32> = vec![1, 40, 2, 300, 9, 77, 5];
    let want = RefModel::new(&cfg, &Weights::from_gguf(&base, &cfg).unwrap())
        .unwrap()
        .logits(&ids, Some(&lora))
        .unwrap();
    let plain = RefModel::new(&cfg, &Weights::from_gguf(&base, &cfg).unwrap())
        .unwrap()
        .logits(&ids, None)
        .unwrap();
    for (ty, bound) in [(GgmlType::F32, 1e-4), (GgmlType::F16, 2e-2)] {
        let (w, _) = merge(&base, &path, "qwen2", &lora, Some(ty)).unwrap();
        let merged = GgufFile::from_bytes(w.try_to_bytes().unwrap()).unwrap();
        let got = RefModel::new(&cfg, &Weights::from_gguf(&merged, &cfg).unwrap())
            .unwrap()
            .logits(&ids, None)
            .unwrap();
        let max = |a: &[Vec<f64>], b: &[Vec<f64>]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f64, f64::max)
        };
        let (err, effect) = (max(&want, &got), max(&want, &plain));
        eprintln!(
            "{ty}: merged vs base+adapter max |Δlogit| {err:.3e}; adapter effect {effect:.3e}"
        );
        assert!(err < bound, "{ty}: {err}");
        assert!(
            effect > 10.0 * bound,
            "the adapter must change the logits ({effect})"
        );
    }
}
