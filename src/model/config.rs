//! Hyperparameters read from GGUF metadata (keys: `docs/gguf.md` §3).
//!
//! [`ModelConfig::from_gguf`] reads what the forward pass needs and rejects, with a message naming
//! the key and value, everything bfpo-lite cannot reproduce exactly: other architectures,
//! per-layer head counts or FFN widths, YaRN / LongRoPE scaling, mixture-of-experts, and
//! differing K/V head sizes.

use super::arch::{Arch, RopeKind};
use crate::gguf::{GgmlType, GgufError, GgufFile, Value};
use serde::{Deserialize, Serialize};

/// The text of [`ModelError::UnsupportedArch`]: what is supported and, when one is close, the
/// nearest supported architecture ([`nearest_arch`]).
fn unsupported_arch_message(found: &str, supported: &str) -> String {
    let mut m = format!("architecture {found:?} is not supported; supported: {supported}.");
    if let Some(n) = nearest_arch(found, supported) {
        m.push_str(&format!(" The nearest supported one is {n}."));
    }
    m.push_str(" Convert or pick a model of a supported architecture");
    m
}

/// The supported architecture nearest to `found`, from a list like `Arch::SUPPORTED`
/// (`name (Family, Family), name, …`): one whose description names `found`'s family
/// (`mistral` → `llama`), else the closest of the same family prefix (`qwen2moe` → `qwen2`,
/// `gemma2` → `gemma3`), else one within a small edit distance (`lama` → `llama`).
pub fn nearest_arch(found: &str, supported: &str) -> Option<String> {
    let found = found.to_ascii_lowercase();
    let family = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect::<String>()
    };
    let fam = family(&found);
    let entries = supported_entries(supported);
    let by_distance = |cands: Vec<&(String, String)>| {
        cands
            .into_iter()
            .min_by_key(|(n, _)| edit_distance(&found, n))
            .map(|(n, _)| n.clone())
    };
    if fam.len() >= 3 {
        let described: Vec<&(String, String)> = entries
            .iter()
            .filter(|(n, d)| {
                family(n) != fam
                    && d.split(|c: char| !c.is_ascii_alphanumeric())
                        .any(|w| family(&w.to_ascii_lowercase()) == fam)
            })
            .collect();
        let same: Vec<&(String, String)> =
            entries.iter().filter(|(n, _)| family(n) == fam).collect();
        if let Some(n) = by_distance(same).or_else(|| by_distance(described)) {
            return Some(n);
        }
    }
    let limit = (found.len() / 3).max(1);
    entries
        .iter()
        .map(|(n, _)| (edit_distance(&found, n), n))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, n)| n.clone())
}

/// `(name, description)` of each comma-separated entry at the top level of `supported`.
fn supported_entries(supported: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0usize, String::new());
    for c in supported.chars().chain(std::iter::once(',')) {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == ',' && depth == 0 {
            let e = cur.trim();
            if let Some(name) = e.split_whitespace().next() {
                out.push((name.to_ascii_lowercase(), e[name.len()..].to_string()));
            }
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    out
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            row.push(sub.min(prev[j + 1] + 1).min(row[j] + 1));
        }
        prev = row;
    }
    prev[b.len()]
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{}", unsupported_arch_message(found, supported))]
    UnsupportedArch {
        found: String,
        supported: &'static str,
    },
    #[error("model is missing tensor {name:?}")]
    MissingTensor { name: String },
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("invalid hyperparameter {key}: {detail}")]
    BadHyperparameter { key: String, detail: String },
    /// A norm, bias or rope-factor tensor stored in a type other than F32/F16.
    #[error(
        "tensor {name:?} has type {found}, expected {expected} (norms, biases and rope factors must be unquantized)"
    )]
    BadTensorType {
        name: String,
        found: String,
        expected: &'static str,
    },
    /// A tensor the forward pass would silently ignore (extra biases, fused QKV, experts, …).
    #[error("tensor {name:?} is not supported by bfpo-lite: {detail}")]
    UnsupportedTensor { name: String, detail: String },
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: Option<String>,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head dimension of Q and K (and V).
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_kind: RopeKind,
    pub rope_base: f32,
    /// Rotated dimensions per head (≤ head_dim).
    pub n_rot: usize,
    /// Positions are multiplied by this (1 / linear scaling factor; 1.0 without scaling).
    pub rope_pos_scale: f32,
    /// llama3-style per-frequency divisors from `rope_freqs.weight` ([n_rot/2]), if present.
    pub rope_freqs: Option<Vec<f32>>,
    /// No `output.weight`: the LM head reuses `token_embd.weight`.
    pub tied: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// Gemma 3's extras; `None` for every other architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma3: Option<Gemma3Params>,
}

