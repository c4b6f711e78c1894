//! Replays every saved fuzz input (the minimised corpus and every crash found, `fuzz/corpus/` and
//! `fuzz/regressions/`) through the same entry points the fuzz targets call, on stable Rust: a
//! parser change that brings back an old crash fails here. See FUZZING.md.

use std::path::Path;

use bitnet_wgpu::fuzz_targets;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            // A panic names the input that caused it.
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{target}: {} panicked", f.display());
            n += 1;
        }
    }
    eprintln!("{target}: replayed {n} inputs");
    assert!(n > 0, "{target}: no corpus under fuzz/corpus/{target}");
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", fuzz_targets::safetensors);
}

#[test]
fn config_json_corpus() {
    replay("config_json", fuzz_targets::config_json);
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer", fuzz_targets::tokenizer);
}

#[test]
fn gguf_corpus() {
    replay("gguf", fuzz_targets::gguf);
}

#[test]
fn serve_request_corpus() {
    replay("serve_request", fuzz_targets::serve_request);
}

#[test]
fn chat_template_corpus() {
    replay("chat_template", fuzz_targets::chat_template);
}

/// The safetensors seeds are valid, so the fuzzer starts past the header into the tensor table.
#[test]
fn the_seed_checkpoints_load() {
    use bitnet_wgpu::config::ModelConfig;
    for (online, config) in [
        (false, fuzz_targets::PACKED_CONFIG),
        (true, fuzz_targets::ONLINE_CONFIG),
    ] {
        let c = ModelConfig::from_json_str(config).unwrap();
        let bytes = fuzz_targets::seed_checkpoint(online);
        let w = bitnet_wgpu::load::load_weights_from_bytes(&bytes, Path::new("seed"), &c);
        assert!(w.is_ok(), "online {online}: {:?}", w.err());
    }
}

/// Writes the safetensors seeds into fuzz/corpus/safetensors (run once by hand:
/// `cargo test --test fuzz_replay -- --ignored write_safetensors_seeds`).
#[test]
#[ignore]
fn write_safetensors_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/safetensors");
    std::fs::create_dir_all(&dir).unwrap();
    for (online, name) in [(false, "seed-packed"), (true, "seed-online")] {
        std::fs::write(dir.join(name), fuzz_targets::seed_checkpoint(online)).unwrap();
    }
}
