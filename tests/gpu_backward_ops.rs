//! Backward kernels vs their CPU references (`model::reference`'s per-op backward functions, in
//! f64, themselves checked against finite differences in tests/reference_ops.rs) on seeded random
//! inputs at awkward sizes, plus fixed cases worked by hand, params layouts and determinism.

mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::Gpu;
use bfpo_lite::gpu::ops::attention::{AttnShape, attention};
use bfpo_lite::gpu::ops::attention_back::{
    ATTENTION_BACK_TOL, ATTENTION_BACK_WG_BYTES, AttnBackKernel, AttnBackParams, AttnDeltaParams,
    attention_back_tiles, attention_back_wg_bytes, attention_backward_ref, attention_backward_with,
};
use bfpo_lite::gpu::ops::logprob::{LmHeadScratch, lm_head_logprobs};
use bfpo_lite::gpu::ops::logprob_back::{
    LOGPROB_BACK_TOL, LogprobBackParams, ScatterParams, lm_head_backward, lm_head_backward_ref,
    scatter_rows,
};
use bfpo_lite::gpu::ops::matmul::GpuWeight;
use bfpo_lite::gpu::ops::rmsnorm::{RMSNORM_TOL, TEST_NORM_WORKGROUP, rmsnorm, rmsnorm_ref};
use bfpo_lite::gpu::ops::rmsnorm_back::{
    RMSNORM_BACK_TOL, RmsNormBackParams, rmsnorm_backward, rmsnorm_backward_ref,
};
use bfpo_lite::gpu::ops::rope::{ROPE_TOL, RopeConfig, rope_inplace};
use bfpo_lite::gpu::ops::rope_back::{rope_backward_inplace, rope_backward_ref};
use bfpo_lite::gpu::ops::swiglu_back::{
    SWIGLU_BACK_TOL, SwigluBackParams, swiglu_backward_inplace, swiglu_backward_ref,
};
use bfpo_lite::model::RopeKind;
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::sync::atomic::Ordering;

#[test]
fn params_layouts() {
    use std::mem::{align_of, size_of};
    assert_eq!(size_of::<RmsNormBackParams>(), 16);
    assert_eq!(size_of::<SwigluBackParams>(), 16);
    assert_eq!(size_of::<AttnDeltaParams>(), 16);
    assert_eq!(size_of::<AttnBackParams>(), 32);
    assert_eq!(size_of::<LogprobBackParams>(), 16);
    assert_eq!(size_of::<ScatterParams>(), 16);
    assert_eq!(align_of::<AttnBackParams>(), 4);
}

/// Runs rmsnorm forward (for rstd) then backward; `init` pre-fills dx (accumulate when Some).
fn rms_back(
    gpu: &Gpu,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    init: Option<&[f32]>,
) -> Vec<f32> {
    rms_both(gpu, x, w, dy, eps, init).2
}

/// As [`rms_back`], returning the forward's y and rstd too.
fn rms_both(
    gpu: &Gpu,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    init: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dim = w.len();
    let rows = x.len() / dim;
    let xb = gpu.upload("x", x).unwrap();
    let wb = gpu.upload("w", w).unwrap();
    let yb = gpu.alloc("y", (x.len() * 4) as u64).unwrap();
    let rb = gpu.alloc("rstd", (rows * 4) as u64).unwrap();
    let dyb = gpu.upload("dy", dy).unwrap();
    let dxb = match init {
        Some(v) => gpu.upload("dx", v).unwrap(),
        None => gpu.upload("dx", &vec![9.0f32; x.len()]).unwrap(),
    };
    let mut rec = gpu.recorder();
    rmsnorm(gpu, &mut rec, &xb, &wb, &yb, &rb, rows, dim, eps).unwrap();
    rmsnorm_backward(
        gpu,
        &mut rec,
        &xb,
        &wb,
        &rb,
        &dyb,
        &dxb,
        rows,
        dim,
        init.is_some(),
    )
    .unwrap();
    rec.run("rmsnorm backward test").unwrap();
    (
        gpu.read(&yb).unwrap(),
        gpu.read(&rb).unwrap(),
        gpu.read(&dxb).unwrap(),
    )
}