/// What a Gemma 3 model adds to the common transformer (keys: `docs/gguf.md` §3.1). Implied by
/// `Some`: the embedding rows are scaled by √n_embd (the tied LM head uses the unscaled table),
/// RMSNorms after attention (`post_attention_norm`) and after the FFN (`post_ffw_norm`) before
/// each residual add, and a GeGLU FFN `down(gelu_tanh(gate·x) ⊙ up·x)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemma3Params {
    /// A local layer's query at position i sees the keys at positions j with `i − j < window`
    /// (`attention.sliding_window`).
    pub sliding_window: usize,
    /// Per layer: `true` for a local (sliding-window) layer, `false` for a global one
    /// (`attention.sliding_window_pattern`: a per-layer array, or n meaning every n-th layer is
    /// global; llama.cpp's default is 6).
    pub local_layers: Vec<bool>,
    /// RoPE base of the local layers (`rope.freq_base_swa`, default 10000); they are never
    /// scaled. Global layers use `rope_base` and `rope_pos_scale`.
    pub rope_base_local: f32,
    /// The factor on q·k: 1/√key_length (1/√(n_embd/n_head) for the 62-layer 27B, as llama.cpp
    /// and gemma_pytorch do).
    pub attn_scale: f32,
}

/// The FFN activation: `silu(g)·u` (SwiGLU) or `gelu_tanh(g)·u` (GeGLU, gemma3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    Silu,
    GeluTanh,
}

/// `{arch}.{suffix}`.
fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

fn bad(key: &str, detail: impl Into<String>) -> ModelError {
    ModelError::BadHyperparameter {
        key: key.to_string(),
        detail: detail.into(),
    }
}

/// An unsigned integer key; a per-layer array is accepted only when every layer has the same value.
fn opt_usize(file: &GgufFile, key: &str) -> Result<Option<usize>, ModelError> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    let scalar = |v: &Value| -> Result<usize, ModelError> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                bad(
                    key,
                    format!(
                        "expected a non-negative integer, found {} {}",
                        v.value_type().name(),
                        v.summary(32)
                    ),
                )
            })
    };
    match v {
        Value::Array(_, items) => {
            let vals = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
            match vals.first() {
                None => Err(bad(key, "empty per-layer array")),
                Some(&first) if vals.iter().all(|&x| x == first) => Ok(Some(first)),
                Some(_) => Err(bad(
                    key,
                    format!(
                        "per-layer values {vals:?} differ between layers; bfpo-lite supports only models whose layers all have the same shape"
                    ),
                )),
            }
        }
        other => scalar(other).map(Some),
    }
}

fn req_usize(file: &GgufFile, key: &str) -> Result<usize, ModelError> {
    opt_usize(file, key)?.ok_or_else(|| {
        ModelError::Gguf(GgufError::MissingKey {
            key: key.to_string(),
        })
    })
}

fn opt_f32(file: &GgufFile, key: &str) -> Result<Option<f32>, ModelError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_f32().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("expected a number, found {}", v.value_type().name()),
            )
        }),
    }
}

fn opt_str<'f>(file: &'f GgufFile, key: &str) -> Result<Option<&'f str>, ModelError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("expected a string, found {}", v.value_type().name()),
            )
        }),
    }
}

