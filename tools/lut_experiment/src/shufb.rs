//! Exact AVX2 lookup-table kernel (vpshufb), bit-serial with groups of 4 columns.
//!
//! A code `c = w + 1 ∈ {0, 1, 2}` is `b0 + 2·b1` with bits `b0, b1`, so per row
//! `Σ c·x = Σ b0·x + 2·Σ b1·x`: each *plane* (b0 or b1) of 4 columns is a 4-bit index `m`
//! into the token's table `T[m] = Σ_{i ∈ m} x_i` (16 entries, one per subset of the 4 columns).
//! `|T| ≤ 512` needs 10 bits, so every table is stored biased, `T' = T + 512 ∈ [0, 1020]`, and
//! split into a low-byte table and a high-byte table (`T' >> 8 ∈ [0, 3]`): two vpshufb per
//! lookup vector. That split is the cost an exact table pays on 8-bit shuffles.
//!
//! Layout of one index vector (32 byte lanes): 128-bit half `h` looks up column group `2p + h`
//! (vpshufb's table is per 128-bit half, so one ymm table register holds two groups' tables);
//! inside a half, lanes `2i, 2i + 1` are row `i`'s plane-0 and plane-1 indices (8 rows). So
//! `maddubs(lo_lookup, [1, 2, 1, 2, …])` is `lo0 + 2·lo1` per row in one i16 lane, and the high
//! bytes (tiny) are summed as bytes and combined the same way only at a flush.
//!
//! Per index vector (8 rows × 8 columns × 1 token = 64 MACs): 2 table loads, 2 vpshufb,
//! 1 vpmaddubsw, 1 vpaddw, 1 vpaddb = 5 vector ALU ops; plus the shared index extraction
//! (1 load + 1 shift + 2 and per 2 index vectors) divided among the token chunk.

use std::arch::x86_64::*;

use crate::util::Line;

/// Columns per table.
const GROUP: usize = 4;
/// Columns covered by one 32-byte weight load: its low nibbles are one index vector (two
/// groups), its high nibbles the next one.
const QUAD_COLS: usize = 16;
/// Rows per index vector.
const ROWS: usize = 8;
/// Quads between flushes: the low-byte sum gains ≤ 255 + 2·255 = 765 per index vector, two
/// vectors per quad, so 32 quads reach ≤ 48960 < 2^16 (exact as u16), and the high bytes
/// ≤ 3 per vector reach ≤ 192 < 2^8 (exact as u8).
const BLOCK_QUADS: usize = 32;
/// The table bias: `T ∈ [−512, 508]` for int8 activations, `T + 512 ∈ [0, 1020]`.
const BIAS: i32 = 512;
/// Largest token chunk sharing one index extraction (2 accumulators per token of the 16 ymm).
const MAX_CHUNK: usize = 4;

/// The weights repacked for this kernel (a load-time step, not timed).
pub struct ShufbWeights {
    rows: usize,
    cols: usize,
    rows_pad: usize,
    quads: usize,
    /// `[rows_pad / 8][quads]` chunks of 32 bytes, two per line.
    data: Vec<Line>,
}

impl ShufbWeights {
    /// Repacks `codes` (`[rows][cols]`, row-major). Padded rows and columns get code 0; the
    /// padded columns' activations are 0, so they add nothing.
    pub fn new(codes: &[u8], rows: usize, cols: usize) -> Self {
        let rows_pad = rows.div_ceil(ROWS) * ROWS;
        let quads = cols.div_ceil(QUAD_COLS);
        let mut bytes = vec![0u8; rows_pad / ROWS * quads * 32];
        let code = |r: usize, c: usize| {
            if r < rows && c < cols {
                codes[r * cols + c]
            } else {
                0
            }
        };
        // the 4-bit index of `plane` of row r over the group starting at column c0
        let nibble = |r: usize, c0: usize, plane: usize| {
            (0..GROUP).fold(0u8, |m, i| m | (((code(r, c0 + i) >> plane) & 1) << i))
        };
        for rb in 0..rows_pad / ROWS {
            for s in 0..quads {
                let chunk = &mut bytes[(rb * quads + s) * 32..][..32];
                for (k, b) in chunk.iter_mut().enumerate() {
                    let (half, lane) = (k / 16, k % 16);
                    let (r, plane) = (rb * ROWS + lane / 2, lane % 2);
                    let c_lo = s * QUAD_COLS + half * GROUP; // group 4s + half
                    let c_hi = c_lo + 2 * GROUP; // group 4s + 2 + half
                    *b = nibble(r, c_lo, plane) | (nibble(r, c_hi, plane) << 4);
                }
            }
        }
        let data = bytes
            .chunks(64)
            .map(|c| {
                let mut line = Line::ZERO;
                line.0[..c.len()].copy_from_slice(c);
                line
            })
            .collect();
        ShufbWeights {
            rows,
            cols,
            rows_pad,
            quads,
            data,
        }
    }
}

