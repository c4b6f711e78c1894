//! The 4-bit LM head (`--lm-head q4`), a CPU option for machines where decode waits on memory.
//! The 2B4T head `[128256, 2560]` is 657 MB in bf16 and 348 MB as q8; here each row is stored in
//! blocks of [`Q4_BLOCK`] columns as 4-bit codes with one bf16 step per block (0.53 bytes per
//! weight, 174 MB for 2B4T: half of q8).
//!
//! Per block `s = absmax / 7` rounded *up* to bf16 (so no weight clamps), `q = round(w / s)` in
//! [-7, 7], stored as the code `q + 8` in [1, 15]. Byte `k` of a block holds column `k` in its low
//! nibble and column `k + 32` in its high nibble: one AND and one shift of 32 bytes give the
//! block's two halves in column order. The activation row is rounded to int8 ([`Q4Input`],
//! `x ≈ q · inv_scale`, 127 levels: its error is ~1/18 of the weights'), so the x86 kernel takes
//! unsigned codes × signed activations with `pmaddubsw` and no widening, and subtracts
//! `8 · Σ x` per block once (the codes' offset). Each block is an exact integer dot, turned into
//! f32 once. Columns past `cols` hold the code 8 (zero) and activation 0.
//!
//! Made from the exact float matrix at load. [`dot_q4_scalar`] (in `reference.rs`) is the plain
//! twin of the SIMD kernels: the block sums are the same integers; NEON adds them in the scalar
//! order (equal), the x86 kernel in eight lanes (within a tolerance).

use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
use super::arm::neon;
use super::dispatch::CpuLevel;
use super::reference::dot_q4_scalar;
#[cfg(target_arch = "x86_64")]
use super::x86::avx2;
use crate::load::FloatMatrix;

/// Columns per scale block.
pub const Q4_BLOCK: usize = 64;
/// Bytes of codes per block (two columns per byte).
pub const Q4_BLOCK_BYTES: usize = Q4_BLOCK / 2;

/// A 4-bit copy of a float matrix `[rows, cols]`, blockwise scaled.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>, // [rows, blocks * 16]  two 4-bit codes per byte (layout above)
    pub scales: Vec<u16>, // [rows, blocks]  bf16 bits of each block's step (0 for an all-zero block)
    pub blocks: usize,    // ceil(cols / Q4_BLOCK)
}

impl Q4Matrix {
    /// Quantizes `m` row by row (rows in parallel). `rows_done` is called after each chunk of
    /// rows so that a caller can release the source pages it no longer needs.
    pub fn quantize(m: &FloatMatrix, mut rows_done: impl FnMut(std::ops::Range<usize>)) -> Self {
        let (rows, cols) = (m.rows, m.cols);
        let blocks = cols.div_ceil(Q4_BLOCK);
        let row_bytes = blocks * Q4_BLOCK_BYTES;
        let mut codes = vec![0u8; rows * row_bytes];
        let mut scales = vec![0u16; rows * blocks];
        // Chunks of 4096 rows (20 MB of bf16 for 2B4T) bound the source pages held at once.
        const CHUNK: usize = 4096;
        for (c, (qc, sc)) in codes
            .chunks_mut(CHUNK * row_bytes.max(1))
            .zip(scales.chunks_mut(CHUNK * blocks.max(1)))
            .enumerate()
        {
            let r0 = c * CHUNK;
            qc.par_chunks_mut(row_bytes.max(1))
                .zip(sc.par_chunks_mut(blocks.max(1)))
                .enumerate()
                .for_each_init(
                    || vec![0f32; cols],
                    |row, (i, (qr, sr))| {
                        m.row_f32(r0 + i, row);
                        quantize_row_q4(row, qr, sr);
                    },
                );
            rows_done(r0..(r0 + CHUNK).min(rows));
        }
        Q4Matrix {
            rows,
            cols,
            codes,
            scales,
            blocks,
        }
    }

    /// Bytes held: codes plus scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }

    fn row(&self, r: usize) -> (&[u8], &[u16]) {
        let rb = self.blocks * Q4_BLOCK_BYTES;
        (
            &self.codes[r * rb..(r + 1) * rb],
            &self.scales[r * self.blocks..(r + 1) * self.blocks],
        )
    }

