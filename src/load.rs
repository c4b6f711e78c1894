//! Loading a Hugging Face BitNet model folder: `config.json` + `model.safetensors` memory-mapped.
//!
//! Packed ternary weights and the bf16 embedding stay in the memory map (no copy, never
//! expanded to floats); only the small norm vectors and the scales are converted to f32.
//! The safetensors crate checks the header and every tensor's offsets against the file size;
//! on top of that every tensor is checked against the shape and dtype the config implies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::config::{ModelConfig, WeightVariant};
use crate::error::{BitnetError, Result};
use crate::ternary::{pack_ternary, ternarize_absmean, ByteStorage, TernaryMatrix};

/// Element type of a float tensor kept in its file dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    Bf16,
    F16,
    F32,
    /// GGUF Q8_0 blocks as in the file: per 32 columns one f16 scale `d` then 32 int8 codes `q`
    /// (34 bytes), the value `d · q` in f32 (how ggml dequantizes it, exact). Rows are whole
    /// blocks (`cols % 32 == 0`). A tied Q8_0 embedding stays this size in memory (1.06 bytes
    /// per value, not the 4 of a dequantized copy) and is decoded a row at a time.
    Q8_0,
}

/// Columns per [`FloatDtype::Q8_0`] block, and its bytes.
pub const Q8_0_BLOCK: usize = 32;
const Q8_0_BLOCK_BYTES: usize = 34;

impl FloatDtype {
    /// Bytes of one row of `cols` values (a whole number of blocks for Q8_0).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            FloatDtype::Bf16 | FloatDtype::F16 => 2 * cols,
            FloatDtype::F32 => 4 * cols,
            FloatDtype::Q8_0 => cols / Q8_0_BLOCK * Q8_0_BLOCK_BYTES,
        }
    }

    /// The float type a GPU keeps this as (its shaders read bf16, f16 and f32; Q8_0 rows are
    /// decoded to f32 at upload).
    pub fn on_device(self) -> FloatDtype {
        match self {
            FloatDtype::Q8_0 => FloatDtype::F32,
            d => d,
        }
    }
}

/// A float matrix `[rows, cols]` (embedding, untied LM head) kept in its file dtype.
#[derive(Clone, Debug)]
pub struct FloatMatrix {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: FloatDtype,
    pub data: ByteStorage,
}

impl FloatMatrix {
    /// Row `r` converted to f32: `out [cols]`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        decode_floats(self.dtype, self.row_bytes(r), out);
    }

    /// Row `r` as stored (`dtype.row_bytes(cols)` bytes).
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let rb = self.dtype.row_bytes(self.cols);
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.dtype.row_bytes(self.cols)
    }
}

/// Decodes little-endian floats of `dtype` into `out` (exact: bf16 and f16 widen losslessly).
pub fn decode_floats(dtype: FloatDtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        FloatDtype::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        FloatDtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        FloatDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        FloatDtype::Q8_0 => crate::gguf::types::dequant_q8_0(bytes, out),
    }
}

/// The weights of one decoder layer. Shapes with `h = hidden`, `q = heads*head_dim`,
/// `kv = kv_heads*head_dim`, `i = intermediate`.
pub struct LayerWeights {
    pub input_norm: Vec<f32>,     // [h]
    pub post_attn_norm: Vec<f32>, // [h]
    /// `[q]`, present when the config has sub-norms (BitNet 2B4T, GGUF `bitnet`).
    pub attn_sub_norm: Option<Vec<f32>>,
    /// `[i]`, present when the config has sub-norms.
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub q_proj: TernaryMatrix,    // [q, h]
    pub k_proj: TernaryMatrix,    // [kv, h]
    pub v_proj: TernaryMatrix,    // [kv, h]
    pub o_proj: TernaryMatrix,    // [h, q]
    pub gate_proj: TernaryMatrix, // [i, h]
    pub up_proj: TernaryMatrix,   // [i, h]
    pub down_proj: TernaryMatrix, // [h, i]
}

/// Everything needed to run the model, on the host.
pub struct ModelWeights {
    pub config: ModelConfig,
    pub embed_tokens: FloatMatrix,    // [vocab, h]
    pub lm_head: Option<FloatMatrix>, // [vocab, h], None when tied to embed_tokens
    pub final_norm: Vec<f32>,         // [h]
    pub layers: Vec<LayerWeights>,
}

impl ModelWeights {
    /// The matrix the LM head multiplies with: `lm_head.weight`, or the embedding when tied.
    pub fn head(&self) -> &FloatMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes of packed ternary weights (2 bits each).
    pub fn ternary_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .iter()
                .map(|m| m.packed.as_slice().len())
                .sum::<usize>()
            })
            .sum()
    }
}

