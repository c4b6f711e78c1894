//! The AVX2 (+ FMA) kernels, 256-bit vectors; their AVX-512 twins are in `avx512.rs`, in the same
//! order. Each is `unsafe` for its target features only: the safe wrappers of `dispatch.rs` call
//! it for a level `CpuLevel::available()` returned, after checking the slice lengths.

use std::arch::x86_64::*;

use super::{prefetch, PREFETCH_BYTES};
use crate::backend::cpu::dispatch::{KvElem, RunsArgs};
use crate::backend::cpu::q4::{bf16_to_f32, Q4_BLOCK, Q4_BLOCK_BYTES};
use crate::backend::cpu::q8::Q8_BLOCK;
use crate::backend::cpu::reference;

/// Sum of the 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// The 4 code planes of 32 packed bytes with one shift: `w & 3`, `w & 12` (= 4·code),
/// `(w >> 4) & 3`, `(w >> 4) & 12` (= 4·code). The two scaled planes save two shifts, which
/// on x86 cores with one vector-shift port is what the loop waits for; their sums are
/// divided by 4 at the end (exact: every term is a multiple of 4).
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

/// i16 steps before widening: a pmaddubsw pair is at most 2·8·128 = 2048 in magnitude (4·code
/// ≤ 8, |x| ≤ 128) and at most 2·8·127 = 2032 positive, so 16 steps stay in
/// [−32768, 32512] ⊂ i16.
const I16_STEPS: usize = 16;

/// The plane sums as the 4 row accumulators (planes 1 and 3 carry the factor 4).
#[inline]
#[target_feature(enable = "avx2")]
fn finish(acc32: &[__m256i; 4]) -> [i32; 4] {
    [
        hsum_epi32(acc32[0]),
        hsum_epi32(acc32[1]) >> 2,
        hsum_epi32(acc32[2]),
        hsum_epi32(acc32[3]) >> 2,
    ]
}

/// `T` tokens (1 or 2) against one packed byte row, 32 columns per step: 4 code planes ×
/// pmaddubsw (u8 code × i8 act, pairs → i16), summed in i16 for [`I16_STEPS`] steps, then
/// widened with pmaddwd. Two tokens take 8 i16 accumulators + 4 code planes, which fit the
/// 16 ymm registers without spilling (four would not).
#[target_feature(enable = "avx2")]
pub unsafe fn ternary_dot4_xn_avx2<const T: usize>(
    bytes: &[u8],
    q: [&[i8]; T],
    q_sum: [i32; T],
) -> [[i32; 4]; T] {
    let n = bytes.len() / 32 * 32;
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); 4]; T];
    let mut c = 0;
    while c < n {
        let block_end = (c + 32 * I16_STEPS).min(n);
        let mut acc16 = [[_mm256_setzero_si256(); 4]; T];
        while c < block_end {
            prefetch(bytes.as_ptr().wrapping_add(c + PREFETCH_BYTES));
            // SAFETY: c + 32 ≤ n ≤ the length of every slice (the caller's contract).
            let p = planes(unsafe { _mm256_loadu_si256(bytes.as_ptr().add(c) as *const _) });
            for t in 0..T {
                let x = unsafe { _mm256_loadu_si256(q[t].as_ptr().add(c) as *const _) };
                for i in 0..4 {
                    acc16[t][i] = _mm256_add_epi16(acc16[t][i], _mm256_maddubs_epi16(p[i], x));
                }
            }
            c += 32;
        }
        for t in 0..T {
            for i in 0..4 {
                acc32[t][i] = _mm256_add_epi32(acc32[t][i], _mm256_madd_epi16(acc16[t][i], ones));
            }
        }
    }
    let mut out = [[0i32; 4]; T];
    for t in 0..T {
        let sums = finish(&acc32[t]);
        let tail = reference::ternary_dot_byte_row(&bytes[n..], &q[t][n..], 0);
        for i in 0..4 {
            out[t][i] = sums[i] + tail[i] - q_sum[t];
        }
    }
    out
}

