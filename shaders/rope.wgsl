// Half-split rotary embedding in place on x [capacity, HEADS * HD], row t at its own position:
//   v'[j] = v[j] cos − v[j + HD/2] sin,   v'[j + HD/2] = v[j + HD/2] cos + v[j] sin.
// cos/sin come from a table the host computes exactly as the CPU backend does (inv_freq and the
// angle pos · inv_freq in f32, sin/cos of that angle in f64, rounded to f32), so the rotation
// factors are bit-identical to the CPU's and no GPU sin/cos of large angles (whose precision
// Vulkan leaves loose outside [-π, π]) is involved. One thread per (token, head, j).

override HEADS: u32 = 1u; // heads in x
override HD: u32 = 2u;    // head_dim

override WG: u32 = 64u; // threads per workgroup (host: attention.rs ROPE_WG)

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;       // [capacity, HEADS * HD]
@group(0) @binding(2) var<storage, read> cs: array<vec2<f32>>;      // [positions, HD / 2] (cos, sin)
@group(0) @binding(3) var<storage, read> step_rows: array<vec4<u32>>; // [n] (token, pos, slot, 0)

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let half = HD / 2u;
    let i = linear_wg(wid, nwg) * WG + lid;
    if i >= step.n_tokens * HEADS * half {
        return;
    }
    let j = i % half;
    let th = i / half; // t * HEADS + head
    let t = th / HEADS;
    let base = th * HD;
    let f = cs[step_rows[t].y * half + j];
    let a = x[base + j];
    let b = x[base + j + half];
    x[base + j] = a * f.x - b * f.y;
    x[base + j + half] = b * f.x + a * f.y;
}