/// Per-call scratch: the tables and the i32 sums, kept between calls so that timing does not
/// include allocation.
#[derive(Default)]
pub struct ShufbScratch {
    tables: Vec<Line>,
    sums: Vec<i32>,
}

/// `out[t · rows + r] = Σ_c W[r, c] · x[t · cols + c]` for `T = x.len() / cols` tokens;
/// `q_sum[t] = Σ_c x[t · cols + c]` (known from quantization, as for the shipped kernels).
pub fn matmul(w: &ShufbWeights, x: &[i8], q_sum: &[i32], s: &mut ShufbScratch, out: &mut [i32]) {
    assert!(is_x86_feature_detected!("avx2"));
    let t_n = x.len() / w.cols;
    assert_eq!(x.len(), t_n * w.cols);
    assert_eq!(out.len(), t_n * w.rows);
    assert_eq!(q_sum.len(), t_n);
    let pairs = 2 * w.quads;
    s.tables.resize(t_n * pairs, Line::ZERO);
    s.sums.clear();
    s.sums.resize(t_n * w.rows_pad, 0);
    for t in 0..t_n {
        // SAFETY: AVX2 is checked above; the table run holds `pairs` lines.
        unsafe {
            build_tables(
                &x[t * w.cols..(t + 1) * w.cols],
                &mut s.tables[t * pairs..][..pairs],
            )
        };
    }
    // column blocks outer, so that one block's tables (4 KiB per token) stay in L1 while
    // every row block and token chunk passes over them
    for q0 in (0..w.quads).step_by(BLOCK_QUADS) {
        let q1 = (q0 + BLOCK_QUADS).min(w.quads);
        let mut t = 0;
        while t < t_n {
            let chunk = (t_n - t).min(MAX_CHUNK);
            // SAFETY: AVX2 is checked above; tables, weights and sums have the sizes the
            // block kernel indexes (quads, pairs and rows_pad as set up here).
            unsafe {
                match chunk {
                    4 => block::<4>(w, &s.tables, &mut s.sums, t, q0, q1),
                    3 | 2 => block::<2>(w, &s.tables, &mut s.sums, t, q0, q1),
                    _ => block::<1>(w, &s.tables, &mut s.sums, t, q0, q1),
                }
            }
            t += if chunk == 3 { 2 } else { chunk };
        }
    }
    // undo the bias (512 per plane-0 lookup, 2·512 per plane-1 lookup, one of each per group
    // and row) and the code offset `Σ c·x − Σ x`
    let groups = (w.quads * QUAD_COLS / GROUP) as i32;
    for t in 0..t_n {
        for r in 0..w.rows {
            out[t * w.rows + r] = s.sums[t * w.rows_pad + r] - 3 * BIAS * groups - q_sum[t];
        }
    }
}

/// The biased low/high-byte tables of one token: line `p` holds the low-byte tables of groups
/// `2p, 2p + 1` (bytes 0-15, 16-31) and their high-byte tables (32-47, 48-63).
///
/// # Safety
/// AVX2; `tables.len() == 2 · ⌈cols / 16⌉`.
#[target_feature(enable = "avx2")]
unsafe fn build_tables(x: &[i8], tables: &mut [Line]) {
    // byte i of dword j of mask k is bit i of entry m = 4k + j (in both halves)
    let masks: [__m256i; 4] = std::array::from_fn(|k| {
        let mut b = [0u8; 32];
        for (n, v) in b.iter_mut().enumerate() {
            let (j, i) = ((n % 16) / 4, n % 4);
            *v = (((4 * k + j) >> i) & 1) as u8;
        }
        // SAFETY: b is 32 bytes.
        unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
    });
    let ones = _mm256_set1_epi16(1);
    let bias = _mm256_set1_epi16(BIAS as i16);
    let low = _mm256_set1_epi16(0xFF);
    let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (p, line) in tables.iter_mut().enumerate() {
        // the pair's 8 activations (zeros past the end), group 2p in the low half
        let mut xs = [0i8; 8];
        let c0 = p * 2 * GROUP;
        if c0 < x.len() {
            let n = (x.len() - c0).min(8);
            xs[..n].copy_from_slice(&x[c0..c0 + n]);
        }
        let v = _mm256_permutevar8x32_epi32(
            _mm256_set1_epi64x(i64::from_le_bytes(xs.map(|b| b as u8))),
            spread,
        );
        // dwords: T[4k .. 4k + 4] of each half's group (bit mask × x, summed over 4 bytes)
        let d = masks.map(|m| _mm256_madd_epi16(_mm256_maddubs_epi16(m, v), ones));
        let a = _mm256_add_epi16(_mm256_packs_epi32(d[0], d[1]), bias); // T'[0..8]
        let b = _mm256_add_epi16(_mm256_packs_epi32(d[2], d[3]), bias); // T'[8..16]
        let lo = _mm256_packus_epi16(_mm256_and_si256(a, low), _mm256_and_si256(b, low));
        let hi = _mm256_packus_epi16(_mm256_srli_epi16(a, 8), _mm256_srli_epi16(b, 8));
        let dst = line.0.as_mut_ptr() as *mut __m256i;
        // SAFETY: a line is 64 bytes, 64-aligned.
        unsafe {
            _mm256_store_si256(dst, lo);
            _mm256_store_si256(dst.add(1), hi);
        }
    }
}

