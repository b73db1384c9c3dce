//! The whole-model backward pass on the GPU: gradients of `J = Σ_s w_s·logp_s` with respect to
//! every LoRA A and B, where `logp_s` is the summed response log-prob of sequence s and `w_s`
//! the one number per sequence the CPU loss returns (`ARCHITECTURE.md`: the loss lives on the CPU).
//!
//! # API (what the trainer calls)
//! * [`forward_train`]: the policy forward over a batch with the adapter on, keeping every
//!   layer's input (activation checkpointing); returns per-sequence log-probs ([`SeqLogp`]) and a
//!   [`TrainState`].
//! * [`backward`]: consumes the state and **adds** `∂J/∂A`, `∂J/∂B` into
//!   `lora.tensors[*].grad_a / grad_b` (zero them with `GpuLora::zero_grads` once per optimiser
//!   step; micro-steps accumulate for free). The adapter must be unchanged since the forward.
//!
//! Each `forward_train` allocates its buffers (workspace, checkpoints, gradient scratch) for
//! exactly its batch; dropping the state (or `backward`, which consumes it) frees them.
//!
//! # Graph (per layer, reverse order; one submission per layer, one for the head)
//! The seed is `dlogits = w_s·(onehot(target) − softmax(logits))` on the scored rows
//! (`ops::logprob_back`), giving `dxsn = dlogits·W_out` chunk by chunk, then the final RMSNorm
//! backward, scattered into the `[T, d]` residual gradient `dx`. For each layer from the top,
//! the layer is recomputed from its checkpointed input (`GpuModel::layer_forward`, same bits as
//! the forward) and then, with `dx = ∂J/∂x_out`:
//! ```text
//! FFN:        dact = dx·W_down (+ LoRA down: grads, dact += du·A)
//!             (dg, du) = swiglu_back(gate, up, dact)          in place over gate, up
//!             dn = dg·W_gate + du·W_up (+ LoRA gate, up)
//!             dx += rmsnorm_back(h, ffn_norm, dn)              dx is now ∂J/∂h (residual)
//! attention:  datt = dx·W_o (+ LoRA o)
//!             (dq, dk, dv) = attention_back(q, k, v, o, lse, datt)   probabilities recomputed
//!             dq, dk = rope⁻¹(dq), rope⁻¹(dk)   (qwen3: then per-head rmsnorm_back)
//!             dn = dq·W_q + dk·W_k + dv·W_v (+ LoRA q, k, v; their input is the recomputed n1)
//!             dx += rmsnorm_back(x_in, attn_norm, dn)          dx is now ∂J/∂x_in
//! ```
//! The pass ends in the lowest layer that carries an adapter, as soon as that layer's adapted
//! projections have their gradients (layers below it, and e.g. its attention when only its FFN
//! is adapted, have nothing to train). Layers whose intermediates the forward kept
//! ([`forward_train_keeping`]) are not recomputed.
//!
//! QKV biases, norms and all base weights are frozen: only LoRA gradients are formed. The
//! residual adds pass the gradient through (`dx` is updated in place). Every kernel sums in a
//! fixed order without atomics, so the same inputs give the same bits.
//!
//! # Memory (f32; T = B·L rows, N scored rows; in addition to the forward's `Workspace` and
//! the `n_layer + 1` checkpoints `[T, d]`)
//! | buffer | shape | use |
//! |---|---|---|
//! | `dx` | [T, d] | running residual gradient |
//! | `dn` | [T, d] | gradient of a norm's output (both norms; the head's final norm) |
//! | `datt`, `dq` | [T, q] each | |
//! | `dk`, `dv` | [T, kv] each | (qwen3 adds `dk_pre` [T, kv]) |
//! | `dact` | [T, ff] | `dg`, `du` overwrite the forward's gate/up in place |
//! | `lsed` | [T, n_head, 2] | attention (lse, D) |
//! | `du` | [T, r] | LoRA scratch |
//! | `roww` | [N] | seed weight per scored row |
//! | (`ws.ping[0]`, `ws.ping[1]`) | [T, d] | the forward's spare layer buffers, reused: the recompute's output, the head's `dxsn` |
//!
//! `gpu::memory` (the planner) counts exactly these per-row buffers in its "layer workspace"
//! items (updated to this engine: streaming attention has no `[T, T]` buffers); its LM-head item
//! still differs from the forward's `LmHeadScratch` (see the planner's notes).

