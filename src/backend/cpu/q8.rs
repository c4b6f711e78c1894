//! The 8-bit LM head (`--lm-head q8`), a CPU option. Decoding a 2B4T token reads the whole
//! `[128256, 2560]` head; in bf16 that is 657 MB, more than all ternary weights together (497 MB).
//! Here each row is stored as int8 in blocks of [`Q8_BLOCK`] columns with one f32 scale per block
//! (`w ≈ q · absmax_block / 127`, 1.06 bytes per weight, 348 MB for 2B4T). The activation row is
//! rounded to int16 (`x ≈ q / s`, `s = 32767 / absmax`: 256× finer than the weights, so the weight
//! rounding is the only approximation that matters), which makes each block an exact integer dot
//! (`pmaddwd` on x86: 16 products per instruction, 2.5× fewer instructions than converting the
//! weights to f32), turned into f32 once per block.
//!
//! Made from the exact float matrix at load; the file stays the reference. [`dot_q8_scalar`]
//! (in `reference.rs`) is the plain twin of the SIMD kernels: the block sums are the same
//! integers, only the f32 sum over blocks runs in another order, so they are compared within a
//! tolerance.

use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
use super::arm::neon;
use super::dispatch::CpuLevel;
use super::reference::dot_q8_scalar;
#[cfg(target_arch = "x86_64")]
use super::x86::{avx2, avx512};
use crate::load::FloatMatrix;

/// Columns per scale block.
pub const Q8_BLOCK: usize = 64;

/// An int8 copy of a float matrix `[rows, cols]`, blockwise scaled.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,       // [rows, cols]
    pub scales: Vec<f32>, // [rows, blocks]  absmax / 127 of each block (0 for an all-zero block)
    pub blocks: usize,    // ceil(cols / Q8_BLOCK)
}

