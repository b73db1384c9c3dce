//! Preference losses: hand-computed values for the four BFPO safety cases, IPO = BFPO with both
//! responses safe, DPO values and stability, batch means, parsing, and analytic gradients
//! against central finite differences in f64.

use bfpo_lite::loss::{Loss, LossError, LossKind, PairInput, PairLogps};
use bfpo_lite::util::{Rng, Tol, assert_close};

/// Exact up to f64 rounding of values ~1e4.
const EXACT: Tol = Tol::new(1e-9, 1e-12);
/// Central differences of smooth f64 functions with h = 1e-4.
const FD: Tol = Tol::new(1e-6, 1e-6);

/// πc = −10, πr = −12, rc = −11, rr = −11.5 ⇒ Δ = (−10 + 11) − (−12 + 11.5) = 1 − (−0.5) = 1.5.
fn fixed() -> PairLogps {
    PairLogps::new(-10.0, -12.0, -11.0, -11.5)
}

#[test]
fn bfpo_four_safety_cases_by_hand() {
    let loss = Loss::bfpo();
    // g = 1.5·s_w − 0.5·s_l − 0.5; target g/τ with τ = 0.01; loss (Δ − target)²; dL/dΔ = 2(Δ − target).
    // (s_w, s_l, target, loss, dL/dΔ), Δ = 1.5:
    let cases = [
        (true, true, 50.0, 48.5f64 * 48.5, -97.0), // (1.5 − 50)² = 2352.25
        (true, false, 100.0, 98.5 * 98.5, -197.0), // (1.5 − 100)² = 9702.25
        (false, true, -100.0, 101.5 * 101.5, 203.0), // (1.5 + 100)² = 10302.25
        (false, false, -50.0, 51.5 * 51.5, 103.0), // (1.5 + 50)² = 2652.25
    ];
    for (sw, sl, target, want_loss, want_d) in cases {
        let p = loss.pair(fixed(), sw, sl);
        let what = format!("bfpo s_w={sw} s_l={sl}");
        assert_close(&what, &[p.delta], &[1.5], EXACT);
        assert_close(&what, &[p.target.unwrap()], &[target], EXACT);
        assert_close(&what, &[p.loss], &[want_loss], EXACT);
        assert_close(&what, &[p.d_policy_chosen], &[want_d], EXACT);
        assert_close(&what, &[p.d_policy_rejected], &[-want_d], EXACT);
        // rewards/chosen = τ·(−10 + 11) = 0.01; rewards/rejected = τ·(−12 + 11.5) = −0.005.
        assert_close(
            &what,
            &[p.reward_chosen, p.reward_rejected],
            &[0.01, -0.005],
            EXACT,
        );
    }
    // The free function agrees with the enum.
    let f = bfpo_lite::loss::bfpo(fixed(), false, true, 0.01, 3.0, 0.5);
    assert_close("free fn", &[f.loss], &[101.5 * 101.5], EXACT);
    // Labels g from the paper's table: +0.5, +1.0, −1.0, −0.5.
    assert_eq!(loss.bfpo_label(true, true), Some(0.5));
    assert_eq!(loss.bfpo_label(true, false), Some(1.0));
    assert_eq!(loss.bfpo_label(false, true), Some(-1.0));
    assert_eq!(loss.bfpo_label(false, false), Some(-0.5));
}

