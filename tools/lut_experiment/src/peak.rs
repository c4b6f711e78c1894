//! Instruction throughput ceilings (`--peak`): each loop runs 12 independent dependency chains
//! of one instruction kind entirely in registers, so its rate is the core's issue rate for that
//! instruction, the upper bound of any kernel built on it. Reported as instructions per ns and
//! as the MAC rate the kernels would get at that rate (MACs per instruction as they use them).

use std::arch::x86_64::*;
use std::hint::black_box;
use std::time::Instant;

const CHAINS: usize = 12;
const ITERS: usize = 2_000_000;

/// Seconds per instruction of `step` applied to 12 chains for [`ITERS`] rounds (best of 5).
fn rate(mut round: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t0 = Instant::now();
            round();
            t0.elapsed().as_secs_f64() / (ITERS * CHAINS) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dpbusd_zmm() {
    let (a, b) = (
        black_box(_mm512_set1_epi8(3)),
        black_box(_mm512_set1_epi8(-5)),
    );
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    black_box(acc);
}

#[target_feature(enable = "avx512f,avx512bw")]
fn permw_zmm() {
    let table = black_box(_mm512_set1_epi16(7));
    let mut idx: [__m512i; CHAINS] = std::array::from_fn(|i| _mm512_set1_epi16(i as i16));
    for _ in 0..ITERS {
        for v in idx.iter_mut() {
            *v = _mm512_permutexvar_epi16(*v, table);
        }
    }
    black_box(idx);
}

/// vpermw plus the vpaddw that accumulates its result off the permute's chain, as the LUT
/// kernel pairs them.
#[target_feature(enable = "avx512f,avx512bw")]
fn permw_add_zmm() {
    let table = black_box(_mm512_set1_epi16(7));
    let mut idx: [__m512i; CHAINS] = std::array::from_fn(|i| _mm512_set1_epi16(i as i16));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..ITERS {
        for (v, a) in idx.iter_mut().zip(acc.iter_mut()) {
            *v = _mm512_permutexvar_epi16(*v, table);
            *a = _mm512_add_epi16(*a, *v);
        }
    }
    black_box((idx, acc));
}

#[target_feature(enable = "avx2")]
fn maddubs_ymm() {
    let a = black_box(_mm256_set1_epi8(3));
    let mut acc: [__m256i; CHAINS] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8));
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm256_maddubs_epi16(a, *v);
        }
    }
    black_box(acc);
}

#[target_feature(enable = "avx2")]
fn pshufb_ymm() {
    let table = black_box(_mm256_set1_epi8(7));
    let mut idx: [__m256i; CHAINS] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8));
    for _ in 0..ITERS {
        for v in idx.iter_mut() {
            *v = _mm256_shuffle_epi8(table, *v);
        }
    }
    black_box(idx);
}

/// The AVX2 LUT's step: two lookups (low and high byte table) of one index vector, the low
/// bytes combined by vpmaddubsw and both summed. 4 chains: 3 ymm each of the 16.
#[target_feature(enable = "avx2")]
fn shufb_step_ymm() {
    let (tl, th) = (
        black_box(_mm256_set1_epi8(7)),
        black_box(_mm256_set1_epi8(1)),
    );
    let w12 = black_box(_mm256_set1_epi16(0x0201));
    let mut idx: [__m256i; 4] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8));
    let mut lo = [_mm256_setzero_si256(); 4];
    let mut hi = [_mm256_setzero_si256(); 4];
    for _ in 0..ITERS * CHAINS / 4 {
        for i in 0..4 {
            idx[i] = _mm256_shuffle_epi8(tl, idx[i]);
            lo[i] = _mm256_add_epi16(lo[i], _mm256_maddubs_epi16(idx[i], w12));
            hi[i] = _mm256_add_epi8(hi[i], _mm256_shuffle_epi8(th, idx[i]));
        }
    }
    black_box((idx, lo, hi));
}

pub fn main() {
    println!("| instruction | per ns | MACs each, as used | GMAC/s ceiling |");
    println!("|---|---|---|---|");
    let row = |name: &str, s: f64, macs: f64| {
        println!(
            "| {name} | {:.2} | {macs} | {:.0} |",
            1e-9 / s,
            macs / s * 1e-9
        );
    };
    if is_x86_feature_detected!("avx2") {
        // SAFETY (each call): the features it enables were detected just above.
        row(
            "vpmaddubsw ymm (shipped avx2: 32 u8×i8 products)",
            rate(|| unsafe { maddubs_ymm() }),
            32.0,
        );
        // an exact 4-column bit-serial lookup needs a low and a high byte: 64 MACs per 2
        row(
            "vpshufb ymm (LUT avx2: 64 MACs per lo+hi pair)",
            rate(|| unsafe { pshufb_ymm() }),
            32.0,
        );
        // the AVX2 LUT's inner step in registers (64 MACs): its ceiling with no loads
        row(
            "LUT avx2 step: 2 vpshufb + vpmaddubsw + vpaddw + vpaddb",
            rate(|| unsafe { shufb_step_ymm() }),
            64.0,
        );
    }
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
        row(
            "vpdpbusd zmm (shipped avx512vnni)",
            rate(|| unsafe { dpbusd_zmm() }),
            64.0,
        );
        row(
            "vpermw zmm (LUT: 32 lookups × 3 MACs)",
            rate(|| unsafe { permw_zmm() }),
            96.0,
        );
        row(
            "vpermw + vpaddw zmm (LUT step)",
            rate(|| unsafe { permw_add_zmm() }),
            96.0,
        );
    }
}
