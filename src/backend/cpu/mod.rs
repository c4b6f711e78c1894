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

use super::{
    check_attention, check_step_rows, check_tensor, AttentionShape, Backend, HeadFormat, StepRow,
};
use crate::error::{BitnetError, Result};
use crate::load::FloatMatrix;
use crate::ternary::TernaryMatrix;
use dispatch::{absmax_f32, quantize_i8, rows_times_runs, softmax_f32, CpuLevel};
use pool::SpinPool;
use q4::Q4Matrix;
use q8::Q8Matrix;
pub use reference::{argmax, rope_head};
use reference::{rms_norm_row, rope_angles, rope_head_with, scale_from_absmax};
pub use topology::default_threads;

/// f32 activations `[capacity, cols]`, row-major.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    pub data: Vec<f32>, // [capacity, cols]
    pub capacity: usize,
    pub cols: usize,
}

/// int8 activations `[capacity, cols]` plus the per-row scale `s = 127 / absmax`.
#[derive(Debug, Clone)]
pub struct CpuQTensor {
    pub q: Vec<i8>,       // [capacity, cols]
    pub scales: Vec<f32>, // [capacity]
    pub sums: Vec<i32>,   // [capacity]  Σ q over the row, for the Σq·code − Σq trick
    /// With the AMX level only: the rows again as AMX B tiles (`x86/amx.rs`),
    /// `[capacity / 16 rounded up to even, padded_cols / 4, 16, 4]`.
    pub tiles: Vec<i8>,
    /// Rows of the current step that `tiles` holds (0: none; the matmul then reads `q`).
    pub tiles_rows: usize,
    pub capacity: usize,
    pub cols: usize,
}

/// Keys and values of every layer and slot, f32.
pub struct CpuKvCache {
    /// Keys transposed, `[layers, slots, kv_dim, ctx]`: a query's scores over all positions are
    /// then `head_dim` contiguous axpys (no per-position dot product and horizontal sum).
    pub k: Vec<f32>, // [layers, slots, kv_dim, ctx]
    pub v: Vec<f32>, // [layers, slots, ctx, kv_dim]
    pub slots: usize,
    pub ctx: usize,
    pub kv_dim: usize,
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
    level: CpuLevel,
}

impl CpuBackend {
    /// `out = act(gate) · up` row by row for the step's rows, `row(gate, up, out)` computing one
    /// row; rows in parallel (a prefill step's [n, 6912] is ~14 MB per operand).
    fn gated_mul(
        &mut self,
        op: &'static str,
        gate: &CpuTensor,
        up: &CpuTensor,
        out: &mut CpuTensor,
        row: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    ) -> Result<()> {
        let cols = gate.cols;
        self.check(op, gate, cols)?;
        self.check(op, up, cols)?;
        self.check(op, out, cols)?;
        let len = self.n() * cols;
        self.pool
            .for_each_chunk_mut(&mut out.data[..len], cols, |t, o| {
                let span = t * cols..(t + 1) * cols;
                row(&gate.data[span.clone()], &up.data[span], o)
            });
        Ok(())
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
            level: CpuLevel::detect(),
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
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type QTensor = CpuQTensor;
    type Linear = TernaryMatrix;
    type Vector = Vec<f32>;
    type Embedding = FloatMatrix;
    type Head = CpuLmHead;
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        format!("cpu {} ({} threads)", self.level.name(), self.threads)
    }

