//! `bfpo-lite init-model`: write a deterministic random-weight GGUF model (test fixtures, the demo
//! model). The library does the work (`bfpo_lite::model::init`); this prints the summary.

use anyhow::Context;
use bfpo_lite::model::Arch;
use bfpo_lite::model::init::{self, InitSpec, WeightType};
use std::fmt::Write as _;
use std::path::PathBuf;

fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::parse(&s.to_ascii_lowercase())
        .ok_or_else(|| format!("unknown architecture {s:?}; choose llama, qwen2, qwen3 or gemma3"))
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output file (written through a temporary file and a rename).
    #[arg(short, long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Architecture: llama, qwen2, qwen3 or gemma3.
    #[arg(long, default_value = "llama", value_parser = parse_arch)]
    pub arch: Arch,
    /// Weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m.
    #[arg(long = "type", default_value = "f32", value_name = "TYPE")]
    pub ty: WeightType,
    /// Embedding width (n_embd).
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Number of transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; must divide --heads).
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Feed-forward width (n_ff).
    #[arg(long, default_value_t = 128)]
    pub ff: usize,
    /// Per-head size (default dim / heads; qwen3 may differ).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Extra unused tokens appended to the built-in vocabulary.
    #[arg(long, default_value_t = 0)]
    pub vocab_extra: usize,
    /// Training context length written to the metadata.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Tie the output layer to the token embedding (no output.weight).
    #[arg(long)]
    pub tied: bool,
    /// Random seed: the same seed and settings give a byte-identical file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// llama only: write llama3-style rope frequency factors (rope_freqs.weight).
    #[arg(long)]
    pub rope_freqs: bool,
    /// RoPE base frequency (gemma3: of the global layers; default 1e6 for gemma3, else 1e4).
    #[arg(long)]
    pub rope_base: Option<f32>,
    /// gemma3 only: sliding window of the local layers, in positions.
    #[arg(long, default_value_t = 4)]
    pub sliding_window: usize,
    /// gemma3 only: every n-th layer is global (attention.sliding_window_pattern).
    #[arg(long, default_value_t = 2)]
    pub swa_pattern: usize,
    /// gemma3 only: RoPE base of the local layers (rope.freq_base_swa).
    #[arg(long, default_value_t = 10000.0)]
    pub rope_base_local: f32,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    pub fn spec(&self) -> InitSpec {
        InitSpec {
            arch: self.arch,
            ty: self.ty,
            dim: self.dim,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            ff: self.ff,
            head_dim: self.head_dim,
            vocab_extra: self.vocab_extra,
            ctx: self.ctx,
            tied: self.tied,
            seed: self.seed,
            rope_freqs: self.rope_freqs,
            rope_base: self.rope_base.unwrap_or(if self.arch == Arch::Gemma3 {
                1e6
            } else {
                10000.0
            }),
            sliding_window: self.sliding_window,
            swa_pattern: self.swa_pattern,
            rope_base_local: self.rope_base_local,
            ..InitSpec::default()
        }
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

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let spec = args.spec();
    let summary = init::write(&spec, &args.out)
        .with_context(|| format!("cannot write model {}", args.out.display()))?;
    let file_len = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["path"] = serde_json::Value::String(args.out.display().to_string());
        v["file_bytes"] = file_len.into();
        return super::print_out(&(serde_json::to_string_pretty(&v)? + "\n"));
    }
    let mut out = String::new();
    let o = &mut out;
    let s = &summary.spec;
    let _ = writeln!(
        o,
        "wrote {} ({})",
        args.out.display(),
        human_bytes(file_len)
    );
    let _ = writeln!(
        o,
        "  {} {}: dim {}, {} layers, {} heads ({} KV, head size {}), ff {}, ctx {}, vocab {}, {}",
        s.arch.name(),
        s.ty,
        s.dim,
        s.layers,
        s.heads,
        s.kv_heads,
        s.resolved_head_dim(),
        s.ff,
        s.ctx,
        summary.n_vocab,
        if s.tied { "tied" } else { "untied" }
    );
    let _ = writeln!(o, "  {} parameters, seed {}", summary.n_params, s.seed);
    let mix: Vec<String> = summary
        .type_mix
        .iter()
        .map(|(ty, (n, bytes))| format!("{ty} ×{n} ({})", human_bytes(*bytes)))
        .collect();
    let _ = writeln!(o, "  tensor types: {}", mix.join(", "));
    if !summary.fallbacks.is_empty() {
        let _ = writeln!(
            o,
            "  {} tensor(s) fell back to another type (rows not a whole number of blocks, as llama-quantize does):",
            summary.fallbacks.len()
        );
        for f in &summary.fallbacks {
            let _ = writeln!(
                o,
                "    {}: {} → {} (rows of {})",
                f.tensor, f.wanted, f.used, f.row_len
            );
        }
    }
    super::print_out(&out)
}
