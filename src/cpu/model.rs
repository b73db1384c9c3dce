//! The CPU engine's model: quantized weights viewed in the memory-mapped GGUF, the layer forward
//! (keeping a tape for the backward) and backward, and the LM head on scored rows only, in
//! vocabulary chunks. The graph is `model::reference`'s (see its module doc for the equations).

use super::CpuError;
use super::gemm::{MB, QMat, dense_nn, dense_nt, dense_tn_acc, matmul_back, matmul_fwd, sgemm};
use super::mat::{Mat, SendPtr};
use super::ops::{
    AttnShape, RopeTable, Seqs, attention, attention_back, attention_skipping, geglu, geglu_back,
    rmsnorm, rmsnorm_back, swiglu, swiglu_back,
};
use super::share::Share;
use crate::gguf::{GgmlType, GgufFile};
use crate::model::lora::dropout::Dropout;
use crate::model::lora::{LoraTensor, LoraWeights, Target};
use crate::model::reference::RopeParams;
use crate::model::{FfnAct, ModelConfig, TensorRef, Weights};
use rayon::prelude::*;

/// A matrix's place in the file.
#[derive(Clone, Copy, Debug)]
struct QInfo {
    ty: GgmlType,
    n_in: usize,
    n_out: usize,
    off: usize,
    len: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    mats: [QInfo; 7],
    bias: [Option<Vec<f32>>; 3],
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// gemma3 norms after the attention and FFN branches.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Vocabulary rows per LM-head chunk.
pub const VOCAB_CHUNK: usize = 1024;
/// Fixed number of partial sums of the LM-head input gradient (independent of thread count).
const HEAD_GROUPS: usize = 8;

/// Model weights for the CPU engine (quantized, in the mapped file).
pub struct CpuModel {
    file: GgufFile,
    pub cfg: ModelConfig,
    layers: Vec<Layer>,
    embd: QInfo,
    head: QInfo,
    output_norm: Vec<f32>,
    rope: RopeTable,
    /// gemma3's local layers rotate with their own base.
    rope_local: Option<RopeTable>,
}

/// What one adapted projection saw in the forward: the (dropped) input of its LoRA branch and
/// `z = A·x`.
#[derive(Clone, Debug, Default)]
pub struct LoraTape {
    pub xd: Option<Mat>,
    pub z: Mat,
}

/// A layer's intermediates kept for its backward.
#[derive(Clone, Debug, Default)]
pub struct Tape {
    pub x: Mat,
    n1: Mat,
    q_pre: Option<Mat>,
    k_pre: Option<Mat>,
    q: Mat,
    k: Mat,
    v: Mat,
    att: Mat,
    lse: Vec<f32>,
    h: Mat,
    n2: Mat,
    g: Mat,
    u: Mat,
    s: Mat,
    /// gemma3: the attention and FFN outputs before their post-norms.
    o: Option<Mat>,
    f: Option<Mat>,
    lora: [Option<LoraTape>; 7],
}

impl Tape {
    /// This compact-layout tape in the packed layout of `s` (see [`super::share`]).
    pub fn expand(&self, s: &Share, n_head: usize) -> Tape {
        let e = |m: &Mat| s.expand(m);
        let eo = |m: &Option<Mat>| m.as_ref().map(e);
        Tape {
            x: e(&self.x),
            n1: e(&self.n1),
            q_pre: eo(&self.q_pre),
            k_pre: eo(&self.k_pre),
            q: e(&self.q),
            k: e(&self.k),
            v: e(&self.v),
            att: e(&self.att),
            lse: s.expand_vals(&self.lse, n_head),
            h: e(&self.h),
            n2: e(&self.n2),
            g: e(&self.g),
            u: e(&self.u),
            s: e(&self.s),
            o: eo(&self.o),
            f: eo(&self.f),
            lora: std::array::from_fn(|i| {
                self.lora[i].as_ref().map(|t| LoraTape {
                    xd: eo(&t.xd),
                    z: e(&t.z),
                })
            }),
        }
    }

