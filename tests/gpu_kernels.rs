// Every WGSL kernel against the CPU backend's op, on random inputs with awkward sizes (rows and
// columns that are not multiples of the workgroup sizes, K not a multiple of 16, 1 / 3 / 5 / 37
// tokens). Integer results (quantized activations, matmul accumulators, argmax) must be equal;
// floats agree within |got − ref| ≤ abs + rel·|ref|, failures name index, got and expected.
//
// Runs on whatever adapter `--device gpu` would pick (lavapipe in CI). Without one the tests
// print SKIPPED, or fail when BITNET_REQUIRE_GPU=1 (see `gpu_backend_for_test`).
//
// tests/gpu_kernels_workgroup.rs includes this file to run every case again with the
// workgroup-memory reductions (no subgroups); here the kernels use what the device has.
// (Plain comments, not `//!`: an included file cannot carry inner doc comments.)

mod common;

use std::sync::Arc;

use bitnet_wgpu::backend::cpu::reference::{
    quantize_row, relu2_mul_row, rms_norm_row, rope_head, silu_mul_row, ternary_dot_rows_scalar,
};
use bitnet_wgpu::backend::cpu::{CpuBackend, CpuQTensor, CpuTensor};
use bitnet_wgpu::backend::wgpu::{
    gpu_backend_for_test_with, GpuOptions, GpuQTensor, TileShapes, WgpuBackend,
};
use bitnet_wgpu::backend::{AttentionShape, Backend, FfnActivation, KvDtype, StepRow};
use bitnet_wgpu::load::{FloatDtype, FloatMatrix};
use bitnet_wgpu::ternary::{pack_ternary, ByteStorage, TernaryMatrix};
use common::assert_close;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Whether this copy of the tests is the one tests/gpu_kernels_workgroup.rs compiles (the
/// workgroup reductions).
fn workgroup_variant() -> bool {
    env!("CARGO_CRATE_NAME") == "gpu_kernels_workgroup"
}

/// The backend under test: subgroup reductions where the device has them, or the workgroup
/// ones in the copy of these tests that tests/gpu_kernels_workgroup.rs compiles.
fn gpu(test: &str) -> Option<WgpuBackend> {
    gpu_with_tiles(test, None)
}

/// [`gpu`] with these tile sizes instead of the adapter's own.
fn gpu_with_tiles(test: &str, tiles: Option<TileShapes>) -> Option<WgpuBackend> {
    let g = gpu_backend_for_test_with(
        test,
        GpuOptions {
            subgroups: !workgroup_variant(),
            tiles,
        },
    )?;
    if workgroup_variant() {
        assert_eq!(g.reductions(), "workgroup", "{test}");
    }
    Some(g)
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn cpu_tensor(data: &[f32], capacity: usize, cols: usize) -> CpuTensor {
    let mut d = data.to_vec();
    d.resize(capacity * cols, 0.0);
    CpuTensor {
        data: d.into(),
        capacity,
        cols,
    }
}

/// A tensor of `capacity` rows on both backends holding the same `data` in its first rows.
fn both(
    g: &mut WgpuBackend,
    data: &[f32],
    capacity: usize,
    cols: usize,
) -> (CpuTensor, bitnet_wgpu::backend::wgpu::GpuTensor) {
    let mut t = g.alloc(capacity, cols).unwrap();
    g.write(&mut t, data).unwrap();
    (cpu_tensor(data, capacity, cols), t)
}

fn random_ternary(r: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> TernaryMatrix {
    let w: Vec<i8> = (0..rows * cols).map(|_| r.random_range(-1..=1)).collect();
    let packed = pack_ternary(&w, rows, cols).unwrap();
    TernaryMatrix::new(
        format!("w{rows}x{cols}"),
        rows,
        cols,
        ByteStorage::Owned(Arc::new(packed)),
        scale,
    )
    .unwrap()
}

#[test]
fn every_kernel_compiles() {
    let Some(mut g) = gpu("every_kernel_compiles") else {
        return;
    };
    g.compile_all().unwrap();
    eprintln!("adapter: {}", g.name());
}

/// shaders/reduce_check.wgsl: every reduction of the library in use (thread numbering, workgroup
/// sums and max, 16- and 32-lane sums, argmax with ties) equals the exact answer in every
/// thread. Where the adapter has subgroups, the subgroup variant must be the one in use here
/// (a self-test failure at device creation would have fallen back silently).
#[test]
fn reductions_pass_their_self_test() {
    let Some(mut g) = gpu("reductions_pass_their_self_test") else {
        return;
    };
    g.check_reductions().unwrap();
    let adapter = bitnet_wgpu::backend::wgpu::list_adapters()
        .into_iter()
        .find(|a| g.name().contains(&a.name));
    if !workgroup_variant() && adapter.is_some_and(|a| a.subgroups.is_some()) {
        assert_eq!(
            g.reductions(),
            "subgroup",
            "the adapter has subgroups; fallback reason: {:?}",
            g.subgroup_fallback()
        );
    }
    eprintln!("{}: {} reductions", g.name(), g.reductions());
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(mut g) = gpu("rms_norm_matches_cpu") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(1);
    for &(n, cols) in &[(1, 7), (5, 300), (37, 513)] {
        let x = randn(&mut r, n * cols, 3.0);
        let w = randn(&mut r, cols, 1.5);
        let (cx, gx) = both(&mut g, &x, n + 2, cols);
        let (mut co, mut go) = both(&mut g, &[], n + 2, cols);
        let gw = g.upload_vector(&w).unwrap();
        let tokens = vec![0u32; n];
        c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        c.rms_norm(&cx, &w, 1e-5, &mut co).unwrap();
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        g.rms_norm(&gx, &gw, 1e-5, &mut go).unwrap();
        g.end_step().unwrap();
        let got = g.read(&go, n).unwrap();
        assert_close(
            &format!("rms_norm n={n} cols={cols}"),
            &got,
            &co.data[..n * cols],
            1e-6,
            1e-5,
        );
    }
}

/// Quantization is exact on a device with correctly rounded f32 division (lavapipe, most
/// desktop GPUs). Elsewhere the scale may be off by an ulp, which can move a value lying within
/// ~1e-5 of a rounding tie by one: allowed only there.
#[test]
fn quantize_matches_cpu_exactly() {
    let Some(mut g) = gpu("quantize_matches_cpu_exactly") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(2);
    for &(n, cols) in &[(1, 5), (5, 33), (37, 300), (3, 1000)] {
        let mut x = randn(&mut r, n * cols, 2.0);
        // exact ties: with absmax 127 the scale is 1, so k + 0.5 must round to even
        if cols >= 8 {
            x[..8].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]);
        }
        let (cx, gx) = both(&mut g, &x, n, cols);
        let mut cq = c.alloc_q(n, cols).unwrap();
        let mut gq = g.alloc_q(n, cols).unwrap();
        let tokens = vec![0u32; n];
        c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        c.quantize(&cx, &mut cq).unwrap();
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        g.quantize(&gx, &mut gq).unwrap();
        g.end_step().unwrap();
        let (q, scales, sums) = g.read_q(&gq, n).unwrap();
        for t in 0..n {
            let ulps = (scales[t].to_bits() as i64 - cq.scales[t].to_bits() as i64).abs();
            assert!(
                ulps <= 1,
                "n={n} cols={cols} row {t}: scale {} vs {}",
                scales[t],
                cq.scales[t]
            );
            for i in 0..cols {
                let (gv, cv) = (q[t * cols + i], cq.q[t * cols + i]);
                if gv != cv {
                    let y = x[t * cols + i] * cq.scales[t];
                    let near_tie = ((y - y.trunc()).abs() - 0.5).abs() < 1e-4;
                    assert!(
                        ulps == 1 && near_tie && (gv as i32 - cv as i32).abs() == 1,
                        "n={n} cols={cols} row {t} col {i}: got {gv}, expected {cv} (x·s = {y})"
                    );
                }
            }
            if ulps == 0 {
                assert_eq!(sums[t], cq.sums[t], "n={n} cols={cols} row {t}: Σq");
            }
        }
        if cols >= 8 {
            assert_eq!(&q[..8], &[127, 0, 2, 2, 0, -2, -2, 4], "ties to even");
        }
    }
}

fn cpu_q(q: &[i8], scales: &[f32], cols: usize) -> CpuQTensor {
    let n = scales.len();
    CpuQTensor {
        q: q.to_vec().into(),
        scales: scales.to_vec(),
        sums: (0..n)
            .map(|t| q[t * cols..(t + 1) * cols].iter().map(|&v| v as i32).sum())
            .collect(),
        tiles: Default::default(), // row layout only: the CPU op reads `q`
        tiles_rows: 0,
        capacity: n,
        cols,
    }
}

/// The integer path is compared bit for bit: the kernel's i32 accumulators (read through the
/// RAW_ACC debug constant) against the scalar reference; the scaled output against the CPU op.
/// Every tile shape an adapter may be given (k-steps of 4 and 8 groups, 2 and 4 tokens per
/// thread) that fits this one's workgroup memory, each with the adapter's prologue blocks.
fn tile_shapes(g: &WgpuBackend) -> Vec<TileShapes> {
    let own = g.tiles();
    let mut shapes = Vec::new();
    for k in [4, 8] {
        for tj in [2, 4] {
            let t = TileShapes {
                matmul_k_groups: k,
                matmul_max_tj: tj,
                ..own
            };
            if t.fits(g.workgroup_memory()) {
                shapes.push(t);
            }
        }
    }
    assert!(shapes.contains(&own), "{own:?} not among {shapes:?}");
    shapes
}

#[test]
fn ternary_matmul_accumulators_are_exact_and_outputs_match_cpu() {
    let Some(g) = gpu("ternary_matmul") else {
        return;
    };
    for tiles in tile_shapes(&g) {
        let mut g = gpu_with_tiles("ternary_matmul", Some(tiles)).unwrap();
        ternary_matmul_case(&mut g, &format!("{tiles:?}"));
    }
    // a shape the kernels do not have is refused when the device opens, by name
    let odd = TileShapes {
        matmul_k_groups: 6,
        ..g.tiles()
    };
    let name = std::env::var("BITNET_GPU_ADAPTER").ok();
    let err = WgpuBackend::new_with(
        bitnet_wgpu::backend::wgpu::AdapterChoice::Gpu,
        name.as_deref(),
        GpuOptions {
            subgroups: !workgroup_variant(),
            tiles: Some(odd),
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("tile sizes") && err.contains("matmul_k_groups: 6"),
        "{err}"
    );
}

fn ternary_matmul_case(g: &mut WgpuBackend, tiles: &str) {
    let mut c = cpu();
    let mut r = rng(3);
    // rows multiple of 4 (the packed format) but not of 8 or 64; K not a multiple of 16 or 128.
    for &(rows, cols) in &[(4, 1), (12, 15), (68, 37), (132, 300), (260, 1030)] {
        let w = random_ternary(&mut r, rows, cols, 0.37);
        let gw = g.upload_linear(&w).unwrap();
        for &n in &[1usize, 2, 3, 5, 8, 9, 16, 17, 37, 100] {
            let mut q: Vec<i8> = (0..n * cols).map(|_| r.random_range(-128..=127)).collect();
            if n > 1 {
                // a saturated row: the largest possible accumulator magnitude
                q[..cols].fill(-128);
            }
            let scales: Vec<f32> = (0..n)
                .map(|_| 127.0 / r.random_range(0.1f32..8.0))
                .collect();
            let mut gq = g.alloc_q(n, cols).unwrap();
            g.write_q(&mut gq, &q, &scales).unwrap();
            let cq = cpu_q(&q, &scales, cols);
            let mut gacc = g.alloc(n, rows).unwrap();
            let mut gout = g.alloc(n, rows).unwrap();
            let mut cout = c.alloc(n, rows).unwrap();
            let tokens = vec![0u32; n];
            g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
            g.ternary_matmul_acc(&gw, &gq, &mut gacc).unwrap();
            g.ternary_matmul(&gw, &gq, &mut gout).unwrap();
            g.end_step().unwrap();
            c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
            let cw = c.upload_linear(&w).unwrap();
            c.ternary_matmul(&cw, &cq, &mut cout).unwrap();
            let acc = g.read(&gacc, n).unwrap();
            let mut want = vec![0i32; rows];
            for t in 0..n {
                ternary_dot_rows_scalar(&w, &q[t * cols..(t + 1) * cols], &mut want);
                for (i, &e) in want.iter().enumerate() {
                    let got = acc[t * rows + i];
                    assert!(
                        got == e as f32,
                        "{tiles} [{rows}x{cols}] n={n} token {t} row {i}: accumulator {got}, expected {e}"
                    );
                }
            }
            let got = g.read(&gout, n).unwrap();
            // f = out_scale / s may differ by an ulp on devices without exact division.
            assert_close(
                &format!("{tiles} ternary_matmul [{rows}x{cols}] n={n}"),
                &got,
                &cout.data,
                0.0,
                3e-7,
            );
        }
    }
}

#[test]
fn ternary_matmul_after_gpu_quantize_equals_cpu_pipeline() {
    let Some(mut g) = gpu("quantize_then_matmul") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(4);
    let (rows, cols, n) = (100, 200, 6);
    let w = random_ternary(&mut r, rows, cols, 1.7);
    let gw = g.upload_linear(&w).unwrap();
    let x = randn(&mut r, n * cols, 1.0);
    let (cx, gx) = both(&mut g, &x, n, cols);
    let (mut cq, mut gq) = (c.alloc_q(n, cols).unwrap(), g.alloc_q(n, cols).unwrap());
    let (mut co, mut go) = (c.alloc(n, rows).unwrap(), g.alloc(n, rows).unwrap());
    let tokens = vec![0u32; n];
    c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
    c.quantize(&cx, &mut cq).unwrap();
    let cw = c.upload_linear(&w).unwrap();
    c.ternary_matmul(&cw, &cq, &mut co).unwrap();
    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
    g.quantize(&gx, &mut gq).unwrap();
    g.ternary_matmul(&gw, &gq, &mut go).unwrap();
    g.end_step().unwrap();
    assert_close(
        "quantize+matmul",
        &g.read(&go, n).unwrap(),
        &co.data,
        1e-5,
        1e-5,
    );
}

/// `n` random int8 rows of `cols` with random scales, on both backends (capacity `cap`).
fn random_q_both(
    g: &mut WgpuBackend,
    r: &mut ChaCha8Rng,
    n: usize,
    cap: usize,
    cols: usize,
) -> (Vec<i8>, Vec<f32>, CpuQTensor, GpuQTensor) {
    let q: Vec<i8> = (0..n * cols).map(|_| r.random_range(-128..=127)).collect();
    let scales: Vec<f32> = (0..n)
        .map(|_| 127.0 / r.random_range(0.5f32..4.0))
        .collect();
    let mut gq = g.alloc_q(cap, cols).unwrap();
    g.write_q(&mut gq, &q, &scales).unwrap();
    let mut cq = cpu_q(&q, &scales, cols);
    cq.q.resize(cap * cols, 0);
    cq.scales.resize(cap, 1.0);
    cq.sums.resize(cap, 0);
    cq.capacity = cap;
    (q, scales, cq, gq)
}

/// The scalar composition of a (concatenated) ternary matmul: `ternary_dot_rows_scalar` per
/// part, `acc as f32 · (out_scale / s)`, parts side by side: `[n, Σ rows]`.
fn reference_matmul(parts: &[&TernaryMatrix], q: &[i8], scales: &[f32]) -> Vec<f32> {
    let cols = parts[0].cols;
    let mut out = Vec::new();
    for (t, &s) in scales.iter().enumerate() {
        for p in parts {
            let mut acc = vec![0i32; p.rows];
            ternary_dot_rows_scalar(p, &q[t * cols..(t + 1) * cols], &mut acc);
            let f = p.out_scale / s;
            out.extend(acc.iter().map(|&a| a as f32 * f));
        }
    }
    out
}

/// One matrix uploaded as the concatenation of three parts with different scales: the
/// accumulators exact per part (RAW_ACC), each part scaled by its own out_scale; decode and
/// prefill kernels.
#[test]
fn concatenated_matmul_scales_each_part_and_keeps_accumulators_exact() {
    let Some(mut g) = gpu("concatenated_matmul") else {
        return;
    };
    let mut r = rng(40);
    let cols = 75;
    let parts = [
        random_ternary(&mut r, 12, cols, 0.37),
        random_ternary(&mut r, 8, cols, 2.5),
        random_ternary(&mut r, 4, cols, 0.011),
    ];
    let refs: Vec<&TernaryMatrix> = parts.iter().collect();
    let gw = g.upload_linears(&refs).unwrap();
    let rows = 24;
    for n in [1usize, 3, 9, 37] {
        let (q, scales, _, gq) = random_q_both(&mut g, &mut r, n, n, cols);
        let mut gacc = g.alloc(n, rows).unwrap();
        let mut gout = g.alloc(n, rows).unwrap();
        let tokens = vec![0u32; n];
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        g.ternary_matmul_acc(&gw, &gq, &mut gacc).unwrap();
        g.ternary_matmul(&gw, &gq, &mut gout).unwrap();
        g.end_step().unwrap();
        let acc = g.read(&gacc, n).unwrap();
        // the accumulators: the scaled reference with scale 1 per part and s = 1
        let mut want = Vec::new();
        for t in 0..n {
            for p in &parts {
                let mut a = vec![0i32; p.rows];
                ternary_dot_rows_scalar(p, &q[t * cols..(t + 1) * cols], &mut a);
                want.extend(a.iter().map(|&v| v as f32));
            }
        }
        assert_close(&format!("accumulators n={n}"), &acc, &want, 0.0, 0.0);
        assert_close(
            &format!("concatenated matmul n={n}"),
            &g.read(&gout, n).unwrap(),
            &reference_matmul(&refs, &q, &scales),
            0.0,
            3e-7,
        );
    }
}

/// `rms_norm_quantize` is one dispatch and bit-identical to `rms_norm` then `quantize` on the
/// GPU (the same kernel code); against the scalar `quantize_row(rms_norm_row(x))` codes may move
/// by one only where the GPU's tree-summed norm puts a value within 1e-3 of a rounding tie.
#[test]
fn rms_norm_quantize_equals_norm_then_quantize() {
    let Some(mut g) = gpu("rms_norm_quantize") else {
        return;
    };
    let mut r = rng(41);
    for &(n, cols) in &[(1, 7), (5, 300), (37, 513), (2, 2560)] {
        let x = randn(&mut r, n * cols, 3.0);
        let w = randn(&mut r, cols, 1.5);
        let gw = g.upload_vector(&w).unwrap();
        let (_, gx) = both(&mut g, &x, n + 1, cols);
        let mut gn = g.alloc(n + 1, cols).unwrap();
        let (mut fused, mut sep) = (
            g.alloc_q(n + 1, cols).unwrap(),
            g.alloc_q(n + 1, cols).unwrap(),
        );
        let tokens = vec![0u32; n];
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        let before = g.dispatch_count();
        g.rms_norm_quantize(&gx, &gw, 1e-5, &mut fused).unwrap();
        g.end_step().unwrap();
        assert_eq!(g.dispatch_count() - before, 1, "one dispatch");
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        g.rms_norm(&gx, &gw, 1e-5, &mut gn).unwrap();
        g.quantize(&gn, &mut sep).unwrap();
        g.end_step().unwrap();
        let what = format!("n={n} cols={cols}");
        let got = g.read_q(&fused, n).unwrap();
        assert!(
            got == g.read_q(&sep, n).unwrap(),
            "{what}: fused != rms_norm + quantize"
        );
        let (q, scales, sums) = got;
        for t in 0..n {
            let mut xn = vec![0.0; cols];
            let span = t * cols..(t + 1) * cols;
            rms_norm_row(&x[span.clone()], &w, 1e-5, &mut xn);
            let mut wq = vec![0i8; cols];
            let s = quantize_row(&xn, &mut wq);
            assert!(
                (scales[t] - s).abs() <= 1e-5 * s,
                "{what} row {t}: scale {} vs {s}",
                scales[t]
            );
            for i in 0..cols {
                let (gv, e) = (q[t * cols + i], wq[i]);
                let y = xn[i] * s;
                let near_tie = ((y - y.trunc()).abs() - 0.5).abs() < 1e-3;
                assert!(
                    gv == e || (near_tie && (gv as i32 - e as i32).abs() == 1),
                    "{what} row {t} index {i}: got {gv}, expected {e} (x·s = {y})"
                );
            }
            let own: i32 = q[span].iter().map(|&v| v as i32).sum();
            assert_eq!(sums[t], own, "{what} row {t}: Σq");
        }
    }
}

/// `x += W·q` in the matmul's epilogue against `x + reference_matmul`, decode and prefill.
#[test]
fn ternary_matmul_add_matches_the_scalar_composition() {
    let Some(mut g) = gpu("ternary_matmul_add") else {
        return;
    };
    let mut r = rng(42);
    let (rows, cols) = (68, 130);
    let w = random_ternary(&mut r, rows, cols, 0.7);
    let gw = g.upload_linear(&w).unwrap();
    for n in [1usize, 4, 16, 37] {
        let (q, scales, _, gq) = random_q_both(&mut g, &mut r, n, n, cols);
        let x = randn(&mut r, n * rows, 5.0);
        let (_, mut gx) = both(&mut g, &x, n, rows);
        let tokens = vec![0u32; n];
        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
        let before = g.dispatch_count();
        g.ternary_matmul_add(&gw, &gq, &mut gx).unwrap();
        assert_eq!(g.dispatch_count() - before, 1, "one dispatch");
        g.end_step().unwrap();
        let prod = reference_matmul(&[&w], &q, &scales);
        let want: Vec<f32> = x.iter().zip(&prod).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("ternary_matmul_add n={n}"),
            &g.read(&gx, n).unwrap(),
            &want,
            1e-6,
            1e-6,
        );
    }
    // a wrong accumulator shape is an error naming the op
    let mut bad = g.alloc(4, rows + 4).unwrap();
    let (_, _, _, gq) = random_q_both(&mut g, &mut r, 1, 1, cols);
    g.begin_step(&StepRow::sequence(&[0], 0)).unwrap();
    let e = g.ternary_matmul_add(&gw, &gq, &mut bad).unwrap_err();
    assert!(e.to_string().contains("ternary_matmul_add"), "{e}");
    g.end_step().unwrap();
}

/// gate|up as one matmul with relu²(g)·u or silu(g)·u in the epilogue against the scalar
/// composition (reference matmul per part, then relu2_mul_row / silu_mul_row); the gate's scale
/// is large enough to reach the range where exp(-g) overflows.
#[test]
fn gate_up_matches_the_scalar_composition() {
    let Some(mut g) = gpu("gate_up") else {
        return;
    };
    let mut r = rng(43);
    for &(inter, cols) in &[(8usize, 33usize), (100, 130), (36, 1000)] {
        let wg = random_ternary(&mut r, inter, cols, 1.3);
        let wu = random_ternary(&mut r, inter, cols, 0.2);
        let gw = g.upload_linears(&[&wg, &wu]).unwrap();
        for n in [1usize, 3, 12, 37] {
            let (q, scales, _, gq) = random_q_both(&mut g, &mut r, n, n, cols);
            let gu = reference_matmul(&[&wg, &wu], &q, &scales);
            for act in [FfnActivation::Relu2, FfnActivation::Silu] {
                let mut go = g.alloc(n, inter).unwrap();
                let tokens = vec![0u32; n];
                g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                let before = g.dispatch_count();
                g.gate_up(&gw, &gq, act, &mut go).unwrap();
                assert_eq!(g.dispatch_count() - before, 1, "one dispatch");
                g.end_step().unwrap();
                let mut want = vec![0.0; n * inter];
                for t in 0..n {
                    let (gt, ut) = gu[t * 2 * inter..(t + 1) * 2 * inter].split_at(inter);
                    let o = &mut want[t * inter..(t + 1) * inter];
                    match act {
                        FfnActivation::Relu2 => relu2_mul_row(gt, ut, o),
                        FfnActivation::Silu => silu_mul_row(gt, ut, o),
                    }
                }
                // the GPU's exp() is not correctly rounded; f = scale / s may differ by an ulp
                assert_close(
                    &format!("gate_up {act:?} [{inter}x{cols}] n={n}"),
                    &g.read(&go, n).unwrap(),
                    &want,
                    1e-6,
                    1e-5,
                );
            }
        }
    }
}

/// Runs the same sequence of steps (prefill, decode, a second prefill) through both backends'
/// `qkv_rope_store` + `attention` with random weights and activations each step, comparing the
/// rotated q with the scalar composition (reference matmul, rope_head) and the attention
/// output (which reads the stored keys and values) with the CPU's. With an f16 GPU cache the
/// CPU rounds what it stores to f16 (to nearest even, as `pack2x16float` on lavapipe), so it
/// attends over the values the GPU holds and the tolerance stays that of f32 summation orders:
/// a wrong word layout, pair order or offset fails it. A step of `STORE_ONLY` rows or more only
/// stores its keys and values (a long context filled cheaply: lavapipe is slow).
fn attention_case(
    g: &mut WgpuBackend,
    seed: u64,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    steps: &[usize],
    dtype: KvDtype,
) {
    attention_case_scaled(g, seed, heads, kv_heads, hd, steps, dtype, 1.0);
}

/// `attention_case` with the k and v weight scales multiplied by `kv_scale`.
#[allow(clippy::too_many_arguments)]
fn attention_case_scaled(
    g: &mut WgpuBackend,
    seed: u64,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    steps: &[usize],
    dtype: KvDtype,
    kv_scale: f32,
) {
    let mut c = cpu();
    let mut r = rng(seed);
    let shape = AttentionShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: hd,
        rope_theta: 10000.0,
    };
    let (qd, kvd) = (heads * hd, kv_heads * hd);
    let hidden = 40;
    let ctx: usize = steps.iter().sum::<usize>() + 3;
    let cap = *steps.iter().max().unwrap();
    let layers = 2;
    // the CPU cache in the same format: both attend over the same stored values
    let mut ccache = c.alloc_kv_cache(layers, 1, ctx, kvd, dtype).unwrap();
    let mut gcache = g.alloc_kv_cache(layers, 1, ctx, kvd, dtype).unwrap();
    let parts = [
        random_ternary(&mut r, qd, hidden, 0.05),
        random_ternary(&mut r, kvd, hidden, 0.07 * kv_scale),
        random_ternary(&mut r, kvd, hidden, 0.03 * kv_scale),
    ];
    let refs: Vec<&TernaryMatrix> = parts.iter().collect();
    let cw = c.upload_linears(&refs).unwrap();
    let gw = g.upload_linears(&refs).unwrap();
    let mut pos = 0;
    for (si, &n) in steps.iter().enumerate() {
        let layer = si % layers;
        let (xq, scales, cq, gq) = random_q_both(g, &mut r, n, cap, hidden);
        let (mut cqo, mut gqo) = both(g, &[], cap, qd);
        let (mut co, mut go) = both(g, &[], cap, qd);
        let tokens = vec![0u32; n];
        c.begin_step(&StepRow::sequence(&tokens, pos)).unwrap();
        c.qkv_rope_store(&cw, &cq, &mut ccache, layer, &shape, &mut cqo)
            .unwrap();
        if n < STORE_ONLY {
            c.attention(&cqo, &ccache, layer, &shape, &mut co).unwrap();
        }
        g.begin_step(&StepRow::sequence(&tokens, pos)).unwrap();
        let before = g.dispatch_count();
        g.qkv_rope_store(&gw, &gq, &mut gcache, layer, &shape, &mut gqo)
            .unwrap();
        assert_eq!(
            g.dispatch_count() - before,
            1,
            "qkv_rope_store: one dispatch"
        );
        let attend = n < STORE_ONLY;
        if attend {
            g.attention(&gqo, &gcache, layer, &shape, &mut go).unwrap();
        }
        g.end_step().unwrap();
        let what =
            format!("{dtype:?} heads={heads}/{kv_heads} hd={hd} step {si} (n={n}, pos={pos})");
        // q: the scalar composition
        let qkv = reference_matmul(&refs, &xq, &scales);
        let mut want_q = Vec::new();
        for t in 0..n {
            let mut v = qkv[t * (qd + 2 * kvd)..t * (qd + 2 * kvd) + qd].to_vec();
            for head in v.chunks_exact_mut(hd) {
                rope_head(head, pos + t, shape.rope_theta);
            }
            want_q.extend(v);
        }
        assert_close(
            &format!("rotated q {what}"),
            &g.read(&gqo, n).unwrap(),
            &want_q,
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("cpu rotated q {what}"),
            &cqo.data[..n * qd],
            &want_q,
            0.0,
            0.0,
        );
        if attend {
            assert_close(
                &format!("attention {what}"),
                &g.read(&go, n).unwrap(),
                &co.data[..n * qd],
                1e-5,
                1e-4,
            );
        }
        // the next step of this layer sees the cache of the previous one of the same layer
        if layer == layers - 1 {
            pos += n;
        }
    }
}