/// Four tokens against one packed byte row, in two passes over the row: planes 0–1 (the low
/// nibble) for all 4 tokens, then planes 2–3 (the high nibble). Per pass 8 i16 accumulators + 2
/// planes fit the 16 ymm registers with the activations read straight from memory, so the
/// weight decode is shared by 4 tokens instead of [`ternary_dot4_xn_avx2`]'s 2 (9.25 ALU
/// operations per token and 128 products against 10.5; the loads do not count, they have their
/// own ports). The same integers as the scalar reference.
///
/// # Safety
/// AVX2; every `q` as long as `bytes`.
#[target_feature(enable = "avx2")]
pub unsafe fn ternary_dot4_x4_avx2_halves(
    bytes: &[u8],
    q: [&[i8]; 4],
    q_sum: [i32; 4],
) -> [[i32; 4]; 4] {
    let n = bytes.len() / 32 * 32;
    let (m3, m12, ones) = (
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(12),
        _mm256_set1_epi16(1),
    );
    let mut sums = [[0i32; 4]; 4];
    for half in 0..2 {
        let mut acc32 = [[_mm256_setzero_si256(); 2]; 4];
        let mut c = 0;
        while c < n {
            let block_end = (c + 32 * I16_STEPS).min(n);
            let mut acc16 = [[_mm256_setzero_si256(); 2]; 4];
            while c < block_end {
                if half == 0 {
                    prefetch(bytes.as_ptr().wrapping_add(c + PREFETCH_BYTES));
                }
                // SAFETY: c + 32 ≤ n ≤ the length of every slice (the caller's contract).
                let w = unsafe { _mm256_loadu_si256(bytes.as_ptr().add(c) as *const _) };
                let w = if half == 0 {
                    w
                } else {
                    _mm256_srli_epi16(w, 4)
                };
                let p = [_mm256_and_si256(w, m3), _mm256_and_si256(w, m12)];
                for t in 0..4 {
                    let x = unsafe { _mm256_loadu_si256(q[t].as_ptr().add(c) as *const _) };
                    for i in 0..2 {
                        acc16[t][i] = _mm256_add_epi16(acc16[t][i], _mm256_maddubs_epi16(p[i], x));
                    }
                }
                c += 32;
            }
            for t in 0..4 {
                for i in 0..2 {
                    acc32[t][i] =
                        _mm256_add_epi32(acc32[t][i], _mm256_madd_epi16(acc16[t][i], ones));
                }
            }
        }
        for t in 0..4 {
            // plane 2·half + 1 carries the factor 4 (`& 12`): exact, every term a multiple of 4
            sums[t][2 * half] = hsum_epi32(acc32[t][0]);
            sums[t][2 * half + 1] = hsum_epi32(acc32[t][1]) >> 2;
        }
    }
    std::array::from_fn(|t| {
        let tail = reference::ternary_dot_byte_row(&bytes[n..], &q[t][n..], 0);
        std::array::from_fn(|i| sums[t][i] + tail[i] - q_sum[t])
    })
}

