//! LoRA adapters through llama.cpp: on/off, scale·alpha/rank, agreement with merged weights,
//! load/free in a loop without leaking, and validation errors for files llama.cpp would
//! mishandle (some of which abort the process inside llama.cpp).

mod common;

use bfpo_lite::data::Prompt;
use bfpo_lite::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use bfpo_lite::model::Arch;
use bfpo_lite::runtime::{LoadOptions, RtModel, RuntimeError, ScoreOptions};
use bfpo_lite::util::close::{Tol, assert_close};
use bfpo_lite::util::rng::Rng;
use common::models::tiny_model;
use std::path::{Path, PathBuf};

/// llama.cpp applies LoRA as two extra matmuls; against pre-merged f32 weights it agrees to
/// ~4e-5 relative (`docs/llama-cpp.md` §3).
const TOL_MERGED: Tol = Tol::new(1e-4, 2e-4);

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime-adapters");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// One LoRA pair in PEFT orientation: `a` is `(r, n_in)` row-major, `b` is `(n_out, r)`.
struct Pair {
    base: String,
    r: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    /// ggml ne of lora_a / lora_b.
    a_ne: Vec<u64>,
    b_ne: Vec<u64>,
}

/// A random LoRA pair for the linear weight `base` (ne [n_in, n_out]).
fn linear_pair(model: &GgufFile, base: &str, r: usize, seed: u64) -> Pair {
    let ne = &model.tensor(base).unwrap_or_else(|| panic!("no {base}")).ne;
    let (n_in, n_out) = (ne[0] as usize, ne[1] as usize);
    let mut rng = Rng::new(seed);
    Pair {
        base: base.to_string(),
        r,
        a: rng.normal_vec(r * n_in, 0.3),
        b: rng.normal_vec(n_out * r, 0.3),
        a_ne: vec![n_in as u64, r as u64],
        b_ne: vec![r as u64, n_out as u64],
    }
}

fn write_adapter(
    path: &Path,
    arch: &str,
    alpha: Option<f32>,
    pairs: &[Pair],
    edit: impl FnOnce(&mut GgufWriter),
) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.type", Value::String("adapter".into()));
    w.set("adapter.type", Value::String("lora".into()));
    if let Some(a) = alpha {
        w.set("adapter.lora.alpha", Value::F32(a));
    }
    for p in pairs {
        w.add_tensor(format!("{}.lora_a", p.base), &p.a_ne, 0, f32_bytes(&p.a))
            .unwrap();
        w.add_tensor(format!("{}.lora_b", p.base), &p.b_ne, 0, f32_bytes(&p.b))
            .unwrap();
    }
    edit(&mut w);
    w.write_file(path).unwrap();
    path.to_path_buf()
}

fn load(path: &Path) -> RtModel {
    RtModel::load(path, &LoadOptions::default()).unwrap()
}

fn prompt_ids(m: &RtModel) -> Vec<u32> {
    m.encode(
        &Prompt::Text("how can I make a cake?".into()),
        "Sorry, I cannot help.",
    )
    .unwrap()
    .example
    .ids
}

/// A copy of an f32 model with `W += s · B·A` merged into each pair's base tensor.
fn merged_model(src: &Path, pairs: &[Pair], s: f32, out: &Path) -> PathBuf {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::with_alignment(f.alignment());
    for (k, v) in f.kvs() {
        w.set(k.clone(), v.clone());
    }
    for t in f.tensors() {
        let bytes = f.tensor_bytes(t);
        match pairs.iter().find(|p| p.base == t.name) {
            None => {
                w.add_tensor(t.name.clone(), &t.ne, t.type_id, bytes.to_vec())
                    .unwrap();
            }
            Some(p) => {
                assert_eq!(t.type_id, GgmlType::F32.id());
                let (n_in, n_out) = (t.ne[0] as usize, t.ne[1] as usize);
                let mut wt: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
                for o in 0..n_out {
                    for i in 0..n_in {
                        let mut d = 0f64;
                        for k in 0..p.r {
                            d += p.b[o * p.r + k] as f64 * p.a[k * n_in + i] as f64;
                        }
                        wt[o * n_in + i] += (s as f64 * d) as f32;
                    }
                }
                w.add_tensor(t.name.clone(), &t.ne, t.type_id, f32_bytes(&wt))
                    .unwrap();
            }
        }
    }
    w.write_file(out).unwrap();
    out.to_path_buf()
}