/// Steps of at least this many rows only store keys and values in `attention_case`.
const STORE_ONLY: usize = 4096;

#[test]
fn qkv_rope_store_and_attention_prefill_and_decode_match() {
    let Some(mut g) = gpu("attention") else {
        return;
    };
    // Steps of up to 16 rows run attend_split + attend_combine, longer ones attend_tiled
    // (head_dim ≤ 128, GROUP ≤ 8) or attend.
    for dtype in [KvDtype::F16, KvDtype::F32] {
        // GQA 4/2 with a small head; 3 kv heads of 64 (2B4T-like group of 4: 12/3).
        attention_case(&mut g, 6, 4, 2, 8, &[5, 5, 1, 1, 37, 37], dtype);
        attention_case(&mut g, 7, 12, 3, 64, &[3, 3, 1, 1], dtype);
        // more than one 128-position chunk of `attend`'s online softmax, many tile blocks
        attention_case(&mut g, 8, 2, 1, 16, &[150, 150, 1, 1, 5, 5], dtype);
        // MHA, head_dim larger than the tiles' (`attend`); an odd half head (hd / 2 = 5)
        attention_case(&mut g, 9, 2, 2, 200, &[20, 20, 1, 1], dtype);
        attention_case(&mut g, 11, 6, 2, 10, &[20, 20, 1, 1, 7, 7], dtype);
        // a group too large for the split kernel's workgroup memory: decode falls back to
        // `attend`
        attention_case(&mut g, 10, 8, 1, 256, &[2, 2, 1, 1], dtype);
        // 2B4T's shape (20 heads, 5 kv heads, head_dim 128): decode over 6 blocks of 64
        attention_case(&mut g, 12, 20, 5, 128, &[330, 330, 1, 1, 4, 4], dtype);
        // GROUP 1, head_dim 64, a partial last block
        attention_case(&mut g, 13, 3, 3, 64, &[200, 200, 2, 2, 3, 3], dtype);
        // GROUP 8 (two passes of the lane-partial reduction), head_dim 64
        attention_case(&mut g, 14, 8, 1, 64, &[70, 70, 1, 1], dtype);
        // the largest split step (16 rows) and the smallest tiled one (17)
        attention_case(&mut g, 17, 4, 2, 64, &[16, 16, 17, 17, 1, 1], dtype);
        // GQA ratio 5 with a group of 5 heads (tiles of one row), odd step sizes 33 and 31
        attention_case(&mut g, 18, 10, 2, 32, &[33, 31, 1, 1, 3], dtype);
    }
    // keys and values beyond the halves' range (|x| up to ~1e6): the f16 cache stores ±65504,
    // the outputs stay finite and equal the CPU's over the same clamped values
    attention_case_scaled(&mut g, 18, 4, 2, 64, &[20, 20, 1, 1], KvDtype::F16, 1e5);
}

