//! The aarch64 NEON kernels (and NEON + dotprod's `sdot`). Each is `unsafe` for its target
//! features only: the safe wrappers of `dispatch.rs` call it for a level
//! `CpuLevel::available()` returned, after checking the slice lengths.

use std::arch::aarch64::*;
use std::arch::asm;

use crate::backend::cpu::q4::{bf16_to_f32, Q4_BLOCK, Q4_BLOCK_BYTES};
use crate::backend::cpu::q8::Q8_BLOCK;
use crate::backend::cpu::reference;

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
    reference::axpy_f32_scalar(a, &x[n..], &mut y[n..]);
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
    reference::quantize_row_with_scale(&x[n..], s, &mut q[n..]);
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
        let tail = reference::ternary_dot_byte_row(&bytes[n..], &q[t][n..], 0);
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

/// `dispatch::ternary_dot4_rows2`: the one-token step of [`ternary_dot4_xn_neondot`] on two
/// byte rows, sharing the activation load.
///
/// Both rows must be as long as `q` (the dispatcher asserts it).
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn ternary_dot4_rows2_neondot(bytes: [&[u8]; 2], q: &[i8], q_sum: i32) -> [[i32; 4]; 2] {
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
    vaddvq_f32(s) + reference::dot_bf16_scalar(&row[2 * n..], &x[n..])
}

/// One full block's exact integer sum: 16 weights per step, sign-extended int8 → int16
/// (sxtl), multiplied by the int16 activations into i32 lanes (smlal / smlal2: |lane| ≤
/// 8·128·32768 < 2³¹).
#[inline]
#[target_feature(enable = "neon")]
fn block_dot(q: &[i8; Q8_BLOCK], x: &[i16; Q8_BLOCK]) -> i32 {
    let mut acc = [vdupq_n_s32(0); 2];
    for c in (0..Q8_BLOCK).step_by(16) {
        // SAFETY: c + 16 ≤ Q8_BLOCK, the length of both arrays.
        let (w, x0, x1) = unsafe {
            (
                vld1q_s8(q.as_ptr().add(c)),
                vld1q_s16(x.as_ptr().add(c)),
                vld1q_s16(x.as_ptr().add(c + 8)),
            )
        };
        let (w0, w1) = (vmovl_s8(vget_low_s8(w)), vmovl_high_s8(w));
        acc[0] = vmlal_s16(acc[0], vget_low_s16(w0), vget_low_s16(x0));
        acc[1] = vmlal_high_s16(acc[1], w0, x0);
        acc[0] = vmlal_s16(acc[0], vget_low_s16(w1), vget_low_s16(x1));
        acc[1] = vmlal_high_s16(acc[1], w1, x1);
    }
    vaddvq_s32(vaddq_s32(acc[0], acc[1]))
}

/// Each block's integer sum is reduced to one i32 (the same integer the scalar twin gets)
/// and scaled and added in the scalar twin's order, so the result equals
/// [`reference::dot_q8_scalar`] exactly; the serial f32 add costs one latency per 64 columns,
/// which the independent block sums hide. A short last block goes through scalar code.
#[target_feature(enable = "neon")]
pub unsafe fn dot_q8_neon(q: &[i8], scales: &[f32], x: &[i16]) -> f32 {
    let mut total = 0f32;
    for ((qb, xb), &s) in q.chunks(Q8_BLOCK).zip(x.chunks(Q8_BLOCK)).zip(scales) {
        let sum = match (qb.try_into(), xb.try_into()) {
            (Ok(qb), Ok(xb)) => block_dot(qb, xb),
            _ => qb.iter().zip(xb).map(|(&a, &b)| a as i32 * b as i32).sum(),
        };
        total += s * sum as f32;
    }
    total
}

/// One q4 block's exact integer sum (`q4.rs` has the layout): the low nibbles of the 32 code
/// bytes are columns 0..31, the high nibbles 32..63; minus 8 they are the signed weights, multiplied
/// by the int8 activations into i16 (smull: |w·x| ≤ 8·128) and pairwise added into i32 lanes
/// (sadalp).
#[inline]
#[target_feature(enable = "neon")]
fn q4_block_dot(codes: &[u8; Q4_BLOCK_BYTES], x: &[i8; Q4_BLOCK]) -> i32 {
    let (m15, eight) = (vdupq_n_u8(15), vdupq_n_s8(8));
    let mut acc = vdupq_n_s32(0);
    for half in 0..2 {
        // SAFETY: 16·half + 16 ≤ 32 code bytes; the activations at 16·half + 32·j + 16 ≤ 64.
        let (v, xl, xh) = unsafe {
            (
                vld1q_u8(codes.as_ptr().add(16 * half)),
                vld1q_s8(x.as_ptr().add(16 * half)),
                vld1q_s8(x.as_ptr().add(16 * half + 32)),
            )
        };
        let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, m15)), eight); // columns 16h..16h+15
        let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight); // columns 32+16h..
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(lo), vget_low_s8(xl)));
        acc = vpadalq_s16(acc, vmull_high_s8(lo, xl));
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(hi), vget_low_s8(xh)));
        acc = vpadalq_s16(acc, vmull_high_s8(hi, xh));
    }
    vaddvq_s32(acc)
}

/// The q4 head's dot: each block's integer sum reduced to one i32 (the scalar twin's integer),
/// scaled and added in the scalar twin's order, so the result equals
/// [`reference::dot_q4_scalar`] exactly.
///
/// # Safety
/// NEON must be available (every aarch64 level has it).
#[target_feature(enable = "neon")]
pub unsafe fn dot_q4_neon(codes: &[u8], scales: &[u16], x: &[i8]) -> f32 {
    let mut total = 0f32;
    for ((cb, xb), &s) in codes
        .chunks(Q4_BLOCK_BYTES)
        .zip(x.chunks(Q4_BLOCK))
        .zip(scales)
    {
        let sum = match (cb.try_into(), xb.try_into()) {
            (Ok(cb), Ok(xb)) => q4_block_dot(cb, xb),
            // x is zero-padded to whole blocks; a short one is not a q4 row
            _ => return total + reference::dot_q4_scalar(cb, std::slice::from_ref(&s), xb),
        };
        total += bf16_to_f32(s) * sum as f32;
    }
    total
}
