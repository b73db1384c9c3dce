//! [`NativeEngine`]: the CPU engine behind the training loop's [`Engine`] trait. Scoring and the
//! training forward run the packed batch through every layer; the training forward keeps each
//! layer's tape (from the lowest adapted layer up) within an activation budget and keeps only the
//! layer input of the others, which the backward recomputes (same bits either way).

use super::CpuError;
use super::mat::Mat;
use super::model::{Adapters, CpuModel, Tape, grad_offsets};
use super::ops::Seqs;
use super::share::Share;
use crate::data::Example;
use crate::gguf::GgufFile;
use crate::model::ModelConfig;
use crate::model::lora::LoraWeights;
use crate::model::lora::dropout::Dropout;
use crate::optim::AdamWConfig;
use crate::train::engine::HostAdapter;
use crate::train::trainer::{Engine, SeqScore, TrainError};
use std::collections::BTreeMap;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Engine(e.to_string())
}

/// A packed batch: rows of every example back to back.
struct Batch {
    seqs: Seqs,
    pos: Vec<usize>,
    ids: Vec<u32>,
    /// Scored rows (position response_start−1 .. len−2 of each example), their targets and example.
    head_rows: Vec<usize>,
    targets: Vec<u32>,
    head_seq: Vec<usize>,
    /// Global dropout row `b·L + t` of every packed row (L: the longest example).
    drop_rows: Vec<u32>,
}

fn batch(examples: &[&Example]) -> Result<Batch, CpuError> {
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let seqs = Seqs::from_lens(&lens);
    let longest = lens.iter().copied().max().unwrap_or(0);
    let (mut head_rows, mut targets, mut head_seq, mut drop_rows) =
        (vec![], vec![], vec![], vec![]);
    for (b, e) in examples.iter().enumerate() {
        if e.response_start < 1 || e.response_start > e.ids.len() {
            return Err(CpuError::BadInput(format!(
                "example {b}: response_start {} must be between 1 and the length {}",
                e.response_start,
                e.ids.len()
            )));
        }
        for t in e.response_start..e.ids.len() {
            head_rows.push(seqs.start[b] + t - 1);
            targets.push(e.ids[t]);
            head_seq.push(b);
        }
        drop_rows.extend((0..e.ids.len()).map(|t| (b * longest + t) as u32));
    }
    Ok(Batch {
        pos: seqs.positions(),
        ids: examples
            .iter()
            .flat_map(|e| e.ids.iter().copied())
            .collect(),
        seqs,
        head_rows,
        targets,
        head_seq,
        drop_rows,
    })
}

/// What a layer's training forward left for the backward.
enum Saved {
    Tape(Box<Tape>),
    /// Only the layer input: the backward recomputes the layer.
    Input(Mat),
}

/// Everything the backward of the last training forward needs.
struct Kept {
    b: Batch,
    saved: Vec<(usize, Saved)>,
    xs: Mat,
    nf: Mat,
    lse: Vec<f32>,
}

/// The least host memory (bytes, beside the memory-mapped weights) one batch of `rows` packed
/// rows with `scored` scored rows needs on `threads` threads whatever the activation budget:
/// two layers' tapes as working set, the LM head's per-thread logits and panels, the head's row
/// buffers and, when training, every layer's input (the backward recomputes from it).
pub fn min_host_bytes(
    cfg: &ModelConfig,
    rows: usize,
    scored: usize,
    threads: usize,
    train: bool,
) -> u64 {
    let mb = super::gemm::MB as u64;
    let rows = (rows as u64).div_ceil(mb) * mb;
    let scored = scored as u64 + mb;
    let d = cfg.n_embd as u64;
    let chunk = super::model::VOCAB_CHUNK as u64;
    let mut need = rows * NativeEngine::tape_bytes_per_row(cfg) * 2
        + threads as u64 * 4 * (rows * chunk + 2 * chunk * d)
        + 8 * 4 * scored * d;
    if train {
        need += rows * d * 4 * cfg.n_layer as u64;
    }
    need
}

/// The host-memory plan of a CPU-engine run, before anything is allocated (`tune` shows it,
/// `tune --dry-run` reports it).
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostPlan {
    /// Weight bytes read from the memory-mapped file (page cache, not the heap).
    pub weights_mapped_bytes: u64,
    /// Packed rows of the longest micro-step.
    pub rows: usize,
    /// The least the longest micro-step needs on the heap ([`min_host_bytes`]).
    pub min_bytes: u64,
    /// What keeping every layer's tape adds for that micro-step (bounded by
    /// `--activation-memory`; layers beyond it are recomputed).
    pub all_tapes_bytes: u64,
    /// `MemAvailable` now, where the platform reports it.
    pub available_bytes: Option<u64>,
}

