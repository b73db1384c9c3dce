//! Training examples from text through the model's own chat template.
//!
//! Convention (`docs/bfpo-training.md` §1): prompt = template(messages, with the generation
//! prompt, i.e. ending in the assistant header); full = template(messages + assistant response);
//! the scored response is `full − prompt` = the response text, the end-of-turn token and
//! whatever the template appends to close the assistant turn. BOS is added only when the
//! template did not emit it and the vocabulary wants it. The prompt's token ids must be a prefix
//! of the full sequence's (no token merging across the seam), else an error names the example.
//!
//! Every response ends in an end-of-generation token, as TRL's do (TRL's DPO tokenization
//! appends `eos_token_id` to each response): when the last token of the rendered full sequence
//! is not an end-of-generation token (`llama_vocab_is_eog`: EOS, EOT, `<|im_end|>`, …), the
//! model's EOS is appended. With ChatML this gives `…<|im_end|>\n<|im_end|>`, exactly TRL's
//! sequence; with a Zephyr-style template that closes turns with `eos_token`, `…</s>\n</s>`.
//! The last scored token is then checked to be end-of-generation (an error otherwise, e.g.
//! for a vocabulary without EOS).

use super::{ChatRenderer, RtModel, RuntimeError};
use crate::data::{ChatMessage, Example, Pair, Prompt};
use crate::template::TemplateOrigin;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate};
use std::sync::atomic::Ordering;

/// A tokenized example, whether a fallback template rendered it (ChatML for a model without a
/// template, or llama.cpp's guess; see [`RtModel::chat_template_info`]) and whether EOS was
/// appended after the rendered response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub example: Example,
    pub chatml_fallback: bool,
    pub eos_appended: bool,
}

