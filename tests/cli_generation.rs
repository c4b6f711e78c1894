//! Stopping, sampling and streaming, in the engine and through the CLI (issue 18's test gaps):
//! every other generation test passes --ignore-eos, so these are the ones that see a stop.

mod common;

use std::path::Path;

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, FinishReason};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};
use bitnet_wgpu::tokenizer::{StreamDecoder, Tokenizer};
use common::*;

/// The untied fixture: eos_token_id [378, 379] (`<|end_of_text|>`, `<|eot_id|>`).
const UNTIED: &str = "tiny-bitlinear-untied";

fn cpu_engine(dir: &Path, ctx: Option<usize>) -> Engine {
    let opts = EngineOptions {
        device: DeviceChoice::Cpu,
        threads: 2,
        ctx,
        ..Default::default()
    };
    Engine::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig::greedy()).unwrap()
}

/// The greedy continuation of the reference prompt, without stopping.
fn free_run(dir: &Path, n: usize) -> (Vec<u32>, Vec<u32>) {
    let prompt = ids(&reference(UNTIED)["prompt_ids"]);
    let mut e = cpu_engine(dir, None);
    let g = e.generate(&prompt, n, &mut greedy(), true, |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.token_ids.len(), n);
    (prompt, g.token_ids)
}

#[test]
fn the_stop_list_is_the_config_eos_ids_plus_eot() {
    let e = cpu_engine(&fixture(UNTIED), None);
    assert_eq!(e.stop_ids(), vec![378, 379]);
    // tiny-autobitlinear's config names only 378; <|eot_id|> (379) is added from the tokenizer.
    let e = cpu_engine(&fixture("tiny-autobitlinear"), None);
    assert_eq!(e.stop_ids(), vec![378, 379]);
}

/// A stop id ends generation at its first occurrence, is included in token_ids (as transformers'
/// generate does) and not in the text; finish_reason is `stop`. The fixture's greedy text never
/// produces 378/379 by itself, so the config's eos list is pointed at a token it does produce.
#[test]
fn an_eos_id_stops_generation_in_the_engine_and_the_cli() {
    let (prompt, free) = free_run(&fixture(UNTIED), 12);
    let target = free[4];
    let first = free.iter().position(|&t| t == target).unwrap();
    let d = copy_fixture(UNTIED);
    let p = d.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["eos_token_id"] = serde_json::json!([378, target]);
    std::fs::write(&p, v.to_string()).unwrap();

    let mut e = cpu_engine(d.path(), None);
    let g = e
        .generate(&prompt, 12, &mut greedy(), false, |_| {})
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.token_ids, free[..=first].to_vec());
    let text_before = e.tokenizer.decode(&free[..first]).unwrap();
    assert_eq!(
        g.text, text_before,
        "the stop token is not part of the text"
    );

    let tokens: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let o = bitnet(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--tokens",
        &tokens.join(","),
        "--temperature",
        "0",
        "-n",
        "12",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["finish_reason"], "stop");
    assert_eq!(ids(&j["token_ids"]), free[..=first].to_vec());
    assert_eq!(j["text"], text_before.as_str());
    // The same run with --ignore-eos goes on to the length limit.
    let o = bitnet(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--tokens",
        &tokens.join(","),
        "--temperature",
        "0",
        "-n",
        "12",
        "--json",
        "--ignore-eos",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["finish_reason"], "length");
    assert_eq!(ids(&j["token_ids"]), free);
}

/// `<|eot_id|>` stops generation though tiny-autobitlinear's config names only 378: the engine
/// adds it from the tokenizer. The fixture never emits it by itself, so a copy's tokenizer.json
/// gives `<|eot_id|>` the id of a token the greedy run does produce.
#[test]
fn eot_id_from_the_tokenizer_stops_generation() {
    let name = "tiny-autobitlinear";
    let prompt = ids(&reference(name)["prompt_ids"]);
    let mut e = cpu_engine(&fixture(name), None);
    let free = e
        .generate(&prompt, 12, &mut greedy(), true, |_| {})
        .unwrap()
        .token_ids;
    assert!(!free.contains(&378) && !free.contains(&379), "{free:?}");
    let target = free[5];
    let first = free.iter().position(|&t| t == target).unwrap();

    let d = copy_fixture(name);
    let p = d.path().join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // Give the name <|eot_id|> to id `target` (the model is untouched, so the greedy ids stay
    // the same): in the BPE vocabulary, where the added token takes its id from, and the token
    // that had the id moves to 379.
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    let other = vocab
        .iter()
        .find(|(_, id)| id.as_u64() == Some(target as u64))
        .map(|(k, _)| k.clone())
        .unwrap();
    vocab.insert(other, 379.into());
    vocab.insert("<|eot_id|>".into(), target.into());
    let added = v["added_tokens"].as_array_mut().unwrap();
    let eot = added
        .iter_mut()
        .find(|t| t["content"] == "<|eot_id|>")
        .unwrap();
    eot["id"] = target.into();
    std::fs::write(&p, v.to_string()).unwrap();

    let mut e = cpu_engine(d.path(), None);
    assert_eq!(e.config.eos_token_ids, vec![378]);
    assert_eq!(e.tokenizer.token_to_id("<|eot_id|>"), Some(target));
    let g = e
        .generate(&prompt, 12, &mut greedy(), false, |_| {})
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.token_ids, free[..=first].to_vec());
}

