//! Device-memory planner: the bytes a training run needs, computed from the model's shape and
//! the run's settings **before** anything is allocated, and a check against the device.
//!
//! The GPU engine allocates exactly what this plan lists (it is the engine's contract), so keep
//! both in step. Assumptions, all f32 unless said otherwise; `T` = max tokens per sequence,
//! `S = 2·pairs_per_step` sequences per micro-step (chosen + rejected), `R = S·T` rows:
//!
//! * **Weights** stay in their GGUF type, bytes as stored. A matrix larger than the binding limit
//!   is split by rows into several buffers each under the limit (`gpu::ops::matmul::GpuWeight`),
//!   so weights never violate a limit; the largest tensor is reported for information.
//! * **LoRA**: A and B, their gradient accumulators, and Adam's m and v: 4 × params × 4 bytes,
//!   one buffer of each kind per adapted tensor. Gradients accumulate across micro-steps in place.
//! * **Checkpoints** (activation checkpointing on, the default): the residual stream at the input
//!   of every layer plus the final output, `(n_layer + 1)` buffers of `[R, d]`. The backward pass
//!   recomputes one layer at a time from its checkpoint.
//!   The GPU engine also keeps whole layers' values (below) for as many layers as its activation
//!   budget holds (`--activation-memory`, reported as `Event::Activations` once the device is
//!   known), then the LM head's logits `[N, V]` if the rest of the budget holds them; those
//!   layers are not recomputed. That budget is on top of this plan.
//! * **Layer workspace, values** (one layer; with checkpointing off, one set per layer), as
//!   `gpu::forward::Workspace` and `gpu::backward` allocate them: two layer-I/O buffers, the
//!   norm outputs `n1` (attention) and `xn` (FFN) and the residual `h` `[R, d]`
//!   each, `q, att [R, q_dim]`, `k, v [R, kv_dim]`, `g, u, s [R, n_ff]`, LoRA `z = A·x [R, r]`
//!   per adapted target, per-row 1/rms of both norms `[R, 2]`, the attention log-sum-exp
//!   `[R, n_head]`; qwen3 adds the pre-norm `q, k` and per-head 1/rms.
//! * **Layer workspace, gradients** (`gpu::backward`): `dx` (running residual gradient), `dn`
//!   (shared by both norms) `[R, d]`, `datt, dq [R, q_dim]`, `dk, dv [R, kv_dim]`, `ds
//!   [R, n_ff]` (the SwiGLU backward writes `dg, du` over the forward's `g, u`), attention
//!   `(lse, D)` `[R, n_head, 2]`, one LoRA `dz [R, r]` scratch; qwen3 adds `dk` before the head
//!   norm `[R, kv_dim]`.
//! * **Attention** streams (online softmax forward; backward recomputes probabilities from the
//!   log-sum-exp): no `[T, T]` matrix exists, only the per-row buffers above. `head_chunk` is
//!   therefore every head and `attn_chunk_bytes` is not used.
//! * **LM head** runs per (sequence, vocabulary chunk): logits (then dlogits in place)
//!   `[T, vocab_chunk]`, plus the final-norm output and its gradient `[R, d]` each, and per-row
//!   max, sum-exp, target logit and log-prob `[R, 4]`. (Not yet in step: the engine's
//!   `LmHeadScratch` takes all scored rows at once, `[N, cols]` with `cols` sized to a 64 MiB
//!   budget (`WorkspaceSpec::DEFAULT_LM_HEAD_BUDGET`), so at the default shapes it holds up to
//!   twice this item.)
//! * **Small buffers**: token ids and targets `[R]` u32 each, gradient-norm partials.
//!
//! Not counted: params uniforms and staging buffers for readback (kilobytes), the driver's own
//! overhead. Leave some device memory free.

use crate::gguf::GgmlType;
use crate::model::lora::Target;
use crate::model::{Arch, ModelConfig};
use serde::{Deserialize, Serialize};

/// Default bytes of one attention-probabilities chunk (the head chunk is sized to fit).
pub const DEFAULT_ATTN_CHUNK_BYTES: u64 = 16 << 20;
/// Default vocabulary rows per LM-head chunk.
pub const DEFAULT_VOCAB_CHUNK: usize = 8192;
/// Elements per workgroup of the gradient-norm partial sums (one f32 partial each).
pub const NORM_CHUNK: usize = 4096;