#[test]
fn bfpo_other_hyperparameters_by_hand() {
    // b1 = 5 ⇒ b3 = 1/4, b1·b3 = 5/4; α = 0.25; τ = 0.1.
    // s_w = 1, s_l = 0: g = 1.25 − 0.25 = 1.0 ⇒ target 10; Δ = 1.5 ⇒ loss 8.5² = 72.25.
    let loss = Loss::Bfpo {
        tau: 0.1,
        b1: 5.0,
        alpha: 0.25,
    };
    let p = loss.pair(fixed(), true, false);
    assert_close("b1=5 target", &[p.target.unwrap()], &[10.0], EXACT);
    assert_close("b1=5 loss", &[p.loss], &[72.25], EXACT);
    assert_close("b1=5 grad", &[p.d_policy_chosen], &[-17.0], EXACT);
    // s_w = 0, s_l = 1: g = −0.25 − 0.25 = −0.5 ⇒ target −5 ⇒ loss 6.5² = 42.25.
    let p = loss.pair(fixed(), false, true);
    assert_close("b1=5 loss (0,1)", &[p.loss], &[42.25], EXACT);
    // rewards use τ = 0.1: 0.1, −0.05.
    assert_close(
        "b1=5 rewards",
        &[p.reward_chosen, p.reward_rejected],
        &[0.1, -0.05],
        EXACT,
    );
}

#[test]
fn ipo_equals_bfpo_with_both_safe() {
    let mut rng = Rng::new(11);
    for tau in [0.01, 0.05, 0.5] {
        let bfpo = Loss::Bfpo {
            tau,
            b1: 3.0,
            alpha: 0.5,
        };
        let ipo = Loss::Ipo { tau };
        for _ in 0..50 {
            let lp = random_logps(&mut rng);
            let a = bfpo.pair(lp, true, true);
            let b = ipo.pair(lp, false, false); // IPO ignores the labels
            assert_close("ipo vs bfpo loss", &[a.loss], &[b.loss], EXACT);
            assert_close(
                "ipo vs bfpo grad",
                &[a.d_policy_chosen, a.d_policy_rejected],
                &[b.d_policy_chosen, b.d_policy_rejected],
                EXACT,
            );
            assert_close(
                "ipo target",
                &[b.target.unwrap()],
                &[1.0 / (2.0 * tau)],
                EXACT,
            );
        }
    }
    // Hand value: τ = 0.01, Δ = 1.5 ⇒ (1.5 − 50)² = 2352.25.
    let p = Loss::ipo().pair(fixed(), false, false);
    assert_close("ipo by hand", &[p.loss], &[2352.25], EXACT);
    let f = bfpo_lite::loss::ipo(fixed(), 0.01);
    assert_close("ipo free fn", &[f.loss], &[2352.25], EXACT);
}

#[test]
fn dpo_values_by_hand() {
    let dpo = Loss::dpo(); // β = 0.1
    // Δ = 0: loss = −log σ(0) = ln 2; dL/dΔ = −β·σ(0) = −0.05.
    let p = dpo.pair(PairLogps::new(-3.0, -4.0, -3.0, -4.0), true, false);
    assert_close(
        "dpo Δ=0",
        &[p.loss, p.d_policy_chosen],
        &[std::f64::consts::LN_2, -0.05],
        EXACT,
    );
    assert_eq!(p.target, None);
    let f = bfpo_lite::loss::dpo(PairLogps::new(-3.0, -4.0, -3.0, -4.0), 0.1, 0.0);
    assert_close("dpo free fn", &[f.loss], &[std::f64::consts::LN_2], EXACT);
    // Δ = 1.5, βΔ = 0.15: loss = ln(1 + e^−0.15) = 0.6209570477895321,
    // dL/dΔ = −0.1/(1 + e^0.15) = −0.04625701546562505 (computed on a calculator).
    let p = dpo.pair(fixed(), true, true);
    assert_close(
        "dpo Δ=1.5",
        &[p.loss, p.d_policy_chosen, p.d_policy_rejected],
        &[
            0.6209570477895321,
            -0.04625701546562505,
            0.04625701546562505,
        ],
        EXACT,
    );
    // rewards use β: 0.1·1 = 0.1, 0.1·(−0.5) = −0.05.
    assert_close(
        "dpo rewards",
        &[p.reward_chosen, p.reward_rejected],
        &[0.1, -0.05],
        EXACT,
    );
    // Label smoothing ε = 0.1 at Δ = 0: loss = 0.9·ln2 + 0.1·ln2 = ln 2;
    // dL/dΔ = β(−0.9·0.5 + 0.1·0.5) = −0.04; optimum Δ* = ln(0.9/0.1)/β = 10·ln 9.
    let smooth = Loss::Dpo {
        beta: 0.1,
        label_smoothing: 0.1,
    };
    let p = smooth.pair(PairLogps::new(-1.0, -1.0, -1.0, -1.0), true, true);
    assert_close(
        "dpo ε Δ=0",
        &[p.loss, p.d_policy_chosen],
        &[std::f64::consts::LN_2, -0.04],
        EXACT,
    );
    assert_close(
        "dpo ε target",
        &[p.target.unwrap()],
        &[10.0 * 9f64.ln()],
        EXACT,
    );
    // At its target the smoothed loss has zero gradient.
    let t = p.target.unwrap();
    let at = smooth.pair(PairLogps::new(t, 0.0, 0.0, 0.0), true, true);
    assert!(
        at.d_policy_chosen.abs() < 1e-12,
        "grad at target {}",
        at.d_policy_chosen
    );
}

