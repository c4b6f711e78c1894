//! `config.json` of a Hugging Face BitNet folder: the architecture and how the linear layers
//! scale their integer outputs.

use std::path::Path;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{BitnetError, Result};

/// How a ternary projection turns its exact integer accumulator into a float.
/// With `s_act = 127 / absmax(x_t)` per token:
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightVariant {
    /// Packed uint8 weights, `linear_class: autobitlinear` (the 2B4T repo): `acc / s_act * weight_scale`.
    PackedAutoBitLinear,
    /// Packed uint8 weights, `linear_class: bitlinear` or absent: `acc / (s_act * weight_scale)`.
    PackedBitLinear,
    /// bf16 master weights, `quantization_mode: online`: ternarized at load with absmean
    /// `s = mean|W|`, output `acc / s_act * s`.
    OnlineMaster,
}

impl WeightVariant {
    pub fn describe(self) -> &'static str {
        match self {
            WeightVariant::PackedAutoBitLinear => {
                "packed 2-bit, autobitlinear (output × weight_scale)"
            }
            WeightVariant::PackedBitLinear => "packed 2-bit, bitlinear (output ÷ weight_scale)",
            WeightVariant::OnlineMaster => {
                "bf16 master weights, ternarized at load (online absmean)"
            }
        }
    }
}

/// The FFN's gating activation: `act(gate(y)) · up(y)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FfnActivation {
    /// `relu(x)²`: BitNet b1.58 2B4T (`hidden_act: relu2`).
    #[default]
    Relu2,
    /// `x · sigmoid(x)`: the LLaMA-style BitNets (1bitLLM, Falcon3-1.58bit) and what llama.cpp
    /// computes for its `bitnet` architecture.
    Silu,
}

impl FfnActivation {
    pub fn name(self) -> &'static str {
        match self {
            FfnActivation::Relu2 => "relu2",
            FfnActivation::Silu => "silu",
        }
    }
}

impl std::str::FromStr for FfnActivation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "relu2" => Ok(FfnActivation::Relu2),
            "silu" => Ok(FfnActivation::Silu),
            _ => Err(format!(
                "unknown FFN activation {s:?} (expected relu2 or silu)"
            )),
        }
    }
}

/// Which model family a checkpoint belongs to. The forward pass is the same function for all;
/// what differs is config ([`ModelConfig::activation`], [`ModelConfig::sub_norms`],
/// `tie_word_embeddings`). Shown by `bitnet info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelFamily {
    /// `BitNetForCausalLM` (model_type `bitnet`): BitNet b1.58 2B4T, ReLU² FFN, attention and
    /// FFN sub-norms before o_proj / down_proj.
    #[default]
    BitNet,
    /// `LlamaForCausalLM` with `quantization_config.quant_method: bitnet` (Falcon3-1.58bit,
    /// Falcon-E, Llama3-8B-1.58): SiLU-gated FFN, no sub-norms, an unquantized `lm_head`.
    Llama,
}

impl ModelFamily {
    pub fn describe(self) -> &'static str {
        match self {
            ModelFamily::BitNet => "BitNetForCausalLM (BitNet b1.58)",
            ModelFamily::Llama => "LlamaForCausalLM + bitnet quantization (Falcon3-1.58bit style)",
        }
    }
}

/// The architecture of a BitNet b1.58 model, read from config.json and checked for consistency.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub variant: WeightVariant,
    /// FFN activation (config.json's `hidden_act`; GGUF: from the architecture name).
    pub activation: FfnActivation,
    /// Whether each layer RMS-normalizes the attention output before o_proj and the gated FFN
    /// product before down_proj (`attn_sub_norm`, `ffn_sub_norm`): BitNet 2B4T and llama.cpp's
    /// `bitnet` architecture do, the LLaMA-style family does not.
    pub sub_norms: bool,
    pub family: ModelFamily,
}

