//! `bfpo-lite generate`: text from prompts through llama.cpp, optionally with a LoRA adapter.

use anyhow::{Context, bail};
use bfpo_lite::data::{ChatMessage, Prompt};
use bfpo_lite::runtime::{GenerateOptions, LoadOptions, RtModel, Sampling};
use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Layers offloaded by default: all with a GPU feature, none otherwise.
pub const DEFAULT_GPU_LAYERS: u32 =
    if cfg!(any(feature = "metal", feature = "vulkan", feature = "cuda")) {
        999
    } else {
        0
    };

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
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
    /// One prompt (a user message).
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// JSONL file of prompts: one object per line with "prompt" (a string or a list of
    /// {"role","content"} messages) and optionally "system".
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// System message put before every prompt that has none.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: u32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Minimum probability relative to the most likely token (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty over the last 64 generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed (same seed, same settings → same text).
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Context length (default: prompt + max tokens, capped at the model's training context).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// CPU threads per decode (default: 1 for models under 20 M parameters, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers to offload to the GPU (builds with the metal/vulkan/cuda features).
    #[arg(long, default_value_t = DEFAULT_GPU_LAYERS)]
    pub gpu_layers: u32,
    /// One JSON object per prompt on stdout: prompt, text, n_tokens, stop, ms.
    #[arg(long)]
    pub json: bool,
    /// Chat template instead of the model's own: a Jinja file, or a built-in name (chatml,
    /// chatml-smollm2, zephyr, llama3, gemma, gemma3, qwen3).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub thinking: ThinkingArgs,
}

/// `--enable-thinking` / `--no-thinking`: the chat template's `enable_thinking` variable, as
/// transformers' `apply_chat_template(..., enable_thinking=...)` passes it.
#[derive(clap::Args, Debug, Default, Clone, Copy)]
pub struct ThinkingArgs {
    /// Render the chat template with enable_thinking=true (Qwen3: the model may think first).
    /// Neither flag: the variable stays undefined and the template's own default applies
    /// (Qwen3's is thinking on), as in transformers.
    #[arg(long, conflicts_with = "no_thinking")]
    pub enable_thinking: bool,
    /// Render the chat template with enable_thinking=false (Qwen3: an empty <think></think>
    /// block after the generation prompt, so the model answers without thinking).
    #[arg(long)]
    pub no_thinking: bool,
}

impl ThinkingArgs {
    /// `Some(true)`, `Some(false)`, or `None` when neither flag is given.
    pub fn value(&self) -> Option<bool> {
        match (self.enable_thinking, self.no_thinking) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

/// Applies `--chat-template FILE|NAME` (if given) and `--enable-thinking`/`--no-thinking`, and
/// says on stderr which template renders the conversations, and whether it is a fallback.
pub fn choose_chat_template(
    model: &mut RtModel,
    spec: Option<&str>,
    thinking: ThinkingArgs,
) -> anyhow::Result<()> {
    if let Some(spec) = spec {
        let t = bfpo_lite::template::ChatTemplate::resolve(spec)
            .with_context(|| format!("--chat-template {spec}"))?;
        model.set_chat_template(t);
    }
    let reads = model.set_enable_thinking(thinking.value());
    if thinking.value().is_some() && !reads {
        eprintln!(
            "warning: the chat template in use does not read enable_thinking; --enable-thinking/--no-thinking change nothing"
        );
    }
    eprintln!("chat template: {}", model.chat_template_info());
    Ok(())
}

/// Loads a model and, if given, an adapter made active at `scale`.
pub fn load_model(
    model: &Path,
    adapter: Option<&Path>,
    scale: f32,
    gpu_layers: u32,
) -> anyhow::Result<RtModel> {
    if gpu_layers > 0 && !bfpo_lite::runtime::supports_gpu_offload() {
        eprintln!(
            "warning: --gpu-layers {gpu_layers} ignored: this build has no GPU backend for llama.cpp (rebuild with --features metal, vulkan or cuda)"
        );
    }
    let mut m = RtModel::load(
        model,
        &LoadOptions {
            n_gpu_layers: gpu_layers,
        },
    )
    .with_context(|| format!("loading model {}", model.display()))?;
    if let Some(a) = adapter {
        let id = m
            .load_adapter(a)
            .with_context(|| format!("loading adapter {}", a.display()))?;
        m.set_adapter(id, scale)?;
    }
    Ok(m)
}

/// Reads a prompts JSONL file; errors name file, line and field.
fn read_prompts(path: &Path) -> anyhow::Result<Vec<(serde_json::Value, Prompt)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts from {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{at}: not valid JSON"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{at}: expected a JSON object with a \"prompt\" field"))?;
        let field = if obj.contains_key("prompt") {
            "prompt"
        } else {
            "messages"
        };
        let raw = obj.get(field).with_context(|| {
            format!("{at}: field \"prompt\" is missing (a string or a list of messages)")
        })?;
        let mut prompt = super::score::parse_prompt(raw, &at, field)?;
        if let Some(sys) = obj.get("system") {
            let sys = sys
                .as_str()
                .with_context(|| format!("{at}: field \"system\" must be a string"))?;
            prompt = with_system(prompt, sys);
        }
        out.push((raw.clone(), prompt));
    }
    if out.is_empty() {
        bail!("{}: no prompts in the file", path.display());
    }
    Ok(out)
}