#[test]
fn dpo_is_numerically_stable() {
    let dpo = Loss::dpo();
    // βΔ = −1000: naive log(σ) underflows to −inf. loss = 1000 + log1p(e^−1000) = 1000.
    let p = dpo.pair(PairLogps::new(-1.0e4, 0.0, 0.0, 0.0), true, true);
    assert_close(
        "dpo very negative",
        &[p.loss, p.d_policy_chosen],
        &[1000.0, -0.1],
        EXACT,
    );
    // βΔ = +1000: loss = log1p(e^−1000) ≈ 0 and the gradient vanishes, both finite.
    let p = dpo.pair(PairLogps::new(1.0e4, 0.0, 0.0, 0.0), true, true);
    assert!(
        p.loss.is_finite() && p.loss >= 0.0 && p.loss < 1e-300,
        "{}",
        p.loss
    );
    assert!(p.d_policy_chosen.is_finite() && p.d_policy_chosen.abs() < 1e-300);
    // Smoothed at the extremes: loss ≈ ε·1000 and (1−ε)·1000.
    let smooth = Loss::Dpo {
        beta: 0.1,
        label_smoothing: 0.2,
    };
    let p = smooth.pair(PairLogps::new(1.0e4, 0.0, 0.0, 0.0), true, true);
    assert_close(
        "smoothed +",
        &[p.loss, p.d_policy_chosen],
        &[200.0, 0.02],
        EXACT,
    );
    let p = smooth.pair(PairLogps::new(-1.0e4, 0.0, 0.0, 0.0), true, true);
    assert_close(
        "smoothed −",
        &[p.loss, p.d_policy_chosen],
        &[800.0, -0.08],
        EXACT,
    );
}

fn random_logps(rng: &mut Rng) -> PairLogps {
    // Summed log-probs of tens of tokens, policy near the reference.
    let rc = -60.0 * rng.next_f64() - 1.0;
    let rr = -60.0 * rng.next_f64() - 1.0;
    PairLogps::new(
        rc + 20.0 * (rng.next_f64() - 0.5),
        rr + 20.0 * (rng.next_f64() - 0.5),
        rc,
        rr,
    )
}

fn all_losses() -> Vec<Loss> {
    vec![
        Loss::bfpo(),
        Loss::Bfpo {
            tau: 0.2,
            b1: 2.5,
            alpha: 0.1,
        },
        Loss::ipo(),
        Loss::Ipo { tau: 0.3 },
        Loss::dpo(),
        Loss::Dpo {
            beta: 0.5,
            label_smoothing: 0.15,
        },
    ]
}