impl HostPlan {
    /// The plan for micro-steps of up to `rows` packed rows, every row scored (an upper bound).
    pub fn new(
        cfg: &ModelConfig,
        weights_mapped_bytes: u64,
        rows: usize,
        threads: usize,
    ) -> HostPlan {
        let padded = rows.div_ceil(super::gemm::MB) * super::gemm::MB;
        HostPlan {
            weights_mapped_bytes,
            rows,
            min_bytes: min_host_bytes(cfg, rows, rows, threads, true),
            all_tapes_bytes: padded as u64
                * NativeEngine::tape_bytes_per_row(cfg)
                * cfg.n_layer as u64,
            available_bytes: super::host_available_memory(),
        }
    }

    /// Refuses, with what to reduce, a plan whose least need exceeds the available memory.
    pub fn check(&self) -> Result<(), CpuError> {
        match self.available_bytes {
            Some(avail) if self.min_bytes > avail => Err(CpuError::DoesNotFit {
                need_mib: self.min_bytes >> 20,
                avail_mib: avail >> 20,
            }),
            _ => Ok(()),
        }
    }
}

/// The native CPU engine (see the module doc of [`crate::cpu`]).
pub struct NativeEngine {
    model: CpuModel,
    state: HostAdapter,
    offs: Vec<(usize, usize)>,
    dropout: Option<Dropout>,
    kept: Option<Kept>,
    pool: rayon::ThreadPool,
    threads: usize,
    activation_memory: u64,
    kept_layers: usize,
    peak_bytes: u64,
    share_prompts: bool,
    shared_rows: usize,
}

impl NativeEngine {
    /// Views the model's weights in `file` and starts `threads` worker threads.
    pub fn new(
        file: &GgufFile,
        cfg: &ModelConfig,
        lora: LoraWeights,
        adam: AdamWConfig,
        threads: usize,
    ) -> Result<NativeEngine, TrainError> {
        let model = CpuModel::load(file, cfg).map_err(err)?;
        Adapters::new(cfg, Some(&lora)).map_err(err)?;
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bfpo-cpu-{i}"))
            .build()
            .map_err(|e| {
                err(CpuError::Threads {
                    threads,
                    detail: e.to_string(),
                })
            })?;
        Ok(NativeEngine {
            model,
            offs: grad_offsets(&lora),
            state: HostAdapter::new(lora, adam)?,
            dropout: None,
            kept: None,
            pool,
            threads,
            activation_memory: u64::MAX,
            kept_layers: 0,
            peak_bytes: 0,
            share_prompts: true,
            shared_rows: 0,
        })
    }

    /// Host bytes the training forward may spend on layer tapes (the rest are recomputed).
    pub fn with_activation_memory(mut self, bytes: u64) -> NativeEngine {
        self.activation_memory = bytes;
        self
    }

    /// Prompt sharing (on by default): rows of a prefix several sequences of a batch begin
    /// with are computed once (exact; see [`super::share`]). Off computes every row.
    pub fn with_prompt_sharing(mut self, on: bool) -> NativeEngine {
        self.share_prompts = on;
        self
    }

