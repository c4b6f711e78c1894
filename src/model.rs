//! The BitNet b1.58 forward pass, written once over [`Backend`]. Reads top to bottom like the
//! paper's decoder layer:
//!
//! ```text
//! h   = x + o_proj( attn_sub_norm( attention( rope(q, k), v ) ) ),   q,k,v = proj( input_norm(x) )
//! out = h + down_proj( ffn_sub_norm( act(gate(y)) · up(y) ) ),       y = post_attn_norm(h)
//! logits = norm(x_L) · headᵀ
//! ```
//!
//! The families differ only by config: `act` is relu(x)² (BitNet 2B4T) or silu(x) (the
//! LLaMA-style BitNets: Falcon3-1.58bit, Falcon-E, llama.cpp's `bitnet`), the two sub-norms are
//! there or not (`config.sub_norms`; without them the projection quantizes the raw attention
//! output / gated product, as transformers' LlamaMLP feeds `act(gate)·up` straight into
//! down_proj's BitLinear), and the head is the embedding or a separate matrix.
//!
//! Every projection quantizes its input to int8 per token; q/k/v share one quantized input and so
//! do gate/up, exactly as in transformers (each BitLinear quantizes the same tensor identically).
//!
//! The graph is written over the fused ops a GPU wants (one dispatch each on wgpu): norm +
//! quantize as one op; q, k and v as one matmul over the concatenated weights with RoPE and the
//! KV-cache store in its epilogue; gate and up as one matmul with `act(gate)·up` in its
//! epilogue; o_proj and down_proj with the residual add in their epilogue (`x += W·q`).

use std::collections::VecDeque;

use crate::backend::{
    check_step_rows, AttentionShape, Backend, DeviceSample, HeadFormat, KvDtype, StepRow,
};
use crate::config::ModelConfig;
use crate::error::{BitnetError, Result};
use crate::load::ModelWeights;
use crate::sampler::Sampler;

/// Sizes chosen at load time.
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Context length (KV cache positions); at most max_position_embeddings.
    pub ctx: usize,
    /// Largest number of tokens processed in one step (prefill chunk).
    pub max_batch: usize,
    /// Largest number of logit rows one step can produce (`[rows, vocab]` buffer).
    pub max_logit_rows: usize,
    /// Storage of the LM head.
    pub lm_head: HeadFormat,
    /// Storage of the KV cache; `None` = the backend's default ([`Backend::DEFAULT_KV`]: f32 on
    /// the CPU, the exact semantics; f16 on a GPU). [`Model::new`] sets the one it used.
    pub kv_cache: Option<KvDtype>,
    /// Independent sequences the KV cache holds (`ctx` positions each); the single-sequence API
    /// (`forward_*`) uses slot 0, [`Model::step_rows`] any.
    pub slots: usize,
}

/// The context used when none is asked for: enough for chat and benchmarks, while the KV cache
/// of a config's full max_position_embeddings (often 128k+) would take tens of GB.
pub const DEFAULT_CTX: usize = 4096;

impl ModelOptions {
    pub fn for_config(config: &ModelConfig) -> Self {
        ModelOptions {
            ctx: config.max_position_embeddings.min(DEFAULT_CTX),
            max_batch: 512,
            max_logit_rows: 64,
            lm_head: HeadFormat::Exact,
            kv_cache: None,
            slots: 1,
        }
    }

    /// The KV cache format of a model on backend `B` with these options: as asked, or `B`'s
    /// default.
    pub fn kv_dtype<B: Backend>(&self) -> KvDtype {
        self.kv_cache.unwrap_or(B::DEFAULT_KV)
    }
}

struct Layer<B: Backend> {
    input_norm: B::Vector,            // [h]
    post_attn_norm: B::Vector,        // [h]
    attn_sub_norm: Option<B::Vector>, // [q] (config.sub_norms)
    ffn_sub_norm: Option<B::Vector>,  // [i] (config.sub_norms)
    qkv_proj: B::Linear,              // [q + 2·kv, h]  q_proj; k_proj; v_proj
    o_proj: B::Linear,                // [h, q]
    gate_up_proj: B::Linear,          // [2·i, h]  gate_proj; up_proj
    down_proj: B::Linear,             // [h, i]
}