/// What a run is, for planning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    pub cfg: ModelConfig,
    /// Every tensor uploaded to the device with its stored size in bytes.
    pub weights: Vec<(String, u64)>,
    /// Tokens per sequence (T).
    pub max_len: usize,
    /// Preference pairs per micro-step (2 sequences each).
    pub pairs_per_step: usize,
    pub targets: Vec<Target>,
    /// Number of layers carrying adapters.
    pub lora_layers: usize,
    pub rank: usize,
    pub vocab_chunk: usize,
    pub attn_chunk_bytes: u64,
    pub checkpointing: bool,
}

/// One line of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanItem {
    pub name: String,
    pub bytes: u64,
    pub detail: String,
}

/// A named size (the largest binding, the largest buffer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sized {
    pub name: String,
    pub bytes: u64,
}

/// The device memory a run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub input: PlanInput,
    pub items: Vec<PlanItem>,
    pub total: u64,
    /// The largest single storage binding of any non-weight buffer.
    pub largest_binding: Sized,
    /// The largest single non-weight buffer (checked against `max_buffer_size`).
    pub largest_buffer: Sized,
    /// The largest weight tensor (split into row chunks under the binding limit when larger).
    pub largest_weight: Sized,
    /// Query heads per attention chunk.
    pub head_chunk: usize,
    pub lora_params: u64,
}

/// Device limits the plan is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanLimits {
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
}

impl PlanLimits {
    /// What a portable plan should assume: 128 MiB per binding (WebGPU default, lavapipe), and
    /// 2³¹−1 bytes per buffer (Vulkan on non-NVIDIA Linux, DX12).
    pub const PORTABLE: PlanLimits = PlanLimits {
        max_storage_buffer_binding_size: 128 << 20,
        max_buffer_size: (1 << 31) - 1,
    };
}

impl From<&wgpu::Limits> for PlanLimits {
    fn from(l: &wgpu::Limits) -> Self {
        PlanLimits {
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "training needs {need} of device memory but {have} is available ({breakdown}); {hint}",
        need = fmt_bytes(*need), have = fmt_bytes(*have)
    )]
    OutOfMemory {
        need: u64,
        have: u64,
        breakdown: String,
        hint: String,
    },
    #[error(
        "{name} needs a single {bytes_h} storage binding ({bytes} bytes), over this device's limit of {limit_h} ({limit} bytes, max_storage_buffer_binding_size); {hint}",
        bytes_h = fmt_bytes(*bytes), limit_h = fmt_bytes(*limit)
    )]
    BindingTooLarge {
        name: String,
        bytes: u64,
        limit: u64,
        hint: String,
    },
    #[error(
        "{name} needs a single {bytes_h} buffer ({bytes} bytes), over this device's limit of {limit_h} ({limit} bytes, max_buffer_size); {hint}",
        bytes_h = fmt_bytes(*bytes), limit_h = fmt_bytes(*limit)
    )]
    BufferTooLarge {
        name: String,
        bytes: u64,
        limit: u64,
        hint: String,
    },
    #[error("cannot plan: {0}")]
    BadInput(String),
}

/// Layers that keep their activations for the backward under an activation budget, at a
/// plan's largest micro-step (the GPU engine's rule, `gpu::backward::layers_to_keep`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeptActivations {
    pub budget_bytes: u64,
    /// Layers keeping theirs.
    pub kept_layers: usize,
    /// Layers the backward goes through: from `lowest_layer`, the lowest adapted one, up.
    pub visited_layers: usize,
    pub kept_bytes: u64,
}

/// [`KeptActivations`] of `input` (`2 · pairs_per_step · max_len` rows, its rank and distinct
/// targets) when the lowest adapted layer is `lowest_layer` and the budget `budget_bytes`.
pub fn kept_activations(
    input: &PlanInput,
    lowest_layer: usize,
    budget_bytes: u64,
) -> KeptActivations {
    let mut targets = input.targets.clone();
    targets.sort();
    targets.dedup();
    let visited_layers = input.cfg.n_layer.saturating_sub(lowest_layer);
    let (kept_layers, kept_bytes) = crate::gpu::forward::Workspace::layers_within(
        &input.cfg,
        2 * input.pairs_per_step * input.max_len,
        input.rank,
        targets.len(),
        visited_layers,
        budget_bytes,
    );
    KeptActivations {
        budget_bytes,
        kept_layers,
        visited_layers,
        kept_bytes,
    }
}

