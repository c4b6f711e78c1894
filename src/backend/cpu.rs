//! The CPU backend: plain Rust over a small spinning thread pool (`pool.rs`), with the SIMD
//! kernels of `kernels.rs` where they pay. The ops here are also the references the WGSL kernels
//! are tested against, so clarity wins over cleverness; the ternary matmul walks the packed
//! bytes directly (4 output rows per byte row) and never expands weights to floats.

use std::cell::RefCell;

use super::kernels::{
    absmax_f32, dot_bf16, dot_bf16_rows2, quantize_i8, rows_times_runs, softmax_f32, ternary_dot4,
    ternary_dot4_rows2, ternary_dot4_x2, ternary_dot4_x4, CpuLevel,
};
use super::pool::{DisjointSlice, SpinPool};
use super::q8::{HeadInput, Q8Matrix};
use super::{check_step_rows, AttentionShape, Backend, HeadFormat, StepRow};
use crate::error::{BitnetError, Result};
use crate::load::FloatDtype;
use crate::load::{decode_floats, FloatMatrix};
use crate::ternary::{scale_from_absmax, TernaryMatrix};

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
    /// With the AMX level only: the rows again as AMX B tiles (`backend::amx`),
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
/// 8-bit copy of `--lm-head q8`.
#[derive(Debug, Clone)]
pub enum CpuLmHead {
    Exact(FloatMatrix), // [vocab, hidden] file dtype
    Q8(Q8Matrix),       // [vocab, hidden] int8 + [vocab, hidden / 64] scales
}

