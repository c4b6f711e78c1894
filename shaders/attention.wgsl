// Causal grouped-query attention over the KV cache of one layer.
//
// Every row t of the step has its own position pos_t and KV-cache slot (a sequence): its k, v
// were stored at (slot, pos_t) by the q|k|v matmul's epilogue (ternary_matmul.wgsl MODE 4) and
// it attends to positions 0 ..= pos_t of its slot, so rows of several sequences at unrelated
// positions share one step (rows of one slot see each other causally, as they are stored before
// anyone attends).
// attend_tiled: prefill (head_dim ≤ 128, GROUP ≤ 8), flash attention: one workgroup per (tile
//           of step rows, kv head), the tile's 8 query vectors (rows × the group's heads) sharing
//           every key / value block staged in workgroup memory; online softmax (below).
// attend:   prefill otherwise. One workgroup per (token t, query head h) reads kv head h / (HEADS /
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
override HD: u32 = 2u;       // head_dim (even, ≤ MAX_HD)
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
          th: Thread) {
    let lid = thread_index(th);
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
        let m_new = max(m, wg_max_f32(th, WG, s));
        let alpha = exp(m - m_new);
        var p = 0.0;
        if j < len {
            p = exp(s - m_new);
        }
        p_s[lid] = p;
        // (the reduction's barriers also order the p_s writes before the reads below)
        l = l * alpha + wg_sum_f32(th, WG, p);
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
        workgroupBarrier(); // p_s is rewritten by the next chunk
    }
    for (var k = 0u; k < PPT; k++) {
        let i = lid + k * WG;
        if i < half {
            out[t * qd + h * HD + i] = o[k].x / l;
            out[t * qd + h * HD + i + half] = o[k].y / l;
        }
    }
}

// ---- attend_tiled: prefill, dispatch (tiles folded 2-D, KV_HEADS): flash attention ----
// One workgroup per (tile of QT consecutive step rows, kv head): the query vectors of the tile's
// rows for all GROUP heads of the kv head (NQ = QT · GROUP ≤ NQ_MAX) share every key and value
// block of TKB positions loaded into workgroup memory (attend reads them once per query head
// and row). Online softmax per query vector (running max m, sum l, the output rescaled by
// e^(m_old − m_new) per block), causal mask per row. Rows of one slot are consecutive positions
// in step order, but a step may interleave slots: the tile is processed as runs of rows of one
// slot (usually one run), each against keys 0 ..= its last row's position.
// Binds q, kc, vc, out, step_rows as attend does. The host uses it for HD ≤ TILE_MAX_HD and
// GROUP ≤ NQ_MAX.
override QT: u32 = 1u;         // step rows per tile (NQ_MAX / GROUP, chosen by the host)
const NQ_MAX: u32 = 8u;        // query vectors per tile
const TKB: u32 = 16u;          // key / value positions per block
const TILE_MAX_HD: u32 = 128u;
const TKV_STRIDE: u32 = TILE_MAX_HD + 1u; // padded rows: threads reading one dim of 16 rows hit 16 banks
const TWG: u32 = 256u;
const TOUT: u32 = TWG / NQ_MAX; // threads per query vector in the output accumulation

var<workgroup> tq: array<f32, 1024>;   // [NQ_MAX, HD] the tile's query vectors
var<workgroup> tkv: array<f32, 2064>;  // [TKB, TKV_STRIDE] the key block, then the value block
var<workgroup> ts: array<f32, 256>;    // [2, NQ_MAX · TKB] half-dot partials of the scores
var<workgroup> tsp: array<f32, 128>;   // [NQ_MAX, TKB] scores, then e^(s − m)
var<workgroup> tm: array<f32, NQ_MAX>; // running max per query vector
var<workgroup> tl: array<f32, NQ_MAX>; // running sum
var<workgroup> ta: array<f32, NQ_MAX>; // e^(m_old − m_new) of the current block

// Loads positions k0 .. k0 + TKB − 1 (zeros from `end` on) of the cache `which` (0 keys,
// 1 values) of the kv head at word `hb` of position 0 into tkv as f32 [TKB, HD].
fn tile_load(which: u32, hb: u32, k0: u32, end: u32, lid: u32) {
    let half = HD / 2u;
    let rw = kv_row_words();
    for (var e = lid; e < TKB * half; e += TWG) {
        let j = e / half;
        let i = e % half;
        var x = vec2<f32>(0.0);
        if k0 + j < end {
            if which == 0u {
                x = key_pair((k0 + j) * rw + hb, i);
            } else {
                x = value_pair((k0 + j) * rw + hb, i);
            }
        }
        tkv[j * TKV_STRIDE + i] = x.x;
        tkv[j * TKV_STRIDE + i + half] = x.y;
    }
}