/// Decode after a context longer than 256 blocks of 64 (attend_combine merges its blocks in
/// chunks of 256), filled by store-only steps: GROUP 2 with head_dim 64, GROUP 4 with 128.
#[test]
fn decode_attention_over_more_than_256_blocks_matches() {
    let Some(mut g) = gpu("attention_long") else {
        return;
    };
    for dtype in [KvDtype::F16, KvDtype::F32] {
        attention_case(&mut g, 15, 4, 2, 64, &[16500, 16500, 1, 1, 3, 3], dtype);
    }
    attention_case(
        &mut g,
        16,
        8,
        2,
        128,
        &[STORE_ONLY, STORE_ONLY, 4, 4],
        KvDtype::F16,
    );
}

fn float_matrix(r: &mut ChaCha8Rng, rows: usize, cols: usize, dtype: FloatDtype) -> FloatMatrix {
    let vals = randn(r, rows * cols, 1.0);
    let data: Vec<u8> = match dtype {
        FloatDtype::Bf16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        FloatDtype::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        FloatDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // GGUF Q8_0 blocks: an f16 scale, then 32 int8 codes
        FloatDtype::Q8_0 => vals
            .chunks(32)
            .flat_map(|b| {
                let d = half::f16::from_f32(b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
                let inv = if d.to_f32() > 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                let q = b
                    .iter()
                    .map(move |v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8);
                d.to_bits().to_le_bytes().into_iter().chain(q)
            })
            .collect(),
    };
    FloatMatrix {
        name: format!("emb {dtype:?}"),
        rows,
        cols,
        dtype,
        data: ByteStorage::Owned(Arc::new(data)),
    }
}

#[test]
fn embedding_and_lm_head_match_cpu_for_every_dtype_and_chunking() {
    let Some(mut g) = gpu("embedding_lm_head") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(11);
    for dtype in [
        FloatDtype::Bf16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::Q8_0,
    ] {
        for &(vocab, cols, chunk) in &[
            (300, 37, None),
            (1001, 64, Some(64 * 100 * 4)),
            (77, 9, Some(4 * 8 * 5)),
            (130, 96, Some(96 * 4 * 9)),
        ] {
            if dtype == FloatDtype::Q8_0 && cols % 32 != 0 {
                continue; // Q8_0 rows are whole blocks of 32
            }
            g.set_max_chunk_bytes(chunk);
            let m = float_matrix(&mut r, vocab, cols, dtype);
            let ge = g.upload_embedding(&m).unwrap();
            for &n in &[1usize, 5, 11] {
                let tokens: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
                let what = format!("{dtype:?} vocab={vocab} cols={cols} chunk={chunk:?} n={n}");
                // embed
                let (mut ce, mut gemb) = both(&mut g, &[], n, cols);
                c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                c.embed(&m, &mut ce).unwrap();
                g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                g.embed(&ge, &mut gemb).unwrap();
                g.end_step().unwrap();
                assert_eq!(g.read(&gemb, n).unwrap(), ce.data, "embed {what}");
                // lm_head, both row selections
                let x = randn(&mut r, n * cols, 1.0);
                let (cx, gx) = both(&mut g, &x, n, cols);
                let (last, all) = (vec![n as u32 - 1], (0..n as u32).collect::<Vec<_>>());
                for rows in [&last[..], &all[..]] {
                    let out_rows = rows.len();
                    let (mut cl, mut gl) = both(&mut g, &[], n, vocab);
                    let ch = bitnet_wgpu::backend::cpu::CpuLmHead::Exact(m.clone());
                    c.lm_head(&ch, &cx, rows, &mut cl).unwrap();
                    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    g.lm_head(&ge, &gx, rows, &mut gl).unwrap();
                    g.end_step().unwrap();
                    assert_close(
                        &format!("lm_head {rows:?} {what}"),
                        &g.read(&gl, out_rows).unwrap(),
                        &cl.data[..out_rows * vocab],
                        1e-5,
                        1e-5,
                    );
                }
                // any subset of the rows in any order (the per-row steps' LM head)
                if n == 5 {
                    let (mut cl, _) = both(&mut g, &[], n, vocab);
                    let ch = bitnet_wgpu::backend::cpu::CpuLmHead::Exact(m.clone());
                    c.lm_head(&ch, &cx, &all, &mut cl).unwrap();
                    let (_, mut gl) = both(&mut g, &[], n, vocab);
                    let pick = [3u32, 0, 3, 4];
                    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    g.lm_head(&ge, &gx, &pick, &mut gl).unwrap();
                    g.end_step().unwrap();
                    let got = g.read(&gl, pick.len()).unwrap();
                    for (o, &t) in pick.iter().enumerate() {
                        // a row's logits do not depend on the rows computed beside it
                        let (_, mut alone) = both(&mut g, &[], 1, vocab);
                        g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                        g.lm_head(&ge, &gx, &[t], &mut alone).unwrap();
                        g.end_step().unwrap();
                        let alone = g.read(&alone, 1).unwrap();
                        let row = &got[o * vocab..(o + 1) * vocab];
                        for (i, (a, b)) in row.iter().zip(&alone).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{what} rows {pick:?}: logits row {o} column {i}: {a} beside others, {b} alone"
                            );
                        }
                        let t = t as usize;
                        assert_close(
                            &format!("lm_head rows {pick:?}: logits row {o} (step row {t}) {what}"),
                            &got[o * vocab..(o + 1) * vocab],
                            &cl.data[t * vocab..(t + 1) * vocab],
                            1e-5,
                            1e-5,
                        );
                    }
                    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    let err = g.lm_head(&ge, &gx, &[5], &mut gl).unwrap_err();
                    assert!(err.to_string().contains("row 5"), "{err}");
                    g.end_step().unwrap();
                }
            }
        }
    }
    g.set_max_chunk_bytes(None);
    // out-of-range tokens are a clean error, as on the CPU
    let m = float_matrix(&mut r, 10, 4, FloatDtype::Bf16);
    let ge = g.upload_embedding(&m).unwrap();
    let mut out = g.alloc(1, 4).unwrap();
    g.begin_step(&StepRow::sequence(&[10], 0)).unwrap();
    let err = g.embed(&ge, &mut out).unwrap_err();
    assert!(err.to_string().contains("10"), "{err}");
}

