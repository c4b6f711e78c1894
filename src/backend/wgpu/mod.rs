//! The wgpu backend: every op of [`Backend`] as a WGSL compute kernel (Vulkan, Metal, DX12), so
//! the model graph of `model.rs` runs unchanged on any GPU.
//!
//! Host side, per step: `begin_step` writes the 16-byte `Step` uniform (n_tokens, start_pos) and
//! the token ids through reused upload buffers (no allocation once warm) and opens one command encoder
//! with one compute pass; every op records a dispatch with a pipeline and a bind group that are
//! created on first use and cached (pipelines by kernel and override constants, bind groups by
//! kernel signature and buffer ids); `end_step` submits. `read` and `argmax_row0` are the sync
//! points: they copy into a reused staging buffer and map it (argmax reads back 4 bytes).
//!
//! Device layouts (see [`layout`] and the .wgsl files for the details and the why):
//! - f32 activations `[capacity, cols]`;
//! - int8 activations 4 per u32, rows padded to 64 columns, plus (scale, Σq) per row;
//! - ternary weights repacked once to `[out, 4·ceil(in/64)]` u32 of 2-bit codes, read by
//!   `dot4I8Packed` without ever being expanded;
//! - the embedding / LM head in its file dtype (bf16 exact), split by rows over several buffers
//!   when larger than `max_storage_buffer_binding_size`;
//! - the KV cache in f32, one `[ctx, kv_dim]` buffer per layer for keys and one for values.
//!
//! Errors: wgpu reports validation and out-of-memory errors and device loss asynchronously; the
//! backend collects them (uncaptured-error handler, device-lost callback, failed maps/polls) and
//! returns them as `BitnetError::Gpu` from the next op, `end_step`, `read` or `argmax_row0`
//! (`"device lost: ..."` for a lost device), so the caller can fall back to the CPU.

pub mod adapter;
pub mod kernels;
pub mod layout;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use adapter::{
    check_fits, estimate_memory, list_adapters, select_adapter, AdapterChoice, AdapterSummary,
    MemoryEstimate,
};

use super::{AttentionShape, Backend, HeadFormat, StepRow};
use crate::error::{BitnetError, Result};
use crate::load::{FloatDtype, FloatMatrix};
use crate::ternary::TernaryMatrix;
use kernels::{Kernel, PipelineCache};

/// Token counts up to this use the mat-vec kernel (decode); larger steps the tiled matmul.
pub const MATVEC_MAX_TOKENS: usize = 4;
/// Largest head_dim the attention kernel supports (workgroup memory for one query vector).
pub const MAX_HEAD_DIM: usize = 512;
/// Steps of up to this many tokens use the split-context ("flash decoding") attention.
pub const ATTN_SPLIT_MAX_TOKENS: usize = 4;
/// Positions per block of the split attention (shaders/attention.wgsl BLK).
const ATTN_BLOCK: usize = 64;
/// Vocabulary rows per LM-head workgroup (shaders/embedding.wgsl ROWS_PER_WG).
const LM_ROWS_PER_WG: usize = 8;
/// Values per argmax_partial workgroup (shaders/argmax.wgsl PER_WG).
const ARGMAX_PER_WG: usize = 4096;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A device buffer with a process-unique id, the key of the bind group cache.
#[derive(Clone, Debug)]
pub struct GpuBuf {
    id: u64,
    buf: wgpu::Buffer,
}

/// f32 activations `[capacity, cols]`.
#[derive(Debug)]
pub struct GpuTensor {
    buf: GpuBuf, // [capacity, cols] f32
    pub capacity: usize,
    pub cols: usize,
}

/// int8 activations `[capacity, cols]` (4 per u32, rows zero-padded to a multiple of 64) with
/// the per-row scale `s = 127 / absmax` and the row sum Σq the matmul needs.
#[derive(Debug)]
pub struct GpuQTensor {
    q: GpuBuf,    // [capacity, 16 * ceil(cols / 64)] u32
    meta: GpuBuf, // [capacity, 2] u32: (bitcast f32 s, bitcast i32 Σq)
    pub capacity: usize,
    pub cols: usize,
}

/// A ternary matrix in the device layout of shaders/ternary_matmul.wgsl.
#[derive(Debug)]
pub struct GpuLinear {
    w: GpuBuf,      // [rows, 4 * ceil(cols / 64)] u32, 2-bit codes
    params: GpuBuf, // uniform Linear { rows, groups, out_scale, _ }
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// An f32 vector (norm weights).
#[derive(Debug)]
pub struct GpuVector {
    buf: GpuBuf, // [len] f32
    pub len: usize,
}

#[derive(Debug)]
struct EmbChunk {
    data: GpuBuf,   // [rows, row_words] u32
    params: GpuBuf, // uniform Chunk { row0, rows, _, _ }
    rows: usize,
}

/// A float matrix `[rows, cols]` in its file dtype, split by rows into bindable chunks.
#[derive(Debug)]
pub struct GpuEmbedding {
    chunks: Vec<EmbChunk>,
    pub rows: usize,
    pub cols: usize,
    pub dtype: FloatDtype,
    row_words: usize,
}

/// Keys and values of every layer: f32 `[ctx, kv_dim]` per layer.
#[derive(Debug)]
pub struct GpuKvCache {
    k: Vec<GpuBuf>, // layers × [ctx, kv_dim]
    v: Vec<GpuBuf>, // layers × [ctx, kv_dim]
    pub ctx: usize,
    pub kv_dim: usize,
}

/// The operation applied to a row before the norm (shaders/row_ops.wgsl PRE).
#[derive(Debug, Clone)]
enum Pre {
    None,
    /// `a += y`
    Add {
        y: GpuBuf,
    },
    /// `a = relu(gate)² · up`
    Relu2 {
        gate: GpuBuf,
        up: GpuBuf,
    },
}

/// A chain of row-wise ops on the same rows that is recorded lazily and emitted as one dispatch
/// of shaders/row_ops.wgsl: the model's `add_assign` / `relu2_mul`, `rms_norm`, `quantize`
/// sequences. Any other op, `end_step`, `read` and `write` emit it first.
#[derive(Debug)]
struct RowOp {
    a: GpuBuf, // [capacity, cols] the row input (written by the pre-op)
    cols: usize,
    pre: Pre,
    norm: Option<(GpuBuf, f32, GpuBuf)>, // (w [cols], eps, out [capacity, cols])
    quant: Option<(GpuBuf, GpuBuf)>,     // (q [capacity, 4·ceil(cols/16)], meta [capacity, 2])
}

impl RowOp {
    fn new(a: &GpuBuf, cols: usize, pre: Pre, norm: Option<(GpuBuf, f32, GpuBuf)>) -> Self {
        RowOp {
            a: a.clone(),
            cols,
            pre,
            norm,
            quant: None,
        }
    }

