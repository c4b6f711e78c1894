//! Issue #17: can an *exact* lookup-table ternary kernel (T-MAC / TL-style, tables of integer
//! sums, no lossy table quantization) beat the shipped vpmaddubsw / vpdpbusd kernels for CPU
//! prefill? Builds 2B4T-shaped random problems, checks every kernel bit for bit against a plain
//! scalar loop (big and odd shapes), then times them on one thread, repetitions interleaved
//! (ABAB…) so that load on shared cores hits every kernel alike. See README.md.
//!
//! `cargo run --release [-- --reps N --ms M --verify-only --sweep]`; `--sweep` times the vpermw
//! kernel's blockings against the best shipped level instead; `--peak` measures the
//! throughput ceilings of the instructions the kernels are built on (`peak.rs`); `--base3`
//! times one-token decode on base-3 packed weights against the shipped 2-bit kernels, in cache
//! and streaming a 2B4T-sized matrix from memory (`base3.rs`).

#[cfg(target_arch = "x86_64")]
mod base3;
#[cfg(target_arch = "x86_64")]
mod baseline;
#[cfg(target_arch = "x86_64")]
mod peak;
#[cfg(target_arch = "x86_64")]
mod permw;
#[cfg(target_arch = "x86_64")]
mod shufb;
mod util;

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("lut-experiment: the kernels under test are x86-64 only");
}

#[cfg(target_arch = "x86_64")]
fn main() {
    bench::main();
}

#[cfg(target_arch = "x86_64")]
mod bench {
    use std::time::Instant;

    use bitnet_wgpu::backend::cpu::dispatch::CpuLevel;
    use bitnet_wgpu::ternary::pack_ternary;

    use crate::util::{unpack_codes, Rng};
    use crate::{base3, baseline, permw, shufb};

    /// One problem: weights (as given, packed, and as codes), T tokens of activations.
    struct Problem {
        rows: usize,
        cols: usize,
        w: Vec<i8>,
        packed: Vec<u8>,
        codes: Vec<u8>,
    }

    impl Problem {
        /// `special` adds the extreme rows (all +1, all −1) that give the largest sums.
        fn new(rows: usize, cols: usize, seed: u64, special: bool) -> Self {
            let mut rng = Rng::new(seed);
            let mut w: Vec<i8> = (0..rows * cols).map(|_| rng.range(-1, 1) as i8).collect();
            if special && rows >= 8 {
                w[..cols].fill(1);
                w[cols..2 * cols].fill(-1);
                w[(rows - 1) * cols..].fill(1);
            }
            let packed = pack_ternary(&w, rows, cols).expect("pack");
            let codes = unpack_codes(&packed, rows, cols);
            Problem {
                rows,
                cols,
                w,
                packed,
                codes,
            }
        }

        /// The plain scalar reference: `out[t · rows + r] = Σ_c w[r, c] · x[t, c]` in i32.
        fn reference(&self, x: &[i8]) -> Vec<i32> {
            let n = x.len() / self.cols;
            let mut out = vec![0i32; n * self.rows];
            for t in 0..n {
                let xt = &x[t * self.cols..(t + 1) * self.cols];
                for r in 0..self.rows {
                    let wr = &self.w[r * self.cols..(r + 1) * self.cols];
                    out[t * self.rows + r] =
                        wr.iter().zip(xt).map(|(&a, &b)| a as i32 * b as i32).sum();
                }
            }
            out
        }
    }

    /// Activations: `n` tokens uniform in `lo..=hi`; with `special`, token 0 is all `lo` and
    /// token 1 all `hi` (when there are ≥ 3 tokens), the worst cases for the table ranges.
    fn activations(n: usize, cols: usize, lo: i32, hi: i32, seed: u64, special: bool) -> Vec<i8> {
        let mut rng = Rng::new(seed);
        let mut x: Vec<i8> = (0..n * cols).map(|_| rng.range(lo, hi) as i8).collect();
        if special && n >= 3 {
            x[..cols].fill(lo as i8);
            x[cols..2 * cols].fill(hi as i8);
        }
        x
    }