#[test]
fn final_norm_lm_head_is_norm_then_head_bit_for_bit_and_its_argmax_is_one_dispatch() {
    let Some(mut g) = gpu("norm_lm_head") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(21);
    let eps = 1e-5f32;
    for dtype in [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32] {
        // (vocab, cols, chunk bytes): one chunk, several chunks with a ragged last workgroup,
        // a row length that is not a multiple of the 16-byte vectors
        for &(vocab, cols, chunk) in &[
            (300, 37, None),
            (1001, 64, Some(64 * 100 * 4)),
            (777, 300, Some(300 * 4 * 130)),
        ] {
            g.set_max_chunk_bytes(chunk);
            let mut m = float_matrix(&mut r, vocab, cols, dtype);
            let norm: Vec<f32> = randn(&mut r, cols, 1.0).iter().map(|v| v + 1.5).collect();
            let gw = g.upload_vector(&norm).unwrap();
            for &n in &[1usize, 5] {
                let what = format!("{dtype:?} vocab={vocab} cols={cols} chunk={chunk:?} n={n}");
                let tokens: Vec<u32> = (0..n as u32).collect();
                let x = randn(&mut r, n * cols, 3.0);
                if n == 1 {
                    // A tie for the maximum between row 5, rows after it in the same block and
                    // workgroup (6, 9) and a row in the last workgroup (and chunk): the lowest
                    // index must win, as on the CPU. The rows hold the same values, so their
                    // logits are equal whatever the rounding.
                    let dup: Vec<f32> = (0..cols).map(|i| x[i] * norm[i] * 50.0).collect();
                    m = with_rows(&m, &[5, 6, 9, vocab - 2], &dup);
                }
                let ge = g.upload_embedding(&m).unwrap();
                let ch = bitnet_wgpu::backend::cpu::CpuLmHead::Exact(m.clone());
                let (cx, gx) = both(&mut g, &x, n, cols);
                let all: Vec<u32> = (0..n as u32).collect();
                for rows in [&[n as u32 - 1][..], &all[..]] {
                    let k = rows.len();
                    // GPU: fused, then rms_norm + lm_head
                    let (_, mut fused) = both(&mut g, &[], n, vocab);
                    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    g.rms_norm_lm_head(&ge, &gx, &gw, eps, rows, &mut fused)
                        .unwrap();
                    g.end_step().unwrap();
                    let before = g.counters();
                    let token = g.argmax_row0(&fused).unwrap();
                    let argmax_dispatches = g.counters().dispatches - before.dispatches;
                    let got = g.read(&fused, k).unwrap();
                    let (_, mut xn) = both(&mut g, &[], n, cols);
                    let (_, mut split) = both(&mut g, &[], n, vocab);
                    g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    g.rms_norm(&gx, &gw, eps, &mut xn).unwrap();
                    g.lm_head(&ge, &xn, rows, &mut split).unwrap();
                    g.end_step().unwrap();
                    let want = g.read(&split, k).unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{what} rows {rows:?}: logit {i}: fused {a}, norm then head {b}"
                        );
                    }
                    // the epilogue's argmax: one dispatch, the first maximum of the logits
                    assert_eq!(argmax_dispatches, 1, "{what}: argmax after the head");
                    let first = bitnet_wgpu::backend::cpu::argmax(&got[..vocab]) as u32;
                    assert_eq!(token, first, "{what} rows {rows:?}: argmax");
                    if n == 1 {
                        assert_eq!(token, 5, "{what}: the tie goes to the lower index");
                    }
                    // the CPU's fused op: its own rms_norm then lm_head exactly, and the GPU's
                    // logits within the float tolerance
                    let (mut cl, mut cn) = (cpu_tensor(&[], k, vocab), cpu_tensor(&[], n, cols));
                    c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                    c.rms_norm_lm_head(&ch, &cx, &norm, eps, rows, &mut cl)
                        .unwrap();
                    let mut cs = cpu_tensor(&[], k, vocab);
                    c.rms_norm(&cx, &norm, eps, &mut cn).unwrap();
                    c.lm_head(&ch, &cn, rows, &mut cs).unwrap();
                    assert_eq!(cl.data, cs.data, "{what} rows {rows:?}: CPU fused vs split");
                    assert_close(
                        &format!("norm+head {rows:?} {what}"),
                        &got,
                        &cl.data,
                        1e-4,
                        1e-4,
                    );
                }
                // Anything else writing the logits makes the epilogue stale: the argmax then
                // reads the new values (two dispatches).
                let (_, mut lg) = both(&mut g, &[], n, vocab);
                g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
                g.rms_norm_lm_head(&ge, &gx, &gw, eps, &[0], &mut lg)
                    .unwrap();
                g.end_step().unwrap();
                let mut v = vec![0.0f32; vocab];
                v[vocab / 3] = 1.0;
                g.write(&mut lg, &v).unwrap();
                let before = g.counters();
                assert_eq!(
                    g.argmax_row0(&lg).unwrap() as usize,
                    vocab / 3,
                    "{what}: stale"
                );
                assert_eq!(g.counters().dispatches - before.dispatches, 2, "{what}");
            }
        }
    }
    g.set_max_chunk_bytes(None);
}

