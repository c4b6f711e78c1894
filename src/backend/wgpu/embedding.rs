//! The float matrix kernels (shaders/embedding.wgsl): the embedding lookup and the LM head.

use std::sync::Arc;

use super::kernels;
use super::{gpu_err, layout, EmbChunk, GpuEmbedding, GpuTensor, GpuVector, WgpuBackend};
use crate::backend::HeadFormat;
use crate::error::{BitnetError, Result};
use crate::load::FloatMatrix;

/// Blocks of 8 vocabulary rows per LM-head workgroup (shaders/embedding.wgsl `HEAD_BLOCKS`):
/// enough rows to amortise the norm prologue (a read of the activation row and the norm
/// weight per workgroup) while a 2B4T head still makes ~2,000 workgroups.
const LM_BLOCKS: usize = 8;
/// Vocabulary rows per LM-head workgroup (shaders/embedding.wgsl `ROWS_PER_WG · HEAD_BLOCKS`).
pub(super) const LM_ROWS_PER_WG: usize = 8 * LM_BLOCKS;
/// Most logits rows one LM-head workgroup computes (shaders/embedding.wgsl `HR_MAX`): a step's
/// rows share each load of the head in groups of up to 8 (next power of two of the row count).
const LM_HEAD_ROWS_MAX: usize = 8;
/// Padding of the logit rows list to a multiple of `HR` (shaders/embedding.wgsl `NO_ROW`).
const NO_ROW: u32 = u32::MAX;
/// Threads per embed workgroup, one per copied value: shaders/embedding.wgsl `EMBED_WG`.
const EMBED_WG: usize = 256;

impl WgpuBackend {
    pub(super) fn op_upload_embedding(&mut self, m: &FloatMatrix) -> Result<Arc<GpuEmbedding>> {
        self.upload_rows(m, false)
    }

    /// `m` split by rows into bindable chunks, in its file dtype or (`q8`) as the 8-bit head.
    fn upload_rows(&mut self, m: &FloatMatrix, q8: bool) -> Result<Arc<GpuEmbedding>> {
        let (row_words, code) = if q8 {
            (layout::q8_row_words(m.cols), layout::Q8_CODE)
        } else {
            (
                layout::row_words(m.dtype, m.cols),
                layout::dtype_code(m.dtype),
            )
        };
        let row_bytes = row_words * 4;
        let max = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        // Also keep the LM-head dispatch of a chunk within the per-dimension workgroup limit.
        let max_rows =
            self.limits.max_compute_workgroups_per_dimension as u64 * LM_ROWS_PER_WG as u64;
        let mut max = max.min(max_rows * row_bytes as u64);
        if let Some(cap) = self.max_chunk_bytes {
            max = max.min(cap);
        }
        let plan = layout::chunk_rows(m.rows, row_bytes, max).ok_or_else(|| {
            gpu_err(format!(
                "{}: one row of {row_bytes} bytes exceeds the binding limit",
                m.name
            ))
        })?;
        let mut chunks = Vec::with_capacity(plan.len());
        let mut head_wgs = 0;
        for (row0, rows) in plan {
            let bytes = if q8 {
                std::borrow::Cow::Owned(layout::q8_rows_bytes(m, row0, rows))
            } else {
                layout::float_rows_bytes(m, row0, rows)
            };
            let data = self.storage(&m.name, bytes.len() as u64, Some(&bytes))?;
            let params = self.uniform(
                "chunk params",
                bytemuck::cast_slice(&[row0 as u32, rows as u32, head_wgs as u32, 0]),
            )?;
            chunks.push(EmbChunk { data, params, rows });
            head_wgs += rows.div_ceil(LM_ROWS_PER_WG);
        }
        let head_best = self.storage("lm head argmax", 8 * head_wgs.max(1) as u64, None)?;
        Ok(Arc::new(GpuEmbedding {
            chunks,
            head_best,
            head_wgs,
            rows: m.rows,
            cols: m.cols,
            dtype: m.dtype,
            code,
            row_words,
        }))
    }

    pub(super) fn op_upload_lm_head(
        &mut self,
        m: &FloatMatrix,
        tied: Option<&Arc<GpuEmbedding>>,
        format: HeadFormat,
    ) -> Result<Arc<GpuEmbedding>> {
        match format {
            HeadFormat::Exact => match tied {
                Some(e) => Ok(Arc::clone(e)),
                None => self.op_upload_embedding(m),
            },
            HeadFormat::Q8 => {
                // The activation row lives in workgroup memory as int16 (2 per word) next to
                // the 256 reduction floats.
                let need = 2 * m.cols.next_multiple_of(64) + 4 * 256 + 16;
                let have = self.limits.max_compute_workgroup_storage_size as usize;
                if need > have {
                    return Err(BitnetError::Unsupported {
                        what: "LM head format on this GPU",
                        value: format!("q8 for rows of {}", m.cols),
                        hint: "its int16 activation row does not fit the adapter's workgroup \
                               memory; use --lm-head exact",
                    });
                }
                self.upload_rows(m, true)
            }
            HeadFormat::Q4 => Err(BitnetError::Unsupported {
                what: "LM head format on the GPU",
                value: format.name().into(),
                hint: "--lm-head q4 is a CPU option; the GPU has exact and q8",
            }),
        }
    }