#[test]
fn gradients_match_central_differences() {
    let mut rng = Rng::new(5);
    let h = 1e-4;
    for loss in all_losses() {
        for (sw, sl) in [(true, true), (true, false), (false, true), (false, false)] {
            for _ in 0..20 {
                let lp = random_logps(&mut rng);
                let p = loss.pair(lp, sw, sl);
                let f = |l: PairLogps| loss.pair(l, sw, sl).loss;
                let mut cp = lp;
                cp.policy_chosen += h;
                let mut cm = lp;
                cm.policy_chosen -= h;
                let mut rp = lp;
                rp.policy_rejected += h;
                let mut rm = lp;
                rm.policy_rejected -= h;
                let fd_c = (f(cp) - f(cm)) / (2.0 * h);
                let fd_r = (f(rp) - f(rm)) / (2.0 * h);
                assert_close(
                    &format!("{loss} s_w={sw} s_l={sl} at {lp:?}"),
                    &[p.d_policy_chosen, p.d_policy_rejected],
                    &[fd_c, fd_r],
                    FD,
                );
            }
        }
    }
}

#[test]
fn batch_is_mean_with_scaled_gradients_and_finite_differences() {
    let mut rng = Rng::new(9);
    let labels = [
        (true, true),
        (true, false),
        (false, true),
        (false, false),
        (true, false),
    ];
    let inputs: Vec<PairInput> = labels
        .iter()
        .map(|&(chosen_safe, rejected_safe)| PairInput {
            logps: random_logps(&mut rng),
            chosen_safe,
            rejected_safe,
        })
        .collect();
    let h = 1e-4;
    for loss in all_losses() {
        let b = loss.batch(&inputs).unwrap();
        let mean: f64 = inputs
            .iter()
            .map(|p| loss.pair(p.logps, p.chosen_safe, p.rejected_safe).loss)
            .sum::<f64>()
            / inputs.len() as f64;
        assert_close("batch mean", &[b.loss], &[mean], EXACT);
        for i in 0..inputs.len() {
            let f = |delta_c: f64, delta_r: f64| {
                let mut v = inputs.clone();
                v[i].logps.policy_chosen += delta_c;
                v[i].logps.policy_rejected += delta_r;
                loss.batch(&v).unwrap().loss
            };
            let fd_c = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
            let fd_r = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
            assert_close(
                &format!("{loss} batch grad pair {i}"),
                &[b.d_policy_chosen[i], b.d_policy_rejected[i]],
                &[fd_c, fd_r],
                FD,
            );
        }
        // Metrics: accuracy is the fraction with reward_chosen > reward_rejected.
        let acc = b
            .pairs
            .iter()
            .filter(|p| p.reward_chosen > p.reward_rejected)
            .count() as f64
            / inputs.len() as f64;
        assert_close("accuracy", &[b.metrics.accuracy], &[acc], EXACT);
        assert_eq!(b.metrics.n_safe_responses, 5); // 2 + 1 + 1 + 0 + 1
        assert_eq!(b.metrics.n_unsafe_responses, 5);
    }
}

#[test]
fn batch_metrics_by_hand() {
    // Two pairs, BFPO τ = 0.01:
    // pair 0 = fixed(): rewards 0.01 / −0.005, safe/safe;
    // pair 1: πc = −5, rc = −4 (reward −0.01), πr = −7, rr = −9 (reward 0.02), chosen unsafe.
    let inputs = [
        PairInput {
            logps: fixed(),
            chosen_safe: true,
            rejected_safe: true,
        },
        PairInput {
            logps: PairLogps::new(-5.0, -7.0, -4.0, -9.0),
            chosen_safe: false,
            rejected_safe: true,
        },
    ];
    let b = Loss::bfpo().batch(&inputs).unwrap();
    let m = &b.metrics;
    assert_close("rewards/chosen", &[m.reward_chosen], &[0.0], EXACT);
    assert_close("rewards/rejected", &[m.reward_rejected], &[0.0075], EXACT);
    assert_close(
        "rewards/margins",
        &[m.margin],
        &[(0.015 - 0.03) / 2.0],
        EXACT,
    );
    assert_close("rewards/accuracies", &[m.accuracy], &[0.5], EXACT);
    assert_close("logps/chosen", &[m.logps_chosen], &[-7.5], EXACT);
    // safe responses: 0.01, −0.005, 0.02 → mean 0.025/3; unsafe: −0.01.
    assert_close("safe reward", &[m.safe_reward], &[0.025 / 3.0], EXACT);
    assert_close("unsafe reward", &[m.unsafe_reward], &[-0.01], EXACT);
    // pair 1: Δ = −1 − 2 = −3, target −100 ⇒ loss 97² = 9409; pair 0: 2352.25.
    assert_close("loss", &[b.loss], &[(9409.0 + 2352.25) / 2.0], EXACT);
    assert_close(
        "scaled grad",
        &[b.d_policy_chosen[1]],
        &[2.0 * 97.0 / 2.0],
        EXACT,
    );
}