/// Reads a small 1-D F32/F16 tensor (rope factors) into f32.
fn read_vector(file: &GgufFile, name: &str) -> Result<Vec<f32>, ModelError> {
    let t = file.tensor(name).ok_or_else(|| ModelError::MissingTensor {
        name: name.to_string(),
    })?;
    let ty = t.ggml_type()?;
    let n = t.n_elements() as usize;
    let bytes = file.tensor_bytes(t);
    match ty {
        GgmlType::F32 => Ok(bytes
            .chunks_exact(4)
            .take(n)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        GgmlType::F16 => Ok(bytes
            .chunks_exact(2)
            .take(n)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(ModelError::BadTensorType {
            name: name.to_string(),
            found: other.name().to_string(),
            expected: "F32 or F16",
        }),
    }
}

fn missing(key: String) -> ModelError {
    ModelError::Gguf(GgufError::MissingKey { key })
}

/// Gemma 3's keys, read as llama.cpp reads them (`src/models/gemma3.cpp`, `llama-hparams.cpp`).
fn gemma3_params(
    file: &GgufFile,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    head_dim: usize,
) -> Result<Gemma3Params, ModelError> {
    let k = |s: &str| arch_key("gemma3", s);
    let win_key = k("attention.sliding_window");
    // llama.cpp runs a gemma3 without this key with global attention everywhere, but every
    // Gemma 3 checkpoint has local layers: a file without it was converted wrongly.
    let sliding_window = opt_usize(file, &win_key)?.ok_or_else(|| missing(win_key.clone()))?;
    if sliding_window == 0 {
        return Err(bad(
            &win_key,
            "0: Gemma 3 needs a sliding window of at least 1 position",
        ));
    }
    let pat_key = k("attention.sliding_window_pattern");
    let local_layers = match file.get(&pat_key) {
        Some(Value::Array(_, items)) => {
            let flags = items
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    other => other.as_u64().map(|x| x != 0),
                })
                .collect::<Option<Vec<bool>>>()
                .ok_or_else(|| bad(&pat_key, "expected an array of booleans or integers"))?;
            if flags.len() != n_layer {
                return Err(bad(
                    &pat_key,
                    format!("{} per-layer flags for {n_layer} layers", flags.len()),
                ));
            }
            flags
        }
        Some(v) => {
            let n = v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    bad(
                        &pat_key,
                        format!("expected an integer, found {}", v.value_type().name()),
                    )
                })?;
            (0..n_layer).map(|l| n == 0 || l % n < n - 1).collect()
        }
        None => (0..n_layer).map(|l| l % 6 < 5).collect(),
    };
    if !local_layers.contains(&true) {
        // llama.cpp aborts the process on such a file (it asserts a local layer exists).
        return Err(bad(
            &pat_key,
            "no layer is local (sliding-window); llama.cpp cannot load such a gemma3 file",
        ));
    }
    let base_key = k("rope.freq_base_swa");
    let rope_base_local = opt_f32(file, &base_key)?.unwrap_or(10000.0);
    if !(rope_base_local.is_finite() && rope_base_local > 0.0) {
        return Err(bad(
            &base_key,
            format!("{rope_base_local} must be a positive number"),
        ));
    }
    let cap_key = k("final_logit_softcapping");
    if let Some(cap) = opt_f32(file, &cap_key)?
        && cap != 0.0
    {
        return Err(bad(
            &cap_key,
            format!("{cap}: final logit soft-capping (Gemma 2 style) is not supported"),
        ));
    }
    let attn_scale = if n_layer == 62 {
        1.0 / ((n_embd / n_head) as f32).sqrt()
    } else {
        1.0 / (head_dim as f32).sqrt()
    };
    Ok(Gemma3Params {
        sliding_window,
        local_layers,
        rope_base_local,
        attn_scale,
    })
}

impl ModelConfig {
    /// Reads and validates the hyperparameters of a `llama`, `qwen2`, `qwen3` or `gemma3` GGUF.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_name = file.get_str("general.architecture")?;
        let arch = Arch::parse(arch_name).ok_or_else(|| ModelError::UnsupportedArch {
            found: arch_name.to_string(),
            supported: Arch::SUPPORTED,
        })?;
        let a = arch.name();
        let k = |s: &str| arch_key(a, s);

        let name = opt_str(file, "general.name")?.map(str::to_string);

        if let Some(n_expert) = opt_usize(file, &k("expert_count"))?
            && n_expert > 0
        {
            return Err(bad(
                &k("expert_count"),
                format!(
                    "{n_expert} experts: mixture-of-experts models are not supported; pick a dense model"
                ),
            ));
        }

