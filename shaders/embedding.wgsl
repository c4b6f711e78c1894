// The float matrix [vocab, COLS] (token embedding, and the LM head when tied), kept in its file
// dtype on the device so that no value is rounded: DTYPE 0 = bf16, 1 = f16 (two per u32, element
// 2k in the low half of word k; bf16 → f32 is a 16-bit shift, f16 → f32 via unpack2x16float,
// both exact), 2 = f32. Rows are padded to ROW_WORDS u32 words, a multiple of 4 (16 bytes, so
// the LM head loads vectors); pad elements are 0.
// The matrix may be split by rows into several buffers (chunks) because one binding is limited
// to max_storage_buffer_binding_size (128 MiB on lavapipe, the 2B4T embedding is 657 MB):
// every dispatch handles one chunk, rows row0 .. row0 + rows of the whole matrix.
//
// embed:   out[t, c] = E[tokens[t], c], for the tokens that fall in this chunk.
// lm_head: logits[o, row0 + v] = Σ_c x[t_o, c] · E[row0 + v, c], 8 vocab rows per workgroup with
//          32 lanes each streaming a row in 16-byte vectors (coalesced), then a tree reduction.
//          At decode this is the largest read of a token (the 2B4T embedding is 657 MB).

struct Chunk {
    row0: u32, // first matrix row in this buffer
    rows: u32, // rows in this buffer
    _pad0: u32,
    _pad1: u32,
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

// ---- lm_head: dispatch (ceil(chunk.rows / 8), logits rows) per chunk; logits row o is the
// product of the step's row logit_rows[o] (any subset of the rows, in any order) ----
@group(0) @binding(3) var<storage, read> head_x: array<f32>;          // [capacity, COLS]
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;    // [max rows, VOCAB]
@group(0) @binding(5) var<storage, read> logit_rows: array<u32>;      // [logits rows] row of head_x

const LANES: u32 = 32u;
const ROWS_PER_WG: u32 = 8u;

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn lm_head(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wid.y;            // logits row
    let t = logit_rows[o];    // activation row (a row of the step, checked by the host)
    let lane = lid % LANES;
    let v = wid.x * ROWS_PER_WG + lid / LANES;
    var acc = 0.0;
    if v < chunk.rows {
        let xb = t * COLS;
        let rv = ROW_WORDS / 4u;
        let rb = v * rv;
        for (var vi = lane; vi < rv; vi += LANES) {
            let wv = emb4[rb + vi];
            if DTYPE == 2u {
                // 4 f32 columns per vector
                let col = vi * 4u;
                if col + 4u <= COLS {
                    let xv = vec4<f32>(head_x[xb + col], head_x[xb + col + 1u],
                                       head_x[xb + col + 2u], head_x[xb + col + 3u]);
                    acc += dot(xv, bitcast<vec4<f32>>(wv));
                } else {
                    for (var k = 0u; col + k < COLS; k++) {
                        acc += head_x[xb + col + k] * bitcast<f32>(wv[k]);
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
                if col + 8u <= COLS {
                    let xe = vec4<f32>(head_x[xb + col], head_x[xb + col + 2u],
                                       head_x[xb + col + 4u], head_x[xb + col + 6u]);
                    let xo = vec4<f32>(head_x[xb + col + 1u], head_x[xb + col + 3u],
                                       head_x[xb + col + 5u], head_x[xb + col + 7u]);
                    acc += dot(xe, lo) + dot(xo, hi);
                } else {
                    for (var k = 0u; col + 2u * k < COLS; k++) {
                        acc += head_x[xb + col + 2u * k] * lo[k];
                        if col + 2u * k + 1u < COLS {
                            acc += head_x[xb + col + 2u * k + 1u] * hi[k];
                        }
                    }
                }
            }
        }
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if lane == 0u && v < chunk.rows {
        logits[o * VOCAB + chunk.row0 + v] = part[lid];
    }
}
