//! `bfpo-lite export CHECKPOINT_OR_ADAPTER --model M --format gguf|peft|merged|ollama --out PATH`:
//! converts a GGUF LoRA adapter (or a checkpoint directory holding `adapter.gguf`) to a GGUF
//! adapter, a Hugging Face PEFT directory, a merged GGUF model, or an Ollama folder
//! (`adapter.gguf` + `Modelfile`). Adapters get a model card, `README.md`, beside them
//! (`bfpo_lite::run::card`).

use anyhow::Context;
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, read_adapter, write_adapter};
use bfpo_lite::export::merge::{MergeReport, merge};
use bfpo_lite::export::peft::{PeftOptions, PeftSummary, write_peft};
use bfpo_lite::export::{check_against, check_arch, write_atomically};
use bfpo_lite::gguf::{GgmlType, GgufFile};
use bfpo_lite::model::ModelConfig;
use bfpo_lite::model::lora::LoraWeights;
use bfpo_lite::train::checkpoint::ADAPTER_FILE;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// GGUF LoRA adapter for llama.cpp (`--lora`).
    #[default]
    Gguf,
    /// Hugging Face PEFT directory (adapter_model.safetensors + adapter_config.json).
    Peft,
    /// A full GGUF model with the adapter folded into the weights.
    Merged,
    /// A folder for `ollama create NAME -f Modelfile`: adapter.gguf, Modelfile (FROM the base,
    /// ADAPTER, TEMPLATE, PARAMETER stop) and README.md.
    Ollama,
}

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// A GGUF LoRA adapter, or a checkpoint directory containing `adapter.gguf`.
    #[arg(value_name = "CHECKPOINT_OR_ADAPTER")]
    pub input: PathBuf,
    /// The base GGUF model the adapter was trained on.
    /// A path, or a Hugging Face cache reference org/name[:FILE].
    #[arg(long, value_name = "MODEL.gguf", value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Gguf)]
    pub format: Format,
    /// Output file (gguf, merged) or directory (peft).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Element type: f32 (default) or f16 for gguf/peft; for merged, the type of the merged
    /// weights: f16 (default), f32, bf16, q8_0, q6_k, q5_k, q5_0, q5_1, q4_k, q4_0, q4_1.
    #[arg(long, value_name = "TYPE")]
    pub outtype: Option<String>,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
    /// PEFT `base_model_name_or_path` (default: the Hugging Face repository named in the model's
    /// metadata, if any).
    #[arg(long, value_name = "HF_ID")]
    pub hf_model: Option<String>,
    /// The chat format of the Ollama TEMPLATE: a built-in name or a Jinja file (default: the
    /// run's chat_template, else the base model's own).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
    /// An evaluation's report.json (`bfpo-lite eval --out DIR`) for the model card's results
    /// table (default: report.json or eval/report.json in the run folder, if any).
    #[arg(long, value_name = "report.json")]
    pub eval_report: Option<PathBuf>,
    /// Write no model card (README.md).
    #[arg(long)]
    pub no_card: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Summary {
    format: Format,
    input: String,
    model: String,
    out: String,
    arch: String,
    rank: usize,
    alpha: f32,
    n_lora_tensors: usize,
    outtype: String,
    provenance: Provenance,
    #[serde(skip_serializing_if = "Option::is_none")]
    peft: Option<PeftSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    merge: Option<MergeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modelfile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    card: Option<String>,
}

/// The adapter file inside a checkpoint directory, or the path itself.
fn resolve_input(input: &Path) -> anyhow::Result<PathBuf> {
    if input.is_dir() {
        let p = input.join(ADAPTER_FILE);
        if !p.is_file() {
            anyhow::bail!(
                "{} is a directory without {ADAPTER_FILE}; pass a checkpoint directory written by \
                 `bfpo-lite tune` or a GGUF adapter file",
                input.display()
            );
        }
        return Ok(p);
    }
    if !input.exists() {
        anyhow::bail!("{} does not exist", input.display());
    }
    Ok(input.to_path_buf())
}