/// `1.23 GiB`, `45.6 MiB`, `789 KiB`, `12 B`.
pub fn fmt_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.0} KiB", f / K)
    } else {
        format!("{b} B")
    }
}

/// Bytes of a tensor of `n` elements stored as `ty`.
pub fn tensor_bytes(ty: GgmlType, n: usize) -> u64 {
    (n.div_ceil(ty.block_elems()) * ty.block_bytes()) as u64
}

/// The tensors of a model of this shape with every matrix stored as `ty` (norms, biases and
/// `rope_freqs` F32), as a GGUF of that type would hold them (approximately: real quantization
/// mixes such as Q4_K_M store some matrices in other types).
pub fn shape_weights(cfg: &ModelConfig, ty: GgmlType) -> Vec<(String, u64)> {
    let (d, qd, kvd, ff, nv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
    let f32b = |n: usize| (n * 4) as u64;
    let mut w = vec![("token_embd.weight".to_string(), tensor_bytes(ty, nv * d))];
    for l in 0..cfg.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        w.push((n("attn_norm.weight"), f32b(d)));
        w.push((n("attn_q.weight"), tensor_bytes(ty, qd * d)));
        w.push((n("attn_k.weight"), tensor_bytes(ty, kvd * d)));
        w.push((n("attn_v.weight"), tensor_bytes(ty, kvd * d)));
        if cfg.qkv_bias {
            w.push((n("attn_q.bias"), f32b(qd)));
            w.push((n("attn_k.bias"), f32b(kvd)));
            w.push((n("attn_v.bias"), f32b(kvd)));
        }
        if cfg.qk_norm {
            w.push((n("attn_q_norm.weight"), f32b(cfg.head_dim)));
            w.push((n("attn_k_norm.weight"), f32b(cfg.head_dim)));
        }
        w.push((n("attn_output.weight"), tensor_bytes(ty, d * qd)));
        w.push((n("ffn_norm.weight"), f32b(d)));
        w.push((n("ffn_gate.weight"), tensor_bytes(ty, ff * d)));
        w.push((n("ffn_up.weight"), tensor_bytes(ty, ff * d)));
        w.push((n("ffn_down.weight"), tensor_bytes(ty, d * ff)));
        if cfg.post_norms() {
            w.push((n("post_attention_norm.weight"), f32b(d)));
            w.push((n("post_ffw_norm.weight"), f32b(d)));
        }
    }
    w.push(("output_norm.weight".into(), f32b(d)));
    if !cfg.tied {
        w.push(("output.weight".into(), tensor_bytes(ty, nv * d)));
    }
    if let Some(f) = &cfg.rope_freqs {
        w.push(("rope_freqs.weight".into(), f32b(f.len())));
    }
    w
}

/// Named model shapes for planning without a file.
pub const SHAPES: &[&str] = &[
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen3-0.6b",
    "llama-3.2-1b",
    "smollm2-135m",
];

