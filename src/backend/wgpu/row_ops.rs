//! The row-wise ops of the residual stream (add, relu²·up, silu·up, RMSNorm, int8 quantize), recorded
//! lazily and emitted as one dispatch of shaders/row_ops.wgsl per chain.

use super::kernels;
use super::{layout, GpuBuf, GpuQTensor, GpuTensor, GpuVector, WgpuBackend};
use crate::error::{BitnetError, Result};

/// Threads per row_ops workgroup (one workgroup per row): shaders/row_ops.wgsl `WG`.
pub(super) const ROW_OPS_WG: usize = 256;

/// The operation applied to a row before the norm (shaders/row_ops.wgsl PRE).
#[derive(Debug, Clone)]
pub(super) enum Pre {
    None,
    /// `a += y`
    Add {
        y: GpuBuf,
    },
    /// `a = relu(gate)² · up`
    Relu2 {
        gate: GpuBuf,
        up: GpuBuf,
    },
    /// `a = silu(gate) · up`
    Silu {
        gate: GpuBuf,
        up: GpuBuf,
    },
}

/// A chain of row-wise ops on the same rows that is recorded lazily and emitted as one dispatch
/// of shaders/row_ops.wgsl: the model's `add_assign` / `relu2_mul` / `silu_mul`, `rms_norm`, `quantize`
/// sequences. Any other op, `end_step`, `read` and `write` emit it first.
#[derive(Debug)]
pub(super) struct RowOp {
    a: GpuBuf, // [capacity, cols] the row input (written by the pre-op)
    cols: usize,
    pre: Pre,
    norm: Option<(GpuBuf, f32, GpuBuf)>, // (w [cols], eps, out [capacity, cols])
    quant: Option<(GpuBuf, GpuBuf)>,     // (q [capacity, 4·ceil(cols/16)], meta [capacity, 2])
}

impl RowOp {
    fn new(a: &GpuBuf, cols: usize, pre: Pre, norm: Option<(GpuBuf, f32, GpuBuf)>) -> Self {
        RowOp {
            a: a.clone(),
            cols,
            pre,
            norm,
            quant: None,
        }
    }

    /// Is `b` already bound? (Binding one buffer both read-only and read-write in a dispatch is
    /// invalid, so such a chain is not fused.)
    fn uses(&self, b: &GpuBuf) -> bool {
        let pre = match &self.pre {
            Pre::None => false,
            Pre::Add { y } => y.id == b.id,
            Pre::Relu2 { gate, up } | Pre::Silu { gate, up } => gate.id == b.id || up.id == b.id,
        };
        let norm = self
            .norm
            .as_ref()
            .is_some_and(|(w, _, out)| w.id == b.id || out.id == b.id);
        let quant = self
            .quant
            .as_ref()
            .is_some_and(|(q, m)| q.id == b.id || m.id == b.id);
        self.a.id == b.id || pre || norm || quant
    }
}

impl WgpuBackend {
    /// Emits the pending row-op chain as one dispatch of shaders/row_ops.wgsl.
    /// Emits everything recorded lazily, in order: the pending RoPEs, then the row-op chain.
    pub(super) fn flush_pending(&mut self) -> Result<()> {
        self.flush_ropes()?;
        self.flush_row_op()
    }