/// The context fills: generation stops with finish_reason `context` after ctx − prompt + 1 ids
/// (the last one is returned but not fed).
#[test]
fn a_full_context_stops_generation_in_the_engine_and_the_cli() {
    let m = fixture(UNTIED);
    let prompt = [377u32, 100, 200];
    let mut e = cpu_engine(&m, Some(8));
    let g = e
        .generate(&prompt, 100, &mut greedy(), true, |_| {})
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Context);
    assert_eq!(g.token_ids.len(), 8 - 3 + 1);
    assert_eq!(e.model.position(), 8);
    let o = bitnet(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "cpu",
        "--tokens",
        "377,100,200",
        "--ctx",
        "8",
        "--temperature",
        "0",
        "-n",
        "100",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["finish_reason"], "context");
    assert_eq!(ids(&j["token_ids"]), g.token_ids);
}

/// Sampling (temperature > 0) through the engine: a seed fixes the ids, another seed changes
/// them, and every id is in the vocabulary.
#[test]
fn sampled_generation_is_reproducible_per_seed() {
    let m = fixture(UNTIED);
    let prompt = ids(&reference(UNTIED)["prompt_ids"]);
    let run = |seed: u64| {
        let mut e = cpu_engine(&m, None);
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..SamplerConfig::default()
        })
        .unwrap();
        e.generate(&prompt, 24, &mut s, true, |_| {})
            .unwrap()
            .token_ids
    };
    let a = run(7);
    assert_eq!(a, run(7), "same seed, same ids");
    assert_ne!(a, run(8), "another seed, other ids");
    assert!(a.iter().all(|&t| (t as usize) < 380), "{a:?}");
    let (_, greedy_ids) = free_run(&m, 24);
    assert_ne!(a, greedy_ids, "temperature 1.5 is not greedy");
}

/// Streaming multi-byte UTF-8: byte-level BPE splits é, 世 and 🙂 across tokens; the streamed
/// pieces never hold half a character and concatenate to the full decode.
#[test]
fn streaming_never_splits_a_character() {
    let dir = fixture("tiny-autobitlinear");
    let tok = Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )
    .unwrap();
    let text = "héllo 世界 🙂 naïve";
    let ids = tok.encode(text, false).unwrap();
    let n_chars = text.chars().count();
    assert!(
        ids.len() > n_chars,
        "no character was split: the test would prove nothing"
    );
    let mut s = StreamDecoder::default();
    let mut streamed = String::new();
    for &id in &ids {
        let piece = s.push(&tok, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "half a character streamed: {piece:?}"
        );
        streamed.push_str(&piece);
    }
    streamed.push_str(&s.finish(&tok).unwrap());
    assert_eq!(streamed, tok.decode(&ids).unwrap());
    assert_eq!(streamed, text);
}

/// `--chat --system`: the prompt is the chat template's rendering (one bos, the system turn,
/// the user turn, the assistant cue), and streamed text equals the --json text.
#[test]
fn chat_and_system_render_through_the_template() {
    let dir = fixture("tiny-autobitlinear");
    let m = dir.to_str().unwrap();
    let o = bitnet(&[
        "generate",
        "--model",
        m,
        "--device",
        "cpu",
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "Tell me a story.",
        "--temperature",
        "0",
        "-n",
        "6",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tok = Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )
    .unwrap();
    let want =
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Tell me a story.<|eot_id|>Assistant: ";
    assert_eq!(ids(&j["prompt_ids"]), tok.encode(want, false).unwrap());
    let streamed = bitnet(&[
        "generate",
        "--model",
        m,
        "--device",
        "cpu",
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "Tell me a story.",
        "--temperature",
        "0",
        "-n",
        "6",
    ]);
    assert!(streamed.status.success(), "{}", stderr(&streamed));
    let out = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(out.strip_suffix('\n').unwrap(), j["text"].as_str().unwrap());
}

/// `--device auto` explains a CPU fallback in one `note:` line; without the note, a GPU ran.
#[test]
fn device_auto_notes_a_cpu_fallback() {
    let m = fixture("tiny-autobitlinear");
    let o = bitnet(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "auto",
        "--tokens",
        "1",
        "-n",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let backend = j["backend"].as_str().unwrap();
    let err = stderr(&o);
    let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("note: ")).collect();
    eprintln!("backend {backend}; notes {notes:?}");
    if backend.starts_with("cpu") {
        assert_eq!(notes.len(), 1, "{err}");
        assert!(notes[0].contains("running on the CPU"), "{err}");
    } else {
        assert!(notes.is_empty(), "a GPU ran, nothing to explain: {err}");
    }
}

/// `chat`'s /reset clears the conversation and the KV cache: the answer after /reset equals
/// the answer of a fresh session to the same message (with the first turn still in context,
/// the prompt and so the answer would differ).
#[test]
fn chat_reset_starts_from_an_empty_context() {
    use std::io::Write;
    let m = fixture("tiny-autobitlinear");
    let chat = |input: &[u8]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args([
                "chat",
                "--model",
                m.to_str().unwrap(),
                "--device",
                "cpu",
                "-n",
                "6",
            ])
            .args(["--temperature", "0", "--ignore-eos"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let fresh = chat(b"How are you?\n/exit\n");
    let after_reset = chat(b"Hello there\n/reset\nHow are you?\n/exit\n");
    let without_reset = chat(b"Hello there\nHow are you?\n/exit\n");
    assert!(
        after_reset.ends_with(&fresh),
        "{after_reset:?} vs {fresh:?}"
    );
    let first = after_reset.strip_suffix(&fresh).unwrap();
    assert!(without_reset.starts_with(first), "{without_reset:?}");
    assert_ne!(
        &without_reset[first.len()..],
        fresh,
        "without /reset the second answer sees the first turn; the test would prove nothing"
    );
}
