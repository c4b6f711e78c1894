//! The narrow interface between the model graph (`model.rs`, written once) and the devices that
//! run it. A backend owns its tensors; the model allocates every activation buffer once at load
//! (sized for the largest batch) and each step only lists its rows (`begin_step`): a token, its
//! position and its KV-cache slot each, so one step can mix the prefill chunk of one sequence
//! with the decode rows of many others (continuous batching). A GPU backend can record one
//! command buffer per step and never allocate per token.
//!
//! Row counts: every activation tensor has `capacity` rows; ops act on the first `n` rows of the
//! current step. The LM head produces logits for the rows it is given, in that order.
//!
//! Batch invariance: a row's results depend only on its token, position and slot contents, never
//! on the other rows of the step (int8 quantization is per row, integer accumulation is exact,
//! float ops are per row), so a sequence decodes the same alone or inside a full batch.

pub mod cpu;
pub mod wgpu;

pub use crate::config::FfnActivation;
use crate::error::{BitnetError, Result};
use crate::load::FloatMatrix;
use crate::ternary::TernaryMatrix;

/// Hyper-parameters the attention and RoPE ops need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
}

/// One row of a step: a token of some sequence, at position `pos` of KV-cache slot `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRow {
    pub token: u32,
    pub pos: u32,
    pub slot: u32,
}

impl StepRow {
    /// The rows of one sequence in slot 0: `tokens` at positions `start_pos..`.
    pub fn sequence(tokens: &[u32], start_pos: usize) -> Vec<StepRow> {
        Self::sequence_in(0, tokens, start_pos)
    }

    /// The rows of one sequence in `slot`: `tokens` at positions `start_pos..`.
    pub fn sequence_in(slot: u32, tokens: &[u32], start_pos: usize) -> Vec<StepRow> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| StepRow {
                token,
                pos: (start_pos + i) as u32,
                slot,
            })
            .collect()
    }
}

/// Checks the rule every backend relies on: rows of one slot have consecutive increasing
/// positions and appear in that order (the first row of a slot may start anywhere), every slot
/// is below `slots` and every position below `ctx`.
pub fn check_step_rows(rows: &[StepRow], slots: usize, ctx: usize) -> Result<()> {
    use crate::error::BitnetError;
    // last position seen per slot (slots are few: a linear scan beats a map)
    let mut last: Vec<(u32, u32)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.slot as usize >= slots {
            return Err(BitnetError::SlotOutOfRange {
                slot: r.slot,
                slots,
            });
        }
        if r.pos as usize >= ctx {
            return Err(BitnetError::ContextOverflow {
                needed: r.pos as usize + 1,
                ctx,
            });
        }
        match last.iter_mut().find(|(s, _)| *s == r.slot) {
            Some((_, p)) if r.pos != *p + 1 => {
                return Err(BitnetError::InvalidArgument(format!(
                    "step row {i}: slot {} position {} follows position {} (rows of one slot \
                     must have consecutive increasing positions)",
                    r.slot, r.pos, p
                )))
            }
            Some((_, p)) => *p = r.pos,
            None => last.push((r.slot, r.pos)),
        }
    }
    Ok(())
}

/// How the LM head is stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadFormat {
    /// The checkpoint's floats, in their file dtype: logits as transformers.
    #[default]
    Exact,
    /// int8 with one f32 scale per 64 columns (CPU and GPU): 1.9× fewer bytes per decoded token,
    /// logits within ~1e-3 relative of the exact head (see BENCHMARKS.md).
    Q8,
    /// 4-bit codes with one bf16 step per 64 columns, int8 activations (CPU only): 3.8× fewer
    /// bytes than the bf16 head, 2× fewer than q8; logits move by a few % of their spread (README).
    Q4,
}

impl std::str::FromStr for HeadFormat {
    type Err = crate::error::BitnetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(HeadFormat::Exact),
            "q8" => Ok(HeadFormat::Q8),
            "q4" => Ok(HeadFormat::Q4),
            _ => Err(crate::error::BitnetError::InvalidArgument(format!(
                "unknown LM head format {s:?} (expected exact, q8 or q4)"
            ))),
        }
    }
}

impl HeadFormat {
    pub fn name(self) -> &'static str {
        match self {
            HeadFormat::Exact => "exact",
            HeadFormat::Q8 => "q8",
            HeadFormat::Q4 => "q4",
        }
    }
}

