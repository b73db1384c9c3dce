//! The whole-model forward pass on the GPU: per-token log-probs of the response tokens of a
//! padded batch of [`Example`]s, with an optional LoRA adapter.
//!
//! # Structure
//! [`GpuModel::load`] uploads every weight matrix as stored (quantized bytes, [`GpuWeight`]) and
//! the norms/biases as f32. A forward over a batch is three kinds of submissions:
//! 1. [`GpuModel::embed`]: token embeddings into the layer-0 input;
//! 2. [`GpuModel::layer_forward`] once per layer (one submission each, so no submission runs
//!    long on a real GPU): `x_out = block(x_in)`;
//! 3. [`GpuModel::head_forward`]: gather the scored rows, final RMSNorm, LM head fused with the
//!    per-token log-prob of the target (vocabulary in chunks, never a `[T × V]` matrix).
//!
//! For a backward pass with activation checkpointing, keep the layer inputs ([`LayerInputs`]):
//! everything else a layer computes is in the [`Workspace`] and can be recomputed from its input
//! by calling [`GpuModel::layer_forward`] again (deterministic: same bits).
//!
//! # Batch layout
//! B examples padded to L = the longest length; row `t = b·L + i` holds token i of example b
//! (T = B·L rows). Padding rows carry token 0 and are computed but never read: attention gives
//! them zeros and they are never scored. Token `i ≥ response_start` of an example is scored,
//! predicted from row `i − 1`; the `N` scored rows are gathered before the LM head.
//!
//! # Buffers and bytes (f32 unless noted; d = n_embd, q = n_head·head_dim,
//! kv = n_head_kv·head_dim, ff = n_ff, r = LoRA rank)
//! | buffer | shape | bytes | backward needs |
//! |---|---|---|---|
//! | layer inputs (checkpoints) | (n_layer + 1) × [T, d] | 4·T·d each | yes (kept) |
//! | `n1`, `xn` | [T, d] each | 8·T·d | normed inputs of attention (n1) and of the FFN (xn = the plan's n2) |
//! | `rstd_attn`, `rstd_ffn` | [T] | 4·T each | RMSNorm backward |
//! | `q`, `k`, `v` | [T, q], [T, kv], [T, kv] | 4·T·(q + 2kv) | q, k after rope |
//! | `q_pre`, `k_pre`, `q_rstd`, `k_rstd` | qwen3 only | 4·T·(q + kv + n_head + n_head_kv) | per-head norm backward |
//! | `attn`, `attn_lse` | [T, q], [T, n_head] | 4·T·(q + n_head) | attention backward |
//! | `h` | [T, d] | 4·T·d | residual after attention (FFN input) |
//! | `gate`, `up`, `act` | [T, ff] each | 12·T·ff | SwiGLU backward |
//! | `lora_u` | one [T, r] per adapted target | 4·T·r each | LoRA backward |
//! | `xs`, `xsn`, `rstd_out` | [N, d], [N, d], [N] | 8·N·d + 4·N | final norm backward |
//! | `logp`, `lse` | [N] each | 8·N | `lse` for `dlogits = w·(onehot − exp(z − lse))` |
//! | LM-head scratch | [N, chunk] + [N, 4] | ≤ `lm_head_budget` (64 MiB default) | – |
//! | batch inputs | ids, pos [T] u32; lens [B] u32; rows, targets [N] u32 | 8·T + 4·B + 8·N | – |
//!
//! | `ping` | 2 × [T, d] | 8·T·d | – (residual stream without checkpoints) |
//!
//! This follows the training memory plan ([`crate::gpu::memory`], [`WorkspaceSpec::from_plan`])
//! with small additions the plan does not list: the attention log-sum-exp `[T, n_head]` (the
//! streaming attention keeps it instead of `[heads, T, T]` probabilities), the gathered pre-norm
//! rows `xs` `[N, d]` and the two `ping` buffers.

use super::ops::attention::{AttnShape, attention};
use super::ops::dropout::{Dropout, dropout_apply};
use super::ops::embedding::{embedding, gather_rows};
use super::ops::logprob::{HeadLora, LmHeadScratch, lm_head_logprobs_lora};
use super::ops::lora::{GpuLora, GpuLoraTensor, lora_forward};
use super::ops::matmul::{GpuWeight, matmul};
use super::ops::rmsnorm::rmsnorm;
use super::ops::rope::{RopeConfig, rope_inplace};
use super::ops::swiglu::swiglu;
use super::profile;
use super::{Gpu, GpuBuf, GpuError, Recorder};
use crate::data::Example;
use crate::gguf::GgufFile;
use crate::model::lora::Target;
use crate::model::{ModelConfig, ModelError, TensorRef, Weights};

/// Errors of the GPU forward pass. Messages carry the numbers and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "example {index}: token id {id} at position {pos} is outside the model's vocabulary of {n_vocab} tokens; tokenize with this model's own vocabulary"
    )]
    TokenOutOfRange {
        index: usize,
        pos: usize,
        id: u32,
        n_vocab: usize,
    },
    #[error(
        "example {index}: response_start {response_start} must be at least 1 and at most the length {len} (a scored token needs a preceding position)"
    )]
    BadResponseStart {
        index: usize,
        response_start: usize,
        len: usize,
    },
    #[error(
        "the batch needs {rows} rows ({n_seq} sequences × length {seq_len}) and {scored} scored rows, but the workspace was made for {max_rows} rows and {max_scored} scored rows; make a larger Workspace"
    )]
    WorkspaceTooSmall {
        rows: usize,
        n_seq: usize,
        seq_len: usize,
        scored: usize,
        max_rows: usize,
        max_scored: usize,
    },
    #[error(
        "LoRA tensor for layer {layer} {target:?} is [{n_out} × {n_in}] but the model's projection is [{want_out} × {want_in}]; the adapter was made for another model"
    )]
    LoraShape {
        layer: usize,
        target: Target,
        n_in: usize,
        n_out: usize,
        want_in: usize,
        want_out: usize,
    },
    #[error(
        "LoRA tensor for layer {layer} is out of range: the model has {n_layer} layers; the adapter was made for another model"
    )]
    LoraLayer { layer: usize, n_layer: usize },
    #[error("{what}: {detail}")]
    Unsupported { what: String, detail: String },
    #[error(
        "checkpoint buffers: got {got}, need n_layer + 1 = {want}, each holding ≥ {rows} × {d} f32"
    )]
    BadCheckpoints {
        got: usize,
        want: usize,
        rows: usize,
        d: usize,
    },
}

