//! PEFT export: tensor names and shapes, `adapter_config.json`, the llama Q/K row un-permutation
//! (against a hand-worked case and against the update it must represent), read back with the
//! `safetensors` crate.

mod common;

use bfpo_lite::export::gguf_adapter::AdapterDType;
use bfpo_lite::export::peft::{
    self, PeftOptions, peft_config, peft_tensors, permute_rows, unpermute_rows, write_peft,
};
use bfpo_lite::gguf::quant::dequantize_vec;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};
use bfpo_lite::model::{Arch, ModelConfig};
use common::models;
use std::path::Path;

fn cfg_of(arch: Arch) -> ModelConfig {
    let path = models::tiny_model(arch, GgmlType::F32, true);
    ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

fn lora(cfg: &ModelConfig, targets: &[Target], layers: &[usize], rank: usize) -> LoraWeights {
    let spec = LoraSpec {
        targets: targets.to_vec(),
        layers: layers.to_vec(),
        rank,
        alpha: 16.0,
        dropout: 0.0,
        seed: 3,
    };
    LoraWeights::random(&spec, cfg, 0.1).unwrap()
}

#[test]
fn unpermute_matches_hand_worked_case() {
    // 2 heads of 4 rows, 1 column. GGUF rows within a head are (i=0,half=0), (0,1), (1,0), (1,1);
    // HF rows are (half=0,i=0), (0,1), (1,0), (1,1). So HF head = [g0, g2, g1, g3].
    let gguf: Vec<f32> = (0..8).map(|x| x as f32).collect();
    assert_eq!(
        unpermute_rows(&gguf, 2, 1).unwrap(),
        vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    );
    // 1 head of 6 rows, 2 columns: HF rows = g0, g2, g4, g1, g3, g5 (whole rows move).
    let gguf: Vec<f32> = (0..12).map(|x| x as f32).collect();
    assert_eq!(
        unpermute_rows(&gguf, 1, 2).unwrap(),
        vec![0., 1., 4., 5., 8., 9., 2., 3., 6., 7., 10., 11.]
    );
    // The converter's direction on the same case: HF [h0..h3] → GGUF [h0, h2, h1, h3].
    let hf = [10.0f32, 11.0, 12.0, 13.0];
    assert_eq!(
        permute_rows(&hf, 1, 1).unwrap(),
        vec![10.0, 12.0, 11.0, 13.0]
    );
    // Round trips at an awkward size: 3 heads of 10 rows, 3 columns.
    let m: Vec<f32> = (0..90).map(|x| (x * 7 % 13) as f32).collect();
    assert_eq!(
        permute_rows(&unpermute_rows(&m, 3, 3).unwrap(), 3, 3).unwrap(),
        m
    );
    assert_eq!(
        unpermute_rows(&permute_rows(&m, 3, 3).unwrap(), 3, 3).unwrap(),
        m
    );
    // Odd head size and non-dividing head count are errors, not panics.
    assert!(
        unpermute_rows(&[0.0; 6], 2, 1)
            .unwrap_err()
            .to_string()
            .contains("odd")
    );
    assert!(unpermute_rows(&[0.0; 8], 3, 1).is_err());
}

/// Independent statement of the converter's permutation, as numpy does it:
/// `w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn numpy_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let hd = w.len() / cols / n_head;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for part in 0..2 {
                let src = ((h * 2 + part) * (hd / 2) + i) * cols;
                out.extend_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

#[test]
fn llama_q_k_b_rows_are_un_permuted_so_the_hf_update_matches() {
    let cfg = cfg_of(Arch::Llama);
    assert!(cfg.n_head != cfg.n_head_kv, "fixture should use GQA");
    let l = lora(&cfg, &Target::ALL, &[0, 1], 3);
    let tensors = peft_tensors(&l, &cfg).unwrap();
    let find = |n: &str| tensors.iter().find(|t| t.name == n).unwrap();
    for t in &l.tensors {
        let module = format!(
            "base_model.model.model.layers.{}.{}",
            t.layer,
            t.target.hf_module()
        );
        let a = find(&format!("{module}.lora_A.weight"));
        let b = find(&format!("{module}.lora_B.weight"));
        assert_eq!(a.shape, [3, t.n_in]);
        assert_eq!(b.shape, [t.n_out, 3]);
        assert_eq!(a.values, t.a, "lora_A is never permuted");
        let heads = match t.target {
            Target::AttnQ => Some(cfg.n_head),
            Target::AttnK => Some(cfg.n_head_kv),
            _ => None,
        };
        match heads {
            None => assert_eq!(b.values, t.b, "{module}"),
            Some(nh) => {
                assert_ne!(b.values, t.b, "{module} must be un-permuted");
                // Converting the HF B back the way convert_hf_to_gguf does gives our B.
                assert_eq!(numpy_permute(&b.values, nh, 3), t.b, "{module}");
                // And the HF update B_hf·A is the GGUF update with its rows in HF order:
                // permute(ΔW_hf) == ΔW_gguf.
                let tmp = bfpo_lite::model::lora::LoraTensor {
                    b: b.values.clone(),
                    ..t.clone()
                };
                let d_hf = tmp.delta(3, 1.0);
                let d_gguf = t.delta(3, 1.0);
                assert_eq!(numpy_permute(&d_hf, nh, t.n_in), d_gguf, "{module}");
            }
        }
    }
    assert_eq!(tensors.len(), 28);
    let mut names: Vec<_> = tensors.iter().map(|t| t.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), 28);
}

