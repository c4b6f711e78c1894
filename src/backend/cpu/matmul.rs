//! The CPU backend's matrix products: the ternary matmul in its strategies (two-stream decode
//! for one token, 4/2/1-token blocks or table lookups for prefill, AMX tiles for steps of 2+
//! tokens: one token block with the codes unpacked in L1, or many with them unpacked once) and
//! the LM head (two-stream decode over the vocabulary rows, or AMX-BF16 tiles for an exact bf16
//! head at the AMX level).

use std::cell::RefCell;

use super::dispatch::CpuLevel;
use super::dispatch::{
    dot_bf16_tokens, dot_f16_tokens, dot_q8_0, ternary_dot4, ternary_dot4_rows2, ternary_dot4_x2,
    ternary_dot4_x4,
};
use super::pool::DisjointSlice;
use super::q4::{Q4Input, Q4Matrix};
use super::q8::{HeadInput, Q8Matrix};
use super::reference::rms_norm_row;
use super::{CpuBackend, CpuLinear, CpuLmHead, CpuQTensor, CpuTensor, LutWeights};
use crate::backend::check_matmul;
use crate::error::{BitnetError, Result};
use crate::load::{decode_floats, FloatDtype, FloatMatrix};
use crate::ternary::{BlockScales, TernaryMatrix};

/// Steps of at least this many tokens run their ternary matmuls on AMX tiles. A tile product
/// costs the same for 1 or 16 tokens, so a step of a few rows pays for 16; from 2 rows it still
/// beats the `vpdpbusd` kernel, and from 4 the table-lookup kernel (BENCHMARKS.md). A one-token
/// step is bound by memory and keeps the two-stream byte-row kernel.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const AMX_MIN_TOKENS: usize = 2;

/// Steps of at least this many tokens run the table-lookup kernel where the weights were
/// repacked for it: a one-token step keeps the byte-row decode kernel, whose two memory streams
/// decoded faster (tg32 19.3–23.7 t/s against 14.4–17.1 with tables; pp64 ran 1.8× faster with
/// them, BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
const LUT_MIN_TOKENS: usize = 2;

/// Byte rows per prefill job: 4 runs of 16 outputs per token (whole cache lines for 2B4T, whose
/// matrices have multiples of 64 rows, in the 64-byte aligned outputs).
const BYTE_ROWS: usize = 16;
/// Tokens per prefill block: their int8 activations (≤ 32 × 6912 B for 2B4T) stay in L2.
const TOKEN_BLOCK: usize = 32;

/// Where a ternary matmul's sums go: `out [n, stride]`, output row `i·P + p` of byte row `p`
/// of the part starting at column `col0`, scaled by the token's factor
/// (`out_scale / act_scale[t]`).
struct Outputs<'a> {
    out: DisjointSlice<'a, f32>, // [n, stride]
    factor: &'a [f32],           // [n]
    stride: usize,
    col0: usize,
    p4: usize,
}

/// A job's scratch of i32 sums (`[tokens, rows]` of the table-lookup kernel), per thread.
#[cfg(target_arch = "x86_64")]
fn with_sums<R>(len: usize, f: impl FnOnce(&mut [i32]) -> R) -> R {
    thread_local! {
        static SUMS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    }
    SUMS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0);
        }
        f(&mut s[..len])
    })
}

impl Outputs<'_> {
    /// Where output row `i·P + p` of token `t` lies in `out`.
    #[inline(always)]
    fn at(&self, t: usize, i: usize, p: usize) -> usize {
        t * self.stride + self.col0 + i * self.p4 + p
    }

    /// `out[t, i·P + p] = r[i] · factor[t]` for the 4 rows of byte row `p`, from float sums.
    ///
    /// # Safety
    /// As [`Outputs::put`].
    #[inline(always)]
    unsafe fn put_f32(&self, t: usize, p: usize, r: [f32; 4]) {
        for (i, &v) in r.iter().enumerate() {
            // SAFETY: passed on from the caller.
            unsafe { self.out.write(self.at(t, i, p), v * self.factor[t]) };
        }
    }

    /// [`Outputs::put`] for a block of tokens from `t0` and the byte rows `rows` of one job
    /// (`sums [tokens, 4, BYTE_ROWS]`): one run of `rows.len()` outputs per token and plane.
    ///
    /// # Safety
    /// No other job writes these byte rows (jobs own disjoint byte rows).
    unsafe fn put_block(
        &self,
        t0: usize,
        sums: &[[[i32; BYTE_ROWS]; 4]],
        rows: std::ops::Range<usize>,
    ) {
        for (k, planes) in sums.iter().enumerate() {
            let t = t0 + k;
            let f = self.factor[t];
            for (i, plane) in planes.iter().enumerate() {
                let start = self.at(t, i, rows.start);
                // SAFETY: passed on from the caller.
                let run = unsafe { self.out.slice_mut(start..start + rows.len()) };
                for (o, &v) in run.iter_mut().zip(plane) {
                    *o = v as f32 * f;
                }
            }
        }
    }

    /// `out[t, i·P + p] = r[i] · factor[t]` for the 4 rows of byte row `p`.
    ///
    /// # Safety
    /// No other job writes byte row `p` of token `t` (jobs own disjoint byte rows).
    #[inline(always)]
    unsafe fn put(&self, t: usize, p: usize, r: [i32; 4]) {
        // SAFETY: passed on from the caller.
        unsafe { self.put_f32(t, p, r.map(|v| v as f32)) }
    }
}

