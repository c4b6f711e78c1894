// Greedy pick over logits row 0 [LEN] on the device, so that a decoded token reads back 4 bytes.
// Ties go to the lowest index (like torch.argmax and the CPU backend).
// argmax_partial: each workgroup reduces PER_WG consecutive values to (value bits, index).
// argmax_final:   one workgroup reduces the NPART partials and writes result[0] = index (the
//                 partials may also come from the LM head's epilogue, shaders/embedding.wgsl).

override LEN: u32 = 1u;   // values in the row
override NPART: u32 = 1u; // partials = ceil(LEN / PER_WG)

const WG: u32 = 256u;
override PER_WG: u32 = 4096u; // values per argmax_partial workgroup (host: argmax.rs ARGMAX_PER_WG)
const EMPTY: u32 = ARGMAX_EMPTY; // index of "no value yet" (common.wgsl)

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> values: array<f32>;              // [LEN] (row 0)
@group(0) @binding(2) var<storage, read_write> partial: array<vec2<u32>>; // [NPART]
@group(0) @binding(3) var<storage, read_write> result: array<u32>;        // [4]

@compute @workgroup_size(256)
fn argmax_partial(@builtin(workgroup_id) wid: vec3<u32>, th: Thread) {
    let lid = thread_index(th);
    var bv = 0.0;
    var bi = EMPTY;
    let end = min(LEN, (wid.x + 1u) * PER_WG);
    for (var i = wid.x * PER_WG + lid; i < end; i += WG) {
        let v = values[i];
        if argmax_better(v, i, bv, bi) {
            bv = v;
            bi = i;
        }
    }
    let best = wg_argmax(th, WG, bv, bi);
    if lid == 0u {
        partial[wid.x] = best;
    }
}

@compute @workgroup_size(256)
fn argmax_final(th: Thread) {
    let lid = thread_index(th);
    var bv = 0.0;
    var bi = EMPTY;
    for (var i = lid; i < NPART; i += WG) {
        let p = partial[i];
        if argmax_better(bitcast<f32>(p.x), p.y, bv, bi) {
            bv = bitcast<f32>(p.x);
            bi = p.y;
        }
    }
    let best = wg_argmax(th, WG, bv, bi);
    if lid == 0u {
        result[0] = select(best.y, 0u, best.y == EMPTY);
    }
}
