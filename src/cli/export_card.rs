//! The parts of `export` beyond converting tensors: the Ollama folder (`--format ollama`) and the
//! adapter's model card (`README.md`), filled from the adapter, the base model, the run folder
//! the adapter came from and an evaluation report.

use super::export::{Args, Format};
use anyhow::Context;
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use bfpo_lite::export::ollama::{Modelfile, OllamaFormat, absolute};
use bfpo_lite::export::{ExportError, write_atomically};
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::model::ModelConfig;
use bfpo_lite::model::lora::LoraWeights;
use bfpo_lite::run::card::{
    CARD_MARK, CardInput, find_eval_report, find_run_dir, read_eval_report, read_run, render_card,
};
use bfpo_lite::template::ChatTemplate;
use bfpo_lite::train::checkpoint::ADAPTER_FILE;
use std::path::{Path, PathBuf};

/// The chat template whose format the Ollama TEMPLATE follows, and the run's `enable_thinking`:
/// `--chat-template`, else the run's `chat_template`, else the base model's own.
fn ollama_template_source(
    args: &Args,
    adapter_path: &Path,
    model: &GgufFile,
) -> anyhow::Result<(String, Option<bool>)> {
    let run = find_run_dir(adapter_path).and_then(|d| read_run(&d).ok());
    let thinking = run.as_ref().and_then(|r| r.config.enable_thinking);
    let spec = args
        .chat_template
        .clone()
        .or_else(|| run.as_ref().and_then(|r| r.config.chat_template.clone()));
    if let Some(spec) = spec {
        let t = ChatTemplate::resolve(&spec).with_context(|| format!("--chat-template {spec}"))?;
        return Ok((t.source().to_string(), thinking));
    }
    match model
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
    {
        Some(src) => Ok((src.to_string(), thinking)),
        None => Err(ExportError::NoChatTemplate {
            model: args.model.clone(),
        }
        .into()),
    }
}

/// The text of the model's EOS token, from the GGUF vocabulary.
fn eos_text(model: &GgufFile) -> Option<String> {
    let id = model.get("tokenizer.ggml.eos_token_id")?.as_u64()? as usize;
    let tokens = model.get("tokenizer.ggml.tokens")?.as_array()?;
    tokens.get(id)?.as_str().map(str::to_string)
}

/// `--format ollama` for one export.
pub struct Ollama<'a> {
    pub args: &'a Args,
    pub adapter_path: &'a Path,
    pub model: &'a GgufFile,
    pub cfg: &'a ModelConfig,
}

impl Ollama<'_> {
    /// Writes `--out DIR` with `adapter.gguf` and `Modelfile`; returns the Modelfile's path.
    pub fn write(
        &self,
        lora: &LoraWeights,
        prov: &Provenance,
        dtype: AdapterDType,
    ) -> anyhow::Result<PathBuf> {
        let args = self.args;
        let (source, thinking) = ollama_template_source(args, self.adapter_path, self.model)?;
        let format = OllamaFormat::of_template(&source)?;
        let mf = Modelfile {
            from: absolute(&args.model)?,
            adapter: format!("./{ADAPTER_FILE}"),
            format,
            eos: eos_text(self.model),
            empty_think: thinking == Some(false) && source.contains("enable_thinking"),
        };
        let text = mf.render()?;
        write_atomically(&args.out, args.force, true, |tmp| {
            write_adapter(&tmp.join(ADAPTER_FILE), lora, self.cfg, prov, dtype)?;
            let path = tmp.join("Modelfile");
            std::fs::write(&path, &text).map_err(|source| ExportError::Io { path, source })
        })?;
        Ok(args.out.join("Modelfile"))
    }
}

/// What the card needs from `export`.
pub struct CardArgs<'a> {
    pub args: &'a Args,
    pub adapter_path: &'a Path,
    pub model: &'a GgufFile,
    pub lora: &'a LoraWeights,
    pub prov: &'a Provenance,
    pub arch: &'a str,
}

/// Where the card goes: beside a GGUF adapter file, inside a PEFT or Ollama folder.
fn card_path(args: &Args) -> (PathBuf, String) {
    match args.format {
        Format::Peft => (
            args.out.join("README.md"),
            "adapter_model.safetensors".into(),
        ),
        Format::Ollama => (args.out.join("README.md"), ADAPTER_FILE.into()),
        _ => {
            let dir = match args.out.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = args
                .out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (dir.join("README.md"), name)
        }
    }
}

/// Writes the model card; `None` (with a note on stderr) when a README.md that is not ours is
/// already there and `--force` is not given.
pub fn write_card(c: &CardArgs) -> anyhow::Result<Option<PathBuf>> {
    let args = c.args;
    let (path, adapter_file) = card_path(args);
    if let Ok(old) = std::fs::read_to_string(&path)
        && !old.starts_with(CARD_MARK)
        && !args.force
    {
        eprintln!(
            "note: {} exists and is not a bfpo-lite model card; not replaced (--force replaces it, --no-card skips it)",
            path.display()
        );
        return Ok(None);
    }
    let run = match find_run_dir(c.adapter_path) {
        Some(d) => Some(read_run(&d)?),
        None => None,
    };
    let eval_path = args
        .eval_report
        .clone()
        .or_else(|| run.as_ref().and_then(|r| find_eval_report(&r.dir)));
    let eval = match &eval_path {
        Some(p) => Some(read_eval_report(p)?),
        None => None,
    };
    let base_sha256 = match &c.prov.base_model_sha256 {
        Some(h) => Some(h.clone()),
        None => Some(bfpo_lite::redteam::file_sha256(&args.model)?),
    };
    let mut targets: Vec<String> = c
        .lora
        .tensors
        .iter()
        .map(|t| t.target.gguf_name().to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let input = CardInput {
        adapter_file,
        what: super::export::what(args.format),
        base_path: &args.model,
        base_name: c
            .model
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        base_sha256,
        hf_base: args
            .hf_model
            .clone()
            .or_else(|| super::export::hf_id_from_model(c.model)),
        arch: c.arch,
        rank: c.lora.rank,
        alpha: c.lora.alpha,
        targets,
        n_tensors: c.lora.tensors.len(),
        provenance: c.prov,
        run: run.as_ref(),
        eval: eval_path.as_deref().zip(eval.as_ref()),
        modelfile: args.format == Format::Ollama,
    };
    let text = render_card(&input);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}