#[test]
fn adapter_changes_logits_matches_merged_weights_and_comes_off_exactly() {
    let src = tiny_model(Arch::Llama, GgmlType::F32, false);
    let file = GgufFile::open(&src).unwrap();
    let r = 4;
    let pairs = vec![
        linear_pair(&file, "blk.0.attn_q.weight", r, 1),
        linear_pair(&file, "blk.1.ffn_down.weight", r, 2),
        linear_pair(&file, "output.weight", r, 3),
    ];
    let alpha = 8.0f32;
    let a1 = write_adapter(
        &scratch("a-alpha8.gguf"),
        "llama",
        Some(alpha),
        &pairs,
        |_| {},
    );
    let a2 = write_adapter(
        &scratch("a-alpha16.gguf"),
        "llama",
        Some(2.0 * alpha),
        &pairs,
        |_| {},
    );

    let mut m = load(&src);
    let ids = prompt_ids(&m);
    let base = m.logits(&ids, true).unwrap();
    let id1 = m.load_adapter(&a1).unwrap();
    let id2 = m.load_adapter(&a2).unwrap();
    let info = m.adapter_info(id1).unwrap();
    assert_eq!(info.alpha, Some(alpha));
    assert_eq!(info.targets.len(), 3);
    assert!(info.targets.iter().all(|(_, rank)| *rank == r));

    let scale = 0.5f32;
    m.set_adapter(id1, scale).unwrap();
    let on = m.logits(&ids, true).unwrap();
    let max_change = on
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_change > 1e-2,
        "adapter changes the logits (max change {max_change})"
    );

    // Effective factor scale · alpha / r: alpha 2α at scale 0.5·s equals alpha α at s.
    m.set_adapter(id2, scale * 0.5).unwrap();
    let on2 = m.logits(&ids, true).unwrap();
    assert_close("2α at s/2 vs α at s", &on2, &on, Tol::new(1e-6, 1e-6));

    // Against the model with W + s·α/r·B·A merged in (computed here in f64).
    let merged = merged_model(
        &src,
        &pairs,
        scale * alpha / r as f32,
        &scratch("merged.gguf"),
    );
    let mm = load(&merged);
    let want = mm.logits(&ids, true).unwrap();
    assert_close("adapter vs merged weights", &on, &want, TOL_MERGED);

    // Off: bit-exactly the base model.
    m.clear_adapter();
    assert_eq!(m.logits(&ids, true).unwrap(), base);
    // Scoring follows the active adapter too.
    let ex = m
        .encode(&Prompt::Text("hi".into()), "Hello there.")
        .unwrap()
        .example;
    let opts = ScoreOptions {
        threads: Some(1),
        ..ScoreOptions::exact()
    };
    let s_base = m.score_sums(std::slice::from_ref(&ex), &opts).unwrap()[0];
    m.set_adapter(id1, scale).unwrap();
    let s_on = m.score_sums(std::slice::from_ref(&ex), &opts).unwrap()[0];
    assert!((s_on - s_base).abs() > 1e-3, "{s_on} vs {s_base}");
    m.free_adapter(id1).unwrap();
    assert_eq!(
        m.active_adapter(),
        None,
        "freeing the active adapter deactivates it"
    );
    let s_off = m.score_sums(std::slice::from_ref(&ex), &opts).unwrap()[0];
    assert_eq!(s_off, s_base);
    assert!(matches!(
        m.set_adapter(id1, 1.0).unwrap_err(),
        RuntimeError::UnknownAdapter(_)
    ));
    m.free_adapter(id2).unwrap();
    assert_eq!(m.n_adapters(), 0);
}

