//! WGSL kernels embedded with `include_str!`, a tiny preprocessor, and a pipeline cache.
//!
//! A kernel source may contain `#include "name.wgsl"` lines (expanded from [`SNIPPETS`], each at
//! most once) and `${NAME}` placeholders filled from the `defines` given when the pipeline is
//! requested (e.g. the weight type of a matmul). Pipelines are compiled once per
//! (kernel, entry point, defines) and cached for the life of the device.

use super::device::{Gpu, GpuError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A WGSL file under `kernels/`.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
}

/// Declares a [`KernelSource`] for `kernels/<name>.wgsl`.
#[macro_export]
macro_rules! kernel_source {
    ($name:literal) => {
        $crate::gpu::registry::KernelSource {
            name: $name,
            source: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/kernels/",
                $name,
                ".wgsl"
            )),
        }
    };
}

/// Shared WGSL snippets that kernels can `#include`.
pub const SNIPPETS: &[(&str, &str)] = &[
    (
        "common.wgsl",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.wgsl")),
    ),
    (
        "dequant.wgsl",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/dequant.wgsl")),
    ),
    (
        "matmul_common.wgsl",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/kernels/matmul_common.wgsl"
        )),
    ),
    (
        "matmul_back_common.wgsl",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/kernels/matmul_back_common.wgsl"
        )),
    ),
];

include!(concat!(env!("OUT_DIR"), "/kernel_files.rs"));

/// SHA-256 over every kernel file (name and source, length-prefixed, in name order): changes
/// whenever any kernel changes, so results computed by other kernels are not reused.
pub fn kernels_sha256() -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, src) in ALL_KERNEL_FILES {
        for b in [name.as_bytes(), src.as_bytes()] {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
    h.finalize().into()
}

/// Expands `#include` lines and `${NAME}` placeholders. Errors name the kernel and the problem.
pub fn preprocess(kernel: &KernelSource, defines: &[(&str, String)]) -> Result<String, String> {
    let mut out = String::new();
    let mut included: Vec<&str> = Vec::new();
    expand(kernel.name, kernel.source, &mut out, &mut included, 0)?;
    for (k, v) in defines {
        let pat = format!("${{{k}}}");
        if !out.contains(&pat) {
            return Err(format!("kernel {}: define {k} is not used", kernel.name));
        }
        out = out.replace(&pat, v);
    }
    if let Some(pos) = out.find("${") {
        let end = out[pos..]
            .find('}')
            .map(|e| pos + e + 1)
            .unwrap_or(out.len());
        return Err(format!(
            "kernel {}: placeholder {} has no define",
            kernel.name,
            &out[pos..end]
        ));
    }
    Ok(out)
}

fn expand<'a>(
    name: &str,
    src: &'a str,
    out: &mut String,
    included: &mut Vec<&'a str>,
    depth: usize,
) -> Result<(), String> {
    if depth > 8 {
        return Err(format!("kernel {name}: #include nested too deeply"));
    }
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include") {
            let inc = rest.trim().trim_matches('"');
            let (sname, ssrc) = SNIPPETS
                .iter()
                .find(|(n, _)| *n == inc)
                .ok_or_else(|| format!("kernel {name}: unknown #include {inc:?}"))?;
            if !included.contains(sname) {
                included.push(sname);
                expand(sname, ssrc, out, included, depth + 1)?;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

/// A compiled compute pipeline and its bind group layout (group 0).
pub struct Pipeline {
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

#[derive(Default)]
pub(crate) struct Registry {
    cache: Mutex<HashMap<String, Arc<Pipeline>>>,
    /// Scratch buffers by name ([`Gpu::scratch`]).
    scratch: Mutex<HashMap<&'static str, super::GpuBuf>>,
}

impl Gpu {
    /// A device buffer of at least `bytes` bytes kept under `name` for reuse by later calls (for
    /// intermediates that live only between two dispatches of one op, such as the split-K
    /// matmul's partial sums); it grows on demand and is never shrunk. Its contents are
    /// unspecified: the op must write before it reads. Reusing it across recorders is safe
    /// because wgpu orders dispatches that touch the same buffer.
    pub fn scratch(&self, name: &'static str, bytes: u64) -> Result<super::GpuBuf, GpuError> {
        let mut map = self.registry.scratch.lock().expect("scratch lock");
        if let Some(b) = map.get(name)
            && b.size >= bytes
        {
            return Ok(b.clone());
        }
        let b = self.alloc(name, bytes)?;
        map.insert(name, b.clone());
        Ok(b)
    }
}

impl Gpu {
    /// The pipeline for `entry` of `kernel` with `defines` filled in, compiled on first use.
    pub fn pipeline(
        &self,
        kernel: &KernelSource,
        entry: &str,
        defines: &[(&str, String)],
    ) -> Result<Arc<Pipeline>, GpuError> {
        let key = format!(
            "{}:{entry}:{}",
            kernel.name,
            defines
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if let Some(p) = self.registry.cache.lock().expect("registry lock").get(&key) {
            return Ok(p.clone());
        }
        // Kernel development: `BFPO_KERNEL_DIR=kernels` reads the sources from disk at run time
        // (no rebuild per WGSL edit). Snippets still come from the binary.
        let from_disk = std::env::var_os("BFPO_KERNEL_DIR").and_then(|dir| {
            std::fs::read_to_string(
                std::path::Path::new(&dir).join(format!("{}.wgsl", kernel.name)),
            )
            .ok()
        });
        let disk_kernel;
        let kernel = match from_disk {
            Some(src) => {
                // Leaked once per compiled pipeline (cached), only in this development mode.
                disk_kernel = KernelSource {
                    name: kernel.name,
                    source: Box::leak(src.into_boxed_str()),
                };
                &disk_kernel
            }
            None => kernel,
        };
        let src = preprocess(kernel, defines).map_err(|detail| GpuError::Validation {
            context: format!("preparing kernel {}", kernel.name),
            detail,
        })?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel.name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                context: format!("compiling kernel {} entry {entry}", kernel.name),
                detail: e.to_string(),
            });
        }
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipeline {
            name: key.clone(),
            pipeline,
            layout,
        });
        self.registry
            .cache
            .lock()
            .expect("registry lock")
            .insert(key, p.clone());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_includes_once_and_fills_defines() {
        let k = KernelSource {
            name: "t",
            source: "#include \"common.wgsl\"\n#include \"common.wgsl\"\nconst A: u32 = ${A}u;\n",
        };
        let s = preprocess(&k, &[("A", "7".into())]).unwrap();
        assert_eq!(s.matches("fn linear_id").count(), 1, "{s}");
        assert!(s.contains("const A: u32 = 7u;"));
        assert!(preprocess(&k, &[]).unwrap_err().contains("${A}"));
        assert!(
            preprocess(&k, &[("A", "1".into()), ("B", "2".into())])
                .unwrap_err()
                .contains("B is not used")
        );
        let bad = KernelSource {
            name: "b",
            source: "#include \"nope.wgsl\"\n",
        };
        assert!(preprocess(&bad, &[]).unwrap_err().contains("nope.wgsl"));
    }
}
