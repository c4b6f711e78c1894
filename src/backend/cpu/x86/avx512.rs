//! The AVX-512 (F, BW, VNNI) kernels, 512-bit vectors and masks; their AVX2 twins are in
//! `avx2.rs`, in the same order. Each is `unsafe` for its target features only: the safe
//! wrappers of `dispatch.rs` call it for a level `CpuLevel::available()` returned, after checking
//! the slice lengths.

use std::arch::x86_64::*;

use super::{prefetch, PREFETCH_BYTES};
use crate::backend::cpu::dispatch::{KvElem, RunsArgs};
use crate::backend::cpu::q8::Q8_BLOCK;
use crate::backend::cpu::reference;

/// `T` tokens against one packed byte row, 64 columns per step: the one-shift code planes
/// (as in `avx2.rs`) feed vpdpbusd (u8 code × i8 act, 4-way sums straight into i32), so a
/// step costs 1 shift + 4 ands for the weights and 4 vpdpbusd per token. `T = 4` uses 16
/// accumulators + 4 planes + 3 temporaries of the 32 zmm registers: the weight-side work is
/// amortised over 4 tokens and the loop is bound by vpdpbusd alone, which is the floor for
/// 8-bit products (1 multiply-add per weight per token).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn ternary_dot4_xn_avx512vnni<const T: usize>(
    bytes: &[u8],
    q: [&[i8]; T],
    q_sum: [i32; T],
) -> [[i32; 4]; T] {
    let n = bytes.len() / 64 * 64;
    let (m3, m12) = (_mm512_set1_epi8(3), _mm512_set1_epi8(12));
    let mut acc = [[_mm512_setzero_si512(); 4]; T];
    let mut c = 0;
    while c < n {
        // SAFETY: c + 64 ≤ n ≤ the length of every slice (the caller's contract).
        let w = unsafe { _mm512_loadu_si512(bytes.as_ptr().add(c) as *const _) };
        prefetch(bytes.as_ptr().wrapping_add(c + PREFETCH_BYTES));
        let hi = _mm512_srli_epi16(w, 4);
        let p = [
            _mm512_and_si512(w, m3),
            _mm512_and_si512(w, m12),
            _mm512_and_si512(hi, m3),
            _mm512_and_si512(hi, m12),
        ];
        for t in 0..T {
            let x = unsafe { _mm512_loadu_si512(q[t].as_ptr().add(c) as *const _) };
            for i in 0..4 {
                acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], p[i], x);
            }
        }
        c += 64;
    }
    std::array::from_fn(|t| finish_avx512(&acc[t], &bytes[n..], &q[t][n..], q_sum[t]))
}

/// `dispatch::ternary_dot4_rows2`: the one-token step of [`ternary_dot4_xn_avx512vnni`] on
/// two byte rows, sharing the activation load.
///
/// # Safety
/// AVX-512 BW + VNNI; both rows as long as `q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn ternary_dot4_rows2_avx512vnni(
    bytes: [&[u8]; 2],
    q: &[i8],
    q_sum: i32,
) -> [[i32; 4]; 2] {
    let n = q.len() / 64 * 64;
    let (m3, m12) = (_mm512_set1_epi8(3), _mm512_set1_epi8(12));
    let mut acc = [[_mm512_setzero_si512(); 4]; 2];
    let mut c = 0;
    while c < n {
        // SAFETY: c + 64 ≤ n ≤ the length of every slice (the caller's contract).
        let x = unsafe { _mm512_loadu_si512(q.as_ptr().add(c) as *const _) };
        for (r, row) in bytes.iter().enumerate() {
            let w = unsafe { _mm512_loadu_si512(row.as_ptr().add(c) as *const _) };
            prefetch(row.as_ptr().wrapping_add(c + PREFETCH_BYTES));
            let hi = _mm512_srli_epi16(w, 4);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(w, m3), x);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(w, m12), x);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(hi, m3), x);
            acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(hi, m12), x);
        }
        c += 64;
    }
    std::array::from_fn(|r| finish_avx512(&acc[r], &bytes[r][n..], &q[n..], q_sum))
}

