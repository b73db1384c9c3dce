//! `bfpo-lite info MODEL.gguf`: architecture, shapes, tensor-type mix, tokenizer, and whether
//! bfpo-lite can train the model (and if not, why). Works on any valid GGUF.

use anyhow::Context;
use bfpo_lite::gguf::{GgufFile, Value};
use bfpo_lite::model::{ModelConfig, Weights};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model file. A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(value_name = "MODEL.gguf", value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// List every tensor: name, type, shape, bytes.
    #[arg(long)]
    pub tensors: bool,
    /// List every metadata key (long strings and arrays abbreviated).
    #[arg(long)]
    pub metadata: bool,
    /// Print the same information as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct TypeMix {
    #[serde(rename = "type")]
    ty: String,
    count: usize,
    bytes: u64,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    shape: Vec<u64>,
    bytes: u64,
}

#[derive(Serialize)]
struct Tokenizer {
    /// `tokenizer.ggml.model` (`llama` = SentencePiece, `gpt2` = BPE, …).
    model: Option<String>,
    n_tokens: Option<usize>,
    chat_template: bool,
    bos_token_id: Option<u64>,
    eos_token_id: Option<u64>,
}

#[derive(Serialize)]
struct MetaRow {
    key: String,
    #[serde(rename = "type")]
    ty: String,
    value: String,
}

#[derive(Serialize)]
struct Info {
    file: String,
    file_bytes: u64,
    gguf_version: u32,
    alignment: u64,
    n_tensors: usize,
    n_kv: usize,
    architecture: Option<String>,
    name: Option<String>,
    /// Parsed hyperparameters, when the architecture is supported and the keys are valid.
    config: Option<ModelConfig>,
    /// The `{arch}.*` scalar keys as stored (always present, for any architecture).
    hyperparameters: BTreeMap<String, String>,
    n_params: u64,
    tensor_bytes: u64,
    type_mix: Vec<TypeMix>,
    /// `output.weight` absent while `token_embd.weight` is present.
    tied: Option<bool>,
    tokenizer: Tokenizer,
    trainable: bool,
    /// Why not, when `trainable` is false.
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<TensorRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Vec<MetaRow>>,
}

fn str_key(file: &GgufFile, key: &str) -> Option<String> {
    file.get(key).and_then(Value::as_str).map(str::to_string)
}

fn gather(file: &GgufFile, args: &Args) -> Info {
    let architecture = str_key(file, "general.architecture");
    let mut hyperparameters = BTreeMap::new();
    if let Some(a) = &architecture {
        let prefix = format!("{a}.");
        for (k, v) in file.kvs() {
            if let Some(rest) = k.strip_prefix(&prefix) {
                hyperparameters.insert(rest.to_string(), v.summary(48));
            }
        }
    }

    let mut mix: BTreeMap<u32, TypeMix> = BTreeMap::new();
    for t in file.tensors() {
        let e = mix.entry(t.type_id).or_insert_with(|| TypeMix {
            ty: t.type_name(),
            count: 0,
            bytes: 0,
        });
        e.count += 1;
        e.bytes += t.n_bytes;
    }
    let mut type_mix: Vec<TypeMix> = mix.into_values().collect();
    type_mix.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.ty.cmp(&b.ty)));

    let has = |n: &str| file.tensor(n).is_some();
    let tied = has("token_embd.weight").then(|| !has("output.weight"));

    let tokens = file.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    let tokenizer = Tokenizer {
        model: str_key(file, "tokenizer.ggml.model"),
        n_tokens: tokens.map(<[Value]>::len),
        chat_template: file.get("tokenizer.chat_template").is_some(),
        bos_token_id: file
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64),
        eos_token_id: file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64),
    };

    // Trainable: the architecture, hyperparameters and every tensor check out, and there is a
    // tokenizer for llama.cpp to tokenize training text with.
    let (config, reason) = match ModelConfig::from_gguf(file) {
        Err(e) => (None, Some(e.to_string())),
        Ok(cfg) => {
            let reason = match Weights::from_gguf(file, &cfg) {
                Err(e) => Some(e.to_string()),
                Ok(_) if tokens.is_none_or(|t| t.is_empty()) => Some(
                    "the file has no tokenizer (tokenizer.ggml.tokens), so text cannot be tokenized"
                        .to_string(),
                ),
                Ok(_) => None,
            };
            (Some(cfg), reason)
        }
    };

    Info {
        file: args.model.display().to_string(),
        file_bytes: file.bytes().len() as u64,
        gguf_version: file.version(),
        alignment: file.alignment(),
        n_tensors: file.tensors().len(),
        n_kv: file.kvs().len(),
        name: str_key(file, "general.name"),
        architecture,
        config,
        hyperparameters,
        n_params: file.tensors().iter().map(|t| t.n_elements()).sum(),
        tensor_bytes: file.tensors().iter().map(|t| t.n_bytes).sum(),
        type_mix,
        tied,
        tokenizer,
        trainable: reason.is_none(),
        reason,
        tensors: args.tensors.then(|| {
            file.tensors()
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    ty: t.type_name(),
                    shape: t.ne.clone(),
                    bytes: t.n_bytes,
                })
                .collect()
        }),
        metadata: args.metadata.then(|| {
            file.kvs()
                .iter()
                .map(|(k, v)| MetaRow {
                    key: k.clone(),
                    ty: v.value_type().name().to_string(),
                    value: v.summary(80),
                })
                .collect()
        }),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One `label value` line of the text report.
fn row(o: &mut String, label: &str, value: String) {
    let _ = writeln!(o, "  {label:<14} {value}");
}

