//! A BitNet model from a GGUF file: metadata → [`ModelConfig`], tensors → [`ModelWeights`]
//! (ternary tensors repacked into the backends' 2-bit layout, float tensors kept in the map or
//! dequantized), `tokenizer.ggml.*` → a `tokenizers` BPE tokenizer.
//!
//! Architectures (`general.architecture`) and what they compute:
//! - `bitnet-b1.58`, `bitnet-25`: bitnet.cpp's names for BitNet b1.58 2B4T (its converter
//!   writes `bitnet-25`; its fork also knows `bitnet-b1.58`): ReLU² FFN, attention and FFN
//!   sub-norms. The same graph as the Hugging Face folder.
//! - `bitnet`: llama.cpp's BitNet (1bitLLM lineage). llama.cpp computes it with sub-norms and a
//!   SiLU-gated FFN, even for a file converted from 2B4T, so that is what the file means
//!   (`--ffn-activation relu2` overrides it for a file known to come from 2B4T).
//! - `llama` with ternary linear weights (I2_S, TQ2_0, TQ1_0, or floats holding 0 and ±s): the
//!   LLaMA-style BitNets (TII's Falcon3-1.58bit / Falcon-E GGUFs, Llama3-8B-1.58): SiLU-gated FFN,
//!   no sub-norms, usually an untied `output.weight`. A `llama` file with other weight types is a
//!   plain float LLaMA and is refused.
//!
//! Tensor names are llama.cpp's (`token_embd`, `blk.N.attn_q`, `blk.N.attn_sub_norm`, ...).
//! Neither bitnet.cpp's nor llama.cpp's converter permutes q/k rows for the bitnet architectures
//! (both use NeoX-style RoPE, as transformers' rotate_half), so rows are taken as they are. For
//! `llama` both converters permute the q and k rows of every head (`LlamaModel.permute`: row
//! `h·d/2 + j` of a head of size d is written at `2j + h`) because llama.cpp rotates adjacent
//! pairs for that architecture; the loader puts the rows back, so the half-split RoPE of the
//! model graph applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::json;

use super::reader::{GgufError, GgufHeader, TensorInfo, Value};
use super::types::{self, GgmlType, I2sLayout};
use crate::config::{FfnActivation, ModelConfig, ModelFamily, WeightVariant};
use crate::error::{BitnetError, Result};
use crate::load::{decode_floats, FloatDtype, FloatMatrix, LayerWeights, ModelWeights, Q8_0_BLOCK};
use crate::ternary::ByteStorage;
use crate::ternary::TernaryMatrix;
use crate::tokenizer::Tokenizer;

/// Choices the file cannot make itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufOptions {
    /// Block interleave of I2_S tensors (not recorded in the file).
    pub i2s_layout: I2sLayout,
    /// Overrides the FFN activation implied by the architecture name.
    pub activation: Option<FfnActivation>,
}

/// What `bitnet info` shows about a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub version: u32,
    pub architecture: String,
    /// Tensor count per ggml type name.
    pub tensor_types: BTreeMap<String, usize>,
    /// One line per conversion done at load (e.g. "210 × TQ2_0 → packed 2-bit").
    pub conversions: Vec<String>,
    pub activation: FfnActivation,
    /// Where the activation came from (architecture name or user override).
    pub activation_source: String,
    pub i2s_layout: Option<I2sLayout>,
}

/// Everything a GGUF file provides.
pub struct GgufModel {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub weights: ModelWeights,
    pub summary: GgufSummary,
}

