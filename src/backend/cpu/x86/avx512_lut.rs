//! The ternary matmul as table lookups (AVX-512 BW `vpermw`), the AVX-512 VNNI level's kernel
//! for every step that does not run on AMX tiles. Measured against the level's `vpdpbusd`
//! kernel and an AVX2 `vpshufb` table design in tools/lut_experiment (BENCHMARKS.md): exact
//! byte tables cannot beat `vpmaddubsw` on AVX2, 16-bit tables beat `vpdpbusd` here.
//!
//! Three ternary weights have 27 patterns. With `idx = c0 + 3·c1 + 9·c2` (codes `c = w + 1`), a
//! token's table `T[idx] = Σ_i (c_i − 1)·x_i` of one group of 3 columns has 27 exact i16 entries
//! (`|T| ≤ 384`), one zmm of 32 words. `vpermw` reads only the low 5 bits of each word index, so
//! a row's indices of three consecutive groups (a "triple", 9 columns) share one u16 (bits 0–4,
//! 5–9, 10–14), the second and third a plain shift away: the weights take 16 bits per 9 columns
//! (1.78 bits per weight, against 2 for the byte-row layout), repacked once at upload.
//!
//! One index vector is 32 rows × one triple; a step takes 2 of them (64 rows) so that each
//! table load serves two `vpermw`. Per token and triple: 6 `vpermw` + 6 `vpaddw` for 576 MACs.
//! Sums stay in i16 for [`BLOCK_TRIPLES`] triples (a column block, whose tables for a chunk of
//! 4 tokens stay in L1 while the job's rows pass), then are widened into i32. The tables hold
//! signed weights' sums, so no `Σ x` correction; the i32 sums are exactly the scalar
//! reference's (`reference::ternary_dot_rows_scalar`), as the byte-row kernels' are.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::ternary::TernaryMatrix;

/// Columns per table.
const GROUP: usize = 3;
/// Columns per index vector (three groups).
const TRIPLE_COLS: usize = 3 * GROUP;
/// Rows per index vector (the word lanes of a zmm).
pub const LANE_ROWS: usize = 32;
/// Rows per step of the kernel (two index vectors).
pub const PAIR_ROWS: usize = 2 * LANE_ROWS;
/// Triples per column block: 3 lookups per triple, each `|T| ≤ 3·128 = 384`, so 28 triples
/// stay within 84 · 384 = 32256 < 2^15 (exact in i16). 28 was also the fastest block in the
/// experiment's sweep (its tables for 4 tokens are 21 KiB, under half of L1).
const BLOCK_TRIPLES: usize = 28;

/// 64 bytes, aligned to a cache line: one table (32 i16) or one index vector (32 u16).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line([u16; 32]);

impl Line {
    pub const ZERO: Line = Line([0; 32]);
}

/// A ternary matrix repacked for this kernel: index vectors by column block, then row block,
/// then triple, `[ceil(triples / 28), rows_pad / 32, 28]` (the last block's tail unused), so
/// that the kernel's column-block-outer walk over a run of rows reads one contiguous run.
pub struct LutWeights {
    pub rows: usize,
    pub cols: usize,
    /// Rows rounded up to whole pairs of index vectors (padding rows have weight 0).
    pub rows_pad: usize,
    pub triples: usize,
    data: Vec<Line>, // [blocks, rows_pad / 32, BLOCK_TRIPLES]
}

impl std::fmt::Debug for LutWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LutWeights([{}, {}])", self.rows, self.cols)
    }
}

