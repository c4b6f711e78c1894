// Causal grouped-query attention over the KV cache of one layer.
//
// Every row t of the step has its own position pos_t and KV-cache slot (a sequence): its k, v
// were stored at (slot, pos_t) by the q|k|v matmul's epilogue (ternary_matmul.wgsl MODE 4) and
// it attends to positions 0 ..= pos_t of its slot, so rows of several sequences at unrelated
// positions share one step (rows of one slot see each other causally, as they are stored before
// anyone attends).
// attend:   prefill. One workgroup per (token t, query head h) reads kv head h / (HEADS /
//           KV_HEADS) at positions 0 ..= pos_t in chunks of WG positions with an online
//           softmax (running max m and sum l, rescaled per chunk), so any context length fits in
//           a fixed amount of workgroup memory. n · HEADS workgroups keep the device busy.
// attend_split + attend_combine: decode (few tokens), "flash decoding". With one token there are
//           only HEADS rows of work, too few workgroups for a large GPU at long contexts, so the
//           positions are split into blocks of BLK: one workgroup per (block, kv head, token)
//           scores the block for all GROUP = HEADS / KV_HEADS query heads that share the kv head
//           (each key and value row is read once per group, not once per query head) and writes
//           the block's partial softmax (max m, sum l, unnormalised output o); attend_combine
//           merges the blocks of each (token, head): o = Σ_b o_b e^(m_b − M) / Σ_b l_b e^(m_b − M).
// scores = q·k · SCALE, SCALE = head_dim^-0.5; softmax in f32.
// Cache layout per layer, bound as u32 words: KV_F16 [slots, CTX, KV_HEADS, HD / 2], word i of
// a head = pack2x16float(x[i], x[i + HD/2]) (the RoPE pair that one thread of the q|k|v epilogue
// owns, so it writes whole words); else f32 bits [slots, CTX, KV_HEADS·HD]. Kernels read pairs
// (x[i], x[i + HD/2]) through key_pair / value_pair in both modes.

override HEADS: u32 = 1u;    // query heads
override KV_HEADS: u32 = 1u; // key/value heads
override HD: u32 = 1u;       // head_dim (≤ MAX_HD)
override SCALE: f32 = 1.0;   // 1 / sqrt(head_dim), computed on the host like the CPU backend
override NB: u32 = 1u;       // split: blocks per (token, head) in the partials = ceil(ctx / BLK)
override CTX: u32 = 1u;      // positions per slot of the cache
override KV_F16: bool = true; // the cache's element type: f16 pairs or f32

const WG: u32 = 128u;
const MAX_HD: u32 = 512u;
const PPT: u32 = 2u; // output pairs per thread: MAX_HD / 2 / WG
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> step: Step;

// (binding 5 of every attention kernel but attend_combine, binding 3 of that one)
@group(0) @binding(5) var<storage, read> step_rows: array<vec4<u32>>; // [n] (token, pos, slot, 0)

// u32 words per cache position (all kv heads) and per kv head.
fn kv_row_words() -> u32 {
    return select(KV_HEADS * HD, KV_HEADS * HD / 2u, KV_F16);
}

fn kv_head_words() -> u32 {
    return select(HD, HD / 2u, KV_F16);
}

// Word offset of kv head kvh at position 0 of row t's slot.
fn kv_base(t: u32, kvh: u32) -> u32 {
    return step_rows[t].z * CTX * kv_row_words() + kvh * kv_head_words();
}

// ---- attend: dispatch n · HEADS workgroups (folded 2-D) ----
@group(0) @binding(1) var<storage, read> q: array<f32>;           // [capacity, HEADS * HD]
@group(0) @binding(2) var<storage, read> kc: array<u32>;          // [slots, CTX, KVD / 2 or KVD]
@group(0) @binding(3) var<storage, read> vc: array<u32>;          // [slots, CTX, KVD / 2 or KVD]
@group(0) @binding(4) var<storage, read_write> out: array<f32>;   // [capacity, HEADS * HD]

var<workgroup> q_s: array<f32, MAX_HD>; // the query vector
var<workgroup> p_s: array<f32, WG>;     // exp(score − m) of the chunk
var<workgroup> red: array<f32, WG>;