    fn upload_linear(&mut self, w: &TernaryMatrix) -> Result<TernaryMatrix> {
        Ok(w.clone())
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
                let row_bytes = m.cols * m.dtype.size();
                let q8 = Q8Matrix::quantize(m, |rows| {
                    m.data.release(rows.start * row_bytes..rows.end * row_bytes)
                });
                CpuLmHead::Q8(q8)
            }
            HeadFormat::Q4 => {
                let row_bytes = m.cols * m.dtype.size();
                let q4 = Q4Matrix::quantize(m, |rows| {
                    m.data.release(rows.start * row_bytes..rows.end * row_bytes)
                });
                CpuLmHead::Q4(q4)
            }
        })
    }

    fn alloc(&mut self, capacity: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            data: vec![0.0; capacity * cols],
            capacity,
            cols,
        })
    }

    fn alloc_q(&mut self, capacity: usize, cols: usize) -> Result<CpuQTensor> {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let tiles = if self.uses_amx(capacity) {
            vec![0; x86::amx::packed_activations_len(capacity, cols)]
        } else {
            Vec::new()
        };
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let tiles = Vec::new();
        Ok(CpuQTensor {
            q: vec![0; capacity * cols],
            scales: vec![0.0; capacity],
            sums: vec![0; capacity],
            tiles,
            tiles_rows: 0,
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
    ) -> Result<CpuKvCache> {
        let len = layers
            .checked_mul(slots)
            .and_then(|x| x.checked_mul(ctx))
            .and_then(|x| x.checked_mul(kv_dim))
            .ok_or_else(|| BitnetError::op("alloc_kv_cache", "size overflows"))?;
        Ok(CpuKvCache {
            k: vec![0.0; len],
            v: vec![0.0; len],
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

    fn ternary_matmul(
        &mut self,
        w: &TernaryMatrix,
        x: &CpuQTensor,
        out: &mut CpuTensor,
    ) -> Result<()> {
        self.matmul(w, x, out)
    }

    fn rope(&mut self, x: &mut CpuTensor, n_heads: usize, shape: &AttentionShape) -> Result<()> {
        let hd = shape.head_dim;
        self.check("rope", x, n_heads * hd)?;
        // cos/sin once per row of the step, shared by every head and by q and k of every
        // layer: the table is rebuilt only when the step's positions (or the head shape) change
        let n = self.n();
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
        let table = &self.rope_table; // [n, hd/2] (cos, sin)
        self.pool
            .for_each_chunk_mut(&mut x.data[..n * n_heads * hd], n_heads * hd, |t, row| {
                let angles = &table[t * hd / 2..(t + 1) * hd / 2];
                for head in row.chunks_exact_mut(hd) {
                    rope_head_with(head, angles);
                }
            });
        Ok(())
    }

    fn attention(
        &mut self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let (n, hd) = (self.n(), shape.head_dim);
        let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
        check_attention(
            shape,
            n,
            [q, k, v, out].map(|t| (t.capacity, t.cols)),
            (cache.kv_dim, cache.ctx),
            self.rows
                .iter()
                .map(|r| r.pos as usize + 1)
                .max()
                .unwrap_or(0),
        )?;
        check_step_rows(&self.rows, cache.slots, cache.ctx)?;
        let (ctx, slots) = (cache.ctx, cache.slots);
        // [slots, ctx, kv_dim] and [slots, kv_dim, ctx] of this layer, slot s at s * ctx * kvd
        let slot_base = move |slot: u32| (layer * slots + slot as usize) * ctx * kvd;
        for (t, r) in self.rows.iter().enumerate() {
            let (base, p) = (slot_base(r.slot), r.pos as usize);
            cache.v[base + p * kvd..base + (p + 1) * kvd]
                .copy_from_slice(&v.data[t * kvd..(t + 1) * kvd]);
            let kt = &mut cache.k[base..base + kvd * ctx]; // [kv_dim, ctx]
            for (e, row) in kt.chunks_exact_mut(ctx).enumerate() {
                row[p] = k.data[t * kvd + e];
            }
        }
        let (kc, vc) = (&cache.k, &cache.v);
        let rows = &self.rows;
        let group = shape.n_heads / shape.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let level = self.level;
        // A work item is one token and the query heads of one kv head (they read the same keys
        // and values, so one pass over them serves all), or a single head when that would leave
        // too few items to keep every thread busy (a decode step has n_kv_heads groups).
        let heads = if n * shape.n_kv_heads >= 4 * self.threads {
            group
        } else {
            1
        };
        thread_local! {
            // [heads, len] scores, then probabilities, and [heads, head_dim] scaled queries of
            // one work item: buffers per thread, grown as needed.
            static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        self.pool
            .for_each_chunk_mut(&mut out.data[..n * qd], heads * hd, |idx, o| {
                SCRATCH.with_borrow_mut(|(scores, qs)| {
                    let per_token = shape.n_heads / heads;
                    let (t, h0) = (idx / per_token, idx % per_token * heads);
                    let kvh = h0 / group;
                    let r = rows[t];
                    let len = r.pos as usize + 1; // causal: positions 0..=pos of its slot
                    let (kc, vc) = (&kc[slot_base(r.slot)..], &vc[slot_base(r.slot)..]);
                    qs.clear(); // [heads, hd]
                    qs.extend(
                        q.data[t * qd + h0 * hd..t * qd + (h0 + heads) * hd]
                            .iter()
                            .map(|&v| v * scale),
                    );
                    scores.clear();
                    scores.resize(heads * len, 0.0); // [heads, len]

                    // scores[h][j] = Σ_d qs[h][d] · K[j][d], with K stored as [kv_dim, ctx]
                    let keys = &kc[kvh * hd * ctx..]; // rows d: component d of every key
                    rows_times_runs(level, qs, heads, hd, keys, ctx, len, scores);
                    for s in scores.chunks_exact_mut(len) {
                        softmax_f32(level, s);
                    }
                    // o[h] = Σ_j p[h][j] · V[j] (probabilities that underflowed are skipped)
                    o.fill(0.0);
                    let values = &vc[kvh * hd..]; // rows j: value j of this kv head
                    rows_times_runs(level, scores, heads, len, values, kvd, hd, o);
                })
            });
        Ok(())
    }

    fn relu2_mul(&mut self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        self.gated_mul("relu2_mul", gate, up, out, |g, u, o| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                let r = g.max(0.0);
                *o = r * r * u;
            }
        })
    }

    fn silu_mul(&mut self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        self.gated_mul("silu_mul", gate, up, out, reference::silu_mul_row)
    }

    fn add_assign(&mut self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        self.check("add", y, x.cols)?;
        let (len, cols) = (self.n() * x.cols, x.cols);
        self.pool
            .for_each_chunk_mut(&mut x.data[..len], cols, |t, a| {
                for (a, b) in a.iter_mut().zip(&y.data[t * cols..]) {
                    *a += b;
                }
            });
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

    #[test]
    fn silu_mul_equals_the_scalar_twin_on_every_row() {
        // rows split over threads: each row is the twin's, bit for bit
        for threads in [1, 3] {
            let mut b = CpuBackend::new(threads).unwrap();
            let (n, cols) = (7, 37);
            let vals = |k: usize, m: f32| ((k * 7919 % 1013) as f32 / 1013.0 - 0.5) * m;
            let gate = CpuTensor {
                data: (0..8 * cols).map(|k| vals(k, 24.0)).collect(),
                capacity: 8,
                cols,
            };
            let up = CpuTensor {
                data: (0..8 * cols).map(|k| vals(k + 5, 6.0)).collect(),
                capacity: 8,
                cols,
            };
            let mut out = b.alloc(8, cols).unwrap();
            b.begin_step(&StepRow::sequence(&[0; 7], 0)).unwrap();
            b.silu_mul(&gate, &up, &mut out).unwrap();
            let mut want = vec![0.0; n * cols];
            for t in 0..n {
                let r = t * cols..(t + 1) * cols;
                reference::silu_mul_row(&gate.data[r.clone()], &up.data[r.clone()], &mut want[r]);
            }
            for (k, (g, e)) in out.data[..n * cols].iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits(),
                    "threads {threads} index {k}: got {g}, expected {e}"
                );
            }
            // rows past the step's n are not written
            assert!(out.data[n * cols..].iter().all(|&v| v == 0.0));
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
        b.begin_step(&StepRow::sequence(&[0], 0)).unwrap();
        let q = CpuTensor {
            data: vec![1.0; 8],
            capacity: 1,
            cols: 8,
        };
        let k = CpuTensor {
            data: vec![1.0; 4],
            capacity: 1,
            cols: 4,
        };
        let v = CpuTensor {
            data: vec![10.0, 11.0, 20.0, 21.0],
            capacity: 1,
            cols: 4,
        };
        let mut cache = b.alloc_kv_cache(1, 1, 4, 4).unwrap();
        let mut out = b.alloc(1, 8).unwrap();
        b.attention(&q, &k, &v, &mut cache, 0, &shape, &mut out)
            .unwrap();
        assert_eq!(
            out.data,
            vec![10.0, 11.0, 10.0, 11.0, 20.0, 21.0, 20.0, 21.0]
        );
        // second token: kv head 1 gets a key aligned with q heads 2,3 → they weight it more.
        b.begin_step(&StepRow::sequence(&[0], 1)).unwrap();
        let k2 = CpuTensor {
            data: vec![0.0, 0.0, 5.0, 5.0],
            capacity: 1,
            cols: 4,
        };
        let v2 = CpuTensor {
            data: vec![0.0, 0.0, 0.0, 0.0],
            capacity: 1,
            cols: 4,
        };
        b.attention(&q, &k2, &v2, &mut cache, 0, &shape, &mut out)
            .unwrap();
        // heads 0,1: scores (1·1+1·1)/√2 vs 0 → p0 = σ(√2); heads 2,3: 2/√2 vs 10/√2.
        let p0 = 1.0 / (1.0 + (-(2f32.sqrt())).exp());
        let p1 = 1.0 / (1.0 + (8.0 / 2f32.sqrt()).exp());
        assert!((out.data[0] - 10.0 * p0).abs() < 1e-4, "{:?}", out.data);
        assert!((out.data[4] - 20.0 * p1).abs() < 1e-4, "{:?}", out.data);
    }
}
