//! `init-model`: deterministic random-weight GGUF models with a real tokenizer.
//!
//! [`build`] turns an [`InitSpec`] into a [`GgufWriter`] holding a complete `llama`, `qwen2`,
//! `qwen3` or `gemma3` model that llama.cpp loads, tokenizes with and chats with (ChatML), plus an
//! [`InitSummary`] of what was written (tensor types, K-quant fallbacks). [`write`] writes it to a
//! file. Same spec ⇒ byte-identical file, on every platform: weights are drawn from uniform
//! distributions with [`Rng`] (integer arithmetic and IEEE multiplies only, no libm), one
//! independent stream per tensor name, so a tied and an untied model share every other tensor.
//!
//! ## Weight scales
//! Uniform weights with these standard deviations (d = n_embd, q = n_head·head_dim, f = n_ff):
//! token embedding and output `2/√d` (logits of a unit-RMS hidden state have std ≈ 2: peaked but
//! far from one-hot), Q and K `1.5/√d` (attention scores of std ≈ 1–2: neither uniform nor
//! one-hot), V and the FFN inputs `1/√d`, attention output `1/√q`, FFN down `1/√f`; norm weights
//! `1 ± 0.2`, biases `± 0.2`. `tests/init_model.rs` checks that the next-token entropy over a
//! chat-like text stays between 20 % and 90 % of ln(vocab).
//!
//! ## Tokenizer
//! SentencePiece-style (`tokenizer.ggml.model = "llama"`) with byte fallback: `<unk>`, `<s>`,
//! `</s>`, the 256 byte tokens `<0x00>`…`<0xFF>`, `<|im_start|>`, `<|im_end|>`, `▁`, printable
//! ASCII characters, then for every word `w` of `models/vocab_words.txt` the piece `▁w` and all its
//! shorter prefixes (capitalized words also without `▁`, as they open messages right after a
//! newline): llama.cpp's SPM tokenizer merges adjacent symbols only into vocabulary pieces, so a
//! prefix-closed set lets it reach every listed word (each word becomes one token).
//! Scores favour longer pieces of commoner words. BOS = `<s>`; EOS and EOT = `<|im_end|>`, so
//! generation ends at the end of a ChatML turn (llama.cpp also marks `</s>` and `<|im_end|>` as
//! end-of-generation by their text).

use super::arch::Arch;
use crate::gguf::quant::{QuantError, quantize};
use crate::gguf::{GgmlType, GgufError, GgufWriter, Value, ValueType};
use crate::util::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

/// The built-in English word list (one word per line; `#` starts a comment line).
pub const VOCAB_WORDS: &str = include_str!("../../models/vocab_words.txt");

/// A ChatML template (llama.cpp's built-in template matcher recognises `<|im_start|>`).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The weight type of a generated model: one type for every matrix, or llama.cpp's Q4_K_M mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// Every 2-D weight in this type (with per-tensor fallbacks where rows do not fit blocks).
    Uniform(GgmlType),
    /// llama-quantize's Q4_K_M preset: Q4_K, with Q6_K for the output (or the tied embedding) and
    /// for `attn_v` / `ffn_down` in the layers llama.cpp's `use_more_bits` picks.
    Q4KM,
}

impl WeightType {
    /// Names accepted by [`WeightType::parse`] (and `init-model --type`).
    pub const NAMES: &'static str =
        "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m";

    pub fn parse(s: &str) -> Option<WeightType> {
        if s.eq_ignore_ascii_case("q4_k_m") {
            Some(WeightType::Q4KM)
        } else {
            GgmlType::parse(s).map(WeightType::Uniform)
        }
    }

    pub fn name(self) -> String {
        match self {
            WeightType::Uniform(t) => t.name().to_ascii_lowercase(),
            WeightType::Q4KM => "q4_k_m".into(),
        }
    }

