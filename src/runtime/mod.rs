//! llama.cpp runtime: tokenizing with the model's own chat template, scoring (per-token
//! log-probs), generation, and LoRA adapters. This module is the only code in bfpo-lite that
//! touches `llama-cpp-2` / `llama-cpp-sys-2`.
//!
//! Design (facts in `docs/llama-cpp.md`; hazards are its §6):
//! - One process-wide llama.cpp backend ([`backend`]), initialised on first use; llama.cpp's own
//!   logging is silenced unless [`route_llama_logs_to_tracing`] was called first.
//! - [`RtModel`] owns a memory-mapped `LlamaModel`. Contexts are created **per call** (score,
//!   generate, logits) and dropped before the call returns, so `&mut RtModel` always means "no
//!   context exists": that is when adapters can be loaded and freed (hazards 2 and 3).
//! - One adapter can be active at a time ([`RtModel::set_adapter`]); it is applied to every
//!   context created afterwards. Adapters are validated with our own GGUF reader before
//!   llama.cpp sees them (llama.cpp aborts the process on some bad adapters, hazard 1).

mod adapter;
mod encode;
mod generate;
mod score;

pub use crate::template::TemplateInfo as ChatTemplateInfo;
pub use adapter::{AdapterId, AdapterInfo, validate_adapter};
pub use encode::Encoded;
pub use generate::{GenerateOptions, Generation, Sampling, StopReason, TokenEvent};
pub use score::{ScoreOptions, log_softmax_at};

use crate::data::ChatMessage;
use crate::gguf::GgufError;
use crate::template::{
    self, ChatTemplate, SpecialTokens, TemplateInfo, TemplateOrigin, builtin_source,
};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LogOptions, send_logs_to_tracing};
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Everything that can go wrong in the runtime; messages carry the numbers and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    #[error(
        "model file {path} does not exist; check the path (or make a test model with `bfpo-lite init-model`)"
    )]
    ModelNotFound { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a GGUF file: its first bytes are {found:02x?}, expected \"GGUF\"; pass a .gguf model (convert Hugging Face models with llama.cpp's convert_hf_to_gguf.py)"
    )]
    NotGguf { path: PathBuf, found: Vec<u8> },
    #[error(
        "llama.cpp could not load {path} ({detail}); run with -v to see llama.cpp's log, and `bfpo-lite info` to inspect the file"
    )]
    ModelLoad { path: PathBuf, detail: String },
    #[error(
        "llama.cpp could not create a context (n_ctx {n_ctx}, n_batch {n_batch}, {n_seq} sequences): {detail}; lower the batch size or the context length"
    )]
    Context {
        n_ctx: usize,
        n_batch: usize,
        n_seq: usize,
        detail: String,
    },
    #[error("chat template ({template}): {detail}")]
    Template { template: String, detail: String },
    #[error(transparent)]
    ChatTemplate(#[from] crate::template::TemplateError),
    #[error("{example}: {detail}")]
    Boundary { example: String, detail: String },
    #[error(
        "example {index}: {len} tokens do not fit the context of {n_ctx} tokens; shorten the prompt or response, or raise the context length"
    )]
    TooLong {
        index: usize,
        len: usize,
        n_ctx: usize,
    },
    #[error("example {index}: {detail}")]
    BadExample { index: usize, detail: String },
    #[error("llama_decode failed ({detail}) on a batch of {n_tokens} tokens")]
    Decode { n_tokens: usize, detail: String },
    #[error(
        "example {index}, position {position}: the logits are not finite (saw {value}); the model weights or the adapter are broken"
    )]
    NonFinite {
        index: usize,
        position: usize,
        value: f32,
    },
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("cannot read the base model's tensor shapes from {path}: {source}")]
    BaseGguf {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },
    #[error("adapter {path} is not a readable GGUF file: {source}")]
    AdapterGguf {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },
    #[error(
        "adapter {path} is for architecture {adapter:?} but the model is {model:?}; use an adapter trained on this base model"
    )]
    AdapterArch {
        path: PathBuf,
        adapter: String,
        model: String,
    },
    #[error(
        "adapter {path} has a LoRA on token_embd.weight but the model ties its embeddings (it has no output.weight); llama.cpp would abort the process on it. Re-export the adapter without token_embd"
    )]
    AdapterTiedEmbedding { path: PathBuf },
    #[error(
        "adapter {path}: tensor {tensor}.{missing} is missing (every LoRA target needs both lora_a and lora_b)"
    )]
    AdapterMissingHalf {
        path: PathBuf,
        tensor: String,
        missing: &'static str,
    },
    #[error("{0}")]
    AdapterShape(Box<AdapterShapeError>),
    #[error("adapter {path}: {detail}")]
    Adapter { path: PathBuf, detail: String },
    #[error("adapter id {0} is not loaded (it was freed, or belongs to another model)")]
    UnknownAdapter(usize),
}

