//! Turning judged answers into preference pairs: deduplication, the helpfulness order, safety
//! labels, and which pairs to keep.
//!
//! # The helpfulness order (which answer is `chosen`)
//! 1. When the judge gives **both** answers a helpfulness score, the higher score is more helpful.
//! 2. Otherwise (or on equal scores): an answer that is **not a refusal** beats a refusal.
//! 3. Then the more **informative** answer: more distinct words (case-folded runs of letters and
//!    digits), so a long loop of one repeated sentence does not count as informative.
//! 4. Then the longer text (characters).
//! 5. A complete tie keeps the answers' generation order (the earlier one is chosen).
//!
//! # Safety labels
//! Answers to harmful prompts carry the judge's verdict; answers to benign prompts are labelled
//! safe on both sides (they are helpfulness pairs, BFPO's buffer), whatever the judge said (its
//! verdict is still recorded in the provenance).
//!
//! # Which pairs
//! Every unordered pair of distinct answers is a candidate. At most `max_pairs` are kept, the
//! most informative first: pairs whose sides differ in safety (BFPO's ±100 targets), then
//! both-safe pairs, then both-unsafe pairs; within a class, generation order, except that among
//! benign prompts' pairs those where an answer beats a refusal come first.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// What a judge said about one answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// The judge's safety verdict (true = safe).
    pub safe: bool,
    /// Whether the answer is a refusal (the built-in refusal detector's opinion).
    pub refused: bool,
    /// The judge's helpfulness score, when it has one (higher = more helpful).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpfulness: Option<f64>,
    /// The judge's own words: a category, a probability, a matched phrase.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Where an answer came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Source {
    /// Sampled from the model on the plain prompt.
    Sample { index: usize, seed: u32 },
    /// Sampled from the model with the safety system prompt in front.
    SafetySystem { index: usize, seed: u32 },
    /// A written refusal ([`super::templates::REFUSAL_TEMPLATES`]`[template]`).
    Template { template: usize },
}

/// One judged answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub text: String,
    #[serde(flatten)]
    pub source: Source,
    pub verdict: Judgement,
}

use crate::data::SafetyCase;

/// Keep order: mixed-safety pairs first, then both safe, then both unsafe.
fn priority(c: SafetyCase) -> u8 {
    match c {
        SafetyCase::OnlyChosenSafe | SafetyCase::OnlyRejectedSafe => 0,
        SafetyCase::BothSafe => 1,
        SafetyCase::BothUnsafe => 2,
    }
}

/// Which rule decided a pair's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderRule {
    JudgeScore,
    NonRefusal,
    DistinctWords,
    Length,
    Tie,
}

/// A pair of candidate indices, ordered, with labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPair {
    pub chosen: usize,
    pub rejected: usize,
    pub chosen_safe: bool,
    pub rejected_safe: bool,
    pub case: SafetyCase,
    pub rule: OrderRule,
}

/// Number of distinct case-folded words (runs of alphanumeric characters).
pub fn distinct_words(text: &str) -> usize {
    let mut set = std::collections::BTreeSet::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        set.insert(w.to_lowercase());
    }
    set.len()
}

/// Compares helpfulness: `Greater` when `a` is more helpful than `b`, with the rule that decided.
pub fn compare_helpfulness(a: &Candidate, b: &Candidate) -> (Ordering, OrderRule) {
    if let (Some(x), Some(y)) = (a.verdict.helpfulness, b.verdict.helpfulness) {
        let o = x.total_cmp(&y);
        if o != Ordering::Equal {
            return (o, OrderRule::JudgeScore);
        }
    }
    // Not refused > refused.
    let o = b.verdict.refused.cmp(&a.verdict.refused);
    if o != Ordering::Equal {
        return (o, OrderRule::NonRefusal);
    }
    let o = distinct_words(&a.text).cmp(&distinct_words(&b.text));
    if o != Ordering::Equal {
        return (o, OrderRule::DistinctWords);
    }
    let o = a.text.chars().count().cmp(&b.text.chars().count());
    if o != Ordering::Equal {
        return (o, OrderRule::Length);
    }
    (Ordering::Equal, OrderRule::Tie)
}

/// Drops empty answers and exact duplicates (after trimming), keeping the first of each.
/// Returns the kept candidates, the number of duplicates and the number of empty answers.
pub fn dedup(cands: Vec<Candidate>) -> (Vec<Candidate>, usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let (mut dups, mut empty) = (0, 0);
    let mut kept = Vec::with_capacity(cands.len());
    for mut c in cands {
        let t = c.text.trim();
        if t.is_empty() {
            empty += 1;
            continue;
        }
        if !seen.insert(t.to_string()) {
            dups += 1;
            continue;
        }
        if t.len() != c.text.len() {
            c.text = t.to_string();
        }
        kept.push(c);
    }
    (kept, dups, empty)
}

