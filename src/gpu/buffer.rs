//! GPU buffers, uploads and readbacks, and a recorder that batches many dispatches into one
//! submission.
//!
//! Binding order for every kernel: read-only inputs, then outputs, then the params uniform
//! (always the last binding). [`Recorder::dispatch`] builds the bind group in that order.

use super::device::{Gpu, GpuError};
use super::profile;
use super::registry::Pipeline;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// A storage buffer on the device. Sizes are in bytes and always a multiple of 4.
#[derive(Debug, Clone)]
pub struct GpuBuf {
    pub buf: wgpu::Buffer,
    pub size: u64,
    pub label: String,
}

impl GpuBuf {
    /// Number of f32 (or u32) elements.
    pub fn len_words(&self) -> usize {
        (self.size / 4) as usize
    }
}

/// One binding of a dispatch: a whole buffer, or a window `[offset, offset + size)` of it
/// (offset aligned to `Gpu::offset_alignment`).
#[derive(Clone, Copy, Debug)]
pub enum Bind<'a> {
    Whole(&'a GpuBuf),
    Range(&'a GpuBuf, u64, u64),
}

impl<'a> From<&'a GpuBuf> for Bind<'a> {
    fn from(b: &'a GpuBuf) -> Self {
        Bind::Whole(b)
    }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Splits `n_groups` workgroups over x and y so no dimension exceeds 65,535; kernels use
/// `linear_id` (kernels/common.wgsl) and must ignore ids ≥ `n_groups`.
pub fn groups(n_groups: u32) -> [u32; 3] {
    const MAX: u32 = 65_535;
    if n_groups <= MAX {
        [n_groups.max(1), 1, 1]
    } else {
        let y = n_groups.div_ceil(MAX);
        [n_groups.div_ceil(y), y, 1]
    }
}

impl Gpu {
    fn check_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
        if bytes > self.max_buffer() {
            return Err(GpuError::BufferTooLarge {
                what: what.to_string(),
                bytes,
                limit: self.max_buffer(),
            });
        }
        Ok(())
    }

    /// A zero-filled storage buffer of at least `bytes` bytes (rounded up to 4, minimum 4).
    pub fn alloc(&self, label: &str, bytes: u64) -> Result<GpuBuf, GpuError> {
        let size = bytes.div_ceil(4).max(1) * 4;
        self.check_size(label, size)?;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(GpuBuf {
            buf,
            size,
            label: label.to_string(),
        })
    }

    /// Uploads raw bytes (zero-padded to a multiple of 4).
    pub fn upload_bytes(&self, label: &str, data: &[u8]) -> Result<GpuBuf, GpuError> {
        let size = (data.len() as u64).div_ceil(4).max(1) * 4;
        self.check_size(label, size)?;
        let buf = if data.len() as u64 == size {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: data,
                    usage: USAGE,
                })
        } else {
            let mut padded = data.to_vec();
            padded.resize(size as usize, 0);
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &padded,
                    usage: USAGE,
                })
        };
        Ok(GpuBuf {
            buf,
            size,
            label: label.to_string(),
        })
    }

    /// Uploads a slice of plain values (f32, u32, …).
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<GpuBuf, GpuError> {
        self.upload_bytes(label, bytemuck::cast_slice(data))
    }

    /// Overwrites part of a buffer (`offset` and length multiples of 4).
    pub fn write<T: bytemuck::Pod>(&self, buf: &GpuBuf, offset: u64, data: &[T]) {
        self.queue
            .write_buffer(&buf.buf, offset, bytemuck::cast_slice(data));
    }

    /// Reads a whole buffer back (waits for all submitted work).
    pub fn read<T: bytemuck::Pod>(&self, buf: &GpuBuf) -> Result<Vec<T>, GpuError> {
        self.read_range(buf, 0, buf.size)
    }

    /// Reads `bytes` bytes starting at `offset` (both multiples of 4).
    pub fn read_range<T: bytemuck::Pod>(
        &self,
        buf: &GpuBuf,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<T>, GpuError> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let timer = profile::enabled().then(std::time::Instant::now);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        enc.copy_buffer_to_buffer(&buf.buf, offset, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.sync(&format!("reading back {}", buf.label))?;
        let mapped = rx.recv().map_err(|e| GpuError::Map {
            what: buf.label.clone(),
            detail: e.to_string(),
        })?;
        mapped.map_err(|e| GpuError::Map {
            what: buf.label.clone(),
            detail: e.to_string(),
        })?;
        let out = {
            let view = staging.get_mapped_range(..).map_err(|e| GpuError::Map {
                what: buf.label.clone(),
                detail: e.to_string(),
            })?;
            bytemuck::pod_collect_to_vec(&view[..])
        };
        staging.unmap();
        if let Some(t) = timer {
            profile::add_readback(t.elapsed().as_secs_f64());
        }
        Ok(out)
    }

    /// A recorder for a batch of dispatches and copies, submitted together.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            gpu: self,
            ops: Vec::new(),
            tags: Vec::new(),
            params: Vec::new(),
        }
    }
}