#[test]
fn qwen2_is_not_permuted() {
    let cfg = cfg_of(Arch::Qwen2);
    let l = lora(&cfg, &[Target::AttnQ, Target::AttnK], &[1], 2);
    let tensors = peft_tensors(&l, &cfg).unwrap();
    for t in &l.tensors {
        let name = format!(
            "base_model.model.model.layers.1.{}.lora_B.weight",
            t.target.hf_module()
        );
        assert_eq!(tensors.iter().find(|x| x.name == name).unwrap().values, t.b);
    }
}

#[test]
fn config_json_fields() {
    let cfg = cfg_of(Arch::Llama);
    // Full grid over all layers.
    let l = lora(&cfg, &[Target::AttnV, Target::FfnDown], &[0, 1], 4);
    let c = peft_config(&l, &cfg, Some("meta-llama/Llama-3.2-1B"));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["bias"], "none");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"], 16);
    assert_eq!(
        c["target_modules"],
        serde_json::json!(["v_proj", "down_proj"])
    );
    assert!(c["layers_to_transform"].is_null());
    assert_eq!(c["base_model_name_or_path"], "meta-llama/Llama-3.2-1B");
    assert_eq!(c["fan_in_fan_out"], false);

    // Subset of layers → layers_to_transform; fractional alpha stays a float.
    let mut l = lora(&cfg, &[Target::FfnDown], &[1], 4);
    l.alpha = 2.5;
    let c = peft_config(&l, &cfg, None);
    assert_eq!(c["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(c["lora_alpha"], 2.5);
    assert!(c["base_model_name_or_path"].is_null());

    // Not a grid → an exact regex.
    let mut l = lora(&cfg, &[Target::AttnQ, Target::FfnDown], &[0, 1], 2);
    l.tensors
        .retain(|t| !(t.layer == 1 && t.target == Target::AttnQ));
    let c = peft_config(&l, &cfg, None);
    assert_eq!(
        c["target_modules"],
        "^(?:model\\.layers\\.0\\.mlp\\.down_proj|model\\.layers\\.0\\.self_attn\\.q_proj|model\\.layers\\.1\\.mlp\\.down_proj)$"
    );
}

#[test]
fn written_files_read_back_with_safetensors() {
    let cfg = cfg_of(Arch::Llama);
    let l = lora(&cfg, &Target::ALL, &[0, 1], 2);
    for dtype in [AdapterDType::F32, AdapterDType::F16] {
        let dir = tempfile::tempdir().unwrap();
        let opts = PeftOptions {
            dtype,
            base_model_name_or_path: None,
        };
        let summary = write_peft(dir.path(), &l, &cfg, &opts).unwrap();
        assert_eq!(summary.n_tensors, 28);
        assert!(summary.unpermuted_qk);
        let bytes = std::fs::read(dir.path().join(peft::WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(|s| s.as_str()),
            Some("pt")
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let want = peft_tensors(&l, &cfg).unwrap();
        assert_eq!(st.len(), want.len());
        for w in &want {
            let v = st.tensor(&w.name).unwrap();
            assert_eq!(v.shape(), &w.shape[..]);
            let (ty, st_ty) = match dtype {
                AdapterDType::F32 => (GgmlType::F32, safetensors::Dtype::F32),
                AdapterDType::F16 => (GgmlType::F16, safetensors::Dtype::F16),
            };
            assert_eq!(v.dtype(), st_ty);
            let got = dequantize_vec(ty, v.data(), w.values.len()).unwrap();
            for (g, x) in got.iter().zip(&w.values) {
                assert!(
                    (g - x).abs() <= x.abs() * 4.9e-4 + 1e-7,
                    "{}: {g} vs {x}",
                    w.name
                );
            }
        }
        let cfg_text = std::fs::read_to_string(dir.path().join(peft::CONFIG_FILE)).unwrap();
        let c: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
        assert_eq!(c["r"], 2);
        assert_eq!(
            c["target_modules"],
            serde_json::json!([
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ])
        );
    }
}

/// The strongest check short of running PEFT: a Hugging Face-layout llama (Q/K rows un-permuted,
/// rotate-half = NEOX rope) with the PEFT tensors gives the same logits as the GGUF-layout model
/// (NORM rope) with the GGUF adapter, in the f64 CPU reference model. Using the GGUF-order
/// `lora_B` on the HF model instead must not match (the check is sensitive to the permutation).
#[test]
fn peft_adapter_on_hf_layout_model_matches_gguf_adapter_in_reference_model() {
    use bfpo_lite::model::reference::RefModel;
    use bfpo_lite::model::{RopeKind, Weights};
    let path = models::tiny_model(Arch::Llama, GgmlType::F32, false);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(cfg.n_rot, cfg.head_dim);
    let gguf_model = RefModel::new(&cfg, &Weights::from_gguf(&file, &cfg).unwrap()).unwrap();
    let l = lora(&cfg, &Target::ALL, &[0, 1], 3);

    let mut hf_w = gguf_model.weights().clone();
    for layer in &mut hf_w.layers {
        layer.wq = unpermute_rows(&layer.wq, cfg.n_head, cfg.n_embd).unwrap();
        layer.wk = unpermute_rows(&layer.wk, cfg.n_head_kv, cfg.n_embd).unwrap();
    }
    let mut hf_cfg = cfg.clone();
    hf_cfg.rope_kind = RopeKind::Neox;
    let hf_model = RefModel::from_parts(hf_cfg, hf_w).unwrap();

    let tensors = peft_tensors(&l, &cfg).unwrap();
    let mut hf_lora = l.clone();
    for t in &mut hf_lora.tensors {
        let name = format!(
            "base_model.model.model.layers.{}.{}.lora_B.weight",
            t.layer,
            t.target.hf_module()
        );
        t.b = tensors
            .iter()
            .find(|x| x.name == name)
            .unwrap()
            .values
            .clone();
    }

    let ids: Vec<u32> = vec![1, 17, 250, 3, 99, 42, 7, 600, 5];
    let want = gguf_model.logits(&ids, Some(&l)).unwrap();
    let got = hf_model.logits(&ids, Some(&hf_lora)).unwrap();
    let wrong = hf_model.logits(&ids, Some(&l)).unwrap();
    let (mut max_err, mut max_wrong) = (0.0f64, 0.0f64);
    for ((w, g), x) in want.iter().zip(&got).zip(&wrong) {
        for ((a, b), c) in w.iter().zip(g).zip(x) {
            max_err = max_err.max((a - b).abs());
            max_wrong = max_wrong.max((a - c).abs());
        }
    }
    assert!(
        max_err < 1e-9,
        "HF layout + PEFT adapter differs by {max_err}"
    );
    assert!(max_wrong > 1e-3, "permutation not exercised ({max_wrong})");
}

/// Optional (not in the default run): checks the PEFT export against the GGUF adapter with
/// Python's `safetensors`, `numpy` and `gguf` packages and the converter's own numpy permutation
/// (`tests/export_peft_check.py`). Run with
/// `BFPO_PYTHON=/path/to/python cargo test --release --test export_peft -- --ignored`
/// where that Python has `pip install safetensors numpy gguf`.
#[test]
#[ignore = "needs BFPO_PYTHON with safetensors, numpy and gguf installed"]
fn python_reads_peft_export_like_hugging_face() {
    use bfpo_lite::export::gguf_adapter::{Provenance, write_adapter};
    let python = std::env::var("BFPO_PYTHON").expect(
        "set BFPO_PYTHON to a Python with `pip install safetensors numpy gguf` to run this test",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/export_peft_check.py");
    for (arch, dtype) in [
        (Arch::Llama, AdapterDType::F32),
        (Arch::Llama, AdapterDType::F16),
        (Arch::Qwen2, AdapterDType::F32),
    ] {
        let cfg = cfg_of(arch);
        let l = lora(&cfg, &Target::ALL, &[0, 1], 3);
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter.gguf");
        write_adapter(
            &adapter,
            &l,
            &cfg,
            &Provenance::default(),
            AdapterDType::F32,
        )
        .unwrap();
        let peft_dir = dir.path().join("peft");
        std::fs::create_dir(&peft_dir).unwrap();
        let opts = PeftOptions {
            dtype,
            base_model_name_or_path: None,
        };
        write_peft(&peft_dir, &l, &cfg, &opts).unwrap();
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg(&adapter)
            .arg(&peft_dir)
            .arg(cfg.n_head.to_string())
            .arg(cfg.n_head_kv.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{arch:?} {dtype:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("OK 28 tensors"), "{stdout}");
    }
}