/// One transformer block on the device.
#[derive(Debug)]
pub struct GpuLayer {
    /// `[d]` f32.
    pub attn_norm: GpuBuf,
    pub q: GpuWeight,
    pub k: GpuWeight,
    pub v: GpuWeight,
    /// qwen2 biases: `[q]`, `[kv]`, `[kv]` f32.
    pub q_bias: Option<GpuBuf>,
    pub k_bias: Option<GpuBuf>,
    pub v_bias: Option<GpuBuf>,
    /// qwen3 per-head RMSNorm weights, `[head_dim]` f32.
    pub q_norm: Option<GpuBuf>,
    pub k_norm: Option<GpuBuf>,
    pub o: GpuWeight,
    /// `[d]` f32.
    pub ffn_norm: GpuBuf,
    pub gate: GpuWeight,
    pub up: GpuWeight,
    pub down: GpuWeight,
}

impl GpuLayer {
    /// The weight a LoRA target adapts.
    pub fn weight(&self, t: Target) -> &GpuWeight {
        match t {
            Target::AttnQ => &self.q,
            Target::AttnK => &self.k,
            Target::AttnV => &self.v,
            Target::AttnOutput => &self.o,
            Target::FfnGate => &self.gate,
            Target::FfnUp => &self.up,
            Target::FfnDown => &self.down,
            // Callers pass layer projections only; the LM head's LoRA is applied in head_forward.
            Target::Output => unreachable!("output.weight is not a layer projection"),
        }
    }
}

/// A model on the device.
#[derive(Debug)]
pub struct GpuModel {
    pub cfg: ModelConfig,
    /// `[n_vocab, d]` as stored.
    pub token_embd: GpuWeight,
    /// `output.weight`, or `None` when tied (the LM head is `token_embd`).
    pub output: Option<GpuWeight>,
    /// `[d]` f32.
    pub output_norm: GpuBuf,
    /// qwen2's optional `output.bias`, `[n_vocab]` f32.
    pub output_bias: Option<GpuBuf>,
    pub layers: Vec<GpuLayer>,
    pub rope: RopeConfig,
    /// `[n_rot/2]` f32: radians per position of each rotated pair.
    pub rope_table: GpuBuf,
}

fn upload_vec(gpu: &Gpu, t: &TensorRef<'_>) -> Result<GpuBuf, GpuError> {
    gpu.upload(t.name, &t.to_f32())
}

fn upload_opt(gpu: &Gpu, t: &Option<TensorRef<'_>>) -> Result<Option<GpuBuf>, GpuError> {
    t.as_ref().map(|t| upload_vec(gpu, t)).transpose()
}

impl GpuModel {
    /// Uploads a model: matrices as stored (no f32 copy), norms and biases as f32.
    pub fn load(gpu: &Gpu, file: &GgufFile, cfg: &ModelConfig) -> Result<GpuModel, ForwardError> {
        let w = Weights::from_gguf(file, cfg)?;
        Self::from_weights(gpu, &w, file, cfg)
    }

    /// Uploads already-validated weight views (`file` is consulted for the optional
    /// `output.bias`).
    pub fn from_weights(
        gpu: &Gpu,
        w: &Weights<'_>,
        file: &GgufFile,
        cfg: &ModelConfig,
    ) -> Result<GpuModel, ForwardError> {
        if cfg.gemma3.is_some() {
            return Err(ForwardError::Unsupported {
                what: format!("architecture {}", cfg.arch.name()),
                detail: "the wgpu engine has no Gemma 3 kernels yet (GeGLU, post-norms, sliding-window attention); train and score it with --engine cpu".into(),
            });
        }
        if !cfg.n_embd.is_multiple_of(8) {
            return Err(ForwardError::Unsupported {
                what: format!("n_embd {}", cfg.n_embd),
                detail: "the GPU kernels need the embedding width to be a multiple of 8".into(),
            });
        }
        let rope = RopeConfig::from_model(cfg);
        let rope_table = rope.upload_table(gpu)?;
        let output_bias = match file.tensor("output.bias") {
            Some(info) => {
                let ty = info.ggml_type().map_err(ModelError::from)?;
                let t = TensorRef {
                    name: info.name.as_str(),
                    ty,
                    ne: [cfg.n_vocab, 1],
                    data: file.tensor_bytes(info),
                };
                if info.n_elements() != cfg.n_vocab as u64 {
                    return Err(ModelError::BadShape {
                        name: "output.bias".into(),
                        found: info.ne.clone(),
                        expected: vec![cfg.n_vocab as u64],
                    }
                    .into());
                }
                Some(upload_vec(gpu, &t)?)
            }
            None => None,
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(GpuLayer {
                attn_norm: upload_vec(gpu, &l.attn_norm)?,
                q: GpuWeight::upload(gpu, &l.attn_q)?,
                k: GpuWeight::upload(gpu, &l.attn_k)?,
                v: GpuWeight::upload(gpu, &l.attn_v)?,
                q_bias: upload_opt(gpu, &l.attn_q_bias)?,
                k_bias: upload_opt(gpu, &l.attn_k_bias)?,
                v_bias: upload_opt(gpu, &l.attn_v_bias)?,
                q_norm: upload_opt(gpu, &l.attn_q_norm)?,
                k_norm: upload_opt(gpu, &l.attn_k_norm)?,
                o: GpuWeight::upload(gpu, &l.attn_output)?,
                ffn_norm: upload_vec(gpu, &l.ffn_norm)?,
                gate: GpuWeight::upload(gpu, &l.ffn_gate)?,
                up: GpuWeight::upload(gpu, &l.ffn_up)?,
                down: GpuWeight::upload(gpu, &l.ffn_down)?,
            });
        }
        let model = GpuModel {
            cfg: cfg.clone(),
            token_embd: GpuWeight::upload(gpu, &w.token_embd)?,
            output: w
                .output
                .as_ref()
                .map(|t| GpuWeight::upload(gpu, t))
                .transpose()?,
            output_norm: upload_vec(gpu, &w.output_norm)?,
            output_bias,
            layers,
            rope,
            rope_table,
        };
        gpu.sync("uploading the model")?;
        Ok(model)
    }

