// A self-test of the reduction library (reduce_workgroup.wgsl or reduce_subgroup.wgsl, whichever
// the device uses), run once when the device is opened: subgroup behaviour is the driver's, and
// a driver whose subgroups are not full or not the same size across a workgroup would break the
// subgroup variant's thread numbering. Each thread writes what it got; the host
// (src/backend/wgpu/device.rs) checks it against the exact answers and falls back to the
// workgroup variant if anything differs. All values are small integers, so every sum is exact.

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> check_out: array<vec4<u32>>; // [3 · 256]

@compute @workgroup_size(256)
fn reduce_check(th: Thread) {
    let i = thread_index(th);
    let a = wg_sum_i32(th, 256u, i32(i));                       // 32640
    let b = lanes_sum_i32(th, 16u, i32(i));                     // Σ of the run of 16 (run start)
    let c = lanes_sum_f32(th, 32u, f32(i % 8u));                // 112 (run start)
    let d = wg_sum_f32(th, 256u, f32(i % 5u));                  // 510
    let e = wg_max_f32(th, 256u, f32((i * 37u) % 251u));        // 250
    // ties: value (i · 37) mod 64, so 63 appears 4 times; the lowest index wins
    let f = wg_argmax(th, 256u, f32((i * 37u) % 64u), i);
    // runs narrower than most subgroups (the shuffle path wherever subgroups have ≥ 4 / 8 lanes)
    let g = lanes_sum_i32(th, 4u, i32(i));
    let h = lanes_sum_f32(th, 8u, f32(i));
    let m16 = lanes_max_f32(th, 16u, f32((i * 7u) % 16u)); // 15 in every run of 16 (run start)
    let m4 = lanes_max_f32(th, 4u, f32(i));                 // the run's last thread number
    check_out[3u * th.lid] = vec4<u32>(i, bitcast<u32>(a), bitcast<u32>(b), bitcast<u32>(c));
    check_out[3u * th.lid + 1u] = vec4<u32>(bitcast<u32>(d), bitcast<u32>(e), f.x, f.y);
    check_out[3u * th.lid + 2u] = vec4<u32>(bitcast<u32>(g), bitcast<u32>(h), bitcast<u32>(m16),
                                            bitcast<u32>(m4));
}