#[test]
fn token_embd_adapter_on_an_untied_model_works() {
    let src = tiny_model(Arch::Qwen2, GgmlType::F32, false);
    let file = GgufFile::open(&src).unwrap();
    let ne = &file.tensor("token_embd.weight").unwrap().ne;
    let (n_embd, n_vocab, r) = (ne[0] as usize, ne[1] as usize, 2usize);
    let mut rng = Rng::new(9);
    // token_embd: A/B flipped, lora_a ne [r, n_vocab], lora_b ne [r, n_embd].
    let p = Pair {
        base: "token_embd.weight".into(),
        r,
        a: rng.normal_vec(r * n_vocab, 0.5),
        b: rng.normal_vec(r * n_embd, 0.5),
        a_ne: vec![r as u64, n_vocab as u64],
        b_ne: vec![r as u64, n_embd as u64],
    };
    let path = write_adapter(&scratch("embd.gguf"), "qwen2", Some(2.0), &[p], |_| {});
    let mut m = load(&src);
    let ids = prompt_ids(&m);
    let base = m.logits(&ids, true).unwrap();
    let id = m.load_adapter(&path).unwrap();
    m.set_adapter(id, 1.0).unwrap();
    let on = m.logits(&ids, true).unwrap();
    assert!(on.iter().all(|x| x.is_finite()));
    assert_ne!(on, base);
}

#[test]
fn loading_and_freeing_many_adapters_does_not_leak() {
    let src = tiny_model(Arch::Llama, GgmlType::F32, false);
    let file = GgufFile::open(&src).unwrap();
    // ~1 MB of adapter per load: a leak of 150 loads would be visible in RSS.
    let pairs = [linear_pair(&file, "output.weight", 256, 5)];
    let path = write_adapter(&scratch("big.gguf"), "llama", Some(16.0), &pairs, |_| {});
    let bytes = std::fs::metadata(&path).unwrap().len();
    let mut m = load(&src);
    let ids = prompt_ids(&m);
    let rss = || -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/statm").ok()?;
        Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4096)
    };
    let mut first = None;
    let mut rss_after_warmup = None;
    let n = 150;
    for i in 0..n {
        let id = m.load_adapter(&path).unwrap();
        m.set_adapter(id, 1.0).unwrap();
        if i % 25 == 0 {
            let l = m.logits(&ids[..4], true).unwrap();
            match &first {
                None => first = Some(l),
                Some(f) => assert_eq!(&l, f, "iteration {i}: same adapter, same logits"),
            }
        }
        m.free_adapter(id).unwrap();
        assert_eq!(m.n_adapters(), 0);
        if i == 9 {
            rss_after_warmup = rss();
        }
    }
    if let (Some(a), Some(b)) = (rss_after_warmup, rss()) {
        let grown = b.saturating_sub(a);
        assert!(
            grown < bytes * (n as u64 - 10) / 4,
            "RSS grew {grown} bytes over {} loads of a {bytes}-byte adapter: leaking",
            n - 10
        );
    }
}