fn gerr(path: &Path, source: GgufError) -> BitnetError {
    BitnetError::Gguf {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens, checks and converts a GGUF model file. `on_layer(i, n)` reports progress.
pub fn load_gguf(
    path: &Path,
    opts: &GgufOptions,
    mut on_layer: impl FnMut(usize, usize),
) -> Result<GgufModel> {
    let file = std::fs::File::open(path).map_err(|e| BitnetError::io(path, e))?;
    // SAFETY: read-only map, as in load.rs: a file changed under us is the user's problem.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| BitnetError::io(path, e))?);
    let mut h = GgufHeader::parse(&map[..]).map_err(|e| gerr(path, e))?;
    // metadata first: the architecture, the config and the tokenizer
    let (arch, arch_g, activation, activation_source, config, tokenizer) = {
        let g = File {
            path: path.to_path_buf(),
            h: &h,
            map: &map,
            i2s_layout: opts.i2s_layout,
        };
        let arch = h
            .get_str("general.architecture")
            .map_err(|e| gerr(path, e))?
            .ok_or_else(|| gerr(path, GgufError::MissingKey("general.architecture".into())))?
            .to_string();
        let arch_g = Arch::of(&arch)?;
        let (arch_act, why) = (arch_g.activation, arch_g.why);
        let (activation, activation_source) = match opts.activation {
            Some(a) => (
                a,
                format!(
                    "user override (the architecture {arch:?} implies {})",
                    arch_act.name()
                ),
            ),
            None => (arch_act, format!("architecture {arch:?}: {why}")),
        };
        if arch_g.family == ModelFamily::Llama {
            g.check_ternary_llama()?;
        }
        let mut config = g.config(&arch)?;
        config.activation = activation;
        config.tie_word_embeddings = h.tensor("output.weight").is_none();
        let tokenizer = g.tokenizer(&config)?;
        (
            arch,
            arch_g,
            activation,
            activation_source,
            config,
            tokenizer,
        )
    };
    // The header is parsed and the tokenizer built: neither the parsed token arrays nor the
    // header's pages in the map are needed while the weights load.
    h.free_tokenizer_arrays();
    let g = File {
        path: path.to_path_buf(),
        h: &h,
        map: &map,
        i2s_layout: opts.i2s_layout,
    };
    g.release_bytes(0, h.data_start.min(map.len()));

    let c = &config;
    let (hd, i) = (c.hidden_size, c.intermediate_size);
    let mut conv = Conversions::default();
    let embed_tokens = g.float_matrix("token_embd.weight", c.vocab_size, hd, &mut conv)?;
    let lm_head = match h.tensor("output.weight") {
        None => None,
        Some(_) => Some(g.float_matrix("output.weight", c.vocab_size, hd, &mut conv)?),
    };
    let final_norm = g.vector("output_norm.weight", hd)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        on_layer(l, c.num_hidden_layers);
        let p = format!("blk.{l}.");
        let mut lin = |name: &str, rows: usize, cols: usize, heads: Option<usize>| {
            // `llama` files hold q/k rows permuted per head (see the module doc)
            let unpermute = heads.filter(|_| arch_g.permuted_qk).map(|heads| RowMap {
                head_dim: c.head_dim,
                heads,
            });
            if unpermute.is_some() {
                conv.note("q/k rows (llama.cpp permute)", "un-permuted");
            }
            g.ternary(&format!("{p}{name}"), rows, cols, unpermute, &mut conv)
        };
        let sub_norm = |name: &str, len: usize| {
            c.sub_norms
                .then(|| g.vector(&format!("{p}{name}.weight"), len))
                .transpose()
        };
        layers.push(LayerWeights {
            q_proj: lin("attn_q", c.q_dim(), hd, Some(c.num_attention_heads))?,
            k_proj: lin("attn_k", c.kv_dim(), hd, Some(c.num_key_value_heads))?,
            v_proj: lin("attn_v", c.kv_dim(), hd, None)?,
            o_proj: lin("attn_output", hd, c.q_dim(), None)?,
            gate_proj: lin("ffn_gate", i, hd, None)?,
            up_proj: lin("ffn_up", i, hd, None)?,
            down_proj: lin("ffn_down", hd, i, None)?,
            input_norm: g.vector(&format!("{p}attn_norm.weight"), hd)?,
            post_attn_norm: g.vector(&format!("{p}ffn_norm.weight"), hd)?,
            attn_sub_norm: sub_norm("attn_sub_norm", hd)?,
            ffn_sub_norm: sub_norm("ffn_sub_norm", i)?,
        });
    }
    on_layer(c.num_hidden_layers, c.num_hidden_layers);

    let mut tensor_types = BTreeMap::new();
    for t in &h.tensors {
        *tensor_types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    let uses_i2s = tensor_types.contains_key("I2_S");
    let summary = GgufSummary {
        version: h.version,
        architecture: arch,
        tensor_types,
        conversions: conv.lines(),
        activation,
        activation_source,
        i2s_layout: uses_i2s.then_some(opts.i2s_layout),
    };
    let weights = ModelWeights {
        config: config.clone(),
        embed_tokens,
        lm_head,
        final_norm,
        layers,
    };
    Ok(GgufModel {
        config,
        tokenizer,
        weights,
        summary,
    })
}

/// The config of a GGUF model without converting its tensors (header only).
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let file = std::fs::File::open(path).map_err(|e| BitnetError::io(path, e))?;
    // SAFETY: read-only map, as in `load_gguf`.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| BitnetError::io(path, e))?);
    let h = GgufHeader::parse(&map[..]).map_err(|e| gerr(path, e))?;
    let g = File {
        path: path.to_path_buf(),
        h: &h,
        map: &map,
        i2s_layout: I2sLayout::default(),
    };
    let arch = h
        .get_str("general.architecture")
        .map_err(|e| gerr(path, e))?
        .ok_or_else(|| gerr(path, GgufError::MissingKey("general.architecture".into())))?;
    g.config(arch)
}

/// What a GGUF architecture name means for the model graph.
struct Arch {
    activation: FfnActivation,
    /// Why that activation (shown by `bitnet info`).
    why: &'static str,
    sub_norms: bool,
    family: ModelFamily,
    /// q/k rows permuted per head for interleaved RoPE (llama.cpp's LLaMA converter).
    permuted_qk: bool,
}

impl Arch {
    fn of(arch: &str) -> Result<Arch> {
        let bitnet = |activation, why| Arch {
            activation,
            why,
            sub_norms: true,
            family: ModelFamily::BitNet,
            permuted_qk: false,
        };
        Ok(match arch {
            "bitnet-b1.58" | "bitnet-25" => bitnet(
                FfnActivation::Relu2,
                "bitnet.cpp's BitNet b1.58 (2B4T) graph",
            ),
            "bitnet" => bitnet(
                FfnActivation::Silu,
                "llama.cpp computes its `bitnet` architecture with a SiLU-gated FFN",
            ),
            "llama" => Arch {
                activation: FfnActivation::Silu,
                why: "a LLaMA-style BitNet (Falcon3-1.58bit): SiLU-gated FFN, no sub-norms",
                sub_norms: false,
                family: ModelFamily::Llama,
                permuted_qk: true,
            },
            other => {
                return Err(BitnetError::Unsupported {
                    what: "GGUF architecture",
                    value: other.to_string(),
                    hint: "BitNet b1.58 files are read: bitnet-b1.58 / bitnet-25 (bitnet.cpp), bitnet (llama.cpp) and llama with ternary weights (Falcon3-1.58bit)",
                })
            }
        })
    }
}

/// The file row of destination row `r` of a q/k projection whose rows a LLaMA converter
/// permuted: within each head of `head_dim` rows, HF row `half·d/2 + j` sits at `2j + half`.
#[derive(Debug, Clone, Copy)]
struct RowMap {
    head_dim: usize,
    heads: usize,
}

impl RowMap {
    fn src(self, r: usize) -> usize {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let (h, k) = (r / d, r % d);
        h * d + 2 * (k % half) + k / half
    }
}

/// Counts conversions by (from, to) for the summary.
#[derive(Default)]
struct Conversions(BTreeMap<(String, String), usize>);

impl Conversions {
    fn add(&mut self, from: GgmlType, to: &str) {
        *self
            .0
            .entry((from.name().to_string(), to.to_string()))
            .or_insert(0) += 1;
    }
    /// A conversion that is no type change (e.g. reordered rows).
    fn note(&mut self, from: &str, to: &str) {
        *self
            .0
            .entry((from.to_string(), to.to_string()))
            .or_insert(0) += 1;
    }
    fn lines(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|((from, to), n)| format!("{n} x {from} -> {to}"))
            .collect()
    }
}

