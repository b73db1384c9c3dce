//! Zero-copy views of a model's weights in their GGUF types.
//!
//! [`Weights::from_gguf`] finds every tensor the forward pass uses, checks its shape against the
//! [`ModelConfig`] and its type against what our kernels support, and refuses files that carry
//! tensors the forward pass would silently ignore (extra biases, fused QKV, experts, …).

use super::arch::Arch;
use super::config::{ModelConfig, ModelError};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};

/// A 1-D or 2-D weight in its stored type. For a matrix, `ne = [n_in, n_out]`: `n_out` rows of
/// `n_in` elements (a row-major `(n_out, n_in)` matrix, so `y = W·x`).
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub ne: [usize; 2],
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    pub fn n_in(&self) -> usize {
        self.ne[0]
    }
    pub fn n_out(&self) -> usize {
        self.ne[1]
    }
    /// Dequantized copy, row-major `[n_out, n_in]` (tests and CPU reference only).
    pub fn to_f32(&self) -> Vec<f32> {
        crate::gguf::quant::dequantize_vec(self.ty, self.data, self.ne[0] * self.ne[1])
            .expect("validated at load")
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights<'a> {
    pub attn_norm: TensorRef<'a>,
    pub attn_q: TensorRef<'a>,
    pub attn_k: TensorRef<'a>,
    pub attn_v: TensorRef<'a>,
    pub attn_q_bias: Option<TensorRef<'a>>,
    pub attn_k_bias: Option<TensorRef<'a>>,
    pub attn_v_bias: Option<TensorRef<'a>>,
    /// qwen3 per-head RMSNorm weights ([head_dim]).
    pub attn_q_norm: Option<TensorRef<'a>>,
    pub attn_k_norm: Option<TensorRef<'a>>,
    pub attn_output: TensorRef<'a>,
    pub ffn_norm: TensorRef<'a>,
    pub ffn_gate: TensorRef<'a>,
    pub ffn_up: TensorRef<'a>,
    pub ffn_down: TensorRef<'a>,
    /// gemma3 RMSNorms after the attention and FFN branches (`post_attention_norm`,
    /// `post_ffw_norm`, [d]).
    pub post_attn_norm: Option<TensorRef<'a>>,
    pub post_ffn_norm: Option<TensorRef<'a>>,
}

#[derive(Clone, Debug)]
pub struct Weights<'a> {
    pub token_embd: TensorRef<'a>,
    pub output_norm: TensorRef<'a>,
    /// `None` when tied.
    pub output: Option<TensorRef<'a>>,
    pub layers: Vec<LayerWeights<'a>>,
}

/// How a tensor is used, which decides the types it may have.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A weight matrix: any supported type.
    Matrix,
    /// A norm weight or bias: F32 or F16.
    Vector,
}

/// Drops trailing 1s (a 1-D tensor may be stored as `[n, 1]`), keeping at least one dimension.
fn squeeze(ne: &[u64]) -> Vec<u64> {
    let mut v = ne.to_vec();
    while v.len() > 1 && v.last() == Some(&1) {
        v.pop();
    }
    v
}

