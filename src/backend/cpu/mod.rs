//! The CPU backend: plain Rust over a small spinning thread pool (`pool.rs`), with SIMD kernels
//! where they pay. The ops are also the references the WGSL kernels are tested against, so
//! clarity wins over cleverness; the ternary matmul walks the packed bytes directly (4 output
//! rows per byte row) and never expands weights to floats.
//!
//! Layout: this file holds the tensors and the [`Backend`] impl; `matmul.rs` the ternary matmul's
//! strategies (decode, prefill, AMX) and the LM head; `dispatch.rs` the kernel levels and the
//! safe entry points of the kernels, which live per instruction set in `x86/` (AVX2 and AVX-512
//! side by side, AMX) and `arm/` (NEON); `reference.rs` every scalar twin; `q8.rs` the 8-bit LM
//! head; `pool.rs` the thread pool; `topology.rs` the default thread count.

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    pub mod neon;
}
pub mod aligned;
pub mod dispatch;
mod matmul;
pub mod pool;
pub mod q4;
pub mod q8;
pub mod reference;
mod topology;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use std::cell::RefCell;
use std::sync::Arc;

use super::{
    check_attention, check_fused_rows, check_step_rows, check_tensor, AttentionShape, Backend,
    FfnActivation, HeadFormat, KvDtype, StepRow,
};
use crate::error::{BitnetError, Result};
use crate::load::FloatMatrix;
use crate::ternary::TernaryMatrix;
use aligned::AlignedVec;
pub use dispatch::KvElem;
use dispatch::{absmax_f32, quantize_i8, rows_times_runs, softmax_f32, CpuLevel};
use pool::SpinPool;
use q4::Q4Matrix;
use q8::Q8Matrix;
pub use reference::{argmax, rope_head};
use reference::{rms_norm_row, rope_angles, rope_head_with, scale_from_absmax};
pub use topology::default_threads;

/// f32 activations `[capacity, cols]`, row-major.
#[derive(Debug, Clone, Default)]
pub struct CpuTensor {
    pub data: AlignedVec<f32>, // [capacity, cols]
    pub capacity: usize,
    pub cols: usize,
}

/// int8 activations `[capacity, cols]` plus the per-row scale `s = 127 / absmax`.
#[derive(Debug, Clone)]
pub struct CpuQTensor {
    pub q: AlignedVec<i8>, // [capacity, cols]
    pub scales: Vec<f32>,  // [capacity]
    pub sums: Vec<i32>,    // [capacity]  Σ q over the row, for the Σq·code − Σq trick
    /// With the AMX level only: the rows again as AMX B tiles (`x86/amx.rs`),
    /// `[capacity / 16 rounded up to even, padded_cols / 4, 16, 4]`.
    pub tiles: AlignedVec<i8>,
    /// Rows of the current step that `tiles` holds (0: none; the matmul then reads `q`).
    pub tiles_rows: usize,
    pub capacity: usize,
    pub cols: usize,
}

/// A ternary matrix on the CPU: the row-concatenation of `parts` (q, k, v or gate, up), each
/// in the packed layout of `ternary.rs` (shared with the checkpoint, no copy) with its own
/// `out_scale`; the matmul runs the parts one after the other into their columns of one output.
#[derive(Debug, Clone)]
pub struct CpuLinear {
    pub parts: Vec<TernaryMatrix>,
    pub name: String,
    pub rows: usize, // Σ rows of the parts
    pub cols: usize,
    /// Per part, the weights repacked for the table-lookup kernel where this backend uses it
    /// (`CpuBackend::uses_lut`, `x86/avx512_lut.rs`), else empty.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) lut: Vec<Option<Arc<LutWeights>>>,
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::avx512_lut::LutWeights;
/// The table-lookup kernel is x86-64 only: nothing is ever repacked elsewhere.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug)]
pub(crate) enum LutWeights {}

#[cfg(not(target_arch = "x86_64"))]
impl LutWeights {
    pub fn bytes(&self) -> usize {
        match *self {}
    }
}

/// Keys and values of every layer and slot in one element type (f32 or f16, see [`KvElem`]).
pub struct KvPlanes<T: KvElem> {
    /// Keys transposed, `[layers, slots, kv_dim, ctx]`: a query's scores over all positions are
    /// then `head_dim` contiguous axpys (no per-position dot product and horizontal sum).
    pub k: AlignedVec<T>, // [layers, slots, kv_dim, ctx]
    pub v: AlignedVec<T>, // [layers, slots, ctx, kv_dim]
}

impl<T: KvElem> KvPlanes<T> {
    fn zeroed(len: usize) -> Self {
        KvPlanes {
            k: AlignedVec::zeroed(len),
            v: AlignedVec::zeroed(len),
        }
    }
}

/// The KV cache's storage: f32 (the exact semantics, the CPU's default) or f16
/// (`--kv-cache f16`, as the GPU's).
pub enum KvStore {
    F32(KvPlanes<f32>),
    F16(KvPlanes<half::f16>),
}

/// Keys and values of every layer and slot.
pub struct CpuKvCache {
    pub store: KvStore,
    pub slots: usize,
    pub ctx: usize,
    pub kv_dim: usize,
}

impl CpuKvCache {
    /// Elements per plane (keys or values), all layers.
    fn len(&self) -> usize {
        match &self.store {
            KvStore::F32(p) => p.k.len(),
            KvStore::F16(p) => p.k.len(),
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self.store {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::F16(_) => KvDtype::F16,
        }
    }
}

/// The CPU LM head: the checkpoint's floats (shared with the embedding when tied), or the
/// 8-bit copy of `--lm-head q8`, or the 4-bit copy of `--lm-head q4`.
#[derive(Debug, Clone)]
pub enum CpuLmHead {
    Exact(FloatMatrix), // [vocab, hidden] file dtype
    Q8(Q8Matrix),       // [vocab, hidden] int8 + [vocab, hidden / 64] scales
    Q4(Q4Matrix),       // [vocab, hidden / 2] 4-bit codes + [vocab, hidden / 32] bf16 steps
}

impl CpuLmHead {
    fn rows(&self) -> usize {
        match self {
            CpuLmHead::Exact(m) => m.rows,
            CpuLmHead::Q8(m) => m.rows,
            CpuLmHead::Q4(m) => m.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            CpuLmHead::Exact(m) => m.cols,
            CpuLmHead::Q8(m) => m.cols,
            CpuLmHead::Q4(m) => m.cols,
        }
    }
}

pub struct CpuBackend {
    pool: SpinPool,
    threads: usize,
    rows: Vec<StepRow>,     // [n] the current step's rows (token, position, slot)
    token_factor: Vec<f32>, // [n] out_scale / activation scale, for the ternary matmul
    rope_table: Vec<(f32, f32)>, // [n, head_dim/2] (cos, sin) of the step's positions
    rope_pos: Vec<u32>,     // [n] positions rope_table was built for
    rope_key: Option<(usize, u32)>, // (head_dim, θ bits) of rope_table
    /// `[n, cols]` a fused op's intermediate (the normed rows, the raw q|k|v or gate|up, the
    /// matmul before the residual add), reused across ops and steps.
    scratch: CpuTensor,
    level: CpuLevel,
    /// `[tokens, tables per token]` the table-lookup kernel's tables for a chunk of tokens.
    #[cfg(target_arch = "x86_64")]
    lut_tables: Vec<x86::avx512_lut::Line>,
    /// The AMX-BF16 head's activation tiles of a step, reused across steps.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    head_tiles: x86::amx::HeadActivations,
    use_lut: bool, // repack ternary weights for the table-lookup kernel (see `uses_lut`)
    /// Bytes of the table-lookup copies made by `upload_linears` (0 where the kernel is unused).
    table_copy_bytes: u64,
}

impl CpuBackend {
    /// Bytes of the ternary weights' table-lookup copies this backend made (the AVX-512 VNNI
    /// level keeps one beside the 2-bit rows for steps of 2+ tokens; `BITNET_CPU_NO_LUT=1` turns
    /// it off), 0 elsewhere.
    pub fn table_copy_bytes(&self) -> u64 {
        self.table_copy_bytes
    }