// (k[i], k[i + HD/2]) of the key whose head starts at word `b`, i < HD/2.
fn key_pair(b: u32, i: u32) -> vec2<f32> {
    if KV_F16 {
        return unpack2x16float(kc[b + i]);
    }
    return vec2<f32>(bitcast<f32>(kc[b + i]), bitcast<f32>(kc[b + i + HD / 2u]));
}

fn value_pair(b: u32, i: u32) -> vec2<f32> {
    if KV_F16 {
        return unpack2x16float(vc[b + i]);
    }
    return vec2<f32>(bitcast<f32>(vc[b + i]), bitcast<f32>(vc[b + i + HD / 2u]));
}

@compute @workgroup_size(128)
fn attend(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let idx = linear_wg(wid, nwg);
    if idx >= step.n_tokens * HEADS {
        return;
    }
    let qd = HEADS * HD;
    let half = HD / 2u;
    let rw = kv_row_words();
    let t = idx / HEADS;
    let h = idx % HEADS;
    let kv_off = kv_base(t, h / (HEADS / KV_HEADS));
    for (var d = lid; d < HD; d += WG) {
        q_s[d] = q[t * qd + h * HD + d];
    }
    workgroupBarrier();
    let len = step_rows[t].y + 1u; // causal: positions 0 ..= pos_t of its slot
    var m = NEG_BIG;
    var l = 0.0;
    // thread lid owns the output pairs i = lid + k·WG: dims (i, i + HD/2)
    var o = array<vec2<f32>, PPT>(vec2<f32>(0.0), vec2<f32>(0.0));
    for (var c0 = 0u; c0 < len; c0 += WG) {
        let j = c0 + lid;
        var s = NEG_BIG;
        if j < len {
            let kb = j * rw + kv_off;
            var dot = 0.0;
            for (var i = 0u; i < half; i++) {
                let kp = key_pair(kb, i);
                dot += q_s[i] * kp.x + q_s[i + half] * kp.y;
            }
            s = dot * SCALE;
        }
        red[lid] = s;
        workgroupBarrier();
        for (var r = WG / 2u; r > 0u; r >>= 1u) {
            if lid < r {
                red[lid] = max(red[lid], red[lid + r]);
            }
            workgroupBarrier();
        }
        let m_new = max(m, red[0]);
        workgroupBarrier(); // everyone has read red[0] before it is reused
        let alpha = exp(m - m_new);
        var p = 0.0;
        if j < len {
            p = exp(s - m_new);
        }
        p_s[lid] = p;
        red[lid] = p;
        workgroupBarrier();
        for (var r = WG / 2u; r > 0u; r >>= 1u) {
            if lid < r {
                red[lid] += red[lid + r];
            }
            workgroupBarrier();
        }
        l = l * alpha + red[0];
        let cnt = min(WG, len - c0);
        for (var k = 0u; k < PPT; k++) {
            let i = lid + k * WG;
            if i < half {
                var a = o[k] * alpha;
                for (var jj = 0u; jj < cnt; jj++) {
                    a += p_s[jj] * value_pair((c0 + jj) * rw + kv_off, i);
                }
                o[k] = a;
            }
        }
        m = m_new;
        workgroupBarrier(); // p_s and red are rewritten by the next chunk
    }
    for (var k = 0u; k < PPT; k++) {
        let i = lid + k * WG;
        if i < half {
            out[t * qd + h * HD + i] = o[k].x / l;
            out[t * qd + h * HD + i + half] = o[k].y / l;
        }
    }
}

// ---- attend_split: dispatch (ceil((max pos_t + 1) / BLK), KV_HEADS, n) ----
// Binds q, kc, vc as attend does, and the partials [n, HEADS, NB, HD + 2] at binding 4:
// per (token, head, block): m, l, o[HD].
const BLK: u32 = 64u;      // positions per block
const MAX_G: u32 = 16u;    // query heads per kv head
const MAX_GHD: u32 = 1024u; // GROUP · HD

var<workgroup> sq: array<f32, MAX_GHD>;      // q of the group's heads [GROUP, HD]
var<workgroup> sp: array<f32, 1024>;         // scores, then e^(s − m): [GROUP, BLK]
var<workgroup> sm: array<f32, MAX_G>;        // block max per head