/// Activation buffers, allocated once for `max_batch` rows (B below).
struct Scratch<B: Backend> {
    x: B::Tensor,      // [B, h]  residual stream
    xq: B::QTensor,    // [B, h]  int8 normed residual (q/k/v and gate/up input)
    q: B::Tensor,      // [B, q]  rotated queries (keys and values go to the cache)
    att: B::Tensor,    // [B, q]
    att_q: B::QTensor, // [B, q]  int8 (sub-normed) attention output
    ffn: B::Tensor,    // [B, i]  act(gate) · up
    ffn_q: B::QTensor, // [B, i]  int8 (sub-normed) gated product
    logits: B::Tensor, // [max_logit_rows, vocab]
}

/// The next token of a pipelined greedy decode (`Model::greedy_begin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greedy {
    None,
    /// Known on the host (a backend that does not chain tokens).
    Host(u32),
    /// Still on the device, its read-back queued.
    Device,
}

/// A model on a backend, with its KV cache and the number of positions slot 0 holds.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub options: ModelOptions,
    pub backend: B,
    embed: B::Embedding,
    head: B::Head,
    final_norm: B::Vector,
    layers: Vec<Layer<B>>,
    s: Scratch<B>,
    cache: B::KvCache,
    shape: AttentionShape,
    pos: usize,
    greedy: Greedy,
    /// The pipelined decode samples instead of taking the argmax (`sample_begin`).
    sampling: Option<Sampling>,
    chain_in: bool,  // step(): the token comes from the device (the last chained pick)
    chain_out: bool, // step(): chain the pick (argmax or sample) of its logits row
}

/// A pipelined sampled decode: the CPU sampler's settings and seeded stream, run on the device
/// when the backend samples (`Backend::sample_chain`), else on the host from the logits.
struct Sampling {
    sampler: Sampler,
    /// The tokens before the next pick: the prompt's, then every pick returned so far (the
    /// repeat penalty's window).
    history: Vec<u32>,
    /// The sampler before the draw of each pick not returned yet, oldest first: a pick that is
    /// dropped (a stop token's successor, one lost with the device) gives its draw back.
    unreturned: VecDeque<Sampler>,
}

impl Sampling {
    /// The draw of the next pick (none at temperature 0, as in `Sampler::try_sample`).
    fn draw(&mut self) -> f32 {
        self.unreturned.push_back(self.sampler.clone());
        if self.sampler.config.temperature == 0.0 {
            0.0
        } else {
            self.sampler.uniform()
        }
    }

    /// A pick reached the caller.
    fn returned(&mut self, id: u32) {
        self.unreturned.pop_front();
        self.history.push(id);
    }
}