/// The 4 row sums of one byte row from its plane accumulators, plus the scalar tail
/// (`bytes` and `q` past the vector part) and the `− Σq` of the code trick.
#[inline]
#[target_feature(enable = "avx512f")]
fn finish_avx512(acc: &[__m512i; 4], bytes: &[u8], q: &[i8], q_sum: i32) -> [i32; 4] {
    // planes 1 and 3 hold 4·code: every lane sum is a multiple of 4, so >> 2 is exact
    let unscale = _mm_set_epi32(2, 0, 2, 0);
    let tail = reference::ternary_dot_byte_row(bytes, q, 0);
    let fix = _mm_set_epi32(
        tail[3] - q_sum,
        tail[2] - q_sum,
        tail[1] - q_sum,
        tail[0] - q_sum,
    );
    let sums = _mm_srav_epi32(hsum4_epi32(acc), unscale);
    let mut out = [0i32; 4];
    // one 16-byte store: the caller's 16-byte read of it is forwarded from the store
    // buffer (four 4-byte stores read back as one vector stall ~15 cycles per call)
    // SAFETY: out is 4 i32 = 16 bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm_add_epi32(sums, fix)) };
    out
}

/// `[Σ lanes of v[0], …, Σ lanes of v[3]]` as one vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum4_epi32(v: &[__m512i; 4]) -> __m128i {
    let half = |x: __m512i| {
        let y = _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64(x, 1));
        _mm_add_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1))
    };
    let (a, b, c, d) = (half(v[0]), half(v[1]), half(v[2]), half(v[3]));
    _mm_hadd_epi32(_mm_hadd_epi32(a, b), _mm_hadd_epi32(c, d))
}

/// [`super::avx2::quantize_i8_avx2`] with 16 values per step and the saturating `vpmovsdb`.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_i8_avx512(x: &[f32], s: f32, q: &mut [i8]) {
    let n = x.len() / 16 * 16;
    let sv = _mm512_set1_ps(s);
    let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 ≤ n ≤ the length of both slices.
        unsafe {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), sv);
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi); // ±inf → the clamp's ends
            let r = _mm512_maskz_cvtps_epi32(ordered, v);
            _mm_storeu_si128(
                q.as_mut_ptr().add(i) as *mut __m128i,
                _mm512_cvtsepi32_epi8(r),
            );
        }
        i += 16;
    }
    reference::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
}

/// 16 floats per step, one FMA each; the tail in scalar.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy_f32_avx512(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len() / 16 * 16;
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 ≤ n ≤ the length of both slices (checked by the caller).
        unsafe {
            let yp = y.as_mut_ptr().add(i);
            let r = _mm512_fmadd_ps(av, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(yp));
            _mm512_storeu_ps(yp, r);
        }
        i += 16;
    }
    reference::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
}

/// `dispatch::rows_times_runs` for AVX-512: 1 to 4 rows of `a` × 64 columns (4 zmm), or 5 to 8
/// rows × 32 columns (2 zmm; 8 rows load each `b` run once for twice the multiply-adds), the
/// last block masked (a half-float block's last columns through a zero-padded copy), so up to
/// 16 accumulators stay in registers over all of k. Every k takes its multiply-adds, zero
/// coefficients included (as in the AVX2 kernel).
///
/// # Safety
/// AVX-512F; `1 ≤ rows ≤ 8`; the lengths `dispatch::rows_times_runs` checks.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_times_runs_avx512<T: KvElem>(
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
            1 => rows_block::<1, 4, T>(args),
            2 => rows_block::<2, 4, T>(args),
            3 => rows_block::<3, 4, T>(args),
            4 => rows_block::<4, 4, T>(args),
            5 => rows_block::<5, 2, T>(args),
            6 => rows_block::<6, 2, T>(args),
            7 => rows_block::<7, 2, T>(args),
            _ => rows_block::<8, 2, T>(args),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows_block<const H: usize, const V: usize, T: KvElem>(
    (a, depth, b, b_stride, cols, out): RunsArgs<T>,
) {
    let (ap, op) = (a.as_ptr(), out.as_mut_ptr());
    for c0 in (0..cols).step_by(16 * V) {
        let width = (cols - c0).min(16 * V);
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let lanes = width.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); V]; H];
        for (h, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the masked lanes lie in out[h·cols + c0 .. h·cols + c0 + width].
                *acc = unsafe { _mm512_maskz_loadu_ps(masks[v], op.add(h * cols + c0 + 16 * v)) };
            }
        }
        for k in 0..depth {
            // SAFETY: b[k·b_stride + c0 ..][..width] ⊂ b (checked).
            let bv = unsafe { load_runs(b.as_ptr().add(k * b_stride + c0), width, &masks) };
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: h·depth + k < H·depth ≤ a.len().
                let av = _mm512_set1_ps(unsafe { *ap.add(h * depth + k) });
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { _mm512_mask_storeu_ps(op.add(h * cols + c0 + 16 * v), masks[v], acc) };
            }
        }
    }
}