impl RtModel {
    /// Renders `messages` with the chat template in use (`add_generation_prompt` appends the
    /// assistant header): the model's own Jinja template as Hugging Face renders it, or the
    /// fallback named by [`RtModel::chat_template_info`].
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        self.warn_fallback_once();
        match &self.chat {
            ChatRenderer::Jinja(t) => {
                Ok(t.render(messages, add_generation_prompt, &self.special_tokens())?)
            }
            ChatRenderer::LlamaGuess(raw) => self.llama_guess(raw, messages, add_generation_prompt),
        }
    }

    /// llama.cpp's `llama_chat_apply_template` (the named fallback).
    fn llama_guess(
        &self,
        raw: &LlamaChatTemplate,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        let tmpl_err = |detail: String| RuntimeError::Template {
            template: self.template_info.to_string(),
            detail,
        };
        let chat = messages
            .iter()
            .map(|m| {
                LlamaChatMessage::new(m.role.clone(), m.content.clone()).map_err(|_| {
                    tmpl_err(format!(
                        "a {} message contains a NUL byte, which llama.cpp cannot take",
                        m.role
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.model
            .apply_chat_template(raw, &chat, add_generation_prompt)
            .map_err(|e| {
                tmpl_err(format!(
                    "llama.cpp could not apply it either ({e}); llama.cpp recognises known templates (chatml, llama2/3, mistral, zephyr, …) by pattern, not arbitrary Jinja. Pass --chat-template FILE|NAME"
                ))
            })
    }

    /// Token ids of a prompt ready for generation: chat template with the generation prompt,
    /// BOS added when the template did not emit it and the vocabulary wants it.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, RuntimeError> {
        let messages = checked_messages(prompt, "prompt")?;
        let text = self.apply_chat_template(&messages, true)?;
        Ok(self.with_bos(self.tokenize(&text, true)))
    }

    /// Tokenizes a prompt + response into an [`Example`] (see the module docs for the exact
    /// boundary). Errors name the example by a preview of its prompt; use
    /// [`RtModel::encode_named`] to name it by its origin instead.
    pub fn encode(&self, prompt: &Prompt, response: &str) -> Result<Encoded, RuntimeError> {
        let name = format!("example with prompt {:?}", preview(prompt));
        self.encode_named(prompt, response, &name)
    }

    /// [`RtModel::encode`] with a caller-chosen name for error messages (e.g. `file:line`).
    pub fn encode_named(
        &self,
        prompt: &Prompt,
        response: &str,
        name: &str,
    ) -> Result<Encoded, RuntimeError> {
        let bad = |detail: String| RuntimeError::Boundary {
            example: name.to_string(),
            detail,
        };
        let messages = checked_messages(prompt, name)?;
        let prompt_text = self.apply_chat_template(&messages, true)?;
        let mut full_msgs = messages;
        full_msgs.push(ChatMessage::new("assistant", response));
        let full_text = self.apply_chat_template(&full_msgs, false)?;
        if !full_text.starts_with(&prompt_text) {
            let at = common_prefix_len(prompt_text.as_bytes(), full_text.as_bytes());
            return Err(bad(format!(
                "the chat template renders the prompt differently once the response is appended (texts differ at byte {at}: prompt {:?} vs full {:?}); this template cannot be split into prompt and response",
                snippet(&prompt_text, at),
                snippet(&full_text, at)
            )));
        }
        let prompt_ids = self.with_bos(self.tokenize(&prompt_text, true));
        let mut full_ids = self.with_bos(self.tokenize(&full_text, true));
        if !full_ids.starts_with(&prompt_ids) {
            let at = common_prefix_len(&prompt_ids, &full_ids);
            let window = |ids: &[u32]| ids[at.saturating_sub(2)..(at + 3).min(ids.len())].to_vec();
            return Err(bad(format!(
                "the prompt's {} tokens are not a prefix of the full sequence's {} tokens: they differ at token {at} (prompt {:?} vs full {:?}), i.e. the tokenizer merges text across the prompt/response seam",
                prompt_ids.len(),
                full_ids.len(),
                window(&prompt_ids),
                window(&full_ids)
            )));
        }
        if prompt_ids.is_empty() {
            return Err(bad(
                "the prompt renders to zero tokens, so the first response token has nothing to be predicted from".to_string(),
            ));
        }
        if full_ids.len() == prompt_ids.len() {
            return Err(bad(
                "the response adds no tokens after the prompt (empty response and a template without an end-of-turn marker)".to_string(),
            ));
        }
        // Responses end in an end-of-generation token, as TRL's do.
        let last = *full_ids.last().expect("longer than the non-empty prompt");
        let eos_appended = !self.is_eog(last);
        if eos_appended {
            match self.eos() {
                Some(eos) => full_ids.push(eos),
                None => {
                    return Err(bad(format!(
                        "the rendered response ends in token {last} ({:?}), which does not end generation, and the model has no EOS token to append",
                        self.detokenize(&[last], true)
                    )));
                }
            }
        }
        let last = *full_ids.last().expect("not empty");
        if !self.is_eog(last) {
            return Err(bad(format!(
                "the last scored token {last} ({:?}) is not an end-of-generation token (the model's EOS is not marked end-of-generation in its vocabulary)",
                self.detokenize(&[last], true)
            )));
        }
        Ok(Encoded {
            example: Example {
                response_start: prompt_ids.len(),
                ids: full_ids,
            },
            chatml_fallback: matches!(self.template_info.origin, TemplateOrigin::FallbackChatml),
            eos_appended,
        })
    }

    /// Encodes both responses of a preference pair; errors name the pair's `file:line`.
    pub fn encode_pair(&self, pair: &Pair) -> Result<(Example, Example), RuntimeError> {
        let origin = pair.origin.to_string();
        let chosen =
            self.encode_named(&pair.prompt, &pair.chosen, &format!("{origin} (chosen)"))?;
        let rejected = self.encode_named(
            &pair.prompt,
            &pair.rejected,
            &format!("{origin} (rejected)"),
        )?;
        Ok((chosen.example, rejected.example))
    }

    /// Prepends BOS when the vocabulary wants one and the sequence does not start with it.
    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if self.should_add_bos()
            && let Some(bos) = self.bos()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        ids
    }

    fn warn_fallback_once(&self) {
        if self.template_info.is_fallback() && !self.fallback_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                model = %self.path.display(),
                "chat template: {}", self.template_info
            );
        }
    }
}

/// The prompt's messages, checked: not empty, and not ending in an assistant turn.
fn checked_messages(prompt: &Prompt, name: &str) -> Result<Vec<ChatMessage>, RuntimeError> {
    let messages = prompt.messages();
    let bad = |detail: &str| RuntimeError::Boundary {
        example: name.to_string(),
        detail: detail.to_string(),
    };
    match messages.last() {
        None => Err(bad("the prompt has no messages")),
        Some(m) if m.role == "assistant" => Err(bad(
            "the prompt ends with an assistant message; it must end with the user turn the response answers",
        )),
        Some(_) => Ok(messages),
    }
}

fn common_prefix_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Up to 24 characters of `s` starting near byte `at`.
fn snippet(s: &str, at: usize) -> String {
    let mut start = at.saturating_sub(8).min(s.len());
    while !s.is_char_boundary(start) {
        start -= 1;
    }
    s[start..].chars().take(24).collect()
}

/// The first 60 characters of the last message of a prompt.
pub(crate) fn preview(prompt: &Prompt) -> String {
    let text = match prompt {
        Prompt::Text(t) => t.as_str(),
        Prompt::Messages(m) => m.last().map(|m| m.content.as_str()).unwrap_or(""),
    };
    let mut p: String = text.chars().take(60).collect();
    if text.chars().count() > 60 {
        p.push('…');
    }
    p
}
