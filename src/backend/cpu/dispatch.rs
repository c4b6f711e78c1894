//! The CPU kernel levels (run-time feature detection) and the safe entry points of the kernels:
//! each checks the slice lengths, then calls the `x86/` or `arm/` kernel of the level, or its
//! scalar twin in `reference.rs`. The tests (`dispatch/tests.rs`) compare every level with the
//! scalar twin, exactly on the integer paths.
//!
//! The ternary dot works on one packed byte row (4 output rows, see `ternary.rs`): with codes
//! `c = w + 1` in {0, 1, 2}, `Σ q·w = Σ q·c − Σ q`, so the inner loop multiplies *unsigned* codes
//! by *signed* int8 activations — exactly what x86's `pmaddubsw` / `vpdpbusd` take.

use std::sync::OnceLock;

#[cfg(target_arch = "aarch64")]
use super::arm::neon;
use super::reference;
#[cfg(target_arch = "x86_64")]
use super::x86::{avx2, avx512, avxvnni};

/// Which kernel family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    Scalar,
    /// x86-64 AVX2 + FMA (pmaddubsw + pmaddwd; FMA for the float kernels).
    Avx2,
    /// x86-64 AVX2 + FMA + AVX-VNNI (vpdpbusd on 256-bit vectors, for the ternary dots; the
    /// other ops run the AVX2 kernels). Intel client cores from Alder Lake, AMD Zen 4+.
    AvxVnni,
    /// x86-64 AVX-512 BW + VNNI (vpdpbusd on 512-bit vectors).
    Avx512Vnni,
    /// [`CpuLevel::Avx512Vnni`] plus Intel AMX tiles for the prefill matmuls (`tdpbusd`: a
    /// 16×16 int8 matrix product per instruction; Linux only, see `x86/amx.rs`).
    Amx,
    /// aarch64 NEON (smull + sadalp).
    Neon,
    /// aarch64 NEON + the dotprod extension (sdot: four int8 products summed into each i32 lane).
    NeonDot,
}

/// Every `BITNET_CPU_KERNEL` value, on any architecture.
const ALL_LEVEL_NAMES: [&str; 7] = [
    "scalar",
    "avx2",
    "avxvnni",
    "avx512vnni",
    "amx",
    "neon",
    "neondot",
];