/// A LoRA half whose shape does not fit its base tensor (boxed inside [`RuntimeError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "adapter {path}: {tensor} has shape {found:?} but the base tensor {base} has shape {base_shape:?}, so it must be {expected:?}; the adapter was made for a different base model"
)]
pub struct AdapterShapeError {
    pub path: PathBuf,
    pub tensor: String,
    pub found: Vec<u64>,
    pub expected: Vec<u64>,
    pub base: String,
    pub base_shape: Vec<u64>,
}

// ---------------------------------------------------------------------------------------------
// Backend and logging
// ---------------------------------------------------------------------------------------------

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
static LOGS_TO_TRACING: AtomicBool = AtomicBool::new(false);
/// `LlamaModel::new_context` mutates the model and is unsound in parallel: serialise it.
static CONTEXT_LOCK: Mutex<()> = Mutex::new(());

/// Routes llama.cpp's and ggml's log lines to `tracing` (target `llama-cpp-2`) instead of
/// discarding them. Must be called before the first model is loaded; returns `false` when it
/// is too late (the backend already exists with logging silenced).
pub fn route_llama_logs_to_tracing() -> bool {
    LOGS_TO_TRACING.store(true, Ordering::SeqCst);
    BACKEND.get().is_none()
}

/// The process-wide llama.cpp backend (llama.cpp allows one initialisation per process).
pub fn backend() -> Result<&'static LlamaBackend, RuntimeError> {
    let b = BACKEND.get_or_init(|| {
        let to_tracing = LOGS_TO_TRACING.load(Ordering::SeqCst);
        // The tracing states inside llama-cpp-2 are set once; with logs disabled nothing is
        // forwarded, and `void_logs` replaces llama.cpp's (and ggml's) callback by a no-op.
        send_logs_to_tracing(LogOptions::default().with_logs_enabled(to_tracing));
        match LlamaBackend::init() {
            Ok(mut b) => {
                if !to_tracing {
                    b.void_logs();
                }
                Ok(b)
            }
            Err(e) => Err(e.to_string()),
        }
    });
    b.as_ref().map_err(|e| RuntimeError::Backend(e.clone()))
}

/// Whether this build can offload layers to a GPU (features `metal`, `vulkan`, `cuda`).
pub fn supports_gpu_offload() -> bool {
    backend().map(|b| b.supports_gpu_offload()).unwrap_or(false)
}

/// Every available core.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
}

/// Below this many parameters a decode is over before extra threads pay off; ggml's spinning
/// thread barrier then only costs time (1000× on an oversubscribed 2-core machine).
const SMALL_MODEL_PARAMS: u64 = 20_000_000;

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// How to load a model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Layers to offload to a GPU (only with the `metal`/`vulkan`/`cuda` features; 0 = CPU).
    pub n_gpu_layers: u32,
}

