//! Host-side preparation of the device layouts (pure functions, tested without a GPU).
//!
//! - Ternary weights: transformers' packed bytes `[out/4, in]` (4 rows per byte) are repacked
//!   once at upload into `[out, G]` u32 words, still 2 bits per weight: word `(r, g)` holds the
//!   codes (`w + 1`) of columns `16g .. 16g+15` of row `r`, column `16g + 4s + m` at bits
//!   `8m + 2s`. Then `(word >> 2s) & 0x03030303` is 4 code bytes aligned with the int8
//!   activation word `s` of the group, ready for `dot4I8Packed` (see shaders/ternary_matmul.wgsl).
//!   Rows become contiguous, which is what a mat-vec (decode) wants for coalesced reads, and are
//!   padded to a multiple of 64 columns (`G = 4·ceil(in/64)`, weight 0) so that it can load
//!   16-byte vectors. int8 activation rows are padded the same way (with zeros).
//! - Float matrices (embedding / LM head) stay in their file dtype (bf16 and f16 as pairs of u16
//!   in a u32, f32 as is; exact; GGUF Q8_0 rows decoded to f32, also exact), rows padded to 16
//!   bytes (so the LM head loads 16-byte vectors), split by rows into chunks that each fit one
//!   storage binding.
//! - RoPE: the (cos, sin) table, computed exactly as the CPU backend computes them.

use crate::load::{FloatDtype, FloatMatrix};
use crate::ternary::TernaryMatrix;

/// Codes of 16 columns that are all weight 0 (code 1): the padding of the last group.
pub const ZERO_WORD: u32 = 0x5555_5555;

/// 16-column groups per stored row of `cols` columns (padded to a multiple of 64 columns).
pub fn groups(cols: usize) -> usize {
    cols.div_ceil(64) * 4
}

/// Bit offset of column `k` (0..16) of a group inside its u32 word.
#[inline]
pub fn code_shift(k: usize) -> usize {
    8 * (k % 4) + 2 * (k / 4)
}

/// The device layout of `w`: `[rows, groups(cols)]` u32 (see the module docs).
pub fn repack_ternary(w: &TernaryMatrix) -> Vec<u32> {
    use rayon::prelude::*;
    let (rows, cols) = (w.rows, w.cols);
    let g = groups(cols);
    let p4 = rows / 4;
    let bytes = w.packed.as_slice();
    let mut out = vec![0u32; rows * g];
    out.par_chunks_mut(g.max(1))
        .enumerate()
        .for_each(|(r, orow)| {
            let (i, p) = (r / p4, r % p4);
            let brow = &bytes[p * cols..(p + 1) * cols];
            for (gi, word) in orow.iter_mut().enumerate() {
                let mut v = 0u32;
                for k in 0..16 {
                    let c = gi * 16 + k;
                    let code = if c < cols {
                        ((brow[c] >> (2 * i)) & 3) as u32
                    } else {
                        1
                    };
                    v |= code << code_shift(k);
                }
                *word = v;
            }
        });
    out
}

/// Reads weight `(r, c)` back from the device layout (for tests).
pub fn repacked_weight(words: &[u32], cols: usize, r: usize, c: usize) -> i8 {
    let w = words[r * groups(cols) + c / 16];
    (((w >> code_shift(c % 16)) & 3) as i8) - 1
}

/// int8 activations packed 4 per u32 as the quantize kernel writes them:
/// `[rows, 4 * groups(cols)]` words, column `4w + k` in byte `k` of word `w`, padding 0.
pub fn pack_q_rows(q: &[i8], rows: usize, cols: usize) -> Vec<u32> {
    let qw = 4 * groups(cols);
    let mut out = vec![0u32; rows * qw];
    for r in 0..rows {
        for c in 0..cols {
            out[r * qw + c / 4] |= (q[r * cols + c] as u8 as u32) << (8 * (c % 4));
        }
    }
    out
}

/// Inverse of [`pack_q_rows`].
pub fn unpack_q_rows(words: &[u32], rows: usize, cols: usize) -> Vec<i8> {
    let qw = 4 * groups(cols);
    let mut out = vec![0i8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = (words[r * qw + c / 4] >> (8 * (c % 4))) as u8 as i8;
        }
    }
    out
}

