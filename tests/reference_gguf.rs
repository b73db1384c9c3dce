//! `RefModel::from_weights`: the GGUF weight-view path (quantized tensors, dequantized with the
//! CPU dequantizers), checked against a model assembled by hand from the same tensors.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::{dequantize_vec, quantize};
use bfpo_lite::model::reference::{RefLayer, RefModel, RefWeights};
use bfpo_lite::model::{Arch, LayerWeights, ModelConfig, TensorRef, Weights};

fn cfg(arch: Arch, tied: bool) -> ModelConfig {
    ModelConfig {
        arch,
        name: None,
        n_vocab: 40,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 8,
        n_ff: 64,
        n_ctx_train: 64,
        rms_eps: 1e-6,
        rope_kind: arch.rope_kind(),
        rope_base: 1000.0,
        n_rot: 8,
        rope_pos_scale: 1.0,
        rope_freqs: None,
        tied,
        qkv_bias: arch == Arch::Qwen2,
        qk_norm: arch == Arch::Qwen3,
        gemma3: None,
    }
}

/// Stored bytes of each tensor: matrices as `ty`, vectors as F32.
struct Stored {
    name: String,
    ty: GgmlType,
    ne: [usize; 2],
    bytes: Vec<u8>,
}

fn store(name: String, v: &[f32], n_in: usize, ty: GgmlType) -> Stored {
    let n_out = v.len() / n_in;
    let ty = if n_out == 1 { GgmlType::F32 } else { ty };
    Stored {
        bytes: quantize(ty, v).unwrap(),
        name,
        ty,
        ne: [n_in, n_out],
    }
}

fn view(s: &Stored) -> TensorRef<'_> {
    TensorRef {
        name: &s.name,
        ty: s.ty,
        ne: s.ne,
        data: &s.bytes,
    }
}

fn deq(s: &Stored) -> Vec<f32> {
    dequantize_vec(s.ty, &s.bytes, s.ne[0] * s.ne[1]).unwrap()
}