    /// The LM head: `output.weight`, or `token_embd` when tied.
    pub fn lm_head(&self) -> &GpuWeight {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Device bytes held by the weights.
    pub fn bytes(&self) -> u64 {
        let opt = |b: &Option<GpuBuf>| b.as_ref().map_or(0, |b| b.size);
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.size
                    + l.q.bytes()
                    + l.k.bytes()
                    + l.v.bytes()
                    + opt(&l.q_bias)
                    + opt(&l.k_bias)
                    + opt(&l.v_bias)
                    + opt(&l.q_norm)
                    + opt(&l.k_norm)
                    + l.o.bytes()
                    + l.ffn_norm.size
                    + l.gate.bytes()
                    + l.up.bytes()
                    + l.down.bytes()
            })
            .sum();
        layers
            + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, |o| o.bytes())
            + self.output_norm.size
            + opt(&self.output_bias)
            + self.rope_table.size
    }

    /// Checks that every tensor of `lora` matches this model.
    pub fn check_lora(&self, lora: &GpuLora) -> Result<(), ForwardError> {
        for t in &lora.tensors {
            if t.target == Target::Output && self.output.is_none() {
                return Err(ForwardError::Unsupported {
                    what: "LoRA on output.weight".into(),
                    detail: "this model ties its embeddings: it has no output.weight to adapt (llama.cpp refuses such an adapter too)".into(),
                });
            }
            if t.layer >= self.cfg.n_layer {
                return Err(ForwardError::LoraLayer {
                    layer: t.layer,
                    n_layer: self.cfg.n_layer,
                });
            }
            let (want_in, want_out) = t.target.shape(&self.cfg);
            if (t.n_in, t.n_out) != (want_in, want_out) {
                return Err(ForwardError::LoraShape {
                    layer: t.layer,
                    target: t.target,
                    n_in: t.n_in,
                    n_out: t.n_out,
                    want_in,
                    want_out,
                });
            }
        }
        Ok(())
    }

    /// Records the embedding of `batch` into `x` `[T, d]`.
    pub fn embed(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder<'_>,
        batch: &GpuBatch,
        x: &GpuBuf,
    ) -> Result<(), ForwardError> {
        embedding(gpu, rec, &self.token_embd, &batch.ids, x, batch.n_rows())?;
        Ok(())
    }

    /// Records one transformer block: `x_out = block_il(x_in)`. `x_out` may be the same buffer
    /// as `x_in` (the input is consumed before the output is written). Afterwards the workspace
    /// holds every intermediate of this layer (see the module table), which is what a backward
    /// pass needs after recomputing the layer from its checkpointed input.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder<'_>,
        il: usize,
        batch: &GpuBatch,
        ws: &Workspace,
        x_in: &GpuBuf,
        x_out: &GpuBuf,
        lora: Option<&GpuLora>,
    ) -> Result<(), ForwardError> {
        let cfg = &self.cfg;
        let l = &self.layers[il];
        let t = batch.n_rows();
        let (d, hd) = (cfg.n_embd, cfg.head_dim);
        let eps = cfg.rms_eps;
        let adapter = |target: Target| -> Option<(&GpuLora, &GpuLoraTensor)> {
            lora.and_then(|a| a.get(il, target).map(|lt| (a, lt)))
        };
        // Projection y = x·Wᵀ (+ bias) (+ LoRA), or y += … when `accumulate`.
        let project = |rec: &mut Recorder<'_>,
                       target: Target,
                       x: &GpuBuf,
                       bias: Option<&GpuBuf>,
                       y: &GpuBuf,
                       accumulate: bool|
         -> Result<(), GpuError> {
            matmul(gpu, rec, x, l.weight(target), bias, y, t, accumulate)?;
            if let Some((a, lt)) = adapter(target) {
                // Training with dropout: the LoRA branch reads drop(x) (PEFT semantics).
                let x = match &ws.lora_dropout {
                    Some((dr, buf)) if dr.active() => {
                        dropout_apply(gpu, rec, dr, il, target, x, buf, t, lt.n_in, false)?;
                        buf
                    }
                    _ => x,
                };
                lora_forward(gpu, rec, lt, a.rank, a.scale(), x, ws.lora_u(target)?, y, t)?;
            }
            Ok(())
        };

        // Attention.
        rmsnorm(
            gpu,
            rec,
            x_in,
            &l.attn_norm,
            &ws.n1,
            &ws.rstd_attn,
            t,
            d,
            eps,
        )?;
        match (&l.q_norm, &l.k_norm, &ws.qk) {
            (Some(qn), Some(kn), Some(qk)) => {
                project(
                    rec,
                    Target::AttnQ,
                    &ws.n1,
                    l.q_bias.as_ref(),
                    &qk.q_pre,
                    false,
                )?;
                project(
                    rec,
                    Target::AttnK,
                    &ws.n1,
                    l.k_bias.as_ref(),
                    &qk.k_pre,
                    false,
                )?;
                rmsnorm(
                    gpu,
                    rec,
                    &qk.q_pre,
                    qn,
                    &ws.q,
                    &qk.q_rstd,
                    t * cfg.n_head,
                    hd,
                    eps,
                )?;
                rmsnorm(
                    gpu,
                    rec,
                    &qk.k_pre,
                    kn,
                    &ws.k,
                    &qk.k_rstd,
                    t * cfg.n_head_kv,
                    hd,
                    eps,
                )?;
            }
            (None, None, _) => {
                project(rec, Target::AttnQ, &ws.n1, l.q_bias.as_ref(), &ws.q, false)?;
                project(rec, Target::AttnK, &ws.n1, l.k_bias.as_ref(), &ws.k, false)?;
            }
            _ => {
                return Err(ForwardError::Unsupported {
                    what: format!("layer {il}"),
                    detail: "Q/K head norms need both weights and a workspace made for them".into(),
                });
            }
        }
        project(rec, Target::AttnV, &ws.n1, l.v_bias.as_ref(), &ws.v, false)?;
        rope_inplace(
            gpu,
            rec,
            &self.rope,
            &self.rope_table,
            &batch.pos,
            &ws.q,
            t,
            cfg.n_head,
            false,
        )?;
        rope_inplace(
            gpu,
            rec,
            &self.rope,
            &self.rope_table,
            &batch.pos,
            &ws.k,
            t,
            cfg.n_head_kv,
            false,
        )?;
        let shape = AttnShape::new(batch.n_seq, batch.seq_len, cfg.n_head, cfg.n_head_kv, hd);
        attention(
            gpu,
            rec,
            &shape,
            &ws.q,
            &ws.k,
            &ws.v,
            &batch.lens_buf,
            &ws.attn,
            &ws.attn_lse,
        )?;
        rec.copy(x_in, 0, &ws.h, 0, (t * d * 4) as u64);
        project(rec, Target::AttnOutput, &ws.attn, None, &ws.h, true)?;

        // Feed-forward.
        rmsnorm(
            gpu,
            rec,
            &ws.h,
            &l.ffn_norm,
            &ws.xn,
            &ws.rstd_ffn,
            t,
            d,
            eps,
        )?;
        project(rec, Target::FfnGate, &ws.xn, None, &ws.gate, false)?;
        project(rec, Target::FfnUp, &ws.xn, None, &ws.up, false)?;
        swiglu(gpu, rec, &ws.gate, &ws.up, &ws.act, t * cfg.n_ff)?;
        rec.copy(&ws.h, 0, x_out, 0, (t * d * 4) as u64);
        project(rec, Target::FfnDown, &ws.act, None, x_out, true)?;
        Ok(())
    }

    /// Records the head: gather the scored rows of `x` `[T, d]` (the last layer's output), final
    /// RMSNorm, LM head + log-prob of each target into `ws.logp` / `ws.lse` `[N]`.
    ///
    /// Submits `rec` after every vocabulary chunk but the last (see [`lm_head_logprobs_lora`]).
    ///
    /// A LoRA of `lora` on `output.weight` is added to the logits.
    pub fn head_forward<'g>(
        &self,
        gpu: &'g Gpu,
        rec: &mut Recorder<'g>,
        batch: &GpuBatch,
        ws: &Workspace,
        x: &GpuBuf,
        lora: Option<&GpuLora>,
    ) -> Result<(), ForwardError> {
        let n = batch.n_scored();
        if n == 0 {
            return Ok(());
        }
        let d = self.cfg.n_embd;
        profile::set_scope(Some("lm_head"));
        let done = self.head_forward_scoped(gpu, rec, batch, ws, x, lora, n, d);
        profile::set_scope(None);
        done
    }

    #[allow(clippy::too_many_arguments)]
    fn head_forward_scoped<'g>(
        &self,
        gpu: &'g Gpu,
        rec: &mut Recorder<'g>,
        batch: &GpuBatch,
        ws: &Workspace,
        x: &GpuBuf,
        lora: Option<&GpuLora>,
        n: usize,
        d: usize,
    ) -> Result<(), ForwardError> {
        gather_rows(gpu, rec, x, &batch.rows, &ws.xs, n, d)?;
        rmsnorm(
            gpu,
            rec,
            &ws.xs,
            &self.output_norm,
            &ws.xsn,
            &ws.rstd_out,
            n,
            d,
            self.cfg.rms_eps,
        )?;
        let head_lora = match lora.and_then(|a| a.get(0, Target::Output).map(|t| (a, t))) {
            Some((a, t)) => Some(HeadLora {
                tensor: t,
                rank: a.rank,
                scale: a.scale(),
                u: ws.lora_u(Target::Output)?,
            }),
            None => None,
        };
        lm_head_logprobs_lora(
            gpu,
            rec,
            &ws.xsn,
            self.lm_head(),
            self.output_bias.as_ref(),
            head_lora,
            &batch.targets,
            &ws.lm_head,
            &ws.logp,
            &ws.lse,
            n,
        )?;
        Ok(())
    }

    /// Runs the whole forward over `batch` and reads back the log-probs. With `checkpoints`
    /// (n_layer + 1 buffers of ≥ `[T, d]` f32), layer i reads `checkpoints[i]` and writes
    /// `checkpoints[i + 1]`, so they hold every layer input afterwards; without, the layers
    /// alternate between the workspace's two `ping` buffers.
    pub fn forward_batch(
        &self,
        gpu: &Gpu,
        ws: &Workspace,
        batch: &GpuBatch,
        lora: Option<&GpuLora>,
        checkpoints: Option<&LayerInputs>,
    ) -> Result<ForwardOutput, ForwardError> {
        ws.check_fits(batch)?;
        if let Some(a) = lora {
            self.check_lora(a)?;
            ws.check_lora(a)?;
        }
        let n_layer = self.cfg.n_layer;
        if let Some(c) = checkpoints {
            c.check(n_layer, batch.n_rows(), self.cfg.n_embd)?;
        }
        let input = |i: usize| -> &GpuBuf {
            match checkpoints {
                Some(c) => &c.bufs[i],
                None => &ws.ping[i % 2],
            }
        };
        let mut rec = gpu.recorder();
        self.embed(gpu, &mut rec, batch, input(0))?;
        rec.submit();
        for il in 0..n_layer {
            // A kept layer writes its intermediates to its own buffers (for the backward).
            let lws = checkpoints.and_then(|c| c.kept[il].as_ref()).unwrap_or(ws);
            let mut rec = gpu.recorder();
            self.layer_forward(
                gpu,
                &mut rec,
                il,
                batch,
                lws,
                input(il),
                input(il + 1),
                lora,
            )?;
            rec.submit();
        }
        let mut rec = gpu.recorder();
        self.head_forward(gpu, &mut rec, batch, ws, input(n_layer), lora)?;
        rec.submit();
        let n = batch.n_scored();
        let logp: Vec<f32> = if n == 0 {
            gpu.sync("forward pass")?;
            Vec::new()
        } else {
            gpu.read_range(&ws.logp, 0, (n * 4) as u64)?
        };
        Ok(batch.split(&logp))
    }

    /// Convenience: allocates a workspace and batch for `examples` and runs the forward.
    pub fn forward(
        &self,
        gpu: &Gpu,
        examples: &[Example],
        lora: Option<&GpuLora>,
    ) -> Result<ForwardOutput, ForwardError> {
        if examples.is_empty() {
            return Ok(ForwardOutput::default());
        }
        let batch = GpuBatch::new(gpu, &self.cfg, examples)?;
        let ws = Workspace::new(gpu, &self.cfg, &WorkspaceSpec::for_batch(&batch, lora))?;
        self.forward_batch(gpu, &ws, &batch, lora, None)
    }
}

