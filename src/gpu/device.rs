//! Adapter selection and the shared device.
//!
//! One [`Gpu`] per process is the norm ([`Gpu::shared`]); it requests the adapter's own limits
//! (a device gets exactly the limits it asks for: `docs/wgpu.md` §2) so large models can use large
//! buffers, and every launcher keeps each storage binding under [`Gpu::max_binding`].

use super::registry::Registry;
use std::sync::{Arc, Mutex, OnceLock};

/// Errors from the GPU layer. Messages say what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found (tried Vulkan, Metal, DX12). On Linux without a GPU install the software Vulkan driver lavapipe: `sudo apt-get install mesa-vulkan-drivers`; on macOS Metal is built in; on Windows update the GPU driver"
    )]
    NoAdapter,
    #[error("no GPU adapter matches {selector:?}; available adapters:\n{available}")]
    NoMatchingAdapter { selector: String, available: String },
    #[error("requesting a device from adapter {adapter:?} failed: {detail}")]
    RequestDevice { adapter: String, detail: String },
    #[error(
        "GPU out of memory while {context} ({detail}); reduce --max-length, --pairs-per-step, --rank or the number of LoRA targets"
    )]
    OutOfMemory { context: String, detail: String },
    #[error(
        "the GPU device was lost ({0}); the driver may have reset it after a long-running dispatch"
    )]
    DeviceLost(String),
    #[error("GPU error while {context}: {detail}")]
    Validation { context: String, detail: String },
    #[error(
        "{what} needs a {bytes}-byte storage binding, over this device's limit of {limit} bytes (max_storage_buffer_binding_size)"
    )]
    BindingTooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "{what} needs a {bytes}-byte buffer, over this device's limit of {limit} bytes (max_buffer_size)"
    )]
    BufferTooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error("waiting for the GPU failed: {0}")]
    Poll(String),
    #[error("reading back GPU buffer {what:?} failed: {detail}")]
    Map { what: String, detail: String },
}

/// A line of `bfpo-lite devices`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub features: Vec<String>,
}

/// How to pick an adapter.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// An adapter index from `bfpo-lite devices`, or a case-insensitive substring of its name.
    /// `None` reads `BFPO_DEVICE`, else prefers a discrete GPU, then integrated, then any.
    pub selector: Option<String>,
}

/// The device, its queue and what it can do, plus the pipeline cache.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub(crate) registry: Registry,
    errors: Arc<Mutex<Vec<wgpu::Error>>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} via {:?})", self.info.name, self.info.backend)
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    }
    wgpu::Instance::new(desc)
}

fn all_adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    let wanted = [
        (wgpu::Features::SHADER_F16, "shader-f16"),
        (wgpu::Features::SUBGROUP, "subgroup"),
        (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
        (
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            "cooperative-matrix",
        ),
    ];
    AdapterSummary {
        index,
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        backend: format!("{:?}", info.backend),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_buffer_size: l.max_buffer_size,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        features: wanted
            .iter()
            .filter(|(bit, _)| f.contains(*bit))
            .map(|(_, n)| n.to_string())
            .collect(),
    }
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    /// Lists every adapter wgpu finds, in the order `--device INDEX` uses.
    pub fn adapters() -> Vec<AdapterSummary> {
        all_adapters()
            .iter()
            .enumerate()
            .map(|(i, a)| summary(i, a))
            .collect()
    }

    /// Opens a device on the chosen adapter.
    pub fn new(opts: &DeviceOptions) -> Result<Arc<Gpu>, GpuError> {
        let adapters = all_adapters();
        if adapters.is_empty() {
            return Err(GpuError::NoAdapter);
        }
        let selector = opts
            .selector
            .clone()
            .or_else(|| std::env::var("BFPO_DEVICE").ok())
            .filter(|s| !s.trim().is_empty());
        let adapter = match &selector {
            Some(sel) => {
                let by_index = sel
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| adapters.get(i));
                let by_name = || {
                    let needle = sel.to_lowercase();
                    adapters
                        .iter()
                        .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                };
                by_index
                    .or_else(by_name)
                    .ok_or_else(|| GpuError::NoMatchingAdapter {
                        selector: sel.clone(),
                        available: adapters
                            .iter()
                            .enumerate()
                            .map(|(i, a)| {
                                let info = a.get_info();
                                format!(
                                    "  {i}: {} ({:?}, {:?})",
                                    info.name, info.device_type, info.backend
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n"),
                    })?
            }
            None => adapters
                .iter()
                .min_by_key(|a| rank(a.get_info().device_type))
                .expect("non-empty"),
        };
        Self::open(adapter)
    }

    fn open(adapter: &wgpu::Adapter) -> Result<Arc<Gpu>, GpuError> {
        let info = adapter.get_info();
        let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP;
        let features = wanted & adapter.features();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bfpo-lite"),
            required_features: features,
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: info.name.clone(),
            detail: e.to_string(),
        })?;
        let errors: Arc<Mutex<Vec<wgpu::Error>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e);
            }
        }));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost_sink.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            registry: Registry::default(),
            errors,
            lost,
        }))
    }

    /// The process-wide device (created on first use with default options). Tests share it.
    pub fn shared() -> Result<Arc<Gpu>, GpuError> {
        static SHARED: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Gpu::new(&DeviceOptions::default()).map_err(|e| e.to_string()))
        {
            Ok(g) => Ok(g.clone()),
            Err(e) if e.starts_with("no GPU adapter found") => Err(GpuError::NoAdapter),
            Err(e) => Err(GpuError::RequestDevice {
                adapter: "default".into(),
                detail: e.clone(),
            }),
        }
    }

    /// Largest storage binding this device allows (128 MiB on lavapipe and WebGPU defaults).
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }

    /// Largest buffer this device allows.
    pub fn max_buffer(&self) -> u64 {
        self.limits.max_buffer_size
    }

    /// Alignment for binding offsets into a storage buffer.
    pub fn offset_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment as u64
    }

    /// Whether this is a CPU adapter (lavapipe, SwiftShader): several kernels have a variant
    /// for those, where every invocation is one SIMD lane and barriers switch SIMD groups.
    pub fn is_cpu_adapter(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// A kernel variant chosen per adapter: the one `named` under the value of the environment
    /// variable `var` if it names one (benches compare variants on one adapter; other values are
    /// ignored), else `cpu` on CPU adapters and `gpu` elsewhere.
    pub fn pick<T: Copy>(&self, var: &str, named: &[(&str, T)], cpu: T, gpu: T) -> T {
        if let Ok(v) = std::env::var(var)
            && let Some(&(_, t)) = named.iter().find(|(n, _)| *n == v)
        {
            return t;
        }
        if self.is_cpu_adapter() { cpu } else { gpu }
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Waits for all submitted work and turns any error the device reported since the last check
    /// (validation, out of memory, device lost) into a [`GpuError`].
    pub fn sync(&self, context: &str) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Poll(e.to_string()))?;
        self.check(context)
    }

    /// Reports errors captured since the last check, without waiting.
    pub fn check(&self, context: &str) -> Result<(), GpuError> {
        if let Some(l) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(GpuError::DeviceLost(l));
        }
        let first = self.errors.lock().ok().and_then(|mut v| v.drain(..).next());
        match first {
            None => Ok(()),
            Some(wgpu::Error::OutOfMemory { source }) => Err(GpuError::OutOfMemory {
                context: context.to_string(),
                detail: source.to_string(),
            }),
            Some(e) => Err(GpuError::Validation {
                context: context.to_string(),
                detail: e.to_string(),
            }),
        }
    }
}