    /// `general.file_type` (`enum llama_ftype`), informational.
    pub fn file_type(self) -> u32 {
        match self {
            WeightType::Uniform(t) => match t {
                GgmlType::F32 => 0,
                GgmlType::F16 => 1,
                GgmlType::Q4_0 => 2,
                GgmlType::Q4_1 => 3,
                GgmlType::Q8_0 => 7,
                GgmlType::Q5_0 => 8,
                GgmlType::Q5_1 => 9,
                GgmlType::Q4_K => 14, // Q4_K_S
                GgmlType::Q5_K => 16, // Q5_K_S
                GgmlType::Q6_K => 18,
                GgmlType::BF16 => 32,
            },
            WeightType::Q4KM => 15,
        }
    }
}

impl From<GgmlType> for WeightType {
    fn from(t: GgmlType) -> Self {
        WeightType::Uniform(t)
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for WeightType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WeightType::parse(s)
            .ok_or_else(|| format!("unknown weight type {s:?}; choose one of {}", Self::NAMES))
    }
}

impl Serialize for WeightType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for WeightType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything that determines a generated model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitSpec {
    pub arch: Arch,
    pub ty: WeightType,
    /// n_embd.
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ff: usize,
    /// Per-head size; `None` = dim / heads. Written as `attention.key_length` when it differs
    /// (and always for qwen3). qwen2 needs heads · head_dim = dim.
    pub head_dim: Option<usize>,
    /// Extra unused tokens appended to the vocabulary (to test larger vocabularies).
    pub vocab_extra: usize,
    pub ctx: usize,
    /// Omit `output.weight` (the LM head reuses the token embedding).
    pub tied: bool,
    pub seed: u64,
    /// llama only: write a llama3-style `rope_freqs.weight`.
    pub rope_freqs: bool,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// gemma3 only: the sliding window of the local layers (`attention.sliding_window`).
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    /// gemma3 only: every n-th layer is global (`attention.sliding_window_pattern`; llama.cpp's
    /// default, 6, leaves a 2-layer model without a global layer, so tiny models use 2).
    #[serde(default = "default_swa_pattern")]
    pub swa_pattern: usize,
    /// gemma3 only: the rope base of the local layers (`rope.freq_base_swa`).
    #[serde(default = "default_rope_base_local")]
    pub rope_base_local: f32,
}

fn default_sliding_window() -> usize {
    4
}
fn default_swa_pattern() -> usize {
    2
}
fn default_rope_base_local() -> f32 {
    10000.0
}

impl Default for InitSpec {
    fn default() -> Self {
        InitSpec {
            arch: Arch::Llama,
            ty: WeightType::Uniform(GgmlType::F32),
            dim: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ff: 128,
            head_dim: None,
            vocab_extra: 0,
            ctx: 256,
            tied: false,
            seed: 0,
            rope_freqs: false,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            sliding_window: default_sliding_window(),
            swa_pattern: default_swa_pattern(),
            rope_base_local: default_rope_base_local(),
        }
    }
}

impl InitSpec {
    /// A default-shaped spec of this architecture, type and tying (gemma3: global rope base
    /// 1e6 as in Gemma 3, local 1e4, window 4, layers alternating local and global).
    pub fn tiny(arch: Arch, ty: impl Into<WeightType>, tied: bool) -> InitSpec {
        InitSpec {
            arch,
            ty: ty.into(),
            tied,
            rope_base: if arch == Arch::Gemma3 { 1e6 } else { 10000.0 },
            ..InitSpec::default()
        }
    }