impl CpuLevel {
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::AvxVnni => "avxvnni",
            CpuLevel::Avx512Vnni => "avx512vnni",
            CpuLevel::Amx => "amx",
            CpuLevel::Neon => "neon",
            CpuLevel::NeonDot => "neondot",
        }
    }

    /// How many rows of `a` [`rows_times_runs`]' kernel keeps in registers at once: 8 on the
    /// AVX-512 levels (32 columns), 4 on AVX2 (16 columns: 8 rows × 8 columns ran slower
    /// there), 1 on the others, whose per-(head, k) path takes one row at a time. Attention
    /// pairs two rows' heads only where they fit in one block: on the per-(head, k) path a
    /// longer run could also move an element between NEON's vector body and its scalar tail,
    /// which round differently.
    pub fn rows_times_runs_block(self) -> usize {
        match self {
            CpuLevel::Avx512Vnni | CpuLevel::Amx => 8,
            CpuLevel::Avx2 | CpuLevel::AvxVnni => 4,
            _ => 1,
        }
    }

    /// Every level this machine can run, lowest first.
    pub fn available() -> Vec<CpuLevel> {
        let mut v = vec![CpuLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(CpuLevel::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    v.push(CpuLevel::AvxVnni);
                }
            }
            if is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(CpuLevel::Avx512Vnni);
                #[cfg(target_os = "linux")]
                if super::x86::amx::available() {
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

    /// The best level, or the one `BITNET_CPU_KERNEL=scalar|avx2|avxvnni|avx512vnni|amx|neon|neondot` forces
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
/// the prefetchers serve faster than one (BENCHMARKS.md, issue 6).
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
            avx512::ternary_dot4_rows2_avx512vnni(bytes, q, q_sum)
        },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { avx2::ternary_dot4_rows2_avx2(bytes, q, q_sum) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::AvxVnni => unsafe { avxvnni::ternary_dot4_rows2_avxvnni(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { neon::ternary_dot4_rows2_neondot(bytes, q, q_sum) },
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
        CpuLevel::Avx2 => unsafe { avx2::ternary_dot4_xn_avx2::<1>(bytes, [q], [q_sum])[0] },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::AvxVnni => unsafe {
            avxvnni::ternary_dot4_xn_avxvnni::<1>(bytes, [q], [q_sum])[0]
        },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            avx512::ternary_dot4_xn_avx512vnni::<1>(bytes, [q], [q_sum])[0]
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { neon::ternary_dot4_xn_neon::<1>(bytes, [q], [q_sum])[0] },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { neon::ternary_dot4_xn_neondot::<1>(bytes, [q], [q_sum])[0] },
        _ => reference::ternary_dot_byte_row(bytes, q, q_sum),
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
        CpuLevel::Avx2 => unsafe { avx2::ternary_dot4_xn_avx2::<2>(bytes, q, q_sum) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::AvxVnni => unsafe { avxvnni::ternary_dot4_xn_avxvnni::<2>(bytes, q, q_sum) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            avx512::ternary_dot4_xn_avx512vnni::<2>(bytes, q, q_sum)
        },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { neon::ternary_dot4_xn_neon::<2>(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { neon::ternary_dot4_xn_neondot::<2>(bytes, q, q_sum) },
        _ => [
            ternary_dot4(level, bytes, q[0], q_sum[0]),
            ternary_dot4(level, bytes, q[1], q_sum[1]),
        ],
    }
}

/// Four tokens against one packed byte row (prefill): AVX-512 and NEON (32 vector registers)
/// reuse the planes 4 times; AVX2 in two passes of two planes (its 16 registers hold 4 tokens'
/// sums of two planes; 1.04–1.08× two two-token calls, BENCHMARKS.md); AVX-VNNI and scalar
/// run it as two calls of the two-token kernel.
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
            avx512::ternary_dot4_xn_avx512vnni::<4>(bytes, q, q_sum)
        },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { avx2::ternary_dot4_x4_avx2_halves(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => unsafe { neon::ternary_dot4_xn_neon::<4>(bytes, q, q_sum) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::NeonDot => unsafe { neon::ternary_dot4_xn_neondot::<4>(bytes, q, q_sum) },
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
    dot_bf16_tokens(level, [row], [x])[0][0]
}

/// [`dot_bf16`] of two rows read side by side (the same results): two memory streams keep more
/// of a core's memory bandwidth busy than one.
#[inline]
pub fn dot_bf16_rows2(level: CpuLevel, rows: [&[u8]; 2], x: &[f32]) -> [f32; 2] {
    dot_bf16_tokens(level, rows, [x])[0]
}

/// [`dot_bf16`] of `R` rows with each of `T` activation rows, `[T][R]`, each row's halves
/// widened once for all of them (a batched decode step's exact head). Each result is
/// [`dot_bf16`]'s bit for bit.
#[inline]
pub fn dot_bf16_tokens<const R: usize, const T: usize>(
    level: CpuLevel,
    rows: [&[u8]; R],
    xs: [&[f32]; T],
) -> [[f32; R]; T] {
    assert!(
        xs.iter()
            .all(|x| rows.iter().all(|r| r.len() == 2 * x.len())),
        "dot_bf16_tokens: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned; lengths checked above.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            avx512::dot_bf16_avx512_rows::<R, T>(rows, xs)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::dot_bf16_avx2_rows::<R, T>(rows, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the NEON levels have NEON; lengths checked above.
        CpuLevel::Neon | CpuLevel::NeonDot => {
            xs.map(|x| rows.map(|r| unsafe { neon::dot_bf16_neon(r, x) }))
        }
        _ => xs.map(|x| rows.map(|r| reference::dot_bf16_scalar(r, x))),
    }
}

/// [`dot_f16`] of `R` rows with each of `T` activation rows, `[T][R]` (as
/// [`dot_bf16_tokens`]); each result is [`dot_f16`]'s bit for bit.
#[inline]
pub fn dot_f16_tokens<const R: usize, const T: usize>(
    level: CpuLevel,
    rows: [&[u8]; R],
    xs: [&[f32]; T],
) -> [[f32; R]; T] {
    assert!(
        xs.iter()
            .all(|x| rows.iter().all(|r| r.len() == 2 * x.len())),
        "dot_f16_tokens: row and activation lengths differ"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level has AVX-512 F (one `available()` returned; vcvtph2ps is AVX-512 F);
        // lengths checked above.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
            avx512::dot_f16_avx512_rows::<R, T>(rows, xs)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level has AVX2, F16C checked; lengths checked above.
        CpuLevel::Avx2 | CpuLevel::AvxVnni if has_f16c() => unsafe {
            avx2::dot_f16_avx2_rows::<R, T>(rows, xs)
        },
        _ => xs.map(|x| rows.map(|r| reference::dot_f16_scalar(r, x))),
    }
}

/// Whether this machine's x86 levels may run the F16C kernels (every AVX2 CPU in use has
/// F16C, but the levels do not require it).
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static F16C: OnceLock<bool> = OnceLock::new();
    *F16C.get_or_init(|| is_x86_feature_detected!("f16c"))
}

/// `Σ row[c] · x[c]` for an f16 row (little-endian bytes) and f32 `x`: the LM head of a file
/// whose head is f16.
#[inline]
pub fn dot_f16(level: CpuLevel, row: &[u8], x: &[f32]) -> f32 {
    dot_f16_tokens(level, [row], [x])[0][0]
}

/// [`dot_f16`] of `R` rows read side by side (the same results as one at a time).
#[inline]
pub fn dot_f16_rows<const R: usize>(level: CpuLevel, rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
    dot_f16_tokens(level, rows, [x])[0]
}

/// `Σ row[c] · x[c]` for a GGUF Q8_0 row (34 bytes per 32 columns, values `d · q`) and f32
/// `x`: the exact LM head of a file whose tied embedding is Q8_0.
#[inline]
pub fn dot_q8_0(level: CpuLevel, row: &[u8], x: &[f32]) -> f32 {
    assert!(
        x.len().is_multiple_of(32) && row.len() == x.len() / 32 * 34,
        "dot_q8_0: {} bytes for {} columns",
        row.len(),
        x.len()
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level has AVX2 + FMA (one `available()` returned), F16C checked;
        // lengths checked above.
        CpuLevel::Avx2 | CpuLevel::AvxVnni | CpuLevel::Avx512Vnni | CpuLevel::Amx if has_f16c() => unsafe {
            avx2::dot_q8_0_avx2(row, x)
        },
        _ => reference::dot_q8_0_scalar(row, x),
    }
}

/// `y += a·x` in f32 (attention's weighted sum of values).
#[inline]
pub fn axpy_f32(level: CpuLevel, a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f32: lengths differ");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned (AVX2 implies FMA there).
        CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::axpy_f32_avx2(a, x, y) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { avx512::axpy_f32_avx512(a, x, y) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon | CpuLevel::NeonDot => unsafe { neon::axpy_f32_neon(a, x, y) },
        _ => reference::axpy_f32_scalar(a, x, y),
    }
}

/// `out[h] += Σ_k a[h][k] · b[k]` for `heads` rows `a[h]` (`a`: `[heads, depth]`), where `b[k]` is
/// the run `b[k·b_stride .. k·b_stride + cols]` and `out` is `[heads, cols]`. Attention's two
/// products for the query heads that share one kv head: scores (`a` = the scaled queries,
/// `b[k]` = component k of every key) and the weighted sum of values (`a` = the probabilities,
/// `b[k]` = value k).
///
/// Per output element the sum runs over k in order, one multiply-add each, as a sequence of
/// [`axpy_f32`] calls would; the SIMD kernels keep a block of rows in registers (AVX-512 up to
/// 4 rows × 64 columns or 8 × 32, AVX2 4 × 16: [`CpuLevel::rows_times_runs_block`]), so each
/// `b` run is loaded once for all rows of the block instead of once per row, and the outputs
/// stay in registers across k. The SIMD kernels multiply-add every coefficient,
/// zeros included (testing each k for an all-zero column cost them more than it saved,
/// BENCHMARKS.md); the per-(head, k) path skips zero coefficients, a test that is cheap beside
/// its `axpy` call. With finite `b` both give the same sums: a zero adds exactly zero.
/// [`rows_times_runs`]' arguments as the SIMD kernels pass them on: `a [rows, depth]`, `depth`,
/// `b` (runs every `b_stride`), `b_stride`, `cols`, `out [rows, cols]`.
#[cfg(target_arch = "x86_64")]
pub(crate) type RunsArgs<'a, T> = (&'a [f32], usize, &'a [T], usize, usize, &'a mut [f32]);

#[allow(clippy::too_many_arguments)]
pub fn rows_times_runs<T: KvElem>(
    level: CpuLevel,
    a: &[f32],
    heads: usize,
    depth: usize,
    b: &[T],
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
    // the SIMD kernels keep a few rows in registers: rows go to them in groups of that many
    let most = level.rows_times_runs_block();
    for h0 in (0..heads).step_by(most) {
        let hn = (heads - h0).min(most);
        let (a, out) = (&a[h0 * depth..], &mut out[h0 * cols..]);
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is only ever one `available()` returned; lengths checked above.
            CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe {
                avx512::rows_times_runs_avx512(a, hn, depth, b, b_stride, cols, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (AVX2 implies FMA there); F16C checked (the half-float loads).
            CpuLevel::Avx2 | CpuLevel::AvxVnni if has_f16c() => unsafe {
                avx2::rows_times_runs_avx2(a, hn, depth, b, b_stride, cols, out)
            },
            _ => rows_times_runs_with(level, a, hn, depth, b, b_stride, cols, out),
        }
    }
}

/// [`rows_times_runs`] as one [`axpy_f32`] per (head, k) (a half-float run converted to f32
/// 64 at a time on the stack: a multiple of every vector width, so each element takes the same
/// vector or scalar path as in one call over the whole run); with `CpuLevel::Scalar` its
/// scalar twin.
#[allow(clippy::too_many_arguments)]
fn rows_times_runs_with<T: KvElem>(
    level: CpuLevel,
    a: &[f32],
    heads: usize,
    depth: usize,
    b: &[T],
    b_stride: usize,
    cols: usize,
    out: &mut [f32],
) {
    for (h, o) in out.chunks_exact_mut(cols).take(heads).enumerate() {
        for (k, &ak) in a[h * depth..(h + 1) * depth].iter().enumerate() {
            if ak == 0.0 {
                continue;
            }
            let run = &b[k * b_stride..k * b_stride + cols];
            if let Some(run) = T::as_f32(run) {
                axpy_f32(level, ak, run, o);
                continue;
            }
            let mut chunk = [0f32; 64];
            for (src, dst) in run.chunks(64).zip(o.chunks_mut(64)) {
                for (c, &x) in chunk.iter_mut().zip(src) {
                    *c = x.to_f32();
                }
                axpy_f32(level, ak, &chunk[..src.len()], dst);
            }
        }
    }
}

/// An element of the CPU's KV cache: f32 (the exact semantics, the default) or IEEE half
/// (`--kv-cache f16`: half the memory and the bytes attention reads; every half converts to
/// f32 exactly, so the attention kernels compute in f32 on the stored values either way).
pub trait KvElem: bytemuck::Pod + Default + Send + Sync + 'static {
    /// Whether the element is an IEEE half (the SIMD kernels' loads convert it).
    const HALF: bool;
    /// The stored element for `x`: `x` itself, or the nearest half clamped to ±65504 (as the
    /// GPU's f16 store: a key past the half range stays finite).
    fn store(x: f32) -> Self;
    /// The element's value (exact).
    fn to_f32(self) -> f32;
    /// The run itself when it is f32.
    fn as_f32(run: &[Self]) -> Option<&[f32]>;
}

impl KvElem for f32 {
    const HALF: bool = false;
    fn store(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(run: &[f32]) -> Option<&[f32]> {
        Some(run)
    }
}

impl KvElem for half::f16 {
    const HALF: bool = true;
    fn store(x: f32) -> half::f16 {
        half::f16::from_f32(x.clamp(-65504.0, 65504.0))
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn as_f32(_run: &[half::f16]) -> Option<&[f32]> {
        None
    }
}

/// `max |x|` with NaN ignored: exactly [`reference::absmax`], its scalar twin (max is exact
/// and the vector `max` returns its second operand, the running maximum, when a lane is NaN).
pub fn absmax_f32(level: CpuLevel, x: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned.
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { avx512::absmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::absmax_avx2(x) },
        _ => reference::absmax(x),
    }
}

/// [`reference::softmax_in_place`] (its scalar twin) with vectors: the same rule for
/// terms below e^−87 (exactly 0), the exponential from a degree-6 polynomial after range
/// reduction (within ~2 ulp of libm's `expf`), the sum accumulated per lane.
pub fn softmax_f32(level: CpuLevel, x: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned (AVX2 implies FMA there).
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { avx512::softmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::softmax_avx2(x) },
        _ => reference::softmax_in_place(x),
    }
}

/// `q = clamp(round_half_even(x·s), −128, 127)`: the int8 values of per-token activation
/// quantization, exactly [`reference::quantize_row_with_scale`] (its scalar twin), NaN → 0
/// included.
#[inline]
pub fn quantize_i8(level: CpuLevel, x: &[f32], s: f32, q: &mut [i8]) {
    assert_eq!(x.len(), q.len(), "quantize_i8: lengths differ");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever one `available()` returned for this machine.
        CpuLevel::Avx2 | CpuLevel::AvxVnni => unsafe { avx2::quantize_i8_avx2(x, s, q) },
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni | CpuLevel::Amx => unsafe { avx512::quantize_i8_avx512(x, s, q) },
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon | CpuLevel::NeonDot => unsafe { neon::quantize_i8_neon(x, s, q) },
        _ => reference::quantize_row_with_scale(x, s, q),
    }
}

#[cfg(test)]
mod tests;