/// `--lm-head q8` on the GPU: the CPU's format (int8 codes, one f32 scale per 64 columns, int16
/// input rounded half away from zero) and its logits within float-sum tolerance, with and
/// without the final norm, over several chunks; the argmax epilogue picks the first maximum of
/// the logits it wrote; an all-zero input row gives zero logits as on the CPU.
#[test]
fn q8_lm_head_matches_the_cpu_q8_head() {
    let Some(mut g) = gpu("q8_lm_head") else {
        return;
    };
    let mut c = cpu();
    let mut r = rng(22);
    let eps = 1e-5f32;
    for &(vocab, cols, chunk) in &[
        (300, 37, None),
        (1001, 128, Some(4 * 48 * 300)), // 4 chunks of 300 rows (48 words per row)
        (777, 300, None),
    ] {
        g.set_max_chunk_bytes(chunk);
        let m = float_matrix(&mut r, vocab, cols, FloatDtype::Bf16);
        let ge = g
            .upload_lm_head(&m, None, bitnet_wgpu::backend::HeadFormat::Q8)
            .unwrap();
        let ch = c
            .upload_lm_head(&m, None, bitnet_wgpu::backend::HeadFormat::Q8)
            .unwrap();
        let norm: Vec<f32> = randn(&mut r, cols, 1.0).iter().map(|v| v + 1.5).collect();
        let gw = g.upload_vector(&norm).unwrap();
        let n = 3usize;
        let tokens: Vec<u32> = (0..n as u32).collect();
        let mut x = randn(&mut r, n * cols, 3.0);
        x[2 * cols..].iter_mut().for_each(|v| *v = 0.0); // row 2: all zero
        let (cx, gx) = both(&mut g, &x, n, cols);
        let what = format!("q8 vocab={vocab} cols={cols} chunk={chunk:?}");
        for fused in [false, true] {
            let rows = [1u32, 0, 2];
            let (mut cl, mut gl) = both(&mut g, &[], n, vocab);
            c.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
            g.begin_step(&StepRow::sequence(&tokens, 0)).unwrap();
            if fused {
                c.rms_norm_lm_head(&ch, &cx, &norm, eps, &rows, &mut cl)
                    .unwrap();
                g.rms_norm_lm_head(&ge, &gx, &gw, eps, &rows, &mut gl)
                    .unwrap();
            } else {
                c.lm_head(&ch, &cx, &rows, &mut cl).unwrap();
                g.lm_head(&ge, &gx, &rows, &mut gl).unwrap();
            }
            g.end_step().unwrap();
            let token = g.argmax_row0(&gl).unwrap();
            let got = g.read(&gl, rows.len()).unwrap();
            let what = format!("{what} fused={fused}");
            assert_close(&what, &got, &cl.data[..rows.len() * vocab], 1e-4, 1e-4);
            assert_eq!(
                token,
                bitnet_wgpu::backend::cpu::argmax(&got[..vocab]) as u32,
                "{what}: argmax"
            );
            assert!(
                got[2 * vocab..].iter().all(|&v| v == 0.0),
                "{what}: the zero row's logits"
            );
        }
    }
    g.set_max_chunk_bytes(None);
    // q4 stays a CPU option, named in the error
    let m = float_matrix(&mut r, 10, 64, FloatDtype::Bf16);
    let err = g
        .upload_lm_head(&m, None, bitnet_wgpu::backend::HeadFormat::Q4)
        .unwrap_err();
    assert!(err.to_string().contains("q4"), "{err}");
}

