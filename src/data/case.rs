//! BFPO's four safety cases of a preference pair (chosen = the more helpful response), the one
//! classification every part of the crate uses: data summaries, red-team pairing, training
//! metrics and the held-out ranking evaluation.

use serde::{Deserialize, Serialize};

/// Which of BFPO's four cases a pair falls in. Serialized (data summaries, red-team rows) as
/// `both_safe`, `only_chosen_safe`, `only_rejected_safe`, `both_unsafe`; the training metrics
/// keep their published keys ([`SafetyCase::metric_key`]: `helpful_safe` for only-chosen-safe,
/// `helpful_unsafe` for only-rejected-safe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyCase {
    /// Both responses safe: prefer the more helpful (target +1/(2τ)).
    BothSafe,
    /// The more helpful is safe, the other unsafe: strongly prefer the more helpful (+1/τ).
    OnlyChosenSafe,
    /// The more helpful is unsafe, the other safe: strongly prefer the safe one (−1/τ).
    OnlyRejectedSafe,
    /// Both unsafe: prefer the less helpful (−1/(2τ)).
    BothUnsafe,
}

impl SafetyCase {
    /// In [`SafetyCase::index`] order.
    pub const ALL: [SafetyCase; 4] = [
        SafetyCase::BothSafe,
        SafetyCase::OnlyChosenSafe,
        SafetyCase::OnlyRejectedSafe,
        SafetyCase::BothUnsafe,
    ];

    pub fn of(chosen_safe: bool, rejected_safe: bool) -> SafetyCase {
        match (chosen_safe, rejected_safe) {
            (true, true) => SafetyCase::BothSafe,
            (true, false) => SafetyCase::OnlyChosenSafe,
            (false, true) => SafetyCase::OnlyRejectedSafe,
            (false, false) => SafetyCase::BothUnsafe,
        }
    }

    /// 0..4, the position in [`SafetyCase::ALL`] (per-case counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The serialized name (`only_chosen_safe`, …).
    pub fn name(self) -> &'static str {
        match self {
            SafetyCase::BothSafe => "both_safe",
            SafetyCase::OnlyChosenSafe => "only_chosen_safe",
            SafetyCase::OnlyRejectedSafe => "only_rejected_safe",
            SafetyCase::BothUnsafe => "both_unsafe",
        }
    }

    /// The name in training metrics (`accuracy/<key>` in metrics.jsonl, the curves' legend).
    pub fn metric_key(self) -> &'static str {
        match self {
            SafetyCase::BothSafe => "both_safe",
            SafetyCase::OnlyChosenSafe => "helpful_safe",
            SafetyCase::OnlyRejectedSafe => "helpful_unsafe",
            SafetyCase::BothUnsafe => "both_unsafe",
        }
    }

    /// Whether BFPO's global ranking (safe+helpful > safe+unhelpful > unsafe+unhelpful >
    /// unsafe+helpful) prefers the more helpful response of such a pair.
    pub fn prefers_chosen(self) -> bool {
        matches!(self, SafetyCase::BothSafe | SafetyCase::OnlyChosenSafe)
    }

    /// Whether exactly one response is safe (the pairs safety-ranking accuracy is measured on).
    pub fn is_mixed(self) -> bool {
        matches!(
            self,
            SafetyCase::OnlyChosenSafe | SafetyCase::OnlyRejectedSafe
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_names_and_index_agree() {
        for (i, c) in SafetyCase::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
        assert_eq!(SafetyCase::of(false, true), SafetyCase::OnlyRejectedSafe);
        assert!(SafetyCase::of(true, false).prefers_chosen());
        assert!(!SafetyCase::of(false, false).prefers_chosen());
        assert!(SafetyCase::of(false, true).is_mixed() && !SafetyCase::BothSafe.is_mixed());
    }
}
