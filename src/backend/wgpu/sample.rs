//! Sampling on the device (shaders/sample.wgsl): the CPU sampler's repeat penalty, top-k,
//! temperature, min-p, top-p and inverse-CDF draw in one dispatch over logits row 0, with the
//! picked token left where the chained greedy argmax leaves its own (`argmax_result`), so a
//! sampled decode is pipelined exactly like a greedy one (chain.rs).

use super::{kernels, GpuBuf, GpuTensor, WgpuBackend};
use crate::backend::DeviceSample;
use crate::error::{BitnetError, Result};

/// The largest top-k sampled on the device (its candidates are sorted in workgroup memory:
/// 8 KB at 1024); larger ones and top-k = 0 sample on the CPU.
pub const SAMPLE_KMAX: usize = 1024;
/// The longest repeat-penalty window on the device (shaders/sample.wgsl `WMAX`).
pub const SAMPLE_WMAX: usize = 256;

/// The per-step inputs of the sampling kernel: params (32 bytes) then the window.
#[derive(Debug)]
pub(super) struct SampleBufs {
    params: GpuBuf, // SampleParams (8 words)
    window: GpuBuf, // [SAMPLE_WMAX] u32
}

impl WgpuBackend {
    /// Whether `config` can be sampled on the device: a top-k of 1..=SAMPLE_KMAX and a penalty
    /// window of at most SAMPLE_WMAX tokens.
    pub(super) fn op_samples_on_device(&self, config: &crate::sampler::SamplerConfig) -> bool {
        (1..=SAMPLE_KMAX).contains(&config.top_k)
            && (config.repeat_penalty == 1.0 || config.repeat_last_n <= SAMPLE_WMAX)
    }

    /// Records the sampling of row 0 of `logits` into `argmax_result[0]`.
    pub(super) fn record_sample(&mut self, logits: &GpuTensor, s: &DeviceSample) -> Result<()> {
        let c = s.config;
        if !self.op_samples_on_device(c) {
            return Err(BitnetError::op(
                "sample",
                format!(
                    "top-k {} / penalty window {} cannot be sampled on the device",
                    c.top_k, c.repeat_last_n
                ),
            ));
        }
        if s.window.len() > SAMPLE_WMAX {
            return Err(BitnetError::op(
                "sample",
                format!("a penalty window of {} tokens", s.window.len()),
            ));
        }
        if self.sample_bufs.is_none() {
            let params = self.new_buffer(
                "sample params",
                32,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                None,
            )?;
            let window = self.new_buffer(
                "sample window",
                4 * SAMPLE_WMAX as u64,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                None,
            )?;
            self.sample_bufs = Some(SampleBufs { params, window });
        }
        let (params, window) = {
            let b = self.sample_bufs.as_ref().expect("just made");
            (b.params.clone(), b.window.clone())
        };
        let mut data: Vec<u32> = vec![
            c.temperature.to_bits(),
            c.top_p.to_bits(),
            c.min_p.to_bits(),
            c.repeat_penalty.to_bits(),
            s.r.to_bits(),
            c.top_k as u32,
            s.window.len() as u32,
            u32::from(s.device_token),
        ];
        data.extend_from_slice(s.window);
        // Copies go outside a compute pass, into this step's encoder (ordered before the
        // dispatch, after every earlier step).
        self.flush_pending()?;
        self.pass = None;
        let src = self
            .uploads
            .stage(&self.device, bytemuck::cast_slice(&data))
            .map_err(|e| self.sync_error("upload", e))?;
        if self.encoder.is_none() {
            self.encoder = Some(self.new_encoder("bitnet step"));
        }
        let enc = self.encoder.as_mut().expect("just created");
        enc.copy_buffer_to_buffer(&src, 0, &params.buf, 0, 32);
        if !s.window.is_empty() {
            enc.copy_buffer_to_buffer(&src, 32, &window.buf, 0, 4 * s.window.len() as u64);
        }
        let consts = [
            ("LEN", logits.cols as f64),
            ("KMAX", c.top_k.next_power_of_two().max(64) as f64),
            ("WMAX", SAMPLE_WMAX as f64),
        ];
        let (result, rows) = (self.argmax_result.clone(), self.rows_buf.clone());
        self.record(
            &kernels::SAMPLE,
            &consts,
            &[&logits.buf, &params, &window, &rows, &result],
            [1, 1, 1],
        )?;
        // The penalty rewrote the logits in place.
        self.head_argmax = None;
        Ok(())
    }
}
