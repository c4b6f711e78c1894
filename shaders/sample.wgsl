// Sampling of logits row 0 on the device, so that a sampled decode keeps its tokens on the GPU
// like the greedy one (the host reads 4 bytes one step late). One workgroup of WG threads runs
// the CPU sampler's steps (src/sampler.rs) in the same order:
//   1. repeat penalty (llama.cpp's: logit / p if positive, · p otherwise, once per distinct
//      token of the window), applied in place: the logits buffer then holds penalised logits;
//   2. top-k without a sort of the vocabulary: a radix select over order-preserving keys
//      (4 passes of 8 bits, histograms in workgroup memory) finds the key of the k-th largest
//      logit; the logits above it and the lowest-index ones equal to it (the CPU's tie order)
//      are gathered, k in all, and sorted (bitonic, value descending then index ascending);
//   3. on those k: softmax at the temperature (the largest logit subtracted first), min-p, top-p,
//      renormalisation and the inverse-CDF draw with the host's uniform `r` (drawn from the
//      CPU sampler's seeded stream), by one thread in the sorted order.
// NaN logits count as -inf (the CPU sampler's rule). Where the CPU sums in f64 this sums in f32,
// so a draw within ~1e-6 of a CDF boundary may pick the neighbour (tests/gpu_kernels.rs
// sampler tests measure it). Temperature 0 (with a penalty) is the argmax of the penalised
// logits. Every logit -inf or NaN: result = 0xffffffff, an error on the host.

override LEN: u32 = 1u;   // vocabulary (logits row length)
override KMAX: u32 = 64u;  // candidates sorted: a power of two ≥ top-k (host: sample.rs)
override WMAX: u32 = 256u; // largest penalty window (host: sample.rs SAMPLE_WMAX)

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

