// The float matrix [vocab, COLS] (token embedding, and the LM head when tied), kept in its file
// dtype on the device so that no value is rounded: DTYPE 0 = bf16, 1 = f16 (two per u32, element
// 2k in the low half of word k; bf16 → f32 is a 16-bit shift, f16 → f32 via unpack2x16float,
// both exact), 2 = f32. Rows are padded to ROW_WORDS u32 words, a multiple of 4 (16 bytes, so
// the LM head loads vectors); pad elements are 0.
// DTYPE 3 (LM head only) is the CPU's 8-bit head (`--lm-head q8`, src/backend/cpu/q8.rs): per row
// the f32 scales of the NB = ceil(COLS / 64) blocks padded to a multiple of 4 words, then the
// int8 codes 4 per word (column 4w + k in byte k), blocks padded with 0 (layout.rs
// q8_row_words). As on the CPU, the head's input row is rounded to int16 (s = 32767 / absmax,
// Rust's round half away from zero), each block is an exact integer dot turned into f32 once
// (scale · Σ q·x), and the row's sum is multiplied by absmax / 32767.
// The matrix may be split by rows into several buffers (chunks) because one binding is limited
// to max_storage_buffer_binding_size (128 MiB on lavapipe, the 2B4T embedding is 657 MB):
// every dispatch handles one chunk, rows row0 .. row0 + rows of the whole matrix.
//
// embed:   out[t, c] = E[tokens[t], c], for the tokens that fall in this chunk.
// lm_head: logits[o, row0 + v] = Σ_c x[t_o, c] · E[row0 + v, c], blocks of 8 vocab rows with
//          32 lanes each streaming a row in 16-byte vectors (coalesced), then a reduction; each
//          vector loaded serves the HR logits rows of the workgroup; optionally with the final
//          norm as prologue and the argmax's first pass as epilogue. At decode this is the
//          largest read of a token (the 2B4T embedding is 657 MB), so a batched decode step
//          (several logits rows) must not read it once per row.

struct Chunk {
    row0: u32, // first matrix row in this buffer
    rows: u32, // rows in this buffer
    wg0: u32,  // lm_head: the head_best entry of this chunk's first workgroup
    _pad0: u32,
}

override COLS: u32 = 1u;      // hidden size
override ROW_WORDS: u32 = 1u; // u32 words per stored row
override DTYPE: u32 = 0u;     // 0 bf16, 1 f16, 2 f32
override VOCAB: u32 = 1u;     // logits row length (all chunks)

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> chunk: Chunk;
@group(0) @binding(2) var<storage, read> emb: array<u32>;         // [chunk.rows, ROW_WORDS] (embed)
@group(0) @binding(2) var<storage, read> emb4: array<vec4<u32>>;  // [chunk.rows, ROW_WORDS / 4] (lm_head)

// Element c of stored row r (r relative to the chunk).
fn element(r: u32, c: u32) -> f32 {
    if DTYPE == 2u {
        return bitcast<f32>(emb[r * ROW_WORDS + c]);
    }
    let word = emb[r * ROW_WORDS + c / 2u];
    if DTYPE == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, (c & 1u) == 1u);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (c & 1u) == 1u));
}

// ---- embed: dispatch ceil(n · COLS / EMBED_WG) workgroups (folded 2-D) per chunk ----
override EMBED_WG: u32 = 256u; // threads per embed workgroup (host: embedding.rs EMBED_WG)

@group(0) @binding(3) var<storage, read> step_rows: array<vec4<u32>>; // [n] (token, pos, slot, 0)
@group(0) @binding(4) var<storage, read_write> emb_out: array<f32>;  // [capacity, COLS]

@compute @workgroup_size(EMBED_WG)
fn embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = linear_wg(wid, nwg) * EMBED_WG + lid;
    if i >= step.n_tokens * COLS {
        return;
    }
    let t = i / COLS;
    let c = i % COLS;
    let tok = step_rows[t].x;
    if tok >= chunk.row0 && tok < chunk.row0 + chunk.rows {
        emb_out[i] = element(tok - chunk.row0, c);
    }
}