/// A model loaded into llama.cpp (memory-mapped), with its chat template and adapters.
pub struct RtModel {
    model: LlamaModel,
    path: PathBuf,
    arch: String,
    chat: ChatRenderer,
    template_info: TemplateInfo,
    fallback_warned: AtomicBool,
    adapters: Vec<Option<adapter::AdapterSlot>>,
    active: Option<(AdapterId, f32)>,
    base_tensors: Option<adapter::BaseTensors>,
}

/// Parameters of one context (created per call).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CtxSpec {
    pub n_ctx: usize,
    pub n_batch: usize,
    pub n_ubatch: usize,
    pub n_seq_max: usize,
    /// F32 KV cache, flash attention off.
    pub exact: bool,
    pub threads: usize,
    pub kv_unified: bool,
}

impl RtModel {
    /// Loads a GGUF model (memory-mapped). Checks that the file exists and is GGUF first, so
    /// those mistakes get a clear message instead of llama.cpp's log.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<RtModel, RuntimeError> {
        check_gguf_magic(path)?;
        let backend = backend()?;
        let params = LlamaModelParams::default()
            .with_use_mmap(true)
            .with_n_gpu_layers(opts.n_gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            RuntimeError::ModelLoad {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        let arch = model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        let (chat, mut template_info) = model_template(&model);
        if template_info.origin == TemplateOrigin::FallbackChatml {
            template_info.suggested = template::builtin_for_arch(&arch);
        }
        tracing::debug!(path = %path.display(), %arch, template = %template_info, "loaded model");
        Ok(RtModel {
            model,
            path: path.to_path_buf(),
            arch,
            chat,
            template_info,
            fallback_warned: AtomicBool::new(false),
            adapters: Vec::new(),
            active: None,
            base_tensors: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `general.architecture` as llama.cpp read it.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab().max(0) as usize
    }
    pub fn n_embd(&self) -> usize {
        self.model.n_embd().max(0) as usize
    }
    pub fn n_layer(&self) -> usize {
        self.model.n_layer() as usize
    }
    /// The training context length from the model's metadata.
    pub fn n_ctx_train(&self) -> usize {
        self.model.n_ctx_train() as usize
    }
    /// Parameter count (elements of all tensors).
    pub fn n_params(&self) -> u64 {
        self.model.n_params()
    }
    /// Threads used per decode when not told otherwise: 1 for tiny models (under 20 M
    /// parameters), every core otherwise.
    pub fn auto_threads(&self) -> usize {
        if self.n_params() < SMALL_MODEL_PARAMS {
            1
        } else {
            available_cores()
        }
    }
    /// True when a fallback renders conversations: ChatML (the model has no chat template) or
    /// llama.cpp's built-in guess (minijinja cannot render the model's template).
    pub fn chat_template_fallback(&self) -> bool {
        self.template_info.is_fallback()
    }
    /// A short name of the chat template in use (`chatml`, `llama3`, a file name, …).
    pub fn chat_template_name(&self) -> &str {
        &self.template_info.name
    }
    /// Which chat template renders conversations and where it came from (print it).
    pub fn chat_template_info(&self) -> &TemplateInfo {
        &self.template_info
    }
    /// Replaces the chat template (`--chat-template FILE|NAME`).
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        self.template_info = template.info();
        self.chat = ChatRenderer::Jinja(Box::new(template));
        self.fallback_warned.store(false, Ordering::Relaxed);
    }
    /// Sets the template variable `enable_thinking` (`None`: undefined, the template's default).
    /// Returns whether the template in use reads it (false for templates without it and for
    /// llama.cpp's guess, which takes no variables).
    pub fn set_enable_thinking(&mut self, value: Option<bool>) -> bool {
        match &mut self.chat {
            ChatRenderer::Jinja(t) => {
                t.set_enable_thinking(value);
                self.template_info.enable_thinking = value;
                t.reads_enable_thinking()
            }
            ChatRenderer::LlamaGuess(_) => false,
        }
    }
    /// The special-token texts templates see as `bos_token` / `eos_token`.
    pub fn special_tokens(&self) -> SpecialTokens {
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(&self.token_bytes(i)).into_owned())
        };
        SpecialTokens {
            bos_token: text(self.bos()),
            eos_token: text(self.eos()),
        }
    }
    pub fn bos(&self) -> Option<u32> {
        token_id(self.model.vocab().bos())
    }
    pub fn eos(&self) -> Option<u32> {
        token_id(self.model.vocab().eos())
    }
    /// Whether the vocabulary wants a BOS token at the start of a sequence.
    pub fn should_add_bos(&self) -> bool {
        self.model.vocab().should_add_bos()
    }
    /// End-of-generation token (EOS, EOT, `<|im_end|>`, …)?
    pub fn is_eog(&self, id: u32) -> bool {
        (id as usize) < self.n_vocab() && self.model.vocab().is_eog(LlamaToken(id as i32))
    }

