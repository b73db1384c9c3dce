//! `import-peft`: PEFT LoRA → GGUF adapter. The PEFT export → import round trip is exact (bit-equal
//! F32 tensors, llama Q/K rows back in GGUF order), F16 imports equal the F16-rounded values,
//! unsupported adapters are refused naming the module or setting, and the imported adapter loads
//! in llama.cpp and in the wgpu scorer with the same log-probs as the original adapter.

mod common;

use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, read_adapter, write_adapter};
use bfpo_lite::export::peft::{PeftOptions, write_peft};
use bfpo_lite::export::peft_import::read_peft;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig};
use common::models;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cfg_of(path: &Path) -> ModelConfig {
    ModelConfig::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

fn lora(cfg: &ModelConfig, targets: &[Target], layers: &[usize], rank: usize) -> LoraWeights {
    let spec = LoraSpec {
        targets: targets.to_vec(),
        layers: layers.to_vec(),
        rank,
        alpha: 12.0,
        dropout: 0.0,
        seed: 11,
    };
    LoraWeights::random(&spec, cfg, 0.2).unwrap()
}

fn export(l: &LoraWeights, cfg: &ModelConfig, dtype: AdapterDType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = PeftOptions {
        dtype,
        base_model_name_or_path: Some("org/tiny".into()),
    };
    write_peft(dir.path(), l, cfg, &opts).unwrap();
    dir
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn export_then_import_is_bit_exact() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = cfg_of(&models::tiny_model(arch, GgmlType::F32, false));
        for (targets, layers) in [
            (Target::ALL.to_vec(), vec![0, 1]),
            (vec![Target::AttnQ, Target::AttnK, Target::FfnDown], vec![1]),
        ] {
            let l = lora(&cfg, &targets, &layers, 3);
            let dir = export(&l, &cfg, AdapterDType::F32);
            let (back, info) = read_peft(dir.path(), &cfg).unwrap();
            assert_eq!((back.rank, back.alpha), (l.rank, l.alpha));
            assert_eq!(back.tensors.len(), l.tensors.len());
            for (a, b) in l.tensors.iter().zip(&back.tensors) {
                assert_eq!(
                    (a.layer, a.target, a.n_in, a.n_out),
                    (b.layer, b.target, b.n_in, b.n_out)
                );
                assert_eq!(bits(&a.a), bits(&b.a), "{arch:?} {:?} A", a.target);
                assert_eq!(bits(&a.b), bits(&b.b), "{arch:?} {:?} B", a.target);
            }
            assert_eq!(info.permuted_qk, arch == Arch::Llama);
            assert_eq!(info.base_model_name_or_path.as_deref(), Some("org/tiny"));
            assert_eq!(info.dtypes, vec!["F32".to_string()]);
        }
    }
}

#[test]
fn f16_import_equals_the_rounded_values() {
    let cfg = cfg_of(&models::tiny_model(Arch::Llama, GgmlType::F32, false));
    let l = lora(&cfg, &Target::ALL, &[0, 1], 2);
    let dir = export(&l, &cfg, AdapterDType::F16);
    let (back, _) = read_peft(dir.path(), &cfg).unwrap();
    let round = |v: &[f32]| -> Vec<u32> {
        v.iter()
            .map(|&x| half::f16::from_f32(x).to_f32().to_bits())
            .collect()
    };
    for (a, b) in l.tensors.iter().zip(&back.tensors) {
        assert_eq!(round(&a.a), bits(&b.a));
        assert_eq!(round(&a.b), bits(&b.b));
    }
}

/// Rewrites `adapter_config.json` in `dir` with `edit` applied.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
}

/// Adds one extra tensor to the safetensors file in `dir`.
fn add_tensor(dir: &Path, name: &str, shape: &[usize]) {
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    owned.push((
        name.to_string(),
        shape.to_vec(),
        vec![0u8; 4 * shape.iter().product::<usize>()],
    ));
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn unsupported_adapters_are_refused_naming_the_module() {
    let cfg = cfg_of(&models::tiny_model(Arch::Llama, GgmlType::F32, false));
    let l = lora(&cfg, &[Target::AttnQ, Target::FfnDown], &[0, 1], 2);
    let err = |dir: &Path| read_peft(dir, &cfg).unwrap_err().to_string();

    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| c["use_dora"] = true.into());
    assert!(err(d.path()).contains("DoRA"), "{}", err(d.path()));

    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| {
        c["modules_to_save"] = serde_json::json!(["embed_tokens"])
    });
    let e = err(d.path());
    assert!(
        e.contains("modules_to_save") && e.contains("embed_tokens"),
        "{e}"
    );

    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| {
        c["rank_pattern"] = serde_json::json!({"q_proj": 4})
    });
    assert!(err(d.path()).contains("rank_pattern"), "{}", err(d.path()));

    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| c["peft_type"] = "IA3".into());
    assert!(err(d.path()).contains("IA3"), "{}", err(d.path()));

    let d = export(&l, &cfg, AdapterDType::F32);
    add_tensor(
        d.path(),
        "base_model.model.model.embed_tokens.weight",
        &[4, 4],
    );
    assert!(err(d.path()).contains("embed_tokens"), "{}", err(d.path()));

    let d = export(&l, &cfg, AdapterDType::F32);
    add_tensor(d.path(), "base_model.model.lm_head.lora_A.weight", &[2, 4]);
    assert!(err(d.path()).contains("lm_head"), "{}", err(d.path()));

    let d = export(&l, &cfg, AdapterDType::F32);
    add_tensor(
        d.path(),
        "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector",
        &[64],
    );
    assert!(err(d.path()).contains("DoRA"), "{}", err(d.path()));

    // A rank that disagrees with the config, and a model of another shape.
    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| c["r"] = 5.into());
    let e = err(d.path());
    assert!(e.contains("r = 5") && e.contains("lora_A"), "{e}");
    let d = export(&l, &cfg, AdapterDType::F32);
    let other = cfg_of(&models::tiny_kquant_model(
        Arch::Llama,
        GgmlType::F32,
        false,
    ));
    let e = read_peft(d.path(), &other).unwrap_err().to_string();
    assert!(e.contains("another shape") || e.contains("n_in"), "{e}");

    // No config at all names the file.
    let d = export(&l, &cfg, AdapterDType::F32);
    std::fs::remove_file(d.path().join("adapter_config.json")).unwrap();
    assert!(
        err(d.path()).contains("adapter_config.json"),
        "{}",
        err(d.path())
    );
}

