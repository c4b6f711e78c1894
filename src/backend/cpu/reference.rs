//! The scalar twins: plain Rust for every op that has an optimised kernel (`x86/`, `arm/`, the
//! WGSL shaders), written for clarity. The tests compare each kernel with its twin here (exactly
//! on the integer paths); the CPU backend also runs the ones without a faster kernel (RMSNorm,
//! RoPE) as they are.
//!
//! The ternary dot works on the packed layout of `ternary.rs`: one byte row `p` carries a column
//! of the four output rows `p, P+p, 2P+p, 3P+p`, with codes `c = w + 1`, so that
//! `Σ q·w = Σ q·c − Σ q`.

use crate::backend::cpu::q8::Q8_BLOCK;
use crate::ternary::TernaryMatrix;

/// Per-token absmax quantization of one activation row: `s = 127 / max(absmax, 1e-5)`,
/// `q = clamp(round_half_even(x * s), -128, 127)`. Writes `q [len]` and returns `s`.
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    let s = activation_scale(x);
    quantize_row_with_scale(x, s, q);
    s
}

/// The per-token scale of [`quantize_row`]: `127 / max(absmax, 1e-5)`.
pub fn activation_scale(x: &[f32]) -> f32 {
    scale_from_absmax(absmax(x))
}

/// `max |x|`, NaN ignored (f32::max keeps the other operand), 0 for an empty row.
pub fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// [`activation_scale`] from the row's [`absmax`].
pub fn scale_from_absmax(absmax: f32) -> f32 {
    127.0 / absmax.max(1e-5)
}

/// The int8 values of [`quantize_row`] for a scale already known.
pub fn quantize_row_with_scale(x: &[f32], s: f32, q: &mut [i8]) {
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = (xi * s).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
}

/// Scalar reference: `acc[r] = Σ_c q[c] * W[r, c]` for all rows, exact in i32.
pub fn ternary_dot_rows_scalar(w: &TernaryMatrix, q: &[i8], acc: &mut [i32]) {
    debug_assert_eq!(q.len(), w.cols);
    debug_assert_eq!(acc.len(), w.rows);
    for (r, a) in acc.iter_mut().enumerate() {
        *a = (0..w.cols).map(|c| q[c] as i32 * w.get(r, c) as i32).sum();
    }
}

/// The four accumulators of byte row `p` (rows `p, P+p, 2P+p, 3P+p`):
/// `Σ q·W = Σ q·code − Σ q`, so only unsigned codes need multiplying.
#[inline]
pub fn ternary_dot_byte_row(bytes: &[u8], q: &[i8], q_sum: i32) -> [i32; 4] {
    let mut a = [0i32; 4];
    for (&b, &x) in bytes.iter().zip(q) {
        let x = x as i32;
        a[0] += x * (b & 3) as i32;
        a[1] += x * ((b >> 2) & 3) as i32;
        a[2] += x * ((b >> 4) & 3) as i32;
        a[3] += x * (b >> 6) as i32;
    }
    a.map(|v| v - q_sum)
}

/// The scalar twin of [`axpy_f32`] (a separate multiply and add: the FMA kernel rounds once, so
/// the two differ by an ulp per step, which the tests' tolerance allows).
pub fn axpy_f32_scalar(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// The scalar twin of `dispatch::dot_bf16`: bf16 (little-endian bytes) times f32, summed in f32.
pub fn dot_bf16_scalar(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(2)
        .zip(x)
        .map(|(b, &xi)| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) * xi)
        .sum()
}

/// The scalar twin of `dispatch::dot_f16`: f16 (little-endian bytes) times f32, summed in f32.
pub fn dot_f16_scalar(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(2)
        .zip(x)
        .map(|(b, &xi)| half::f16::from_le_bytes([b[0], b[1]]).to_f32() * xi)
        .sum()
}

/// The scalar twin of `dispatch::dot_q8_0`: a GGUF Q8_0 row (per 32 columns an f16 scale `d`
/// and 32 int8 codes `q`, the values `d · q`) times f32 `x`, as `Σ_b d_b · (Σ_{c∈b} q_c x_c)`
/// in f32.
pub fn dot_q8_0_scalar(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(34)
        .zip(x.chunks_exact(32))
        .map(|(b, xb)| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            let s: f32 = b[2..]
                .iter()
                .zip(xb)
                .map(|(&q, &v)| q as i8 as f32 * v)
                .sum();
            d * s
        })
        .sum()
}

/// `Σ_b scale_b · Σ_{c∈b} q_c x_c`: exact i32 block sums (|sum| ≤ 64·127·32767 < 2³¹), then
/// f32 over the blocks.
pub fn dot_q8_scalar(q: &[i8], scales: &[f32], x: &[i16]) -> f32 {
    q.chunks(Q8_BLOCK)
        .zip(x.chunks(Q8_BLOCK))
        .zip(scales)
        .map(|((qb, xb), &s)| {
            s * qb
                .iter()
                .zip(xb)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum::<i32>() as f32
        })
        .sum()
}

