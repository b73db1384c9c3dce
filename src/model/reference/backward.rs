//! The whole-model LoRA backward: each layer in reverse from the LM head's gradient, LoRA
//! gradients accumulated per tensor.

use super::*;

impl RefModel {
    /// Backward of [`Self::project`]: returns dx, and accumulates the LoRA gradients.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project_back(
        &self,
        ad: &Adapters,
        layer: usize,
        target: Target,
        x: &[f64],
        z: &[f64],
        w: &[f32],
        dy: &[f64],
        grads: &mut LoraGrads,
    ) -> Vec<f64> {
        let (n_in, n_out) = target.shape(&self.cfg);
        let mut dx = linear_back(dy, n_in, w, n_out);
        if let Some(a) = ad.get(layer, target) {
            // With dropout the branch saw drop(x): gradients against it, and the branch's input
            // gradient goes back through the same mask (drop is linear in x).
            let xd = ad.dropped(layer, target, x, n_in);
            let (dxl, da, db) = lora_back(&xd, z, dy, n_in, &a.a, &a.b, ad.rank, n_out, ad.scale);
            let dxl = ad.dropped(layer, target, &dxl, n_in);
            add_into(&mut dx, &dxl);
            let g = &mut grads.tensors[a.idx];
            add_into(&mut g.a, &da);
            add_into(&mut g.b, &db);
        }
        dx
    }

    /// One layer backward: from `dout` (gradient w.r.t. the layer output) to the gradient w.r.t.
    /// its input; accumulates LoRA gradients.
    pub(super) fn layer_back(
        &self,
        l: usize,
        tp: &LayerTape,
        dout: Vec<f64>,
        ad: &Adapters,
        grads: &mut LoraGrads,
    ) -> Vec<f64> {
        let c = &self.cfg;
        let w = &self.w.layers[l];
        let eps = self.eps();
        let (d, hd) = (c.n_embd, c.head_dim);
        let z = |t: Target| tp.z[t as usize].as_slice();
        // out = h + [post-norm](Wdown·s):  dh = dout + (∂/∂h of the FFN branch)
        let df = match &w.post_ffn_norm {
            Some(pn) => rmsnorm_back(&tp.f, d, pn, eps, &dout),
            None => dout.clone(),
        };
        let ds = self.project_back(
            ad,
            l,
            Target::FfnDown,
            &tp.s,
            z(Target::FfnDown),
            &w.w_down,
            &df,
            grads,
        );
        let (dg, du) = match c.ffn_act() {
            FfnAct::Silu => swiglu_back(&tp.g, &tp.u, &ds),
            FfnAct::GeluTanh => geglu_back(&tp.g, &tp.u, &ds),
        };
        let mut dn2 = self.project_back(
            ad,
            l,
            Target::FfnGate,
            &tp.n2,
            z(Target::FfnGate),
            &w.w_gate,
            &dg,
            grads,
        );
        let dn2u = self.project_back(
            ad,
            l,
            Target::FfnUp,
            &tp.n2,
            z(Target::FfnUp),
            &w.w_up,
            &du,
            grads,
        );
        add_into(&mut dn2, &dn2u);
        let mut dh = dout;
        add_into(&mut dh, &rmsnorm_back(&tp.h, d, &w.ffn_norm, eps, &dn2));
        // h = x + [post-norm](Wo·att)
        let do_ = match &w.post_attn_norm {
            Some(pn) => rmsnorm_back(&tp.o, d, pn, eps, &dh),
            None => dh.clone(),
        };
        let datt = self.project_back(
            ad,
            l,
            Target::AttnOutput,
            &tp.att,
            z(Target::AttnOutput),
            &w.wo,
            &do_,
            grads,
        );
        let (dq, dk, dv) = attention_back_opts(
            &tp.q,
            &tp.k,
            &tp.v,
            &datt,
            c.n_head,
            c.n_head_kv,
            hd,
            self.attn_opts(l),
        );
        let mut dq = rope_back(&dq, c.n_head, hd, &self.rope[l]);
        let mut dk = rope_back(&dk, c.n_head_kv, hd, &self.rope[l]);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            dq = rmsnorm_back(&tp.q_pre, hd, qn, eps, &dq);
            dk = rmsnorm_back(&tp.k_pre, hd, kn, eps, &dk);
        }
        let mut dn1 = self.project_back(
            ad,
            l,
            Target::AttnQ,
            &tp.n1,
            z(Target::AttnQ),
            &w.wq,
            &dq,
            grads,
        );
        let dn1k = self.project_back(
            ad,
            l,
            Target::AttnK,
            &tp.n1,
            z(Target::AttnK),
            &w.wk,
            &dk,
            grads,
        );
        let dn1v = self.project_back(
            ad,
            l,
            Target::AttnV,
            &tp.n1,
            z(Target::AttnV),
            &w.wv,
            &dv,
            grads,
        );
        add_into(&mut dn1, &dn1k);
        add_into(&mut dn1, &dn1v);
        let mut dx = dh;
        add_into(&mut dx, &rmsnorm_back(&tp.x, d, &w.attn_norm, eps, &dn1));
        dx
    }

    /// Gradient of `J = Σ_s weights[s] · Σ_t logp_{s,t}` with respect to every LoRA A and B.
    /// Returns the per-sequence summed log-probs and the gradients (same layout as `lora`).
    ///
    /// Chain (per sequence, seed `w = weights[s]`):
    /// `dlogits_t = w·(onehot(ids_{t+1}) − softmax(logits_t))` on scored positions, 0 elsewhere;
    /// `dnf = dlogits·W_out`; `dx_L = rmsnorm_back(dnf)`; then each layer in reverse
    /// (see the private `layer_back`: FFN branch, residual, attention branch, residual).
    pub fn lora_grads(
        &self,
        examples: &[Example],
        weights: &[f64],
        lora: &LoraWeights,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        self.lora_grads_dropout(examples, weights, lora, None)
    }

    /// [`Self::lora_grads`] of the training forward with LoRA dropout (PEFT semantics: the LoRA
    /// branch reads `mask ⊙ x / (1 − p)`), masks as `gpu::backward::forward_train` draws them for
    /// the same batch (example `b` at global rows `b·L ..`, L the longest example). The returned
    /// log-probs are those of that dropout forward.
    pub fn lora_grads_dropout(
        &self,
        examples: &[Example],
        weights: &[f64],
        lora: &LoraWeights,
        dropout: Option<Dropout>,
    ) -> Result<(Vec<f64>, LoraGrads), RefError> {
        if weights.len() != examples.len() {
            return Err(RefError::WeightCount {
                n_weights: weights.len(),
                n_examples: examples.len(),
            });
        }
        for (i, ex) in examples.iter().enumerate() {
            self.check_example(ex, i)?;
        }
        if let Some(t) = lora.tensors.iter().find(|t| t.target == Target::Output) {
            return Err(RefError::BadLora {
                layer: t.layer,
                target: t.target.gguf_name(),
                detail: "LoRA on output.weight is supported for scoring, not training (no LM-head LoRA gradient)".into(),
            });
        }
        let mut ad = self.adapters(Some(lora))?;
        ad.drop = dropout;
        let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut grads = LoraGrads::zeros_like(lora);
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        let mut sums = Vec::with_capacity(examples.len());
        for (b, (ex, &wt)) in examples.iter().zip(weights).enumerate() {
            ad.row0 = b * seq_len;
            let (x, tapes) = self.trunk(&ex.ids, &ad);
            let (lp, _nf, logits) = self.head_fwd(&x, ex, &ad);
            sums.push(lp.iter().sum());
            if wt == 0.0 {
                continue;
            }
            let t_len = ex.ids.len();
            let r0 = ex.response_start - 1;
            // dlogits on the scored rows, then dnf = dlogits·W_out.
            let mut dlogits = Vec::with_capacity(logits.len() * nv);
            for (r, lg) in logits.iter().enumerate() {
                let target = ex.ids[ex.response_start + r] as usize;
                dlogits.extend(log_softmax_target_back(lg, target, wt));
            }
            let dnf = linear_back(&dlogits, d, self.lm_head(), nv);
            let mut dx = vec![0.0; t_len * d];
            let rows = &x[r0 * d..(t_len - 1) * d];
            let dxr = rmsnorm_back(rows, d, &self.w.output_norm, self.eps(), &dnf);
            dx[r0 * d..(t_len - 1) * d].copy_from_slice(&dxr);
            for l in (0..self.cfg.n_layer).rev() {
                dx = self.layer_back(l, &tapes[l], dx, &ad, &mut grads);
            }
        }
        Ok((sums, grads))
    }
}