#[test]
fn rmsnorm_every_workgroup_size_matches_reference() {
    // GPUs use 256 invocations per row, CPU adapters 8 (rmsnorm::norm_workgroup); both, and a
    // size between, must match the f64 reference forward and backward (overwriting dx or adding
    // into it), and repeat bit for bit.
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(102);
    for wg in [256u32, 32, 8] {
        TEST_NORM_WORKGROUP.store(wg, Ordering::SeqCst);
        for (rows, dim) in [
            (1usize, 1usize),
            (3, 7),
            (5, 255),
            (2, 257),
            (17, 600),
            (4, 2048),
        ] {
            let x = rng.normal_vec(rows * dim, 1.5);
            let w: Vec<f32> = (0..dim).map(|_| rng.uniform(0.5, 1.5)).collect();
            let dy = rng.normal_vec(rows * dim, 1.0);
            let (y, rstd, dx) = rms_both(&gpu, &x, &w, &dy, 1e-5, None);
            let (want_y, want_r) = rmsnorm_ref(&x, &w, dim, 1e-5);
            let what = format!("workgroup {wg}, rmsnorm [{rows},{dim}]");
            assert_close(&format!("{what} y"), &y, &want_y, RMSNORM_TOL);
            assert_close(&format!("{what} rstd"), &rstd, &want_r, RMSNORM_TOL);
            let want_dx = rmsnorm_backward_ref(&x, &w, 1e-5, &dy);
            assert_close(&format!("{what} dx"), &dx, &want_dx, RMSNORM_BACK_TOL);
            let again = rms_both(&gpu, &x, &w, &dy, 1e-5, None);
            assert!(again == (y, rstd, dx), "{what}: not deterministic");
            // Accumulate mode adds onto what is there.
            let init = rng.normal_vec(rows * dim, 1.0);
            let got = rms_back(&gpu, &x, &w, &dy, 1e-5, Some(&init));
            let want_acc: Vec<f32> = want_dx.iter().zip(&init).map(|(a, b)| a + b).collect();
            assert_close(
                &format!("{what} dx accumulate"),
                &got,
                &want_acc,
                RMSNORM_BACK_TOL,
            );
        }
    }
    TEST_NORM_WORKGROUP.store(0, Ordering::SeqCst);
}

#[test]
fn rmsnorm_backward_fixed_case() {
    // x = (3, 4), w = (1, 2), eps = 0, dy = (1, 0): r = 1/√12.5, g = dy⊙w = (1, 0),
    // Σ g⊙x = 3, dx_j = r·g_j − (r³/2)·x_j·3 → (r − 4.5·r³, −6·r³).
    let gpu = common::gpu::gpu();
    let r = 1.0 / 12.5f64.sqrt();
    let got = rms_back(&gpu, &[3.0, 4.0], &[1.0, 2.0], &[1.0, 0.0], 0.0, None);
    let want = [r - 4.5 * r * r * r, -6.0 * r * r * r];
    assert_close("rmsnorm back fixed", &got, &want, RMSNORM_BACK_TOL);
}

fn swiglu_back_gpu(gpu: &Gpu, g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let gb = gpu.upload("gate", g).unwrap();
    let ub = gpu.upload("up", u).unwrap();
    let db = gpu.upload("dy", dy).unwrap();
    let mut rec = gpu.recorder();
    swiglu_backward_inplace(gpu, &mut rec, &db, &gb, &ub, g.len()).unwrap();
    rec.run("swiglu backward test").unwrap();
    (gpu.read(&gb).unwrap(), gpu.read(&ub).unwrap())
}

#[test]
fn swiglu_backward_matches_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(102);
    for n in [1usize, 255, 257, 4099] {
        let mut g = rng.normal_vec(n, 3.0);
        if n > 4 {
            // Saturated tails: σ → 0 and σ → 1.
            g[0] = -100.0;
            g[1] = 100.0;
            g[2] = -30.0;
            g[3] = 30.0;
        }
        let u = rng.normal_vec(n, 1.0);
        let dy = rng.normal_vec(n, 1.0);
        let (dg, du) = swiglu_back_gpu(&gpu, &g, &u, &dy);
        let (wg, wu) = swiglu_backward_ref(&g, &u, &dy);
        assert_close(&format!("swiglu dg n={n}"), &dg, &wg, SWIGLU_BACK_TOL);
        assert_close(&format!("swiglu du n={n}"), &du, &wu, SWIGLU_BACK_TOL);
    }
}

