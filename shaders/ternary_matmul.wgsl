// Ternary × int8 matmul: y[t, r] = (Σ_c q[t, c] · W[r, c]) / s_t · out_scale(r), integer-exact,
// with the epilogue of a fused op.
//
// Weight layout on the device (repacked once at upload, still 2 bits per weight, never expanded):
//   w [ROWS, G] u32, G = 4 · ceil(in / 64) (rows padded to 64 columns with weight 0); word (r, g)
//   holds the codes (W + 1 ∈ {0, 1, 2}) of columns 16g .. 16g+15 of row r, column 16g + 4s + m
//   at bits 8m + 2s .. 8m + 2s + 1.
// So `(word >> 2s) & 0x03030303` is four code bytes that line up with the packed int8 activation
// word s of the group (columns 16g + 4s + m in byte m): one shift, one and, one dot4I8Packed per
// 4 weights. Σ q·W = Σ q·code − Σ q, and Σ q comes from the quantizer. Padding codes are 1.
//
// A matrix may be the row-concatenation of up to 4 parts (q|k|v, gate|up): the integer
// accumulation does not know, the scale is the part's (`lin.ends` / `lin.scales`).
//
// Entry points over the same accumulation code: `matvec` for decode (one token: 16 lanes per
// row stream the row in 16-byte vectors (64 weights each), coalesced, then reduce),
// `matvec_multi` for steps of a few tokens (the same, each weight vector used for all of them) and
// `matmul_tiled` for prefill (128 rows × 32 or 64 tokens per workgroup, weight and activation
// tiles staged in workgroup memory, each weight word used for every token of the tile); `matvec_qkv` and
// `matmul_tiled_qkv` are the same with the RoPE / KV-cache epilogue and its extra bindings.
//
// Prologue (the _pro entry points, decode only): the step's input is not yet quantized; each
// workgroup (PRO_BLOCKS blocks of 16 rows, to amortise it) computes rms_norm + quantize of its
// token's f32 row `px` itself (row_ops.wgsl's
// code and reduction order, so the codes are the same in every workgroup), keeps the int8 row
// in workgroup memory, and workgroup x = 0 also stores it (q and (s, Σq)) as the op's QTensor.
//
// Epilogues (MODE): 0 y = v; 1 y += v (residual add); 2 y = relu(g)²·u; 3 y = silu(g)·u
// (g, u: rows r and r + PAIR of the product, y [capacity, ROWS / 2]); 4 (the _qkv entry points)
// RoPE of the q and k rows, q to y, k and v to the KV cache at the row's (slot, pos).
// Paired epilogues (PAIR > 0) need rows r and r + PAIR in one invocation: a block of B rows
// (16 for matvec, 128 for the tiled kernel) then holds B/2 pairs, its local row lr standing for
// pair B/2·blk + lr % (B/2), first (lr < B/2) or second row. Pairs are numbered so that pair p
// is row (p / PAIR)·2·PAIR + p % PAIR and its partner PAIR rows later (gate|up: PAIR = i, one
// run; q|k|v: PAIR = head_dim / 2, every head is a run).

struct Linear {
    rows: u32,          // output features (Σ of the parts)
    groups: u32,        // G: 16-column groups per row
    _pad0: u32,
    _pad1: u32,
    ends: vec4<u32>,    // end row of each part (unused parts: rows)
    scales: vec4<f32>,  // out_scale of each part: weight_scale, 1/weight_scale or mean|W|
}