/// Puts a system message first unless the prompt already has one.
fn with_system(prompt: Prompt, system: &str) -> Prompt {
    let mut msgs = prompt.messages();
    if msgs.first().is_some_and(|m| m.role == "system") {
        return Prompt::Messages(msgs);
    }
    msgs.insert(0, ChatMessage::new("system", system));
    Prompt::Messages(msgs)
}

/// A closed stdout pipe (`bfpo-lite generate … | head`) ends output quietly, not as an error.
pub fn ignore_broken_pipe(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        r => r,
    }
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    ignore_broken_pipe(run_inner(args))
}

fn run_inner(args: Args) -> anyhow::Result<()> {
    let mut prompts: Vec<(serde_json::Value, Prompt)> = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![(
            serde_json::Value::String(p.clone()),
            Prompt::Text(p.clone()),
        )],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    if let Some(sys) = &args.system {
        for (_, p) in prompts.iter_mut() {
            *p = with_system(p.clone(), sys);
        }
    }
    let mut model = load_model(
        &args.model,
        args.adapter.as_deref(),
        args.scale,
        args.gpu_layers,
    )?;
    choose_chat_template(&mut model, args.chat_template.as_deref(), args.thinking)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: 64,
            seed: args.seed,
        },
        n_ctx: args.ctx,
        threads: args.threads,
    };

    let interactive = !args.json && std::io::stdout().is_terminal();
    let many = prompts.len() > 1;
    let stdout = std::io::stdout();
    let t0 = Instant::now();
    let mut total_tokens = 0usize;
    for (i, (raw, prompt)) in prompts.iter().enumerate() {
        if many && !args.json {
            let mut out = stdout.lock();
            if i > 0 {
                writeln!(out)?;
            }
            writeln!(out, "### prompt {} of {}", i + 1, prompts.len())?;
        }
        let mut stream = |ev: &bfpo_lite::runtime::TokenEvent| {
            if interactive {
                let mut out = stdout.lock();
                let _ = out.write_all(ev.text.as_bytes());
                let _ = out.flush();
            }
            ControlFlow::Continue(())
        };
        let g = model
            .generate(std::slice::from_ref(prompt), &opts, &mut stream)
            .with_context(|| format!("generating for prompt {}", i + 1))?
            .remove(0);
        total_tokens += g.ids.len();
        let mut out = stdout.lock();
        if args.json {
            let obj = serde_json::json!({
                "index": i,
                "prompt": raw,
                "text": g.text,
                "n_tokens": g.ids.len(),
                "n_prompt_tokens": g.n_prompt_tokens,
                "stop": g.stop.as_str(),
                "ms": g.elapsed.as_secs_f64() * 1e3,
            });
            writeln!(out, "{obj}")?;
        } else if interactive {
            writeln!(out)?;
        } else {
            writeln!(out, "{}", g.text)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if !args.json {
        eprintln!(
            "{} prompt{}, {} tokens in {:.2} s ({:.1} tokens/s)",
            prompts.len(),
            if many { "s" } else { "" },
            total_tokens,
            secs,
            total_tokens as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
