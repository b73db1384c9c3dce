//! Per-op CPU references: each backward against central finite differences in f64 (awkward
//! sizes), and each forward against values worked out by hand.

use bfpo_lite::model::RopeKind;
use bfpo_lite::model::reference::*;
use bfpo_lite::util::Rng;
use bfpo_lite::util::close::{Tol, assert_close};

/// FD step and tolerance for f64 central differences of smooth ops.
const H: f64 = 1e-5;
const FD_TOL: Tol = Tol::new(1e-7, 1e-6);

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() as f64 * std).collect()
}

fn randn32(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    rng.normal_vec(n, std)
}

/// Central differences of `J(x) = Σ_i c_i·f(x)_i` with respect to every element of `x`.
fn fd_grad(x: &[f64], c: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let j = |x: &[f64]| -> f64 {
        let y = f(x);
        assert_eq!(y.len(), c.len());
        y.iter().zip(c).map(|(a, b)| a * b).sum()
    };
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + H;
            let jp = j(&xp);
            xp[i] = orig - H;
            let jm = j(&xp);
            xp[i] = orig;
            (jp - jm) / (2.0 * H)
        })
        .collect()
}

#[test]
fn linear_back_matches_fd() {
    let mut r = Rng::new(1);
    let (rows, n_in, n_out) = (3, 7, 5);
    let x = randn(&mut r, rows * n_in, 1.0);
    let w = randn32(&mut r, n_out * n_in, 0.5);
    let b = randn32(&mut r, n_out, 0.5);
    let dy = randn(&mut r, rows * n_out, 1.0);
    let got = linear_back(&dy, n_in, &w, n_out);
    let want = fd_grad(&x, &dy, |x| linear_fwd(x, n_in, &w, n_out, Some(&b)));
    assert_close("linear dx", &got, &want, FD_TOL);
}

#[test]
fn linear_fwd_fixed_case() {
    // [1 2; 3 4]·[1, -1] + [0.5, 0] = [-0.5, -1]
    let y = linear_fwd(&[1.0, -1.0], 2, &[1.0, 2.0, 3.0, 4.0], 2, Some(&[0.5, 0.0]));
    assert_eq!(y, vec![-0.5, -1.0]);
}

#[test]
fn lora_back_matches_fd_for_x_a_and_b() {
    let mut r = Rng::new(2);
    let (rows, n_in, n_out, rank, scale) = (3, 7, 5, 3, 1.7);
    let x = randn(&mut r, rows * n_in, 1.0);
    let a = randn(&mut r, rank * n_in, 0.5);
    let b = randn(&mut r, n_out * rank, 0.5);
    let dy = randn(&mut r, rows * n_out, 1.0);
    let (_, z) = lora_fwd(&x, n_in, &a, &b, rank, n_out, scale);
    let (dx, da, db) = lora_back(&x, &z, &dy, n_in, &a, &b, rank, n_out, scale);
    let fx = fd_grad(&x, &dy, |x| lora_fwd(x, n_in, &a, &b, rank, n_out, scale).0);
    let fa = fd_grad(&a, &dy, |a| lora_fwd(&x, n_in, a, &b, rank, n_out, scale).0);
    let fb = fd_grad(&b, &dy, |b| lora_fwd(&x, n_in, &a, b, rank, n_out, scale).0);
    assert_close("lora dx", &dx, &fx, FD_TOL);
    assert_close("lora dA", &da, &fa, FD_TOL);
    assert_close("lora dB", &db, &fb, FD_TOL);
}

#[test]
fn lora_fwd_fixed_case() {
    // rank 1: A = [1, 2], B = [3; -1], scale 0.5, x = [1, 1] → z = 3, y = 0.5·[9, -3]
    let (y, z) = lora_fwd(&[1.0, 1.0], 2, &[1.0, 2.0], &[3.0, -1.0], 1, 2, 0.5);
    assert_eq!(z, vec![3.0]);
    assert_eq!(y, vec![4.5, -1.5]);
}

#[test]
fn rmsnorm_back_matches_fd() {
    let mut r = Rng::new(3);
    let (rows, n) = (3, 7);
    let x = randn(&mut r, rows * n, 1.0);
    let w = randn32(&mut r, n, 1.0);
    let dy = randn(&mut r, rows * n, 1.0);
    let eps = 1e-5;
    let got = rmsnorm_back(&x, n, &w, eps, &dy);
    let want = fd_grad(&x, &dy, |x| rmsnorm_fwd(x, n, &w, eps));
    assert_close("rmsnorm dx", &got, &want, FD_TOL);
}

