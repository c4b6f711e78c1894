//! The ternary × int8 matmul (shaders/ternary_matmul.wgsl): the mat-vec kernel for decode steps
//! and the tiled kernel for prefill.

use super::kernels;
use super::{layout, GpuLinear, GpuQTensor, GpuTensor, WgpuBackend};
use crate::error::Result;
use crate::ternary::TernaryMatrix;

/// Token counts up to this use the mat-vec kernel (decode); larger steps the tiled matmul.
pub const MATVEC_MAX_TOKENS: usize = 4;

impl WgpuBackend {
    pub(super) fn op_upload_linear(&mut self, w: &TernaryMatrix) -> Result<GpuLinear> {
        let words = layout::repack_ternary(w);
        let buf = self.storage(
            &w.name,
            (words.len() * 4) as u64,
            Some(bytemuck::cast_slice(&words)),
        )?;
        let params = [
            w.rows as u32,
            layout::groups(w.cols) as u32,
            w.out_scale.to_bits(),
            0,
        ];
        let params = self.uniform("linear params", bytemuck::cast_slice(&params))?;
        Ok(GpuLinear {
            w: buf,
            params,
            name: w.name.clone(),
            rows: w.rows,
            cols: w.cols,
        })
    }

    /// The ternary matmul's exact integer accumulators `x_q · Wᵀ` as f32 (exact below 2^24),
    /// through the same kernels with the RAW_ACC constant: the integer path tested bit for bit.
    #[doc(hidden)]
    pub fn ternary_matmul_acc(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.matmul(w, x, out, true)
    }

    pub(super) fn matmul(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        out: &mut GpuTensor,
        raw: bool,
    ) -> Result<()> {
        let n = self.n();
        crate::backend::check_matmul(&w.name, (w.rows, w.cols), (x.capacity, x.cols), n)?;
        self.check("ternary_matmul", out, w.rows)?;
        let consts = [("RAW_ACC", if raw { 1.0 } else { 0.0 })];
        let bufs = [&w.params, &w.w, &x.q, &x.meta, &out.buf];
        if n <= MATVEC_MAX_TOKENS {
            let groups = [w.rows.div_ceil(16) as u32, n as u32, 1];
            self.record(&kernels::MATVEC, &consts, &bufs, groups)
        } else {
            let groups = [w.rows.div_ceil(64) as u32, n.div_ceil(32) as u32, 1];
            self.record(&kernels::MATMUL_TILED, &consts, &bufs, groups)
        }
    }
}