    /// The per-head size this spec produces.
    pub fn resolved_head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.dim.checked_div(self.heads).unwrap_or(0))
    }

    fn validate(&self) -> Result<(), InitError> {
        let bad = |field: &'static str, detail: String| Err(InitError::BadSpec { field, detail });
        for (field, v) in [
            ("dim", self.dim),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv-heads", self.kv_heads),
            ("ff", self.ff),
            ("ctx", self.ctx),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "kv-heads",
                format!(
                    "{} KV heads must divide {} heads evenly",
                    self.kv_heads, self.heads
                ),
            );
        }
        if self.head_dim.is_none() && !self.dim.is_multiple_of(self.heads) {
            return bad(
                "heads",
                format!(
                    "{} heads do not divide dim {}; pass a head size",
                    self.heads, self.dim
                ),
            );
        }
        let hd = self.resolved_head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(
                "head-dim",
                format!("head size {hd} must be even and at least 2"),
            );
        }
        if self.arch == Arch::Qwen2 && self.heads * hd != self.dim {
            return bad(
                "head-dim",
                format!(
                    "qwen2 needs heads × head size = dim, got {} × {hd} ≠ {}",
                    self.heads, self.dim
                ),
            );
        }
        if self.rope_freqs && self.arch != Arch::Llama {
            return bad(
                "rope-freqs",
                format!(
                    "rope_freqs.weight exists only for llama, not {}",
                    self.arch.name()
                ),
            );
        }
        if self.ctx > u32::MAX as usize || self.vocab_extra > 1 << 20 {
            return bad(
                "ctx/vocab-extra",
                "ctx must fit in u32 and vocab-extra be at most 1048576".into(),
            );
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad("rope-base", format!("{} must be positive", self.rope_base));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad("rms-eps", format!("{} must be positive", self.rms_eps));
        }
        if self.arch == Arch::Gemma3 {
            if self.sliding_window == 0 || self.sliding_window > u32::MAX as usize {
                return bad(
                    "sliding-window",
                    format!("{} must be at least 1 and fit in u32", self.sliding_window),
                );
            }
            if self.swa_pattern > u32::MAX as usize {
                return bad(
                    "swa-pattern",
                    format!("{} must fit in u32", self.swa_pattern),
                );
            }
            if !(self.rope_base_local.is_finite() && self.rope_base_local > 0.0) {
                return bad(
                    "rope-base-local",
                    format!("{} must be positive", self.rope_base_local),
                );
            }
        }
        let n_vocab = (base_vocab_len() + self.vocab_extra) as u128;
        let (d, q, f) = (self.dim as u128, (self.heads * hd) as u128, self.ff as u128);
        let kv = (self.kv_heads * hd) as u128;
        let params = 2 * d * n_vocab + self.layers as u128 * (2 * d * q + 2 * d * kv + 3 * d * f);
        if params > 4_000_000_000 {
            return bad(
                "dim/layers/ff",
                format!("about {params} parameters; init-model is for small models (at most 4e9)"),
            );
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid init-model setting {field}: {detail}")]
    BadSpec { field: &'static str, detail: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("quantizing {tensor}: {source}")]
    Quant {
        tensor: String,
        #[source]
        source: QuantError,
    },
}

/// The tokenizer of generated models.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    pub unk: u32,
    pub bos: u32,
    /// `</s>` (end-of-generation in llama.cpp by its text; not the EOS id).
    pub end_of_text: u32,
    pub im_start: u32,
    /// `<|im_end|>`: EOS and EOT id.
    pub im_end: u32,
}

impl Vocab {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Id of a token text, if present.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as u32)
    }
}

/// The words of [`VOCAB_WORDS`], in file order, without comments or duplicates.
pub fn vocab_words() -> Vec<&'static str> {
    let mut seen = HashSet::new();
    VOCAB_WORDS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|w| seen.insert(*w))
        .collect()
}

/// Printable ASCII characters that get their own token (everything else falls back to bytes).
const CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\":;-()/&%$#@*+=_[]{}<>~`^|\\";

fn base_vocab_len() -> usize {
    // Computed the same way as `vocab`, without the extras (cheap: a few hundred strings).
    vocab(0).len()
}