        let n_embd = req_usize(file, &k("embedding_length"))?;
        let n_layer = req_usize(file, &k("block_count"))?;
        let n_ff = req_usize(file, &k("feed_forward_length"))?;
        let n_head = req_usize(file, &k("attention.head_count"))?;
        let n_head_kv = opt_usize(file, &k("attention.head_count_kv"))?.unwrap_or(n_head);
        let n_ctx_train = req_usize(file, &k("context_length"))?;

        for (key, v) in [
            ("embedding_length", n_embd),
            ("block_count", n_layer),
            ("feed_forward_length", n_ff),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_head_kv),
            ("context_length", n_ctx_train),
        ] {
            if v == 0 {
                return Err(bad(&k(key), "must be greater than 0"));
            }
        }
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(bad(
                &k("attention.head_count_kv"),
                format!("{n_head_kv} KV heads do not divide {n_head} query heads evenly"),
            ));
        }

        let key_length = opt_usize(file, &k("attention.key_length"))?;
        let value_length = opt_usize(file, &k("attention.value_length"))?;
        let head_dim = match key_length {
            Some(d) => d,
            None => {
                if !n_embd.is_multiple_of(n_head) {
                    return Err(bad(
                        &k("attention.head_count"),
                        format!(
                            "{n_head} heads do not divide embedding_length {n_embd} and attention.key_length is absent"
                        ),
                    ));
                }
                n_embd / n_head
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                &k("attention.key_length"),
                format!("head dimension {head_dim} must be even and greater than 0"),
            ));
        }
        if let Some(vl) = value_length
            && vl != head_dim
        {
            return Err(bad(
                &k("attention.value_length"),
                format!(
                    "value head size {vl} differs from key head size {head_dim}; not supported"
                ),
            ));
        }
        if arch == Arch::Qwen2 && n_head * head_dim != n_embd {
            return Err(bad(
                &k("attention.key_length"),
                format!(
                    "qwen2 needs head_count × head size = embedding_length, got {n_head} × {head_dim} ≠ {n_embd}"
                ),
            ));
        }

        let eps_key = k("attention.layer_norm_rms_epsilon");
        let rms_eps = opt_f32(file, &eps_key)?.ok_or_else(|| {
            ModelError::Gguf(GgufError::MissingKey {
                key: eps_key.clone(),
            })
        })?;
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(bad(
                &eps_key,
                format!("{rms_eps} must be a positive number"),
            ));
        }

        let n_rot = opt_usize(file, &k("rope.dimension_count"))?.unwrap_or(head_dim);
        if n_rot == 0 || !n_rot.is_multiple_of(2) || n_rot > head_dim {
            return Err(bad(
                &k("rope.dimension_count"),
                format!(
                    "{n_rot} must be even, greater than 0 and at most the head size {head_dim}"
                ),
            ));
        }
        let rope_base = opt_f32(file, &k("rope.freq_base"))?.unwrap_or(10000.0);
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad(
                &k("rope.freq_base"),
                format!("{rope_base} must be a positive number"),
            ));
        }

        // Rope scaling, as llama.cpp reads it: the type defaults to linear; the factor comes from
        // `rope.scaling.factor`, else the older `rope.scale_linear`; 0 or absent means none.
        let scaling_type = opt_str(file, &k("rope.scaling.type"))?.unwrap_or("linear");
        let factor = match opt_f32(file, &k("rope.scaling.factor"))? {
            Some(f) => Some(f),
            None => opt_f32(file, &k("rope.scale_linear"))?,
        };
        let rope_pos_scale = match scaling_type {
            "none" => 1.0,
            "linear" => match factor {
                None => 1.0,
                Some(0.0) => 1.0,
                Some(f) if f.is_finite() && f > 0.0 => 1.0 / f,
                Some(f) => {
                    return Err(bad(
                        &k("rope.scaling.factor"),
                        format!("linear rope scaling factor {f} must be positive"),
                    ));
                }
            },
            other => {
                return Err(bad(
                    &k("rope.scaling.type"),
                    format!(
                        "rope scaling {other:?} is not supported (supported: none, linear); YaRN and LongRoPE models cannot be trained yet"
                    ),
                ));
            }
        };

        let n_vocab = match opt_usize(file, &k("vocab_size"))? {
            Some(n) => n,
            None => match file.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
                Some(tokens) => tokens.len(),
                None => match file.tensor("token_embd.weight") {
                    Some(t) if t.ne.len() >= 2 => t.ne[1] as usize,
                    _ => {
                        return Err(ModelError::Gguf(GgufError::MissingKey {
                            key: format!(
                                "{} (or tokenizer.ggml.tokens, or token_embd.weight)",
                                k("vocab_size")
                            ),
                        }));
                    }
                },
            },
        };
        if n_vocab == 0 {
            return Err(bad(&k("vocab_size"), "vocabulary is empty"));
        }

        let rope_freqs = if arch == Arch::Llama && file.tensor("rope_freqs.weight").is_some() {
            let f = read_vector(file, "rope_freqs.weight")?;
            if f.len() != n_rot / 2 {
                return Err(ModelError::BadShape {
                    name: "rope_freqs.weight".into(),
                    found: vec![f.len() as u64],
                    expected: vec![(n_rot / 2) as u64],
                });
            }
            if let Some((i, v)) = f
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0))
            {
                return Err(bad(
                    "rope_freqs.weight",
                    format!("factor {i} is {v}; every factor must be a positive number"),
                ));
            }
            Some(f)
        } else {
            None
        };

        let gemma3 = if arch == Arch::Gemma3 {
            Some(gemma3_params(file, n_layer, n_embd, n_head, head_dim)?)
        } else {
            None
        };

        Ok(ModelConfig {
            arch,
            name,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_ctx_train,
            rms_eps,
            rope_kind: arch.rope_kind(),
            rope_base,
            n_rot,
            rope_pos_scale,
            rope_freqs,
            tied: file.tensor("output.weight").is_none(),
            qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            gemma3,
        })
    }

    /// The factor on embedding rows after the lookup: √n_embd for gemma3, else 1.
    pub fn embd_scale(&self) -> f32 {
        if self.gemma3.is_some() {
            (self.n_embd as f32).sqrt()
        } else {
            1.0
        }
    }

    /// The factor on q·k before the softmax: 1/√head_dim unless the architecture says otherwise.
    pub fn attn_scale(&self) -> f32 {
        match &self.gemma3 {
            Some(g) => g.attn_scale,
            None => 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// The sliding window of layer `l` (`None`: the layer attends to every earlier position).
    pub fn attn_window(&self, l: usize) -> Option<usize> {
        let g = self.gemma3.as_ref()?;
        g.local_layers
            .get(l)
            .copied()
            .unwrap_or(false)
            .then_some(g.sliding_window)
    }

    /// RoPE base and position factor of layer `l` (gemma3's local layers have their own base).
    pub fn layer_rope(&self, l: usize) -> (f32, f32) {
        match &self.gemma3 {
            Some(g) if g.local_layers.get(l).copied().unwrap_or(false) => (g.rope_base_local, 1.0),
            _ => (self.rope_base, self.rope_pos_scale),
        }
    }

    /// RMSNorms after the attention and FFN branches (gemma3).
    pub fn post_norms(&self) -> bool {
        self.gemma3.is_some()
    }

    /// The FFN activation.
    pub fn ffn_act(&self) -> FfnAct {
        if self.gemma3.is_some() {
            FfnAct::GeluTanh
        } else {
            FfnAct::Silu
        }
    }

    /// Width of the concatenated query heads (`n_head · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (`n_head_kv · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Total parameters of the tensors the forward pass uses (norms and biases included).
    pub fn n_params(&self) -> u64 {
        let (d, v, f) = (self.n_embd as u64, self.n_vocab as u64, self.n_ff as u64);
        let (q, kv, hd) = (
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.head_dim as u64,
        );
        let mut layer = d + d * q + 2 * d * kv + q * d + d + 3 * d * f;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.qk_norm {
            layer += 2 * hd;
        }
        if self.post_norms() {
            layer += 2 * d;
        }
        let head = if self.tied { 0 } else { d * v };
        d * v + d + head + self.n_layer as u64 * layer
    }
}