/// Paths of a model folder, checked to exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    /// Set when the model is one GGUF file (then `dir`, `config`, `weights` and `tokenizer` all
    /// name that file): what was read and converted.
    pub gguf: Option<crate::gguf::GgufSummary>,
}

impl ModelFiles {
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(BitnetError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let need = |file: &str| -> Result<PathBuf> {
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(BitnetError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.to_string(),
                })
            }
        };
        let tc = dir.join("tokenizer_config.json");
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config: need("config.json")?,
            weights: need("model.safetensors")?,
            tokenizer: need("tokenizer.json")?,
            tokenizer_config: tc.is_file().then_some(tc),
            gguf: None,
        })
    }
}

/// A whole model from `path`: a Hugging Face folder, or a `.gguf` file (the format is told by
/// the file's magic). `on_layer(i, n)` reports progress.
pub fn load_model(
    path: &Path,
    gguf: &crate::gguf::GgufOptions,
    on_layer: impl FnMut(usize, usize),
) -> Result<(
    ModelFiles,
    ModelConfig,
    crate::tokenizer::Tokenizer,
    ModelWeights,
)> {
    if crate::gguf::is_gguf_path(path) {
        let m = crate::gguf::load_gguf(path, gguf, on_layer)?;
        let p = path.to_path_buf();
        let files = ModelFiles {
            dir: p.clone(),
            config: p.clone(),
            weights: p.clone(),
            tokenizer: p,
            tokenizer_config: None,
            gguf: Some(m.summary),
        };
        return Ok((files, m.config, m.tokenizer, m.weights));
    }
    let files = ModelFiles::locate(path)?;
    let config = ModelConfig::from_file(&files.config)?;
    let tokenizer = crate::tokenizer::Tokenizer::from_files(
        &files.tokenizer,
        files.tokenizer_config.as_deref(),
    )?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(BitnetError::Config {
            path: files.config.clone(),
            msg: format!(
                "tokenizer.json has {} tokens but vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        });
    }
    let weights = load_weights(&files.weights, &config, on_layer)?;
    Ok((files, config, tokenizer, weights))
}

/// Memory-maps and checks `model.safetensors` against `config`. `on_layer(i, n)` reports progress.
pub fn load_weights(
    path: &Path,
    config: &ModelConfig,
    on_layer: impl FnMut(usize, usize),
) -> Result<ModelWeights> {
    let file = std::fs::File::open(path).map_err(|e| BitnetError::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while we run is the user's problem, as
    // with every mmap-based loader (candle, llama.cpp).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| BitnetError::io(path, e))?;
    let len = map.len();
    load_weights_from_map(Arc::new(map), len, path, config, on_layer)
}

/// [`load_weights`] on a safetensors file held in memory (`name` only labels errors): the bytes
/// are copied into an anonymous mapping, so nothing else changes. For the fuzz targets, the
/// property tests and callers that already hold the file.
pub fn load_weights_from_bytes(
    bytes: &[u8],
    name: &Path,
    config: &ModelConfig,
) -> Result<ModelWeights> {
    // A zero-length mapping is an error on Linux: map one byte and read none of it.
    let mut map =
        memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|e| BitnetError::io(name, e))?;
    map[..bytes.len()].copy_from_slice(bytes);
    let map = map.make_read_only().map_err(|e| BitnetError::io(name, e))?;
    load_weights_from_map(Arc::new(map), bytes.len(), name, config, |_, _| {})
}

/// Largest model size the derived arithmetic is checked for: 2^50 parameters or bytes (a
/// thousand times any model that exists; far from overflowing u64 in the sums built on it).
const MAX_MODEL_UNITS: u128 = 1 << 50;

/// Rejects a config whose sizes are beyond any real model, so that everything computed from
/// them (parameter counts, KV bytes per position, buffer and memory estimates, all in u64 or
/// usize) cannot overflow. config.json is untrusted: each size may be up to 2^31 on its own.
pub fn check_config_sizes(c: &ModelConfig) -> Result<()> {
    let n = |x: usize| x as u128;
    let (h, i, l, v) = (
        n(c.hidden_size),
        n(c.intermediate_size),
        n(c.num_hidden_layers),
        n(c.vocab_size),
    );
    let q = n(c.num_attention_heads) * n(c.head_dim);
    let kv = n(c.num_key_value_heads) * n(c.head_dim);
    let per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 3 * h + i;
    let params = per_layer * l + 2 * v * h + h;
    let kv_bytes_per_pos = l * 2 * kv * 4;
    let biggest = [
        params,
        kv_bytes_per_pos,
        kv_bytes_per_pos * n(c.max_position_embeddings),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if biggest > MAX_MODEL_UNITS {
        return Err(BitnetError::Unsupported {
            what: "model size",
            value: format!(
                "{params} parameters, {kv_bytes_per_pos} KV-cache bytes per position, {} positions",
                c.max_position_embeddings
            ),
            hint: "config.json describes a model far beyond any real one (over 2^50 parameters or KV bytes); the file is corrupt",
        });
    }
    Ok(())
}

/// Checks the first `len` bytes of `map` (a whole safetensors file) against `config`.
fn load_weights_from_map(
    map: Arc<memmap2::Mmap>,
    len: usize,
    path: &Path,
    config: &ModelConfig,
    mut on_layer: impl FnMut(usize, usize),
) -> Result<ModelWeights> {
    check_config_sizes(config)?;
    let map = &map;
    let st = SafeTensors::deserialize(&map[..len]).map_err(|e| BitnetError::Safetensors {
        path: path.to_path_buf(),
        // The crate's size errors do not say which tensor: find it.
        msg: match bad_tensor_entry(&map[..len]) {
            Some(which) => format!("{e}: {which}"),
            None => e.to_string(),
        },
    })?;
    let t = Tensors { st: &st, map };

    let c = config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let embed_tokens = t.float_matrix("model.embed_tokens.weight", c.vocab_size, h)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        match t.float_matrix("lm_head.weight", c.vocab_size, h) {
            Err(BitnetError::MissingTensor { .. }) => {
                return Err(BitnetError::MissingTensor {
                    name: "lm_head.weight (the config does not set tie_word_embeddings: true, and transformers then expects a separate head)".into(),
                })
            }
            other => Some(other?),
        }
    };
    let final_norm = t.vector("model.norm.weight", h)?;
    // Not with_capacity(num_hidden_layers): that count comes from an untrusted config.json, and
    // a file with fewer tensors fails below anyway.
    let mut layers = Vec::new();
    for l in 0..c.num_hidden_layers {
        on_layer(l, c.num_hidden_layers);
        let p = format!("model.layers.{l}.");
        let lin = |name: &str, rows: usize, cols: usize| {
            t.ternary(&format!("{p}{name}"), rows, cols, c.variant)
        };
        layers.push(LayerWeights {
            input_norm: t.vector(&format!("{p}input_layernorm.weight"), h)?,
            post_attn_norm: t.vector(&format!("{p}post_attention_layernorm.weight"), h)?,
            // The LLaMA family has none (transformers would ignore such tensors as well).
            attn_sub_norm: c
                .sub_norms
                .then(|| t.vector(&format!("{p}self_attn.attn_sub_norm.weight"), h))
                .transpose()?,
            ffn_sub_norm: c
                .sub_norms
                .then(|| t.vector(&format!("{p}mlp.ffn_sub_norm.weight"), i))
                .transpose()?,
            q_proj: lin("self_attn.q_proj", c.q_dim(), h)?,
            k_proj: lin("self_attn.k_proj", c.kv_dim(), h)?,
            v_proj: lin("self_attn.v_proj", c.kv_dim(), h)?,
            o_proj: lin("self_attn.o_proj", h, c.q_dim())?,
            gate_proj: lin("mlp.gate_proj", i, h)?,
            up_proj: lin("mlp.up_proj", i, h)?,
            down_proj: lin("mlp.down_proj", h, i)?,
        });
    }
    on_layer(c.num_hidden_layers, c.num_hidden_layers);
    Ok(ModelWeights {
        config: config.clone(),
        embed_tokens,
        lm_head,
        final_norm,
        layers,
    })
}

/// The first tensor of a safetensors header whose shape × dtype disagrees with its data_offsets,
/// described; None when the header cannot be read or every entry is consistent.
fn bad_tensor_entry(file: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header = file.get(8..8usize.checked_add(n)?)?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).ok()?;
    for (name, t) in entries.iter().filter(|(k, _)| *k != "__metadata__") {
        let Ok(dtype) = serde_json::from_value::<Dtype>(t.get("dtype")?.clone()) else {
            return Some(format!("tensor {name} has an unknown dtype {}", t["dtype"]));
        };
        let shape: Vec<u64> = t
            .get("shape")?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_u64)
            .collect::<Option<_>>()?;
        let offsets = t.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d));
        let held = end.checked_sub(start);
        match bits {
            None => return Some(format!("tensor {name}: shape {shape:?} overflows")),
            Some(b) if b % 8 != 0 || held != Some(b / 8) => {
                return Some(format!(
                    "tensor {name}: shape {shape:?} of {dtype:?} needs {} bits but data_offsets [{start}, {end}] hold {} bytes",
                    b,
                    end as i128 - start as i128
                ))
            }
            _ => {}
        }
    }
    None
}