/// Builds the tokenizer: specials, bytes, characters, word pieces, then `extra` unused tokens.
pub fn vocab(extra: usize) -> Vocab {
    // (text, score, type)
    let mut entries: Vec<(String, f32, i32)> = Vec::new();
    entries.push(("<unk>".into(), 0.0, token_type::UNKNOWN));
    entries.push(("<s>".into(), 0.0, token_type::CONTROL));
    entries.push(("</s>".into(), 0.0, token_type::CONTROL));
    for b in 0..=255u8 {
        entries.push((format!("<0x{b:02X}>"), 0.0, token_type::BYTE));
    }
    entries.push(("<|im_start|>".into(), 0.0, token_type::CONTROL));
    entries.push(("<|im_end|>".into(), 0.0, token_type::CONTROL));
    // Single symbols: never produced by a merge, so their score does not matter to SPM.
    entries.push(("\u{2581}".into(), -1000.0, token_type::NORMAL));
    for c in CHARS.chars() {
        entries.push((c.to_string(), -1000.0, token_type::NORMAL));
    }
    // Word pieces: "▁w" and every prefix of it. Score: longer first, then commoner words
    // (earlier in the list), like the log-probabilities of a trained SentencePiece model.
    let mut seen: HashSet<String> = entries.iter().map(|e| e.0.clone()).collect();
    for (rank, word) in vocab_words().into_iter().enumerate() {
        let spaced: Vec<char> = std::iter::once('\u{2581}').chain(word.chars()).collect();
        let mut forms = vec![spaced];
        // Capitalized words also start messages right after a newline, without the space marker.
        if word.starts_with(|c: char| c.is_ascii_uppercase()) {
            forms.push(word.chars().collect());
        }
        for piece in forms {
            for len in 2..=piece.len() {
                let p: String = piece[..len].iter().collect();
                if seen.insert(p.clone()) {
                    let score = len as f32 - rank as f32 / 1000.0 - 20.0;
                    entries.push((p, score, token_type::NORMAL));
                }
            }
        }
    }
    for i in 0..extra {
        entries.push((format!("<unused_{i}>"), -1e4, token_type::UNUSED));
    }
    let mut tokens = Vec::with_capacity(entries.len());
    let mut scores = Vec::with_capacity(entries.len());
    let mut types = Vec::with_capacity(entries.len());
    for (t, s, ty) in entries {
        tokens.push(t);
        scores.push(s);
        types.push(ty);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    Vocab {
        unk: id("<unk>"),
        bos: id("<s>"),
        end_of_text: id("</s>"),
        im_start: id("<|im_start|>"),
        im_end: id("<|im_end|>"),
        tokens,
        scores,
        types,
    }
}

/// What a weight is for; decides its type and initial scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    TokenEmbd,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    Norm,
    Bias,
    RopeFreqs,
}

/// One generated tensor before encoding: f32 values, row-major `[ne[1], ne[0]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InitTensor {
    pub name: String,
    pub ne: Vec<u64>,
    /// The type it is stored in (after fallbacks).
    pub ty: GgmlType,
    pub values: Vec<f32>,
}

/// A tensor whose rows do not fit the requested type's blocks and got another type, as
/// llama-quantize does (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, and F16 when even that does not fit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub tensor: String,
    pub row_len: u64,
    pub wanted: GgmlType,
    pub used: GgmlType,
}

/// One written tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub ty: GgmlType,
    pub ne: Vec<u64>,
    pub n_bytes: u64,
}

/// What [`build`] produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitSummary {
    pub spec: InitSpec,
    pub n_vocab: usize,
    pub n_params: u64,
    /// Bytes of tensor data (without header and padding).
    pub n_tensor_bytes: u64,
    pub tensors: Vec<TensorSummary>,
    /// Per type: (number of tensors, bytes).
    pub type_mix: BTreeMap<String, (usize, u64)>,
    pub fallbacks: Vec<Fallback>,
}