#[test]
fn from_weights_maps_every_tensor_like_a_hand_assembled_model() {
    for (arch, tied, ty) in [
        (Arch::Llama, false, GgmlType::Q8_0),
        (Arch::Qwen2, true, GgmlType::Q5_0),
        (Arch::Qwen3, true, GgmlType::F16),
    ] {
        let c = cfg(arch, tied);
        // Every row length (32, 64) is a whole number of 32-element blocks.
        let ty_for = |n_in: usize| {
            assert_eq!(n_in % ty.block_elems(), 0);
            ty
        };
        let w = RefWeights::random(&c, 31);
        let d = c.n_embd;
        let mut st: Vec<Stored> = vec![
            store("token_embd.weight".into(), &w.token_embd, d, ty_for(d)),
            store("output_norm.weight".into(), &w.output_norm, d, ty),
        ];
        if let Some(o) = &w.output {
            st.push(store("output.weight".into(), o, d, ty_for(d)));
        }
        let per_layer = |l: usize, lw: &RefLayer| -> Vec<Stored> {
            let n = |s: &str| format!("blk.{l}.{s}");
            let mut v = vec![
                store(n("attn_norm.weight"), &lw.attn_norm, d, ty),
                store(n("attn_q.weight"), &lw.wq, d, ty_for(d)),
                store(n("attn_k.weight"), &lw.wk, d, ty_for(d)),
                store(n("attn_v.weight"), &lw.wv, d, ty_for(d)),
                store(
                    n("attn_output.weight"),
                    &lw.wo,
                    c.q_dim(),
                    ty_for(c.q_dim()),
                ),
                store(n("ffn_norm.weight"), &lw.ffn_norm, d, ty),
                store(n("ffn_gate.weight"), &lw.w_gate, d, ty_for(d)),
                store(n("ffn_up.weight"), &lw.w_up, d, ty_for(d)),
                store(n("ffn_down.weight"), &lw.w_down, c.n_ff, ty_for(c.n_ff)),
            ];
            for (s, b, len) in [
                ("attn_q.bias", &lw.bq, c.q_dim()),
                ("attn_k.bias", &lw.bk, c.kv_dim()),
                ("attn_v.bias", &lw.bv, c.kv_dim()),
                ("attn_q_norm.weight", &lw.q_norm, c.head_dim),
                ("attn_k_norm.weight", &lw.k_norm, c.head_dim),
            ] {
                if let Some(b) = b {
                    v.push(store(n(s), b, len, ty));
                }
            }
            v
        };
        let layers_st: Vec<Vec<Stored>> = w
            .layers
            .iter()
            .enumerate()
            .map(|(l, lw)| per_layer(l, lw))
            .collect();
        let find = |v: &'_ [Stored], suffix: &str| -> Option<usize> {
            v.iter().position(|s| s.name.ends_with(suffix))
        };

        // The GGUF-style views.
        let lw_views: Vec<LayerWeights> = layers_st
            .iter()
            .map(|v| {
                let get = |s: &str| view(&v[find(v, s).unwrap()]);
                let opt = |s: &str| find(v, s).map(|i| view(&v[i]));
                LayerWeights {
                    attn_norm: get("attn_norm.weight"),
                    attn_q: get("attn_q.weight"),
                    attn_k: get("attn_k.weight"),
                    attn_v: get("attn_v.weight"),
                    attn_q_bias: opt("attn_q.bias"),
                    attn_k_bias: opt("attn_k.bias"),
                    attn_v_bias: opt("attn_v.bias"),
                    attn_q_norm: opt("attn_q_norm.weight"),
                    attn_k_norm: opt("attn_k_norm.weight"),
                    attn_output: get("attn_output.weight"),
                    ffn_norm: get("ffn_norm.weight"),
                    ffn_gate: get("ffn_gate.weight"),
                    ffn_up: get("ffn_up.weight"),
                    ffn_down: get("ffn_down.weight"),
                    post_attn_norm: opt("post_attention_norm.weight"),
                    post_ffn_norm: opt("post_ffw_norm.weight"),
                }
            })
            .collect();
        let weights = Weights {
            token_embd: view(&st[0]),
            output_norm: view(&st[1]),
            output: st.get(2).map(view),
            layers: lw_views,
        };
        let from_views = RefModel::from_weights(&c, &weights).unwrap();

        // The same tensors, dequantized and placed by hand.
        let hand_layers = layers_st
            .iter()
            .map(|v| {
                let get = |s: &str| deq(&v[find(v, s).unwrap()]);
                let opt = |s: &str| find(v, s).map(|i| deq(&v[i]));
                RefLayer {
                    attn_norm: get("attn_norm.weight"),
                    wq: get("attn_q.weight"),
                    wk: get("attn_k.weight"),
                    wv: get("attn_v.weight"),
                    bq: opt("attn_q.bias"),
                    bk: opt("attn_k.bias"),
                    bv: opt("attn_v.bias"),
                    q_norm: opt("attn_q_norm.weight"),
                    k_norm: opt("attn_k_norm.weight"),
                    wo: get("attn_output.weight"),
                    ffn_norm: get("ffn_norm.weight"),
                    w_gate: get("ffn_gate.weight"),
                    w_up: get("ffn_up.weight"),
                    w_down: get("ffn_down.weight"),
                    post_attn_norm: opt("post_attention_norm.weight"),
                    post_ffn_norm: opt("post_ffw_norm.weight"),
                }
            })
            .collect();
        let hand = RefWeights {
            token_embd: deq(&st[0]),
            output_norm: deq(&st[1]),
            output: st.get(2).map(deq),
            layers: hand_layers,
        };
        assert_eq!(from_views.weights(), &hand, "{arch:?}");
        let ids = [1u32, 39, 7, 7, 0, 22, 5];
        let by_hand = RefModel::from_parts(c.clone(), hand).unwrap();
        let a: Vec<f64> = from_views.logits(&ids, None).unwrap().concat();
        let b: Vec<f64> = by_hand.logits(&ids, None).unwrap().concat();
        assert_eq!(a, b, "{arch:?}");
        // And the quantized model stays near the f32 original (quantization error only).
        let orig: Vec<f64> = RefModel::from_parts(c.clone(), w)
            .unwrap()
            .logits(&ids, None)
            .unwrap()
            .concat();
        // Relative RMS error of the logits vs the f32 original, bounded per type (measured on
        // this model: F16 4.4e-4, Q8_0 1.3e-2, Q5_0 1.1e-1 — errors compound over 2 layers and
        // the quantized tied head).
        let rms = |v: &mut dyn Iterator<Item = f64>| {
            let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x * x, n + 1));
            (s / n as f64).sqrt()
        };
        let rel =
            rms(&mut a.iter().zip(&orig).map(|(x, y)| x - y)) / rms(&mut orig.iter().copied());
        let bound = match ty {
            GgmlType::F16 => 1e-3,
            GgmlType::Q8_0 => 3e-2,
            _ => 0.25,
        };
        eprintln!("{arch:?} {ty}: relative RMS logit error {rel:.2e}");
        assert!(
            rel < bound,
            "{arch:?} {ty}: relative RMS logit error {rel} ≥ {bound}"
        );
    }
}