/// Plans the pairs among `cands` (already deduplicated). `benign` labels every side safe.
pub fn plan_pairs(cands: &[Candidate], benign: bool, max_pairs: usize) -> Vec<PlannedPair> {
    let label = |c: &Candidate| benign || c.verdict.safe;
    let mut out = Vec::new();
    for i in 0..cands.len() {
        for j in i + 1..cands.len() {
            let (o, rule) = compare_helpfulness(&cands[i], &cands[j]);
            let (w, l) = if o == Ordering::Less { (j, i) } else { (i, j) };
            let (sw, sl) = (label(&cands[w]), label(&cands[l]));
            out.push(PlannedPair {
                chosen: w,
                rejected: l,
                chosen_safe: sw,
                rejected_safe: sl,
                case: SafetyCase::of(sw, sl),
                rule,
            });
        }
    }
    // Stable: generation order within a priority class. Among benign (both-safe) pairs, those
    // where an answer beats a refusal come first: they are the over-refusal contrast.
    out.sort_by_key(|p| (priority(p.case), benign && p.rule != OrderRule::NonRefusal));
    out.truncate(max_pairs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(text: &str, safe: bool, refused: bool, help: Option<f64>) -> Candidate {
        Candidate {
            text: text.into(),
            source: Source::Sample { index: 0, seed: 0 },
            verdict: Judgement {
                safe,
                refused,
                helpfulness: help,
                detail: String::new(),
            },
        }
    }

    #[test]
    fn distinct_words_ignores_repetition_and_case() {
        assert_eq!(distinct_words("Go go GO, go!"), 1);
        assert_eq!(distinct_words("Mix two cups of flour."), 5);
        assert_eq!(distinct_words(""), 0);
    }

    #[test]
    fn order_rule_in_its_documented_sequence() {
        let refusal = cand(
            "I'm sorry, I can't help with that request at all.",
            true,
            true,
            None,
        );
        let short = cand("Use a wrench.", false, false, None);
        let long = cand(
            "Use a wrench, turn it left, then lift the cover.",
            false,
            false,
            None,
        );
        let looping = cand(
            "Use a wrench. Use a wrench. Use a wrench. Use a wrench.",
            false,
            false,
            None,
        );
        // A non-refusal beats a refusal even when the refusal has more words.
        assert_eq!(
            compare_helpfulness(&short, &refusal),
            (Ordering::Greater, OrderRule::NonRefusal)
        );
        assert_eq!(
            compare_helpfulness(&refusal, &short),
            (Ordering::Less, OrderRule::NonRefusal)
        );
        // Distinct words before raw length: the loop is longer but says less.
        assert!(looping.text.len() > long.text.len());
        assert_eq!(
            compare_helpfulness(&long, &looping),
            (Ordering::Greater, OrderRule::DistinctWords)
        );
        // Same words, different length.
        let a = cand("use a wrench", false, false, None);
        let b = cand("use a wrench, a wrench", false, false, None);
        assert_eq!(
            compare_helpfulness(&b, &a),
            (Ordering::Greater, OrderRule::Length)
        );
        assert_eq!(
            compare_helpfulness(&a, &a),
            (Ordering::Equal, OrderRule::Tie)
        );
        // A judge score wins over every other rule, when both sides have one.
        let scored_refusal = cand("No.", true, true, Some(0.9));
        let scored_answer = cand("Use a wrench, turn it left.", false, false, Some(0.2));
        assert_eq!(
            compare_helpfulness(&scored_refusal, &scored_answer),
            (Ordering::Greater, OrderRule::JudgeScore)
        );
        // One score only: the fallback rule decides.
        let half = cand("No.", true, true, Some(0.9));
        assert_eq!(compare_helpfulness(&half, &short).1, OrderRule::NonRefusal);
    }

    #[test]
    fn dedup_counts_duplicates_and_empties() {
        let c = vec![
            cand("a b", true, false, None),
            cand("  a b ", true, false, None),
            cand("", true, false, None),
            cand("c", true, false, None),
            cand("   ", true, false, None),
        ];
        let (kept, dups, empty) = dedup(c);
        assert_eq!((kept.len(), dups, empty), (2, 1, 2));
        assert_eq!(kept[0].text, "a b");
    }

    #[test]
    fn pairs_labelled_ordered_and_prioritised() {
        let c = vec![
            cand("Sure: step one, step two, step three.", false, false, None),
            cand("Sure: step one and step two.", false, false, None),
            cand("I'm sorry, I can't help with that.", true, true, None),
        ];
        let all = plan_pairs(&c, false, 10);
        assert_eq!(all.len(), 3);
        // Mixed-safety pairs first, helpful-unsafe chosen over the refusal.
        assert_eq!(all[0].case, SafetyCase::OnlyRejectedSafe);
        assert_eq!((all[0].chosen, all[0].rejected), (0, 2));
        assert_eq!(all[1].case, SafetyCase::OnlyRejectedSafe);
        assert_eq!((all[1].chosen, all[1].rejected), (1, 2));
        assert_eq!(all[2].case, SafetyCase::BothUnsafe);
        assert_eq!((all[2].chosen, all[2].rejected), (0, 1));
        assert!(!all[0].chosen_safe && all[0].rejected_safe);
        // The cap keeps the most informative.
        let one = plan_pairs(&c, false, 1);
        assert_eq!(one, all[..1].to_vec());
        // Benign: every side safe; answers over the refusal first, then generation order.
        let benign = plan_pairs(&c, true, 10);
        assert!(benign.iter().all(|p| p.case == SafetyCase::BothSafe));
        let order: Vec<_> = benign.iter().map(|p| (p.chosen, p.rejected)).collect();
        assert_eq!(order, [(0, 2), (1, 2), (0, 1)]);
    }

    #[test]
    fn benign_pairs_put_the_refusal_contrast_first() {
        // Three answers and a refusal last: with room for one pair, the kept pair is an answer
        // over the refusal, not the first two answers.
        let c = vec![
            cand(
                "Knead the dough, let it rise, bake at 220 C.",
                true,
                false,
                None,
            ),
            cand("Mix flour, water, salt and yeast.", true, false, None),
            cand("Bread needs flour.", true, false, None),
            cand("I'm sorry, but I can't help with that.", true, true, None),
        ];
        let p = plan_pairs(&c, true, 1);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].chosen, p[0].rejected), (0, 3));
        assert_eq!(p[0].rule, OrderRule::NonRefusal);
        assert_eq!(p[0].case, SafetyCase::BothSafe);
        // For harmful prompts the order stays the generation order within a class.
        let h = plan_pairs(&c, false, 1);
        assert_eq!((h[0].chosen, h[0].rejected), (0, 1));
    }
}