impl ModelConfig {
    /// The exact shape of microsoft/bitnet-b1.58-2B-4T.
    pub fn bitnet_2b4t() -> Self {
        ModelConfig {
            hidden_size: 2560,
            intermediate_size: 6912,
            num_hidden_layers: 30,
            num_attention_heads: 20,
            num_key_value_heads: 5,
            head_dim: 128,
            vocab_size: 128256,
            max_position_embeddings: 4096,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001, 128009],
            variant: WeightVariant::PackedAutoBitLinear,
            activation: FfnActivation::Relu2,
            sub_norms: true,
            family: ModelFamily::BitNet,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BitnetError::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| BitnetError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses and validates; the error string names the key at fault.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if !v.is_object() {
            return Err("the top level is not a JSON object".into());
        }
        // every field is lenient (see RawConfig), so an object always reads
        let raw: RawConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
        raw.validate()
    }

    /// Width of the concatenated query heads: `[n_heads * head_dim]`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads: `[n_kv_heads * head_dim]`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Ternary weights in the 7 projections of all layers.
    pub fn ternary_params(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let (q, kv) = (self.q_dim() as u64, self.kv_dim() as u64);
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        per_layer * self.num_hidden_layers as u64
    }

    /// Float parameters: embedding, untied head, norms.
    pub fn float_params(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let emb = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        let per_layer = if self.sub_norms { 3 * h + i } else { 2 * h };
        let norms = self.num_hidden_layers as u64 * per_layer + h;
        emb + head + norms
    }

    /// Bytes of KV cache per position of context (f32 keys and values, all layers).
    pub fn kv_bytes_per_position(&self) -> u64 {
        (self.num_hidden_layers * 2 * self.kv_dim() * std::mem::size_of::<f32>()) as u64
    }
}

/// config.json as written: the keys this runtime reads, before any check. Numbers, ids and
/// flags stay JSON values so that [`RawConfig::validate`] names the key at fault in its own
/// words; a string of another type reads as absent (its default), and so does a key of a nested
/// object that is not one.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    #[serde(deserialize_with = "lenient_str")]
    model_type: Option<String>,
    #[serde(deserialize_with = "present")]
    hidden_size: Option<Value>,
    #[serde(deserialize_with = "present")]
    intermediate_size: Option<Value>,
    #[serde(deserialize_with = "present")]
    num_hidden_layers: Option<Value>,
    #[serde(deserialize_with = "present")]
    num_attention_heads: Option<Value>,
    #[serde(deserialize_with = "present")]
    num_key_value_heads: Option<Value>,
    #[serde(deserialize_with = "present")]
    head_dim: Option<Value>,
    #[serde(deserialize_with = "present")]
    vocab_size: Option<Value>,
    #[serde(deserialize_with = "present")]
    max_position_embeddings: Option<Value>,
    #[serde(deserialize_with = "lenient_str")]
    hidden_act: Option<String>,
    #[serde(deserialize_with = "present")]
    rope_theta: Option<Value>,
    /// transformers 5.x: `{rope_type, rope_theta}`; `None` when absent, `Some(None)` when null.
    #[serde(deserialize_with = "nullable_object")]
    rope_parameters: Option<Option<RawRope>>,
    /// transformers 4.x's name for the same, read when `rope_parameters` is absent.
    #[serde(deserialize_with = "nullable_object")]
    rope_scaling: Option<Option<RawRope>>,
    #[serde(deserialize_with = "present")]
    rms_norm_eps: Option<Value>,
    #[serde(deserialize_with = "present")]
    tie_word_embeddings: Option<Value>,
    #[serde(deserialize_with = "present")]
    bos_token_id: Option<Value>,
    /// One id or a list of them.
    #[serde(deserialize_with = "present")]
    eos_token_id: Option<Value>,
    #[serde(deserialize_with = "nullable_object")]
    quantization_config: Option<Option<RawQuantization>>,
    /// LlamaConfig: biases on q/k/v/o and on the MLP projections (none in the BitNet LLaMAs).
    #[serde(deserialize_with = "present")]
    attention_bias: Option<Value>,
    #[serde(deserialize_with = "present")]
    mlp_bias: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRope {
    #[serde(deserialize_with = "lenient_str")]
    rope_type: Option<String>,
    /// The older name of `rope_type`.
    #[serde(rename = "type", deserialize_with = "lenient_str")]
    kind: Option<String>,
    #[serde(deserialize_with = "present")]
    rope_theta: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQuantization {
    #[serde(deserialize_with = "lenient_str")]
    quant_method: Option<String>,
    #[serde(deserialize_with = "lenient_str")]
    linear_class: Option<String>,
    #[serde(deserialize_with = "lenient_str")]
    quantization_mode: Option<String>,
    /// transformers' BitLinear option: an RMSNorm inside every projection (not implemented).
    #[serde(deserialize_with = "present")]
    use_rms_norm: Option<Value>,
    /// Linear layers left unquantized; only the LM head may be (it always is here).
    #[serde(deserialize_with = "present")]
    modules_to_not_convert: Option<Value>,
}

/// A key that is there, null included (`Some(Value::Null)`); an absent key is the default `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A string, or `None` for any other type.
fn lenient_str<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    Ok(Value::deserialize(d)?.as_str().map(str::to_owned))
}