@compute @workgroup_size(128)
fn attend_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = wid.x;
    let kvh = wid.y;
    let t = wid.z;
    if t >= step.n_tokens {
        return;
    }
    let group = HEADS / KV_HEADS;
    let qd = HEADS * HD;
    let half = HD / 2u;
    let rw = kv_row_words();
    let len = step_rows[t].y + 1u;
    let p0 = blk * BLK;
    if p0 >= len {
        return; // attend_combine reads only the blocks below len
    }
    let cnt = min(BLK, len - p0);
    let kv_off = kv_base(t, kvh);
    // heads kvh·GROUP .. kvh·GROUP + GROUP − 1 are contiguous in the q row
    for (var i = lid; i < group * HD; i += WG) {
        sq[i] = q[t * qd + kvh * group * HD + i];
    }
    workgroupBarrier();
    for (var e = lid; e < group * BLK; e += WG) {
        let g = e / BLK;
        let j = e % BLK;
        var s = NEG_BIG;
        if j < cnt {
            let kb = (p0 + j) * rw + kv_off;
            var dot = 0.0;
            for (var i = 0u; i < half; i++) {
                let kp = key_pair(kb, i);
                dot += sq[g * HD + i] * kp.x + sq[g * HD + i + half] * kp.y;
            }
            s = dot * SCALE;
        }
        sp[e] = s;
    }
    workgroupBarrier();
    if lid < group {
        var m = NEG_BIG;
        for (var j = 0u; j < cnt; j++) {
            m = max(m, sp[lid * BLK + j]);
        }
        sm[lid] = m;
    }
    workgroupBarrier();
    for (var e = lid; e < group * BLK; e += WG) {
        let j = e % BLK;
        var p = 0.0;
        if j < cnt {
            p = exp(sp[e] - sm[e / BLK]);
        }
        sp[e] = p;
    }
    workgroupBarrier();
    let stride = HD + 2u;
    for (var g = 0u; g < group; g++) {
        let h = kvh * group + g;
        let pb = ((t * HEADS + h) * NB + blk) * stride;
        if lid == 0u {
            var l = 0.0;
            for (var j = 0u; j < cnt; j++) {
                l += sp[g * BLK + j];
            }
            out[pb] = sm[g];
            out[pb + 1u] = l;
        }
        for (var i = lid; i < half; i += WG) {
            var a = vec2<f32>(0.0);
            for (var j = 0u; j < cnt; j++) {
                a += sp[g * BLK + j] * value_pair((p0 + j) * rw + kv_off, i);
            }
            out[pb + 2u + i] = a.x;
            out[pb + 2u + i + half] = a.y;
        }
    }
}

// ---- attend_combine: dispatch n · HEADS workgroups (folded 2-D) ----
@group(0) @binding(1) var<storage, read> cb_part: array<f32>;         // [n, HEADS, NB, HD + 2]
@group(0) @binding(2) var<storage, read_write> cb_out: array<f32>;    // [capacity, HEADS * HD]
@group(0) @binding(3) var<storage, read> cb_rows: array<vec4<u32>>;   // [n] (token, pos, slot, 0)

@compute @workgroup_size(128)
fn attend_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let idx = linear_wg(wid, nwg);
    if idx >= step.n_tokens * HEADS {
        return;
    }
    let t = idx / HEADS;
    let h = idx % HEADS;
    let len = cb_rows[t].y + 1u;
    let nb = (len + BLK - 1u) / BLK;
    let stride = HD + 2u;
    let base = idx * NB * stride; // idx = t · HEADS + h
    var mx = NEG_BIG;
    for (var b = 0u; b < nb; b++) {
        mx = max(mx, cb_part[base + b * stride]);
    }
    var l = 0.0;
    for (var b = 0u; b < nb; b++) {
        l += cb_part[base + b * stride + 1u] * exp(cb_part[base + b * stride] - mx);
    }
    for (var d = lid; d < HD; d += WG) {
        var o = 0.0;
        for (var b = 0u; b < nb; b++) {
            o += cb_part[base + b * stride + 2u + d] * exp(cb_part[base + b * stride] - mx);
        }
        cb_out[t * HEADS * HD + h * HD + d] = o / l;
    }
}
