//! Whole-model GPU forwards with every matmul split over n_in (split-K forced on a device whose
//! own rule never splits, as lavapipe's): log-probs still match the f64 reference at
//! gpu_forward.rs's tolerance (llama and qwen2, whose q/k/v biases go through the split path's
//! reduce pass), and an example alone gives the same bits as inside a padded batch. Separate
//! test binary because the forcing is a process-wide setting.

mod common;

use bfpo_lite::data::Example;
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::gpu::forward::GpuModel;
use bfpo_lite::gpu::ops::matmul::TEST_SPLIT_K_CHUNK;
use bfpo_lite::model::init::InitSpec;
use bfpo_lite::model::reference::RefModel;
use bfpo_lite::model::{Arch, ModelConfig, Weights};
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::sync::atomic::Ordering;

/// gpu_forward.rs's LOGP_TOL.
const LOGP_TOL: Tol = Tol::new(2e-5, 0.0);

#[test]
fn split_k_model_forward_matches_reference_and_batching() {
    let gpu = common::gpu::gpu();
    // 24-element K chunks: every projection and the LM head of the tiny models is split,
    // with a shorter last chunk wherever 24 does not divide the row.
    TEST_SPLIT_K_CHUNK.store(24, Ordering::SeqCst);
    for spec in [
        InitSpec::tiny(Arch::Llama, GgmlType::Q4_1, true),
        InitSpec::tiny(Arch::Qwen2, GgmlType::Q8_0, false),
    ] {
        let path = common::models::model(&spec);
        let file = GgufFile::open(&path).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let model = GpuModel::load(&gpu, &file, &cfg).unwrap();
        let mut rng = Rng::new(21);
        let mut ex = |len: usize, start: usize| Example {
            ids: (0..len)
                .map(|_| rng.below(cfg.n_vocab as u64) as u32)
                .collect(),
            response_start: start,
        };
        let exs = vec![ex(11, 4), ex(5, 1), ex(17, 9), ex(8, 7)];
        let out = model.forward(&gpu, &exs, None).unwrap();
        let w = Weights::from_gguf(&file, &cfg).unwrap();
        let refm = RefModel::new(&cfg, &w).unwrap();
        for (i, e) in exs.iter().enumerate() {
            let want = refm.token_logprobs(e, None).unwrap();
            let got = &out.token_logprobs[i];
            assert_close(&format!("{spec:?} example {i}"), got, &want, LOGP_TOL);
            let one = model.forward(&gpu, std::slice::from_ref(e), None).unwrap();
            assert_eq!(
                one.token_logprobs[0], *got,
                "{spec:?}: example {i} alone vs in a padded batch (split-K)"
            );
        }
    }
    TEST_SPLIT_K_CHUNK.store(0, Ordering::SeqCst);
}
