//! Chat templates rendered the way Hugging Face transformers renders them
//! (`tokenizer.apply_chat_template`), with the `minijinja` engine.
//!
//! A model's `tokenizer.chat_template` is Jinja. transformers compiles it in a sandboxed Jinja
//! environment with `trim_blocks=True`, `lstrip_blocks=True` and the `loopcontrols` extension,
//! adds the globals `raise_exception(message)` and `strftime_now(format)` and a `tojson`
//! filter, and renders it with `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `tools` and `documents` (`None` here: bfpo-lite has neither) and the tokenizer's special
//! tokens (`bos_token`, `eos_token`). [`ChatTemplate`] does the same with minijinja, plus
//! minijinja-contrib's Python string/dict/list methods (`.strip()`, `.startswith()`,
//! `.items()`, …) that templates call.
//!
//! Differences that remain: `strftime_now` uses UTC (transformers uses local time), and
//! minijinja's `tojson` escapes `<`, `>`, `&` and `'` as `\u003c`… (transformers' does not);
//! the `{% generation %}` tag of transformers' assistant-mask extension is not supported (such
//! templates fail to compile, and the runtime then falls back to llama.cpp's built-in guess).
//!
//! Templates come from the model ([`TemplateOrigin::Model`]), a file or a built-in name
//! ([`ChatTemplate::resolve`], `--chat-template FILE|NAME`). [`TemplateInfo`] records which one
//! is in use and whether it was a fallback, for the CLI to print.

mod builtin;
mod strftime;

pub use builtin::{BUILTIN_NAMES, builtin_for_arch, builtin_source};

use crate::data::ChatMessage;
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Name under which the template is compiled inside its minijinja environment.
const TEMPLATE_KEY: &str = "chat_template";
/// Prefix marking an error raised by the template itself through `raise_exception`.
const RAISED_MARK: &str = "raise_exception: ";

/// Errors from loading, compiling or rendering a chat template. Each names the template and,
/// where the engine knows it, the template line.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read chat template file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "chat template {spec:?} is neither a readable file nor a built-in name; built-in names: {}",
        BUILTIN_NAMES.join(", ")
    )]
    Unknown { spec: String },
    #[error("chat template {template}{}: cannot compile it: {detail}", at_line(*line))]
    Syntax {
        template: String,
        line: Option<usize>,
        detail: String,
    },
    #[error("chat template {template}{}: the template raised an exception: {message}", at_line(*line))]
    Raised {
        template: String,
        line: Option<usize>,
        message: String,
    },
    #[error("chat template {template}{}: cannot render it: {detail}", at_line(*line))]
    Render {
        template: String,
        line: Option<usize>,
        detail: String,
    },
}

impl TemplateError {
    /// True when the error comes from what minijinja supports (syntax, unknown filter, test or
    /// method), not from the template's own `raise_exception`: the template may still be fine
    /// for Jinja2, and a caller may fall back to another renderer.
    pub fn is_engine_limitation(&self) -> bool {
        matches!(
            self,
            TemplateError::Syntax { .. } | TemplateError::Render { .. }
        )
    }
}

fn at_line(line: Option<usize>) -> String {
    match line {
        Some(l) => format!(", line {l}"),
        None => String::new(),
    }
}

/// Where the template in use came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// The model's own `tokenizer.chat_template`, rendered with minijinja.
    Model,
    /// `--chat-template FILE`.
    File(PathBuf),
    /// `--chat-template NAME`, one of [`BUILTIN_NAMES`].
    Builtin(String),
    /// Fallback: the model has no `tokenizer.chat_template`; the built-in ChatML is used.
    FallbackChatml,
    /// Fallback: minijinja cannot render the model's template (`reason`); llama.cpp's built-in
    /// guess (`llama_chat_apply_template`, which matches the template text against known
    /// formats) renders it instead; `guess` is the format the text looks like.
    FallbackLlamaGuess { guess: String, reason: String },
}

/// Which template renders a model's conversations, for the user to see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateInfo {
    pub origin: TemplateOrigin,
    /// A short name: the format the template text looks like (`chatml`, `llama3`, …), the
    /// built-in name or the file name.
    pub name: String,
    /// The `enable_thinking` variable it is rendered with (`None`: undefined).
    pub enable_thinking: Option<bool>,
    /// For [`TemplateOrigin::FallbackChatml`]: the built-in for the model's architecture, if
    /// one fits ([`builtin_for_arch`]).
    pub suggested: Option<&'static str>,
}