    pub fn bytes(&self) -> u64 {
        let m = [
            &self.x, &self.n1, &self.q, &self.k, &self.v, &self.att, &self.h, &self.n2, &self.g,
            &self.u, &self.s,
        ];
        let mut b: u64 = m.iter().map(|x| x.bytes()).sum();
        b += self.q_pre.as_ref().map_or(0, Mat::bytes) + self.k_pre.as_ref().map_or(0, Mat::bytes);
        b += self.o.as_ref().map_or(0, Mat::bytes) + self.f.as_ref().map_or(0, Mat::bytes);
        b += self.lse.len() as u64 * 4;
        for t in self.lora.iter().flatten() {
            b += t.z.bytes() + t.xd.as_ref().map_or(0, Mat::bytes);
        }
        b
    }
}

/// The adapter as the engine uses it: per (layer, target) the tensor index, plus scale.
pub struct Adapters<'a> {
    pub lora: Option<&'a LoraWeights>,
    by: Vec<[Option<usize>; 7]>,
    pub scale: f32,
    /// Dropout of the training forward and the global row (`b·L + t`) of every packed row.
    pub drop: Option<(Dropout, Vec<u32>)>,
}

impl<'a> Adapters<'a> {
    pub fn new(cfg: &ModelConfig, lora: Option<&'a LoraWeights>) -> Result<Adapters<'a>, CpuError> {
        let mut by = vec![[None; 7]; cfg.n_layer];
        if let Some(l) = lora {
            for (i, t) in l.tensors.iter().enumerate() {
                if t.target == Target::Output {
                    return Err(CpuError::Unsupported(
                        "a LoRA on output.weight (the LM head): the cpu engine adapts per-layer projections; score it with --engine wgpu or llama".into(),
                    ));
                }
                let (n_in, n_out) = t.target.shape(cfg);
                if t.layer >= cfg.n_layer
                    || (t.n_in, t.n_out) != (n_in, n_out)
                    || t.a.len() != l.rank * n_in
                    || t.b.len() != l.rank * n_out
                {
                    return Err(CpuError::BadAdapter(format!(
                        "{} of layer {} has shape {}x{} (rank {}), the model needs layer < {} and {n_in}x{n_out}",
                        t.target.gguf_name(),
                        t.layer,
                        t.n_in,
                        t.n_out,
                        l.rank,
                        cfg.n_layer
                    )));
                }
                by[t.layer][ti(t.target)] = Some(i);
            }
        }
        Ok(Adapters {
            lora,
            by,
            scale: lora.map_or(0.0, |l| l.scale()),
            drop: None,
        })
    }

    fn get(&self, layer: usize, t: Target) -> Option<(usize, &'a LoraTensor)> {
        let i = self.by[layer][ti(t)]?;
        Some((i, &self.lora?.tensors[i]))
    }

    /// The lowest layer with an adapted projection.
    pub fn lowest_layer(&self) -> Option<usize> {
        self.by.iter().position(|l| l.iter().any(Option::is_some))
    }
}

fn ti(t: Target) -> usize {
    Target::ALL.iter().position(|&x| x == t).unwrap_or(0)
}

/// Where each LoRA tensor's A and B gradients sit in the flat gradient vector
/// (`flatten_lora` order).
pub fn grad_offsets(lora: &LoraWeights) -> Vec<(usize, usize)> {
    let mut off = 0;
    lora.tensors
        .iter()
        .map(|t| {
            let a = off;
            off += t.a.len();
            let b = off;
            off += t.b.len();
            (a, b)
        })
        .collect()
}

impl CpuModel {
    /// Views the weights of `file` (re-mapped from its path, or copied when it has none).
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<CpuModel, CpuError> {
        let file = match file.path() {
            Some(p) => GgufFile::open(p).map_err(|e| CpuError::Model(e.to_string()))?,
            None => GgufFile::from_bytes(file.bytes().to_vec())
                .map_err(|e| CpuError::Model(e.to_string()))?,
        };
        let (layers, embd, head, output_norm) = {
            let w = Weights::from_gguf(&file, cfg).map_err(|e| CpuError::Model(e.to_string()))?;
            let base = file.bytes().as_ptr() as usize;
            let qi = |t: &TensorRef| QInfo {
                ty: t.ty,
                n_in: t.n_in(),
                n_out: t.n_out(),
                off: t.data.as_ptr() as usize - base,
                len: t.data.len(),
            };
            let layers = w
                .layers
                .iter()
                .map(|l| Layer {
                    attn_norm: l.attn_norm.to_f32(),
                    mats: [
                        qi(&l.attn_q),
                        qi(&l.attn_k),
                        qi(&l.attn_v),
                        qi(&l.attn_output),
                        qi(&l.ffn_gate),
                        qi(&l.ffn_up),
                        qi(&l.ffn_down),
                    ],
                    bias: [
                        l.attn_q_bias.map(|t| t.to_f32()),
                        l.attn_k_bias.map(|t| t.to_f32()),
                        l.attn_v_bias.map(|t| t.to_f32()),
                    ],
                    q_norm: l.attn_q_norm.map(|t| t.to_f32()),
                    k_norm: l.attn_k_norm.map(|t| t.to_f32()),
                    ffn_norm: l.ffn_norm.to_f32(),
                    post_attn_norm: l.post_attn_norm.map(|t| t.to_f32()),
                    post_ffn_norm: l.post_ffn_norm.map(|t| t.to_f32()),
                })
                .collect();
            let embd = qi(&w.token_embd);
            let head = w.output.as_ref().map_or(embd, qi);
            (layers, embd, head, w.output_norm.to_f32())
        };
        let rope = RopeTable::new(&RopeParams::from_config(cfg), 0);
        let rope_local = Self::local_rope(cfg, 0);
        Ok(CpuModel {
            file,
            cfg: cfg.clone(),
            layers,
            embd,
            head,
            output_norm,
            rope,
            rope_local,
        })
    }