// ---- lm_head: dispatch (ceil(chunk.rows / (8 · HEAD_BLOCKS)), ceil(logits rows / HR)) per
// chunk; logits row o is the product of the step's row logit_rows[o] (any subset of the rows, in
// any order), and workgroup y computes logits rows HR·y .. HR·y + HR − 1 (the host pads
// logit_rows with NO_ROW to a multiple of HR). Every row's sums run in the same order whatever
// HR is, so a row's logits do not depend on the rows computed beside it.
// NORM: the final rms_norm is the prologue: each workgroup computes its rows' norm factors with
// row_ops.wgsl's code and reduction order (WG = 256) and uses w · (x · inv) in place of x, the
// normed value bit for bit, so the fused op equals rms_norm then lm_head exactly.
// For logits row 0, each workgroup also leaves the (value bits, index) of its best logit in
// head_best[chunk.wg0 + workgroup]: argmax.wgsl's argmax_final over those entries is the greedy
// token, one dispatch instead of a second pass over the logits. ----
@group(0) @binding(3) var<storage, read> head_x: array<f32>;          // [capacity, COLS]
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;    // [max rows, VOCAB]
@group(0) @binding(5) var<storage, read> logit_rows: array<u32>;      // [logits rows padded to HR] row of head_x
@group(0) @binding(6) var<storage, read> norm_w: array<f32>;          // [COLS] final norm (NORM)
@group(0) @binding(7) var<storage, read_write> head_best: array<vec2<u32>>; // [workgroups of all chunks]

override HQW: u32 = 1u;          // DTYPE 3: words of the int16 input row (COLS padded to 64, / 2)
override NORM: bool = false;     // the final rms_norm as the prologue
override EPS: f32 = 1e-5;        // its epsilon
override HEAD_BLOCKS: u32 = 1u;  // blocks of ROWS_PER_WG vocab rows per workgroup (host: LM_BLOCKS)
override HR: u32 = 1u;           // logits rows per workgroup (host: embedding.rs head_rows; 1 for DTYPE 3)
const HR_MAX: u32 = 8u;
const NO_ROW: u32 = 0xffffffffu; // padding of logit_rows

const LANES: u32 = 32u;
const ROWS_PER_WG: u32 = 8u;

var<workgroup> row_logit: array<f32, ROWS_PER_WG>; // the block's logits, for the argmax scan
var<workgroup> hq: array<u32, HQW>; // DTYPE 3: the int16 input row, 2 per word (col 2w low half)

// 1 / sqrt(mean(x²) + EPS) of the row at xb: row_ops.wgsl's pass 1 and reduction, WG = 256.
fn norm_factor(xb: u32, th: Thread) -> f32 {
    let lid = thread_index(th);
    let words = (COLS + 3u) / 4u;
    var ss = 0.0;
    for (var wi = lid; wi < words; wi += 256u) {
        for (var k = 0u; k < 4u; k++) {
            let col = wi * 4u + k;
            if col < COLS {
                let v = head_x[xb + col];
                ss += v * v;
            }
        }
    }
    return 1.0 / sqrt(wg_sum_f32(th, 256u, ss) / f32(COLS) + EPS);
}

// Head input column c of the row at xb: x, or the normed x (row_ops.wgsl's expression).
fn head_in(xb: u32, c: u32, inv: f32) -> f32 {
    if NORM {
        return norm_w[c] * (head_x[xb + c] * inv);
    }
    return head_x[xb + c];
}

// Rust's f32::round (half away from zero), which the CPU's q8 head input uses; WGSL's round()
// goes to even. y − trunc(y) is exact.
fn round_away(y: f32) -> f32 {
    let t = trunc(y);
    return select(t, t + sign(y), abs(y - t) >= 0.5);
}

// DTYPE 3 prologue: the head input row (normed or not) as int16 codes in hq; returns absmax /
// 32767, the factor of the row's logits (0 for an all-zero row, as on the CPU).
fn quantize_input(xb: u32, th: Thread, inv: f32) -> f32 {
    let lid = thread_index(th);
    var m = 0.0;
    for (var c = lid; c < COLS; c += 256u) {
        m = max(m, abs(head_in(xb, c, inv)));
    }
    let absmax = wg_max_f32(th, 256u, m);
    var s = 0.0;
    if absmax > 0.0 {
        s = 32767.0 / absmax;
    }
    for (var w = lid; w < HQW; w += 256u) {
        var word = 0u;
        for (var k = 0u; k < 2u; k++) {
            let c = 2u * w + k;
            if c < COLS {
                let q = i32(clamp(round_away(head_in(xb, c, inv) * s), -32767.0, 32767.0));
                word |= (u32(q) & 0xffffu) << (16u * k);
            }
        }
        hq[w] = word;
    }
    workgroupBarrier();
    return absmax / 32767.0;
}