/// llama.cpp's `use_more_bits` (llama-quant.cpp): which layers Q4_K_M gives more bits.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type a tensor is requested in (before shape fallbacks).
fn wanted_type(spec: &InitSpec, kind: Kind, layer: usize, row_len: usize) -> GgmlType {
    match kind {
        Kind::Norm | Kind::Bias | Kind::RopeFreqs => GgmlType::F32,
        _ => match spec.ty {
            WeightType::Uniform(t) => t,
            WeightType::Q4KM => {
                let is_head = kind == Kind::Output || (spec.tied && kind == Kind::TokenEmbd);
                if is_head {
                    // llama.cpp picks Q8_0 directly (not a fallback) when rows do not fit Q6_K.
                    if row_len.is_multiple_of(256) {
                        GgmlType::Q6_K
                    } else {
                        GgmlType::Q8_0
                    }
                } else if matches!(kind, Kind::AttnV | Kind::FfnDown)
                    && use_more_bits(layer, spec.layers)
                {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            }
        },
    }
}

/// llama-quantize's per-tensor fallback for rows that are not a whole number of blocks.
fn fallback_type(wanted: GgmlType, row_len: usize) -> GgmlType {
    if row_len.is_multiple_of(wanted.block_elems()) {
        return wanted;
    }
    let next = match wanted {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row_len.is_multiple_of(next.block_elems()) {
        next
    } else {
        GgmlType::F16
    }
}

/// Stream id of a tensor name (FNV-1a), so each tensor's values depend only on seed and name.
fn stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Uniform values with mean `mean` and standard deviation `std`.
fn uniform(seed: u64, name: &str, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let mut rng = Rng::derive(seed, stream(name));
    let a = std * 3f32.sqrt();
    (0..n).map(|_| mean + rng.uniform(-a, a)).collect()
}

/// llama3-style rope factors: 1 for the highest frequencies rising smoothly to 8 for the lowest.
fn rope_freq_factors(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = if n > 1 {
                i as f32 / (n - 1) as f32
            } else {
                0.0
            };
            1.0 + 7.0 * t * t * (3.0 - 2.0 * t)
        })
        .collect()
}