impl<B: Backend> Model<B> {
    pub fn new(mut backend: B, w: &ModelWeights, mut options: ModelOptions) -> Result<Self> {
        let c = w.config.clone();
        if let Some((l, _)) = w.layers.iter().enumerate().find(|(_, l)| {
            l.attn_sub_norm.is_some() != c.sub_norms || l.ffn_sub_norm.is_some() != c.sub_norms
        }) {
            return Err(BitnetError::InvalidArgument(format!(
                "layer {l}: sub-norm weights {} but the config says sub_norms = {}",
                if c.sub_norms { "missing" } else { "present" },
                c.sub_norms
            )));
        }
        if options.ctx == 0 || options.ctx > c.max_position_embeddings {
            return Err(BitnetError::InvalidArgument(format!(
                "context {} must be in 1..={} (max_position_embeddings)",
                options.ctx, c.max_position_embeddings
            )));
        }
        if options.slots == 0 || options.slots > u32::MAX as usize {
            return Err(BitnetError::InvalidArgument(format!(
                "KV-cache slots {} must be at least 1",
                options.slots
            )));
        }
        // a step holds at most every position of every slot
        let positions = options.ctx.saturating_mul(options.slots);
        options.max_batch = options.max_batch.clamp(1, positions);
        options.max_logit_rows = options.max_logit_rows.clamp(1, options.max_batch);
        let b = &mut backend;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(Layer {
                input_norm: b.upload_vector(&l.input_norm)?,
                post_attn_norm: b.upload_vector(&l.post_attn_norm)?,
                attn_sub_norm: l
                    .attn_sub_norm
                    .as_ref()
                    .map(|v| b.upload_vector(v))
                    .transpose()?,
                ffn_sub_norm: l
                    .ffn_sub_norm
                    .as_ref()
                    .map(|v| b.upload_vector(v))
                    .transpose()?,
                qkv_proj: b.upload_linears(&[&l.q_proj, &l.k_proj, &l.v_proj])?,
                o_proj: b.upload_linear(&l.o_proj)?,
                gate_up_proj: b.upload_linears(&[&l.gate_proj, &l.up_proj])?,
                down_proj: b.upload_linear(&l.down_proj)?,
            });
        }
        let embed = b.upload_embedding(&w.embed_tokens)?;
        let tied = w.lm_head.is_none().then_some(&embed);
        let head = b.upload_lm_head(w.head(), tied, options.lm_head)?;
        let final_norm = b.upload_vector(&w.final_norm)?;
        let (n, h, i) = (options.max_batch, c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let s = Scratch {
            x: b.alloc(n, h)?,
            xq: b.alloc_q(n, h)?,
            q: b.alloc(n, qd)?,
            att: b.alloc(n, qd)?,
            att_q: b.alloc_q(n, qd)?,
            ffn: b.alloc(n, i)?,
            ffn_q: b.alloc_q(n, i)?,
            logits: b.alloc(options.max_logit_rows, c.vocab_size)?,
        };
        let kv_dtype = options.kv_dtype::<B>();
        let cache = b.alloc_kv_cache(
            c.num_hidden_layers,
            options.slots,
            options.ctx,
            kvd,
            kv_dtype,
        )?;
        let options = ModelOptions {
            kv_cache: Some(kv_dtype),
            ..options
        };
        let shape = AttentionShape {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rope_theta: c.rope_theta,
        };
        Ok(Model {
            config: c,
            options,
            backend,
            embed,
            head,
            final_norm,
            layers,
            s,
            cache,
            shape,
            pos: 0,
            greedy: Greedy::None,
            sampling: None,
            chain_in: false,
            chain_out: false,
        })
    }

    /// Positions held in slot 0 of the KV cache (the single-sequence API).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// How the KV cache stores keys and values.
    pub fn kv_dtype(&self) -> KvDtype {
        self.options.kv_dtype::<B>()
    }