fn view<'a>(
    file: &'a GgufFile,
    name: &str,
    expected: &[usize],
    role: Role,
) -> Result<TensorRef<'a>, ModelError> {
    let t: &'a TensorInfo = file.tensor(name).ok_or_else(|| ModelError::MissingTensor {
        name: name.to_string(),
    })?;
    let expected_ne: Vec<u64> = expected.iter().map(|&x| x as u64).collect();
    if squeeze(&t.ne) != squeeze(&expected_ne) {
        return Err(ModelError::BadShape {
            name: name.to_string(),
            found: t.ne.clone(),
            expected: expected_ne,
        });
    }
    let ty = t.ggml_type()?;
    if role == Role::Vector && !matches!(ty, GgmlType::F32 | GgmlType::F16) {
        return Err(ModelError::BadTensorType {
            name: name.to_string(),
            found: ty.name().to_string(),
            expected: "F32 or F16",
        });
    }
    let n_in = expected[0];
    let n_out = expected.get(1).copied().unwrap_or(1);
    let row = ty.row_bytes(n_in).ok_or_else(|| ModelError::BadShape {
        name: format!(
            "{name} (type {ty} needs rows that are a multiple of {} elements)",
            ty.block_elems()
        ),
        found: t.ne.clone(),
        expected: expected_ne.clone(),
    })?;
    let data = file.tensor_bytes(t);
    if data.len() != row * n_out {
        return Err(ModelError::BadShape {
            name: format!(
                "{name} (holds {} bytes of data, {} expected)",
                data.len(),
                row * n_out
            ),
            found: t.ne.clone(),
            expected: expected_ne,
        });
    }
    Ok(TensorRef {
        name: t.name.as_str(),
        ty,
        ne: [n_in, n_out],
        data,
    })
}

fn opt_view<'a>(
    file: &'a GgufFile,
    name: &str,
    expected: &[usize],
    role: Role,
) -> Result<Option<TensorRef<'a>>, ModelError> {
    if file.tensor(name).is_some() {
        view(file, name, expected, role).map(Some)
    } else {
        Ok(None)
    }
}

/// Why a tensor that is not part of bfpo-lite's forward pass cannot simply be ignored.
fn unsupported_reason(name: &str, cfg: &ModelConfig) -> String {
    let base = name.rsplit_once('.').map(|(b, _)| b).unwrap_or(name);
    let kind = base.rsplit_once('.').map(|(_, k)| k).unwrap_or(base);
    if name.ends_with(".bias") {
        format!(
            "{kind} biases are not part of bfpo-lite's {} forward pass; training would ignore them",
            cfg.arch.name()
        )
    } else if kind == "attn_qkv" {
        "fused QKV projections are not supported; convert the model with separate attn_q/attn_k/attn_v".into()
    } else if kind.contains("exps") || kind.contains("shexp") || kind == "ffn_gate_inp" {
        "mixture-of-experts tensors are not supported".into()
    } else if let Some(rest) = name.strip_prefix("blk.")
        && let Some(n) = rest.split('.').next().and_then(|n| n.parse::<usize>().ok())
        && n >= cfg.n_layer
    {
        format!("layer {n} does not exist: block_count is {}", cfg.n_layer)
    } else {
        format!(
            "it is not part of bfpo-lite's {} forward pass; training would silently ignore it",
            cfg.arch.name()
        )
    }
}