/// `16·V` cache elements from `p` as f32 (lanes at or past `width` are 0): f32 through masked
/// loads, halves through `vcvtph2ps`.
///
/// # Safety
/// AVX-512F; `p[..min(width, 16·V)]` readable; `masks` as `rows_block` builds them; `V ≤ 4`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_runs<T: KvElem, const V: usize>(
    p: *const T,
    width: usize,
    masks: &[__mmask16; V],
) -> [__m512; V] {
    // SAFETY: as the caller guarantees.
    unsafe {
        if !T::HALF {
            let p = p.cast::<f32>();
            return std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], p.add(16 * v)));
        }
        let p = p.cast::<u16>();
        let mut pad = [0u16; 64];
        let p = if width >= 16 * V {
            p
        } else {
            std::ptr::copy_nonoverlapping(p, pad.as_mut_ptr(), width);
            pad.as_ptr()
        };
        std::array::from_fn(|v| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16 * v).cast())))
    }
}

/// `dispatch::absmax_f32` with 16 lanes (the tail masked in as zeros).
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn absmax_avx512(x: &[f32]) -> f32 {
    let sign = _mm512_set1_epi32(i32::MAX);
    let mut acc = _mm512_setzero_ps();
    for c in x.chunks(16) {
        let m = ((1u32 << c.len()) - 1) as __mmask16;
        // SAFETY: the masked lanes are c's.
        let v = unsafe { _mm512_maskz_loadu_ps(m, c.as_ptr()) };
        let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), sign));
        acc = _mm512_max_ps(a, acc); // a NaN lane keeps acc
    }
    _mm512_reduce_max_ps(acc)
}

/// e^d for lanes with d ≥ −87 (the caller zeroes the others): see `x86::expf`.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_avx512(d: __m512) -> __m512 {
    use super::expf::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(d, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), d);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(POLY[0]);
    for &c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // 2^n from the exponent bits: n ≥ −126 for d ≥ −87, so 2^n is a normal float
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
}

/// `dispatch::softmax_f32` with 16 lanes; the tail through masks.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_avx512(x: &mut [f32]) {
    let len = x.len();
    let p = x.as_mut_ptr();
    let mask = |i: usize| -> __mmask16 { ((1u32 << (len - i).min(16)) - 1) as __mmask16 };
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < len {
        // SAFETY: the masked lanes lie in x[i..len].
        let v = unsafe { _mm512_maskz_loadu_ps(mask(i), p.add(i)) };
        mv = _mm512_mask_max_ps(mv, mask(i), mv, v);
        i += 16;
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    let (floor, mut sum) = (_mm512_set1_ps(-87.0), _mm512_setzero_ps());
    i = 0;
    while i < len {
        // SAFETY: as above.
        unsafe {
            let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), m);
            // not (d < −87): NaN lanes go through (NaN, like the scalar code)
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(d, floor) & mask(i);
            let e = _mm512_maskz_mov_ps(keep, exp_avx512(d));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(p.add(i), mask(i), e);
        }
        i += 16;
    }
    let sum = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    i = 0;
    while i < len {
        // SAFETY: as above.
        unsafe {
            let v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), sum);
            _mm512_mask_storeu_ps(p.add(i), mask(i), v);
        }
        i += 16;
    }
}