/// Generates every tensor (f32 values and storage type) of a spec, in file order.
pub fn generate(spec: &InitSpec) -> Result<(Vec<InitTensor>, Vec<Fallback>), InitError> {
    spec.validate()?;
    let d = spec.dim;
    let hd = spec.resolved_head_dim();
    let q = spec.heads * hd;
    let kv = spec.kv_heads * hd;
    let ff = spec.ff;
    let n_vocab = base_vocab_len() + spec.vocab_extra;
    let inv = |n: usize| 1.0 / (n as f32).sqrt();

    let mut out = Vec::new();
    let mut fallbacks = Vec::new();
    let mut add = |name: String, ne: Vec<usize>, kind: Kind, layer: usize| {
        let n: usize = ne.iter().product();
        let values = match kind {
            Kind::Norm => uniform(spec.seed, &name, n, 1.0, 0.2 / 3f32.sqrt()),
            Kind::Bias => uniform(spec.seed, &name, n, 0.0, 0.2 / 3f32.sqrt()),
            Kind::RopeFreqs => rope_freq_factors(n),
            Kind::TokenEmbd | Kind::Output => uniform(spec.seed, &name, n, 0.0, 2.0 * inv(d)),
            Kind::AttnQ | Kind::AttnK => uniform(spec.seed, &name, n, 0.0, 1.5 * inv(d)),
            Kind::AttnV | Kind::FfnGate | Kind::FfnUp => uniform(spec.seed, &name, n, 0.0, inv(d)),
            Kind::AttnOutput => uniform(spec.seed, &name, n, 0.0, inv(q)),
            Kind::FfnDown => uniform(spec.seed, &name, n, 0.0, inv(ff)),
        };
        let wanted = wanted_type(spec, kind, layer, ne[0]);
        let ty = fallback_type(wanted, ne[0]);
        if ty != wanted {
            fallbacks.push(Fallback {
                tensor: name.clone(),
                row_len: ne[0] as u64,
                wanted,
                used: ty,
            });
        }
        out.push(InitTensor {
            name,
            ne: ne.iter().map(|&x| x as u64).collect(),
            ty,
            values,
        });
    };

    add(
        "token_embd.weight".into(),
        vec![d, n_vocab],
        Kind::TokenEmbd,
        0,
    );
    if spec.rope_freqs {
        add("rope_freqs.weight".into(), vec![hd / 2], Kind::RopeFreqs, 0);
    }
    for i in 0..spec.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        add(n("attn_norm.weight"), vec![d], Kind::Norm, i);
        add(n("attn_q.weight"), vec![d, q], Kind::AttnQ, i);
        add(n("attn_k.weight"), vec![d, kv], Kind::AttnK, i);
        add(n("attn_v.weight"), vec![d, kv], Kind::AttnV, i);
        if spec.arch == Arch::Qwen2 {
            add(n("attn_q.bias"), vec![q], Kind::Bias, i);
            add(n("attn_k.bias"), vec![kv], Kind::Bias, i);
            add(n("attn_v.bias"), vec![kv], Kind::Bias, i);
        }
        if matches!(spec.arch, Arch::Qwen3 | Arch::Gemma3) {
            add(n("attn_q_norm.weight"), vec![hd], Kind::Norm, i);
            add(n("attn_k_norm.weight"), vec![hd], Kind::Norm, i);
        }
        add(n("attn_output.weight"), vec![q, d], Kind::AttnOutput, i);
        if spec.arch == Arch::Gemma3 {
            add(n("post_attention_norm.weight"), vec![d], Kind::Norm, i);
        }
        add(n("ffn_norm.weight"), vec![d], Kind::Norm, i);
        add(n("ffn_gate.weight"), vec![d, ff], Kind::FfnGate, i);
        add(n("ffn_up.weight"), vec![d, ff], Kind::FfnUp, i);
        add(n("ffn_down.weight"), vec![ff, d], Kind::FfnDown, i);
        if spec.arch == Arch::Gemma3 {
            add(n("post_ffw_norm.weight"), vec![d], Kind::Norm, i);
        }
    }
    add("output_norm.weight".into(), vec![d], Kind::Norm, 0);
    if !spec.tied {
        add("output.weight".into(), vec![d, n_vocab], Kind::Output, 0);
    }
    Ok((out, fallbacks))
}

/// Encodes f32 values in a storage type (little-endian raw block bytes).
fn encode(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, QuantError> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        q => quantize(q, values)?,
    })
}

