//! The BitNet b1.58 forward pass, written once over [`Backend`]. Reads top to bottom like the
//! paper's decoder layer:
//!
//! ```text
//! h   = x + o_proj( attn_sub_norm( attention( rope(q, k), v ) ) ),   q,k,v = proj( input_norm(x) )
//! out = h + down_proj( ffn_sub_norm( relu(gate(y))² · up(y) ) ),     y = post_attn_norm(h)
//! logits = norm(x_L) · embedᵀ
//! ```
//!
//! Every projection quantizes its input to int8 per token; q/k/v share one quantized input and so
//! do gate/up, exactly as in transformers (each BitLinear quantizes the same tensor identically).

use crate::backend::{AttentionShape, Backend, HeadFormat, LogitRows};
use crate::config::ModelConfig;
use crate::error::{BitnetError, Result};
use crate::load::ModelWeights;

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
}

impl ModelOptions {
    pub fn for_config(config: &ModelConfig) -> Self {
        ModelOptions {
            ctx: config.max_position_embeddings,
            max_batch: 512,
            max_logit_rows: 64,
            lm_head: HeadFormat::Exact,
        }
    }
}

struct Layer<B: Backend> {
    input_norm: B::Vector,     // [h]
    post_attn_norm: B::Vector, // [h]
    attn_sub_norm: B::Vector,  // [h]
    ffn_sub_norm: B::Vector,   // [i]
    q_proj: B::Linear,         // [q, h]
    k_proj: B::Linear,         // [kv, h]
    v_proj: B::Linear,         // [kv, h]
    o_proj: B::Linear,         // [h, q]
    gate_proj: B::Linear,      // [i, h]
    up_proj: B::Linear,        // [i, h]
    down_proj: B::Linear,      // [h, i]
}

/// Activation buffers, allocated once for `max_batch` rows (B below).
struct Scratch<B: Backend> {
    x: B::Tensor,      // [B, h]  residual stream
    xn: B::Tensor,     // [B, h]  normed
    xq: B::QTensor,    // [B, h]  int8
    q: B::Tensor,      // [B, q]
    k: B::Tensor,      // [B, kv]
    v: B::Tensor,      // [B, kv]
    att: B::Tensor,    // [B, q]
    att_n: B::Tensor,  // [B, q]
    att_q: B::QTensor, // [B, q]
    proj: B::Tensor,   // [B, h]  o_proj / down_proj output
    gate: B::Tensor,   // [B, i]
    up: B::Tensor,     // [B, i]
    ffn: B::Tensor,    // [B, i]
    ffn_n: B::Tensor,  // [B, i]
    ffn_q: B::QTensor, // [B, i]
    logits: B::Tensor, // [max_logit_rows, vocab]
}

/// A model on a backend, with its KV cache and the number of positions it holds.
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
}

