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
// pass. The f32 sum of squares is a tree reduction (the CPU sums sequentially, so the two differ
// by rounding, ~1e-7 relative); absmax is exact in any order, so with a correctly rounded
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

override WG: u32 = 256u; // threads per row (host: row_ops.rs ROW_OPS_WG; a power of two)

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> a: array<f32>;           // [capacity, COLS] input
@group(0) @binding(2) var<storage, read> w: array<f32>;           // [COLS] norm weight
@group(0) @binding(3) var<storage, read_write> xn: array<f32>;    // [capacity, COLS] normed
@group(0) @binding(4) var<storage, read_write> q: array<u32>;     // [capacity, QW] int8 × 4
@group(0) @binding(5) var<storage, read_write> qmeta: array<u32>; // [capacity, 2] (s bits, Σq)

var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_i: array<i32, WG>;

fn reduce_sum_f(lid: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red_f[lid] += red_f[lid + s];
        }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier(); // red_f is reused by the next reduction
    return r;
}

fn reduce_max_f(lid: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red_f[lid] = max(red_f[lid], red_f[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn row_ops(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
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
        inv = 1.0 / sqrt(reduce_sum_f(lid, ss) / f32(COLS) + EPS);
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
        let scale = 127.0 / max(reduce_max_f(lid, m), 1e-5);
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
        red_i[lid] = sum;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if lid < s {
                red_i[lid] += red_i[lid + s];
            }
            workgroupBarrier();
        }
        if lid == 0u {
            qmeta[row * 2u] = bitcast<u32>(scale);
            qmeta[row * 2u + 1u] = bitcast<u32>(red_i[0]);
        }
    }
}
