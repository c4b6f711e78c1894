//! CPU kernels with run-time feature detection. Each optimised kernel has the plain scalar twin
//! in this file (and `ternary::ternary_dot_rows_scalar` above them all); tests compare them
//! exactly (integer paths) for every level this machine can run.
//!
//! The ternary dot works on one packed byte row (4 output rows, see `ternary.rs`): with codes
//! `c = w + 1` in {0, 1, 2}, `Σ q·w = Σ q·c − Σ q`, so the inner loop multiplies *unsigned* codes
//! by *signed* int8 activations — exactly what x86's `pmaddubsw` / `vpdpbusd` take.

use std::sync::OnceLock;

/// Which kernel family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    Scalar,
    /// x86-64 AVX2 + FMA (pmaddubsw + pmaddwd; FMA for the float kernels).
    Avx2,
    /// x86-64 AVX-512 BW + VNNI (vpdpbusd on 512-bit vectors).
    Avx512Vnni,
    /// [`CpuLevel::Avx512Vnni`] plus Intel AMX tiles for the prefill matmuls (`tdpbusd`: a
    /// 16×16 int8 matrix product per instruction; Linux only, see `backend::amx`).
    Amx,
    /// aarch64 NEON (smull + sadalp).
    Neon,
    /// aarch64 NEON + the dotprod extension (sdot: four int8 products summed into each i32 lane).
    NeonDot,
}

/// Every `BITNET_CPU_KERNEL` value, on any architecture.
const ALL_LEVEL_NAMES: [&str; 6] = ["scalar", "avx2", "avx512vnni", "amx", "neon", "neondot"];

impl CpuLevel {
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512Vnni => "avx512vnni",
            CpuLevel::Amx => "amx",
            CpuLevel::Neon => "neon",
            CpuLevel::NeonDot => "neondot",
        }
    }

    /// Every level this machine can run, lowest first.
    pub fn available() -> Vec<CpuLevel> {
        let mut v = vec![CpuLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(CpuLevel::Avx2);
            }
            if is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(CpuLevel::Avx512Vnni);
                #[cfg(target_os = "linux")]
                if super::amx::available() {
                    v.push(CpuLevel::Amx);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(CpuLevel::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(CpuLevel::NeonDot);
                }
            }
        }
        v
    }

    /// The best level, or the one `BITNET_CPU_KERNEL=scalar|avx2|avx512vnni|amx|neon|neondot` forces
    /// (if this machine can run it; a level it cannot run falls back to the best one with a
    /// warning).
    pub fn detect() -> CpuLevel {
        static LEVEL: OnceLock<CpuLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| Self::pick(std::env::var("BITNET_CPU_KERNEL").ok().as_deref()))
    }

    /// [`CpuLevel::detect`]'s choice for a `BITNET_CPU_KERNEL` value; apart from the env var and
    /// the cache so that a test can check every forced level in one process.
    fn pick(want: Option<&str>) -> CpuLevel {
        let avail = Self::available();
        let best = *avail.last().unwrap();
        match want {
            Some(want) => match avail.iter().find(|l| l.name() == want) {
                Some(&l) => l,
                None if !ALL_LEVEL_NAMES.contains(&want) => {
                    eprintln!(
                        "warning: BITNET_CPU_KERNEL={want:?} is not a kernel level (one of {}); using {}",
                        ALL_LEVEL_NAMES.join(", "),
                        best.name()
                    );
                    best
                }
                None => {
                    eprintln!(
                        "warning: BITNET_CPU_KERNEL={want} is not available here (available: {}); using {}",
                        avail.iter().map(|l| l.name()).collect::<Vec<_>>().join(", "),
                        best.name()
                    );
                    best
                }
            },
            None => best,
        }
    }
}

/// [`ternary_dot4`] for two packed byte rows at once, one token: `[dot4(bytes[0]), dot4(bytes[1])]`.
/// Decode reads each weight once, so its speed is the memory stream's; with two rows far apart
/// (the two halves of a job's range) the core keeps two sequential streams in flight, which
/// the prefetchers serve faster than one (measured on the AVX-512 VM: 13.7 → 15.6 GB/s on one
/// core).
#[inline]
pub fn ternary_dot4_rows2(
    level: CpuLevel,
    bytes: [&[u8]; 2],
    q: &[i8],
    q_sum: i32,
) -> [[i32; 4]; 2] {
    assert!(
        bytes.iter().all(|b| b.len() == q.len()),
        "ternary_dot4_rows2: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::ternary_dot4_rows2_avx512vnni(bytes, q, q_sum)
        },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::ternary_dot4_rows2_avx2(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { arm::ternary_dot4_rows2_neondot(bytes, q, q_sum) },
        _ => [
            ternary_dot4(level, bytes[0], q, q_sum),
            ternary_dot4(level, bytes[1], q, q_sum),
        ],
    }
}

/// `[Σ q·W_row]` for the 4 rows of one packed byte row; `q_sum = Σ q`.
#[inline]
pub fn ternary_dot4(level: CpuLevel, bytes: &[u8], q: &[i8], q_sum: i32) -> [i32; 4] {
    // a real check: the SIMD kernels read q as far as bytes reaches (one compare per row)
    assert_eq!(
        bytes.len(),
        q.len(),
        "ternary_dot4: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx2 => unsafe { x86::ternary_dot4_xn_avx2::<1>(bytes, [q], [q_sum])[0] },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::ternary_dot4_xn_avx512vnni::<1>(bytes, [q], [q_sum])[0]
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { arm::ternary_dot4_xn_neon::<1>(bytes, [q], [q_sum])[0] },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { arm::ternary_dot4_xn_neondot::<1>(bytes, [q], [q_sum])[0] },
        _ => crate::ternary::ternary_dot_byte_row(bytes, q, q_sum),
    }
}