impl TemplateInfo {
    /// True for both fallbacks (no template; template minijinja cannot render).
    pub fn is_fallback(&self) -> bool {
        matches!(
            self.origin,
            TemplateOrigin::FallbackChatml | TemplateOrigin::FallbackLlamaGuess { .. }
        )
    }
}

impl fmt::Display for TemplateInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_origin(f)?;
        match self.enable_thinking {
            Some(t) => write!(f, " [enable_thinking={t}]"),
            None => Ok(()),
        }
    }
}

impl TemplateInfo {
    fn fmt_origin(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            TemplateOrigin::Model if self.name == UNKNOWN_FORMAT => write!(
                f,
                "the model's own tokenizer.chat_template (not a format bfpo-lite names), rendered as Hugging Face does"
            ),
            TemplateOrigin::Model => write!(
                f,
                "the model's own tokenizer.chat_template ({}-like), rendered as Hugging Face does",
                self.name
            ),
            TemplateOrigin::File(p) => write!(f, "file {} (--chat-template)", p.display()),
            TemplateOrigin::Builtin(n) => write!(f, "built-in {n} (--chat-template)"),
            TemplateOrigin::FallbackChatml => {
                write!(
                    f,
                    "FALLBACK ChatML: the model has no tokenizer.chat_template (a base model?). Pass --chat-template NAME, a built-in: {}",
                    BUILTIN_NAMES.join(", ")
                )?;
                if let Some(s) = self.suggested {
                    write!(f, " (for this architecture: --chat-template {s})")?;
                }
                write!(
                    f,
                    "; or --chat-template FILE, a Jinja file (the `chat_template` string of the instruct model's tokenizer_config.json)"
                )
            }
            TemplateOrigin::FallbackLlamaGuess { guess, reason } => write!(
                f,
                "FALLBACK llama.cpp's built-in guess ({guess}-like): the model's template cannot be rendered with minijinja ({reason}); the rendering may differ from Hugging Face's (pass --chat-template FILE|NAME to choose one)"
            ),
        }
    }
}

