// Row-wise ops of the residual stream, one workgroup per row, in one kernel whose flags make
// the three ops of the Backend trait:
//
//   NORM            xn = w · (a · 1 / sqrt(mean(a²) + EPS))   (rms_norm, the CPU backend's formula)
//   QUANT           q = clamp(round_half_even(u · s), -128, 127), s = 127 / max(absmax(u), 1e-5),
//                   u = a; meta = (s, Σq)                       (quantize: BitLinear's quantizer)
//   NORM and QUANT  the same with u = the normed row, which is not stored (rms_norm_quantize:
//                   u is recomputed from a and the norm factor, bit-identical to xn)
//
// Each thread owns whole 4-column words (columns 4wi .. 4wi+3, wi = lid, lid + WG, ...) in every
// pass. The f32 sum of squares is a workgroup reduction (reduce_*.wgsl: a tree, or subgroup sums;
// the CPU sums sequentially, so the two differ by rounding, ~1e-7 relative); absmax is exact in any order, so with a correctly rounded
// division the quantization equals the CPU's bit for bit (WGSL round() is half-to-even).
//
// Quantized layout, the one the ternary matmul consumes: q [capacity, QW] u32 with 4 int8 per u32
// (column 4w+k in byte k of word w), QW = 16 · ceil(COLS / 64): rows padded with zeros to a
// multiple of 64 columns, the matmul's 16-byte weight vectors; meta [capacity, 2] = (bitcast(s),
// Σq). The matmul multiplies by the codes w + 1 and subtracts Σq.

override COLS: u32 = 1u;   // row length
override QW: u32 = 4u;     // u32 words per quantized row
override EPS: f32 = 1e-5;  // rms_norm_eps
override NORM: bool = false;
override QUANT: bool = false;

override WG: u32 = 256u; // threads per row (host: row_ops.rs ROW_OPS_WG; a power of two ≤ 256)

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> a: array<f32>;           // [capacity, COLS] input
@group(0) @binding(2) var<storage, read> w: array<f32>;           // [COLS] norm weight
@group(0) @binding(3) var<storage, read_write> xn: array<f32>;    // [capacity, COLS] normed
@group(0) @binding(4) var<storage, read_write> q: array<u32>;     // [capacity, QW] int8 × 4
@group(0) @binding(5) var<storage, read_write> qmeta: array<u32>; // [capacity, 2] (s bits, Σq)

@compute @workgroup_size(WG)
fn row_ops(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           th: Thread) {
    let lid = thread_index(th);
    let row = linear_wg(wid, nwg);
    if row >= step.n_tokens {
        return;
    }
    let base = row * COLS;
    let words = (COLS + 3u) / 4u;
    // pass 1: Σa² for the norm, |a| max for a quantize without norm
    var ss = 0.0;
    var m = 0.0;
    for (var wi = lid; wi < words; wi += WG) {
        for (var k = 0u; k < 4u; k++) {
            let col = wi * 4u + k;
            if col < COLS {
                let v = a[base + col];
                ss += v * v;
                m = max(m, abs(v));
            }
        }
    }
    // pass 2: the norm (stored without QUANT; its absmax with QUANT)
    var inv = 1.0;
    if NORM {
        inv = 1.0 / sqrt(wg_sum_f32(th, WG, ss) / f32(COLS) + EPS);
        m = 0.0;
        for (var wi = lid; wi < words; wi += WG) {
            for (var k = 0u; k < 4u; k++) {
                let col = wi * 4u + k;
                if col < COLS {
                    let i = base + col;
                    let y = w[col] * (a[i] * inv);
                    if !QUANT {
                        xn[i] = y;
                    }
                    m = max(m, abs(y));
                }
            }
        }
    }
    // pass 3: int8 quantization of the normed row (NORM) or of a
    if QUANT {
        let scale = 127.0 / max(wg_max_f32(th, WG, m), 1e-5);
        var sum = 0i;
        for (var wi = lid; wi < QW; wi += WG) {
            var packed = 0u;
            for (var k = 0u; k < 4u; k++) {
                let col = wi * 4u + k;
                if col < COLS {
                    var u = a[base + col];
                    if NORM {
                        u = w[col] * (u * inv);
                    }
                    let v = i32(clamp(round(u * scale), -128.0, 127.0));
                    sum += v;
                    packed |= (u32(v) & 0xffu) << (8u * k);
                }
            }
            q[row * QW + wi] = packed;
        }
        let total = wg_sum_i32(th, WG, sum);
        if lid == 0u {
            qmeta[row * 2u] = bitcast<u32>(scale);
            qmeta[row * 2u + 1u] = bitcast<u32>(total);
        }
    }
}