/// The whole file path: an `init-model` GGUF (written to bytes, read back, config and weights
/// parsed by the model module) runs through the reference forward and LoRA backward.
#[test]
fn reference_runs_on_init_model_files() {
    use bfpo_lite::data::Example;
    use bfpo_lite::gguf::GgufFile;
    use bfpo_lite::model::init::{InitSpec, build};
    use bfpo_lite::model::lora::{LoraSpec, LoraWeights, Target};

    for (arch, ty, tied, freqs) in [
        (Arch::Llama, GgmlType::Q8_0, false, true),
        (Arch::Qwen2, GgmlType::F16, true, false),
        (Arch::Qwen3, GgmlType::Q8_0, true, false),
    ] {
        let mut spec = InitSpec::tiny(arch, ty, tied);
        spec.rope_freqs = freqs;
        let (w, _) = build(&spec).unwrap();
        let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        assert_eq!(cfg.rope_freqs.is_some(), freqs);
        let weights = Weights::from_gguf(&file, &cfg).unwrap();
        let m = RefModel::from_weights(&cfg, &weights).unwrap();
        let ex = Example {
            ids: vec![1, 40, 41, 42, 7, 200, 3],
            response_start: 4,
        };
        let lp = m.token_logprobs(&ex, None).unwrap();
        assert_eq!(lp.len(), 3);
        assert!(
            lp.iter().all(|&l| l.is_finite() && l < 0.0),
            "{arch:?} {lp:?}"
        );

        // A few gradient entries against finite differences (parameters on a 2⁻¹² grid so
        // that ±2⁻¹⁷ is exact in f32).
        let lspec = LoraSpec {
            targets: vec![Target::AttnQ, Target::FfnDown],
            layers: vec![0, 1],
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 3,
        };
        let mut lora = LoraWeights::random(&lspec, &cfg, 0.05).unwrap();
        for t in &mut lora.tensors {
            for v in t.a.iter_mut().chain(t.b.iter_mut()) {
                *v = (*v * 4096.0).round() / 4096.0;
            }
        }
        let exs = [ex.clone()];
        let (_, g) = m.lora_grads(&exs, &[1.0], &lora).unwrap();
        let h = 1.0 / 131072.0;
        for (ti, gt) in g.tensors.iter().enumerate() {
            for i in [0, gt.b.len() / 2, gt.b.len() - 1] {
                let mut p = lora.clone();
                let p0 = p.tensors[ti].b[i];
                p.tensors[ti].b[i] = (p0 as f64 + h) as f32;
                let jp = m.sequence_logprobs(&exs, Some(&p)).unwrap()[0];
                p.tensors[ti].b[i] = (p0 as f64 - h) as f32;
                let jm = m.sequence_logprobs(&exs, Some(&p)).unwrap()[0];
                let fd = (jp - jm) / (2.0 * h);
                assert!(
                    (gt.b[i] - fd).abs() <= 5e-8 + 1e-6 * fd.abs(),
                    "{arch:?} blk.{}.{:?} dB[{i}]: {} vs fd {fd}",
                    gt.layer,
                    gt.target,
                    gt.b[i]
                );
            }
        }
    }
}