use super::forward::{ForwardError, GpuBatch, GpuModel, LayerInputs, Workspace, WorkspaceSpec};
use super::ops::attention::AttnShape;
use super::ops::attention_back::attention_backward;
use super::ops::dropout::{Dropout, dropout_apply};
use super::ops::logprob_back::{lm_head_backward, scatter_rows};
use super::ops::lora::{GpuLora, lora_backward, lora_backward_into};
use super::ops::matmul::matmul_back_input;
use super::ops::rmsnorm_back::rmsnorm_backward;
use super::ops::rope_back::rope_backward_inplace;
use super::ops::swiglu_back::swiglu_backward_inplace;
use super::profile;
use super::{Gpu, GpuBuf, GpuError, Recorder};
use crate::data::Example;
use crate::model::lora::Target;

/// One sequence's response log-probs from [`forward_train`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqLogp {
    /// Σ of the token log-probs (accumulated in f64).
    pub logp: f64,
    /// Scored tokens (`len − response_start`).
    pub n_tokens: usize,
    /// One log-prob per scored token (`ids[response_start..]`).
    pub token_logps: Vec<f32>,
}

/// Gradient scratch of one layer (shapes in the module table).
#[derive(Debug)]
struct BackScratch {
    dx: GpuBuf,
    dn: GpuBuf,
    datt: GpuBuf,
    dq: GpuBuf,
    dk: GpuBuf,
    dv: GpuBuf,
    dk_pre: Option<GpuBuf>,
    dact: GpuBuf,
    lsed: GpuBuf,
    du: GpuBuf,
}

/// What [`backward`] needs from [`forward_train`]: the padded batch on the device, the
/// workspace (head values: gathered rows, final-norm rstd, lse), the layer checkpoints and the
/// gradient scratch.
#[derive(Debug)]
pub struct TrainState {
    pub batch: GpuBatch,
    pub ws: Workspace,
    pub checkpoints: LayerInputs,
    scratch: BackScratch,
}

impl TrainState {
    /// Layers whose intermediates the forward kept (the backward recomputes the others).
    pub fn kept_layers(&self) -> usize {
        self.checkpoints.n_kept()
    }

    /// Whether the forward kept the LM head's logits (the backward then does not recompute them).
    pub fn kept_logits(&self) -> bool {
        !self.ws.lm_head.kept.is_empty()
    }

    /// Device bytes held (workspace, checkpoints and kept intermediates, gradient scratch; not
    /// the batch inputs).
    pub fn bytes(&self) -> u64 {
        let s = &self.scratch;
        let mut b = self.ws.bytes()
            + self.checkpoints.bytes()
            + [
                &s.dx, &s.dn, &s.datt, &s.dq, &s.dk, &s.dv, &s.dact, &s.lsed, &s.du,
            ]
            .iter()
            .map(|b| b.size)
            .sum::<u64>();
        if let Some(k) = &s.dk_pre {
            b += k.size;
        }
        b
    }
}

fn gpu_err(e: ForwardError) -> GpuError {
    match e {
        ForwardError::Gpu(g) => g,
        other => GpuError::Validation {
            context: "the training forward pass".into(),
            detail: other.to_string(),
        },
    }
}

fn invalid(detail: String) -> GpuError {
    GpuError::Validation {
        context: "the training backward pass".into(),
        detail,
    }
}

