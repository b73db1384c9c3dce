//! The adapter model card: the `README.md` that `export` writes beside an adapter, from what
//! is known for real: the adapter's own provenance (`bfpo.*` keys: loss, base model name and
//! SHA-256, data, steps), the base model file, the training run's `config.toml` and
//! `summary.json` when the adapter sits in (or in a checkpoint of) a run folder, and an
//! evaluation's `report.json` when one is passed or found in the run folder.

use crate::eval::run::EvalReport;
use crate::export::Provenance;
use crate::train::config::TrainConfig;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The first line of every card we write: an existing `README.md` that does not start with it
/// is someone else's, and is not overwritten without `--force`.
pub const CARD_MARK: &str = "<!-- model card written by bfpo-lite export -->";

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
}

/// A training run folder's files.
#[derive(Clone, Debug)]
pub struct RunFiles {
    pub dir: PathBuf,
    pub config: TrainConfig,
    /// `summary.json` (absent while a run is still going or was interrupted early).
    pub summary: Option<serde_json::Value>,
}

/// The run folder of an adapter: the folder holding `config.toml`, being the adapter's own
/// folder (`runs/x/adapter.gguf`) or the one above it (`runs/x/checkpoint/adapter.gguf`).
pub fn find_run_dir(adapter: &Path) -> Option<PathBuf> {
    let dir = adapter.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .find(|d| d.join("config.toml").is_file())
        .map(Path::to_path_buf)
}

/// Reads `config.toml` and, if present, `summary.json` of a run folder.
pub fn read_run(dir: &Path) -> Result<RunFiles, CardError> {
    let cfg_path = dir.join("config.toml");
    let config = TrainConfig::from_toml_file(&cfg_path).map_err(|e| CardError::Parse {
        path: cfg_path.clone(),
        detail: e.to_string(),
    })?;
    let sum_path = dir.join("summary.json");
    let summary = match std::fs::read_to_string(&sum_path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| CardError::Parse {
            path: sum_path.clone(),
            detail: e.to_string(),
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(CardError::Read {
                path: sum_path,
                source,
            });
        }
    };
    Ok(RunFiles {
        dir: dir.to_path_buf(),
        config,
        summary,
    })
}

/// An evaluation report in a run folder: `report.json` or `eval/report.json`.
pub fn find_eval_report(run_dir: &Path) -> Option<PathBuf> {
    ["report.json", "eval/report.json"]
        .iter()
        .map(|p| run_dir.join(p))
        .find(|p| p.is_file())
}

/// Reads an evaluation's `report.json` (written by `bfpo-lite eval`).
pub fn read_eval_report(path: &Path) -> Result<EvalReport, CardError> {
    let text = std::fs::read_to_string(path).map_err(|source| CardError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CardError::Parse {
        path: path.to_path_buf(),
        detail: format!("not a bfpo-lite eval report.json: {e}"),
    })
}

/// Everything a card says.
#[derive(Clone, Debug)]
pub struct CardInput<'a> {
    /// The adapter's file name as written (`adapter.gguf`).
    pub adapter_file: String,
    /// `GGUF LoRA adapter`, `PEFT adapter`, `Ollama model folder`.
    pub what: &'a str,
    pub base_path: &'a Path,
    /// `general.name` of the base.
    pub base_name: Option<String>,
    /// The base's SHA-256 (the one the adapter records, else computed).
    pub base_sha256: Option<String>,
    /// The Hugging Face repository of the base, when known.
    pub hf_base: Option<String>,
    pub arch: &'a str,
    pub rank: usize,
    pub alpha: f32,
    /// LoRA targets present in the adapter (`attn_q`, `ffn_down`, …).
    pub targets: Vec<String>,
    pub n_tensors: usize,
    pub provenance: &'a Provenance,
    pub run: Option<&'a RunFiles>,
    pub eval: Option<(&'a Path, &'a EvalReport)>,
    /// `ollama` export: the Modelfile is beside the card.
    pub modelfile: bool,
}