    /// Takes the scratch tensor sized `[n, cols]` (given back by `put_scratch`).
    fn take_scratch(&mut self, cols: usize) -> CpuTensor {
        let mut t = std::mem::take(&mut self.scratch);
        let n = self.n();
        if t.data.len() < n * cols {
            t.data.resize(n * cols, 0.0);
        }
        t.capacity = t.data.len() / cols.max(1);
        t.cols = cols;
        t
    }

    fn put_scratch(&mut self, t: CpuTensor) {
        self.scratch = t;
    }

    /// The (cos, sin) of every row of the step for `head_dim` and θ, `[n, head_dim/2]`, rebuilt
    /// only when the step's positions (or the head shape) change: shared by q and k of every
    /// layer.
    fn rope_table(&mut self, shape: &AttentionShape) {
        let (n, hd) = (self.n(), shape.head_dim);
        let key = (hd, shape.rope_theta.to_bits());
        let same_pos = self.rope_pos.len() == n
            && self
                .rope_pos
                .iter()
                .zip(&self.rows)
                .all(|(&p, r)| p == r.pos);
        if self.rope_key != Some(key) || !same_pos {
            self.rope_table.resize(n * hd / 2, (0.0, 0.0));
            self.rope_pos.clear();
            for (r, angles) in self
                .rows
                .iter()
                .zip(self.rope_table.chunks_exact_mut(hd / 2))
            {
                rope_angles(r.pos as usize, hd, shape.rope_theta, angles);
                self.rope_pos.push(r.pos);
            }
            self.rope_key = Some(key);
        }
    }

    /// `threads = 0` means [`default_threads`].
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            default_threads()
        } else {
            threads
        };
        let pool = SpinPool::new(threads).map_err(|e| {
            BitnetError::InvalidArgument(format!("cannot start {threads} threads: {e}"))
        })?;
        Ok(CpuBackend {
            pool,
            threads,
            rows: Vec::new(),
            token_factor: Vec::new(),
            rope_table: Vec::new(),
            rope_pos: Vec::new(),
            rope_key: None,
            scratch: CpuTensor::default(),
            level: CpuLevel::detect(),
            #[cfg(target_arch = "x86_64")]
            lut_tables: Vec::new(),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            head_tiles: Default::default(),
            use_lut: !std::env::var("BITNET_CPU_NO_LUT").is_ok_and(|v| v == "1"),
            table_copy_bytes: 0,
        })
    }

    /// Forces a kernel level (tests compare levels; the level must be one `available()` lists).
    #[cfg(test)]
    pub(crate) fn with_level(mut self, level: CpuLevel) -> Result<Self> {
        if !CpuLevel::available().contains(&level) {
            return Err(BitnetError::InvalidArgument(format!(
                "CPU kernel level {} is not available on this machine",
                level.name()
            )));
        }
        self.level = level;
        Ok(self)
    }