/// How [`GpuModel::score`] groups examples into padded batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreBatching {
    /// Most padded rows (sequences × longest length) per batch; a longer example gets a batch
    /// of its own.
    pub batch_tokens: usize,
    /// Most sequences per batch.
    pub max_seqs: usize,
}

impl Default for ScoreBatching {
    fn default() -> Self {
        ScoreBatching {
            batch_tokens: 2048,
            max_seqs: 32,
        }
    }
}

impl GpuModel {
    /// Scores any number of examples: sorts them by length, groups them into padded batches
    /// (see [`ScoreBatching`]), runs them through one reused workspace and returns the results
    /// in the input order. `progress(done, total)` is called after every batch. Results do not
    /// depend on the grouping (each row is computed independently of its batch).
    pub fn score(
        &self,
        gpu: &Gpu,
        examples: &[Example],
        lora: Option<&GpuLora>,
        batching: ScoreBatching,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ForwardOutput, ForwardError> {
        check_examples(&self.cfg, examples)?;
        let n = examples.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| examples[i].len());
        // Greedy groups of consecutive (by length) examples.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut start = 0;
        while start < n {
            let mut end = start + 1;
            while end < n
                && end - start < batching.max_seqs.max(1)
                && (end + 1 - start) * examples[order[end]].len().max(1)
                    <= batching.batch_tokens.max(1)
            {
                end += 1;
            }
            groups.push(start..end);
            start = end;
        }
        let batch_of = |g: &std::ops::Range<usize>| -> Vec<Example> {
            order[g.clone()]
                .iter()
                .map(|&i| examples[i].clone())
                .collect()
        };
        let (mut max_rows, mut max_scored) = (1, 1);
        for g in &groups {
            let exs = batch_of(g);
            let l = exs.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
            max_rows = max_rows.max(exs.len() * l);
            max_scored = max_scored.max(exs.iter().map(|e| e.n_scored()).sum());
        }
        let mut out = ForwardOutput {
            token_logprobs: vec![Vec::new(); n],
            seq_logprobs: vec![0.0; n],
        };
        if n == 0 {
            return Ok(out);
        }
        let mut targets: Vec<Target> = lora
            .map(|a| a.tensors.iter().map(|t| t.target).collect())
            .unwrap_or_default();
        targets.sort();
        targets.dedup();
        let spec = WorkspaceSpec {
            max_rows,
            max_scored,
            lora_rank: lora.map_or(0, |a| a.rank),
            lora_targets: targets,
            lm_head_budget: WorkspaceSpec::DEFAULT_LM_HEAD_BUDGET,
        };
        let ws = Workspace::new(gpu, &self.cfg, &spec)?;
        let mut done = 0;
        for g in &groups {
            let exs = batch_of(g);
            let batch = GpuBatch::new(gpu, &self.cfg, &exs)?;
            let r = self.forward_batch(gpu, &ws, &batch, lora, None)?;
            for (k, (lp, s)) in r.token_logprobs.into_iter().zip(r.seq_logprobs).enumerate() {
                let i = order[g.start + k];
                out.token_logprobs[i] = lp;
                out.seq_logprobs[i] = s;
            }
            done += g.len();
            progress(done, n);
        }
        Ok(out)
    }
}

