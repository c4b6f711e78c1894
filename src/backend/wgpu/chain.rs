//! Greedy decoding without a round trip per token: the argmax of a step stays on the device as
//! the token of the next step, and its 4 bytes are read back asynchronously, one step late.
//!
//! `argmax_chain` records the argmax into `argmax_result` (the device token) and a copy of it
//! into a small MAP_READ buffer; the submit of the step maps that buffer asynchronously.
//! `begin_step_chained` opens the next step with a copy of the device token into the token
//! buffer that `embed` reads, so step t+1 is encoded and submitted before the host has read
//! token t. `read_chained` then waits for token t's submission only (not for t+1's), which is
//! the host's single blocking point per token and overlaps with step t+1 on the device.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{GpuTensor, WgpuBackend};
use crate::backend::DeviceSample;
use crate::error::{BitnetError, Result};

/// One queued read of a chained token id.
pub(super) struct Readback {
    buf: wgpu::Buffer,                                          // [4] u32, MAP_READ
    state: Arc<Mutex<Option<std::result::Result<(), String>>>>, // the map callback's outcome
    submission: Option<wgpu::SubmissionIndex>,                  // the submit that wrote it
    submits_at: u64, // counters.submits right after that submit
}

/// Reads of chained token ids: recorded in the open encoder, then in flight in submit order.
#[derive(Default)]
pub(super) struct Chain {
    recorded: Vec<Readback>, // copies recorded in the open encoder, not yet submitted
    in_flight: VecDeque<Readback>, // submitted, oldest first
    free: Vec<wgpu::Buffer>, // unmapped MAP_READ buffers to reuse
}

impl WgpuBackend {
    /// The pick of row 0 of `logits` (argmax, or the sampler's pick with `sample`) left on the
    /// device for the next chained step, with its read-back queued.
    pub(super) fn op_pick_chain(
        &mut self,
        logits: &GpuTensor,
        sample: Option<&DeviceSample>,
    ) -> Result<()> {
        match sample {
            Some(s) => self.record_sample(logits, s)?,
            None => self.record_argmax(logits)?,
        }
        // Copies are recorded outside a compute pass.
        self.pass = None;
        let buf = match self.chain.free.pop() {
            Some(b) => b,
            None => {
                self.new_buffer(
                    "chained token read-back",
                    16,
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    None,
                )?
                .buf
            }
        };
        if self.encoder.is_none() {
            self.encoder = Some(self.new_encoder("bitnet step"));
        }
        let enc = self.encoder.as_mut().expect("just created");
        enc.copy_buffer_to_buffer(&self.argmax_result.buf, 0, &buf, 0, 4);
        self.chain.recorded.push(Readback {
            buf,
            state: Arc::new(Mutex::new(None)),
            submission: None,
            submits_at: 0,
        });
        Ok(())
    }

    /// After a submit: map the read-backs it carries (asynchronously).
    pub(super) fn chain_submitted(&mut self, index: &wgpu::SubmissionIndex) {
        let submits = self.counters.submits;
        for mut r in self.chain.recorded.drain(..) {
            r.submission = Some(index.clone());
            r.submits_at = submits;
            let state = r.state.clone();
            r.buf.map_async(wgpu::MapMode::Read, .., move |res| {
                *state.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(res.map_err(|e| e.to_string()));
            });
            self.chain.in_flight.push_back(r);
        }
    }

    /// Starts a one-row step at `start_pos` whose token is the last chained argmax.
    pub(super) fn op_begin_step_chained(&mut self, start_pos: usize) -> Result<()> {
        if self.chain.in_flight.is_empty() && self.chain.recorded.is_empty() {
            return Err(BitnetError::op(
                "begin_step_chained",
                "no chained argmax precedes this step",
            ));
        }
        // The token id is not known on the host: 0 stands in for it (always < vocab, so the
        // host-side range check of embed passes; the device token is an argmax, < vocab too).
        self.op_begin_rows(&[[0, start_pos as u32, 0]])?;
        let enc = self.encoder.as_mut().expect("begin_step opened an encoder");
        // (the token of row 0 is the first word of the rows buffer)
        enc.copy_buffer_to_buffer(&self.argmax_result.buf, 0, &self.rows_buf.buf, 0, 4);
        Ok(())
    }

    /// The oldest queued chained token: waits for the submission that produced it only.
    pub(super) fn op_read_chained(&mut self) -> Result<u32> {
        if !self.chain.recorded.is_empty() {
            self.flush()?;
        }
        let Some(r) = self.chain.in_flight.pop_front() else {
            return Err(BitnetError::op("read_chained", "no chained token queued"));
        };
        if self.counters.submits > r.submits_at {
            self.counters.lagged_reads += 1;
        }
        let done = r.state.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        if !done {
            self.counters.waits += 1;
            let poll = wgpu::PollType::Wait {
                submission_index: r.submission.clone(),
                timeout: None,
            };
            if let Err(e) = self.device.poll(poll) {
                return Err(self.sync_error("poll", e));
            }
        }
        let outcome = r.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        match outcome {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(self.sync_error("map", e)),
            None => return Err(self.sync_error("map", "the read-back never completed")),
        }
        let id = {
            let view = r
                .buf
                .get_mapped_range(..4)
                .map_err(|e| self.sync_error("map range", e))?;
            u32::from_le_bytes([view[0], view[1], view[2], view[3]])
        };
        r.buf.unmap();
        self.chain.free.push(r.buf);
        self.check_alive()?;
        if id == u32::MAX {
            // shaders/sample.wgsl's answer when no logit is a number (the CPU sampler's error)
            return Err(BitnetError::op(
                "sample",
                "every logit is NaN or -inf: the model output is broken",
            ));
        }
        Ok(id)
    }
}
