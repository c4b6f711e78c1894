//! The 8-bit LM head (`--lm-head q8`), a CPU option. Decoding a 2B4T token reads the whole
//! `[128256, 2560]` head; in bf16 that is 657 MB, more than all ternary weights together (497 MB).
//! Here each row is stored as int8 in blocks of [`Q8_BLOCK`] columns with one f32 scale per block
//! (`w ≈ q · absmax_block / 127`, 1.06 bytes per weight, 348 MB for 2B4T), and the dot product
//! keeps the activations in f32, so the only approximation is the weight rounding.
//!
//! Made from the exact float matrix at load; the file stays the reference. `Q8Matrix::dot_scalar`
//! is the plain twin of the SIMD kernels (compared within a tolerance: they sum in another order).

use rayon::prelude::*;

use super::kernels::CpuLevel;
use crate::load::{decode_floats, FloatMatrix};

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
    pub fn dot(&self, level: CpuLevel, r: usize, x: &[f32]) -> f32 {
        debug_assert_eq!(x.len(), self.cols);
        let (q, s) = self.row(r);
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is only ever one `CpuLevel::available()` returned (AVX2 + FMA).
            CpuLevel::Avx2 | CpuLevel::Avx512Vnni => unsafe { x86::dot_q8_avx2(q, s, x) },
            _ => dot_q8_scalar(q, s, x),
        }
    }

    /// The scalar twin of [`Q8Matrix::dot`].
    pub fn dot_scalar(&self, r: usize, x: &[f32]) -> f32 {
        let (q, s) = self.row(r);
        dot_q8_scalar(q, s, x)
    }

    /// Row `r` dequantized: `out [cols]` (tests and error measurements).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (q, s) = self.row(r);
        for (c, o) in out.iter_mut().enumerate() {
            *o = q[c] as f32 * s[c / Q8_BLOCK];
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

/// `Σ_b scale_b · Σ_{c∈b} q_c x_c`, plain f32.
pub fn dot_q8_scalar(q: &[i8], scales: &[f32], x: &[f32]) -> f32 {
    q.chunks(Q8_BLOCK)
        .zip(x.chunks(Q8_BLOCK))
        .zip(scales)
        .map(|((qb, xb), &s)| s * qb.iter().zip(xb).map(|(&a, &b)| a as f32 * b).sum::<f32>())
        .sum()
}

/// Decodes `m`'s row `r` exactly (for the error statistics of [`q8_head_error`]).
fn exact_row(m: &FloatMatrix, r: usize, out: &mut [f32]) {
    let es = m.dtype.size();
    decode_floats(
        m.dtype,
        &m.data.as_slice()[r * m.cols * es..(r + 1) * m.cols * es],
        out,
    );
}

/// The largest relative weight error `|w − ŵ| / absmax_row` over the first `rows` rows: a quick
/// statement of what the 8-bit head costs (≤ 1/254 by construction).
pub fn q8_head_error(m: &FloatMatrix, q8: &Q8Matrix, rows: usize) -> f32 {
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Q8_BLOCK;
    use std::arch::x86_64::*;

    /// 8 weights per step: sign-extend int8 → i32 → f32, FMA with x; one FMA per block applies
    /// the block's scale. Blocks shorter than `Q8_BLOCK` (the row's tail) go through scalar code.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_avx2(q: &[i8], scales: &[f32], x: &[f32]) -> f32 {
        let full = q.len() / Q8_BLOCK;
        let mut total = _mm256_setzero_ps();
        for (b, &scale) in scales[..full].iter().enumerate() {
            let base = b * Q8_BLOCK;
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut c = 0;
            while c < Q8_BLOCK {
                // SAFETY: base + c + 16 ≤ full * Q8_BLOCK ≤ len of q and x.
                let (w0, w1, x0, x1) = unsafe {
                    (
                        _mm_loadl_epi64(q.as_ptr().add(base + c) as *const __m128i),
                        _mm_loadl_epi64(q.as_ptr().add(base + c + 8) as *const __m128i),
                        _mm256_loadu_ps(x.as_ptr().add(base + c)),
                        _mm256_loadu_ps(x.as_ptr().add(base + c + 8)),
                    )
                };
                let f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w0));
                let f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w1));
                acc0 = _mm256_fmadd_ps(f0, x0, acc0);
                acc1 = _mm256_fmadd_ps(f1, x1, acc1);
                c += 16;
            }
            total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(scale), total);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes has 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        let tail = full * Q8_BLOCK;
        lanes.iter().sum::<f32>() + super::dot_q8_scalar(&q[tail..], &scales[full..], &x[tail..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::FloatDtype;
    use crate::ternary::ByteStorage;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    fn bf16_matrix(rows: usize, cols: usize, seed: u64) -> FloatMatrix {
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
            for level in CpuLevel::available() {
                for r in 0..m.rows {
                    let (got, want) = (q8.dot(level, r, &x), q8.dot_scalar(r, &x));
                    let tol = 1e-4 + 1e-4 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{} cols {cols} row {r}: got {got}, expected {want}",
                        level.name()
                    );
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
        assert_eq!(q8.dot_scalar(0, &[1.0; 70]), 0.0);
    }
}