/// The card's Markdown.
pub fn render_card(c: &CardInput) -> String {
    let mut s = String::new();
    let base = c
        .base_name
        .clone()
        .or_else(|| c.provenance.base_model_name.clone())
        .unwrap_or_else(|| file_name(c.base_path));
    let _ = writeln!(s, "{CARD_MARK}");
    front_matter(&mut s, c);
    let _ = writeln!(s, "# {base}: safety LoRA adapter (bfpo-lite)\n");
    let _ = writeln!(
        s,
        "A {} (`{}`) for **{base}**, trained with {} by bfpo-lite {}.\n",
        c.what,
        c.adapter_file,
        c.provenance.loss.as_deref().unwrap_or("an unrecorded loss"),
        c.provenance.version.as_deref().unwrap_or(crate::VERSION)
    );
    base_section(&mut s, c, &base);
    data_section(&mut s, c);
    recipe_section(&mut s, c);
    results_section(&mut s, c);
    usage_section(&mut s, c);
    s
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn front_matter(s: &mut String, c: &CardInput) {
    let _ = writeln!(s, "---");
    if let Some(id) = &c.hf_base {
        let _ = writeln!(s, "base_model: {id}");
        let _ = writeln!(s, "base_model_relation: adapter");
    }
    let _ = writeln!(s, "tags:\n- lora\n- gguf\n- safety\n- bfpo\n- bfpo-lite");
    if c.modelfile {
        let _ = writeln!(s, "- ollama");
    }
    let _ = writeln!(s, "---\n");
}

fn base_section(s: &mut String, c: &CardInput, base: &str) {
    let _ = writeln!(s, "## Base model\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| name | {base} |");
    if let Some(id) = &c.hf_base {
        let _ = writeln!(s, "| Hugging Face | `{id}` |");
    }
    let _ = writeln!(s, "| file | `{}` |", file_name(c.base_path));
    if let Some(h) = &c.base_sha256 {
        let _ = writeln!(s, "| SHA-256 | `{h}` |");
    }
    let _ = writeln!(s, "| architecture | `{}` |\n", c.arch);
    let _ = writeln!(
        s,
        "The adapter only fits this base model (same architecture and shapes); `bfpo-lite export` \
         and llama.cpp check the shapes when loading it.\n"
    );
}

fn data_section(s: &mut String, c: &CardInput) {
    let _ = writeln!(s, "## Data\n");
    let data: Vec<String> = match c.run {
        Some(r) if !r.config.data.is_empty() => r
            .config
            .data
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        _ => c.provenance.datasets.clone(),
    };
    if data.is_empty() {
        let _ = writeln!(s, "Not recorded in the adapter.\n");
        return;
    }
    for d in &data {
        let _ = writeln!(s, "- `{d}`");
    }
    if let Some(r) = c.run {
        if let Some(b) = &r.config.buffer {
            let _ = writeln!(
                s,
                "- helpfulness buffer `{}` (ratio {})",
                b.display(),
                r.config.buffer_ratio
            );
        }
        if let Some(e) = &r.config.eval_data {
            let _ = writeln!(s, "- held-out pairs `{}`", e.display());
        }
        if let Some(sum) = &r.summary
            && let Some(d) = sum.get("data")
        {
            if let Some(pairs) = d.get("pairs").and_then(|v| v.as_u64()) {
                let held = sum.get("eval_pairs").and_then(|v| v.as_u64()).unwrap_or(0);
                let _ = writeln!(s, "\n{pairs} pairs encoded for training, {held} held out.");
            }
        }
    }
    let _ = writeln!(s);
}

fn recipe_section(s: &mut String, c: &CardInput) {
    let _ = writeln!(s, "## Method and hyper-parameters\n");
    let p = c.provenance;
    let mut rows: Vec<(String, String)> = Vec::new();
    if let Some(l) = &p.loss {
        let params: Vec<String> = p
            .loss_params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push(("loss".into(), format!("{l} {}", params.join(" "))));
    }
    rows.push((
        "LoRA".into(),
        format!(
            "rank {}, alpha {} (scale {}), {} tensors on {}",
            c.rank,
            c.alpha,
            c.alpha / c.rank.max(1) as f32,
            c.n_tensors,
            c.targets.join(", ")
        ),
    ));
    if let Some(steps) = p.steps {
        rows.push(("optimizer steps".into(), steps.to_string()));
    }
    if let Some(r) = c.run {
        let k = &r.config;
        rows.push(("pair order".into(), format!("{:?}", k.pair_order)));
        rows.push((
            "optimizer".into(),
            format!(
                "AdamW, lr {}, {:?} schedule, warm-up {}, weight decay {}, grad clip {}",
                k.learning_rate, k.schedule, k.warmup_ratio, k.weight_decay, k.max_grad_norm
            ),
        ));
        rows.push((
            "batch".into(),
            format!(
                "{} pairs per micro-step x {} accumulation, {} epoch(s), max length {} (prompt {})",
                k.pairs_per_step, k.grad_accum, k.epochs, k.max_length, k.max_prompt_length
            ),
        ));
        rows.push(("seed".into(), k.seed.to_string()));
        if let Some(t) = &k.chat_template {
            rows.push(("chat template".into(), format!("`{t}`")));
        }
        if let Some(t) = k.enable_thinking {
            rows.push(("enable_thinking".into(), t.to_string()));
        }
    } else {
        for (k, v) in &p.train_params {
            rows.push((k.clone(), v.to_string()));
        }
    }
    let _ = writeln!(s, "| | |\n|---|---|");
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {} |", v.trim());
    }
    let _ = writeln!(s);
    if let Some(r) = c.run {
        let _ = writeln!(
            s,
            "The run's whole configuration (`{}`):\n\n```toml\n{}```\n",
            r.dir.join("config.toml").display(),
            r.config.to_toml()
        );
    }
}

