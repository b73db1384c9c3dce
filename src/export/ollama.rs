//! `export --format ollama`: a folder with the GGUF adapter and a `Modelfile` that
//! `ollama create NAME -f Modelfile` turns into a model: `FROM` the base GGUF, `ADAPTER` the
//! adapter (both paths as the Modelfile documentation allows: absolute, or relative to the
//! Modelfile), `TEMPLATE` in Ollama's Go-template syntax for the model's chat format and one
//! `PARAMETER stop` per end-of-turn marker.
//!
//! The templates range over `.Messages` (each with `.Role` and `.Content`; Ollama puts a
//! Modelfile `SYSTEM` or the request's system prompt first in it) and write the turns exactly as
//! the Hugging Face chat template of that format does, ending with the assistant header when the
//! last message is not the assistant's (a generation prompt), and leaving a last assistant
//! message open (a continuation). BOS is not written: the runner adds it as llama.cpp does.

use super::ExportError;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The chat formats a Modelfile template is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OllamaFormat {
    /// `<|im_start|>role\n…<|im_end|>\n` (Qwen2/2.5/3, SmolLM2, ChatML).
    Chatml,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3.x).
    Llama3,
    /// `<start_of_turn>user\n…<end_of_turn>\n`, assistant as `model`, the system text before
    /// the first user turn's text (Gemma, Gemma 3).
    Gemma,
    /// `<|user|>\n…EOS\n` (Zephyr).
    Zephyr,
}

/// The formats by the names [`crate::template::looks_like`] gives.
pub const OLLAMA_FORMATS: &[&str] = &["chatml", "llama3", "gemma", "zephyr"];

impl OllamaFormat {
    /// The format of a chat template, by what its text looks like.
    pub fn of_template(source: &str) -> Result<OllamaFormat, ExportError> {
        let looks = crate::template::looks_like(source);
        Ok(match looks {
            "chatml" => OllamaFormat::Chatml,
            "llama3" => OllamaFormat::Llama3,
            "gemma" => OllamaFormat::Gemma,
            "zephyr" => OllamaFormat::Zephyr,
            other => {
                return Err(ExportError::OllamaFormat {
                    looks_like: other.to_string(),
                });
            }
        })
    }

    /// The Go template. `empty_think`: after the generation prompt, the empty
    /// `<think>\n\n</think>\n\n` a Qwen3 template writes with `enable_thinking=false`.
    pub fn template(self, eos: &str, empty_think: bool) -> String {
        // Generation prompt (after the last non-assistant message) and one finished turn.
        let (gen_prompt, turn_open, turn_close) = match self {
            OllamaFormat::Chatml => (
                "<|im_start|>assistant\n".to_string(),
                "<|im_start|>{{ $m.Role }}\n",
                "<|im_end|>\n".to_string(),
            ),
            OllamaFormat::Llama3 => (
                "<|start_header_id|>assistant<|end_header_id|>\n\n".to_string(),
                "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n",
                "<|eot_id|>".to_string(),
            ),
            OllamaFormat::Zephyr => (
                "<|assistant|>\n".to_string(),
                "<|{{ $m.Role }}|>\n",
                format!("{eos}\n"),
            ),
            OllamaFormat::Gemma => return gemma_template(empty_think),
        };
        let gen_prompt = if empty_think {
            format!("{gen_prompt}<think>\n\n</think>\n\n")
        } else {
            gen_prompt
        };
        let mut t = String::new();
        t.push_str("{{- range $i, $m := .Messages }}\n");
        t.push_str("{{- $last := eq (len (slice $.Messages $i)) 1 }}\n");
        // A last assistant message stays open: the model continues it.
        t.push_str("{{- if and $last (eq $m.Role \"assistant\") }}");
        t.push_str(&turn_open.replace("{{ $m.Role }}", "assistant"));
        t.push_str("{{ $m.Content }}\n");
        t.push_str("{{- else }}");
        t.push_str(turn_open);
        t.push_str("{{ $m.Content }}");
        t.push_str(&turn_close);
        t.push_str("{{ if $last }}");
        t.push_str(&gen_prompt);
        t.push_str("{{ end }}\n");
        t.push_str("{{- end }}\n");
        t.push_str("{{- end }}");
        t
    }

    /// `PARAMETER stop` values: the end-of-turn markers (and `eos`, the model's EOS text).
    pub fn stops(self, eos: Option<&str>) -> Vec<String> {
        let mut s: Vec<String> = match self {
            OllamaFormat::Chatml => vec!["<|im_end|>".into(), "<|im_start|>".into()],
            OllamaFormat::Llama3 => vec![
                "<|eot_id|>".into(),
                "<|start_header_id|>".into(),
                "<|end_header_id|>".into(),
            ],
            OllamaFormat::Gemma => vec!["<end_of_turn>".into()],
            OllamaFormat::Zephyr => vec!["<|user|>".into()],
        };
        if let Some(e) = eos.filter(|e| !e.is_empty() && !s.iter().any(|x| x == e)) {
            s.push(e.to_string());
        }
        s
    }
}