// Debug path for the tests: write f32(acc) (exact: |acc| ≤ 128·in < 2^24) instead of y.
override RAW_ACC: bool = false;
override MODE: u32 = 0u;
override PAIR: u32 = 0u;    // paired epilogue: partner row offset (0: unpaired)
// MODE 4 only: the attention shape and the cache length
override HEADS: u32 = 1u;
override KV_HEADS: u32 = 1u;
override HD: u32 = 2u;
override CTX: u32 = 1u;
override KV_F16: bool = true; // the cache's element type: f16 pairs or f32
const F16_MAX: f32 = 65504.0;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> lin: Linear;
@group(0) @binding(2) var<storage, read> w4: array<vec4<u32>>;   // [ROWS, G / 4]
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;   // [capacity, G] 16 int8 each
@group(0) @binding(4) var<storage, read> xmeta: array<u32>;      // [capacity, 2] (s bits, Σq)
// MODE 0, 1: [capacity, ROWS]; MODE 2, 3: [capacity, ROWS / 2]; MODE 4: q [capacity, HEADS·HD]
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// the _pro entry points only: the quantized row they compute
@group(0) @binding(3) var<storage, read_write> xq_out: array<u32>;    // [capacity, 4 G]
@group(0) @binding(4) var<storage, read_write> xmeta_out: array<u32>; // [capacity, 2]
// MODE 4 only
@group(0) @binding(6) var<storage, read> qkv_rows: array<vec4<u32>>; // [n] (token, pos, slot, 0)
@group(0) @binding(7) var<storage, read> rope_cs: array<vec2<f32>>;  // [positions, HD / 2] (cos, sin)
// The KV cache as u32 words (attention.wgsl's layout): KV_F16 [slots, CTX, KV_HEADS, HD / 2],
// word i of a head = pack2x16float(x[i], x[i + HD/2]); else f32 bits [slots, CTX, KV_HEADS·HD].
@group(0) @binding(8) var<storage, read_write> kc: array<u32>;
@group(0) @binding(9) var<storage, read_write> vc: array<u32>;
// the _pro entry points only (6..9 are dummies outside MODE 4)
@group(0) @binding(10) var<storage, read> px: array<f32>;            // [capacity, PCOLS] input rows
@group(0) @binding(11) var<storage, read> pw: array<f32>;            // [PCOLS] norm weight

// mat-vec kernels: 64-column vectors per weight row (lin.groups / 4), as a pipeline constant so
// that the lanes' loop over a row has a constant trip count and unrolls (0: read lin.groups)
override MV_G4: u32 = 0u;

// 64-column vectors per weight row.
fn row_vectors() -> u32 {
    if MV_G4 > 0u {
        return MV_G4;
    }
    return lin.groups / 4u;
}

override PCOLS: u32 = 1u;  // prologue: row length (= 16 G minus padding)
override PQW: u32 = 4u;    // prologue: u32 words per quantized row, 4 G
override PEPS: f32 = 1e-5; // prologue: rms_norm_eps
override PRO_BLOCKS: u32 = 4u; // prologue: 16-row blocks per workgroup (amortises the prologue)

const CODE_MASK: u32 = 0x03030303u;

// Σ over 16 columns of q · code for one weight word and the 16 int8 activations that match it.
fn dot16(wd: u32, a: vec4<u32>) -> i32 {
    return dot4I8Packed(a.x, wd & CODE_MASK)
        + dot4I8Packed(a.y, (wd >> 2u) & CODE_MASK)
        + dot4I8Packed(a.z, (wd >> 4u) & CODE_MASK)
        + dot4I8Packed(a.w, (wd >> 6u) & CODE_MASK);
}

// The output row of local row `lr` of block `blk` of `b` rows (see the header).
fn block_row(blk: u32, lr: u32, b: u32) -> u32 {
    if PAIR == 0u {
        return blk * b + lr;
    }
    let h = b / 2u;
    let pair = blk * h + lr % h;
    let run = max(PAIR, 1u); // (PAIR > 0 here; the max keeps PAIR = 0 pipelines valid)
    return (pair / run) * 2u * run + pair % run + (lr / h) * run;
}

// The out_scale of the part holding row r.
fn part_scale(r: u32) -> f32 {
    var s = lin.scales.w;
    if r < lin.ends.z {
        s = lin.scales.z;
    }
    if r < lin.ends.y {
        s = lin.scales.y;
    }
    if r < lin.ends.x {
        s = lin.scales.x;
    }
    return s;
}

// The product of row r from its code accumulator and its token's (s bits, Σq).
fn scaled(r: u32, acc_codes: i32, sm: vec2<u32>) -> f32 {
    let acc = acc_codes - bitcast<i32>(sm.y);
    if RAW_ACC {
        return f32(acc);
    }
    // Same two roundings as the CPU backend: f = out_scale / s, then acc · f.
    let f = part_scale(r) / bitcast<f32>(sm.x);
    return f32(acc) * f;
}

// The product of row r for token t from its code accumulator (the quantized input in memory).
fn value(t: u32, r: u32, acc_codes: i32) -> f32 {
    return scaled(r, acc_codes, token_meta(t));
}