/// The policy forward over `examples` with `lora` on, keeping what [`backward`] needs.
/// Returns one [`SeqLogp`] per example (same order) and the state to pass to [`backward`].
///
/// `dropout` (training only, PEFT semantics): every adapted projection's LoRA branch reads
/// `drop(x) = mask ⊙ x / (1 − p)` with the counter-hash mask of `gpu::ops::dropout` (row index =
/// `b·L + position`, L the padded length); [`backward`] regenerates the same masks. `None` or
/// `p = 0` is the plain forward, bit for bit.
pub fn forward_train(
    model: &GpuModel,
    gpu: &Gpu,
    examples: &[Example],
    lora: &GpuLora,
    dropout: Option<Dropout>,
) -> Result<(Vec<SeqLogp>, TrainState), GpuError> {
    forward_train_keeping(model, gpu, examples, lora, dropout, 0)
}

/// Layers whose intermediates fit in `keep_bytes` for a batch of `rows` rows (at most all).
pub fn layers_to_keep(
    cfg: &crate::model::ModelConfig,
    rows: usize,
    lora: &GpuLora,
    keep_bytes: u64,
) -> usize {
    let visited = cfg.n_layer - lowest_adapted_layer(cfg.n_layer, lora);
    Workspace::layers_within(cfg, rows, lora.rank, n_targets(lora), visited, keep_bytes).0
}

/// The lowest layer carrying an adapter (`n_layer` when none does): the backward stops there,
/// since nothing below it has parameters to train.
pub fn lowest_adapted_layer(n_layer: usize, lora: &GpuLora) -> usize {
    lora.tensors
        .iter()
        .filter(|t| t.target != Target::Output)
        .map(|t| t.layer)
        .min()
        .unwrap_or(n_layer)
        .min(n_layer)
}

/// Distinct adapted targets (one LoRA `u` buffer each per layer workspace).
fn n_targets(lora: &GpuLora) -> usize {
    let mut targets: Vec<Target> = lora.tensors.iter().map(|t| t.target).collect();
    targets.sort();
    targets.dedup();
    targets.len()
}

/// [`forward_train`] that also keeps every intermediate of as many layers as fit in
/// `keep_bytes` ([`layers_to_keep`]; the lowest layers the backward visits, from the lowest
/// adapted one up), then, if what is left holds them, the
/// LM head's logits (every vocabulary chunk), so that [`backward`] uses them instead of
/// recomputing: the same bits either way, fewer passes over the weights.
/// `keep_bytes = 0` is plain activation checkpointing (every layer recomputed);
/// `u64::MAX` keeps every layer.
pub fn forward_train_keeping(
    model: &GpuModel,
    gpu: &Gpu,
    examples: &[Example],
    lora: &GpuLora,
    dropout: Option<Dropout>,
    keep_bytes: u64,
) -> Result<(Vec<SeqLogp>, TrainState), GpuError> {
    if examples.is_empty() {
        return Err(GpuError::Validation {
            context: "the training forward pass".into(),
            detail: "no examples: give at least one sequence".into(),
        });
    }
    let cfg = &model.cfg;
    let batch = GpuBatch::new(gpu, cfg, examples).map_err(gpu_err)?;
    let mut ws = Workspace::new(gpu, cfg, &WorkspaceSpec::for_batch(&batch, Some(lora)))?;
    if let Some(dr) = dropout.filter(|d| d.active()) {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(GpuError::Validation {
                context: "the training forward pass".into(),
                detail: format!("LoRA dropout p = {} is outside [0, 1)", dr.p),
            });
        }
        let n_in = lora.tensors.iter().map(|t| t.n_in).max().unwrap_or(1);
        let buf = gpu.alloc(
            "lora dropout input",
            (batch.n_rows() * n_in).max(1) as u64 * 4,
        )?;
        ws.lora_dropout = Some((dr, buf));
    }
    let mut checkpoints = LayerInputs::new(gpu, cfg, batch.n_rows())?;
    let n_keep = layers_to_keep(cfg, batch.n_rows(), lora, keep_bytes);
    // What the layers leave of the budget keeps the LM head's logits (not with a LoRA on the
    // LM head: its backward recomputes logits without it).
    let left = keep_bytes.saturating_sub(
        n_keep as u64 * Workspace::layer_bytes(cfg, batch.n_rows(), lora.rank, n_targets(lora)),
    );
    if lora.get(0, Target::Output).is_none()
        && batch.n_scored() > 0
        && ws.lm_head.kept_logits_bytes(model.lm_head()) <= left
    {
        ws.lm_head.keep_logits(gpu, model.lm_head())?;
    }
    checkpoints.keep_layers(
        gpu,
        cfg,
        &ws,
        lowest_adapted_layer(cfg.n_layer, lora),
        n_keep,
    )?;
    let t = batch.n_rows();
    let f = |label: &str, elems: usize| gpu.alloc(label, (elems.max(1) * 4) as u64);
    let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    let scratch = BackScratch {
        dx: f("grad dx", t * d)?,
        dn: f("grad dn", t * d)?,
        datt: f("grad datt", t * q)?,
        dq: f("grad dq", t * q)?,
        dk: f("grad dk", t * kv)?,
        dv: f("grad dv", t * kv)?,
        dk_pre: if cfg.qk_norm {
            Some(f("grad dk_pre", t * kv)?)
        } else {
            None
        },
        dact: f("grad dact", t * ff)?,
        lsed: f("attention lse, D", t * cfg.n_head * 2)?,
        du: f("lora du", t * lora.rank.max(1))?,
    };
    let out = model
        .forward_batch(gpu, &ws, &batch, Some(lora), Some(&checkpoints))
        .map_err(gpu_err)?;
    let seqs = out
        .token_logprobs
        .into_iter()
        .zip(out.seq_logprobs)
        .map(|(token_logps, logp)| SeqLogp {
            logp,
            n_tokens: token_logps.len(),
            token_logps,
        })
        .collect();
    Ok((
        seqs,
        TrainState {
            batch,
            ws,
            checkpoints,
            scratch,
        },
    ))
}