/// Dtype code of the WGSL `DTYPE` constant (shaders/embedding.wgsl).
pub fn dtype_code(d: FloatDtype) -> u32 {
    match d.on_device() {
        FloatDtype::Bf16 => 0,
        FloatDtype::F16 => 1,
        FloatDtype::F32 | FloatDtype::Q8_0 => 2,
    }
}

/// u32 words per device row of a float matrix with `cols` columns of `dtype` (16-byte rows, in
/// the dtype the device keeps: Q8_0 as f32).
pub fn row_words(dtype: FloatDtype, cols: usize) -> usize {
    dtype.on_device().row_bytes(cols).div_ceil(16) * 4
}

/// Splits `rows` rows of `row_bytes` bytes each into chunks of at most `max_bytes` bytes:
/// `(first row, rows)` per chunk. `None` when a single row does not fit.
pub fn chunk_rows(rows: usize, row_bytes: usize, max_bytes: u64) -> Option<Vec<(usize, usize)>> {
    let per = (max_bytes / row_bytes.max(1) as u64) as usize;
    if per == 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut r = 0;
    while r < rows {
        let n = per.min(rows - r);
        out.push((r, n));
        r += n;
    }
    Some(out)
}

/// Bytes of rows `row0 .. row0 + rows` of `m` in the device layout (rows padded to whole words).
/// Borrows the file's bytes when no padding is needed (the common case: even `cols`).
pub fn float_rows_bytes(m: &FloatMatrix, row0: usize, rows: usize) -> std::borrow::Cow<'_, [u8]> {
    let dst_row = row_words(m.dtype, m.cols) * 4;
    if m.dtype == FloatDtype::Q8_0 {
        // decoded to f32 rows
        let mut out = vec![0u8; rows * dst_row];
        let mut vals = vec![0f32; m.cols];
        for (r, d) in (row0..row0 + rows).zip(out.chunks_exact_mut(dst_row)) {
            m.row_f32(r, &mut vals);
            for (b, v) in d.chunks_exact_mut(4).zip(&vals) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        return std::borrow::Cow::Owned(out);
    }
    let src_row = m.dtype.row_bytes(m.cols);
    let src = &m.data.as_slice()[row0 * src_row..(row0 + rows) * src_row];
    if src_row == dst_row {
        return std::borrow::Cow::Borrowed(src);
    }
    let mut out = vec![0u8; rows * dst_row];
    for (d, s) in out.chunks_exact_mut(dst_row).zip(src.chunks_exact(src_row)) {
        d[..src_row].copy_from_slice(s);
    }
    std::borrow::Cow::Owned(out)
}

/// The `DTYPE` code of the 8-bit LM head (shaders/embedding.wgsl; 0..2 are the float dtypes).
pub const Q8_CODE: u32 = 3;

/// u32 words per device row of the 8-bit LM head (`--lm-head q8`, the CPU's format: int8 codes in
/// blocks of 64 columns with one f32 scale each, `backend::cpu::q8`): the `nb = ceil(cols / 64)`
/// scales padded to a multiple of 4 words, then the codes 4 per u32 (column `4w + k` in byte `k`
/// of code word `w`), padded with 0 to whole blocks. A multiple of 4 words (16-byte vectors).
pub fn q8_row_words(cols: usize) -> usize {
    let nb = cols.div_ceil(crate::backend::cpu::q8::Q8_BLOCK);
    nb.next_multiple_of(4) + 16 * nb
}

/// Rows `row0 .. row0 + rows` of `m` quantized as the CPU's q8 head (`quantize_row_q8`, so the
/// codes and scales are the CPU's) in the layout of [`q8_row_words`]; rows in parallel.
pub fn q8_rows_bytes(m: &FloatMatrix, row0: usize, rows: usize) -> Vec<u8> {
    use rayon::prelude::*;
    let cols = m.cols;
    let nb = cols.div_ceil(crate::backend::cpu::q8::Q8_BLOCK);
    let scale_bytes = 4 * nb.next_multiple_of(4);
    let row_bytes = 4 * q8_row_words(cols);
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes.max(1))
        .enumerate()
        .for_each_init(
            || (vec![0f32; cols], vec![0i8; cols], vec![0f32; nb]),
            |(row, q, scales), (i, dst)| {
                m.row_f32(row0 + i, row);
                crate::backend::cpu::q8::quantize_row_q8(row, q, scales);
                for (d, s) in dst[..4 * nb].chunks_exact_mut(4).zip(scales.iter()) {
                    d.copy_from_slice(&s.to_le_bytes());
                }
                for (d, &v) in dst[scale_bytes..scale_bytes + cols]
                    .iter_mut()
                    .zip(q.iter())
                {
                    *d = v as u8;
                }
            },
        );
    out
}