impl Q8Matrix {
    /// Quantizes `m` row by row (rows in parallel). `rows_done` is called after each chunk of
    /// rows so that a caller can release the source pages it no longer needs.
    pub fn quantize(m: &FloatMatrix, mut rows_done: impl FnMut(std::ops::Range<usize>)) -> Self {
        let (rows, cols) = (m.rows, m.cols);
        let blocks = cols.div_ceil(Q8_BLOCK);
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * blocks];
        // Chunks of 4096 rows (20 MB of bf16 for 2B4T) bound the source pages held at once.
        const CHUNK: usize = 4096;
        for (c, (qc, sc)) in q
            .chunks_mut(CHUNK * cols.max(1))
            .zip(scales.chunks_mut(CHUNK * blocks.max(1)))
            .enumerate()
        {
            let r0 = c * CHUNK;
            qc.par_chunks_mut(cols.max(1))
                .zip(sc.par_chunks_mut(blocks.max(1)))
                .enumerate()
                .for_each_init(
                    || vec![0f32; cols],
                    |row, (i, (qr, sr))| {
                        m.row_f32(r0 + i, row);
                        quantize_row_q8(row, qr, sr);
                    },
                );
            rows_done(r0..(r0 + CHUNK).min(rows));
        }
        Q8Matrix {
            rows,
            cols,
            q,
            scales,
            blocks,
        }
    }

    /// Bytes held: int8 weights plus the scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        (
            &self.q[r * self.cols..(r + 1) * self.cols],
            &self.scales[r * self.blocks..(r + 1) * self.blocks],
        )
    }

    /// `Σ_c W[r, c] · x[c]` with the fastest kernel of `level`.
    #[inline]
    pub fn dot(&self, level: CpuLevel, r: usize, x: &HeadInput) -> f32 {
        self.dot_tokens(level, [r], [x])[0][0]
    }

    /// [`Q8Matrix::dot`] of two rows (the same results), reading their weights side by side:
    /// two memory streams keep more of a core's memory bandwidth busy than one.
    #[inline]
    pub fn dot2(&self, level: CpuLevel, r: [usize; 2], x: &HeadInput) -> [f32; 2] {
        self.dot_tokens(level, r, [x])[0]
    }

    /// The dots of `R` rows with each of `T` activation rows, `[T][R]`, reading each weight
    /// once for all of them (a batch of decode rows costs one pass over the head's weights and
    /// `T` times the multiply-adds). Each result is [`Q8Matrix::dot`]'s bit for bit, whatever
    /// `R` and `T`, so a sequence's logits do not depend on the batch it runs in.
    #[inline]
    pub fn dot_tokens<const R: usize, const T: usize>(
        &self,
        level: CpuLevel,
        r: [usize; R],
        xs: [&HeadInput; T],
    ) -> [[f32; R]; T] {
        for x in xs {
            debug_assert_eq!(x.q.len(), self.cols);
        }
        let q = r.map(|i| self.row(i).0);
        let s = r.map(|i| self.row(i).1);
        let xq = xs.map(|x| &x.q[..]);
        let sums: [[f32; R]; T] = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is only ever one `CpuLevel::available()` returned (AVX2 + FMA);
            // rows and scales come from `row`, sized for `cols` = every x's length.
            CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::dot_q8_avx2_rows(q, s, xq) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; these levels have AVX-512 F/BW and VNNI.
            CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
                avx512::dot_q8_avx512vnni_rows(q, s, xq)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above (aarch64 levels all have NEON).
            CpuLevel::Neon | CpuLevel::NeonDot => {
                xq.map(|x| std::array::from_fn(|k| unsafe { neon::dot_q8_neon(q[k], s[k], x) }))
            }
            _ => xq.map(|x| std::array::from_fn(|k| dot_q8_scalar(q[k], s[k], x))),
        };
        std::array::from_fn(|t| sums[t].map(|v| v * xs[t].inv_scale))
    }

    /// The scalar twin of [`Q8Matrix::dot`].
    #[cfg(test)]
    fn dot_scalar(&self, r: usize, x: &HeadInput) -> f32 {
        let (q, s) = self.row(r);
        dot_q8_scalar(q, s, &x.q) * x.inv_scale
    }

    /// Row `r` dequantized: `out [cols]`.
    #[cfg(test)]
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (q, s) = self.row(r);
        for (c, o) in out.iter_mut().enumerate() {
            *o = q[c] as f32 * s[c / Q8_BLOCK];
        }
    }
}

/// One activation row rounded to int16 for the q8 head: `x ≈ q · inv_scale`.
#[derive(Debug, Clone)]
pub struct HeadInput {
    pub q: Vec<i16>, // [cols]
    pub inv_scale: f32,
}

impl HeadInput {
    pub fn new(x: &[f32]) -> Self {
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if absmax > 0.0 { 32767.0 / absmax } else { 0.0 };
        HeadInput {
            q: x.iter()
                .map(|&v| (v * s).round().clamp(-32767.0, 32767.0) as i16)
                .collect(),
            inv_scale: if absmax > 0.0 { absmax / 32767.0 } else { 0.0 },
        }
    }
}