/// Log-probs returned by the forward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardOutput {
    /// Per example, one log-prob per scored token (`ids[response_start..]`).
    pub token_logprobs: Vec<Vec<f32>>,
    /// Per example, the sum of its token log-probs (accumulated in f64).
    pub seq_logprobs: Vec<f64>,
}

/// Checks that every example has `1 ≤ response_start ≤ len` and only ids inside the vocabulary;
/// errors name the example index and the offending position.
pub fn check_examples(cfg: &ModelConfig, examples: &[Example]) -> Result<(), ForwardError> {
    for (index, ex) in examples.iter().enumerate() {
        if ex.response_start < 1 || ex.response_start > ex.len() {
            return Err(ForwardError::BadResponseStart {
                index,
                response_start: ex.response_start,
                len: ex.len(),
            });
        }
        if let Some((pos, &id)) = ex
            .ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= cfg.n_vocab)
        {
            return Err(ForwardError::TokenOutOfRange {
                index,
                pos,
                id,
                n_vocab: cfg.n_vocab,
            });
        }
    }
    Ok(())
}

/// A padded batch of examples on the device.
#[derive(Debug)]
pub struct GpuBatch {
    /// Sequences B.
    pub n_seq: usize,
    /// Padded length L (the longest example).
    pub seq_len: usize,
    /// Example lengths.
    pub lens: Vec<usize>,
    /// Per example, its range in the scored-row list.
    pub scored: Vec<std::ops::Range<usize>>,
    /// `[T]` u32 token ids (0 in padding rows).
    pub ids: GpuBuf,
    /// `[T]` u32 position of each row within its sequence.
    pub pos: GpuBuf,
    /// `[B]` u32 example lengths.
    pub lens_buf: GpuBuf,
    /// `[N]` u32: the row predicting each scored token (`b·L + i − 1`).
    pub rows: GpuBuf,
    /// `[N]` u32: each scored token's id.
    pub targets: GpuBuf,
}