/// Gemma's turns: a system message is held and written before the next user turn's text,
/// followed by a blank line (Gemma 3's template); the assistant is `model`.
fn gemma_template(empty_think: bool) -> String {
    let gen_prompt = if empty_think {
        "<start_of_turn>model\n<think>\n\n</think>\n\n"
    } else {
        "<start_of_turn>model\n"
    };
    let mut t = String::new();
    t.push_str("{{- $sys := \"\" }}\n");
    t.push_str("{{- range $i, $m := .Messages }}\n");
    t.push_str("{{- $last := eq (len (slice $.Messages $i)) 1 }}\n");
    t.push_str("{{- if eq $m.Role \"system\" }}{{ $sys = $m.Content }}\n");
    t.push_str("{{- else if eq $m.Role \"user\" }}<start_of_turn>user\n");
    t.push_str("{{ if $sys }}{{ $sys }}\n\n{{ $sys = \"\" }}{{ end }}");
    t.push_str("{{ $m.Content }}<end_of_turn>\n");
    t.push_str("{{ if $last }}");
    t.push_str(gen_prompt);
    t.push_str("{{ end }}\n");
    t.push_str("{{- else if eq $m.Role \"assistant\" }}<start_of_turn>model\n");
    t.push_str("{{ $m.Content }}{{ if not $last }}<end_of_turn>\n{{ end }}\n");
    t.push_str("{{- end }}\n");
    t.push_str("{{- end }}");
    t
}

/// What goes into a Modelfile.
#[derive(Clone, Debug)]
pub struct Modelfile {
    /// The base GGUF (written as an absolute path).
    pub from: PathBuf,
    /// The adapter, relative to the Modelfile's folder.
    pub adapter: String,
    pub format: OllamaFormat,
    /// The base model's EOS text, if any.
    pub eos: Option<String>,
    /// Qwen3 trained with `enable_thinking=false`: the empty think block after the prompt.
    pub empty_think: bool,
}

impl Modelfile {
    /// The Modelfile text. Paths must not contain a newline or `"` (the Modelfile has no way
    /// to write them).
    pub fn render(&self) -> Result<String, ExportError> {
        let from = self.from.display().to_string();
        for p in [&from, &self.adapter] {
            if p.contains('\n') || p.contains('"') {
                return Err(ExportError::Other(format!(
                    "{p:?}: a Modelfile path cannot contain a newline or a double quote; move the file"
                )));
            }
        }
        let eos = self.eos.as_deref().unwrap_or("</s>");
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Written by bfpo-lite {} (export --format ollama).",
            crate::VERSION
        );
        let _ = writeln!(
            s,
            "# In this folder: ollama create NAME -f Modelfile && ollama run NAME"
        );
        let _ = writeln!(s, "FROM {}", quote_path(&from));
        let _ = writeln!(s, "ADAPTER {}", quote_path(&self.adapter));
        let _ = writeln!(
            s,
            "TEMPLATE \"\"\"{}\"\"\"",
            self.format.template(eos, self.empty_think)
        );
        for stop in self.format.stops(self.eos.as_deref()) {
            let _ = writeln!(s, "PARAMETER stop \"{stop}\"");
        }
        Ok(s)
    }
}

/// A path argument, quoted when it has spaces.
fn quote_path(p: &str) -> String {
    if p.contains(char::is_whitespace) {
        format!("\"{p}\"")
    } else {
        p.to_string()
    }
}

/// The absolute form of `path` for `FROM` (the Modelfile may be used from anywhere).
pub fn absolute(path: &Path) -> Result<PathBuf, ExportError> {
    std::fs::canonicalize(path).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_template_text() {
        use crate::template::builtin_source as b;
        let f = |n| OllamaFormat::of_template(b(n).unwrap()).unwrap();
        assert_eq!(f("chatml"), OllamaFormat::Chatml);
        assert_eq!(f("qwen3"), OllamaFormat::Chatml);
        assert_eq!(f("llama3"), OllamaFormat::Llama3);
        assert_eq!(f("gemma3"), OllamaFormat::Gemma);
        assert_eq!(f("zephyr"), OllamaFormat::Zephyr);
        let e = OllamaFormat::of_template("{{ messages }}").unwrap_err();
        assert!(
            e.to_string().contains("chatml, llama3, gemma, zephyr"),
            "{e}"
        );
    }
}