    /// `Σ_c W[r, c] · x[c]` with the fastest kernel of `level`.
    #[inline]
    pub fn dot(&self, level: CpuLevel, r: usize, x: &Q4Input) -> f32 {
        debug_assert_eq!(x.q.len(), self.blocks * Q4_BLOCK);
        let (q, s) = self.row(r);
        let sum = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is only ever one `CpuLevel::available()` returned (AVX2 + FMA);
            // the row and x hold `blocks` whole blocks (x padded).
            CpuLevel::Avx2 | CpuLevel::AvxVnni | CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
                avx2::dot_q4_avx2_rows::<1, 1>([q], [s], [&x.q], [&x.offsets])[0][0]
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above (aarch64 levels all have NEON).
            CpuLevel::Neon | CpuLevel::NeonDot => unsafe { neon::dot_q4_neon(q, s, &x.q) },
            _ => dot_q4_scalar(q, s, &x.q),
        };
        sum * x.inv_scale
    }

    /// [`Q4Matrix::dot`] of two rows (the same results), reading their codes side by side:
    /// two memory streams keep more of a core's memory bandwidth busy than one.
    #[inline]
    pub fn dot2(&self, level: CpuLevel, r: [usize; 2], x: &Q4Input) -> [f32; 2] {
        self.dot_tokens(level, r, [x])[0]
    }

    /// The dots of `R` rows with each of `T` activation rows, `[T][R]`, each row's codes decoded
    /// once for all of them (a batched decode step). Each result is [`Q4Matrix::dot`]'s bit for
    /// bit, whatever `R` and `T`.
    #[inline]
    pub fn dot_tokens<const R: usize, const T: usize>(
        &self,
        level: CpuLevel,
        r: [usize; R],
        xs: [&Q4Input; T],
    ) -> [[f32; R]; T] {
        match level {
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx2 | CpuLevel::AvxVnni | CpuLevel::Avx512Vnni | CpuLevel::Amx => {
                for x in xs {
                    debug_assert_eq!(x.q.len(), self.blocks * Q4_BLOCK);
                }
                let rows = r.map(|i| self.row(i));
                // SAFETY: as in `dot`.
                let sums = unsafe {
                    avx2::dot_q4_avx2_rows::<R, T>(
                        rows.map(|(q, _)| q),
                        rows.map(|(_, s)| s),
                        xs.map(|x| &x.q[..]),
                        xs.map(|x| &x.offsets[..]),
                    )
                };
                std::array::from_fn(|t| sums[t].map(|s| s * xs[t].inv_scale))
            }
            _ => xs.map(|x| r.map(|i| self.dot(level, i, x))),
        }
    }

    /// The scalar twin of [`Q4Matrix::dot`].
    #[cfg(test)]
    fn dot_scalar(&self, r: usize, x: &Q4Input) -> f32 {
        let (q, s) = self.row(r);
        dot_q4_scalar(q, s, &x.q) * x.inv_scale
    }

    /// Row `r` dequantized: `out [cols]`.
    #[cfg(test)]
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (q, s) = self.row(r);
        for (c, o) in out.iter_mut().enumerate() {
            *o = q4_weight(q, c) as f32 * bf16_to_f32(s[c / Q4_BLOCK]);
        }
    }
}

/// One activation row rounded to int8 for the q4 head: `x ≈ q · inv_scale`, zero-padded to whole
/// blocks, with each block's code offset `8 · Σ q` for the x86 kernel.
#[derive(Debug, Clone)]
pub struct Q4Input {
    pub q: Vec<i8>,        // [blocks * 64]  (0 past the row's length)
    pub offsets: Vec<i32>, // [blocks]  8 · Σ q over the block
    pub inv_scale: f32,
}

impl Q4Input {
    pub fn new(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(Q4_BLOCK);
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
        let mut q = vec![0i8; blocks * Q4_BLOCK];
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = (v * s).round().clamp(-127.0, 127.0) as i8;
        }
        let offsets = q
            .chunks(Q4_BLOCK)
            .map(|b| 8 * b.iter().map(|&v| v as i32).sum::<i32>())
            .collect();
        Q4Input {
            q,
            offsets,
            inv_scale: if absmax > 0.0 { absmax / 127.0 } else { 0.0 },
        }
    }
}

/// The bf16 bits `s` as an f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(s: u16) -> f32 {
    f32::from_bits((s as u32) << 16)
}