// MODE 0 / 1: one row.
fn put(t: u32, r: u32, v: f32) {
    let i = t * lin.rows + r;
    if MODE == 1u {
        y[i] = y[i] + v;
    } else {
        y[i] = v;
    }
}

// MODE 2 / 3: the gated product of gate row r and up row r + PAIR into column r.
fn put_gated(t: u32, r: u32, g: f32, u: f32) {
    var a: f32;
    if MODE == 2u {
        let p = max(g, 0.0);
        a = p * p * u; // (r·r)·u, as the CPU backend
    } else {
        // the CPU's formula; exp(-g) overflows to inf below g ≈ -88, giving -0
        a = g / (1.0 + exp(-g)) * u;
    }
    y[t * (lin.rows / 2u) + r] = a;
}

// MODE 4: rows r = head·HD + j (j < HD/2) and r + HD/2 of q|k|v for token t: RoPE of q and k
// heads at the row's position (the CPU's rope_head_with), q into y, k and v into the cache.
fn put_qkv(t: u32, r: u32, a: f32, b: f32) {
    let half = HD / 2u;
    let qd = HEADS * HD;
    let kvd = KV_HEADS * HD;
    let row = qkv_rows[t];
    var x0 = a;
    var x1 = b;
    if r < qd + kvd {
        let f = rope_cs[row.y * half + r % HD];
        x0 = a * f.x - b * f.y;
        x1 = b * f.x + a * f.y;
    }
    if r < qd {
        let i = t * qd + r;
        y[i] = x0;
        y[i + half] = x1;
    } else if KV_F16 {
        // one whole word per thread: the pair (j, j + HD/2) of its head, j = r % HD < HD/2
        let e = r - qd; // k: e < kvd; v: kvd + ...
        let dst = (row.z * CTX + row.y) * (kvd / 2u); // (slot, pos) of row t, in words
        // clamped to the finite halves: pack2x16float of a larger value is indeterminate
        let word = pack2x16float(clamp(vec2<f32>(x0, x1), vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX)));
        if e < kvd {
            kc[dst + (e / HD) * half + e % HD] = word;
        } else {
            vc[dst + ((e - kvd) / HD) * half + (e - kvd) % HD] = word;
        }
    } else {
        let dst = (row.z * CTX + row.y) * kvd; // (slot, pos) of row t in the cache
        if r < qd + kvd {
            kc[dst + r - qd] = bitcast<u32>(x0);
            kc[dst + r - qd + half] = bitcast<u32>(x1);
        } else {
            vc[dst + r - qd - kvd] = bitcast<u32>(x0);
            vc[dst + r - qd - kvd + half] = bitcast<u32>(x1);
        }
    }
}

// ---- decode: dispatch (ceil(ROWS / 16), n_tokens) ----
const MV_LANES: u32 = 16u; // threads per row
const MV_ROWS: u32 = 16u;  // rows per workgroup (16 × 16 = 256 threads)

// the code accumulators [MT_MAX, MV_ROWS]: (token slot j, local row) of the multi-token kernel;
// the single-token kernels use j = 0
var<workgroup> mv_row: array<i32, 128>;

// Sums the 16 lanes of each local row j (thread numbers 16 j .. 16 j + 15, the reduction
// library's lanes_sum_i32: shuffles where the subgroup holds a row) into mv_row[j].
fn mv_reduce(th: Thread, acc: i32) {
    let lid = thread_index(th);
    let total = lanes_sum_i32(th, MV_LANES, acc);
    if lid % MV_LANES == 0u {
        mv_row[lid / MV_LANES] = total;
    }
    workgroupBarrier();
}

// Leaves the code accumulator of local row j of block `blk` in mv_row[j] (all threads).
fn mv_accumulate(blk: u32, t: u32, th: Thread) {
    let lid = thread_index(th);
    let lane = lid % MV_LANES;
    let r = block_row(blk, lid / MV_LANES, MV_ROWS);
    var acc = 0i;
    if r < lin.rows {
        let g4 = row_vectors();
        let wrow = r * g4;
        let xrow = t * lin.groups;
        for (var g = lane; g < g4; g += MV_LANES) {
            let wv = w4[wrow + g];
            let xb = xrow + 4u * g;
            acc += dot16(wv.x, xq[xb]) + dot16(wv.y, xq[xb + 1u])
                + dot16(wv.z, xq[xb + 2u]) + dot16(wv.w, xq[xb + 3u]);
        }
    }
    mv_reduce(th, acc);
}

