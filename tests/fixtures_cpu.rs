//! End-to-end equality with transformers' BitNetForCausalLM (fp32) on the tiny fixtures made by
//! tools/fixtures/gen_fixtures.py: logits of a 20-token prompt and a 12-token greedy continuation,
//! for every weight variant, on the CPU backend.
//!
//! Tolerance: |got − ref| ≤ 1e-4 + 1e-4·|ref|. Both sides compute the same int8 × ternary
//! integers exactly; what differs is f32 summation order in norms, attention and the LM head:
//! relative error ~1e-7 per op, seen as ≤ 7e-6 absolute on logits of magnitude ~1–10 (measured on
//! all four fixtures, 2026-11-25). A larger difference can only come from an activation landing on
//! the other side of an int8 rounding boundary, which moves one quantized value by 1; the fixture
//! generator checked that no activation lies within 9 ulps of a boundary
//! (`min_int8_rounding_margin_ulps` in reference.json), so no such flip is expected, and a wrong
//! scale, bit order, RoPE or norm fails loudly.

mod common;

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, HeadFormat};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};
use bitnet_wgpu::tokenizer::ChatMessage;
use common::*;

pub const ABS_TOL: f32 = 1e-4;
pub const REL_TOL: f32 = 1e-4;

fn cpu_engine(name: &str) -> Engine {
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        threads: 2,
        ..Default::default()
    };
    Engine::load(&fixture(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn logits_match_transformers_for_every_variant() {
    for name in VARIANTS {
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let (shape, want) = bitnet_wgpu::npy::read_f32(&fixture(name).join("logits.npy")).unwrap();
        let mut e = cpu_engine(name);
        assert_eq!(
            shape,
            vec![prompt.len(), e.config.vocab_size],
            "{name}: logits.npy shape"
        );
        let got = e.logits(&prompt).unwrap();
        assert_close(&format!("{name} logits"), &got, &want, ABS_TOL, REL_TOL);
    }
}

#[test]
fn greedy_continuation_matches_transformers_for_every_variant() {
    for name in VARIANTS {
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = ids(&r["greedy_ids"]);
        let mut e = cpu_engine(name);
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        let g = e
            .generate(&prompt, want.len(), &mut s, true, |_| {})
            .unwrap();
        assert_eq!(g.token_ids, want, "{name}: greedy ids");
    }
}

#[test]
fn cached_decode_equals_full_recompute() {
    let name = "tiny-autobitlinear";
    let prompt = ids(&reference(name)["prompt_ids"]);
    let mut e = cpu_engine(name);
    let full = e.logits(&prompt).unwrap();
    let vocab = e.config.vocab_size;
    let n = prompt.len();
    // prefill n-3 tokens, then 3 single-token decode steps through the KV cache
    e.reset();
    e.model.forward_last(&prompt[..n - 3]).unwrap();
    for t in n - 3..n {
        let got = e.model.forward_last(&prompt[t..t + 1]).unwrap();
        assert_close(
            &format!("position {t}"),
            &got,
            &full[t * vocab..(t + 1) * vocab],
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn prefill_in_chunks_equals_one_batch() {
    let name = "tiny-bitlinear-untied";
    let prompt = ids(&reference(name)["prompt_ids"]);
    let want = cpu_engine(name).logits(&prompt).unwrap();
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        threads: 1,
        ..Default::default()
    };
    let mut e = Engine::load(&fixture(name), &opts).unwrap();
    // a batch limit that does not divide the prompt length
    let mut o = e.model_options();
    o.max_batch = 7;
    o.max_logit_rows = 3;
    e.rebuild(o).unwrap();
    let got = e.logits(&prompt).unwrap();
    assert_close("chunked prefill", &got, &want, 1e-4, 1e-4);
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let name = "tiny-autobitlinear";
    let r = reference(name);
    let e = cpu_engine(name);
    let text = r["text_example"]["text"].as_str().unwrap();
    assert_eq!(
        e.tokenizer.encode(text, true).unwrap(),
        ids(&r["text_example"]["ids_with_specials"])
    );
    assert_eq!(
        e.tokenizer.encode(text, false).unwrap(),
        ids(&r["text_example"]["ids_without_specials"])
    );
    let msgs: Vec<ChatMessage> = r["chat_example"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        e.tokenizer.render_chat(&msgs, true).unwrap(),
        r["chat_example"]["text"].as_str().unwrap()
    );
    let chat_ids = e.tokenizer.encode_chat(&msgs, true).unwrap();
    assert_eq!(chat_ids, ids(&r["chat_example"]["ids"]));
    let bos = e.config.bos_token_id.unwrap();
    assert_eq!(
        chat_ids.iter().filter(|&&i| i == bos).count(),
        1,
        "exactly one BOS"
    );
}

#[test]
fn cli_logits_and_generate_json() {
    let name = "tiny-autobitlinear";
    let r = reference(name);
    let prompt = ids(&r["prompt_ids"]);
    let tokens: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    let tokens = tokens.join(",");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    let model = fixture(name);
    let o = bitnet(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, got) = bitnet_wgpu::npy::read_f32(&out).unwrap();
    let (wshape, want) = bitnet_wgpu::npy::read_f32(&model.join("logits.npy")).unwrap();
    assert_eq!(shape, wshape);
    assert_close("cli logits", &got, &want, ABS_TOL, REL_TOL);

    let greedy = ids(&r["greedy_ids"]);
    let n = greedy.len().to_string();
    let o = bitnet(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--temperature",
        "0",
        "--max-tokens",
        &n,
        "--json",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&v["token_ids"]), greedy);
    let tok = bitnet_wgpu::tokenizer::Tokenizer::from_files(
        &model.join("tokenizer.json"),
        Some(&model.join("tokenizer_config.json")),
    )
    .unwrap();
    assert_eq!(v["text"], tok.decode(&greedy).unwrap().as_str());
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(ids(&v["prompt_ids"]), prompt);
}

#[test]
fn chat_turns_reuse_the_cache_and_equal_a_fresh_run() {
    let name = "tiny-autobitlinear";
    let mut e = cpu_engine(name);
    let mut msgs = vec![ChatMessage::new("user", "Hello world")];
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let ids1 = e.tokenizer.encode_chat(&msgs, true).unwrap();
    let g1 = e.generate(&ids1, 6, &mut s, true, |_| {}).unwrap();
    assert_eq!(
        e.model.position(),
        ids1.len() + 5,
        "the last generated token is not fed"
    );
    msgs.push(ChatMessage::new("assistant", g1.text.trim()));
    msgs.push(ChatMessage::new("user", "how are you?"));
    let ids2 = e.tokenizer.encode_chat(&msgs, true).unwrap();
    let g2 = e.generate(&ids2, 6, &mut s, true, |_| {}).unwrap();
    // a fresh engine on the whole conversation gives the same continuation
    let mut fresh = cpu_engine(name);
    let g2_fresh = fresh.generate(&ids2, 6, &mut s, true, |_| {}).unwrap();
    assert_eq!(g2.token_ids, g2_fresh.token_ids);
}

#[test]
fn cli_chat_answers_each_turn() {
    use std::io::Write;
    let model = fixture("tiny-autobitlinear");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "-n",
            "4",
            "--device",
            "cpu",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\n/reset\nHow are you?\n/exit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("(conversation cleared)"), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        2,
        "one answer line per turn"
    );
}

/// `--lm-head q8`: the head's weights are rounded to int8 per 64-column block, so a logit moves by
/// at most Σ_c |δw_c·x_c| ≤ (absmax_block / 254)·Σ|x| (≈ 0.4 here: hidden 64, embedding absmax
/// ≈ 1.9, |x| ≈ 1), typically ~1 % of the logits' spread. Measured 2026-11-25: worst
/// |got − ref| 0.094–0.134 over the 4 fixtures (logit std ≈ 4, max ≈ 17), greedy ids unchanged.
/// Tolerance 0.2 absolute (5 % of the spread): a wrong scale, block or row is off by ~4.
#[test]
fn q8_lm_head_stays_close_to_transformers() {
    for name in VARIANTS {
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let (_, want) = bitnet_wgpu::npy::read_f32(&fixture(name).join("logits.npy")).unwrap();
        let opts = EngineOptions {
            device: DeviceChoice::Cpu,
            threads: 2,
            lm_head: HeadFormat::Q8,
            ..Default::default()
        };
        let mut e = Engine::load(&fixture(name), &opts).unwrap();
        let got = e.logits(&prompt).unwrap();
        assert_close(&format!("{name} q8 logits"), &got, &want, 0.2, 0.0);
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        let want_ids = ids(&r["greedy_ids"]);
        let g = e
            .generate(&prompt, want_ids.len(), &mut s, true, |_| {})
            .unwrap();
        assert_eq!(g.token_ids, want_ids, "{name}: greedy ids with the q8 head");
    }
}

/// `--lm-head q4`: 4-bit weights per 64-column block with a step of absmax / 7, so a logit
/// moves by up to (absmax_block / 14)·Σ|x| (~9× q8's bound, ≈ 3.6 here). Measured 2026-12-01:
/// worst |got − ref| 1.80–2.06 over the 4 fixtures (max |ref| 15.6–17.3), mean 0.33–0.36. The
/// random-weight fixtures have near-tied logits, so greedy ids diverge (0–12 of 12 equal) and
/// are not compared; the bundled trained model's perplexity moves by 4.0e-3
/// (`tests/bundled_model.rs`). A wrong block, nibble or scale moves the mean by ~the logits'
/// spread (std ≈ 4).
#[test]
fn q4_lm_head_stays_close_to_transformers() {
    for name in VARIANTS {
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let (_, want) = bitnet_wgpu::npy::read_f32(&fixture(name).join("logits.npy")).unwrap();
        let opts = EngineOptions {
            device: DeviceChoice::Cpu,
            threads: 2,
            lm_head: HeadFormat::Q4,
            ..Default::default()
        };
        let mut e = Engine::load(&fixture(name), &opts).unwrap();
        let got = e.logits(&prompt).unwrap();
        assert_close(&format!("{name} q4 logits"), &got, &want, 3.0, 0.0);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .sum::<f32>()
            / want.len() as f32;
        eprintln!("{name}: q4 head mean |got - ref| {mean:.4}");
        assert!(mean < 0.5, "{name}: mean |got - ref| {mean}");
    }
}

// ---- the LLaMA-style family: tests/fixtures/tiny-llama-bitnet (tools/fixtures/gen_llama_fixture.py)
// LlamaForCausalLM + bitnet quantization as Falcon3-1.58bit: SiLU-gated FFN, no sub-norms,
// untied bf16 lm_head, head_dim 128 given in config.json (q_dim 512 ≠ hidden 256).

const LLAMA: &str = "tiny-llama-bitnet";

#[test]
fn llama_family_logits_and_greedy_match_transformers() {
    let r = reference(LLAMA);
    let prompt = ids(&r["prompt_ids"]);
    let (shape, want) = bitnet_wgpu::npy::read_f32(&fixture(LLAMA).join("logits.npy")).unwrap();
    let mut e = cpu_engine(LLAMA);
    let c = &e.config;
    assert_eq!(c.family, bitnet_wgpu::config::ModelFamily::Llama);
    assert_eq!(c.activation, bitnet_wgpu::config::FfnActivation::Silu);
    assert!(!c.sub_norms && !c.tie_word_embeddings);
    assert_eq!(shape, vec![prompt.len(), c.vocab_size]);
    let got = e.logits(&prompt).unwrap();
    assert_close("tiny-llama-bitnet logits", &got, &want, ABS_TOL, REL_TOL);
    // greedy through the KV cache (prefill, then one token a step)
    let want_ids = ids(&r["greedy_ids"]);
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let g = e
        .generate(&prompt, want_ids.len(), &mut s, true, |_| {})
        .unwrap();
    assert_eq!(g.token_ids, want_ids, "tiny-llama-bitnet greedy ids");
}

#[test]
fn cli_info_shows_the_llama_family_activation_sub_norms_and_head() {
    let m = fixture(LLAMA);
    let o = bitnet(&["info", "--model", m.to_str().unwrap(), "--device", "cpu"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "LlamaForCausalLM",
        "ffn activation   silu",
        "sub-norms        none",
        "separate lm_head.weight Bf16",
        "head_dim 128",
    ] {
        assert!(out.contains(needle), "info lacks {needle:?}:\n{out}");
    }
    let g = m.join("model-i2_s.gguf");
    let o = bitnet(&["info", "--model", g.to_str().unwrap(), "--device", "cpu"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "architecture     llama (LlamaForCausalLM",
        "ffn activation   silu (architecture \"llama\"",
        "sub-norms        none",
        "separate output.weight F16",
    ] {
        assert!(out.contains(needle), "gguf info lacks {needle:?}:\n{out}");
    }
}