fn results_section(s: &mut String, c: &CardInput) {
    let training = c.run.and_then(|r| r.summary.as_ref());
    if training.is_none() && c.eval.is_none() {
        return;
    }
    let _ = writeln!(s, "## Results\n");
    if let Some(sum) = training {
        training_results(s, sum);
    }
    if let Some((path, report)) = c.eval {
        let md = crate::eval::report::markdown(report);
        let table: Vec<&str> = md
            .lines()
            .skip_while(|l| !l.starts_with("| metric |"))
            .take_while(|l| l.starts_with('|'))
            .collect();
        let _ = writeln!(
            s,
            "Evaluation (`{}`, judge `{}`, {} new tokens at most; 95 % intervals):\n",
            path.display(),
            report.judge,
            report.settings.max_tokens
        );
        for l in table {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s);
    }
}

fn training_results(s: &mut String, sum: &serde_json::Value) {
    let f = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    if let (Some(steps), Some(secs)) = (
        sum.get("steps").and_then(|v| v.as_u64()),
        f(sum, "train_seconds"),
    ) {
        let engine = sum.get("engine").and_then(|v| v.as_str()).unwrap_or("?");
        let _ = writeln!(
            s,
            "Training: {steps} steps in {secs:.0} s on the `{engine}` engine.\n"
        );
    }
    if let (Some(b), Some(a)) = (sum.get("heldout_before"), sum.get("heldout_after"))
        && !b.is_null()
        && !a.is_null()
    {
        let _ = writeln!(s, "| held-out pairs | before | after |\n|---|---|---|");
        for (label, key) in [
            ("preference accuracy", "preference_accuracy"),
            ("safety ranking accuracy", "safety_ranking_accuracy"),
        ] {
            if let (Some(x), Some(y)) = (f(b, key), f(a, key)) {
                let _ = writeln!(s, "| {label} | {:.1} % | {:.1} % |", x * 100.0, y * 100.0);
            }
        }
        let _ = writeln!(s);
    }
    if let Some(points) = sum.get("harmless").and_then(|v| v.as_array())
        && !points.is_empty()
    {
        let _ = writeln!(
            s,
            "| harmless rate | step | prompts | judge | rate (95 % CI) |\n|---|---|---|---|---|"
        );
        for p in points {
            let st = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
            let _ = writeln!(
                s,
                "| {} | {} | {} ({}) | {} | {:.1} % ({:.1}-{:.1}) |",
                st("model"),
                p.get("step").and_then(|v| v.as_u64()).unwrap_or(0),
                st("prompts"),
                p.get("n").and_then(|v| v.as_u64()).unwrap_or(0),
                st("judge"),
                f(p, "harmless_rate").unwrap_or(f64::NAN) * 100.0,
                f(p, "ci_low").unwrap_or(f64::NAN) * 100.0,
                f(p, "ci_high").unwrap_or(f64::NAN) * 100.0,
            );
        }
        let _ = writeln!(s);
    }
}

fn usage_section(s: &mut String, c: &CardInput) {
    let base = file_name(c.base_path);
    let a = &c.adapter_file;
    let _ = writeln!(s, "## Use\n");
    let _ = writeln!(
        s,
        "```sh\n# llama.cpp\nllama-server -m {base} --lora {a}\nllama-cli -m {base} --lora {a}\n# bfpo-lite\nbfpo-lite generate --model {base} --adapter {a} --prompt \"...\"\n```\n"
    );
    if c.modelfile {
        let _ = writeln!(
            s,
            "Ollama, in this folder (the `Modelfile` names the base model by its absolute path):\n\n```sh\nollama create my-safe-model -f Modelfile\nollama run my-safe-model\n```\n"
        );
    }
    let _ = writeln!(
        s,
        "LM Studio: load `{base}`, then add `{a}` as a LoRA adapter, or serve it with llama-server \
         as above and connect LM Studio (or any OpenAI-compatible client) to it.\n"
    );
}