impl<'a> Weights<'a> {
    /// Finds, type-checks and shape-checks every tensor the forward pass uses.
    pub fn from_gguf(file: &'a GgufFile, cfg: &ModelConfig) -> Result<Weights<'a>, ModelError> {
        let (d, v, ff) = (cfg.n_embd, cfg.n_vocab, cfg.n_ff);
        let (q, kv, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let mut used: Vec<String> = Vec::new();
        let mut take = |name: String| {
            used.push(name.clone());
            name
        };

        let token_embd = view(
            file,
            &take("token_embd.weight".into()),
            &[d, v],
            Role::Matrix,
        )?;
        let output_norm = view(file, &take("output_norm.weight".into()), &[d], Role::Vector)?;
        let output = opt_view(file, &take("output.weight".into()), &[d, v], Role::Matrix)?;
        if output.is_none() != cfg.tied {
            return Err(ModelError::BadHyperparameter {
                key: "tied".into(),
                detail: format!(
                    "configuration says tied = {} but output.weight is {}",
                    cfg.tied,
                    if output.is_some() {
                        "present"
                    } else {
                        "absent"
                    }
                ),
            });
        }
        if cfg.arch == Arch::Llama && cfg.rope_freqs.is_some() {
            take("rope_freqs.weight".into());
        }

        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut n = |s: &str| take(format!("blk.{i}.{s}"));
            let attn_norm = view(file, &n("attn_norm.weight"), &[d], Role::Vector)?;
            let attn_q = view(file, &n("attn_q.weight"), &[d, q], Role::Matrix)?;
            let attn_k = view(file, &n("attn_k.weight"), &[d, kv], Role::Matrix)?;
            let attn_v = view(file, &n("attn_v.weight"), &[d, kv], Role::Matrix)?;
            let (attn_q_bias, attn_k_bias, attn_v_bias) = if cfg.qkv_bias {
                (
                    Some(view(file, &n("attn_q.bias"), &[q], Role::Vector)?),
                    Some(view(file, &n("attn_k.bias"), &[kv], Role::Vector)?),
                    Some(view(file, &n("attn_v.bias"), &[kv], Role::Vector)?),
                )
            } else {
                (None, None, None)
            };
            let (attn_q_norm, attn_k_norm) = if cfg.qk_norm {
                (
                    Some(view(file, &n("attn_q_norm.weight"), &[hd], Role::Vector)?),
                    Some(view(file, &n("attn_k_norm.weight"), &[hd], Role::Vector)?),
                )
            } else {
                (None, None)
            };
            let attn_output = view(file, &n("attn_output.weight"), &[q, d], Role::Matrix)?;
            let ffn_norm = view(file, &n("ffn_norm.weight"), &[d], Role::Vector)?;
            let ffn_gate = view(file, &n("ffn_gate.weight"), &[d, ff], Role::Matrix)?;
            let ffn_up = view(file, &n("ffn_up.weight"), &[d, ff], Role::Matrix)?;
            let ffn_down = view(file, &n("ffn_down.weight"), &[ff, d], Role::Matrix)?;
            let (post_attn_norm, post_ffn_norm) = if cfg.post_norms() {
                (
                    Some(view(
                        file,
                        &n("post_attention_norm.weight"),
                        &[d],
                        Role::Vector,
                    )?),
                    Some(view(file, &n("post_ffw_norm.weight"), &[d], Role::Vector)?),
                )
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                attn_norm,
                attn_q,
                attn_k,
                attn_v,
                attn_q_bias,
                attn_k_bias,
                attn_v_bias,
                attn_q_norm,
                attn_k_norm,
                attn_output,
                ffn_norm,
                ffn_gate,
                ffn_up,
                ffn_down,
                post_attn_norm,
                post_ffn_norm,
            });
        }

        let used: std::collections::HashSet<&str> = used.iter().map(String::as_str).collect();
        if let Some(extra) = file
            .tensors()
            .iter()
            .find(|t| !used.contains(t.name.as_str()))
        {
            return Err(ModelError::UnsupportedTensor {
                name: extra.name.clone(),
                detail: unsupported_reason(&extra.name, cfg),
            });
        }

        Ok(Weights {
            token_embd,
            output_norm,
            output,
            layers,
        })
    }

    /// The LM head: `output.weight`, or `token_embd.weight` when tied.
    pub fn lm_head(&self) -> TensorRef<'a> {
        self.output.unwrap_or(self.token_embd)
    }

    /// Every tensor view, in file-independent order (embedding, layers, output norm, head).
    pub fn all(&self) -> Vec<TensorRef<'a>> {
        let mut v = vec![self.token_embd];
        for l in &self.layers {
            v.extend([l.attn_norm, l.attn_q, l.attn_k, l.attn_v]);
            v.extend(
                [l.attn_q_bias, l.attn_k_bias, l.attn_v_bias]
                    .into_iter()
                    .flatten(),
            );
            v.extend([l.attn_q_norm, l.attn_k_norm].into_iter().flatten());
            v.extend([l.attn_output, l.ffn_norm, l.ffn_gate, l.ffn_up, l.ffn_down]);
            v.extend([l.post_attn_norm, l.post_ffn_norm].into_iter().flatten());
        }
        v.push(self.output_norm);
        v.extend(self.output);
        v
    }
}
