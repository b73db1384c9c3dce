//! bfpo-lite: safety-tune small quantized GGUF language models with BFPO LoRA on one consumer
//! GPU (our own WGSL kernels through wgpu) or on the CPU (a native engine), with llama.cpp as
//! tokenizer, generator and oracle. `ARCHITECTURE.md` has the data flow and the module map.
//!
//! The library never prints: it returns values and reports progress through callbacks or
//! `tracing`; the `bfpo-lite` binary decides what a person sees.
//!
//! # Module map
//!
//! Dependencies point down the list; a module never imports one above it (`tests/layering.rs`
//! checks the modules in its table). The binary's `src/cli/` (one file per subcommand, all
//! printing) sits above all of them.
//!
//! ```text
//! run/       a whole job as library calls: TuneJob (prepare → train → finish), one Event enum,
//!            a Cancel token; reusable pieces: open a model with its template, load and encode
//!            pairs, build an engine; the built-in demo
//! cpu/       the native CPU engine (f32, quantized weights dequantized in panels, threads with
//!            fixed output blocks): an `Engine` beside the GPU and reference ones
//! redteam/   `bfpo-lite redteam`: sample answers, judge them with eval's judges, order and label
//!            pairs that `tune` reads, resumable output
//! eval/      `bfpo-lite eval`: judges (refusal phrases, Llama Guard / yes-no GGUF judges), prompt
//!            sets (HarmBench, Do-Not-Answer, the written benign set), generation, figures with
//!            Wilson intervals, reports (json, md, svg)
//! export/    GGUF LoRA adapter, PEFT safetensors (and import), merged model, the TRL project
//! train/     the training loop and the `Engine` trait (trainer), the f64 reference engine and
//!            the GPU engine, config, checkpoints, metrics, data preparation (prepare)
//! gpu/       wgpu device, WGSL pipeline registry, buffers, memory planner, ops/ (one launcher
//!            + CPU reference per kernel family), forward and backward of the layer graph
//! runtime/   llama.cpp (the only code that touches llama-cpp-2): tokenize, chat template,
//!            generate, score, adapters
//! model/     hyperparameters per architecture, tensor names, weight views, LoRA definitions
//!            (model::lora: targets, shapes, naming, weights, the dropout mask; shared by gpu,
//!            cpu, train and export), the init-model fixture factory, the f64 CPU reference
//! template/  chat templates: the model's Jinja rendered as Hugging Face does (minijinja),
//!            built-in templates, named fallbacks
//! data/      dataset formats (one file each, under formats/), examples, batches, reference cache
//! optim      AdamW (the one update rule both the CPU optimizer and the GPU kernel follow),
//!            clipping, schedules
//! loss       BFPO, IPO, DPO: pure functions of per-pair scalars
//! gguf/      GGUF read (mmap, validation), write, types, CPU (de)quantization
//! util/      deterministic RNG, float comparison helpers, size parsing, a private
//!            XDG_RUNTIME_DIR
//! ```

// The library never prints: output belongs to the binary (src/cli/).
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cpu;
pub mod data;
pub mod eval;
pub mod export;
pub mod gguf;
pub mod gpu;
pub mod loss;
pub mod model;
pub mod optim;
pub mod redteam;
pub mod run;
pub mod runtime;
pub mod template;
pub mod train;
pub mod util;

/// The crate version, recorded in exported adapters.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