struct SampleParams {
    temperature: f32,
    top_p: f32,
    min_p: f32,
    penalty: f32,   // repeat penalty (1 = off)
    r: f32,         // uniform in [0, 1) from the host's seeded stream
    top_k: u32,     // 1 ..= KMAX (clamped)
    n_window: u32,  // tokens in `window` (host-known history tail)
    device_token: u32, // 1: the step's row-0 token (on the device only) ends the window
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> values: array<f32>;   // [LEN] logits row 0
@group(0) @binding(2) var<storage, read> params: SampleParams;
@group(0) @binding(3) var<storage, read> window: array<u32>;         // [WMAX] recent token ids
@group(0) @binding(4) var<storage, read> step_rows: array<vec4<u32>>; // [n] (token, pos, slot, 0)
@group(0) @binding(5) var<storage, read_write> result: array<u32>;   // [4] the picked token

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> sel: vec3<u32>;              // (prefix, mask, remaining)
var<workgroup> counts: array<vec2<u32>, WG>; // per thread (above, equal), then their offsets
var<workgroup> cand_v: array<f32, KMAX>;
var<workgroup> cand_i: array<u32, KMAX>;

// NaN → -inf, tested on the bits (a shader compiler may assume that `v != v` is false).
fn clean(v: f32) -> f32 {
    if (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u {
        return -bitcast<f32>(0x7f800000u);
    }
    return v;
}

// Order-preserving key: larger float ⇒ larger key (−0 below +0, as total_cmp).
fn key_of(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b ^ 0x80000000u, ~b, (b >> 31u) == 1u);
}

// Does candidate a come before b in the CPU's order (value descending, then index ascending)?
fn before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

@compute @workgroup_size(256)
fn sample_token(@builtin(local_invocation_index) lid: u32) {
    // 1. repeat penalty, in place
    if lid == 0u && params.penalty != 1.0 {
        let n = min(params.n_window, WMAX) + params.device_token;
        for (var j = 0u; j < n; j++) {
            var id = step_rows[0].x;
            if j < min(params.n_window, WMAX) {
                id = window[j];
            }
            var seen = false;
            for (var m = 0u; m < j && m < min(params.n_window, WMAX); m++) {
                seen = seen || window[m] == id;
            }
            if id < LEN && !seen {
                let l = values[id];
                values[id] = select(l * params.penalty, l / params.penalty, l > 0.0);
            }
        }
    }
    storageBarrier();
    workgroupBarrier();

    // 2. radix select of the k-th largest key
    let k = clamp(params.top_k, 1u, min(KMAX, LEN));
    if lid == 0u {
        sel = vec3<u32>(0u, 0u, k);
    }
    for (var digit = 0u; digit < 4u; digit++) {
        let shift = 24u - 8u * digit;
        atomicStore(&hist[lid], 0u);
        workgroupBarrier();
        let prefix = sel.x;
        let mask = sel.y;
        for (var i = lid; i < LEN; i += WG) {
            let key = key_of(clean(values[i]));
            if (key & mask) == prefix {
                atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if lid == 0u {
            var remaining = sel.z;
            var cum = 0u;
            var b = 255u;
            loop {
                let h = atomicLoad(&hist[b]);
                if cum + h >= remaining || b == 0u {
                    remaining -= cum;
                    break;
                }
                cum += h;
                b -= 1u;
            }
            sel = vec3<u32>(prefix | (b << shift), mask | (255u << shift), remaining);
        }
        workgroupBarrier();
    }
    let threshold = sel.x; // the key of the k-th largest logit
    let take_equal = sel.z; // how many logits equal to it are among the k

    // gather: contiguous ranges per thread, so offsets follow the index order
    let span = (LEN + WG - 1u) / WG;
    let lo = min(lid * span, LEN);
    let hi = min(lo + span, LEN);
    var above = 0u;
    var equal = 0u;
    for (var i = lo; i < hi; i++) {
        let key = key_of(clean(values[i]));
        above += u32(key > threshold);
        equal += u32(key == threshold);
    }
    counts[lid] = vec2<u32>(above, equal);
    workgroupBarrier();
    if lid == 0u {
        var acc = vec2<u32>(0u);
        for (var t = 0u; t < WG; t++) {
            let c = counts[t];
            counts[t] = acc;
            acc += c;
        }
    }
    workgroupBarrier();
    var ga = counts[lid].x;               // next slot for a logit above the threshold
    var ge = counts[lid].y;               // rank among the equal ones
    let n_above = k - take_equal;
    for (var i = lo; i < hi; i++) {
        let v = clean(values[i]);
        let key = key_of(v);
        if key > threshold {
            cand_v[ga] = v;
            cand_i[ga] = i;
            ga++;
        } else if key == threshold {
            if ge < take_equal {
                cand_v[n_above + ge] = v;
                cand_i[n_above + ge] = i;
            }
            ge++;
        }
    }
    // pad to KMAX, sorting last
    for (var i = k + lid; i < KMAX; i += WG) {
        cand_v[i] = -bitcast<f32>(0x7f800000u);
        cand_i[i] = NONE;
    }
    workgroupBarrier();

    // bitonic sort of KMAX candidates: value descending, index ascending
    for (var size = 2u; size <= KMAX; size <<= 1u) {
        for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
            for (var t = lid; t < KMAX / 2u; t += WG) {
                let a = 2u * stride * (t / stride) + t % stride;
                let b = a + stride;
                let up = (a & size) == 0u; // this run sorts in the CPU's order
                let va = cand_v[a];
                let ia = cand_i[a];
                let vb = cand_v[b];
                let ib = cand_i[b];
                if before(vb, ib, va, ia) == up {
                    cand_v[a] = vb;
                    cand_i[a] = ib;
                    cand_v[b] = va;
                    cand_i[b] = ia;
                }
            }
            workgroupBarrier();
        }
    }

    // 3. softmax, min-p, top-p, draw (one thread, sorted order)
    if lid == 0u {
        let top = cand_v[0];
        if top == -bitcast<f32>(0x7f800000u) {
            result[0] = NONE;
            return;
        }
        if params.temperature == 0.0 {
            result[0] = cand_i[0];
            return;
        }
        var sum = 0.0;
        for (var i = 0u; i < k; i++) {
            var d = 0.0;
            if cand_v[i] != top {
                d = cand_v[i] - top;
            }
            let e = exp(d / params.temperature);
            cand_v[i] = e;
            sum += e;
        }
        for (var i = 0u; i < k; i++) {
            cand_v[i] = cand_v[i] / sum;
        }
        var m = k;
        if params.min_p > 0.0 {
            let p_floor = cand_v[0] * params.min_p;
            m = 1u;
            while m < k && cand_v[m] >= p_floor {
                m++;
            }
        }
        if params.top_p < 1.0 {
            var acc = 0.0;
            for (var i = 0u; i < m; i++) {
                acc += cand_v[i];
                if acc >= params.top_p {
                    m = i + 1u;
                    break;
                }
            }
        }
        var total = 0.0;
        for (var i = 0u; i < m; i++) {
            total += cand_v[i];
        }
        var pick = cand_i[m - 1u];
        var acc = 0.0;
        for (var i = 0u; i < m; i++) {
            acc += cand_v[i] / total;
            if params.r < acc {
                pick = cand_i[i];
                break;
            }
        }
        result[0] = pick;
    }
}