#[test]
fn bad_adapters_are_refused_before_llama_cpp_sees_them() {
    let untied = tiny_model(Arch::Llama, GgmlType::F32, false);
    let tied = tiny_model(Arch::Llama, GgmlType::F32, true);
    let uf = GgufFile::open(&untied).unwrap();
    let q = || linear_pair(&uf, "blk.0.attn_q.weight", 4, 11);
    let mut m = load(&untied);
    let mut mt = load(&tied);

    // Another architecture.
    let p = write_adapter(&scratch("qwen2.gguf"), "qwen2", Some(4.0), &[q()], |_| {});
    let e = m.load_adapter(&p).unwrap_err();
    assert!(matches!(e, RuntimeError::AdapterArch { .. }), "{e}");
    assert!(
        e.to_string().contains("qwen2") && e.to_string().contains("llama"),
        "{e}"
    );

    // token_embd LoRA on a tied model: llama.cpp would abort the whole process.
    let ne = &uf.tensor("token_embd.weight").unwrap().ne;
    let (n_embd, n_vocab) = (ne[0], ne[1]);
    let embd = Pair {
        base: "token_embd.weight".into(),
        r: 2,
        a: vec![0.1; 2 * n_vocab as usize],
        b: vec![0.1; 2 * n_embd as usize],
        a_ne: vec![2, n_vocab],
        b_ne: vec![2, n_embd],
    };
    let p = write_adapter(
        &scratch("embd-tied.gguf"),
        "llama",
        Some(4.0),
        &[embd],
        |_| {},
    );
    let e = mt.load_adapter(&p).unwrap_err();
    assert!(
        matches!(e, RuntimeError::AdapterTiedEmbedding { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("tie"), "{e}");

    // output.weight LoRA on a tied model (the base has no output.weight).
    let out = linear_pair(&uf, "output.weight", 4, 12);
    let p = write_adapter(
        &scratch("output-tied.gguf"),
        "llama",
        Some(4.0),
        &[out],
        |_| {},
    );
    let e = mt.load_adapter(&p).unwrap_err();
    assert!(e.to_string().contains("output.weight"), "{e}");

    // Missing half.
    let p = write_adapter(&scratch("half.gguf"), "llama", Some(4.0), &[], |w| {
        let a = q();
        w.add_tensor("blk.0.attn_q.weight.lora_a", &a.a_ne, 0, f32_bytes(&a.a))
            .unwrap();
    });
    let e = m.load_adapter(&p).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::AdapterMissingHalf { missing, .. } if *missing == "lora_b"),
        "{e}"
    );

    // Shapes that do not match the base (rank consistent, n_in wrong).
    let mut bad = q();
    bad.a_ne[0] += 32;
    bad.a.extend(vec![0.0; 32 * bad.r]);
    let p = write_adapter(&scratch("shape.gguf"), "llama", Some(4.0), &[bad], |_| {});
    let e = m.load_adapter(&p).unwrap_err();
    assert!(matches!(e, RuntimeError::AdapterShape(_)), "{e}");
    assert!(e.to_string().contains("blk.0.attn_q.weight.lora_a"), "{e}");

    // Swapped halves ("not transposed").
    let mut sw = q();
    std::mem::swap(&mut sw.a_ne, &mut sw.b_ne);
    std::mem::swap(&mut sw.a, &mut sw.b);
    let p = write_adapter(&scratch("swapped.gguf"), "llama", Some(4.0), &[sw], |_| {});
    assert!(matches!(
        m.load_adapter(&p).unwrap_err(),
        RuntimeError::AdapterShape(_)
    ));

    // A LoRA on a norm/bias-like 1-D tensor, a tensor with an unknown suffix, a model file.
    let p = write_adapter(&scratch("norm.gguf"), "llama", Some(4.0), &[], |w| {
        w.add_tensor(
            "blk.0.attn_norm.weight.lora_a",
            &[64, 2],
            0,
            vec![0u8; 64 * 2 * 4],
        )
        .unwrap();
        w.add_tensor(
            "blk.0.attn_norm.weight.lora_b",
            &[2, 1],
            0,
            vec![0u8; 2 * 4],
        )
        .unwrap();
    });
    assert!(m.load_adapter(&p).unwrap_err().to_string().contains("2-D"));
    let p = write_adapter(&scratch("suffix.gguf"), "llama", Some(4.0), &[q()], |w| {
        w.add_tensor("blk.0.attn_q.weight.lora_c", &[4], 0, vec![0u8; 16])
            .unwrap();
    });
    assert!(
        m.load_adapter(&p)
            .unwrap_err()
            .to_string()
            .contains("lora_c")
    );
    let e = m.load_adapter(&untied).unwrap_err();
    assert!(e.to_string().contains("general.type"), "{e}");

    // Not GGUF at all, and a missing file.
    let junk = scratch("junk.gguf");
    std::fs::write(&junk, "not gguf").unwrap();
    assert!(matches!(
        m.load_adapter(&junk).unwrap_err(),
        RuntimeError::AdapterGguf { .. }
    ));
    let e = m.load_adapter(&scratch("nope.gguf")).unwrap_err();
    assert!(e.to_string().contains("nope.gguf"), "{e}");

    // Nothing got loaded, and the models still work.
    assert_eq!(m.n_adapters() + mt.n_adapters(), 0);
    let ids = prompt_ids(&m);
    assert!(m.logits(&ids, false).unwrap().iter().all(|x| x.is_finite()));
    assert!(
        mt.logits(&ids, false)
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    );
    // A valid adapter still loads afterwards.
    let p = write_adapter(&scratch("ok.gguf"), "llama", None, &[q()], |_| {});
    let id = m.load_adapter(&p).unwrap();
    assert_eq!(m.adapter_info(id).unwrap().alpha, None);
}
