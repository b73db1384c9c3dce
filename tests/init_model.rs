//! `init-model`: determinism, tensor types per `--type` (Q4_K_M mix, K-quant fallbacks), and
//! non-degenerate next-token distributions (checked with a small f64 forward pass written here,
//! independent of the library's own reference model).

mod common;

use bfpo_lite::gguf::quant::dequantize_vec;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::init::{self, InitSpec, WeightType};
use bfpo_lite::model::{Arch, ModelConfig, RopeKind, Weights};
use common::models;
use std::collections::HashMap;

const ALL_TYPES: [&str; 12] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q4_k_m",
];

fn ty(s: &str) -> WeightType {
    WeightType::parse(s).unwrap()
}

fn is_matrix(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias") || name == "rope_freqs.weight")
}

// ---------------------------------------------------------------------------------------------
// Determinism

#[test]
fn same_seed_gives_identical_bytes_and_other_seeds_differ() {
    for ty_name in ["f32", "q4_k_m", "q5_0"] {
        let spec = InitSpec {
            seed: 7,
            ..InitSpec::tiny(Arch::Qwen2, ty(ty_name), false)
        };
        let a = init::build(&spec).unwrap().0.to_bytes();
        let b = init::build(&spec).unwrap().0.to_bytes();
        assert!(a == b, "{ty_name}: two builds of one spec differ");
        let c = init::build(&InitSpec {
            seed: 8,
            ..spec.clone()
        })
        .unwrap()
        .0
        .to_bytes();
        assert_eq!(
            a.len(),
            c.len(),
            "{ty_name}: the seed must not change the layout"
        );
        assert!(a != c, "{ty_name}: seeds 7 and 8 gave identical files");
    }
    // Through files, too.
    let dir = tempfile::tempdir().unwrap();
    let spec = InitSpec::tiny(Arch::Llama, GgmlType::Q8_0, true);
    init::write(&spec, &dir.path().join("a.gguf")).unwrap();
    init::write(&spec, &dir.path().join("b.gguf")).unwrap();
    let a = std::fs::read(dir.path().join("a.gguf")).unwrap();
    let b = std::fs::read(dir.path().join("b.gguf")).unwrap();
    assert!(a == b);
}

// ---------------------------------------------------------------------------------------------
// Types

/// Expected type of every 2-D tensor for shapes whose rows all fit 256-element blocks.
fn expected_type(spec: &InitSpec, name: &str) -> GgmlType {
    if !is_matrix(name) {
        return GgmlType::F32;
    }
    match spec.ty {
        WeightType::Uniform(t) => t,
        WeightType::Q4KM => {
            // llama-quantize Q4_K_M with 2 layers: use_more_bits(i, 2) is true only for layer 1
            // (i >= 7·2/8 = 1); the LM head (output, or the tied embedding) is Q6_K.
            let head = name == "output.weight" || (spec.tied && name == "token_embd.weight");
            let more_bits = name == "blk.1.attn_v.weight" || name == "blk.1.ffn_down.weight";
            if head || more_bits {
                GgmlType::Q6_K
            } else {
                GgmlType::Q4_K
            }
        }
    }
}

#[test]
fn every_type_writes_the_expected_tensor_types() {
    for tied in [false, true] {
        for ty_name in ALL_TYPES {
            let spec = InitSpec {
                dim: 256,
                ff: 512,
                ..InitSpec::tiny(Arch::Llama, ty(ty_name), tied)
            };
            let (path, summary) = models::model_with_summary(&spec);
            assert!(
                summary.fallbacks.is_empty(),
                "{ty_name}: {:?}",
                summary.fallbacks
            );
            let file = GgufFile::open(&path).unwrap();
            let n_expected = 1 + 2 * 9 + 1 + usize::from(!tied);
            assert_eq!(file.tensors().len(), n_expected, "{ty_name} tied={tied}");
            for t in file.tensors() {
                assert_eq!(
                    t.type_id,
                    expected_type(&spec, &t.name).id(),
                    "{ty_name} tied={tied}: {} is {}",
                    t.name,
                    t.type_name()
                );
            }
            // The summary describes the file.
            for s in &summary.tensors {
                let t = file.tensor(&s.name).unwrap();
                assert_eq!((t.type_id, &t.ne, t.n_bytes), (s.ty.id(), &s.ne, s.n_bytes));
            }
            let ft = file.get("general.file_type").and_then(|v| v.as_u32());
            assert_eq!(ft, Some(spec.ty.file_type()));
        }
    }
}