// ---- the prologue: rms_norm + quantize of row t into workgroup memory (row_ops.wgsl with
// WG = 256, NORM and QUANT) ----
// The quantized row, 16 int8 per vec4 (one 16-column group), stored transposed: group 4g + j
// at [j · G/4 + g], so that the 16 lanes of a row, reading vectors g, g+1, ..., read
// consecutive vec4s (no bank conflicts) in mv_accumulate_pro.
var<workgroup> pro_q4: array<vec4<u32>, PQW / 4u>;
var<workgroup> pro_meta: vec2<u32>;         // (s bits, Σq)

fn prologue(t: u32, th: Thread, store: bool) {
    let lid = thread_index(th);
    let base = t * PCOLS;
    let words = (PCOLS + 3u) / 4u;
    var ss = 0.0;
    for (var wi = lid; wi < words; wi += 256u) {
        for (var k = 0u; k < 4u; k++) {
            let col = wi * 4u + k;
            if col < PCOLS {
                let v = px[base + col];
                ss += v * v;
            }
        }
    }
    let inv = 1.0 / sqrt(wg_sum_f32(th, 256u, ss) / f32(PCOLS) + PEPS);
    var m = 0.0;
    for (var wi = lid; wi < words; wi += 256u) {
        for (var k = 0u; k < 4u; k++) {
            let col = wi * 4u + k;
            if col < PCOLS {
                m = max(m, abs(pw[col] * (px[base + col] * inv)));
            }
        }
    }
    let scale = 127.0 / max(wg_max_f32(th, 256u, m), 1e-5);
    var sum = 0i;
    let g4 = PQW / 16u; // 64-column vectors per row
    for (var v = lid; v < PQW / 4u; v += 256u) {
        // group v: words 4v .. 4v+3
        var group = vec4<u32>(0u);
        for (var k4 = 0u; k4 < 4u; k4++) {
            let wi = 4u * v + k4;
            var packed = 0u;
            for (var k = 0u; k < 4u; k++) {
                let col = wi * 4u + k;
                if col < PCOLS {
                    let u = pw[col] * (px[base + col] * inv);
                    let q = i32(clamp(round(u * scale), -128.0, 127.0));
                    sum += q;
                    packed |= (u32(q) & 0xffu) << (8u * k);
                }
            }
            group[k4] = packed;
            if store {
                xq_out[t * PQW + wi] = packed;
            }
        }
        pro_q4[(v % 4u) * g4 + v / 4u] = group;
    }
    let total = wg_sum_i32(th, 256u, sum);
    if lid == 0u {
        pro_meta = vec2<u32>(bitcast<u32>(scale), bitcast<u32>(total));
        if store {
            xmeta_out[t * 2u] = pro_meta.x;
            xmeta_out[t * 2u + 1u] = pro_meta.y;
        }
    }
    workgroupBarrier();
}

// mv_accumulate over the prologue's row in workgroup memory.
fn mv_accumulate_pro(blk: u32, th: Thread) {
    let lid = thread_index(th);
    let lane = lid % MV_LANES;
    let r = block_row(blk, lid / MV_LANES, MV_ROWS);
    var acc = 0i;
    if r < lin.rows {
        let g4 = row_vectors();
        let wrow = r * g4;
        for (var g = lane; g < g4; g += MV_LANES) {
            let wv = w4[wrow + g];
            acc += dot16(wv.x, pro_q4[g]) + dot16(wv.y, pro_q4[g4 + g])
                + dot16(wv.z, pro_q4[2u * g4 + g]) + dot16(wv.w, pro_q4[3u * g4 + g]);
        }
    }
    mv_reduce(th, acc);
}

// The token's (s bits, Σq) from its quantized row's meta in memory.
fn token_meta(t: u32) -> vec2<u32> {
    return vec2<u32>(xmeta[t * 2u], xmeta[t * 2u + 1u]);
}