/// A nested object that is there: `Some(None)` when null, every key absent when not an object.
fn nullable_object<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    Ok(Some(match Value::deserialize(d)? {
        Value::Null => None,
        v @ Value::Object(_) => Some(serde_json::from_value(v).map_err(D::Error::custom)?),
        _ => Some(T::default()),
    }))
}

/// A required size: a positive integer up to 2³¹.
fn usize_key(key: &str, val: Option<&Value>) -> std::result::Result<usize, String> {
    let val = val.ok_or_else(|| format!("missing key {key:?}"))?;
    let n = val
        .as_u64()
        .ok_or_else(|| format!("{key:?} must be a non-negative integer, found {val}"))?;
    if n == 0 || n > (1 << 31) {
        return Err(format!("{key:?} = {n} is out of range"));
    }
    Ok(n as usize)
}

/// A positive finite number.
fn f32_key(val: &Value, key: &str) -> std::result::Result<f32, String> {
    let x = val
        .as_f64()
        .ok_or_else(|| format!("{key:?} must be a number, found {val}"))?;
    if !x.is_finite() || x <= 0.0 {
        return Err(format!("{key:?} = {x} must be a positive finite number"));
    }
    Ok(x as f32)
}

/// An optional size: absent and null mean the default.
fn usize_or(key: &str, val: Option<&Value>, default: usize) -> std::result::Result<usize, String> {
    match val {
        Some(Value::Null) | None => Ok(default),
        Some(_) => usize_key(key, val),
    }
}