#[test]
fn swiglu_backward_fixed_case() {
    // g = 0: σ = 1/2, silu'(0) = 1/2, silu(0) = 0 → dg = dy·u/2, du = 0.
    // g = ln 3: σ = 3/4, silu = 0.75·ln 3, silu' = 0.75·(1 + ln3/4).
    let gpu = common::gpu::gpu();
    let l3 = 3f64.ln();
    let (dg, du) = swiglu_back_gpu(&gpu, &[0.0, l3 as f32], &[2.0, 1.0], &[3.0, 2.0]);
    assert_close(
        "fixed dg",
        &dg,
        &[3.0, 2.0 * 0.75 * (1.0 + l3 / 4.0)],
        SWIGLU_BACK_TOL,
    );
    assert_close("fixed du", &du, &[0.0, 2.0 * 0.75 * l3], SWIGLU_BACK_TOL);
}

#[test]
fn rope_backward_matches_reference_and_inverts_forward() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(103);
    // (kind, head_dim, n_rot, heads, rows, freqs, pos_scale)
    type Case = (RopeKind, usize, usize, usize, usize, Option<Vec<f32>>, f32);
    let cases: [Case; 4] = [
        (RopeKind::Norm, 8, 8, 3, 13, None, 1.0),
        (RopeKind::Neox, 16, 16, 2, 37, None, 1.0),
        (
            RopeKind::Norm,
            12,
            8,
            1,
            7,
            Some(vec![1.0, 2.0, 4.0, 8.0]),
            0.5,
        ),
        (RopeKind::Neox, 64, 32, 5, 33, None, 1.0),
    ];
    for (kind, head_dim, n_rot, heads, rows, freqs, pos_scale) in cases {
        let cfg = RopeConfig {
            kind,
            base: 10000.0,
            n_rot,
            head_dim,
            pos_scale,
            freqs,
        };
        let table = cfg.upload_table(&gpu).unwrap();
        let pos: Vec<u32> = (0..rows as u32).collect();
        let posb = gpu.upload("pos", &pos).unwrap();
        let dy = rng.normal_vec(rows * heads * head_dim, 1.0);
        let b = gpu.upload("dy", &dy).unwrap();
        let mut rec = gpu.recorder();
        rope_backward_inplace(&gpu, &mut rec, &cfg, &table, &posb, &b, rows, heads).unwrap();
        rec.run("rope backward").unwrap();
        let got: Vec<f32> = gpu.read(&b).unwrap();
        let want = rope_backward_ref(&dy, heads, &cfg);
        let what = format!("rope back {kind:?} hd {head_dim} rot {n_rot}");
        assert_close(&what, &got, &want, ROPE_TOL);
        // R(θ)ᵀ·R(θ) = I: forward then backward returns the input.
        let mut rec = gpu.recorder();
        rope_inplace(&gpu, &mut rec, &cfg, &table, &posb, &b, rows, heads, false).unwrap();
        rec.run("rope forward").unwrap();
        let back: Vec<f32> = gpu.read(&b).unwrap();
        assert_close(&format!("{what} round trip"), &back, &dy, ROPE_TOL);
    }
}

struct AttnCase {
    shape: AttnShape,
    lens: Vec<u32>,
    split: usize,
}

/// Both forms of the dq and dk/dv passes, whatever the adapter would pick.
const ATTN_BACK_KERNELS: [AttnBackKernel; 2] = [AttnBackKernel::Rows, AttnBackKernel::Tiled];

/// Random q, k, v and dO for shape `s` (drawn in that order), O(1) entries.
fn attn_inputs(rng: &mut Rng, s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = s.n_rows();
    let (qn, kn) = (t * s.n_head * s.head_dim, t * s.n_head_kv * s.head_dim);
    let q = rng.normal_vec(qn, 1.0);
    let k = rng.normal_vec(kn, 1.0);
    let v = rng.normal_vec(kn, 1.0);
    (q, k, v, rng.normal_vec(qn, 1.0))
}

/// dq, dk, dv of the GPU against the f64 reference at `ATTENTION_BACK_TOL`.
fn assert_grads_close(what: &str, got: (&[f32], &[f32], &[f32]), want: (&[f32], &[f32], &[f32])) {
    assert_close(&format!("{what} dq"), got.0, want.0, ATTENTION_BACK_TOL);
    assert_close(&format!("{what} dk"), got.1, want.1, ATTENTION_BACK_TOL);
    assert_close(&format!("{what} dv"), got.2, want.2, ATTENTION_BACK_TOL);
}

