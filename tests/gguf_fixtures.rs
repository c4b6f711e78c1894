//! GGUF models against the same model as a safetensors folder and against the float64 reference
//! (tests/fixtures/gguf-tiny, made by tools/gguf/make_fixtures.py): TQ2_0 written by the `gguf`
//! package (llama.cpp architecture name `bitnet`), TQ1_0 (bitnet.cpp's `bitnet-25`), I2_S in
//! bitnet.cpp's x86 layout (`bitnet-b1.58`). All three hold exactly the codes, scales, norms and
//! embedding values of the safetensors folder.

mod common;

use std::path::PathBuf;

use bitnet_wgpu::config::{FfnActivation, ModelFamily};
use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, HeadFormat};
use bitnet_wgpu::error::BitnetError;
use bitnet_wgpu::gguf::{GgufOptions, I2sLayout};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};
use bitnet_wgpu::tokenizer::ChatMessage;
use common::*;

const DIR: &str = "gguf-tiny";

fn path(file: &str) -> PathBuf {
    fixture(DIR).join(file)
}

fn engine(p: &std::path::Path, gguf: GgufOptions) -> Result<Engine, BitnetError> {
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        threads: 2,
        gguf,
        ..Default::default()
    };
    Engine::load(p, &opts)
}

fn relu2() -> GgufOptions {
    GgufOptions {
        activation: Some(FfnActivation::Relu2),
        ..Default::default()
    }
}

fn prompt() -> Vec<u32> {
    ids(&reference(DIR)["prompt_ids"])
}

#[test]
fn safetensors_folder_matches_the_float64_reference() {
    // The folder side of the comparison: same tolerance as tests/fixtures_cpu.rs.
    let (shape, want) = bitnet_wgpu::npy::read_f32(&path("logits.npy")).unwrap();
    let mut e = engine(&fixture(DIR), GgufOptions::default()).unwrap();
    assert_eq!(shape, vec![prompt().len(), e.config.vocab_size]);
    let got = e.logits(&prompt()).unwrap();
    assert_close("safetensors vs reference", &got, &want, 1e-4, 1e-4);
}