// The epilogue for token t, given its (s bits, Σq), by the thread of local row lr (< 16), from
// the accumulators of token slot j (mv_row[j · 16 ..]).
fn mv_finish(blk: u32, t: u32, lr: u32, sm: vec2<u32>, j: u32) {
    let acc = j * MV_ROWS;
    if PAIR == 0u {
        if lr < MV_ROWS {
            let r = block_row(blk, lr, MV_ROWS);
            if r < lin.rows {
                put(t, r, scaled(r, mv_row[acc + lr], sm));
            }
        }
    } else if lr < MV_ROWS / 2u {
        let r = block_row(blk, lr, MV_ROWS);
        if r < lin.rows {
            let g = scaled(r, mv_row[acc + lr], sm);
            let u = scaled(r + PAIR, mv_row[acc + lr + MV_ROWS / 2u], sm);
            put_gated(t, r, g, u);
        }
    }
}

// The epilogue of the q|k|v entry points (as mv_finish).
fn mv_finish_qkv(blk: u32, t: u32, lr: u32, sm: vec2<u32>, j: u32) {
    let acc = j * MV_ROWS;
    if lr < MV_ROWS / 2u {
        let r = block_row(blk, lr, MV_ROWS);
        if r < lin.rows {
            let a = scaled(r, mv_row[acc + lr], sm);
            let b = scaled(r + PAIR, mv_row[acc + lr + MV_ROWS / 2u], sm);
            put_qkv(t, r, a, b);
        }
    }
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    mv_accumulate(wid.x, t, th);
    mv_finish(wid.x, t, lid, token_meta(t), 0u);
}

@compute @workgroup_size(256)
fn matvec_pro(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    prologue(t, th, wid.x == 0u);
    for (var b = 0u; b < PRO_BLOCKS; b++) {
        let blk = wid.x * PRO_BLOCKS + b;
        mv_accumulate_pro(blk, th);
        mv_finish(blk, t, lid, pro_meta, 0u);
        workgroupBarrier(); // mv_row is rewritten by the next block
    }
}

@compute @workgroup_size(256)
fn matvec_qkv(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    mv_accumulate(wid.x, t, th);
    mv_finish_qkv(wid.x, t, lid, token_meta(t), 0u);
}

@compute @workgroup_size(256)
fn matvec_qkv_pro(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    prologue(t, th, wid.x == 0u);
    for (var b = 0u; b < PRO_BLOCKS; b++) {
        let blk = wid.x * PRO_BLOCKS + b;
        mv_accumulate_pro(blk, th);
        mv_finish_qkv(blk, t, lid, pro_meta, 0u);
        workgroupBarrier(); // mv_row is rewritten by the next block
    }
}

// ---- small batches: dispatch (ceil(ROWS / 16), ceil(n_tokens / MT)) ----
// A step of a few tokens (rows of several sequences in a batched decode, a short prompt
// chunk): matvec's 16 rows × 16 lanes per workgroup, but every weight vector a lane loads serves
// the MT tokens t0 .. t0 + MT − 1 of its workgroup (the host uses it for steps of up to 8),
// so the weights are read once per MT tokens
// instead of once per token, with as many workgroups as a single-token matvec. The token's
// quantized rows come from memory (no prologue: MT rows would not fit in workgroup memory for
// wide inputs); results are bit-identical to matvec's per token.
override MT: u32 = 8u; // tokens per workgroup (host: matmul.rs multi_tokens; ≤ MT_MAX)
const MT_MAX: u32 = 8u;