fn attention_back_gpu(
    gpu: &Gpu,
    c: &AttnCase,
    kernel: AttnBackKernel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = &c.shape;
    let t = s.n_rows();
    let (qw, kw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
    let qb = gpu.upload("q", q).unwrap();
    let kb = gpu.upload("k", k).unwrap();
    let vb = gpu.upload("v", v).unwrap();
    let lb = gpu.upload("lens", &c.lens).unwrap();
    let ob = gpu.alloc("o", (t * qw * 4) as u64).unwrap();
    let lse = gpu.alloc("lse", (t * s.n_head * 4) as u64).unwrap();
    let db = gpu.upload("dout", dout).unwrap();
    let lsed = gpu.alloc("lsed", (t * s.n_head * 8) as u64).unwrap();
    // Garbage in the outputs: padding rows must be written as zeros.
    let dq = gpu.upload("dq", &vec![7.0f32; t * qw]).unwrap();
    let dk = gpu.upload("dk", &vec![7.0f32; t * kw]).unwrap();
    let dv = gpu.upload("dv", &vec![7.0f32; t * kw]).unwrap();
    let mut rec = gpu.recorder();
    attention(gpu, &mut rec, s, &qb, &kb, &vb, &lb, &ob, &lse).unwrap();
    attention_backward_with(
        gpu, &mut rec, s, &qb, &kb, &vb, &ob, &lse, &db, &lb, &lsed, &dq, &dk, &dv, kernel, c.split,
    )
    .unwrap();
    rec.run("attention backward test").unwrap();
    (
        gpu.read(&dq).unwrap(),
        gpu.read(&dk).unwrap(),
        gpu.read(&dv).unwrap(),
    )
}

/// gemma3's local layers: sliding window and another score scale, both backward kernels,
/// against the f64 reference (which is checked against finite differences).
#[test]
fn attention_backward_with_a_sliding_window_matches_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(105);
    let cases = [
        AttnCase {
            shape: AttnShape::new(2, 37, 4, 1, 64).with_scale_window(0.0625, Some(5)),
            lens: vec![37, 20],
            split: usize::MAX,
        },
        AttnCase {
            shape: AttnShape::new(3, 19, 6, 2, 12).with_scale_window(0.3, Some(3)),
            lens: vec![19, 7, 1],
            split: 4,
        },
        AttnCase {
            shape: AttnShape::new(1, 21, 2, 2, 16).with_scale_window(0.25, Some(1)),
            lens: vec![21],
            split: 3,
        },
    ];
    for c in &cases {
        let s = &c.shape;
        let (q, k, v, dout) = attn_inputs(&mut rng, s);
        let (wq, wk, wv) = attention_backward_ref(s, &q, &k, &v, &dout, &c.lens);
        for kernel in ATTN_BACK_KERNELS {
            let (dq, dk, dv) = attention_back_gpu(&gpu, c, kernel, &q, &k, &v, &dout);
            let what = format!(
                "{kernel:?} attention back B {} L {} heads {}/{} hd {} window {}",
                s.n_seq, s.seq_len, s.n_head, s.n_head_kv, s.head_dim, s.window
            );
            assert_grads_close(&what, (&dq, &dk, &dv), (&wq, &wk, &wv));
        }
    }
}