/// RoPE factors `[positions, head_dim / 2]` as (cos, sin) pairs, exactly the CPU backend's:
/// `inv_freq = 1 / θ^(2j/d)` and `angle = pos · inv_freq` in f32, then sin/cos in f64 → f32.
pub fn rope_table(positions: usize, head_dim: usize, theta: f32) -> Vec<[f32; 2]> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let mut out = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for &f in &inv {
            let angle = pos as f32 * f;
            let (s, c) = (angle as f64).sin_cos();
            out.push([c as f32, s as f32]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::rope_head;
    use crate::ternary::{pack_ternary, ByteStorage};
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    #[test]
    fn repack_keeps_every_weight_and_pads_with_zero_weights() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for &(rows, cols) in &[(4, 1), (8, 15), (12, 16), (20, 37), (64, 100)] {
            let w: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let packed = pack_ternary(&w, rows, cols).unwrap();
            let m = TernaryMatrix::new("t", rows, cols, ByteStorage::Owned(Arc::new(packed)), 1.0)
                .unwrap();
            let words = repack_ternary(&m);
            assert_eq!(words.len(), rows * groups(cols));
            assert_eq!(groups(cols) % 4, 0);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(repacked_weight(&words, cols, r, c), w[r * cols + c]);
                }
                for c in cols..groups(cols) * 16 {
                    assert_eq!(repacked_weight(&words, cols, r, c), 0, "padding ({r},{c})");
                }
            }
        }
    }

    #[test]
    fn shifted_masked_word_lines_up_with_activation_bytes() {
        // Column 16g + 4s + m must land in byte m of (word >> 2s) & 0x03030303.
        for k in 0..16 {
            let word = 2u32 << code_shift(k); // code 2 at column k only
            let (s, m) = (k / 4, k % 4);
            let lanes = (word >> (2 * s)) & 0x0303_0303;
            assert_eq!(lanes, 2 << (8 * m), "column {k}");
        }
    }

    #[test]
    fn q_packing_round_trips() {
        let q: Vec<i8> = (0..3 * 21).map(|i| (i * 37 % 256) as u8 as i8).collect();
        let words = pack_q_rows(&q, 3, 21);
        assert_eq!(words.len(), 3 * 16); // rows padded to 64 columns
        assert_eq!(unpack_q_rows(&words, 3, 21), q);
    }

    #[test]
    fn chunks_cover_all_rows_within_the_limit() {
        assert_eq!(
            chunk_rows(10, 8, 24).unwrap(),
            vec![(0, 3), (3, 3), (6, 3), (9, 1)]
        );
        assert_eq!(chunk_rows(2, 8, 1 << 20).unwrap(), vec![(0, 2)]);
        assert!(chunk_rows(2, 8, 7).is_none());
        // 2B4T's embedding on lavapipe (128 MiB per binding): 5 chunks.
        let c = chunk_rows(128256, 2560 * 2, 128 << 20).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.iter().map(|x| x.1).sum::<usize>(), 128256);
    }

    #[test]
    fn rope_table_reproduces_the_cpu_rotation_bit_exactly() {
        let (hd, theta) = (8, 10000.0f32);
        let table = rope_table(50, hd, theta);
        let v: Vec<f32> = (0..hd).map(|i| 0.1 + i as f32 * 0.37).collect();
        for pos in [0usize, 1, 7, 49] {
            let mut want = v.clone();
            rope_head(&mut want, pos, theta);
            let half = hd / 2;
            for j in 0..half {
                let [c, s] = table[pos * half + j];
                let (a, b) = (v[j], v[j + half]);
                assert_eq!(a * c - b * s, want[j]);
                assert_eq!(b * c + a * s, want[j + half]);
            }
        }
    }
}
