//! Both forward attention kernels (`AttnKernel::Rows`, `kernels/attention.wgsl`, and
//! `AttnKernel::Tiled`, `kernels/attention_tiled.wgsl`) against the f64 reference
//! (`attention_ref`), whatever the adapter would pick: lengths that are not multiples of the
//! tiles, padding (lens < L, an empty sequence), GQA groups of 1 and 3, small and large
//! head_dim, several sequences and dispatch splits; a sliding window with another score scale
//! (gemma3); bit-reproducibility across splits; the tiles' workgroup memory.

mod common;

use bfpo_lite::gpu::Gpu;
use bfpo_lite::gpu::ops::attention::{
    ATTENTION_TOL, AttnKernel, AttnShape, attention_ref, attention_tiles, attention_wg_bytes,
    attention_with,
};
use bfpo_lite::util::{Rng, assert_close};

const KERNELS: [AttnKernel; 2] = [AttnKernel::Rows, AttnKernel::Tiled];

#[allow(clippy::too_many_arguments)]
fn run(
    gpu: &Gpu,
    shape: &AttnShape,
    kernel: AttnKernel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lens: &[u32],
    split: usize,
) -> (Vec<f32>, Vec<f32>) {
    let t = shape.n_rows();
    let qb = gpu.upload("q", q).unwrap();
    let kb = gpu.upload("k", k).unwrap();
    let vb = gpu.upload("v", v).unwrap();
    let lb = gpu.upload("lens", lens).unwrap();
    // Garbage in the outputs: padding rows must be written as zeros.
    let ob = gpu
        .upload("o", &vec![7.0f32; t * shape.n_head * shape.head_dim])
        .unwrap();
    let sb = gpu.upload("lse", &vec![7.0f32; t * shape.n_head]).unwrap();
    let mut rec = gpu.recorder();
    attention_with(
        gpu, &mut rec, shape, &qb, &kb, &vb, &lb, &ob, &sb, kernel, split,
    )
    .unwrap();
    rec.run("attention test").unwrap();
    (gpu.read(&ob).unwrap(), gpu.read(&sb).unwrap())
}

#[test]
fn attention_kernels_match_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(108);
    // (B, L, lens, n_head, n_head_kv, head_dim, rows per dispatch)
    type Case = (usize, usize, Vec<u32>, usize, usize, usize, usize);
    let cases: [Case; 7] = [
        (3, 37, vec![37, 20, 1], 9, 3, 64, usize::MAX),
        (2, 33, vec![17, 33], 4, 4, 64, 16),
        (2, 19, vec![19, 7], 6, 2, 12, 1),
        (5, 8, vec![8, 0, 3, 8, 1], 2, 1, 4, usize::MAX),
        (1, 21, vec![21], 2, 1, 128, 8),
        (2, 11, vec![11, 6], 2, 1, 160, usize::MAX),
        (1, 70, vec![70], 3, 1, 32, usize::MAX),
    ];
    for (b, l, lens, nh, nkv, hd, split) in cases {
        let shape = AttnShape::new(b, l, nh, nkv, hd);
        let t = b * l;
        let q = rng.normal_vec(t * nh * hd, 1.0);
        let k = rng.normal_vec(t * nkv * hd, 1.0);
        let v = rng.normal_vec(t * nkv * hd, 1.0);
        let (wo, wl) = attention_ref(&shape, &q, &k, &v, &lens);
        for kernel in KERNELS {
            let (go, gl) = run(&gpu, &shape, kernel, &q, &k, &v, &lens, split);
            let what =
                format!("{kernel:?} attention B {b} L {l} lens {lens:?} heads {nh}/{nkv} hd {hd}");
            assert_close(&format!("{what} o"), &go, &wo, ATTENTION_TOL);
            assert_close(&format!("{what} lse"), &gl, &wl, ATTENTION_TOL);
        }
    }
}

