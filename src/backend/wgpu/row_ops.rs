//! The row-wise ops of the residual stream (RMSNorm, int8 quantize, and the two as one op), each
//! one dispatch of shaders/row_ops.wgsl, one workgroup per row.

use super::kernels;
use super::{layout, GpuBuf, GpuQTensor, GpuTensor, GpuVector, WgpuBackend};
use crate::error::{BitnetError, Result};

/// Threads per row_ops workgroup (one workgroup per row): shaders/row_ops.wgsl `WG`.
pub(super) const ROW_OPS_WG: usize = 256;

impl WgpuBackend {
    /// One dispatch of row_ops over `x [n, cols]`: the norm `(w, eps)` into `xn` (when there is
    /// no quantize) and / or the quantization into `(q, meta)`.
    fn row_ops(
        &mut self,
        x: &GpuBuf,
        cols: usize,
        norm: Option<(&GpuBuf, f32)>,
        xn: Option<&GpuBuf>,
        quant: Option<(&GpuBuf, &GpuBuf)>,
    ) -> Result<()> {
        let (dr, drw) = (self.dummy_r.clone(), self.dummy_rw.clone());
        let (w, eps) = norm.unwrap_or((&dr, 0.0));
        let (q, meta) = quant.unwrap_or((&drw, &drw));
        let xn = xn.unwrap_or(&drw);
        let consts = [
            ("COLS", cols as f64),
            ("QW", (4 * layout::groups(cols)) as f64),
            ("EPS", eps as f64),
            ("NORM", if norm.is_some() { 1.0 } else { 0.0 }),
            ("QUANT", if quant.is_some() { 1.0 } else { 0.0 }),
            ("WG", ROW_OPS_WG as f64),
        ];
        let groups = self.grid(self.n())?;
        self.record(&kernels::ROW_OPS, &consts, &[x, w, xn, q, meta], groups)
    }

    pub(super) fn op_rms_norm(
        &mut self,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let cols = w.len;
        self.check("rms_norm", x, cols)?;
        self.check("rms_norm", out, cols)?;
        if x.buf.id == out.buf.id {
            return Err(BitnetError::op(
                "rms_norm",
                "input and output are one tensor",
            ));
        }
        self.row_ops(&x.buf, cols, Some((&w.buf, eps)), Some(&out.buf), None)
    }

    pub(super) fn op_quantize(&mut self, x: &GpuTensor, out: &mut GpuQTensor) -> Result<()> {
        self.check("quantize", x, out.cols)?;
        if out.capacity < self.n() {
            return Err(BitnetError::op("quantize", "output has too few rows"));
        }
        self.row_ops(&x.buf, x.cols, None, None, Some((&out.q, &out.meta)))
    }

    pub(super) fn op_rms_norm_quantize(
        &mut self,
        x: &GpuTensor,
        w: &GpuVector,
        eps: f32,
        out: &mut GpuQTensor,
    ) -> Result<()> {
        let cols = w.len;
        self.check("rms_norm_quantize", x, cols)?;
        if out.cols != cols || out.capacity < self.n() {
            return Err(BitnetError::op(
                "rms_norm_quantize",
                format!(
                    "output [{}, {}] cannot hold {} rows of {cols} columns",
                    out.capacity,
                    out.cols,
                    self.n()
                ),
            ));
        }
        self.row_ops(
            &x.buf,
            cols,
            Some((&w.buf, eps)),
            None,
            Some((&out.q, &out.meta)),
        )
    }
}