@compute @workgroup_size(256)
fn attend_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                th: Thread) {
    let lid = thread_index(th);
    let t0 = linear_wg(vec3<u32>(wid.xy, 0u), vec3<u32>(nwg.xy, 1u)) * QT;
    let kvh = wid.z;
    let n = step.n_tokens;
    if t0 >= n {
        return;
    }
    let group = HEADS / KV_HEADS;
    let qd = HEADS * HD;
    let t_end = min(t0 + QT, n);
    var r0 = t0;
    while r0 < t_end {
        // the run r0 .. r1 − 1 of rows of one slot (consecutive positions)
        let slot = step_rows[r0].z;
        var r1 = r0 + 1u;
        while r1 < t_end && step_rows[r1].z == slot {
            r1++;
        }
        let nq = (r1 - r0) * group; // query vector q: row r0 + q / GROUP, head q % GROUP
        let end = step_rows[r1 - 1u].y + 1u; // keys 0 ..= the run's last position
        let hb = kv_base(r0, kvh);
        for (var e = lid; e < NQ_MAX * HD; e += TWG) {
            let qi = e / HD;
            let d = e % HD;
            var x = 0.0;
            if qi < nq {
                x = q[(r0 + qi / group) * qd + (kvh * group + qi % group) * HD + d];
            }
            tq[e] = x;
        }
        if lid < NQ_MAX {
            tm[lid] = NEG_BIG;
            tl[lid] = 0.0;
        }
        // thread (oq, ol) accumulates dims ol + TOUT k of query vector oq
        let oq = lid / TOUT;
        let ol = lid % TOUT;
        var o = array<f32, 4>(0.0, 0.0, 0.0, 0.0); // TILE_MAX_HD / TOUT
        // score thread: half `sh` of the dims of entry (sq_, sj) of the block
        let sh = lid / (NQ_MAX * TKB);
        let se = lid % (NQ_MAX * TKB);
        let sq_ = se / TKB;
        let sj = se % TKB;
        for (var k0 = 0u; k0 < end; k0 += TKB) {
            tile_load(0u, hb, k0, end, lid);
            workgroupBarrier(); // tq (first block), tm, tl and the keys are in place
            let hd0 = sh * (HD / 2u);
            var dot = 0.0;
            for (var d = hd0; d < hd0 + HD / 2u; d++) {
                dot += tq[sq_ * HD + d] * tkv[sj * TKV_STRIDE + d];
            }
            ts[lid] = dot;
            workgroupBarrier(); // the keys are no longer needed: load the values
            if lid < NQ_MAX * TKB {
                var sc = NEG_BIG;
                let p = k0 + sj;
                if sq_ < nq && p <= step_rows[r0 + sq_ / group].y {
                    sc = (ts[lid] + ts[lid + NQ_MAX * TKB]) * SCALE;
                }
                tsp[lid] = sc;
            }
            tile_load(1u, hb, k0, end, lid);
            workgroupBarrier();
            if SUBGROUPS {
                // the TKB scores of query vector sq_ are threads 16 sq_ .. 16 sq_ + 15: a
                // shuffle max, kept by the run's first thread (threads ≥ NQ_MAX · TKB add
                // nothing: NEG_BIG)
                var v = NEG_BIG;
                if lid < NQ_MAX * TKB {
                    v = tsp[lid];
                }
                let bm = lanes_max_f32(th, TKB, v);
                if lid < NQ_MAX * TKB && sj == 0u {
                    let m_new = max(tm[sq_], bm);
                    ta[sq_] = exp(tm[sq_] - m_new);
                    tm[sq_] = m_new;
                }
            } else if lid < NQ_MAX {
                var bm = NEG_BIG;
                for (var j = 0u; j < TKB; j++) {
                    bm = max(bm, tsp[lid * TKB + j]);
                }
                let m_new = max(tm[lid], bm);
                ta[lid] = exp(tm[lid] - m_new);
                tm[lid] = m_new;
            }
            workgroupBarrier();
            if lid < NQ_MAX * TKB {
                // masked (and absent) entries are exactly 0, even where m is still NEG_BIG
                var pv = 0.0;
                if tsp[lid] > NEG_BIG {
                    pv = exp(tsp[lid] - tm[sq_]);
                }
                tsp[lid] = pv;
            }
            workgroupBarrier();
            if SUBGROUPS {
                var v = 0.0;
                if lid < NQ_MAX * TKB {
                    v = tsp[lid];
                }
                let sum = lanes_sum_f32(th, TKB, v);
                if lid < NQ_MAX * TKB && sj == 0u {
                    tl[sq_] = tl[sq_] * ta[sq_] + sum;
                }
            } else if lid < NQ_MAX {
                var sum = 0.0;
                for (var j = 0u; j < TKB; j++) {
                    sum += tsp[lid * TKB + j];
                }
                tl[lid] = tl[lid] * ta[lid] + sum;
            }
            let alpha = ta[oq];
            for (var k = 0u; k < 4u; k++) {
                let d = ol + k * TOUT;
                if d < HD {
                    var a = o[k] * alpha;
                    for (var j = 0u; j < TKB; j++) {
                        a += tsp[oq * TKB + j] * tkv[j * TKV_STRIDE + d];
                    }
                    o[k] = a;
                }
            }
            workgroupBarrier(); // tkv, tsp and ta are rewritten by the next block
        }
        if oq < nq {
            let ob = (r0 + oq / group) * qd + (kvh * group + oq % group) * HD;
            let inv_l = 1.0 / tl[oq];
            for (var k = 0u; k < 4u; k++) {
                let d = ol + k * TOUT;
                if d < HD {
                    out[ob + d] = o[k] * inv_l;
                }
            }
        }
        workgroupBarrier(); // tq, tm and tl are rewritten by the next run
        r0 = r1;
    }
}

