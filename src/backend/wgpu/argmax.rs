//! Greedy pick on the device (shaders/argmax.wgsl), so a decoded token reads back 4 bytes.

use super::kernels;
use super::{GpuTensor, WgpuBackend};
use crate::error::Result;

/// Values per argmax_partial workgroup (shaders/argmax.wgsl PER_WG).
const ARGMAX_PER_WG: usize = 4096;

impl WgpuBackend {
    pub(super) fn op_argmax_row0(&mut self, logits: &GpuTensor) -> Result<u32> {
        self.record_argmax(logits)?;
        let result = self.argmax_result.clone();
        let bytes = self.download(&result, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Records the argmax of row 0 of `logits` into `argmax_result[0]`: one dispatch over the
    /// LM head's per-workgroup bests when the head wrote these logits last, else two.
    pub(super) fn record_argmax(&mut self, logits: &GpuTensor) -> Result<()> {
        let len = logits.cols;
        if let Some((id, best, wgs)) = self.head_argmax.clone() {
            if id == logits.buf.id {
                let consts = [
                    ("LEN", len as f64),
                    ("NPART", wgs as f64),
                    ("PER_WG", ARGMAX_PER_WG as f64),
                ];
                let result = self.argmax_result.clone();
                return self.record(
                    &kernels::ARGMAX_FINAL,
                    &consts,
                    &[&logits.buf, &best, &result],
                    [1, 1, 1],
                );
            }
        }
        let npart = len.div_ceil(ARGMAX_PER_WG).max(1);
        let partial = match self.argmax_partials.get(&logits.buf.id) {
            Some(p) => p.clone(),
            None => {
                let p = self.storage("argmax partials", (npart * 8) as u64, None)?;
                self.argmax_partials.insert(logits.buf.id, p.clone());
                p
            }
        };
        let consts = [
            ("LEN", len as f64),
            ("NPART", npart as f64),
            ("PER_WG", ARGMAX_PER_WG as f64),
        ];
        let result = self.argmax_result.clone();
        let bufs = [&logits.buf, &partial, &result];
        self.record(
            &kernels::ARGMAX_PARTIAL,
            &consts,
            &bufs,
            [npart as u32, 1, 1],
        )?;
        self.record(&kernels::ARGMAX_FINAL, &consts, &bufs, [1, 1, 1])
    }
}