impl RawConfig {
    /// The checks and defaults of [`ModelConfig::from_json_str`]: each error names the key at
    /// fault.
    fn validate(self) -> std::result::Result<ModelConfig, String> {
        let family = match self.model_type.as_deref().unwrap_or("bitnet") {
            "bitnet" => ModelFamily::BitNet,
            "llama" => ModelFamily::Llama,
            other => {
                return Err(format!(
                    "model_type is {other:?}; this runtime reads BitNet b1.58 models (model_type \"bitnet\", or \"llama\" with a bitnet quantization_config)"
                ))
            }
        };
        if family == ModelFamily::Llama {
            // LlamaConfig defaults both to false; a bias would be added after every projection.
            for (key, val) in [
                ("attention_bias", &self.attention_bias),
                ("mlp_bias", &self.mlp_bias),
            ] {
                match val {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                    Some(v) => {
                        return Err(format!(
                            "unsupported {key} = {v}: the ternary projections have no bias"
                        ))
                    }
                }
            }
        }
        let hidden_size = usize_key("hidden_size", self.hidden_size.as_ref())?;
        let intermediate_size = usize_key("intermediate_size", self.intermediate_size.as_ref())?;
        let num_hidden_layers = usize_key("num_hidden_layers", self.num_hidden_layers.as_ref())?;
        let num_attention_heads =
            usize_key("num_attention_heads", self.num_attention_heads.as_ref())?;
        let num_key_value_heads = usize_or(
            "num_key_value_heads",
            self.num_key_value_heads.as_ref(),
            num_attention_heads,
        )?;
        let head_dim = match self.head_dim {
            Some(Value::Null) | None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(ref v) => usize_key("head_dim", Some(v))?,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even for RoPE"));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        let vocab_size = usize_key("vocab_size", self.vocab_size.as_ref())?;
        let max_position_embeddings = usize_key(
            "max_position_embeddings",
            self.max_position_embeddings.as_ref(),
        )?;

        // transformers computes ACT2FN[hidden_act] in both MLPs; the defaults are each class's.
        let default_act = match family {
            ModelFamily::BitNet => "relu2",
            ModelFamily::Llama => "silu",
        };
        let activation = match self.hidden_act.as_deref().unwrap_or(default_act) {
            "relu2" => FfnActivation::Relu2,
            "silu" => FfnActivation::Silu,
            other => {
                return Err(format!(
                    "unsupported hidden_act {other:?}: the FFN computes \"relu2\" (relu(x)^2, BitNet b1.58) or \"silu\" (LLaMA-style)"
                ))
            }
        };

        // rope_theta sits at the top level in transformers 4.x configs and under rope_parameters
        // (with rope_type) in 5.x. Only the default (unscaled) RoPE is what BitNet uses.
        let rope_params = self.rope_parameters.or(self.rope_scaling).flatten();
        if let Some(rp) = &rope_params {
            let rope_type = rp
                .rope_type
                .as_deref()
                .or(rp.kind.as_deref())
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(format!(
                    "unsupported RoPE type {rope_type:?}: only the default (unscaled) rotary embedding is implemented"
                ));
            }
        }
        let nested_theta = rope_params.and_then(|rp| rp.rope_theta);
        let rope_theta = match (&self.rope_theta, &nested_theta) {
            (Some(v), _) if !v.is_null() => f32_key(v, "rope_theta")?,
            (_, Some(v)) => f32_key(v, "rope_parameters.rope_theta")?,
            _ => 10000.0,
        };
        let rms_norm_eps = match &self.rms_norm_eps {
            Some(v) => f32_key(v, "rms_norm_eps")?,
            None => 1e-6,
        };
        // transformers' BitNetConfig defaults to untied: without the key, lm_head.weight must exist.
        let tie_word_embeddings = match self.tie_word_embeddings {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(format!("tie_word_embeddings must be a bool, found {v}")),
        };

        let token_id = |v: &Value, key: &str| -> std::result::Result<u32, String> {
            v.as_u64()
                .filter(|&id| (id as usize) < vocab_size)
                .map(|id| id as u32)
                .ok_or_else(|| {
                    format!("{key:?} = {v} is not a token id below vocab_size {vocab_size}")
                })
        };
        let bos_token_id = match &self.bos_token_id {
            None | Some(Value::Null) => None,
            Some(v) => Some(token_id(v, "bos_token_id")?),
        };
        let eos_token_ids = match &self.eos_token_id {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| token_id(v, "eos_token_id"))
                .collect::<std::result::Result<_, _>>()?,
            Some(v) => vec![token_id(v, "eos_token_id")?],
        };