impl CpuBackend {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    /// Whether a step of `rows` tokens runs its ternary matmuls on AMX tiles.
    pub(super) fn uses_amx(&self, rows: usize) -> bool {
        self.level == CpuLevel::Amx && rows >= AMX_MIN_TOKENS
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    /// Whether the exact head `m` runs on AMX-BF16 tiles: a bf16 head whose rows are whole tile
    /// steps (32 columns), at the AMX level, on every step (one row or many: each logit is then
    /// the same sum whatever the batch).
    pub(super) fn uses_amx_head(&self, m: &FloatMatrix) -> bool {
        self.level == CpuLevel::Amx
            && m.dtype == FloatDtype::Bf16
            && m.cols.is_multiple_of(super::x86::amx::HEAD_K)
            && super::x86::amx::bf16_available()
    }

    /// `out[t, i·P + p] = (Σ W[i·P + p]·q[t]) · out_scale / act_scale[t]`: the shape checks,
    /// then per part of a concatenated matrix (its columns of `out`, its own scale) one factor
    /// per token and the strategy for this step.
    pub(super) fn matmul(
        &mut self,
        w: &CpuLinear,
        x: &CpuQTensor,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let n = self.n();
        check_matmul(&w.name, (w.rows, w.cols), (x.capacity, x.cols), n)?;
        self.check("ternary_matmul", out, w.rows)?;
        #[cfg(target_arch = "x86_64")]
        if n >= LUT_MIN_TOKENS && !w.lut.is_empty() && w.lut.iter().all(Option::is_some) {
            self.matmul_lut(w, x, out);
            return Ok(());
        }
        let mut col0 = 0;
        for part in &w.parts {
            self.matmul_part(part, x, out, col0);
            col0 += part.rows;
        }
        Ok(())
    }

    /// One part of [`CpuBackend::matmul`]: `out[t, col0 + r]` for the part's rows `r`.
    fn matmul_part(&mut self, w: &TernaryMatrix, x: &CpuQTensor, out: &mut CpuTensor, col0: usize) {
        let n = self.n();
        let stride = out.cols;
        self.token_factor.clear();
        self.token_factor
            .extend(x.scales[..n].iter().map(|&s| w.out_scale / s));
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // quantize laid out the tiles exactly when this step is for AMX
        if x.tiles_rows == n && n > 0 && w.block_scales.is_none() {
            if n <= super::x86::amx::TILE_TOKENS {
                self.matmul_amx_one_block(w, x, out, col0);
            } else {
                self.matmul_amx(w, x, out, col0);
            }
            return;
        }
        let outputs = Outputs {
            out: DisjointSlice::new(&mut out.data[..n * stride]),
            factor: &self.token_factor,
            stride,
            col0,
            p4: w.rows / 4,
        };
        if let Some(blocks) = &w.block_scales {
            self.matmul_block_scaled(w, blocks, x, &outputs);
        } else if n == 1 {
            self.matmul_decode(w, x, &outputs);
        } else {
            self.matmul_prefill(w, x, &outputs);
        }
    }

    /// Whether ternary matmuls of steps of `LUT_MIN_TOKENS` (2) or more run on the table-lookup
    /// kernel: at the AVX-512 VNNI level (its `vpermw` tables beat its `vpdpbusd` kernel,
    /// BENCHMARKS.md; the AMX level runs such steps on tiles), unless `BITNET_CPU_NO_LUT=1` (an
    /// A/B, or to save the repacked copy's memory: 0.89 × the 2-bit weights, kept beside them
    /// for decode).
    pub(super) fn uses_lut(&self) -> bool {
        cfg!(target_arch = "x86_64") && self.use_lut && self.level == CpuLevel::Avx512Vnni
    }

    /// `w` repacked for the table-lookup kernel, if this backend uses it and `w` has one scale.
    pub(super) fn repack_for_lut(&self, w: &TernaryMatrix) -> Option<LutWeights> {
        if !self.uses_lut() || w.block_scales.is_some() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        return Some(LutWeights::new(w));
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// The ternary matmul on the table-lookup kernel (`x86/avx512_lut.rs`), every part of `w`
    /// repacked: per chunk of up to [`TOKEN_BLOCK`] tokens, every token's tables once for all
    /// parts (they depend on the input only; one job per token), then per part ~8 jobs per
    /// thread, each a chunk of tokens (all of a step of up to 8, else 4) × a run of
    /// row pairs (a contiguous run of index vectors per column block), writing its exact sums
    /// scaled.
    #[cfg(target_arch = "x86_64")]
    fn matmul_lut(&mut self, w: &CpuLinear, x: &CpuQTensor, out: &mut CpuTensor) {
        use super::x86::avx512_lut::{self, Line, PAIR_ROWS};
        let (n, cols, stride) = (self.n(), w.cols, out.cols);
        let mut tables = std::mem::take(&mut self.lut_tables);
        let out = DisjointSlice::new(&mut out.data[..n * stride]);
        let lut = |k: usize| {
            w.lut[k]
                .as_deref()
                .expect("every part repacked (the caller checks)")
        };
        let per_token = lut(0).tables_per_token();
        for t0 in (0..n).step_by(TOKEN_BLOCK) {
            let tn = TOKEN_BLOCK.min(n - t0);
            tables.resize(tn * per_token, Line::ZERO);
            self.pool
                .for_each_chunk_mut(&mut tables[..tn * per_token], per_token, |t, tab| {
                    let q = &x.q[(t0 + t) * cols..(t0 + t + 1) * cols];
                    // SAFETY: the AVX-512 VNNI level has AVX-512 F + BW (`uses_lut`).
                    unsafe { avx512_lut::build_tables(q, tab) }
                });
            let tables = &tables[..tn * per_token];
            let mut col0 = 0;
            for (k, part) in w.parts.iter().enumerate() {
                let lut = lut(k);
                self.token_factor.clear();
                self.token_factor
                    .extend(x.scales[t0..t0 + tn].iter().map(|&s| part.out_scale / s));
                let factor = &self.token_factor; // [tn]
                let pairs = lut.rows_pad / PAIR_ROWS;
                // job j: (chunk of tokens, run of row pairs), ~8 jobs per thread. A decode step
                // of up to 8 rows is one chunk, so that a run's index vectors come from memory
                // once (8-row steps 1.06–1.16× over chunks of 4, BENCHMARKS.md); longer steps
                // take 4 tokens a job (their tables of a column block stay in L1).
                let job_tokens = if tn <= 8 { tn } else { 4 };
                let chunks = tn.div_ceil(job_tokens);
                let job_pairs = pairs.div_ceil((8 * self.threads).div_ceil(chunks)).max(1);
                let pair_jobs = pairs.div_ceil(job_pairs);
                let job = |j: usize| {
                    let (tc, pc) = (j / pair_jobs, j % pair_jobs);
                    let (ta, tb) = (tc * job_tokens, ((tc + 1) * job_tokens).min(tn));
                    let (p0, p1) = (pc * job_pairs, ((pc + 1) * job_pairs).min(pairs));
                    let run = (p1 - p0) * PAIR_ROWS;
                    with_sums((tb - ta) * run, |sums| {
                        let tab = &tables[ta * per_token..tb * per_token];
                        // SAFETY: AVX-512 F + BW (`uses_lut`); p1 ≤ pairs; sizes checked
                        // inside.
                        unsafe { avx512_lut::lut_rows(lut, tab, tb - ta, (p0, p1), sums) };
                        let (r0, r1) = (p0 * PAIR_ROWS, (p1 * PAIR_ROWS).min(lut.rows));
                        for t in ta..tb {
                            let o = (t0 + t) * stride + col0;
                            // SAFETY: rows r0..r1 of tokens ta..tb are this job's only.
                            let dst = unsafe { out.slice_mut(o + r0..o + r1) };
                            let f = factor[t];
                            for (d, &v) in dst.iter_mut().zip(&sums[(t - ta) * run..]) {
                                *d = v as f32 * f;
                            }
                        }
                    });
                };
                self.pool.run(chunks * pair_jobs, &job);
                col0 += part.rows;
            }
        }
        self.lut_tables = tables;
    }

    /// One token: a job takes a run of byte rows (byte row p serves output rows p, P+p, 2P+p,
    /// 3P+p) and reads the two halves of its run side by side (two memory streams); ~8 jobs
    /// per thread (few claims of the shared counter, still balanced).
    fn matmul_decode(&self, w: &TernaryMatrix, x: &CpuQTensor, outputs: &Outputs) {
        let (p4, level) = (w.rows / 4, self.level);
        let q = &x.q[..w.cols]; // [cols]
        let job_rows = p4.div_ceil(8 * self.threads).max(1);
        let job = |job: usize| {
            let (p0, p1) = (job * job_rows, ((job + 1) * job_rows).min(p4));
            // SAFETY (every put): p lies in this job's byte rows, which no other job writes.
            side_by_side(
                p1 - p0,
                |i, j| {
                    let bytes = [w.byte_row(p0 + i), w.byte_row(p0 + j)];
                    let r = ternary_dot4_rows2(level, bytes, q, x.sums[0]);
                    unsafe {
                        outputs.put(0, p0 + i, r[0]);
                        outputs.put(0, p0 + j, r[1]);
                    }
                },
                |i| {
                    let r = ternary_dot4(level, w.byte_row(p0 + i), q, x.sums[0]);
                    unsafe { outputs.put(0, p0 + i, r) }
                },
            );
        };
        self.pool.run(p4.div_ceil(job_rows), &job);
    }

    /// Several tokens: a job takes [`BYTE_ROWS`] byte rows and walks them once per block of
    /// [`TOKEN_BLOCK`] tokens, so that the block's activations stay in L2 and each byte row in
    /// L1 across the block; the tokens go 4, then 2, then 1 at a time through the kernels that
    /// extract the code planes once for all of them. A job's outputs are 4 runs of
    /// `BYTE_ROWS` floats per token that no other job writes: kept in a small buffer while the
    /// block runs and written a run at a time when it ends (one cache line each in the 64-byte
    /// aligned output), not 4 scattered floats per byte row and token as the kernels return
    /// them, which cost up to 1.2× on a [6912, 2560] matmul (BENCHMARKS.md).
    fn matmul_prefill(&self, w: &TernaryMatrix, x: &CpuQTensor, outputs: &Outputs) {
        let (n, p4, cols, level) = (self.n(), w.rows / 4, w.cols, self.level);
        let row = |t: usize| &x.q[t * cols..(t + 1) * cols]; // [cols]
        let job = |job: usize| {
            let (p0, p1) = (job * BYTE_ROWS, ((job + 1) * BYTE_ROWS).min(p4));
            // the block's sums, written out a cache line per (token, plane) once the block is
            // done: [token of the block, plane, byte row of the job]
            let mut sums = [[[0i32; BYTE_ROWS]; 4]; TOKEN_BLOCK];
            for t0 in (0..n).step_by(TOKEN_BLOCK) {
                let t1 = (t0 + TOKEN_BLOCK).min(n);
                for p in p0..p1 {
                    let bytes = w.byte_row(p); // [cols]
                    let mut keep = |t: usize, r: [i32; 4]| {
                        for (i, v) in r.into_iter().enumerate() {
                            sums[t - t0][i][p - p0] = v;
                        }
                    };
                    let mut t = t0;
                    while t + 4 <= t1 {
                        let r = ternary_dot4_x4(
                            level,
                            bytes,
                            [row(t), row(t + 1), row(t + 2), row(t + 3)],
                            [x.sums[t], x.sums[t + 1], x.sums[t + 2], x.sums[t + 3]],
                        );
                        for (k, r) in r.into_iter().enumerate() {
                            keep(t + k, r);
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
                        keep(t, r[0]);
                        keep(t + 1, r[1]);
                        t += 2;
                    }
                    if t < t1 {
                        keep(t, ternary_dot4(level, bytes, row(t), x.sums[t]));
                    }
                }
                // SAFETY: byte rows p0..p1 are this job's, which no other job writes.
                unsafe { outputs.put_block(t0, &sums[..t1 - t0], p0..p1) };
            }
        };
        self.pool.run(p4.div_ceil(BYTE_ROWS), &job);
    }

    /// A matrix with per-block scales (rare GGUF files, [`TernaryMatrix::block_scales`]): per
    /// token and byte row, the exact integer sum of each block of columns (the SIMD kernels on
    /// the block's slice, with the block's own Σq), scaled by the block's scale and summed in
    /// f32 in block order. A job takes [`BYTE_ROWS`] byte rows; no fast path, but the same
    /// kernels and threads.
    fn matmul_block_scaled(
        &self,
        w: &TernaryMatrix,
        blocks: &BlockScales,
        x: &CpuQTensor,
        outputs: &Outputs,
    ) {
        let (n, p4, cols, level) = (self.n(), w.rows / 4, w.cols, self.level);
        let (bw, nb) = (blocks.block, cols.div_ceil(blocks.block));
        let span = |b: usize| b * bw..((b + 1) * bw).min(cols);
        // Σq of every token's blocks: [n, nb]
        let block_sums: Vec<i32> = (0..n)
            .flat_map(|t| {
                let q = &x.q[t * cols..(t + 1) * cols];
                (0..nb).map(move |b| q[span(b)].iter().map(|&v| v as i32).sum())
            })
            .collect();
        let job = |job: usize| {
            let (p0, p1) = (job * BYTE_ROWS, ((job + 1) * BYTE_ROWS).min(p4));
            for t in 0..n {
                let q = &x.q[t * cols..(t + 1) * cols]; // [cols]
                for p in p0..p1 {
                    let bytes = w.byte_row(p);
                    let mut acc = [0f32; 4];
                    for b in 0..nb {
                        let r = ternary_dot4(
                            level,
                            &bytes[span(b)],
                            &q[span(b)],
                            block_sums[t * nb + b],
                        );
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a += blocks.scales[(i * p4 + p) * nb + b] * r[i] as f32;
                        }
                    }
                    // SAFETY: p lies in this job's byte rows, which no other job writes.
                    unsafe { outputs.put_f32(t, p, acc) };
                }
            }
        };
        self.pool.run(p4.div_ceil(BYTE_ROWS), &job);
    }

    /// The ternary matmul on AMX tiles (`x86/amx.rs`), for steps of more than 16 tokens. A job is one
    /// block of 16 packed byte rows (4 planes × 16 weight rows) and one chunk of tokens: it
    /// unpacks the block's codes into this thread's buffer (≤ 4 × 16 × 6912 B for 2B4T) and runs
    /// tile products over the chunk's token blocks, 32 tokens and 2 planes at a time. The chunk
    /// is sized so that its activations (`32 × padded_cols` bytes per pair of token blocks) stay
    /// in L2 while every job of the chunk reads them; chunks come first in the job order.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn matmul_amx(&self, w: &TernaryMatrix, x: &CpuQTensor, out: &mut CpuTensor, col0: usize) {
        use super::x86::amx::{self, padded_cols, TILE_K, TILE_ROWS, TILE_TOKENS};
        const CHUNK_BYTES: usize = 1 << 20;
        let n = self.n();
        let (p4, rows, cols) = (w.rows / 4, out.cols, w.cols);
        let kp = padded_cols(cols);
        let factor = &self.token_factor; // [n]
        let out_rows = DisjointSlice::new(&mut out.data[..n * rows]); // [n, stride]
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
                                    t0 * rows + col0 + plane * p4 + p0,
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

    /// [`CpuBackend::matmul_amx`] for a step of at most 16 tokens (one token block): each job
    /// takes 16 byte rows and unpacks their codes 64 columns at a time, in L1, right before
    /// the tiles multiply them (`amx::tile_rows_one_block`).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn matmul_amx_one_block(
        &self,
        w: &TernaryMatrix,
        x: &CpuQTensor,
        out: &mut CpuTensor,
        col0: usize,
    ) {
        use super::x86::amx::{self, padded_cols, TILE_ROWS, TILE_TOKENS};
        /// Two halves of 4 code tiles, on 64-byte lines.
        #[repr(C, align(64))]
        struct CodeTiles([u8; 2 * 4 * 1024]);
        let n = self.n();
        let (p4, rows, cols) = (w.rows / 4, out.cols, w.cols);
        let factor = &self.token_factor; // [n]
        let out_rows = DisjointSlice::new(&mut out.data[..n * rows]); // [n, stride]
        let block = &x.tiles[..TILE_TOKENS * padded_cols(cols)]; // [kp / 64, 16 tokens, 64]
        let packed = w.packed.as_slice(); // [p4, cols]
        let job = |j: usize| {
            let (p0, p1) = (j * TILE_ROWS, (j * TILE_ROWS + TILE_ROWS).min(p4));
            let mut buf = CodeTiles([0; 2 * 4 * 1024]);
            let mut c = [0i32; 4 * 256]; // [4 planes, 16 rows, 16 tokens]
                                         // SAFETY: AMX is available (the level), which implies AVX-512 BW; the block holds
                                         // 16 · kp bytes.
            unsafe {
                let tiles = amx::Tiles::configure();
                amx::tile_rows_one_block(
                    &tiles,
                    &packed[p0 * cols..p1 * cols],
                    cols,
                    block,
                    &mut buf.0,
                    &mut c,
                );
            }
            for (plane, tile) in c.chunks_exact(256).enumerate() {
                // SAFETY: this job alone owns byte rows p0..p1 (for every token); runs_ptr
                // checked the runs' bounds.
                unsafe {
                    let dst = out_rows.runs_ptr(col0 + plane * p4 + p0, rows, n, p1 - p0);
                    amx::store_tile(
                        tile.try_into().expect("256-element tile"),
                        p1 - p0,
                        &x.sums[..n],
                        &factor[..n],
                        dst,
                        rows,
                    );
                }
            }
        };
        self.pool.run(p4.div_ceil(TILE_ROWS), &job);
    }

    /// `logits = x · headᵀ` for the rows selected; the vocabulary rows in chunks across the
    /// threads, the two halves of each chunk side by side (two memory streams).
    pub(super) fn head_logits(
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
        let xs: Vec<&[f32]> = rows
            .iter()
            .map(|&src| &x.data[src as usize * h..(src as usize + 1) * h]) // [h] each
            .collect();
        self.head_logits_of(head, &xs, logits);
        Ok(())
    }

    /// The final norm and the head: only the rows that need logits are normed (into the
    /// scratch, reused across steps), then [`CpuBackend::head_logits`]'s kernels run on them.
    pub(super) fn norm_head_logits(
        &mut self,
        head: &CpuLmHead,
        x: &CpuTensor,
        (w, eps): (&[f32], f32),
        rows: &[u32],
        logits: &mut CpuTensor,
    ) -> Result<()> {
        let (n, h) = (self.n(), head.cols());
        self.check("lm_head", x, h)?;
        if w.len() != h {
            return Err(BitnetError::op(
                "lm_head",
                format!("final norm weight of {} values for rows of {h}", w.len()),
            ));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(BitnetError::op(
                "lm_head",
                format!("logit row {bad} is not a row of this {n}-row step"),
            ));
        }
        let out_rows = rows.len();
        if logits.cols != head.rows() || logits.capacity < out_rows {
            return Err(BitnetError::op(
                "lm_head",
                format!(
                    "logits tensor [{}, {}] cannot hold [{out_rows}, {}]",
                    logits.capacity,
                    logits.cols,
                    head.rows()
                ),
            ));
        }
        let mut normed = std::mem::take(&mut self.scratch.data); // [rows, h]
        if normed.len() < out_rows * h {
            normed.resize(out_rows * h, 0.0);
        }
        for (&src, out) in rows.iter().zip(normed.chunks_mut(h)) {
            let r = src as usize;
            rms_norm_row(&x.data[r * h..(r + 1) * h], w, eps, out);
        }
        let xs: Vec<&[f32]> = normed[..out_rows * h].chunks(h).collect(); // [h] each
        self.head_logits_of(head, &xs, logits);
        self.scratch.data = normed;
        Ok(())
    }

    /// Logits of the activation rows `xs` (`[h]` each) into rows 0.. of `logits`, checked by
    /// the callers.
    fn head_logits_of(&mut self, head: &CpuLmHead, xs: &[&[f32]], logits: &mut CpuTensor) {
        let (h, vocab) = (head.cols(), head.rows());
        let out_rows = xs.len();
        // 256 vocabulary rows per job: ~1.3 MB of bf16 head, enough to hide the cost of a claim.
        const CHUNK: usize = 256;
        let level = self.level;
        thread_local! {
            // One decoded head row, for f32 heads.
            static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        // One job per vocabulary chunk, every selected row inside it: the chunk is read from
        // memory once per step and from cache for the other rows (a batch of decode rows then
        // costs about one head read, not one per row). Each logit is the same dot product of the
        // same kernel whatever the rows, so a row's logits do not depend on the batch.
        let hxs: Vec<HeadInput> = match head {
            CpuLmHead::Q8(_) => xs.iter().map(|xr| HeadInput::new(xr)).collect(), // [h] int16
            _ => Vec::new(),
        };
        let q4xs: Vec<Q4Input> = match head {
            CpuLmHead::Q4(_) => xs.iter().map(|xr| Q4Input::new(xr)).collect(), // [h] int8
            _ => Vec::new(),
        };
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let amx_head = match head {
            CpuLmHead::Exact(m) if self.uses_amx_head(m) => {
                let mut acts = std::mem::take(&mut self.head_tiles); // given back below
                acts.fill(xs, h);
                Some((m, acts))
            }
            _ => None,
        };
        let all = DisjointSlice::new(&mut logits.data[..out_rows * vocab]); // [rows, vocab]
        let job = |c: usize| {
            let (v0, v1) = (c * CHUNK, ((c + 1) * CHUNK).min(vocab));
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if let Some((m, acts)) = &amx_head {
                // SAFETY: job c alone writes columns v0..v1 of every row.
                unsafe { head_rows_amx(m, acts, v0, v1, &all, vocab) };
                return;
            }
            let v = |i: usize| v0 + i;
            // Each pair of head rows is read once for a chunk of the rows (the same results as
            // one row at a time, bit for bit).
            // SAFETY (every write): job c alone writes columns v0..v1 of every row.
            let set = |t: usize, i: usize, val: f32| unsafe { all.write(t * vocab + v(i), val) };
            let m = match head {
                CpuLmHead::Q8(q8) => {
                    return head_rows_tokens(&Q8Dots(q8, level, &hxs), v1 - v0, v0, set);
                }
                CpuLmHead::Q4(q4) => {
                    return head_rows_tokens(&Q4Dots(q4, level, &q4xs), v1 - v0, v0, set);
                }
                CpuLmHead::Exact(m) if matches!(m.dtype, FloatDtype::Bf16 | FloatDtype::F16) => {
                    return head_rows_tokens(&HalfDots { m, level, xs }, v1 - v0, v0, set);
                }
                CpuLmHead::Exact(m) => m, // Q8_0 and f32: one row at a time
            };
            let row = |v: usize| m.row_bytes(v); // [h] in the file dtype
            for (r, &xr) in xs.iter().enumerate() {
                // SAFETY: job c alone writes columns v0..v1 of every row.
                let out = unsafe { all.slice_mut(r * vocab + v0..r * vocab + v1) };
                if m.dtype == FloatDtype::Q8_0 {
                    // a tied Q8_0 embedding (GGUF), read as stored
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = dot_q8_0(level, row(v(i)), xr);
                    }
                    continue;
                }
                for (i, o) in out.iter_mut().enumerate() {
                    // f32 heads: decoded row by row
                    *o = ROW.with_borrow_mut(|decoded| {
                        decoded.resize(h, 0.0);
                        decode_floats(m.dtype, row(v(i)), decoded);
                        decoded.iter().zip(xr).map(|(a, b)| a * b).sum()
                    });
                }
            }
        };
        self.pool.run(vocab.div_ceil(CHUNK), &job);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some((_, acts)) = amx_head {
            self.head_tiles = acts;
        }
    }
}

/// Logits `v0..v1` (a job's head rows) of every activation row on AMX-BF16 tiles, 16 head rows
/// at a time loaded straight from memory (a last run of fewer is copied, zero-padded, into a
/// scratch first), two groups of 5 activation rows per tile pass (one for an odd last group).
/// Each logit is the same sequence of tile products whatever the other rows, so the batch
/// changes no bit.
///
/// # Safety
/// The caller's job alone writes columns `v0..v1` of every row of `all` (`[rows, vocab]`);
/// `CpuBackend::uses_amx_head` said yes for `m`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn head_rows_amx(
    m: &FloatMatrix,
    acts: &super::x86::amx::HeadActivations,
    v0: usize,
    v1: usize,
    all: &DisjointSlice<'_, f32>,
    vocab: usize,
) {
    use super::x86::amx::{self, HEAD_GROUP};
    const RUN: usize = 16;
    thread_local! {
        // A last run of fewer than 16 head rows, zero-padded: [16, h] bf16.
        static TAIL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let (h, stride) = (m.cols, m.dtype.row_bytes(m.cols));
    let data = m.data.as_slice(); // [vocab, h] bf16
    let groups = acts.groups();
    // SAFETY: AMX-BF16 is available (`uses_amx_head`).
    let tiles = unsafe { amx::Tiles::configure() };
    let mut c = [0f32; 2 * 256]; // 2 tiles of [16 head rows, 16 columns]
    let mut r0 = v0;
    while r0 < v1 {
        let run = (v1 - r0).min(RUN);
        // logits r0 .. r0 + run of group g's rows from one tile
        let put = |tile: &[f32], g: usize| {
            let t0 = g * HEAD_GROUP;
            let t1 = (t0 + HEAD_GROUP).min(acts.rows);
            // SAFETY: this job alone writes columns v0..v1 ⊇ r0..r0 + run (the caller's
            // contract); runs_ptr checked the runs' bounds.
            unsafe {
                let dst = all.runs_ptr(t0 * vocab + r0, vocab, t1 - t0, run);
                let tile = tile.try_into().expect("256-element tile");
                amx::store_head_tile(tile, run, t1 - t0, dst, vocab);
            }
        };
        let mut product = |rows: *const u8| {
            for g in (0..groups).step_by(2) {
                if g + 1 < groups {
                    let pair = [acts.group(g), acts.group(g + 1)];
                    // SAFETY: 16 rows at `rows`; the groups hold h / 32 tiles each.
                    unsafe { amx::head_tiles_16x2(&tiles, rows, stride, h, pair, &mut c) };
                    put(&c[..256], g);
                    put(&c[256..512], g + 1);
                } else {
                    // SAFETY: 16 rows at `rows`; the group holds h / 32 tiles.
                    unsafe { amx::head_tiles_16x1(&tiles, rows, stride, h, acts.group(g), &mut c) };
                    put(&c[..256], g);
                }
            }
        };
        if run == RUN {
            product(data[r0 * stride..(r0 + RUN) * stride].as_ptr());
        } else {
            TAIL.with_borrow_mut(|tail| {
                tail.clear();
                tail.extend_from_slice(&data[r0 * stride..(r0 + run) * stride]);
                tail.resize(RUN * stride, 0);
                product(tail.as_ptr());
            });
        }
        r0 += run;
    }
}

/// A head and the activation rows of a step, for kernels that take several rows at once:
/// `dots` gives the logits of head rows `rows` for activation rows `t0 .. t0 + T`, `[T][R]`,
/// each the one-row, one-token result bit for bit, reading each head row once for all `T`.
trait TokenDots {
    /// Activation rows of the step.
    fn tokens(&self) -> usize;
    /// Activation rows per call that keep their sums in registers with 2 head rows.
    fn most_tokens(&self) -> usize;
    fn dots<const R: usize, const T: usize>(&self, rows: [usize; R], t0: usize) -> [[f32; R]; T];
}

/// The q8 head (`q8.rs`) and the step's rows rounded for it.
struct Q8Dots<'a>(&'a Q8Matrix, CpuLevel, &'a [HeadInput]);

impl TokenDots for Q8Dots<'_> {
    fn tokens(&self) -> usize {
        self.2.len()
    }
    fn most_tokens(&self) -> usize {
        // AVX-512 holds 4 (16 of 32 zmm); AVX2's 16 ymm spill at 4 (0.94× of 2 tokens, where 2
        // are 1.25× one at a time; `cargo bench --bench cpu_kernels -- "x 8 tokens"`).
        match self.1 {
            CpuLevel::Avx512Vnni | CpuLevel::Amx => 4,
            _ => 2,
        }
    }
    fn dots<const R: usize, const T: usize>(&self, rows: [usize; R], t0: usize) -> [[f32; R]; T] {
        self.0
            .dot_tokens(self.1, rows, std::array::from_fn(|k| &self.2[t0 + k]))
    }
}