impl GpuBatch {
    /// Validates and uploads `examples` (at least one).
    pub fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        examples: &[Example],
    ) -> Result<GpuBatch, ForwardError> {
        check_examples(cfg, examples)?;
        let b = examples.len().max(1);
        let l = examples.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; b * l];
        let mut pos = vec![0u32; b * l];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut scored = Vec::with_capacity(examples.len());
        for (s, ex) in examples.iter().enumerate() {
            for i in 0..l {
                pos[s * l + i] = i as u32;
            }
            ids[s * l..s * l + ex.len()].copy_from_slice(&ex.ids);
            let start = rows.len();
            for i in ex.response_start..ex.len() {
                rows.push((s * l + i - 1) as u32);
                targets.push(ex.ids[i]);
            }
            scored.push(start..rows.len());
        }
        let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
        let mut lens_u32: Vec<u32> = lens.iter().map(|&x| x as u32).collect();
        lens_u32.resize(b, 0);
        Ok(GpuBatch {
            n_seq: b,
            seq_len: l,
            lens,
            scored,
            ids: gpu.upload("batch ids", &ids)?,
            pos: gpu.upload("batch positions", &pos)?,
            lens_buf: gpu.upload("batch lengths", &lens_u32)?,
            rows: gpu.upload(
                "batch scored rows",
                if rows.is_empty() { &[0u32][..] } else { &rows },
            )?,
            targets: gpu.upload(
                "batch targets",
                if targets.is_empty() {
                    &[0u32][..]
                } else {
                    &targets
                },
            )?,
        })
    }

    /// Rows T = B·L.
    pub fn n_rows(&self) -> usize {
        self.n_seq * self.seq_len
    }

    /// Scored tokens N.
    pub fn n_scored(&self) -> usize {
        self.scored.last().map_or(0, |r| r.end)
    }

    /// Splits a `[N]` vector of token log-probs per example, with f64 sums.
    pub fn split(&self, logp: &[f32]) -> ForwardOutput {
        let token_logprobs: Vec<Vec<f32>> = self
            .scored
            .iter()
            .map(|r| logp[r.clone()].to_vec())
            .collect();
        let seq_logprobs = token_logprobs
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).sum())
            .collect();
        ForwardOutput {
            token_logprobs,
            seq_logprobs,
        }
    }
}

/// How large a [`Workspace`] to make.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkspaceSpec {
    /// Rows T (B·L) the workspace can hold.
    pub max_rows: usize,
    /// Scored rows N it can hold.
    pub max_scored: usize,
    /// LoRA rank and targets (one `[T, rank]` buffer per target), if any.
    pub lora_rank: usize,
    pub lora_targets: Vec<Target>,
    /// Bytes for the LM-head logits chunk (`[N, chunk]` f32), capped by the binding limit.
    pub lm_head_budget: u64,
}

impl WorkspaceSpec {
    pub const DEFAULT_LM_HEAD_BUDGET: u64 = 64 << 20;

    /// Exactly the size `batch` needs.
    pub fn for_batch(batch: &GpuBatch, lora: Option<&GpuLora>) -> WorkspaceSpec {
        let mut targets: Vec<Target> = lora
            .map(|a| a.tensors.iter().map(|t| t.target).collect())
            .unwrap_or_default();
        targets.sort();
        targets.dedup();
        WorkspaceSpec {
            max_rows: batch.n_rows(),
            max_scored: batch.n_scored(),
            lora_rank: lora.map_or(0, |a| a.rank),
            lora_targets: targets,
            lm_head_budget: Self::DEFAULT_LM_HEAD_BUDGET,
        }
    }

    /// The workspace the memory plan ([`crate::gpu::memory`]) budgets for a training run:
    /// `R = 2·pairs_per_step·max_len` rows (all of which may be scored), the plan's LoRA rank
    /// and targets, an LM-head logits chunk of at most `max_len × vocab_chunk` f32 (the plan's
    /// `[T, vocab_chunk]`).
    pub fn from_plan(input: &crate::gpu::memory::PlanInput) -> WorkspaceSpec {
        let rows = 2 * input.pairs_per_step * input.max_len;
        let mut targets = input.targets.clone();
        targets.sort();
        targets.dedup();
        WorkspaceSpec {
            max_rows: rows,
            max_scored: rows,
            lora_rank: input.rank,
            lora_targets: targets,
            lm_head_budget: (input.max_len * input.vocab_chunk * 4) as u64,
        }
    }
}

/// qwen3's per-head Q/K norm buffers.
#[derive(Clone, Debug)]
pub struct QkNormBufs {
    /// `[T, q]` and `[T, kv]`: Q and K before the head norm.
    pub q_pre: GpuBuf,
    pub k_pre: GpuBuf,
    /// `[T·n_head]` and `[T·n_head_kv]` f32.
    pub q_rstd: GpuBuf,
    pub k_rstd: GpuBuf,
}