impl<B: Backend> Model<B> {
    pub fn new(mut backend: B, w: &ModelWeights, mut options: ModelOptions) -> Result<Self> {
        let c = w.config.clone();
        if options.ctx == 0 || options.ctx > c.max_position_embeddings {
            return Err(BitnetError::InvalidArgument(format!(
                "context {} must be in 1..={} (max_position_embeddings)",
                options.ctx, c.max_position_embeddings
            )));
        }
        options.max_batch = options.max_batch.clamp(1, options.ctx);
        options.max_logit_rows = options.max_logit_rows.clamp(1, options.max_batch);
        let b = &mut backend;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(Layer {
                input_norm: b.upload_vector(&l.input_norm)?,
                post_attn_norm: b.upload_vector(&l.post_attn_norm)?,
                attn_sub_norm: b.upload_vector(&l.attn_sub_norm)?,
                ffn_sub_norm: b.upload_vector(&l.ffn_sub_norm)?,
                q_proj: b.upload_linear(&l.q_proj)?,
                k_proj: b.upload_linear(&l.k_proj)?,
                v_proj: b.upload_linear(&l.v_proj)?,
                o_proj: b.upload_linear(&l.o_proj)?,
                gate_proj: b.upload_linear(&l.gate_proj)?,
                up_proj: b.upload_linear(&l.up_proj)?,
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
            xn: b.alloc(n, h)?,
            xq: b.alloc_q(n, h)?,
            q: b.alloc(n, qd)?,
            k: b.alloc(n, kvd)?,
            v: b.alloc(n, kvd)?,
            att: b.alloc(n, qd)?,
            att_n: b.alloc(n, qd)?,
            att_q: b.alloc_q(n, qd)?,
            proj: b.alloc(n, h)?,
            gate: b.alloc(n, i)?,
            up: b.alloc(n, i)?,
            ffn: b.alloc(n, i)?,
            ffn_n: b.alloc(n, i)?,
            ffn_q: b.alloc_q(n, i)?,
            logits: b.alloc(options.max_logit_rows, c.vocab_size)?,
        };
        let cache = b.alloc_kv_cache(c.num_hidden_layers, options.ctx, kvd)?;
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
        })
    }

    /// Positions held in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
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

    /// One step over at most `max_batch` tokens at the current position; leaves the selected
    /// logits rows in the scratch logits buffer (or computes no logits when `rows` is None).
    fn step(&mut self, tokens: &[u32], rows: Option<LogitRows>) -> Result<()> {
        let c = &self.config;
        let (b, s, sh) = (&mut self.backend, &mut self.s, &self.shape);
        let eps = c.rms_norm_eps;
        b.begin_step(tokens, self.pos)?;
        b.embed(&self.embed, &mut s.x)?; // x [n, h]
        for (li, l) in self.layers.iter().enumerate() {
            // --- attention block ---
            b.rms_norm(&s.x, &l.input_norm, eps, &mut s.xn)?; // xn [n, h]
            b.quantize(&s.xn, &mut s.xq)?; // xq [n, h] int8, shared by q/k/v
            b.ternary_matmul(&l.q_proj, &s.xq, &mut s.q)?; // q [n, heads*hd]
            b.ternary_matmul(&l.k_proj, &s.xq, &mut s.k)?; // k [n, kv_heads*hd]
            b.ternary_matmul(&l.v_proj, &s.xq, &mut s.v)?; // v [n, kv_heads*hd]
            b.rope(&mut s.q, sh.n_heads, sh)?;
            b.rope(&mut s.k, sh.n_kv_heads, sh)?;
            b.attention(&s.q, &s.k, &s.v, &mut self.cache, li, sh, &mut s.att)?; // att [n, heads*hd]
            b.rms_norm(&s.att, &l.attn_sub_norm, eps, &mut s.att_n)?; // att_n [n, heads*hd]
            b.quantize(&s.att_n, &mut s.att_q)?;
            b.ternary_matmul(&l.o_proj, &s.att_q, &mut s.proj)?; // proj [n, h]
            b.add_assign(&mut s.x, &s.proj)?; // x = h [n, h]

            // --- feed-forward block ---
            b.rms_norm(&s.x, &l.post_attn_norm, eps, &mut s.xn)?; // y [n, h]
            b.quantize(&s.xn, &mut s.xq)?; // shared by gate/up
            b.ternary_matmul(&l.gate_proj, &s.xq, &mut s.gate)?; // gate [n, i]
            b.ternary_matmul(&l.up_proj, &s.xq, &mut s.up)?; // up [n, i]
            b.relu2_mul(&s.gate, &s.up, &mut s.ffn)?; // ffn [n, i]
            b.rms_norm(&s.ffn, &l.ffn_sub_norm, eps, &mut s.ffn_n)?; // ffn_n [n, i]
            b.quantize(&s.ffn_n, &mut s.ffn_q)?;
            b.ternary_matmul(&l.down_proj, &s.ffn_q, &mut s.proj)?; // proj [n, h]
            b.add_assign(&mut s.x, &s.proj)?; // x = out [n, h]
        }
        if let Some(rows) = rows {
            b.rms_norm(&s.x, &self.final_norm, eps, &mut s.xn)?; // xn [n, h]
            b.lm_head(&self.head, &s.xn, rows, &mut s.logits)?; // logits [1 or n, vocab]
        }
        b.end_step()?;
        self.pos += tokens.len();
        Ok(())
    }

    /// Runs `tokens` (prefill in chunks of max_batch) and leaves the last position's logits ready.
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.options.max_batch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let rows = (i + 1 == chunks.len()).then_some(LogitRows::Last);
            self.step(chunk, rows)?;
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

    /// Appends `tokens` and returns the logits of every one of them: `[n, vocab]` flattened.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let mut out = Vec::with_capacity(tokens.len() * self.config.vocab_size);
        for chunk in tokens.chunks(self.options.max_logit_rows) {
            self.step(chunk, Some(LogitRows::All))?;
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
}