    /// Packed rows the last forward did not compute (copies of a shared prefix).
    pub fn shared_rows(&self) -> usize {
        self.shared_rows
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Layers whose tapes the last training forward kept.
    pub fn kept_layers(&self) -> usize {
        self.kept_layers
    }

    /// Host bytes one layer's tape takes per row (f32 intermediates of [`Tape`]).
    pub fn tape_bytes_per_row(cfg: &ModelConfig) -> u64 {
        let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let pre = if cfg.qk_norm { q + kv } else { 0 };
        let post = if cfg.post_norms() { 2 * d } else { 0 };
        4 * (4 * d + 2 * q + 2 * kv + 3 * ff + cfg.n_head + pre + post) as u64
    }

    /// The least host memory a batch needs whatever the activation budget: every kept layer
    /// input, one layer's working set, the LM head's buffers. Refuses the batch, before
    /// allocating, when that exceeds the available memory.
    fn check_fits(&self, b: &Batch, train: bool) -> Result<(), TrainError> {
        let need = min_host_bytes(
            &self.model.cfg,
            b.ids.len(),
            b.head_rows.len(),
            self.threads,
            train,
        );
        if let Some(avail) = super::host_available_memory()
            && need > avail
        {
            return Err(err(CpuError::DoesNotFit {
                need_mib: need >> 20,
                avail_mib: avail >> 20,
            }));
        }
        Ok(())
    }

    /// Per-token log-probs of the scored rows and the summed log-prob of each example.
    fn run(
        &mut self,
        examples: &[&Example],
        adapter: bool,
        train: bool,
    ) -> Result<Vec<SeqScore>, TrainError> {
        let ids: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
        self.model.check_ids(&ids).map_err(err)?;
        let b = batch(examples).map_err(err)?;
        self.check_fits(&b, train)?;
        let longest = b.seqs.len.iter().copied().max().unwrap_or(0);
        self.model.ensure_positions(longest);
        let model = &self.model;
        let lora = adapter.then_some(&self.state.lora);
        let dropout = if train { self.dropout } else { None };
        // Dropout masks follow a row's place in the batch, so shared rows would differ.
        let share = if self.share_prompts && dropout.is_none() {
            Share::plan(&ids)
        } else {
            None
        };
        let share = share.as_ref();
        let budget = self.activation_memory;
        let n_head = model.cfg.n_head;
        let (sums, kept, kept_layers, bytes) = self
            .pool
            .install(|| -> Result<_, CpuError> {
                let mut ad = Adapters::new(&model.cfg, lora)?;
                if let Some(d) = dropout {
                    ad.drop = Some((d, b.drop_rows.clone()));
                }
                let lowest = if train {
                    ad.lowest_layer().unwrap_or(model.cfg.n_layer)
                } else {
                    model.cfg.n_layer
                };
                // The rows this forward computes: every packed row, or the compact layout.
                use std::borrow::Cow;
                let ids: Cow<[u32]> =
                    share.map_or(Cow::Borrowed(&b.ids), |s| s.compact_items(&b.ids).into());
                let pos: Cow<[usize]> =
                    share.map_or(Cow::Borrowed(&b.pos), |s| s.compact_items(&b.pos).into());
                let head_rows: Cow<[usize]> = share.map_or(Cow::Borrowed(&b.head_rows), |s| {
                    b.head_rows.iter().map(|&r| s.of_packed[r]).collect()
                });
                let mut x = model.embed(&ids);
                let mut saved = Vec::new();
                let (mut used, mut n_kept) = (0u64, 0usize);
                for l in 0..model.cfg.n_layer {
                    if l < lowest {
                        x = model.layer_fwd(l, x, &b.seqs, &pos, &ad, false, share).0;
                        continue;
                    }
                    let (out, tape) = model.layer_fwd(l, x, &b.seqs, &pos, &ad, true, share);
                    let tape = tape.expect("kept");
                    // The backward runs on the packed layout.
                    let tape = match share {
                        Some(s) => tape.expand(s, n_head),
                        None => tape,
                    };
                    let tb = tape.bytes();
                    if used + tb <= budget {
                        used += tb;
                        n_kept += 1;
                        saved.push((l, Saved::Tape(Box::new(tape))));
                    } else {
                        // The tape owns the layer input: keep only that.
                        used += tape.x.bytes();
                        saved.push((l, Saved::Input(tape.x)));
                    }
                    x = out;
                }
                let (xs, nf) = model.head_input(&x, &head_rows);
                let (lp, lse) = model.head_fwd(&nf, &b.targets);
                let mut sums = vec![0f64; b.seqs.len.len()];
                for (r, &s) in b.head_seq.iter().enumerate() {
                    sums[s] += lp[r];
                }
                let kept = train.then_some((saved, xs, nf, lse));
                Ok((sums, kept, n_kept, used))
            })
            .map_err(err)?;
        self.shared_rows = share.map_or(0, |s| b.ids.len() - s.rows());
        self.peak_bytes = self.peak_bytes.max(bytes);
        if train {
            self.kept_layers = kept_layers;
            let (saved, xs, nf, lse) = kept.expect("training forward");
            self.kept = Some(Kept {
                b,
                saved,
                xs,
                nf,
                lse,
            });
        }
        Ok(sums
            .into_iter()
            .zip(examples)
            .map(|(logp, e)| SeqScore {
                logp,
                n_tokens: e.n_scored(),
            })
            .collect())
    }
}

impl Engine for NativeEngine {
    fn describe(&self) -> String {
        let share = if self.share_prompts {
            ", prompt sharing"
        } else {
            ""
        };
        format!("cpu (native, {} threads{share})", self.threads)
    }