/// How a backend stores the keys and values of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// IEEE half floats (the GPU's default, `--kv-cache f16` on the CPU): half the memory and
    /// half the bytes attention reads per token; logits move by up to ~1e-2 of their range
    /// (README, "GPU").
    #[default]
    F16,
    /// f32: the exact semantics (the CPU's default).
    F32,
}

impl std::str::FromStr for KvDtype {
    type Err = crate::error::BitnetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            _ => Err(crate::error::BitnetError::InvalidArgument(format!(
                "unknown KV cache format {s:?} (expected f16 or f32)"
            ))),
        }
    }
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        }
    }

    /// Bytes per stored key or value element.
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// One step of sampling on the device (see [`Backend::sample_chain`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceSample<'a> {
    /// The sampler's settings (temperature, top-k, top-p, min-p, repeat penalty).
    pub config: &'a crate::sampler::SamplerConfig,
    /// The uniform draw in [0, 1) from the sampler's seeded stream.
    pub r: f32,
    /// The repeat-penalty window known to the host, oldest first.
    pub window: &'a [u32],
    /// Whether the step's row-0 token (known to the device only: a chained step) ends the
    /// window.
    pub device_token: bool,
}

fn no_chaining() -> crate::error::BitnetError {
    crate::error::BitnetError::Unsupported {
        what: "backend feature",
        value: "chained greedy tokens".into(),
        hint: "only the wgpu backend keeps tokens on the device",
    }
}

/// The ops of a BitNet b1.58 forward pass. Shapes in the comments: `n` = live rows of the step.
pub trait Backend {
    /// f32 activations `[capacity, cols]`.
    type Tensor;
    /// int8 activations `[capacity, cols]` with one f32 scale per row.
    type QTensor;
    /// A ternary matrix in the backend's own layout.
    type Linear;
    /// An f32 vector (norm weights).
    type Vector;
    /// A float matrix `[vocab, hidden]` for the embedding lookup.
    type Embedding;
    /// The LM head `[vocab, hidden]` in the backend's format for it.
    type Head;
    /// Keys and values of all layers and slots, `[layers, slots, ctx, kv_dim]` each.
    type KvCache;
    /// The KV cache's storage when none is asked for (`ModelOptions::kv_cache` `None`).
    const DEFAULT_KV: KvDtype;

    /// A human-readable name: "cpu (2 threads)", "wgpu Vulkan NVIDIA H100", ...
    fn name(&self) -> String;

    /// The row-concatenation of `parts` (same column count) as one matrix, e.g. q, k and v or
    /// gate and up: one matmul computes all of them. Each part keeps its own `out_scale`
    /// (applied to its range of output rows; the integer accumulation is unchanged).
    fn upload_linears(&mut self, parts: &[&TernaryMatrix]) -> Result<Self::Linear>;
    /// One matrix: [`Backend::upload_linears`] of a single part.
    fn upload_linear(&mut self, w: &TernaryMatrix) -> Result<Self::Linear> {
        self.upload_linears(&[w])
    }
    fn upload_vector(&mut self, v: &[f32]) -> Result<Self::Vector>;
    fn upload_embedding(&mut self, m: &FloatMatrix) -> Result<Self::Embedding>;
    /// The LM head `m`; `tied` is the uploaded embedding when `m` is the same matrix (tied
    /// weights), so that a backend keeping the exact format can share it instead of a copy.
    fn upload_lm_head(
        &mut self,
        m: &FloatMatrix,
        tied: Option<&Self::Embedding>,
        format: HeadFormat,
    ) -> Result<Self::Head>;
    fn alloc(&mut self, capacity: usize, cols: usize) -> Result<Self::Tensor>;
    fn alloc_q(&mut self, capacity: usize, cols: usize) -> Result<Self::QTensor>;
    /// KV cache of `slots` independent sequences of `ctx` positions each, stored as `dtype`.
    fn alloc_kv_cache(
        &mut self,
        layers: usize,
        slots: usize,
        ctx: usize,
        kv_dim: usize,
        dtype: KvDtype,
    ) -> Result<Self::KvCache>;

    /// Starts a step over `rows` (any mix of slots; rows of one slot have consecutive increasing
    /// positions and appear in that order, see [`check_step_rows`]).
    fn begin_step(&mut self, rows: &[StepRow]) -> Result<()>;
    /// Ends the step: a GPU backend submits its command buffer here.
    fn end_step(&mut self) -> Result<()>;