enum Op {
    Dispatch {
        pipeline: Arc<Pipeline>,
        bind_group: wgpu::BindGroup,
        groups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        src_off: u64,
        dst: wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    },
    Clear {
        buf: wgpu::Buffer,
        offset: u64,
        bytes: u64,
    },
}

/// (phase, family) of a recorded operation while profiling.
type Tag = Option<(&'static str, String)>;

fn encode_op(enc: &mut wgpu::CommandEncoder, op: &Op, ts: Option<(&wgpu::QuerySet, u32)>) {
    match op {
        Op::Dispatch {
            pipeline,
            bind_group,
            groups,
        } => {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: ts.map(|(qs, i)| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: Some(i + 1),
                }),
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        Op::Copy {
            src,
            src_off,
            dst,
            dst_off,
            bytes,
        } => enc.copy_buffer_to_buffer(src, *src_off, dst, *dst_off, *bytes),
        Op::Clear { buf, offset, bytes } => enc.clear_buffer(buf, *offset, Some(*bytes)),
    }
}

/// Bytes of one block of params uniforms (each dispatch's params take one aligned slot).
const PARAMS_BLOCK_BYTES: u64 = 64 << 10;

/// A block of params uniforms being filled: the device buffer the bind groups point at and
/// the bytes written to it when the recorder submits.
struct ParamsBlock {
    buf: wgpu::Buffer,
    bytes: Vec<u8>,
}

/// Records dispatches and copies; `submit` encodes them into one command buffer, consecutive
/// dispatches sharing one compute pass. Each dispatch's small params struct takes a slot of a
/// shared uniform block (one buffer per 64 KiB of params, uploaded once at submission), not a
/// buffer of its own: creating a device buffer per dispatch was most of the host time per
/// dispatch on a real GPU.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    ops: Vec<Op>,
    /// Per op, its (phase, family) while profiling (empty otherwise).
    tags: Vec<Tag>,
    params: Vec<ParamsBlock>,
}

