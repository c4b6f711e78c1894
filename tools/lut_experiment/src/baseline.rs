//! The shipped kernels, called through the crate's public `dispatch` wrappers in the loop order
//! of `CpuMatmul::matmul_prefill` (`src/backend/cpu/matmul.rs`), on one thread: jobs of 16 byte
//! rows, blocks of 32 tokens, tokens 4, then 2, then 1 at a time per byte row. Only the float
//! scaling of the outputs is left out (the LUT kernels do not do it either).

use bitnet_wgpu::backend::cpu::dispatch::{
    ternary_dot4, ternary_dot4_x2, ternary_dot4_x4, CpuLevel,
};

/// `matmul.rs`'s `BYTE_ROWS` and `TOKEN_BLOCK`.
const BYTE_ROWS: usize = 16;
const TOKEN_BLOCK: usize = 32;

/// `out[t · rows + r] = Σ_c W[r, c] · x[t · cols + c]` with `packed` in the shipped layout.
pub fn matmul(
    level: CpuLevel,
    packed: &[u8],
    rows: usize,
    cols: usize,
    x: &[i8],
    q_sum: &[i32],
    out: &mut [i32],
) {
    let (n, p4) = (x.len() / cols, rows / 4);
    let row = |t: usize| &x[t * cols..(t + 1) * cols];
    let mut put = |t: usize, p: usize, r: [i32; 4]| {
        for (i, v) in r.into_iter().enumerate() {
            out[t * rows + i * p4 + p] = v;
        }
    };
    for p0 in (0..p4).step_by(BYTE_ROWS) {
        let p1 = (p0 + BYTE_ROWS).min(p4);
        for t0 in (0..n).step_by(TOKEN_BLOCK) {
            let t1 = (t0 + TOKEN_BLOCK).min(n);
            for p in p0..p1 {
                let bytes = &packed[p * cols..(p + 1) * cols];
                let mut t = t0;
                while t + 4 <= t1 {
                    let q = [row(t), row(t + 1), row(t + 2), row(t + 3)];
                    let s = [q_sum[t], q_sum[t + 1], q_sum[t + 2], q_sum[t + 3]];
                    for (k, r) in ternary_dot4_x4(level, bytes, q, s).into_iter().enumerate() {
                        put(t + k, p, r);
                    }
                    t += 4;
                }
                if t + 2 <= t1 {
                    let r = ternary_dot4_x2(
                        level,
                        bytes,
                        [row(t), row(t + 1)],
                        [q_sum[t], q_sum[t + 1]],
                    );
                    put(t, p, r[0]);
                    put(t + 1, p, r[1]);
                    t += 2;
                }
                if t < t1 {
                    put(t, p, ternary_dot4(level, bytes, row(t), q_sum[t]));
                }
            }
        }
    }
}
