//! The row-wise ops of the residual stream (RMSNorm, int8 quantize, and the two as one op), each
//! one dispatch of shaders/row_ops.wgsl, one workgroup per row, except a decode step's
//! `rms_norm_quantize`, which is held back and becomes the prologue of the matmul that consumes
//! it (shaders/ternary_matmul.wgsl `*_pro`), or is emitted as its own dispatch before any other
//! op, read or submit. `BITNET_GPU_NO_PROLOGUE=1` turns the prologue off (one more dispatch per
//! norm, for comparisons).

use super::kernels;
use super::{layout, GpuBuf, GpuQTensor, GpuTensor, GpuVector, WgpuBackend};
use crate::error::{BitnetError, Result};

/// Threads per row_ops workgroup (one workgroup per row): shaders/row_ops.wgsl `WG`.
pub(super) const ROW_OPS_WG: usize = 256;

/// Bytes of workgroup memory the matvec prologue needs besides its quantized row (the
/// reduction library's two arrays, the matvec's row sums `[8, 16]` i32, the meta).
const PROLOGUE_WG_BYTES: usize = 2 * 256 * 4 + 128 * 4 + 16;
/// Storage buffers the prologue kernels bind.
const PROLOGUE_STORAGE_BUFFERS: u32 = 10;

/// `BITNET_GPU_NO_PROLOGUE=1`, read once per process.
fn no_prologue() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("BITNET_GPU_NO_PROLOGUE").is_ok_and(|v| v == "1"))
}

/// An `rms_norm_quantize` held back for the next matmul's prologue.
#[derive(Debug)]
pub(super) struct PendingNorm {
    pub x: GpuBuf, // [capacity, cols] f32 input
    pub w: GpuBuf, // [cols] norm weight
    pub eps: f32,
    pub cols: usize,
    pub q: GpuBuf,    // [capacity, 4·groups(cols)] u32 output
    pub meta: GpuBuf, // [capacity, 2] output
}

impl WgpuBackend {
    /// Emits a held-back `rms_norm_quantize` as its own dispatch.
    pub(super) fn flush_pending(&mut self) -> Result<()> {
        match self.pending_norm.take() {
            Some(p) => self.row_ops(
                &p.x,
                p.cols,
                Some((&p.w, p.eps)),
                None,
                Some((&p.q, &p.meta)),
            ),
            None => Ok(()),
        }
    }

    /// The held-back norm if it produced `q` (the matmul about to run consumes it), this step
    /// is a decode step and the matmul writes none of the norm's inputs (`outs`: a dispatch
    /// cannot read a buffer that it writes): the matmul then runs it as its prologue.
    pub(super) fn take_prologue(&mut self, q: &GpuBuf, outs: &[&GpuBuf]) -> Option<PendingNorm> {
        let fits = self.n() <= super::MATVEC_MAX_TOKENS;
        match &self.pending_norm {
            Some(p)
                if fits
                    && p.q.id == q.id
                    && outs.iter().all(|o| o.id != p.x.id && o.id != p.w.id) =>
            {
                self.pending_norm.take()
            }
            _ => None,
        }
    }

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
        self.flush_pending()?;
        let qw_bytes = 16 * layout::groups(cols);
        let prologue = self.n() <= super::MATVEC_MAX_TOKENS
            && !no_prologue()
            && self.limits.max_storage_buffers_per_shader_stage >= PROLOGUE_STORAGE_BUFFERS
            && qw_bytes + PROLOGUE_WG_BYTES
                <= self.limits.max_compute_workgroup_storage_size as usize;
        if prologue {
            self.pending_norm = Some(PendingNorm {
                x: x.buf.clone(),
                w: w.buf.clone(),
                eps,
                cols,
                q: out.q.clone(),
                meta: out.meta.clone(),
            });
            return Ok(());
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
