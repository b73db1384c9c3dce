//! Every op of the native CPU engine (`bfpo_lite::cpu::{gemm, ops}`) against the f64 reference
//! ops (`model::reference`), forward and backward, at awkward sizes: row counts around the
//! 64-row block (1, 63, 65, 130), output widths that are not a multiple of the 64-column panel,
//! reductions that are not a multiple of the 256-row chunk, every GGUF weight type, partial
//! RoPE, GQA attention over packed sequences of lengths 1, 37 and 150 (one row, one partial
//! query block, several blocks). Also the determinism rules the
//! engine relies on, per op: the same bits with 1 and 2 threads, and a row's result independent of
//! the other rows in its batch.

use bfpo_lite::cpu::Mat;
use bfpo_lite::cpu::gemm::{QMat, dense_nn, dense_nt, dense_tn_acc, matmul_back, matmul_fwd};
use bfpo_lite::cpu::ops::{
    AttnShape, RopeTable, Seqs, attention, attention_back, attention_skipping, rmsnorm,
    rmsnorm_back, swiglu, swiglu_back,
};
use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::{dequantize_vec, quantize};
use bfpo_lite::model::RopeKind;
use bfpo_lite::model::reference as r;
use bfpo_lite::util::{Rng, Tol, assert_close};

/// f32 products of ≤ 768 terms against f64 on the same (dequantized) weights.
const GEMM_TOL: Tol = Tol::new(2e-4, 2e-4);
/// Row-wise f32 ops (norms, activations, rotations, attention) against f64.
const OP_TOL: Tol = Tol::new(1e-5, 1e-4);

fn mat(rows: usize, cols: usize, rng: &mut Rng) -> Mat {
    let mut m = Mat::zeros(rows, cols);
    for v in &mut m.data[..rows * cols] {
        *v = rng.uniform(-1.0, 1.0);
    }
    m
}