/// The q8 head's dots (`q8.rs`) of `R` rows and `T` activation rows with 512-bit vectors: per
/// block of 64 columns, the int8 weights sign-extended to int16 in two halves (once for all `T`
/// activation rows) and `vpdpwssd` against each row's int16 activations (pairs → i32, exact,
/// accumulated in 16 lanes), then the block's lanes to f32 once and one FMA by its scale; the
/// row's tail (a block shorter than `Q8_BLOCK`) through scalar code. Each (row, activation row)
/// result's operations run in the same order whatever `R` and `T`, so it is the one-row,
/// one-token call's bit for bit (a batch of decode rows does not change a row's logits); the
/// rows' weight streams are read side by side. The AVX2 kernel (`avx2::dot_q8_avx2_rows`) does
/// the same with 256-bit vectors.
///
/// # Safety
/// AVX-512 F/BW and VNNI must be available; every `x` has one length, every row holds at least
/// that many codes and one scale per whole block.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `r`, `t` index rows, activations and accumulators alike
pub unsafe fn dot_q8_avx512vnni_rows<const R: usize, const T: usize>(
    q: [&[i8]; R],
    scales: [&[f32]; R],
    x: [&[i16]; T],
) -> [[f32; R]; T] {
    let cols = x[0].len();
    let full = cols / Q8_BLOCK;
    for r in 0..R {
        assert!(q[r].len() >= full * Q8_BLOCK && scales[r].len() >= full);
    }
    for t in 0..T {
        assert_eq!(x[t].len(), cols);
    }
    let mut total = [[_mm512_setzero_ps(); R]; T];
    for b in 0..full {
        let base = b * Q8_BLOCK;
        for r in 0..R {
            // one 64-byte block is one cache line of q: ask for the one PREFETCH_BYTES ahead
            prefetch(q[r].as_ptr().wrapping_add(base + PREFETCH_BYTES) as *const u8);
        }
        // SAFETY: base + 64 ≤ full · Q8_BLOCK ≤ the row's length (asserted above).
        let w: [[__m512i; 2]; R] = std::array::from_fn(|r| unsafe {
            [
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(q[r].as_ptr().add(base) as *const _)),
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(q[r].as_ptr().add(base + 32) as *const _)),
            ]
        });
        let s: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(scales[r][b]));
        for t in 0..T {
            // SAFETY: base + 64 ≤ full · Q8_BLOCK ≤ cols (32 int16 per load).
            let (x0, x1) = unsafe {
                (
                    _mm512_loadu_si512(x[t].as_ptr().add(base) as *const __m512i),
                    _mm512_loadu_si512(x[t].as_ptr().add(base + 32) as *const __m512i),
                )
            };
            for r in 0..R {
                let acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[r][0], x0);
                let acc = _mm512_dpwssd_epi32(acc, w[r][1], x1);
                total[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s[r], total[t][r]);
            }
        }
    }
    let tail = full * Q8_BLOCK;
    std::array::from_fn(|t| {
        std::array::from_fn(|r| {
            let mut lanes = [0f32; 16];
            // SAFETY: lanes has 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total[t][r]) };
            lanes.iter().sum::<f32>()
                + reference::dot_q8_scalar(&q[r][tail..], &scales[r][full..], &x[t][tail..])
        })
    })
}

dot_half_rows!(
    /// `dispatch::dot_bf16_tokens` on AVX-512: 32 halves a step, bf16 widened by a 16-bit
    /// shift, FMA. `R = 2, T = 4` keeps 16 sums, 4 widened vectors and 2 activations in the 32
    /// zmm registers (the AVX2 kernel: 8 lanes, no FMA, 2 activation rows a pass).
    ///
    /// # Safety
    /// AVX-512 F; every `x` one length, every row at least twice that in bytes.
    dot_bf16_avx512_rows,
    "avx512f",
    reference::dot_bf16_scalar,
    lanes: 16,
    zero: _mm512_setzero_ps(),
    load: |p| _mm512_loadu_si512(p as *const _),
    widen: |w| (
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)),
            16
        )),
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)),
            16
        ))
    ),
    load_x: |p| _mm512_loadu_ps(p),
    mul_add: |acc, a, b| _mm512_fmadd_ps(a, b, acc),
    lane_sum: |v0, v1| hsum512(_mm512_add_ps(v0, v1)),
);

dot_half_rows!(
    /// `dispatch::dot_f16_tokens` on AVX-512: f16 widened by `vcvtph2ps` (exact).
    ///
    /// # Safety
    /// AVX-512 F; every `x` one length, every row at least twice that in bytes.
    dot_f16_avx512_rows,
    "avx512f",
    reference::dot_f16_scalar,
    lanes: 16,
    zero: _mm512_setzero_ps(),
    load: |p| _mm512_loadu_si512(p as *const _),
    widen: |w| (
        _mm512_cvtph_ps(_mm512_castsi512_si256(w)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1))
    ),
    load_x: |p| _mm512_loadu_ps(p),
    mul_add: |acc, a, b| _mm512_fmadd_ps(a, b, acc),
    lane_sum: |v0, v1| hsum512(_mm512_add_ps(v0, v1)),
);

/// The lanes of `v` summed in order, as the half-float dots reduce them.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum512(v: __m512) -> f32 {
    let mut lanes = [0f32; 16];
    // SAFETY: lanes has 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}
