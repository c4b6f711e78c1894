// Workgroup reductions built on subgroup operations (Features::SUBGROUP): the functions of
// shaders/reduce_workgroup.wgsl with the same contracts, prepended instead of it on a device
// that has subgroups. No subgroup size is assumed (NVIDIA 32, AMD 32/64, Intel 8–32, Apple 32,
// lavapipe 4–16): every function reads subgroup_size at run time. Threads are numbered
// subgroup by subgroup (thread_index = subgroup_id · subgroup_size + subgroup_invocation_id), so
// that a run of consecutive thread numbers lies in one subgroup whatever order the driver gives
// local_invocation_index; the backend checks at device creation that subgroups are full (the
// numbering is then a permutation of 0 .. n) and falls back to the workgroup variant otherwise.

// Which variant this is, for kernels whose best shape differs between the two (both branches
// compile in both variants: they only call this library).
const SUBGROUPS: bool = true;

struct Thread {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
}

fn thread_index(th: Thread) -> u32 {
    return th.sg_id * th.sg_size + th.sg_lane;
}

var<workgroup> reduce_a: array<u32, 256>; // one value per subgroup (as bits)
var<workgroup> reduce_b: array<u32, 256>; // argmax indices

// `op` over the thread's subgroup, in every lane.
fn subgroup_reduce(op: u32, v: u32) -> u32 {
    switch op {
        case OP_ADD_F32: {
            return bitcast<u32>(subgroupAdd(bitcast<f32>(v)));
        }
        case OP_MAX_F32: {
            return bitcast<u32>(subgroupMax(bitcast<f32>(v)));
        }
        default: {
            return bitcast<u32>(subgroupAdd(bitcast<i32>(v)));
        }
    }
}

// `op` over the workgroup of n threads, the same value in every thread: a subgroup reduction,
// then the subgroups' results in subgroup order (every thread reads them all:
// n / subgroup_size ≤ 64 values).
fn wg_reduce(th: Thread, n: u32, op: u32, v: u32) -> u32 {
    let s = subgroup_reduce(op, v);
    if th.sg_lane == 0u {
        reduce_a[th.sg_id] = s;
    }
    workgroupBarrier();
    var r = reduce_a[0];
    for (var i = 1u; i < n / th.sg_size; i++) {
        r = combine(op, r, reduce_a[i]);
    }
    workgroupBarrier(); // reduce_a is reused by the next reduction
    return r;
}

// `op` over each run of `lanes` consecutive thread numbers; valid in the run's first thread.
// Runs within a subgroup: a butterfly of shuffles (no workgroup memory, no barrier). Runs wider
// than a subgroup: subgroup reductions, combined through workgroup memory.
fn lanes_reduce(th: Thread, lanes: u32, op: u32, v: u32) -> u32 {
    var r = v;
    if th.sg_size >= lanes {
        for (var off = lanes / 2u; off > 0u; off >>= 1u) {
            r = combine(op, r, subgroupShuffleXor(r, off));
        }
        return r;
    }
    let s = subgroup_reduce(op, v);
    if th.sg_lane == 0u {
        reduce_a[th.sg_id] = s;
    }
    workgroupBarrier();
    if th.sg_lane == 0u {
        r = reduce_a[th.sg_id];
        for (var k = 1u; k < lanes / th.sg_size; k++) {
            r = combine(op, r, reduce_a[th.sg_id + k]);
        }
    }
    workgroupBarrier();
    return r;
}

// The argmax_better winner: a butterfly over the subgroup's lanes (lane 0's result is kept),
// then the subgroups' winners in subgroup order.
fn wg_argmax(th: Thread, n: u32, v: f32, i: u32) -> vec2<u32> {
    var bv = v;
    var bi = i;
    for (var off = th.sg_size / 2u; off > 0u; off >>= 1u) {
        let ov = subgroupShuffleXor(bv, off);
        let oi = subgroupShuffleXor(bi, off);
        if argmax_better(ov, oi, bv, bi) {
            bv = ov;
            bi = oi;
        }
    }
    if th.sg_lane == 0u {
        reduce_a[th.sg_id] = bitcast<u32>(bv);
        reduce_b[th.sg_id] = bi;
    }
    workgroupBarrier();
    var rv = bitcast<f32>(reduce_a[0]);
    var ri = reduce_b[0];
    for (var k = 1u; k < n / th.sg_size; k++) {
        if argmax_better(bitcast<f32>(reduce_a[k]), reduce_b[k], rv, ri) {
            rv = bitcast<f32>(reduce_a[k]);
            ri = reduce_b[k];
        }
    }
    workgroupBarrier();
    return vec2<u32>(bitcast<u32>(rv), ri);
}