/// Shape, RoPE and extras of a trainable model, or the raw hyperparameters of another.
fn render_shape(o: &mut String, info: &Info) {
    if let Some(c) = &info.config {
        row(
            o,
            "shape",
            format!(
                "dim {}, {} layers, {} heads ({} KV, head size {}), ff {}, vocab {}, ctx {}",
                c.n_embd,
                c.n_layer,
                c.n_head,
                c.n_head_kv,
                c.head_dim,
                c.n_ff,
                c.n_vocab,
                c.n_ctx_train
            ),
        );
        let mut rope = format!(
            "{:?}, base {}, {} of {} dims rotated, rms eps {:e}",
            c.rope_kind, c.rope_base, c.n_rot, c.head_dim, c.rms_eps
        );
        if c.rope_pos_scale != 1.0 {
            rope.push_str(&format!(", linear scaling ×{}", 1.0 / c.rope_pos_scale));
        }
        if c.rope_freqs.is_some() {
            rope.push_str(", rope_freqs factors");
        }
        row(o, "rope", rope);
        let mut extras = Vec::new();
        if c.qkv_bias {
            extras.push("Q/K/V biases".to_string());
        }
        if c.qk_norm {
            extras.push("Q/K norms".to_string());
        }
        if let Some(g) = &c.gemma3 {
            let n_local = g.local_layers.iter().filter(|&&l| l).count();
            extras.push(format!(
                "post-norms, GeGLU, embedding ×√{}, {n_local} local layers (window {}, rope base {}) and {} global",
                c.n_embd,
                g.sliding_window,
                g.rope_base_local,
                c.n_layer - n_local
            ));
        }
        if !extras.is_empty() {
            row(o, "extras", extras.join(", "));
        }
    } else if !info.hyperparameters.is_empty() {
        let hp: Vec<String> = info
            .hyperparameters
            .iter()
            .filter(|(_, v)| !v.starts_with('['))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        row(o, "metadata", hp.join(", "));
    }
}

/// The `--tensors` and `--metadata` tables.
fn render_tables(o: &mut String, info: &Info) {
    if let Some(tensors) = &info.tensors {
        let _ = writeln!(o);
        let w = tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            o,
            "  {:<w$}  {:<8} {:<20} {:>12}",
            "name", "type", "shape", "bytes"
        );
        for t in tensors {
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                o,
                "  {:<w$}  {:<8} {:<20} {:>12}",
                t.name,
                t.ty,
                shape,
                thousands(t.bytes)
            );
        }
    }
    if let Some(meta) = &info.metadata {
        let _ = writeln!(o);
        for m in meta {
            let _ = writeln!(o, "  {} ({}) = {}", m.key, m.ty, m.value);
        }
    }
}

fn render_text(info: &Info) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(
        o,
        "{} ({}, GGUF v{}, {} tensors, {} metadata keys)",
        info.file,
        human_bytes(info.file_bytes),
        info.gguf_version,
        info.n_tensors,
        info.n_kv
    );
    let arch = info.architecture.as_deref().unwrap_or("(none)");
    match &info.name {
        Some(n) => row(o, "architecture", format!("{arch} ({n:?})")),
        None => row(o, "architecture", arch.to_string()),
    }
    render_shape(o, info);
    match info.tied {
        Some(true) => row(o, "embeddings", "tied (no output.weight)".into()),
        Some(false) => row(o, "embeddings", "untied (separate output.weight)".into()),
        None => {}
    }
    row(
        o,
        "parameters",
        format!(
            "{} ({} of tensor data)",
            thousands(info.n_params),
            human_bytes(info.tensor_bytes)
        ),
    );
    let mix: Vec<String> = info
        .type_mix
        .iter()
        .map(|m| format!("{} ×{} ({})", m.ty, m.count, human_bytes(m.bytes)))
        .collect();
    row(o, "tensor types", mix.join(", "));
    let t = &info.tokenizer;
    let kind = match t.model.as_deref() {
        Some("llama") => "llama (SentencePiece)".to_string(),
        Some("gpt2") => "gpt2 (BPE)".to_string(),
        Some(other) => other.to_string(),
        None => "none".to_string(),
    };
    row(
        o,
        "tokenizer",
        format!(
            "{kind}, {} tokens, chat template: {}",
            t.n_tokens.map_or("no".to_string(), |n| n.to_string()),
            if t.chat_template {
                "yes".to_string()
            } else {
                no_template_hint(info.architecture.as_deref())
            }
        ),
    );
    match &info.reason {
        None => row(o, "trainable", "yes".into()),
        Some(r) => row(o, "trainable", format!("no, because {r}")),
    }
    render_tables(o, info);
    out
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let file = GgufFile::open(&args.model)
        .with_context(|| format!("cannot read {} as a GGUF model", args.model.display()))?;
    let info = gather(&file, &args);
    let text = if args.json {
        serde_json::to_string_pretty(&info)? + "\n"
    } else {
        render_text(&info)
    };
    super::print_out(&text)
}

/// "no" and what to pass instead: a base model renders conversations with `--chat-template`.
fn no_template_hint(arch: Option<&str>) -> String {
    use bfpo_lite::template::{BUILTIN_NAMES, builtin_for_arch};
    let fit = arch
        .and_then(builtin_for_arch)
        .map(|n| format!(" (for {}: --chat-template {n})", arch.unwrap_or_default()))
        .unwrap_or_default();
    format!(
        "no (a base model?); pass --chat-template NAME, one of {}{fit}, or --chat-template FILE with Jinja text",
        BUILTIN_NAMES.join(", ")
    )
}