fn f64s(m: &Mat) -> Vec<f64> {
    m.real().iter().map(|&v| v as f64).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// A random weight `[n_out, n_in]` quantized to `ty`, and its dequantized values (what the
/// reference multiplies by).
fn weight(ty: GgmlType, n_in: usize, n_out: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let w: Vec<f32> = (0..n_in * n_out).map(|_| rng.uniform(-0.5, 0.5)).collect();
    let q = quantize(ty, &w).unwrap();
    let deq = dequantize_vec(ty, &q, n_in * n_out).unwrap();
    (q, deq)
}

#[test]
fn matmul_fwd_and_back_match_reference_on_every_type() {
    let mut rng = Rng::new(11);
    for ty in GgmlType::ALL {
        // K-quants need rows of 256; the others get a reduction that is not a multiple of 256.
        let n_in = if ty.block_elems() == 256 { 512 } else { 352 };
        for (rows, n_out) in [(1, 67), (65, 300), (130, 1)] {
            let (q, deq) = weight(ty, n_in, n_out, &mut rng);
            let w = QMat {
                ty,
                n_in,
                n_out,
                data: &q,
            };
            let x = mat(rows, n_in, &mut rng);
            let y0 = mat(rows, n_out, &mut rng);
            let want = r::linear_fwd(&f64s(&x), n_in, &deq, n_out, None);
            let mut y = y0.clone();
            matmul_fwd(&w, &x, &mut y, false);
            let what = format!("matmul_fwd {ty:?} rows {rows} n_in {n_in} n_out {n_out}");
            assert_close(&what, y.real(), &want, GEMM_TOL);
            let mut y = y0.clone();
            matmul_fwd(&w, &x, &mut y, true);
            let acc: Vec<f64> = want
                .iter()
                .zip(y0.real())
                .map(|(a, &b)| a + b as f64)
                .collect();
            assert_close(&format!("{what} accumulate"), y.real(), &acc, GEMM_TOL);

            let dy = mat(rows, n_out, &mut rng);
            let dx0 = mat(rows, n_in, &mut rng);
            let want = r::linear_back(&f64s(&dy), n_in, &deq, n_out);
            let mut dx = dx0.clone();
            matmul_back(&w, &dy, &mut dx, false);
            let what = format!("matmul_back {ty:?} rows {rows} n_in {n_in} n_out {n_out}");
            assert_close(&what, dx.real(), &want, GEMM_TOL);
            let mut dx = dx0.clone();
            matmul_back(&w, &dy, &mut dx, true);
            let acc: Vec<f64> = want
                .iter()
                .zip(dx0.real())
                .map(|(a, &b)| a + b as f64)
                .collect();
            assert_close(&format!("{what} accumulate"), dx.real(), &acc, GEMM_TOL);
        }
    }
}

#[test]
fn matmul_bits_do_not_depend_on_threads_or_batch() {
    let mut rng = Rng::new(12);
    let (n_in, n_out) = (512, 300);
    let (q, _) = weight(GgmlType::Q4_K, n_in, n_out, &mut rng);
    let w = QMat {
        ty: GgmlType::Q4_K,
        n_in,
        n_out,
        data: &q,
    };
    let x = mat(130, n_in, &mut rng);
    let run = |threads: usize, x: &Mat| {
        pool(threads).install(|| {
            let mut y = Mat::zeros(x.rows, n_out);
            matmul_fwd(&w, x, &mut y, false);
            let mut dx = Mat::zeros(x.rows, n_in);
            matmul_back(&w, &y, &mut dx, false);
            (y, dx)
        })
    };
    let (y1, dx1) = run(1, &x);
    let (y2, dx2) = run(2, &x);
    assert_eq!(y1.data, y2.data, "matmul_fwd: 1 vs 2 threads");
    assert_eq!(dx1.data, dx2.data, "matmul_back: 1 vs 2 threads");
    // Row 70 alone (in its own block, at row 0) gives the same bits as inside the batch.
    let mut one = Mat::zeros(1, n_in);
    one.row_mut(0).copy_from_slice(x.row(70));
    let (y_one, _) = run(2, &one);
    assert_eq!(
        y_one.row(0),
        y1.row(70),
        "matmul_fwd: a row's bits depend on its batch"
    );
}

#[test]
fn dense_products_match_reference() {
    let mut rng = Rng::new(13);
    for (rows, k, n) in [(1, 16, 67), (65, 300, 8), (130, 8, 257)] {
        let x = mat(rows, k, &mut rng);
        let y0 = mat(rows, n, &mut rng);
        let b_nk: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let beta = 0.75f32;
        // y0 + beta·x·Bᵀ, B [n, k].
        let want: Vec<f64> = (0..rows * n)
            .map(|i| {
                let (t, o) = (i / n, i % n);
                let s: f64 = (0..k)
                    .map(|c| x.row(t)[c] as f64 * b_nk[o * k + c] as f64)
                    .sum();
                y0.real()[i] as f64 + beta as f64 * s
            })
            .collect();
        let mut y = y0.clone();
        dense_nt(&x, &b_nk, n, &mut y, true, beta);
        assert_close(
            &format!("dense_nt {rows}x{k}x{n}"),
            y.real(),
            &want,
            GEMM_TOL,
        );
        // The same product with B stored [k, n].
        let mut b_kn = vec![0f32; k * n];
        for o in 0..n {
            for c in 0..k {
                b_kn[c * n + o] = b_nk[o * k + c];
            }
        }
        let mut y = y0.clone();
        dense_nn(&x, &b_kn, n, &mut y, true, beta);
        assert_close(
            &format!("dense_nn {rows}x{k}x{n}"),
            y.real(),
            &want,
            GEMM_TOL,
        );
        // g [k, n] += beta · xᵀ·y0.
        let g0: Vec<f32> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let want: Vec<f64> = (0..k * n)
            .map(|i| {
                let (c, o) = (i / n, i % n);
                let s: f64 = (0..rows)
                    .map(|t| x.row(t)[c] as f64 * y0.row(t)[o] as f64)
                    .sum();
                g0[i] as f64 + beta as f64 * s
            })
            .collect();
        let mut g = g0.clone();
        dense_tn_acc(&x, &y0, &mut g, beta);
        assert_close(&format!("dense_tn_acc {rows}x{k}x{n}"), &g, &want, GEMM_TOL);
    }
}

#[test]
fn rmsnorm_forward_and_backward_match_reference() {
    let mut rng = Rng::new(14);
    let (rows, n, eps) = (67, 65, 1e-5f32);
    let x = mat(rows, n, &mut rng);
    let w: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5)).collect();
    let mut y = Mat::zeros(rows, n);
    rmsnorm(&x.data, n, &w, eps, &mut y.data);
    let want = r::rmsnorm_fwd(&f64s(&x), n, &w, eps as f64);
    assert_close("rmsnorm", y.real(), &want, OP_TOL);
    let dy = mat(rows, n, &mut rng);
    let want = r::rmsnorm_back(&f64s(&x), n, &w, eps as f64, &f64s(&dy));
    let mut dx = Mat::zeros(rows, n);
    rmsnorm_back(&x.data, n, &w, eps, &dy.data, &mut dx.data, false);
    assert_close("rmsnorm_back", dx.real(), &want, OP_TOL);
    let dx0 = mat(rows, n, &mut rng);
    let mut dx = dx0.clone();
    rmsnorm_back(&x.data, n, &w, eps, &dy.data, &mut dx.data, true);
    let acc: Vec<f64> = want
        .iter()
        .zip(dx0.real())
        .map(|(a, &b)| a + b as f64)
        .collect();
    assert_close("rmsnorm_back accumulate", dx.real(), &acc, OP_TOL);
}