#[test]
fn attention_backward_matches_reference_padded_gqa() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(104);
    let cases = [
        AttnCase {
            shape: AttnShape::new(3, 13, 4, 2, 16),
            lens: vec![13, 5, 1],
            split: usize::MAX,
        },
        AttnCase {
            shape: AttnShape::new(2, 9, 3, 3, 8),
            lens: vec![0, 9],
            split: 4,
        },
        AttnCase {
            shape: AttnShape::new(1, 37, 6, 1, 64),
            lens: vec![30],
            split: 7,
        },
        AttnCase {
            shape: AttnShape::new(4, 5, 2, 1, 4),
            lens: vec![2, 5, 3, 4],
            split: 1,
        },
    ];
    for c in &cases {
        let s = &c.shape;
        let (q, k, v, dout) = attn_inputs(&mut rng, s);
        let (wq, wk, wv) = attention_backward_ref(s, &q, &k, &v, &dout, &c.lens);
        for kernel in ATTN_BACK_KERNELS {
            let (dq, dk, dv) = attention_back_gpu(&gpu, c, kernel, &q, &k, &v, &dout);
            let what = format!(
                "{kernel:?} attention back B {} L {} heads {}/{} hd {}",
                s.n_seq, s.seq_len, s.n_head, s.n_head_kv, s.head_dim
            );
            assert_grads_close(&what, (&dq, &dk, &dv), (&wq, &wk, &wv));
        }
    }
    // Deterministic: the same inputs give the same bits (different split, same sums).
    let c = &cases[0];
    let s = &c.shape;
    let (q, k, v, dout) = attn_inputs(&mut rng, s);
    for kernel in ATTN_BACK_KERNELS {
        let a = attention_back_gpu(&gpu, c, kernel, &q, &k, &v, &dout);
        let b = attention_back_gpu(
            &gpu,
            &AttnCase {
                shape: *s,
                lens: c.lens.clone(),
                split: 3,
            },
            kernel,
            &q,
            &k,
            &v,
            &dout,
        );
        assert!(
            a == b,
            "{kernel:?}: attention backward is not bit-reproducible"
        );
    }
}

/// Both kernels (the tiled one above all) at the shapes the tiles make awkward: lengths that are not multiples of
/// the tiles (odd, below, between), padding (lens < L, an empty sequence), GQA groups of 1 and
/// 3, head_dim 64 (SmolLM2's 9 / 3 heads), small (4, 12: odd vec4 counts) and large (128, 160:
/// smaller tiles, 40 vec4 columns: more than the workgroup's invocations), several sequences, and several dispatch splits.
#[test]
fn attention_backward_tiled_shapes_match_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(107);
    let cases = [
        AttnCase {
            shape: AttnShape::new(3, 37, 9, 3, 64),
            lens: vec![37, 20, 1],
            split: usize::MAX,
        },
        AttnCase {
            shape: AttnShape::new(2, 33, 4, 4, 64),
            lens: vec![17, 33],
            split: 16,
        },
        AttnCase {
            shape: AttnShape::new(2, 19, 6, 2, 12),
            lens: vec![19, 7],
            split: 1,
        },
        AttnCase {
            shape: AttnShape::new(5, 8, 2, 1, 4),
            lens: vec![8, 0, 3, 8, 1],
            split: usize::MAX,
        },
        AttnCase {
            shape: AttnShape::new(1, 21, 2, 1, 128),
            lens: vec![21],
            split: 8,
        },
        AttnCase {
            shape: AttnShape::new(2, 11, 2, 1, 160),
            lens: vec![11, 6],
            split: usize::MAX,
        },
    ];
    for c in &cases {
        let s = &c.shape;
        let (q, k, v, dout) = attn_inputs(&mut rng, s);
        let (wq, wk, wv) = attention_backward_ref(s, &q, &k, &v, &dout, &c.lens);
        for kernel in ATTN_BACK_KERNELS {
            // The per-row kernel's large-head_dim pipelines are slow for lavapipe to compile
            // (its rows live in registers); it is unchanged and covered up to head_dim 64.
            if kernel == AttnBackKernel::Rows && s.head_dim > 64 {
                continue;
            }
            let (dq, dk, dv) = attention_back_gpu(&gpu, c, kernel, &q, &k, &v, &dout);
            let what = format!(
                "{kernel:?} attention back B {} L {} lens {:?} heads {}/{} hd {} split {}",
                s.n_seq, s.seq_len, c.lens, s.n_head, s.n_head_kv, s.head_dim, c.split
            );
            assert_grads_close(&what, (&dq, &dk, &dv), (&wq, &wk, &wv));
        }
    }
    // The SmolLM2-shaped case gives the same bits however the blocks are split into dispatches.
    let c = &cases[0];
    let s = &c.shape;
    let (q, k, v, dout) = attn_inputs(&mut rng, s);
    for kernel in ATTN_BACK_KERNELS {
        let a = attention_back_gpu(&gpu, c, kernel, &q, &k, &v, &dout);
        for split in [1, 16, 40] {
            let b = attention_back_gpu(
                &gpu,
                &AttnCase {
                    shape: *s,
                    lens: c.lens.clone(),
                    split,
                },
                kernel,
                &q,
                &k,
                &v,
                &dout,
            );
            assert!(a == b, "{kernel:?} split {split}: not bit-reproducible");
        }
    }
}

