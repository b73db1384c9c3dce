//! `bfpo-lite score`: summed response log-probs of the chosen and rejected response of every
//! preference pair, one JSON line per pair.

use super::generate::{
    DEFAULT_GPU_LAYERS, ThinkingArgs, choose_chat_template, ignore_broken_pipe, load_model,
};
use anyhow::{Context, bail};
use bfpo_lite::data::{ChatMessage, Example, Prompt};
use bfpo_lite::runtime::ScoreOptions;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which engine computes the log-probs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// llama.cpp (CPU, or GPU with the metal/vulkan/cuda features).
    #[default]
    Llama,
    /// bfpo-lite's own WGSL forward pass (the training engine on GPUs).
    Wgpu,
    /// bfpo-lite's native CPU engine (the training engine on GPU-less hosts; `--threads`).
    Cpu,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model. A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(long, short = 'm', value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// GGUF LoRA adapter to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Adapter scale (llama.cpp applies scale · alpha / rank).
    #[arg(long, default_value_t = 1.0, requires = "adapter")]
    pub scale: f32,
    /// JSONL of pairs: one object per line with "prompt" (a string or a list of
    /// {"role","content"} messages), "chosen" and "rejected" (strings).
    #[arg(long, short = 'd', value_parser = super::hub::data_arg)]
    pub data: PathBuf,
    /// Scoring engine.
    #[arg(long, value_enum, default_value_t = Engine::Llama)]
    pub engine: Engine,
    /// Chat template instead of the model's own: a Jinja file, or a built-in name (chatml,
    /// chatml-smollm2, zephyr, llama3, gemma, gemma3, qwen3).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub thinking: ThinkingArgs,
    /// GPU adapter index or name for `--engine wgpu` (see `bfpo-lite devices`).
    #[arg(long)]
    pub device: Option<String>,
    /// Also write the token ids (chosen_ids, rejected_ids) and response_start.
    #[arg(long)]
    pub emit_tokens: bool,
    /// Write the JSON lines here instead of stdout.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Exact numerics: F32 KV cache and flash attention off (slower on GPUs).
    #[arg(long)]
    pub exact: bool,
    /// Tokens per llama.cpp decode (several sequences share one).
    #[arg(long, default_value_t = 512)]
    pub batch_tokens: usize,
    /// Sequences per decode (at most 256).
    #[arg(long, default_value_t = 32)]
    pub max_seqs: usize,
    /// Longest sequence accepted (default: the model's training context).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// CPU threads per decode (default: 1 for models under 20 M parameters, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers to offload to the GPU (builds with the metal/vulkan/cuda features).
    #[arg(long, default_value_t = DEFAULT_GPU_LAYERS)]
    pub gpu_layers: u32,
}