#[test]
fn rslora_alpha_is_converted() {
    let cfg = cfg_of(&models::tiny_model(Arch::Qwen2, GgmlType::F32, false));
    let l = lora(&cfg, &[Target::FfnUp], &[0], 4);
    let d = export(&l, &cfg, AdapterDType::F32);
    edit_config(d.path(), |c| c["use_rslora"] = true.into());
    let (back, info) = read_peft(d.path(), &cfg).unwrap();
    // rsLoRA scale alpha/√r = 12/2 = 6 = GGUF alpha/r → GGUF alpha 24.
    assert_eq!(back.alpha, 24.0);
    assert!(info.use_rslora);
    assert_eq!(back.scale(), 6.0);
}

fn bin(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bfpo-lite"))
        .args(args)
        .output()
        .expect("run bfpo-lite");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn score(model: &Path, adapter: &Path, data: &Path, engine: &str) -> Vec<(f64, f64)> {
    let (ok, stdout, stderr) = bin(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--engine",
        engine,
    ]);
    assert!(ok, "score --engine {engine}: {stderr}");
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["chosen_logp"].as_f64().or(v["chosen"].as_f64()).unwrap(),
                v["rejected_logp"]
                    .as_f64()
                    .or(v["rejected"].as_f64())
                    .unwrap(),
            )
        })
        .collect()
}

/// Through the binary: a GGUF adapter → `export --format peft` → `import-peft` gives back a file
/// whose tensors equal the original's, and llama.cpp and the wgpu engine score with it exactly as
/// with the original adapter.
#[test]
fn cli_round_trip_scores_like_the_original_adapter() {
    let model: PathBuf = models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let cfg = cfg_of(&model);
    let dir = tempfile::tempdir().unwrap();
    let l = lora(&cfg, &Target::ALL, &[0, 1], 4);
    let original = dir.path().join("original.gguf");
    write_adapter(
        &original,
        &l,
        &cfg,
        &Provenance::default(),
        AdapterDType::F32,
    )
    .unwrap();
    let peft = dir.path().join("peft");
    let (ok, _, e) = bin(&[
        "export",
        original.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--format",
        "peft",
        "--out",
        peft.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    std::fs::write(
        peft.join("bfpo_run.json"),
        r#"{"loss": "bfpo", "loss_params": {"tau": 0.01, "b1": 3, "alpha": 0.5}, "steps": 7}"#,
    )
    .unwrap();
    let back = dir.path().join("back.gguf");
    let (ok, out, e) = bin(&[
        "import-peft",
        peft.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    assert!(out.contains("q_proj/k_proj lora_B rows converted"), "{out}");
    let (lb, prov, arch) = read_adapter(&back).unwrap();
    assert_eq!(arch, "llama");
    assert_eq!(prov.loss.as_deref(), Some("bfpo"));
    assert_eq!(prov.steps, Some(7));
    assert_eq!(prov.loss_params.get("tau"), Some(&0.01));
    for (a, b) in l.tensors.iter().zip(&lb.tensors) {
        assert_eq!(bits(&a.a), bits(&b.a));
        assert_eq!(bits(&a.b), bits(&b.b));
    }
    // A second import refuses to overwrite without --force.
    let (ok, _, e) = bin(&[
        "import-peft",
        peft.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("--force"), "{e}");

    let data = dir.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"How do I paint a room?\", \"chosen\": \"Cover the floor, then paint.\", \"rejected\": \"Why?\"}\n\
         {\"prompt\": \"Tell me a story.\", \"chosen\": \"Once there was a cat.\", \"rejected\": \"No.\"}\n",
    )
    .unwrap();
    for engine in ["llama", "wgpu"] {
        let want = score(&model, &original, &data, engine);
        let got = score(&model, &back, &data, engine);
        assert_eq!(want.len(), 2);
        assert_eq!(want, got, "{engine}: imported adapter scores differently");
    }
}
