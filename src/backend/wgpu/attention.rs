//! RoPE (shaders/rope.wgsl) and causal GQA attention over the KV cache (shaders/attention.wgsl).

use super::kernels;
use super::{layout, GpuBuf, GpuKvCache, GpuTensor, WgpuBackend};
use crate::backend::AttentionShape;
use crate::error::{BitnetError, Result};

/// Largest head_dim the attention kernel supports (workgroup memory for one query vector).
pub const MAX_HEAD_DIM: usize = 512;
/// Steps of up to this many tokens use the split-context ("flash decoding") attention.
pub const ATTN_SPLIT_MAX_TOKENS: usize = 4;
/// Positions per block of the split attention (shaders/attention.wgsl BLK).
const ATTN_BLOCK: usize = 64;
/// Threads per rope workgroup, one per (row, head, rotated pair): shaders/rope.wgsl `WG`.
const ROPE_WG: usize = 64;
/// Threads per kv_store workgroup, one per cached value: shaders/attention.wgsl `STORE_WG`.
const KV_STORE_WG: usize = 256;

/// A RoPE the model asked for, recorded lazily: when the attention that consumes it comes next
/// (q and k of the same step), the two RoPEs and the KV-cache store run as one dispatch of
/// `rope_kv_store`; anything else first emits it as a plain `rope` dispatch.
#[derive(Debug)]
pub(super) struct PendingRope {
    x: GpuBuf, // [capacity, heads * head_dim]
    heads: usize,
    head_dim: usize,
    table: GpuBuf, // [positions, head_dim / 2] (cos, sin)
}

impl WgpuBackend {
    /// Emits the pending RoPEs as plain dispatches (in the order they were asked for).
    pub(super) fn flush_ropes(&mut self) -> Result<()> {
        for r in std::mem::take(&mut self.pending_ropes) {
            let consts = [
                ("HEADS", r.heads as f64),
                ("HD", r.head_dim as f64),
                ("WG", ROPE_WG as f64),
            ];
            let groups = self.grid((self.n() * r.heads * r.head_dim / 2).div_ceil(ROPE_WG))?;
            let rows = self.rows_buf.clone();
            self.record(&kernels::ROPE, &consts, &[&r.x, &r.table, &rows], groups)?;
        }
        Ok(())
    }

    pub(super) fn op_alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
    ) -> Result<GpuKvCache> {
        let bytes = (slots.max(1) as u64)
            .checked_mul(ctx as u64)
            .and_then(|b| b.checked_mul(kv_dim as u64 * 4))
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
        })
    }

    pub(super) fn op_rope(
        &mut self,
        x: &mut GpuTensor,
        n_heads: usize,
        shape: &AttentionShape,
    ) -> Result<()> {
        let hd = shape.head_dim;
        self.check("rope", x, n_heads * hd)?;
        if !hd.is_multiple_of(2) {
            return Err(BitnetError::op("rope", format!("head_dim {hd} is odd")));
        }
        let table = self.rope_table(hd, shape.rope_theta, self.max_pos + 1)?;
        // Queued behind nothing else: a pending row-op chain (or a full queue) goes first.
        if self.pending.is_some() || self.pending_ropes.len() >= 2 {
            self.flush_pending()?;
        }
        self.pending_ropes.push(PendingRope {
            x: x.buf.clone(),
            heads: n_heads,
            head_dim: hd,
            table,
        });
        Ok(())
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn op_attention(
        &mut self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        cache: &mut GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let (n, hd) = (self.n(), shape.head_dim);
        let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
        crate::backend::check_attention(
            shape,
            n,
            [q, k, v, out].map(|t| (t.capacity, t.cols)),
            (cache.kv_dim, cache.ctx),
            self.max_pos + 1,
        )?;
        if self.max_slot >= cache.slots {
            return Err(BitnetError::op(
                "attention",
                format!("slot {} of a cache of {} slots", self.max_slot, cache.slots),
            ));
        }
        if layer >= cache.k.len() {
            return Err(BitnetError::op(
                "attention",
                format!("no layer {layer} in the cache"),
            ));
        }
        if hd > MAX_HEAD_DIM
            || shape.n_kv_heads == 0
            || !shape.n_heads.is_multiple_of(shape.n_kv_heads)
        {
            return Err(BitnetError::op(
                "attention",
                format!(
                    "unsupported shape: {} heads, {} kv heads, head_dim {hd} (max {MAX_HEAD_DIM})",
                    shape.n_heads, shape.n_kv_heads
                ),
            ));
        }
        let consts = [
            ("HEADS", shape.n_heads as f64),
            ("KV_HEADS", shape.n_kv_heads as f64),
            ("HD", hd as f64),
            // the CPU backend's scale, rounded the same way
            ("SCALE", (1.0 / (hd as f32).sqrt()) as f64),
            ("CTX", cache.ctx as f64),
        ];
        let rows = self.rows_buf.clone();
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        let mut store_consts = consts.to_vec();
        store_consts.push(("STORE_WG", KV_STORE_WG as f64));
        // RoPE of q and k just asked for, with this step's shape: one fused dispatch.
        let ropes = std::mem::take(&mut self.pending_ropes);
        let fused = ropes.len() == 2
            && self.pending.is_none()
            && ropes.iter().all(|r| r.head_dim == hd)
            && ropes[0].table.id == ropes[1].table.id
            && ropes
                .iter()
                .any(|r| r.x.id == q.buf.id && r.heads == shape.n_heads)
            && ropes
                .iter()
                .any(|r| r.x.id == k.buf.id && r.heads == shape.n_kv_heads)
            && q.buf.id != k.buf.id;
        if fused {
            let per_row = qd / 2 + kvd / 2 + kvd;
            let groups = self.grid((n * per_row).div_ceil(KV_STORE_WG))?;
            let table = ropes[0].table.clone();
            self.record(
                &kernels::ROPE_KV_STORE,
                &store_consts,
                &[&q.buf, &k.buf, &v.buf, kc, vc, &table, &rows],
                groups,
            )?;
        } else {
            self.pending_ropes = ropes;
            self.flush_pending()?;
            let groups = self.grid((n * kvd).div_ceil(KV_STORE_WG))?;
            self.record(
                &kernels::KV_STORE,
                &store_consts,
                &[&k.buf, &v.buf, kc, vc, &rows],
                groups,
            )?;
        }
        let group = shape.n_heads / shape.n_kv_heads;
        if n <= ATTN_SPLIT_MAX_TOKENS && group <= 16 && group * hd <= 1024 {
            let blocks = cache.ctx.div_ceil(ATTN_BLOCK);
            let key = (shape.n_heads, blocks, hd);
            let partials = match self.attn_partials.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let floats = ATTN_SPLIT_MAX_TOKENS * shape.n_heads * blocks * (hd + 2);
                    let p = self.storage("attention partials", floats as u64 * 4, None)?;
                    self.attn_partials.insert(key, p.clone());
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
        let groups = self.grid(n * shape.n_heads)?;
        self.record(
            &kernels::ATTEND,
            &consts,
            &[&q.buf, kc, vc, &out.buf, &rows],
            groups,
        )
    }
}