/// The configuration of a named model shape (see [`SHAPES`]), from the models' published
/// `config.json` values.
pub fn shape_config(name: &str) -> Option<ModelConfig> {
    #[allow(clippy::too_many_arguments)]
    fn mk(
        arch: Arch,
        name: &str,
        (n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        rope_base: f32,
        rms_eps: f32,
        rope_freqs: Option<Vec<f32>>,
    ) -> ModelConfig {
        ModelConfig {
            arch,
            name: Some(name.to_string()),
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_ctx_train: 32768,
            rms_eps,
            rope_kind: arch.rope_kind(),
            rope_base,
            n_rot: head_dim,
            rope_pos_scale: 1.0,
            rope_freqs,
            tied: true,
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            gemma3: None,
        }
    }
    let c = match name.to_ascii_lowercase().as_str() {
        "qwen2.5-0.5b" => mk(
            Arch::Qwen2,
            "Qwen2.5-0.5B",
            (151936, 896, 24, 14, 2, 64, 4864),
            1e6,
            1e-6,
            None,
        ),
        "qwen2.5-1.5b" => mk(
            Arch::Qwen2,
            "Qwen2.5-1.5B",
            (151936, 1536, 28, 12, 2, 128, 8960),
            1e6,
            1e-6,
            None,
        ),
        "qwen3-0.6b" => mk(
            Arch::Qwen3,
            "Qwen3-0.6B",
            (151936, 1024, 28, 16, 8, 128, 3072),
            1e6,
            1e-6,
            None,
        ),
        "llama-3.2-1b" => mk(
            Arch::Llama,
            "Llama-3.2-1B",
            (128256, 2048, 16, 32, 8, 64, 8192),
            500000.0,
            1e-5,
            // llama3 rope scaling divisors (values only matter for the forward, not the plan).
            Some(vec![1.0; 32]),
        ),
        "smollm2-135m" => mk(
            Arch::Llama,
            "SmolLM2-135M",
            (49152, 576, 30, 9, 3, 64, 1536),
            100000.0,
            1e-5,
            None,
        ),
        _ => return None,
    };
    Some(c)
}

impl PlanInput {
    /// Defaults for everything but the model: 1024 tokens, 1 pair per micro-step, rank 16 on all
    /// seven projections of every layer, vocabulary chunk 8192, checkpointing on.
    pub fn new(cfg: ModelConfig, weights: Vec<(String, u64)>) -> PlanInput {
        let lora_layers = cfg.n_layer;
        PlanInput {
            cfg,
            weights,
            max_len: 1024,
            pairs_per_step: 1,
            targets: Target::ALL.to_vec(),
            lora_layers,
            rank: 16,
            vocab_chunk: DEFAULT_VOCAB_CHUNK,
            attn_chunk_bytes: DEFAULT_ATTN_CHUNK_BYTES,
            checkpointing: true,
        }
    }
}

/// Computes the plan. Fails only on inputs that make no sense (zero length, rank, …).
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    let c = &input.cfg;
    let bad = |s: String| Err(PlanError::BadInput(s));
    if input.max_len == 0 {
        return bad("max length must be at least 1 token".into());
    }
    if input.pairs_per_step == 0 {
        return bad("pairs per step must be at least 1".into());
    }
    if input.rank == 0 && !input.targets.is_empty() {
        return bad("LoRA rank must be at least 1".into());
    }
    if input.vocab_chunk == 0 {
        return bad("vocabulary chunk must be at least 1".into());
    }
    if input.lora_layers > c.n_layer {
        return bad(format!(
            "{} adapted layers but the model has {}",
            input.lora_layers, c.n_layer
        ));
    }
    let f = 4u64; // bytes per f32 / u32
    let t = input.max_len as u64;
    let s = 2 * input.pairs_per_step as u64;
    let rows = s * t;
    let (d, qd, kvd, ff) = (
        c.n_embd as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.n_ff as u64,
    );
    let r = input.rank as u64;
    let n_t = input.targets.len() as u64;
    let mut items = Vec::new();
    let mut bindings: Vec<Sized> = Vec::new();
    let push = |items: &mut Vec<PlanItem>, name: &str, bytes: u64, detail: String| {
        items.push(PlanItem {
            name: name.to_string(),
            bytes,
            detail,
        });
    };
    let bind = |v: &mut Vec<Sized>, name: String, bytes: u64| v.push(Sized { name, bytes });

    // Weights.
    let wsum: u64 = input.weights.iter().map(|(_, b)| b).sum();
    push(
        &mut items,
        "weights",
        wsum,
        format!("{} tensors as stored", input.weights.len()),
    );
    let largest_weight = input
        .weights
        .iter()
        .max_by_key(|(_, b)| *b)
        .map(|(n, b)| Sized {
            name: n.clone(),
            bytes: *b,
        })
        .unwrap_or(Sized {
            name: "none".into(),
            bytes: 0,
        });

    // LoRA.
    let mut lora_params = 0u64;
    let mut lora_largest = 0u64;
    for &tg in &input.targets {
        let (n_in, n_out) = tg.shape(c);
        let (a, b) = (r * n_in as u64, n_out as u64 * r);
        lora_params += (a + b) * input.lora_layers as u64;
        lora_largest = lora_largest.max(a.max(b) * f);
    }
    let lp = lora_params * f;
    let lora_detail = format!(
        "{lora_params} params: rank {r} on {n_t} targets × {} layers",
        input.lora_layers
    );
    push(&mut items, "LoRA A, B", lp, lora_detail);
    push(
        &mut items,
        "LoRA gradients",
        lp,
        "same shapes as A, B".into(),
    );
    push(&mut items, "Adam moments m, v", 2 * lp, "2 × params".into());
    if lora_largest > 0 {
        bind(&mut bindings, "largest LoRA A or B".into(), lora_largest);
        // The chunked token reductions of the weight gradients share one scratch buffer.
        let scratch = crate::gpu::ops::lora::grad_scratch_bytes(lora_largest / f);
        push(
            &mut items,
            "LoRA gradient scratch",
            scratch,
            "partial sums of the token reductions, shared by every adapted tensor".into(),
        );
    }
    // Split-K partial sums of the forward matmuls (GPUs; CPU adapters never split): at most this,
    // whatever the model, longer token ranges going in windows.
    push(
        &mut items,
        "matmul split-K scratch",
        crate::gpu::ops::matmul::SPLIT_K_SCRATCH_BYTES,
        "at most; GPUs only (CPU adapters never split)".into(),
    );

    // Checkpoints.
    let ckpt_one = rows * d * f;
    let n_head = c.n_head as u64;
    let fwd_per_row = 5 * d
        + 2 * qd
        + 2 * kvd
        + 3 * ff
        + n_t * r
        + 2
        + n_head
        + if c.qk_norm {
            qd + kvd + (c.n_head + c.n_head_kv) as u64
        } else {
            0
        };
    let grad_per_row =
        2 * d + 2 * qd + 2 * kvd + ff + r.max(1) + 2 * n_head + if c.qk_norm { kvd } else { 0 };
    let rows_desc = format!("R = {s} seq × {t} tok = {rows} rows");
    if input.checkpointing {
        push(
            &mut items,
            "layer checkpoints",
            (c.n_layer as u64 + 1) * ckpt_one,
            format!("{} × [R, {d}] f32; {rows_desc}", c.n_layer + 1),
        );
        push(
            &mut items,
            "layer workspace (values)",
            rows * fwd_per_row * f,
            format!("one layer, {fwd_per_row} f32 per row"),
        );
    } else {
        push(
            &mut items,
            "saved activations (no checkpointing)",
            c.n_layer as u64 * rows * fwd_per_row * f + ckpt_one * (c.n_layer as u64 + 1),
            format!(
                "{} layers × {fwd_per_row} f32 per row + residual stream; {rows_desc}",
                c.n_layer
            ),
        );
    }
    bind(&mut bindings, "a layer checkpoint [R, d]".into(), ckpt_one);
    push(
        &mut items,
        "layer workspace (gradients)",
        rows * grad_per_row * f,
        format!("one layer, {grad_per_row} f32 per row"),
    );
    bind(
        &mut bindings,
        "FFN activation [R, n_ff]".into(),
        rows * ff * f,
    );
    bind(
        &mut bindings,
        "attention q [R, q_dim]".into(),
        rows * qd * f,
    );

    // Attention streams: its per-row buffers are in the workspace items above.
    let head_chunk = c.n_head;

    // LM head.
    let vc = input.vocab_chunk.min(c.n_vocab) as u64;
    let logits = t * vc * f;
    push(
        &mut items,
        "LM head logits chunk",
        logits,
        format!("[{t}, {vc}] f32, per sequence and vocabulary chunk"),
    );
    bind(&mut bindings, format!("LM head logits [{t}, {vc}]"), logits);
    push(
        &mut items,
        "final norm + grad, row stats",
        2 * rows * d * f + 4 * rows * f,
        "2 × [R, d] + [R, 4] f32".into(),
    );

    // Small buffers.
    let n_partials: u64 = input
        .targets
        .iter()
        .map(|tg| {
            let (n_in, n_out) = tg.shape(c);
            ((r * n_in as u64).div_ceil(NORM_CHUNK as u64)
                + (r * n_out as u64).div_ceil(NORM_CHUNK as u64))
                * input.lora_layers as u64
        })
        .sum();
    push(
        &mut items,
        "ids, targets, norm partials",
        2 * rows * f + (n_partials + 2) * f,
        format!("2 × [R] u32 + {n_partials} partial sums"),
    );

    let total = items.iter().map(|i| i.bytes).sum();
    let largest = |v: &[Sized]| {
        v.iter().max_by_key(|s| s.bytes).cloned().unwrap_or(Sized {
            name: "none".into(),
            bytes: 0,
        })
    };
    Ok(Plan {
        input: input.clone(),
        items,
        total,
        largest_binding: largest(&bindings),
        largest_buffer: largest(&bindings),
        largest_weight,
        head_chunk,
        lora_params,
    })
}