#[test]
fn rmsnorm_fwd_fixed_case() {
    // x = [3, 4]: mean(x²) = 12.5; eps 0 → y = x/√12.5 · w
    let y = rmsnorm_fwd(&[3.0, 4.0], 2, &[1.0, 2.0], 0.0);
    let s = 12.5f64.sqrt();
    assert_close("rmsnorm", &y, &[3.0 / s, 8.0 / s], Tol::new(1e-15, 0.0));
}

fn rope_params(kind: RopeKind, n_rot: usize, freqs: bool) -> RopeParams {
    RopeParams {
        kind,
        n_rot,
        base: 100.0,
        pos_scale: 0.75,
        freqs: freqs.then(|| (0..n_rot / 2).map(|i| 1.0 + i as f64).collect()),
    }
}

#[test]
fn rope_back_matches_fd_both_kinds_partial_rotation() {
    let mut r = Rng::new(4);
    let (t, n_head, hd) = (5, 3, 6);
    for (kind, n_rot, freqs) in [
        (RopeKind::Norm, 4, true),
        (RopeKind::Neox, 4, false),
        (RopeKind::Neox, 6, true),
        (RopeKind::Norm, 6, false),
    ] {
        let p = rope_params(kind, n_rot, freqs);
        let x = randn(&mut r, t * n_head * hd, 1.0);
        let dy = randn(&mut r, x.len(), 1.0);
        let got = rope_back(&dy, n_head, hd, &p);
        let want = fd_grad(&x, &dy, |x| rope_fwd(x, n_head, hd, &p));
        assert_close(&format!("rope {kind:?} n_rot {n_rot}"), &got, &want, FD_TOL);
    }
}

#[test]
fn rope_fwd_fixed_cases() {
    // One head, hd 4, n_rot 4, base 100: θ_0 = pos, θ_1 = pos/10 (pos_scale 1, no freqs).
    let p = |kind| RopeParams {
        kind,
        n_rot: 4,
        base: 100.0,
        pos_scale: 1.0,
        freqs: None,
    };
    // Row 0 (pos 0) is unchanged; row 1 (pos 1) is x = [1, 2, 3, 4].
    let x = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
    let rot = |a: f64, b: f64, th: f64| (a * th.cos() - b * th.sin(), a * th.sin() + b * th.cos());
    // NORM pairs (0,1) with θ_0 = 1 and (2,3) with θ_1 = 0.1.
    let (a0, b0) = rot(1.0, 2.0, 1.0);
    let (a1, b1) = rot(3.0, 4.0, 0.1);
    let y = rope_fwd(&x, 1, 4, &p(RopeKind::Norm));
    assert_close(
        "rope norm",
        &y,
        &[1.0, 2.0, 3.0, 4.0, a0, b0, a1, b1],
        Tol::new(1e-15, 0.0),
    );
    // NEOX pairs (0,2) with θ_0 = 1 and (1,3) with θ_1 = 0.1.
    let (a0, b0) = rot(1.0, 3.0, 1.0);
    let (a1, b1) = rot(2.0, 4.0, 0.1);
    let y = rope_fwd(&x, 1, 4, &p(RopeKind::Neox));
    assert_close(
        "rope neox",
        &y,
        &[1.0, 2.0, 3.0, 4.0, a0, a1, b0, b1],
        Tol::new(1e-15, 0.0),
    );
    // llama3 freqs divide θ; pos_scale multiplies pos: θ_0 = 1·0.5/2 = 0.25.
    let q = RopeParams {
        kind: RopeKind::Norm,
        n_rot: 2,
        base: 100.0,
        pos_scale: 0.5,
        freqs: Some(vec![2.0]),
    };
    assert!((q.theta(1, 0) - 0.25).abs() < 1e-15);
    assert!((q.theta(4, 0) - 1.0).abs() < 1e-15);
}

#[test]
fn attention_back_matches_fd_with_gqa() {
    let mut r = Rng::new(5);
    for (t, n_head, n_kv, hd) in [(5, 4, 2, 3), (4, 3, 3, 2), (6, 6, 1, 5)] {
        let q = randn(&mut r, t * n_head * hd, 1.0);
        let k = randn(&mut r, t * n_kv * hd, 1.0);
        let v = randn(&mut r, t * n_kv * hd, 1.0);
        let dout = randn(&mut r, q.len(), 1.0);
        let (dq, dk, dv) = attention_back(&q, &k, &v, &dout, n_head, n_kv, hd);
        let fq = fd_grad(&q, &dout, |q| attention_fwd(q, &k, &v, n_head, n_kv, hd));
        let fk = fd_grad(&k, &dout, |k| attention_fwd(&q, k, &v, n_head, n_kv, hd));
        let fv = fd_grad(&v, &dout, |v| attention_fwd(&q, &k, v, n_head, n_kv, hd));
        let what = format!("T {t} heads {n_head}/{n_kv} hd {hd}");
        assert_close(&format!("attention dq {what}"), &dq, &fq, FD_TOL);
        assert_close(&format!("attention dk {what}"), &dk, &fk, FD_TOL);
        assert_close(&format!("attention dv {what}"), &dv, &fv, FD_TOL);
    }
}

