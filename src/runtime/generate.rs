//! Generation: greedy or sampled, with a per-token callback for streaming.
//!
//! Prompts of a batch are generated **one after another** in one context (the KV cache is
//! cleared between prompts); every prompt starts a fresh sampler with the same seed, so a
//! prompt's output does not depend on its position in the batch. The repetition penalty looks
//! at generated tokens only (not the prompt).

use super::{CtxSpec, RtModel, RuntimeError};
use crate::data::Prompt;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Sampling settings (llama.cpp's defaults). `temperature <= 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Nucleus: keep the smallest set with probability mass ≥ `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens with probability < `min_p` × the top probability (0 = off).
    pub min_p: f32,
    /// Divide logits of recently generated tokens by this (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: u32,
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |name: &'static str, value: f32, expected: &'static str| {
            Err(RuntimeError::InvalidOption {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                self.temperature,
                "a finite number ≥ 0 (0 = greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a number in (0, 1] (1 = off)");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1) (0 = off)");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(
                "repeat_penalty",
                self.repeat_penalty,
                "a finite number > 0 (1 = off)",
            );
        }
        Ok(())
    }
}

/// How to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens per prompt (the end-of-generation token is not counted).
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Context length; default: prompt + `max_tokens`, capped at the model's training context.
    pub n_ctx: Option<usize>,
    /// Threads per decode; default: [`RtModel::auto_threads`].
    pub threads: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: Sampling::default(),
            n_ctx: None,
            threads: None,
        }
    }
}

/// Why generation of one prompt stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token (EOS, `<|im_end|>`, …).
    EndOfGeneration,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration => "eog",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// One generated continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated text (end-of-generation token excluded, control tokens dropped).
    pub text: String,
    /// Generated token ids (end-of-generation token excluded).
    pub ids: Vec<u32>,
    pub n_prompt_tokens: usize,
    pub stop: StopReason,
    /// Prompt processing + generation time for this prompt.
    pub elapsed: Duration,
}

/// A token as it is generated. `text` holds the UTF-8 completed by this token (possibly empty
/// when a multi-byte character continues in the next token).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent<'a> {
    pub prompt_index: usize,
    pub token: u32,
    pub text: &'a str,
}

