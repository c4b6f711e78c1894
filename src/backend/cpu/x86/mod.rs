//! x86-64 kernels: `avx2.rs` and `avx512.rs` side by side (one function per op and width),
//! `avxvnni.rs` for the ternary dots of the AVX-VNNI level (256-bit vpdpbusd), `avx512_lut.rs`
//! for the AVX-512 level's table-lookup ternary matmul,
//! `amx.rs` for the prefill matmul's tiles; the prefetch hint and the `exp` constants they share.

/// The dots of `R` rows of 16-bit floats with `T` f32 activation rows, `[T][R]`, rows read side
/// by side; the skeleton of `avx2.rs`' and `avx512.rs`' kernels, which give the vector width and
/// operations. Per step, `2 · lanes` halves of each row are loaded (`load`) and widened to two
/// f32 vectors (`widen`, the one thing the formats differ in) once for all `T` activation rows,
/// then `mul_add` into two accumulators per (row, activation row); `lane_sum` reduces the pair,
/// and the tail goes through the scalar twin `$tail`. Each (row, activation row)'s operations
/// run in the same order whatever `R` and `T`, so each result is the one-row, one-token call's
/// bit for bit (a batch of decode rows does not change a row's logits).
macro_rules! dot_half_rows {
    ($(#[$doc:meta])* $name:ident, $features:literal, $tail:path, lanes: $lanes:literal,
     zero: $zero:expr,
     load: |$p:ident| $load:expr,
     widen: |$w:ident| ($lo:expr, $hi:expr),
     load_x: |$px:ident| $load_x:expr,
     mul_add: |$acc:ident, $a:ident, $b:ident| $mul_add:expr,
     lane_sum: |$v0:ident, $v1:ident| $lane_sum:expr $(,)?) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        #[allow(clippy::needless_range_loop)] // r and t index rows, activations and sums alike
        pub unsafe fn $name<const R: usize, const T: usize>(
            rows: [&[u8]; R],
            x: [&[f32]; T],
        ) -> [[f32; R]; T] {
            let cols = x[0].len();
            for t in 0..T {
                assert_eq!(x[t].len(), cols);
            }
            for r in 0..R {
                assert!(rows[r].len() >= 2 * cols);
            }
            let step = 2 * $lanes;
            let n = cols / step * step;
            let mut acc = [[[$zero; 2]; R]; T];
            let mut c = 0;
            while c < n {
                // plain loops, not `array::from_fn`: its closures would not inherit the
                // target features, and were not inlined (1.2–1.6× slower, measured)
                let mut w = [($zero, $zero); R];
                for r in 0..R {
                    let row = rows[r];
                    prefetch(row.as_ptr().wrapping_add(2 * c + PREFETCH_BYTES));
                    // SAFETY: c + step ≤ n: 2 · step bytes of every row are in bounds
                    // (2 · cols each).
                    let $w = unsafe {
                        let $p = row.as_ptr().add(2 * c);
                        $load
                    };
                    w[r] = ($lo, $hi);
                }
                for t in 0..T {
                    // SAFETY: c + step ≤ n: step floats of every x are in bounds.
                    let (x0, x1) = unsafe {
                        let $px = x[t].as_ptr().add(c);
                        let x0 = $load_x;
                        let $px = $px.add($lanes);
                        (x0, $load_x)
                    };
                    for r in 0..R {
                        let sums = &mut acc[t][r];
                        let ($acc, $a, $b) = (sums[0], w[r].0, x0);
                        sums[0] = $mul_add;
                        let ($acc, $a, $b) = (sums[1], w[r].1, x1);
                        sums[1] = $mul_add;
                    }
                }
                c += step;
            }
            let mut out = [[0f32; R]; T];
            for t in 0..T {
                for r in 0..R {
                    let ($v0, $v1) = (acc[t][r][0], acc[t][r][1]);
                    out[t][r] = $lane_sum + $tail(&rows[r][2 * n..], &x[t][n..]);
                }
            }
            out
        }
    };
}

#[cfg(target_os = "linux")]
pub mod amx;
pub mod avx2;
pub mod avx512;
pub mod avx512_lut;
pub mod avxvnni;

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

/// Constants of the vector `exp` (Cody–Waite range reduction `d = n·ln2 + r`, `|r| ≤ ln2/2`,
/// then the Taylor polynomial of e^r to degree 6: the first omitted term is below 1.2e−7·e^r).
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