/// The q4 head's dot of one row with an int8 activation row zero-padded to whole blocks (`q4.rs`
/// has the layout): per block of 64 columns the exact integer `Σ (code − 8) · x`, times the
/// block's bf16 step, summed in block order.
pub fn dot_q4_scalar(codes: &[u8], scales: &[u16], x: &[i8]) -> f32 {
    use super::q4::{bf16_to_f32, Q4_BLOCK, Q4_BLOCK_BYTES};
    codes
        .chunks(Q4_BLOCK_BYTES)
        .zip(x.chunks(Q4_BLOCK))
        .zip(scales)
        .map(|((cb, xb), &s)| {
            let sum: i32 = xb
                .iter()
                .enumerate()
                .map(|(k, &xv)| {
                    let byte = cb[k % Q4_BLOCK_BYTES];
                    let code = if k < Q4_BLOCK_BYTES {
                        byte & 15
                    } else {
                        byte >> 4
                    };
                    (code as i32 - 8) * xv as i32
                })
                .sum();
            bf16_to_f32(s) * sum as f32
        })
        .sum()
}

/// `e^x` in f32 by Cephes' `expf` scheme: `x = n·ln2 + r` (ln 2 split in two constants so `r` is
/// exact), a degree-6 polynomial for `e^r` on |r| ≤ ln2/2, times `2^n` built from the exponent
/// bits; within ~2 ulp of the exact value, like libm's `expf` and the SLEEF exp torch uses.
/// Branch-free (the rounding to n is the 1.5·2²³ trick, not `round()`), so a loop over a row
/// vectorizes with baseline SSE2/NEON: ~5× faster than calling `f32::exp` per element. The input
/// is clamped to [-87, 88] so that the result stays a normal f32 (e^-87 ≈ 1.6e-38, e^88 ≈ 1.7e38).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    // k = MAGIC + n exactly, so its low mantissa bits hold n (no float→int conversion, which
    // would keep the loop from vectorizing)
    let k = x * std::f32::consts::LOG2_E + MAGIC;
    let n = k - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4; // x − n·ln2, ln2 = 0.693359375 − 2.12e-4
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let two_n = k.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23; // 2^n
    y * f32::from_bits(two_n)
}

/// `silu(g) = g / (1 + e^-g)` in f32, the form torch's float32 SiLU computes, with [`exp_f32`]
/// (for g below -88 the result is a tiny g·e^-88 instead of underflowing to 0; either is 0 to
/// every later op).
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp_f32(-g))
}

/// The LLaMA-style gated FFN product of one row: `out = silu(gate) · up` (`[cols]` each). The
/// CPU backend runs exactly this (the loop vectorizes, see [`exp_f32`]); the WGSL twin is the
/// gated epilogue of shaders/ternary_matmul.wgsl, with the GPU's own `exp`.
pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// The BitNet 2B4T gated FFN product of one row: `out = relu(gate)² · up` (`[cols]` each),
/// computed as `(r·r)·u`.
pub fn relu2_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

/// `out = x * rsqrt(mean(x²) + eps) * w` for one row, in f32 like transformers.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// Half-split RoPE of one head vector at position `pos`:
/// `v'[j] = v[j] cos − v[j+d/2] sin`, `v'[j+d/2] = v[j+d/2] cos + v[j] sin`, angle `pos · θ^(−2j/d)`.
pub fn rope_head(v: &mut [f32], pos: usize, theta: f32) {
    let mut angles = vec![(0.0, 0.0); v.len() / 2];
    rope_angles(pos, v.len(), theta, &mut angles);
    rope_head_with(v, &angles);
}

/// `(cos, sin)` of RoPE's angles at `pos` for a head of `head_dim`, into `out [head_dim / 2]`.
pub fn rope_angles(pos: usize, head_dim: usize, theta: f32, out: &mut [(f32, f32)]) {
    for (j, o) in out.iter_mut().enumerate().take(head_dim / 2) {
        // As transformers: inv_freq and the angle in f32, then cos/sin of that f32 angle.
        let inv_freq = 1.0 / theta.powf((2 * j) as f32 / head_dim as f32);
        let angle = pos as f32 * inv_freq;
        let (s, c) = (angle as f64).sin_cos();
        *o = (c as f32, s as f32);
    }
}

/// [`rope_head`] with the angles of [`rope_angles`].
pub fn rope_head_with(v: &mut [f32], angles: &[(f32, f32)]) {
    let half = v.len() / 2;
    for (j, &(c, s)) in angles.iter().enumerate().take(half) {
        let (a, b) = (v[j], v[j + half]);
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
    }
}