/// Special-token texts a template can use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    name: String,
    origin: TemplateOrigin,
    source: String,
    env: Environment<'static>,
    enable_thinking: Option<bool>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `name` appears in errors and in [`TemplateInfo`].
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        origin: TemplateOrigin,
    ) -> Result<ChatTemplate, TemplateError> {
        let name = name.into();
        let source = source.into();
        let mut env = hf_environment();
        env.add_template_owned(TEMPLATE_KEY, source.clone())
            .map_err(|e| convert(&name, &e, true))?;
        Ok(ChatTemplate {
            name,
            origin,
            source,
            env,
            enable_thinking: None,
        })
    }

    /// The model's own template text.
    pub fn from_model(source: &str) -> Result<ChatTemplate, TemplateError> {
        ChatTemplate::new("tokenizer.chat_template", source, TemplateOrigin::Model)
    }

    /// One of [`BUILTIN_NAMES`].
    pub fn builtin(name: &str) -> Option<ChatTemplate> {
        let src = builtin_source(name)?;
        Some(
            ChatTemplate::new(
                format!("built-in {name}"),
                src,
                TemplateOrigin::Builtin(name.to_string()),
            )
            .expect("built-in templates compile (tested)"),
        )
    }

    /// Reads a template file (Jinja text, as in `tokenizer_config.json`'s `chat_template`).
    pub fn from_file(path: &Path) -> Result<ChatTemplate, TemplateError> {
        let src = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ChatTemplate::new(
            path.display().to_string(),
            src,
            TemplateOrigin::File(path.to_path_buf()),
        )
    }

    /// `--chat-template FILE|NAME`: an existing file, else a built-in name.
    pub fn resolve(spec: &str) -> Result<ChatTemplate, TemplateError> {
        let path = Path::new(spec);
        if path.is_file() {
            return ChatTemplate::from_file(path);
        }
        if let Some(t) = ChatTemplate::builtin(spec) {
            return Ok(t);
        }
        if path.exists() || spec.contains('/') || spec.contains('.') {
            // Looks like a path: report the read error.
            return ChatTemplate::from_file(path);
        }
        Err(TemplateError::Unknown {
            spec: spec.to_string(),
        })
    }

    /// Sets the Jinja variable `enable_thinking` (what `apply_chat_template(...,
    /// enable_thinking=...)` passes in transformers; Qwen3's template reads it). `None` leaves
    /// it undefined, so the template's own default applies (Qwen3: thinking on).
    pub fn set_enable_thinking(&mut self, value: Option<bool>) {
        self.enable_thinking = value;
    }
    /// The `enable_thinking` the template is rendered with (`None`: undefined).
    pub fn enable_thinking(&self) -> Option<bool> {
        self.enable_thinking
    }
    /// True when the template reads `enable_thinking` (so the flag changes its output).
    pub fn reads_enable_thinking(&self) -> bool {
        self.source.contains("enable_thinking")
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }
    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// What to tell the user about this template.
    pub fn info(&self) -> TemplateInfo {
        let name = match &self.origin {
            TemplateOrigin::Builtin(n) => n.clone(),
            TemplateOrigin::File(p) => p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            _ => looks_like(&self.source).to_string(),
        };
        TemplateInfo {
            origin: self.origin.clone(),
            name,
            enable_thinking: self.enable_thinking,
            suggested: None,
        }
    }

    /// Renders `messages` as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does (with `enable_thinking=...` when it is set).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokens: &SpecialTokens,
    ) -> Result<String, TemplateError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role".to_string(), Value::from(m.role.as_str()));
                map.insert("content".to_string(), Value::from(m.content.as_str()));
                Value::from(map)
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        if let Some(b) = &tokens.bos_token {
            ctx.insert("bos_token".into(), Value::from(b.as_str()));
        }
        if let Some(e) = &tokens.eos_token {
            ctx.insert("eos_token".into(), Value::from(e.as_str()));
        }
        if let Some(t) = self.enable_thinking {
            ctx.insert("enable_thinking".into(), Value::from(t));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_KEY)
            .map_err(|e| convert(&self.name, &e, true))?;
        tmpl.render(Value::from(ctx))
            .map_err(|e| convert(&self.name, &e, false))
    }
}

/// A minijinja environment configured like transformers' chat-template environment.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, _> {
        Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("{RAISED_MARK}{message}"),
        ))
    });
    env.add_function("strftime_now", |format: String| {
        strftime::format_now_utc(&format)
            .map(Value::from)
            .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
    });
    env
}

/// Turns a minijinja error into ours (the detail walks the error's source chain).
fn convert(template: &str, e: &minijinja::Error, compiling: bool) -> TemplateError {
    let mut line = e.line();
    let mut detail = e.detail().map(str::to_string);
    // Errors from included calls carry the original in the source chain.
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(inner) = s.downcast_ref::<minijinja::Error>() {
            if line.is_none() {
                line = inner.line();
            }
            if let Some(d) = inner.detail()
                && d.starts_with(RAISED_MARK)
            {
                detail = Some(d.to_string());
            }
        }
        src = s.source();
    }
    if let Some(d) = &detail
        && let Some(message) = d.strip_prefix(RAISED_MARK)
    {
        return TemplateError::Raised {
            template: template.to_string(),
            line,
            message: message.to_string(),
        };
    }
    let detail = match detail {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if compiling || e.kind() == ErrorKind::SyntaxError {
        TemplateError::Syntax {
            template: template.to_string(),
            line,
            detail,
        }
    } else {
        TemplateError::Render {
            template: template.to_string(),
            line,
            detail,
        }
    }
}

/// What [`looks_like`] says of a template that matches no format it knows.
pub const UNKNOWN_FORMAT: &str = "unknown format";

/// The known format a template's text looks like, for names and messages.
pub fn looks_like(source: &str) -> &'static str {
    if source.contains("<|im_start|>") {
        "chatml"
    } else if source.contains("<|start_header_id|>") {
        "llama3"
    } else if source.contains("<start_of_turn>") {
        "gemma"
    } else if source.contains("[INST]") {
        "llama2/mistral"
    } else if source.contains("<|user|>") {
        "zephyr"
    } else {
        UNKNOWN_FORMAT
    }
}