/// Sliding window and another q·k factor (gemma3's local layers): the backward against finite
/// differences, and window ≥ T equals plain causal attention.
#[test]
fn windowed_attention_back_matches_fd() {
    let mut r = Rng::new(15);
    for (t, n_head, n_kv, hd, w) in [(7, 4, 2, 3, 3), (6, 2, 1, 4, 1), (5, 2, 2, 2, 2)] {
        let opts = AttnOpts {
            scale: 0.37,
            window: Some(w),
        };
        let q = randn(&mut r, t * n_head * hd, 1.0);
        let k = randn(&mut r, t * n_kv * hd, 1.0);
        let v = randn(&mut r, t * n_kv * hd, 1.0);
        let dout = randn(&mut r, q.len(), 1.0);
        let (dq, dk, dv) = attention_back_opts(&q, &k, &v, &dout, n_head, n_kv, hd, opts);
        let f =
            |q: &[f64], k: &[f64], v: &[f64]| attention_fwd_opts(q, k, v, n_head, n_kv, hd, opts);
        let fq = fd_grad(&q, &dout, |q| f(q, &k, &v));
        let fk = fd_grad(&k, &dout, |k| f(&q, k, &v));
        let fv = fd_grad(&v, &dout, |v| f(&q, &k, v));
        let what = format!("T {t} heads {n_head}/{n_kv} hd {hd} window {w}");
        assert_close(&format!("attention dq {what}"), &dq, &fq, FD_TOL);
        assert_close(&format!("attention dk {what}"), &dk, &fk, FD_TOL);
        assert_close(&format!("attention dv {what}"), &dv, &fv, FD_TOL);
        // Window 1: every query sees only itself, so out = v of its KV head.
        if w == 1 {
            let out = f(&q, &k, &v);
            for i in 0..t {
                for h in 0..n_head {
                    let g = h / (n_head / n_kv);
                    let o = &out[(i * n_head + h) * hd..(i * n_head + h + 1) * hd];
                    let vi = &v[(i * n_kv + g) * hd..(i * n_kv + g + 1) * hd];
                    assert_close("window 1", o, vi, Tol::new(1e-12, 1e-12));
                }
            }
        }
    }
    let (t, hd) = (5, 3);
    let q = randn(&mut r, t * 2 * hd, 1.0);
    let k = randn(&mut r, t * 2 * hd, 1.0);
    let v = randn(&mut r, t * 2 * hd, 1.0);
    let wide = AttnOpts {
        window: Some(t),
        ..AttnOpts::causal(hd)
    };
    assert_eq!(
        attention_fwd_opts(&q, &k, &v, 2, 2, hd, wide),
        attention_fwd(&q, &k, &v, 2, 2, hd)
    );
}

#[test]
fn attention_fwd_fixed_cases() {
    // Position 0 attends only to itself: out = v_0. Position 1 with q = 0 averages v_0 and v_1.
    // 2 query heads sharing 1 KV head (hd 1): both heads see the same v.
    let q = [5.0, -3.0, 0.0, 0.0]; // [T=2, 2 heads × 1]
    let k = [1.0, 2.0]; // [T=2, 1]
    let v = [10.0, 20.0];
    let out = attention_fwd(&q, &k, &v, 2, 1, 1);
    assert_close(
        "attention",
        &out,
        &[10.0, 10.0, 15.0, 15.0],
        Tol::new(1e-12, 0.0),
    );
    // hd 4, q·k = 4 → scores 4/√4 = 2 and 0: weights e²/(1+e²) on v_1.
    let q = [0.0; 4]
        .iter()
        .chain(&[1.0; 4])
        .copied()
        .collect::<Vec<_>>();
    let k = [0.0; 4]
        .iter()
        .chain(&[1.0; 4])
        .copied()
        .collect::<Vec<_>>();
    let v = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let out = attention_fwd(&q, &k, &v, 1, 1, 4);
    let p1 = (2.0f64).exp() / (1.0 + (2.0f64).exp());
    assert_close(
        "attention scale",
        &out[4..],
        &[1.0 - p1, p1, 0.0, 0.0],
        Tol::new(1e-12, 0.0),
    );
}

