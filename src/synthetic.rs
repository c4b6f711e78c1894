//! Random models of real shapes, built in memory: anyone can measure the real 2B4T workload
//! (speed, memory) without downloading 1.2 GB. Weights are random ternary codes (never code 3),
//! scales and norms plausible, the embedding small random bf16 values.

use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::{ModelConfig, WeightVariant};
use crate::error::{BitnetError, Result};
use crate::load::{FloatDtype, FloatMatrix, LayerWeights, ModelWeights};
use crate::ternary::{ByteStorage, TernaryMatrix};

/// Named shapes: `2b4t` (microsoft/bitnet-b1.58-2B-4T), `large` (1bitLLM bitnet_b1_58-large,
/// 0.7 B), `tiny` (for quick runs).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let base = ModelConfig::bitnet_2b4t();
    match name {
        "2b4t" | "2B4T" => Ok(base),
        "large" | "700m" => Ok(ModelConfig {
            hidden_size: 1536,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            head_dim: 96,
            vocab_size: 32002,
            max_position_embeddings: 2048,
            rope_theta: 10000.0,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            ..base
        }),
        "tiny" => Ok(ModelConfig {
            hidden_size: 256,
            intermediate_size: 768,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 64,
            vocab_size: 4096,
            max_position_embeddings: 1024,
            rope_theta: 10000.0,
            bos_token_id: Some(0),
            eos_token_ids: vec![1],
            ..base
        }),
        other => Err(BitnetError::InvalidArgument(format!(
            "unknown synthetic preset {other:?} (expected 2b4t, large or tiny)"
        ))),
    }
}

/// Valid packed bytes: each 2-bit field of a random byte taken mod 3.
fn ternary_byte_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    for (b, out) in t.iter_mut().enumerate() {
        for i in 0..4 {
            *out |= ((((b >> (2 * i)) & 3) % 3) as u8) << (2 * i);
        }
    }
    t
}

fn random_bytes(len: usize, seed: u64, map: impl Fn(u8) -> u8 + Sync) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // Independent streams per 1 MiB chunk, so filling 1.2 GB is parallel and still seeded.
    v.par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((i as u64 + 1) << 20));
        rng.fill_bytes(c);
        for b in c.iter_mut() {
            *b = map(*b);
        }
    });
    v
}

/// Builds random weights for `config` (packed autobitlinear variant).
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<ModelWeights> {
    let mut c = config.clone();
    c.variant = WeightVariant::PackedAutoBitLinear;
    let table = ternary_byte_table();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut k = 0u64;
    let mut lin = |name: String, rows: usize, cols: usize| -> Result<TernaryMatrix> {
        k += 1;
        let bytes = random_bytes(rows / 4 * cols, seed.wrapping_add(k), |b| table[b as usize]);
        // Scale ~1/sqrt(fan-in · 2/3) keeps activations O(1) through the layers.
        let scale = (1.5 / cols as f32).sqrt();
        TernaryMatrix::new(name, rows, cols, ByteStorage::Owned(Arc::new(bytes)), scale)
    };
    let ones = |n: usize| vec![1.0f32; n];
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        layers.push(LayerWeights {
            input_norm: ones(h),
            post_attn_norm: ones(h),
            attn_sub_norm: c.sub_norms.then(|| ones(h)),
            ffn_sub_norm: c.sub_norms.then(|| ones(i)),
            q_proj: lin(format!("{p}self_attn.q_proj.weight"), c.q_dim(), h)?,
            k_proj: lin(format!("{p}self_attn.k_proj.weight"), c.kv_dim(), h)?,
            v_proj: lin(format!("{p}self_attn.v_proj.weight"), c.kv_dim(), h)?,
            o_proj: lin(format!("{p}self_attn.o_proj.weight"), h, c.q_dim())?,
            gate_proj: lin(format!("{p}mlp.gate_proj.weight"), i, h)?,
            up_proj: lin(format!("{p}mlp.up_proj.weight"), i, h)?,
            down_proj: lin(format!("{p}mlp.down_proj.weight"), h, i)?,
        });
    }
    // bf16 embedding with |values| in [2^-7, 2^-3): random sign, mantissa and one of 4 exponents.
    let emb = random_bytes(c.vocab_size * h * 2, seed ^ 0xE3B, |b| b);
    let emb: Vec<u8> = emb
        .par_chunks_exact(2)
        .flat_map_iter(|p| {
            let mant = (p[0] & 0x7F) as u16;
            let sign = ((p[1] >> 7) as u16) << 15;
            let exp = (120 + (p[1] as u16 & 3)) << 7;
            (sign | exp | mant).to_le_bytes()
        })
        .collect();
    Ok(ModelWeights {
        embed_tokens: FloatMatrix {
            name: "model.embed_tokens.weight".into(),
            rows: c.vocab_size,
            cols: h,
            dtype: FloatDtype::Bf16,
            data: ByteStorage::Owned(Arc::new(emb)),
        },
        lm_head: None,
        final_norm: ones(h),
        layers,
        config: c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ternary::find_code3;

    #[test]
    fn presets_have_the_published_shapes() {
        let c = preset("2b4t").unwrap();
        assert_eq!(c, ModelConfig::bitnet_2b4t());
        assert_eq!(c.ternary_params(), 2_084_044_800);
        assert!(preset("nope").is_err());
    }

    #[test]
    fn random_weights_are_valid_and_shaped() {
        let c = preset("tiny").unwrap();
        let w = random_weights(&c, 1).unwrap();
        assert_eq!(w.layers.len(), 4);
        let q = &w.layers[0].q_proj;
        assert_eq!((q.rows, q.cols), (256, 256));
        assert_eq!(find_code3(q.packed.as_slice()), None);
        assert_eq!(w.embed_tokens.bytes(), 4096 * 256 * 2);
        let mut row = vec![0f32; 256];
        w.embed_tokens.row_f32(7, &mut row);
        assert!(
            row.iter()
                .all(|v| v.abs() < 0.125 && v.abs() >= 1.0 / 128.0),
            "{row:?}"
        );
    }
}
