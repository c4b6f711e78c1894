//! Base-3 packing for decode (issue #17's "fewer bytes per decoded token"): 5 ternary weights
//! per byte, 1.6 bits per weight against the shipped layout's 2, and a one-token AVX2 kernel
//! that decodes the digits in registers and multiplies them with `vpmaddubsw` like the shipped
//! kernel. The question it answers: does reading 20 % fewer bytes pay for the extra decode work
//! on a machine whose decode is bound by memory?
//!
//! Layout: byte `(p, c)` of `[P, cols]`, `P = ceil(rows / 5)`, holds column `c` of the five
//! rows `p + i·P` (`i = 0..5`; rows past the matrix have weight 0). With codes `c_i = w + 1`
//! and `b = Σ c_i · 3^(4−i)` (0..=242), the byte stores `q = ceil(b · 256 / 243)`, so that
//! digit `i` is `((q · 3^i) mod 256) · 3 >> 8` (the fixed-point trick of llama.cpp's TQ1_0,
//! checked here for all 243 patterns). In 16-bit lanes holding one byte `m` each (the even and
//! the odd bytes of a vector apart), `3·m` has the digit in its high byte and the next `m` in
//! its low byte: per 32 bytes (160 weights) 2 + 5·9 ops of decode (`3m` as two adds; shifts,
//! masks, the merge) and 5 `vpmaddubsw` + 5 adds, against 5 + 4 + 4 for 128 weights in the
//! shipped 2-bit kernel (about 2.9× the operations per weight). (A first version used
//! `vpmulhuw` by 3, which LLVM rewrites as widening 32-bit arithmetic, ~3× slower again.)

use std::arch::x86_64::*;

/// Weights per byte.
const DIGITS: usize = 5;

/// The byte of five codes (`codes[0]` the most significant digit).
pub fn encode(codes: [u8; DIGITS]) -> u8 {
    let b = codes.iter().fold(0u32, |b, &c| 3 * b + c as u32);
    (b * 256).div_ceil(243) as u8
}

/// Digit `i` of a stored byte: the scalar twin of the kernel's decode.
pub fn digit(q: u8, i: usize) -> u8 {
    let m = (q as u32 * 3u32.pow(i as u32)) % 256;
    ((m * 3) >> 8) as u8
}

/// A ternary matrix in the base-3 layout.
pub struct Base3Weights {
    pub rows: usize,
    pub cols: usize,
    /// Byte rows: `ceil(rows / 5)`.
    pub p5: usize,
    pub bytes: Vec<u8>, // [p5, cols]
}

impl Base3Weights {
    /// Repacks row-major codes (`w + 1`, `[rows, cols]`).
    pub fn new(codes: &[u8], rows: usize, cols: usize) -> Self {
        Self::from_fn(rows, cols, |r, c| codes[r * cols + c])
    }

    /// Packs the code `code(r, c)` of every weight (lets a big matrix be made without holding
    /// its codes).
    pub fn from_fn(rows: usize, cols: usize, mut code: impl FnMut(usize, usize) -> u8) -> Self {
        let p5 = rows.div_ceil(DIGITS);
        let mut bytes = vec![0u8; p5 * cols];
        for p in 0..p5 {
            for c in 0..cols {
                let codes = std::array::from_fn(|i| {
                    let r = p + i * p5;
                    if r < rows {
                        code(r, c)
                    } else {
                        1
                    }
                });
                bytes[p * cols + c] = encode(codes);
            }
        }
        Base3Weights {
            rows,
            cols,
            p5,
            bytes,
        }
    }

    pub fn byte_row(&self, p: usize) -> &[u8] {
        &self.bytes[p * self.cols..(p + 1) * self.cols]
    }
}