impl CpuLmHead {
    fn rows(&self) -> usize {
        match self {
            CpuLmHead::Exact(m) => m.rows,
            CpuLmHead::Q8(m) => m.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            CpuLmHead::Exact(m) => m.cols,
            CpuLmHead::Q8(m) => m.cols,
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
    pub fn with_level(mut self, level: CpuLevel) -> Result<Self> {
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
        if t.cols != cols || t.capacity < self.n() {
            return Err(BitnetError::op(
                op,
                format!(
                    "tensor [{}, {}] cannot hold {} rows of {cols} columns",
                    t.capacity,
                    t.cols,
                    self.n()
                ),
            ));
        }
        Ok(())
    }

    /// The ternary matmul on AMX tiles (`backend::amx`), for steps of many tokens. A job is one
    /// block of 16 packed byte rows (4 planes × 16 weight rows) and one chunk of tokens: it
    /// unpacks the block's codes into this thread's buffer (≤ 4 × 16 × 6912 B for 2B4T) and runs
    /// tile products over the chunk's token blocks, 32 tokens and 2 planes at a time. The chunk
    /// is sized so that its activations (`32 × padded_cols` bytes per pair of token blocks) stay
    /// in L2 while every job of the chunk reads them; chunks come first in the job order.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn ternary_matmul_amx(&mut self, w: &TernaryMatrix, x: &CpuQTensor, out: &mut CpuTensor) {
        use super::amx::{self, padded_cols, TILE_K, TILE_ROWS, TILE_TOKENS};
        const CHUNK_BYTES: usize = 1 << 20;
        let n = self.n();
        let (p4, rows, cols) = (w.rows / 4, w.rows, w.cols);
        let kp = padded_cols(cols);
        let factor = &self.token_factor; // [n]
        let out_rows = DisjointSlice::new(&mut out.data[..n * rows]); // [n, rows]
        let pair_len = 2 * TILE_TOKENS * kp; // bytes of one pair of token blocks
        let pairs = n.div_ceil(2 * TILE_TOKENS);
        let chunk_pairs = (CHUNK_BYTES / pair_len).clamp(1, pairs);
        let row_blocks = p4.div_ceil(TILE_ROWS);
        let plane_len = TILE_ROWS * kp; // one plane of the code buffer: [kp / 64, 16, 64]
        let packed = w.packed.as_slice(); // [p4, cols]
        let job = |j: usize| {
            let (chunk, block) = (j / row_blocks, j % row_blocks);
            let (p0, p1) = (block * TILE_ROWS, (block * TILE_ROWS + TILE_ROWS).min(p4));
            amx::with_code_buffer(4 * plane_len, |codes| {
                // SAFETY: AVX-512 BW is part of the AMX level.
                unsafe { amx::unpack_codes(&packed[p0 * cols..p1 * cols], cols, codes) };
                // SAFETY: AMX is available (the level).
                let tiles = unsafe { amx::Tiles::configure() };
                let mut c = [0i32; 4 * 256]; // [4, 16 rows, 16 tokens]
                for pair in chunk * chunk_pairs..((chunk + 1) * chunk_pairs).min(pairs) {
                    let b0 = &x.tiles[pair * pair_len..(pair + 1) * pair_len]; // 2 token blocks
                    for planes in [0, 2] {
                        let a = [
                            &codes[planes * plane_len..],
                            &codes[(planes + 1) * plane_len..],
                        ];
                        // SAFETY: each A plane and each B block holds kp / 64 tiles of 1 KiB;
                        // kp ≥ 64.
                        unsafe {
                            amx::tile_2x2(
                                &tiles,
                                [a[0].as_ptr(), a[1].as_ptr()],
                                [b0.as_ptr(), b0[pair_len / 2..].as_ptr()],
                                kp / TILE_K,
                                &mut c,
                            )
                        };
                        for (i, tile) in c.chunks_exact(256).enumerate() {
                            let (plane, t0) = (planes + i / 2, (2 * pair + i % 2) * TILE_TOKENS);
                            if t0 >= n {
                                continue;
                            }
                            let t1 = (t0 + TILE_TOKENS).min(n);
                            // out[t, plane·P + p] for t in t0..t1, p in p0..p1
                            // SAFETY: this job alone owns byte rows p0..p1 for tokens t0..t1
                            // (one chunk, one row block); runs_ptr checked the runs' bounds.
                            unsafe {
                                let dst = out_rows.runs_ptr(
                                    t0 * rows + plane * p4 + p0,
                                    rows,
                                    t1 - t0,
                                    p1 - p0,
                                );
                                amx::store_tile(
                                    tile.try_into().expect("256-element tile"),
                                    p1 - p0,
                                    &x.sums[t0..t1],
                                    &factor[t0..t1],
                                    dst,
                                    rows,
                                );
                            }
                        }
                    }
                }
            });
        };
        self.pool
            .run(pairs.div_ceil(chunk_pairs) * row_blocks, &job);
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl CpuBackend {
    /// Whether a step of `rows` tokens runs its ternary matmuls on AMX tiles.
    fn uses_amx(&self, rows: usize) -> bool {
        self.level == CpuLevel::Amx && rows >= AMX_MIN_TOKENS
    }
}

/// Steps of at least this many tokens run their ternary matmuls on AMX tiles (fewer would leave
/// most of each 16-token tile empty while still unpacking every weight).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const AMX_MIN_TOKENS: usize = 16;

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
            vec![0; super::amx::packed_activations_len(capacity, cols)]
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
            use super::amx::{pack_activation_block, packed_activations_len, padded_cols};
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
        let n = self.n();
        if x.cols != w.cols || x.capacity < n {
            return Err(BitnetError::op(
                "ternary_matmul",
                format!(
                    "{}: weight [{}, {}] vs activations [{n}, {}]",
                    w.name, w.rows, w.cols, x.cols
                ),
            ));
        }
        self.check("ternary_matmul", out, w.rows)?;
        let (p4, rows, cols) = (w.rows / 4, w.rows, w.cols);
        let level = self.level;
        // out[t, i·P + p] = (Σ W[i·P + p]·q[t]) · out_scale / act_scale[t]: one factor per token
        self.token_factor.clear();
        self.token_factor
            .extend(x.scales[..n].iter().map(|&s| w.out_scale / s));
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // quantize laid out the tiles exactly when this step is for AMX
        if x.tiles_rows == n && n > 0 {
            self.ternary_matmul_amx(w, x, out);
            return Ok(());
        }
        let factor = &self.token_factor; // [n]
                                         // A job takes a run of byte rows (byte row p serves output rows p, P+p, 2P+p, 3P+p)
                                         // and walks it once per block of TOKEN_BLOCK tokens, so that the block's int8
                                         // activations (≤ 32 × 6912 B for 2B4T) stay in L2 and each byte row stays in L1 across
                                         // the block. The sums go straight to `out`, scaled: a job's outputs are 4 runs of
                                         // BYTE_ROWS floats per token (whole cache lines for 2B4T), no other job writes them.
                                         // Decode: ~8 jobs per thread (few claims of the shared counter, still balanced).
        let out_rows = DisjointSlice::new(&mut out.data[..n * rows]); // [n, rows]
        const BYTE_ROWS: usize = 16;
        const TOKEN_BLOCK: usize = 32;
        let job_rows = if n == 1 {
            p4.div_ceil(8 * self.threads).max(1)
        } else {
            BYTE_ROWS
        };
        let job = |job: usize| {
            let row = |t: usize| &x.q[t * cols..(t + 1) * cols]; // [cols]
            let put = |t: usize, p: usize, r: [i32; 4]| {
                for (i, &v) in r.iter().enumerate() {
                    // SAFETY: p lies in this job's byte rows, so no other job writes (t, i·P + p)
                    unsafe { out_rows.write(t * rows + i * p4 + p, v as f32 * factor[t]) };
                }
            };
            let (p0, p1) = (job * job_rows, ((job + 1) * job_rows).min(p4));
            if n == 1 {
                // decode: the two halves of the range side by side (two memory streams)
                side_by_side(
                    p1 - p0,
                    |i, j| {
                        let bytes = [w.byte_row(p0 + i), w.byte_row(p0 + j)];
                        let r = ternary_dot4_rows2(level, bytes, row(0), x.sums[0]);
                        put(0, p0 + i, r[0]);
                        put(0, p0 + j, r[1]);
                    },
                    |i| {
                        put(
                            0,
                            p0 + i,
                            ternary_dot4(level, w.byte_row(p0 + i), row(0), x.sums[0]),
                        )
                    },
                );
                return;
            }
            for t0 in (0..n).step_by(TOKEN_BLOCK) {
                let t1 = (t0 + TOKEN_BLOCK).min(n);
                for p in p0..p1 {
                    let bytes = w.byte_row(p); // [cols]
                    let mut t = t0;
                    while t + 4 <= t1 {
                        let r = ternary_dot4_x4(
                            level,
                            bytes,
                            [row(t), row(t + 1), row(t + 2), row(t + 3)],
                            [x.sums[t], x.sums[t + 1], x.sums[t + 2], x.sums[t + 3]],
                        );
                        for (k, r) in r.into_iter().enumerate() {
                            put(t + k, p, r);
                        }
                        t += 4;
                    }
                    if t + 2 <= t1 {
                        let r = ternary_dot4_x2(
                            level,
                            bytes,
                            [row(t), row(t + 1)],
                            [x.sums[t], x.sums[t + 1]],
                        );
                        put(t, p, r[0]);
                        put(t + 1, p, r[1]);
                        t += 2;
                    }
                    if t < t1 {
                        put(t, p, ternary_dot4(level, bytes, row(t), x.sums[t]));
                    }
                }
            }
        };
        self.pool.run(p4.div_ceil(job_rows), &job);
        Ok(())
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
        self.check("attention", q, qd)?;
        self.check("attention", k, kvd)?;
        self.check("attention", v, kvd)?;
        self.check("attention", out, qd)?;
        if cache.kv_dim != kvd {
            return Err(BitnetError::op(
                "attention",
                format!("cache kv_dim {} but the shape has {kvd}", cache.kv_dim),
            ));
        }
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
        let cols = gate.cols;
        self.check("relu2_mul", up, cols)?;
        self.check("relu2_mul", out, cols)?;
        let len = self.n() * cols;
        // rows in parallel (a prefill step's [n, 6912] is ~14 MB per operand)
        self.pool
            .for_each_chunk_mut(&mut out.data[..len], cols, |t, o| {
                let (g, u) = (&gate.data[t * cols..], &up.data[t * cols..]);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    let r = g.max(0.0);
                    *o = r * r * u;
                }
            });
        Ok(())
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
        let (n, h, vocab) = (self.n(), head.cols(), head.rows());
        self.check("lm_head", x, h)?;
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(BitnetError::op(
                "lm_head",
                format!("logit row {bad} is not a row of this {n}-row step"),
            ));
        }
        let out_rows = rows.len();
        if logits.cols != vocab || logits.capacity < out_rows {
            return Err(BitnetError::op(
                "lm_head",
                format!(
                    "logits tensor [{}, {}] cannot hold [{out_rows}, {vocab}]",
                    logits.capacity, logits.cols
                ),
            ));
        }
        // 256 vocabulary rows per job: ~1.3 MB of bf16 head, enough to hide the cost of a claim.
        const CHUNK: usize = 256;
        let level = self.level;
        thread_local! {
            // One decoded head row, for heads that are not bf16 (f16, f32).
            static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        for (r, &src) in rows.iter().enumerate() {
            let src = src as usize;
            let xr = &x.data[src * h..(src + 1) * h]; // [h]
            let lr = &mut logits.data[r * vocab..(r + 1) * vocab]; // [vocab]
            match head {
                CpuLmHead::Q8(q8) => {
                    let hx = HeadInput::new(xr); // [h] int16
                    self.pool.for_each_chunk_mut(lr, CHUNK, |c, out| {
                        // the two halves of the chunk side by side (two memory streams)
                        let v = |i: usize| c * CHUNK + i;
                        let out = std::cell::Cell::from_mut(out).as_slice_of_cells();
                        side_by_side(
                            out.len(),
                            |i, j| {
                                let [a, b] = q8.dot2(level, [v(i), v(j)], &hx);
                                out[i].set(a);
                                out[j].set(b);
                            },
                            |i| out[i].set(q8.dot(level, v(i), &hx)),
                        );
                    })
                }
                CpuLmHead::Exact(m) => {
                    let es = m.dtype.size();
                    let data = m.data.as_slice();
                    let row = |v: usize| &data[v * h * es..(v + 1) * h * es]; // [h] file dtype
                    self.pool.for_each_chunk_mut(lr, CHUNK, |c, out| {
                        if m.dtype == FloatDtype::Bf16 {
                            // the two halves of the chunk side by side (two memory streams)
                            let v = |i: usize| c * CHUNK + i;
                            let out = std::cell::Cell::from_mut(out).as_slice_of_cells();
                            side_by_side(
                                out.len(),
                                |i, j| {
                                    let [a, b] = dot_bf16_rows2(level, [row(v(i)), row(v(j))], xr);
                                    out[i].set(a);
                                    out[j].set(b);
                                },
                                |i| out[i].set(dot_bf16(level, row(v(i)), xr)),
                            );
                            return;
                        }
                        for (i, o) in out.iter_mut().enumerate() {
                            let v = c * CHUNK + i;
                            // f16 / f32 heads: decoded row by row
                            *o = ROW.with_borrow_mut(|decoded| {
                                decoded.resize(h, 0.0);
                                decode_floats(m.dtype, row(v), decoded);
                                decoded.iter().zip(xr).map(|(a, b)| a * b).sum()
                            });
                        }
                    })
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, t: &CpuTensor, rows: usize) -> Result<Vec<f32>> {
        Ok(t.data[..rows * t.cols].to_vec())
    }

    fn argmax_row0(&mut self, logits: &CpuTensor) -> Result<u32> {
        Ok(argmax(&logits.data[..logits.cols]) as u32)
    }
}

/// One thread per physical core this process may use: SMT siblings share the SIMD units the
/// ternary kernels saturate, so a second thread per core adds scheduling cost and no speed.
/// Linux reads the core topology from sysfs; elsewhere (or if sysfs is unreadable) every
/// logical CPU counts.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(logical, |p| p.clamp(1, logical))
}

fn physical_cores() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut cores = std::collections::HashSet::new();
        for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            if name
                .strip_prefix("cpu")
                .is_none_or(|n| n.parse::<u32>().is_err())
            {
                continue;
            }
            // Offline CPUs have no topology folder; they are skipped.
            if let Ok(siblings) =
                std::fs::read_to_string(path.join("topology/thread_siblings_list"))
            {
                cores.insert(siblings.trim().to_string());
            }
        }
        (!cores.is_empty()).then_some(cores.len())
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// `out = x * rsqrt(mean(x²) + eps) * w` for one row, in f32 like transformers.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// Half-split RoPE of one head vector at position `pos`:
/// `v'[j] = v[j] cos − v[j+d/2] sin`, `v'[j+d/2] = v[j+d/2] cos + v[j] sin`, angle `pos · θ^(−2j/d)`.
pub fn rope_head(v: &mut [f32], pos: usize, theta: f32) {
    let mut angles = vec![(0.0, 0.0); v.len() / 2];
    rope_angles(pos, v.len(), theta, &mut angles);
    rope_head_with(v, &angles);
}

/// `(cos, sin)` of RoPE's angles at `pos` for a head of `head_dim`, into `out [head_dim / 2]`.
pub fn rope_angles(pos: usize, head_dim: usize, theta: f32, out: &mut [(f32, f32)]) {
    for (j, o) in out.iter_mut().enumerate().take(head_dim / 2) {
        // As transformers: inv_freq and the angle in f32, then cos/sin of that f32 angle.
        let inv_freq = 1.0 / theta.powf((2 * j) as f32 / head_dim as f32);
        let angle = pos as f32 * inv_freq;
        let (s, c) = (angle as f64).sin_cos();
        *o = (c as f32, s as f32);
    }
}

/// [`rope_head`] with the angles of [`rope_angles`].
pub fn rope_head_with(v: &mut [f32], angles: &[(f32, f32)]) {
    let half = v.len() / 2;
    for (j, &(c, s)) in angles.iter().enumerate().take(half) {
        let (a, b) = (v[j], v[j + half]);
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
    }
}

/// Numerically stable softmax in f32. Terms below e^−87 (f32's smallest normal, 1.2e−38, times
/// the largest term, which is 1) are set to 0 instead of becoming subnormal: they cannot change
/// the sum or any output in f32, and subnormal multiplies in the attention's weighted sum cost
/// ~100 cycles each on x86 (that was 10 % of a prefill on a 2B4T-shaped model).
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        let d = *v - m;
        *v = if d < -87.0 { 0.0 } else { d.exp() };
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Visits `0..len` as pairs `(i, i + len/2)` for `i < len/2`, then the odd last index alone:
/// a decode kernel given such a pair reads two far-apart memory streams side by side, which
/// the prefetchers serve faster than one.
fn side_by_side(len: usize, mut pair: impl FnMut(usize, usize), mut single: impl FnMut(usize)) {
    let half = len / 2;
    for i in 0..half {
        pair(i, i + half);
    }
    if len % 2 == 1 {
        single(len - 1);
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_half_split_rotates_pairs_j_and_j_plus_half() {
        // d = 4: pairs (0,2) with inv_freq 1 and (1,3) with inv_freq θ^(-1/2) = 0.01 for θ = 1e4.
        let mut v = [1.0f32, 1.0, 0.0, 0.0];
        rope_head(&mut v, 1, 10000.0);
        assert!(
            (v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6,
            "{v:?}"
        );
        assert!(
            (v[1] - 0.01f32.cos()).abs() < 1e-6 && (v[3] - 0.01f32.sin()).abs() < 1e-6,
            "{v:?}"
        );
        // position 0 is the identity
        let mut w = [0.3f32, -0.2, 0.7, 0.1];
        rope_head(&mut w, 0, 10000.0);
        assert_eq!(w, [0.3, -0.2, 0.7, 0.1]);
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

    #[test]
    fn ternary_matmul_equals_the_scalar_dot_at_every_level_and_thread_count() {
        use crate::ternary::{ternary_dot_byte_row, ByteStorage};
        use rand::{Rng, SeedableRng};
        use std::sync::Arc;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        // rows: fewer byte rows than a job, not a multiple of the job size, many jobs;
        // cols: below and above one SIMD step; tokens: every remainder of the 4- and 2-token
        // kernels and more than one token block
        for &(rows, cols) in &[
            (4usize, 1usize),
            (68, 33),
            (148, 64),
            (640, 130),
            (64, 20000),
        ] {
            let packed: Vec<u8> = (0..rows / 4 * cols)
                .map(|_| (0..4).fold(0u8, |b, i| b | (rng.random_range(0..3u8) << (2 * i))))
                .collect();
            let w = TernaryMatrix::new("w", rows, cols, ByteStorage::Owned(Arc::new(packed)), 0.37)
                .unwrap();
            for n in [1usize, 2, 3, 5, 7, 37] {
                let x_data: Vec<f32> = (0..n * cols)
                    .map(|_| rng.random_range(-2f32..2.0))
                    .collect();
                for level in CpuLevel::available() {
                    for threads in [1, 3] {
                        let mut b = CpuBackend::new(threads).unwrap().with_level(level).unwrap();
                        b.begin_step(&StepRow::sequence(&vec![0; n], 0)).unwrap();
                        let mut x = b.alloc(n, cols).unwrap();
                        x.data[..n * cols].copy_from_slice(&x_data);
                        let mut q = b.alloc_q(n, cols).unwrap();
                        b.quantize(&x, &mut q).unwrap();
                        let mut out = b.alloc(n, rows).unwrap();
                        b.ternary_matmul(&w, &q, &mut out).unwrap();
                        let p4 = rows / 4;
                        for t in 0..n {
                            let qt = &q.q[t * cols..(t + 1) * cols];
                            let f = w.out_scale / q.scales[t];
                            for p in 0..p4 {
                                let r = ternary_dot_byte_row(w.byte_row(p), qt, q.sums[t]);
                                for (i, &v) in r.iter().enumerate() {
                                    let (got, want) =
                                        (out.data[t * rows + i * p4 + p], v as f32 * f);
                                    assert_eq!(
                                        got, want,
                                        "{} {threads} threads [{rows}x{cols}] n={n}: token {t} row {}: got {got}, expected {want}",
                                        level.name(),
                                        i * p4 + p
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn default_threads_is_within_the_logical_cpus() {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = default_threads();
        assert!(
            (1..=logical).contains(&t),
            "{t} threads of {logical} logical CPUs"
        );
    }

    #[test]
    fn rms_norm_and_softmax() {
        let mut o = [0.0f32; 2];
        rms_norm_row(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut o);
        let r = (12.5f32).sqrt();
        assert!((o[0] - 3.0 / r).abs() < 1e-6 && (o[1] - 8.0 / r).abs() < 1e-6);
        let mut s = [1000.0f32, 1000.0];
        softmax_in_place(&mut s);
        assert_eq!(s, [0.5, 0.5]);
        // a term e^-100 below the largest would be subnormal: it is 0 and the rest unchanged;
        // e^-80 is a normal f32 and stays
        let mut s = [0.0f32, -100.0, -80.0];
        softmax_in_place(&mut s);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 0.0);
        assert!(s[2] > 0.0 && s[2].is_normal(), "{s:?}");
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }
}