/// `dispatch::ternary_dot4_rows2`: the one-token step of [`ternary_dot4_xn_avx2`] on two byte
/// rows, sharing the activation load.
///
/// # Safety
/// AVX2; both rows as long as `q`.
#[target_feature(enable = "avx2")]
pub unsafe fn ternary_dot4_rows2_avx2(bytes: [&[u8]; 2], q: &[i8], q_sum: i32) -> [[i32; 4]; 2] {
    let n = q.len() / 32 * 32;
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); 4]; 2];
    let mut c = 0;
    while c < n {
        let block_end = (c + 32 * I16_STEPS).min(n);
        let mut acc16 = [[_mm256_setzero_si256(); 4]; 2];
        while c < block_end {
            // SAFETY: c + 32 ≤ n ≤ the length of every slice (the caller's contract).
            let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(c) as *const _) };
            for (r, row) in bytes.iter().enumerate() {
                prefetch(row.as_ptr().wrapping_add(c + PREFETCH_BYTES));
                let p = planes(unsafe { _mm256_loadu_si256(row.as_ptr().add(c) as *const _) });
                for i in 0..4 {
                    acc16[r][i] = _mm256_add_epi16(acc16[r][i], _mm256_maddubs_epi16(p[i], x));
                }
            }
            c += 32;
        }
        for r in 0..2 {
            for i in 0..4 {
                acc32[r][i] = _mm256_add_epi32(acc32[r][i], _mm256_madd_epi16(acc16[r][i], ones));
            }
        }
    }
    let mut out = [[0i32; 4]; 2];
    for r in 0..2 {
        let sums = finish(&acc32[r]);
        let tail = reference::ternary_dot_byte_row(&bytes[r][n..], &q[n..], 0);
        for i in 0..4 {
            out[r][i] = sums[i] + tail[i] - q_sum;
        }
    }
    out
}

/// 32 values per step. `cvtps_epi32` rounds half to even (the default MXCSR mode, which
/// Rust never changes); the clamp is done in float (so ±inf saturate like the scalar code)
/// and NaN lanes are zeroed (the scalar `NaN as i8` is 0; the conversion would give −128).
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_i8_avx2(x: &[f32], s: f32, q: &mut [i8]) {
    let n = x.len() / 32 * 32;
    let sv = _mm256_set1_ps(s);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    // packs interleave 128-bit lanes: this puts the 8 groups of 4 back in order
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let conv = |p: *const f32| {
        // SAFETY: the caller keeps p + 8 within x.
        let v = _mm256_mul_ps(unsafe { _mm256_loadu_ps(p) }, sv);
        let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(v, v);
        // clamp in float first: ±inf would convert to i32::MIN
        let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        _mm256_and_si256(_mm256_cvtps_epi32(v), _mm256_castps_si256(ordered))
    };
    let mut i = 0;
    while i < n {
        let p = x.as_ptr().wrapping_add(i);
        let (a, b) = (conv(p), conv(p.wrapping_add(8)));
        let (c, d) = (conv(p.wrapping_add(16)), conv(p.wrapping_add(24)));
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        let v = _mm256_permutevar8x32_epi32(packed, order);
        // SAFETY: i + 32 ≤ n ≤ q.len().
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, v) };
        i += 32;
    }
    reference::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
}

/// 8 floats per step, one FMA each; the tail in scalar.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy_f32_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len() / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 ≤ n ≤ the length of both slices (checked by the caller).
        unsafe {
            let yp = y.as_mut_ptr().add(i);
            let r = _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
            _mm256_storeu_ps(yp, r);
        }
        i += 8;
    }
    reference::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
}

/// [`super::avx512::rows_times_runs_avx512`] for AVX2: 1 to 4 rows of `a` × 16 columns (8 of
/// the 16 ymm registers accumulate; 8 rows × 8 columns, which loads each `b` run once for
/// twice the multiply-adds, ran slower: the broadcasts of `a` then fill the load ports), every
/// full block through plain loads and stores, a last partial one through masked ones (a
/// half-float block's last columns through a zero-padded copy: AVX2 has no 16-bit masked
/// load).
///
/// # Safety
/// AVX2 + FMA + F16C; `1 ≤ rows ≤ 4`; the lengths `dispatch::rows_times_runs` checks.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_times_runs_avx2<T: KvElem>(
    a: &[f32],
    rows: usize,
    depth: usize,
    b: &[T],
    b_stride: usize,
    cols: usize,
    out: &mut [f32],
) {
    let args = (a, depth, b, b_stride, cols, out);
    // SAFETY: passed on from the caller.
    unsafe {
        match rows {
            1 => blocks_avx2::<1, T>(args),
            2 => blocks_avx2::<2, T>(args),
            3 => blocks_avx2::<3, T>(args),
            _ => blocks_avx2::<4, T>(args),
        }
    }
}

