//! Kernel-level CPU benchmarks (`cargo bench --bench cpu_kernels`): the ternary dot of one packed
//! byte row (4 output rows) for each kernel level this machine runs, a whole 2B4T-shaped
//! projection (decode: 1 token; prefill: 64 tokens) through the CPU backend, and one LM-head row
//! in bf16, q8 and q4, and the two gated FFN activations. Throughput is in packed weight bytes (decode) or multiply-adds (prefill), so
//! the figures compare with the machine's memory bandwidth and SIMD peak. Whole-model speed is
//! `bitnet bench`'s job.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

use bitnet_wgpu::backend::cpu::dispatch::{
    dot_bf16, dot_bf16_tokens, ternary_dot4, ternary_dot4_x2, CpuLevel,
};
use bitnet_wgpu::backend::cpu::q4::{Q4Input, Q4Matrix};
use bitnet_wgpu::backend::cpu::q8::{HeadInput, Q8Matrix};
use bitnet_wgpu::backend::cpu::CpuBackend;
use bitnet_wgpu::backend::{Backend, StepRow};
use bitnet_wgpu::load::{FloatDtype, FloatMatrix};
use bitnet_wgpu::ternary::{ByteStorage, TernaryMatrix};

fn rng() -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(42)
}

/// Random valid packed bytes (every 2-bit field in 0..=2).
fn packed(len: usize) -> Vec<u8> {
    let mut r = rng();
    (0..len)
        .map(|_| (0..4).fold(0u8, |b, i| b | (r.random_range(0..3u8) << (2 * i))))
        .collect()
}

fn activations(len: usize) -> Vec<i8> {
    let mut r = rng();
    (0..len).map(|_| r.random_range(-127..=127i8)).collect()
}

fn dot_kernels(c: &mut Criterion) {
    let cols = 2560;
    let bytes = packed(cols);
    let (q0, q1) = (activations(cols), activations(cols));
    let mut g = c.benchmark_group("ternary_dot4 (1 byte row, 2560 cols, L1)");
    g.throughput(Throughput::Bytes(cols as u64));
    for level in CpuLevel::available() {
        g.bench_function(BenchmarkId::new("1 token", level.name()), |b| {
            b.iter(|| ternary_dot4(level, &bytes, &q0, 0))
        });
        g.bench_function(BenchmarkId::new("2 tokens", level.name()), |b| {
            b.iter(|| ternary_dot4_x2(level, &bytes, [&q0, &q1], [0, 0]))
        });
    }
    g.finish();
}

/// A packed random `[rows, cols]` ternary matrix.
fn ternary_matrix(name: &str, rows: usize, cols: usize) -> TernaryMatrix {
    let bytes = ByteStorage::Owned(Arc::new(packed(rows / 4 * cols)));
    TernaryMatrix::new(name, rows, cols, bytes, 0.01).unwrap()
}

/// `w` times `n` random quantized tokens through the CPU backend on `threads` threads, labelled
/// with the kernel level and thread count.
fn bench_matmul(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    w: &TernaryMatrix,
    n: usize,
    threads: usize,
) {
    let mut b = CpuBackend::new(threads).unwrap();
    let mut x = b.alloc(n, w.cols).unwrap(); // [n, cols]
    let mut r = rng();
    x.data
        .iter_mut()
        .for_each(|v| *v = r.random_range(-1f32..1.0));
    b.begin_step(&StepRow::sequence(&vec![0u32; n], 0)).unwrap();
    let mut xq = b.alloc_q(n, w.cols).unwrap();
    b.quantize(&x, &mut xq).unwrap();
    let mut out = b.alloc(n, w.rows).unwrap(); // [n, rows]
    let w = b.upload_linear(w).unwrap();
    let label = format!("{n} tokens, {} ({threads} threads)", b.level().name());
    g.bench_function(label, |bch| {
        bch.iter(|| b.ternary_matmul(&w, &xq, &mut out).unwrap())
    });
}

fn projection(c: &mut Criterion) {
    // gate_proj of 2B4T: [6912, 2560], 4.4 MB packed.
    let w = ternary_matrix("gate_proj", 6912, 2560);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("ternary_matmul [6912, 2560]");
    g.sample_size(20);
    for n in [1usize, 2, 4, 8, 16, 64] {
        g.throughput(if n == 1 {
            Throughput::Bytes((w.rows / 4 * w.cols) as u64)
        } else {
            Throughput::Elements((n * w.rows * w.cols) as u64)
        });
        bench_matmul(&mut g, &w, n, threads);
    }
    g.finish();
}

/// k_proj of 2B4T, [640, 2560]: 410 KB, ~40 µs of work, so the cost of starting a parallel
/// region shows.
fn small_projection(c: &mut Criterion) {
    let w = ternary_matrix("k_proj", 640, 2560);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("ternary_matmul [640, 2560]");
    g.throughput(Throughput::Bytes((w.rows / 4 * w.cols) as u64));
    for t in [1, threads] {
        bench_matmul(&mut g, &w, 1, t);
    }
    g.finish();
}

