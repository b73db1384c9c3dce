//! The units of training data: a preference pair as read from a dataset, and a tokenized example.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A prompt: plain text (one user turn) or a conversation ending in a user turn.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Messages(Vec<ChatMessage>),
}

impl Prompt {
    /// The conversation as messages (a text prompt becomes one user message).
    pub fn messages(&self) -> Vec<ChatMessage> {
        match self {
            Prompt::Text(t) => vec![ChatMessage::new("user", t.clone())],
            Prompt::Messages(m) => m.clone(),
        }
    }
}

/// Where a row came from, for error messages and skip reports (`file:line`, 1-based line).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowOrigin {
    pub file: Arc<str>,
    pub line: usize,
}

impl std::fmt::Display for RowOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A preference pair with safety labels. `chosen` is the **more helpful** response (BFPO's
/// y_hw), `rejected` the less helpful; each carries its own safety label (true = safe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub prompt: Prompt,
    pub chosen: String,
    pub rejected: String,
    pub chosen_safe: bool,
    pub rejected_safe: bool,
    pub origin: RowOrigin,
}

/// A tokenized prompt + response. Tokens `ids[response_start..]` are scored: token `i` is
/// predicted from position `i - 1`. `response_start >= 1` always.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Example {
    pub ids: Vec<u32>,
    pub response_start: usize,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Number of scored (response) tokens.
    pub fn n_scored(&self) -> usize {
        self.ids.len().saturating_sub(self.response_start)
    }
}