    pub fn level(&self) -> CpuLevel {
        self.level
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn n(&self) -> usize {
        self.rows.len()
    }

    fn check(&self, op: &'static str, t: &CpuTensor, cols: usize) -> Result<()> {
        check_tensor(op, t.capacity, t.cols, self.n(), cols)
    }

    /// The attention shape, `q`/`out` `[n, heads·hd]`, the step's rows against the cache's
    /// slots and positions, and `layer` against its layers.
    fn check_cache(
        &self,
        op: &'static str,
        shape: &AttentionShape,
        q: &CpuTensor,
        out: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
    ) -> Result<()> {
        check_attention(
            op,
            shape,
            self.n(),
            [q, out].map(|t| (t.capacity, t.cols)),
            (cache.kv_dim, cache.ctx),
            self.rows
                .iter()
                .map(|r| r.pos as usize + 1)
                .max()
                .unwrap_or(0),
        )?;
        check_step_rows(&self.rows, cache.slots, cache.ctx)?;
        let per_layer = cache.slots * cache.ctx * cache.kv_dim;
        if (layer + 1) * per_layer > cache.len() {
            return Err(BitnetError::op(
                op,
                format!("no layer {layer} in the cache"),
            ));
        }
        Ok(())
    }

    /// [`Backend::attention`] over the cache's keys and values in their element type.
    fn attention_over<T: KvElem>(
        &self,
        q: &CpuTensor,
        planes: &KvPlanes<T>,
        cache: &CpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut CpuTensor,
    ) {
        let (n, hd) = (self.n(), shape.head_dim);
        let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
        let (ctx, slots) = (cache.ctx, cache.slots);
        // [slots, ctx, kv_dim] and [slots, kv_dim, ctx] of this layer, slot s at s * ctx * kvd
        let slot_base = move |slot: u32| (layer * slots + slot as usize) * ctx * kvd;
        let (kc, vc) = (&planes.k, &planes.v);
        let rows = &self.rows;
        let group = shape.n_heads / shape.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let level = self.level;
        thread_local! {
            // [rows, len] scores, then probabilities, [rows, head_dim] scaled queries and
            // [rows, head_dim] outputs of one work item: buffers per thread, grown as needed.
            static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
        }
        // The query heads h0 .. h0 + heads of the step rows `ts` (one row, or two consecutive
        // rows of one slot, whose positions differ by one) over their kv head `h0 / group`: the
        // kernels take the rows' heads as one `[ts·heads, ·]` block of `a`, so each key and
        // value is loaded once for all of them. The first row's scores stop one position
        // short of the second's; its probability there is 0, which adds exactly 0.
        let attend = |ts: &[usize], h0: usize, heads: usize, out: &mut [&mut [f32]]| {
            SCRATCH.with_borrow_mut(|[scores, qs, o]| {
                let last = rows[ts[ts.len() - 1]];
                let len = last.pos as usize + 1; // causal: positions 0..=pos of its slot
                let kvh = h0 / group;
                let (kc, vc) = (&kc[slot_base(last.slot)..], &vc[slot_base(last.slot)..]);
                let m = ts.len() * heads; // rows of a: [token of ts, head]
                qs.clear(); // [m, hd]
                for &t in ts {
                    let q = &q.data[t * qd + h0 * hd..t * qd + (h0 + heads) * hd];
                    qs.extend(q.iter().map(|&v| v * scale));
                }
                scores.clear();
                scores.resize(m * len, 0.0); // [m, len]

                // scores[r][j] = Σ_d qs[r][d] · K[j][d], with K stored as [kv_dim, ctx]
                let keys = &kc[kvh * hd * ctx..]; // rows d: component d of every key
                rows_times_runs(level, qs, m, hd, keys, ctx, len, scores);
                for (i, &t) in ts.iter().enumerate() {
                    let own = rows[t].pos as usize + 1;
                    for s in scores[i * heads * len..(i + 1) * heads * len].chunks_exact_mut(len) {
                        softmax_f32(level, &mut s[..own]);
                        s[own..].fill(0.0);
                    }
                }
                // o[r] = Σ_j p[r][j] · V[j]
                o.clear();
                o.resize(m * hd, 0.0); // [m, hd]
                let values = &vc[kvh * hd..]; // rows j: value j of this kv head
                rows_times_runs(level, scores, m, len, values, kvd, hd, o);
                for (out, o) in out.iter_mut().zip(o.chunks_exact(heads * hd)) {
                    out.copy_from_slice(o);
                }
            })
        };
        // Prefill, where the kernel's register block holds two rows' heads of one kv head: a
        // work item is two consecutive rows (positions p and p + 1 of one slot: they read the
        // same keys and values but the last) and every kv head, the two rows' heads going
        // through the kernels together, which loads each key and value once for twice the
        // multiply-adds (1.1× on AVX-512 with an f32 cache, 1.3× with f16, BENCHMARKS.md).
        // Otherwise one row and the query heads of one kv head (one pass over its keys and
        // values serves them all), or a single head when that would leave too few items to
        // keep every thread busy (a decode step has n_kv_heads groups).
        if 2 * group <= level.rows_times_runs_block() && n >= 8 * self.threads {
            self.pool
                .for_each_chunk_mut(&mut out.data[..n * qd], 2 * qd, |idx, o| {
                    let t = 2 * idx;
                    let paired = o.len() == 2 * qd
                        && rows[t + 1].slot == rows[t].slot
                        && rows[t + 1].pos == rows[t].pos + 1;
                    let (o0, o1) = o.split_at_mut(qd.min(o.len())); // rows t and t + 1
                    for h0 in (0..shape.n_heads).step_by(group) {
                        let span = h0 * hd..(h0 + group) * hd;
                        if paired {
                            attend(
                                &[t, t + 1],
                                h0,
                                group,
                                &mut [&mut o0[span.clone()], &mut o1[span]],
                            );
                        } else {
                            attend(&[t], h0, group, &mut [&mut o0[span.clone()]]);
                            if !o1.is_empty() {
                                attend(&[t + 1], h0, group, &mut [&mut o1[span]]);
                            }
                        }
                    }
                });
            return;
        }
        let heads = if n * shape.n_kv_heads >= 4 * self.threads {
            group
        } else {
            1
        };
        self.pool
            .for_each_chunk_mut(&mut out.data[..n * qd], heads * hd, |idx, o| {
                let per_token = shape.n_heads / heads;
                let (t, h0) = (idx / per_token, idx % per_token * heads);
                attend(&[t], h0, heads, &mut [o]);
            });
    }
}

/// Writes the k and v parts of each step row of `qkv` (`[n, qd + 2·kvd]` q | k | v) into the
/// row's slot and position of layer `layer` (`at` = (layer, slots, ctx)), as `T` stores them.
fn store_kv<T: KvElem>(
    planes: &mut KvPlanes<T>,
    rows: &[StepRow],
    qkv: &[f32],
    (layer, slots, ctx): (usize, usize, usize),
    (qd, kvd): (usize, usize),
) {
    let wd = qd + 2 * kvd;
    for (t, r) in rows.iter().enumerate() {
        // [slots, ctx, kv_dim] and [slots, kv_dim, ctx] of this layer
        let (base, p) = (
            (layer * slots + r.slot as usize) * ctx * kvd,
            r.pos as usize,
        );
        let row = &qkv[t * wd..(t + 1) * wd];
        let vrow = &mut planes.v[base + p * kvd..base + (p + 1) * kvd];
        for (dst, &x) in vrow.iter_mut().zip(&row[qd + kvd..]) {
            *dst = T::store(x);
        }
        let kt = &mut planes.k[base..base + kvd * ctx]; // [kv_dim, ctx]
        for (e, krow) in kt.chunks_exact_mut(ctx).enumerate() {
            krow[p] = T::store(row[qd + e]);
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type QTensor = CpuQTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type Embedding = FloatMatrix;
    type Head = CpuLmHead;
    type KvCache = CpuKvCache;
    /// f32: the exact semantics; f16 halves the cache on request.
    const DEFAULT_KV: KvDtype = KvDtype::F32;

    fn name(&self) -> String {
        format!("cpu {} ({} threads)", self.level.name(), self.threads)
    }

    fn upload_linears(&mut self, parts: &[&TernaryMatrix]) -> Result<CpuLinear> {
        let Some(first) = parts.first() else {
            return Err(BitnetError::op("upload_linears", "no matrices"));
        };
        if let Some(p) = parts.iter().find(|p| p.cols != first.cols) {
            return Err(BitnetError::op(
                "upload_linears",
                format!(
                    "{}: {} columns, {} has {}",
                    p.name, p.cols, first.name, first.cols
                ),
            ));
        }
        let lut: Vec<Option<Arc<LutWeights>>> = parts
            .iter()
            .map(|&p| self.repack_for_lut(p).map(Arc::new))
            .collect();
        self.table_copy_bytes += lut.iter().flatten().map(|l| l.bytes() as u64).sum::<u64>();
        Ok(CpuLinear {
            lut,
            parts: parts.iter().map(|&p| p.clone()).collect(),
            name: parts
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
        })
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn upload_embedding(&mut self, m: &FloatMatrix) -> Result<FloatMatrix> {
        Ok(m.clone())
    }

    fn upload_lm_head(
        &mut self,
        m: &FloatMatrix,
        _tied: Option<&FloatMatrix>,
        format: HeadFormat,
    ) -> Result<CpuLmHead> {
        Ok(match format {
            // A clone shares the bytes (memory map or Arc), tied or not.
            // (Load-time work runs on rayon's global pool; the spin pool is for the forward pass.)
            HeadFormat::Exact => {
                m.data.prefault();
                CpuLmHead::Exact(m.clone())
            }
            HeadFormat::Q8 => {
                let row_bytes = m.dtype.row_bytes(m.cols);
                let q8 = Q8Matrix::quantize(m, |rows| {
                    m.data.release(rows.start * row_bytes..rows.end * row_bytes)
                });
                CpuLmHead::Q8(q8)
            }
            HeadFormat::Q4 => {
                let row_bytes = m.dtype.row_bytes(m.cols);
                let q4 = Q4Matrix::quantize(m, |rows| {
                    m.data.release(rows.start * row_bytes..rows.end * row_bytes)
                });
                CpuLmHead::Q4(q4)
            }
        })
    }

    fn alloc(&mut self, capacity: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            data: AlignedVec::zeroed(capacity * cols),
            capacity,
            cols,
        })
    }

    fn alloc_q(&mut self, capacity: usize, cols: usize) -> Result<CpuQTensor> {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let tiles = if self.uses_amx(capacity) {
            AlignedVec::zeroed(x86::amx::packed_activations_len(capacity, cols))
        } else {
            AlignedVec::default()
        };
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let tiles = AlignedVec::default();
        Ok(CpuQTensor {
            q: AlignedVec::zeroed(capacity * cols),
            scales: vec![0.0; capacity],
            sums: vec![0; capacity],
            tiles,
            tiles_rows: 0,
            capacity,
            cols,
        })
    }

    /// f32 (the exact semantics) or f16 (half the memory; the attention kernels convert each
    /// half as they load it and compute in f32).
    fn alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
        dtype: KvDtype,
    ) -> Result<CpuKvCache> {
        let len = layers
            .checked_mul(slots)
            .and_then(|x| x.checked_mul(ctx))
            .and_then(|x| x.checked_mul(kv_dim))
            .ok_or_else(|| BitnetError::op("alloc_kv_cache", "size overflows"))?;
        let store = match dtype {
            KvDtype::F32 => KvStore::F32(KvPlanes::zeroed(len)),
            KvDtype::F16 => KvStore::F16(KvPlanes::zeroed(len)),
        };
        Ok(CpuKvCache {
            store,
            slots,
            ctx,
            kv_dim,
        })
    }

    fn begin_step(&mut self, rows: &[StepRow]) -> Result<()> {
        // slots and ctx are the cache's: `attention` checks them against it
        check_step_rows(rows, usize::MAX, usize::MAX)?;
        self.rows.clear();
        self.rows.extend_from_slice(rows);
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        Ok(())
    }

    fn embed(&mut self, emb: &FloatMatrix, out: &mut CpuTensor) -> Result<()> {
        self.check("embed", out, emb.cols)?;
        for (t, &StepRow { token: id, .. }) in self.rows.iter().enumerate() {
            if id as usize >= emb.rows {
                return Err(BitnetError::TokenOutOfRange {
                    id,
                    vocab_size: emb.rows,
                });
            }
            emb.row_f32(id as usize, &mut out.data[t * emb.cols..(t + 1) * emb.cols]);
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let cols = w.len();
        self.check("rms_norm", x, cols)?;
        self.check("rms_norm", out, cols)?;
        let n = self.n();
        // Rows in parallel (a decode step's single row runs inline).
        self.pool
            .for_each_chunk_mut(&mut out.data[..n * cols], cols, |t, or| {
                rms_norm_row(&x.data[t * cols..(t + 1) * cols], w, eps, or)
            });
        Ok(())
    }

    fn quantize(&mut self, x: &CpuTensor, out: &mut CpuQTensor) -> Result<()> {
        let (n, cols) = (self.n(), x.cols);
        self.check("quantize", x, out.cols)?;
        if out.capacity < n {
            return Err(BitnetError::op("quantize", "output has too few rows"));
        }
        // Rows in parallel, one field per region (each borrows one output mutably); a decode
        // step's single row runs inline.
        let (xs, level) = (&x.data, self.level);
        let row = |t: usize| &xs[t * cols..(t + 1) * cols]; // [cols]
        self.pool
            .for_each_chunk_mut(&mut out.scales[..n], 1, |t, s| {
                s[0] = scale_from_absmax(absmax_f32(level, row(t)));
            });
        let scales = &out.scales;
        self.pool
            .for_each_chunk_mut(&mut out.q[..n * cols], cols, |t, q| {
                quantize_i8(level, row(t), scales[t], q)
            });
        let q = &out.q;
        self.pool
            .for_each_chunk_mut(&mut out.sums[..n], 1, |t, sum| {
                sum[0] = q[t * cols..(t + 1) * cols].iter().map(|&v| v as i32).sum();
            });
        out.tiles_rows = 0;
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if self.uses_amx(n) {
            use x86::amx::{pack_activation_block, packed_activations_len, padded_cols};
            let len = packed_activations_len(n, cols);
            if out.tiles.len() >= len {
                // blocks of 16 rows in parallel; the block that pads to an even count is zeros
                let q = &out.q;
                let block = 16 * padded_cols(cols);
                self.pool
                    .for_each_chunk_mut(&mut out.tiles[..len], block, |b, tiles| {
                        let (t0, t1) = ((16 * b).min(n), (16 * b + 16).min(n));
                        pack_activation_block(&q[t0 * cols..t1 * cols], cols, tiles);
                    });
                out.tiles_rows = n;
            }
        }
        Ok(())
    }

    fn rms_norm_quantize(
        &mut self,
        x: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
        out: &mut CpuQTensor,
    ) -> Result<()> {
        self.check("rms_norm_quantize", x, w.len())?;
        let mut xn = self.take_scratch(w.len()); // [n, cols] normed rows
        let r = self
            .rms_norm(x, w, eps, &mut xn)
            .and_then(|_| self.quantize(&xn, out));
        self.put_scratch(xn);
        r
    }

    fn ternary_matmul(&mut self, w: &CpuLinear, x: &CpuQTensor, out: &mut CpuTensor) -> Result<()> {
        self.matmul(w, x, out)
    }

    fn ternary_matmul_add(
        &mut self,
        w: &CpuLinear,
        x: &CpuQTensor,
        acc: &mut CpuTensor,
    ) -> Result<()> {
        self.check("ternary_matmul_add", acc, w.rows)?;
        let mut y = self.take_scratch(w.rows); // [n, out] the product
        let r = self.matmul(w, x, &mut y);
        if r.is_ok() {
            let (len, cols) = (self.n() * acc.cols, acc.cols);
            self.pool
                .for_each_chunk_mut(&mut acc.data[..len], cols, |t, a| {
                    for (a, b) in a.iter_mut().zip(&y.data[t * cols..(t + 1) * cols]) {
                        *a += b;
                    }
                });
        }
        self.put_scratch(y);
        r
    }

    fn gate_up(
        &mut self,
        w: &CpuLinear,
        x: &CpuQTensor,
        act: FfnActivation,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let i = out.cols;
        check_fused_rows("gate_up", &w.name, w.rows, 2 * i)?;
        self.check("gate_up", out, i)?;
        let mut gu = self.take_scratch(2 * i); // [n, 2i] gate | up
        let r = self.matmul(w, x, &mut gu);
        if r.is_ok() {
            let n = self.n();
            let gu = &gu.data;
            self.pool
                .for_each_chunk_mut(&mut out.data[..n * i], i, |t, o| {
                    let (g, u) = gu[t * 2 * i..(t + 1) * 2 * i].split_at(i);
                    match act {
                        FfnActivation::Relu2 => reference::relu2_mul_row(g, u, o),
                        FfnActivation::Silu => reference::silu_mul_row(g, u, o),
                    }
                });
        }
        self.put_scratch(gu);
        r
    }

    fn qkv_rope_store(
        &mut self,
        w: &CpuLinear,
        x: &CpuQTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        q: &mut CpuTensor,
    ) -> Result<()> {
        let (n, hd) = (self.n(), shape.head_dim);
        let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
        let wd = qd + 2 * kvd;
        check_fused_rows("qkv_rope_store", &w.name, w.rows, wd)?;
        self.check_cache("qkv_rope_store", shape, q, q, cache, layer)?;
        let mut qkv = self.take_scratch(wd); // [n, qd + 2·kvd] q | k | v
        if let Err(e) = self.matmul(w, x, &mut qkv) {
            self.put_scratch(qkv);
            return Err(e);
        }
        self.rope_table(shape);
        let table = &self.rope_table; // [n, hd/2] (cos, sin)
        let rope_row = |t: usize, heads: &mut [f32]| {
            let angles = &table[t * hd / 2..(t + 1) * hd / 2];
            for head in heads.chunks_exact_mut(hd) {
                rope_head_with(head, angles);
            }
        };
        // q: copied out and rotated; k: rotated in place
        self.pool
            .for_each_chunk_mut(&mut q.data[..n * qd], qd, |t, row| {
                row.copy_from_slice(&qkv.data[t * wd..t * wd + qd]);
                rope_row(t, row);
            });
        self.pool
            .for_each_chunk_mut(&mut qkv.data[..n * wd], wd, |t, row| {
                rope_row(t, &mut row[qd..qd + kvd]);
            });
        let (ctx, slots) = (cache.ctx, cache.slots);
        let at = (layer, slots, ctx);
        match &mut cache.store {
            KvStore::F32(p) => store_kv(p, &self.rows, &qkv.data, at, (qd, kvd)),
            KvStore::F16(p) => store_kv(p, &self.rows, &qkv.data, at, (qd, kvd)),
        }
        self.put_scratch(qkv);
        Ok(())
    }

    fn attention(
        &mut self,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut CpuTensor,
    ) -> Result<()> {
        self.check_cache("attention", shape, q, out, cache, layer)?;
        match &cache.store {
            KvStore::F32(p) => self.attention_over(q, p, cache, layer, shape, out),
            KvStore::F16(p) => self.attention_over(q, p, cache, layer, shape, out),
        }
        Ok(())
    }

    fn lm_head(
        &mut self,
        head: &CpuLmHead,
        x: &CpuTensor,
        rows: &[u32],
        logits: &mut CpuTensor,
    ) -> Result<()> {
        self.head_logits(head, x, rows, logits)
    }

    fn rms_norm_lm_head(
        &mut self,
        head: &CpuLmHead,
        x: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
        rows: &[u32],
        logits: &mut CpuTensor,
    ) -> Result<()> {
        self.norm_head_logits(head, x, (w, eps), rows, logits)
    }

    fn read(&mut self, t: &CpuTensor, rows: usize) -> Result<Vec<f32>> {
        Ok(t.data[..rows * t.cols].to_vec())
    }

    fn argmax_row0(&mut self, logits: &CpuTensor) -> Result<u32> {
        Ok(argmax(&logits.data[..logits.cols]) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ternary::{pack_ternary, ByteStorage};
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    fn random_ternary(r: &mut impl Rng, name: &str, rows: usize, cols: usize) -> TernaryMatrix {
        let w: Vec<i8> = (0..rows * cols).map(|_| r.random_range(-1..=1)).collect();
        let packed = pack_ternary(&w, rows, cols).unwrap();
        let scale = r.random_range(0.2f32..3.0);
        TernaryMatrix::new(
            name,
            rows,
            cols,
            ByteStorage::Owned(Arc::new(packed)),
            scale,
        )
        .unwrap()
    }

    fn tensor(data: Vec<f32>, capacity: usize, cols: usize) -> CpuTensor {
        let mut data = data;
        data.resize(capacity * cols, 0.0);
        CpuTensor {
            data: data.into(),
            capacity,
            cols,
        }
    }

    /// The scalar composition: `ternary_dot_rows_scalar` per part, scaled as the backend does
    /// (`acc as f32 · (out_scale / s)`), parts side by side: `[n, Σ rows]`.
    fn reference_matmul(parts: &[&TernaryMatrix], q: &[i8], scales: &[f32]) -> Vec<f32> {
        let cols = parts[0].cols;
        let mut out = Vec::new();
        for (t, &s) in scales.iter().enumerate() {
            for p in parts {
                let mut acc = vec![0i32; p.rows];
                reference::ternary_dot_rows_scalar(p, &q[t * cols..(t + 1) * cols], &mut acc);
                let f = p.out_scale / s;
                out.extend(acc.iter().map(|&a| a as f32 * f));
            }
        }
        out
    }

    fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, (g, e)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == e.to_bits(),
                "{what}: index {k}: got {g}, expected {e}"
            );
        }
    }

    /// A matrix with per-block scales (GGUF TQ files whose blocks differ) against the float64
    /// composition `out_scale / s · Σ_b d[r, b] · Σ_{k in b} w·q`, on every level this machine
    /// runs, 1 and 3 threads, decode and prefill steps; blocks of 256 with a short last one,
    /// scales of both signs and zero, and its concatenation with a plain part.
    #[test]
    fn block_scaled_matmul_equals_the_float64_composition() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(91);
        let (rows, cols, block) = (20usize, 600usize, 256usize);
        let nb = cols.div_ceil(block);
        let w = random_ternary(&mut r, "blocks", rows, cols);
        let d: Vec<f32> = (0..rows * nb)
            .map(|k| match k % 7 {
                0 => 0.0,
                1 => -r.random_range(0.1f32..2.0),
                _ => r.random_range(0.1f32..2.0),
            })
            .collect();
        let wb = w.clone().with_block_scales(block, d.clone()).unwrap();
        let plain = random_ternary(&mut r, "plain", 8, cols);
        for level in CpuLevel::available() {
            for threads in [1, 3] {
                let mut b = CpuBackend::new(threads).unwrap().with_level(level).unwrap();
                let lin = b.upload_linears(&[&wb, &plain]).unwrap();
                for n in [1usize, 5] {
                    let x: Vec<f32> = (0..n * cols)
                        .map(|_| r.random_range(-2.0f32..2.0))
                        .collect();
                    let xt = tensor(x, n, cols);
                    let mut q = b.alloc_q(n, cols).unwrap();
                    let mut out = tensor(Vec::new(), n, rows + 8);
                    let tokens: Vec<u32> = (0..n as u32).collect();
                    b.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    b.quantize(&xt, &mut q).unwrap();
                    b.ternary_matmul(&lin, &q, &mut out).unwrap();
                    b.end_step().unwrap();
                    for t in 0..n {
                        let qt = &q.q[t * cols..(t + 1) * cols];
                        for row in 0..rows {
                            let mut want = 0f64;
                            for (k, &v) in qt.iter().enumerate() {
                                let s = d[row * nb + k / block] as f64;
                                want += s * (w.get(row, k) as i32 * v as i32) as f64;
                            }
                            want *= w.out_scale as f64 / q.scales[t] as f64;
                            let got = out.data[t * (rows + 8) + row] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 + 1e-5 * want.abs(),
                                "{level:?} threads {threads} n {n} token {t} row {row}: got {got}, expected {want}"
                            );
                        }
                        // the plain part beside it keeps its own single scale
                        let mut acc = vec![0i32; 8];
                        reference::ternary_dot_rows_scalar(&plain, qt, &mut acc);
                        for (i, &a) in acc.iter().enumerate() {
                            let want = a as f32 * (plain.out_scale / q.scales[t]);
                            let got = out.data[t * (rows + 8) + rows + i];
                            assert_eq!(got.to_bits(), want.to_bits(), "plain part row {i}");
                        }
                    }
                }
            }
        }
        // a scale vector of the wrong length, or a non-finite scale, is refused by name
        let e = w
            .clone()
            .with_block_scales(block, vec![1.0; 5])
            .unwrap_err();
        assert!(e.to_string().contains("blocks"), "{e}");
        let mut bad = d.clone();
        bad[4] = f32::NAN;
        let e = w.with_block_scales(block, bad).unwrap_err();
        assert!(e.to_string().contains("row 1 block 1"), "{e}");
    }

    /// The final norm + LM head equals `rms_norm` then `lm_head` bit for bit, for every head
    /// format, any subset of the rows in any order, on 1 and 3 threads.
    #[test]
    fn rms_norm_lm_head_equals_norm_then_head() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(78);
        let (vocab, h, n) = (300usize, 136usize, 5usize);
        let m = q8::tests::bf16_matrix(vocab, h, 79);
        let x: Vec<f32> = (0..n * h).map(|_| r.random_range(-3.0f32..3.0)).collect();
        let w: Vec<f32> = (0..h).map(|_| r.random_range(0.5f32..2.0)).collect();
        for threads in [1, 3] {
            let mut b = CpuBackend::new(threads).unwrap();
            for format in [HeadFormat::Exact, HeadFormat::Q8, HeadFormat::Q4] {
                let head = b.upload_lm_head(&m, None, format).unwrap();
                let rows = StepRow::sequence(&[1, 2, 3, 4, 5], 0);
                for pick in [&[4u32][..], &[3, 0, 3, 1]] {
                    let xt = tensor(x.clone(), n, h);
                    let mut xn = tensor(Vec::new(), n, h);
                    let (mut fused, mut split) =
                        (tensor(Vec::new(), 4, vocab), tensor(Vec::new(), 4, vocab));
                    b.begin_step(&rows).unwrap();
                    b.rms_norm_lm_head(&head, &xt, &w, 1e-5, pick, &mut fused)
                        .unwrap();
                    b.rms_norm(&xt, &w, 1e-5, &mut xn).unwrap();
                    b.lm_head(&head, &xn, pick, &mut split).unwrap();
                    b.end_step().unwrap();
                    let k = pick.len() * vocab;
                    assert_bits(
                        &format!("{format:?} rows {pick:?} threads {threads}"),
                        &fused.data[..k],
                        &split.data[..k],
                    );
                }
                b.begin_step(&rows).unwrap();
                let mut out = tensor(Vec::new(), 1, vocab);
                let err = b
                    .rms_norm_lm_head(
                        &head,
                        &tensor(x.clone(), n, h),
                        &w[1..].to_vec(),
                        1e-5,
                        &[0],
                        &mut out,
                    )
                    .unwrap_err();
                assert!(err.to_string().contains("norm weight"), "{err}");
            }
        }
    }

    /// Every fused op against the composition of the scalar reference ops, bit for bit (the CPU
    /// runs the same float operations in the same order), for a decode and a prefill step, on 1
    /// and 3 threads, odd sizes.
    #[test]
    fn fused_ops_equal_the_composition_of_the_scalar_reference_ops() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let (hidden, heads, kv_heads, hd, inter) = (44usize, 6usize, 2usize, 6usize, 20usize);
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            rope_theta: 10000.0,
        };
        let (wq, wk, wv) = (
            random_ternary(&mut r, "q", qd, hidden),
            random_ternary(&mut r, "k", kvd, hidden),
            random_ternary(&mut r, "v", kvd, hidden),
        );
        let (wg, wu, wo) = (
            random_ternary(&mut r, "gate", inter, hidden),
            random_ternary(&mut r, "up", inter, hidden),
            random_ternary(&mut r, "o", hidden, qd),
        );
        let norm_w: Vec<f32> = (0..hidden).map(|_| r.random_range(-2f32..2.0)).collect();
        for threads in [1, 3] {
            let mut b = CpuBackend::new(threads).unwrap();
            let qkv = b.upload_linears(&[&wq, &wk, &wv]).unwrap();
            let gu = b.upload_linears(&[&wg, &wu]).unwrap();
            let o = b.upload_linear(&wo).unwrap();
            let (ctx, cap) = (16, 8);
            let mut cache = b.alloc_kv_cache(2, 2, ctx, kvd, KvDtype::F32).unwrap();
            let mut pos = 0;
            for n in [5usize, 1] {
                let what = format!("threads {threads} n={n}");
                let rows = StepRow::sequence_in(1, &vec![0; n], pos);
                b.begin_step(&rows).unwrap();
                let x: Vec<f32> = (0..n * hidden)
                    .map(|_| r.random_range(-3f32..3.0))
                    .collect();
                let xt = tensor(x.clone(), cap, hidden);
                // rms_norm_quantize = quantize_row(rms_norm_row(x))
                let mut xq = b.alloc_q(cap, hidden).unwrap();
                b.rms_norm_quantize(&xt, &norm_w, 1e-5, &mut xq).unwrap();
                let (mut want_q, mut want_s) = (vec![0i8; n * hidden], vec![0f32; n]);
                for (t, s) in want_s.iter_mut().enumerate() {
                    let mut xn = vec![0.0; hidden];
                    let span = t * hidden..(t + 1) * hidden;
                    reference::rms_norm_row(&x[span.clone()], &norm_w, 1e-5, &mut xn);
                    *s = reference::quantize_row(&xn, &mut want_q[span]);
                }
                assert_eq!(
                    &xq.q[..n * hidden],
                    &want_q[..],
                    "{what}: rms_norm_quantize q"
                );
                assert_eq!(
                    &xq.scales[..n],
                    &want_s[..],
                    "{what}: rms_norm_quantize scales"
                );
                // the concatenated matmul: each part with its own scale
                let want_qkv = reference_matmul(&[&wq, &wk, &wv], &want_q, &want_s);
                let mut out = b.alloc(cap, qd + 2 * kvd).unwrap();
                b.ternary_matmul(&qkv, &xq, &mut out).unwrap();
                assert_bits(
                    &format!("{what}: q|k|v"),
                    &out.data[..n * (qd + 2 * kvd)],
                    &want_qkv,
                );
                // qkv_rope_store: rotated q out, rotated k and v in the cache at (slot 1, pos)
                let mut q = b.alloc(cap, qd).unwrap();
                b.qkv_rope_store(&qkv, &xq, &mut cache, 1, &shape, &mut q)
                    .unwrap();
                let wd = qd + 2 * kvd;
                for (t, row) in rows.iter().enumerate() {
                    let mut v = want_qkv[t * wd..(t + 1) * wd].to_vec();
                    for head in v[..qd + kvd].chunks_exact_mut(hd) {
                        rope_head(head, row.pos as usize, shape.rope_theta);
                    }
                    assert_bits(
                        &format!("{what}: rotated q row {t}"),
                        &q.data[t * qd..(t + 1) * qd],
                        &v[..qd],
                    );
                    let base = (2 + 1) * ctx * kvd; // layer 1, slot 1
                    let p = row.pos as usize;
                    let KvStore::F32(planes) = &cache.store else {
                        unreachable!("an f32 cache")
                    };
                    let kc: Vec<f32> = (0..kvd).map(|e| planes.k[base + e * ctx + p]).collect();
                    assert_bits(&format!("{what}: cached k row {t}"), &kc, &v[qd..qd + kvd]);
                    assert_bits(
                        &format!("{what}: cached v row {t}"),
                        &planes.v[base + p * kvd..base + (p + 1) * kvd],
                        &v[qd + kvd..],
                    );
                }
                // gate_up: act(gate)·up of the concatenated matmul
                let want_gu = reference_matmul(&[&wg, &wu], &want_q, &want_s);
                for act in [FfnActivation::Relu2, FfnActivation::Silu] {
                    let mut ffn = b.alloc(cap, inter).unwrap();
                    b.gate_up(&gu, &xq, act, &mut ffn).unwrap();
                    let mut want = vec![0.0; n * inter];
                    for t in 0..n {
                        let (g, u) = want_gu[t * 2 * inter..(t + 1) * 2 * inter].split_at(inter);
                        let o = &mut want[t * inter..(t + 1) * inter];
                        match act {
                            FfnActivation::Relu2 => reference::relu2_mul_row(g, u, o),
                            FfnActivation::Silu => reference::silu_mul_row(g, u, o),
                        }
                    }
                    assert_bits(
                        &format!("{what}: gate_up {act:?}"),
                        &ffn.data[..n * inter],
                        &want,
                    );
                }
                // ternary_matmul_add: acc += W·x
                let aq: Vec<i8> = (0..n * qd).map(|_| r.random_range(-128..=127)).collect();
                let a_s: Vec<f32> = (0..n).map(|_| r.random_range(1f32..50.0)).collect();
                let mut att_q = b.alloc_q(cap, qd).unwrap();
                att_q.q[..n * qd].copy_from_slice(&aq);
                att_q.scales[..n].copy_from_slice(&a_s);
                for t in 0..n {
                    att_q.sums[t] = aq[t * qd..(t + 1) * qd].iter().map(|&v| v as i32).sum();
                }
                let mut acc = xt.clone();
                b.ternary_matmul_add(&o, &att_q, &mut acc).unwrap();
                let prod = reference_matmul(&[&wo], &aq, &a_s);
                let want: Vec<f32> = x.iter().zip(&prod).map(|(a, p)| a + p).collect();
                assert_bits(
                    &format!("{what}: ternary_matmul_add"),
                    &acc.data[..n * hidden],
                    &want,
                );
                assert!(
                    acc.data[n * hidden..].iter().all(|&v| v == 0.0),
                    "{what}: rows past n"
                );
                pos += n;
            }
            // bad shapes are typed errors naming the op
            b.begin_step(&StepRow::sequence(&[0], 0)).unwrap();
            let xq = b.alloc_q(cap, hidden).unwrap();
            let mut wrong = b.alloc(cap, inter + 1).unwrap();
            let e = b
                .gate_up(&gu, &xq, FfnActivation::Relu2, &mut wrong)
                .unwrap_err();
            assert!(e.to_string().contains("gate_up"), "{e}");
            let mut q = b.alloc(cap, qd).unwrap();
            let e = b
                .qkv_rope_store(&gu, &xq, &mut cache, 0, &shape, &mut q)
                .unwrap_err();
            assert!(e.to_string().contains("qkv_rope_store"), "{e}");
            let e = b
                .qkv_rope_store(&qkv, &xq, &mut cache, 2, &shape, &mut q)
                .unwrap_err();
            assert!(e.to_string().contains("layer 2"), "{e}");
        }
    }

    /// `table_copy_bytes` counts the table-lookup copies the AVX-512 VNNI level makes (what
    /// `bitnet info` reports) and is 0 on a level without them.
    #[test]
    #[cfg(target_arch = "x86_64")] // the table-lookup kernel is x86-64 only
    fn table_copy_bytes_count_the_repacked_weights() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(31);
        let (a, b) = (
            random_ternary(&mut r, "a", 68, 263),
            random_ternary(&mut r, "b", 132, 263),
        );
        for level in CpuLevel::available() {
            let mut cpu = CpuBackend::new(1).unwrap().with_level(level).unwrap();
            assert_eq!(
                cpu.uses_lut(),
                level == CpuLevel::Avx512Vnni && cpu.use_lut, // unless BITNET_CPU_NO_LUT=1
                "{}",
                level.name()
            );
            cpu.upload_linears(&[&a, &b]).unwrap();
            let want = if cpu.uses_lut() {
                (LutWeights::new(&a).bytes() + LutWeights::new(&b).bytes()) as u64
            } else {
                0
            };
            assert_eq!(cpu.table_copy_bytes(), want, "{}", level.name());
            if cpu.uses_lut() {
                assert!(want > 0);
            }
        }
    }

    /// A prefill step's attention (two rows of one slot per work item where they follow each
    /// other) equals each row's attention run alone, bit for bit: the kernels sum every output
    /// over the positions in order whatever their blocking, and the first row of a pair adds
    /// exactly 0 at the position only the second sees. Every level, 1–3 threads, both cache
    /// types, head sizes that leave partial column blocks, rows of two slots (a pair across
    /// them is split), groups of 1, 4 and 5 query heads per kv head (5: too many to pair).
    #[test]
    fn attention_of_a_step_equals_each_row_alone() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(91);
        // slot 0: positions 0..37, then slot 1: positions 5..18 (its 0..5 from an earlier step)
        let mut rows = StepRow::sequence_in(0, &[1; 37], 0);
        rows.extend(StepRow::sequence_in(1, &[2; 13], 5));
        let (layers, slots, ctx) = (2, 2, 40);
        for (heads, kv_heads, hd) in [(8usize, 2usize, 20usize), (3, 3, 12), (10, 2, 10)] {
            let shape = AttentionShape {
                n_heads: heads,
                n_kv_heads: kv_heads,
                head_dim: hd,
                rope_theta: 1e4,
            };
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            let q: Vec<f32> = (0..rows.len() * qd)
                .map(|_| r.random_range(-3f32..3.0))
                .collect();
            let k: Vec<f32> = (0..layers * slots * kvd * ctx)
                .map(|_| r.random_range(-3f32..3.0))
                .collect();
            let v: Vec<f32> = (0..layers * slots * ctx * kvd)
                .map(|_| r.random_range(-3f32..3.0))
                .collect();
            for level in CpuLevel::available() {
                for threads in [1, 2, 3] {
                    for dtype in [KvDtype::F32, KvDtype::F16] {
                        let mut b = CpuBackend::new(threads).unwrap().with_level(level).unwrap();
                        let mut cache = b.alloc_kv_cache(layers, slots, ctx, kvd, dtype).unwrap();
                        fn fill<T: KvElem>(p: &mut KvPlanes<T>, k: &[f32], v: &[f32]) {
                            for (d, &x) in p.k.iter_mut().zip(k) {
                                *d = T::store(x);
                            }
                            for (d, &x) in p.v.iter_mut().zip(v) {
                                *d = T::store(x);
                            }
                        }
                        match &mut cache.store {
                            KvStore::F32(p) => fill(p, &k, &v),
                            KvStore::F16(p) => fill(p, &k, &v),
                        }
                        let n = rows.len();
                        b.begin_step(&rows).unwrap();
                        let qt = tensor(q.clone(), n, qd);
                        let mut out = b.alloc(n, qd).unwrap();
                        b.attention(&qt, &cache, 1, &shape, &mut out).unwrap();
                        for (t, row) in rows.iter().enumerate() {
                            b.begin_step(&[*row]).unwrap();
                            let qt = tensor(q[t * qd..(t + 1) * qd].to_vec(), 1, qd);
                            let mut alone = b.alloc(1, qd).unwrap();
                            b.attention(&qt, &cache, 1, &shape, &mut alone).unwrap();
                            for (i, (&got, &want)) in out.data[t * qd..(t + 1) * qd]
                                .iter()
                                .zip(&alone.data[..qd])
                                .enumerate()
                            {
                                assert!(
                                    got == want,
                                    "{} {threads} threads {dtype:?} heads {heads}/{kv_heads}×{hd}: \
                                     row {t} index {i}: got {got}, expected {want}",
                                    level.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_gqa_maps_query_heads_to_kv_heads() {
        // 4 query heads, 2 kv heads, head_dim 2, one token: softmax over one key = 1, so
        // out(head h) = v(kv head h / 2).
        let mut b = CpuBackend::new(1).unwrap();
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 2,
            rope_theta: 1e4,
        };
        // k, v of position p into layer 0, slot 0 (k transposed: [kv_dim, ctx]); every value
        // here is a half, so both storages hold them exactly
        fn put<T: KvElem>(planes: &mut KvPlanes<T>, p: usize, k: [f32; 4], v: [f32; 4]) {
            for e in 0..4 {
                planes.k[e * 4 + p] = T::store(k[e]);
                planes.v[p * 4 + e] = T::store(v[e]);
            }
        }
        let store =
            |cache: &mut CpuKvCache, p: usize, k: [f32; 4], v: [f32; 4]| match &mut cache.store {
                KvStore::F32(planes) => put(planes, p, k, v),
                KvStore::F16(planes) => put(planes, p, k, v),
            };
        for dtype in [KvDtype::F32, KvDtype::F16] {
            b.begin_step(&StepRow::sequence(&[0], 0)).unwrap();
            let q = CpuTensor {
                data: vec![1.0; 8].into(),
                capacity: 1,
                cols: 8,
            };
            let mut cache = b.alloc_kv_cache(1, 1, 4, 4, dtype).unwrap();
            assert_eq!(cache.dtype(), dtype);
            let mut out = b.alloc(1, 8).unwrap();
            store(&mut cache, 0, [1.0; 4], [10.0, 11.0, 20.0, 21.0]);
            b.attention(&q, &cache, 0, &shape, &mut out).unwrap();
            assert_eq!(
                out.data[..],
                vec![10.0, 11.0, 10.0, 11.0, 20.0, 21.0, 20.0, 21.0],
                "{dtype:?}"
            );
            // second token: kv head 1 gets a key aligned with q heads 2,3 → they weight it more.
            b.begin_step(&StepRow::sequence(&[0], 1)).unwrap();
            store(&mut cache, 1, [0.0, 0.0, 5.0, 5.0], [0.0; 4]);
            b.attention(&q, &cache, 0, &shape, &mut out).unwrap();
            // heads 0,1: scores (1·1+1·1)/√2 vs 0 → p0 = σ(√2); heads 2,3: 2/√2 vs 10/√2.
            let p0 = 1.0 / (1.0 + (-(2f32.sqrt())).exp());
            let p1 = 1.0 / (1.0 + (8.0 / 2f32.sqrt()).exp());
            assert!(
                (out.data[0] - 10.0 * p0).abs() < 1e-4,
                "{dtype:?} {:?}",
                out.data
            );
            assert!(
                (out.data[4] - 20.0 * p1).abs() < 1e-4,
                "{dtype:?} {:?}",
                out.data
            );
        }
    }
}