/// Per-layer intermediates of the forward pass (reused by every layer) and the head buffers.
/// Shapes are in the module documentation.
///
/// Cloning shares the buffers (they are reference-counted device buffers);
/// [`Workspace::layer_set`] makes a workspace with its own per-layer buffers.
#[derive(Clone, Debug)]
pub struct Workspace {
    pub spec: WorkspaceSpec,
    /// Two `[T, d]` layer buffers: the residual stream when no checkpoints are kept; the
    /// backward pass may use them as spare outputs while it recomputes a layer.
    pub ping: [GpuBuf; 2],
    /// `[T, d]`: RMSNorm output feeding attention (the plan's n1).
    pub n1: GpuBuf,
    /// `[T, d]`: RMSNorm output feeding the FFN (the plan's n2).
    pub xn: GpuBuf,
    pub rstd_attn: GpuBuf,
    pub rstd_ffn: GpuBuf,
    pub q: GpuBuf,
    pub k: GpuBuf,
    pub v: GpuBuf,
    pub qk: Option<QkNormBufs>,
    pub attn: GpuBuf,
    pub attn_lse: GpuBuf,
    pub h: GpuBuf,
    pub gate: GpuBuf,
    pub up: GpuBuf,
    pub act: GpuBuf,
    /// One `[T, rank]` buffer per adapted target.
    pub lora_u: Vec<(Target, GpuBuf)>,
    pub xs: GpuBuf,
    pub xsn: GpuBuf,
    pub rstd_out: GpuBuf,
    pub logp: GpuBuf,
    pub lse: GpuBuf,
    pub lm_head: LmHeadScratch,
    /// LoRA dropout of a training forward (set by `gpu::backward::forward_train`; `None` for
    /// scoring): the dropout and a `[T, max n_in]` scratch holding the LoRA input `drop(x)`.
    pub lora_dropout: Option<(Dropout, GpuBuf)>,
}

impl Workspace {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, spec: &WorkspaceSpec) -> Result<Workspace, GpuError> {
        let t = spec.max_rows.max(1);
        let n = spec.max_scored.max(1);
        let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let f = |label: &str, elems: usize| gpu.alloc(label, (elems * 4) as u64);
        let qk = if cfg.qk_norm {
            Some(QkNormBufs {
                q_pre: f("q_pre", t * q)?,
                k_pre: f("k_pre", t * kv)?,
                q_rstd: f("q_rstd", t * cfg.n_head)?,
                k_rstd: f("k_rstd", t * cfg.n_head_kv)?,
            })
        } else {
            None
        };
        let lora_u = spec
            .lora_targets
            .iter()
            .map(|&tg| Ok((tg, f(&format!("lora u {tg:?}"), t * spec.lora_rank.max(1))?)))
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Workspace {
            spec: spec.clone(),
            ping: [f("layer io 0", t * d)?, f("layer io 1", t * d)?],
            n1: f("n1", t * d)?,
            xn: f("xn", t * d)?,
            rstd_attn: f("rstd_attn", t)?,
            rstd_ffn: f("rstd_ffn", t)?,
            q: f("q", t * q)?,
            k: f("k", t * kv)?,
            v: f("v", t * kv)?,
            qk,
            attn: f("attn", t * q)?,
            attn_lse: f("attn_lse", t * cfg.n_head)?,
            h: f("h", t * d)?,
            gate: f("gate", t * ff)?,
            up: f("up", t * ff)?,
            act: f("act", t * ff)?,
            lora_u,
            xs: f("xs", n * d)?,
            xsn: f("xsn", n * d)?,
            rstd_out: f("rstd_out", n)?,
            logp: f("logp", n)?,
            lse: f("lse", n)?,
            lm_head: LmHeadScratch::new(gpu, n, cfg.n_vocab, spec.lm_head_budget)?,
            lora_dropout: None,
        })
    }

    /// Bytes of one layer's intermediates (what [`Workspace::layer_set`] allocates) for `rows`
    /// rows: `n1, xn, h [rows, d]`, `q, attn [rows, q]`, `k, v [rows, kv]`, `gate, up, act
    /// [rows, ff]`, both norms' 1/rms, the attention log-sum-exp, one `[rows, rank]` per LoRA
    /// target, and qwen3's pre-norm Q/K with their per-head 1/rms.
    pub fn layer_bytes(cfg: &ModelConfig, rows: usize, lora_rank: usize, n_targets: usize) -> u64 {
        let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let mut per_row = 3 * d + 2 * q + 2 * kv + 3 * ff + 2 + cfg.n_head;
        per_row += n_targets * lora_rank.max(1);
        if cfg.qk_norm {
            per_row += q + kv + cfg.n_head + cfg.n_head_kv;
        }
        4 * (rows.max(1) * per_row) as u64
    }

    /// How many of the `visited` layers (those a backward pass goes through) keep their
    /// intermediates within `budget` bytes at `rows` rows, and the bytes they take.
    pub fn layers_within(
        cfg: &ModelConfig,
        rows: usize,
        lora_rank: usize,
        n_targets: usize,
        visited: usize,
        budget: u64,
    ) -> (usize, u64) {
        let per_layer = Self::layer_bytes(cfg, rows, lora_rank, n_targets).max(1);
        let n = ((budget / per_layer) as usize).min(visited);
        (n, n as u64 * per_layer)
    }

    /// A workspace with its own per-layer intermediates (`n1` … `act`, `lora_u`, qwen3's Q/K
    /// norm buffers) and this one's `ping`, head and dropout buffers shared: what a training
    /// forward keeps for one layer so that the backward need not recompute it.
    pub fn layer_set(&self, gpu: &Gpu, cfg: &ModelConfig) -> Result<Workspace, GpuError> {
        let t = self.spec.max_rows.max(1);
        let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let f = |label: &str, elems: usize| gpu.alloc(label, (elems * 4) as u64);
        let qk = if cfg.qk_norm {
            Some(QkNormBufs {
                q_pre: f("kept q_pre", t * q)?,
                k_pre: f("kept k_pre", t * kv)?,
                q_rstd: f("kept q_rstd", t * cfg.n_head)?,
                k_rstd: f("kept k_rstd", t * cfg.n_head_kv)?,
            })
        } else {
            None
        };
        let lora_u = self
            .lora_u
            .iter()
            .map(|(tg, _)| {
                Ok((
                    *tg,
                    f(
                        &format!("kept lora u {tg:?}"),
                        t * self.spec.lora_rank.max(1),
                    )?,
                ))
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Workspace {
            n1: f("kept n1", t * d)?,
            xn: f("kept xn", t * d)?,
            rstd_attn: f("kept rstd_attn", t)?,
            rstd_ffn: f("kept rstd_ffn", t)?,
            q: f("kept q", t * q)?,
            k: f("kept k", t * kv)?,
            v: f("kept v", t * kv)?,
            qk,
            attn: f("kept attn", t * q)?,
            attn_lse: f("kept attn_lse", t * cfg.n_head)?,
            h: f("kept h", t * d)?,
            gate: f("kept gate", t * ff)?,
            up: f("kept up", t * ff)?,
            act: f("kept act", t * ff)?,
            lora_u,
            ..self.clone()
        })
    }

    /// Device bytes of the per-layer intermediates alone (see [`Workspace::layer_set`]).
    pub fn layer_set_bytes(&self) -> u64 {
        let mut b = [
            &self.n1,
            &self.xn,
            &self.rstd_attn,
            &self.rstd_ffn,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.attn_lse,
            &self.h,
            &self.gate,
            &self.up,
            &self.act,
        ]
        .iter()
        .map(|b| b.size)
        .sum::<u64>();
        if let Some(qk) = &self.qk {
            b += qk.q_pre.size + qk.k_pre.size + qk.q_rstd.size + qk.k_rstd.size;
        }
        b + self.lora_u.iter().map(|(_, u)| u.size).sum::<u64>()
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.layer_set_bytes()
            + [
                &self.ping[0],
                &self.ping[1],
                &self.xs,
                &self.xsn,
                &self.rstd_out,
                &self.logp,
                &self.lse,
            ]
            .iter()
            .map(|b| b.size)
            .sum::<u64>()
            + self.lm_head.bytes()
            + self.lora_dropout.as_ref().map_or(0, |(_, buf)| buf.size)
    }

    /// The LoRA `u = A·x` buffer of a target.
    pub fn lora_u(&self, target: Target) -> Result<&GpuBuf, GpuError> {
        self.lora_u
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, u)| u)
            .ok_or_else(|| GpuError::Validation {
                context: "forward pass".into(),
                detail: format!(
                    "the workspace has no LoRA buffer for {target:?}; make it with the adapter's targets"
                ),
            })
    }

    fn check_fits(&self, batch: &GpuBatch) -> Result<(), ForwardError> {
        if batch.n_rows() > self.spec.max_rows.max(1)
            || batch.n_scored() > self.spec.max_scored.max(1)
        {
            return Err(ForwardError::WorkspaceTooSmall {
                rows: batch.n_rows(),
                n_seq: batch.n_seq,
                seq_len: batch.seq_len,
                scored: batch.n_scored(),
                max_rows: self.spec.max_rows,
                max_scored: self.spec.max_scored,
            });
        }
        Ok(())
    }

    fn check_lora(&self, lora: &GpuLora) -> Result<(), ForwardError> {
        for t in &lora.tensors {
            self.lora_u(t.target)?;
        }
        if !lora.tensors.is_empty() && lora.rank > self.spec.lora_rank {
            return Err(ForwardError::Unsupported {
                what: format!("LoRA rank {}", lora.rank),
                detail: format!(
                    "the workspace was made for rank {}; make it with the adapter's rank",
                    self.spec.lora_rank
                ),
            });
        }
        Ok(())
    }
}

