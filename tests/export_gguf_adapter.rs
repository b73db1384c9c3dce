//! GGUF LoRA adapter writer and reader: exact metadata and tensor layout (read back with the
//! independent GGUF reader), F32 exact and F16 within half precision round trips, provenance,
//! and clear errors for malformed adapters.

mod common;

use bfpo_lite::export::gguf_adapter::{
    self, AdapterDType, Provenance, adapter_to_bytes, read_adapter, read_adapter_file,
    write_adapter,
};
use bfpo_lite::export::{ExportError, check_against};
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig};
use common::models;

fn cfg_of(arch: Arch, tied: bool) -> ModelConfig {
    let path = models::tiny_model(arch, GgmlType::F32, tied);
    ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

fn spec(rank: usize, alpha: f32) -> LoraSpec {
    LoraSpec {
        targets: Target::ALL.to_vec(),
        layers: vec![0, 1],
        rank,
        alpha,
        dropout: 0.0,
        seed: 7,
    }
}

fn provenance() -> Provenance {
    Provenance {
        loss: Some("bfpo".into()),
        loss_params: [("beta".to_string(), 0.1), ("tau".to_string(), 2.5)].into(),
        train_params: [
            ("learning_rate".to_string(), 5e-4),
            ("seed".to_string(), 7.0),
        ]
        .into(),
        steps: Some(123),
        base_model_name: Some("tiny-llama".into()),
        base_model_sha256: Some("ab".repeat(32)),
        datasets: vec!["models/demo/train.jsonl".into(), "pku".into()],
        version: None,
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn writes_llama_cpp_adapter_layout_and_reads_back_exactly() {
    for (arch, tied) in [(Arch::Llama, true), (Arch::Qwen2, false)] {
        let cfg = cfg_of(arch, tied);
        let lora = LoraWeights::random(&spec(3, 6.0), &cfg, 0.05).unwrap();
        let dir = tmp();
        let path = dir.path().join("adapter.gguf");
        write_adapter(&path, &lora, &cfg, &provenance(), AdapterDType::F32).unwrap();

        // Independent check of the layout with the plain GGUF reader.
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), arch.name());
        assert_eq!(f.get_str("general.type").unwrap(), "adapter");
        assert_eq!(f.get_str("adapter.type").unwrap(), "lora");
        assert_eq!(f.get("adapter.lora.alpha"), Some(&Value::F32(6.0)));
        assert_eq!(f.tensors().len(), 2 * 7 * 2);
        assert!(
            f.tensors()
                .iter()
                .all(|t| !t.name.starts_with("token_embd"))
        );
        for t in &lora.tensors {
            let base = format!("blk.{}.{}.weight", t.layer, t.target.gguf_name());
            let a = f.tensor(&format!("{base}.lora_a")).unwrap();
            let b = f.tensor(&format!("{base}.lora_b")).unwrap();
            let (n_in, n_out) = t.target.shape(&cfg);
            assert_eq!(a.ne, vec![n_in as u64, 3], "{base}");
            assert_eq!(b.ne, vec![3, n_out as u64], "{base}");
            assert_eq!(a.type_id, 0);
            // lora_a element (i, k) at ne index i + n_in·k is A[k][i]; lora_b (k, o) is B[o][k].
            let fa = f.tensor_data(&a.name).unwrap();
            let fb = f.tensor_data(&b.name).unwrap();
            let get = |bytes: &[u8], idx: usize| {
                f32::from_le_bytes(bytes[4 * idx..4 * idx + 4].try_into().unwrap())
            };
            for k in 0..3 {
                for i in [0, n_in / 2, n_in - 1] {
                    assert_eq!(get(fa, i + n_in * k), t.a[k * n_in + i]);
                }
                for o in [0, n_out - 1] {
                    assert_eq!(get(fb, k + 3 * o), t.b[o * 3 + k]);
                }
            }
        }
        assert_eq!(f.get_str("bfpo.loss").unwrap(), "bfpo");
        assert_eq!(f.get("bfpo.loss.beta"), Some(&Value::F64(0.1)));
        assert_eq!(f.get("bfpo.steps"), Some(&Value::U64(123)));
        assert_eq!(
            f.get_str("bfpo.version").unwrap(),
            env!("CARGO_PKG_VERSION")
        );

        let (back, prov, back_arch) = read_adapter(&path).unwrap();
        assert_eq!(back, lora);
        assert_eq!(back_arch, arch.name());
        let mut want = provenance();
        want.version = Some(env!("CARGO_PKG_VERSION").into());
        assert_eq!(prov, want);
    }
}

#[test]
fn f16_adapter_round_trips_within_half_precision() {
    let cfg = cfg_of(Arch::Llama, false);
    let lora = LoraWeights::random(&spec(4, 8.0), &cfg, 0.05).unwrap();
    let bytes = adapter_to_bytes(&lora, &cfg, &Provenance::default(), AdapterDType::F16).unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert!(f.tensors().iter().all(|t| t.type_id == 1));
    let (back, prov, _) = read_adapter_file(&f, "mem").unwrap();
    assert_eq!(prov.loss, None);
    assert_eq!(prov.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!((back.rank, back.alpha), (4, 8.0));
    for (x, y) in lora.tensors.iter().zip(&back.tensors) {
        for (u, v) in x.a.iter().chain(&x.b).zip(y.a.iter().chain(&y.b)) {
            // f16 round-to-nearest: relative error ≤ 2^-11 for normal values.
            assert!((u - v).abs() <= u.abs() * 4.9e-4 + 1e-7, "{u} vs {v}");
        }
    }
}

fn write_raw(
    path: &std::path::Path,
    kvs: &[(&str, Value)],
    tensors: &[(&str, Vec<u64>, GgmlType)],
) {
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w.set(*k, v.clone());
    }
    for (name, ne, ty) in tensors {
        let n: u64 = ne.iter().product();
        let data = bfpo_lite::gguf::quant::quantize(*ty, &vec![0.25f32; n as usize]).unwrap();
        w.add_tensor(*name, ne, ty.id(), data).unwrap();
    }
    w.write_file(path).unwrap();
}

fn base_kvs(alpha: Option<f32>) -> Vec<(&'static str, Value)> {
    let mut v = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
    ];
    if let Some(a) = alpha {
        v.push(("adapter.lora.alpha", Value::F32(a)));
    }
    v
}