#[test]
fn swiglu_forward_and_backward_match_reference() {
    let mut rng = Rng::new(15);
    let (rows, n) = (65, 37);
    let (g, u, ds) = (
        mat(rows, n, &mut rng),
        mat(rows, n, &mut rng),
        mat(rows, n, &mut rng),
    );
    let mut s = Mat::zeros(rows, n);
    swiglu(&g, &u, &mut s);
    assert_close(
        "swiglu",
        s.real(),
        &r::swiglu_fwd(&f64s(&g), &f64s(&u)),
        OP_TOL,
    );
    let (mut dg, mut du) = (Mat::zeros(rows, n), Mat::zeros(rows, n));
    swiglu_back(&g, &u, &ds, &mut dg, &mut du);
    let (wg, wu) = r::swiglu_back(&f64s(&g), &f64s(&u), &f64s(&ds));
    assert_close("swiglu_back dg", dg.real(), &wg, OP_TOL);
    assert_close("swiglu_back du", du.real(), &wu, OP_TOL);
}

#[test]
fn rope_forward_and_backward_match_reference() {
    let mut rng = Rng::new(16);
    let (t_len, n_head, hd) = (37, 3, 12);
    for (kind, n_rot) in [
        (RopeKind::Norm, 12),
        (RopeKind::Neox, 12),
        (RopeKind::Neox, 8),
    ] {
        let p = r::RopeParams {
            kind,
            n_rot,
            base: 10000.0,
            pos_scale: 0.5,
            freqs: None,
        };
        let table = RopeTable::new(&p, t_len);
        let pos: Vec<usize> = (0..t_len).collect();
        let x = mat(t_len, n_head * hd, &mut rng);
        let mut y = x.clone();
        table.apply(&mut y, n_head, hd, &pos, false);
        let what = format!("rope {kind:?} n_rot {n_rot}");
        assert_close(
            &what,
            y.real(),
            &r::rope_fwd(&f64s(&x), n_head, hd, &p),
            OP_TOL,
        );
        let mut dx = x.clone();
        table.apply(&mut dx, n_head, hd, &pos, true);
        let want = r::rope_back(&f64s(&x), n_head, hd, &p);
        assert_close(&format!("{what} backward"), dx.real(), &want, OP_TOL);
    }
}

