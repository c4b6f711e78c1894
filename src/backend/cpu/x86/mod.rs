//! x86-64 kernels: `avx2.rs` and `avx512.rs` side by side (one function per op and width),
//! `avxvnni.rs` for the ternary dots of the AVX-VNNI level (256-bit vpdpbusd), `avx512_lut.rs`
//! for the AVX-512 level's table-lookup ternary matmul,
//! `amx.rs` for the prefill matmul's tiles; the prefetch hint and the `exp` constants they share.

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
