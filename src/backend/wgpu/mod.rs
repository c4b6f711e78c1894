//! The wgpu backend: every op of [`Backend`] as a WGSL compute kernel (Vulkan, Metal, DX12), so
//! the model graph of `model.rs` runs unchanged on any GPU.
//!
//! Host side, per step: `begin_step` writes the 16-byte `Step` uniform (n_tokens, start_pos) and
//! the token ids through reused upload buffers (no allocation once warm) and opens one command encoder
//! with one compute pass; every op records a dispatch with a pipeline and a bind group that are
//! created on first use and cached (pipelines by kernel and override constants, bind groups by
//! kernel signature and buffer ids); `end_step` submits. The fused ops of the trait are one
//! dispatch each: norm + quantize (shaders/row_ops.wgsl), the matmul with its epilogue (residual
//! add, gated FFN product, or RoPE + KV-cache store of q|k|v; shaders/ternary_matmul.wgsl); in a
//! decode step the norm + quantize is also folded into the next matmul as its prologue
//! (`row_ops.rs`), so a BitNet layer decodes in 6 dispatches. The final norm is the LM head
//! kernel's prologue, and the head leaves each workgroup's best logit of row 0, so the argmax is
//! one more small dispatch (argmax.rs); sampling is one dispatch too (sample.rs). `read` and
//! `argmax_row0` are the sync points: they copy into a reused staging buffer and map it (argmax
//! reads back 4 bytes); a chained decode reads its picks one step late (chain.rs).
//!
//! Reductions: every kernel file is compiled after shaders/common.wgsl and one of two variants
//! of the same reduction functions, shaders/reduce_subgroup.wgsl (where the device has
//! `Features::SUBGROUP` and the variant passes its self-test, shaders/reduce_check.wgsl, when
//! the device opens) or shaders/reduce_workgroup.wgsl (trees in workgroup memory; forced by
//! [`GpuOptions`] / `BITNET_GPU_NO_SUBGROUPS=1`). Kernels take a `Thread` argument and number
//! their threads with `thread_index`, so neither variant needs a second copy of a kernel.
//!
//! Device layouts (see [`layout`] and the .wgsl files for the details and the why):
//! - f32 activations `[capacity, cols]`;
//! - int8 activations 4 per u32, rows padded to 64 columns, plus (scale, Σq) per row;
//! - ternary weights repacked once to `[out, 4·ceil(in/64)]` u32 of 2-bit codes, read by
//!   `dot4I8Packed` without ever being expanded; q|k|v and gate|up concatenated by rows into one
//!   matrix each, every part keeping its own scale;
//! - the embedding / LM head in its file dtype (bf16 exact), or the LM head in the CPU's q8
//!   format (`--lm-head q8`), split by rows over several buffers when larger than
//!   `max_storage_buffer_binding_size`;
//! - the KV cache in f16 (default: pairs of halves packed in u32 words, see [`GpuKvCache`]) or
//!   f32 (`--kv-cache f32`), one `[slots, ctx, kv_dim]` buffer per layer for keys and one for
//!   values.
//!
//! Errors: wgpu reports validation and out-of-memory errors and device loss asynchronously; the
//! backend collects them (uncaptured-error handler, device-lost callback, failed maps/polls) and
//! returns them as `BitnetError::Gpu` from the next op, `end_step`, `read` or `argmax_row0`
//! (`"device lost: ..."` for a lost device), so the caller can fall back to the CPU.

pub mod adapter;
mod argmax;
mod attention;
mod chain;
mod device;
mod embedding;
pub mod kernels;
pub mod layout;
mod matmul;
mod row_ops;
mod sample;
pub mod tiles;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

pub use adapter::{
    check_fits, estimate_memory, list_adapters, select_adapter, AdapterChoice, AdapterSummary,
    MemoryEstimate,
};
pub use attention::{ATTN_SPLIT_MAX_TOKENS, MAX_HEAD_DIM};
pub use matmul::MATVEC_MAX_TOKENS;
pub use sample::{SAMPLE_KMAX, SAMPLE_WMAX};
pub use tiles::TileShapes;

