// Prelude prepended (by the host, src/backend/wgpu/kernels.rs) to every kernel file of shaders/.
//
// `Step` is the only per-token upload: the host writes these 16 bytes once per step (begin_step)
// and every dispatch of the step reads them, so decoding a token re-uses the recorded bind groups.
struct Step {
    n_tokens: u32,  // live rows of this step
    start_pos: u32, // position of row 0 (informative: kernels use each row's own position)
    _pad0: u32,
    _pad1: u32,
}

// The kernels that need a row's token, position or KV-cache slot bind the step's rows buffer
// `array<vec4<u32>>` [n_tokens] = (token, pos, slot, 0), written once per step with the
// uniform: rows of several sequences at unrelated positions can share one step.

// Workgroup index of a dispatch that the host may have folded onto a 2-D grid, because one
// dimension is limited to max_compute_workgroups_per_dimension (65535 on most devices).
fn linear_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Argmax order, shared by the LM head's epilogue and argmax.wgsl: does (va, ia) win over (vb, ib)?
// The larger value wins, ties go to the lower index (torch.argmax, the CPU backend);
// ARGMAX_EMPTY marks "no value yet".
const ARGMAX_EMPTY: u32 = 0xffffffffu;

fn argmax_better(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    if ia == ARGMAX_EMPTY {
        return false;
    }
    if ib == ARGMAX_EMPTY {
        return true;
    }
    return va > vb || (va == vb && ia < ib);
}

// The reductions of shaders/reduce_*.wgsl work on values as u32 bits with one of these
// operators, so that each variant has one tree / one combining loop for every type.
const OP_ADD_F32: u32 = 0u;
const OP_MAX_F32: u32 = 1u;
const OP_ADD_I32: u32 = 2u;

fn combine(op: u32, a: u32, b: u32) -> u32 {
    switch op {
        case OP_ADD_F32: {
            return bitcast<u32>(bitcast<f32>(a) + bitcast<f32>(b));
        }
        case OP_MAX_F32: {
            return bitcast<u32>(max(bitcast<f32>(a), bitcast<f32>(b)));
        }
        default: {
            return bitcast<u32>(bitcast<i32>(a) + bitcast<i32>(b));
        }
    }
}

// The typed reductions every kernel calls, over the `wg_reduce` / `lanes_reduce` of the variant
// prepended after this file (shaders/reduce_subgroup.wgsl or reduce_workgroup.wgsl), with the
// `Thread` it defines. Call them from uniform control flow with every thread of the workgroup.

// Σ v over the workgroup of n threads, the same value in every thread.
fn wg_sum_f32(th: Thread, n: u32, v: f32) -> f32 {
    return bitcast<f32>(wg_reduce(th, n, OP_ADD_F32, bitcast<u32>(v)));
}

// max v over the workgroup, in every thread.
fn wg_max_f32(th: Thread, n: u32, v: f32) -> f32 {
    return bitcast<f32>(wg_reduce(th, n, OP_MAX_F32, bitcast<u32>(v)));
}

// Σ v over the workgroup (exact), in every thread.
fn wg_sum_i32(th: Thread, n: u32, v: i32) -> i32 {
    return bitcast<i32>(wg_reduce(th, n, OP_ADD_I32, bitcast<u32>(v)));
}

// Σ v over each run of `lanes` consecutive thread numbers (lanes a power of two ≤ n), exact;
// valid in the first thread of each run (thread_index % lanes == 0).
fn lanes_sum_i32(th: Thread, lanes: u32, v: i32) -> i32 {
    return bitcast<i32>(lanes_reduce(th, lanes, OP_ADD_I32, bitcast<u32>(v)));
}

fn lanes_sum_f32(th: Thread, lanes: u32, v: f32) -> f32 {
    return bitcast<f32>(lanes_reduce(th, lanes, OP_ADD_F32, bitcast<u32>(v)));
}

fn lanes_max_f32(th: Thread, lanes: u32, v: f32) -> f32 {
    return bitcast<f32>(lanes_reduce(th, lanes, OP_MAX_F32, bitcast<u32>(v)));
}