/// A Hugging Face repository id from the model's GGUF metadata, when the converter recorded it.
pub(super) fn hf_id_from_model(model: &GgufFile) -> Option<String> {
    if let Some(s) = model
        .get("general.source.huggingface.repository")
        .and_then(|v| v.as_str())
    {
        return Some(s.to_string());
    }
    for key in [
        "general.source.url",
        "general.source.repo_url",
        "general.base_model.0.repo_url",
    ] {
        if let Some(url) = model.get(key).and_then(|v| v.as_str())
            && let Some(rest) = url
                .strip_prefix("https://huggingface.co/")
                .or_else(|| url.strip_prefix("http://huggingface.co/"))
        {
            let id: Vec<&str> = rest.trim_end_matches('/').split('/').take(2).collect();
            if id.len() == 2 && id.iter().all(|s| !s.is_empty()) {
                return Some(id.join("/"));
            }
        }
    }
    None
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let adapter_path = resolve_input(&args.input)?;
    let (lora, prov, arch) = read_adapter(&adapter_path)
        .with_context(|| format!("reading the adapter {}", adapter_path.display()))?;
    let model = GgufFile::open(&args.model)
        .with_context(|| format!("opening the base model {}", args.model.display()))?;
    let cfg = ModelConfig::from_gguf(&model)
        .with_context(|| format!("reading the base model {}", args.model.display()))?;
    check_arch(&arch, &cfg, &args.model)?;
    check_against(&lora, &cfg).with_context(|| {
        format!(
            "the adapter {} does not fit the model {}",
            adapter_path.display(),
            args.model.display()
        )
    })?;

    let adapter_dtype = || -> anyhow::Result<AdapterDType> {
        match &args.outtype {
            None => Ok(AdapterDType::F32),
            Some(s) => AdapterDType::parse(s).ok_or_else(|| {
                anyhow::anyhow!(
                    "--outtype {s:?} is not valid for --format gguf/peft; use f32 or f16"
                )
            }),
        }
    };
    let mut summary = new_summary(&args, &adapter_path, &lora, &prov, &arch);
    let what = what(args.format);
    let ctx = || format!("writing the {what} {}", args.out.display());
    match args.format {
        Format::Gguf => {
            let dtype = adapter_dtype()?;
            summary.outtype = format!("{:?}", dtype).to_lowercase();
            write_atomically(&args.out, args.force, false, |tmp| {
                write_adapter(tmp, &lora, &cfg, &prov, dtype)
            })
            .with_context(ctx)?;
        }
        Format::Peft => {
            let dtype = adapter_dtype()?;
            summary.outtype = format!("{:?}", dtype).to_lowercase();
            let opts = PeftOptions {
                dtype,
                base_model_name_or_path: args.hf_model.clone().or_else(|| hf_id_from_model(&model)),
            };
            let mut out = None;
            write_atomically(&args.out, args.force, true, |tmp| {
                out = Some(write_peft(tmp, &lora, &cfg, &opts)?);
                Ok(())
            })
            .with_context(ctx)?;
            summary.peft = out;
        }
        Format::Merged => {
            summary.merge = Some(write_merged(&args, &model, &arch, &lora, &mut summary)?);
        }
        Format::Ollama => {
            let dtype = adapter_dtype()?;
            summary.outtype = format!("{:?}", dtype).to_lowercase();
            let ollama = super::export_card::Ollama {
                args: &args,
                adapter_path: &adapter_path,
                model: &model,
                cfg: &cfg,
            };
            let modelfile = ollama.write(&lora, &prov, dtype).with_context(ctx)?;
            summary.modelfile = Some(modelfile.display().to_string());
        }
    }
    if args.format != Format::Merged && !args.no_card {
        summary.card = super::export_card::write_card(&super::export_card::CardArgs {
            args: &args,
            adapter_path: &adapter_path,
            model: &model,
            lora: &lora,
            prov: &prov,
            arch: &arch,
        })?
        .map(|p| p.display().to_string());
    }

    if args.json {
        return super::print_out(&(serde_json::to_string_pretty(&summary)? + "\n"));
    }
    super::print_out(&render(&summary))
}