    /// Tokenizes `text` without adding BOS/EOS. With `parse_special`, control-token text
    /// (`<|im_start|>`) becomes the control token.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, parse_special)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// Turns token ids back into text (invalid UTF-8 replaced). With `render_special`,
    /// control tokens are written out (`<|im_end|>`); otherwise they are dropped.
    pub fn detokenize(&self, ids: &[u32], render_special: bool) -> String {
        let toks: Vec<LlamaToken> = ids
            .iter()
            .filter(|&&i| (i as usize) < self.n_vocab())
            .map(|&i| LlamaToken(i as i32))
            .collect();
        let bytes = self.model.vocab().detokenize(&toks, false, render_special);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes of one token (special tokens rendered).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if (id as usize) >= self.n_vocab() {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(LlamaToken(id as i32), true, None)
    }

    /// Creates a context with the active adapter applied. Callers drop it before returning.
    pub(crate) fn new_context(&self, spec: CtxSpec) -> Result<LlamaContext<'_>, RuntimeError> {
        let backend = backend()?;
        let ctx_err = |detail: String| RuntimeError::Context {
            n_ctx: spec.n_ctx,
            n_batch: spec.n_batch,
            n_seq: spec.n_seq_max,
            detail,
        };
        let to_u32 = |v: usize| u32::try_from(v.max(1)).unwrap_or(u32::MAX);
        let threads = i32::try_from(spec.threads.max(1)).unwrap_or(i32::MAX);
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(to_u32(spec.n_ctx)))
            .with_n_batch(to_u32(spec.n_batch))
            .with_n_ubatch(to_u32(spec.n_ubatch.min(spec.n_batch)))
            .with_n_seq_max(to_u32(spec.n_seq_max))
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(spec.kv_unified);
        if spec.exact {
            params = params
                .with_type_k(KvCacheType::F32)
                .with_type_v(KvCacheType::F32)
                .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        }
        let mut ctx = {
            let _guard = CONTEXT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .new_context(backend, params)
                .map_err(|e| ctx_err(e.to_string()))?
        };
        if let Some((id, scale)) = self.active {
            let slot = self.slot(id)?;
            let mut lora = slot.lora.lock().unwrap_or_else(|p| p.into_inner());
            ctx.lora_adapter_set(&mut lora, scale).map_err(|e| {
                ctx_err(format!(
                    "applying adapter {} failed: {e}",
                    slot.info.path.display()
                ))
            })?;
        }
        Ok(ctx)
    }

    /// Checks ids against the vocabulary.
    pub(crate) fn check_ids(&self, index: usize, ids: &[u32]) -> Result<(), RuntimeError> {
        let n_vocab = self.n_vocab();
        if let Some((pos, &bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, i)| **i as usize >= n_vocab)
        {
            return Err(RuntimeError::BadExample {
                index,
                detail: format!(
                    "token id {bad} at position {pos} is outside the vocabulary of {n_vocab} tokens (tokenized with a different model?)"
                ),
            });
        }
        Ok(())
    }
}