/// gemma3's local layers: a sliding window (query i sees keys j with i − j < window) and a score
/// scale other than 1/√head_dim, both kernels, against the f64 reference; a window of 1 gives
/// o = v of the row's own key; a window ≥ L equals plain causal attention.
#[test]
fn attention_kernels_with_a_sliding_window_match_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(109);
    // (B, L, lens, n_head, n_head_kv, head_dim, window, rows per dispatch)
    type Case = (usize, usize, Vec<u32>, usize, usize, usize, usize, usize);
    let cases: [Case; 5] = [
        (2, 37, vec![37, 20], 4, 1, 64, 5, usize::MAX),
        (3, 19, vec![19, 7, 1], 6, 2, 12, 3, 4),
        (1, 40, vec![40], 2, 1, 256, 16, 8),
        (2, 9, vec![9, 9], 2, 2, 16, 1, usize::MAX),
        (1, 21, vec![21], 2, 1, 32, 64, usize::MAX),
    ];
    for (b, l, lens, nh, nkv, hd, w, split) in cases {
        let shape = AttnShape::new(b, l, nh, nkv, hd).with_scale_window(0.0625, Some(w));
        let t = b * l;
        let q = rng.normal_vec(t * nh * hd, 1.0);
        let k = rng.normal_vec(t * nkv * hd, 1.0);
        let v = rng.normal_vec(t * nkv * hd, 1.0);
        let (wo, wl) = attention_ref(&shape, &q, &k, &v, &lens);
        if w >= l {
            let causal = AttnShape::new(b, l, nh, nkv, hd).with_scale_window(0.0625, None);
            assert_eq!(
                attention_ref(&causal, &q, &k, &v, &lens),
                (wo.clone(), wl.clone())
            );
        }
        for kernel in KERNELS {
            let (go, gl) = run(&gpu, &shape, kernel, &q, &k, &v, &lens, split);
            let what =
                format!("{kernel:?} attention B {b} L {l} heads {nh}/{nkv} hd {hd} window {w}");
            assert_close(&format!("{what} o"), &go, &wo, ATTENTION_TOL);
            assert_close(&format!("{what} lse"), &gl, &wl, ATTENTION_TOL);
            if w == 1 {
                // Each query sees only its own key: o = v of its KV head.
                for r in 0..t {
                    for h in 0..nh {
                        let g = h / (nh / nkv);
                        let o = &go[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                        let vr = &v[(r * nkv + g) * hd..(r * nkv + g + 1) * hd];
                        assert_close(&format!("{what} row {r}"), o, vr, ATTENTION_TOL);
                    }
                }
            }
        }
    }
}

#[test]
fn attention_kernels_are_reproducible_across_splits() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(109);
    let shape = AttnShape::new(3, 37, 9, 3, 64);
    let lens = [37u32, 20, 1];
    let t = shape.n_rows();
    let q = rng.normal_vec(t * 9 * 64, 1.0);
    let k = rng.normal_vec(t * 3 * 64, 1.0);
    let v = rng.normal_vec(t * 3 * 64, 1.0);
    for kernel in KERNELS {
        let a = run(&gpu, &shape, kernel, &q, &k, &v, &lens, usize::MAX);
        for split in [1, 16, 40] {
            let b = run(&gpu, &shape, kernel, &q, &k, &v, &lens, split);
            assert!(a == b, "{kernel:?} split {split}: not bit-reproducible");
        }
    }
}

/// The tiled kernel at the largest head_dim (the smallest tiles; the per-row kernel is left out:
/// its 512-float rows make lavapipe's shader compiler slow).
#[test]
fn tiled_attention_head_dim_512() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(111);
    let shape = AttnShape::new(2, 5, 2, 1, 512);
    let lens = [5u32, 3];
    let t = shape.n_rows();
    let q = rng.normal_vec(t * 2 * 512, 1.0);
    let k = rng.normal_vec(t * 512, 1.0);
    let v = rng.normal_vec(t * 512, 1.0);
    let (wo, wl) = attention_ref(&shape, &q, &k, &v, &lens);
    let (go, gl) = run(
        &gpu,
        &shape,
        AttnKernel::Tiled,
        &q,
        &k,
        &v,
        &lens,
        usize::MAX,
    );
    assert_close("tiled hd 512 o", &go, &wo, ATTENTION_TOL);
    assert_close("tiled hd 512 lse", &gl, &wl, ATTENTION_TOL);
}

#[test]
fn attention_tiles_fit_workgroup_memory() {
    for hd in (4..=512).step_by(4) {
        let (na, nb) = attention_tiles(hd);
        assert!(na >= 1 && nb >= 1, "head_dim {hd}: tiles {na} × {nb}");
        let bytes = attention_wg_bytes(hd, na, nb);
        assert!(
            bytes <= 16384,
            "head_dim {hd}: {na} × {nb} need {bytes} bytes"
        );
    }
    assert_eq!(attention_tiles(64), (16, 16));
    assert_eq!(
        attention_wg_bytes(64, 16, 16),
        48 * 17 * 16 + 4 * 256 + 12 * 16
    );
}