/// The tiled kernel at the largest head_dim (2 × 1 tiles, most invocations idle in the pair
/// step; the per-row kernel is left out: its 512-float rows make lavapipe's shader compiler slow).
#[test]
fn attention_backward_tiled_head_dim_512() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(110);
    let c = AttnCase {
        shape: AttnShape::new(2, 5, 2, 1, 512),
        lens: vec![5, 3],
        split: usize::MAX,
    };
    let s = &c.shape;
    let (q, k, v, dout) = attn_inputs(&mut rng, s);
    let (wq, wk, wv) = attention_backward_ref(s, &q, &k, &v, &dout, &c.lens);
    let (dq, dk, dv) = attention_back_gpu(&gpu, &c, AttnBackKernel::Tiled, &q, &k, &v, &dout);
    assert_grads_close("tiled hd 512", (&dq, &dk, &dv), (&wq, &wk, &wv));
}

#[test]
fn attention_backward_tiles_fit_workgroup_memory() {
    // Every supported head_dim gets tiles within WebGPU's default 16 KiB of workgroup memory.
    assert_eq!(ATTENTION_BACK_WG_BYTES, 16384);
    for hd in (4..=512).step_by(4) {
        let (na, nb) = attention_back_tiles(hd);
        assert!(na >= 1 && nb >= 1, "head_dim {hd}: tiles {na} × {nb}");
        let bytes = attention_back_wg_bytes(hd, na, nb);
        assert!(
            bytes <= ATTENTION_BACK_WG_BYTES,
            "head_dim {hd}: tiles {na} × {nb} need {bytes} bytes"
        );
    }
    // The shapes the tiles were sized for: SmolLM2 / Qwen / Llama (64), and the largest.
    assert_eq!(attention_back_tiles(64), (8, 16));
    assert_eq!(
        attention_back_wg_bytes(64, 8, 16),
        2 * 24 * 17 * 16 + 8 * 16 + 8 * 128
    );
    assert_eq!(attention_back_tiles(512), (2, 1));
}

#[test]
fn attention_backward_fixed_case() {
    // One sequence of 2 rows, one head, head_dim 4 (scale 1/2), zero queries: the weights are
    // uniform (row 0: P = (1), row 1: P = (1/2, 1/2)) and dq = 0 when dO ⟂ v differences.
    // dv_0 = dO_0 + dO_1/2, dv_1 = dO_1/2. dS[1, j] = P·(dO_1·v_j − D_1) with v_0 = v_1 → 0,
    // dS[0, 0] = 1·(dO_0·v_0 − dO_0·v_0) = 0, so dq = dk = 0.
    let gpu = common::gpu::gpu();
    let c = AttnCase {
        shape: AttnShape::new(1, 2, 1, 1, 4),
        lens: vec![2],
        split: usize::MAX,
    };
    let q = [0.0f32; 8];
    let k = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0];
    let v = [1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
    let dout = [1.0f32, 0.0, 0.0, 2.0, 4.0, 2.0, 0.0, 0.0];
    let tol = Tol::new(1e-6, 1e-6);
    for kernel in ATTN_BACK_KERNELS {
        let (dq, dk, dv) = attention_back_gpu(&gpu, &c, kernel, &q, &k, &v, &dout);
        assert_close(&format!("{kernel:?} fixed dq"), &dq, &[0.0f32; 8], tol);
        assert_close(&format!("{kernel:?} fixed dk"), &dk, &[0.0f32; 8], tol);
        assert_close(
            &format!("{kernel:?} fixed dv"),
            &dv,
            &[3.0f32, 1.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.0],
            tol,
        );
    }
}