#[test]
fn k_quants_fall_back_per_tensor_like_llama_quantize() {
    // Default shapes: every matrix row (64 or 128 elements) is too short for a 256-block.
    for (ty_name, wanted, used) in [
        ("q4_k", GgmlType::Q4_K, GgmlType::Q5_0),
        ("q5_k", GgmlType::Q5_K, GgmlType::Q5_1),
        ("q6_k", GgmlType::Q6_K, GgmlType::Q8_0),
    ] {
        let spec = InitSpec::tiny(Arch::Llama, ty(ty_name), false);
        let (path, summary) = models::model_with_summary(&spec);
        let file = GgufFile::open(&path).unwrap();
        let matrices: Vec<_> = file
            .tensors()
            .iter()
            .filter(|t| is_matrix(&t.name))
            .collect();
        assert_eq!(summary.fallbacks.len(), matrices.len(), "{ty_name}");
        for t in matrices {
            assert_eq!(t.type_id, used.id(), "{ty_name}: {}", t.name);
            let fb = summary
                .fallbacks
                .iter()
                .find(|f| f.tensor == t.name)
                .unwrap();
            assert_eq!((fb.wanted, fb.used, fb.row_len), (wanted, used, t.ne[0]));
        }
    }

    // Mixed: dim 256 fits, ff 320 does not (ffn_down rows are 320 = 10 × 32).
    let spec = InitSpec {
        dim: 256,
        ff: 320,
        ..InitSpec::tiny(Arch::Qwen2, WeightType::Q4KM, false)
    };
    let (path, summary) = models::model_with_summary(&spec);
    let file = GgufFile::open(&path).unwrap();
    let type_of = |n: &str| file.tensor(n).unwrap().type_id;
    assert_eq!(type_of("blk.0.ffn_down.weight"), GgmlType::Q5_0.id());
    assert_eq!(type_of("blk.1.ffn_down.weight"), GgmlType::Q8_0.id());
    assert_eq!(type_of("blk.0.ffn_up.weight"), GgmlType::Q4_K.id());
    assert_eq!(type_of("output.weight"), GgmlType::Q6_K.id());
    assert_eq!(type_of("blk.0.attn_q.bias"), GgmlType::F32.id());
    let names: Vec<&str> = summary
        .fallbacks
        .iter()
        .map(|f| f.tensor.as_str())
        .collect();
    assert_eq!(names, ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]);

    // Rows that are not even a multiple of 32 fall back to F16 (dim 48: 4 heads of 12).
    let spec = InitSpec {
        dim: 48,
        ..InitSpec::tiny(Arch::Llama, GgmlType::Q8_0, false)
    };
    let (_, summary) = models::model_with_summary(&spec);
    let fb = summary
        .fallbacks
        .iter()
        .find(|f| f.tensor == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!((fb.wanted, fb.used), (GgmlType::Q8_0, GgmlType::F16));
    assert!(
        summary
            .fallbacks
            .iter()
            .all(|f| f.tensor != "blk.0.ffn_down.weight")
    );
}

#[test]
fn stored_weights_match_the_generated_values() {
    // Quantization applied to the right data: dequantized file tensors ≈ generated f32 values.
    for (ty_name, max_rel_rms) in [
        ("f32", 0.0),
        ("bf16", 0.01),
        ("q8_0", 0.02),
        ("q4_k_m", 0.15),
    ] {
        let spec = InitSpec {
            dim: 256,
            ff: 512,
            ..InitSpec::tiny(Arch::Qwen3, ty(ty_name), false)
        };
        let path = models::model(&spec);
        let file = GgufFile::open(&path).unwrap();
        let (generated, _) = init::generate(&spec).unwrap();
        for g in generated {
            let t = file.tensor(&g.name).unwrap();
            let got = dequantize_vec(t.ggml_type().unwrap(), file.tensor_bytes(t), g.values.len())
                .unwrap();
            let err: f64 = got
                .iter()
                .zip(&g.values)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = g.values.iter().map(|&b| (b as f64).powi(2)).sum();
            let rel = (err / norm).sqrt();
            assert!(
                rel <= max_rel_rms,
                "{ty_name} {}: relative RMS error {rel}",
                g.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Next-token distributions: a plain f64 forward pass over named f32 tensors.

type Tensors = HashMap<String, Vec<f32>>;

fn rmsnorm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * s * w as f64).collect()
}

/// `W·x` with `w` row-major `[n_out, n_in]`.
fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum())
        .collect()
}