/// One sampled pick on the device: `logits` as row 0, the step's row token `row_token`.
fn gpu_sample(
    g: &mut WgpuBackend,
    t: &mut bitnet_wgpu::backend::wgpu::GpuTensor,
    logits: &[f32],
    s: &bitnet_wgpu::backend::DeviceSample,
    row_token: u32,
) -> bitnet_wgpu::error::Result<u32> {
    g.write(t, logits).unwrap();
    g.begin_step(&StepRow::sequence(&[row_token], 0)).unwrap();
    g.sample_chain(t, s).unwrap();
    g.end_step().unwrap();
    g.read_chained()
}

/// The CPU sampler's candidates for `logits` with the penalty over `history`, and the distance
/// of `r` from the nearest boundary of their CDF.
fn cpu_pick(
    logits: &[f32],
    c: &bitnet_wgpu::sampler::SamplerConfig,
    history: &[u32],
    r: f32,
) -> (u32, f32) {
    use bitnet_wgpu::sampler::{apply_repeat_penalty, draw, filtered_probs};
    let mut l = logits.to_vec();
    apply_repeat_penalty(&mut l, history, c.repeat_last_n, c.repeat_penalty);
    if c.temperature == 0.0 {
        return (bitnet_wgpu::backend::cpu::argmax(&l) as u32, 1.0);
    }
    let probs = filtered_probs(&l, c);
    let mut acc = 0.0f32;
    let mut margin = f32::INFINITY;
    for &(_, p) in &probs {
        acc += p;
        margin = margin.min((r - acc).abs());
    }
    (draw(&probs, r), margin)
}

/// Sampling on the device picks the CPU sampler's token for the same uniform draw (penalty,
/// top-k incl. ties at the k-th value, temperature, min-p, top-p), across vocabulary sizes and
/// settings; draws within 1e-4 of a CDF boundary are skipped (the CPU normalises in f64, the
/// GPU in f32) and counted.
#[test]
fn device_sampling_picks_the_cpu_samplers_token_for_the_same_draw() {
    use bitnet_wgpu::backend::DeviceSample;
    use bitnet_wgpu::sampler::SamplerConfig;
    let Some(mut g) = gpu("device_sampling") else {
        return;
    };
    let mut r = rng(23);
    let base = SamplerConfig::default(); // T 0.8, top-k 40, top-p 0.95, min-p 0.05, penalty 1.1
    let configs = [
        base.clone(),
        SamplerConfig {
            top_k: 1,
            ..base.clone()
        },
        SamplerConfig {
            top_k: 1000,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.5,
            ..base.clone()
        },
        SamplerConfig {
            top_k: 7,
            top_p: 0.5,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..base.clone()
        },
        SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.3,
            ..base.clone()
        },
        SamplerConfig {
            temperature: 0.3,
            top_k: 64,
            repeat_penalty: 0.7,
            repeat_last_n: 3,
            ..base.clone()
        },
    ];
    let (mut compared, mut skipped) = (0, 0);
    for &vocab in &[50usize, 1000, 128256] {
        let mut t = g.alloc(1, vocab).unwrap();
        for c in &configs {
            for trial in 0..6 {
                let mut logits = randn(&mut r, vocab, 4.0);
                if trial == 1 {
                    // ties everywhere: values on a coarse grid
                    logits
                        .iter_mut()
                        .for_each(|v| *v = (*v * 2.0).round() / 2.0);
                }
                if trial == 2 {
                    logits[vocab / 2] = f32::NAN;
                    logits[vocab / 3] = f32::NEG_INFINITY;
                }
                let history: Vec<u32> = (0..70).map(|_| r.random_range(0..vocab as u32)).collect();
                let draw: f32 = r.random();
                let what = format!("vocab {vocab} {c:?} trial {trial} r {draw}");
                // a prefill pick (window = the history's tail) and a chained one (the last
                // token on the device only)
                for device_token in [false, true] {
                    let n = c.repeat_last_n.min(history.len());
                    let tail = &history[history.len() - n..];
                    let (window, row_token) = if device_token && n > 0 {
                        (&tail[..n - 1], tail[n - 1])
                    } else {
                        (tail, 0)
                    };
                    let s = DeviceSample {
                        config: c,
                        r: draw,
                        window,
                        device_token: device_token && n > 0,
                    };
                    let got = gpu_sample(&mut g, &mut t, &logits, &s, row_token).unwrap();
                    let (want, margin) = cpu_pick(&logits, c, &history, draw);
                    if margin < 1e-4 {
                        skipped += 1;
                        continue;
                    }
                    compared += 1;
                    assert_eq!(got, want, "{what} device_token {device_token}");
                }
            }
        }
    }
    eprintln!("device sampling: {compared} draws compared, {skipped} skipped near a boundary");
    assert!(
        skipped * 20 < compared,
        "{skipped} skipped of {}",
        compared + skipped
    );
    // no logit is a number: an error, as on the CPU
    let mut t = g.alloc(1, 10).unwrap();
    let s = DeviceSample {
        config: &base,
        r: 0.5,
        window: &[],
        device_token: false,
    };
    let err = gpu_sample(&mut g, &mut t, &[f32::NAN; 10], &s, 0).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
}

/// The device sampler's picks follow the CPU sampler's distribution on a small vocabulary: a
/// chi-square test over 2,000 seeded draws (p < 0.001 fails).
#[test]
fn device_sampling_follows_the_cpu_distribution() {
    use bitnet_wgpu::backend::DeviceSample;
    use bitnet_wgpu::sampler::{filtered_probs, SamplerConfig};
    let Some(mut g) = gpu("device_sampling_distribution") else {
        return;
    };
    let c = SamplerConfig {
        temperature: 1.0,
        top_k: 12,
        top_p: 0.9,
        min_p: 0.02,
        repeat_penalty: 1.0,
        ..Default::default()
    };
    let logits: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let probs = filtered_probs(&logits, &c);
    let mut t = g.alloc(1, 16).unwrap();
    let mut r = rng(24);
    let draws = 2000;
    let mut counts = [0usize; 16];
    for _ in 0..draws {
        let s = DeviceSample {
            config: &c,
            r: r.random(),
            window: &[],
            device_token: false,
        };
        counts[gpu_sample(&mut g, &mut t, &logits, &s, 0).unwrap() as usize] += 1;
    }
    let mut chi2 = 0.0;
    for &(id, p) in &probs {
        let e = p as f64 * draws as f64;
        chi2 += (counts[id as usize] as f64 - e).powi(2) / e;
    }
    let kept: Vec<u32> = probs.iter().map(|e| e.0).collect();
    for (id, &n) in counts.iter().enumerate() {
        assert!(
            n == 0 || kept.contains(&(id as u32)),
            "token {id} is outside top-k/top-p/min-p"
        );
    }
    // chi-square critical value at p = 0.001 for up to 11 degrees of freedom is 31.3
    assert!(
        chi2 < 31.3,
        "chi2 {chi2:.1} over {} tokens: {counts:?} vs {probs:?}",
        probs.len()
    );
}

/// `m` with `rows` replaced by `values` (`[cols]`), in its dtype.
fn with_rows(m: &FloatMatrix, rows: &[usize], values: &[f32]) -> FloatMatrix {
    let es = m.dtype.row_bytes(1);
    let mut data = m.data.as_slice().to_vec();
    let bytes: Vec<u8> = match m.dtype {
        FloatDtype::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        FloatDtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatDtype::Q8_0 => panic!("with_rows takes bf16, f16 or f32 matrices"),
    };
    for &row in rows {
        data[row * m.cols * es..(row + 1) * m.cols * es].copy_from_slice(&bytes);
    }
    FloatMatrix {
        name: m.name.clone(),
        rows: m.rows,
        cols: m.cols,
        dtype: m.dtype,
        data: ByteStorage::Owned(Arc::new(data)),
    }
}

#[test]
fn argmax_picks_the_first_maximum() {
    let Some(mut g) = gpu("argmax") else {
        return;
    };
    let mut r = rng(12);
    for &len in &[1usize, 5, 4095, 4096, 4097, 10000, 128256] {
        let mut v = randn(&mut r, len, 10.0);
        let mut t = g.alloc(2, len).unwrap();
        let places = [0, len / 2, len - 1];
        for &p in &places {
            v.iter_mut().for_each(|x| *x = x.min(10.0));
            v[p] = 11.0;
            // a tie later in the row loses
            if p + 1 < len {
                v[len - 1] = 11.0;
            }
            g.write(&mut t, &v).unwrap();
            let got = g.argmax_row0(&t).unwrap();
            assert_eq!(
                got as usize,
                bitnet_wgpu::backend::cpu::argmax(&v),
                "len {len} max at {p}"
            );
            v[len - 1] = 0.0;
            v[p] = 0.0;
        }
    }
}