#[test]
fn every_gguf_gives_the_logits_of_the_safetensors_folder() {
    let want = engine(&fixture(DIR), GgufOptions::default())
        .unwrap()
        .logits(&prompt())
        .unwrap();
    let (_, reference) = bitnet_wgpu::npy::read_f32(&path("logits.npy")).unwrap();
    for file in ["model-tq2_0.gguf", "model-tq1_0.gguf", "model-i2_s.gguf"] {
        let mut e = engine(&path(file), relu2()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let got = e.logits(&prompt()).unwrap();
        // Same codes, scales and embedding values, so every integer path is identical. The
        // TQ2_0 file keeps the embedding in bf16 like the folder: bit-identical logits. The
        // others hold it as Q8_0 (decoded by row) and f16, which the tied head reads with other
        // kernels (another f32 summation order): ~1e-6 apart.
        let tol = if file == "model-tq2_0.gguf" {
            0.0
        } else {
            1e-5
        };
        assert_close(&format!("{file} vs safetensors"), &got, &want, tol, tol);
        assert_close(
            &format!("{file} vs reference"),
            &got,
            &reference,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn greedy_continuation_of_a_gguf_matches_the_reference() {
    let want = ids(&reference(DIR)["greedy_ids"]);
    let mut e = engine(&path("model-i2_s.gguf"), GgufOptions::default()).unwrap();
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let g = e
        .generate(&prompt(), want.len(), &mut s, true, |_| {})
        .unwrap();
    assert_eq!(g.token_ids, want);
}

#[test]
fn llama_cpp_bitnet_architecture_runs_silu_with_sub_norms_unless_overridden() {
    // llama.cpp's `bitnet` graph: sub-norms and a SiLU-gated FFN, whatever model the file came
    // from. This file holds a relu2 (2B4T-style) model, so its SiLU logits must differ from the
    // reference, and the override must give them back exactly.
    let mut e = engine(&path("model-tq2_0.gguf"), GgufOptions::default()).unwrap();
    assert_eq!(e.config.activation, FfnActivation::Silu);
    assert!(e.config.sub_norms);
    let g = e.files.gguf.as_ref().unwrap();
    assert_eq!(g.architecture, "bitnet");
    assert!(
        g.activation_source.contains("SiLU"),
        "{}",
        g.activation_source
    );
    let silu = e.logits(&prompt()).unwrap();
    let want = engine(&fixture(DIR), GgufOptions::default())
        .unwrap()
        .logits(&prompt())
        .unwrap();
    assert!(silu.iter().all(|v| v.is_finite()));
    assert!(
        silu.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-2),
        "SiLU and ReLU² logits must differ"
    );
    let mut e = engine(&path("model-tq2_0.gguf"), relu2()).unwrap();
    let g = e.files.gguf.as_ref().unwrap();
    assert!(
        g.activation_source.contains("override"),
        "{}",
        g.activation_source
    );
    assert_close(
        "relu2 override",
        &e.logits(&prompt()).unwrap(),
        &want,
        0.0,
        0.0,
    );
}

#[test]
fn llama_cpp_bitnet_architecture_matches_transformers_computing_silu_with_sub_norms() {
    // tests/fixtures/gguf-tiny-bitnet-silu: transformers' BitNetForCausalLM with hidden_act silu
    // on the gguf-tiny weights (sub-norms + SiLU-gated FFN, the graph llama.cpp runs for
    // `bitnet`), the reference for model-tq2_0.gguf loaded without an override.
    let name = "gguf-tiny-bitnet-silu";
    let r = reference(name);
    let prompt = ids(&r["prompt_ids"]);
    let (_, want) = bitnet_wgpu::npy::read_f32(&fixture(name).join("logits.npy")).unwrap();
    let mut e = engine(&path("model-tq2_0.gguf"), GgufOptions::default()).unwrap();
    let got = e.logits(&prompt).unwrap();
    assert_close("bitnet (silu) vs transformers", &got, &want, 1e-4, 1e-4);
    let want_ids = ids(&r["greedy_ids"]);
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let g = e
        .generate(&prompt, want_ids.len(), &mut s, true, |_| {})
        .unwrap();
    assert_eq!(g.token_ids, want_ids);
}

// ---- the LLaMA-style family (tests/fixtures/tiny-llama-bitnet, tools/fixtures/gen_llama_fixture.py)

const LLAMA: &str = "tiny-llama-bitnet";

#[test]
fn llama_ggufs_give_the_logits_of_the_safetensors_folder_and_of_transformers() {
    let r = reference(LLAMA);
    let prompt = ids(&r["prompt_ids"]);
    let (_, transformers) = bitnet_wgpu::npy::read_f32(&fixture(LLAMA).join("logits.npy")).unwrap();
    let folder = engine(&fixture(LLAMA), GgufOptions::default())
        .unwrap()
        .logits(&prompt)
        .unwrap();
    for file in ["model-tq2_0.gguf", "model-i2_s.gguf"] {
        let mut e = engine(&fixture(LLAMA).join(file), GgufOptions::default())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let c = &e.config;
        assert_eq!(c.family, ModelFamily::Llama, "{file}");
        assert_eq!(c.activation, FfnActivation::Silu, "{file}");
        assert!(!c.sub_norms && !c.tie_word_embeddings, "{file}");
        assert_eq!((c.head_dim, c.q_dim(), c.rope_theta), (128, 512, 1000042.0));
        let g = e.files.gguf.as_ref().unwrap();
        assert_eq!(g.architecture, "llama");
        // q and k of both layers were put back in transformers' row order
        assert!(
            g.conversions
                .contains(&"4 x q/k rows (llama.cpp permute) -> un-permuted".to_string()),
            "{:?}",
            g.conversions
        );
        let got = e.logits(&prompt).unwrap();
        // The same codes (the q/k rows un-permuted), scales, norms and embedding/head values:
        // every integer is identical. The TQ2_0 file keeps embedding and head in bf16 like the
        // folder, so its logits are bit-identical; the I2_S file holds them as f16, which the
        // head reads with another kernel (another f32 summation order).
        let tol = if file == "model-tq2_0.gguf" {
            0.0
        } else {
            1e-5
        };
        assert_close(&format!("{file} vs safetensors"), &got, &folder, tol, tol);
        assert_close(
            &format!("{file} vs transformers"),
            &got,
            &transformers,
            1e-4,
            1e-4,
        );
    }
    // greedy through the KV cache on the I2_S file
    let want = ids(&r["greedy_ids"]);
    let mut e = engine(
        &fixture(LLAMA).join("model-i2_s.gguf"),
        GgufOptions::default(),
    )
    .unwrap();
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let g = e
        .generate(&prompt, want.len(), &mut s, true, |_| {})
        .unwrap();
    assert_eq!(g.token_ids, want);
}

#[test]
fn llama_gguf_q_k_rows_are_unpermuted() {
    // Swap the file's rows 0 and 1 of attn_q (I2_S x86: row r is bytes [r·64, r·64 + 64) of the
    // 128-element blocks, 256 columns = 2 blocks = 64 bytes a row). They are rows 0 and 64 (d/2)
    // of head 0 in transformers' order: the logits must move, so the loader really maps them.
    let file = "model-i2_s.gguf";
    let mut bytes = std::fs::read(fixture(LLAMA).join(file)).unwrap();
    let h = bitnet_wgpu::gguf::GgufHeader::parse(&bytes).unwrap();
    let t = h.tensor("blk.0.attn_q.weight").unwrap().clone();
    let data = &mut bytes[t.start..t.start + t.len];
    let (a, b) = data.split_at_mut(64);
    a.swap_with_slice(&mut b[..64]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(file);
    std::fs::write(&p, bytes).unwrap();
    let prompt = ids(&reference(LLAMA)["prompt_ids"]);
    let want = engine(&fixture(LLAMA).join(file), GgufOptions::default())
        .unwrap()
        .logits(&prompt)
        .unwrap();
    let got = engine(&p, GgufOptions::default())
        .unwrap()
        .logits(&prompt)
        .unwrap();
    assert!(got.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-4));
}

#[test]
fn a_plain_llama_gguf_is_refused_naming_its_weight_type() {
    // general.architecture = llama and one Q4_0 [32] blk.0.attn_q.weight: a k-quant LLaMA,
    // not a BitNet. Refused up front, in one line naming the type and the tensor.
    let s = |x: &str| {
        [
            (x.len() as u64).to_le_bytes().to_vec(),
            x.as_bytes().to_vec(),
        ]
        .concat()
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // key/values
    b.extend(s("general.architecture"));
    b.extend(8u32.to_le_bytes());
    b.extend(s("llama"));
    b.extend(s("blk.0.attn_q.weight"));
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(2u32.to_le_bytes()); // Q4_0
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32), 0);
    b.extend([0u8; 18]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain-llama.gguf");
    std::fs::write(&p, b).unwrap();
    let msg = engine(&p, GgufOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("Q4_0") && msg.contains("blk.0.attn_q.weight") && !msg.contains('\n'),
        "{msg}"
    );
}

#[test]
fn summary_names_types_and_conversions() {
    let e = engine(&path("model-tq1_0.gguf"), GgufOptions::default()).unwrap();
    let g = e.files.gguf.as_ref().unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture, "bitnet-25");
    assert_eq!(g.tensor_types.get("TQ1_0"), Some(&7));
    assert_eq!(g.tensor_types.get("Q8_0"), Some(&1));
    assert_eq!(
        g.conversions,
        vec![
            "1 x Q8_0 -> Q8_0 (kept, decoded by row)".to_string(),
            "7 x TQ1_0 -> packed 2-bit".to_string()
        ]
    );
    assert_eq!(g.i2s_layout, None);
    let e = engine(&path("model-i2_s.gguf"), GgufOptions::default()).unwrap();
    assert_eq!(
        e.files.gguf.as_ref().unwrap().i2s_layout,
        Some(I2sLayout::X86)
    );
    assert_eq!(e.config.activation, FfnActivation::Relu2);
}

#[test]
fn arm_i2s_layout_reads_other_codes() {
    // The file is x86: read as ARM the codes land elsewhere, so logits must differ (the option
    // is wired through), not error.
    let want = engine(&fixture(DIR), GgufOptions::default())
        .unwrap()
        .logits(&prompt())
        .unwrap();
    let arm = GgufOptions {
        i2s_layout: I2sLayout::Arm,
        ..Default::default()
    };
    let got = engine(&path("model-i2_s.gguf"), arm)
        .unwrap()
        .logits(&prompt())
        .unwrap();
    assert!(got.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn tokenizer_and_chat_template_from_gguf_metadata_equal_the_folder() {
    let folder = engine(&fixture(DIR), GgufOptions::default()).unwrap();
    let gguf = engine(&path("model-i2_s.gguf"), GgufOptions::default()).unwrap();
    for text in [
        "Hello world! It's 2025, and the quick brown fox jumps.",
        "  spaces\n\nand newlines\t, numbers 12345 and émojis 🦙",
        "<|begin_of_text|>System: hi<|eot_id|>",
    ] {
        for specials in [true, false] {
            assert_eq!(
                gguf.tokenizer.encode(text, specials).unwrap(),
                folder.tokenizer.encode(text, specials).unwrap(),
                "{text:?} specials {specials}"
            );
        }
        let ids = folder.tokenizer.encode(text, false).unwrap();
        assert_eq!(
            gguf.tokenizer.decode(&ids).unwrap(),
            folder.tokenizer.decode(&ids).unwrap()
        );
    }
    let chat = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello!"),
    ];
    assert_eq!(
        gguf.tokenizer.encode_chat(&chat, true).unwrap(),
        folder.tokenizer.encode_chat(&chat, true).unwrap()
    );
    assert_eq!(gguf.stop_ids(), folder.stop_ids());
    assert_eq!(gguf.config.bos_token_id, folder.config.bos_token_id);
}

#[test]
fn q6_k_decoder_equals_the_gguf_package() {
    let raw = std::fs::read(path("q6_k-blocks.bin")).unwrap();
    let (_, want) = bitnet_wgpu::npy::read_f32(&path("q6_k-values.npy")).unwrap();
    let mut got = vec![f32::NAN; want.len()];
    bitnet_wgpu::gguf::types::dequant_q6_k(&raw, &mut got);
    assert_close("Q6_K", &got, &want, 0.0, 0.0);
}

/// A copy of `file` in a temp dir with `patch` applied to the data of tensor `name`.
fn patched(file: &str, name: &str, patch: impl Fn(&mut [u8])) -> (tempfile::TempDir, PathBuf) {
    let mut bytes = std::fs::read(path(file)).unwrap();
    let h = bitnet_wgpu::gguf::GgufHeader::parse(&bytes).unwrap();
    let t = h.tensor(name).unwrap().clone();
    patch(&mut bytes[t.start..t.start + t.len]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(file);
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

/// A TQ2_0 file whose blocks have different scales runs on the CPU with each block's own scale
/// (not averaged, not refused), and `--device gpu` refuses it by name. Where the answer is
/// known without a second implementation: block 1 of attn_q holding only zero weights, the
/// model is the same whatever that block's scale, so the file with scale 2.0 there (per-block
/// path) gives the logits of the file with the tensor's own scale (one-scale path).
#[test]
fn differing_tq_block_scales_are_honoured_per_block() {
    const Q: &str = "blk.0.attn_q.weight";
    const BLOCK: usize = 66; // TQ2_0: 64 bytes of codes, then the f16 scale
    let zero_codes = |b: &mut [u8]| b[BLOCK..BLOCK + 64].fill(0x55); // code 1 = weight 0
    let scale_two = |b: &mut [u8]| {
        b[BLOCK + 64..BLOCK + 66].copy_from_slice(&0x4000u16.to_le_bytes()) // f16 2.0
    };
    let logits = |p: &std::path::Path| {
        let mut e = engine(p, relu2()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        e.logits(&prompt()).unwrap()
    };
    let (_a, uniform) = patched("model-tq2_0.gguf", Q, zero_codes);
    let (_b, per_block) = patched("model-tq2_0.gguf", Q, |b| {
        zero_codes(b);
        scale_two(b)
    });
    let want = logits(&uniform);
    assert_close(
        "zero block with a scale of its own",
        &logits(&per_block),
        &want,
        1e-5,
        1e-5,
    );
    // A scale of its own on a block of non-zero weights is used: the logits move.
    let (_c, scaled) = patched("model-tq2_0.gguf", Q, scale_two);
    let original = logits(&path("model-tq2_0.gguf"));
    let moved = logits(&scaled)
        .iter()
        .zip(&original)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "a block scale of 2.0 moved the logits by only {moved}"
    );
    // bitnet info lists the conversion
    let e = engine(&scaled, relu2()).unwrap();
    let conversions = &e.files.gguf.as_ref().unwrap().conversions;
    assert!(
        conversions.iter().any(|c| c.contains("per-block scales")),
        "{conversions:?}"
    );
    // The GPU kernels have one scale per matrix: refused by name, never averaged.
    if bitnet_wgpu::backend::wgpu::gpu_backend_for_test("tq_block_scales_gpu").is_some() {
        let opts = EngineOptions {
            device: DeviceChoice::Gpu,
            gguf: relu2(),
            ..Default::default()
        };
        let err = Engine::load(&scaled, &opts)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("per-block ternary scales on the GPU") && err.contains(Q),
            "{err}"
        );
    }
    // A zero block scale means a block of zeros: accepted.
    let (_d, p) = patched("model-tq1_0.gguf", "blk.0.ffn_up.weight", |b| {
        b[52..54].copy_from_slice(&[0, 0])
    });
    engine(&p, GgufOptions::default()).unwrap();
}

/// A Q8_0 embedding stays Q8_0 in memory (34 bytes per 32 values, not a 4-byte f32 copy) and
/// gives the logits of the same values dequantized to f32 (a Q8_0 block's `d · q` is exact in
/// f32): the exact head, the q8 head and, where an adapter exists, the GPU (which decodes the
/// rows to f32 at upload). A non-finite block scale is refused by name.
#[test]
fn a_q8_0_embedding_stays_q8_0_and_gives_the_dequantized_logits() {
    use bitnet_wgpu::engine::build_model;
    use bitnet_wgpu::load::{decode_floats, FloatDtype, FloatMatrix};
    use bitnet_wgpu::model::ModelOptions;
    use bitnet_wgpu::ternary::ByteStorage;
    let file = "model-tq1_0.gguf";
    let kept = engine(&path(file), relu2()).unwrap().weights;
    let emb = &kept.embed_tokens;
    assert_eq!(emb.dtype, FloatDtype::Q8_0);
    assert_eq!(emb.bytes(), emb.rows * emb.cols / 32 * 34);
    assert_eq!(emb.data.as_slice().len(), emb.bytes());
    // the same model with the embedding dequantized to f32
    let mut f32s = vec![0f32; emb.rows * emb.cols];
    decode_floats(emb.dtype, emb.data.as_slice(), &mut f32s);
    let mut dequantized = engine(&path(file), relu2()).unwrap().weights;
    dequantized.embed_tokens = FloatMatrix {
        name: emb.name.clone(),
        rows: emb.rows,
        cols: emb.cols,
        dtype: FloatDtype::F32,
        data: ByteStorage::Owned(std::sync::Arc::new(
            f32s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )),
    };
    let logits = |w: &bitnet_wgpu::load::ModelWeights, device, lm_head| {
        let opts = EngineOptions {
            device,
            threads: 2,
            ..Default::default()
        };
        let mut mo = ModelOptions::for_config(&w.config);
        mo.ctx = 64;
        mo.lm_head = lm_head;
        let mut m = build_model(w, &opts, mo).unwrap();
        m.forward_all(&prompt()).unwrap()
    };
    for head in [HeadFormat::Exact, HeadFormat::Q8] {
        let got = logits(&kept, DeviceChoice::Cpu, head);
        let same = logits(&dequantized, DeviceChoice::Cpu, head);
        assert_close(
            &format!("{head:?} head: Q8_0 vs f32"),
            &got,
            &same,
            1e-5,
            1e-5,
        );
    }
    if bitnet_wgpu::backend::wgpu::gpu_backend_for_test("q8_0_embedding").is_some() {
        // the rows decoded at upload: the values of the f32 copy, so the same logits
        let got = logits(&kept, DeviceChoice::Gpu, HeadFormat::Exact);
        let same = logits(&dequantized, DeviceChoice::Gpu, HeadFormat::Exact);
        assert_close("GPU: Q8_0 vs f32", &got, &same, 0.0, 0.0);
    }
    // block 3's f16 scale = +inf
    let (_d, p) = patched(file, "token_embd.weight", |b| {
        b[3 * 34..3 * 34 + 2].copy_from_slice(&0x7c00u16.to_le_bytes())
    });
    let err = engine(&p, relu2()).err().unwrap().to_string();
    assert!(
        err.contains("token_embd.weight") && err.contains("block 3") && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn invalid_ternary_codes_are_refused() {
    // TQ2_0 byte 5 of block 0 = 0xFF: code 3 for four weights.
    let (_d, p) = patched("model-tq2_0.gguf", "blk.0.ffn_down.weight", |b| b[5] = 0xFF);
    let err = engine(&p, relu2()).err().unwrap();
    assert!(
        matches!(&err, BitnetError::InvalidTernaryCode { name, offset: 5 } if name == "blk.0.ffn_down.weight"),
        "{err}"
    );
    // I2_S: byte 40 (block 1, byte 8) = 0xC0: element 128 + 8 has code 3.
    let (_d, p) = patched("model-i2_s.gguf", "blk.0.attn_k.weight", |b| b[40] = 0xC0);
    let err = engine(&p, GgufOptions::default()).err().unwrap();
    assert!(
        matches!(&err, BitnetError::InvalidTernaryCode { offset: 40, .. }),
        "{err}"
    );
    // (TQ1_0 cannot hold an invalid code: ((b·3^n mod 256)·3) >> 8 is at most 2 for any byte.)
}
