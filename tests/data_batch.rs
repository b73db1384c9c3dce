//! Truncation, length-bucketed batching and the held-out split: properties on seeded random
//! inputs plus fixed cases.

use bfpo_lite::data::batch::{
    BatchError, Batcher, ResponseBudget, TruncationConfig, TruncationStats, build_pair_examples,
    padding_overhead, split_heldout,
};
use bfpo_lite::data::{Pair, Prompt, RowOrigin};
use bfpo_lite::util::Rng;
use std::collections::HashSet;
use std::sync::Arc;

/// Distinct ids `base, base + 1, …` so that the kept parts can be traced back.
fn ids(n: usize, base: u32) -> Vec<u32> {
    (0..n as u32).map(|i| base + i).collect()
}

#[test]
fn truncation_properties_on_random_lengths() {
    let mut rng = Rng::new(3);
    let mut cut_prompts = 0;
    let mut cut_responses = 0;
    for case in 0..3000 {
        let max_length = 8 + rng.below(60) as usize;
        let max_prompt_length = 1 + rng.below(max_length as u64 - 1) as usize;
        let keep_prompt_prefix = rng.below(max_prompt_length.min(3) as u64) as usize;
        let budget = if case % 2 == 0 {
            ResponseBudget::Trl
        } else {
            ResponseBudget::Remaining
        };
        let cfg = TruncationConfig {
            max_length,
            max_prompt_length,
            keep_prompt_prefix,
            response_budget: budget,
        };
        let p = ids(1 + rng.below(90) as usize, 1000);
        let c = ids(1 + rng.below(90) as usize, 2000);
        let r = ids(1 + rng.below(90) as usize, 3000);
        let e = build_pair_examples(case, &p, &c, &r, &cfg).unwrap();
        let t = e.truncation;
        let longer = c.len().max(r.len());
        let what = format!(
            "case {case}: {cfg:?} p {} c {} r {}",
            p.len(),
            c.len(),
            r.len()
        );
        for (ex, resp, dropped) in [
            (&e.chosen, &c, t.chosen_dropped),
            (&e.rejected, &r, t.rejected_dropped),
        ] {
            let ps = ex.response_start;
            assert!(ex.len() <= max_length, "{what}: length {}", ex.len());
            assert!(ps >= 1, "{what}");
            assert_eq!(ps, p.len() - t.prompt_dropped, "{what}");
            // The prompt is its protected prefix followed by its end.
            let kp = keep_prompt_prefix.min(ps);
            assert_eq!(&ex.ids[..kp], &p[..kp], "{what}");
            assert_eq!(&ex.ids[kp..ps], &p[p.len() - (ps - kp)..], "{what}");
            // The response keeps its start.
            assert_eq!(&ex.ids[ps..], &resp[..resp.len() - dropped], "{what}");
            assert!(ex.n_scored() >= 1, "{what}");
        }
        // Nothing is cut when everything fits.
        if p.len() + longer <= max_length {
            assert!(!t.any(), "{what}");
        }
        // The prompt is cut only when the pair does not fit, and then to exactly P tokens.
        if t.prompt_dropped > 0 {
            cut_prompts += 1;
            assert!(
                p.len() + longer > max_length && p.len() > max_prompt_length,
                "{what}"
            );
            assert_eq!(e.chosen.response_start, max_prompt_length, "{what}");
        } else if p.len() + longer > max_length {
            assert!(p.len() <= max_prompt_length, "{what}");
        }
        // Responses are cut to the budget.
        if t.chosen_dropped + t.rejected_dropped > 0 {
            cut_responses += 1;
            let budget_len = match budget {
                ResponseBudget::Trl => max_length - max_prompt_length,
                ResponseBudget::Remaining => max_length - e.chosen.response_start,
            };
            let longest = e.chosen.n_scored().max(e.rejected.n_scored());
            assert_eq!(longest, budget_len, "{what}");
        }
    }
    // The random cases exercised both kinds of cut.
    assert!(
        cut_prompts > 100 && cut_responses > 100,
        "{cut_prompts} {cut_responses}"
    );
}