    /// `out[t] = emb[tokens[t]]`: `[n, hidden]`.
    fn embed(&mut self, emb: &Self::Embedding, out: &mut Self::Tensor) -> Result<()>;
    /// `out = x * rsqrt(mean(x²) + eps) * w`, row-wise: `[n, cols]`.
    fn rms_norm(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Per-row absmax int8 quantization: `[n, cols]` → `[n, cols]` int8 + `[n]` scales.
    fn quantize(&mut self, x: &Self::Tensor, out: &mut Self::QTensor) -> Result<()>;
    /// `quantize(rms_norm(x, w, eps))` as one op, without the normed floats: `[n, cols]` →
    /// `[n, cols]` int8 + `[n]` scales.
    fn rms_norm_quantize(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::QTensor,
    ) -> Result<()>;
    /// `out = (x_q · Wᵀ) / s_x * out_scale`: `[n, in]` → `[n, out]`, exact integer accumulation
    /// (each part of a concatenated `W` scaled by its own `out_scale`).
    fn ternary_matmul(
        &mut self,
        w: &Self::Linear,
        x: &Self::QTensor,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `acc += ternary_matmul(w, x)`: the residual add in the matmul's epilogue, `[n, out]`.
    fn ternary_matmul_add(
        &mut self,
        w: &Self::Linear,
        x: &Self::QTensor,
        acc: &mut Self::Tensor,
    ) -> Result<()>;
    /// The gated FFN product from one matmul over `w = [gate; up]` (`[2·i, in]`, uploaded by
    /// `upload_linears(&[gate, up])`): `out = act(g) · u` with `[g | u] = ternary_matmul(w, x)`,
    /// `act` relu(g)² or silu(g) = g / (1 + exp(-g)): `out [n, i]`.
    fn gate_up(
        &mut self,
        w: &Self::Linear,
        x: &Self::QTensor,
        act: FfnActivation,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// q, k and v from one matmul over `w = [q; k; v]` (`[heads·hd + 2·kv_heads·hd, in]`), the
    /// half-split RoPE of q and k at each row's own position, and the store of k and v into the
    /// cache of `layer` at the row's (slot, pos): `q [n, heads·hd]` is the rotated queries.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_store(
        &mut self,
        w: &Self::Linear,
        x: &Self::QTensor,
        cache: &mut Self::KvCache,
        layer: usize,
        shape: &AttentionShape,
        q: &mut Self::Tensor,
    ) -> Result<()>;
    /// Causal GQA attention of each row of `q [n, heads*head_dim]` over positions `0..=pos` of
    /// its own slot in the cache of `layer` (stored by `qkv_rope_store`; rows of one slot in the
    /// step see each other causally): `out [n, heads*head_dim]`.
    fn attention(
        &mut self,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        shape: &AttentionShape,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `logits[i] = x[rows[i]] · headᵀ`: `rows` are indices into the step's rows, logits out is
    /// `[rows.len(), vocab]`.
    fn lm_head(
        &mut self,
        head: &Self::Head,
        x: &Self::Tensor,
        rows: &[u32],
        logits: &mut Self::Tensor,
    ) -> Result<()>;

    /// The final norm and the LM head as one op: `logits[i] = rms_norm(x[rows[i]], w, eps) ·
    /// headᵀ`, `[rows.len(), vocab]`; only the rows that need logits are normed, and none of the
    /// normed rows is kept. A GPU runs the norm in the head kernel's prologue (bit-identical to
    /// `rms_norm` then `lm_head`) and leaves the argmax of logits row 0 half done for
    /// `argmax_row0` / `argmax_chain`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_lm_head(
        &mut self,
        head: &Self::Head,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        rows: &[u32],
        logits: &mut Self::Tensor,
    ) -> Result<()>;

    /// Reads `rows` rows of `t` back to the host (a sync point): `[rows, cols]` flattened.
    fn read(&mut self, t: &Self::Tensor, rows: usize) -> Result<Vec<f32>>;
    /// Greedy pick of row 0 of `logits` without reading the whole vector back.
    fn argmax_row0(&mut self, logits: &Self::Tensor) -> Result<u32>;

    // Pipelined greedy decoding (a GPU keeps the token on the device; see model.rs
    // `greedy_begin`). A backend without it keeps the defaults and the model reads each token.

    /// Whether the three methods below are implemented.
    fn chains_tokens(&self) -> bool {
        false
    }
    /// Greedy pick of row 0 of `logits`, kept on the device as the token of the next
    /// `begin_step_chained` step, with an asynchronous read of it queued for `read_chained`.
    fn argmax_chain(&mut self, _logits: &Self::Tensor) -> Result<()> {
        Err(no_chaining())
    }
    /// Whether [`Backend::sample_chain`] can sample with `config` (the GPU: top-k of 1..=1024).
    fn samples_on_device(&self, _config: &crate::sampler::SamplerConfig) -> bool {
        false
    }
    /// [`Backend::argmax_chain`] with the CPU sampler's pick in place of the argmax: repeat
    /// penalty over `s.window`, top-k, temperature, min-p, top-p and the draw `s.r`, on the
    /// device (the logits row may be overwritten with the penalised logits).
    fn sample_chain(&mut self, _logits: &Self::Tensor, _s: &DeviceSample) -> Result<()> {
        Err(no_chaining())
    }
    /// Starts a one-token step at `start_pos` whose token is the last `argmax_chain` result.
    fn begin_step_chained(&mut self, _start_pos: usize) -> Result<()> {
        Err(no_chaining())
    }
    /// The oldest queued `argmax_chain` result (waits for the step that produced it only).
    fn read_chained(&mut self) -> Result<u32> {
        Err(no_chaining())
    }
}

/// The shape check before every op, in one wording for all backends: a tensor
/// `[capacity, cols]` must hold `rows` rows of `want` columns.
pub(crate) fn check_tensor(
    op: &'static str,
    capacity: usize,
    cols: usize,
    rows: usize,
    want: usize,
) -> Result<()> {
    if cols != want || capacity < rows {
        return Err(BitnetError::op(
            op,
            format!("tensor [{capacity}, {cols}] cannot hold {rows} rows of {want} columns"),
        ));
    }
    Ok(())
}

/// The ternary matmul's operands: the weight `name` `[w_rows, w_cols]` against activations
/// `[x_capacity, x_cols]` for the step's `n` rows.
pub(crate) fn check_matmul(
    name: &str,
    (w_rows, w_cols): (usize, usize),
    (x_capacity, x_cols): (usize, usize),
    n: usize,
) -> Result<()> {
    if x_cols != w_cols || x_capacity < n {
        return Err(BitnetError::op(
            "ternary_matmul",
            format!("{name}: weight [{w_rows}, {w_cols}] vs activations [{n}, {x_cols}]"),
        ));
    }
    Ok(())
}

/// Attention's preconditions for a step of `n` rows: `q` and `out` hold `[n, heads·head_dim]`
/// (each given as its `[capacity, cols]`), and the cache's rows (`[cache_kv_dim]` each,
/// `cache_ctx` positions) are `kv_heads·head_dim` wide with room for positions up to `end`
/// (exclusive).
pub(crate) fn check_attention(
    op: &'static str,
    shape: &AttentionShape,
    n: usize,
    [q, out]: [(usize, usize); 2],
    (cache_kv_dim, cache_ctx): (usize, usize),
    end: usize,
) -> Result<()> {
    let (qd, kvd) = (
        shape.n_heads * shape.head_dim,
        shape.n_kv_heads * shape.head_dim,
    );
    for (capacity, cols) in [q, out] {
        check_tensor(op, capacity, cols, n, qd)?;
    }
    if shape.n_kv_heads == 0
        || !shape.n_heads.is_multiple_of(shape.n_kv_heads)
        || !shape.head_dim.is_multiple_of(2)
    {
        return Err(BitnetError::op(
            op,
            format!(
                "unsupported shape: {} heads, {} kv heads, head_dim {}",
                shape.n_heads, shape.n_kv_heads, shape.head_dim
            ),
        ));
    }
    if cache_kv_dim != kvd || end > cache_ctx {
        return Err(BitnetError::ContextOverflow {
            needed: end,
            ctx: cache_ctx,
        });
    }
    Ok(())
}

/// The fused matmuls' weight shapes: `qkv_rope_store` needs `[heads·hd + 2·kv_heads·hd, in]`,
/// `gate_up` `[2·i, in]` for an output of `i` columns.
pub(crate) fn check_fused_rows(
    op: &'static str,
    name: &str,
    w_rows: usize,
    want: usize,
) -> Result<()> {
    if w_rows != want {
        return Err(BitnetError::op(
            op,
            format!("{name}: weight of {w_rows} rows, expected {want}"),
        ));
    }
    Ok(())
}