/// The signed 4-bit weight of column `c` of a row of codes.
#[inline(always)]
pub fn q4_weight(codes: &[u8], c: usize) -> i32 {
    let (b, k) = (c / Q4_BLOCK, c % Q4_BLOCK);
    let byte = codes[b * Q4_BLOCK_BYTES + k % Q4_BLOCK_BYTES];
    let code = if k < Q4_BLOCK_BYTES {
        byte & 15
    } else {
        byte >> 4
    };
    code as i32 - 8
}

/// Quantizes one row: per block the step `s` = absmax / 7 rounded up to bf16, `q = round(w / s)`.
/// `codes` holds `ceil(len / 64) * 32` bytes, `scales` one entry per block.
pub fn quantize_row_q4(row: &[f32], codes: &mut [u8], scales: &mut [u16]) {
    for ((wb, cb), s) in row
        .chunks(Q4_BLOCK)
        .zip(codes.chunks_mut(Q4_BLOCK_BYTES))
        .zip(scales.iter_mut())
    {
        let absmax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = absmax / 7.0;
        // Round the step up to bf16 (a positive finite f32: adding one unit of the 16th bit
        // carries into the exponent correctly), so |w / s| ≤ 7 and nothing clamps.
        let bits = step.to_bits();
        let up = if bits & 0xFFFF != 0 {
            (bits + 0x1_0000) & 0xFFFF_0000
        } else {
            bits
        };
        *s = (up >> 16) as u16;
        let sf = f32::from_bits(up);
        let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
        let code = |k: usize| -> u8 {
            let q = wb
                .get(k)
                .map_or(0.0, |&w| (w * inv).round().clamp(-7.0, 7.0));
            (q as i32 + 8) as u8
        };
        for (k, byte) in cb.iter_mut().enumerate() {
            *byte = code(k) | (code(k + Q4_BLOCK_BYTES) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::tests::bf16_matrix;
    use super::*;
    use crate::load::{decode_floats, FloatDtype};
    use crate::ternary::ByteStorage;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// Every weight within half a step of its block's `absmax / 7` (the step rounded up to bf16
    /// adds less than 2^-7 of it: bf16 keeps 7 mantissa bits), and codes of the padding columns
    /// zero.
    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        for cols in [1, 31, 63, 64, 65, 128, 200] {
            let m = bf16_matrix(9, cols, cols as u64);
            let q4 = Q4Matrix::quantize(&m, |_| {});
            assert_eq!(q4.blocks, cols.div_ceil(Q4_BLOCK));
            let mut exact = vec![0f32; cols];
            let mut approx = vec![0f32; cols];
            for r in 0..m.rows {
                decode_floats(m.dtype, m.row_bytes(r), &mut exact);
                q4.row_f32(r, &mut approx);
                for (c, (e, a)) in exact.iter().zip(&approx).enumerate() {
                    let b = c / Q4_BLOCK;
                    let absmax = exact[b * Q4_BLOCK..((b + 1) * Q4_BLOCK).min(cols)]
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()));
                    let bound = absmax / 7.0 * (1.0 + 1.0 / 128.0) / 2.0 + 1e-7;
                    assert!(
                        (e - a).abs() <= bound,
                        "cols {cols} row {r} col {c}: got {a}, expected {e} (bound {bound})"
                    );
                }
                let (codes, _) = q4.row(r);
                for c in cols..q4.blocks * Q4_BLOCK {
                    assert_eq!(q4_weight(codes, c), 0, "cols {cols} padding col {c}");
                }
            }
        }
    }

    #[test]
    fn every_level_matches_the_scalar_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for cols in [1, 7, 63, 64, 65, 130, 2560] {
            let m = bf16_matrix(5, cols, 10 + cols as u64);
            let q4 = Q4Matrix::quantize(&m, |_| {});
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-4f32..4.0)).collect();
            let hx = Q4Input::new(&x);
            let mut row = vec![0f32; cols];
            for r in 0..m.rows {
                // the scalar twin is the dot of the dequantized row with the int8 activations
                // (each within half a step, 4/127, of x)
                q4.row_f32(r, &mut row);
                let exact: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                let dequant = q4.dot_scalar(r, &hx);
                let bound = row.iter().map(|w| w.abs()).sum::<f32>() * 0.5 * 4.0 / 127.0;
                assert!(
                    (dequant - exact).abs() <= bound + 1e-5,
                    "cols {cols} row {r}: got {dequant}, expected {exact}"
                );
            }
            for level in CpuLevel::available() {
                for r in 0..m.rows {
                    let (got, want) = (q4.dot(level, r, &hx), q4.dot_scalar(r, &hx));
                    let tol = 1e-4 + 1e-4 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{} cols {cols} row {r}: got {got}, expected {want}",
                        level.name()
                    );
                    let pair = [r, (r + 3) % m.rows];
                    let two = q4.dot2(level, pair, &hx);
                    for (i, &g) in two.iter().enumerate() {
                        let one = q4.dot(level, pair[i], &hx);
                        assert_eq!(
                            g.to_bits(),
                            one.to_bits(),
                            "{} cols {cols} rows {pair:?}: dot2 {g} vs dot {one}",
                            level.name()
                        );
                    }
                    // two activation rows at once (a batched step): the one-token dots
                    let x2: Vec<f32> = x.iter().map(|v| -0.5 * v + 0.25).collect();
                    let hx2 = Q4Input::new(&x2);
                    let both = q4.dot_tokens(level, pair, [&hx, &hx2]);
                    for (t, h) in [&hx, &hx2].into_iter().enumerate() {
                        for (i, &g) in both[t].iter().enumerate() {
                            let one = q4.dot(level, pair[i], h);
                            assert_eq!(
                                g.to_bits(),
                                one.to_bits(),
                                "{} cols {cols} rows {pair:?} token {t}: {g} vs {one}",
                                level.name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Extreme integers: codes 0 and 15 (weights -8, never written but decodable, and 7) and
    /// random; activations 127 and -128; random scales; odd widths. NEON adds the block
    /// sums in the scalar order (equal); x86 in lanes (within a tolerance).
    #[test]
    fn extreme_values_match_the_scalar_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for cols in [1usize, 15, 63, 64, 65, 127, 128, 200, 2560] {
            let blocks = cols.div_ceil(Q4_BLOCK);
            let pick =
                |rng: &mut rand_chacha::ChaCha8Rng, pattern: usize, lo: i32, hi: i32| match pattern
                {
                    0 => rng.random_range(lo..=hi),
                    1 => lo,
                    2 => hi,
                    _ => [lo, hi][rng.random_range(0..2)],
                };
            for pattern in 0..4 {
                let q4 = Q4Matrix {
                    rows: 1,
                    cols,
                    codes: (0..blocks * Q4_BLOCK_BYTES)
                        .map(|_| {
                            let lo = pick(&mut rng, pattern, 0, 15) as u8;
                            let hi = pick(&mut rng, pattern, 0, 15) as u8;
                            lo | (hi << 4)
                        })
                        .collect(),
                    scales: (0..blocks)
                        .map(|_| half::bf16::from_f32(rng.random_range(0.0..0.01)).to_bits())
                        .collect(),
                    blocks,
                };
                for xp in 0..4 {
                    let mut q: Vec<i8> = (0..cols)
                        .map(|_| pick(&mut rng, xp, -128, 127) as i8)
                        .collect();
                    q.resize(blocks * Q4_BLOCK, 0);
                    let offsets = q
                        .chunks(Q4_BLOCK)
                        .map(|b| 8 * b.iter().map(|&v| v as i32).sum::<i32>())
                        .collect();
                    let hx = Q4Input {
                        q,
                        offsets,
                        inv_scale: 1e-4,
                    };
                    let want = q4.dot_scalar(0, &hx);
                    for level in CpuLevel::available() {
                        let got = q4.dot(level, 0, &hx);
                        let what = format!("{} cols {cols} w {pattern} x {xp}", level.name());
                        if matches!(level, CpuLevel::Neon | CpuLevel::NeonDot) {
                            assert_eq!(got, want, "{what}");
                        } else {
                            let tol = 1e-4 + 1e-4 * want.abs();
                            assert!(
                                (got - want).abs() <= tol,
                                "{what}: got {got}, expected {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn all_zero_blocks_stay_zero() {
        let m = FloatMatrix {
            name: "z".into(),
            rows: 1,
            cols: 70,
            dtype: FloatDtype::F32,
            data: ByteStorage::Owned(Arc::new(vec![0u8; 280])),
        };
        let q4 = Q4Matrix::quantize(&m, |_| {});
        assert!(q4.codes.iter().all(|&v| v == 0x88) && q4.scales.iter().all(|&s| s == 0));
        assert_eq!(q4.dot_scalar(0, &Q4Input::new(&[1.0; 70])), 0.0);
    }
}