// ---- attend_split: dispatch (ceil((max pos_t + 1) / BLK), KV_HEADS, n) ----
// Binds q, kc, vc as attend does, and the partials [n, HEADS, NB, HD + 2] at binding 4:
// per (token, head, block): m, l, o[HD].
// Shaped for memory bandwidth (decode reads the whole cache of the slot once per token):
// - scores: a team of LANES threads reads one key row in consecutive words (coalesced) and
//   each lane keeps GROUP partial dots (every key word read once for the group's heads); the
//   lanes' partials go through workgroup memory and one thread per (head, key) adds them;
// - block max and sum: LANES threads per head, then a tree (shuffles where there are subgroups);
// - values: one thread per (head, word) reads row after row (adjacent threads, adjacent words),
//   rows split over WG / (GROUP · HD/2) thread sets when that is > 1, then added.
const BLK: u32 = 64u;        // positions per block
const SWG: u32 = 256u;       // threads of attend_split
const LANES: u32 = 16u;      // threads per key row
const TEAMS: u32 = SWG / LANES; // key rows scored at once
const KPT: u32 = BLK / TEAMS;   // key rows per team and block
const GB: u32 = 4u;          // heads whose lane partials are reduced per pass
const RSTRIDE: u32 = LANES * (TEAMS + 1u); // padded [LANES, TEAMS + 1]: conflict-free both ways
const MAX_G: u32 = 16u;      // query heads per kv head (SWG / LANES heads in the max / sum)
const MAX_GHD: u32 = 1024u;  // GROUP · HD

var<workgroup> sq: array<f32, MAX_GHD>;      // q of the group's heads [GROUP, HD]
var<workgroup> sp: array<f32, 1024>;         // scores, then e^(s − m): [GROUP, BLK]
// lane partials [GB, LANES, TEAMS + 1]; then [2, SWG] max / sum trees; then value partials
var<workgroup> sred: array<f32, 1088>;       // GB · RSTRIDE
var<workgroup> sm_b: array<f32, MAX_G>;      // (subgroup variant) the block max of each head

