//! Entry points for the untrusted-input parsers, shared by the `cargo fuzz` targets (`fuzz/`) and
//! the stable corpus replay test (`tests/fuzz_replay.rs`), so that CI re-runs every saved input
//! through exactly the code that was fuzzed. Each function takes arbitrary bytes; errors are the
//! expected outcome, and any panic, abort or hang is a bug.

use std::path::Path;

use crate::config::ModelConfig;
use crate::model::ModelOptions;
use crate::tokenizer::{render_chat_template_in_process, ChatMessage, Tokenizer};

/// A packed (autobitlinear) config small enough that a whole valid checkpoint is a few KiB: the
/// fuzzer then reaches the tensor-table checks instead of spending its time on megabytes.
pub const PACKED_CONFIG: &str = r#"{"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 6, "max_position_embeddings": 16,
 "tie_word_embeddings": true, "eos_token_id": 5,
 "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"}}"#;

/// The same shape with bf16 master weights, untied (the other loader path: ternarize at load).
pub const ONLINE_CONFIG: &str = r#"{"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 6, "max_position_embeddings": 16,
 "tie_word_embeddings": false,
 "quantization_config": {"quant_method": "bitnet", "quantization_mode": "online"}}"#;

/// `model.safetensors` bytes, checked against both small configs.
pub fn safetensors(data: &[u8]) {
    for config in [PACKED_CONFIG, ONLINE_CONFIG] {
        let config = ModelConfig::from_json_str(config).expect("built-in config");
        if let Ok(w) =
            crate::load::load_weights_from_bytes(data, Path::new("fuzz.safetensors"), &config)
        {
            // A checkpoint that loads must be usable: touch what the forward pass reads first.
            let mut row = vec![0f32; w.embed_tokens.cols];
            for r in 0..w.embed_tokens.rows {
                w.head().row_f32(r, &mut row);
            }
            let _ = w.ternary_bytes();
        }
    }
}

/// `config.json` bytes: parsed, then every size derived from it (as `info` and the loaders do).
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // What the loaders accept (load_weights checks the sizes first) must not overflow anything
    // derived from it.
    let config = ModelConfig::from_json_str(text).ok();
    if let Some(c) = config.filter(|c| crate::load::check_config_sizes(c).is_ok()) {
        let o = ModelOptions::for_config(&c);
        let _ = (c.q_dim(), c.kv_dim(), c.ternary_params(), c.float_params());
        let _ = c.kv_bytes_per_position();
        let _ = crate::backend::wgpu::estimate_memory(&c, &o, 2).total();
    }
}

/// Splits `data` at NUL bytes (which JSON and templates never contain unescaped).
fn parts(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == 0).collect()
}

/// `tokenizer.json` NUL `tokenizer_config.json` NUL text: load, encode, decode, stream, chat.
pub fn tokenizer(data: &[u8]) {
    let p = parts(data);
    let json = p[0];
    let config = p.get(1).filter(|c| !c.is_empty());
    let text = p
        .get(2)
        .map(|t| String::from_utf8_lossy(t))
        .unwrap_or_default();
    let Ok(tok) = Tokenizer::from_bytes(
        Path::new("tokenizer.json"),
        json,
        config.map(|c| (Path::new("tokenizer_config.json"), *c)),
    ) else {
        return;
    };
    if let Ok(ids) = tok.encode(&text, true) {
        let _ = tok.decode(&ids);
        let mut stream = crate::tokenizer::StreamDecoder::default();
        for &id in &ids {
            let _ = stream.push(&tok, id);
        }
        let _ = stream.finish(&tok);
    }
    let _ = tok.encode_chat(&[ChatMessage::new("user", &text)], true);
}