/// Two tokens against one packed byte row: the code planes are extracted once and used twice,
/// which is what makes prefill cheaper per token than decode.
#[inline]
pub fn ternary_dot4_x2(
    level: CpuLevel,
    bytes: &[u8],
    q: [&[i8]; 2],
    q_sum: [i32; 2],
) -> [[i32; 4]; 2] {
    assert!(
        q.iter().all(|r| r.len() == bytes.len()),
        "ternary_dot4_x2: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx2 => unsafe { x86::ternary_dot4_xn_avx2::<2>(bytes, q, q_sum) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::ternary_dot4_xn_avx512vnni::<2>(bytes, q, q_sum)
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { arm::ternary_dot4_xn_neon::<2>(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { arm::ternary_dot4_xn_neondot::<2>(bytes, q, q_sum) },
        _ => [
            ternary_dot4(level, bytes, q[0], q_sum[0]),
            ternary_dot4(level, bytes, q[1], q_sum[1]),
        ],
    }
}

/// Four tokens against one packed byte row (prefill): AVX-512 and NEON (32 vector registers)
/// reuse the planes 4 times; AVX2 (16) and scalar run it as two calls of the two-token kernel.
#[inline]
pub fn ternary_dot4_x4(
    level: CpuLevel,
    bytes: &[u8],
    q: [&[i8]; 4],
    q_sum: [i32; 4],
) -> [[i32; 4]; 4] {
    assert!(
        q.iter().all(|r| r.len() == bytes.len()),
        "ternary_dot4_x4: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::ternary_dot4_xn_avx512vnni::<4>(bytes, q, q_sum)
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { arm::ternary_dot4_xn_neon::<4>(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { arm::ternary_dot4_xn_neondot::<4>(bytes, q, q_sum) },
        _ => {
            let [a, b] = ternary_dot4_x2(level, bytes, [q[0], q[1]], [q_sum[0], q_sum[1]]);
            let [c, d] = ternary_dot4_x2(level, bytes, [q[2], q[3]], [q_sum[2], q_sum[3]]);
            [a, b, c, d]
        }
    }
}

/// `Σ x·row` with `row` in bf16 (little-endian bytes), f32 accumulation. The LM head's kernel.
#[inline]
pub fn dot_bf16(level: CpuLevel, row: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(row.len(), 2 * x.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 | CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::dot_bf16_avx2(row, x)
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon | CpuLevel::NeonDot => unsafe { arm::dot_bf16_neon(row, x) },
        _ => dot_bf16_scalar(row, x),
    }
}

/// [`dot_bf16`] of two rows read side by side (the same results): two memory streams keep more
/// of a core's memory bandwidth busy than one.
#[inline]
pub fn dot_bf16_rows2(level: CpuLevel, rows: [&[u8]; 2], x: &[f32]) -> [f32; 2] {
    assert!(
        rows.iter().all(|r| r.len() == 2 * x.len()),
        "dot_bf16_rows2: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned; lengths checked above.
        CpuLevel::Avx2 | CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            x86::dot_bf16_avx2_rows::<2>(rows, x)
        },
        _ => [dot_bf16(level, rows[0], x), dot_bf16(level, rows[1], x)],
    }
}

/// `y += a·x` in f32 (attention's weighted sum of values).
#[inline]
pub fn axpy_f32(level: CpuLevel, a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f32: lengths differ");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned (AVX2 implies FMA there).
        CpuLevel::Avx2 => unsafe { x86::axpy_f32_avx2(a, x, y) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { x86::axpy_f32_avx512(a, x, y) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon | CpuLevel::NeonDot => unsafe { arm::axpy_f32_neon(a, x, y) },
        _ => axpy_f32_scalar(a, x, y),
    }
}

/// `out[h] += Σ_k a[h][k] · b[k]` for `heads` rows `a[h]` (`a`: `[heads, depth]`), where `b[k]` is
/// the run `b[k·b_stride .. k·b_stride + cols]` and `out` is `[heads, cols]`. Attention's two
/// products for the query heads that share one kv head: scores (`a` = the scaled queries,
/// `b[k]` = component k of every key) and the weighted sum of values (`a` = the probabilities,
/// `b[k]` = value k). Zero coefficients are skipped (underflowed probabilities add nothing).
///
/// Per output element the sum runs over k in order, one multiply-add each, as a sequence of
/// [`axpy_f32`] calls would; the AVX-512 kernel keeps up to 4 heads × 64 columns in registers,
/// so each `b` run is loaded once for all heads instead of once per head, and the outputs stay
/// in registers across k.
#[allow(clippy::too_many_arguments)]
pub fn rows_times_runs(
    level: CpuLevel,
    a: &[f32],
    heads: usize,
    depth: usize,
    b: &[f32],
    b_stride: usize,
    cols: usize,
    out: &mut [f32],
) {
    assert!(a.len() >= heads * depth, "rows_times_runs: a is too short");
    assert!(
        out.len() >= heads * cols,
        "rows_times_runs: out is too short"
    );
    if depth == 0 || cols == 0 || heads == 0 {
        return;
    }
    assert!(
        b.len() >= (depth - 1) * b_stride + cols,
        "rows_times_runs: b is too short"
    );
    // the SIMD kernels keep up to 4 heads in registers: heads go to them in groups of 4
    for h0 in (0..heads).step_by(4) {
        let hn = (heads - h0).min(4);
        let (a, out) = (&a[h0 * depth..], &mut out[h0 * cols..]);
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is only ever one `available()` returned; lengths checked above.
            CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
                x86::rows_times_runs_avx512(a, hn, depth, b, b_stride, cols, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (AVX2 implies FMA there).
            CpuLevel::Avx2 => unsafe {
                x86::rows_times_runs_avx2(a, hn, depth, b, b_stride, cols, out)
            },
            _ => rows_times_runs_with(level, a, hn, depth, b, b_stride, cols, out),
        }
    }
}

/// [`rows_times_runs`] as one [`axpy_f32`] per (head, k); with `CpuLevel::Scalar` its scalar twin.
#[allow(clippy::too_many_arguments)]
pub fn rows_times_runs_with(
    level: CpuLevel,
    a: &[f32],
    heads: usize,
    depth: usize,
    b: &[f32],
    b_stride: usize,
    cols: usize,
    out: &mut [f32],
) {
    for (h, o) in out.chunks_exact_mut(cols).take(heads).enumerate() {
        for (k, &ak) in a[h * depth..(h + 1) * depth].iter().enumerate() {
            if ak != 0.0 {
                axpy_f32(level, ak, &b[k * b_stride..k * b_stride + cols], o);
            }
        }
    }
}

/// `max |x|` with NaN ignored: exactly [`crate::ternary::absmax`], its scalar twin (max is exact
/// and the vector `max` returns its second operand, the running maximum, when a lane is NaN).
pub fn absmax_f32(level: CpuLevel, x: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { x86::absmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::absmax_avx2(x) },
        _ => crate::ternary::absmax(x),
    }
}

/// [`crate::backend::cpu::softmax_in_place`] (its scalar twin) with vectors: the same rule for
/// terms below e^−87 (exactly 0), the exponential from a degree-6 polynomial after range
/// reduction (within ~2 ulp of libm's `expf`), the sum accumulated per lane.
pub fn softmax_f32(level: CpuLevel, x: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned (AVX2 implies FMA there).
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { x86::softmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::softmax_avx2(x) },
        _ => super::cpu::softmax_in_place(x),
    }
}

/// Constants of the vector `exp` (Cody–Waite range reduction `d = n·ln2 + r`, `|r| ≤ ln2/2`,
/// then the Taylor polynomial of e^r to degree 6: the first omitted term is below 1.2e−7·e^r).
#[cfg(target_arch = "x86_64")]
mod expf {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4; // ln 2 to 11 bits: n·LN2_HI is exact for |n| ≤ 2^13
    pub const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    pub const POLY: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
}

/// `q = clamp(round_half_even(x·s), −128, 127)`: the int8 values of per-token activation
/// quantization, exactly [`crate::ternary::quantize_row_with_scale`] (its scalar twin), NaN → 0
/// included.
#[inline]
pub fn quantize_i8(level: CpuLevel, x: &[f32], s: f32, q: &mut [i8]) {
    assert_eq!(x.len(), q.len(), "quantize_i8: lengths differ");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx2 => unsafe { x86::quantize_i8_avx2(x, s, q) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { x86::quantize_i8_avx512(x, s, q) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon | CpuLevel::NeonDot => unsafe { arm::quantize_i8_neon(x, s, q) },
        _ => crate::ternary::quantize_row_with_scale(x, s, q),
    }
}

/// The scalar twin of [`axpy_f32`] (a separate multiply and add: the FMA kernel rounds once, so
/// the two differ by an ulp per step, which the tests' tolerance allows).
pub fn axpy_f32_scalar(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

pub fn dot_bf16_scalar(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(2)
        .zip(x)
        .map(|(b, &xi)| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) * xi)
        .sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// How far ahead of the weight stream the decode kernels prefetch. The weights of a token
    /// are streamed once from memory, and the hardware prefetchers stop at each 4 KiB page;
    /// asking for the line this far ahead keeps misses in flight across page boundaries.
    pub(crate) const PREFETCH_BYTES: usize = 2048;

    /// A hint to fetch the line at `p` into L1. Never faults, so `p` may point past the slice
    /// (it is made with `wrapping_add` and never dereferenced).
    #[inline(always)]
    pub(crate) fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it does not read memory architecturally and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

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
                    acc32[t][i] =
                        _mm256_add_epi32(acc32[t][i], _mm256_madd_epi16(acc16[t][i], ones));
                }
            }
        }
        let mut out = [[0i32; 4]; T];
        for t in 0..T {
            let sums = finish(&acc32[t]);
            let tail = crate::ternary::ternary_dot_byte_row(&bytes[n..], &q[t][n..], 0);
            for i in 0..4 {
                out[t][i] = sums[i] + tail[i] - q_sum[t];
            }
        }
        out
    }

    /// `T` tokens against one packed byte row, 64 columns per step: the one-shift code planes
    /// (as in [`planes`]) feed vpdpbusd (u8 code × i8 act, 4-way sums straight into i32), so a
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

    /// The 4 row sums of one byte row from its plane accumulators, plus the scalar tail
    /// (`bytes` and `q` past the vector part) and the `− Σq` of the code trick.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn finish_avx512(acc: &[__m512i; 4], bytes: &[u8], q: &[i8], q_sum: i32) -> [i32; 4] {
        // planes 1 and 3 hold 4·code: every lane sum is a multiple of 4, so >> 2 is exact
        let unscale = _mm_set_epi32(2, 0, 2, 0);
        let tail = crate::ternary::ternary_dot_byte_row(bytes, q, 0);
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

    /// [`super::ternary_dot4_rows2`]: the one-token step of [`ternary_dot4_xn_avx2`] on two byte
    /// rows, sharing the activation load.
    ///
    /// # Safety
    /// AVX2; both rows as long as `q`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn ternary_dot4_rows2_avx2(
        bytes: [&[u8]; 2],
        q: &[i8],
        q_sum: i32,
    ) -> [[i32; 4]; 2] {
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
                    acc32[r][i] =
                        _mm256_add_epi32(acc32[r][i], _mm256_madd_epi16(acc16[r][i], ones));
                }
            }
        }
        let mut out = [[0i32; 4]; 2];
        for r in 0..2 {
            let sums = finish(&acc32[r]);
            let tail = crate::ternary::ternary_dot_byte_row(&bytes[r][n..], &q[n..], 0);
            for i in 0..4 {
                out[r][i] = sums[i] + tail[i] - q_sum;
            }
        }
        out
    }

    /// [`super::ternary_dot4_rows2`]: the one-token step of [`ternary_dot4_xn_avx512vnni`] on
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
        crate::ternary::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
    }

    /// [`quantize_i8_avx2`] with 16 values per step and the saturating `vpmovsdb`.
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
        crate::ternary::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
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
                let r =
                    _mm512_fmadd_ps(av, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(yp));
                _mm512_storeu_ps(yp, r);
            }
            i += 16;
        }
        super::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
    }

    /// [`super::rows_times_runs`] for AVX-512 and 1 to 4 heads: columns in blocks of 64 (4 zmm,
    /// the last block masked), so up to 16 accumulators stay in registers over all of k.
    ///
    /// # Safety
    /// AVX-512F; `heads ≤ 4`; the lengths [`super::rows_times_runs`] checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_times_runs_avx512(
        a: &[f32],
        heads: usize,
        depth: usize,
        b: &[f32],
        b_stride: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: passed on from the caller.
        unsafe {
            match heads {
                1 => heads_block::<1>(a, depth, b, b_stride, cols, out),
                2 => heads_block::<2>(a, depth, b, b_stride, cols, out),
                3 => heads_block::<3>(a, depth, b, b_stride, cols, out),
                _ => heads_block::<4>(a, depth, b, b_stride, cols, out),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn heads_block<const H: usize>(
        a: &[f32],
        depth: usize,
        b: &[f32],
        b_stride: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        let mut c0 = 0;
        while c0 < cols {
            let width = (cols - c0).min(64);
            let mask = |v: usize| -> __mmask16 {
                let lanes = width.saturating_sub(16 * v).min(16);
                ((1u32 << lanes) - 1) as __mmask16
            };
            let masks = [mask(0), mask(1), mask(2), mask(3)];
            let mut acc = [[_mm512_setzero_ps(); 4]; H];
            for (h, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the masked lanes lie in out[h·cols + c0 .. h·cols + c0 + width].
                    *acc = unsafe {
                        _mm512_maskz_loadu_ps(masks[v], out.as_ptr().add(h * cols + c0 + 16 * v))
                    };
                }
            }
            for k in 0..depth {
                let coef: [f32; H] = std::array::from_fn(|h| a[h * depth + k]);
                if coef.iter().all(|&x| x == 0.0) {
                    continue;
                }
                // SAFETY: the masked lanes lie in b[k·b_stride + c0 ..][..width] ⊂ b (checked).
                let row = unsafe { b.as_ptr().add(k * b_stride + c0) };
                let bv: [__m512; 4] = std::array::from_fn(|v| unsafe {
                    _mm512_maskz_loadu_ps(masks[v], row.add(16 * v))
                });
                for h in 0..H {
                    let av = _mm512_set1_ps(coef[h]);
                    for v in 0..4 {
                        acc[h][v] = _mm512_fmadd_ps(av, bv[v], acc[h][v]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe {
                        _mm512_mask_storeu_ps(
                            out.as_mut_ptr().add(h * cols + c0 + 16 * v),
                            masks[v],
                            acc,
                        )
                    };
                }
            }
            c0 += 64;
        }
    }

    /// [`rows_times_runs_avx512`] for AVX2: up to 4 heads × 16 columns (8 of the 16 ymm
    /// registers accumulate), the last block through masked loads and stores.
    ///
    /// # Safety
    /// AVX2 + FMA; `heads ≤ 4`; the lengths [`super::rows_times_runs`] checks.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_times_runs_avx2(
        a: &[f32],
        heads: usize,
        depth: usize,
        b: &[f32],
        b_stride: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: passed on from the caller.
        unsafe {
            match heads {
                1 => heads_block_avx2::<1>(a, depth, b, b_stride, cols, out),
                2 => heads_block_avx2::<2>(a, depth, b, b_stride, cols, out),
                3 => heads_block_avx2::<3>(a, depth, b, b_stride, cols, out),
                _ => heads_block_avx2::<4>(a, depth, b, b_stride, cols, out),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_block_avx2<const H: usize>(
        a: &[f32],
        depth: usize,
        b: &[f32],
        b_stride: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        let mut c0 = 0;
        while c0 < cols {
            let width = (cols - c0).min(16) as i32;
            // lane i of half v is live when 8v + i < width (sign bit set)
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let masks = [
                _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lane),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(width - 8), lane),
            ];
            let mut acc = [[_mm256_setzero_ps(); 2]; H];
            for (h, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the masked lanes lie in out[h·cols + c0 ..][..width].
                    *acc = unsafe {
                        _mm256_maskload_ps(out.as_ptr().add(h * cols + c0 + 8 * v), masks[v])
                    };
                }
            }
            for k in 0..depth {
                let coef: [f32; H] = std::array::from_fn(|h| a[h * depth + k]);
                if coef.iter().all(|&x| x == 0.0) {
                    continue;
                }
                // SAFETY: the masked lanes lie in b[k·b_stride + c0 ..][..width] ⊂ b (checked).
                let row = unsafe { b.as_ptr().add(k * b_stride + c0) };
                let bv: [__m256; 2] = std::array::from_fn(|v| unsafe {
                    _mm256_maskload_ps(row.add(8 * v), masks[v])
                });
                for h in 0..H {
                    let av = _mm256_set1_ps(coef[h]);
                    for v in 0..2 {
                        acc[h][v] = _mm256_fmadd_ps(av, bv[v], acc[h][v]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe {
                        _mm256_maskstore_ps(
                            out.as_mut_ptr().add(h * cols + c0 + 8 * v),
                            masks[v],
                            acc,
                        )
                    };
                }
            }
            c0 += 16;
        }
    }

    /// [`super::absmax_f32`] with 16 lanes (the tail masked in as zeros).
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

    /// [`super::absmax_f32`] with 8 lanes; the tail in scalar.
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
        m.max(crate::ternary::absmax(&x[body..]))
    }

    /// e^d for lanes with d ≥ −87 (the caller zeroes the others): see `super::expf`.
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

    /// [`super::softmax_f32`] with 16 lanes; the tail through masks.
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

    /// [`exp_avx512`] with 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_avx2(d: __m256) -> __m256 {
        use super::expf::*;
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(d, _mm256_set1_ps(LOG2E)),
        );
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

    /// [`super::softmax_f32`] with 8 lanes; the tail in scalar steps of the same formulas.
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
                let r =
                    _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
                _mm256_storeu_ps(yp, r);
            }
            i += 8;
        }
        super::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
    }

    /// bf16 → f32 is a 16-bit left shift; 8 columns per step with FMA-free mul+add so the result
    /// does not depend on FMA availability (AVX2 machines without FMA exist).
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_bf16_avx2(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: passed on.
        unsafe { dot_bf16_avx2_rows::<1>([row], x)[0] }
    }

    /// [`dot_bf16_avx2`] for `R` rows read side by side, each row's operations in the same order
    /// (each result equals the one-row kernel's bit for bit).
    ///
    /// # Safety
    /// AVX2; every row `2 · x.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_bf16_avx2_rows<const R: usize>(rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
        let n = x.len() / 16 * 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut c = 0;
        while c < n {
            // SAFETY: c + 16 ≤ n: 16 floats of x and 32 bytes of every row are in bounds.
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_ps(x.as_ptr().add(c)),
                    _mm256_loadu_ps(x.as_ptr().add(c + 8)),
                )
            };
            for (acc, row) in acc.iter_mut().zip(&rows) {
                prefetch(row.as_ptr().wrapping_add(2 * c + PREFETCH_BYTES));
                let w = unsafe { _mm256_loadu_si256(row.as_ptr().add(2 * c) as *const __m256i) };
                let lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(w));
                let hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1));
                let w0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
                let w1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
                acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(w0, x0));
                acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(w1, x1));
            }
            c += 16;
        }
        std::array::from_fn(|r| {
            let mut lanes = [0f32; 8];
            // SAFETY: lanes has 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[r][0], acc[r][1])) };
            lanes.iter().sum::<f32>() + super::dot_bf16_scalar(&rows[r][2 * n..], &x[n..])
        })
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// 16 floats per step (4 FMAs); the tail in scalar.
    #[target_feature(enable = "neon")]
    pub unsafe fn axpy_f32_neon(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len()) / 16 * 16;
        let av = vdupq_n_f32(a);
        let mut i = 0;
        while i < n {
            for k in 0..4 {
                // SAFETY: i + 4k + 4 ≤ i + 16 ≤ n ≤ the length of both slices.
                unsafe {
                    let yp = y.as_mut_ptr().add(i + 4 * k);
                    let xv = vld1q_f32(x.as_ptr().add(i + 4 * k));
                    vst1q_f32(yp, vfmaq_f32(vld1q_f32(yp), av, xv));
                }
            }
            i += 16;
        }
        super::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
    }

    /// 16 values per step. `fcvtns` rounds half to even and, like the scalar `as` casts, turns
    /// NaN into 0 and saturates ±inf; the two saturating narrows (`sqxtn`) are the clamp to
    /// [−128, 127]. So this equals the scalar twin for every input.
    #[target_feature(enable = "neon")]
    pub unsafe fn quantize_i8_neon(x: &[f32], s: f32, q: &mut [i8]) {
        let n = x.len().min(q.len()) / 16 * 16;
        let sv = vdupq_n_f32(s);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 16 ≤ n ≤ the length of both slices.
            let conv = |k: usize| unsafe {
                vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(
                    vld1q_f32(x.as_ptr().add(i + 4 * k)),
                    sv,
                )))
            };
            let lo = vqmovn_s16(vcombine_s16(conv(0), conv(1)));
            let hi = vqmovn_s16(vcombine_s16(conv(2), conv(3)));
            // SAFETY: as above.
            unsafe { vst1q_s8(q.as_mut_ptr().add(i), vcombine_s8(lo, hi)) };
            i += 16;
        }
        crate::ternary::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
    }

    /// The 4 code planes (`c = w + 1` in {0, 1, 2}) of 16 packed bytes, as i8 lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    fn codes(w: uint8x16_t) -> [int8x16_t; 4] {
        let mask = vdupq_n_u8(3);
        [
            vreinterpretq_s8_u8(vandq_u8(w, mask)),
            vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(w), mask)),
            vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(w), mask)),
            vreinterpretq_s8_u8(vshrq_n_u8::<6>(w)),
        ]
    }

    /// `acc += Σ code·x` over 16 lanes: smull (i8×i8 → i16, |product| ≤ 256) and sadalp (pairs
    /// of i16 added into the i32 lanes). On cores like the Cortex-A7x the multiply and the
    /// pairwise add go to different pipes, so the two halves overlap.
    #[inline]
    #[target_feature(enable = "neon")]
    fn mul_acc(acc: int32x4_t, code: int8x16_t, x: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(code), vget_low_s8(x));
        let hi = vmull_high_s8(code, x);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }

    /// `T` tokens against one packed byte row, 16 columns per step: codes × activations with
    /// smull, pairwise-accumulated into i32 with sadalp. The planes are extracted once for all
    /// `T` tokens; `T = 4` keeps 16 accumulators, 4 planes, the mask and the temporaries in the
    /// 32 vector registers.
    ///
    /// Every `q[t]` must be as long as `bytes` (the dispatchers assert it).
    #[inline]
    #[target_feature(enable = "neon")]
    pub unsafe fn ternary_dot4_xn_neon<const T: usize>(
        bytes: &[u8],
        q: [&[i8]; T],
        q_sum: [i32; T],
    ) -> [[i32; 4]; T] {
        let n = bytes.len() / 16 * 16;
        let mut acc = [[vdupq_n_s32(0); 4]; T];
        let mut c = 0;
        while c < n {
            // SAFETY: c + 16 ≤ n ≤ the length of every slice (the caller's contract).
            let p = codes(unsafe { vld1q_u8(bytes.as_ptr().add(c)) });
            for t in 0..T {
                let x = unsafe { vld1q_s8(q[t].as_ptr().add(c)) };
                for i in 0..4 {
                    acc[t][i] = mul_acc(acc[t][i], p[i], x);
                }
            }
            c += 16;
        }
        finish(bytes, q, q_sum, n, &acc, [0; 4])
    }

    /// Each token's lane sums plus the scalar tail (columns `n..`), minus `Σ q`. Plane `i`'s
    /// sum is shifted right by `shift[i]` (exact: a scaled plane's sum is a multiple of 4).
    #[inline]
    #[target_feature(enable = "neon")]
    fn finish<const T: usize>(
        bytes: &[u8],
        q: [&[i8]; T],
        q_sum: [i32; T],
        n: usize,
        acc: &[[int32x4_t; 4]; T],
        shift: [u32; 4],
    ) -> [[i32; 4]; T] {
        let mut out = [[0i32; 4]; T];
        for t in 0..T {
            let tail = crate::ternary::ternary_dot_byte_row(&bytes[n..], &q[t][n..], 0);
            for i in 0..4 {
                out[t][i] = (vaddvq_s32(acc[t][i]) >> shift[i]) + tail[i] - q_sum[t];
            }
        }
        out
    }

    /// `acc[l] += Σ_{j<4} a[4l+j]·b[4l+j]` (SDOT, the dotprod extension). Its intrinsic
    /// `vdotq_s32` is still unstable in Rust 1.95 (`stdarch_neon_dotprod`), so the instruction is
    /// written with `asm!`; the `dotprod` target feature is what lets the assembler accept it,
    /// and `pure, nomem` leaves the compiler free to schedule it like an intrinsic.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: register-only arithmetic; this function only runs where dotprod exists (its
        // target feature makes every caller check that).
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// The planes for sdot with one shift fewer: `w & 3`, `w & 12` (= 4·code), `(w >> 4) & 3`,
    /// `w >> 6`. The scaled plane's products (≤ 8·128 in magnitude) still fit sdot's int8
    /// operands and i32 lanes; its sum is shifted right by 2 at the end ([`SHIFT_DOT`]).
    #[inline]
    #[target_feature(enable = "neon")]
    fn codes_dot(w: uint8x16_t) -> [int8x16_t; 4] {
        let hi = vshrq_n_u8::<4>(w);
        let (m3, m12) = (vdupq_n_u8(3), vdupq_n_u8(12));
        [
            vreinterpretq_s8_u8(vandq_u8(w, m3)),
            vreinterpretq_s8_u8(vandq_u8(w, m12)),
            vreinterpretq_s8_u8(vandq_u8(hi, m3)),
            vreinterpretq_s8_u8(vshrq_n_u8::<6>(w)),
        ]
    }

    /// Right shifts that undo [`codes_dot`]'s scaling.
    const SHIFT_DOT: [u32; 4] = [0, 2, 0, 0];

    /// [`super::ternary_dot4_rows2`]: the one-token step of [`ternary_dot4_xn_neondot`] on two
    /// byte rows, sharing the activation load.
    ///
    /// Both rows must be as long as `q` (the dispatcher asserts it).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn ternary_dot4_rows2_neondot(
        bytes: [&[u8]; 2],
        q: &[i8],
        q_sum: i32,
    ) -> [[i32; 4]; 2] {
        let n = q.len() / 16 * 16;
        let mut acc = [[vdupq_n_s32(0); 4]; 2];
        let mut c = 0;
        while c < n {
            // SAFETY: c + 16 ≤ n ≤ the length of every slice (the caller's contract).
            let x = unsafe { vld1q_s8(q.as_ptr().add(c)) };
            for (acc, row) in acc.iter_mut().zip(&bytes) {
                let p = codes_dot(unsafe { vld1q_u8(row.as_ptr().add(c)) });
                for i in 0..4 {
                    acc[i] = sdot(acc[i], p[i], x);
                }
            }
            c += 16;
        }
        let one = |r: usize| finish(bytes[r], [q], [q_sum], n, &[acc[r]], SHIFT_DOT)[0];
        [one(0), one(1)]
    }

    /// [`ternary_dot4_xn_neon`] with one sdot per plane and token: products go straight into
    /// i32 lanes, four per lane (|lane step| ≤ 4·8·128, so i32 holds millions of columns), and
    /// the planes cost 2 shifts + 3 ands per 16 columns, shared by the `T` tokens.
    ///
    /// Every `q[t]` must be as long as `bytes` (the dispatchers assert it).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn ternary_dot4_xn_neondot<const T: usize>(
        bytes: &[u8],
        q: [&[i8]; T],
        q_sum: [i32; T],
    ) -> [[i32; 4]; T] {
        let n = bytes.len() / 16 * 16;
        let mut acc = [[vdupq_n_s32(0); 4]; T];
        let mut c = 0;
        while c < n {
            // SAFETY: c + 16 ≤ n ≤ the length of every slice (the caller's contract).
            let p = codes_dot(unsafe { vld1q_u8(bytes.as_ptr().add(c)) });
            for t in 0..T {
                let x = unsafe { vld1q_s8(q[t].as_ptr().add(c)) };
                for i in 0..4 {
                    acc[t][i] = sdot(acc[t][i], p[i], x);
                }
            }
            c += 16;
        }
        finish(bytes, q, q_sum, n, &acc, SHIFT_DOT)
    }

    /// bf16 → f32 is a 16-bit left shift (ushll #16 widens and shifts in one instruction);
    /// 16 columns (32 bytes) per step into four FMA accumulators. The bytes are loaded as u8 and
    /// reinterpreted, which reads the little-endian u16 values on this little-endian target
    /// without assuming the row is 2-byte aligned.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_bf16_neon(row: &[u8], x: &[f32]) -> f32 {
        // bounded by both lengths (the dispatcher only debug-asserts them equal): a length
        // mismatch reads nothing out of bounds and sums like the scalar twin's zip
        let n = x.len().min(row.len() / 2) / 16 * 16;
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut c = 0;
        while c < n {
            for h in 0..2 {
                // SAFETY: c + 16 ≤ n: bytes 2c .. 2c + 32 of row and floats c .. c + 16 of x are
                // in bounds.
                let (w, x0, x1) = unsafe {
                    (
                        vreinterpretq_u16_u8(vld1q_u8(row.as_ptr().add(2 * c + 16 * h))),
                        vld1q_f32(x.as_ptr().add(c + 8 * h)),
                        vld1q_f32(x.as_ptr().add(c + 8 * h + 4)),
                    )
                };
                let w0 = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(w)));
                let w1 = vreinterpretq_f32_u32(vshll_high_n_u16::<16>(w));
                acc[2 * h] = vfmaq_f32(acc[2 * h], w0, x0);
                acc[2 * h + 1] = vfmaq_f32(acc[2 * h + 1], w1, x1);
            }
            c += 16;
        }
        let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        vaddvq_f32(s) + super::dot_bf16_scalar(&row[2 * n..], &x[n..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The levels tested here, checked against `BITNET_REQUIRE_CPU_LEVELS` (comma-separated
    /// names): CI sets it so that a detection bug cannot silently skip a kernel family (the
    /// qemu run requires `neon,neondot`).
    fn tested_levels() -> Vec<CpuLevel> {
        let levels = CpuLevel::available();
        // Straight to the process's stderr, not eprintln!: the harness hides captured output of
        // passing tests, and which levels were (not) tested is the point of this line.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "CPU kernel levels tested here: {} (the others skipped: not on this CPU)",
            levels
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        #[cfg(target_arch = "aarch64")]
        assert!(levels.contains(&CpuLevel::Neon), "NEON is part of aarch64");
        if let Ok(required) = std::env::var("BITNET_REQUIRE_CPU_LEVELS") {
            for name in required.split(',').filter(|n| !n.is_empty()) {
                assert!(
                    levels.iter().any(|l| l.name() == name),
                    "BITNET_REQUIRE_CPU_LEVELS: {name} is not available here ({levels:?})"
                );
            }
        }
        levels
    }

    #[test]
    fn every_available_level_equals_scalar_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let levels = tested_levels();
        for &cols in &[1usize, 15, 31, 32, 33, 64, 100, 1000, 1025, 2560, 6912] {
            let bytes: Vec<u8> = (0..cols)
                .map(|_| (0..4).fold(0u8, |b, i| b | (rng.random_range(0..3u8) << (2 * i))))
                .collect();
            // all weights -1 (codes 0) against extreme activations: the other sign's bound
            let zeros = vec![0u8; cols];
            for q in [vec![-128i8; cols], vec![127i8; cols]] {
                let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
                let want = crate::ternary::ternary_dot_byte_row(&zeros, &q, q_sum);
                assert_eq!(want, [-q_sum; 4]);
                for &l in &levels {
                    assert_eq!(
                        ternary_dot4(l, &zeros, &q, q_sum),
                        want,
                        "{l:?} cols {cols} all -1"
                    );
                    assert_eq!(
                        ternary_dot4_x2(l, &zeros, [&q, &q], [q_sum; 2]),
                        [want, want],
                        "{l:?} cols {cols} all -1, two tokens"
                    );
                    assert_eq!(
                        ternary_dot4_x4(l, &zeros, [&q; 4], [q_sum; 4]),
                        [want; 4],
                        "{l:?} cols {cols} all -1, four tokens"
                    );
                }
            }
            // extremes included: all -128 / 127 stress the i16 partial sums
            for pattern in 0..3 {
                let q: Vec<i8> = (0..cols)
                    .map(|_| match pattern {
                        0 => rng.random(),
                        1 => -128,
                        _ => 127,
                    })
                    .collect();
                let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
                let want = crate::ternary::ternary_dot_byte_row(&bytes, &q, q_sum);
                // the two-token kernel, paired with the activations reversed
                let r: Vec<i8> = q.iter().rev().copied().collect();
                let want_r = crate::ternary::ternary_dot_byte_row(&bytes, &r, q_sum);
                // the four-token kernel: tokens q, r, q negated (−128 → 127 saturates: its own
                // sum), and r rotated by one column
                let neg: Vec<i8> = q.iter().map(|&v| v.saturating_neg()).collect();
                let rot: Vec<i8> = r.iter().cycle().skip(1).take(cols).copied().collect();
                let sum = |v: &[i8]| v.iter().map(|&e| e as i32).sum::<i32>();
                let (neg_sum, rot_sum) = (sum(&neg), sum(&rot));
                let want4 = [
                    want,
                    want_r,
                    crate::ternary::ternary_dot_byte_row(&bytes, &neg, neg_sum),
                    crate::ternary::ternary_dot_byte_row(&bytes, &rot, rot_sum),
                ];
                for &l in &levels {
                    assert_eq!(
                        ternary_dot4_x4(
                            l,
                            &bytes,
                            [&q, &r, &neg, &rot],
                            [q_sum, q_sum, neg_sum, rot_sum]
                        ),
                        want4,
                        "{l:?} cols {cols} pattern {pattern}, four tokens"
                    );
                    assert_eq!(
                        ternary_dot4(l, &bytes, &q, q_sum),
                        want,
                        "{l:?} cols {cols} pattern {pattern}"
                    );
                    assert_eq!(
                        ternary_dot4_x2(l, &bytes, [&q, &r], [q_sum, q_sum]),
                        [want, want_r],
                        "{l:?} cols {cols} pattern {pattern}, two tokens"
                    );
                    // two byte rows, one token: this row and the all-(-1) row
                    assert_eq!(
                        ternary_dot4_rows2(l, [&bytes, &zeros], &q, q_sum),
                        [want, [-q_sum; 4]],
                        "{l:?} cols {cols} pattern {pattern}, two rows"
                    );
                }
            }
            // all codes 2 (+1) with q = -128 is the largest i16 partial sum: 2·2·128 per pair
            let twos = vec![0xAAu8; cols];
            let q = vec![-128i8; cols];
            let want = crate::ternary::ternary_dot_byte_row(&twos, &q, -128 * cols as i32);
            for &l in &levels {
                assert_eq!(
                    ternary_dot4(l, &twos, &q, -128 * cols as i32),
                    want,
                    "{l:?} cols {cols} all +1"
                );
                assert_eq!(
                    ternary_dot4_x2(l, &twos, [&q, &q], [-128 * cols as i32; 2]),
                    [want, want],
                    "{l:?} cols {cols} all +1, two tokens"
                );
                assert_eq!(
                    ternary_dot4_x4(l, &twos, [&q; 4], [-128 * cols as i32; 4]),
                    [want; 4],
                    "{l:?} cols {cols} all +1, four tokens"
                );
            }
        }
    }

    #[test]
    fn forced_level_is_used_and_unknown_falls_back_to_best() {
        let levels = tested_levels();
        for &l in &levels {
            assert_eq!(CpuLevel::pick(Some(l.name())), l);
        }
        let best = *levels.last().unwrap();
        assert_eq!(CpuLevel::pick(None), best);
        assert_eq!(CpuLevel::pick(Some("no-such-level")), best);
    }

    #[test]
    fn f32_axpy_matches_scalar_within_tolerance() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for len in [0usize, 1, 7, 8, 9, 128, 131] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-3f32..3.0)).collect();
            let y0: Vec<f32> = (0..len).map(|_| rng.random_range(-3f32..3.0)).collect();
            let a = rng.random_range(-2f32..2.0);
            let mut want = y0.clone();
            axpy_f32_scalar(a, &x, &mut want);
            for level in CpuLevel::available() {
                let mut got = y0.clone();
                axpy_f32(level, a, &x, &mut got);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 + 1e-6 * w.abs(),
                        "{} len {len} index {i}: got {g}, expected {w}",
                        level.name()
                    );
                }
            }
        }
    }

    #[test]
    fn rows_times_runs_matches_scalar_within_tolerance() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        // heads: each register block size and more than one block; cols: below, at and past
        // the 64-column block, odd; a zero coefficient column is skipped
        for &(heads, depth, cols) in &[
            (1usize, 1usize, 1usize),
            (3, 7, 17),
            (4, 128, 64),
            (5, 33, 130),
            (8, 3, 200),
        ] {
            let b_stride = cols + 5;
            let mut a: Vec<f32> = (0..heads * depth)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            for h in 0..heads {
                a[h * depth] = 0.0;
            }
            let b: Vec<f32> = (0..(depth - 1) * b_stride + cols)
                .map(|_| rng.random_range(-2f32..2.0))
                .collect();
            let out0: Vec<f32> = (0..heads * cols)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let mut want = out0.clone();
            rows_times_runs_with(
                CpuLevel::Scalar,
                &a,
                heads,
                depth,
                &b,
                b_stride,
                cols,
                &mut want,
            );
            for level in CpuLevel::available() {
                let mut got = out0.clone();
                rows_times_runs(level, &a, heads, depth, &b, b_stride, cols, &mut got);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                        "{} [{heads}x{depth}]·[{depth}x{cols}] index {i}: got {g}, expected {w}",
                        level.name()
                    );
                }
            }
        }
    }

    #[test]
    fn absmax_equals_scalar_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        for len in [0usize, 1, 7, 8, 9, 16, 17, 100, 2560] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-4f32..4.0)).collect();
            for special in [None, Some(f32::NAN), Some(-f32::INFINITY), Some(-9.5)] {
                if let (Some(v), true) = (special, len > 0) {
                    let i = rng.random_range(0..len);
                    x[i] = v;
                }
                let want = crate::ternary::absmax(&x);
                for level in CpuLevel::available() {
                    let got = absmax_f32(level, &x);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{} len {len} {special:?}: got {got}, expected {want}",
                        level.name()
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_matches_scalar_within_tolerance() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
        for len in [1usize, 7, 16, 17, 100, 513] {
            for spread in [1f32, 30.0, 200.0] {
                // spread 200: many terms below e^-87, which must be exactly 0 at every level
                let x: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(-spread..spread))
                    .collect();
                let mut want = x.clone();
                crate::backend::cpu::softmax_in_place(&mut want);
                for level in CpuLevel::available() {
                    let mut got = x.clone();
                    softmax_f32(level, &mut got);
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-7 + 1e-5 * w.abs() && (w == 0.0) == (g == 0.0),
                            "{} len {len} spread {spread} index {i}: got {g}, expected {w}",
                            level.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_equals_scalar_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 2560] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-4f32..4.0)).collect();
            // ties (k + 0.5 after scaling by 1), saturation, NaN, infinities, signed zero
            for (i, v) in [
                2.5f32,
                -3.5,
                0.5,
                200.0,
                -300.0,
                f32::NAN,
                f32::INFINITY,
                -0.0,
            ]
            .into_iter()
            .enumerate()
            {
                if i * 3 < len {
                    x[i * 3] = v;
                }
            }
            for s in [1.0f32, 127.0 / 4.0, 0.0] {
                let mut want = vec![0i8; len];
                crate::ternary::quantize_row_with_scale(&x, s, &mut want);
                for level in CpuLevel::available() {
                    let mut got = vec![0i8; len];
                    quantize_i8(level, &x, s, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g,
                            w,
                            "{} len {len} s {s} index {i}: x {}",
                            level.name(),
                            x[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_dot_matches_scalar_within_tolerance() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for &n in &[1usize, 7, 16, 17, 255, 2560] {
            let row: Vec<u8> = (0..n)
                .flat_map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = dot_bf16_scalar(&row, &x);
            let mag: f32 = x.iter().map(|v| v.abs()).sum();
            for &l in &CpuLevel::available() {
                let got = dot_bf16(l, &row, &x);
                assert!(
                    (got - want).abs() <= 1e-6 + 1e-6 * mag,
                    "{l:?} n {n}: got {got}, expected {want}"
                );
                // two rows at once: the one-row results, bit for bit
                let rev: Vec<u8> = row.chunks(2).rev().flatten().copied().collect();
                let two = dot_bf16_rows2(l, [&row, &rev], &x);
                assert_eq!(two[0].to_bits(), got.to_bits(), "{l:?} n {n}: rows2 first");
                let one = dot_bf16(l, &rev, &x);
                assert_eq!(two[1].to_bits(), one.to_bits(), "{l:?} n {n}: rows2 second");
            }
        }
    }
}