@compute @workgroup_size(256)
fn attend_split(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
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
    for (var i = lid; i < group * HD; i += SWG) {
        sq[i] = q[t * qd + kvh * group * HD + i];
    }
    workgroupBarrier();

    // ---- scores: team `team` scores rows team, team + TEAMS, ... of the block ----
    let team = lid / LANES;
    let lane = lid % LANES;
    for (var kk = 0u; kk < KPT; kk++) {
        let j = kk * TEAMS + team;
        var acc: array<f32, MAX_G>; // zero-initialised: lane partial dot of each head
        if j < cnt {
            let kb = (p0 + j) * rw + kv_off;
            for (var i = lane; i < half; i += LANES) {
                let kp = key_pair(kb, i);
                for (var g = 0u; g < group; g++) {
                    acc[g] += sq[g * HD + i] * kp.x + sq[g * HD + i + half] * kp.y;
                }
            }
        }
        if SUBGROUPS {
            // the team's 16 lanes are consecutive thread numbers: shuffles (no memory, no
            // barrier where a subgroup holds them)
            for (var g = 0u; g < group; g++) {
                let s = lanes_sum_f32(th, LANES, acc[g]);
                if lane == 0u {
                    sp[g * BLK + j] = select(NEG_BIG, s * SCALE, j < cnt);
                }
            }
            continue;
        }
        for (var gb = 0u; gb < group; gb += GB) {
            for (var gg = 0u; gg < GB; gg++) {
                sred[gg * RSTRIDE + lane * (TEAMS + 1u) + team] = acc[min(gb + gg, MAX_G - 1u)];
            }
            workgroupBarrier();
            if lid < GB * TEAMS {
                let gg = lid / TEAMS;
                let tm = lid % TEAMS;
                var s = 0.0;
                for (var l = 0u; l < LANES; l++) {
                    s += sred[gg * RSTRIDE + l * (TEAMS + 1u) + tm];
                }
                let jj = kk * TEAMS + tm;
                if gb + gg < group {
                    sp[(gb + gg) * BLK + jj] = select(NEG_BIG, s * SCALE, jj < cnt);
                }
            }
            workgroupBarrier();
        }
    }

    if SUBGROUPS {
        workgroupBarrier(); // every score is in sp
    }

    // ---- block max m and sum l per head: LANES threads per head (g = lid / LANES) ----
    let g = lid / LANES;
    var mx = NEG_BIG;
    if g < group {
        for (var k = 0u; k < BLK / LANES; k++) {
            mx = max(mx, sp[g * BLK + lane + k * LANES]);
        }
    }
    var m: f32;
    if SUBGROUPS {
        let r = lanes_max_f32(th, LANES, mx);
        if lane == 0u {
            sm_b[g] = r;
        }
        workgroupBarrier();
        m = sm_b[g];
    } else {
        sred[lid] = mx;
        workgroupBarrier();
        for (var r = LANES / 2u; r > 0u; r >>= 1u) {
            if lane < r {
                sred[lid] = max(sred[lid], sred[lid + r]);
            }
            workgroupBarrier();
        }
        m = sred[g * LANES];
    }
    var sum = 0.0;
    if g < group {
        for (var k = 0u; k < BLK / LANES; k++) {
            let j = lane + k * LANES;
            let e = g * BLK + j;
            var pv = 0.0;
            if j < cnt {
                pv = exp(sp[e] - m);
            }
            sp[e] = pv;
            sum += pv;
        }
    }
    var l = 0.0; // valid in each head's first lane
    if SUBGROUPS {
        l = lanes_sum_f32(th, LANES, sum);
    } else {
        sred[SWG + lid] = sum;
        workgroupBarrier();
        for (var r = LANES / 2u; r > 0u; r >>= 1u) {
            if lane < r {
                sred[SWG + lid] += sred[SWG + lid + r];
            }
            workgroupBarrier();
        }
        l = sred[SWG + lid];
    }
    let stride = HD + 2u;
    if lane == 0u && g < group {
        let pb = ((t * HEADS + kvh * group + g) * NB + blk) * stride;
        out[pb] = m;
        out[pb + 1u] = l;
    }
    workgroupBarrier(); // sred is reused below

    // ---- values: o[g, i] (dims i and i + HD/2) = Σ_j p[g, j] · v_j ----
    let gh = group * half; // (head, word) pairs
    if gh >= SWG {
        for (var e = lid; e < gh; e += SWG) {
            let gi = e / half;
            let i = e % half;
            var a = vec2<f32>(0.0);
            for (var j = 0u; j < cnt; j++) {
                a += sp[gi * BLK + j] * value_pair((p0 + j) * rw + kv_off, i);
            }
            let pb = ((t * HEADS + kvh * group + gi) * NB + blk) * stride + 2u;
            out[pb + i] = a.x;
            out[pb + i + half] = a.y;
        }
    } else {
        // rs sets of gh threads, set r adding rows r, r + rs, ...
        let rs = SWG / gh;
        let e = lid % gh;
        let r = lid / gh;
        let gi = e / half;
        let i = e % half;
        var a = vec2<f32>(0.0);
        if r < rs {
            for (var j = r; j < cnt; j += rs) {
                a += sp[gi * BLK + j] * value_pair((p0 + j) * rw + kv_off, i);
            }
        }
        sred[2u * lid] = a.x;
        sred[2u * lid + 1u] = a.y;
        workgroupBarrier();
        if lid < gh {
            var o = vec2<f32>(0.0);
            for (var rr = 0u; rr < rs; rr++) {
                let k = rr * gh + lid;
                o += vec2<f32>(sred[2u * k], sred[2u * k + 1u]);
            }
            let pb = ((t * HEADS + kvh * group + gi) * NB + blk) * stride + 2u;
            out[pb + i] = o.x;
            out[pb + i + half] = o.y;
        }
    }
}