/// Adds `∂(Σ_s seq_weights[s]·logp_s)/∂(A, B)` of every LoRA tensor into its `grad_a` /
/// `grad_b`, for the batch of `state` (from [`forward_train`] with the same, unchanged `lora`).
/// Returns when the work is submitted; a later readback or `gpu.sync` waits for it.
pub fn backward(
    model: &GpuModel,
    gpu: &Gpu,
    state: TrainState,
    seq_weights: &[f32],
    lora: &GpuLora,
) -> Result<(), GpuError> {
    let TrainState {
        batch,
        ws,
        checkpoints,
        scratch: s,
    } = state;
    if seq_weights.len() != batch.lens.len() {
        return Err(invalid(format!(
            "{} sequence weights for a batch of {} sequences; give one weight per sequence",
            seq_weights.len(),
            batch.lens.len()
        )));
    }
    if let Some(i) = seq_weights.iter().position(|w| !w.is_finite()) {
        return Err(invalid(format!(
            "sequence weight {i} is {}; the loss gradient must be finite",
            seq_weights[i]
        )));
    }
    model.check_lora(lora).map_err(gpu_err)?;
    let cfg = &model.cfg;
    let (t, n, d) = (batch.n_rows(), batch.n_scored(), cfg.n_embd);
    if n == 0 {
        return Ok(());
    }

    // Head: dlogits → dxsn (in the spare ws.ping[1]) → final norm backward (into s.dn) →
    // scatter into dx.
    let mut roww = vec![0.0f32; n];
    for (r, &w) in batch.scored.iter().zip(seq_weights) {
        roww[r.clone()].iter_mut().for_each(|v| *v = w);
    }
    let roww = gpu.upload("seed weight per scored row", &roww)?;
    profile::set_phase("backward");
    profile::set_scope(Some("lm_head"));
    let mut rec = gpu.recorder();
    lm_head_backward(
        gpu,
        &mut rec,
        &ws.xsn,
        model.lm_head(),
        model.output_bias.as_ref(),
        &batch.targets,
        &ws.lse,
        &roww,
        &ws.lm_head,
        &ws.ping[1],
        n,
    )?;
    rmsnorm_backward(
        gpu,
        &mut rec,
        &ws.xs,
        &model.output_norm,
        &ws.rstd_out,
        &ws.ping[1],
        &s.dn,
        n,
        d,
        false,
    )?;
    rec.clear(&s.dx, 0, (t * d * 4) as u64);
    scatter_rows(gpu, &mut rec, &s.dn, &batch.rows, &s.dx, n, d)?;
    rec.submit();
    profile::set_scope(None);

    // Layers below the lowest adapted one have nothing to train: the backward stops there.
    let lowest = lowest_adapted_layer(cfg.n_layer, lora);
    for il in (lowest..cfg.n_layer).rev() {
        let mut rec = gpu.recorder();
        layer_backward(
            model,
            gpu,
            &mut rec,
            il,
            il == lowest,
            &batch,
            &ws,
            &checkpoints.bufs[il],
            checkpoints.kept[il].as_ref(),
            &s,
            lora,
        )?;
        rec.submit();
    }
    Ok(())
}