impl RtModel {
    /// Generates a continuation for each prompt (chat template with the generation prompt).
    /// `on_token` sees every token as it is produced; returning `ControlFlow::Break(())` stops
    /// the current prompt (stop reason `Cancelled`).
    pub fn generate(
        &self,
        prompts: &[Prompt],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>, RuntimeError> {
        let ids = prompts
            .iter()
            .map(|p| self.encode_prompt(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.generate_from_ids(&ids, opts, on_token)
    }

    /// [`RtModel::generate`] from already tokenized prompts (used as-is: no template, no BOS).
    pub fn generate_from_ids(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>, RuntimeError> {
        opts.sampling.validate()?;
        if opts.threads == Some(0) {
            return Err(RuntimeError::InvalidOption {
                name: "threads",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let limit = opts.n_ctx.unwrap_or_else(|| self.n_ctx_train()).max(1);
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(RuntimeError::BadExample {
                    index: i,
                    detail: "the prompt has no tokens".into(),
                });
            }
            if p.len() >= limit {
                return Err(RuntimeError::TooLong {
                    index: i,
                    len: p.len(),
                    n_ctx: limit,
                });
            }
            self.check_ids(i, p)?;
        }
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let n_ctx = (longest + opts.max_tokens).min(limit);
        let mut ctx = self.new_context(CtxSpec {
            n_ctx,
            n_batch: longest,
            n_ubatch: longest.min(512),
            n_seq_max: 1,
            exact: false,
            threads: opts.threads.unwrap_or_else(|| self.auto_threads()),
            kv_unified: false,
        })?;
        let mut batch = LlamaBatch::new(longest, 1);
        let decode_err = |n_tokens: usize| {
            move |e: llama_cpp_2::DecodeError| RuntimeError::Decode {
                n_tokens,
                detail: e.to_string(),
            }
        };
        let add_err = |e: llama_cpp_2::llama_batch::BatchAddError| RuntimeError::Decode {
            n_tokens: 0,
            detail: format!("building the batch: {e}"),
        };
        let mut results = Vec::with_capacity(prompts.len());
        for (pi, prompt) in prompts.iter().enumerate() {
            let t0 = Instant::now();
            ctx.clear_kv_cache();
            batch.clear();
            let last = prompt.len() - 1;
            for (p, &t) in prompt.iter().enumerate() {
                batch
                    .add(LlamaToken(t as i32), p as i32, &[0], p == last)
                    .map_err(add_err)?;
            }
            ctx.decode(&mut batch).map_err(decode_err(prompt.len()))?;
            let mut sampler = self.build_sampler(&opts.sampling);
            let mut utf8 = Utf8Stream::default();
            let mut ids = Vec::new();
            let mut pos = prompt.len();
            let stop = loop {
                if ids.len() >= opts.max_tokens {
                    break StopReason::MaxTokens;
                }
                let tok = sampler.sample(&ctx, batch.n_tokens() - 1);
                let id = tok.0 as u32;
                if self.model.vocab().is_eog(tok) {
                    break StopReason::EndOfGeneration;
                }
                ids.push(id);
                // The first piece goes through `detokenize`, which drops the space prefix of
                // SPM vocabularies exactly as for the final text, so the streamed pieces
                // always add up to `Generation::text`.
                let piece = if ids.len() == 1 {
                    self.model.vocab().detokenize(&[tok], false, false)
                } else {
                    self.model.vocab().token_to_piece(tok, false, None)
                };
                let text = utf8.push(&piece);
                let flow = on_token(&TokenEvent {
                    prompt_index: pi,
                    token: id,
                    text: &text,
                });
                if flow.is_break() {
                    break StopReason::Cancelled;
                }
                if pos >= n_ctx {
                    break StopReason::ContextFull;
                }
                if ids.len() >= opts.max_tokens {
                    break StopReason::MaxTokens;
                }
                batch.clear();
                batch.add(tok, pos as i32, &[0], true).map_err(add_err)?;
                ctx.decode(&mut batch).map_err(decode_err(1))?;
                pos += 1;
            };
            let tail = utf8.finish();
            if !tail.is_empty() {
                let _ = on_token(&TokenEvent {
                    prompt_index: pi,
                    token: *ids.last().unwrap_or(&0),
                    text: &tail,
                });
            }
            results.push(Generation {
                text: self.detokenize(&ids, false),
                ids,
                n_prompt_tokens: prompt.len(),
                stop,
                elapsed: t0.elapsed(),
            });
        }
        Ok(results)
    }

    /// llama.cpp's usual chain: penalties → top-k → top-p → min-p → temperature → draw.
    fn build_sampler(&self, s: &Sampling) -> LlamaSampler {
        let mut chain = Vec::new();
        if s.repeat_penalty != 1.0 {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                i32::try_from(s.repeat_last_n).unwrap_or(i32::MAX),
                s.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if s.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
            return LlamaSampler::chain_simple(chain);
        }
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(
                i32::try_from(s.top_k).unwrap_or(i32::MAX),
            ));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed));
        LlamaSampler::chain_simple(chain)
    }
}

/// Turns a byte stream into complete UTF-8 text, holding back an unfinished character and
/// replacing invalid bytes with U+FFFD.
#[derive(Default, Debug)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or(""));
                    match e.error_len() {
                        // Unfinished character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut u = Utf8Stream::default();
        let snow = "☃".as_bytes(); // 3 bytes
        assert_eq!(u.push(b"a"), "a");
        assert_eq!(u.push(&snow[..1]), "");
        assert_eq!(u.push(&snow[1..2]), "");
        assert_eq!(u.push(&snow[2..]), "☃");
        assert_eq!(u.push(&[0xff, b'b']), "\u{FFFD}b");
        assert_eq!(u.push(&snow[..2]), "");
        assert_eq!(u.finish(), "\u{FFFD}");
    }

    #[test]
    fn sampling_validation_names_the_option() {
        let s = Sampling {
            top_p: 0.0,
            ..Default::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        assert!(Sampling::greedy().validate().is_ok());
        let s = Sampling {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
