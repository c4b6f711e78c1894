//! Every kernel level against the scalar twins of `reference.rs` (exact on the integer paths,
//! within one tolerance on the float ones).

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
            let want = reference::ternary_dot_byte_row(&zeros, &q, q_sum);
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
            let want = reference::ternary_dot_byte_row(&bytes, &q, q_sum);
            // the two-token kernel, paired with the activations reversed
            let r: Vec<i8> = q.iter().rev().copied().collect();
            let want_r = reference::ternary_dot_byte_row(&bytes, &r, q_sum);
            // the four-token kernel: tokens q, r, q negated (−128 → 127 saturates: its own
            // sum), and r rotated by one column
            let neg: Vec<i8> = q.iter().map(|&v| v.saturating_neg()).collect();
            let rot: Vec<i8> = r.iter().cycle().skip(1).take(cols).copied().collect();
            let sum = |v: &[i8]| v.iter().map(|&e| e as i32).sum::<i32>();
            let (neg_sum, rot_sum) = (sum(&neg), sum(&rot));
            let want4 = [
                want,
                want_r,
                reference::ternary_dot_byte_row(&bytes, &neg, neg_sum),
                reference::ternary_dot_byte_row(&bytes, &rot, rot_sum),
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
        let want = reference::ternary_dot_byte_row(&twos, &q, -128 * cols as i32);
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
        reference::axpy_f32_scalar(a, &x, &mut want);
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

/// A `rows_times_runs` case: `a` `[heads, depth]` in ±1 with each head's first coefficient 0
/// (skipped by the per-(head, k) path, multiplied by the SIMD kernels), `b` runs of `cols` values from `b_value` every `b_stride`, and the `out` they add
/// to, `[heads, cols]` in ±1.
fn runs_case(
    rng: &mut rand_chacha::ChaCha8Rng,
    (heads, depth, cols, b_stride): (usize, usize, usize, usize),
    mut b_value: impl FnMut(&mut rand_chacha::ChaCha8Rng) -> f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut a: Vec<f32> = (0..heads * depth)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    for h in 0..heads {
        a[h * depth] = 0.0;
    }
    let b: Vec<f32> = (0..(depth - 1) * b_stride + cols)
        .map(|_| b_value(rng))
        .collect();
    let out0: Vec<f32> = (0..heads * cols)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    (a, b, out0)
}

#[test]
fn rows_times_runs_matches_scalar_within_tolerance() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    // heads: each register block size and more than one block; cols: below, at and past
    // the 64-column block, odd (AVX2's 16-column blocks: full ones and a partial last one);
    // a zero coefficient column
    for &(heads, depth, cols) in &[
        (1usize, 1usize, 1usize),
        (3, 7, 17),
        (4, 128, 64),
        (5, 33, 130),
        (6, 17, 45),
        (8, 3, 200),
        (8, 128, 33),
        (11, 9, 70),
    ] {
        let b_stride = cols + 5;
        let (a, b, out0) = runs_case(&mut rng, (heads, depth, cols, b_stride), |r| {
            r.random_range(-2f32..2.0)
        });
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

/// A half-float `b` gives, on every level, exactly the f32 results over its values converted
/// (the kernels convert as they load and then run the f32 arithmetic), including the blocks'
/// last columns (the zero-padded copies).
#[test]
fn rows_times_runs_over_halves_equals_the_f32_kernel_on_their_values() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    for &(heads, depth, cols) in &[
        (1usize, 1usize, 1usize),
        (2, 5, 7),
        (3, 7, 17),
        (4, 128, 64),
        (4, 9, 65),
        (5, 33, 130),
        (6, 17, 45),
        (8, 3, 200),
        (8, 128, 33),
        (11, 9, 70),
    ] {
        let b_stride = cols + 3;
        // b32: the halves' values
        let (a, b32, out0) = runs_case(&mut rng, (heads, depth, cols, b_stride), |r| {
            half::f16::store(r.random_range(-300f32..300.0)).to_f32()
        });
        let b: Vec<half::f16> = b32.iter().map(|&x| half::f16::store(x)).collect();
        for level in CpuLevel::available() {
            let mut want = out0.clone();
            rows_times_runs(level, &a, heads, depth, &b32, b_stride, cols, &mut want);
            let mut got = out0.clone();
            rows_times_runs(level, &a, heads, depth, &b, b_stride, cols, &mut got);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{} [{heads}x{depth}]·[{depth}x{cols}] index {i}: got {g}, expected {w}",
                    level.name()
                );
            }
        }
    }
}