/// Index of the first inf or NaN (all exponent bits set) among little-endian floats of `dtype`.
/// Scanned in parallel: the embedding of a 2B model is ~650 MB.
fn first_non_finite(dtype: FloatDtype, bytes: &[u8]) -> Option<usize> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20; // a multiple of every element size
    let es = dtype.on_device().row_bytes(1);
    let bad = |b: &[u8]| match dtype {
        FloatDtype::Bf16 => u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80,
        FloatDtype::F16 => u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00,
        // safetensors files hold no Q8_0 (the GGUF loader checks its scales)
        FloatDtype::F32 | FloatDtype::Q8_0 => {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }
    };
    bytes
        .par_chunks(CHUNK)
        .enumerate()
        .find_map_first(|(c, chunk)| {
            chunk
                .chunks_exact(es)
                .position(bad)
                .map(|i| c * (CHUNK / es) + i)
        })
}

struct Tensors<'a> {
    st: &'a SafeTensors<'a>,
    map: &'a Arc<memmap2::Mmap>,
}

fn float_dtype(name: &str, d: Dtype) -> Result<FloatDtype> {
    match d {
        Dtype::BF16 => Ok(FloatDtype::Bf16),
        Dtype::F16 => Ok(FloatDtype::F16),
        Dtype::F32 => Ok(FloatDtype::F32),
        other => Err(BitnetError::Dtype {
            name: name.to_string(),
            expected: "bf16, f16 or f32".into(),
            found: format!("{other:?}"),
        }),
    }
}