#[test]
fn attention_forward_and_backward_match_reference_on_packed_sequences() {
    let mut rng = Rng::new(17);
    let sh = AttnShape::causal(4, 2, 8);
    let (qw, kw) = (sh.n_head * sh.hd, sh.n_head_kv * sh.hd);
    // 1: a single key; 37: one partial block; 150: two full blocks of 64 and a partial one.
    let lens = [1usize, 37, 150];
    let seqs = Seqs::from_lens(&lens);
    let rows = seqs.total();
    let (q, k, v) = (
        mat(rows, qw, &mut rng),
        mat(rows, kw, &mut rng),
        mat(rows, kw, &mut rng),
    );
    let dout = mat(rows, qw, &mut rng);
    let mut out = Mat::zeros(rows, qw);
    let mut lse = vec![0f32; rows * sh.n_head];
    attention(&q, &k, &v, &seqs, sh, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (
        Mat::zeros(rows, qw),
        Mat::zeros(rows, kw),
        Mat::zeros(rows, kw),
    );
    attention_back(
        &q, &k, &v, &out, &lse, &dout, &seqs, sh, &mut dq, &mut dk, &mut dv,
    );
    for (s, &len) in lens.iter().enumerate() {
        let (a, b) = (seqs.start[s], seqs.start[s] + len);
        let slice = |m: &Mat, w: usize| -> Vec<f64> {
            m.data[a * w..b * w].iter().map(|&x| x as f64).collect()
        };
        let (sq, sk, sv, sd) = (
            slice(&q, qw),
            slice(&k, kw),
            slice(&v, kw),
            slice(&dout, qw),
        );
        let want = r::attention_fwd(&sq, &sk, &sv, sh.n_head, sh.n_head_kv, sh.hd);
        assert_close(
            &format!("attention seq {s}"),
            &out.data[a * qw..b * qw],
            &want,
            OP_TOL,
        );
        let (wq, wk, wv) = r::attention_back(&sq, &sk, &sv, &sd, sh.n_head, sh.n_head_kv, sh.hd);
        assert_close(
            &format!("attention dq seq {s}"),
            &dq.data[a * qw..b * qw],
            &wq,
            OP_TOL,
        );
        assert_close(
            &format!("attention dk seq {s}"),
            &dk.data[a * kw..b * kw],
            &wk,
            OP_TOL,
        );
        assert_close(
            &format!("attention dv seq {s}"),
            &dv.data[a * kw..b * kw],
            &wv,
            OP_TOL,
        );
    }
}

/// Windowed attention of one sequence in f64, written out directly (query i sees keys
/// `max(0, i+1−w)..=i`): returns (out, dq, dk, dv) for an upstream gradient `dout`.
#[allow(clippy::type_complexity)]
fn windowed_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    sh: AttnShape,
    len: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (nh, hd, w) = (sh.n_head, sh.hd, sh.window.unwrap());
    let (qw, kw, group) = (nh * hd, sh.n_head_kv * hd, sh.n_head / sh.n_head_kv);
    let scale = sh.scale as f64;
    let (mut out, mut dq) = (vec![0.0; len * qw], vec![0.0; len * qw]);
    let (mut dk, mut dv) = (vec![0.0; len * kw], vec![0.0; len * kw]);
    let dotp = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for h in 0..nh {
        let g = h / group;
        let (qs, ks) = (
            |i: usize| &q[i * qw + h * hd..][..hd],
            |j: usize| &k[j * kw + g * hd..][..hd],
        );
        let vs = |j: usize| &v[j * kw + g * hd..][..hd];
        for i in 0..len {
            let lo = (i + 1).saturating_sub(w);
            let s: Vec<f64> = (lo..=i).map(|j| scale * dotp(qs(i), ks(j))).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / z).collect();
            let doi = &dout[i * qw + h * hd..][..hd];
            let dp: Vec<f64> = (lo..=i).map(|j| dotp(doi, vs(j))).collect();
            let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for (n, j) in (lo..=i).enumerate() {
                let ds = p[n] * (dp[n] - pdp) * scale;
                for d in 0..hd {
                    out[i * qw + h * hd + d] += p[n] * vs(j)[d];
                    dq[i * qw + h * hd + d] += ds * ks(j)[d];
                    dk[j * kw + g * hd + d] += ds * qs(i)[d];
                    dv[j * kw + g * hd + d] += p[n] * doi[d];
                }
            }
        }
    }
    (out, dq, dk, dv)
}