impl LutWeights {
    /// Repacks `w` from its byte-row layout (rows and columns past the matrix get code 1,
    /// weight 0; padded columns meet activations of 0 anyway).
    pub fn new(w: &TernaryMatrix) -> LutWeights {
        let (rows, cols) = (w.rows, w.cols);
        let rows_pad = rows.div_ceil(PAIR_ROWS) * PAIR_ROWS;
        let triples = cols.div_ceil(TRIPLE_COLS);
        let row_blocks = rows_pad / LANE_ROWS;
        let p4 = rows / 4;
        let mut data =
            vec![Line::ZERO; triples.div_ceil(BLOCK_TRIPLES) * row_blocks * BLOCK_TRIPLES];
        data.par_chunks_mut(BLOCK_TRIPLES)
            .enumerate()
            .for_each(|(k, vectors)| {
                let (b, rb) = (k / row_blocks, k % row_blocks);
                let s0 = b * BLOCK_TRIPLES;
                let n = (triples - s0).min(BLOCK_TRIPLES);
                for lane in 0..LANE_ROWS {
                    let r = rb * LANE_ROWS + lane;
                    let bytes = (r < rows).then(|| (r / p4, w.byte_row(r % p4)));
                    let code = |c: usize| match bytes {
                        Some((i, row)) if c < cols => ((row[c] >> (2 * i)) & 3) as u16,
                        _ => 1,
                    };
                    let index = |c0: usize| code(c0) + 3 * code(c0 + 1) + 9 * code(c0 + 2);
                    for (s, v) in vectors[..n].iter_mut().enumerate() {
                        let c0 = (s0 + s) * TRIPLE_COLS;
                        v.0[lane] = index(c0) | (index(c0 + 3) << 5) | (index(c0 + 6) << 10);
                    }
                }
            });
        LutWeights {
            rows,
            cols,
            rows_pad,
            triples,
            data,
        }
    }

    /// The index vectors of row block `rb` in column block `b`: `[BLOCK_TRIPLES]`.
    fn vectors(&self, b: usize, rb: usize) -> *const Line {
        let row_blocks = self.rows_pad / LANE_ROWS;
        self.data[(b * row_blocks + rb) * BLOCK_TRIPLES..].as_ptr()
    }

    /// Bytes held by the repacked weights.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.data[..])
    }

    /// Tables per token: one per group of 3 columns.
    pub fn tables_per_token(&self) -> usize {
        GROUP * self.triples
    }
}

/// One token's tables: line `g` holds `T[idx]` of group `g` (columns 3g .. 3g + 2, 0 past the
/// row) as 32 i16, entries 27–31 zero.
///
/// # Safety
/// AVX-512 F + BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn build_tables(q: &[i8], tables: &mut [Line]) {
    // the weight (c_i − 1) of column i of the group at each index, 0 past 26
    let weight = |i: u32| {
        let w: [i16; 32] = std::array::from_fn(|idx| {
            if idx < 27 {
                ((idx as u32 / 3u32.pow(i)) % 3) as i16 - 1
            } else {
                0
            }
        });
        // SAFETY: w is 64 bytes.
        unsafe { _mm512_loadu_si512(w.as_ptr() as *const _) }
    };
    let d = [weight(0), weight(1), weight(2)];
    let x = |c: usize| q.get(c).map_or(0, |&v| v as i16);
    for (g, line) in tables.iter_mut().enumerate() {
        let c0 = g * GROUP;
        let mut t = _mm512_mullo_epi16(d[0], _mm512_set1_epi16(x(c0)));
        t = _mm512_add_epi16(t, _mm512_mullo_epi16(d[1], _mm512_set1_epi16(x(c0 + 1))));
        t = _mm512_add_epi16(t, _mm512_mullo_epi16(d[2], _mm512_set1_epi16(x(c0 + 2))));
        // SAFETY: a line is 64 bytes, 64-aligned.
        unsafe { _mm512_store_si512(line.0.as_mut_ptr() as *mut _, t) };
    }
}