use super::{AttentionShape, Backend, DeviceSample, FfnActivation, HeadFormat, KvDtype, StepRow};
use crate::error::{BitnetError, Result};
use crate::load::{FloatDtype, FloatMatrix};
use crate::ternary::TernaryMatrix;
use device::{BindKey, UploadPool};
use kernels::PipelineCache;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Work done since the backend was created, for the bench and the tests (they take differences
/// over a window of decode steps: dispatches per step, submits per token, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuCounters {
    /// `begin_step` calls.
    pub steps: u64,
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Command buffers submitted to the queue.
    pub submits: u64,
    /// Blocking waits of the host on the device (`poll(wait)` of a read-back).
    pub waits: u64,
    /// Host time spent recording work: from the creation of a command encoder to the return of
    /// its submit, in nanoseconds (includes the model's own host code between ops).
    pub encode_ns: u64,
    /// Chained token ids read back after a later step had already been submitted (the
    /// pipelined greedy decode: token t+1 submitted before token t is read).
    pub lagged_reads: u64,
}

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

/// A ternary matrix (or the row-concatenation of up to 4, e.g. q|k|v) in the device layout of
/// shaders/ternary_matmul.wgsl.
#[derive(Debug)]
pub struct GpuLinear {
    w: GpuBuf,      // [rows, 4 * ceil(cols / 64)] u32, 2-bit codes, the parts one after another
    params: GpuBuf, // uniform Linear { rows, groups, _, _, ends: vec4<u32>, scales: vec4<f32> }
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
    params: GpuBuf, // uniform Chunk { row0, rows, wg0, _ }
    rows: usize,
}

/// A float matrix `[rows, cols]` in its file dtype, split by rows into bindable chunks.
#[derive(Debug)]
pub struct GpuEmbedding {
    chunks: Vec<EmbChunk>,
    head_best: GpuBuf, // [head_wgs] vec2<u32>: the LM head's per-workgroup argmax of logits row 0
    head_wgs: usize,   // LM-head workgroups per logits row, all chunks
    pub rows: usize,
    pub cols: usize,
    pub dtype: FloatDtype, // the source matrix's
    code: u32,             // shaders/embedding.wgsl DTYPE: the dtype's, or layout::Q8_CODE
    row_words: usize,
}

/// Keys and values of every layer (a slot per sequence), bound as `array<u32>`: f16
/// `[slots, ctx, kv_heads, head_dim / 2]` u32 words, word i of a head holding the halves of dims
/// (i, i + head_dim / 2) (the RoPE pair one epilogue thread owns), or f32
/// `[slots, ctx, kv_dim]` bits in the CPU's order.
#[derive(Debug)]
pub struct GpuKvCache {
    k: Vec<GpuBuf>, // layers × [slots, ctx, kv_dim / 2] (f16 pairs) or [slots, ctx, kv_dim] (f32)
    v: Vec<GpuBuf>, // layers × the same
    pub slots: usize,
    pub ctx: usize,
    pub kv_dim: usize,
    pub dtype: KvDtype,
}