// Leaves the code accumulators of local row lr and tokens t0 + j in mv_row[j · 16 + lr].
fn mt_accumulate(blk: u32, t0: u32, th: Thread) {
    let lid = thread_index(th);
    let lane = lid % MV_LANES;
    let lr = lid / MV_LANES;
    let r = block_row(blk, lr, MV_ROWS);
    let n = min(MT, step.n_tokens - t0);
    var acc: array<i32, MT_MAX>;
    for (var j = 0u; j < MT_MAX; j++) {
        acc[j] = 0i;
    }
    if r < lin.rows {
        let g4 = row_vectors();
        let wrow = r * g4;
        for (var g = lane; g < g4; g += MV_LANES) {
            let wv = w4[wrow + g];
            for (var j = 0u; j < MT; j++) {
                if j < n {
                    let xb = (t0 + j) * lin.groups + 4u * g;
                    acc[j] += dot16(wv.x, xq[xb]) + dot16(wv.y, xq[xb + 1u])
                        + dot16(wv.z, xq[xb + 2u]) + dot16(wv.w, xq[xb + 3u]);
                }
            }
        }
    }
    for (var j = 0u; j < MT; j++) {
        let total = lanes_sum_i32(th, MV_LANES, acc[j]);
        if lane == 0u {
            mv_row[j * MV_ROWS + lr] = total;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn matvec_multi(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t0 = wid.y * MT;
    if t0 >= step.n_tokens {
        return;
    }
    mt_accumulate(wid.x, t0, th);
    // thread (j, lr) = (lid / 16, lid % 16): token t0 + j, local row lr
    let j = lid / MV_ROWS;
    let t = t0 + j;
    if j < MT && t < step.n_tokens {
        mv_finish(wid.x, t, lid % MV_ROWS, token_meta(t), j);
    }
}

@compute @workgroup_size(256)
fn matvec_multi_qkv(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let t0 = wid.y * MT;
    if t0 >= step.n_tokens {
        return;
    }
    mt_accumulate(wid.x, t0, th);
    let j = lid / MV_ROWS;
    let t = t0 + j;
    if j < MT && t < step.n_tokens {
        mv_finish_qkv(wid.x, t, lid % MV_ROWS, token_meta(t), j);
    }
}

// ---- prefill: dispatch (ceil(ROWS / TM), ceil(n_tokens / TN)) ----
// A tile is TM = 128 rows × TN tokens (TN = 16 · TJ: 32 or 64, chosen by the host from the step's
// token count); thread (tx, ty) = (lid % 16, lid / 16) owns rows ty + 16 i (i < 8) and tokens
// tx + 16 j (j < TJ): 8 · TJ accumulators, each weight word it reads used TJ times and each
// activation vector 8 times. K advances TK groups (16 TK columns) per step: TK / 4 16-byte
// vectors of every weight row and TK of every token. TK is 4 (12 KiB of tiles) or 8 (24 KiB,
// half the barriers), chosen by the host from the adapter's workgroup memory
// (src/backend/wgpu/tiles.rs).
// The tiles are stored k-major ([TK][TM] words, [TK][TN] vec4), so the 16 threads of a row
// group read 16 consecutive activation vectors (no bank conflicts: the previous layout read
// vectors 128 bytes apart, 8 threads on the same banks) and the rows they share are broadcast.
// Register double buffering: the next k-step's vectors are loaded from memory before the
// current tile is consumed and stored after, one barrier pair per k-step and two tile buffers.
const TM: u32 = 128u; // rows per tile
override TK: u32 = 4u; // 16-column groups per k-step: 4 or 8
override TJ: u32 = 4u; // tokens per thread (TN = 16 TJ tokens per tile; 2 or 4)
const TN_MAX: u32 = 64u;
const TWG: u32 = 256u;  // threads per tile
const TXV_MAX: u32 = 2u; // activation vectors a thread loads per k-step: TK · TN_MAX / TWG ≤ 2

var<workgroup> w_tile: array<u32, 2u * TK * TM>;           // 2 × [TK, TM]
var<workgroup> x_tile: array<vec4<u32>, 2u * TK * TN_MAX>; // 2 × [TK, TN_MAX]

// The weight vector thread `lid` loads for the k-step at group g0: groups g0 + 4 v .. + 3 of
// local row lid % TM, v = lid / TM (threads past TM · TK / 4 load none); code 1 (weight 0) past
// the matrix.
fn tile_w(blk: u32, g0: u32, lid: u32) -> vec4<u32> {
    let r = block_row(blk, lid % TM, TM);
    let g = g0 + 4u * (lid / TM);
    var v = vec4<u32>(0x55555555u); // code 1 = weight 0
    if lid < TM * TK / 4u && r < lin.rows && g < lin.groups {
        v = w4[(r * lin.groups + g) / 4u];
    }
    return v;
}

// The activation vectors thread `lid` loads for the k-step at group g0: entries e = lid + TWG p
// of the [TN, TK] tile, group g0 + e % TK of token t0 + e / TK; zeros past the step or the row.
fn tile_x(t0: u32, g0: u32, lid: u32) -> array<vec4<u32>, TXV_MAX> {
    var v: array<vec4<u32>, TXV_MAX>; // zero-initialised
    for (var p = 0u; p < TXV_MAX; p++) {
        let e = lid + TWG * p;
        let t = t0 + e / TK;
        let g = g0 + e % TK;
        if e / TK < 16u * TJ && t < step.n_tokens && g < lin.groups {
            v[p] = xq[t * lin.groups + g];
        }
    }
    return v;
}

fn tile_store(buf: u32, lid: u32, wv: vec4<u32>, xv: array<vec4<u32>, TXV_MAX>) {
    if lid < TM * TK / 4u {
        let base = buf * TK * TM + 4u * (lid / TM) * TM + lid % TM;
        w_tile[base] = wv.x;
        w_tile[base + TM] = wv.y;
        w_tile[base + 2u * TM] = wv.z;
        w_tile[base + 3u * TM] = wv.w;
    }
    for (var p = 0u; p < TXV_MAX; p++) {
        let e = lid + TWG * p;
        if e < TK * TN_MAX {
            x_tile[buf * TK * TN_MAX + (e % TK) * TN_MAX + e / TK] = xv[p];
        }
    }
}

// The code accumulators of thread (tx, ty): local row ty + 16 i, token t0 + tx + 16 j at
// [i * 4 + j] (j < TJ).
fn tiled_accumulate(blk: u32, t0: u32, lid: u32) -> array<i32, 32> {
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<i32, 32>; // zero-initialised
    tile_store(0u, lid, tile_w(blk, 0u, lid), tile_x(t0, 0u, lid));
    workgroupBarrier();
    var buf = 0u;
    for (var g0 = 0u; g0 < lin.groups; g0 += TK) {
        // the next k-step's vectors, in flight while this one is consumed
        let wn = tile_w(blk, g0 + TK, lid);
        let xn = tile_x(t0, g0 + TK, lid);
        let wb = buf * TK * TM;
        let xb = buf * TK * TN_MAX;
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<vec4<u32>, 4>;
            for (var j = 0u; j < TJ; j++) {
                a[j] = x_tile[xb + kk * TN_MAX + tx + 16u * j];
            }
            for (var i = 0u; i < 8u; i++) {
                let wd = w_tile[wb + kk * TM + ty + 16u * i];
                let c0 = wd & CODE_MASK;
                let c1 = (wd >> 2u) & CODE_MASK;
                let c2 = (wd >> 4u) & CODE_MASK;
                let c3 = (wd >> 6u) & CODE_MASK;
                for (var j = 0u; j < TJ; j++) {
                    acc[i * 4u + j] += dot4I8Packed(a[j].x, c0) + dot4I8Packed(a[j].y, c1)
                        + dot4I8Packed(a[j].z, c2) + dot4I8Packed(a[j].w, c3);
                }
            }
        }
        buf ^= 1u;
        tile_store(buf, lid, wn, xn);
        workgroupBarrier();
    }
    return acc;
}

@compute @workgroup_size(256)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = step.n_tokens;
    let t0 = wid.y * 16u * TJ;
    if t0 >= n {
        return;
    }
    let acc = tiled_accumulate(wid.x, t0, lid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    for (var j = 0u; j < TJ; j++) {
        let t = t0 + tx + 16u * j;
        if t >= n {
            continue;
        }
        if PAIR == 0u {
            for (var i = 0u; i < 8u; i++) {
                let r = block_row(wid.x, ty + 16u * i, TM);
                if r < lin.rows {
                    put(t, r, value(t, r, acc[i * 4u + j]));
                }
            }
        } else {
            // local rows ty + 16 i (i < 4) pair with ty + 16 (i + 4)
            for (var i = 0u; i < 4u; i++) {
                let r = block_row(wid.x, ty + 16u * i, TM);
                if r < lin.rows {
                    let g = value(t, r, acc[i * 4u + j]);
                    let u = value(t, r + PAIR, acc[(i + 4u) * 4u + j]);
                    put_gated(t, r, g, u);
                }
            }
        }
    }
}

@compute @workgroup_size(256)
fn matmul_tiled_qkv(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let n = step.n_tokens;
    let t0 = wid.y * 16u * TJ;
    if t0 >= n {
        return;
    }
    let acc = tiled_accumulate(wid.x, t0, lid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    for (var j = 0u; j < TJ; j++) {
        let t = t0 + tx + 16u * j;
        if t >= n {
            continue;
        }
        for (var i = 0u; i < 4u; i++) {
            let r = block_row(wid.x, ty + 16u * i, TM);
            if r < lin.rows {
                let a = value(t, r, acc[i * 4u + j]);
                let b = value(t, r + PAIR, acc[(i + 4u) * 4u + j]);
                put_qkv(t, r, a, b);
            }
        }
    }
}