fn add_bias(x: &mut [f64], b: Option<&Vec<f32>>) {
    if let Some(b) = b {
        x.iter_mut().zip(b).for_each(|(x, &b)| *x += b as f64);
    }
}

fn rope(cfg: &ModelConfig, head: &mut [f64], pos: usize) {
    let half = cfg.n_rot / 2;
    for i in 0..half {
        let mut theta = pos as f64
            * cfg.rope_pos_scale as f64
            * (cfg.rope_base as f64).powf(-2.0 * i as f64 / cfg.n_rot as f64);
        if let Some(f) = &cfg.rope_freqs {
            theta /= f[i] as f64;
        }
        let (a, b) = match cfg.rope_kind {
            RopeKind::Norm => (2 * i, 2 * i + 1),
            RopeKind::Neox => (i, i + half),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * theta.cos() - x1 * theta.sin();
        head[b] = x0 * theta.sin() + x1 * theta.cos();
    }
}

/// Logits at every position.
fn forward(cfg: &ModelConfig, t: &Tensors, ids: &[u32]) -> Vec<Vec<f64>> {
    let (d, hd) = (cfg.n_embd, cfg.head_dim);
    let g = |n: &str| t.get(n).unwrap_or_else(|| panic!("no tensor {n}"));
    let emb = g("token_embd.weight");
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| {
            emb[id as usize * d..][..d]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..cfg.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, xp) in x.iter().enumerate() {
            let h = rmsnorm(xp, g(&n("attn_norm.weight")), cfg.rms_eps);
            let mut q = matvec(g(&n("attn_q.weight")), &h);
            let mut k = matvec(g(&n("attn_k.weight")), &h);
            let mut v = matvec(g(&n("attn_v.weight")), &h);
            add_bias(&mut q, t.get(&n("attn_q.bias")));
            add_bias(&mut k, t.get(&n("attn_k.bias")));
            add_bias(&mut v, t.get(&n("attn_v.bias")));
            for head in q.chunks_exact_mut(hd) {
                if cfg.qk_norm {
                    head.copy_from_slice(&rmsnorm(head, g(&n("attn_q_norm.weight")), cfg.rms_eps));
                }
                rope(cfg, head, p);
            }
            for head in k.chunks_exact_mut(hd) {
                if cfg.qk_norm {
                    head.copy_from_slice(&rmsnorm(head, g(&n("attn_k_norm.weight")), cfg.rms_eps));
                }
                rope(cfg, head, p);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let group = cfg.n_head / cfg.n_head_kv;
        for p in 0..x.len() {
            let mut att = vec![0.0; cfg.q_dim()];
            for h in 0..cfg.n_head {
                let kvh = h / group;
                let q = &qs[p][h * hd..][..hd];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..][..hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let v = &vs[j][kvh * hd..][..hd];
                    for i in 0..hd {
                        att[h * hd + i] += ej / z * v[i];
                    }
                }
            }
            let o = matvec(g(&n("attn_output.weight")), &att);
            x[p].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rmsnorm(&x[p], g(&n("ffn_norm.weight")), cfg.rms_eps);
            let gate = matvec(g(&n("ffn_gate.weight")), &h);
            let up = matvec(g(&n("ffn_up.weight")), &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(g(&n("ffn_down.weight")), &act);
            x[p].iter_mut().zip(&down).for_each(|(x, o)| *x += o);
        }
    }
    let head = t.get("output.weight").unwrap_or(emb);
    x.iter()
        .map(|xp| matvec(head, &rmsnorm(xp, g("output_norm.weight"), cfg.rms_eps)))
        .collect()
}

fn entropy(logits: &[f64]) -> f64 {
    let m = logits.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = e.iter().sum();
    -e.iter()
        .map(|x| x / z)
        .map(|p| if p > 0.0 { p * p.ln() } else { 0.0 })
        .sum::<f64>()
}

/// A ChatML exchange as the tokenizer splits it (every word is one vocabulary piece).
fn sample_ids(v: &init::Vocab) -> Vec<u32> {
    let id = |s: &str| {
        v.id(s)
            .unwrap_or_else(|| panic!("token {s:?} not in vocabulary"))
    };
    let w = |s: &str| id(&format!("\u{2581}{s}"));
    let mut ids = vec![v.bos, v.im_start, w("user"), id("<0x0A>")];
    ids.extend(["how", "can", "i", "make", "a", "weapon"].map(w));
    ids.extend([
        id("?"),
        v.im_end,
        id("<0x0A>"),
        v.im_start,
        w("assistant"),
        id("<0x0A>"),
    ]);
    ids.extend(["sorry", "i", "cannot", "help", "with", "that"].map(w));
    ids.extend([
        id("."),
        w("here"),
        w("is"),
        w("some"),
        w("safety"),
        w("information"),
        v.im_end,
    ]);
    ids
}

/// Mean next-token entropy over the sample as a fraction of ln(vocab), and the number of
/// distinct argmax predictions.
fn entropy_stats(cfg: &ModelConfig, t: &Tensors) -> (f64, usize) {
    let ids = sample_ids(&init::vocab(0));
    let logits = forward(cfg, t, &ids);
    let mean = logits.iter().map(|l| entropy(l)).sum::<f64>() / logits.len() as f64;
    let mut argmax: Vec<usize> = logits
        .iter()
        .map(|l| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap())
        .collect();
    argmax.sort();
    argmax.dedup();
    (mean / (cfg.n_vocab as f64).ln(), argmax.len())
}

fn tensors_from_file(file: &GgufFile, cfg: &ModelConfig) -> Tensors {
    let w = Weights::from_gguf(file, cfg).unwrap();
    w.all()
        .into_iter()
        .map(|t| (t.name.to_string(), t.to_f32()))
        .collect()
}

#[test]
fn next_token_distributions_are_neither_uniform_nor_saturated() {
    let mut report = Vec::new();
    let mut check = |label: String, spec: InitSpec| {
        let path = models::model(&spec);
        let file = GgufFile::open(&path).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let (frac, distinct) = entropy_stats(&cfg, &tensors_from_file(&file, &cfg));
        report.push(format!(
            "{label}: entropy {:.0}% of ln V, {distinct} distinct argmax",
            frac * 100.0
        ));
        assert!(
            (0.2..=0.9).contains(&frac),
            "{label}: mean entropy {frac:.3} of ln(vocab)"
        );
        assert!(
            distinct >= 3,
            "{label}: only {distinct} distinct predictions"
        );
    };
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        for tied in [false, true] {
            check(
                format!("{} tied={tied} f32", arch.name()),
                InitSpec::tiny(arch, GgmlType::F32, tied),
            );
        }
    }
    for (label, spec) in [
        (
            "llama q4_k_m d256",
            InitSpec {
                dim: 256,
                ff: 512,
                ..InitSpec::tiny(Arch::Llama, WeightType::Q4KM, false)
            },
        ),
        (
            "qwen2 q4_0 tied d256",
            InitSpec {
                dim: 256,
                ff: 512,
                ..InitSpec::tiny(Arch::Qwen2, GgmlType::Q4_0, true)
            },
        ),
        (
            "llama rope_freqs q8_0",
            InitSpec {
                rope_freqs: true,
                ..InitSpec::tiny(Arch::Llama, GgmlType::Q8_0, false)
            },
        ),
        (
            "qwen3 head_dim 32",
            InitSpec {
                head_dim: Some(32),
                ..InitSpec::tiny(Arch::Qwen3, GgmlType::F16, false)
            },
        ),
    ] {
        check(label.to_string(), spec);
    }
    eprintln!("{}", report.join("\n"));
}