#[test]
fn truncation_fixed_cases_at_default_lengths() {
    let cfg = TruncationConfig::default(); // 1024 / 512, TRL budget
    let p: Vec<u32> = (0..700).collect();
    let c: Vec<u32> = (10_000..10_600).collect();
    let r: Vec<u32> = (20_000..20_100).collect();
    let e = build_pair_examples(0, &p, &c, &r, &cfg).unwrap();
    // 700 + 600 > 1024 ⇒ prompt keeps its last 512 (188..700); 512 + 600 > 1024 ⇒ responses
    // keep their first 1024 − 512 = 512.
    assert_eq!(e.chosen.response_start, 512);
    assert_eq!(e.chosen.ids[0], 188);
    assert_eq!(e.chosen.len(), 1024);
    assert_eq!(e.chosen.ids[1023], 10_511);
    assert_eq!(e.rejected.len(), 612);
    assert_eq!(e.truncation.prompt_dropped, 188);
    assert_eq!(e.truncation.chosen_dropped, 88);
    assert_eq!(e.truncation.rejected_dropped, 0);

    // Short prompt, long responses: TRL wastes the space, Remaining uses it.
    let p: Vec<u32> = (0..100).collect();
    let c: Vec<u32> = (10_000..12_000).collect();
    let e = build_pair_examples(1, &p, &c, &r, &cfg).unwrap();
    assert_eq!((e.chosen.response_start, e.chosen.len()), (100, 612));
    let rem = TruncationConfig {
        response_budget: ResponseBudget::Remaining,
        ..cfg
    };
    let e = build_pair_examples(1, &p, &c, &r, &rem).unwrap();
    assert_eq!((e.chosen.response_start, e.chosen.len()), (100, 1024));

    // A protected BOS survives prompt truncation.
    let keep = TruncationConfig {
        keep_prompt_prefix: 1,
        ..cfg
    };
    let mut p: Vec<u32> = (100..800).collect();
    p[0] = 1; // BOS
    let c: Vec<u32> = (10_000..10_600).collect();
    let e = build_pair_examples(2, &p, &c, &r, &keep).unwrap();
    assert_eq!(e.chosen.ids[0], 1);
    assert_eq!(e.chosen.ids[1], 100 + 700 - 511);
    assert_eq!(e.chosen.response_start, 512);

    // Statistics.
    let mut s = TruncationStats::default();
    s.add(&e);
    s.add(&build_pair_examples(3, &[1, 2], &[3], &[4, 5], &cfg).unwrap());
    assert_eq!(s.pairs, 2);
    assert_eq!(s.prompts_truncated, 1);
    assert_eq!(s.responses_truncated, 1);
    assert_eq!(s.prompt_tokens_dropped, 188);
    assert_eq!(s.response_tokens_dropped, 88);
    assert_eq!(s.max_sequence_length, 1024);
}

#[test]
fn truncation_errors() {
    let cfg = TruncationConfig::default();
    assert_eq!(
        build_pair_examples(7, &[], &[1], &[2], &cfg).unwrap_err(),
        BatchError::EmptyPrompt { index: 7 }
    );
    let e = build_pair_examples(8, &[1], &[2], &[], &cfg).unwrap_err();
    assert!(
        e.to_string()
            .contains("pair 8: the rejected response has no tokens"),
        "{e}"
    );
    for (l, p, k) in [(100, 100, 0), (100, 0, 0), (100, 200, 0), (100, 10, 10)] {
        let bad = TruncationConfig {
            max_length: l,
            max_prompt_length: p,
            keep_prompt_prefix: k,
            ..cfg
        };
        let e = build_pair_examples(0, &[1], &[2], &[3], &bad).unwrap_err();
        assert!(
            e.to_string().contains(&format!("--max-prompt-length {p}"))
                && e.to_string().contains(&format!("--max-length {l}")),
            "{e}"
        );
    }
}

fn random_lengths(rng: &mut Rng, n: usize) -> Vec<usize> {
    (0..n).map(|_| 5 + rng.below(300) as usize).collect()
}

#[test]
fn batches_cover_every_index_once_and_are_deterministic() {
    let mut rng = Rng::new(1);
    for n in [0usize, 1, 7, 64, 333] {
        let lengths = random_lengths(&mut rng, n);
        for bs in [1usize, 3, 8, 50] {
            let b = Batcher::new(bs, 42);
            let e0 = b.epoch(&lengths, 0).unwrap();
            let mut all: Vec<usize> = e0.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} bs {bs}");
            assert!(e0.iter().all(|x| !x.is_empty() && x.len() <= bs));
            assert!(e0.iter().filter(|x| x.len() < bs).count() <= 1);
            assert_eq!(e0, b.epoch(&lengths, 0).unwrap(), "deterministic");
            // Within a batch, longest first.
            for batch in &e0 {
                assert!(batch.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
            }
            if n >= 64 && bs <= 8 {
                assert_ne!(e0, b.epoch(&lengths, 1).unwrap(), "epochs differ");
                assert_ne!(
                    e0,
                    Batcher::new(bs, 43).epoch(&lengths, 0).unwrap(),
                    "seeds differ"
                );
            }
            let dl = Batcher {
                drop_last: true,
                ..b
            };
            let d = dl.epoch(&lengths, 0).unwrap();
            assert!(d.iter().all(|x| x.len() == bs));
            assert_eq!(d.len(), n / bs);
        }
    }
    assert_eq!(
        Batcher::new(0, 1).epoch(&[1, 2], 0).unwrap_err(),
        BatchError::BatchSize(0)
    );
}

