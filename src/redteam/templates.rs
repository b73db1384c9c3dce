//! Written refusals: the safe side for a harmful prompt that got no safe answer from the model,
//! and the over-refusal side (rejected, less helpful) of a benign prompt's pair.
//!
//! Each template is a short, polite refusal in a different wording; several offer a safe
//! direction instead. They contain no part of the prompt (a refusal that repeats a harmful
//! request back is not what the model should learn). The template for a prompt is picked by a
//! hash of the run's seed and the prompt's key, so the choice is deterministic for a seed and
//! does not depend on the order prompts are processed in. Rows carrying one say so in their
//! provenance (`"source": "template"`, with the template's number).

/// The refusal templates, in the order their numbers (`template` in provenance) refer to.
pub const REFUSAL_TEMPLATES: &[&str] = &[
    "I'm sorry, but I can't help with that. It could put people at risk of real harm. If there is something else you are working on, I'm happy to help with that instead.",
    "I can't assist with this request. Providing that information could be used to hurt someone or break the law. If you're curious about the topic for safety or research reasons, I can share general, publicly available safety information.",
    "Sorry, I won't be able to help with that one. I'd be glad to help with a related question that doesn't involve causing harm, though.",
    "I'm not able to provide that. Requests like this can lead to serious harm to people, so I have to decline. Is there another way I can support you?",
    "I apologize, but I cannot help with this. If you or someone else is in danger, please contact local emergency services or a trusted support line. I'm happy to talk about something else.",
    "That's not something I can help with, as it could cause harm or be illegal. If you tell me more about what you're ultimately trying to achieve, I may be able to suggest a safe and legal alternative.",
    "I'm sorry, I can't do that. I try to be helpful, but not in ways that could hurt people. Let me know if there's anything else you'd like to explore.",
    "I must decline this request because it could contribute to harm. If you're interested in the broader subject, I can explain it at a general level that focuses on safety and prevention.",
];

/// Picks a template number for a prompt: deterministic in `(seed, prompt_key)`.
pub fn pick(seed: u64, prompt_key: u64) -> usize {
    let mut rng = crate::util::rng::Rng::derive(seed, prompt_key);
    rng.below(REFUSAL_TEMPLATES.len() as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_distinct_polite_and_short() {
        let set: std::collections::BTreeSet<_> = REFUSAL_TEMPLATES.iter().collect();
        assert_eq!(set.len(), REFUSAL_TEMPLATES.len());
        for t in REFUSAL_TEMPLATES {
            let lower = t.to_lowercase();
            assert!(
                [
                    "sorry",
                    "can't",
                    "cannot",
                    "not able",
                    "decline",
                    "won't",
                    "not something"
                ]
                .iter()
                .any(|w| lower.contains(w)),
                "{t}"
            );
            assert!(t.len() < 300, "{t}");
        }
    }

    #[test]
    fn pick_is_deterministic_and_varied() {
        let picks: Vec<usize> = (0..64).map(|k| pick(7, k)).collect();
        assert_eq!(picks, (0..64).map(|k| pick(7, k)).collect::<Vec<_>>());
        let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
        assert!(distinct.len() >= REFUSAL_TEMPLATES.len() - 1, "{picks:?}");
        assert!(picks.iter().all(|&p| p < REFUSAL_TEMPLATES.len()));
    }
}