struct File<'a> {
    path: PathBuf,
    h: &'a GgufHeader,
    map: &'a Arc<memmap2::Mmap>,
    i2s_layout: I2sLayout,
}

impl File<'_> {
    fn err(&self, e: GgufError) -> BitnetError {
        gerr(&self.path, e)
    }

    fn cfg_err(&self, msg: String) -> BitnetError {
        BitnetError::Config {
            path: self.path.clone(),
            msg,
        }
    }

    fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.h
            .tensor(name)
            .ok_or_else(|| BitnetError::MissingTensor {
                name: name.to_string(),
            })
    }

    fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// Lets the OS drop the resident pages of `t`'s bytes in the file mapping once a copy in
    /// another layout exists (a repacked ternary or a dequantized tensor, whose source is never
    /// read again), so that the file's copy does not count beside it in the process's memory
    /// (best effort, see [`ByteStorage::release`]).
    fn release(&self, t: &TensorInfo) {
        self.release_bytes(t.start, t.len);
    }

    /// [`File::release`] of `len` bytes of the map from `start`.
    fn release_bytes(&self, start: usize, len: usize) {
        ByteStorage::Mapped {
            map: Arc::clone(self.map),
            offset: start,
            len,
        }
        .release(0..len);
    }

    fn check_dims(&self, t: &TensorInfo, want: &[usize]) -> Result<()> {
        // ggml lists the innermost dimension first; report shapes in row-major order.
        let found: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if found != want {
            return Err(BitnetError::Shape {
                name: t.name.clone(),
                expected: want.to_vec(),
                found,
            });
        }
        Ok(())
    }

    fn usize_key(&self, key: &str) -> Result<Option<usize>> {
        let v = self.h.get_u64(key).map_err(|e| self.err(e))?;
        v.map(|v| {
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 32)
                .ok_or_else(|| self.cfg_err(format!("{key} = {v} is out of range")))
        })
        .transpose()
    }

    fn need_usize(&self, key: &str) -> Result<usize> {
        self.usize_key(key)?
            .ok_or_else(|| self.err(GgufError::MissingKey(key.to_string())))
    }

    /// A `llama` file is a BitNet only when its linear weights are ternary: refuses a float or
    /// k-quant LLaMA up front with one line (its first q projection tells).
    fn check_ternary_llama(&self) -> Result<()> {
        let t = self.tensor("blk.0.attn_q.weight")?;
        match t.ty {
            GgmlType::I2S | GgmlType::Tq2_0 | GgmlType::Tq1_0 => Ok(()),
            // floats are accepted only when they hold 0 and ±s (checked while repacking)
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => Ok(()),
            other => Err(BitnetError::Unsupported {
                what: "GGUF llama linear weights",
                value: format!("{} ({})", other.name(), t.name),
                hint: "a `llama` GGUF loads when its projections are ternary (I2_S, TQ2_0, TQ1_0), as in the Falcon3-1.58bit files; this is a plain LLaMA",
            }),
        }
    }

    fn config(&self, arch: &str) -> Result<ModelConfig> {
        let arch_g = Arch::of(arch)?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = self.need_usize(&k("embedding_length"))?;
        let intermediate_size = self.need_usize(&k("feed_forward_length"))?;
        let num_hidden_layers = self.need_usize(&k("block_count"))?;
        let num_attention_heads = self.need_usize(&k("attention.head_count"))?;
        let num_key_value_heads = self
            .usize_key(&k("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        let head_dim = match self.usize_key(&k("attention.key_length"))? {
            Some(d) => d,
            None => match self.usize_key(&k("rope.dimension_count"))? {
                Some(d) => d,
                None => hidden_size / num_attention_heads,
            },
        };
        if let Some(rd) = self.usize_key(&k("rope.dimension_count"))? {
            if rd != head_dim {
                return Err(self.cfg_err(format!(
                    "{} = {rd} differs from head_dim {head_dim}: partial RoPE is not implemented",
                    k("rope.dimension_count")
                )));
            }
        }
        if !head_dim.is_multiple_of(2) || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(self.cfg_err(format!(
                "head_dim {head_dim} must be even and head_count {num_attention_heads} a multiple of head_count_kv {num_key_value_heads}"
            )));
        }
        let embd = self.tensor("token_embd.weight")?;
        let vocab_size = match self.usize_key(&k("vocab_size"))? {
            Some(v) => v,
            None => embd.dims.get(1).copied().unwrap_or(0) as usize,
        };
        let max_position_embeddings = self.usize_key(&k("context_length"))?.unwrap_or(4096);
        let f = |key: &str, default: f64| -> Result<f32> {
            let v = self
                .h
                .get_f64(key)
                .map_err(|e| self.err(e))?
                .unwrap_or(default);
            if !v.is_finite() || v <= 0.0 {
                return Err(self.cfg_err(format!("{key} = {v} must be a positive number")));
            }
            Ok(v as f32)
        };
        let rope_theta = f(&k("rope.freq_base"), 10000.0)?;
        let rms_norm_eps = f(&k("attention.layer_norm_rms_epsilon"), 1e-5)?;
        // Only unscaled RoPE: bitnet.cpp writes no scaling key, llama.cpp's `bitnet` converter
        // writes linear with factor 1 (a no-op).
        let scaling = self
            .h
            .get_str(&k("rope.scaling.type"))
            .map_err(|e| self.err(e))?;
        let factor = self
            .h
            .get_f64(&k("rope.scaling.factor"))
            .map_err(|e| self.err(e))?;
        match (scaling, factor) {
            (None | Some("none"), _) | (Some("linear"), None | Some(1.0)) => {}
            (Some(t), f) => {
                return Err(self.cfg_err(format!(
                    "RoPE scaling {t:?} (factor {f:?}) is not implemented: only unscaled RoPE"
                )))
            }
        }
        for (name, dim) in [
            ("embedding_length", hidden_size),
            ("feed_forward_length", intermediate_size),
        ] {
            if !dim.is_multiple_of(4) {
                return Err(self.cfg_err(format!("{name} {dim} is not a multiple of 4")));
            }
        }
        let q_dim = num_attention_heads * head_dim;
        if !q_dim.is_multiple_of(4) || !(num_key_value_heads * head_dim).is_multiple_of(4) {
            return Err(self.cfg_err("attention projection sizes must be multiples of 4".into()));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            let v = self.h.get_u64(key).map_err(|e| self.err(e))?;
            v.map(|v| {
                u32::try_from(v)
                    .ok()
                    .filter(|&v| (v as usize) < vocab_size)
                    .ok_or_else(|| {
                        self.cfg_err(format!("{key} = {v} is not a token id below {vocab_size}"))
                    })
            })
            .transpose()
        };
        let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(e) = id(key)? {
                if !eos_token_ids.contains(&e) {
                    eos_token_ids.push(e);
                }
            }
        }
        Ok(ModelConfig {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rms_norm_eps,
            tie_word_embeddings: true,
            bos_token_id,
            eos_token_ids,
            // Every ternary tensor's scale is folded into out_scale as a multiplier.
            variant: WeightVariant::PackedAutoBitLinear,
            activation: arch_g.activation,
            sub_norms: arch_g.sub_norms,
            family: arch_g.family,
        })
    }

    /// A float matrix `[rows, cols]`: F32/F16/BF16 and Q8_0 (rows of whole blocks) stay in the
    /// map, Q6_K (and Q8_0 rows of part blocks) are dequantized to f32 (exactly as ggml does:
    /// `d · q` in f32).
    fn float_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        conv: &mut Conversions,
    ) -> Result<FloatMatrix> {
        let t = self.tensor(name)?;
        self.check_dims(t, &[rows, cols])?;
        let bytes = self.bytes(t);
        let mapped = |dtype| FloatMatrix {
            name: name.to_string(),
            rows,
            cols,
            dtype,
            data: ByteStorage::Mapped {
                map: Arc::clone(self.map),
                offset: t.start,
                len: t.len,
            },
        };
        // Dequantized a chunk of blocks at a time straight into the f32 bytes (no second copy
        // of the whole matrix), the file's pages dropped after.
        let deq = |f: fn(&[u8], &mut [f32])| -> Result<FloatMatrix> {
            let (block, block_bytes) = t.ty.block();
            let (block, block_bytes) = (block as usize, block_bytes as usize);
            let len = rows
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(4))
                .ok_or_else(|| BitnetError::BadValue {
                    name: name.to_string(),
                    msg: format!("an f32 copy of [{rows}, {cols}] overflows the address space"),
                })?;
            let mut out = vec![0u8; len]; // [rows, cols] f32 little-endian
            const CHUNK_BLOCKS: usize = 1024;
            let mut buf = vec![0f32; CHUNK_BLOCKS * block];
            for (src, dst) in bytes
                .chunks(CHUNK_BLOCKS * block_bytes)
                .zip(out.chunks_mut(CHUNK_BLOCKS * block * 4))
            {
                let vals = &mut buf[..dst.len() / 4];
                f(src, vals);
                for (d, v) in dst.chunks_exact_mut(4).zip(vals.iter()) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            self.release(t);
            Ok(FloatMatrix {
                name: name.to_string(),
                rows,
                cols,
                dtype: FloatDtype::F32,
                data: ByteStorage::Owned(Arc::new(out)),
            })
        };
        Ok(match t.ty {
            GgmlType::F32 => mapped(FloatDtype::F32),
            GgmlType::F16 => mapped(FloatDtype::F16),
            GgmlType::Bf16 => mapped(FloatDtype::Bf16),
            GgmlType::Q8_0 if cols.is_multiple_of(Q8_0_BLOCK) => {
                // kept as in the file (1.06 bytes a value), decoded a row at a time
                if let Some(b) = bytes
                    .chunks_exact(34)
                    .position(|b| !types::f16(&b[..2]).is_finite())
                {
                    return Err(BitnetError::BadValue {
                        name: name.to_string(),
                        msg: format!("Q8_0 block {b} has a non-finite scale"),
                    });
                }
                conv.add(t.ty, "Q8_0 (kept, decoded by row)");
                mapped(FloatDtype::Q8_0)
            }
            GgmlType::Q8_0 => {
                conv.add(t.ty, "F32 (dequantized)");
                deq(types::dequant_q8_0)?
            }
            GgmlType::Q6K => {
                conv.add(t.ty, "F32 (dequantized)");
                deq(types::dequant_q6_k)?
            }
            other => {
                return Err(BitnetError::Dtype {
                    name: name.to_string(),
                    expected: "F32, F16, BF16, Q8_0 or Q6_K".into(),
                    found: other.name().into(),
                })
            }
        })
    }

    fn floats(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let n = t.n_elements() as usize;
        let dtype = match t.ty {
            GgmlType::F32 => FloatDtype::F32,
            GgmlType::F16 => FloatDtype::F16,
            GgmlType::Bf16 => FloatDtype::Bf16,
            other => {
                return Err(BitnetError::Dtype {
                    name: t.name.clone(),
                    expected: "F32, F16 or BF16".into(),
                    found: other.name().into(),
                })
            }
        };
        let mut out = vec![0f32; n];
        decode_floats(dtype, self.bytes(t), &mut out);
        if let Some(k) = out.iter().position(|x| !x.is_finite()) {
            return Err(BitnetError::BadValue {
                name: t.name.clone(),
                msg: format!("element {k} is {} (not finite)", out[k]),
            });
        }
        self.release(t); // copied (the norms: ~2 MB of pages for 2B4T)
        Ok(out)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        self.check_dims(t, &[len])?;
        self.floats(t)
    }

    /// An optional one-element scale tensor next to a weight (`blk.N.attn_q.scale` in llama.cpp,
    /// `..._scale` in some converters): a multiplier on the layer output.
    fn extra_scale(&self, base: &str) -> Result<f32> {
        for name in [
            format!("{base}.scale"),
            format!("{base}_scale"),
            format!("{base}.weight_scale"),
        ] {
            if let Some(t) = self.h.tensor(&name) {
                if t.n_elements() != 1 {
                    return Err(BitnetError::Shape {
                        name,
                        expected: vec![1],
                        found: t.dims.iter().map(|&d| d as usize).collect(),
                    });
                }
                return Ok(self.floats(t)?[0]);
            }
        }
        Ok(1.0)
    }

    /// A ternary projection `[rows = out, cols = in]` repacked into the backends' layout
    /// (`ternary.rs`) with its one output scale.
    fn ternary(
        &self,
        base: &str,
        rows: usize,
        cols: usize,
        unpermute: Option<RowMap>,
        conv: &mut Conversions,
    ) -> Result<TernaryMatrix> {
        if let Some(m) = unpermute {
            if m.head_dim % 2 != 0 || m.heads.checked_mul(m.head_dim) != Some(rows) {
                return Err(BitnetError::Shape {
                    name: format!(
                        "{base}.weight (q/k rows of {} heads of {})",
                        m.heads, m.head_dim
                    ),
                    expected: vec![m.heads.saturating_mul(m.head_dim), cols],
                    found: vec![rows, cols],
                });
            }
        }
        // destination row -> row in the file
        let src = |r: usize| unpermute.map_or(r, |m| m.src(r));
        let name = format!("{base}.weight");
        let t = self.tensor(&name)?;
        self.check_dims(t, &[rows, cols])?;
        let bytes = self.bytes(t);
        let bad_code = |offset: usize| BitnetError::InvalidTernaryCode {
            name: name.clone(),
            offset,
        };
        // Decodes row r into codes [cols] (0, 1, 2 = -1, 0, +1) and returns the row's scale(s).
        let p4 = rows / 4;
        let mut packed = vec![0u8; p4 * cols]; // [rows/4, cols]
        let mut block_scales: Option<Vec<f32>> = None; // [rows, cols / 256] (TQ only)
        let scale: f32 = match t.ty {
            GgmlType::Tq2_0 | GgmlType::Tq1_0 => {
                let (_, bb) = t.ty.block();
                let bb = bb as usize;
                let blocks_per_row = cols / 256;
                let tq2 = t.ty == GgmlType::Tq2_0;
                // Per byte row p: the four rows p, P+p, 2P+p, 3P+p; returns their block scales
                // [4, blocks_per_row] (0 for an all-zero block, whose codes become 0 weights).
                let scales: Vec<Vec<f32>> = packed
                    .par_chunks_mut(cols)
                    .enumerate()
                    .map(|(p, out)| -> Result<Vec<f32>> {
                        let mut ds = Vec::with_capacity(4 * blocks_per_row);
                        let mut codes = [0u8; 256];
                        for i in 0..4 {
                            let r = src(i * p4 + p);
                            for b in 0..blocks_per_row {
                                let off = (r * blocks_per_row + b) * bb;
                                let blk = &bytes[off..off + bb];
                                let d = if tq2 {
                                    types::tq2_0_block(blk, &mut codes)
                                } else {
                                    types::tq1_0_block(blk, &mut codes)
                                };
                                if !d.is_finite() {
                                    return Err(BitnetError::BadValue {
                                        name: name.clone(),
                                        msg: format!("block scale of row {r} block {b} is {d}"),
                                    });
                                }
                                if let Some(k) = codes.iter().position(|&c| c > 2) {
                                    return Err(bad_code(
                                        off + if tq2 { k % 32 + 32 * (k / 128) } else { 0 },
                                    ));
                                }
                                if d == 0.0 {
                                    // Every weight of this block is 0 whatever its codes.
                                    codes = [1; 256];
                                }
                                ds.push(d);
                                for (o, &c) in out[b * 256..b * 256 + 256].iter_mut().zip(&codes) {
                                    *o |= c << (2 * i);
                                }
                            }
                        }
                        Ok(ds)
                    })
                    .collect::<Result<_>>()?;
                // [rows, blocks_per_row] by destination row r = i·P + p
                let mut by_row = vec![0f32; rows * blocks_per_row];
                for (p, ds) in scales.iter().enumerate() {
                    for i in 0..4 {
                        let r = i * p4 + p;
                        by_row[r * blocks_per_row..(r + 1) * blocks_per_row]
                            .copy_from_slice(&ds[i * blocks_per_row..(i + 1) * blocks_per_row]);
                    }
                }
                let mut nonzero = by_row.iter().filter(|&&d| d != 0.0);
                match nonzero.next() {
                    None => 1.0, // all blocks zero: every weight is 0
                    Some(&s) if nonzero.all(|&d| d.to_bits() == s.to_bits()) => s,
                    Some(_) => {
                        // Blocks with different scales (a TQ file quantized from float
                        // weights): kept exactly, per block, on top of a matrix scale of 1.
                        block_scales = Some(by_row);
                        1.0
                    }
                }
            }
            GgmlType::I2S => {
                let (bw, _) = self.i2s_layout.block();
                if !cols.is_multiple_of(bw) {
                    return Err(BitnetError::Shape {
                        name: format!(
                            "{name} (I2_S rows must be multiples of {bw} for the {:?} layout)",
                            self.i2s_layout
                        ),
                        expected: vec![rows, cols.next_multiple_of(bw)],
                        found: vec![rows, cols],
                    });
                }
                let n = rows * cols;
                let mut codes = vec![0u8; n];
                let s = types::i2_s_codes(bytes, n, self.i2s_layout, &mut codes);
                if let Some(k) = codes.iter().position(|&c| c > 2) {
                    // Byte of element k: its block's bytes, then the position in the group.
                    let (bw, bb) = self.i2s_layout.block();
                    return Err(bad_code(k / bw * bb + k % (bw / 4)));
                }
                if !s.is_finite() {
                    return Err(BitnetError::BadValue {
                        name,
                        msg: format!("I2_S scale is {s}"),
                    });
                }
                if s == 0.0 {
                    codes.fill(1);
                }
                fill_packed(&mut packed, &codes, rows, cols, src);
                if s == 0.0 {
                    1.0
                } else {
                    s
                }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => {
                // A float file of already-ternarized weights (bitnet.cpp's f32 intermediate,
                // llama.cpp's f16/f32 outtypes): every value must be 0 or ±s for one s.
                let w = self.floats(t)?;
                let s = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut codes = vec![1u8; w.len()];
                for (k, (&v, c)) in w.iter().zip(codes.iter_mut()).enumerate() {
                    *c = if v == 0.0 {
                        1
                    } else if v == s {
                        2
                    } else if v == -s {
                        0
                    } else {
                        return Err(BitnetError::BadValue {
                            name,
                            msg: format!(
                                "element {k} is {v}: a {} ternary tensor holds only 0 and ±{s}",
                                t.ty.name()
                            ),
                        });
                    };
                }
                fill_packed(&mut packed, &codes, rows, cols, src);
                if s == 0.0 {
                    1.0
                } else {
                    s
                }
            }
            other => {
                return Err(BitnetError::Dtype {
                    name,
                    expected:
                        "a ternary type (I2_S, TQ1_0, TQ2_0) or F32/F16/BF16 holding 0 and ±s"
                            .into(),
                    found: other.name().into(),
                })
            }
        };
        conv.add(
            t.ty,
            if block_scales.is_some() {
                "packed 2-bit, per-block scales (CPU)"
            } else {
                "packed 2-bit"
            },
        );
        self.release(t);
        let scale = scale * self.extra_scale(base)?;
        let m = TernaryMatrix::new(
            name,
            rows,
            cols,
            ByteStorage::Owned(Arc::new(packed)),
            scale,
        )?;
        match block_scales {
            Some(b) => m.with_block_scales(256, b),
            None => Ok(m),
        }
    }

    /// A `tokenizers` tokenizer from `tokenizer.ggml.*` (GPT-2 style byte-level BPE).
    fn tokenizer(&self, config: &ModelConfig) -> Result<Tokenizer> {
        let e = |e| self.err(e);
        let terr = |msg: String| BitnetError::Tokenizer(format!("{}: {msg}", self.path.display()));
        let model = self
            .h
            .get_str("tokenizer.ggml.model")
            .map_err(e)?
            .unwrap_or("");
        if model != "gpt2" {
            return Err(terr(format!(
                "tokenizer.ggml.model {model:?} is not supported (byte-level BPE \"gpt2\" is, as in BitNet 2B4T)"
            )));
        }
        let tokens = self
            .h
            .get_array("tokenizer.ggml.tokens")
            .map_err(e)?
            .ok_or_else(|| self.err(GgufError::MissingKey("tokenizer.ggml.tokens".into())))?;
        let types: Vec<i64> = match self.h.get_array("tokenizer.ggml.token_type").map_err(e)? {
            None => vec![1; tokens.len()],
            Some(a) if a.len() == tokens.len() => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    other => other.as_u64().map(|x| x as i64).ok_or(()),
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| terr("tokenizer.ggml.token_type must hold integers".into()))?,
            Some(a) => {
                return Err(terr(format!(
                    "{} token types for {} tokens",
                    a.len(),
                    tokens.len()
                )))
            }
        };
        if tokens.len() > config.vocab_size {
            return Err(terr(format!(
                "{} tokens but the embedding has {} rows",
                tokens.len(),
                config.vocab_size
            )));
        }
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        let mut strs = Vec::with_capacity(tokens.len());
        for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            let s = t
                .as_str()
                .ok_or_else(|| terr(format!("token {id} is not a string")))?;
            if vocab.insert(s.to_string(), json!(id)).is_some() {
                return Err(terr(format!("token {s:?} appears twice (id {id})")));
            }
            // llama.cpp token types: 3 control, 4 user-defined: matched as whole strings.
            if ty == 3 || ty == 4 {
                added.push(
                    json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
            strs.push(s);
        }
        let merges: Vec<serde_json::Value> =
            match self.h.get_array("tokenizer.ggml.merges").map_err(e)? {
                None => Vec::new(),
                Some(m) => m
                    .iter()
                    .map(|v| {
                        let s = v
                            .as_str()
                            .ok_or_else(|| terr("a merge is not a string".into()))?;
                        let (a, b) = s
                            .split_once(' ')
                            .ok_or_else(|| terr(format!("merge {s:?} is not two tokens")))?;
                        Ok(json!([a, b]))
                    })
                    .collect::<Result<_>>()?,
            };
        let pre = self
            .h
            .get_str("tokenizer.ggml.pre")
            .map_err(e)?
            .unwrap_or("default");
        // The split regexes of llama.cpp's pre-tokenizer names (public patterns of the models).
        const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        const GPT2: &str =
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
        let (regex, llama3) = match pre {
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "smaug-bpe" => (LLAMA3, true),
            "default" | "gpt2" | "gpt-2" => (GPT2, false),
            other => {
                return Err(terr(format!(
                    "pre-tokenizer {other:?} is not supported (llama-bpe, falcon3 and gpt2 are)"
                )))
            }
        };
        let add_bos = match self.h.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(terr(format!(
                    "tokenizer.ggml.add_bos_token is a {}",
                    v.type_name()
                )))
            }
            None => llama3,
        };
        let tok_str =
            |id: Option<u32>| id.and_then(|i| strs.get(i as usize)).map(|s| s.to_string());
        let bos = tok_str(config.bos_token_id);
        let eos = tok_str(config.eos_token_ids.first().copied());
        // As LLaMA-3's tokenizer.json: the bos comes from a template post-processor, so
        // `encode(text, true)` behaves as transformers' does (a bos is added even before a
        // text that starts with one).
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post_processor = match (&bos, config.bos_token_id) {
            (Some(b), Some(id)) if add_bos => json!({"type": "Sequence", "processors": [
                byte_level,
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}}
            ]}),
            _ => byte_level,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": llama3, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|err| terr(format!("cannot build the BPE tokenizer: {err}")))?;
        let template = self
            .h
            .get_str("tokenizer.chat_template")
            .map_err(e)?
            .map(str::to_string);
        Ok(Tokenizer::from_parts(inner, template, bos, eos, false))
    }
}