/// Quantizes one row: per block `scale = absmax / 127`, `q = round(w / scale)`.
pub fn quantize_row_q8(row: &[f32], q: &mut [i8], scales: &mut [f32]) {
    for ((wb, qb), s) in row
        .chunks(Q8_BLOCK)
        .zip(q.chunks_mut(Q8_BLOCK))
        .zip(scales.iter_mut())
    {
        let absmax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *s = absmax / 127.0;
        let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
        for (qi, &w) in qb.iter_mut().zip(wb) {
            *qi = (w * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::load::{decode_floats, FloatDtype};
    use crate::ternary::ByteStorage;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// Decodes `m`'s row `r` exactly (for the error statistics of [`q8_head_error`]).
    fn exact_row(m: &FloatMatrix, r: usize, out: &mut [f32]) {
        decode_floats(m.dtype, m.row_bytes(r), out);
    }

    /// The largest relative weight error `|w − ŵ| / absmax_row` over the first `rows` rows: a quick
    /// statement of what the 8-bit head costs (≤ 1/254 by construction).
    fn q8_head_error(m: &FloatMatrix, q8: &Q8Matrix, rows: usize) -> f32 {
        let mut exact = vec![0f32; m.cols];
        let mut approx = vec![0f32; m.cols];
        let mut worst = 0f32;
        for r in 0..rows.min(m.rows) {
            exact_row(m, r, &mut exact);
            q8.row_f32(r, &mut approx);
            let absmax = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
            if absmax > 0.0 {
                for (e, a) in exact.iter().zip(&approx) {
                    worst = worst.max((e - a).abs() / absmax);
                }
            }
        }
        worst
    }

    /// A `[rows, cols]` bf16 matrix of uniform values in ±0.3 (shared with q4's tests).
    pub(in crate::backend::cpu) fn bf16_matrix(rows: usize, cols: usize, seed: u64) -> FloatMatrix {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|_| half::bf16::from_f32(rng.random_range(-0.3f32..0.3)).to_le_bytes())
            .collect();
        FloatMatrix {
            name: "head".into(),
            rows,
            cols,
            dtype: FloatDtype::Bf16,
            data: ByteStorage::Owned(Arc::new(data)),
        }
    }

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        for cols in [1, 63, 64, 65, 200] {
            let m = bf16_matrix(9, cols, cols as u64);
            let q8 = Q8Matrix::quantize(&m, |_| {});
            assert_eq!(q8.blocks, cols.div_ceil(Q8_BLOCK));
            let err = q8_head_error(&m, &q8, m.rows);
            assert!(err <= 0.5 / 127.0 + 1e-6, "cols {cols}: {err}");
        }
    }

    #[test]
    fn every_level_matches_the_scalar_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for cols in [1, 7, 64, 65, 130, 2560] {
            let m = bf16_matrix(5, cols, 10 + cols as u64);
            let q8 = Q8Matrix::quantize(&m, |_| {});
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-4f32..4.0)).collect();
            let hx = HeadInput::new(&x);
            let mut row = vec![0f32; cols];
            for r in 0..m.rows {
                // The int16 activations are no coarser than 1/65534 of their range.
                q8.row_f32(r, &mut row);
                let exact: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                let dequant = q8.dot_scalar(r, &hx);
                let bound = row.iter().map(|w| w.abs()).sum::<f32>() * 4.0 / 32767.0;
                assert!(
                    (dequant - exact).abs() <= bound + 1e-5,
                    "cols {cols} row {r}: {dequant} vs {exact}"
                );
            }
            for level in CpuLevel::available() {
                for r in 0..m.rows {
                    let (got, want) = (q8.dot(level, r, &hx), q8.dot_scalar(r, &hx));
                    let tol = 1e-4 + 1e-4 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{} cols {cols} row {r}: got {got}, expected {want}",
                        level.name()
                    );
                    // two rows at once: the one-row results, bit for bit
                    let pair = [r, (r + 3) % m.rows];
                    let two = q8.dot2(level, pair, &hx);
                    for (i, &g) in two.iter().enumerate() {
                        let one = q8.dot(level, pair[i], &hx);
                        assert_eq!(
                            g.to_bits(),
                            one.to_bits(),
                            "{} cols {cols} rows {pair:?}: dot2 {g} vs dot {one}",
                            level.name()
                        );
                    }
                }
            }
        }
    }

    /// Several activation rows at once (a batch of decode rows): every level's `[T][R]` results
    /// are its one-row, one-token dots bit for bit, for 1, 2 and 4 rows of tokens, odd widths
    /// included.
    #[test]
    fn token_batched_dots_equal_the_one_token_dots_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for cols in [1usize, 65, 130, 2560] {
            let m = bf16_matrix(6, cols, 20 + cols as u64);
            let q8 = Q8Matrix::quantize(&m, |_| {});
            let hx: Vec<HeadInput> = (0..4)
                .map(|_| {
                    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-4f32..4.0)).collect();
                    HeadInput::new(&x)
                })
                .collect();
            for level in CpuLevel::available() {
                // got[t][i] is row rows[i] against hx[toks[t]]
                let check = |rows: &[usize], toks: &[usize], got: &[&[f32]]| {
                    for (t, row) in got.iter().enumerate() {
                        for (i, &g) in row.iter().enumerate() {
                            let one = q8.dot(level, rows[i], &hx[toks[t]]);
                            assert_eq!(
                                g.to_bits(),
                                one.to_bits(),
                                "{} cols {cols} token {} row {}: batched {g} vs one {one}",
                                level.name(),
                                toks[t],
                                rows[i]
                            );
                        }
                    }
                };
                for r in 0..m.rows {
                    let pair = [r, (r + 5) % m.rows];
                    let got = q8.dot_tokens(level, pair, [&hx[0], &hx[1], &hx[2], &hx[3]]);
                    check(&pair, &[0, 1, 2, 3], &got.each_ref().map(|v| &v[..]));
                    let got = q8.dot_tokens(level, [r], [&hx[2], &hx[1]]);
                    check(&[r], &[2, 1], &got.each_ref().map(|v| &v[..]));
                    let got = q8.dot_tokens(level, pair, [&hx[3], &hx[0]]);
                    check(&pair, &[3, 0], &got.each_ref().map(|v| &v[..]));
                }
            }
        }
    }

    /// Extreme integers (weights ±127 and -128, activations ±32767 and -32768) with random
    /// scales, odd widths included. The NEON kernel reduces each block to the scalar twin's
    /// integer and adds in its order, so it must match exactly; the x86 kernels sum the blocks
    /// in another order (compared within a tolerance).
    #[test]
    fn extreme_values_match_the_scalar_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for cols in [1usize, 15, 63, 64, 65, 127, 128, 200, 2560] {
            let blocks = cols.div_ceil(Q8_BLOCK);
            let pick =
                |rng: &mut rand_chacha::ChaCha8Rng, pattern: usize, lo: i32, hi: i32| match pattern
                {
                    0 => rng.random_range(lo..=hi),
                    1 => lo,
                    2 => hi,
                    _ => [lo, hi][rng.random_range(0..2)],
                };
            for pattern in 0..4 {
                let q8 = Q8Matrix {
                    rows: 1,
                    cols,
                    q: (0..cols)
                        .map(|_| pick(&mut rng, pattern, -128, 127) as i8)
                        .collect(),
                    scales: (0..blocks).map(|_| rng.random_range(0.0..0.01)).collect(),
                    blocks,
                };
                for xp in 0..4 {
                    let hx = HeadInput {
                        q: (0..cols)
                            .map(|_| pick(&mut rng, xp, -32768, 32767) as i16)
                            .collect(),
                        inv_scale: 1e-4,
                    };
                    let want = q8.dot_scalar(0, &hx);
                    for level in CpuLevel::available() {
                        let got = q8.dot(level, 0, &hx);
                        let what = format!("{} cols {cols} w {pattern} x {xp}", level.name());
                        if matches!(level, CpuLevel::Neon | CpuLevel::NeonDot) {
                            assert_eq!(got, want, "{what}");
                        } else {
                            let tol = 1e-4 + 1e-4 * want.abs();
                            assert!((got - want).abs() <= tol, "{what}: {got} vs {want}");
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
        let q8 = Q8Matrix::quantize(&m, |_| {});
        assert!(q8.q.iter().all(|&v| v == 0) && q8.scales.iter().all(|&s| s == 0.0));
        assert_eq!(q8.dot_scalar(0, &HeadInput::new(&[1.0; 70])), 0.0);
        assert_eq!(HeadInput::new(&[0.0; 3]).q, vec![0, 0, 0]);
    }
}
