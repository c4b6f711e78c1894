// Ternary × int8 matmul: y[t, r] = (Σ_c q[t, c] · W[r, c]) / s_t · out_scale, integer-exact.
//
// Weight layout on the device (repacked once at upload, still 2 bits per weight, never expanded):
//   w [ROWS, G] u32, G = 4 · ceil(in / 64) (rows padded to 64 columns with weight 0); word (r, g)
//   holds the codes (W + 1 ∈ {0, 1, 2}) of columns 16g .. 16g+15 of row r, column 16g + 4s + m
//   at bits 8m + 2s .. 8m + 2s + 1.
// So `(word >> 2s) & 0x03030303` is four code bytes that line up with the packed int8 activation
// word s of the group (columns 16g + 4s + m in byte m): one shift, one and, one dot4I8Packed per
// 4 weights. Σ q·W = Σ q·code − Σ q, and Σ q comes from the quantizer. Padding codes are 1.
//
// Two entry points over the same bindings: `matvec` for decode (few tokens: 16 lanes per row
// stream the row in 16-byte vectors (64 weights each), coalesced, then reduce) and
// `matmul_tiled` for prefill (64 rows × 32 tokens per workgroup, weight and activation tiles
// staged in workgroup memory, each weight word used for 32 tokens).

struct Linear {
    rows: u32,       // output features
    groups: u32,     // G: 16-column groups per row
    out_scale: f32,  // weight_scale (autobitlinear), 1/weight_scale (bitlinear), mean|W| (online)
    _pad: u32,
}

// Debug path for the tests: write f32(acc) (exact: |acc| ≤ 128·in < 2^24) instead of y.
override RAW_ACC: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> lin: Linear;
@group(0) @binding(2) var<storage, read> w: array<u32>;          // [ROWS, G] (matmul_tiled)
@group(0) @binding(2) var<storage, read> w4: array<vec4<u32>>;   // [ROWS, G / 4] (matvec)
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;   // [capacity, G] 16 int8 each
@group(0) @binding(4) var<storage, read> xmeta: array<u32>;      // [capacity, 2] (s bits, Σq)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;    // [capacity, ROWS]

const CODE_MASK: u32 = 0x03030303u;

// Σ over 16 columns of q · code for one weight word and the 16 int8 activations that match it.
fn dot16(wd: u32, a: vec4<u32>) -> i32 {
    return dot4I8Packed(a.x, wd & CODE_MASK)
        + dot4I8Packed(a.y, (wd >> 2u) & CODE_MASK)
        + dot4I8Packed(a.z, (wd >> 4u) & CODE_MASK)
        + dot4I8Packed(a.w, (wd >> 6u) & CODE_MASK);
}

fn store(t: u32, r: u32, acc_codes: i32) {
    let acc = acc_codes - bitcast<i32>(xmeta[t * 2u + 1u]);
    if RAW_ACC {
        y[t * lin.rows + r] = f32(acc);
    } else {
        // Same two roundings as the CPU backend: f = out_scale / s, then acc · f.
        let f = lin.out_scale / bitcast<f32>(xmeta[t * 2u]);
        y[t * lin.rows + r] = f32(acc) * f;
    }
}

// ---- decode: dispatch (ceil(ROWS / 16), n_tokens) ----
const MV_LANES: u32 = 16u; // threads per row
const MV_ROWS: u32 = 16u;  // rows per workgroup (16 × 16 = 256 threads)

var<workgroup> mv_part: array<i32, 256>;

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let lane = lid % MV_LANES;
    let r = wid.x * MV_ROWS + lid / MV_LANES;
    var acc = 0i;
    if r < lin.rows {
        let g4 = lin.groups / 4u; // 64-column vectors per row
        let wrow = r * g4;
        let xrow = t * lin.groups;
        for (var g = lane; g < g4; g += MV_LANES) {
            let wv = w4[wrow + g];
            let xb = xrow + 4u * g;
            acc += dot16(wv.x, xq[xb]) + dot16(wv.y, xq[xb + 1u])
                + dot16(wv.z, xq[xb + 2u]) + dot16(wv.w, xq[xb + 3u]);
        }
    }
    mv_part[lid] = acc;
    workgroupBarrier();
    for (var s = MV_LANES / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            mv_part[lid] += mv_part[lid + s];
        }
        workgroupBarrier();
    }
    if lane == 0u && r < lin.rows {
        store(t, r, mv_part[lid]);
    }
}

// ---- prefill: dispatch (ceil(ROWS / TM), ceil(n_tokens / TN)) ----
const TM: u32 = 64u; // rows per tile
const TN: u32 = 32u; // tokens per tile
const TK: u32 = 8u;  // 16-column groups per k-step (32 contiguous bytes of each weight row)

var<workgroup> w_tile: array<u32, 512>;        // [TM, TK]
var<workgroup> x_tile: array<vec4<u32>, 256>;  // [TN, TK]

@compute @workgroup_size(256)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = step.n_tokens;
    let r0 = wid.x * TM;
    let t0 = wid.y * TN;
    if t0 >= n {
        return;
    }
    // Thread (tx, ty) owns tokens t0 + tx, t0 + tx + 16 and rows r0 + ty + 16i, i in 0..4.
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<i32, 8>; // [row i][token j] at i * 2 + j, zero-initialised
    for (var g0 = 0u; g0 < lin.groups; g0 += TK) {
        // 512 weight words, two per thread; rows of the tile read 32 contiguous bytes each.
        for (var e = lid; e < TM * TK; e += 256u) {
            let r = r0 + e / TK;
            let g = g0 + e % TK;
            var v = 0x55555555u; // code 1 = weight 0
            if r < lin.rows && g < lin.groups {
                v = w[r * lin.groups + g];
            }
            w_tile[e] = v;
        }
        {
            let t = t0 + lid / TK;
            let g = g0 + lid % TK;
            var v = vec4<u32>(0u);
            if t < n && g < lin.groups {
                v = xq[t * lin.groups + g];
            }
            x_tile[lid] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a0 = x_tile[tx * TK + kk];
            let a1 = x_tile[(tx + 16u) * TK + kk];
            for (var i = 0u; i < 4u; i++) {
                let wd = w_tile[(ty + 16u * i) * TK + kk];
                let c0 = wd & CODE_MASK;
                let c1 = (wd >> 2u) & CODE_MASK;
                let c2 = (wd >> 4u) & CODE_MASK;
                let c3 = (wd >> 6u) & CODE_MASK;
                acc[i * 2u] += dot4I8Packed(a0.x, c0) + dot4I8Packed(a0.y, c1)
                    + dot4I8Packed(a0.z, c2) + dot4I8Packed(a0.w, c3);
                acc[i * 2u + 1u] += dot4I8Packed(a1.x, c0) + dot4I8Packed(a1.y, c1)
                    + dot4I8Packed(a1.z, c2) + dot4I8Packed(a1.w, c3);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + ty + 16u * i;
        for (var j = 0u; j < 2u; j++) {
            let t = t0 + tx + 16u * j;
            if r < lin.rows && t < n {
                store(t, r, acc[i * 2u + j]);
            }
        }
    }
}