    fn flush_row_op(&mut self) -> Result<()> {
        let Some(op) = self.pending.take() else {
            return Ok(());
        };
        let (pre, b, c) = match &op.pre {
            Pre::None => (0, self.dummy_r.clone(), self.dummy_r.clone()),
            Pre::Add { y } => (1, y.clone(), self.dummy_r.clone()),
            Pre::Relu2 { gate, up } => (2, gate.clone(), up.clone()),
            Pre::Silu { gate, up } => (3, gate.clone(), up.clone()),
        };
        let (w, eps, xn) = match &op.norm {
            Some((w, eps, out)) => (w.clone(), *eps, out.clone()),
            None => (self.dummy_r.clone(), 0.0, self.dummy_rw.clone()),
        };
        let (q, meta) = match &op.quant {
            Some((q, m)) => (q.clone(), m.clone()),
            None => (self.dummy_rw.clone(), self.dummy_rw.clone()),
        };
        let consts = [
            ("COLS", op.cols as f64),
            ("QW", (4 * layout::groups(op.cols)) as f64),
            ("EPS", eps as f64),
            ("PRE", pre as f64),
            ("NORM", if op.norm.is_some() { 1.0 } else { 0.0 }),
            ("QUANT", if op.quant.is_some() { 1.0 } else { 0.0 }),
            ("WG", ROW_OPS_WG as f64),
        ];
        let groups = self.grid(self.n())?;
        self.record(
            &kernels::ROW_OPS,
            &consts,
            &[&op.a, &b, &c, &w, &xn, &q, &meta],
            groups,
        )
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
        let norm = Some((w.buf.clone(), eps, out.buf.clone()));
        // Fuse into the pending add / relu2_mul / silu_mul that produced x.
        if let Some(p) = &mut self.pending {
            if p.a.id == x.buf.id && p.norm.is_none() && p.quant.is_none() && !p.uses(&out.buf) {
                p.norm = norm;
                return Ok(());
            }
        }
        self.flush_pending()?;
        self.pending = Some(RowOp::new(&x.buf, cols, Pre::None, norm));
        Ok(())
    }

    pub(super) fn op_quantize(&mut self, x: &GpuTensor, out: &mut GpuQTensor) -> Result<()> {
        self.check("quantize", x, out.cols)?;
        if out.capacity < self.n() {
            return Err(BitnetError::op("quantize", "output has too few rows"));
        }
        // Fuse into the pending op that produced x (its norm output, or its pre-op output).
        if let Some(p) = &mut self.pending {
            let src = p.norm.as_ref().map_or(p.a.id, |n| n.2.id);
            if src == x.buf.id && p.quant.is_none() && !p.uses(&out.q) && !p.uses(&out.meta) {
                p.quant = Some((out.q.clone(), out.meta.clone()));
                return Ok(());
            }
        }
        self.flush_pending()?;
        let mut op = RowOp::new(&x.buf, x.cols, Pre::None, None);
        op.quant = Some((out.q.clone(), out.meta.clone()));
        self.pending = Some(op);
        Ok(())
    }

    pub(super) fn op_relu2_mul(
        &mut self,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.op_gated("relu2_mul", gate, up, out, |gate, up| Pre::Relu2 {
            gate,
            up,
        })
    }

    pub(super) fn op_silu_mul(
        &mut self,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.op_gated("silu_mul", gate, up, out, |gate, up| Pre::Silu { gate, up })
    }

    /// `out = act(gate) · up`: starts a row-op chain whose pre-op (`pre(gate, up)`) is the
    /// gated product, so the norm / quantize after it fuse into the same dispatch.
    fn op_gated(
        &mut self,
        op: &'static str,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &mut GpuTensor,
        pre: fn(GpuBuf, GpuBuf) -> Pre,
    ) -> Result<()> {
        let cols = gate.cols;
        self.check(op, gate, cols)?;
        self.check(op, up, cols)?;
        self.check(op, out, cols)?;
        self.flush_pending()?;
        let pre = pre(gate.buf.clone(), up.buf.clone());
        self.pending = Some(RowOp::new(&out.buf, cols, pre, None));
        Ok(())
    }

    pub(super) fn op_add_assign(&mut self, x: &mut GpuTensor, y: &GpuTensor) -> Result<()> {
        self.check("add", x, y.cols)?;
        self.check("add", y, x.cols)?;
        self.flush_pending()?;
        let pre = Pre::Add { y: y.buf.clone() };
        self.pending = Some(RowOp::new(&x.buf, x.cols, pre, None));
        Ok(())
    }
}