/// Checkpointed layer inputs for a backward pass: `bufs[i]` is the input of layer i
/// (`bufs[0]` the embeddings, `bufs[n_layer]` the last layer's output), each `[T, d]` f32;
/// and, for the layers in `kept`, every intermediate of the layer (a [`Workspace::layer_set`]),
/// so that the backward pass uses them instead of recomputing the layer.
#[derive(Debug)]
pub struct LayerInputs {
    pub bufs: Vec<GpuBuf>,
    /// One entry per layer: `Some` when the forward writes that layer's intermediates to a
    /// workspace of their own (kept for the backward), `None` when they go to the shared one.
    pub kept: Vec<Option<Workspace>>,
}

impl LayerInputs {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_rows: usize) -> Result<LayerInputs, GpuError> {
        let bytes = (max_rows.max(1) * cfg.n_embd * 4) as u64;
        Ok(LayerInputs {
            bufs: (0..=cfg.n_layer)
                .map(|i| gpu.alloc(&format!("layer input {i}"), bytes))
                .collect::<Result<_, _>>()?,
            kept: vec![None; cfg.n_layer],
        })
    }

    /// Keeps the intermediates of the `n` layers from `first` up (each a
    /// [`Workspace::layer_set`] of `ws`); the others are recomputed by the backward pass.
    pub fn keep_layers(
        &mut self,
        gpu: &Gpu,
        cfg: &ModelConfig,
        ws: &Workspace,
        first: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        for (i, slot) in self.kept.iter_mut().enumerate() {
            *slot = if (first..first + n).contains(&i) {
                Some(ws.layer_set(gpu, cfg)?)
            } else {
                None
            };
        }
        Ok(())
    }

    /// Layers whose intermediates are kept.
    pub fn n_kept(&self) -> usize {
        self.kept.iter().filter(|k| k.is_some()).count()
    }

    /// Device bytes held: the layer inputs and the kept intermediates.
    pub fn bytes(&self) -> u64 {
        self.bufs.iter().map(|b| b.size).sum::<u64>()
            + self
                .kept
                .iter()
                .flatten()
                .map(Workspace::layer_set_bytes)
                .sum::<u64>()
    }

    fn check(&self, n_layer: usize, rows: usize, d: usize) -> Result<(), ForwardError> {
        if self.bufs.len() != n_layer + 1
            || self.kept.len() != n_layer
            || self.bufs.iter().any(|b| b.len_words() < rows * d)
        {
            return Err(ForwardError::BadCheckpoints {
                got: self.bufs.len(),
                want: n_layer + 1,
                rows,
                d,
            });
        }
        Ok(())
    }
}