    fn cache_identity(&self) -> String {
        // Thread count does not change the numbers; the SIMD kernels the gemm crate picks might,
        // and so does any edit of this engine's code: its sources are part of the identity, so
        // cached reference log-probs from an older engine are never reused.
        format!(
            "cpu-native f32 gemm-0.19 {} src-{}",
            std::env::consts::ARCH,
            source_hash()
        )
    }

    fn score(&mut self, examples: &[&Example], adapter: bool) -> Result<Vec<SeqScore>, TrainError> {
        self.run(examples, adapter, false)
    }

    fn set_dropout(&mut self, dropout: Option<Dropout>) -> Result<(), TrainError> {
        self.dropout = dropout.filter(|d| d.active());
        Ok(())
    }

    fn forward_train(&mut self, examples: &[&Example]) -> Result<Vec<SeqScore>, TrainError> {
        self.kept = None;
        self.run(examples, true, true)
    }

    fn backward(&mut self, weights: &[f32]) -> Result<(), TrainError> {
        let Some(k) = self.kept.take() else {
            return Err(TrainError::Engine(
                "backward called without a training forward".into(),
            ));
        };
        if weights.len() != k.b.seqs.len.len() {
            return Err(TrainError::Engine(format!(
                "backward got {} weights for {} sequences",
                weights.len(),
                k.b.seqs.len.len()
            )));
        }
        let model = &self.model;
        let lora = &self.state.lora;
        let grads = &mut self.state.grads;
        let offs = &self.offs;
        let dropout = self.dropout;
        self.pool
            .install(|| -> Result<(), CpuError> {
                let mut ad = Adapters::new(&model.cfg, Some(lora))?;
                if let Some(d) = dropout {
                    ad.drop = Some((d, k.b.drop_rows.clone()));
                }
                let wrow: Vec<f32> = k.b.head_seq.iter().map(|&s| weights[s]).collect();
                let dnf = model.head_back(&k.nf, &k.b.targets, &k.lse, &wrow);
                let mut dx = model.head_norm_back(&k.xs, &dnf, &k.b.head_rows, k.b.ids.len());
                for (l, saved) in k.saved.into_iter().rev() {
                    let tape = match saved {
                        Saved::Tape(t) => *t,
                        Saved::Input(x) => model
                            .layer_fwd(l, x, &k.b.seqs, &k.b.pos, &ad, true, None)
                            .1
                            .expect("kept"),
                    };
                    dx = model.layer_back(l, &tape, dx, &k.b.seqs, &k.b.pos, &ad, grads, offs);
                }
                Ok(())
            })
            .map_err(err)
    }

    fn grad_norm(&mut self) -> Result<f64, TrainError> {
        Ok(self.state.grad_norm())
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<(), TrainError> {
        self.state.step(lr, grad_scale)
    }

    fn zero_grads(&mut self) -> Result<(), TrainError> {
        self.state.zero_grads();
        Ok(())
    }

    fn lora(&mut self) -> Result<LoraWeights, TrainError> {
        Ok(self.state.lora.clone())
    }

    fn save_state(
        &mut self,
    ) -> Result<(BTreeMap<String, Vec<f32>>, serde_json::Value), TrainError> {
        Ok(self.state.save_state())
    }

    fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Vec<f32>>,
        scalars: &serde_json::Value,
    ) -> Result<(), TrainError> {
        self.state.load_state(tensors, scalars)
    }

    fn device_memory(&self) -> Option<u64> {
        Some(self.peak_bytes)
    }
}

/// SHA-256 (first 8 bytes, hex) of the CPU engine's sources, as compiled in.
fn source_hash() -> String {
    use sha2::Digest;
    const SOURCES: &[&str] = &[
        include_str!("engine.rs"),
        include_str!("gemm.rs"),
        include_str!("mat.rs"),
        include_str!("mod.rs"),
        include_str!("model.rs"),
        include_str!("ops.rs"),
        include_str!("share.rs"),
    ];
    let mut h = sha2::Sha256::new();
    for s in SOURCES {
        h.update(s.as_bytes());
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