/// How to open a GPU device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuOptions {
    /// Use subgroup operations in the kernels' reductions where the adapter has
    /// `Features::SUBGROUP` (and they pass their self-test). Default: on, unless the environment
    /// sets `BITNET_GPU_NO_SUBGROUPS=1` (to compare, or to work around a driver).
    pub subgroups: bool,
    /// Tile sizes of the prefill matmul and the norm prologue; `None`: chosen for the adapter
    /// ([`TileShapes::for_adapter`]) with the environment's overrides.
    pub tiles: Option<TileShapes>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            subgroups: !std::env::var("BITNET_GPU_NO_SUBGROUPS").is_ok_and(|v| v == "1"),
            tiles: None,
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
    subgroup_fallback: Option<String>, // why subgroups are off although the adapter has them
    tiles: TileShapes,                 // the kernels' tile sizes for this adapter
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
    step_buf: GpuBuf, // uniform Step { n_tokens, start_pos, _, _ }
    rows_buf: GpuBuf, // [rows_cap] vec4<u32> (token, pos, slot, 0): the step's rows
    rows_cap: usize,
    tokens: Vec<u32>,       // [n] the step's tokens, host copy
    max_pos: usize,         // the largest position of the step's rows
    max_slot: usize,        // the largest slot of the step's rows
    slot_runs: usize,       // runs of consecutive rows of one slot in the step
    logit_rows_buf: GpuBuf, // [logit_rows_cap] u32: the step rows the LM head computes
    logit_rows_cap: usize,
    logit_rows_host: Vec<u32>, // what logit_rows_buf holds (padded with NO_ROW to the head's HR)
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    uploads: UploadPool,
    staging: Option<wgpu::Buffer>, // MAP_READ, grown to the largest read
    rope_tables: HashMap<(usize, u32), (GpuBuf, usize)>, // (head_dim, θ bits) → ([pos, hd/2] vec2, positions)
    argmax_partials: HashMap<u64, GpuBuf>, // logits id → [ceil(cols / 4096)] vec2<u32>
    argmax_result: GpuBuf,                 // [4] u32
    /// The LM head's argmax epilogue of the last head dispatch: (logits id, the head's
    /// `head_best` [workgroups] vec2<u32>, workgroups), until something else writes the logits.
    head_argmax: Option<(u64, GpuBuf, usize)>,
    positions_hint: usize, // the KV cache length: the size of the RoPE tables
    max_chunk_bytes: Option<u64>,
    upload_scratch: Vec<u32>, // [4 + n] the Step uniform and the tokens, reused
    attn_partials: HashMap<(usize, usize, usize), (GpuBuf, usize)>, // (heads, blocks, hd) → ([tokens, heads, blocks, hd + 2], tokens)
    counters: GpuCounters,
    /// A decode step's `rms_norm_quantize` not emitted yet: the matmul that consumes it runs it
    /// as its prologue (one dispatch for both); anything else emits it first.
    pending_norm: Option<row_ops::PendingNorm>,
    chain: chain::Chain, // chained greedy tokens being read back
    sample_bufs: Option<sample::SampleBufs>, // the sampling kernel's per-step inputs
    encode_start: Option<std::time::Instant>, // when the open command encoder was created
    dummy_r: GpuBuf,     // [4] f32, bound to the unused read-only slots of row_ops
    dummy_rw: GpuBuf,    // [4] f32, bound to its unused read-write slots
    lost: Arc<Mutex<Option<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