#[test]
fn swiglu_back_matches_fd() {
    let mut r = Rng::new(6);
    let n = 13;
    let g = randn(&mut r, n, 2.0);
    let u = randn(&mut r, n, 1.0);
    let ds = randn(&mut r, n, 1.0);
    let (dg, du) = swiglu_back(&g, &u, &ds);
    let fg = fd_grad(&g, &ds, |g| swiglu_fwd(g, &u));
    let fu = fd_grad(&u, &ds, |u| swiglu_fwd(&g, u));
    assert_close("swiglu dg", &dg, &fg, FD_TOL);
    assert_close("swiglu du", &du, &fu, FD_TOL);
}

#[test]
fn swiglu_fwd_fixed_case() {
    // silu(0) = 0, silu(1) = 1/(1+e⁻¹), silu(−1) = −1/(1+e)
    let s = swiglu_fwd(&[0.0, 1.0, -1.0], &[7.0, 2.0, 3.0]);
    let e = std::f64::consts::E;
    assert_close(
        "swiglu",
        &s,
        &[0.0, 2.0 / (1.0 + 1.0 / e), -3.0 / (1.0 + e)],
        Tol::new(1e-15, 1e-15),
    );
}

#[test]
fn geglu_back_matches_fd() {
    let mut r = Rng::new(16);
    let n = 13;
    let g = randn(&mut r, n, 2.0);
    let u = randn(&mut r, n, 1.0);
    let ds = randn(&mut r, n, 1.0);
    let (dg, du) = geglu_back(&g, &u, &ds);
    let fg = fd_grad(&g, &ds, |g| geglu_fwd(g, &u));
    let fu = fd_grad(&u, &ds, |u| geglu_fwd(&g, u));
    assert_close("geglu dg", &dg, &fg, FD_TOL);
    assert_close("geglu du", &du, &fu, FD_TOL);
}

#[test]
fn gelu_tanh_fixed_cases() {
    // gelu_tanh(0) = 0; odd part: gelu(z) − gelu(−z) = z; far tails: z and 0.
    assert_eq!(gelu_tanh(0.0), 0.0);
    for z in [0.3, 1.0, 2.5] {
        assert!((gelu_tanh(z) - gelu_tanh(-z) - z).abs() < 1e-15, "{z}");
    }
    assert!((gelu_tanh(10.0) - 10.0).abs() < 1e-12);
    assert!(gelu_tanh(-10.0).abs() < 1e-12);
    // 0.5·(1 + tanh(√(2/π)·1.044715)) = 0.841191990… (tanh approximation at 1).
    assert!((gelu_tanh(1.0) - 0.841_191_990_608_276_8).abs() < 1e-12);
}

#[test]
fn log_softmax_target_back_matches_fd() {
    let mut r = Rng::new(7);
    let n = 11;
    let logits = randn(&mut r, n, 3.0);
    for (target, weight) in [(0, 1.0), (4, -2.5), (10, 0.3)] {
        let got = log_softmax_target_back(&logits, target, weight);
        let want = fd_grad(&logits, &[weight], |l| {
            vec![log_softmax_target_fwd(l, target)]
        });
        assert_close("log-softmax dlogits", &got, &want, FD_TOL);
    }
}

#[test]
fn log_softmax_target_fixed_cases() {
    // Two equal logits: −ln 2. Large logits do not overflow (running max).
    assert!((log_softmax_target_fwd(&[0.0, 0.0], 1) + 2f64.ln()).abs() < 1e-15);
    let lp = log_softmax_target_fwd(&[1000.0, 1000.0, 1000.0 - 3f64.ln()], 2);
    // exp terms 1, 1, 1/3 → logp = ln((1/3)/(7/3)) = −ln 7
    assert!((lp + 7f64.ln()).abs() < 1e-12, "{lp}");
    // Gradient: weight·(onehot − softmax) sums to zero.
    let g = log_softmax_target_back(&[1.0, 2.0, 3.0], 0, 2.0);
    assert!(g.iter().sum::<f64>().abs() < 1e-15);
    let sm0 = 1.0f64.exp() / (1.0f64.exp() + 2.0f64.exp() + 3.0f64.exp());
    assert!((g[0] - 2.0 * (1.0 - sm0)).abs() < 1e-15);
}