    /// The rope table of gemma3's local layers (`None` when no layer is local).
    fn local_rope(cfg: &ModelConfig, max_pos: usize) -> Option<RopeTable> {
        let l = cfg.gemma3.as_ref()?.local_layers.iter().position(|&x| x)?;
        Some(RopeTable::new(&RopeParams::for_layer(cfg, l), max_pos))
    }

    /// The rope table of layer `l`.
    fn rope_of(&self, l: usize) -> &RopeTable {
        match &self.rope_local {
            Some(t) if self.cfg.attn_window(l).is_some() => t,
            _ => &self.rope,
        }
    }

    /// The attention shape of layer `l`.
    fn attn_shape(&self, l: usize) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            hd: c.head_dim,
            scale: c.attn_scale(),
            window: c.attn_window(l),
        }
    }

    fn q(&self, i: QInfo) -> QMat<'_> {
        QMat {
            ty: i.ty,
            n_in: i.n_in,
            n_out: i.n_out,
            data: &self.file.bytes()[i.off..i.off + i.len],
        }
    }

    /// Bytes of the weights as stored (mapped, not copied).
    pub fn weight_bytes(&self) -> u64 {
        let mut b = self.embd.len as u64;
        if self.head.off != self.embd.off {
            b += self.head.len as u64;
        }
        for l in &self.layers {
            b += l.mats.iter().map(|m| m.len as u64).sum::<u64>();
        }
        b
    }

    /// Makes the RoPE table cover positions `0..n`.
    pub fn ensure_positions(&mut self, n: usize) {
        if self.rope.max_pos() < n {
            let want = n.next_power_of_two().max(256);
            self.rope = RopeTable::new(&RopeParams::from_config(&self.cfg), want);
            self.rope_local = Self::local_rope(&self.cfg, want);
        }
    }

    /// Checks token ids and response starts.
    pub fn check_ids(&self, ids: &[&[u32]]) -> Result<(), CpuError> {
        for (e, s) in ids.iter().enumerate() {
            if s.is_empty() {
                return Err(CpuError::BadInput(format!("example {e} is empty")));
            }
            if let Some((pos, &id)) = s
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= self.cfg.n_vocab)
            {
                return Err(CpuError::BadInput(format!(
                    "example {e}: token id {id} at position {pos} is outside the vocabulary of {} tokens",
                    self.cfg.n_vocab
                )));
            }
        }
        Ok(())
    }

    /// Embedding rows of the packed ids `[R, d]` (times √d for gemma3).
    pub fn embed(&self, ids: &[u32]) -> Mat {
        let d = self.cfg.n_embd;
        let scale = self.cfg.embd_scale();
        let mut x = Mat::zeros(ids.len(), d);
        let w = self.q(self.embd);
        x.data[..ids.len() * d]
            .par_chunks_mut(d)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| {
                w.rows(id as usize, 1, row);
                if scale != 1.0 {
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            });
        x
    }

    /// `y = W·x (+ bias) (+ s·B·A·drop(x))` for projection `t` of layer `l`.
    fn project(
        &self,
        l: usize,
        t: Target,
        x: &Mat,
        ad: &Adapters,
        keep: bool,
    ) -> (Mat, Option<LoraTape>) {
        let lw = &self.layers[l];
        let w = self.q(lw.mats[ti(t)]);
        let mut y = Mat::zeros(x.rows, w.n_out);
        matmul_fwd(&w, x, &mut y, false);
        let bias = match t {
            Target::AttnQ => lw.bias[0].as_ref(),
            Target::AttnK => lw.bias[1].as_ref(),
            Target::AttnV => lw.bias[2].as_ref(),
            _ => None,
        };
        if let Some(b) = bias {
            y.data[..x.rows * w.n_out]
                .par_chunks_mut(w.n_out)
                .for_each(|r| {
                    for (v, bv) in r.iter_mut().zip(b) {
                        *v += bv;
                    }
                });
        }
        let mut tape = None;
        if let Some((_, lt)) = ad.get(l, t) {
            let r = self.lora_rank(ad);
            let xd = ad.drop.as_ref().map(|(d, rows)| dropped(x, *d, l, t, rows));
            let xin = xd.as_ref().unwrap_or(x);
            let mut z = Mat::zeros(x.rows, r);
            dense_nt(xin, &lt.a, r, &mut z, false, 1.0);
            dense_nt(&z, &lt.b, w.n_out, &mut y, true, ad.scale);
            if keep {
                tape = Some(LoraTape { xd, z });
            }
        }
        (y, tape)
    }

    fn lora_rank(&self, ad: &Adapters) -> usize {
        ad.lora.map_or(0, |l| l.rank)
    }

    /// Backward of [`Self::project`]: `dx (+)= dy·W (+ LoRA branch)`; LoRA gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        l: usize,
        t: Target,
        x: &Mat,
        lt: Option<&LoraTape>,
        dy: &Mat,
        dx: &mut Mat,
        acc: bool,
        ad: &Adapters,
        grads: &mut [f32],
        offs: &[(usize, usize)],
    ) {
        let w = self.q(self.layers[l].mats[ti(t)]);
        matmul_back(&w, dy, dx, acc);
        let (Some((idx, lw)), Some(tape)) = (ad.get(l, t), lt) else {
            return;
        };
        let r = self.lora_rank(ad);
        let xin = tape.xd.as_ref().unwrap_or(x);
        let mut dz = Mat::zeros(dy.rows, r);
        dense_nn(dy, &lw.b, r, &mut dz, false, ad.scale);
        let (oa, ob) = offs[idx];
        dense_tn_acc(dy, &tape.z, &mut grads[ob..ob + lw.b.len()], ad.scale);
        dense_tn_acc(&dz, xin, &mut grads[oa..oa + lw.a.len()], 1.0);
        match &ad.drop {
            None => dense_nn(&dz, &lw.a, w.n_in, dx, true, 1.0),
            Some((d, rows)) => {
                let mut tmp = Mat::zeros(dy.rows, w.n_in);
                dense_nn(&dz, &lw.a, w.n_in, &mut tmp, false, 1.0);
                let tmp = dropped(&tmp, *d, l, t, rows);
                dx.add_assign(&tmp);
            }
        }
    }

    /// One layer forward; the tape when `keep`. With `share`, `x` and `pos` are in its compact
    /// layout (rows of shared prefixes left out; see [`super::share`]) and so are the output and
    /// the tape; `seqs` is always the packed layout (attention reads each sequence whole).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_fwd(
        &self,
        l: usize,
        x: Mat,
        seqs: &Seqs,
        pos: &[usize],
        ad: &Adapters,
        keep: bool,
        share: Option<&Share>,
    ) -> (Mat, Option<Tape>) {
        let c = &self.cfg;
        let lw = &self.layers[l];
        let (d, hd, eps) = (c.n_embd, c.head_dim, c.rms_eps);
        let rows = x.rows;
        let mut n1 = Mat::zeros(rows, d);
        rmsnorm(&x.data, d, &lw.attn_norm, eps, &mut n1.data);
        let (mut q, lq) = self.project(l, Target::AttnQ, &n1, ad, keep);
        let (mut k, lk) = self.project(l, Target::AttnK, &n1, ad, keep);
        let (v, lv) = self.project(l, Target::AttnV, &n1, ad, keep);
        let (mut q_pre, mut k_pre) = (None, None);
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            let (qp, kp) = (q.clone(), k.clone());
            rmsnorm(&qp.data, hd, qn, eps, &mut q.data);
            rmsnorm(&kp.data, hd, kn, eps, &mut k.data);
            if keep {
                q_pre = Some(qp);
                k_pre = Some(kp);
            }
        }
        self.rope_of(l).apply(&mut q, c.n_head, hd, pos, false);
        self.rope_of(l).apply(&mut k, c.n_head_kv, hd, pos, false);
        let sh = self.attn_shape(l);
        let (att, lse) = match share {
            None => {
                let mut att = Mat::zeros(rows, c.n_head * hd);
                let mut lse = vec![0f32; rows * c.n_head];
                attention(&q, &k, &v, seqs, sh, &mut att, &mut lse);
                (att, lse)
            }
            Some(s) => {
                let (qp, kp, vp) = (s.expand(&q), s.expand(&k), s.expand(&v));
                let mut att = Mat::zeros(qp.rows, c.n_head * hd);
                let mut lse = vec![0f32; qp.rows * c.n_head];
                attention_skipping(&qp, &kp, &vp, seqs, sh, &mut att, &mut lse, &s.shared);
                (s.compact(&att), s.compact_vals(&lse, c.n_head))
            }
        };
        let (o, lo) = self.project(l, Target::AttnOutput, &att, ad, keep);
        let (mut h, o_pre) = match &lw.post_attn_norm {
            Some(pn) => {
                let mut po = Mat::zeros(rows, d);
                rmsnorm(&o.data, d, pn, eps, &mut po.data);
                (po, keep.then_some(o))
            }
            None => (o, None),
        };
        h.add_assign(&x);
        let mut n2 = Mat::zeros(rows, d);
        rmsnorm(&h.data, d, &lw.ffn_norm, eps, &mut n2.data);
        let (g, lg) = self.project(l, Target::FfnGate, &n2, ad, keep);
        let (u, lu) = self.project(l, Target::FfnUp, &n2, ad, keep);
        let mut s = Mat::zeros(rows, c.n_ff);
        match c.ffn_act() {
            FfnAct::Silu => swiglu(&g, &u, &mut s),
            FfnAct::GeluTanh => geglu(&g, &u, &mut s),
        }
        let (f, ld) = self.project(l, Target::FfnDown, &s, ad, keep);
        let (mut out, f_pre) = match &lw.post_ffn_norm {
            Some(pn) => {
                let mut pf = Mat::zeros(rows, d);
                rmsnorm(&f.data, d, pn, eps, &mut pf.data);
                (pf, keep.then_some(f))
            }
            None => (f, None),
        };
        out.add_assign(&h);
        let tape = keep.then_some(Tape {
            x,
            n1,
            q_pre,
            k_pre,
            q,
            k,
            v,
            att,
            lse,
            h,
            n2,
            g,
            u,
            s,
            o: o_pre,
            f: f_pre,
            lora: [lq, lk, lv, lo, lg, lu, ld],
        });
        (out, tape)
    }

    /// One layer backward from `dout` to the gradient of its input.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_back(
        &self,
        l: usize,
        tp: &Tape,
        dout: Mat,
        seqs: &Seqs,
        pos: &[usize],
        ad: &Adapters,
        grads: &mut [f32],
        offs: &[(usize, usize)],
    ) -> Mat {
        let c = &self.cfg;
        let lw = &self.layers[l];
        let (d, hd, eps, rows) = (c.n_embd, c.head_dim, c.rms_eps, dout.rows);
        let lt = |t: Target| tp.lora[ti(t)].as_ref();
        let df = match (&lw.post_ffn_norm, &tp.f) {
            (Some(pn), Some(f)) => {
                let mut df = Mat::zeros(rows, d);
                rmsnorm_back(&f.data, d, pn, eps, &dout.data, &mut df.data, false);
                Some(df)
            }
            _ => None,
        };
        let mut ds = Mat::zeros(rows, c.n_ff);
        self.project_back(
            l,
            Target::FfnDown,
            &tp.s,
            lt(Target::FfnDown),
            df.as_ref().unwrap_or(&dout),
            &mut ds,
            false,
            ad,
            grads,
            offs,
        );
        let (mut dg, mut du) = (Mat::zeros(rows, c.n_ff), Mat::zeros(rows, c.n_ff));
        match c.ffn_act() {
            FfnAct::Silu => swiglu_back(&tp.g, &tp.u, &ds, &mut dg, &mut du),
            FfnAct::GeluTanh => geglu_back(&tp.g, &tp.u, &ds, &mut dg, &mut du),
        }
        drop(ds);
        drop(df);
        let mut dn2 = Mat::zeros(rows, d);
        self.project_back(
            l,
            Target::FfnGate,
            &tp.n2,
            lt(Target::FfnGate),
            &dg,
            &mut dn2,
            false,
            ad,
            grads,
            offs,
        );
        self.project_back(
            l,
            Target::FfnUp,
            &tp.n2,
            lt(Target::FfnUp),
            &du,
            &mut dn2,
            true,
            ad,
            grads,
            offs,
        );
        let mut dh = dout;
        rmsnorm_back(
            &tp.h.data,
            d,
            &lw.ffn_norm,
            eps,
            &dn2.data,
            &mut dh.data,
            true,
        );
        let dpo = match (&lw.post_attn_norm, &tp.o) {
            (Some(pn), Some(o)) => {
                let mut dpo = Mat::zeros(rows, d);
                rmsnorm_back(&o.data, d, pn, eps, &dh.data, &mut dpo.data, false);
                Some(dpo)
            }
            _ => None,
        };
        let mut datt = Mat::zeros(rows, c.n_head * hd);
        self.project_back(
            l,
            Target::AttnOutput,
            &tp.att,
            lt(Target::AttnOutput),
            dpo.as_ref().unwrap_or(&dh),
            &mut datt,
            false,
            ad,
            grads,
            offs,
        );
        drop(dpo);
        let sh = self.attn_shape(l);
        let (mut dq, mut dk, mut dv) = (
            Mat::zeros(rows, c.n_head * hd),
            Mat::zeros(rows, c.kv_dim()),
            Mat::zeros(rows, c.kv_dim()),
        );
        attention_back(
            &tp.q, &tp.k, &tp.v, &tp.att, &tp.lse, &datt, seqs, sh, &mut dq, &mut dk, &mut dv,
        );
        self.rope_of(l).apply(&mut dq, c.n_head, hd, pos, true);
        self.rope_of(l).apply(&mut dk, c.n_head_kv, hd, pos, true);
        if let (Some(qn), Some(kn), Some(qp), Some(kp)) =
            (&lw.q_norm, &lw.k_norm, &tp.q_pre, &tp.k_pre)
        {
            let (gq, gk) = (dq.clone(), dk.clone());
            rmsnorm_back(&qp.data, hd, qn, eps, &gq.data, &mut dq.data, false);
            rmsnorm_back(&kp.data, hd, kn, eps, &gk.data, &mut dk.data, false);
        }
        let mut dn1 = Mat::zeros(rows, d);
        self.project_back(
            l,
            Target::AttnQ,
            &tp.n1,
            lt(Target::AttnQ),
            &dq,
            &mut dn1,
            false,
            ad,
            grads,
            offs,
        );
        self.project_back(
            l,
            Target::AttnK,
            &tp.n1,
            lt(Target::AttnK),
            &dk,
            &mut dn1,
            true,
            ad,
            grads,
            offs,
        );
        self.project_back(
            l,
            Target::AttnV,
            &tp.n1,
            lt(Target::AttnV),
            &dv,
            &mut dn1,
            true,
            ad,
            grads,
            offs,
        );
        let mut dx = dh;
        rmsnorm_back(
            &tp.x.data,
            d,
            &lw.attn_norm,
            eps,
            &dn1.data,
            &mut dx.data,
            true,
        );
        dx
    }

    /// Final norm of the scored rows `rows` of `x` → `nf` `[Rs, d]`, and the pre-norm rows.
    pub fn head_input(&self, x: &Mat, rows: &[usize]) -> (Mat, Mat) {
        let d = self.cfg.n_embd;
        let mut xs = Mat::zeros(rows.len(), d);
        for (i, &r) in rows.iter().enumerate() {
            xs.row_mut(i).copy_from_slice(x.row(r));
        }
        let mut nf = Mat::zeros(rows.len(), d);
        rmsnorm(
            &xs.data,
            d,
            &self.output_norm,
            self.cfg.rms_eps,
            &mut nf.data,
        );
        (xs, nf)
    }

    fn head_chunk(&self, nf: &Mat, c0: usize, vc: usize, panel: &mut [f32], logits: &mut [f32]) {
        let d = self.cfg.n_embd;
        let w = self.q(self.head);
        let mut scratch = vec![0f32; super::gemm::TT * d];
        w.rows_t(c0, vc, &mut scratch, panel);
        for rb in 0..nf.row_blocks() {
            unsafe {
                sgemm(
                    MB,
                    vc,
                    d,
                    logits.as_mut_ptr().add(rb * MB * vc),
                    vc,
                    false,
                    nf.data.as_ptr().add(rb * MB * d),
                    d,
                    1,
                    panel.as_ptr(),
                    vc,
                    1,
                    1.0,
                );
            }
        }
    }

    /// Log-softmax at the targets of every row of `nf`: returns (log-probs, log-sum-exp).
    pub fn head_fwd(&self, nf: &Mat, targets: &[u32]) -> (Vec<f64>, Vec<f32>) {
        let (d, nv, rs) = (self.cfg.n_embd, self.cfg.n_vocab, nf.rows);
        let chunks: Vec<usize> = (0..nv).step_by(VOCAB_CHUNK).collect();
        let parts: Vec<(Vec<f32>, Vec<f64>, Vec<f32>)> = chunks
            .par_iter()
            .map(|&c0| {
                let vc = VOCAB_CHUNK.min(nv - c0);
                let mut panel = vec![0f32; vc * d];
                let mut logits = vec![0f32; nf.padded_rows() * vc];
                self.head_chunk(nf, c0, vc, &mut panel, &mut logits);
                let mut m = vec![f32::NEG_INFINITY; rs];
                let mut s = vec![0f64; rs];
                let mut t = vec![f32::NAN; rs];
                for r in 0..rs {
                    let row = &logits[r * vc..(r + 1) * vc];
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    m[r] = mx;
                    s[r] = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
                    let tg = targets[r] as usize;
                    if tg >= c0 && tg < c0 + vc {
                        t[r] = row[tg - c0];
                    }
                }
                (m, s, t)
            })
            .collect();
        let mut lp = vec![0f64; rs];
        let mut lse = vec![0f32; rs];
        for r in 0..rs {
            let mx = parts
                .iter()
                .map(|p| p.0[r])
                .fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = parts
                .iter()
                .map(|p| p.1[r] * (p.0[r] as f64 - mx).exp())
                .sum();
            let l = mx + sum.ln();
            let tl = parts[targets[r] as usize / VOCAB_CHUNK].2[r] as f64;
            lp[r] = tl - l;
            lse[r] = l as f32;
        }
        (lp, lse)
    }

    /// Backward of the LM head: `dnf = Σ_v w_r·(onehot − softmax)_v · W_out[v]`, logits
    /// recomputed chunk by chunk; partial sums in [`HEAD_GROUPS`] fixed groups added in order.
    pub fn head_back(&self, nf: &Mat, targets: &[u32], lse: &[f32], wrow: &[f32]) -> Mat {
        let (d, nv, rs) = (self.cfg.n_embd, self.cfg.n_vocab, nf.rows);
        let n_chunks = nv.div_ceil(VOCAB_CHUNK);
        let parts: Vec<Mat> = (0..HEAD_GROUPS)
            .into_par_iter()
            .map(|g| {
                let mut part = Mat::zeros(rs, d);
                let mut panel = vec![0f32; VOCAB_CHUNK * d];
                // The chunk's rows of W_out row-major `[vc, d]` for dnf += g·W (the logits read
                // them transposed, `panel`).
                let mut rows_w = vec![0f32; VOCAB_CHUNK * d];
                let mut logits = vec![0f32; nf.padded_rows() * VOCAB_CHUNK];
                for ci in (g..n_chunks).step_by(HEAD_GROUPS) {
                    let c0 = ci * VOCAB_CHUNK;
                    let vc = VOCAB_CHUNK.min(nv - c0);
                    self.head_chunk(nf, c0, vc, &mut panel, &mut logits);
                    for r in 0..nf.padded_rows() {
                        let row = &mut logits[r * vc..(r + 1) * vc];
                        if r >= rs {
                            row.iter_mut().for_each(|v| *v = 0.0);
                            continue;
                        }
                        let (wr, l) = (wrow[r], lse[r]);
                        for (j, v) in row.iter_mut().enumerate() {
                            let p = (*v - l).exp();
                            let one = if c0 + j == targets[r] as usize {
                                1.0
                            } else {
                                0.0
                            };
                            *v = wr * (one - p);
                        }
                    }
                    self.q(self.head).rows(c0, vc, &mut rows_w);
                    let pp = SendPtr(part.data.as_mut_ptr());
                    for rb in 0..nf.row_blocks() {
                        unsafe {
                            sgemm(
                                MB,
                                d,
                                vc,
                                pp.get().add(rb * MB * d),
                                d,
                                true,
                                logits.as_ptr().add(rb * MB * vc),
                                vc,
                                1,
                                rows_w.as_ptr(),
                                d,
                                1,
                                1.0,
                            );
                        }
                    }
                }
                part
            })
            .collect();
        let mut dnf = Mat::zeros(rs, d);
        for p in &parts {
            dnf.add_assign(p);
        }
        dnf
    }

    /// Input gradient of the final norm for rows `rows` of a `[R, d]` trunk output.
    pub fn head_norm_back(&self, xs: &Mat, dnf: &Mat, rows: &[usize], total: usize) -> Mat {
        let d = self.cfg.n_embd;
        let mut dxs = Mat::zeros(xs.rows, d);
        rmsnorm_back(
            &xs.data,
            d,
            &self.output_norm,
            self.cfg.rms_eps,
            &dnf.data,
            &mut dxs.data,
            false,
        );
        let mut dx = Mat::zeros(total, d);
        for (i, &r) in rows.iter().enumerate() {
            dx.row_mut(r).copy_from_slice(dxs.row(i));
        }
        dx
    }
}

/// `mask ⊙ x / (1 − p)` with the masks of `model::lora::dropout` (global rows `rows`).
fn dropped(x: &Mat, d: Dropout, l: usize, t: Target, rows: &[u32]) -> Mat {
    let mut y = Mat::zeros(x.rows, x.cols);
    let inv = d.inv_keep();
    let cols = x.cols;
    y.data[..x.rows * cols]
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(r, yr)| {
            let xr = &x.data[r * cols..(r + 1) * cols];
            for (c, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                *yv = if d.keep(l, t, rows[r] as usize, c) {
                    xv * inv
                } else {
                    0.0
                };
            }
        });
    y
}