/// Numerically stable softmax in f32. Terms below e^−87 (f32's smallest normal, 1.2e−38, times
/// the largest term, which is 1) are set to 0 instead of becoming subnormal: they cannot change
/// the sum or any output in f32, and subnormal multiplies in the attention's weighted sum cost
/// ~100 cycles each on x86 (what that cost a prefill is in BENCHMARKS.md).
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        let d = *v - m;
        *v = if d < -87.0 { 0.0 } else { d.exp() };
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ternary::{pack_ternary, ByteStorage};
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    #[test]
    fn quantize_rounds_half_to_even_clamps_and_floors() {
        // absmax 127 → s = 1: values land exactly on .5 and round to even.
        let x = [0.5f32, 1.5, 2.5, -0.5, -1.5, 127.0, -3.5];
        let mut q = [0i8; 7];
        let s = quantize_row(&x, &mut q);
        assert_eq!(s, 1.0);
        assert_eq!(q, [0, 2, 2, 0, -2, 127, -4]);
        // all zeros: absmax floored at 1e-5, no division by zero, all q = 0.
        let mut q0 = [1i8; 3];
        let s0 = quantize_row(&[0.0; 3], &mut q0);
        assert_eq!(s0, 127.0 / 1e-5);
        assert_eq!(q0, [0; 3]);
        // the clamp at -128 never triggers for in-range absmax, but -absmax maps to -127.
        let mut q1 = [0i8; 2];
        quantize_row(&[-2.0, 1.0], &mut q1);
        assert_eq!(q1, [-127, 64]);
    }

    #[test]
    fn byte_row_kernel_equals_scalar_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(rows, cols) in &[(4, 1), (8, 17), (12, 33), (172, 64)] {
            let w: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let m = TernaryMatrix::new(
                "t",
                rows,
                cols,
                ByteStorage::Owned(Arc::new(pack_ternary(&w, rows, cols).unwrap())),
                1.0,
            )
            .unwrap();
            let q: Vec<i8> = (0..cols).map(|_| rng.random_range(-128..=127)).collect();
            let mut want = vec![0; rows];
            ternary_dot_rows_scalar(&m, &q, &mut want);
            let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
            let p4 = rows / 4;
            for p in 0..p4 {
                let got = ternary_dot_byte_row(m.byte_row(p), &q, q_sum);
                for i in 0..4 {
                    assert_eq!(
                        got[i],
                        want[i * p4 + p],
                        "rows {rows} cols {cols} row {}",
                        i * p4 + p
                    );
                }
            }
        }
    }

    #[test]
    fn rope_half_split_rotates_pairs_j_and_j_plus_half() {
        // d = 4: pairs (0,2) with inv_freq 1 and (1,3) with inv_freq θ^(-1/2) = 0.01 for θ = 1e4.
        let mut v = [1.0f32, 1.0, 0.0, 0.0];
        rope_head(&mut v, 1, 10000.0);
        assert!(
            (v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6,
            "{v:?}"
        );
        assert!(
            (v[1] - 0.01f32.cos()).abs() < 1e-6 && (v[3] - 0.01f32.sin()).abs() < 1e-6,
            "{v:?}"
        );
        // position 0 is the identity
        let mut w = [0.3f32, -0.2, 0.7, 0.1];
        rope_head(&mut w, 0, 10000.0);
        assert_eq!(w, [0.3, -0.2, 0.7, 0.1]);
    }

    #[test]
    fn rms_norm_and_softmax() {
        let mut o = [0.0f32; 2];
        rms_norm_row(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut o);
        let r = (12.5f32).sqrt();
        assert!((o[0] - 3.0 / r).abs() < 1e-6 && (o[1] - 8.0 / r).abs() < 1e-6);
        let mut s = [1000.0f32, 1000.0];
        softmax_in_place(&mut s);
        assert_eq!(s, [0.5, 0.5]);
        // a term e^-100 below the largest would be subnormal: it is 0 and the rest unchanged;
        // e^-80 is a normal f32 and stays
        let mut s = [0.0f32, -100.0, -80.0];
        softmax_in_place(&mut s);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 0.0);
        assert!(s[2] > 0.0 && s[2].is_normal(), "{s:?}");
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_exponential() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            let err = (got - want).abs() / ulp;
            assert!(err <= 2.0, "x {x}: got {got}, expected {want} ({err} ulp)");
            worst = worst.max(err);
            x += 0.001_7;
        }
        assert!(worst > 0.0);
        // clamped ends: finite and normal, NaN stays NaN
        assert!(exp_f32(-1e30).is_normal() && exp_f32(1e30).is_normal());
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn silu_mul_row_is_silu_of_gate_times_up() {
        // against the formula in f64, over the range a projection produces and the extremes
        let gate: Vec<f32> = (-400..=400)
            .map(|k| k as f32 * 0.05)
            .chain([-200.0, -89.0, 0.0, 89.0, 1e4])
            .collect();
        let up: Vec<f32> = gate
            .iter()
            .enumerate()
            .map(|(k, _)| 1.5 - (k % 7) as f32 * 0.5)
            .collect();
        let mut out = vec![f32::NAN; gate.len()];
        silu_mul_row(&gate, &up, &mut out);
        for (k, ((&g, &u), &got)) in gate.iter().zip(&up).zip(&out).enumerate() {
            let (g, u) = (g as f64, u as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (got as f64 - want).abs() <= 1e-30 + 1e-6 * want.abs(),
                "index {k}: got {got}, expected {want}"
            );
        }
        // silu(0) = 0, silu(very negative) ≈ 0, silu(large) = the input
        assert_eq!(silu(0.0), 0.0);
        assert!(silu(-200.0) <= 0.0 && silu(-200.0) > -1e-35);
        assert_eq!(silu(1e4), 1e4);
    }
}