/// A prompt from JSON: a string, or a list of {"role","content"} objects.
pub fn parse_prompt(v: &serde_json::Value, at: &str, field: &str) -> anyhow::Result<Prompt> {
    match v {
        serde_json::Value::String(s) => Ok(Prompt::Text(s.clone())),
        serde_json::Value::Array(items) => {
            let mut msgs = Vec::with_capacity(items.len());
            for (k, m) in items.iter().enumerate() {
                let get = |key: &str| {
                    m.get(key).and_then(|x| x.as_str()).with_context(|| {
                        format!("{at}: field \"{field}\"[{k}].{key} is missing or not a string")
                    })
                };
                msgs.push(ChatMessage::new(get("role")?, get("content")?));
            }
            if msgs.is_empty() {
                bail!("{at}: field \"{field}\" is an empty list of messages");
            }
            Ok(Prompt::Messages(msgs))
        }
        other => bail!(
            "{at}: field \"{field}\" must be a string or a list of messages, found {}",
            json_kind(other)
        ),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One row of the pairs file.
struct Row {
    at: String,
    prompt: Prompt,
    chosen: String,
    rejected: String,
}

/// Reads a pairs JSONL file; errors name file, line and field.
fn read_pairs(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading pairs from {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{at}: not valid JSON"))?;
        if !v.is_object() {
            bail!(
                "{at}: expected a JSON object with \"prompt\", \"chosen\", \"rejected\", found {}",
                json_kind(&v)
            );
        }
        let field = |name: &str| {
            v.get(name)
                .with_context(|| format!("{at}: field \"{name}\" is missing"))
        };
        let text_field = |name: &str| -> anyhow::Result<String> {
            let x = field(name)?;
            x.as_str().map(str::to_string).with_context(|| {
                format!(
                    "{at}: field \"{name}\" must be a string, found {}",
                    json_kind(x)
                )
            })
        };
        rows.push(Row {
            prompt: parse_prompt(field("prompt")?, &at, "prompt")?,
            chosen: text_field("chosen")?,
            rejected: text_field("rejected")?,
            at,
        });
    }
    if rows.is_empty() {
        bail!("{}: no pairs in the file", path.display());
    }
    Ok(rows)
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    ignore_broken_pipe(run_inner(args))
}

fn run_inner(args: Args) -> anyhow::Result<()> {
    let rows = read_pairs(&args.data)?;
    let mut model = load_model(
        &args.model,
        args.adapter.as_deref(),
        args.scale,
        args.gpu_layers,
    )?;
    choose_chat_template(&mut model, args.chat_template.as_deref(), args.thinking)?;
    // Interleaved: chosen_0, rejected_0, chosen_1, …
    let mut examples: Vec<Example> = Vec::with_capacity(rows.len() * 2);
    for r in &rows {
        for (which, resp) in [("chosen", &r.chosen), ("rejected", &r.rejected)] {
            let e = model
                .encode_named(&r.prompt, resp, &format!("{} ({which})", r.at))
                .context("tokenizing with the model's chat template")?;
            examples.push(e.example);
        }
    }
    let opts = ScoreOptions {
        exact: args.exact,
        batch_tokens: args.batch_tokens,
        max_seqs: args.max_seqs,
        n_ctx: args.ctx,
        threads: args.threads,
    };
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(rows.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "scoring {bar:30} {pos}/{len} pairs  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let t0 = Instant::now();
    let sums = match args.engine {
        Engine::Wgpu => score_wgpu(&args, &rows, &examples, &bar)?,
        Engine::Cpu => score_cpu(&args, &rows, &examples, &bar)?,
        Engine::Llama => model
            .score_sums_with_progress(&examples, &opts, &mut |done, _| {
                bar.set_position((done / 2) as u64)
            })
            .map_err(|e| {
                // Name the row rather than the example index.
                let msg = e.to_string();
                match &e {
                    bfpo_lite::runtime::RuntimeError::TooLong { index, .. }
                    | bfpo_lite::runtime::RuntimeError::BadExample { index, .. }
                    | bfpo_lite::runtime::RuntimeError::NonFinite { index, .. } => {
                        let r = &rows[index / 2];
                        let which = if index % 2 == 0 { "chosen" } else { "rejected" };
                        anyhow::anyhow!("{} ({which}): {msg}", r.at)
                    }
                    _ => anyhow::Error::new(e),
                }
            })
            .context("scoring with llama.cpp")?,
    };
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();

    write_results(&args, &examples, &sums, secs)
}

/// One JSON line per pair (stdout or `--out`), then a one-line summary on stderr.
fn write_results(args: &Args, examples: &[Example], sums: &[f64], secs: f64) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let (mut wins, mut margin) = (0usize, 0f64);
    let n = examples.len() / 2;
    for i in 0..n {
        let (c, r) = (&examples[2 * i], &examples[2 * i + 1]);
        let (cl, rl) = (sums[2 * i], sums[2 * i + 1]);
        wins += usize::from(cl > rl);
        margin += cl - rl;
        let mut obj = serde_json::json!({
            "index": i,
            "chosen_logp": cl,
            "rejected_logp": rl,
            "chosen_tokens": c.n_scored(),
            "rejected_tokens": r.n_scored(),
        });
        if args.emit_tokens {
            obj["chosen_ids"] = serde_json::json!(c.ids);
            obj["rejected_ids"] = serde_json::json!(r.ids);
            obj["response_start"] = serde_json::json!(c.response_start);
            if r.response_start != c.response_start {
                obj["rejected_response_start"] = serde_json::json!(r.response_start);
            }
        }
        writeln!(out, "{obj}")?;
    }
    out.flush()?;
    let n_tok: usize = examples.iter().map(|e| e.ids.len()).sum();
    eprintln!(
        "scored {n} pairs ({n_tok} tokens) in {secs:.2} s: chosen > rejected in {wins}/{n} ({:.1} %), mean margin {:.3} nats{}",
        100.0 * wins as f64 / n as f64,
        margin / n as f64,
        args.out
            .as_ref()
            .map(|p| format!("; wrote {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// The adapter of `--adapter` checked against the model, its alpha times `--scale`.
fn read_scaled_adapter(
    args: &Args,
    cfg: &bfpo_lite::model::ModelConfig,
) -> anyhow::Result<Option<bfpo_lite::model::lora::LoraWeights>> {
    let Some(path) = &args.adapter else {
        return Ok(None);
    };
    let (mut w, _, arch) = bfpo_lite::export::gguf_adapter::read_adapter(path)
        .with_context(|| format!("reading the adapter {}", path.display()))?;
    bfpo_lite::export::check_arch(&arch, cfg, &args.model)?;
    bfpo_lite::export::check_against(&w, cfg).with_context(|| {
        format!(
            "the adapter {} does not fit {}",
            path.display(),
            args.model.display()
        )
    })?;
    // llama.cpp's user scale multiplies alpha/r.
    w.alpha *= args.scale;
    Ok(Some(w))
}

/// The GGUF file and configuration for our own engines, after checking that no example is
/// longer than `--ctx` (default: the model's training context).
fn open_for_our_engine(
    args: &Args,
    rows: &[Row],
    examples: &[Example],
) -> anyhow::Result<(bfpo_lite::gguf::GgufFile, bfpo_lite::model::ModelConfig)> {
    let file = bfpo_lite::gguf::GgufFile::open(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let cfg = bfpo_lite::model::ModelConfig::from_gguf(&file)
        .with_context(|| format!("reading the configuration of {}", args.model.display()))?;
    let max_len = args.ctx.unwrap_or(cfg.n_ctx_train);
    if let Some(i) = examples.iter().position(|e| e.len() > max_len) {
        let which = if i % 2 == 0 { "chosen" } else { "rejected" };
        bail!(
            "{} ({which}): {} tokens, longer than the limit of {max_len} (the model's training context unless --ctx is given)",
            rows[i / 2].at,
            examples[i].len()
        );
    }
    Ok((file, cfg))
}

/// Scores with the native CPU engine, `--batch-tokens` tokens at a time.
fn score_cpu(
    args: &Args,
    rows: &[Row],
    examples: &[Example],
    bar: &ProgressBar,
) -> anyhow::Result<Vec<f64>> {
    use bfpo_lite::train::trainer::Engine as _;
    let (file, cfg) = open_for_our_engine(args, rows, examples)?;
    let lora = read_scaled_adapter(args, &cfg)?;
    let adapter = lora.is_some();
    let lora = lora.unwrap_or(bfpo_lite::model::lora::LoraWeights {
        rank: 1,
        alpha: 1.0,
        tensors: Vec::new(),
    });
    let threads = args.threads.unwrap_or_else(bfpo_lite::cpu::default_threads);
    let adam = bfpo_lite::optim::AdamWConfig::default(); // unused: scoring only
    let mut engine = bfpo_lite::cpu::NativeEngine::new(&file, &cfg, lora, adam, threads)
        .context("loading the model into the cpu engine")?;
    let mut out = Vec::with_capacity(examples.len());
    let mut i = 0;
    while i < examples.len() {
        // Whole pairs, about --batch-tokens tokens per batch.
        let mut j = i;
        let mut tokens = 0;
        while j < examples.len()
            && (j == i || tokens + examples[j].len() <= args.batch_tokens.max(1))
        {
            tokens += examples[j].len();
            j += 1;
        }
        if j % 2 == 1 && j < examples.len() {
            j += 1;
        }
        let batch: Vec<&Example> = examples[i..j].iter().collect();
        let s = engine
            .score(&batch, adapter)
            .context("scoring with the cpu engine")?;
        out.extend(s.iter().map(|x| x.logp));
        i = j;
        bar.set_position((i / 2) as u64);
    }
    Ok(out)
}

/// Scores with bfpo-lite's own WGSL forward pass (tokenized by llama.cpp above).
fn score_wgpu(
    args: &Args,
    rows: &[Row],
    examples: &[Example],
    bar: &ProgressBar,
) -> anyhow::Result<Vec<f64>> {
    use bfpo_lite::gpu::forward::{GpuModel, ScoreBatching};
    let (file, cfg) = open_for_our_engine(args, rows, examples)?;
    let gpu = bfpo_lite::run::engine::open_gpu(args.device.as_deref())
        .context("opening a GPU for --engine wgpu")?;
    let model = GpuModel::load(&gpu, &file, &cfg).context("uploading the model to the GPU")?;
    let lora = match read_scaled_adapter(args, &cfg)? {
        Some(w) => {
            let g = bfpo_lite::gpu::ops::lora::GpuLora::upload(&gpu, &w)?;
            model.check_lora(&g)?;
            Some(g)
        }
        None => None,
    };
    let batching = ScoreBatching {
        batch_tokens: args.batch_tokens,
        max_seqs: args.max_seqs,
    };
    let out = model
        .score(&gpu, examples, lora.as_ref(), batching, &mut |done, _| {
            bar.set_position((done / 2) as u64)
        })
        .with_context(|| format!("scoring on {} with the wgpu engine", gpu.info.name))?;
    Ok(out.seq_logprobs)
}