/// Builds the whole model in memory.
pub fn build(spec: &InitSpec) -> Result<(GgufWriter<'static>, InitSummary), InitError> {
    let (tensors, fallbacks) = generate(spec)?;
    let vocab = vocab(spec.vocab_extra);
    let hd = spec.resolved_head_dim();
    let a = spec.arch.name();
    let u32v = |x: usize| Value::U32(x as u32);

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(a.into()));
    w.set(
        "general.name",
        Value::String(format!(
            "bfpo-lite init-model {a} {} seed {}",
            spec.ty, spec.seed
        )),
    );
    w.set("general.file_type", Value::U32(spec.ty.file_type()));
    w.set("general.quantization_version", Value::U32(2));
    w.set(format!("{a}.context_length"), u32v(spec.ctx));
    w.set(format!("{a}.embedding_length"), u32v(spec.dim));
    w.set(format!("{a}.block_count"), u32v(spec.layers));
    w.set(format!("{a}.feed_forward_length"), u32v(spec.ff));
    w.set(format!("{a}.attention.head_count"), u32v(spec.heads));
    w.set(format!("{a}.attention.head_count_kv"), u32v(spec.kv_heads));
    if matches!(spec.arch, Arch::Qwen3 | Arch::Gemma3) || hd * spec.heads != spec.dim {
        w.set(format!("{a}.attention.key_length"), u32v(hd));
        w.set(format!("{a}.attention.value_length"), u32v(hd));
    }
    w.set(format!("{a}.rope.dimension_count"), u32v(hd));
    w.set(format!("{a}.rope.freq_base"), Value::F32(spec.rope_base));
    w.set(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(spec.rms_eps),
    );
    if spec.arch == Arch::Gemma3 {
        w.set(
            format!("{a}.attention.sliding_window"),
            u32v(spec.sliding_window),
        );
        w.set(
            format!("{a}.attention.sliding_window_pattern"),
            u32v(spec.swa_pattern),
        );
        w.set(
            format!("{a}.rope.freq_base_swa"),
            Value::F32(spec.rope_base_local),
        );
    }

    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array(vocab.tokens.iter().cloned()),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(
            ValueType::F32,
            vocab.scores.iter().map(|&s| Value::F32(s)).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(
            ValueType::I32,
            vocab.types.iter().map(|&t| Value::I32(t)).collect(),
        ),
    );
    w.set("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(vocab.im_end));
    w.set("tokenizer.ggml.eot_token_id", Value::U32(vocab.im_end));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(vocab.unk));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    w.set(
        "tokenizer.chat_template",
        Value::String(CHAT_TEMPLATE.into()),
    );

    let mut summaries = Vec::with_capacity(tensors.len());
    let mut type_mix: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut n_params = 0u64;
    for t in tensors {
        let bytes = encode(t.ty, &t.values).map_err(|source| InitError::Quant {
            tensor: t.name.clone(),
            source,
        })?;
        let n_bytes = bytes.len() as u64;
        n_params += t.values.len() as u64;
        let e = type_mix.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += n_bytes;
        w.add_tensor(t.name.clone(), &t.ne, t.ty.id(), bytes)?;
        summaries.push(TensorSummary {
            name: t.name,
            ty: t.ty,
            ne: t.ne,
            n_bytes,
        });
    }
    let summary = InitSummary {
        spec: spec.clone(),
        n_vocab: vocab.len(),
        n_params,
        n_tensor_bytes: summaries.iter().map(|t| t.n_bytes).sum(),
        tensors: summaries,
        type_mix,
        fallbacks,
    };
    Ok((w, summary))
}