/// The blocks of 16 columns: full ones through plain loads and stores, a last partial one
/// through masked ones (chosen once per block, not per k).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blocks_avx2<const H: usize, T: KvElem>(args: RunsArgs<T>) {
    let (a, depth, b, b_stride, cols, out) = args;
    for c0 in (0..cols).step_by(16) {
        let width = (cols - c0).min(16);
        let block = (a, depth, b, b_stride, cols, &mut *out);
        // SAFETY: passed on from the caller, c0 + width ≤ cols.
        unsafe {
            if width == 16 {
                block_avx2::<H, T, false>(block, c0, width)
            } else {
                block_avx2::<H, T, true>(block, c0, width)
            }
        }
    }
}

/// Columns `c0 .. c0 + width` (`width ≤ 16`, less only when `MASKED`) of every row:
/// `out[h][c] += Σ_k a[h][k] · b[k][c]`, the sums in registers across k. Every k takes its
/// multiply-adds, zero coefficients included: with finite `b` a zero adds exactly zero, and a
/// test per k cost more than the multiply-adds it saved (BENCHMARKS.md).
///
/// # Safety
/// AVX2 + FMA + F16C; `a[..H·depth]`, `out[..H·cols]`, `b[..(depth-1)·b_stride + c0 + width]`
/// readable; `c0 + width ≤ cols`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<const H: usize, T: KvElem, const MASKED: bool>(
    (a, depth, b, b_stride, cols, out): RunsArgs<T>,
    c0: usize,
    width: usize,
) {
    // lane i of half v is live when 8v + i < width (sign bit set)
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let masks: [__m256i; 2] = std::array::from_fn(|v| {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(width as i32 - 8 * v as i32), lane)
    });
    let (ap, op) = (a.as_ptr(), out.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; H];
    for (h, acc) in acc.iter_mut().enumerate() {
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the (live) lanes lie in out[h·cols + c0 ..][..width].
            *acc = unsafe {
                let p = op.add(h * cols + c0 + 8 * v);
                if MASKED {
                    _mm256_maskload_ps(p, masks[v])
                } else {
                    _mm256_loadu_ps(p)
                }
            };
        }
    }
    for k in 0..depth {
        // SAFETY: b[k·b_stride + c0 ..][..width] ⊂ b (checked by the caller).
        let bv: [__m256; 2] = unsafe {
            let p = b.as_ptr().add(k * b_stride + c0);
            if MASKED {
                load_masked_avx2(p, width, &masks)
            } else {
                std::array::from_fn(|v| load8_avx2(p.add(8 * v)))
            }
        };
        for (h, acc) in acc.iter_mut().enumerate() {
            // SAFETY: h·depth + k < H·depth ≤ a.len().
            let av = unsafe { _mm256_broadcast_ss(&*ap.add(h * depth + k)) };
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm256_fmadd_ps(av, bv, *acc);
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: as for the loads above.
            unsafe {
                let p = op.add(h * cols + c0 + 8 * v);
                if MASKED {
                    _mm256_maskstore_ps(p, masks[v], acc)
                } else {
                    _mm256_storeu_ps(p, acc)
                }
            };
        }
    }
}

/// 8 cache elements from `p` as f32: f32 loaded, halves through an F16C conversion.
///
/// # Safety
/// AVX2 + F16C; `p[..8]` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8_avx2<T: KvElem>(p: *const T) -> __m256 {
    // SAFETY: as the caller guarantees.
    unsafe {
        if T::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else {
            _mm256_loadu_ps(p.cast())
        }
    }
}