/// Records the backward of layer `il`, after recomputing it from `x_in` unless its
/// intermediates were `kept` by the forward: on entry `s.dx` holds `∂J/∂x_out`, on exit
/// `∂J/∂x_in`; LoRA gradients of the layer are accumulated. In the `lowest` adapted layer the
/// input gradient is not needed: the pass stops after the last adapted projection (e.g. after
/// `ffn_down` when only it is adapted), and `s.dx` is left partial.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    model: &GpuModel,
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    il: usize,
    lowest: bool,
    batch: &GpuBatch,
    ws: &Workspace,
    x_in: &GpuBuf,
    kept: Option<&Workspace>,
    s: &BackScratch,
    lora: &GpuLora,
) -> Result<(), GpuError> {
    let cfg = &model.cfg;
    let l = &model.layers[il];
    let t = batch.n_rows();
    let (d, hd) = (cfg.n_embd, cfg.head_dim);
    let (rank, scale) = (lora.rank, lora.scale());

    let ws = match kept {
        // The forward left every intermediate of this layer in its own buffers.
        Some(k) => k,
        None => {
            // Recompute: every intermediate of this layer lands in `ws` (x_out goes to the
            // spare `ping[0]`; the checkpoint of layer il + 1 is not touched).
            profile::set_phase("recompute");
            model
                .layer_forward(gpu, rec, il, batch, ws, x_in, &ws.ping[0], Some(lora))
                .map_err(gpu_err)?;
            profile::set_phase("backward");
            ws
        }
    };

    // Whether the pass must go on below the FFN's output projection / below the FFN: in the
    // lowest adapted layer only as far as its adapted projections reach.
    let adapted = |targets: &[Target]| targets.iter().any(|&tg| lora.get(il, tg).is_some());
    let need_attn = !lowest
        || adapted(&[
            Target::AttnQ,
            Target::AttnK,
            Target::AttnV,
            Target::AttnOutput,
        ]);
    let need_ffn_in = need_attn || adapted(&[Target::FfnGate, Target::FfnUp]);

    // Input gradient through a frozen projection plus its LoRA branch (if adapted):
    // dx_in (+)= dy·W (+ LoRA: grads and dx_in += du·A). With `input_grad` false only the LoRA
    // gradients are wanted and dx_in is scratch.
    let back = |rec: &mut Recorder<'_>,
                target: Target,
                x: &GpuBuf,
                dy: &GpuBuf,
                dx_in: &GpuBuf,
                accumulate: bool,
                input_grad: bool|
     -> Result<(), GpuError> {
        if input_grad {
            matmul_back_input(gpu, rec, dy, l.weight(target), dx_in, t, accumulate)?;
        }
        if let Some(lt) = lora.get(il, target) {
            if let Some((dr, buf)) = &ws.lora_dropout {
                // Dropout: regenerate drop(x) (same hash mask as the forward), take the LoRA
                // gradients against it, then dx_in += mask ⊙ (du·A) / (1 − p).
                dropout_apply(gpu, rec, dr, il, target, x, buf, t, lt.n_in, false)?;
                let u = ws.lora_u(target)?;
                lora_backward_into(gpu, rec, lt, rank, scale, buf, u, dy, &s.du, buf, t, false)?;
                dropout_apply(gpu, rec, dr, il, target, buf, dx_in, t, lt.n_in, true)?;
            } else {
                lora_backward(
                    gpu,
                    rec,
                    lt,
                    rank,
                    scale,
                    x,
                    ws.lora_u(target)?,
                    dy,
                    &s.du,
                    dx_in,
                    t,
                )?;
            }
        }
        Ok(())
    };

    // FFN.
    back(
        rec,
        Target::FfnDown,
        &ws.act,
        &s.dx,
        &s.dact,
        false,
        need_ffn_in,
    )?;
    if !need_ffn_in {
        return Ok(());
    }
    swiglu_backward_inplace(gpu, rec, &s.dact, &ws.gate, &ws.up, t * cfg.n_ff)?;
    back(
        rec,
        Target::FfnGate,
        &ws.xn,
        &ws.gate,
        &s.dn,
        false,
        need_attn,
    )?;
    back(rec, Target::FfnUp, &ws.xn, &ws.up, &s.dn, true, need_attn)?;
    if !need_attn {
        return Ok(());
    }
    rmsnorm_backward(
        gpu,
        rec,
        &ws.h,
        &l.ffn_norm,
        &ws.rstd_ffn,
        &s.dn,
        &s.dx,
        t,
        d,
        true,
    )?;

    // Attention.
    back(
        rec,
        Target::AttnOutput,
        &ws.attn,
        &s.dx,
        &s.datt,
        false,
        true,
    )?;
    let shape = AttnShape::new(batch.n_seq, batch.seq_len, cfg.n_head, cfg.n_head_kv, hd);
    attention_backward(
        gpu,
        rec,
        &shape,
        &ws.q,
        &ws.k,
        &ws.v,
        &ws.attn,
        &ws.attn_lse,
        &s.datt,
        &batch.lens_buf,
        &s.lsed,
        &s.dq,
        &s.dk,
        &s.dv,
    )?;
    let (rope, table) = (&model.rope, &model.rope_table);
    rope_backward_inplace(gpu, rec, rope, table, &batch.pos, &s.dq, t, cfg.n_head)?;
    rope_backward_inplace(gpu, rec, rope, table, &batch.pos, &s.dk, t, cfg.n_head_kv)?;
    let (dq, dk) = match (&l.q_norm, &l.k_norm, &ws.qk, &s.dk_pre) {
        (Some(qn), Some(kn), Some(qk), Some(dk_pre)) => {
            // qwen3: per-head RMSNorm between the projection and rope. datt is free again.
            rmsnorm_backward(
                gpu,
                rec,
                &qk.q_pre,
                qn,
                &qk.q_rstd,
                &s.dq,
                &s.datt,
                t * cfg.n_head,
                hd,
                false,
            )?;
            rmsnorm_backward(
                gpu,
                rec,
                &qk.k_pre,
                kn,
                &qk.k_rstd,
                &s.dk,
                dk_pre,
                t * cfg.n_head_kv,
                hd,
                false,
            )?;
            (&s.datt, dk_pre)
        }
        (None, None, _, _) => (&s.dq, &s.dk),
        _ => {
            return Err(invalid(format!(
                "layer {il}: Q/K head norms need both weights and buffers made for them"
            )));
        }
    };
    let below = !lowest;
    back(rec, Target::AttnQ, &ws.n1, dq, &s.dn, false, below)?;
    back(rec, Target::AttnK, &ws.n1, dk, &s.dn, true, below)?;
    back(rec, Target::AttnV, &ws.n1, &s.dv, &s.dn, true, below)?;
    if lowest {
        return Ok(());
    }
    rmsnorm_backward(
        gpu,
        rec,
        x_in,
        &l.attn_norm,
        &ws.rstd_attn,
        &s.dn,
        &s.dx,
        t,
        d,
        true,
    )?;
    Ok(())
}