impl Tensors<'_> {
    fn get(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.st
            .tensor(name)
            .map_err(|_| BitnetError::MissingTensor {
                name: name.to_string(),
            })
    }

    fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(BitnetError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// The tensor's bytes as a view into the memory map.
    fn storage(&self, data: &[u8]) -> ByteStorage {
        let offset = data.as_ptr() as usize - self.map.as_ptr() as usize;
        ByteStorage::Mapped {
            map: Arc::clone(self.map),
            offset,
            len: data.len(),
        }
    }

    fn float_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<FloatMatrix> {
        let v = self.get(name)?;
        Self::check_shape(name, v.shape(), &[rows, cols])?;
        let dtype = float_dtype(name, v.dtype())?;
        if let Some(k) = first_non_finite(dtype, v.data()) {
            return Err(BitnetError::BadValue {
                name: name.to_string(),
                msg: format!(
                    "element {k} (row {}, column {}) is not finite (inf or NaN): the checkpoint is corrupt",
                    k / cols.max(1),
                    k % cols.max(1)
                ),
            });
        }
        Ok(FloatMatrix {
            name: name.to_string(),
            rows,
            cols,
            dtype,
            data: self.storage(v.data()),
        })
    }

    fn floats(&self, name: &str, expected_shapes: &[&[usize]]) -> Result<Vec<f32>> {
        let v = self.get(name)?;
        if !expected_shapes.contains(&v.shape()) {
            return Err(BitnetError::Shape {
                name: name.to_string(),
                expected: expected_shapes[0].to_vec(),
                found: v.shape().to_vec(),
            });
        }
        let dtype = float_dtype(name, v.dtype())?;
        let mut out = vec![0f32; v.data().len() / dtype.row_bytes(1)];
        decode_floats(dtype, v.data(), &mut out);
        if let Some(k) = out.iter().position(|x| !x.is_finite()) {
            return Err(BitnetError::BadValue {
                name: name.to_string(),
                msg: format!("element {k} is {} (not finite)", out[k]),
            });
        }
        Ok(out)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.floats(name, &[&[len]])
    }

    fn ternary(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
        variant: WeightVariant,
    ) -> Result<TernaryMatrix> {
        let wname = format!("{prefix}.weight");
        let sname = format!("{prefix}.weight_scale");
        if variant == WeightVariant::OnlineMaster {
            let w = self.floats(&wname, &[&[rows, cols]])?;
            let (q, s) = ternarize_absmean(&w);
            let packed = pack_ternary(&q, rows, cols)?;
            return TernaryMatrix::new(wname, rows, cols, ByteStorage::Owned(Arc::new(packed)), s);
        }
        let v = self.get(&wname)?;
        if v.dtype() != Dtype::U8 {
            return Err(BitnetError::Dtype {
                name: wname,
                expected:
                    "U8 (packed ternary; for bf16 master weights set quantization_mode \"online\")"
                        .into(),
                found: format!("{:?}", v.dtype()),
            });
        }
        Self::check_shape(&wname, v.shape(), &[rows / 4, cols])?;
        let scale = self.floats(&sname, &[&[1], &[]])?[0];
        if scale <= 0.0 {
            return Err(BitnetError::BadValue {
                name: sname,
                msg: format!("weight scale {scale} must be positive"),
            });
        }
        let out_scale = match variant {
            WeightVariant::PackedAutoBitLinear => scale,
            _ => 1.0 / scale,
        };
        TernaryMatrix::new(wname, rows, cols, self.storage(v.data()), out_scale)
    }
}
