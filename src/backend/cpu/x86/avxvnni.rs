//! The AVX-VNNI ternary dot kernels: `vpdpbusd` on 256-bit vectors (the VEX encoding of
//! AVX-512 VNNI's instruction, on Intel client cores from Alder Lake and on AMD Zen 4+), in
//! place of AVX2's `vpmaddubsw` + `vpaddw` + periodic `vpmaddwd` widening. The same one-shift
//! code planes as `avx2.rs`; the 4 products of each i32 lane go straight into it, so there is
//! no i16 block to flush. Every other op of this level runs the AVX2 kernels (`dispatch.rs`).
//! Each is `unsafe` for its target features only: the safe wrappers of `dispatch.rs` call it
//! for a level `CpuLevel::available()` returned, after checking the slice lengths.

use std::arch::x86_64::*;

use super::{prefetch, PREFETCH_BYTES};
use crate::backend::cpu::reference;

/// The 4 code planes of 32 packed bytes with one shift: `w & 3`, `w & 12` (= 4·code),
/// `(w >> 4) & 3`, `(w >> 4) & 12` (= 4·code), as in `avx2.rs`: the scaled planes save two
/// shifts and are divided by 4 in [`finish`] (exact: every term is a multiple of 4).
#[inline]
#[target_feature(enable = "avx2")]
fn planes(w: __m256i) -> [__m256i; 4] {
    let (m3, m12) = (_mm256_set1_epi8(3), _mm256_set1_epi8(12));
    let hi = _mm256_srli_epi16(w, 4);
    [
        _mm256_and_si256(w, m3),
        _mm256_and_si256(w, m12),
        _mm256_and_si256(hi, m3),
        _mm256_and_si256(hi, m12),
    ]
}

/// `T` tokens (1 or 2) against one packed byte row, 32 columns per step: 4 code planes ×
/// `vpdpbusd` (u8 code × i8 act, 4-way sums into i32) per token. An i32 lane gains at most
/// 4·8·128 = 4096 in magnitude per step, so no overflow below ~2^19 steps (16 M columns).
/// Two tokens take 8 accumulators + 4 planes + 1 activation of the 16 ymm registers; four
/// would need 16 accumulators alone, so `dispatch::ternary_dot4_x4` calls this twice.
///
/// # Safety
/// AVX2 + AVX-VNNI; every `q[t]` as long as `bytes`.
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
pub unsafe fn ternary_dot4_xn_avxvnni<const T: usize>(
    bytes: &[u8],
    q: [&[i8]; T],
    q_sum: [i32; T],
) -> [[i32; 4]; T] {
    let n = bytes.len() / 32 * 32;
    let mut acc = [[_mm256_setzero_si256(); 4]; T];
    let mut c = 0;
    while c < n {
        prefetch(bytes.as_ptr().wrapping_add(c + PREFETCH_BYTES));
        // SAFETY: c + 32 ≤ n ≤ the length of every slice (the caller's contract).
        let p = planes(unsafe { _mm256_loadu_si256(bytes.as_ptr().add(c) as *const _) });
        for t in 0..T {
            let x = unsafe { _mm256_loadu_si256(q[t].as_ptr().add(c) as *const _) };
            for i in 0..4 {
                acc[t][i] = _mm256_dpbusd_avx_epi32(acc[t][i], p[i], x);
            }
        }
        c += 32;
    }
    std::array::from_fn(|t| finish(&acc[t], &bytes[n..], &q[t][n..], q_sum[t]))
}

/// `dispatch::ternary_dot4_rows2`: the one-token step of [`ternary_dot4_xn_avxvnni`] on two
/// byte rows, sharing the activation load.
///
/// # Safety
/// AVX2 + AVX-VNNI; both rows as long as `q`.
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
pub unsafe fn ternary_dot4_rows2_avxvnni(bytes: [&[u8]; 2], q: &[i8], q_sum: i32) -> [[i32; 4]; 2] {
    let n = q.len() / 32 * 32;
    let mut acc = [[_mm256_setzero_si256(); 4]; 2];
    let mut c = 0;
    while c < n {
        // SAFETY: c + 32 ≤ n ≤ the length of every slice (the caller's contract).
        let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(c) as *const _) };
        for (r, row) in bytes.iter().enumerate() {
            prefetch(row.as_ptr().wrapping_add(c + PREFETCH_BYTES));
            let p = planes(unsafe { _mm256_loadu_si256(row.as_ptr().add(c) as *const _) });
            for i in 0..4 {
                acc[r][i] = _mm256_dpbusd_avx_epi32(acc[r][i], p[i], x);
            }
        }
        c += 32;
    }
    std::array::from_fn(|r| finish(&acc[r], &bytes[r][n..], &q[n..], q_sum))
}

/// The 4 row sums of one byte row from its plane accumulators, plus the scalar tail
/// (`bytes` and `q` past the vector part) and the `− Σq` of the code trick.
#[inline]
#[target_feature(enable = "avx2")]
fn finish(acc: &[__m256i; 4], bytes: &[u8], q: &[i8], q_sum: i32) -> [i32; 4] {
    let half =
        |x: __m256i| _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let (a, b, c, d) = (half(acc[0]), half(acc[1]), half(acc[2]), half(acc[3]));
    // lane i = Σ lanes of acc[i]; planes 1 and 3 hold 4·code: a multiple of 4, so >> 2 is exact
    let sums = _mm_srav_epi32(
        _mm_hadd_epi32(_mm_hadd_epi32(a, b), _mm_hadd_epi32(c, d)),
        _mm_set_epi32(2, 0, 2, 0),
    );
    let mut out = [0i32; 4];
    // SAFETY: out is 4 i32 = 16 bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, sums) };
    let tail = reference::ternary_dot_byte_row(bytes, q, q_sum);
    std::array::from_fn(|i| out[i] + tail[i])
}