/// 16 cache elements from `p` as f32, lanes at or past `width` 0: f32 through masked loads,
/// halves through a zero-padded copy.
///
/// # Safety
/// AVX2 + F16C; `p[..width]` readable, `width ≤ 16`; `masks` as `block_avx2` builds them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_masked_avx2<T: KvElem>(
    p: *const T,
    width: usize,
    masks: &[__m256i; 2],
) -> [__m256; 2] {
    // SAFETY: as the caller guarantees.
    unsafe {
        if !T::HALF {
            let p = p.cast::<f32>();
            return std::array::from_fn(|v| _mm256_maskload_ps(p.add(8 * v), masks[v]));
        }
        let mut pad = [0u16; 16];
        std::ptr::copy_nonoverlapping(p.cast::<u16>(), pad.as_mut_ptr(), width);
        std::array::from_fn(|v| _mm256_cvtph_ps(_mm_loadu_si128(pad.as_ptr().add(8 * v).cast())))
    }
}

/// `dispatch::absmax_f32` with 8 lanes; the tail in scalar.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn absmax_avx2(x: &[f32]) -> f32 {
    let body = x.len() / 8 * 8;
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let mut acc = _mm256_setzero_ps();
    for c in x[..body].chunks_exact(8) {
        // SAFETY: c is 8 floats.
        let v = _mm256_and_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, sign);
        acc = _mm256_max_ps(v, acc); // a NaN lane keeps acc
    }
    let mut lanes = [0f32; 8];
    // SAFETY: lanes is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let m = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    m.max(reference::absmax(&x[body..]))
}

/// The AVX-512 `exp` (`avx512.rs`) with 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(d: __m256) -> __m256 {
    use super::expf::*;
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        d,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), d);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(POLY[0]);
    for &c in &POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}

/// `dispatch::softmax_f32` with 8 lanes; the tail in scalar steps of the same formulas.
///
/// # Safety
/// AVX2 + FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_avx2(x: &mut [f32]) {
    let body = x.len() / 8 * 8;
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let (mv, floor) = (_mm256_set1_ps(m), _mm256_set1_ps(-87.0));
    let mut sum = _mm256_setzero_ps();
    for c in x[..body].chunks_exact_mut(8) {
        // SAFETY: c is 8 floats.
        unsafe {
            let d = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv);
            let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(d, floor);
            let e = _mm256_and_ps(exp_avx2(d), keep);
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: lanes is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let mut total: f32 = lanes.iter().sum();
    for v in &mut x[body..] {
        let d = *v - m;
        *v = if d < -87.0 { 0.0 } else { d.exp() };
        total += *v;
    }
    for v in x.iter_mut() {
        *v /= total;
    }
}

dot_half_rows!(
    /// `dispatch::dot_bf16_tokens` on AVX2: 16 halves a step, bf16 widened by a 16-bit shift;
    /// mul + add, not FMA, so that the result does not depend on FMA availability (AVX2
    /// machines without FMA exist). `R = 2, T = 2` keeps 8 accumulators, 4 widened halves and
    /// 2 activations in the 16 registers.
    ///
    /// # Safety
    /// AVX2; every `x` one length, every row at least twice that in bytes.
    dot_bf16_avx2_rows,
    "avx2",
    reference::dot_bf16_scalar,
    lanes: 8,
    zero: _mm256_setzero_ps(),
    load: |p| _mm256_loadu_si256(p as *const __m256i),
    widen: |w| (
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16)),
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16))
    ),
    load_x: |p| _mm256_loadu_ps(p),
    mul_add: |acc, a, b| _mm256_add_ps(acc, _mm256_mul_ps(a, b)),
    lane_sum: |v0, v1| hsum256(_mm256_add_ps(v0, v1)),
);

