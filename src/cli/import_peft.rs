//! `bfpo-lite import-peft DIR --model M.gguf --out adapter.gguf`: a Hugging Face PEFT LoRA
//! (`adapter_model.safetensors` + `adapter_config.json`, e.g. from the `train.py` that
//! `export-run --to trl` writes) becomes a GGUF LoRA adapter for llama.cpp and `score`.

use anyhow::Context;
use bfpo_lite::export::gguf_adapter::{AdapterDType, Provenance, write_adapter};
use bfpo_lite::export::peft_import::{PeftImport, read_peft, read_provenance};
use bfpo_lite::export::write_atomically;
use bfpo_lite::gguf::GgufFile;
use bfpo_lite::model::ModelConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PEFT adapter directory (adapter_model.safetensors + adapter_config.json).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The GGUF model converted from the Hugging Face model the adapter was trained on.
    #[arg(long, value_name = "MODEL.gguf", value_parser = super::hub::model_arg)]
    pub model: PathBuf,
    /// Output GGUF adapter.
    #[arg(long, value_name = "ADAPTER.gguf")]
    pub out: PathBuf,
    /// Element type of the written tensors: f32 (default, exact) or f16.
    #[arg(long, default_value = "f32")]
    pub outtype: String,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Summary<'a> {
    dir: String,
    model: String,
    out: String,
    arch: String,
    outtype: String,
    import: &'a PeftImport,
    provenance: &'a Provenance,
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let dtype = AdapterDType::parse(&args.outtype)
        .with_context(|| format!("--outtype {}: use f32 or f16", args.outtype))?;
    let file = GgufFile::open(&args.model)
        .with_context(|| format!("reading the model {}", args.model.display()))?;
    let cfg = ModelConfig::from_gguf(&file)
        .with_context(|| format!("{} is not a model bfpo-lite supports", args.model.display()))?;
    let (lora, info) = read_peft(&args.dir, &cfg).with_context(|| {
        format!(
            "converting the PEFT adapter in {} for {}",
            args.dir.display(),
            args.model.display()
        )
    })?;
    let mut prov = read_provenance(&args.dir)?.unwrap_or_default();
    if prov.base_model_name.is_none() {
        prov.base_model_name = cfg.name.clone().or(info.base_model_name_or_path.clone());
    }
    write_atomically(&args.out, args.force, false, |tmp| {
        write_adapter(tmp, &lora, &cfg, &prov, dtype)
    })
    .with_context(|| format!("writing {}", args.out.display()))?;
    let s = Summary {
        dir: args.dir.display().to_string(),
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        arch: cfg.arch.name().to_string(),
        outtype: args.outtype.to_ascii_lowercase(),
        import: &info,
        provenance: &prov,
    };
    if args.json {
        return super::print_out(&(serde_json::to_string_pretty(&s)? + "\n"));
    }
    let mut text = format!(
        "wrote {} ({} LoRA tensors, rank {}, alpha {}{}) for {} ({})\n",
        s.out,
        info.n_tensors,
        info.rank,
        info.alpha,
        if info.use_rslora {
            format!(" = rsLoRA {}·√r", info.peft_alpha)
        } else {
            String::new()
        },
        s.model,
        s.arch
    );
    let mods: Vec<String> = info
        .modules
        .iter()
        .map(|(m, n)| format!("{m} × {n}"))
        .collect();
    text += &format!("  modules: {}\n", mods.join(", "));
    if info.permuted_qk {
        text += "  llama q_proj/k_proj lora_B rows converted from Hugging Face to GGUF order\n";
    }
    if let Some(l) = &prov.loss {
        text += &format!("  trained with {l}, {} steps\n", prov.steps.unwrap_or(0));
    }
    text += &format!(
        "try it: bfpo-lite generate --model {} --adapter {} --prompt \"...\"\n",
        s.model, s.out
    );
    super::print_out(&text)
}