/// ORs codes `[rows, cols]` (row-major, file order) into the packed layout `[rows/4, cols]`;
/// destination row r comes from file row `src(r)`.
fn fill_packed(
    packed: &mut [u8],
    codes: &[u8],
    rows: usize,
    cols: usize,
    src: impl Fn(usize) -> usize + Sync,
) {
    let p4 = rows / 4;
    packed
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(p, out)| {
            for i in 0..4 {
                let r = src(i * p4 + p);
                let row = &codes[r * cols..(r + 1) * cols];
                for (o, &c) in out.iter_mut().zip(row) {
                    *o |= c << (2 * i);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_map_inverts_llama_cpp_permute() {
        // llama.cpp's permute on one head of d = 8: reshape(2, 4).swapaxes → file row 2j + half
        // holds HF row half·4 + j, i.e. the file holds HF rows [0, 4, 1, 5, 2, 6, 3, 7].
        let file_holds = [0usize, 4, 1, 5, 2, 6, 3, 7];
        let m = RowMap {
            head_dim: 8,
            heads: 2,
        };
        for head in 0..2 {
            for (file_row, &hf_row) in file_holds.iter().enumerate() {
                assert_eq!(m.src(head * 8 + hf_row), head * 8 + file_row);
            }
        }
    }

    #[test]
    fn architecture_names_set_activation_sub_norms_and_family() {
        let a = Arch::of("llama").unwrap();
        assert_eq!(
            (a.activation, a.sub_norms, a.family, a.permuted_qk),
            (FfnActivation::Silu, false, ModelFamily::Llama, true)
        );
        let b = Arch::of("bitnet").unwrap();
        assert_eq!(
            (b.activation, b.sub_norms, b.permuted_qk),
            (FfnActivation::Silu, true, false)
        );
        let c = Arch::of("bitnet-25").unwrap();
        assert_eq!((c.activation, c.sub_norms), (FfnActivation::Relu2, true));
        assert!(Arch::of("gemma").is_err());
    }
}