/// The summary before anything is written.
fn new_summary(
    args: &Args,
    adapter_path: &Path,
    lora: &LoraWeights,
    prov: &Provenance,
    arch: &str,
) -> Summary {
    Summary {
        format: args.format,
        input: adapter_path.display().to_string(),
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        arch: arch.to_string(),
        rank: lora.rank,
        alpha: lora.alpha,
        n_lora_tensors: lora.tensors.len(),
        outtype: String::new(),
        provenance: prov.clone(),
        peft: None,
        merge: None,
        modelfile: None,
        card: None,
    }
}

/// `--format merged`: the base model with the adapter folded in, at `--outtype` (default F16).
fn write_merged(
    args: &Args,
    model: &GgufFile,
    arch: &str,
    lora: &LoraWeights,
    summary: &mut Summary,
) -> anyhow::Result<MergeReport> {
    let ty = match &args.outtype {
        None => GgmlType::F16,
        Some(s) => GgmlType::parse(s).ok_or_else(|| {
            anyhow::anyhow!(
                "--outtype {s:?} is not a known type; supported: {}",
                GgmlType::supported_list()
            )
        })?,
    };
    summary.outtype = ty.to_string();
    let spinner = (!args.json).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("merging {} LoRA tensors", lora.tensors.len()));
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    });
    let mut report = None;
    let result = write_atomically(&args.out, args.force, false, |tmp| {
        let (w, r) = merge(model, &args.model, arch, lora, Some(ty))?;
        w.write_file(tmp)?;
        report = Some(r);
        Ok(())
    });
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    result.with_context(|| format!("writing the merged model {}", args.out.display()))?;
    report.context("the merge produced no report")
}

pub(super) fn what(f: Format) -> &'static str {
    match f {
        Format::Gguf => "GGUF adapter",
        Format::Peft => "PEFT adapter",
        Format::Merged => "merged model",
        Format::Ollama => "Ollama model folder",
    }
}

fn render(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "wrote {} ({}, {}) from {}",
        s.out,
        what(s.format),
        s.outtype,
        s.input
    );
    if let Some(m) = &s.modelfile {
        let _ = writeln!(o, "  Modelfile: {m} (ollama create NAME -f {m})");
    }
    if let Some(c) = &s.card {
        let _ = writeln!(o, "  model card: {c}");
    }
    let _ = writeln!(
        o,
        "  {} LoRA tensors, rank {}, alpha {} (scale {}), arch {}",
        s.n_lora_tensors,
        s.rank,
        s.alpha,
        s.alpha / s.rank as f32,
        s.arch
    );
    let p = &s.provenance;
    if let Some(loss) = &p.loss {
        let params: Vec<String> = p
            .loss_params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            o,
            "  trained with {}",
            [loss.clone()]
                .into_iter()
                .chain(params)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(steps) = p.steps {
        let _ = writeln!(o, "  steps: {steps}");
    }
    if let Some(peft) = &s.peft {
        let _ = writeln!(
            o,
            "  PEFT: {} tensors, {} bytes{}",
            peft.n_tensors,
            peft.bytes,
            if peft.unpermuted_qk {
                "; llama q_proj/k_proj lora_B rows converted to Hugging Face order"
            } else {
                ""
            }
        );
    }
    if let Some(m) = &s.merge {
        let _ = writeln!(
            o,
            "  merged {} tensors into {}, copied {} unchanged",
            m.tensors.len(),
            m.out_type,
            m.n_copied
        );
        let _ = writeln!(
            o,
            "  {:<28} {:>10} {:>10} {:>10} {:>9}",
            "tensor", "|dW|", "|Q err|", "dW/err", "dW error"
        );
        for t in &m.tensors {
            let _ = writeln!(
                o,
                "  {:<28} {:>10.3e} {:>10.3e} {:>10.3} {:>8.1}%",
                t.name,
                t.delta_norm,
                t.quant_error_norm,
                t.update_to_error,
                t.update_rel_error * 100.0
            );
        }
        for w in &m.warnings {
            let _ = writeln!(o, "warning: {w}");
        }
    }
    o
}