    pub(super) fn op_embed(&mut self, emb: &Arc<GpuEmbedding>, out: &mut GpuTensor) -> Result<()> {
        self.check("embed", out, emb.cols)?;
        if emb.code == layout::Q8_CODE {
            return Err(BitnetError::op(
                "embed",
                "an 8-bit LM head is not an embedding",
            ));
        }
        if let Some(&id) = self.tokens.iter().find(|&&t| t as usize >= emb.rows) {
            return Err(BitnetError::TokenOutOfRange {
                id,
                vocab_size: emb.rows,
            });
        }
        let consts = [
            ("COLS", emb.cols as f64),
            ("ROW_WORDS", emb.row_words as f64),
            ("DTYPE", emb.code as f64),
            ("EMBED_WG", EMBED_WG as f64),
        ];
        let groups = self.grid((self.n() * emb.cols).div_ceil(EMBED_WG))?;
        let tokens = self.rows_buf.clone();
        for c in &emb.chunks {
            self.record(
                &kernels::EMBED,
                &consts,
                &[&c.params, &c.data, &tokens, &out.buf],
                groups,
            )?;
        }
        Ok(())
    }

    /// Logits of the step's rows `rows` (indices into the step, any subset in any order):
    /// `logits [rows.len(), vocab]`, of the rows normed by `norm` (the final norm as the
    /// kernel's prologue) or as they are. One dispatch per chunk of the head; each leaves its
    /// workgroups' best logit of row 0 for `record_argmax`.
    pub(super) fn op_lm_head_rows(
        &mut self,
        head: &Arc<GpuEmbedding>,
        x: &GpuTensor,
        norm: Option<(&GpuVector, f32)>,
        rows: &[u32],
        logits: &mut GpuTensor,
    ) -> Result<()> {
        let n = self.n();
        self.check("lm_head", x, head.cols)?;
        if let Some((w, _)) = norm {
            if w.len != head.cols {
                return Err(BitnetError::op(
                    "lm_head",
                    format!(
                        "final norm weight of {} values for rows of {}",
                        w.len, head.cols
                    ),
                ));
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let out_rows = rows.len();
        if logits.cols != head.rows || logits.capacity < out_rows {
            return Err(BitnetError::op(
                "lm_head",
                "logits tensor has the wrong shape",
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(BitnetError::op(
                "lm_head",
                format!("logit row {r} of a step of {n} rows"),
            ));
        }
        // Logits rows per workgroup: the head is read once per HR rows (the 8-bit head keeps
        // one, its int16 input row lives in workgroup memory); the list is padded to HR.
        let hr = if head.code == layout::Q8_CODE {
            1
        } else {
            out_rows.next_power_of_two().min(LM_HEAD_ROWS_MAX)
        };
        let padded = out_rows.next_multiple_of(hr);
        let same = self.logit_rows_host.len() == padded
            && self.logit_rows_host.starts_with(rows)
            && self.logit_rows_host[out_rows..]
                .iter()
                .all(|&r| r == NO_ROW);
        if !same {
            if padded > self.logit_rows_cap {
                let cap = padded.next_power_of_two();
                self.logit_rows_buf = self.new_buffer(
                    "logit rows",
                    cap as u64 * 4,
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    None,
                )?;
                self.logit_rows_cap = cap;
            }
            self.logit_rows_host.clear();
            self.logit_rows_host.extend_from_slice(rows);
            self.logit_rows_host.resize(padded, NO_ROW);
            // Queue-ordered: lands before this step's commands, after every earlier step's.
            self.queue.write_buffer(
                &self.logit_rows_buf.buf,
                0,
                bytemuck::cast_slice(&self.logit_rows_host),
            );
        }
        let consts = [
            ("COLS", head.cols as f64),
            ("ROW_WORDS", head.row_words as f64),
            ("DTYPE", head.code as f64),
            ("VOCAB", head.rows as f64),
            // (workgroup memory only the 8-bit head uses)
            (
                "HQW",
                if head.code == layout::Q8_CODE {
                    (head.cols.next_multiple_of(64) / 2) as f64
                } else {
                    1.0
                },
            ),
            ("NORM", if norm.is_some() { 1.0 } else { 0.0 }),
            ("EPS", norm.map_or(0.0, |(_, eps)| eps as f64)),
            ("HEAD_BLOCKS", LM_BLOCKS as f64),
            ("HR", hr as f64),
        ];
        let list = self.logit_rows_buf.clone();
        let norm_w = norm.map_or_else(|| self.dummy_r.clone(), |(w, _)| w.buf.clone());
        for c in &head.chunks {
            let groups = [
                c.rows.div_ceil(LM_ROWS_PER_WG) as u32,
                out_rows.div_ceil(hr) as u32,
                1,
            ];
            self.record(
                &kernels::LM_HEAD,
                &consts,
                &[
                    &c.params,
                    &c.data,
                    &x.buf,
                    &logits.buf,
                    &list,
                    &norm_w,
                    &head.head_best,
                ],
                groups,
            )?;
        }
        self.head_argmax = Some((logits.buf.id, head.head_best.clone(), head.head_wgs));
        Ok(())
    }
}
