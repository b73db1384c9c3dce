//! Helpfulness metrics on written values: KL of two logit rows, drift/KL bookkeeping over the
//! answer positions, multiple-choice rows (good and bad), ranking by implicit reward, and the
//! better/worse arrows of report.md.

use bfpo_lite::data::{Example, RowOrigin};
use bfpo_lite::eval::helpful::{drift_kl_of, kl_rows, mc_context, pair_ranking, parse_mc};
use bfpo_lite::eval::report::{Better, arrow};
use bfpo_lite::eval::stats::Figure;
use bfpo_lite::train::trainer::PreparedPair;

#[test]
fn kl_of_two_rows_matches_the_formula() {
    let p = [0.0f32, 1.0, 2.0];
    let q = [2.0f32, 1.0, 0.0];
    let sm = |r: &[f32]| {
        let z: f64 = r.iter().map(|&x| (x as f64).exp()).sum();
        r.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
    };
    let (a, b) = (sm(&p), sm(&q));
    let want: f64 = a.iter().zip(&b).map(|(x, y)| x * (x / y).ln()).sum();
    assert!(
        (kl_rows(&p, &q) - want).abs() < 1e-12,
        "{} vs {want}",
        kl_rows(&p, &q)
    );
    assert_eq!(kl_rows(&p, &p), 0.0);
    // Shifting every logit leaves the distribution unchanged.
    let shifted: Vec<f32> = p.iter().map(|x| x + 5.0).collect();
    assert!(kl_rows(&p, &shifted).abs() < 1e-12);
}

#[test]
fn drift_and_kl_use_only_the_answer_positions() {
    // 4 tokens, answer starts at 2: rows 1 and 2 predict tokens 2 and 3; vocab 3.
    let ex = Example {
        ids: vec![0, 1, 2, 0],
        response_start: 2,
    };
    let base = vec![0.0f32; 12];
    let mut tuned = base.clone();
    // Row 0 (not an answer position) changes wildly: must not count.
    tuned[0] = 50.0;
    // Row 1 raises token 2's logit by ln 2.
    tuned[3 + 2] = std::f32::consts::LN_2;
    let (drift, kl, n) = drift_kl_of(&ex, &base, &tuned, 3);
    assert_eq!(n, 2);
    // Row 1: log p_t(2) = ln(2/4), log p_b(2) = ln(1/3); row 2 unchanged.
    let want_drift = ((0.5f64).ln() - (1.0f64 / 3.0).ln()) / 2.0;
    assert!((drift - want_drift).abs() < 1e-6, "{drift} vs {want_drift}");
    let u = [1.0f64 / 3.0; 3];
    let t = [0.25f64, 0.25, 0.5];
    let kl1: f64 = u.iter().zip(&t).map(|(a, b)| a * (a / b).ln()).sum();
    assert!((kl - kl1 / 2.0).abs() < 1e-6, "{kl} vs {}", kl1 / 2.0);
}

#[test]
fn multiple_choice_rows_accept_index_letter_or_text_and_count_bad_rows() {
    let text = "{\"question\": \"q1\", \"choices\": [\"a\", \"b\"], \"answer\": 1}\n\
                {\"question\": \"q2\", \"choices\": [\"a\", \"b\", \"c\"], \"answer\": \"C\"}\n\
                {\"question\": \"q3\", \"choices\": [\"yes\", \"no\"], \"answer\": \"no\"}\n\
                {\"question\": \"q4\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n\
                {\"question\": \"q5\", \"choices\": \"ab\", \"answer\": 0}\n\
                {\"choices\": [\"a\", \"b\"], \"answer\": 0}\n\
                {\"question\": \"q7\", \"choices\": [\"a\", 3], \"answer\": 0}\n\
                {\"question\": \"q8\", \"choices\": [\"a\", \"b\"], \"answer\": \"Z\"}\n\
                oops\n";
    let set = parse_mc(text, "mc.jsonl");
    assert_eq!(set.rows_read, 9);
    let answers: Vec<usize> = set.questions.iter().map(|q| q.answer).collect();
    assert_eq!(answers, [1, 2, 1]);
    let bad: Vec<String> = set.skipped.iter().map(|(o, _)| o.to_string()).collect();
    assert_eq!(
        bad,
        [
            "mc.jsonl:4",
            "mc.jsonl:5",
            "mc.jsonl:6",
            "mc.jsonl:7",
            "mc.jsonl:8",
            "mc.jsonl:9"
        ]
    );
    assert!(set.skipped[0].1.contains("not an index"));
    assert_eq!(mc_context("2+2?"), "Question: 2+2?\nAnswer:");
}

fn pair(chosen_safe: bool, rejected_safe: bool) -> PreparedPair {
    let ex = Example {
        ids: vec![1, 2, 3],
        response_start: 1,
    };
    PreparedPair {
        chosen: ex.clone(),
        rejected: ex,
        chosen_safe,
        rejected_safe,
        origin: RowOrigin {
            file: "p".into(),
            line: 1,
        },
        ref_logps: None,
    }
}

#[test]
fn implicit_reward_ranking_follows_bfpo_order() {
    let pairs = [
        pair(true, true),
        pair(false, true),
        pair(true, false),
        pair(false, false),
    ];
    // Reference all zero; policy margins: +1 (right: prefers chosen), +1 (wrong: chosen unsafe),
    // −1 (wrong: chosen safe), −1 (right: both unsafe prefers the less helpful).
    let reference = [(0.0, 0.0); 4];
    let policy = [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 1.0)];
    let r = pair_ranking(&pairs, &policy, Some(&reference));
    let rb = r.reward_bfpo.unwrap();
    assert_eq!((rb.k, rb.n), (Some(2), 4));
    let rs = r.reward_safety.unwrap();
    assert_eq!((rs.k, rs.n), (Some(0), 2));
    // Likelihood ranking reads the policy's own log-probs (same here: lengths are equal).
    assert_eq!(r.likelihood_bfpo.k, Some(2));
    let base_only = pair_ranking(&pairs, &policy, None);
    assert!(base_only.reward_bfpo.is_none());
}

#[test]
fn arrows_say_better_or_worse_by_direction() {
    let f = |v: f64| Figure::rate((v * 10.0) as usize, 10);
    assert_eq!(arrow(&f(0.5), &f(0.7), Better::Higher), "↑");
    assert_eq!(arrow(&f(0.5), &f(0.7), Better::Lower), "↓");
    assert_eq!(arrow(&f(0.5), &f(0.5), Better::Higher), "=");
    let m = |v: f64| Figure::mean(&[v]);
    assert_eq!(arrow(&m(-0.3), &m(0.1), Better::NearZero), "↑");
    assert_eq!(arrow(&m(0.1), &m(-0.3), Better::NearZero), "↓");
}