/// `sums[t, r − 64·p0] = Σ_c W[r, c] · q_t[c]` for rows `64·p0 .. 64·p1` (row pairs `p0..p1`)
/// and the `tokens` tokens whose tables are `tables [tokens, tables_per_token]`;
/// `sums [tokens, 64·(p1 − p0)]` is overwritten.
///
/// Loop order: column block by column block, chunks of 4 tokens inside, so that a chunk's
/// tables of one block (5.25 KiB per token) stay in L1 while every row pair passes; the index
/// vectors of one block and a run of rows are one contiguous run of memory.
///
/// # Safety
/// AVX-512 F + BW; `p1 ≤ rows_pad / 64`; `tables` and `sums` as long as that.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn lut_rows(
    w: &LutWeights,
    tables: &[Line],
    tokens: usize,
    (p0, p1): (usize, usize),
    sums: &mut [i32],
) {
    let per_token = w.tables_per_token();
    assert!(tables.len() >= tokens * per_token && p1 * PAIR_ROWS <= w.rows_pad);
    assert!(sums.len() >= tokens * (p1 - p0) * PAIR_ROWS);
    sums.fill(0);
    let run = (p1 - p0) * PAIR_ROWS;
    let blocks = |f: &mut dyn FnMut(usize, usize)| {
        for s0 in (0..w.triples).step_by(BLOCK_TRIPLES) {
            f(s0, (s0 + BLOCK_TRIPLES).min(w.triples));
        }
    };
    // tokens t0 .. t0 + k, 4 at a time (one zmm accumulator per token and index vector); 8 at
    // a time was measured: 1.02-1.04x at 64 tokens, 0.92x on 8-row decode steps (BENCHMARKS.md)
    let chunks = |t0: usize, pairs: (usize, usize), cols: (usize, usize), sums: &mut [i32]| {
        let mut t = t0;
        while t < tokens {
            let k = match tokens - t {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let at = Block {
                t0: t,
                base: p0,
                run,
                pairs,
                cols,
            };
            // SAFETY: passed on; t + k ≤ tokens.
            unsafe {
                match k {
                    4 => block::<4>(w, tables, sums, at),
                    2 => block::<2>(w, tables, sums, at),
                    _ => block::<1>(w, tables, sums, at),
                }
            }
            t += k;
        }
    };
    blocks(&mut |s0, s1| chunks(0, (p0, p1), (s0, s1), sums));
}

/// Where a [`block`] call works: tokens from `t0`, row pairs `pairs`, triples `cols`, its sums at
/// `[t, (pair − base)·64 + row]` of rows of `run`.
#[derive(Clone, Copy)]
struct Block {
    t0: usize,
    base: usize,
    run: usize,
    pairs: (usize, usize),
    cols: (usize, usize),
}

/// Row pairs × tokens `t0 .. t0 + TC` × triples of `at` (≤ [`BLOCK_TRIPLES`] triples), added
/// into `sums`.
///
/// # Safety
/// As [`lut_rows`], `t0 + TC ≤` its tokens.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn block<const TC: usize>(w: &LutWeights, tables: &[Line], sums: &mut [i32], at: Block) {
    let Block {
        t0,
        base,
        run,
        pairs: (p0, p1),
        cols: (s0, s1),
    } = at;
    let per_token = w.tables_per_token();
    let tab: [*const Line; TC] =
        std::array::from_fn(|k| tables[(t0 + k) * per_token + GROUP * s0..].as_ptr());
    for pair in p0..p1 {
        let mut acc = [[_mm512_setzero_si512(); 2]; TC];
        let rb = 2 * pair; // the pair's first index-vector row block
        let wrow: [*const Line; 2] = std::array::from_fn(|v| w.vectors(s0 / BLOCK_TRIPLES, rb + v));
        for s in 0..s1 - s0 {
            // SAFETY (all loads): triple s0 + s < s1 ≤ triples of each row block lies in
            // `data`; group 3s + 2 < 3(s1 − s0) lies in each token's tables.
            let idx: [[__m512i; 3]; 2] = std::array::from_fn(|v| {
                let x = unsafe { _mm512_load_si512(wrow[v].add(s) as *const _) };
                // vpermw uses bits 0–4 of each index: the higher ones need no mask
                [x, _mm512_srli_epi16(x, 5), _mm512_srli_epi16(x, 10)]
            });
            for k in 0..TC {
                let line = unsafe { tab[k].add(GROUP * s) };
                let table: [__m512i; 3] =
                    std::array::from_fn(|j| unsafe { _mm512_load_si512(line.add(j) as *const _) });
                for v in 0..2 {
                    let p: [__m512i; 3] =
                        std::array::from_fn(|j| _mm512_permutexvar_epi16(idx[v][j], table[j]));
                    // one add on the accumulator's chain per triple
                    acc[k][v] = _mm512_add_epi16(
                        acc[k][v],
                        _mm512_add_epi16(_mm512_add_epi16(p[0], p[1]), p[2]),
                    );
                }
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            for (v, &a) in acc.iter().enumerate() {
                let at = (t0 + k) * run + (pair - base) * PAIR_ROWS + v * LANE_ROWS;
                let dst = sums[at..at + LANE_ROWS].as_mut_ptr();
                let lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a));
                let hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a, 1));
                // SAFETY: dst is 32 i32 of `sums` (sliced above).
                unsafe {
                    let (d0, d1) = (dst as *mut __m512i, dst.add(16) as *mut __m512i);
                    _mm512_storeu_si512(
                        d0 as *mut _,
                        _mm512_add_epi32(_mm512_loadu_si512(d0 as *const _), lo),
                    );
                    _mm512_storeu_si512(
                        d1 as *mut _,
                        _mm512_add_epi32(_mm512_loadu_si512(d1 as *const _), hi),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::reference::ternary_dot_rows_scalar;
    use crate::ternary::{pack_ternary, ByteStorage};
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// The table-lookup sums equal the scalar reference exactly, on odd shapes (rows not a
    /// multiple of 64, columns not of 9 or of a column block), token counts around the chunk of
    /// 4, and the extremes of the i16 sums: activations of −128 and 127 against rows of all +1
    /// and all −1 over several column blocks.
    #[test]
    fn lut_sums_equal_the_scalar_reference_exactly() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            eprintln!("skipped: no AVX-512 BW on this machine");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for &(rows, cols) in &[
            (4usize, 1usize),
            (12, 31),
            (68, 263),
            (132, 2567),
            (260, 700),
        ] {
            let mut w: Vec<i8> = (0..rows * cols).map(|_| r.random_range(-1..=1)).collect();
            w[..cols].fill(1); // row 0 all +1
            if rows > 4 {
                w[cols..2 * cols].fill(-1); // row 1 all −1
            }
            let m = TernaryMatrix::new(
                "w",
                rows,
                cols,
                ByteStorage::Owned(Arc::new(pack_ternary(&w, rows, cols).unwrap())),
                1.0,
            )
            .unwrap();
            let lut = LutWeights::new(&m);
            for tokens in [1usize, 2, 3, 4, 5, 7, 8, 9, 15] {
                let q: Vec<i8> = (0..tokens * cols)
                    .map(|k| match k / cols {
                        0 => -128,
                        1 => 127,
                        _ => r.random_range(-128..=127),
                    })
                    .collect();
                let per = lut.tables_per_token();
                let mut tables = vec![Line::ZERO; tokens * per];
                for t in 0..tokens {
                    // SAFETY: AVX-512 F + BW checked above.
                    unsafe {
                        build_tables(&q[t * cols..(t + 1) * cols], &mut tables[t * per..][..per])
                    };
                }
                let pairs = lut.rows_pad / PAIR_ROWS;
                // all pairs at once, and split in two jobs
                for split in [pairs, pairs / 2] {
                    for (p0, p1) in [(0, split), (split, pairs)] {
                        if p0 == p1 {
                            continue;
                        }
                        let run = (p1 - p0) * PAIR_ROWS;
                        let mut sums = vec![7i32; tokens * run];
                        // SAFETY: AVX-512 F + BW; p1 ≤ pairs; sizes as allocated.
                        unsafe { lut_rows(&lut, &tables, tokens, (p0, p1), &mut sums) };
                        let mut want = vec![0i32; rows];
                        for t in 0..tokens {
                            ternary_dot_rows_scalar(&m, &q[t * cols..(t + 1) * cols], &mut want);
                            for row in p0 * PAIR_ROWS..(p1 * PAIR_ROWS).min(rows) {
                                let got = sums[t * run + row - p0 * PAIR_ROWS];
                                assert_eq!(
                                    got, want[row],
                                    "[{rows}x{cols}] {tokens} tokens, pairs {p0}..{p1}: token {t} row {row}: got {got}, expected {}",
                                    want[row]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