/// The f16 store rounds to the nearest half and keeps keys past the half range finite (as the
/// GPU's store does).
#[test]
fn half_store_rounds_and_clamps() {
    assert_eq!(half::f16::store(1.0).to_f32(), 1.0);
    assert_eq!(half::f16::store(1.0 + 1.0 / 4096.0).to_f32(), 1.0);
    assert_eq!(half::f16::store(1e6).to_f32(), 65504.0);
    assert_eq!(half::f16::store(-1e6).to_f32(), -65504.0);
    assert!(half::f16::store(f32::NAN).is_nan());
    assert_eq!(<f32 as KvElem>::store(1e6), 1e6);
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
            let want = reference::absmax(&x);
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
            reference::softmax_in_place(&mut want);
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
            reference::quantize_row_with_scale(&x, s, &mut want);
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
        let want = reference::dot_bf16_scalar(&row, &x);
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

/// The Q8_0 head's dot (a tied Q8_0 embedding) against its scalar twin and against the decoded
/// values' dot in f64, with codes −128 and 127 and scales of both signs among the blocks.
#[test]
fn q8_0_dot_matches_scalar_within_tolerance() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    for &blocks in &[1usize, 3, 80] {
        let n = 32 * blocks;
        let mut row = Vec::with_capacity(34 * blocks);
        for b in 0..blocks {
            let d = half::f16::from_f32(rng.random_range(-0.02..0.02));
            row.extend(d.to_le_bytes());
            for c in 0..32 {
                let q: i8 = match (b, c) {
                    (0, 0) => -128,
                    (0, 1) => 127,
                    _ => rng.random_range(-127..=127),
                };
                row.push(q as u8);
            }
        }
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        let mut w = vec![0f32; n];
        crate::gguf::types::dequant_q8_0(&row, &mut w);
        let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        let want = reference::dot_q8_0_scalar(&row, &x);
        assert!(
            (want as f64 - exact).abs() <= 1e-6 * mag as f64 + 1e-9,
            "scalar n {n}: {want} vs {exact}"
        );
        for &l in &CpuLevel::available() {
            let got = dot_q8_0(l, &row, &x);
            assert!(
                (got - want).abs() <= 1e-6 + 1e-6 * mag,
                "{l:?} n {n}: got {got}, expected {want}"
            );
        }
    }
}

/// The 16-bit heads' dots of several rows with several activation rows (a batched decode
/// step's exact head): every result bit for bit the one-row, one-token dot, at every level.
#[test]
fn half_dots_of_token_batches_equal_one_token_dots_bit_for_bit() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    // lengths: one column, tails after the AVX2 (16) and AVX-512 (32) steps, the 2B4T width
    for &n in &[1usize, 17, 63, 2560] {
        let row = |rng: &mut rand_chacha::ChaCha8Rng, f16: bool| -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    let v = rng.random_range(-1.0f32..1.0);
                    if f16 {
                        half::f16::from_f32(v).to_le_bytes()
                    } else {
                        half::bf16::from_f32(v).to_le_bytes()
                    }
                })
                .collect()
        };
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for f16 in [false, true] {
            let (a, b) = (row(&mut rng, f16), row(&mut rng, f16));
            for &l in &CpuLevel::available() {
                let one = |r: &[u8], x: &[f32]| {
                    if f16 {
                        dot_f16(l, r, x)
                    } else {
                        dot_bf16(l, r, x)
                    }
                };
                let xs4 = [&xs[0][..], &xs[1], &xs[2], &xs[3]];
                let (two, four) = if f16 {
                    (
                        dot_f16_tokens(l, [&a, &b], [&xs[0], &xs[1]]).to_vec(),
                        dot_f16_tokens(l, [&a, &b], xs4).to_vec(),
                    )
                } else {
                    (
                        dot_bf16_tokens(l, [&a, &b], [&xs[0], &xs[1]]).to_vec(),
                        dot_bf16_tokens(l, [&a, &b], xs4).to_vec(),
                    )
                };
                for (batch, got) in [(2, two), (4, four)] {
                    for (t, x) in xs.iter().take(batch).enumerate() {
                        for (k, r) in [&a, &b].into_iter().enumerate() {
                            assert_eq!(
                                got[t][k].to_bits(),
                                one(r, x).to_bits(),
                                "{l:?} f16={f16} n {n} {batch} tokens: token {t} row {k}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The f16 head's dot (the tied F16 embedding of bitnet.cpp's I2_S files) against its scalar
/// twin, with subnormal, infinite-free extreme and zero halves among the values.
#[test]
fn f16_dot_matches_scalar_within_tolerance() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    for &n in &[1usize, 7, 16, 17, 255, 2560] {
        let mut vals: Vec<half::f16> = (0..n)
            .map(|_| half::f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        // a subnormal, the largest finite half and a zero where the row is long enough
        for (k, v) in [half::f16::from_bits(1), half::f16::MAX, half::f16::ZERO]
            .into_iter()
            .enumerate()
        {
            if k < n {
                vals[n - 1 - k] = v;
            }
        }
        let row: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let want = reference::dot_f16_scalar(&row, &x);
        let mag: f32 = vals
            .iter()
            .zip(&x)
            .map(|(w, v)| (w.to_f32() * v).abs())
            .sum();
        for &l in &CpuLevel::available() {
            let got = dot_f16(l, &row, &x);
            assert!(
                (got - want).abs() <= 1e-6 + 1e-6 * mag,
                "{l:?} n {n}: got {got}, expected {want}"
            );
            let rev: Vec<u8> = row.chunks(2).rev().flatten().copied().collect();
            let two = dot_f16_rows(l, [&row, &rev], &x);
            assert_eq!(two[0].to_bits(), got.to_bits(), "{l:?} n {n}: rows first");
            let one = dot_f16(l, &rev, &x);
            assert_eq!(two[1].to_bits(), one.to_bits(), "{l:?} n {n}: rows second");
        }
    }
}