#[test]
fn decode_steps_reuse_pipelines_and_bind_groups() {
    let Some(mut g) = gpu("reuse") else {
        return;
    };
    let mut r = rng(13);
    let (rows, cols) = (64, 48);
    let w = random_ternary(&mut r, rows, cols, 1.0);
    let gw = g.upload_linear(&w).unwrap();
    let x = g.alloc(8, cols).unwrap();
    let mut q = g.alloc_q(8, cols).unwrap();
    let mut y = g.alloc(8, rows).unwrap();
    let mut run = |g: &mut WgpuBackend, pos: usize| {
        g.begin_step(&StepRow::sequence(&[pos as u32], pos))
            .unwrap();
        g.quantize(&x, &mut q).unwrap();
        g.ternary_matmul(&gw, &q, &mut y).unwrap();
        g.end_step().unwrap();
        g.argmax_row0(&y).unwrap();
    };
    run(&mut g, 0);
    run(&mut g, 1);
    let before = (
        g.pipeline_count(),
        g.bind_group_count(),
        g.upload_buffer_count(),
    );
    for pos in 2..20 {
        run(&mut g, pos);
    }
    let after = (
        g.pipeline_count(),
        g.bind_group_count(),
        g.upload_buffer_count(),
    );
    assert_eq!(after, before, "(pipelines, bind groups, upload buffers)");
}

#[test]
fn device_loss_is_a_gpu_error_not_a_panic() {
    let Some(mut g) = gpu("device_loss") else {
        return;
    };
    let t = g.alloc(1, 16).unwrap();
    g.simulate_device_loss();
    let err = g
        .begin_step(&StepRow::sequence(&[0], 0))
        .and_then(|_| g.end_step())
        .and_then(|_| g.read(&t, 1).map(|_| ()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("device lost"), "{msg}");
    assert!(matches!(err, bitnet_wgpu::BitnetError::Gpu(_)), "{err:?}");
}

/// The per-row slot tests' layer: random q|k|v weights of `(heads, kv_heads, head_dim)` over
/// `hidden` inputs and random int8 input rows (with scales) for sequences of `lens` positions.
struct SlotSteps {
    gw: bitnet_wgpu::backend::wgpu::GpuLinear,
    shape: AttentionShape,
    data: Vec<(Vec<i8>, Vec<f32>)>, // per sequence: [positions, hidden] int8, [positions] scales
    hidden: usize,
    cap: usize, // rows of the step tensors
}

impl SlotSteps {
    fn new(
        g: &mut WgpuBackend,
        r: &mut ChaCha8Rng,
        (heads, kv_heads, hd): (usize, usize, usize),
        hidden: usize,
        lens: &[usize],
        cap: usize,
    ) -> Self {
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            rope_theta: 10000.0,
        };
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let parts = [
            random_ternary(r, qd, hidden, 0.05),
            random_ternary(r, kvd, hidden, 0.07),
            random_ternary(r, kvd, hidden, 0.03),
        ];
        let refs: Vec<&TernaryMatrix> = parts.iter().collect();
        let gw = g.upload_linears(&refs).unwrap();
        let data = lens
            .iter()
            .map(|&len| {
                let q = (0..len * hidden)
                    .map(|_| r.random_range(-128..=127))
                    .collect();
                let s = (0..len).map(|_| r.random_range(10f32..100.0)).collect();
                (q, s)
            })
            .collect();
        SlotSteps {
            gw,
            shape,
            data,
            hidden,
            cap,
        }
    }

    fn qd(&self) -> usize {
        self.shape.n_heads * self.shape.head_dim
    }

    fn kvd(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    /// One step over `rows` (sequence, position), each stored in cache slot `slot_of(sequence)`:
    /// q|k|v with RoPE and the KV store, then attention. Returns the attention output
    /// [rows, qd] and the dispatches the attention took.
    fn step(
        &self,
        g: &mut WgpuBackend,
        cache: &mut bitnet_wgpu::backend::wgpu::GpuKvCache,
        rows: &[(usize, usize)],
        slot_of: &dyn Fn(usize) -> u32,
    ) -> (Vec<f32>, u64) {
        let (hidden, qd) = (self.hidden, self.qd());
        let (mut q, mut sc) = (Vec::new(), Vec::new());
        for &(s, p) in rows {
            q.extend_from_slice(&self.data[s].0[p * hidden..(p + 1) * hidden]);
            sc.push(self.data[s].1[p]);
        }
        let mut xq = g.alloc_q(self.cap, hidden).unwrap();
        g.write_q(&mut xq, &q, &sc).unwrap();
        let mut gq = g.alloc(self.cap, qd).unwrap();
        let mut go = g.alloc(self.cap, qd).unwrap();
        let spec: Vec<StepRow> = rows
            .iter()
            .map(|&(s, p)| StepRow {
                token: 0,
                pos: p as u32,
                slot: slot_of(s),
            })
            .collect();
        g.begin_step(&spec).unwrap();
        g.qkv_rope_store(&self.gw, &xq, cache, 0, &self.shape, &mut gq)
            .unwrap();
        let before = g.dispatch_count();
        g.attention(&gq, cache, 0, &self.shape, &mut go).unwrap();
        let dispatches = g.dispatch_count() - before;
        g.end_step().unwrap();
        (g.read(&go, rows.len()).unwrap(), dispatches)
    }
}

/// Per-row positions and KV-cache slots: one step over rows of several sequences (slots) at
/// unrelated positions gives each row what it gets when its sequence runs alone in a one-slot
/// cache (RoPE at the row's own position, K/V stored at its (slot, pos) by the q|k|v epilogue,
/// attention over its own slot only). Covers the prefill kernels (22 mixed rows: attend_tiled,
/// whose tiles of 4 rows hold one or two runs of one slot) and the decode ones (4).
#[test]
fn rows_of_several_slots_at_different_positions_equal_each_sequence_alone() {
    let Some(mut g) = gpu("rows_of_several_slots") else {
        return;
    };
    let (ctx, hidden, cap) = (32usize, 24usize, 24usize);
    // (slot, history rows, new rows): C starts from position 0 in the mixed step.
    let seqs = [(0u32, 13usize, 1usize), (2, 9, 2), (1, 0, 1)];
    let lens: Vec<usize> = seqs.iter().map(|&(_, h, n)| h + n).collect();
    let case = SlotSteps::new(&mut g, &mut rng(21), (4, 2, 8), hidden, &lens, cap);
    let (gw, shape, qd, kvd) = (&case.gw, case.shape, case.qd(), case.kvd());
    // in both cache formats (the cache's word layout and slot offsets differ)
    for dtype in [KvDtype::F16, KvDtype::F32] {
        // Each sequence alone, slot 0 of its own cache: history step, then the new rows.
        let mut alone = Vec::new(); // per sequence: (history out, new out)
        for (s, &(_, h, n)) in seqs.iter().enumerate() {
            let mut cache = g.alloc_kv_cache(1, 1, ctx, kvd, dtype).unwrap();
            let hist: Vec<(usize, usize)> = (0..h).map(|p| (s, p)).collect();
            let ho = if h > 0 {
                case.step(&mut g, &mut cache, &hist, &|_| 0).0
            } else {
                Vec::new()
            };
            let new: Vec<(usize, usize)> = (h..h + n).map(|p| (s, p)).collect();
            alone.push((ho, case.step(&mut g, &mut cache, &new, &|_| 0).0));
        }
        // Mixed: one prefill step over every history row, then one step over every new row, with
        // the rows of different slots interleaved.
        let mut cache = g.alloc_kv_cache(1, 3, ctx, kvd, dtype).unwrap();
        let slot = |s: usize| seqs[s].0;
        // sequences 0 and 1 interleaved in runs of 1 to 4 rows (tiles of 4 rows hold up to
        // 3 runs), each in position order
        let order = [
            0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0,
        ];
        let mut next = [0usize; 2];
        let hist: Vec<(usize, usize)> = order
            .iter()
            .map(|&s| {
                next[s] += 1;
                (s, next[s] - 1)
            })
            .collect();
        let ho = case.step(&mut g, &mut cache, &hist, &slot).0;
        let new = [(0, 13), (1, 9), (2, 0), (1, 10)];
        let no = case.step(&mut g, &mut cache, &new, &slot).0;
        let mut seen = [0usize; 3];
        for (i, &(s, p)) in hist.iter().enumerate() {
            assert_eq!(p, seen[s]);
            seen[s] += 1;
            assert_close(
                &format!("{dtype:?} prefill row {i}: sequence {s} position {p}"),
                &ho[i * qd..(i + 1) * qd],
                &alone[s].0[p * qd..(p + 1) * qd],
                1e-6,
                1e-5,
            );
        }
        for (i, &(s, p)) in new.iter().enumerate() {
            let j = p - seqs[s].1;
            assert_close(
                &format!("{dtype:?} decode row {i}: sequence {s} position {p}"),
                &no[i * qd..(i + 1) * qd],
                &alone[s].1[j * qd..(j + 1) * qd],
                1e-6,
                1e-5,
            );
        }
    }
    // a slot past the cache is an error, not a wrong answer
    let mut small = g.alloc_kv_cache(1, 2, ctx, kvd, KvDtype::F16).unwrap();
    let xq = g.alloc_q(cap, hidden).unwrap();
    let mut q = g.alloc(cap, qd).unwrap();
    let mut o = g.alloc(cap, qd).unwrap();
    g.begin_step(&[StepRow {
        token: 0,
        pos: 0,
        slot: 2,
    }])
    .unwrap();
    let err = g
        .qkv_rope_store(gw, &xq, &mut small, 0, &shape, &mut q)
        .unwrap_err();
    assert!(err.to_string().contains("slot 2"), "{err}");
    let err = g.attention(&q, &small, 0, &shape, &mut o).unwrap_err();
    assert!(err.to_string().contains("slot 2"), "{err}");
    g.end_step().unwrap();
}

/// A one-token step's `rms_norm_quantize` runs as the prologue of the matmul that consumes it
/// (one dispatch for both, every consumer: plain, residual add, gate|up, q|k|v): the outputs and
/// the stored int8 row equal the two ops as separate dispatches (the prologue is row_ops.wgsl's
/// code and reduction order). Steps of several tokens (the multi-token mat-vec, the tiled
/// matmul) keep two dispatches and give the same results.
#[test]
fn norm_quantize_prologue_equals_separate_dispatches() {
    let Some(mut g) = gpu("norm_quantize_prologue") else {
        return;
    };
    let mut r = rng(44);
    let (heads, kv_heads, hd) = (4usize, 2usize, 8usize);
    let (qd, kvd) = (heads * hd, kv_heads * hd);
    let shape = AttentionShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: hd,
        rope_theta: 10000.0,
    };
    for &cols in &[44usize, 300, 2560] {
        let wn = randn(&mut r, cols, 1.5);
        let gwn = g.upload_vector(&wn).unwrap();
        let parts = [
            random_ternary(&mut r, qd, cols, 0.05),
            random_ternary(&mut r, kvd, cols, 0.07),
            random_ternary(&mut r, kvd, cols, 0.03),
        ];
        let refs: Vec<&TernaryMatrix> = parts.iter().collect();
        let qkv = g.upload_linears(&refs).unwrap();
        let (wg, wu) = (
            random_ternary(&mut r, 24, cols, 0.9),
            random_ternary(&mut r, 24, cols, 0.4),
        );
        let gu = g.upload_linears(&[&wg, &wu]).unwrap();
        let wo = g
            .upload_linear(&random_ternary(&mut r, 36, cols, 0.3))
            .unwrap();
        for n in [1usize, 3, 6] {
            let x = randn(&mut r, n * cols, 2.0);
            let acc0 = randn(&mut r, n * 36, 1.0);
            let tokens = vec![0u32; n];
            let rows = StepRow::sequence(&tokens, 2);
            let mut results = Vec::new();
            for fused in [true, false] {
                let (_, gx) = both(&mut g, &x, n, cols);
                let mut xq = g.alloc_q(n, cols).unwrap();
                let mut out = g.alloc(n, 36).unwrap();
                let (_, mut acc) = both(&mut g, &acc0, n, 36);
                let mut ffn = g.alloc(n, 24).unwrap();
                let mut q = g.alloc(n, qd).unwrap();
                let mut att = g.alloc(n, qd).unwrap();
                let mut cache = g.alloc_kv_cache(1, 1, 16, kvd, KvDtype::F16).unwrap();
                let mut dispatches = Vec::new();
                for op in 0..4 {
                    g.begin_step(&rows).unwrap();
                    let before = g.dispatch_count();
                    g.rms_norm_quantize(&gx, &gwn, 1e-5, &mut xq).unwrap();
                    if !fused {
                        g.end_step().unwrap();
                        g.begin_step(&rows).unwrap();
                    }
                    match op {
                        0 => g.ternary_matmul(&wo, &xq, &mut out).unwrap(),
                        1 => g.ternary_matmul_add(&wo, &xq, &mut acc).unwrap(),
                        2 => g.gate_up(&gu, &xq, FfnActivation::Relu2, &mut ffn).unwrap(),
                        _ => g
                            .qkv_rope_store(&qkv, &xq, &mut cache, 0, &shape, &mut q)
                            .unwrap(),
                    }
                    dispatches.push(g.dispatch_count() - before);
                    if op == 3 {
                        g.attention(&q, &cache, 0, &shape, &mut att).unwrap();
                    }
                    g.end_step().unwrap();
                }
                let one = if fused && n <= bitnet_wgpu::backend::wgpu::MATVEC_MAX_TOKENS {
                    1
                } else {
                    2
                };
                assert_eq!(dispatches, vec![one; 4], "cols={cols} n={n} fused={fused}");
                results.push((
                    g.read_q(&xq, n).unwrap(),
                    [&out, &acc, &ffn, &q, &att].map(|t| g.read(t, n).unwrap()),
                ));
            }
            let what = format!("cols={cols} n={n}");
            assert!(
                results[0].0 == results[1].0,
                "{what}: stored int8 rows differ"
            );
            let names = ["matmul", "matmul_add", "gate_up", "rotated q", "attention"];
            for (k, name) in names.iter().enumerate() {
                assert_close(
                    &format!("{what} {name}: prologue vs separate"),
                    &results[0].1[k],
                    &results[1].1[k],
                    0.0,
                    0.0,
                );
            }
        }
    }
}