#[test]
fn batch_rejects_empty_and_non_finite() {
    assert_eq!(Loss::bfpo().batch(&[]).unwrap_err(), LossError::EmptyBatch);
    let mut v = vec![
        PairInput {
            logps: fixed(),
            chosen_safe: true,
            rejected_safe: true,
        };
        3
    ];
    v[2].logps.policy_rejected = f64::NAN;
    let err = Loss::bfpo().batch(&v).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pair 2") && msg.contains("NaN"), "{msg}");
}

#[test]
fn parse_names_parameters_and_errors() {
    assert_eq!(Loss::parse("bfpo").unwrap(), Loss::bfpo());
    assert_eq!(Loss::parse("IPO").unwrap(), Loss::Ipo { tau: 0.01 });
    assert_eq!(
        "dpo".parse::<Loss>().unwrap(),
        Loss::Dpo {
            beta: 0.1,
            label_smoothing: 0.0
        }
    );
    assert_eq!(
        Loss::parse("bfpo:tau=0.05, b1=4,alpha=0.25").unwrap(),
        Loss::Bfpo {
            tau: 0.05,
            b1: 4.0,
            alpha: 0.25
        }
    );
    assert_eq!(
        Loss::parse("dpo:beta=0.2,eps=0.1").unwrap(),
        Loss::Dpo {
            beta: 0.2,
            label_smoothing: 0.1
        }
    );
    for l in all_losses() {
        assert_eq!(Loss::parse(&l.to_string()).unwrap(), l, "round trip of {l}");
    }
    assert_eq!(Loss::parse("ipo").unwrap().kind(), LossKind::Ipo);
    let e = Loss::parse("kto").unwrap_err().to_string();
    assert!(
        e.contains("unknown loss `kto`") && e.contains("bfpo"),
        "{e}"
    );
    let e = Loss::parse("ipo:b1=3").unwrap_err().to_string();
    assert!(
        e.contains("unknown parameter `b1`") && e.contains("tau"),
        "{e}"
    );
    let e = Loss::parse("bfpo:tau=abc").unwrap_err().to_string();
    assert!(e.contains("`abc`") && e.contains("not a number"), "{e}");
    let e = Loss::parse("bfpo:tau=0").unwrap_err().to_string();
    assert!(e.contains("tau") && e.contains("> 0"), "{e}");
    let e = Loss::parse("bfpo:b1=1").unwrap_err().to_string();
    assert!(e.contains("b1") && e.contains("differ from 1"), "{e}");
    let e = Loss::parse("dpo:eps=0.5").unwrap_err().to_string();
    assert!(e.contains("[0, 0.5)"), "{e}");
}

#[test]
fn loss_kind_is_clap_friendly() {
    use clap::ValueEnum;
    let names: Vec<String> = LossKind::value_variants()
        .iter()
        .map(|v| v.to_possible_value().unwrap().get_name().to_string())
        .collect();
    assert_eq!(names, ["bfpo", "ipo", "dpo"]);
    assert_eq!(LossKind::from_str("dpo", true).unwrap(), LossKind::Dpo);
    assert_eq!(Loss::of_kind(LossKind::Bfpo), Loss::bfpo());
}