#[test]
fn windowed_attention_matches_a_direct_f64_computation() {
    let mut rng = Rng::new(18);
    // Windows smaller than, equal to and crossing the 64-row query block; a custom scale.
    for window in [1usize, 5, 64, 100] {
        let sh = AttnShape {
            scale: 0.3,
            window: Some(window),
            ..AttnShape::causal(2, 1, 8)
        };
        let (qw, kw) = (sh.n_head * sh.hd, sh.n_head_kv * sh.hd);
        let lens = [3usize, 150];
        let seqs = Seqs::from_lens(&lens);
        let rows = seqs.total();
        let (q, k, v) = (
            mat(rows, qw, &mut rng),
            mat(rows, kw, &mut rng),
            mat(rows, kw, &mut rng),
        );
        let dout = mat(rows, qw, &mut rng);
        let mut out = Mat::zeros(rows, qw);
        let mut lse = vec![0f32; rows * sh.n_head];
        attention(&q, &k, &v, &seqs, sh, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (
            Mat::zeros(rows, qw),
            Mat::zeros(rows, kw),
            Mat::zeros(rows, kw),
        );
        attention_back(
            &q, &k, &v, &out, &lse, &dout, &seqs, sh, &mut dq, &mut dk, &mut dv,
        );
        for (s, &len) in lens.iter().enumerate() {
            let (a, b) = (seqs.start[s], seqs.start[s] + len);
            let slice = |m: &Mat, w: usize| -> Vec<f64> {
                m.data[a * w..b * w].iter().map(|&x| x as f64).collect()
            };
            let (wo, wq, wk, wv) = windowed_f64(
                &slice(&q, qw),
                &slice(&k, kw),
                &slice(&v, kw),
                &slice(&dout, qw),
                sh,
                len,
            );
            let what = format!("window {window} seq {s}");
            assert_close(
                &format!("{what} out"),
                &out.data[a * qw..b * qw],
                &wo,
                OP_TOL,
            );
            assert_close(&format!("{what} dq"), &dq.data[a * qw..b * qw], &wq, OP_TOL);
            assert_close(&format!("{what} dk"), &dk.data[a * kw..b * kw], &wk, OP_TOL);
            assert_close(&format!("{what} dv"), &dv.data[a * kw..b * kw], &wv, OP_TOL);
        }
    }
}

/// `attention_skipping` (prompt sharing) gives every row it does not skip the bits `attention`
/// gives it, with and without a window, skipping nothing, part of a block, whole blocks and a
/// whole sequence; skipped whole blocks are left untouched.
#[test]
fn attention_skipping_keeps_the_bits_of_the_rows_it_computes() {
    let mut rng = Rng::new(19);
    for window in [None, Some(40)] {
        let sh = AttnShape {
            window,
            ..AttnShape::causal(4, 2, 8)
        };
        let (qw, kw) = (sh.n_head * sh.hd, sh.n_head_kv * sh.hd);
        let lens = [150usize, 150, 37, 70];
        let skip = [0usize, 130, 37, 64];
        let seqs = Seqs::from_lens(&lens);
        let rows = seqs.total();
        let (q, k, v) = (
            mat(rows, qw, &mut rng),
            mat(rows, kw, &mut rng),
            mat(rows, kw, &mut rng),
        );
        let (mut out, mut lse) = (Mat::zeros(rows, qw), vec![0f32; rows * sh.n_head]);
        attention(&q, &k, &v, &seqs, sh, &mut out, &mut lse);
        let sentinel = 7.0f32;
        let mut out_s = Mat::zeros(rows, qw);
        out_s.data.iter_mut().for_each(|x| *x = sentinel);
        let mut lse_s = vec![sentinel; rows * sh.n_head];
        attention_skipping(&q, &k, &v, &seqs, sh, &mut out_s, &mut lse_s, &skip);
        for (s, &len) in lens.iter().enumerate() {
            for t in 0..len {
                let r = seqs.start[s] + t;
                let lse_row = |l: &[f32]| l[r * sh.n_head..(r + 1) * sh.n_head].to_vec();
                if t >= skip[s] {
                    let same = out
                        .row(r)
                        .iter()
                        .zip(out_s.row(r))
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "window {window:?}: sequence {s} row {t} differs");
                    assert_eq!(lse_row(&lse), lse_row(&lse_s), "lse, sequence {s} row {t}");
                } else if (t / 64 + 1) * 64 <= skip[s] {
                    assert!(
                        out_s.row(r).iter().all(|&x| x == sentinel),
                        "sequence {s} row {t} written"
                    );
                }
            }
        }
    }
}