dot_half_rows!(
    /// The same for f16 rows (the tied F16 embeddings of bitnet.cpp's I2_S files), widened by
    /// `vcvtph2ps` (F16C, exact).
    ///
    /// # Safety
    /// AVX2 + F16C; every `x` one length, every row at least twice that in bytes.
    dot_f16_avx2_rows,
    "avx2,f16c",
    reference::dot_f16_scalar,
    lanes: 8,
    zero: _mm256_setzero_ps(),
    load: |p| _mm256_loadu_si256(p as *const __m256i),
    widen: |w| (
        _mm256_cvtph_ps(_mm256_castsi256_si128(w)),
        _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1))
    ),
    load_x: |p| _mm256_loadu_ps(p),
    mul_add: |acc, a, b| _mm256_add_ps(acc, _mm256_mul_ps(a, b)),
    lane_sum: |v0, v1| hsum256(_mm256_add_ps(v0, v1)),
);

/// The lanes of `v` summed in order, as the half-float dots always reduced them.
#[inline]
#[target_feature(enable = "avx")]
fn hsum256(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: lanes has 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// `dispatch::dot_q8_0`: a GGUF Q8_0 row (per 32 columns an f16 scale, 32 int8 codes) times
/// f32 `x`: per block the codes widened to f32 by 8 and multiplied with `x` into one
/// accumulator, then the block's 8 lanes scaled once into the total (FMA).
///
/// # Safety
/// AVX2 + FMA + F16C; `row` holds `x.len() / 32` blocks, `x.len()` a multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0_avx2(row: &[u8], x: &[f32]) -> f32 {
    assert!(x.len().is_multiple_of(32) && row.len() == x.len() / 32 * 34);
    let mut total = _mm256_setzero_ps();
    for (b, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[0], b[1]])));
        let mut acc = _mm256_setzero_ps();
        for k in 0..4 {
            // SAFETY: bytes 2 + 8k .. 10 + 8k of a 34-byte block; floats 8k .. 8k + 8 of 32.
            unsafe {
                let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * k) as *const __m128i);
                let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb.as_ptr().add(8 * k)), acc);
            }
        }
        total = _mm256_fmadd_ps(acc, d, total);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: lanes has 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

/// The q8 head's dots (`q8.rs`) of `R` rows and `T` activation rows, 16 weights per step:
/// sign-extend int8 → int16 (once for all `T` activation rows), `pmaddwd` with each row's int16
/// activations (pairs → i32, exact), 4 steps per block; the block's 8 lanes go to f32 once and
/// are scaled by one FMA. The row's tail (a block shorter than `Q8_BLOCK`) goes through scalar
/// code. Each (row, activation row) result's operations run in the same order whatever `R` and
/// `T` (so it is the one-row, one-token call's bit for bit); the rows' weight streams are read
/// side by side.
///
/// # Safety
/// AVX2 + FMA; every `x` has one length, every row as long as that, every `scales` one per
/// block of it.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // b, r, t index x, every row, its scales and accumulators
pub unsafe fn dot_q8_avx2_rows<const R: usize, const T: usize>(
    q: [&[i8]; R],
    scales: [&[f32]; R],
    x: [&[i16]; T],
) -> [[f32; R]; T] {
    let cols = x[0].len();
    let full = cols / Q8_BLOCK;
    for t in 0..T {
        assert_eq!(x[t].len(), cols);
    }
    let mut total = [[_mm256_setzero_ps(); R]; T];
    for b in 0..full {
        let base = b * Q8_BLOCK;
        let mut acc = [[_mm256_setzero_si256(); R]; T];
        for r in 0..R {
            // one 64-byte block is one cache line of q: ask for the one PREFETCH_BYTES ahead
            prefetch(q[r].as_ptr().wrapping_add(base + PREFETCH_BYTES) as *const u8);
        }
        let mut c = 0;
        while c < Q8_BLOCK {
            // SAFETY: base + c + 16 ≤ full * Q8_BLOCK ≤ len of every x and of every row.
            let w: [__m256i; R] = std::array::from_fn(|r| unsafe {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q[r].as_ptr().add(base + c) as *const _))
            });
            for t in 0..T {
                let xv =
                    unsafe { _mm256_loadu_si256(x[t].as_ptr().add(base + c) as *const __m256i) };
                for r in 0..R {
                    acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(w[r], xv));
                }
            }
            c += 16;
        }
        for r in 0..R {
            let s = _mm256_set1_ps(scales[r][b]);
            for t in 0..T {
                total[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][r]), s, total[t][r]);
            }
        }
    }
    let tail = full * Q8_BLOCK;
    std::array::from_fn(|t| {
        std::array::from_fn(|r| {
            let mut lanes = [0f32; 8];
            // SAFETY: lanes has 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total[t][r]) };
            lanes.iter().sum::<f32>()
                + reference::dot_q8_scalar(&q[r][tail..], &scales[r][full..], &x[t][tail..])
        })
    })
}