    fn sums(x: &[i8], cols: usize) -> Vec<i32> {
        x.chunks(cols)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect()
    }

    /// `(x [T][cols], Σx per token, out [T][rows])`.
    type Kernel<'a> = Box<dyn FnMut(&[i8], &[i32], &mut [i32]) + 'a>;

    /// A kernel under test, with its load-time state (repacked weights, scratch).
    struct Candidate<'a> {
        name: String,
        run: Kernel<'a>,
    }

    /// The shipped kernels and the LUT kernels; with `sweep`, the best shipped level and the
    /// vpermw kernel at several blockings instead.
    fn candidates(p: &Problem, sweep: bool) -> Vec<Candidate<'_>> {
        let avail = CpuLevel::available();
        let mut v: Vec<Candidate<'_>> = Vec::new();
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        if sweep {
            if avail.contains(&CpuLevel::Avx512Vnni) {
                v.push(Candidate {
                    name: "shipped avx512vnni (vpdpbusd zmm)".into(),
                    run: Box::new(move |x, qs, out| {
                        baseline::matmul(
                            CpuLevel::Avx512Vnni,
                            &p.packed,
                            p.rows,
                            p.cols,
                            x,
                            qs,
                            out,
                        )
                    }),
                });
            }
            if avx512 {
                let w = std::rc::Rc::new(permw::PermwWeights::new(&p.codes, p.rows, p.cols));
                for (block_triples, max_chunk, row_vectors) in [
                    (28, 4, 1),
                    (14, 8, 1),
                    (14, 16, 1),
                    (28, 4, 2),
                    (14, 4, 2),
                    (14, 8, 2),
                    (28, 8, 2),
                ] {
                    let (w, mut s) = (w.clone(), permw::PermwScratch::default());
                    let b = permw::Blocking {
                        block_triples,
                        max_chunk,
                        row_vectors,
                    };
                    v.push(Candidate {
                        name: format!(
                            "LUT vpermw, {block_triples} triples × {max_chunk} tokens × {} rows",
                            32 * row_vectors
                        ),
                        run: Box::new(move |x, _qs, out| permw::matmul(&w, b, x, &mut s, out)),
                    });
                }
            }
            return v;
        }
        for (level, name) in [
            (CpuLevel::Avx2, "shipped avx2 (vpmaddubsw)"),
            (CpuLevel::AvxVnni, "shipped avxvnni (vpdpbusd ymm)"),
            (CpuLevel::Avx512Vnni, "shipped avx512vnni (vpdpbusd zmm)"),
        ] {
            if avail.contains(&level) {
                v.push(Candidate {
                    name: name.into(),
                    run: Box::new(move |x, qs, out| {
                        baseline::matmul(level, &p.packed, p.rows, p.cols, x, qs, out)
                    }),
                });
            }
        }
        if is_x86_feature_detected!("avx2") {
            let w = shufb::ShufbWeights::new(&p.codes, p.rows, p.cols);
            let mut s = shufb::ShufbScratch::default();
            v.push(Candidate {
                name: "LUT avx2 vpshufb g4 (exact)".into(),
                run: Box::new(move |x, qs, out| shufb::matmul(&w, x, qs, &mut s, out)),
            });
        }
        if avx512 {
            let w = permw::PermwWeights::new(&p.codes, p.rows, p.cols);
            let mut s = permw::PermwScratch::default();
            v.push(Candidate {
                name: "LUT avx512bw vpermw g3 (exact)".into(),
                run: Box::new(move |x, _qs, out| {
                    permw::matmul(&w, Default::default(), x, &mut s, out)
                }),
            });
        }
        v
    }

    /// Runs every candidate once and compares with the reference, panicking on the first
    /// difference.
    fn verify(p: &Problem, cands: &mut [Candidate<'_>], x: &[i8], what: &str) {
        let n = x.len() / p.cols;
        let expect = p.reference(x);
        let qs = sums(x, p.cols);
        for c in cands.iter_mut() {
            let mut out = vec![i32::MIN; n * p.rows];
            (c.run)(x, &qs, &mut out);
            for t in 0..n {
                for r in 0..p.rows {
                    let (got, want) = (out[t * p.rows + r], expect[t * p.rows + r]);
                    assert!(
                        got == want,
                        "{}: {what} rows {} cols {} T {n}: row {r}, token {t}: got {got}, expected {want}",
                        c.name,
                        p.rows,
                        p.cols
                    );
                }
            }
        }
    }

    fn loadavg() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into())
    }

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            0.5 * (v[m - 1] + v[m])
        }
    }

    struct Opts {
        reps: usize,
        ms: f64,
        verify_only: bool,
        sweep: bool,
        peak: bool,
        base3: bool,
    }

    fn opts() -> Opts {
        let mut o = Opts {
            reps: 9,
            ms: 25.0,
            verify_only: false,
            sweep: false,
            peak: false,
            base3: false,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "--reps" => {
                    o.reps = args[i + 1].parse().expect("--reps N");
                    i += 1;
                }
                "--ms" => {
                    o.ms = args[i + 1].parse().expect("--ms M");
                    i += 1;
                }
                "--verify-only" => o.verify_only = true,
                "--sweep" => o.sweep = true,
                "--peak" => o.peak = true,
                "--base3" => o.base3 = true,
                a => panic!(
                    "unknown argument {a} (--reps N, --ms M, --verify-only, --sweep, --peak, --base3)"
                ),
            }
            i += 1;
        }
        o
    }

    pub fn main() {
        let o = opts();
        if o.peak {
            crate::peak::main();
            return;
        }
        if o.base3 {
            base3_main(&o);
            return;
        }
        let levels: Vec<_> = CpuLevel::available().iter().map(|l| l.name()).collect();
        println!("levels available: {}", levels.join(", "));

        // exactness on odd shapes first: K not a multiple of 9 or 16, rows not of 8 or 32,
        // every token-chunk path, and the extreme activations −128 and 127
        for (i, &(rows, cols)) in [(108, 2567), (52, 6917), (4, 1), (12, 31), (6916, 2560)]
            .iter()
            .enumerate()
        {
            let p = Problem::new(rows, cols, 100 + i as u64, true);
            let mut cands = candidates(&p, o.sweep);
            for n in [1, 2, 3, 5, 7, 9, 13] {
                let x = activations(n, cols, -128, 127, 200 + n as u64, true);
                verify(&p, &mut cands, &x, "odd shape");
            }
        }
        println!("exact on odd shapes (rows 108/52/4/12/6916, K 2567/6917/1/31/2560, T 1-13)");

        let shapes = [
            ("up (2B4T FFN up/gate)", 6912, 2560),
            ("down (2B4T FFN down)", 2560, 6912),
        ];
        let tokens = [1, 2, 4, 8, 32];
        let mut table = String::new();
        for &(label, rows, cols) in &shapes {
            let p = Problem::new(rows, cols, 1, false);
            let mut cands = candidates(&p, o.sweep);
            for &n in &tokens {
                let x = activations(n, cols, -127, 127, 7 + n as u64, false);
                verify(&p, &mut cands, &x, label);
                if o.verify_only {
                    continue;
                }
                let qs = sums(&x, cols);
                let mut out = vec![0i32; n * rows];
                // calibrate: calls per sample so that a sample takes about `ms`
                let inner: Vec<usize> = cands
                    .iter_mut()
                    .map(|c| {
                        let t0 = Instant::now();
                        (c.run)(&x, &qs, &mut out);
                        let dt = t0.elapsed().as_secs_f64();
                        ((o.ms * 1e-3 / dt).round() as usize).clamp(1, 10_000)
                    })
                    .collect();
                let load0 = loadavg();
                let mut samples = vec![Vec::new(); cands.len()];
                for rep in 0..o.reps {
                    // ABAB…, the starting kernel rotating so none always follows another
                    for j in 0..cands.len() {
                        let k = (j + rep) % cands.len();
                        let t0 = Instant::now();
                        for _ in 0..inner[k] {
                            (cands[k].run)(&x, &qs, &mut out);
                        }
                        samples[k].push(t0.elapsed().as_secs_f64() / inner[k] as f64);
                    }
                }
                let load1 = loadavg();
                let macs = (rows * cols * n) as f64;
                let meds: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
                let mins: Vec<f64> = samples
                    .iter()
                    .map(|s| s.iter().cloned().fold(f64::INFINITY, f64::min))
                    .collect();
                let pos = |name: &str| cands.iter().position(|c| c.name.contains(name));
                let (avx2, best) = (pos("shipped avx2"), pos("shipped avx512vnni"));
                // speed-up over a baseline: of the medians, and (in brackets) of the minima
                let ratio = |base: Option<usize>, k: usize| {
                    base.map_or("-".into(), |b| {
                        format!("{:.2} ({:.2})", meds[b] / meds[k], mins[b] / mins[k])
                    })
                };
                for (k, c) in cands.iter().enumerate() {
                    let min = mins[k];
                    table.push_str(&format!(
                        "| {label} | {n} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {} |\n",
                        c.name,
                        meds[k] * 1e3,
                        min * 1e3,
                        macs / meds[k] * 1e-9,
                        macs / min * 1e-9,
                        ratio(avx2, k),
                        ratio(best, k),
                    ));
                }
                println!(
                    "{label} rows {rows} K {cols} T {n}: exact; timed, loadavg {load0} → {load1}"
                );
            }
        }
        if o.verify_only {
            println!("exact on the 2B4T shapes, T = 1, 2, 4, 8, 32");
            return;
        }
        println!();
        println!(
            "| shape | T | kernel | median ms | min ms | GMAC/s (median) | GMAC/s (min time) | × vs avx2, median (min) | × vs avx512vnni, median (min) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        print!("{table}");
    }

    /// `--base3`: exactness of the base-3 kernel, then one-token decode timed against the
    /// shipped byte-row kernels (one byte row at a time, as `baseline::matmul` at T = 1), in
    /// cache on one thread and streaming a 2B4T-sized matrix (2.09 G weights) on 2 threads.
    fn base3_main(o: &Opts) {
        assert!(is_x86_feature_detected!("avx2"), "--base3 needs AVX2");
        for (i, &(rows, cols)) in [(108, 2567), (52, 6917), (4, 1), (12, 31), (6916, 2560)]
            .iter()
            .enumerate()
        {
            let p = Problem::new(rows, cols, 300 + i as u64, true);
            let w = base3::Base3Weights::new(&p.codes, rows, cols);
            for (lo, hi) in [(-128, 127), (-128, -128), (127, 127)] {
                let x = activations(1, cols, lo, hi, 400 + i as u64, false);
                let want = p.reference(&x);
                let mut got = vec![i32::MIN; rows];
                base3::matvec(&w, &x, sums(&x, cols)[0], (0, w.p5), &mut got);
                for r in 0..rows {
                    assert_eq!(got[r], want[r], "base3 rows {rows} cols {cols}: row {r}");
                }
            }
        }
        println!("base3: exact on odd shapes (rows 108/52/4/12/6916, K 2567/6917/1/31/2560)");
        let levels = CpuLevel::available();
        let shipped: Vec<CpuLevel> = [CpuLevel::Avx2, CpuLevel::Avx512Vnni]
            .into_iter()
            .filter(|l| levels.contains(l))
            .collect();
        // in cache, one thread
        for &(label, rows, cols) in &[("up", 6912, 2560), ("down", 2560, 6912)] {
            let p = Problem::new(rows, cols, 1, false);
            let w = base3::Base3Weights::new(&p.codes, rows, cols);
            let x = activations(1, cols, -127, 127, 9, false);
            let qs = sums(&x, cols);
            let mut out = vec![0i32; rows];
            let mut samples = vec![Vec::new(); shipped.len() + 1];
            for rep in 0..o.reps {
                for j in 0..samples.len() {
                    let k = (j + rep) % samples.len();
                    let t0 = Instant::now();
                    for _ in 0..50 {
                        match shipped.get(k) {
                            Some(&l) => {
                                baseline::matmul(l, &p.packed, rows, cols, &x, &qs, &mut out)
                            }
                            None => base3::matvec(&w, &x, qs[0], (0, w.p5), &mut out),
                        }
                    }
                    samples[k].push(t0.elapsed().as_secs_f64() / 50.0);
                }
            }
            for (k, s) in samples.iter_mut().enumerate() {
                let name = shipped.get(k).map_or("base3 avx2".to_string(), |l| {
                    format!("shipped {}", l.name())
                });
                let m = median(s);
                println!(
                    "in cache, 1 thread, {label} [{rows}, {cols}], T 1: {name}: {:.1} µs, {:.1} G weights/s",
                    m * 1e6,
                    (rows * cols) as f64 / m * 1e-9
                );
            }
        }
        // streaming from memory, 2 threads: 118 gate projections' worth of weights (2B4T's
        // ternary total), random codes (the speed does not depend on them)
        let (rows, cols) = (6912 * 118, 2560);
        let mut rng = crate::util::Rng::new(5);
        let packed: Vec<u8> = (0..rows / 4 * cols)
            .map(|_| (0..4).fold(0u8, |b, i| b | ((rng.range(0, 2) as u8) << (2 * i))))
            .collect();
        let b3 = base3::Base3Weights {
            rows,
            cols,
            p5: rows / 5 + 1,
            bytes: (0..(rows / 5 + 1) * cols)
                .map(|_| rng.range(0, 255) as u8)
                .collect(),
        };
        let x = activations(1, cols, -127, 127, 9, false);
        let qs = sums(&x, cols);
        let run = |k: usize| {
            let halves = |n: usize| [(0, n / 2), (n / 2, n)];
            std::thread::scope(|sc| {
                for (h, (p0, p1)) in halves(if k < shipped.len() { rows / 4 } else { b3.p5 })
                    .into_iter()
                    .enumerate()
                {
                    let (packed, b3, x, qs, shipped) = (&packed, &b3, &x, &qs, &shipped);
                    sc.spawn(move || {
                        let mut out = vec![0i32; rows];
                        let mut acc = 0i64;
                        if let Some(&l) = shipped.get(k) {
                            for p in p0..p1 {
                                let r = bitnet_wgpu::backend::cpu::dispatch::ternary_dot4(
                                    l,
                                    &packed[p * cols..(p + 1) * cols],
                                    x,
                                    qs[0],
                                );
                                acc += r[0] as i64;
                            }
                        } else {
                            base3::matvec(b3, x, qs[0], (p0, p1), &mut out);
                            acc += out[p0] as i64;
                        }
                        std::hint::black_box((acc, h));
                    });
                }
            });
        };
        let mut samples = vec![Vec::new(); shipped.len() + 1];
        for rep in 0..o.reps {
            for j in 0..samples.len() {
                let k = (j + rep) % samples.len();
                let t0 = Instant::now();
                run(k);
                samples[k].push(t0.elapsed().as_secs_f64());
            }
        }
        for (k, s) in samples.iter_mut().enumerate() {
            let (name, bytes) = match shipped.get(k) {
                Some(l) => (format!("shipped {}", l.name()), packed.len()),
                None => ("base3 avx2".to_string(), b3.bytes.len()),
            };
            let (m, min) = (median(s), s.iter().cloned().fold(f64::INFINITY, f64::min));
            println!(
                "from memory, 2 threads, [{rows}, {cols}] ({:.0} MB), T 1: {name}: median {:.1} ms, min {:.1} ms, {:.1} GB/s (median)",
                bytes as f64 / 1e6,
                m * 1e3,
                min * 1e3,
                bytes as f64 / m * 1e-9
            );
        }
    }
}