/// A chat template NUL role NUL content NUL role NUL content ...: rendered as `--chat` does.
pub fn chat_template(data: &[u8]) {
    let p = parts(data);
    let Ok(template) = std::str::from_utf8(p[0]) else {
        return;
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let messages: Vec<ChatMessage> = p[1..]
        .chunks(2)
        .map(|m| ChatMessage {
            role: text(m[0]),
            content: m.get(1).map(|c| text(c)).unwrap_or_default(),
        })
        .collect();
    let _ = render_chat_template_in_process(template, "<s>", "</s>", &messages, true);
}

/// GGUF bytes: the container parser (`gguf::GgufHeader::parse`), then every metadata accessor
/// and every tensor's byte range, as the GGUF loader uses them.
pub fn gguf(data: &[u8]) {
    if let Ok(h) = crate::gguf::GgufHeader::parse(data) {
        for (k, _) in &h.metadata {
            let _ = (h.get_str(k), h.get_u64(k), h.get_f64(k), h.get_array(k));
        }
        for t in &h.tensors {
            // The parser promised these bounds: slicing must not panic.
            let bytes = &data[t.start..t.start + t.len];
            std::hint::black_box((bytes.first(), t.n_elements()));
        }
    }
}

/// A valid `model.safetensors` for [`PACKED_CONFIG`] (`online: false`) or [`ONLINE_CONFIG`]:
/// the fuzz corpus seeds, and the base the property tests mutate into valid-looking headers.
pub fn seed_checkpoint(online: bool) -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let (h, i, q, kv, vocab) = (8usize, 12usize, 8usize, 4usize, 6usize);
    let bf16 = |n: usize, seed: u32| -> Vec<u8> {
        (0..n)
            .flat_map(|k| {
                let x = ((k as u32 * 7 + seed) % 13) as f32 / 8.0 - 0.75;
                ((x.to_bits() >> 16) as u16).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            Dtype::BF16,
            vec![vocab, h],
            bf16(vocab * h, 1),
        ),
        ("model.norm.weight".into(), Dtype::BF16, vec![h], bf16(h, 2)),
    ];
    if online {
        tensors.push((
            "lm_head.weight".into(),
            Dtype::BF16,
            vec![vocab, h],
            bf16(vocab * h, 3),
        ));
    }
    let p = "model.layers.0.";
    for (name, n) in [
        ("input_layernorm", h),
        ("post_attention_layernorm", h),
        ("self_attn.attn_sub_norm", h),
        ("mlp.ffn_sub_norm", i),
    ] {
        tensors.push((
            format!("{p}{name}.weight"),
            Dtype::BF16,
            vec![n],
            bf16(n, 4),
        ));
    }
    for (k, (name, rows, cols)) in [
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]
    .into_iter()
    .enumerate()
    {
        let w = format!("{p}{name}.weight");
        if online {
            tensors.push((
                w,
                Dtype::BF16,
                vec![rows, cols],
                bf16(rows * cols, k as u32),
            ));
        } else {
            // Codes 2, 0, 1, 2 (+1, -1, 0, +1): four rows per byte, no invalid code 3.
            tensors.push((
                w,
                Dtype::U8,
                vec![rows / 4, cols],
                vec![0b1001_0010; rows / 4 * cols],
            ));
            let scale = (0.5f32 + k as f32 / 8.0).to_le_bytes().to_vec();
            tensors.push((
                format!("{p}{name}.weight_scale"),
                Dtype::F32,
                vec![1],
                scale,
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("consistent"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serializable")
}

/// A `bitnet serve` request body: the first byte picks the endpoint (even: chat completions, odd:
/// completions), the rest is the body, put through everything the server does before queueing
/// (`serve::api::prepare`: parse, field checks, chat rendering, tokenizing, the context check)
/// with the tiny fixture's tokenizer and a 64-token context; every error must serialize.
pub fn serve_request(data: &[u8]) {
    use crate::serve::api::{prepare, Endpoint};
    use std::sync::OnceLock;
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-autobitlinear");
        Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .expect("the fixture tokenizer loads")
    });
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let endpoint = if first % 2 == 0 {
        Endpoint::Chat
    } else {
        Endpoint::Completion
    };
    match prepare(endpoint, body, tok, 64) {
        Ok((params, prompt)) => {
            assert!(!prompt.is_empty() && prompt.len() <= 64);
            assert!(params.stop.len() <= 4);
        }
        Err(e) => {
            assert!((400..500).contains(&e.status), "{e:?}");
            let _ = serde_json::to_vec(&e.body()).expect("an error body serializes");
        }
    }
}
