//! `init-model`: deterministic random-weight GGUF models with a real tokenizer. (Pending.)