        let variant = match self.quantization_config.flatten() {
            // No quantization_config: transformers would build plain nn.Linear layers, which is
            // not a BitNet b1.58 checkpoint this runtime understands (for model_type llama: a
            // plain float LLaMA).
            None => {
                return Err(
                    "no quantization_config: expected {\"quant_method\": \"bitnet\", ...} as in the BitNet b1.58 repos"
                        .into(),
                )
            }
            Some(qc) => {
                let method = qc.quant_method.as_deref().unwrap_or("");
                if method != "bitnet" {
                    return Err(format!(
                        "quantization_config.quant_method is {method:?}, expected \"bitnet\""
                    ));
                }
                match &qc.use_rms_norm {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                    Some(v) => {
                        return Err(format!(
                            "unsupported quantization_config.use_rms_norm = {v}: an RMSNorm inside every BitLinear is not implemented"
                        ))
                    }
                }
                // transformers always leaves the output embedding (lm_head) unquantized; any
                // other module listed here would be a float projection, which is not supported.
                match &qc.modules_to_not_convert {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(mods)) => {
                        // (the embedding is no Linear, so naming it changes nothing either)
                        let harmless = ["lm_head", "model.embed_tokens", "embed_tokens"];
                        if let Some(m) = mods
                            .iter()
                            .find(|m| !m.as_str().is_some_and(|m| harmless.contains(&m)))
                        {
                            return Err(format!(
                                "unsupported quantization_config.modules_to_not_convert entry {m}: only lm_head may stay unquantized"
                            ));
                        }
                    }
                    Some(v) => {
                        return Err(format!(
                            "quantization_config.modules_to_not_convert must be a list, found {v}"
                        ))
                    }
                }
                let class = qc.linear_class.as_deref().unwrap_or("bitlinear");
                let mode = qc.quantization_mode.as_deref().unwrap_or("offline");
                match (class, mode) {
                    (_, "online") => WeightVariant::OnlineMaster,
                    ("autobitlinear", "offline") => WeightVariant::PackedAutoBitLinear,
                    ("bitlinear", "offline") => WeightVariant::PackedBitLinear,
                    (c, "offline") => {
                        return Err(format!(
                            "unknown quantization_config.linear_class {c:?} (expected \"autobitlinear\" or \"bitlinear\")"
                        ))
                    }
                    (_, m) => {
                        return Err(format!(
                            "unknown quantization_config.quantization_mode {m:?} (expected \"offline\" or \"online\")"
                        ))
                    }
                }
            }
        };

        for (name, dim) in [
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
        ] {
            if variant != WeightVariant::OnlineMaster && !dim.is_multiple_of(4) {
                return Err(format!(
                    "{name} {dim} is not a multiple of 4, so it cannot be a packed output dimension"
                ));
            }
        }
        if !(num_attention_heads * head_dim).is_multiple_of(4)
            || !(num_key_value_heads * head_dim).is_multiple_of(4)
        {
            return Err("attention projection sizes must be multiples of 4".into());
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
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            variant,
            activation,
            sub_norms: family == ModelFamily::BitNet,
            family,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        serde_json::from_str(
            r#"{"model_type":"bitnet","hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,"max_position_embeddings":128,
            "rope_theta":10000.0,"rms_norm_eps":1e-5,"hidden_act":"relu2","bos_token_id":0,"eos_token_id":[1,2],
            "quantization_config":{"quant_method":"bitnet","linear_class":"autobitlinear","quantization_mode":"offline"}}"#,
        )
        .unwrap()
    }

    fn parse(m: &serde_json::Map<String, Value>) -> std::result::Result<ModelConfig, String> {
        ModelConfig::from_json_str(&Value::Object(m.clone()).to_string())
    }

    #[test]
    fn parses_variants_and_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.variant, WeightVariant::PackedAutoBitLinear);
        let mut m = base();
        m["quantization_config"] = serde_json::json!({"quant_method": "bitnet"});
        assert_eq!(parse(&m).unwrap().variant, WeightVariant::PackedBitLinear);
        m["quantization_config"] = serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"});
        assert_eq!(parse(&m).unwrap().variant, WeightVariant::OnlineMaster);
    }

    #[test]
    fn rope_theta_under_rope_parameters() {
        let mut m = base();
        m.remove("rope_theta");
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 500000.0}),
        );
        assert_eq!(parse(&m).unwrap().rope_theta, 500000.0);
    }

    #[test]
    fn rejects_unknown_act_rope_and_class() {
        let mut m = base();
        m["hidden_act"] = "gelu".into();
        assert!(parse(&m).unwrap_err().contains("hidden_act"));
        let mut m = base();
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
        assert!(parse(&m).unwrap_err().contains("yarn"));
        let mut m = base();
        m["quantization_config"]["linear_class"] = "superlinear".into();
        assert!(parse(&m).unwrap_err().contains("superlinear"));
        let mut m = base();
        m["num_key_value_heads"] = 3.into();
        assert!(parse(&m).unwrap_err().contains("num_key_value_heads"));
        let mut m = base();
        m.remove("hidden_size");
        assert!(parse(&m).unwrap_err().contains("hidden_size"));
        let mut m = base();
        m["eos_token_id"] = 999.into();
        assert!(parse(&m).unwrap_err().contains("eos_token_id"));
    }

    #[test]
    fn null_and_mistyped_keys_read_as_before_the_raw_struct() {
        // a null required size is named with its value, not reported missing
        let mut m = base();
        m["hidden_size"] = Value::Null;
        let err = parse(&m).unwrap_err();
        assert!(
            err.contains("\"hidden_size\" must be a non-negative integer, found null"),
            "{err}"
        );
        // a string key of another type reads as its default
        let mut m = base();
        m["hidden_act"] = 5.into();
        assert!(parse(&m).is_ok());
        // a null num_key_value_heads means "as many as the query heads"
        let mut m = base();
        m["num_key_value_heads"] = Value::Null;
        assert_eq!(parse(&m).unwrap().num_key_value_heads, 4);
        // a quantization_config that is not an object has no quant_method
        let mut m = base();
        m["quantization_config"] = "bitnet".into();
        assert!(parse(&m).unwrap_err().contains("quant_method is \"\""));
        // rope_parameters null: rope_scaling is not read in its place
        let mut m = base();
        m.insert("rope_parameters".into(), Value::Null);
        m.insert("rope_scaling".into(), serde_json::json!({"type": "yarn"}));
        assert!(parse(&m).is_ok());
        assert_eq!(
            ModelConfig::from_json_str("[1, 2]").unwrap_err(),
            "the top level is not a JSON object"
        );
        assert!(ModelConfig::from_json_str("{")
            .unwrap_err()
            .starts_with("not valid JSON"));
    }

    /// Falcon3-1.58bit's config.json form (trimmed to a tiny shape).
    fn falcon3() -> serde_json::Map<String, Value> {
        serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":256,
            "intermediate_size":512,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "head_dim":128,"vocab_size":380,"max_position_embeddings":128,"rope_theta":1000042.0,
            "rms_norm_eps":1e-6,"hidden_act":"silu","attention_bias":false,"mlp_bias":false,
            "pretraining_tp":1,"rope_scaling":null,"tie_word_embeddings":false,"bos_token_id":377,
            "eos_token_id":378,"quantization_config":{"modules_to_not_convert":null,"quant_method":"bitnet"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn llama_with_bitnet_quantization_is_the_silu_family_without_sub_norms() {
        let c = parse(&falcon3()).unwrap();
        assert_eq!(c.family, ModelFamily::Llama);
        assert_eq!(c.activation, FfnActivation::Silu);
        assert!(!c.sub_norms);
        assert!(!c.tie_word_embeddings);
        // linear_class defaults to bitlinear: the stored weight_scale divides
        assert_eq!(c.variant, WeightVariant::PackedBitLinear);
        // head_dim as given, not hidden / heads
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (128, 512, 256));
        assert_eq!(c.rope_theta, 1000042.0);
        let mut m = falcon3();
        m["quantization_config"] = serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "modules_to_not_convert": ["lm_head"]});
        assert_eq!(
            parse(&m).unwrap().variant,
            WeightVariant::PackedAutoBitLinear
        );
        // hidden_act defaults to silu for llama, relu2 for bitnet
        m.remove("hidden_act");
        assert_eq!(parse(&m).unwrap().activation, FfnActivation::Silu);
        let b = parse(&base()).unwrap();
        assert_eq!(
            (b.family, b.activation, b.sub_norms),
            (ModelFamily::BitNet, FfnActivation::Relu2, true)
        );
        // the float params count no sub-norms: 2 norms per layer + final norm + embedding + head
        assert_eq!(c.float_params(), 2 * (2 * 256) + 256 + 2 * 380 * 256);
    }

    #[test]
    fn llama_refusals_name_the_field() {
        let cases: [(&str, Value, &str); 7] = [
            ("quantization_config", Value::Null, "no quantization_config"),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "gptq"}),
                "quantization_config.quant_method",
            ),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "bitnet", "use_rms_norm": true}),
                "quantization_config.use_rms_norm",
            ),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "bitnet", "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}),
                "quantization_config.modules_to_not_convert",
            ),
            ("attention_bias", Value::Bool(true), "attention_bias"),
            ("mlp_bias", Value::Bool(true), "mlp_bias"),
            ("hidden_act", "gelu".into(), "hidden_act"),
        ];
        for (key, val, want) in cases {
            let mut m = falcon3();
            m.insert(key.into(), val);
            let err = parse(&m).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let mut m = falcon3();
        m.remove("quantization_config");
        assert!(parse(&m).unwrap_err().contains("quantization_config"));
        let mut m = falcon3();
        m["model_type"] = "mistral".into();
        assert!(parse(&m).unwrap_err().contains("model_type"));
    }

    #[test]
    fn param_count_of_2b4t() {
        let c = ModelConfig::bitnet_2b4t();
        // 2.084 B ternary weights (spec), 328 M embedding.
        assert_eq!(c.ternary_params(), 2_084_044_800);
        assert_eq!(c.vocab_size as u64 * c.hidden_size as u64, 328_335_360);
    }
}