// DTYPE 3: Σ over the 16 int8 codes of `wv` (columns c0 ..) times the int16 input.
fn q8_dot16(wv: vec4<u32>, c0: u32) -> i32 {
    var acc = 0i;
    for (var j = 0u; j < 4u; j++) {
        let wd = bitcast<i32>(wv[j]);
        let x0 = bitcast<i32>(hq[(c0 + 4u * j) / 2u]);      // columns c0 + 4j, +1
        let x1 = bitcast<i32>(hq[(c0 + 4u * j) / 2u + 1u]); // columns c0 + 4j + 2, +3
        acc += extractBits(wd, 0u, 8u) * ((x0 << 16u) >> 16u)
            + extractBits(wd, 8u, 8u) * (x0 >> 16u)
            + extractBits(wd, 16u, 8u) * ((x1 << 16u) >> 16u)
            + extractBits(wd, 24u, 8u) * (x1 >> 16u);
    }
    return acc;
}

// DTYPE 3: Σ_b scale_b · Σ_{c in block b} q[v, c] · hq[c] over this lane's blocks of row v.
fn q8_head_dot(v: u32, lane: u32) -> f32 {
    let nb = (COLS + 63u) / 64u;
    let sv = (nb + 3u) / 4u; // vectors of scales
    let rb = v * (ROW_WORDS / 4u);
    var acc = 0.0;
    for (var b = lane; b < nb; b += LANES) {
        let scale = bitcast<f32>(emb4[rb + b / 4u][b % 4u]);
        let cb = rb + sv + 4u * b; // the block's 4 code vectors
        let sum = q8_dot16(emb4[cb], 64u * b) + q8_dot16(emb4[cb + 1u], 64u * b + 16u)
            + q8_dot16(emb4[cb + 2u], 64u * b + 32u) + q8_dot16(emb4[cb + 3u], 64u * b + 48u);
        acc += scale * f32(sum);
    }
    return acc;
}

// Σ_c in_k[c] · E[v, c] over this lane's 16-byte vectors of chunk row v, for the workgroup's
// logits rows k < nr (input rows at xbs[k], norm factors invs[k]): each vector is loaded and
// converted once for all of them; row k's sum runs in the same order for any nr.
fn head_dots(v: u32, lane: u32, xbs: array<u32, HR_MAX>, invs: array<f32, HR_MAX>,
             nr: u32) -> array<f32, HR_MAX> {
    var acc: array<f32, HR_MAX>;
    for (var k = 0u; k < HR_MAX; k++) {
        acc[k] = 0.0;
    }
    if DTYPE == 3u {
        acc[0] = q8_head_dot(v, lane); // (HR = 1: the int16 row in hq is row 0's)
        return acc;
    }
    let rv = ROW_WORDS / 4u;
    let rb = v * rv;
    for (var vi = lane; vi < rv; vi += LANES) {
        let wv = emb4[rb + vi];
        if DTYPE == 2u {
            // 4 f32 columns per vector
            let col = vi * 4u;
            let wf = bitcast<vec4<f32>>(wv);
            for (var k = 0u; k < HR; k++) {
                if k < nr {
                    let xb = xbs[k];
                    let inv = invs[k];
                    if col + 4u <= COLS {
                        let xv = vec4<f32>(head_in(xb, col, inv), head_in(xb, col + 1u, inv),
                                           head_in(xb, col + 2u, inv), head_in(xb, col + 3u, inv));
                        acc[k] += dot(xv, wf);
                    } else {
                        for (var j = 0u; col + j < COLS; j++) {
                            acc[k] += head_in(xb, col + j, inv) * wf[j];
                        }
                    }
                }
            }
        } else {
            // 8 16-bit columns per vector: even columns in the low halves, odd in the high
            var lo: vec4<f32>;
            var hi: vec4<f32>;
            if DTYPE == 1u {
                let p0 = unpack2x16float(wv.x);
                let p1 = unpack2x16float(wv.y);
                let p2 = unpack2x16float(wv.z);
                let p3 = unpack2x16float(wv.w);
                lo = vec4<f32>(p0.x, p1.x, p2.x, p3.x);
                hi = vec4<f32>(p0.y, p1.y, p2.y, p3.y);
            } else {
                lo = bitcast<vec4<f32>>(wv << vec4<u32>(16u));
                hi = bitcast<vec4<f32>>(wv & vec4<u32>(0xffff0000u));
            }
            let col = vi * 8u;
            for (var k = 0u; k < HR; k++) {
                if k < nr {
                    let xb = xbs[k];
                    let inv = invs[k];
                    if col + 8u <= COLS {
                        let xe = vec4<f32>(head_in(xb, col, inv), head_in(xb, col + 2u, inv),
                                           head_in(xb, col + 4u, inv), head_in(xb, col + 6u, inv));
                        let xo = vec4<f32>(head_in(xb, col + 1u, inv), head_in(xb, col + 3u, inv),
                                           head_in(xb, col + 5u, inv), head_in(xb, col + 7u, inv));
                        acc[k] += dot(xe, lo) + dot(xo, hi);
                    } else {
                        for (var j = 0u; col + 2u * j < COLS; j++) {
                            acc[k] += head_in(xb, col + 2u * j, inv) * lo[j];
                            if col + 2u * j + 1u < COLS {
                                acc[k] += head_in(xb, col + 2u * j + 1u, inv) * hi[j];
                            }
                        }
                    }
                }
            }
        }
    }
    return acc;
}