impl Drop for RtModel {
    fn drop(&mut self) {
        // No context can exist here (they never outlive a call). Free adapters explicitly;
        // llama.cpp would also free them with the model.
        self.active = None;
        for slot in self.adapters.iter_mut() {
            if let Some(s) = slot.take() {
                s.free();
            }
        }
    }
}

impl std::fmt::Debug for RtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtModel")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .field("n_vocab", &self.n_vocab())
            .field("template", &self.template_info)
            .field("active_adapter", &self.active)
            .finish()
    }
}

fn token_id(t: LlamaToken) -> Option<u32> {
    u32::try_from(t.0).ok()
}

/// How conversations are turned into text.
pub(crate) enum ChatRenderer {
    /// A Jinja template rendered with minijinja as Hugging Face does.
    Jinja(Box<ChatTemplate>),
    /// llama.cpp's `llama_chat_apply_template`, which recognises known formats by pattern: only
    /// for model templates minijinja cannot render.
    LlamaGuess(LlamaChatTemplate),
}

/// The model's template: its own Jinja when minijinja renders it (checked on a probe
/// conversation), llama.cpp's guess when it cannot, ChatML when there is none.
fn model_template(model: &LlamaModel) -> (ChatRenderer, TemplateInfo) {
    let chatml = || {
        let t = ChatTemplate::new(
            "ChatML (fallback)",
            builtin_source("chatml").expect("built in"),
            TemplateOrigin::FallbackChatml,
        )
        .expect("built-in ChatML compiles");
        let info = t.info();
        (ChatRenderer::Jinja(Box::new(t)), info)
    };
    let Ok(raw) = model.chat_template(None) else {
        return chatml();
    };
    let Ok(source) = raw.to_str().map(str::to_string) else {
        return chatml();
    };
    let probe = [
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", "Hi"),
    ];
    let tokens = SpecialTokens {
        bos_token: token_id(model.vocab().bos()).map(|i| piece(model, i)),
        eos_token: token_id(model.vocab().eos()).map(|i| piece(model, i)),
    };
    let checked = ChatTemplate::from_model(&source).and_then(|t| {
        t.render(&probe[..1], true, &tokens)?;
        t.render(&probe, false, &tokens)?;
        Ok(t)
    });
    match checked {
        Ok(t) => {
            let info = t.info();
            (ChatRenderer::Jinja(Box::new(t)), info)
        }
        // The template's own raise_exception on the probe: keep it (Hugging Face would raise
        // the same on such conversations).
        Err(e) if !e.is_engine_limitation() => {
            let t = ChatTemplate::from_model(&source).expect("compiled above");
            let info = t.info();
            (ChatRenderer::Jinja(Box::new(t)), info)
        }
        Err(e) => {
            let guess = template::looks_like(&source).to_string();
            let info = TemplateInfo {
                origin: TemplateOrigin::FallbackLlamaGuess {
                    guess: guess.clone(),
                    reason: e.to_string(),
                },
                name: guess,
                enable_thinking: None,
                suggested: None,
            };
            (ChatRenderer::LlamaGuess(raw), info)
        }
    }
}

fn piece(model: &LlamaModel, id: u32) -> String {
    let bytes = model
        .vocab()
        .token_to_piece(LlamaToken(id as i32), true, None);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Checks that `path` exists and starts with the GGUF magic.
pub(crate) fn check_gguf_magic(path: &Path) -> Result<(), RuntimeError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RuntimeError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        Err(e) => {
            return Err(RuntimeError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    if path.is_dir() {
        return Err(RuntimeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("is a directory, not a GGUF file"),
        });
    }
    let mut magic = Vec::with_capacity(4);
    f.by_ref()
        .take(4)
        .read_to_end(&mut magic)
        .map_err(|e| RuntimeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
    if magic != b"GGUF" {
        return Err(RuntimeError::NotGguf {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    Ok(())
}