fn read_err(kvs: &[(&str, Value)], tensors: &[(&str, Vec<u64>, GgmlType)]) -> String {
    let dir = tmp();
    let path = dir.path().join("bad.gguf");
    write_raw(&path, kvs, tensors);
    match read_adapter(&path) {
        Ok(_) => panic!("adapter read without error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_alpha_reads_as_llama_cpp_scale_one() {
    let dir = tmp();
    let path = dir.path().join("a.gguf");
    let q = "blk.0.attn_q.weight";
    write_raw(
        &path,
        &base_kvs(None),
        &[
            (&format!("{q}.lora_a"), vec![64, 5], GgmlType::F32),
            (&format!("{q}.lora_b"), vec![5, 64], GgmlType::F16),
        ],
    );
    let (lora, prov, arch) = read_adapter(&path).unwrap();
    assert_eq!((lora.rank, lora.alpha, lora.scale()), (5, 5.0, 1.0));
    assert_eq!(arch, "llama");
    assert_eq!(prov, Provenance::default());
    assert_eq!((lora.tensors[0].n_in, lora.tensors[0].n_out), (64, 64));
}

#[test]
fn malformed_adapters_give_clear_errors() {
    let a = |n: &str| format!("blk.0.{n}.weight.lora_a");
    let b = |n: &str| format!("blk.0.{n}.weight.lora_b");
    let (qa, qb) = (a("attn_q"), b("attn_q"));

    // A model, not an adapter.
    let mut kvs = base_kvs(Some(8.0));
    kvs[1].1 = Value::String("model".into());
    let e = read_err(&kvs, &[(&qa, vec![64, 4], GgmlType::F32)]);
    assert!(e.contains("general.type is \"model\""), "{e}");

    // Missing half.
    let e = read_err(&base_kvs(Some(8.0)), &[(&qa, vec![64, 4], GgmlType::F32)]);
    assert!(
        e.contains(&qa) && e.contains(&qb) && e.contains("no matching"),
        "{e}"
    );

    // Transposed lora_a.
    let e = read_err(
        &base_kvs(Some(8.0)),
        &[
            (&qa, vec![4, 64], GgmlType::F32),
            (&qb, vec![4, 64], GgmlType::F32),
        ],
    );
    assert!(e.contains("ranks") && e.contains("[4, 64]"), "{e}");

    // Mixed ranks.
    let e = read_err(
        &base_kvs(Some(8.0)),
        &[
            (&qa, vec![64, 4], GgmlType::F32),
            (&qb, vec![4, 64], GgmlType::F32),
            (&a("attn_k"), vec![64, 2], GgmlType::F32),
            (&b("attn_k"), vec![2, 32], GgmlType::F32),
        ],
    );
    assert!(e.contains("rank 2") && e.contains("rank 4"), "{e}");

    // A LoRA on an unsupported tensor (token embedding), and a non-LoRA tensor.
    let e = read_err(
        &base_kvs(Some(8.0)),
        &[("token_embd.weight.lora_a", vec![4, 64], GgmlType::F32)],
    );
    assert!(
        e.contains("token_embd.weight") && e.contains("not supported"),
        "{e}"
    );
    let e = read_err(
        &base_kvs(Some(8.0)),
        &[("blk.0.attn_q.weight", vec![64, 64], GgmlType::F32)],
    );
    assert!(e.contains("not a LoRA tensor"), "{e}");

    // Quantized halves.
    let e = read_err(
        &base_kvs(Some(8.0)),
        &[
            (&qa, vec![64, 32], GgmlType::Q8_0),
            (&qb, vec![32, 64], GgmlType::Q8_0),
        ],
    );
    assert!(e.contains("Q8_0") && e.contains("F32, F16 or BF16"), "{e}");

    // Wrong provenance type.
    let mut kvs = base_kvs(Some(8.0));
    kvs.push(("bfpo.steps", Value::String("ten".into())));
    let e = read_err(
        &kvs,
        &[
            (&qa, vec![64, 4], GgmlType::F32),
            (&qb, vec![4, 64], GgmlType::F32),
        ],
    );
    assert!(e.contains("bfpo.steps") && e.contains("u64"), "{e}");
}

#[test]
fn writer_rejects_loras_that_do_not_fit_the_model() {
    let cfg = cfg_of(Arch::Qwen2, true);
    let lora = LoraWeights::random(&spec(2, 4.0), &cfg, 0.05).unwrap();
    let dir = tmp();
    let path = dir.path().join("x.gguf");

    let mut wrong = lora.clone();
    wrong.tensors[0].n_in += 1;
    wrong.tensors[0].a.extend([0.0; 2]);
    let e = write_adapter(
        &path,
        &wrong,
        &cfg,
        &Provenance::default(),
        AdapterDType::F32,
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("n_in 65"), "{e}");

    let mut deep = lora.clone();
    deep.tensors[0].layer = 5;
    let e = check_against(&deep, &cfg).unwrap_err().to_string();
    assert!(e.contains("layer 5") && e.contains("2 layers"), "{e}");

    let mut nan = lora.clone();
    nan.tensors[3].b[1] = f32::NAN;
    let e = write_adapter(&path, &nan, &cfg, &Provenance::default(), AdapterDType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite") && e.contains("index 1"), "{e}");

    let mut short = lora.clone();
    short.tensors[2].b.pop();
    let e = write_adapter(
        &path,
        &short,
        &cfg,
        &Provenance::default(),
        AdapterDType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("B has"), "{e}");

    let prov = Provenance {
        base_model_sha256: Some("XYZ".into()),
        ..Provenance::default()
    };
    let e = write_adapter(&path, &lora, &cfg, &prov, AdapterDType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHA-256"), "{e}");
    let prov = Provenance {
        loss_params: [("Beta.x".to_string(), 1.0)].into(),
        ..Provenance::default()
    };
    let e = write_adapter(&path, &lora, &cfg, &prov, AdapterDType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Beta.x"), "{e}");
    assert!(!path.exists(), "failed writes must not leave a file");
    let _ = gguf_adapter::KEY_ALPHA;
}
