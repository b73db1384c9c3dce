//! Opening a model for a run: the GGUF file (shape, weights as stored) and llama.cpp's view of
//! it (vocabulary and chat template) for encoding text.

use super::{Event, Observer, RunError};
use crate::gguf::GgufFile;
use crate::model::ModelConfig;
use crate::runtime::{LoadOptions, RtModel};
use crate::template::ChatTemplate;
use std::path::{Path, PathBuf};

/// A model opened for training, scoring or evaluation.
pub struct OpenModel {
    pub path: PathBuf,
    /// The memory-mapped GGUF file (weights are uploaded from it as stored).
    pub file: GgufFile,
    /// Hyperparameters read from the metadata.
    pub config: ModelConfig,
    /// llama.cpp's model: tokenizer and chat template (None once released with
    /// [`OpenModel::release_runtime`]).
    pub rt: Option<RtModel>,
}

impl OpenModel {
    /// The runtime model (tokenizer and chat template).
    pub fn runtime(&self) -> Option<&RtModel> {
        self.rt.as_ref()
    }

    /// The runtime model, mutable (to load adapters for generation).
    pub fn runtime_mut(&mut self) -> Option<&mut RtModel> {
        self.rt.as_mut()
    }

    /// Frees llama.cpp's copy once encoding is done (training only needs the GGUF file).
    pub fn release_runtime(&mut self) {
        self.rt = None;
    }

    /// The model's name from its metadata, else its file name.
    pub fn name(&self) -> String {
        self.config.name.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        })
    }

    /// The event describing this model and its chat template.
    pub fn opened_event(&self) -> Event {
        let (template, fallback) = match &self.rt {
            Some(rt) => (
                rt.chat_template_info().to_string(),
                rt.chat_template_fallback(),
            ),
            None => (String::new(), false),
        };
        Event::ModelOpened {
            path: self.path.clone(),
            arch: self.config.arch.name().to_string(),
            n_layer: self.config.n_layer,
            chat_template: template,
            template_fallback: fallback,
        }
    }
}

/// Opens `path`: reads its GGUF header and configuration (errors name what cannot be trained)
/// and loads it in llama.cpp for its vocabulary and chat template (`chat_template`, a Jinja
/// file or built-in name, replaces the model's own; `enable_thinking` is passed to it when set).
/// Emits
/// [`Event::ModelOpened`].
pub fn open_model(
    path: &Path,
    opts: &LoadOptions,
    chat_template: Option<&str>,
    enable_thinking: Option<bool>,
    obs: &mut dyn Observer,
) -> Result<OpenModel, RunError> {
    let file = GgufFile::open(path).map_err(|source| RunError::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    let config = ModelConfig::from_gguf(&file).map_err(|source| RunError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rt = RtModel::load(path, opts).map_err(|source| RunError::Runtime {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(spec) = chat_template {
        let t = ChatTemplate::resolve(spec).map_err(|source| RunError::ChatTemplate {
            spec: spec.to_string(),
            source,
        })?;
        rt.set_chat_template(t);
    }
    rt.set_enable_thinking(enable_thinking);
    let m = OpenModel {
        path: path.to_path_buf(),
        file,
        config,
        rt: Some(rt),
    };
    obs.event(&m.opened_event());
    Ok(m)
}
