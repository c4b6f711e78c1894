//! The ternary × int8 matmul (shaders/ternary_matmul.wgsl): the mat-vec kernel for decode steps
//! and the tiled kernel for prefill, each with the epilogue of a fused op (`MODE`): plain, the
//! residual add, the gated FFN product, or RoPE + KV-cache store of q|k|v.

use super::kernels::{self, Kernel};
use super::row_ops::PendingNorm;
use super::{layout, GpuBuf, GpuKvCache, GpuLinear, GpuQTensor, GpuTensor, WgpuBackend};
use crate::backend::{check_fused_rows, AttentionShape, FfnActivation};
use crate::error::{BitnetError, Result};
use crate::ternary::TernaryMatrix;

/// Steps of up to this many tokens use the single-token mat-vec kernel (decode), with the norm
/// as its prologue; up to [`MULTI_MAX_TOKENS`] the multi-token mat-vec (each weight vector read
/// once for all of the step's tokens); larger steps the tiled matmul. The multi-token kernel
/// loads every token's activations per weight vector (from cache), so its cost per weight byte
/// grows with the tokens while the tiled kernel reuses them from workgroup memory; 8 is where
/// the count of activation loads per weight load reaches 512 bytes per 16. A guess from that
/// ratio, not a measurement: no hardware GPU has run either kernel yet.
pub const MATVEC_MAX_TOKENS: usize = 1;
pub const MULTI_MAX_TOKENS: usize = 8;
/// Tokens per workgroup of the multi-token mat-vec (shaders `MT`, at most `MT_MAX` = 8): 4 or
/// 8, the fewer that holds the step (a pipeline each).
fn multi_tokens(n: usize) -> usize {
    n.next_power_of_two().clamp(4, MULTI_MAX_TOKENS)
}
/// Rows per mat-vec workgroup and per tile of the tiled kernel (shaders `MV_ROWS`, `TM`); the
/// tiled kernel's other sizes are the adapter's [`super::TileShapes`].
const MV_ROWS: usize = 16;
const TM: usize = 128;
/// Parts a concatenated matrix may have (the `Linear` uniform's vec4s).
const MAX_PARTS: usize = 4;

/// The override constants of the prologue (shaders/ternary_matmul.wgsl `PCOLS`, `PQW`, `PEPS`,
/// `PRO_BLOCKS`) and the mat-vec's row length.
fn prologue_consts(p: &PendingNorm, blocks: u32) -> [(&'static str, f64); 5] {
    [
        ("PCOLS", p.cols as f64),
        ("PQW", (4 * layout::groups(p.cols)) as f64),
        ("PEPS", p.eps as f64),
        ("PRO_BLOCKS", blocks as f64),
        row_vectors(p.cols),
    ]
}

/// The mat-vec kernels' `MV_G4`: 64-column vectors per weight row of `cols` inputs, a pipeline
/// constant so that the lanes' loop unrolls (a pipeline per distinct input width: 2 for 2B4T).
fn row_vectors(cols: usize) -> (&'static str, f64) {
    ("MV_G4", (layout::groups(cols) / 4) as f64)
}

/// The epilogue of a matmul dispatch (shaders/ternary_matmul.wgsl `MODE`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Epilogue {
    Store,
    Add,
    Gated(FfnActivation),
}