// ---- attend_combine: dispatch n · HEADS workgroups (folded 2-D) ----
// Merges the blocks of one (token, head): tree max and sum over the blocks, then the weights
// e^(m_b − M) / L of CWG blocks at a time in workgroup memory and o[d] = Σ_b w_b o_b[d], the
// blocks split over CWG / HD thread sets when HD < CWG (adjacent threads read adjacent dims).
const CWG: u32 = 256u;

@group(0) @binding(1) var<storage, read> cb_part: array<f32>;         // [n, HEADS, NB, HD + 2]
@group(0) @binding(2) var<storage, read_write> cb_out: array<f32>;    // [capacity, HEADS * HD]
@group(0) @binding(3) var<storage, read> cb_rows: array<vec4<u32>>;   // [n] (token, pos, slot, 0)

var<workgroup> cred: array<f32, CWG>; // the dims' partial outputs
var<workgroup> cw: array<f32, CWG>;   // e^(m_b − M) / L of the current CWG blocks

@compute @workgroup_size(256)
fn attend_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  th: Thread) {
    let lid = thread_index(th);
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
    for (var b = lid; b < nb; b += CWG) {
        mx = max(mx, cb_part[base + b * stride]);
    }
    let big_m = wg_max_f32(th, CWG, mx);
    var l = 0.0;
    for (var b = lid; b < nb; b += CWG) {
        l += cb_part[base + b * stride + 1u] * exp(cb_part[base + b * stride] - big_m);
    }
    let inv_l = 1.0 / wg_sum_f32(th, CWG, l);
    // thread (r, d): dims d = lid % HD (+ CWG ... when HD > CWG), blocks r, r + rs, ...
    let rs = max(1u, CWG / HD);
    let r = lid / HD;
    var o = array<f32, 2>(0.0, 0.0); // dims lid and lid + CWG when HD > CWG (HD ≤ 512)
    for (var c0 = 0u; c0 < nb; c0 += CWG) {
        let b = c0 + lid;
        var w = 0.0;
        if b < nb {
            w = exp(cb_part[base + b * stride] - big_m) * inv_l;
        }
        cw[lid] = w;
        workgroupBarrier();
        let cn = min(CWG, nb - c0);
        if HD >= CWG {
            for (var k = 0u; k < 2u; k++) {
                let d = lid + k * CWG;
                if d < HD {
                    var a = o[k];
                    for (var bb = 0u; bb < cn; bb++) {
                        a += cw[bb] * cb_part[base + (c0 + bb) * stride + 2u + d];
                    }
                    o[k] = a;
                }
            }
        } else if r < rs {
            let d = lid % HD;
            var a = o[0];
            for (var bb = r; bb < cn; bb += rs) {
                a += cw[bb] * cb_part[base + (c0 + bb) * stride + 2u + d];
            }
            o[0] = a;
        }
        workgroupBarrier(); // cw is rewritten by the next chunk
    }
    let ob = t * HEADS * HD + h * HD;
    if HD >= CWG {
        for (var k = 0u; k < 2u; k++) {
            let d = lid + k * CWG;
            if d < HD {
                cb_out[ob + d] = o[k];
            }
        }
    } else {
        cred[lid] = o[0];
        workgroupBarrier();
        if lid < HD {
            var a = 0.0;
            for (var rr = 0u; rr < rs; rr++) {
                a += cred[rr * HD + lid];
            }
            cb_out[ob + lid] = a;
        }
    }
}
