//! Causal GQA attention over the KV cache (shaders/attention.wgsl), the cache and the RoPE
//! tables the q|k|v matmul's epilogue uses.

use super::kernels;
use super::{layout, GpuBuf, GpuKvCache, GpuTensor, WgpuBackend};
use crate::backend::{AttentionShape, KvDtype};
use crate::error::{BitnetError, Result};

/// Largest head_dim the attention kernel supports (workgroup memory for one query vector).
pub const MAX_HEAD_DIM: usize = 512;
/// Steps of up to this many tokens use the split-context ("flash decoding") attention: decode
/// steps, batched ones included (rows of many slots, each its own context: the prefill tiles
/// would serve them one row at a time with few workgroups).
pub const ATTN_SPLIT_MAX_TOKENS: usize = 16;
/// Wider steps use it too when their rows are single rows of many slots (a batched decode of
/// up to 64 sequences): the prefill tiles would serve those rows one after another and `attend`
/// reads each key with one thread. Its partials grow to 64 rows (42 MB for 2B4T at 4096).
pub const ATTN_SPLIT_WIDE_MAX_TOKENS: usize = 64;
/// Positions per block of the split attention (shaders/attention.wgsl BLK).
const ATTN_BLOCK: usize = 64;
/// Query vectors per tile of the prefill flash attention (attention.wgsl NQ_MAX): groups up
/// to this size use it.
const ATTN_TILE_QUERIES: usize = 8;
/// Largest head_dim of the prefill flash attention (attention.wgsl TILE_MAX_HD).
const ATTN_TILE_MAX_HD: usize = 128;
/// Bytes of the split attention's partials for steps of up to `tokens` rows (a power of two,
/// at least 4): per (row, head, block of ATTN_BLOCK positions) its max, sum and HD outputs.
pub(super) fn partials_bytes(tokens: usize, heads: usize, ctx: usize, hd: usize) -> u64 {
    (tokens * heads * ctx.div_ceil(ATTN_BLOCK) * (hd + 2)) as u64 * 4
}