impl WgpuBackend {
    pub(super) fn op_upload_linears(&mut self, parts: &[&TernaryMatrix]) -> Result<GpuLinear> {
        let Some(first) = parts.first() else {
            return Err(BitnetError::op("upload_linears", "no matrices"));
        };
        if parts.len() > MAX_PARTS {
            return Err(BitnetError::op(
                "upload_linears",
                format!("{} parts (at most {MAX_PARTS})", parts.len()),
            ));
        }
        if let Some(p) = parts.iter().find(|p| p.cols != first.cols) {
            return Err(BitnetError::op(
                "upload_linears",
                format!(
                    "{}: {} columns, {} has {}",
                    p.name, p.cols, first.name, first.cols
                ),
            ));
        }
        if let Some(p) = parts.iter().find(|p| p.block_scales.is_some()) {
            return Err(BitnetError::Unsupported {
                what: "per-block ternary scales on the GPU",
                value: p.name.clone(),
                hint: "the GPU kernels apply one scale per matrix; this file's blocks have different scales, which the CPU backend runs exactly (--device cpu; auto picks it)",
            });
        }
        // rows are contiguous in the device layout: the concatenation is the parts one after
        // the other, [Σ rows, G] u32
        let mut words = Vec::new();
        let (mut ends, mut scales) = ([0u32; MAX_PARTS], [0f32; MAX_PARTS]);
        for (i, p) in parts.iter().enumerate() {
            words.extend(layout::repack_ternary(p));
            (ends[i], scales[i]) = (
                (words.len() / layout::groups(p.cols).max(1)) as u32,
                p.out_scale,
            );
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        for i in parts.len()..MAX_PARTS {
            (ends[i], scales[i]) = (rows as u32, scales[parts.len() - 1]);
        }
        let name = parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let buf = self.storage(
            &name,
            (words.len() * 4) as u64,
            Some(bytemuck::cast_slice(&words)),
        )?;
        // uniform Linear { rows, groups, _, _, ends: vec4<u32>, scales: vec4<f32> }
        let mut params = vec![rows as u32, layout::groups(first.cols) as u32, 0, 0];
        params.extend(ends);
        params.extend(scales.map(f32::to_bits));
        let params = self.uniform("linear params", bytemuck::cast_slice(&params))?;
        Ok(GpuLinear {
            w: buf,
            params,
            name,
            rows,
            cols: first.cols,
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
        self.check_matmul(w, x)?;
        self.check("ternary_matmul", out, w.rows)?;
        self.matmul(w, x, &out.buf, Epilogue::Store, true)
    }

    fn check_matmul(&self, w: &GpuLinear, x: &GpuQTensor) -> Result<()> {
        crate::backend::check_matmul(&w.name, (w.rows, w.cols), (x.capacity, x.cols), self.n())
    }

    pub(super) fn op_ternary_matmul(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.check_matmul(w, x)?;
        self.check("ternary_matmul", out, w.rows)?;
        self.matmul(w, x, &out.buf, Epilogue::Store, false)
    }

    pub(super) fn op_ternary_matmul_add(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        acc: &mut GpuTensor,
    ) -> Result<()> {
        self.check_matmul(w, x)?;
        self.check("ternary_matmul_add", acc, w.rows)?;
        self.matmul(w, x, &acc.buf, Epilogue::Add, false)
    }

    pub(super) fn op_gate_up(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        act: FfnActivation,
        out: &mut GpuTensor,
    ) -> Result<()> {
        self.check_matmul(w, x)?;
        check_fused_rows("gate_up", &w.name, w.rows, 2 * out.cols)?;
        self.check("gate_up", out, out.cols)?;
        self.matmul(w, x, &out.buf, Epilogue::Gated(act), false)
    }

    /// One dispatch of the plain / add / gated kernels into `y`.
    fn matmul(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        y: &GpuBuf,
        epilogue: Epilogue,
        raw: bool,
    ) -> Result<()> {
        let (mode, pair) = match epilogue {
            Epilogue::Store => (0, 0),
            Epilogue::Add => (1, 0),
            Epilogue::Gated(FfnActivation::Relu2) => (2, w.rows / 2),
            Epilogue::Gated(FfnActivation::Silu) => (3, w.rows / 2),
        };
        let consts = [
            ("RAW_ACC", if raw { 1.0 } else { 0.0 }),
            ("MODE", mode as f64),
            ("PAIR", pair as f64),
        ];
        if let Some(p) = self.take_prologue(&x.q, &[y]) {
            let mut consts = consts.to_vec();
            consts.extend(prologue_consts(&p, self.tiles.prologue_blocks));
            let (dr, drw) = (self.dummy_r.clone(), self.dummy_rw.clone());
            let bufs = [
                &w.params, &w.w, &x.q, &x.meta, y, &dr, &dr, &drw, &drw, &p.x, &p.w,
            ];
            let groups = [
                w.rows
                    .div_ceil(MV_ROWS * self.tiles.prologue_blocks as usize) as u32,
                self.n() as u32,
                1,
            ];
            return self.record(&kernels::MATVEC_PRO, &consts, &bufs, groups);
        }
        let bufs = [&w.params, &w.w, &x.q, &x.meta, y];
        let mut consts = consts.to_vec();
        let (kernel, groups) = self.matmul_grid(w, false, &mut consts);
        self.record(kernel, &consts, &bufs, groups)
    }

    /// The kernel (decode, small batch or prefill; plain or q|k|v) and its dispatch size for
    /// this step; its shape constants are appended to `consts`.
    fn matmul_grid(
        &self,
        w: &GpuLinear,
        qkv: bool,
        consts: &mut Vec<(&'static str, f64)>,
    ) -> (&'static Kernel, [u32; 3]) {
        let n = self.n();
        let pick = |plain, with_qkv| if qkv { with_qkv } else { plain };
        if n <= MATVEC_MAX_TOKENS {
            consts.push(row_vectors(w.cols));
            let k = pick(&kernels::MATVEC, &kernels::MATVEC_QKV);
            (k, [w.rows.div_ceil(MV_ROWS) as u32, n as u32, 1])
        } else if n <= MULTI_MAX_TOKENS {
            let mt = multi_tokens(n);
            consts.extend([("MT", mt as f64), row_vectors(w.cols)]);
            let k = pick(&kernels::MATVEC_MULTI, &kernels::MATVEC_MULTI_QKV);
            (
                k,
                [w.rows.div_ceil(MV_ROWS) as u32, n.div_ceil(mt) as u32, 1],
            )
        } else {
            let tj = self.tiles.matmul_tj(n) as usize;
            consts.extend([("TJ", tj as f64), ("TK", self.tiles.matmul_k_groups as f64)]);
            let k = pick(&kernels::MATMUL_TILED, &kernels::MATMUL_TILED_QKV);
            (
                k,
                [w.rows.div_ceil(TM) as u32, n.div_ceil(16 * tj) as u32, 1],
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn op_qkv_rope_store(
        &mut self,
        w: &GpuLinear,
        x: &GpuQTensor,
        cache: &mut GpuKvCache,
        layer: usize,
        shape: &AttentionShape,
        q: &mut GpuTensor,
    ) -> Result<()> {
        let hd = shape.head_dim;
        let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
        self.check_matmul(w, x)?;
        check_fused_rows("qkv_rope_store", &w.name, w.rows, qd + 2 * kvd)?;
        self.check_cache("qkv_rope_store", shape, q, q, cache, layer)?;
        let prologue = self.take_prologue(&x.q, &[&q.buf, &cache.k[layer], &cache.v[layer]]); // (before the table: creating it may flush)
        let table = self.rope_table(hd, shape.rope_theta, self.max_pos + 1)?;
        let consts = [
            ("MODE", 4.0),
            ("PAIR", (hd / 2) as f64),
            ("HEADS", shape.n_heads as f64),
            ("KV_HEADS", shape.n_kv_heads as f64),
            ("HD", hd as f64),
            ("CTX", cache.ctx as f64),
            (
                "KV_F16",
                (cache.dtype == crate::backend::KvDtype::F16) as u8 as f64,
            ),
        ];
        let rows = self.rows_buf.clone();
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        if let Some(p) = prologue {
            let mut consts = consts.to_vec();
            consts.extend(prologue_consts(&p, self.tiles.prologue_blocks));
            let bufs = [
                &w.params, &w.w, &x.q, &x.meta, &q.buf, &rows, &table, kc, vc, &p.x, &p.w,
            ];
            let groups = [
                w.rows
                    .div_ceil(MV_ROWS * self.tiles.prologue_blocks as usize) as u32,
                self.n() as u32,
                1,
            ];
            return self.record(&kernels::MATVEC_QKV_PRO, &consts, &bufs, groups);
        }
        let bufs = [
            &w.params, &w.w, &x.q, &x.meta, &q.buf, &rows, &table, kc, vc,
        ];
        let mut consts = consts.to_vec();
        let (kernel, groups) = self.matmul_grid(w, true, &mut consts);
        self.record(kernel, &consts, &bufs, groups)
    }
}