/// A matmul that writes the held-back norm's input (here `x += W·norm_quantize(x)`) does not
/// take the norm as its prologue (a dispatch cannot read what it writes): the norm runs first,
/// as its own dispatch, and the result equals the ops in separate steps.
#[test]
fn a_matmul_writing_the_norm_input_runs_the_norm_first() {
    let Some(mut g) = gpu("norm_input_written") else {
        return;
    };
    let mut r = rng(45);
    let cols = 44;
    let wn = g.upload_vector(&randn(&mut r, cols, 1.0)).unwrap();
    let w = g
        .upload_linear(&random_ternary(&mut r, cols, cols, 0.3))
        .unwrap();
    let x = randn(&mut r, cols, 2.0);
    let mut got = Vec::new();
    for fused in [true, false] {
        let (_, mut gx) = both(&mut g, &x, 1, cols);
        let mut xq = g.alloc_q(1, cols).unwrap();
        let rows = StepRow::sequence(&[0], 0);
        g.begin_step(&rows).unwrap();
        let before = g.dispatch_count();
        g.rms_norm_quantize(&gx, &wn, 1e-5, &mut xq).unwrap();
        if !fused {
            g.end_step().unwrap();
            g.begin_step(&rows).unwrap();
        }
        g.ternary_matmul_add(&w, &xq, &mut gx).unwrap();
        g.end_step().unwrap();
        assert_eq!(g.dispatch_count() - before, 2, "fused={fused}");
        got.push(g.read(&gx, 1).unwrap());
    }
    assert_close("x += W·norm_quantize(x)", &got[0], &got[1], 0.0, 0.0);
}

/// A decode step of single rows of many slots (a batched decode of 20 sequences at unrelated
/// depths) runs the split attention (2 dispatches: blocks, then their merge) although it has more
/// than 16 rows, and every row equals its sequence decoded alone, in both cache formats.
#[test]
fn a_wide_decode_step_of_many_slots_equals_each_slot_alone() {
    let Some(mut g) = gpu("wide_decode_step") else {
        return;
    };
    let (ctx, hidden, slots, cap) = (80usize, 32usize, 20usize, 80usize);
    // slot s has a history of 3 + 7s mod 70 positions, then one decoded row
    let hist: Vec<usize> = (0..slots).map(|s| 3 + (7 * s) % 70).collect();
    let lens: Vec<usize> = hist.iter().map(|h| h + 1).collect();
    let case = SlotSteps::new(&mut g, &mut rng(31), (4, 2, 16), hidden, &lens, cap);
    let (qd, kvd) = (case.qd(), case.kvd());
    for dtype in [KvDtype::F16, KvDtype::F32] {
        // each sequence alone in a one-slot cache: its history, then its decoded row
        let mut alone = Vec::new();
        for (s, &h) in hist.iter().enumerate() {
            let mut cache = g.alloc_kv_cache(1, 1, ctx, kvd, dtype).unwrap();
            let rows: Vec<(usize, usize)> = (0..h).map(|p| (s, p)).collect();
            case.step(&mut g, &mut cache, &rows, &|_| 0);
            alone.push(case.step(&mut g, &mut cache, &[(s, h)], &|_| 0).0);
        }
        // all of them in one cache of `slots` slots: the histories one slot at a time, then
        // one step over the decoded rows of every slot, in a shuffled slot order
        let mut cache = g.alloc_kv_cache(1, slots, ctx, kvd, dtype).unwrap();
        let slot_of = |s: usize| (slots - 1 - s) as u32;
        for (s, &h) in hist.iter().enumerate() {
            let rows: Vec<(usize, usize)> = (0..h).map(|p| (s, p)).collect();
            case.step(&mut g, &mut cache, &rows, &slot_of);
        }
        let order: Vec<usize> = (0..slots).map(|i| (i * 7) % slots).collect();
        let rows: Vec<(usize, usize)> = order.iter().map(|&s| (s, hist[s])).collect();
        let (out, dispatches) = case.step(&mut g, &mut cache, &rows, &slot_of);
        assert_eq!(
            dispatches, 2,
            "{dtype:?}: split + combine for {slots} single rows"
        );
        for (i, &(s, p)) in rows.iter().enumerate() {
            assert_close(
                &format!("{dtype:?} row {i}: slot {s} at position {p}"),
                &out[i * qd..(i + 1) * qd],
                &alone[s],
                1e-6,
                1e-5,
            );
        }
    }
}