impl WgpuBackend {
    pub(super) fn op_alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
        dtype: KvDtype,
    ) -> Result<GpuKvCache> {
        // whole u32 words per position (kv_dim is even for any valid shape: head_dim is)
        let row_bytes = (kv_dim as u64 * dtype.bytes()).next_multiple_of(4);
        let bytes = (slots.max(1) as u64)
            .checked_mul(ctx as u64)
            .and_then(|b| b.checked_mul(row_bytes))
            .ok_or_else(|| BitnetError::op("alloc_kv_cache", "cache size overflows"))?;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.storage("key cache", bytes, None)?);
            v.push(self.storage("value cache", bytes, None)?);
        }
        self.positions_hint = self.positions_hint.max(ctx);
        Ok(GpuKvCache {
            k,
            v,
            slots: slots.max(1),
            ctx,
            kv_dim,
            dtype,
        })
    }

    /// The (cos, sin) table for `head_dim`, `theta`, covering at least `positions` positions.
    pub(super) fn rope_table(
        &mut self,
        head_dim: usize,
        theta: f32,
        positions: usize,
    ) -> Result<GpuBuf> {
        let key = (head_dim, theta.to_bits());
        if let Some((buf, have)) = self.rope_tables.get(&key) {
            if *have >= positions {
                return Ok(buf.clone());
            }
        }
        // Sized for the KV cache when one exists, so that a model builds it once.
        let len = positions.max(self.positions_hint).next_multiple_of(64);
        let table = layout::rope_table(len, head_dim, theta);
        let buf = self.storage(
            "rope table",
            (table.len() * 8) as u64,
            Some(bytemuck::cast_slice(&table)),
        )?;
        self.rope_tables.insert(key, (buf.clone(), len));
        Ok(buf)
    }

    /// The attention shape, `q`/`out` `[n, heads·hd]`, the step's rows against the cache's
    /// slots and positions, `layer` against its layers, head_dim against the kernels' limit.
    pub(super) fn check_cache(
        &self,
        op: &'static str,
        shape: &AttentionShape,
        q: &GpuTensor,
        out: &GpuTensor,
        cache: &GpuKvCache,
        layer: usize,
    ) -> Result<()> {
        crate::backend::check_attention(
            op,
            shape,
            self.n(),
            [q, out].map(|t| (t.capacity, t.cols)),
            (cache.kv_dim, cache.ctx),
            self.max_pos + 1,
        )?;
        if self.max_slot >= cache.slots {
            return Err(BitnetError::op(
                op,
                format!("slot {} of a cache of {} slots", self.max_slot, cache.slots),
            ));
        }
        if layer >= cache.k.len() {
            return Err(BitnetError::op(
                op,
                format!("no layer {layer} in the cache"),
            ));
        }
        if shape.head_dim > MAX_HEAD_DIM {
            return Err(BitnetError::op(
                op,
                format!(
                    "unsupported head_dim {} (max {MAX_HEAD_DIM})",
                    shape.head_dim
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn op_attention(
        &mut self,
        q: &GpuTensor,
        cache: &GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let (n, hd) = (self.n(), shape.head_dim);
        self.check_cache("attention", shape, q, out, cache, layer)?;
        let consts = [
            ("HEADS", shape.n_heads as f64),
            ("KV_HEADS", shape.n_kv_heads as f64),
            ("HD", hd as f64),
            // the CPU backend's scale, rounded the same way
            ("SCALE", (1.0 / (hd as f32).sqrt()) as f64),
            ("CTX", cache.ctx as f64),
            ("KV_F16", (cache.dtype == KvDtype::F16) as u8 as f64),
        ];
        let rows = self.rows_buf.clone();
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        let group = shape.n_heads / shape.n_kv_heads;
        // Rows of one slot adjacent in the step (a prefill chunk), on average two or more.
        let runs_of_two = self.slot_runs * 2 <= n;
        let split_rows =
            n <= ATTN_SPLIT_MAX_TOKENS || (n <= ATTN_SPLIT_WIDE_MAX_TOKENS && !runs_of_two);
        if split_rows && group <= 16 && group * hd <= 1024 {
            let blocks = cache.ctx.div_ceil(ATTN_BLOCK);
            let key = (shape.n_heads, blocks, hd);
            // sized for the step's tokens rounded up (4 at least: one-token decode), grown when a
            // step has more
            let partials = match self.attn_partials.get(&key) {
                Some((p, tokens)) if *tokens >= n => p.clone(),
                _ => {
                    let tokens = n.next_power_of_two().max(4);
                    let bytes = partials_bytes(tokens, shape.n_heads, cache.ctx, hd);
                    let p = self.storage("attention partials", bytes, None)?;
                    self.attn_partials.insert(key, (p.clone(), tokens));
                    p
                }
            };
            let mut consts = consts.to_vec();
            consts.push(("NB", blocks as f64));
            let used = (self.max_pos + 1).div_ceil(ATTN_BLOCK);
            let groups = [used as u32, shape.n_kv_heads as u32, n as u32];
            self.record(
                &kernels::ATTEND_SPLIT,
                &consts,
                &[&q.buf, kc, vc, &partials, &rows],
                groups,
            )?;
            let groups = self.grid(n * shape.n_heads)?;
            return self.record(
                &kernels::ATTEND_COMBINE,
                &consts,
                &[&partials, &out.buf, &rows],
                groups,
            );
        }
        // Tiles share key / value blocks between the rows of one slot: worth it when such rows
        // are adjacent (a prefill chunk), not for a wide step of single rows of many slots (a
        // tile would serve them one after the other; `attend` keeps a workgroup per row).
        if group <= ATTN_TILE_QUERIES && hd <= ATTN_TILE_MAX_HD && runs_of_two {
            // flash attention over query tiles: rows per tile so that a tile holds
            // ATTN_TILE_QUERIES query vectors of one kv head
            let qt = ATTN_TILE_QUERIES / group;
            let mut consts = consts.to_vec();
            consts.push(("QT", qt as f64));
            let mut groups = self.grid(n.div_ceil(qt))?;
            groups[2] = shape.n_kv_heads as u32;
            return self.record(
                &kernels::ATTEND_TILED,
                &consts,
                &[&q.buf, kc, vc, &out.buf, &rows],
                groups,
            );
        }
        let groups = self.grid(n * shape.n_heads)?;
        self.record(
            &kernels::ATTEND,
            &consts,
            &[&q.buf, kc, vc, &out.buf, &rows],
            groups,
        )
    }
}