fn head_row(c: &mut Criterion) {
    // 256 rows of a 2560-wide head: one job's worth of the LM head.
    let (rows, cols) = (256, 2560);
    let mut r = rng();
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|_| half::bf16::from_f32(r.random_range(-0.1f32..0.1)).to_le_bytes())
        .collect();
    let m = FloatMatrix {
        name: "head".into(),
        rows,
        cols,
        dtype: FloatDtype::Bf16,
        data: ByteStorage::Owned(Arc::new(data)),
    };
    let q8 = Q8Matrix::quantize(&m, |_| {});
    let q4 = Q4Matrix::quantize(&m, |_| {});
    let x: Vec<f32> = (0..cols).map(|_| r.random_range(-2f32..2.0)).collect();
    let raw = m.data.as_slice();
    let hx = HeadInput::new(&x);
    let q4x = Q4Input::new(&x);
    let mut g = c.benchmark_group("lm_head 256 rows x 2560");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    for level in CpuLevel::available() {
        g.bench_function(BenchmarkId::new("bf16", level.name()), |b| {
            b.iter(|| {
                (0..rows)
                    .map(|i| dot_bf16(level, &raw[i * cols * 2..(i + 1) * cols * 2], &x))
                    .sum::<f32>()
            })
        });
        g.bench_function(BenchmarkId::new("q8", level.name()), |b| {
            b.iter(|| (0..rows).map(|i| q8.dot(level, i, &hx)).sum::<f32>())
        });
        g.bench_function(BenchmarkId::new("q4", level.name()), |b| {
            b.iter(|| (0..rows).map(|i| q4.dot(level, i, &q4x)).sum::<f32>())
        });
    }
    g.finish();
    // A batched decode step's head: 8 activation rows, one token at a time against 4 at a time
    // (each pair of head rows read once for 4 tokens), the same results bit for bit.
    let hxs: Vec<HeadInput> = (0..8)
        .map(|_| {
            let x: Vec<f32> = (0..cols).map(|_| r.random_range(-2f32..2.0)).collect();
            HeadInput::new(&x)
        })
        .collect();
    let mut g = c.benchmark_group("lm_head 256 rows x 2560 x 8 tokens");
    g.throughput(Throughput::Elements((8 * rows * cols) as u64));
    // every pair of head rows (i, i + rows/2) against all 8 activation rows, T at a time
    fn pairs_t<const T: usize>(q8: &Q8Matrix, level: CpuLevel, hxs: &[HeadInput]) -> f32 {
        let rows = q8.rows;
        (0..rows / 2)
            .map(|i| {
                hxs.chunks(T)
                    .map(|x| {
                        q8.dot_tokens(
                            level,
                            [i, i + rows / 2],
                            std::array::from_fn::<_, T, _>(|k| &x[k]),
                        )[0][0]
                    })
                    .sum::<f32>()
            })
            .sum()
    }
    // the exact bf16 head the same way (2B4T's tied embedding)
    let xs: Vec<Vec<f32>> = (0..8)
        .map(|_| (0..cols).map(|_| r.random_range(-2f32..2.0)).collect())
        .collect();
    fn bf16_pairs_t<const T: usize>(
        raw: &[u8],
        rows: usize,
        level: CpuLevel,
        xs: &[Vec<f32>],
    ) -> f32 {
        let row = |i: usize| &raw[i * raw.len() / rows..(i + 1) * raw.len() / rows];
        (0..rows / 2)
            .map(|i| {
                xs.chunks(T)
                    .map(|x| {
                        dot_bf16_tokens(
                            level,
                            [row(i), row(i + rows / 2)],
                            std::array::from_fn::<_, T, _>(|k| &x[k][..]),
                        )[0][0]
                    })
                    .sum::<f32>()
            })
            .sum()
    }
    for level in CpuLevel::available() {
        for (name, f) in [
            (
                "bf16 one token at a time",
                bf16_pairs_t::<1> as fn(&[u8], usize, CpuLevel, &[Vec<f32>]) -> f32,
            ),
            ("bf16 2 tokens at a time", bf16_pairs_t::<2>),
            ("bf16 4 tokens at a time", bf16_pairs_t::<4>),
        ] {
            g.bench_function(BenchmarkId::new(name, level.name()), |b| {
                b.iter(|| f(raw, rows, level, &xs))
            });
        }
        for (name, f) in [
            (
                "q8 one token at a time",
                pairs_t::<1> as fn(&Q8Matrix, CpuLevel, &[HeadInput]) -> f32,
            ),
            ("q8 2 tokens at a time", pairs_t::<2>),
            ("q8 4 tokens at a time", pairs_t::<4>),
        ] {
            g.bench_function(BenchmarkId::new(name, level.name()), |b| {
                b.iter(|| f(&q8, level, &hxs))
            });
        }
    }
    g.finish();
}

/// The gated FFN activation of a 64-token prefill step, [64, 6912] (2B4T's intermediate size):
/// relu(gate)²·up (BitNet) and silu(gate)·up (the LLaMA-style family), the row functions the
/// CPU's `gate_up` epilogue runs, one thread, so the cost of the exp in SiLU shows beside relu².
/// Throughput in elements.
fn ffn_activation(c: &mut Criterion) {
    use bitnet_wgpu::backend::cpu::reference::{relu2_mul_row, silu_mul_row};
    let (n, cols) = (64usize, 6912usize);
    let mut r = rng();
    let gate: Vec<f32> = (0..n * cols).map(|_| r.random_range(-4f32..4.0)).collect(); // [n, i]
    let up: Vec<f32> = (0..n * cols).map(|_| r.random_range(-4f32..4.0)).collect(); // [n, i]
    let mut out = vec![0f32; n * cols]; // [n, i]
    let mut g = c.benchmark_group("ffn activation [64, 6912] (1 thread)");
    g.throughput(Throughput::Elements((n * cols) as u64));
    for (name, row) in [
        ("relu2_mul", relu2_mul_row as fn(&[f32], &[f32], &mut [f32])),
        ("silu_mul", silu_mul_row),
    ] {
        g.bench_function(name, |bch| {
            bch.iter(|| {
                for t in 0..n {
                    let span = t * cols..(t + 1) * cols;
                    row(&gate[span.clone()], &up[span.clone()], &mut out[span]);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    dot_kernels,
    projection,
    small_projection,
    head_row,
    ffn_activation
);
criterion_main!(benches);