/// LM-head backward on an f32 head `[V, d]`, with the weight in `max_rows`-row chunks and a
/// scratch of `budget` bytes (several vocabulary chunks).
#[allow(clippy::too_many_arguments)]
fn lm_head_back_gpu(
    gpu: &Gpu,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    targets: &[u32],
    roww: &[f32],
    d: usize,
    max_rows: usize,
    budget: u64,
) -> Vec<f32> {
    let v = w.len() / d;
    let n = targets.len();
    let wt = GpuWeight::upload_chunked(
        gpu,
        "head",
        GgmlType::F32,
        d,
        v,
        bytemuck::cast_slice(w),
        max_rows,
    )
    .unwrap();
    let xb = gpu.upload("x", x).unwrap();
    let bb = bias.map(|b| gpu.upload("bias", b).unwrap());
    let tb = gpu.upload("targets", targets).unwrap();
    let rb = gpu.upload("roww", roww).unwrap();
    let scratch = LmHeadScratch::new(gpu, n, v, budget).unwrap();
    let logp = gpu.alloc("logp", (n * 4) as u64).unwrap();
    let lse = gpu.alloc("lse", (n * 4) as u64).unwrap();
    let dx = gpu.upload("dx", &vec![7.0f32; n * d]).unwrap();
    let mut rec = gpu.recorder();
    lm_head_logprobs(
        gpu,
        &mut rec,
        &xb,
        &wt,
        bb.as_ref(),
        &tb,
        &scratch,
        &logp,
        &lse,
        n,
    )
    .unwrap();
    lm_head_backward(
        gpu,
        &mut rec,
        &xb,
        &wt,
        bb.as_ref(),
        &tb,
        &lse,
        &rb,
        &scratch,
        &dx,
        n,
    )
    .unwrap();
    rec.run("lm head backward test").unwrap();
    gpu.read(&dx).unwrap()
}

#[test]
fn lm_head_backward_matches_reference() {
    let gpu = common::gpu::gpu();
    let mut rng = Rng::new(105);
    // (N, d, V, weight rows per chunk, scratch budget bytes, bias)
    for (n, d, v, max_rows, budget, with_bias) in [
        (5usize, 16usize, 37usize, usize::MAX, 1u64 << 20, false),
        (7, 24, 301, 100, 7 * 4 * 64, true),
        (1, 8, 1000, 333, 4 * 97, false),
    ] {
        let x = rng.normal_vec(n * d, 1.0);
        let w = rng.normal_vec(v * d, 0.5);
        let bias = with_bias.then(|| rng.normal_vec(v, 0.5));
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let roww: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 0.7 } else { -1.3 })
            .collect();
        let got = lm_head_back_gpu(
            &gpu,
            &x,
            &w,
            bias.as_deref(),
            &targets,
            &roww,
            d,
            max_rows,
            budget,
        );
        let want = lm_head_backward_ref(&x, &w, bias.as_deref(), &targets, &roww, d);
        assert_close(
            &format!("lm head back N {n} d {d} V {v}"),
            &got,
            &want,
            LOGPROB_BACK_TOL,
        );
    }
}

#[test]
fn lm_head_backward_fixed_case() {
    // d = 8 (the matmul kernels need rows of multiples of 8), only coordinate 0 nonzero:
    // W rows (1, 0…), (−1, 0…), x = (ln 3 / 2, 0…): logits (ln3/2, −ln3/2), softmax (3/4, 1/4).
    // Target 0, weight 2: dlogits = 2·(1/4, −1/4); dx_0 = 2·(1/4 + 1/4) = 1, the rest 0.
    let gpu = common::gpu::gpu();
    let mut x = [0.0f32; 8];
    x[0] = 3f32.ln() / 2.0;
    let mut w = [0.0f32; 16];
    w[0] = 1.0;
    w[8] = -1.0;
    let got = lm_head_back_gpu(&gpu, &x, &w, None, &[0], &[2.0], 8, 1, 4);
    let mut want = [0.0f32; 8];
    want[0] = 1.0;
    assert_close("fixed lm head dx", &got, &want, Tol::new(1e-6, 1e-6));
}