/// Row blocks of 8 × tokens `t0 .. t0 + TC` × quads `q0 .. q1` (≤ [`BLOCK_QUADS`]), added into
/// `sums`.
///
/// # Safety
/// AVX2; the sizes [`matmul`] sets up, `t0 + TC ≤` the token count, `q1 ≤ w.quads`.
#[target_feature(enable = "avx2")]
unsafe fn block<const TC: usize>(
    w: &ShufbWeights,
    tables: &[Line],
    sums: &mut [i32],
    t0: usize,
    q0: usize,
    q1: usize,
) {
    let pairs = 2 * w.quads;
    let m0f = _mm256_set1_epi8(0x0F);
    let w12 = _mm256_set1_epi16(0x0201); // bytes [1, 2, 1, 2, …]: plane 0 + 2 · plane 1
    let wbase = w.data.as_ptr() as *const u8;
    // each token's tables from pair 2·q0 on
    let tab: [*const u8; TC] =
        std::array::from_fn(|k| tables[(t0 + k) * pairs + 2 * q0..].as_ptr() as *const u8);
    for rb in 0..w.rows_pad / ROWS {
        let mut acc_lo = [_mm256_setzero_si256(); TC];
        let mut acc_hi = [_mm256_setzero_si256(); TC];
        // SAFETY (all loads): quad s < q1 ≤ quads of row block rb < rows_pad / 8 lies in
        // `data`; pair 2(s − q0) + 1 < 2(q1 − q0) lies in each token's table run.
        let wrow = unsafe { wbase.add((rb * w.quads + q0) * 32) };
        for s in 0..q1 - q0 {
            let v = unsafe { _mm256_load_si256(wrow.add(s * 32) as *const __m256i) };
            let idx = [
                _mm256_and_si256(v, m0f),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f),
            ];
            for k in 0..TC {
                for (j, &i) in idx.iter().enumerate() {
                    let line = unsafe { tab[k].add((2 * s + j) * 64) as *const __m256i };
                    let (tl, th) =
                        unsafe { (_mm256_load_si256(line), _mm256_load_si256(line.add(1))) };
                    let lo = _mm256_shuffle_epi8(tl, i);
                    acc_lo[k] = _mm256_add_epi16(acc_lo[k], _mm256_maddubs_epi16(lo, w12));
                    acc_hi[k] = _mm256_add_epi8(acc_hi[k], _mm256_shuffle_epi8(th, i));
                }
            }
        }
        for k in 0..TC {
            // u16 low sums (both halves are the same 8 rows, other groups) and the high bytes
            // as plane 0 + 2 · plane 1, each widened to i32: row sum = lo + 256 · hi
            let l = acc_lo[k];
            let l32 = _mm256_add_epi32(
                _mm256_cvtepu16_epi32(_mm256_castsi256_si128(l)),
                _mm256_cvtepu16_epi32(_mm256_extracti128_si256(l, 1)),
            );
            let h = _mm256_maddubs_epi16(acc_hi[k], w12);
            let h32 = _mm256_add_epi32(
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1)),
            );
            let total = _mm256_add_epi32(l32, _mm256_slli_epi32(h32, 8));
            let dst =
                sums[(t0 + k) * w.rows_pad + rb * ROWS..][..ROWS].as_mut_ptr() as *mut __m256i;
            // SAFETY: dst is 8 i32 of `sums` (sliced above).
            unsafe { _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), total)) };
        }
    }
}