@compute @workgroup_size(256)
fn lm_head(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    let o0 = wid.y * HR;      // the workgroup's first logits row
    let lane = lid % LANES;
    // the workgroup's rows: input row offsets, norm factors (the valid rows are a prefix)
    var xbs: array<u32, HR_MAX>;
    var invs: array<f32, HR_MAX>;
    var nr = 0u;
    for (var k = 0u; k < HR_MAX; k++) {
        xbs[k] = 0u;
        invs[k] = 1.0;
        if k < HR && logit_rows[o0 + k] != NO_ROW {
            xbs[k] = logit_rows[o0 + k] * COLS;
            nr = k + 1u;
        }
    }
    if NORM {
        for (var k = 0u; k < HR; k++) {
            if k < nr {
                invs[k] = norm_factor(xbs[k], th);
            }
        }
    }
    var post = 1.0; // the factor of every logit: absmax / 32767 of the int16 input (DTYPE 3)
    if DTYPE == 3u {
        post = quantize_input(xbs[0], th, invs[0]);
    }
    var best_v = 0.0;         // thread 0, logits row 0: the workgroup's best so far
    var best_i = ARGMAX_EMPTY;
    for (var blk = 0u; blk < HEAD_BLOCKS; blk++) {
        let v0 = (wid.x * HEAD_BLOCKS + blk) * ROWS_PER_WG; // first chunk row of the block
        let v = v0 + lid / LANES;
        var dots: array<f32, HR_MAX>;
        if v < chunk.rows {
            dots = head_dots(v, lane, xbs, invs, nr);
        }
        for (var k = 0u; k < HR; k++) {
            if k < nr {
                let total = lanes_sum_f32(th, LANES, dots[k]);
                if lane == 0u && v < chunk.rows {
                    let l = total * post;
                    logits[(o0 + k) * VOCAB + chunk.row0 + v] = l;
                    if o0 + k == 0u {
                        row_logit[lid / LANES] = l; // the logit as stored
                    }
                }
            }
        }
        if o0 == 0u {
            workgroupBarrier();
            if lid == 0u {
                for (var j = 0u; j < ROWS_PER_WG; j++) {
                    let i = chunk.row0 + v0 + j;
                    if v0 + j < chunk.rows && argmax_better(row_logit[j], i, best_v, best_i) {
                        best_v = row_logit[j];
                        best_i = i;
                    }
                }
            }
            workgroupBarrier(); // row_logit is rewritten by the next block
        }
    }
    if o0 == 0u && lid == 0u {
        head_best[chunk.wg0 + wid.x] = vec2<u32>(bitcast<u32>(best_v), best_i);
    }
}
