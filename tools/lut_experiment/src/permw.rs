//! Exact AVX-512BW lookup-table kernel (vpermw), groups of 3 columns.
//!
//! Three ternary weights have 27 patterns; with `idx = c0 + 3·c1 + 9·c2` (codes `c = w + 1`)
//! the token's table `T[idx] = Σ_i (c_i − 1)·x_i` has 27 exact int16 entries (`|T| ≤ 384`),
//! which fit one zmm of 32 words. `vpermw` reads only the low 5 bits of each word index, so a
//! row's indices of three consecutive groups share one u16 (bits 0-4, 5-9, 10-14) and the
//! second and third are a plain shift away (no mask): the weights take 16 bits per 9 columns,
//! less than the shipped 2 bits per weight.
//!
//! One index vector is 32 rows × one group triple. Per token and triple: 3 vpermw + 3 vpaddw
//! = 6 ops for 32 rows × 9 columns = 288 MACs, i.e. 1.33 ops per 64 MACs (0.67 of them
//! permutes), and 3 table loads; plus the shared 1 load + 2 shifts per index vector, divided
//! among the token chunk. With two index vectors per step (64 rows, the default), each table
//! load serves two vpermw: 0.33 loads per 64 MACs. Sums stay in i16 for at most
//! [`MAX_BLOCK_TRIPLES`] triples, then are widened into i32.

use std::arch::x86_64::*;

use crate::util::Line;

/// Columns per table.
const GROUP: usize = 3;
/// Columns per index vector (three groups).
const TRIPLE_COLS: usize = 3 * GROUP;
/// Rows per index vector (word lanes of a zmm).
const ROWS: usize = 32;
/// Most triples between widenings: 3 lookups per triple, each `|T| ≤ 3·128 = 384`, so
/// 28 triples stay within 84 · 384 = 32256 < 2^15 (exact in i16).
pub const MAX_BLOCK_TRIPLES: usize = 28;

/// The blocking, a run-time choice so that the benchmark can sweep it.
#[derive(Clone, Copy, Debug)]
pub struct Blocking {
    /// Triples per column block (≤ [`MAX_BLOCK_TRIPLES`]): one block's tables are
    /// `3 · 64` bytes per triple and token.
    pub block_triples: usize,
    /// Largest token chunk sharing one index vector (1, 2, 4, 8 or 16; 8 with two row
    /// vectors): one zmm accumulator per token and row vector, of the 32.
    pub max_chunk: usize,
    /// Index vectors (of 32 rows) per step, 1 or 2: with 2, each table load serves two
    /// vpermw.
    pub row_vectors: usize,
}

impl Default for Blocking {
    /// The best, or within 4% of it, of `--sweep` on Zen 5 for both 2B4T shapes and every T:
    /// 28 triples × 4 tokens (21 KiB of tables per block, under half of the 48 KiB L1) × 64
    /// rows.
    fn default() -> Self {
        Blocking {
            block_triples: 28,
            max_chunk: 4,
            row_vectors: 2,
        }
    }
}

/// The weights repacked for this kernel (a load-time step, not timed).
pub struct PermwWeights {
    rows: usize,
    cols: usize,
    rows_pad: usize,
    triples: usize,
    /// `[rows_pad / 32][triples]` index vectors, one line each.
    data: Vec<Line>,
}