impl Plan {
    pub fn item(&self, name: &str) -> Option<u64> {
        self.items.iter().find(|i| i.name == name).map(|i| i.bytes)
    }

    /// Checks the plan against a device: every binding and buffer within the limits, the total
    /// within `device_mem` bytes. Errors name the numbers and what to reduce.
    pub fn fits(&self, limits: &PlanLimits, device_mem: u64) -> Result<(), PlanError> {
        let b = &self.largest_binding;
        if b.bytes > limits.max_storage_buffer_binding_size {
            let hint = if b.name.starts_with("LM head") {
                format!(
                    "lower the vocabulary chunk (now {}) or --max-length (now {})",
                    self.input.vocab_chunk, self.input.max_len
                )
            } else if b.name.starts_with("attention") {
                format!(
                    "one head's attention matrix at {} tokens is too large: reduce --max-length",
                    self.input.max_len
                )
            } else {
                format!(
                    "reduce --max-length (now {}) or --pairs-per-step (now {})",
                    self.input.max_len, self.input.pairs_per_step
                )
            };
            return Err(PlanError::BindingTooLarge {
                name: b.name.clone(),
                bytes: b.bytes,
                limit: limits.max_storage_buffer_binding_size,
                hint,
            });
        }
        let big = &self.largest_buffer;
        if big.bytes > limits.max_buffer_size {
            let hint = format!(
                "reduce --max-length (now {}) or --pairs-per-step (now {})",
                self.input.max_len, self.input.pairs_per_step
            );
            return Err(PlanError::BufferTooLarge {
                name: big.name.clone(),
                bytes: big.bytes,
                limit: limits.max_buffer_size,
                hint,
            });
        }
        if self.total > device_mem {
            let weights = self.item("weights").unwrap_or(0);
            let mut top: Vec<&PlanItem> = self.items.iter().collect();
            top.sort_by_key(|i| std::cmp::Reverse(i.bytes));
            let breakdown = top
                .iter()
                .take(4)
                .map(|i| format!("{} {}", i.name, fmt_bytes(i.bytes)))
                .collect::<Vec<_>>()
                .join(", ");
            let lora: u64 = ["LoRA A, B", "LoRA gradients", "Adam moments m, v"]
                .iter()
                .filter_map(|n| self.item(n))
                .sum();
            let acts = self.total - weights - lora;
            let i = &self.input;
            let hint = if weights > device_mem {
                format!(
                    "the weights alone need {}: use a smaller quantization (e.g. Q4_K_M) or a smaller model",
                    fmt_bytes(weights)
                )
            } else {
                let a = format!(
                    "reduce --max-length (now {}) or --pairs-per-step (now {}): activations take {}",
                    i.max_len,
                    i.pairs_per_step,
                    fmt_bytes(acts)
                );
                let l = format!(
                    "reduce --rank (now {}) or the number of --targets (now {}): LoRA with its gradients and Adam moments takes {}",
                    i.rank,
                    i.targets.len(),
                    fmt_bytes(lora)
                );
                if acts >= lora {
                    format!("{a}; or {l}")
                } else {
                    format!("{l}; or {a}")
                }
            };
            return Err(PlanError::OutOfMemory {
                need: self.total,
                have: device_mem,
                breakdown,
                hint,
            });
        }
        Ok(())
    }
}
