//! The trained tiny model shipped in assets/: greedy text equal to transformers', perplexity on
//! the committed held-out text within 0.5 % of transformers' value (both from
//! assets/tiny-bitnet/reference.json, written by tools/train_tiny/export.py).

use std::path::Path;

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, HeadFormat};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> serde_json::Value {
    let p = root().join("assets/tiny-bitnet/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn engine() -> Engine {
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        ..Default::default()
    };
    Engine::load(&root().join("assets/tiny-bitnet"), &opts).unwrap()
}

#[test]
fn greedy_text_equals_transformers() {
    let r = reference();
    let g = &r["greedy"];
    let mut e = engine();
    let prompt = e
        .tokenizer
        .encode(g["prompt"].as_str().unwrap_or("Once upon a time"), true)
        .unwrap();
    assert_eq!(prompt, ids(&g["prompt_ids"]), "tokenization");
    let want = ids(&g["greedy_ids"]);
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let out = e
        .generate(&prompt, want.len(), &mut s, true, |_| {})
        .unwrap();
    assert_eq!(out.token_ids, want);
    assert_eq!(out.text, g["text"].as_str().unwrap());
}

#[test]
fn perplexity_within_half_a_percent_of_transformers() {
    let r = reference();
    let text = std::fs::read_to_string(root().join("assets/heldout.txt")).unwrap();
    let mut e = engine();
    let ids = e.tokenizer.encode(&text, false).unwrap();
    for want in r["perplexity"].as_array().unwrap() {
        let (ctx, stride) = (
            want["ctx"].as_u64().unwrap() as usize,
            want["stride"].as_u64().unwrap() as usize,
        );
        assert_eq!(ids.len() as u64, want["n_tokens"].as_u64().unwrap());
        let got =
            bitnet_wgpu::perplexity::perplexity(&mut e, &ids, ctx, stride, |_, _| {}).unwrap();
        let ppl = want["ppl"].as_f64().unwrap();
        assert_eq!(got.n_scored as u64, want["n_scored"].as_u64().unwrap());
        let rel = (got.ppl - ppl).abs() / ppl;
        eprintln!(
            "ctx {ctx} stride {stride}: bitnet {:.4}, transformers {ppl:.4}, rel diff {rel:.2e}",
            got.ppl
        );
        assert!(
            rel < 0.005,
            "ctx {ctx} stride {stride}: got {}, expected {ppl}",
            got.ppl
        );
    }
}

#[test]
fn cli_perplexity_runs_on_the_bundled_model() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "perplexity",
            "--file",
            root().join("assets/heldout.txt").to_str().unwrap(),
            "--json",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!((ppl - 104.39).abs() / 104.39 < 0.005, "{ppl}");
}

/// What `--lm-head q8` costs on a trained model: perplexity on the held-out text against the
/// exact head's. Measured 2026-11-25: 104.642 vs 104.651 (ctx 512, stride 512; 8e-5 relative);
/// bound: within 0.5 %, the same bar as bitnet against transformers.
#[test]
fn q8_head_perplexity_within_half_a_percent_of_exact() {
    let text = std::fs::read_to_string(root().join("assets/heldout.txt")).unwrap();
    let mut exact = engine();
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        lm_head: HeadFormat::Q8,
        ..Default::default()
    };
    let mut q8 = Engine::load(&root().join("assets/tiny-bitnet"), &opts).unwrap();
    let ids = exact.tokenizer.encode(&text, false).unwrap();
    let p = |e: &mut Engine| {
        bitnet_wgpu::perplexity::perplexity(e, &ids, 512, 512, |_, _| {})
            .unwrap()
            .ppl
    };
    let (a, b) = (p(&mut exact), p(&mut q8));
    let rel = (b - a).abs() / a;
    eprintln!("perplexity exact head {a:.4}, q8 head {b:.4}, rel diff {rel:.2e}");
    assert!(rel < 0.005, "q8 {b} vs exact {a}");
}

/// What `--lm-head q4` costs on a trained model: perplexity on the held-out text against the
/// exact head's. Measured 2026-12-01: 105.057 vs 104.640 (ctx 512, stride 512; +4.0e-3
/// relative, 50× q8's cost); bound: within 1 %.
#[test]
fn q4_head_perplexity_cost_is_bounded() {
    let text = std::fs::read_to_string(root().join("assets/heldout.txt")).unwrap();
    let mut exact = engine();
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        lm_head: HeadFormat::Q4,
        ..Default::default()
    };
    let mut q4 = Engine::load(&root().join("assets/tiny-bitnet"), &opts).unwrap();
    let ids = exact.tokenizer.encode(&text, false).unwrap();
    let p = |e: &mut Engine| {
        bitnet_wgpu::perplexity::perplexity(e, &ids, 512, 512, |_, _| {})
            .unwrap()
            .ppl
    };
    let (a, b) = (p(&mut exact), p(&mut q4));
    let rel = (b - a) / a;
    eprintln!("perplexity exact head {a:.4}, q4 head {b:.4}, rel diff {rel:.2e}");
    assert!(rel.abs() < 0.01, "q4 {b} vs exact {a}");
}