/// The q4 head (`q4.rs`) and the step's rows rounded for it.
struct Q4Dots<'a>(&'a Q4Matrix, CpuLevel, &'a [Q4Input]);

impl TokenDots for Q4Dots<'_> {
    fn tokens(&self) -> usize {
        self.2.len()
    }
    fn most_tokens(&self) -> usize {
        2 // the AVX2 kernel's 16 registers: 4 sums, 4 decoded halves, 4 activations
    }
    fn dots<const R: usize, const T: usize>(&self, rows: [usize; R], t0: usize) -> [[f32; R]; T] {
        self.0
            .dot_tokens(self.1, rows, std::array::from_fn(|k| &self.2[t0 + k]))
    }
}

/// An exact head of 16-bit floats (bf16 checkpoints, the F16 embeddings of bitnet.cpp's files)
/// and the step's rows.
struct HalfDots<'a> {
    m: &'a FloatMatrix,
    level: CpuLevel,
    xs: &'a [&'a [f32]],
}

impl TokenDots for HalfDots<'_> {
    fn tokens(&self) -> usize {
        self.xs.len()
    }
    fn most_tokens(&self) -> usize {
        // AVX2's 16 registers: 8 sums, 4 widened halves, 2 activations; AVX-512's 32: 16 sums
        match self.level {
            CpuLevel::Avx512Vnni | CpuLevel::Amx => 4,
            _ => 2,
        }
    }
    fn dots<const R: usize, const T: usize>(&self, rows: [usize; R], t0: usize) -> [[f32; R]; T] {
        let rows = rows.map(|v| self.m.row_bytes(v));
        let xs = std::array::from_fn(|k| self.xs[t0 + k]);
        match self.m.dtype {
            FloatDtype::F16 => dot_f16_tokens(self.level, rows, xs),
            _ => dot_bf16_tokens(self.level, rows, xs),
        }
    }
}