/// Builds the model and writes it to `path` (through a temporary file and a rename).
pub fn write(spec: &InitSpec, path: &Path) -> Result<InitSummary, InitError> {
    let (w, summary) = build(spec)?;
    w.write_file(path)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_is_prefix_closed_unique_and_small() {
        let v = vocab(3);
        assert!(v.len() <= 1024, "vocabulary of {} tokens", v.len());
        let set: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
        assert_eq!(set.len(), v.len(), "duplicate tokens");
        for w in vocab_words() {
            let piece = format!("\u{2581}{w}");
            let chars: Vec<char> = piece.chars().collect();
            for len in 1..=chars.len() {
                let p: String = chars[..len].iter().collect();
                assert!(
                    set.contains(p.as_str()),
                    "missing prefix {p:?} of {piece:?}"
                );
            }
        }
        for w in [
            "can", "cannot", "help", "sorry", "sure", "here", "how", "to", "make",
        ] {
            assert!(set.contains(format!("\u{2581}{w}").as_str()), "{w}");
        }
        assert_eq!(v.tokens[v.bos as usize], "<s>");
        assert_eq!(v.tokens[v.im_end as usize], "<|im_end|>");
        assert_eq!(v.tokens[3 + 0x0A], "<0x0A>");
        assert_eq!(v.types[3 + 0x0A], token_type::BYTE);
        assert_eq!(v.types[v.len() - 1], token_type::UNUSED);
        assert_eq!(v.len(), base_vocab_len() + 3);
    }

    #[test]
    fn weight_type_names_round_trip() {
        for name in WeightType::NAMES.split(", ") {
            let t = WeightType::parse(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(t.name(), name);
        }
        assert_eq!(WeightType::parse("Q4_K_M"), Some(WeightType::Q4KM));
        assert!(WeightType::parse("q2_k").is_none());
    }

    #[test]
    fn q4_k_m_follows_llama_quantize() {
        // 8 layers: use_more_bits picks layers 0 (i < 1), 7 (i >= 7) and 3, 6 ((i-1) % 3 == 2).
        let picked: Vec<usize> = (0..8).filter(|&i| use_more_bits(i, 8)).collect();
        assert_eq!(picked, vec![0, 3, 6, 7]);
        let spec = InitSpec {
            ty: WeightType::Q4KM,
            dim: 256,
            ff: 512,
            heads: 4,
            kv_heads: 2,
            layers: 2,
            ..InitSpec::default()
        };
        assert_eq!(wanted_type(&spec, Kind::AttnV, 1, 256), GgmlType::Q6_K);
        assert_eq!(wanted_type(&spec, Kind::AttnV, 0, 256), GgmlType::Q4_K);
        assert_eq!(wanted_type(&spec, Kind::Output, 0, 256), GgmlType::Q6_K);
        assert_eq!(wanted_type(&spec, Kind::TokenEmbd, 0, 256), GgmlType::Q4_K);
        assert_eq!(wanted_type(&spec, Kind::Norm, 0, 256), GgmlType::F32);
        assert_eq!(fallback_type(GgmlType::Q4_K, 64), GgmlType::Q5_0);
        assert_eq!(fallback_type(GgmlType::Q5_K, 96), GgmlType::Q5_1);
        assert_eq!(fallback_type(GgmlType::Q6_K, 288), GgmlType::Q8_0);
        assert_eq!(fallback_type(GgmlType::Q6_K, 48), GgmlType::F16);
        assert_eq!(fallback_type(GgmlType::Q8_0, 48), GgmlType::F16);
        assert_eq!(fallback_type(GgmlType::BF16, 48), GgmlType::BF16);
    }

    #[test]
    fn bad_specs_are_rejected_with_the_field() {
        let cases = [
            (
                InitSpec {
                    kv_heads: 3,
                    ..InitSpec::default()
                },
                "kv-heads",
            ),
            (
                InitSpec {
                    heads: 5,
                    kv_heads: 1,
                    ..InitSpec::default()
                },
                "heads",
            ),
            (
                InitSpec {
                    dim: 0,
                    ..InitSpec::default()
                },
                "dim",
            ),
            (
                InitSpec {
                    arch: Arch::Qwen2,
                    rope_freqs: true,
                    ..InitSpec::default()
                },
                "rope-freqs",
            ),
            (
                InitSpec {
                    arch: Arch::Qwen2,
                    head_dim: Some(32),
                    ..InitSpec::default()
                },
                "head-dim",
            ),
        ];
        for (spec, field) in cases {
            match generate(&spec) {
                Err(InitError::BadSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected BadSpec, got {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn tensors_depend_only_on_seed_and_name() {
        let a = generate(&InitSpec::default()).unwrap().0;
        let b = generate(&InitSpec {
            tied: true,
            ..InitSpec::default()
        })
        .unwrap()
        .0;
        let c = generate(&InitSpec {
            seed: 1,
            ..InitSpec::default()
        })
        .unwrap()
        .0;
        assert_eq!(a[0], b[0], "tying must not change the embedding");
        assert_eq!(a.len(), b.len() + 1);
        assert!(b.iter().all(|t| t.name != "output.weight"));
        assert_ne!(a[0].values, c[0].values);
        let std = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let emb = &a[0];
        assert!(
            (std(&emb.values) - 2.0 / 8.0).abs() < 0.01,
            "{}",
            std(&emb.values)
        );
    }
}