fn gpu_err(msg: impl Into<String>) -> BitnetError {
    BitnetError::Gpu(msg.into())
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
    /// f16: half the memory and attention traffic of f32.
    const DEFAULT_KV: KvDtype = KvDtype::F16;

    fn name(&self) -> String {
        let sg = if self.pipelines.subgroups() {
            " (subgroups)"
        } else {
            ""
        };
        format!("wgpu {:?} {}{sg}", self.info.backend, self.info.name)
    }

    fn upload_linears(&mut self, parts: &[&TernaryMatrix]) -> Result<GpuLinear> {
        self.op_upload_linears(parts)
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<GpuVector> {
        self.op_upload_vector(v)
    }

    fn upload_lm_head(
        &mut self,
        m: &FloatMatrix,
        tied: Option<&Arc<GpuEmbedding>>,
        format: HeadFormat,
    ) -> Result<Arc<GpuEmbedding>> {
        self.op_upload_lm_head(m, tied, format)
    }

    fn upload_embedding(&mut self, m: &FloatMatrix) -> Result<Arc<GpuEmbedding>> {
        self.op_upload_embedding(m)
    }

    fn alloc(&mut self, capacity: usize, cols: usize) -> Result<GpuTensor> {
        self.op_alloc(capacity, cols)
    }

    fn alloc_q(&mut self, capacity: usize, cols: usize) -> Result<GpuQTensor> {
        self.op_alloc_q(capacity, cols)
    }

    fn alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
        dtype: KvDtype,
    ) -> Result<GpuKvCache> {
        self.op_alloc_kv_cache(layers, slots, ctx, kv_dim, dtype)
    }

    fn begin_step(&mut self, rows: &[StepRow]) -> Result<()> {
        let rows: Vec<[u32; 3]> = rows.iter().map(|r| [r.token, r.pos, r.slot]).collect();
        self.op_begin_rows(&rows)
    }

    fn end_step(&mut self) -> Result<()> {
        self.op_end_step()
    }

    fn embed(&mut self, emb: &Arc<GpuEmbedding>, out: &mut GpuTensor) -> Result<()> {
        self.op_embed(emb, out)
    }

    fn rms_norm(
        &mut self,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.op_rms_norm(x, w, eps, out)
    }

    fn quantize(&mut self, x: &GpuTensor, out: &mut GpuQTensor) -> Result<()> {
        self.op_quantize(x, out)
    }

    fn rms_norm_quantize(
        &mut self,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        out: &mut GpuQTensor,
    ) -> Result<()> {
        self.op_rms_norm_quantize(x, w, eps, out)
    }

    fn ternary_matmul(&mut self, w: &GpuLinear, x: &GpuQTensor, out: &mut GpuTensor) -> Result<()> {
        self.op_ternary_matmul(w, x, out)
    }

    fn ternary_matmul_add(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        acc: &mut GpuTensor,
    ) -> Result<()> {
        self.op_ternary_matmul_add(w, x, acc)
    }

    fn gate_up(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        act: FfnActivation,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.op_gate_up(w, x, act, out)
    }

    fn qkv_rope_store(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        cache: &mut GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        q: &mut GpuTensor,
    ) -> Result<()> {
        self.op_qkv_rope_store(w, x, cache, layer, shape, q)
    }

    fn attention(
        &mut self,
        q: &GpuTensor,
        cache: &GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.op_attention(q, cache, layer, shape, out)
    }

    fn lm_head(
        &mut self,
        head: &Arc<GpuEmbedding>,
        x: &GpuTensor,
        rows: &[u32],
        logits: &mut GpuTensor,
    ) -> Result<()> {
        self.op_lm_head_rows(head, x, None, rows, logits)
    }

    fn rms_norm_lm_head(
        &mut self,
        head: &Arc<GpuEmbedding>,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        rows: &[u32],
        logits: &mut GpuTensor,
    ) -> Result<()> {
        self.op_lm_head_rows(head, x, Some((w, eps)), rows, logits)
    }

    fn read(&mut self, t: &GpuTensor, rows: usize) -> Result<Vec<f32>> {
        self.op_read(t, rows)
    }

    fn argmax_row0(&mut self, logits: &GpuTensor) -> Result<u32> {
        self.op_argmax_row0(logits)
    }

    fn chains_tokens(&self) -> bool {
        true
    }

    fn argmax_chain(&mut self, logits: &GpuTensor) -> Result<()> {
        self.op_pick_chain(logits, None)
    }

    fn samples_on_device(&self, config: &crate::sampler::SamplerConfig) -> bool {
        self.op_samples_on_device(config)
    }

    fn sample_chain(&mut self, logits: &GpuTensor, s: &DeviceSample) -> Result<()> {
        self.op_pick_chain(logits, Some(s))
    }

    fn begin_step_chained(&mut self, start_pos: usize) -> Result<()> {
        self.op_begin_step_chained(start_pos)
    }

    fn read_chained(&mut self) -> Result<u32> {
        self.op_read_chained()
    }
}

/// The GPU-test policy, in one place: a test that finds no adapter fails when the environment
/// sets `BITNET_REQUIRE_GPU=1` (CI does), and otherwise prints a loud SKIPPED line and gets
/// `None`. Uses `--device gpu` semantics (software adapters such as lavapipe allowed);
/// `BITNET_GPU_ADAPTER` may name the adapter.
pub fn gpu_backend_for_test(test: &str) -> Option<WgpuBackend> {
    gpu_backend_for_test_with(test, GpuOptions::default())
}

/// [`gpu_backend_for_test`] with explicit options (tests of both reduction variants).
pub fn gpu_backend_for_test_with(test: &str, options: GpuOptions) -> Option<WgpuBackend> {
    let name = std::env::var("BITNET_GPU_ADAPTER").ok();
    match WgpuBackend::new_with(AdapterChoice::Gpu, name.as_deref(), options) {
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