/// The q4 head's dot for `R` rows at once (`q4.rs` has the layout), each row's operations in
/// the same order (so each result equals the one-row call bit for bit). Per block of 64 columns:
/// 32 code bytes; `& 15` gives columns 0..31, `>> 4 & 15` columns 32..63, as unsigned bytes;
/// `pmaddubsw` against the int8 activations (|i16| ≤ 2·15·128, the two halves summed ≤ 7680:
/// no saturation), `pmaddwd` by ones into i32 lanes, minus the block's code offset `8 · Σ x` in
/// lane 0 (the block's exact integer is then the lanes' sum), one FMA by the block's step.
///
/// # Safety
/// AVX2 and FMA must be available; every row holds `x.len() / 64 * 32` code bytes and
/// `x.len() / 64` scales, `offsets` one entry per block, and `x` is whole blocks.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // `b`, `r`, `t` index x, the codes, scales and sums alike
pub unsafe fn dot_q4_avx2_rows<const R: usize, const T: usize>(
    codes: [&[u8]; R],
    scales: [&[u16]; R],
    x: [&[i8]; T],
    offsets: [&[i32]; T],
) -> [[f32; R]; T] {
    let blocks = x[0].len() / Q4_BLOCK;
    for t in 0..T {
        assert_eq!(x[t].len(), blocks * Q4_BLOCK);
        assert!(offsets[t].len() >= blocks);
    }
    for r in 0..R {
        assert!(codes[r].len() >= blocks * Q4_BLOCK_BYTES && scales[r].len() >= blocks);
    }
    let (m15, ones) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1));
    let mut total = [[_mm256_setzero_ps(); R]; T];
    for b in 0..blocks {
        let (xb, cb) = (b * Q4_BLOCK, b * Q4_BLOCK_BYTES);
        // the codes of each row decoded once for all T activation rows
        let lohi: [(__m256i, __m256i); R] = std::array::from_fn(|r| {
            if b % 2 == 0 {
                // two blocks are one cache line of codes: ask for the one PREFETCH_BYTES ahead
                prefetch(codes[r].as_ptr().wrapping_add(cb + PREFETCH_BYTES));
            }
            // SAFETY: cb + 32 ≤ blocks * 32 ≤ the row's code bytes (asserted above).
            let v = unsafe { _mm256_loadu_si256(codes[r].as_ptr().add(cb) as *const __m256i) };
            (
                _mm256_and_si256(v, m15),                       // columns 0..31
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m15), // columns 32..63
            )
        });
        let s: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(bf16_to_f32(scales[r][b])));
        for t in 0..T {
            // SAFETY: xb + 64 ≤ x[t].len().
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(x[t].as_ptr().add(xb) as *const __m256i),
                    _mm256_loadu_si256(x[t].as_ptr().add(xb + 32) as *const __m256i),
                )
            };
            let offset = _mm256_zextsi128_si256(_mm_cvtsi32_si128(offsets[t][b]));
            for r in 0..R {
                let (lo, hi) = lohi[r];
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
                let acc = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), offset);
                total[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s[r], total[t][r]);
            }
        }
    }
    std::array::from_fn(|t| {
        std::array::from_fn(|r| {
            let mut lanes = [0f32; 8];
            // SAFETY: lanes has 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total[t][r]) };
            lanes.iter().sum::<f32>()
        })
    })
}
