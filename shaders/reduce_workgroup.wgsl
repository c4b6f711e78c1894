// Workgroup reductions without subgroups: trees in workgroup memory. Prepended to every kernel
// file (after common.wgsl) on a device without Features::SUBGROUP, or with
// BITNET_GPU_NO_SUBGROUPS=1; shaders/reduce_subgroup.wgsl has the same functions built on
// subgroup operations. A kernel takes `th: Thread` as an entry-point argument, works with
// thread_index(th) as its thread number, and calls these functions from uniform control flow
// with every thread of its workgroup of `n` threads (n a power of two, ≤ 256).

// Which variant this is, for kernels whose best shape differs between the two (both branches
// compile in both variants: they only call this library).
const SUBGROUPS: bool = false;

struct Thread {
    @builtin(local_invocation_index) lid: u32,
}

// The thread's number in 0 .. n.
fn thread_index(th: Thread) -> u32 {
    return th.lid;
}

var<workgroup> reduce_a: array<u32, 256>; // values (as bits)
var<workgroup> reduce_b: array<u32, 256>; // argmax indices

// `op` over each run of `lanes` threads by a tree (lanes = n: the whole workgroup); on return
// the run's result is in reduce_a at its first thread, for the caller to read before a barrier.
fn tree(th: Thread, lanes: u32, op: u32, v: u32) {
    let lane = th.lid % lanes;
    reduce_a[th.lid] = v;
    workgroupBarrier();
    for (var s = lanes / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            reduce_a[th.lid] = combine(op, reduce_a[th.lid], reduce_a[th.lid + s]);
        }
        workgroupBarrier();
    }
}

// `op` over the workgroup of n threads, the same value in every thread.
fn wg_reduce(th: Thread, n: u32, op: u32, v: u32) -> u32 {
    tree(th, n, op, v);
    let r = reduce_a[0];
    workgroupBarrier(); // reduce_a is reused by the next reduction
    return r;
}

// `op` over each run of `lanes` consecutive threads; valid in the run's first thread.
fn lanes_reduce(th: Thread, lanes: u32, op: u32, v: u32) -> u32 {
    tree(th, lanes, op, v);
    let r = reduce_a[th.lid];
    workgroupBarrier();
    return r;
}

// The argmax_better winner of the threads' (v, i), as (value bits, index), in every thread.
fn wg_argmax(th: Thread, n: u32, v: f32, i: u32) -> vec2<u32> {
    reduce_a[th.lid] = bitcast<u32>(v);
    reduce_b[th.lid] = i;
    workgroupBarrier();
    for (var s = n / 2u; s > 0u; s >>= 1u) {
        if th.lid < s && argmax_better(bitcast<f32>(reduce_a[th.lid + s]), reduce_b[th.lid + s],
                                       bitcast<f32>(reduce_a[th.lid]), reduce_b[th.lid]) {
            reduce_a[th.lid] = reduce_a[th.lid + s];
            reduce_b[th.lid] = reduce_b[th.lid + s];
        }
        workgroupBarrier();
    }
    let r = vec2<u32>(reduce_a[0], reduce_b[0]);
    workgroupBarrier();
    return r;
}