impl Recorder<'_> {
    /// Records one dispatch. `bindings` are the storage buffers in binding order (inputs, then
    /// outputs); `params` becomes a uniform at the next binding index.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        pipeline: &Arc<Pipeline>,
        bindings: &[Bind<'_>],
        params: &P,
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let limit = self.gpu.max_binding();
        let mut entries = Vec::with_capacity(bindings.len() + 1);
        for (i, b) in bindings.iter().enumerate() {
            let (buf, offset, size) = match *b {
                Bind::Whole(g) => (g, 0, g.size),
                Bind::Range(g, off, size) => (g, off, size),
            };
            if size > limit {
                return Err(GpuError::BindingTooLarge {
                    what: format!("binding {i} ({}) of {}", buf.label, pipeline.name),
                    bytes: size,
                    limit,
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &buf.buf,
                    offset,
                    size: wgpu::BufferSize::new(size),
                }),
            });
        }
        let (ubuf, offset, size) = self.params_slot(bytemuck::bytes_of(params));
        entries.push(wgpu::BindGroupEntry {
            binding: bindings.len() as u32,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &ubuf,
                offset,
                size: wgpu::BufferSize::new(size),
            }),
        });
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&pipeline.name),
                layout: &pipeline.layout,
                entries: &entries,
            });
        self.push(
            Op::Dispatch {
                pipeline: pipeline.clone(),
                bind_group,
                groups,
            },
            &pipeline.name,
        );
        Ok(())
    }

    /// Places `bytes` in the current params block (a new block when it is full) and returns
    /// the block's buffer, the slot's offset and the binding size.
    fn params_slot(&mut self, bytes: &[u8]) -> (wgpu::Buffer, u64, u64) {
        let align = (self.gpu.limits.min_uniform_buffer_offset_alignment as u64).max(4);
        // Bound as before (a buffer of exactly the struct, padded to 4 bytes); at least 16.
        let size = (bytes.len() as u64).div_ceil(4).max(4) * 4;
        let slot = size.div_ceil(align) * align;
        let fits =
            |b: &ParamsBlock| (b.bytes.len() as u64).div_ceil(align) * align + slot <= b.buf.size();
        if !self.params.last().is_some_and(fits) {
            let block = PARAMS_BLOCK_BYTES.max(slot);
            self.params.push(ParamsBlock {
                buf: self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: block,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                bytes: Vec::with_capacity(block as usize),
            });
        }
        let b = self
            .params
            .last_mut()
            .expect("a params block was just ensured");
        let offset = (b.bytes.len() as u64).div_ceil(align) * align;
        b.bytes.resize(offset as usize, 0);
        b.bytes.extend_from_slice(bytes);
        b.bytes.resize((offset + size) as usize, 0);
        (b.buf.clone(), offset, size)
    }

    /// Uploads the params blocks (before the commands that read them are submitted).
    fn flush_params(&mut self) {
        for b in self.params.drain(..) {
            if !b.bytes.is_empty() {
                self.gpu.queue.write_buffer(&b.buf, 0, &b.bytes);
            }
        }
    }

    fn push(&mut self, op: Op, family: &str) {
        if profile::enabled() {
            self.tags.resize(self.ops.len(), None);
            self.tags.push(profile::tag(family));
        }
        self.ops.push(op);
    }

    /// Records a buffer-to-buffer copy (offsets and size multiples of 4).
    pub fn copy(&mut self, src: &GpuBuf, src_off: u64, dst: &GpuBuf, dst_off: u64, bytes: u64) {
        if bytes > 0 {
            self.push(
                Op::Copy {
                    src: src.buf.clone(),
                    src_off,
                    dst: dst.buf.clone(),
                    dst_off,
                    bytes,
                },
                "copy",
            );
        }
    }

    /// Records zero-filling `bytes` bytes from `offset`.
    pub fn clear(&mut self, buf: &GpuBuf, offset: u64, bytes: u64) {
        if bytes > 0 {
            self.push(
                Op::Clear {
                    buf: buf.buf.clone(),
                    offset,
                    bytes,
                },
                "clear",
            );
        }
    }

    /// Number of recorded operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Encodes and submits everything recorded (does not wait; while profiling, it does).
    pub fn submit(mut self) {
        self.flush_params();
        if profile::enabled() {
            profile::count_submit();
            if self.ops.is_empty() {
                return;
            }
            self.submit_profiled();
            return;
        }
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bfpo"),
            });
        let mut i = 0;
        while i < self.ops.len() {
            match &self.ops[i] {
                Op::Dispatch { .. } => {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: None,
                    });
                    while let Some(Op::Dispatch {
                        pipeline,
                        bind_group,
                        groups,
                    }) = self.ops.get(i)
                    {
                        pass.set_pipeline(&pipeline.pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                        i += 1;
                    }
                }
                Op::Copy {
                    src,
                    src_off,
                    dst,
                    dst_off,
                    bytes,
                } => {
                    enc.copy_buffer_to_buffer(src, *src_off, dst, *dst_off, *bytes);
                    i += 1;
                }
                Op::Clear { buf, offset, bytes } => {
                    enc.clear_buffer(buf, *offset, Some(*bytes));
                    i += 1;
                }
            }
        }
        self.gpu.queue.submit([enc.finish()]);
    }

    /// Profiled submission: device timestamps around each dispatch when the device has them,
    /// else each operation submitted alone and timed on the host (see `gpu::profile`).
    fn submit_profiled(mut self) {
        let gpu = self.gpu;
        self.tags.resize(self.ops.len(), None);
        let wait = || {
            let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
        };
        // Whatever was submitted before is not charged to these operations.
        wait();
        if !gpu.has_timestamps() {
            for (op, tag) in self.ops.iter().zip(self.tags.drain(..)) {
                let t = std::time::Instant::now();
                let mut enc = gpu
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                encode_op(&mut enc, op, None);
                gpu.queue.submit([enc.finish()]);
                wait();
                if let Some((phase, fam)) = tag {
                    profile::add(
                        phase,
                        fam,
                        t.elapsed().as_secs_f64(),
                        Some(profile::Method::TimedSubmissions),
                    );
                }
            }
            return;
        }
        // Timestamps: at most 2048 dispatches (4096 queries) per query set.
        let period = gpu.queue.get_timestamp_period() as f64 * 1e-9;
        let n = self.ops.len();
        let mut start = 0;
        while start < n {
            let end = (start + 2048).min(n);
            let count = (end - start) as u32 * 2;
            let qs = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
            let bytes = count as u64 * 8;
            let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile staging"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let mut host = vec![0.0f64; end - start];
            for (k, op) in self.ops[start..end].iter().enumerate() {
                match op {
                    Op::Dispatch { .. } => encode_op(&mut enc, op, Some((&qs, 2 * k as u32))),
                    _ => {
                        // Copies and clears have no pass to time: time them as a submission.
                        gpu.queue.submit([std::mem::replace(
                            &mut enc,
                            gpu.device
                                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                                    label: None,
                                }),
                        )
                        .finish()]);
                        wait();
                        let t = std::time::Instant::now();
                        let mut e =
                            gpu.device
                                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                                    label: None,
                                });
                        encode_op(&mut e, op, None);
                        gpu.queue.submit([e.finish()]);
                        wait();
                        host[k] = t.elapsed().as_secs_f64();
                    }
                }
            }
            enc.resolve_query_set(&qs, 0..count, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
            gpu.queue.submit([enc.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., |_| {});
            wait();
            let stamps: Vec<u64> = match staging.get_mapped_range(..) {
                Ok(v) => bytemuck::pod_collect_to_vec(&v[..]),
                Err(_) => vec![0; count as usize],
            };
            staging.unmap();
            for k in 0..end - start {
                let Some((phase, fam)) = self.tags[start + k].take() else {
                    continue;
                };
                let secs = match self.ops[start + k] {
                    Op::Dispatch { .. } => {
                        stamps[2 * k + 1].saturating_sub(stamps[2 * k]) as f64 * period
                    }
                    _ => host[k],
                };
                profile::add(phase, fam, secs, Some(profile::Method::Timestamps));
            }
            start = end;
        }
    }

    /// Submits and waits, turning device errors into `GpuError`.
    pub fn run(self, context: &str) -> Result<(), GpuError> {
        let gpu = self.gpu;
        self.submit();
        gpu.sync(context)
    }
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_split_over_two_dimensions() {
        assert_eq!(groups(0), [1, 1, 1]);
        assert_eq!(groups(65_535), [65_535, 1, 1]);
        let g = groups(200_000);
        assert!(
            g[0] <= 65_535 && g[0] * g[1] >= 200_000 && g[1] == 4,
            "{g:?}"
        );
    }
}