    /// Is `b` already bound? (Binding one buffer both read-only and read-write in a dispatch is
    /// invalid, so such a chain is not fused.)
    fn uses(&self, b: &GpuBuf) -> bool {
        let pre = match &self.pre {
            Pre::None => false,
            Pre::Add { y } => y.id == b.id,
            Pre::Relu2 { gate, up } => gate.id == b.id || up.id == b.id,
        };
        let norm = self
            .norm
            .as_ref()
            .is_some_and(|(w, _, out)| w.id == b.id || out.id == b.id);
        let quant = self
            .quant
            .as_ref()
            .is_some_and(|(q, m)| q.id == b.id || m.id == b.id);
        self.a.id == b.id || pre || norm || quant
    }
}

/// Most bindings of one kernel (row_ops has 8).
const MAX_BINDINGS: usize = 8;

/// (binding signature, buffer ids padded with 0): fixed-size, no allocation per lookup.
type BindKey = (&'static [kernels::Bind], [u64; MAX_BINDINGS]);

/// Reused host-visible buffers for the per-step upload (Step uniform + token ids), so a decoded
/// token allocates nothing once warm. A buffer is written while mapped, unmapped and copied from
/// in the step's command buffer, then re-mapped (asynchronously, completing once the GPU is done
/// with it: at the next poll). The pool grows to the number of steps in flight, typically 1-2.
/// Unlike wgpu's StagingBelt, a failed map (device loss) is an error, not a panic.
#[derive(Default)]
struct UploadPool {
    free: Vec<wgpu::Buffer>,                 // mapped, ready to write
    in_flight: Vec<wgpu::Buffer>,            // used by the last submission
    returned: Arc<Mutex<Vec<wgpu::Buffer>>>, // re-mapped by the callbacks
    failed: Arc<Mutex<Option<String>>>,      // a re-map that failed
    created: usize,                          // buffers made so far
}

impl UploadPool {
    const SIZE: u64 = 4096;

    /// A buffer holding `bytes` (COPY_SRC), to be copied from in the current encoder.
    fn stage(
        &mut self,
        device: &wgpu::Device,
        bytes: &[u8],
    ) -> std::result::Result<wgpu::Buffer, String> {
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        self.free.extend(
            self.returned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        let need = (bytes.len() as u64).next_multiple_of(4).max(4);
        let pos = self.free.iter().position(|b| b.size() >= need);
        let buf = match pos {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.created += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("step upload"),
                    size: need.max(Self::SIZE).next_power_of_two(),
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                })
            }
        };
        {
            let mut view = buf.get_mapped_range_mut(..).map_err(|e| e.to_string())?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buf.unmap();
        self.in_flight.push(buf.clone());
        Ok(buf)
    }

    /// After a submit: map the used buffers again once the GPU is done with them.
    fn recycle(&mut self) {
        for buf in self.in_flight.drain(..) {
            let (returned, failed, b) = (self.returned.clone(), self.failed.clone(), buf.clone());
            buf.map_async(wgpu::MapMode::Write, .., move |r| match r {
                Ok(()) => returned.lock().unwrap_or_else(|e| e.into_inner()).push(b),
                Err(e) => {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("re-mapping an upload buffer: {e}"))
                }
            });
        }
    }
}

/// The wgpu backend. Create it with [`WgpuBackend::new`] (adapter selection) or
/// [`WgpuBackend::from_adapter`].
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    pipelines: PipelineCache,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
    step_buf: GpuBuf,   // uniform Step { n_tokens, start_pos, _, _ }
    tokens_buf: GpuBuf, // [tokens_cap] u32
    tokens_cap: usize,
    tokens: Vec<u32>, // [n] the step's tokens, host copy
    start_pos: usize,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    uploads: UploadPool,
    staging: Option<wgpu::Buffer>, // MAP_READ, grown to the largest read
    rope_tables: HashMap<(usize, u32), (GpuBuf, usize)>, // (head_dim, θ bits) → ([pos, hd/2] vec2, positions)
    argmax_partials: HashMap<u64, GpuBuf>, // logits id → [ceil(cols / 4096)] vec2<u32>
    argmax_result: GpuBuf,                 // [4] u32
    positions_hint: usize,                 // the KV cache length: the size of the RoPE tables
    max_chunk_bytes: Option<u64>,
    pending: Option<RowOp>,
    upload_scratch: Vec<u32>, // [4 + n] the Step uniform and the tokens, reused
    attn_partials: HashMap<(usize, usize, usize), GpuBuf>, // (heads, blocks, hd) → [4, heads, blocks, hd + 2]
    dispatches: u64,                                       // dispatches recorded so far
    dummy_r: GpuBuf,  // [4] f32, bound to the unused read-only slots of row_ops
    dummy_rw: GpuBuf, // [4] f32, bound to its unused read-write slots
    lost: Arc<Mutex<Option<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