impl PermwWeights {
    /// Repacks `codes` (`[rows][cols]`, row-major). Padded rows and columns get code 1
    /// (weight 0); any code would do, since padded columns' activations are 0 and padded rows
    /// are dropped.
    pub fn new(codes: &[u8], rows: usize, cols: usize) -> Self {
        // whole pairs of index vectors, for `Blocking::row_vectors == 2`
        let rows_pad = rows.div_ceil(2 * ROWS) * 2 * ROWS;
        let triples = cols.div_ceil(TRIPLE_COLS);
        let code = |r: usize, c: usize| {
            if r < rows && c < cols {
                codes[r * cols + c]
            } else {
                1
            }
        };
        let index = |r: usize, g: usize| {
            let c0 = g * GROUP;
            (code(r, c0) + 3 * code(r, c0 + 1) + 9 * code(r, c0 + 2)) as u16
        };
        let mut data = vec![Line::ZERO; rows_pad / ROWS * triples];
        for rb in 0..rows_pad / ROWS {
            for s in 0..triples {
                let line = &mut data[rb * triples + s].0;
                for lane in 0..ROWS {
                    let r = rb * ROWS + lane;
                    let word =
                        index(r, 3 * s) | (index(r, 3 * s + 1) << 5) | (index(r, 3 * s + 2) << 10);
                    line[2 * lane..2 * lane + 2].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
        PermwWeights {
            rows,
            cols,
            rows_pad,
            triples,
            data,
        }
    }
}

/// Per-call scratch (tables and i32 sums), kept between calls.
#[derive(Default)]
pub struct PermwScratch {
    tables: Vec<Line>,
    sums: Vec<i32>,
}

/// `out[t · rows + r] = Σ_c W[r, c] · x[t · cols + c]` for `T = x.len() / cols` tokens. The
/// tables hold signed weights' sums, so no `Σ x` correction is needed.
pub fn matmul(w: &PermwWeights, b: Blocking, x: &[i8], s: &mut PermwScratch, out: &mut [i32]) {
    assert!(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"));
    assert!(
        (1..=MAX_BLOCK_TRIPLES).contains(&b.block_triples),
        "i16 sums would overflow"
    );
    assert!(matches!(b.row_vectors, 1 | 2), "row_vectors is 1 or 2");
    let t_n = x.len() / w.cols;
    assert_eq!(x.len(), t_n * w.cols);
    assert_eq!(out.len(), t_n * w.rows);
    let groups = 3 * w.triples;
    s.tables.resize(t_n * groups, Line::ZERO);
    s.sums.clear();
    s.sums.resize(t_n * w.rows_pad, 0);
    for t in 0..t_n {
        // SAFETY: AVX-512 F + BW checked above; the run holds `groups` lines.
        unsafe {
            build_tables(
                &x[t * w.cols..(t + 1) * w.cols],
                &mut s.tables[t * groups..][..groups],
            )
        };
    }
    // column blocks outer, token chunks next: one chunk's tables of one block stay in L1
    // while all row blocks pass; the block's index vectors (64 B per triple and 32 rows) are
    // re-read from L2 once per token chunk
    for s0 in (0..w.triples).step_by(b.block_triples) {
        let s1 = (s0 + b.block_triples).min(w.triples);
        let mut t = 0;
        while t < t_n {
            let cap = if b.row_vectors == 2 { 8 } else { 16 };
            let chunk = (t_n - t).min(b.max_chunk).min(cap);
            let step = match chunk {
                16.. => 16,
                8..=15 => 8,
                4..=7 => 4,
                2 | 3 => 2,
                _ => 1,
            };
            // SAFETY: AVX-512 F + BW checked above; sizes as set up here.
            unsafe {
                let (tab, sums) = (&s.tables, &mut s.sums);
                match (step, b.row_vectors) {
                    (16, _) => block::<16, 1>(w, tab, sums, t, s0, s1),
                    (8, 1) => block::<8, 1>(w, tab, sums, t, s0, s1),
                    (4, 1) => block::<4, 1>(w, tab, sums, t, s0, s1),
                    (2, 1) => block::<2, 1>(w, tab, sums, t, s0, s1),
                    (1, 1) => block::<1, 1>(w, tab, sums, t, s0, s1),
                    (8, _) => block::<8, 2>(w, tab, sums, t, s0, s1),
                    (4, _) => block::<4, 2>(w, tab, sums, t, s0, s1),
                    (2, _) => block::<2, 2>(w, tab, sums, t, s0, s1),
                    _ => block::<1, 2>(w, tab, sums, t, s0, s1),
                }
            }
            t += step;
        }
    }
    for t in 0..t_n {
        out[t * w.rows..(t + 1) * w.rows]
            .copy_from_slice(&s.sums[t * w.rows_pad..t * w.rows_pad + w.rows]);
    }
}

/// One token's tables: line `g` holds `T[idx]` of group `g` as 32 i16 (entries 27-31 zero).
///
/// # Safety
/// AVX-512 F + BW; `tables.len() == 3 · ⌈cols / 9⌉`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn build_tables(x: &[i8], tables: &mut [Line]) {
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
    let xat = |c: usize| x.get(c).map_or(0, |&v| v as i16);
    for (g, line) in tables.iter_mut().enumerate() {
        let c0 = g * GROUP;
        let mut t = _mm512_mullo_epi16(d[0], _mm512_set1_epi16(xat(c0)));
        t = _mm512_add_epi16(t, _mm512_mullo_epi16(d[1], _mm512_set1_epi16(xat(c0 + 1))));
        t = _mm512_add_epi16(t, _mm512_mullo_epi16(d[2], _mm512_set1_epi16(xat(c0 + 2))));
        // SAFETY: a line is 64 bytes, 64-aligned.
        unsafe { _mm512_store_si512(line.0.as_mut_ptr() as *mut _, t) };
    }
}

/// Row blocks of `32 · RV` (`RV` index vectors) × tokens `t0 .. t0 + TC` × triples `s0 .. s1`
/// (≤ [`MAX_BLOCK_TRIPLES`]), added into `sums`.
///
/// # Safety
/// AVX-512 F + BW; the sizes [`matmul`] sets up, `t0 + TC ≤` the token count, `s1 ≤ triples`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn block<const TC: usize, const RV: usize>(
    w: &PermwWeights,
    tables: &[Line],
    sums: &mut [i32],
    t0: usize,
    s0: usize,
    s1: usize,
) {
    let groups = 3 * w.triples;
    let tab: [*const Line; TC] =
        std::array::from_fn(|k| tables[(t0 + k) * groups + 3 * s0..].as_ptr());
    for rb in (0..w.rows_pad / ROWS).step_by(RV) {
        let mut acc = [[_mm512_setzero_si512(); RV]; TC];
        // rows_pad is a multiple of 64, so row blocks rb .. rb + RV exist
        let wrow: [*const Line; RV] =
            std::array::from_fn(|r| w.data[(rb + r) * w.triples + s0..].as_ptr());
        for s in 0..s1 - s0 {
            // SAFETY (all loads): triple s0 + s < s1 ≤ triples of each row block lies in
            // `data`; group 3s + 2 < 3(s1 − s0) lies in each token's table run.
            let idx: [[__m512i; 3]; RV] = std::array::from_fn(|r| {
                let v = unsafe { _mm512_load_si512(wrow[r].add(s) as *const _) };
                // vpermw uses bits 0-4 of each index: the higher indices need no mask
                [v, _mm512_srli_epi16(v, 5), _mm512_srli_epi16(v, 10)]
            });
            for k in 0..TC {
                let line = unsafe { tab[k].add(3 * s) };
                let table: [__m512i; 3] =
                    std::array::from_fn(|j| unsafe { _mm512_load_si512(line.add(j) as *const _) });
                for r in 0..RV {
                    let p: [__m512i; 3] =
                        std::array::from_fn(|j| _mm512_permutexvar_epi16(idx[r][j], table[j]));
                    // one add on the accumulator's chain per triple
                    acc[k][r] = _mm512_add_epi16(
                        acc[k][r],
                        _mm512_add_epi16(_mm512_add_epi16(p[0], p[1]), p[2]),
                    );
                }
            }
        }
        for k in 0..TC {
            for r in 0..RV {
                let dst = sums[(t0 + k) * w.rows_pad + (rb + r) * ROWS..][..ROWS].as_mut_ptr();
                let lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(acc[k][r]));
                let hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(acc[k][r], 1));
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
