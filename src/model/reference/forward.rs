//! The whole-model forward: construction from weights, embedding, layers (with LoRA and
//! dropout), final norm and LM head, log-probs.

use super::*;

impl RefModel {
    /// From GGUF weight views (dequantized with [`TensorRef::to_f32`](crate::model::TensorRef)).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<RefModel, RefError> {
        Self::from_weights(cfg, w)
    }

    /// From GGUF weight views (dequantized with [`TensorRef::to_f32`](crate::model::TensorRef)).
    pub fn from_weights(cfg: &ModelConfig, w: &Weights) -> Result<RefModel, RefError> {
        let layers = w
            .layers
            .iter()
            .map(|l| RefLayer {
                attn_norm: l.attn_norm.to_f32(),
                wq: l.attn_q.to_f32(),
                wk: l.attn_k.to_f32(),
                wv: l.attn_v.to_f32(),
                bq: l.attn_q_bias.map(|t| t.to_f32()),
                bk: l.attn_k_bias.map(|t| t.to_f32()),
                bv: l.attn_v_bias.map(|t| t.to_f32()),
                q_norm: l.attn_q_norm.map(|t| t.to_f32()),
                k_norm: l.attn_k_norm.map(|t| t.to_f32()),
                wo: l.attn_output.to_f32(),
                ffn_norm: l.ffn_norm.to_f32(),
                w_gate: l.ffn_gate.to_f32(),
                w_up: l.ffn_up.to_f32(),
                w_down: l.ffn_down.to_f32(),
                post_attn_norm: l.post_attn_norm.map(|t| t.to_f32()),
                post_ffn_norm: l.post_ffn_norm.map(|t| t.to_f32()),
            })
            .collect();
        let rw = RefWeights {
            token_embd: w.token_embd.to_f32(),
            output_norm: w.output_norm.to_f32(),
            output: w.output.map(|t| t.to_f32()),
            layers,
        };
        Self::from_parts(cfg.clone(), rw)
    }

    /// From plain f32 arrays; checks every shape against `cfg`.
    pub fn from_parts(cfg: ModelConfig, w: RefWeights) -> Result<RefModel, RefError> {
        let bad = |s: String| Err(RefError::BadConfig(s));
        if cfg.n_head == 0 || cfg.n_head_kv == 0 || !cfg.n_head.is_multiple_of(cfg.n_head_kv) {
            return bad(format!(
                "n_head {} must be a positive multiple of n_head_kv {}",
                cfg.n_head, cfg.n_head_kv
            ));
        }
        if cfg.n_rot > cfg.head_dim || !cfg.n_rot.is_multiple_of(2) {
            return bad(format!(
                "n_rot {} must be even and at most head_dim {}",
                cfg.n_rot, cfg.head_dim
            ));
        }
        if let Some(f) = &cfg.rope_freqs
            && f.len() != cfg.n_rot / 2
        {
            return bad(format!(
                "rope_freqs has {} values, expected n_rot/2 = {}",
                f.len(),
                cfg.n_rot / 2
            ));
        }
        if w.layers.len() != cfg.n_layer {
            return bad(format!(
                "{} layers of weights for n_layer {}",
                w.layers.len(),
                cfg.n_layer
            ));
        }
        if cfg.tied != w.output.is_none() {
            return bad(format!(
                "config says tied = {} but output.weight is {}",
                cfg.tied,
                if w.output.is_some() {
                    "present"
                } else {
                    "absent"
                }
            ));
        }
        let (d, qd, kvd, ff, hd, nv) = (
            cfg.n_embd,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.n_ff,
            cfg.head_dim,
            cfg.n_vocab,
        );
        let check = |name: String, v: &[f32], dims: &[usize]| -> Result<(), RefError> {
            let expected: usize = dims.iter().product();
            if v.len() != expected {
                return Err(RefError::BadShape {
                    name,
                    found: v.len(),
                    expected,
                    shape: format!("{dims:?}"),
                });
            }
            Ok(())
        };
        let check_opt =
            |name: String, v: &Option<Vec<f32>>, want: bool, dims: &[usize]| match (v, want) {
                (Some(v), true) => check(name, v, dims),
                (None, false) => Ok(()),
                (Some(_), false) => Err(RefError::BadConfig(format!(
                    "{name} is present but the config does not use it"
                ))),
                (None, true) => Err(RefError::BadConfig(format!(
                    "{name} is missing but the config needs it"
                ))),
            };
        check("token_embd".into(), &w.token_embd, &[nv, d])?;
        check("output_norm".into(), &w.output_norm, &[d])?;
        if let Some(o) = &w.output {
            check("output".into(), o, &[nv, d])?;
        }
        for (i, l) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}");
            check(n("attn_norm"), &l.attn_norm, &[d])?;
            check(n("attn_q"), &l.wq, &[qd, d])?;
            check(n("attn_k"), &l.wk, &[kvd, d])?;
            check(n("attn_v"), &l.wv, &[kvd, d])?;
            check_opt(n("attn_q.bias"), &l.bq, cfg.qkv_bias, &[qd])?;
            check_opt(n("attn_k.bias"), &l.bk, cfg.qkv_bias, &[kvd])?;
            check_opt(n("attn_v.bias"), &l.bv, cfg.qkv_bias, &[kvd])?;
            check_opt(n("attn_q_norm"), &l.q_norm, cfg.qk_norm, &[hd])?;
            check_opt(n("attn_k_norm"), &l.k_norm, cfg.qk_norm, &[hd])?;
            check(n("attn_output"), &l.wo, &[d, qd])?;
            check(n("ffn_norm"), &l.ffn_norm, &[d])?;
            check(n("ffn_gate"), &l.w_gate, &[ff, d])?;
            check(n("ffn_up"), &l.w_up, &[ff, d])?;
            check(n("ffn_down"), &l.w_down, &[d, ff])?;
            check_opt(
                n("post_attention_norm"),
                &l.post_attn_norm,
                cfg.post_norms(),
                &[d],
            )?;
            check_opt(n("post_ffw_norm"), &l.post_ffn_norm, cfg.post_norms(), &[d])?;
        }
        if let Some(g) = &cfg.gemma3
            && g.local_layers.len() != cfg.n_layer
        {
            return bad(format!(
                "gemma3 has {} local/global flags for {} layers",
                g.local_layers.len(),
                cfg.n_layer
            ));
        }
        let rope = (0..cfg.n_layer)
            .map(|l| RopeParams::for_layer(&cfg, l))
            .collect();
        Ok(RefModel { cfg, w, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &RefWeights {
        &self.w
    }

    /// The LM head `[n_vocab, d]`: `output`, or `token_embd` when tied.
    pub fn lm_head(&self) -> &[f32] {
        self.w.output.as_deref().unwrap_or(&self.w.token_embd)
    }

    pub(super) fn eps(&self) -> f64 {
        self.cfg.rms_eps as f64
    }

    pub(super) fn check_ids(&self, ids: &[u32], example: usize) -> Result<(), RefError> {
        if ids.is_empty() {
            return Err(RefError::EmptySequence);
        }
        for (pos, &id) in ids.iter().enumerate() {
            if id as usize >= self.cfg.n_vocab {
                return Err(RefError::TokenOutOfRange {
                    example,
                    pos,
                    id,
                    n_vocab: self.cfg.n_vocab,
                });
            }
        }
        Ok(())
    }

    pub(super) fn check_example(&self, ex: &Example, example: usize) -> Result<(), RefError> {
        self.check_ids(&ex.ids, example)?;
        if ex.response_start < 1 || ex.response_start > ex.ids.len() {
            return Err(RefError::BadResponseStart {
                example,
                response_start: ex.response_start,
                len: ex.ids.len(),
            });
        }
        Ok(())
    }

    pub(super) fn adapters(&self, lora: Option<&LoraWeights>) -> Result<Adapters, RefError> {
        let mut ad = Adapters::none(self.cfg.n_layer);
        let Some(lora) = lora else {
            return Ok(ad);
        };
        ad.rank = lora.rank;
        ad.scale = lora.scale() as f64;
        for (idx, t) in lora.tensors.iter().enumerate() {
            let bad = |detail: String| RefError::BadLora {
                layer: t.layer,
                target: t.target.gguf_name(),
                detail,
            };
            if t.layer >= self.cfg.n_layer {
                return Err(bad(format!(
                    "layer {} does not exist (the model has {} layers)",
                    t.layer, self.cfg.n_layer
                )));
            }
            if t.target == Target::Output && self.cfg.tied {
                return Err(bad(
                    "this model ties its embeddings: it has no output.weight to adapt".into(),
                ));
            }
            let (n_in, n_out) = t.target.shape(&self.cfg);
            if (t.n_in, t.n_out) != (n_in, n_out) {
                return Err(bad(format!(
                    "shape n_in {} n_out {}, the model needs n_in {n_in} n_out {n_out}",
                    t.n_in, t.n_out
                )));
            }
            if t.a.len() != lora.rank * n_in || t.b.len() != n_out * lora.rank {
                return Err(bad(format!(
                    "A has {} values and B {}, rank {} needs {} and {}",
                    t.a.len(),
                    t.b.len(),
                    lora.rank,
                    lora.rank * n_in,
                    n_out * lora.rank
                )));
            }
            let slot = &mut ad.by[t.layer][t.target as usize];
            if slot.is_some() {
                return Err(bad("appears twice in the adapter".into()));
            }
            *slot = Some(Adapter {
                idx,
                a: t.a.iter().map(|&v| v as f64).collect(),
                b: t.b.iter().map(|&v| v as f64).collect(),
            });
        }
        Ok(ad)
    }

    /// A projection `y = W·x (+ bias) (+ LoRA)`; returns `(y, z)` with z the LoRA `A·x` (empty
    /// without an adapter).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project(
        &self,
        ad: &Adapters,
        layer: usize,
        target: Target,
        x: &[f64],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let (n_in, n_out) = target.shape(&self.cfg);
        let mut y = linear_fwd(x, n_in, w, n_out, bias);
        let mut z = Vec::new();
        if let Some(a) = ad.get(layer, target) {
            let xd = ad.dropped(layer, target, x, n_in);
            let (dy, zz) = lora_fwd(&xd, n_in, &a.a, &a.b, ad.rank, n_out, ad.scale);
            for (ye, de) in y.iter_mut().zip(dy) {
                *ye += de;
            }
            z = zz;
        }
        (y, z)
    }

    /// Embedding rows, times `cfg.embd_scale()` (√d for gemma3, taken in f32 as llama.cpp does).
    pub(super) fn embed(&self, ids: &[u32]) -> Vec<f64> {
        let d = self.cfg.n_embd;
        let scale = self.cfg.embd_scale() as f64;
        ids.iter()
            .flat_map(|&id| {
                let id = id as usize;
                self.w.token_embd[id * d..(id + 1) * d]
                    .iter()
                    .map(move |&v| v as f64 * scale)
            })
            .collect()
    }

    /// The attention options of layer `l`.
    pub(super) fn attn_opts(&self, l: usize) -> AttnOpts {
        AttnOpts {
            scale: self.cfg.attn_scale() as f64,
            window: self.cfg.attn_window(l),
        }
    }

    /// One layer forward; returns the output and the tape.
    pub(super) fn layer_fwd(&self, l: usize, x: Vec<f64>, ad: &Adapters) -> (Vec<f64>, LayerTape) {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let eps = self.eps();
        let (d, hd) = (c.n_embd, c.head_dim);
        let n1 = rmsnorm_fwd(&x, d, &w.attn_norm, eps);
        let (q_pre, zq) = self.project(ad, l, Target::AttnQ, &n1, &w.wq, w.bq.as_deref());
        let (k_pre, zk) = self.project(ad, l, Target::AttnK, &n1, &w.wk, w.bk.as_deref());
        let (v, zv) = self.project(ad, l, Target::AttnV, &n1, &w.wv, w.bv.as_deref());
        let (q_n, k_n) = match (&w.q_norm, &w.k_norm) {
            (Some(qn), Some(kn)) => (
                rmsnorm_fwd(&q_pre, hd, qn, eps),
                rmsnorm_fwd(&k_pre, hd, kn, eps),
            ),
            _ => (q_pre.clone(), k_pre.clone()),
        };
        let q = rope_fwd(&q_n, c.n_head, hd, &self.rope[l]);
        let k = rope_fwd(&k_n, c.n_head_kv, hd, &self.rope[l]);
        let att = attention_fwd_opts(&q, &k, &v, c.n_head, c.n_head_kv, hd, self.attn_opts(l));
        let (o, zo) = self.project(ad, l, Target::AttnOutput, &att, &w.wo, None);
        let po = match &w.post_attn_norm {
            Some(pn) => rmsnorm_fwd(&o, d, pn, eps),
            None => o.clone(),
        };
        let h: Vec<f64> = x.iter().zip(&po).map(|(a, b)| a + b).collect();
        let n2 = rmsnorm_fwd(&h, d, &w.ffn_norm, eps);
        let (g, zg) = self.project(ad, l, Target::FfnGate, &n2, &w.w_gate, None);
        let (u, zu) = self.project(ad, l, Target::FfnUp, &n2, &w.w_up, None);
        let s = match c.ffn_act() {
            FfnAct::Silu => swiglu_fwd(&g, &u),
            FfnAct::GeluTanh => geglu_fwd(&g, &u),
        };
        let (f, zd) = self.project(ad, l, Target::FfnDown, &s, &w.w_down, None);
        let pf = match &w.post_ffn_norm {
            Some(pn) => rmsnorm_fwd(&f, d, pn, eps),
            None => f.clone(),
        };
        let out: Vec<f64> = h.iter().zip(&pf).map(|(a, b)| a + b).collect();
        let post = c.post_norms();
        let keep_pre = c.qk_norm;
        let tape = LayerTape {
            x,
            n1,
            q_pre: if keep_pre { q_pre } else { Vec::new() },
            k_pre: if keep_pre { k_pre } else { Vec::new() },
            q,
            k,
            v,
            att,
            h,
            n2,
            g,
            u,
            s,
            o: if post { o } else { Vec::new() },
            f: if post { f } else { Vec::new() },
            // Target order: AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown.
            z: [zq, zk, zv, zo, zg, zu, zd],
        };
        (out, tape)
    }

    /// Runs every layer; returns the final hidden state `x_L` `[T, d]` and the tapes.
    pub(super) fn trunk(&self, ids: &[u32], ad: &Adapters) -> (Vec<f64>, Vec<LayerTape>) {
        let mut x = self.embed(ids);
        let mut tapes = Vec::with_capacity(self.cfg.n_layer);
        for l in 0..self.cfg.n_layer {
            let (out, tape) = self.layer_fwd(l, x, ad);
            tapes.push(tape);
            x = out;
        }
        (x, tapes)
    }

    pub(super) fn check_rows(&self, what: &'static str, x: &[f64]) -> Result<(), RefError> {
        let d = self.cfg.n_embd;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            return Err(RefError::BadActivation {
                what,
                len: x.len(),
                width: d,
            });
        }
        Ok(())
    }

    pub(super) fn check_layer(&self, layer: usize) -> Result<(), RefError> {
        if layer >= self.cfg.n_layer {
            return Err(RefError::BadLayer {
                layer,
                n_layer: self.cfg.n_layer,
            });
        }
        Ok(())
    }

    /// One layer on its own: input `x` `[T, d]` (row t at position t) → output `[T, d]`
    /// (for checking a GPU layer forward).
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &[f64],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        self.check_layer(layer)?;
        self.check_rows("layer input", x)?;
        let ad = self.adapters(lora)?;
        Ok(self.layer_fwd(layer, x.to_vec(), &ad).0)
    }

    /// One layer's backward on its own: from the layer input `x` and the gradient `dout` of its
    /// output, returns the gradient of its input and the gradients of this layer's adapters
    /// (zeros for the other layers' tensors; no tensors without `lora`).
    pub fn layer_backward(
        &self,
        layer: usize,
        x: &[f64],
        dout: &[f64],
        lora: Option<&LoraWeights>,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        self.check_layer(layer)?;
        self.check_rows("layer input", x)?;
        if dout.len() != x.len() {
            return Err(RefError::BadActivation {
                what: "layer output gradient",
                len: dout.len(),
                width: self.cfg.n_embd,
            });
        }
        let ad = self.adapters(lora)?;
        let mut grads = match lora {
            Some(l) => LoraGrads::zeros_like(l),
            None => LoraGrads {
                rank: 0,
                tensors: Vec::new(),
            },
        };
        let (_, tape) = self.layer_fwd(layer, x.to_vec(), &ad);
        let dx = self.layer_back(layer, &tape, dout.to_vec(), &ad, &mut grads);
        Ok((dx, grads))
    }

    /// The residual stream: the input of every layer and the final pre-norm output,
    /// `n_layer + 1` arrays of `[T, d]` (for layer-by-layer parity debugging).
    pub fn hidden_states(
        &self,
        ids: &[u32],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<Vec<f64>>, RefError> {
        self.check_ids(ids, 0)?;
        let ad = self.adapters(lora)?;
        let (x, tapes) = self.trunk(ids, &ad);
        let mut out: Vec<Vec<f64>> = tapes.into_iter().map(|t| t.x).collect();
        out.push(x);
        Ok(out)
    }

    /// Logits at every position, `T` rows of `n_vocab`.
    pub fn logits(
        &self,
        ids: &[u32],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<Vec<f64>>, RefError> {
        self.check_ids(ids, 0)?;
        let ad = self.adapters(lora)?;
        let (x, _) = self.trunk(ids, &ad);
        let d = self.cfg.n_embd;
        let nf = rmsnorm_fwd(&x, d, &self.w.output_norm, self.eps());
        let logits = self.lm_head_fwd(&nf, &ad);
        Ok(logits
            .chunks_exact(self.cfg.n_vocab)
            .map(|r| r.to_vec())
            .collect())
    }

    /// Log-probs of the response tokens: one per token `ids[response_start..]`, token i
    /// predicted from position i − 1.
    pub fn token_logprobs(
        &self,
        ex: &Example,
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        self.check_example(ex, 0)?;
        let ad = self.adapters(lora)?;
        let (x, _) = self.trunk(&ex.ids, &ad);
        Ok(self.head_fwd(&x, ex, &ad).0)
    }

    /// Summed response log-prob of each example.
    pub fn sequence_logprobs(
        &self,
        examples: &[Example],
        lora: Option<&LoraWeights>,
    ) -> Result<Vec<f64>, RefError> {
        for (i, ex) in examples.iter().enumerate() {
            self.check_example(ex, i)?;
        }
        let ad = self.adapters(lora)?;
        Ok(examples
            .iter()
            .map(|ex| {
                let (x, _) = self.trunk(&ex.ids, &ad);
                self.head_fwd(&x, ex, &ad).0.iter().sum()
            })
            .collect())
    }

    /// Final norm + LM head on the scored positions only: returns (per-token log-probs, the
    /// normed rows `nf` of positions `response_start−1 .. T−1`, their logits).
    pub(super) fn head_fwd(
        &self,
        x: &[f64],
        ex: &Example,
        ad: &Adapters,
    ) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let t_len = ex.ids.len();
        let rows = &x[(ex.response_start - 1) * d..(t_len - 1) * d];
        let nf = rmsnorm_fwd(rows, d, &self.w.output_norm, self.eps());
        let logits: Vec<Vec<f64>> = self
            .lm_head_fwd(&nf, ad)
            .chunks_exact(nv)
            .map(|r| r.to_vec())
            .collect();
        let lp = logits
            .iter()
            .enumerate()
            .map(|(r, lg)| log_softmax_target_fwd(lg, ex.ids[ex.response_start + r] as usize))
            .collect();
        (lp, nf, logits)
    }

    /// The LM head on normed rows `nf` `[R, d]`: `W_out·nf (+ s·B·(A·nf))` with the adapter's
    /// LoRA on `output.weight`, if any → `[R, n_vocab]`.
    pub(super) fn lm_head_fwd(&self, nf: &[f64], ad: &Adapters) -> Vec<f64> {
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let mut logits = linear_fwd(nf, d, self.lm_head(), nv, None);
        if let Some(a) = ad
            .by
            .first()
            .and_then(|l| l[Target::Output as usize].as_ref())
        {
            let (dy, _) = lora_fwd(nf, d, &a.a, &a.b, ad.rank, nv, ad.scale);
            for (y, e) in logits.iter_mut().zip(dy) {
                *y += e;
            }
        }
        logits
    }
}