fn gpu_err(msg: impl Into<String>) -> BitnetError {
    BitnetError::Gpu(msg.into())
}

impl WgpuBackend {
    /// Opens the adapter chosen by `choice` / `name_substring` (see [`select_adapter`]).
    pub fn new(choice: AdapterChoice, name_substring: Option<&str>) -> Result<Self> {
        let adapter = select_adapter(choice, name_substring).map_err(BitnetError::Gpu)?;
        Self::from_adapter(adapter)
    }

    /// Opens a device on `adapter` with the adapter's own limits (so large buffers and bindings
    /// are allowed up to what the hardware supports) and no optional features.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bitnet"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| gpu_err(format!("cannot open a device on {}: {e}", info.name)))?;
        let lost = Arc::new(Mutex::new(None));
        let errors = Arc::new(Mutex::new(Vec::new()));
        {
            let lost = lost.clone();
            device.set_device_lost_callback(move |reason, msg| {
                *lost.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("{reason:?}: {msg}"));
            });
            let errors = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.to_string());
            }));
        }
        let mk = |label: &str, size: u64, usage: wgpu::BufferUsages| GpuBuf {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buf: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }),
        };
        let step_buf = mk(
            "step",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let tokens_cap = 64;
        let tokens_buf = mk(
            "tokens",
            tokens_cap as u64 * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let storage = wgpu::BufferUsages::STORAGE;
        let dummy_r = mk("unused (read)", 16, storage);
        let dummy_rw = mk("unused (read-write)", 16, storage);
        let argmax_result = mk(
            "argmax result",
            16,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        Ok(WgpuBackend {
            device,
            queue,
            info,
            limits,
            pipelines: PipelineCache::default(),
            bind_groups: HashMap::new(),
            step_buf,
            tokens_buf,
            tokens_cap,
            tokens: Vec::new(),
            start_pos: 0,
            encoder: None,
            pass: None,
            uploads: UploadPool::default(),
            staging: None,
            rope_tables: HashMap::new(),
            argmax_partials: HashMap::new(),
            argmax_result,
            positions_hint: 0,
            max_chunk_bytes: None,
            pending: None,
            upload_scratch: Vec::new(),
            attn_partials: HashMap::new(),
            dispatches: 0,
            dummy_r,
            dummy_rw,
            lost,
            errors,
        })
    }

    /// Pipelines compiled so far (a model compiles all of its pipelines in its first steps).
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.pipeline_count()
    }

    /// Buffers created for the per-step uploads (constant once warm).
    pub fn upload_buffer_count(&self) -> usize {
        self.uploads.created
    }

    /// Dispatches recorded so far (fused op chains count once).
    pub fn dispatch_count(&self) -> u64 {
        self.dispatches
    }

    /// Bind groups created so far (constant once every op has run for each step size class).
    pub fn bind_group_count(&self) -> usize {
        self.bind_groups.len()
    }

    /// Compiles every kernel with its default constants (a quick check of the WGSL).
    #[doc(hidden)]
    pub fn compile_all(&mut self) -> Result<()> {
        for k in kernels::ALL {
            self.pipelines.pipeline(&self.device, k, &[])?;
        }
        Ok(())
    }

    /// Caps the bytes per float-matrix chunk below the device limit, to exercise the split
    /// (tests; takes effect at the next upload_embedding).
    #[doc(hidden)]
    pub fn set_max_chunk_bytes(&mut self, max: Option<u64>) {
        self.max_chunk_bytes = max;
    }

    /// Destroys the device as if the driver had lost it (tests of the fallback path).
    #[doc(hidden)]
    pub fn simulate_device_loss(&mut self) {
        self.pass = None;
        self.encoder = None;
        self.device.destroy();
    }

    fn n(&self) -> usize {
        self.tokens.len()
    }

    /// The error wgpu reported since the last check, if any (device loss first).
    fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(gpu_err(format!("device lost: {why}")));
        }
        let mut errs = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if !errs.is_empty() {
            let msg = errs.join("; ");
            errs.clear();
            return Err(gpu_err(msg));
        }
        Ok(())
    }

    /// A failed poll or map: device loss when the callback said so, else the wgpu message.
    fn sync_error(&self, what: &str, e: impl std::fmt::Display) -> BitnetError {
        if let Err(lost) = self.check_alive() {
            return lost;
        }
        gpu_err(format!("device lost: {what} failed: {e}"))
    }

    fn new_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        contents: Option<&[u8]>,
    ) -> Result<GpuBuf> {
        // Bindings of size 0 are invalid and copies go in 4-byte units.
        let size = size.max(16).next_multiple_of(4);
        if size > self.limits.max_buffer_size {
            return Err(gpu_err(format!(
                "{label}: a {size}-byte buffer exceeds this adapter's max_buffer_size ({})",
                self.limits.max_buffer_size
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: contents.is_some(),
        });
        if let Some(data) = contents {
            let mut view = buf
                .get_mapped_range_mut(..)
                .map_err(|e| gpu_err(format!("{label}: cannot map for upload: {e}")))?;
            view.slice(..data.len()).copy_from_slice(data);
            drop(view);
            buf.unmap();
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(format!(
                "out of device memory allocating {label} ({} MiB): {e}",
                size >> 20
            )));
        }
        self.check_alive()?;
        Ok(GpuBuf {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buf,
        })
    }

    fn storage(&self, label: &str, size: u64, contents: Option<&[u8]>) -> Result<GpuBuf> {
        if size > self.limits.max_storage_buffer_binding_size {
            return Err(gpu_err(format!(
                "{label}: {size} bytes exceed this adapter's max_storage_buffer_binding_size ({})",
                self.limits.max_storage_buffer_binding_size
            )));
        }
        self.new_buffer(
            label,
            size,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            contents,
        )
    }

    fn uniform(&self, label: &str, contents: &[u8]) -> Result<GpuBuf> {
        self.new_buffer(
            label,
            contents.len() as u64,
            wgpu::BufferUsages::UNIFORM,
            Some(contents),
        )
    }

    /// The open compute pass of the step (opened on demand).
    fn pass(&mut self) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let enc = self.encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("bitnet step"),
                    })
            });
            let pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("bitnet ops"),
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        self.pass.as_mut().expect("just opened")
    }

    /// Submits everything recorded so far (nothing if empty).
    fn flush(&mut self) -> Result<()> {
        self.flush_pending()?;
        self.pass = None;
        if let Some(enc) = self.encoder.take() {
            self.queue.submit([enc.finish()]);
            self.uploads.recycle();
        }
        self.check_alive()
    }

    /// Emits the pending row-op chain as one dispatch of shaders/row_ops.wgsl.
    fn flush_pending(&mut self) -> Result<()> {
        let Some(op) = self.pending.take() else {
            return Ok(());
        };
        let (pre, b, c) = match &op.pre {
            Pre::None => (0, self.dummy_r.clone(), self.dummy_r.clone()),
            Pre::Add { y } => (1, y.clone(), self.dummy_r.clone()),
            Pre::Relu2 { gate, up } => (2, gate.clone(), up.clone()),
        };
        let (w, eps, xn) = match &op.norm {
            Some((w, eps, out)) => (w.clone(), *eps, out.clone()),
            None => (self.dummy_r.clone(), 0.0, self.dummy_rw.clone()),
        };
        let (q, meta) = match &op.quant {
            Some((q, m)) => (q.clone(), m.clone()),
            None => (self.dummy_rw.clone(), self.dummy_rw.clone()),
        };
        let consts = [
            ("COLS", op.cols as f64),
            ("QW", (4 * layout::groups(op.cols)) as f64),
            ("EPS", eps as f64),
            ("PRE", pre as f64),
            ("NORM", if op.norm.is_some() { 1.0 } else { 0.0 }),
            ("QUANT", if op.quant.is_some() { 1.0 } else { 0.0 }),
        ];
        let groups = self.grid(self.n())?;
        self.record(
            &kernels::ROW_OPS,
            &consts,
            &[&op.a, &b, &c, &w, &xn, &q, &meta],
            groups,
        )
    }

    fn bind_group(&mut self, k: &'static Kernel, bufs: &[&GpuBuf]) -> wgpu::BindGroup {
        let mut ids = [0u64; MAX_BINDINGS];
        ids[0] = self.step_buf.id;
        for (slot, b) in ids[1..].iter_mut().zip(bufs) {
            *slot = b.id;
        }
        let key = (k.bindings, ids);
        if let Some(bg) = self.bind_groups.get(&key) {
            return bg.clone();
        }
        let layout = self.pipelines.bind_group_layout(&self.device, k);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: self.step_buf.buf.as_entire_binding(),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.buf.as_entire_binding(),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.entry),
            layout: &layout,
            entries: &entries,
        });
        self.bind_groups.insert(key, bg.clone());
        bg
    }

    /// Records one dispatch of `k` over `groups` workgroups.
    fn record(
        &mut self,
        k: &'static Kernel,
        constants: &[(&'static str, f64)],
        bufs: &[&GpuBuf],
        groups: [u32; 3],
    ) -> Result<()> {
        self.flush_pending()?;
        self.check_alive()?;
        assert_eq!(bufs.len() + 1, k.bindings.len(), "{}: bindings", k.entry);
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(gpu_err(format!(
                "{}: dispatch {groups:?} exceeds max_compute_workgroups_per_dimension {max}",
                k.entry
            )));
        }
        let pipeline = self.pipelines.pipeline(&self.device, k, constants)?;
        let bg = self.bind_group(k, bufs);
        let pass = self.pass();
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        self.dispatches += 1;
        Ok(())
    }

    /// `count` workgroups of a 1-D kernel, folded onto 2-D when one dimension is not enough
    /// (the kernels recover the index with `linear_wg` and skip the excess).
    fn grid(&self, count: usize) -> Result<[u32; 3]> {
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        if count <= max {
            return Ok([count as u32, 1, 1]);
        }
        let y = count.div_ceil(max);
        if y > max {
            return Err(gpu_err(format!(
                "{count} workgroups is too large a dispatch"
            )));
        }
        Ok([max as u32, y as u32, 1])
    }

    fn check(&self, op: &'static str, t: &GpuTensor, cols: usize) -> Result<()> {
        super::check_tensor(op, t.capacity, t.cols, self.n(), cols)
    }

    /// Copies `bytes` bytes of `src` to the host (submits what is recorded, then waits).
    fn download(&mut self, src: &GpuBuf, bytes: u64) -> Result<Vec<u8>> {
        self.flush_pending()?;
        self.pass = None;
        if bytes == 0 {
            self.flush()?;
            return Ok(Vec::new());
        }
        let need = bytes.next_multiple_of(4);
        if self.staging.as_ref().is_none_or(|s| s.size() < need) {
            let size = need.next_power_of_two().max(256);
            self.staging = Some(
                self.new_buffer(
                    "readback staging",
                    size,
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    None,
                )?
                .buf,
            );
        }
        let staging = self.staging.clone().expect("just created");
        let enc = self.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bitnet read"),
                })
        });
        enc.copy_buffer_to_buffer(&src.buf, 0, &staging, 0, need);
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging
            .slice(..need)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            return Err(self.sync_error("poll", e));
        }
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.sync_error("map", e)),
            Err(e) => return Err(self.sync_error("map", e)),
        }
        let out = {
            let view = staging
                .get_mapped_range(..need)
                .map_err(|e| self.sync_error("map range", e))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.check_alive()?;
        Ok(out)
    }

    /// Uploads rows of f32 values into `t` (`data.len()` must be a multiple of `t.cols`): how a
    /// caller (or a test) puts its own activations on the device. Ordered after every op
    /// recorded before it.
    pub fn write(&mut self, t: &mut GpuTensor, data: &[f32]) -> Result<()> {
        if !data.len().is_multiple_of(t.cols.max(1)) || data.len() > t.capacity * t.cols {
            return Err(BitnetError::op(
                "write",
                format!(
                    "{} values do not fit [{}, {}]",
                    data.len(),
                    t.capacity,
                    t.cols
                ),
            ));
        }
        self.flush()?;
        if !data.is_empty() {
            self.queue
                .write_buffer(&t.buf.buf, 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Uploads int8 activations `q [rows, cols]` with their scales (test support: the matmul on
    /// exactly the CPU's inputs). Σq is computed here.
    #[doc(hidden)]
    pub fn write_q(&mut self, x: &mut GpuQTensor, q: &[i8], scales: &[f32]) -> Result<()> {
        let rows = scales.len();
        if q.len() != rows * x.cols || rows > x.capacity {
            return Err(BitnetError::op("write_q", "shape mismatch"));
        }
        self.flush()?;
        let words = layout::pack_q_rows(q, rows, x.cols);
        let mut meta = Vec::with_capacity(rows * 2);
        for (r, s) in scales.iter().enumerate() {
            let sum: i32 = q[r * x.cols..(r + 1) * x.cols]
                .iter()
                .map(|&v| v as i32)
                .sum();
            meta.push(s.to_bits());
            meta.push(sum as u32);
        }
        self.queue
            .write_buffer(&x.q.buf, 0, bytemuck::cast_slice(&words));
        self.queue
            .write_buffer(&x.meta.buf, 0, bytemuck::cast_slice(&meta));
        Ok(())
    }

    /// Reads back `rows` rows of int8 activations: (q `[rows, cols]`, scales, Σq).
    #[doc(hidden)]
    pub fn read_q(&mut self, x: &GpuQTensor, rows: usize) -> Result<(Vec<i8>, Vec<f32>, Vec<i32>)> {
        let qw = 4 * layout::groups(x.cols);
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.download(&x.q, (rows * qw * 4) as u64)?);
        let meta: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.download(&x.meta, (rows * 8) as u64)?);
        let q = layout::unpack_q_rows(&words, rows, x.cols);
        let scales = meta.chunks_exact(2).map(|m| f32::from_bits(m[0])).collect();
        let sums = meta.chunks_exact(2).map(|m| m[1] as i32).collect();
        Ok((q, scales, sums))
    }

    /// The ternary matmul's exact integer accumulators `x_q · Wᵀ` as f32 (exact below 2^24),
    /// through the same kernels with the RAW_ACC constant: the integer path tested bit for bit.
    #[doc(hidden)]
    pub fn ternary_matmul_acc(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.matmul(w, x, out, true)
    }

    fn matmul(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        out: &mut GpuTensor,
        raw: bool,
    ) -> Result<()> {
        let n = self.n();
        super::check_matmul(&w.name, (w.rows, w.cols), (x.capacity, x.cols), n)?;
        self.check("ternary_matmul", out, w.rows)?;
        let consts = [("RAW_ACC", if raw { 1.0 } else { 0.0 })];
        let bufs = [&w.params, &w.w, &x.q, &x.meta, &out.buf];
        if n <= MATVEC_MAX_TOKENS {
            let groups = [w.rows.div_ceil(16) as u32, n as u32, 1];
            self.record(&kernels::MATVEC, &consts, &bufs, groups)
        } else {
            let groups = [w.rows.div_ceil(64) as u32, n.div_ceil(32) as u32, 1];
            self.record(&kernels::MATMUL_TILED, &consts, &bufs, groups)
        }
    }

    /// The (cos, sin) table for `head_dim`, `theta`, covering at least `positions` positions.
    fn rope_table(&mut self, head_dim: usize, theta: f32, positions: usize) -> Result<GpuBuf> {
        let key = (head_dim, theta.to_bits());
        if let Some((buf, have)) = self.rope_tables.get(&key) {
            if *have >= positions {
                return Ok(buf.clone());
            }
        }
        // Sized for the KV cache when one exists, so that a model builds it once.
        let len = positions.max(self.positions_hint).next_multiple_of(64);
        let table = layout::rope_table(len, head_dim, theta);
        let buf = self.storage(
            "rope table",
            (table.len() * 8) as u64,
            Some(bytemuck::cast_slice(&table)),
        )?;
        self.rope_tables.insert(key, (buf.clone(), len));
        Ok(buf)
    }
}

impl Backend for WgpuBackend {
    type Tensor = GpuTensor;
    type QTensor = GpuQTensor;
    type Linear = GpuLinear;
    type Vector = GpuVector;
    // Shared (Arc) so that a tied LM head is the embedding's buffers, not a second upload.
    type Embedding = Arc<GpuEmbedding>;
    type Head = Arc<GpuEmbedding>;
    type KvCache = GpuKvCache;

    fn name(&self) -> String {
        format!("wgpu {:?} {}", self.info.backend, self.info.name)
    }

    fn upload_linear(&mut self, w: &TernaryMatrix) -> Result<GpuLinear> {
        let words = layout::repack_ternary(w);
        let buf = self.storage(
            &w.name,
            (words.len() * 4) as u64,
            Some(bytemuck::cast_slice(&words)),
        )?;
        let params = [
            w.rows as u32,
            layout::groups(w.cols) as u32,
            w.out_scale.to_bits(),
            0,
        ];
        let params = self.uniform("linear params", bytemuck::cast_slice(&params))?;
        Ok(GpuLinear {
            w: buf,
            params,
            name: w.name.clone(),
            rows: w.rows,
            cols: w.cols,
        })
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<GpuVector> {
        Ok(GpuVector {
            buf: self.storage(
                "vector",
                (v.len() * 4) as u64,
                Some(bytemuck::cast_slice(v)),
            )?,
            len: v.len(),
        })
    }

    fn upload_lm_head(
        &mut self,
        m: &FloatMatrix,
        tied: Option<&Arc<GpuEmbedding>>,
        format: HeadFormat,
    ) -> Result<Arc<GpuEmbedding>> {
        if format != HeadFormat::Exact {
            return Err(BitnetError::Unsupported {
                what: "LM head format on the GPU",
                value: format.name().into(),
                hint: "the wgpu backend keeps the head in f16; --lm-head q8 is a CPU option",
            });
        }
        match tied {
            Some(e) => Ok(Arc::clone(e)),
            None => self.upload_embedding(m),
        }
    }

    fn upload_embedding(&mut self, m: &FloatMatrix) -> Result<Arc<GpuEmbedding>> {
        let row_words = layout::row_words(m.dtype, m.cols);
        let row_bytes = row_words * 4;
        let max = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        // Also keep the LM-head dispatch of a chunk within the per-dimension workgroup limit.
        let max_rows =
            self.limits.max_compute_workgroups_per_dimension as u64 * LM_ROWS_PER_WG as u64;
        let mut max = max.min(max_rows * row_bytes as u64);
        if let Some(cap) = self.max_chunk_bytes {
            max = max.min(cap);
        }
        let plan = layout::chunk_rows(m.rows, row_bytes, max).ok_or_else(|| {
            gpu_err(format!(
                "{}: one row of {row_bytes} bytes exceeds the binding limit",
                m.name
            ))
        })?;
        let mut chunks = Vec::with_capacity(plan.len());
        for (row0, rows) in plan {
            let bytes = layout::float_rows_bytes(m, row0, rows);
            let data = self.storage(&m.name, bytes.len() as u64, Some(&bytes))?;
            let params = self.uniform(
                "chunk params",
                bytemuck::cast_slice(&[row0 as u32, rows as u32, 0, 0]),
            )?;
            chunks.push(EmbChunk { data, params, rows });
        }
        Ok(Arc::new(GpuEmbedding {
            chunks,
            rows: m.rows,
            cols: m.cols,
            dtype: m.dtype,
            row_words,
        }))
    }

    fn alloc(&mut self, capacity: usize, cols: usize) -> Result<GpuTensor> {
        let bytes = (capacity as u64) * (cols as u64) * 4;
        Ok(GpuTensor {
            buf: self.storage("activations", bytes, None)?,
            capacity,
            cols,
        })
    }

    fn alloc_q(&mut self, capacity: usize, cols: usize) -> Result<GpuQTensor> {
        let qw = 4 * layout::groups(cols) as u64;
        Ok(GpuQTensor {
            q: self.storage("int8 activations", capacity as u64 * qw * 4, None)?,
            meta: self.storage("int8 scales", capacity as u64 * 8, None)?,
            capacity,
            cols,
        })
    }

    fn alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
    ) -> Result<GpuKvCache> {
        if slots != 1 {
            return Err(BitnetError::Unsupported {
                what: "KV-cache slots on the wgpu backend",
                value: slots.to_string(),
                hint: "per-row positions and slots are not implemented on the GPU yet: use one \
                       slot (--parallel 1) or --device cpu",
            });
        }
        let bytes = (ctx as u64) * (kv_dim as u64) * 4;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.storage("key cache", bytes, None)?);
            v.push(self.storage("value cache", bytes, None)?);
        }
        self.positions_hint = self.positions_hint.max(ctx);
        Ok(GpuKvCache { k, v, ctx, kv_dim })
    }

    fn begin_step(&mut self, rows: &[StepRow]) -> Result<()> {
        // Until the shaders take a position and slot per row: one sequence in slot 0 at
        // consecutive positions, mapped onto the start-position logic.
        let start_pos = rows.first().map_or(0, |r| r.pos as usize);
        let one_run = rows
            .iter()
            .enumerate()
            .all(|(i, r)| r.slot == 0 && r.pos as usize == start_pos + i);
        if !one_run {
            return Err(BitnetError::Unsupported {
                what: "step rows on the wgpu backend",
                value: format!("{} rows over several slots or positions", rows.len()),
                hint: "the GPU runs one sequence (slot 0, consecutive positions) per step so \
                       far: use --device cpu for batches of sequences",
            });
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let tokens = &tokens[..];
        self.flush()?;
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
        self.start_pos = start_pos;
        if tokens.len() > self.tokens_cap {
            // Grows at most a few times in a model's life (the largest prefill chunk).
            let cap = tokens.len().next_power_of_two();
            self.tokens_buf = self.new_buffer(
                "tokens",
                cap as u64 * 4,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                None,
            )?;
            self.tokens_cap = cap;
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bitnet step"),
            });
        // Non-blocking: lets finished submissions return their upload buffers to the pool.
        let _ = self.device.poll(wgpu::PollType::Poll);
        let mut data = std::mem::take(&mut self.upload_scratch);
        data.clear();
        data.extend_from_slice(&[tokens.len() as u32, start_pos as u32, 0, 0]);
        data.extend_from_slice(tokens);
        let staged = self
            .uploads
            .stage(&self.device, bytemuck::cast_slice(&data));
        self.upload_scratch = data;
        let src = staged.map_err(|e| self.sync_error("upload", e))?;
        enc.copy_buffer_to_buffer(&src, 0, &self.step_buf.buf, 0, 16);
        if !tokens.is_empty() {
            enc.copy_buffer_to_buffer(&src, 16, &self.tokens_buf.buf, 0, tokens.len() as u64 * 4);
        }
        self.encoder = Some(enc);
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        self.flush()
    }

    fn embed(&mut self, emb: &Arc<GpuEmbedding>, out: &mut GpuTensor) -> Result<()> {
        self.check("embed", out, emb.cols)?;
        if let Some(&id) = self.tokens.iter().find(|&&t| t as usize >= emb.rows) {
            return Err(BitnetError::TokenOutOfRange {
                id,
                vocab_size: emb.rows,
            });
        }
        let consts = [
            ("COLS", emb.cols as f64),
            ("ROW_WORDS", emb.row_words as f64),
            ("DTYPE", layout::dtype_code(emb.dtype) as f64),
        ];
        let groups = self.grid((self.n() * emb.cols).div_ceil(256))?;
        let tokens = self.tokens_buf.clone();
        for c in &emb.chunks {
            self.record(
                &kernels::EMBED,
                &consts,
                &[&c.params, &c.data, &tokens, &out.buf],
                groups,
            )?;
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let cols = w.len;
        self.check("rms_norm", x, cols)?;
        self.check("rms_norm", out, cols)?;
        let norm = Some((w.buf.clone(), eps, out.buf.clone()));
        // Fuse into the pending add / relu2_mul that produced x.
        if let Some(p) = &mut self.pending {
            if p.a.id == x.buf.id && p.norm.is_none() && p.quant.is_none() && !p.uses(&out.buf) {
                p.norm = norm;
                return Ok(());
            }
        }
        self.flush_pending()?;
        self.pending = Some(RowOp::new(&x.buf, cols, Pre::None, norm));
        Ok(())
    }

    fn quantize(&mut self, x: &GpuTensor, out: &mut GpuQTensor) -> Result<()> {
        self.check("quantize", x, out.cols)?;
        if out.capacity < self.n() {
            return Err(BitnetError::op("quantize", "output has too few rows"));
        }
        // Fuse into the pending op that produced x (its norm output, or its pre-op output).
        if let Some(p) = &mut self.pending {
            let src = p.norm.as_ref().map_or(p.a.id, |n| n.2.id);
            if src == x.buf.id && p.quant.is_none() && !p.uses(&out.q) && !p.uses(&out.meta) {
                p.quant = Some((out.q.clone(), out.meta.clone()));
                return Ok(());
            }
        }
        self.flush_pending()?;
        let mut op = RowOp::new(&x.buf, x.cols, Pre::None, None);
        op.quant = Some((out.q.clone(), out.meta.clone()));
        self.pending = Some(op);
        Ok(())
    }

    fn ternary_matmul(&mut self, w: &GpuLinear, x: &GpuQTensor, out: &mut GpuTensor) -> Result<()> {
        self.matmul(w, x, out, false)
    }

    fn rope(&mut self, x: &mut GpuTensor, n_heads: usize, shape: &AttentionShape) -> Result<()> {
        let hd = shape.head_dim;
        self.check("rope", x, n_heads * hd)?;
        if !hd.is_multiple_of(2) {
            return Err(BitnetError::op("rope", format!("head_dim {hd} is odd")));
        }
        let table = self.rope_table(hd, shape.rope_theta, self.start_pos + self.n())?;
        let consts = [("HEADS", n_heads as f64), ("HD", hd as f64)];
        let groups = self.grid((self.n() * n_heads * hd / 2).div_ceil(64))?;
        self.record(&kernels::ROPE, &consts, &[&x.buf, &table], groups)
    }

    fn attention(
        &mut self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        cache: &mut GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let (n, hd) = (self.n(), shape.head_dim);
        let kvd = shape.n_kv_heads * hd;
        super::check_attention(
            shape,
            n,
            [q, k, v, out].map(|t| (t.capacity, t.cols)),
            (cache.kv_dim, cache.ctx),
            self.start_pos + n,
        )?;
        if layer >= cache.k.len() {
            return Err(BitnetError::op(
                "attention",
                format!("no layer {layer} in the cache"),
            ));
        }
        if hd > MAX_HEAD_DIM
            || shape.n_kv_heads == 0
            || !shape.n_heads.is_multiple_of(shape.n_kv_heads)
        {
            return Err(BitnetError::op(
                "attention",
                format!(
                    "unsupported shape: {} heads, {} kv heads, head_dim {hd} (max {MAX_HEAD_DIM})",
                    shape.n_heads, shape.n_kv_heads
                ),
            ));
        }
        let consts = [
            ("HEADS", shape.n_heads as f64),
            ("KV_HEADS", shape.n_kv_heads as f64),
            ("HD", hd as f64),
            // the CPU backend's scale, rounded the same way
            ("SCALE", (1.0 / (hd as f32).sqrt()) as f64),
        ];
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        let groups = self.grid((n * kvd).div_ceil(256))?;
        self.record(
            &kernels::KV_STORE,
            &consts,
            &[&k.buf, &v.buf, kc, vc],
            groups,
        )?;
        let group = shape.n_heads / shape.n_kv_heads;
        if n <= ATTN_SPLIT_MAX_TOKENS && group <= 16 && group * hd <= 1024 {
            let blocks = cache.ctx.div_ceil(ATTN_BLOCK);
            let key = (shape.n_heads, blocks, hd);
            let partials = match self.attn_partials.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let floats = ATTN_SPLIT_MAX_TOKENS * shape.n_heads * blocks * (hd + 2);
                    let p = self.storage("attention partials", floats as u64 * 4, None)?;
                    self.attn_partials.insert(key, p.clone());
                    p
                }
            };
            let mut consts = consts.to_vec();
            consts.push(("NB", blocks as f64));
            let used = (self.start_pos + n).div_ceil(ATTN_BLOCK);
            let groups = [used as u32, shape.n_kv_heads as u32, n as u32];
            self.record(
                &kernels::ATTEND_SPLIT,
                &consts,
                &[&q.buf, kc, vc, &partials],
                groups,
            )?;
            let groups = self.grid(n * shape.n_heads)?;
            return self.record(
                &kernels::ATTEND_COMBINE,
                &consts,
                &[&partials, &out.buf],
                groups,
            );
        }
        let groups = self.grid(n * shape.n_heads)?;
        self.record(
            &kernels::ATTEND,
            &consts,
            &[&q.buf, kc, vc, &out.buf],
            groups,
        )
    }

    fn relu2_mul(&mut self, gate: &GpuTensor, up: &GpuTensor, out: &mut GpuTensor) -> Result<()> {
        let cols = gate.cols;
        self.check("relu2_mul", gate, cols)?;
        self.check("relu2_mul", up, cols)?;
        self.check("relu2_mul", out, cols)?;
        self.flush_pending()?;
        let pre = Pre::Relu2 {
            gate: gate.buf.clone(),
            up: up.buf.clone(),
        };
        self.pending = Some(RowOp::new(&out.buf, cols, pre, None));
        Ok(())
    }

    fn add_assign(&mut self, x: &mut GpuTensor, y: &GpuTensor) -> Result<()> {
        self.check("add", x, y.cols)?;
        self.check("add", y, x.cols)?;
        self.flush_pending()?;
        let pre = Pre::Add { y: y.buf.clone() };
        self.pending = Some(RowOp::new(&x.buf, x.cols, pre, None));
        Ok(())
    }

    fn lm_head(
        &mut self,
        head: &Arc<GpuEmbedding>,
        x: &GpuTensor,
        rows: &[u32],
        logits: &mut GpuTensor,
    ) -> Result<()> {
        let n = self.n();
        self.check("lm_head", x, head.cols)?;
        if n == 0 {
            return Ok(());
        }
        // The shader computes the last row or all rows: other selections wait for the GPU side
        // of per-row steps.
        let last_only = rows == [n as u32 - 1];
        let all = rows.len() == n && rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        if !last_only && !all {
            return Err(BitnetError::Unsupported {
                what: "logit rows on the wgpu backend",
                value: format!("{rows:?} of {n}"),
                hint: "the GPU LM head computes the last row or all rows so far",
            });
        }
        let out_rows = if last_only { 1 } else { n };
        if logits.cols != head.rows || logits.capacity < out_rows {
            return Err(BitnetError::op(
                "lm_head",
                "logits tensor has the wrong shape",
            ));
        }
        let consts = [
            ("COLS", head.cols as f64),
            ("ROW_WORDS", head.row_words as f64),
            ("DTYPE", layout::dtype_code(head.dtype) as f64),
            ("VOCAB", head.rows as f64),
            ("LAST_ONLY", if last_only { 1.0 } else { 0.0 }),
        ];
        for c in &head.chunks {
            let groups = [c.rows.div_ceil(LM_ROWS_PER_WG) as u32, out_rows as u32, 1];
            self.record(
                &kernels::LM_HEAD,
                &consts,
                &[&c.params, &c.data, &x.buf, &logits.buf],
                groups,
            )?;
        }
        Ok(())
    }

    fn read(&mut self, t: &GpuTensor, rows: usize) -> Result<Vec<f32>> {
        if rows > t.capacity {
            return Err(BitnetError::op(
                "read",
                format!("{rows} rows of a [{}, {}] tensor", t.capacity, t.cols),
            ));
        }
        let bytes = self.download(&t.buf, (rows * t.cols * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn argmax_row0(&mut self, logits: &GpuTensor) -> Result<u32> {
        let len = logits.cols;
        let npart = len.div_ceil(ARGMAX_PER_WG).max(1);
        let partial = match self.argmax_partials.get(&logits.buf.id) {
            Some(p) => p.clone(),
            None => {
                let p = self.storage("argmax partials", (npart * 8) as u64, None)?;
                self.argmax_partials.insert(logits.buf.id, p.clone());
                p
            }
        };
        let consts = [("LEN", len as f64), ("NPART", npart as f64)];
        let result = self.argmax_result.clone();
        let bufs = [&logits.buf, &partial, &result];
        self.record(
            &kernels::ARGMAX_PARTIAL,
            &consts,
            &bufs,
            [npart as u32, 1, 1],
        )?;
        self.record(&kernels::ARGMAX_FINAL, &consts, &bufs, [1, 1, 1])?;
        let bytes = self.download(&result, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// The GPU-test policy, in one place: a test that finds no adapter fails when the environment
/// sets `BITNET_REQUIRE_GPU=1` (CI does), and otherwise prints a loud SKIPPED line and gets
/// `None`. Uses `--device gpu` semantics (software adapters such as lavapipe allowed);
/// `BITNET_GPU_ADAPTER` may name the adapter.
pub fn gpu_backend_for_test(test: &str) -> Option<WgpuBackend> {
    let name = std::env::var("BITNET_GPU_ADAPTER").ok();
    match WgpuBackend::new(AdapterChoice::Gpu, name.as_deref()) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("BITNET_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: no GPU adapter and BITNET_REQUIRE_GPU=1: {e}");
            }
            // Straight to the process's stderr: the test harness captures eprintln! output of
            // passing tests, and a skip must not go unnoticed.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no GPU adapter (set BITNET_REQUIRE_GPU=1 to make this an error): {test}: {e}"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_and_tensors_are_send() {
        fn send<T: Send>() {}
        send::<WgpuBackend>();
        send::<GpuTensor>();
        send::<GpuQTensor>();
        send::<GpuLinear>();
        send::<GpuEmbedding>();
        send::<GpuKvCache>();
    }
}