/// The logits of every activation row of `d` for head rows `v0 .. v0 + len`, handed to
/// `set(token, i, logit)`: pairs of head rows side by side (two memory streams), each pair's
/// weights used for a chunk of activation rows while they are in registers.
fn head_rows_tokens<D: TokenDots>(d: &D, len: usize, v0: usize, set: impl Fn(usize, usize, f32)) {
    fn tokens<D: TokenDots, const R: usize>(
        d: &D,
        rows: [usize; R],
        v0: usize,
        set: &impl Fn(usize, usize, f32),
    ) {
        fn chunk<D: TokenDots, const R: usize, const T: usize>(
            d: &D,
            rows: [usize; R],
            t0: usize,
            v0: usize,
            set: &impl Fn(usize, usize, f32),
        ) {
            let got: [[f32; R]; T] = d.dots(rows.map(|i| v0 + i), t0);
            for (k, row) in got.iter().enumerate() {
                for (&i, &val) in rows.iter().zip(row) {
                    set(t0 + k, i, val);
                }
            }
        }
        let (n, mut t0) = (d.tokens(), 0);
        while t0 < n {
            let k = match (n - t0).min(d.most_tokens()) {
                4 => 4,
                2 | 3 => 2,
                _ => 1,
            };
            match k {
                4 => chunk::<D, R, 4>(d, rows, t0, v0, set),
                2 => chunk::<D, R, 2>(d, rows, t0, v0, set),
                _ => chunk::<D, R, 1>(d, rows, t0, v0, set),
            }
            t0 += k;
        }
    }
    side_by_side(
        len,
        |i, j| tokens(d, [i, j], v0, &set),
        |i| tokens(d, [i], v0, &set),
    );
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

#[cfg(test)]
mod tests {
    use super::super::dispatch::CpuLevel;
    use super::*;
    use crate::backend::{Backend, StepRow};

    /// The three bf16 parts of a float add up to it exactly.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn bf16_split_is_exact() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut xs: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.random_range(0x0c00_0000u32..0x7f00_0000)))
            .flat_map(|x| [x, -x])
            .collect();
        xs.extend([0.0, 1.0, -1.0, 1.0 + f32::EPSILON, 3.999_999_8, 3e38, 0.1]);
        for x in xs {
            let p = super::super::x86::amx::split_bf16(x);
            let sum = p.iter().map(|v| v.to_f64()).sum::<f64>();
            assert_eq!(sum, x as f64, "{x:e} split into {p:?}");
        }
    }

    /// The AMX-BF16 exact head: each logit within f32 summation error of the f64 dot product,
    /// and the same bits whether its row is computed alone, among 11 or among 19 (groups of 5
    /// rows one or two per tile pass),
    /// with head row counts that leave a last run of fewer than 16 rows, on 1 and 3 threads.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn amx_bf16_head_is_near_the_f64_dot_and_batch_invariant() {
        use crate::backend::HeadFormat;
        use rand::{Rng, SeedableRng};
        if !CpuLevel::available().contains(&CpuLevel::Amx)
            || !super::super::x86::amx::bf16_available()
        {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED amx_bf16_head_is_near_the_f64_dot_and_batch_invariant: no AMX-BF16 here"
            );
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        // last runs of 8 rows, none, 2 rows, and 8 rows in the third of three jobs
        for (vocab, h) in [(200usize, 96usize), (64, 32), (130, 2560), (600, 64)] {
            let m = super::super::q8::tests::bf16_matrix(vocab, h, vocab as u64);
            let n = 19;
            let x: Vec<f32> = (0..n * h).map(|_| rng.random_range(-4f32..4.0)).collect();
            for threads in [1, 3] {
                let mut b = CpuBackend::new(threads)
                    .unwrap()
                    .with_level(CpuLevel::Amx)
                    .unwrap();
                assert!(b.uses_amx_head(&m));
                let head = b.upload_lm_head(&m, None, HeadFormat::Exact).unwrap();
                let mut xt = b.alloc(n, h).unwrap();
                xt.data[..n * h].copy_from_slice(&x);
                b.begin_step(&StepRow::sequence(&vec![0; n], 0)).unwrap();
                // 19 rows: two pairs of groups of 5; 11 rows: a pair and a group alone
                let (mut all, mut some) = (b.alloc(n, vocab).unwrap(), b.alloc(11, vocab).unwrap());
                let all_rows: Vec<u32> = (0..n as u32).collect();
                b.lm_head(&head, &xt, &all_rows, &mut all).unwrap();
                b.lm_head(&head, &xt, &all_rows[..11], &mut some).unwrap();
                let mut alone = b.alloc(1, vocab).unwrap();
                for t in 0..n {
                    b.lm_head(&head, &xt, &[t as u32], &mut alone).unwrap();
                    let xr = &x[t * h..(t + 1) * h];
                    for v in 0..vocab {
                        let (got, one) = (all.data[t * vocab + v], alone.data[v]);
                        assert_eq!(
                            got.to_bits(),
                            one.to_bits(),
                            "[{vocab}, {h}] {threads} threads: row {t} logit {v}: {got} among {n}, {one} alone"
                        );
                        if t < 11 {
                            let among = some.data[t * vocab + v];
                            assert_eq!(
                                among.to_bits(),
                                one.to_bits(),
                                "[{vocab}, {h}] {threads} threads: row {t} logit {v}: {among} among 11, {one} alone"
                            );
                        }
                        let w = &m.row_bytes(v);
                        let (mut want, mut mag) = (0f64, 0f64);
                        for (k, &xv) in xr.iter().enumerate() {
                            let wv = half::bf16::from_le_bytes([w[2 * k], w[2 * k + 1]]).to_f64();
                            want += xv as f64 * wv;
                            mag += (xv as f64 * wv).abs();
                        }
                        let tol = 1e-6 * mag + 1e-9;
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "[{vocab}, {h}] row {t} logit {v}: got {got}, expected {want} (tolerance {tol:e})"
                        );
                    }
                }
                b.end_step().unwrap();
            }
        }
    }

    #[test]
    fn ternary_matmul_equals_the_scalar_dot_at_every_level_and_thread_count() {
        use crate::backend::cpu::reference::ternary_dot_byte_row;
        use crate::ternary::ByteStorage;
        use rand::{Rng, SeedableRng};
        use std::sync::Arc;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        // rows: fewer byte rows than a job, not a multiple of the job size, many jobs;
        // cols: below and above one SIMD step; tokens: every remainder of the 4- and 2-token
        // kernels, one full AMX token block (16), one more (17) and more than two blocks
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
            for n in [1usize, 2, 3, 5, 7, 16, 17, 37] {
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
                        let wl = b.upload_linear(&w).unwrap();
                        b.ternary_matmul(&wl, &q, &mut out).unwrap();
                        let p4 = rows / 4;
                        for t in 0..n {
                            // The expected value from the scalar quantizer, not from the
                            // backend's own quantize output (which is checked against it here).
                            let mut qt = vec![0i8; cols];
                            let scale = crate::backend::cpu::reference::quantize_row(
                                &x_data[t * cols..(t + 1) * cols],
                                &mut qt,
                            );
                            let sum: i32 = qt.iter().map(|&v| v as i32).sum();
                            assert_eq!(&q.q[t * cols..(t + 1) * cols], &qt[..], "quantize");
                            assert_eq!((q.scales[t], q.sums[t]), (scale, sum), "quantize");
                            let f = w.out_scale / scale;
                            for p in 0..p4 {
                                let r = ternary_dot_byte_row(w.byte_row(p), &qt, sum);
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
}