/// `Σ_c W[p + i·P, c] · x[c]` for the five rows of byte row `bytes`, scalar.
pub fn dot5_scalar(bytes: &[u8], x: &[i8]) -> [i32; DIGITS] {
    let mut out = [0i32; DIGITS];
    for (&q, &v) in bytes.iter().zip(x) {
        for (i, o) in out.iter_mut().enumerate() {
            *o += (digit(q, i) as i32 - 1) * v as i32;
        }
    }
    out
}

/// [`dot5_scalar`] on AVX2; `x_sum = Σ x`.
///
/// # Safety
/// AVX2; `bytes` and `x` of one length.
#[target_feature(enable = "avx2")]
pub unsafe fn dot5_avx2(bytes: &[u8], x: &[i8], x_sum: i32) -> [i32; DIGITS] {
    assert_eq!(bytes.len(), x.len());
    let n = bytes.len() / 32 * 32;
    let (low, hi, ones) = (
        _mm256_set1_epi16(0x00FF),
        _mm256_set1_epi16(0xFF00u16 as i16),
        _mm256_set1_epi16(1),
    );
    let mut acc32 = [_mm256_setzero_si256(); DIGITS];
    let mut c = 0;
    while c < n {
        // a pair of lanes gains at most 2 · (2 · 128) = 512 a step: 32 steps stay within i16
        let end = (c + 32 * 32).min(n);
        let mut acc16 = [_mm256_setzero_si256(); DIGITS];
        while c < end {
            // SAFETY: c + 32 ≤ n ≤ both lengths.
            let (s, xv) = unsafe {
                (
                    _mm256_loadu_si256(bytes.as_ptr().add(c) as *const __m256i),
                    _mm256_loadu_si256(x.as_ptr().add(c) as *const __m256i),
                )
            };
            // each byte alone in the low half of its 16-bit lane: m
            let mut even = _mm256_and_si256(s, low);
            let mut odd = _mm256_srli_epi16(s, 8);
            for acc in acc16.iter_mut() {
                // 3·m ≤ 765: the digit is its high byte, the next m its low byte
                let ve = _mm256_add_epi16(even, _mm256_add_epi16(even, even));
                let vo = _mm256_add_epi16(odd, _mm256_add_epi16(odd, odd));
                let codes = _mm256_or_si256(_mm256_srli_epi16(ve, 8), _mm256_and_si256(vo, hi));
                *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(codes, xv));
                even = _mm256_and_si256(ve, low);
                odd = _mm256_and_si256(vo, low);
            }
            c += 32;
        }
        for (a32, a16) in acc32.iter_mut().zip(acc16) {
            *a32 = _mm256_add_epi32(*a32, _mm256_madd_epi16(a16, ones));
        }
    }
    let tail = dot5_scalar(&bytes[n..], &x[n..]);
    let tail_sum: i32 = x[n..].iter().map(|&v| v as i32).sum();
    std::array::from_fn(|i| {
        let mut lanes = [0i32; 8];
        // SAFETY: lanes is 8 i32.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc32[i]) };
        // Σ c·x − Σ x over the body, plus the tail's signed sums
        lanes.iter().sum::<i32>() - (x_sum - tail_sum) + tail[i]
    })
}

/// One token: `out[r] = Σ_c W[r, c] · x[c]` for byte rows `p0..p1`.
pub fn matvec(w: &Base3Weights, x: &[i8], x_sum: i32, (p0, p1): (usize, usize), out: &mut [i32]) {
    for p in p0..p1 {
        // SAFETY: AVX2 checked by the caller; the row and x have `cols` elements.
        let r = unsafe { dot5_avx2(w.byte_row(p), x, x_sum) };
        for (i, v) in r.into_iter().enumerate() {
            let row = p + i * w.p5;
            if row < w.rows {
                out[row] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_decodes() {
        for b in 0..243u32 {
            let codes: [u8; DIGITS] =
                std::array::from_fn(|i| ((b / 3u32.pow((DIGITS - 1 - i) as u32)) % 3) as u8);
            let q = encode(codes);
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(digit(q, i), c, "pattern {b} digit {i}");
            }
        }
    }
}