#[test]
fn bucketing_reduces_padding() {
    let mut rng = Rng::new(2);
    let lengths = random_lengths(&mut rng, 2000);
    let plain = Batcher {
        bucket_batches: 1,
        ..Batcher::new(8, 5)
    };
    let bucketed = Batcher {
        bucket_batches: 32,
        ..Batcher::new(8, 5)
    };
    let a = padding_overhead(&lengths, &plain.epoch(&lengths, 0).unwrap());
    let b = padding_overhead(&lengths, &bucketed.epoch(&lengths, 0).unwrap());
    // Uniform lengths 5..305 in random batches of 8 pad ~74 %; buckets of 256 sorted pairs
    // leave roughly the gap between neighbours, ~3 % (seed 2).
    assert!(a > 0.3, "unbucketed overhead {a}");
    assert!(b < 0.1 && b < a / 3.0, "bucketed overhead {b} vs {a}");
    // Fixed case: lengths [10, 1, 10, 1] in batches of 2 → best is 0 padding.
    assert_eq!(
        padding_overhead(&[10, 1, 10, 1], &[vec![0, 2], vec![1, 3]]),
        0.0
    );
    // [10, 1] twice: 40 padded tokens for 22 real ones.
    let o = padding_overhead(&[10, 1, 10, 1], &[vec![0, 1], vec![2, 3]]);
    assert!((o - (40.0 / 22.0 - 1.0)).abs() < 1e-12, "{o}");
}

fn pair(prompt: &str, k: usize) -> Pair {
    Pair {
        prompt: Prompt::Text(prompt.to_string()),
        chosen: format!("yes {k}"),
        rejected: format!("no {k}"),
        chosen_safe: true,
        rejected_safe: k.is_multiple_of(2),
        origin: RowOrigin {
            file: Arc::from("t.jsonl"),
            line: k + 1,
        },
    }
}

#[test]
fn heldout_split_by_prompt_is_deterministic_and_order_free() {
    // 120 prompts, 1–3 pairs each.
    let mut pairs = Vec::new();
    for q in 0..120 {
        for k in 0..(1 + q % 3) {
            pairs.push(pair(&format!("question number {q}"), k));
        }
    }
    let n = pairs.len();
    let s = split_heldout(&pairs, 0.1, 7).unwrap();
    assert_eq!(s.train.len() + s.heldout.len(), n);
    let all: HashSet<usize> = s.train.iter().chain(&s.heldout).copied().collect();
    assert_eq!(all.len(), n, "disjoint and complete");
    let held_prompts: HashSet<&Prompt> = s.heldout.iter().map(|&i| &pairs[i].prompt).collect();
    assert!(
        s.train
            .iter()
            .all(|&i| !held_prompts.contains(&pairs[i].prompt)),
        "no prompt in both"
    );
    // Close to the fraction (overshoot at most one prompt group of ≤ 3 pairs).
    let want = (0.1 * n as f64).round() as usize;
    assert!(
        s.heldout.len() >= want && s.heldout.len() < want + 3,
        "{} vs {want}",
        s.heldout.len()
    );
    assert_eq!(s, split_heldout(&pairs, 0.1, 7).unwrap());
    // Order-free: reversing the pairs holds out the same prompts.
    let rev: Vec<Pair> = pairs.iter().rev().cloned().collect();
    let s2 = split_heldout(&rev, 0.1, 7).unwrap();
    let held2: HashSet<&Prompt> = s2.heldout.iter().map(|&i| &rev[i].prompt).collect();
    assert_eq!(held_prompts, held2);
    // Another seed, another split.
    let s3 = split_heldout(&pairs, 0.1, 8).unwrap();
    assert_ne!(s.heldout, s3.heldout);
    // Edge cases.
    assert!(split_heldout(&pairs, 0.0, 7).unwrap().heldout.is_empty());
    let tiny = vec![pair("a", 0), pair("b", 1)];
    let t = split_heldout(&tiny, 0.01, 7).unwrap();
    assert_eq!(
        (t.train.len(), t.heldout.len()),
        (1, 1),
        "at least one each"
    );
    assert_eq!(
        split_heldout(&pairs, 1.0, 7).unwrap_err(),
        BatchError::Fraction(1.0)
    );
    assert!(split_heldout(&pairs, -0.1, 7).is_err());
}