    /// Forgets the context (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Drops the cache back to `pos` positions (e.g. to re-run a suffix).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(BitnetError::EmptyInput("no tokens to run"));
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(BitnetError::TokenOutOfRange {
                id,
                vocab_size: self.config.vocab_size,
            });
        }
        let needed = self.pos + tokens.len();
        if needed > self.options.ctx {
            return Err(BitnetError::ContextOverflow {
                needed,
                ctx: self.options.ctx,
            });
        }
        Ok(())
    }

    /// One step over rows of any sequences (continuous batching). The logits of `logit_rows`
    /// (indices into `rows`, at most `max_logit_rows`; none: no LM head) are left ready; read
    /// them with [`Model::read_logits`]`(logit_rows.len())`. Rows of one slot must have
    /// consecutive increasing positions in order; the caller owns which positions a slot holds.
    pub fn step_rows(&mut self, rows: &[StepRow], logit_rows: &[u32]) -> Result<()> {
        if rows.is_empty() {
            return Err(BitnetError::EmptyInput("no rows to run"));
        }
        if rows.len() > self.options.max_batch {
            return Err(BitnetError::InvalidArgument(format!(
                "{} rows in one step; the model was loaded for at most {} (max_batch)",
                rows.len(),
                self.options.max_batch
            )));
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.token as usize >= self.config.vocab_size)
        {
            return Err(BitnetError::TokenOutOfRange {
                id: r.token,
                vocab_size: self.config.vocab_size,
            });
        }
        check_step_rows(rows, self.options.slots, self.options.ctx)?;
        if logit_rows.len() > self.options.max_logit_rows {
            return Err(BitnetError::InvalidArgument(format!(
                "{} logit rows in one step; the model was loaded for at most {} (max_logit_rows)",
                logit_rows.len(),
                self.options.max_logit_rows
            )));
        }
        if let Some(&i) = logit_rows.iter().find(|&&i| i as usize >= rows.len()) {
            return Err(BitnetError::InvalidArgument(format!(
                "logit row {i} is not one of the step's {} rows",
                rows.len()
            )));
        }
        self.step(rows, logit_rows)
    }

    /// The logits of the last step's first `n` logit rows: `[n, vocab]` flattened.
    pub fn read_logits(&mut self, n: usize) -> Result<Vec<f32>> {
        if n > self.options.max_logit_rows {
            return Err(BitnetError::InvalidArgument(format!(
                "{n} logit rows requested; the buffer holds {}",
                self.options.max_logit_rows
            )));
        }
        self.backend.read(&self.s.logits, n)
    }

    /// One step over checked rows; leaves the logits of `logit_rows` in the scratch logits
    /// buffer (none: no LM head).
    fn step(&mut self, rows: &[StepRow], logit_rows: &[u32]) -> Result<()> {
        let c = &self.config;
        let (b, s, sh) = (&mut self.backend, &mut self.s, &self.shape);
        let (eps, act) = (c.rms_norm_eps, c.activation);
        if self.chain_in {
            b.begin_step_chained(rows[0].pos as usize)?;
        } else {
            b.begin_step(rows)?;
        }
        b.embed(&self.embed, &mut s.x)?; // x [n, h]
        for (li, l) in self.layers.iter().enumerate() {
            // --- attention block ---
            b.rms_norm_quantize(&s.x, &l.input_norm, eps, &mut s.xq)?; // xq [n, h] int8
                                                                       // q [n, heads*hd] rotated; k, v rotated / stored into the cache at (slot, pos)
            b.qkv_rope_store(&l.qkv_proj, &s.xq, &mut self.cache, li, sh, &mut s.q)?;
            b.attention(&s.q, &self.cache, li, sh, &mut s.att)?; // att [n, heads*hd]
                                                                 // o_proj's input: the sub-normed attention output, or the output itself
            match &l.attn_sub_norm {
                Some(w) => b.rms_norm_quantize(&s.att, w, eps, &mut s.att_q)?, // [n, q] int8
                None => b.quantize(&s.att, &mut s.att_q)?,                     // [n, q] int8
            }
            b.ternary_matmul_add(&l.o_proj, &s.att_q, &mut s.x)?; // x = h [n, h]

            // --- feed-forward block ---
            b.rms_norm_quantize(&s.x, &l.post_attn_norm, eps, &mut s.xq)?; // y [n, h] int8
            b.gate_up(&l.gate_up_proj, &s.xq, act, &mut s.ffn)?; // ffn [n, i]
                                                                 // down_proj's input: the sub-normed product, or the product itself
            match &l.ffn_sub_norm {
                Some(w) => b.rms_norm_quantize(&s.ffn, w, eps, &mut s.ffn_q)?, // [n, i] int8
                None => b.quantize(&s.ffn, &mut s.ffn_q)?,                     // [n, i] int8
            }
            b.ternary_matmul_add(&l.down_proj, &s.ffn_q, &mut s.x)?; // x = out [n, h]
        }
        if !logit_rows.is_empty() {
            // logits [rows, vocab] of the final-normed rows that need them
            b.rms_norm_lm_head(
                &self.head,
                &s.x,
                &self.final_norm,
                eps,
                logit_rows,
                &mut s.logits,
            )?;
            if self.chain_out {
                // the next token, left on the device
                match &mut self.sampling {
                    None => b.argmax_chain(&s.logits)?,
                    Some(sm) => {
                        let r = sm.draw();
                        let n = sm.sampler.config.repeat_last_n.min(sm.history.len() + 1);
                        // a chained step's own token (the last pick) is on the device only
                        let known = if self.chain_in {
                            n.saturating_sub(1)
                        } else {
                            n
                        };
                        let known = known.min(sm.history.len());
                        let window = &sm.history[sm.history.len() - known..];
                        let d = DeviceSample {
                            config: &sm.sampler.config,
                            r,
                            window,
                            device_token: self.chain_in && n > 0,
                        };
                        b.sample_chain(&s.logits, &d)?;
                    }
                }
            }
        }
        b.end_step()
    }

    /// Appends `tokens` to slot 0 in one step; logits of the last row or of all rows.
    fn step_seq(&mut self, tokens: &[u32], all_logits: bool) -> Result<()> {
        let rows = StepRow::sequence(tokens, self.pos);
        let n = tokens.len() as u32;
        let logit_rows: Vec<u32> = if all_logits {
            (0..n).collect()
        } else {
            vec![n - 1]
        };
        self.step(&rows, &logit_rows)?;
        self.pos += tokens.len();
        Ok(())
    }

    /// Runs `tokens` (prefill in chunks of max_batch) and leaves the last position's logits ready.
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.options.max_batch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if i + 1 == chunks.len() {
                self.step_seq(chunk, false)?;
            } else {
                let rows = StepRow::sequence(chunk, self.pos);
                self.step(&rows, &[])?;
                self.pos += chunk.len();
            }
        }
        Ok(())
    }

    /// Appends `tokens` to the context and returns the logits of the last one: `[vocab]`.
    pub fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill(tokens)?;
        self.backend.read(&self.s.logits, 1)
    }

    /// Appends `tokens` and returns the greedy next token, reading back only the winning index.
    pub fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        self.prefill(tokens)?;
        self.backend.argmax_row0(&self.s.logits)
    }

    /// Starts a pipelined greedy decode after `tokens` (appended to the context as by
    /// `forward_argmax`): the first generated token is computed but not read yet. Then each
    /// `greedy_next` runs the pending token through the model and returns it; on a backend that
    /// chains tokens (the GPU) that step is submitted before the token is read back, so the
    /// device never waits for the host. `greedy_finish` returns the pending token without
    /// running it. Identical ids to `forward_argmax` one token at a time.
    pub fn greedy_begin(&mut self, tokens: &[u32]) -> Result<()> {
        self.pipeline_begin(tokens, None)
    }

    /// [`Model::greedy_begin`] picking with `sampler` instead of the argmax (the same
    /// `greedy_next` / `greedy_finish` calls follow): on the device when the backend samples
    /// with these settings (`Backend::samples_on_device`), else on the host from the logits,
    /// one draw of the sampler's stream per pick in both cases. `history` is the context's
    /// tokens (the repeat penalty's window). [`Model::sample_end`] gives the sampler back.
    pub fn sample_begin(
        &mut self,
        tokens: &[u32],
        sampler: Sampler,
        history: &[u32],
    ) -> Result<()> {
        self.pipeline_begin(
            tokens,
            Some(Sampling {
                sampler,
                history: history.to_vec(),
                unreturned: VecDeque::new(),
            }),
        )
    }

    fn pipeline_begin(&mut self, tokens: &[u32], sampling: Option<Sampling>) -> Result<()> {
        if self.greedy == Greedy::Device {
            // A decode left unfinished (an error upstream): drop its queued read.
            self.greedy = Greedy::None;
            self.backend.read_chained()?;
        }
        self.greedy = Greedy::None;
        self.sampling = sampling;
        let on_device = match &self.sampling {
            None => self.backend.chains_tokens(),
            Some(sm) => self.backend.samples_on_device(&sm.sampler.config),
        };
        if on_device {
            self.chain_out = true;
            let r = self.prefill(tokens);
            self.chain_out = false;
            r?;
            self.greedy = Greedy::Device;
        } else {
            self.prefill(tokens)?;
            self.greedy = Greedy::Host(self.host_pick()?);
        }
        Ok(())
    }

    /// The pick from the logits of the last step, on the host.
    fn host_pick(&mut self) -> Result<u32> {
        match &mut self.sampling {
            None => self.backend.argmax_row0(&self.s.logits),
            Some(sm) => {
                let logits = self.backend.read(&self.s.logits, 1)?;
                sm.unreturned.push_back(sm.sampler.clone());
                sm.sampler.try_sample(&logits, &sm.history)
            }
        }
    }

    /// A pick reached the caller.
    fn returned(&mut self, id: u32) -> u32 {
        if let Some(sm) = &mut self.sampling {
            sm.returned(id);
        }
        id
    }

    /// Runs the pending greedy token (appending it to the context), queues its successor and
    /// returns it. See `greedy_begin`.
    pub fn greedy_next(&mut self) -> Result<u32> {
        match std::mem::replace(&mut self.greedy, Greedy::None) {
            Greedy::None => Err(BitnetError::EmptyInput("no greedy decode started")),
            Greedy::Host(id) => {
                let id = self.returned(id);
                self.prefill(&[id])?;
                self.greedy = Greedy::Host(self.host_pick()?);
                Ok(id)
            }
            Greedy::Device => {
                if self.pos + 1 > self.options.ctx {
                    // Nothing submitted: the pending token can still be read.
                    self.greedy = Greedy::Device;
                    return Err(BitnetError::ContextOverflow {
                        needed: self.pos + 1,
                        ctx: self.options.ctx,
                    });
                }
                (self.chain_in, self.chain_out) = (true, true);
                // (token 0 stands in for the id the device holds)
                let row = StepRow {
                    token: 0,
                    pos: self.pos as u32,
                    slot: 0,
                };
                let r = self.step(&[row], &[0]);
                (self.chain_in, self.chain_out) = (false, false);
                r?;
                self.pos += 1;
                self.greedy = Greedy::Device;
                // The token of the step before, read while this one runs.
                let id = self.backend.read_chained()?;
                Ok(self.returned(id))
            }
        }
    }

    /// The pending greedy token, without running it: the end of a greedy decode.
    pub fn greedy_finish(&mut self) -> Result<u32> {
        let id = match std::mem::replace(&mut self.greedy, Greedy::None) {
            Greedy::None => return Err(BitnetError::EmptyInput("no greedy decode started")),
            Greedy::Host(id) => id,
            Greedy::Device => self.backend.read_chained()?,
        };
        Ok(self.returned(id))
    }

    /// Ends a sampled decode (`sample_begin`) and gives its sampler back, as if only the picks
    /// returned so far had been drawn: a pending pick that was never returned (the successor
    /// of a stop token, one lost with the device) is dropped with its draw, so the stream goes
    /// on exactly as a CPU sampling one token at a time. `read_pending`: drain the device's
    /// queued read of that pick (false when the device is gone). `None` for a greedy decode.
    pub fn sample_end(&mut self, read_pending: bool) -> Option<(Sampler, Vec<u32>)> {
        if self.greedy == Greedy::Device && read_pending {
            let _ = self.backend.read_chained(); // its value is dropped anyway
        }
        self.greedy = Greedy::None;
        let mut sm = self.sampling.take()?;
        if let Some(before) = sm.unreturned.pop_front() {
            sm.sampler = before;
        }
        Some((sm.sampler, sm.history))
    }

    /// Appends `tokens` and returns the logits of every one of them: `[n, vocab]` flattened.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let mut out = Vec::with_capacity(tokens.len() * self.config.vocab_size);
        for chunk in tokens.chunks(self.options.max_logit_rows) {
            self.step_seq(chunk, true)?;
            out.extend(self.backend.read(&self.s.logits, chunk.len())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::synthetic::{preset, random_weights};

    #[test]
    fn incremental_decode_equals_batch_on_a_random_model() {
        let c = preset("tiny").unwrap();
        let w = random_weights(&c, 3).unwrap();
        let opts = ModelOptions {
            ctx: 64,
            max_batch: 16,
            max_logit_rows: 16,
            lm_head: HeadFormat::Exact,
            kv_cache: Some(KvDtype::F32),
            slots: 1,
        };
        let mut m = Model::new(CpuBackend::new(2).unwrap(), &w, opts).unwrap();
        let tokens: Vec<u32> = (0..12).map(|i| (i * 337 + 5) % 4096).collect();
        let all = m.forward_all(&tokens).unwrap(); // [12, vocab]
        assert!(all.iter().all(|v| v.is_finite()));
        let v = c.vocab_size;
        let spread = all[..v].iter().fold(0f32, |a, &b| a.max(b))
            - all[..v].iter().fold(0f32, |a, &b| a.min(b));
        assert!(
            spread > 1e-3,
            "logits should not be constant: spread {spread}"
        );
        m.reset();
        m.forward_last(&tokens[..5]).unwrap();
        for t in 5..12 {
            let got = m.forward_last(&tokens[t..t + 1]).unwrap();
            for (j, (&g, &e)) in got.iter().zip(&all[t * v..(t + 1) * v]).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 + 1e-4 * e.abs(),
                    "pos {t} index {j}: got {g}, expected {e}"
                );
            }
        }
        assert_eq!(m.position(), 12);
        let err = m.forward_last(&[4096]).unwrap_err();
        assert!(err.to_string().contains("4096"), "{err}");
    }

    fn tiny_model(slots: usize) -> (Model<CpuBackend>, usize) {
        tiny_model_with(slots, HeadFormat::Exact)
    }

    fn tiny_model_with(slots: usize, lm_head: HeadFormat) -> (Model<CpuBackend>, usize) {
        let c = preset("tiny").unwrap();
        let w = random_weights(&c, 7).unwrap();
        let opts = ModelOptions {
            ctx: 32,
            max_batch: 32,
            max_logit_rows: 32,
            lm_head,
            kv_cache: Some(KvDtype::F32),
            slots,
        };
        (
            Model::new(CpuBackend::new(2).unwrap(), &w, opts).unwrap(),
            c.vocab_size,
        )
    }

    #[test]
    fn a_batch_of_rows_from_several_slots_equals_each_sequence_alone_bit_for_bit() {
        for head in [HeadFormat::Exact, HeadFormat::Q8, HeadFormat::Q4] {
            batch_equals_each_sequence_alone(head);
        }
    }

    /// Each sequence alone (a single-slot model, one token per step, so every logit comes from
    /// a one-row step) against the sequences' rows batched with prefill chunks and decode rows
    /// of other slots: the same logits bit for bit, for the head format `head` (the q8 head
    /// runs several rows 2 or 4 at a time, one row alone).
    fn batch_equals_each_sequence_alone(head: HeadFormat) {
        let seqs: Vec<Vec<u32>> = [(11usize, 5u32), (9, 1001), (14, 2903)]
            .iter()
            .map(|&(n, k)| (0..n as u32).map(|i| (i * 337 + k) % 4096).collect())
            .collect();
        let (mut alone_model, v) = tiny_model_with(1, head);
        let alone: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| {
                alone_model.reset();
                let mut all = Vec::with_capacity(s.len() * v);
                for (p, &t) in s.iter().enumerate() {
                    alone_model
                        .step_rows(&StepRow::sequence_in(0, &[t], p), &[0])
                        .unwrap();
                    all.extend(alone_model.read_logits(1).unwrap());
                }
                all
            })
            .collect();
        // batched: sequence i joins at step start[i] with a prefill chunk of prefill[i] tokens,
        // then decodes one token per step; slots in a scrambled order within each step
        let (start, prefill, order) = ([0usize, 1, 2], [5usize, 3, 7], [2usize, 0, 1]);
        let (mut m, _) = tiny_model_with(3, head);
        let mut fed = [0usize; 3];
        let mut checked = 0;
        for step in 0.. {
            let (mut rows, mut owners) = (Vec::new(), Vec::new());
            for &i in &order {
                if step < start[i] || fed[i] == seqs[i].len() {
                    continue;
                }
                let k = if fed[i] == 0 { prefill[i] } else { 1 };
                rows.extend(StepRow::sequence_in(
                    i as u32,
                    &seqs[i][fed[i]..fed[i] + k],
                    fed[i],
                ));
                owners.extend((fed[i]..fed[i] + k).map(|p| (i, p)));
                fed[i] += k;
            }
            if rows.is_empty() {
                break;
            }
            // every row's logits, in reverse order: the selection order is the output order
            let logit_rows: Vec<u32> = (0..rows.len() as u32).rev().collect();
            m.step_rows(&rows, &logit_rows).unwrap();
            let got = m.read_logits(logit_rows.len()).unwrap();
            for (o, &r) in logit_rows.iter().enumerate() {
                let (i, p) = owners[r as usize];
                let (g, e) = (&got[o * v..(o + 1) * v], &alone[i][p * v..(p + 1) * v]);
                for (j, (a, b)) in g.iter().zip(e).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "{head:?} head, step {step} sequence {i} position {p} index {j}: got {a}, expected {b}"
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 11 + 9 + 14);
    }

    #[test]
    fn step_rows_rejects_bad_rows_with_typed_errors() {
        let (mut m, _) = tiny_model(2);
        let row = |token, pos, slot| StepRow { token, pos, slot };
        let err = |m: &mut Model<CpuBackend>, rows: &[StepRow], logits: &[u32]| {
            m.step_rows(rows, logits).unwrap_err()
        };
        assert!(matches!(
            err(&mut m, &[row(1, 0, 2)], &[0]),
            BitnetError::SlotOutOfRange { slot: 2, slots: 2 }
        ));
        assert!(matches!(
            err(&mut m, &[row(1, 32, 0)], &[0]),
            BitnetError::ContextOverflow {
                needed: 33,
                ctx: 32
            }
        ));
        assert!(matches!(
            err(&mut m, &[row(4096, 0, 0)], &[0]),
            BitnetError::TokenOutOfRange { id: 4096, .. }
        ));
        assert!(matches!(err(&mut m, &[], &[]), BitnetError::EmptyInput(_)));
        // rows of one slot must be consecutive and increasing; other slots may interleave
        let e = err(&mut m, &[row(1, 3, 0), row(1, 0, 1), row(1, 5, 0)], &[0]);
        assert!(
            e.to_string().contains("position 5 follows position 3"),
            "{e}"
        );
        let e = err(&mut m, &[row(1, 3, 0), row(1, 3, 0)], &[0]);
        assert!(
            e.to_string().contains("position 3 follows position 3"),
            "{e}"
        );
        let e = err(&mut m, &[row(1, 0, 0)], &[1]);
        assert!(e.to_string().contains("logit row 1"), "{e}");
        let many: Vec<StepRow> = (0..33).map(|p| row(1, p % 32, p / 32)).collect();
        let e = err(&mut m, &many, &[0]);
        assert!(e.to_string().contains("max_batch"), "{e}");
        // the valid interleaving runs
        m.step_rows(&[row(1, 0, 1), row(1, 0, 0), row(2, 1, 1)], &[2, 0])
            .unwrap();
        assert_eq!(m.read_logits(2).unwrap().len(), 2 * 4096);
    }

    #[test]
    fn sub_norm_weights_must_agree_with_the_config() {
        let c = preset("tiny").unwrap();
        let mut w = random_weights(&c, 5).unwrap();
        w.layers[1].ffn_sub_norm = None;
        let opts = ModelOptions::for_config(&c);
        let err = Model::new(CpuBackend::new(1).unwrap(), &w, opts)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("layer 1") && err.contains("missing"), "{err}");
        // a config without sub-norms runs without them (the LLaMA family), with SiLU
        let mut c = c;
        c.sub_norms = false;
        c.activation = crate::config::FfnActivation::Silu;
        let w = random_weights(&c, 5).unwrap();
        assert!(w.layers.iter().all(|l| l.attn_sub_norm.is_none()));
        let mut m = Model::new(CpuBackend::new(1).unwrap(), &w, opts).unwrap();
        let logits = m.forward_last(&[1, 2, 3]).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn greedy_pipeline_on_the_cpu_equals_forward_argmax() {
        let c = preset("tiny").unwrap();
        let w = random_weights(&c, 4).unwrap();
        let opts = ModelOptions {
            ctx: 32,
            max_batch: 8,
            max_logit_rows: 8,
            lm_head: HeadFormat::Exact,
            kv_cache: Some(KvDtype::F32),
            slots: 1,
        };
        let mut m = Model::new(CpuBackend::new(2).unwrap(), &w, opts).unwrap();
        let prompt = [7u32, 300, 41];
        let mut want = vec![m.forward_argmax(&prompt).unwrap()];
        for _ in 0..4 {
            let last = *want.last().unwrap();
            want.push(m.forward_argmax(&[last]).unwrap());
        }
        m.reset();
        assert!(m.greedy_next().is_err(), "no decode started");
        m.greedy_begin(&prompt).unwrap();
        let mut got: Vec<u32> = (0..4).map(|_| m.greedy_next().unwrap()).collect();
        got.push(m.greedy_finish().unwrap());
        assert_eq!(got, want);
        assert_eq!(m.position(), prompt.len() + 4);
    }
}