#[test]
fn scatter_rows_routes_rows() {
    let gpu = common::gpu::gpu();
    let (n, d, t) = (3usize, 5usize, 7usize);
    let src: Vec<f32> = (0..n * d).map(|i| i as f32 + 1.0).collect();
    let rows = [6u32, 0, 3];
    let sb = gpu.upload("src", &src).unwrap();
    let rb = gpu.upload("rows", &rows).unwrap();
    let db = gpu.alloc("dst", (t * d * 4) as u64).unwrap();
    let mut rec = gpu.recorder();
    scatter_rows(&gpu, &mut rec, &sb, &rb, &db, n, d).unwrap();
    rec.run("scatter test").unwrap();
    let got: Vec<f32> = gpu.read(&db).unwrap();
    let mut want = vec![0.0f32; t * d];
    for (i, &r) in rows.iter().enumerate() {
        want[r as usize * d..(r as usize + 1) * d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
    assert_eq!(got, want);
}

// ---- The CPU references of this file against central finite differences in f64 -------------
// (reference::attention_back / log_softmax_target_back are FD-checked in tests/reference_ops.rs;
// these cover the padded-batch and LM-head wrappers built on them.)

/// f64 forward of the padded attention: J = Σ dout·O over valid rows, per sequence.
fn attention_objective(
    s: &AttnShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f32],
    lens: &[u32],
) -> f64 {
    let (qw, kw, l) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.seq_len);
    let mut j = 0.0;
    for (b, &len) in lens.iter().enumerate() {
        let n = len as usize;
        if n == 0 {
            continue;
        }
        let r0 = b * l;
        let o = bfpo_lite::model::reference::attention_fwd(
            &q[r0 * qw..(r0 + n) * qw],
            &k[r0 * kw..(r0 + n) * kw],
            &v[r0 * kw..(r0 + n) * kw],
            s.n_head,
            s.n_head_kv,
            s.head_dim,
        );
        j += o
            .iter()
            .zip(&dout[r0 * qw..(r0 + n) * qw])
            .map(|(a, &b)| a * b as f64)
            .sum::<f64>();
    }
    j
}

#[test]
fn cpu_references_match_finite_differences() {
    let mut rng = Rng::new(106);
    let h = 1e-6;
    let fd_tol = Tol::new(1e-6, 1e-5);
    // Padded GQA attention, including padding rows (gradient 0).
    let s = AttnShape::new(2, 5, 4, 2, 4);
    let lens = [5u32, 3];
    let t = s.n_rows();
    let q = rng.normal_vec(t * 16, 1.0);
    let k = rng.normal_vec(t * 8, 1.0);
    let v = rng.normal_vec(t * 8, 1.0);
    let dout = rng.normal_vec(t * 16, 1.0);
    let (dq, dk, dv) = attention_backward_ref(&s, &q, &k, &v, &dout, &lens);
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
    for which in 0..3 {
        let (base, grad) = match which {
            0 => (&q64, &dq),
            1 => (&k64, &dk),
            _ => (&v64, &dv),
        };
        let mut fd = Vec::new();
        for i in 0..base.len() {
            let mut p = [q64.clone(), k64.clone(), v64.clone()];
            p[which][i] += h;
            let jp = attention_objective(&s, &p[0], &p[1], &p[2], &dout, &lens);
            p[which][i] -= 2.0 * h;
            let jm = attention_objective(&s, &p[0], &p[1], &p[2], &dout, &lens);
            fd.push((jp - jm) / (2.0 * h));
        }
        assert_close(&format!("attention ref vs FD ({which})"), grad, &fd, fd_tol);
    }
    // LM head with bias and mixed-sign row weights: J = Σ_n w_n·log_softmax(x_n·Wᵀ + b)[t_n].
    let (n, d, vocab) = (3usize, 8usize, 11usize);
    let x = rng.normal_vec(n * d, 1.0);
    let w = rng.normal_vec(vocab * d, 0.5);
    let bias = rng.normal_vec(vocab, 0.5);
    let targets = [3u32, 0, 10];
    let roww = [0.7f32, -1.3, 0.4];
    let got = lm_head_backward_ref(&x, &w, Some(&bias), &targets, &roww, d);
    let objective = |x: &[f64]| -> f64 {
        (0..n)
            .map(|r| {
                let z: Vec<f64> = (0..vocab)
                    .map(|o| {
                        (0..d)
                            .map(|i| x[r * d + i] * w[o * d + i] as f64)
                            .sum::<f64>()
                            + bias[o] as f64
                    })
                    .collect();
                roww[r] as f64
                    * bfpo_lite::model::reference::log_softmax_target_fwd(&z, targets[r] as usize)
            })
            .sum()
    };
    let x64 = wide(&x);
    let fd: Vec<f64> = (0..x64.len())
        .map(|i| {
            let mut p = x64.clone();
            p[i] += h;
            let jp = objective(&p);
            p[i] -= 2.0 * h;
            (jp - objective(&p)) / (2.0 * h)
        })
        .collect();
    assert_close("lm head ref vs FD", &got, &fd, fd_tol);
}
