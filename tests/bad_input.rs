//! Bad input gets a clear error naming the problem and a non-zero exit, never a panic.
//! Each test damages a copy of a fixture in one way and runs the `bitnet` binary on it.

mod common;

use std::path::Path;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const BASE: &str = "tiny-autobitlinear";

fn info(dir: &Path) -> std::process::Output {
    bitnet(&["info", "--model", dir.to_str().unwrap(), "--device", "cpu"])
}

/// Rewrites model.safetensors, letting `edit` replace any tensor (name → dtype, shape, bytes).
fn rewrite_tensors(
    dir: &Path,
    edit: impl Fn(&str, Dtype, &[usize], &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        let (d, s, b) = edit(&name, v.dtype(), v.shape(), v.data()).unwrap_or((
            v.dtype(),
            v.shape().to_vec(),
            v.data().to_vec(),
        ));
        owned.push((name, d, s, b));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .filter(|(_, _, s, _)| !s.contains(&usize::MAX))
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn the_undamaged_fixture_loads() {
    let d = copy_fixture(BASE);
    let o = info(d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("autobitlinear"));
}

#[test]
fn missing_folder_and_files() {
    let o = bitnet(&["info", "--model", "/nonexistent/model/dir"]);
    assert_fails_with(&o, &["/nonexistent/model/dir", "not found"]);
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        let d = copy_fixture(BASE);
        std::fs::remove_file(d.path().join(file)).unwrap();
        assert_fails_with(&info(d.path()), &["has no", file]);
    }
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let d = copy_fixture(BASE);
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails_with(
        &info(d.path()),
        &["corrupt safetensors", "model.safetensors"],
    );
    // header length pointing past the end of the file
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_fails_with(&info(d.path()), &["corrupt safetensors"]);
    // garbage header
    let mut b = bytes.clone();
    for x in &mut b[8..40] {
        *x = b'#';
    }
    std::fs::write(&p, &b).unwrap();
    assert_fails_with(&info(d.path()), &["corrupt safetensors"]);
    // empty file
    std::fs::write(&p, b"").unwrap();
    assert_fails_with(&info(d.path()), &["corrupt safetensors"]);
}

#[test]
fn wrong_shape_dtype_and_missing_tensor() {
    let d = copy_fixture(BASE);
    rewrite_tensors(d.path(), |n, dt, s, b| {
        (n == "model.layers.1.mlp.up_proj.weight")
            .then(|| (dt, vec![s[0] / 2, s[1]], b[..s[0] / 2 * s[1]].to_vec()))
    });
    assert_fails_with(
        &info(d.path()),
        &["model.layers.1.mlp.up_proj.weight", "expected shape"],
    );

    let d = copy_fixture(BASE);
    rewrite_tensors(d.path(), |n, _, s, b| {
        (n == "model.norm.weight").then(|| (Dtype::I16, s.to_vec(), b.to_vec()))
    });
    assert_fails_with(
        &info(d.path()),
        &["model.norm.weight", "expected dtype", "I16"],
    );

    let d = copy_fixture(BASE);
    rewrite_tensors(d.path(), |n, _, s, b| {
        (n == "model.layers.0.self_attn.q_proj.weight").then(|| (Dtype::I8, s.to_vec(), b.to_vec()))
    });
    assert_fails_with(&info(d.path()), &["q_proj.weight", "expected dtype", "U8"]);

    let d = copy_fixture(BASE);
    rewrite_tensors(d.path(), |n, dt, _, b| {
        (n == "model.layers.0.self_attn.k_proj.weight_scale")
            .then(|| (dt, vec![usize::MAX], b.to_vec()))
    });
    assert_fails_with(
        &info(d.path()),
        &["model.layers.0.self_attn.k_proj.weight_scale", "missing"],
    );
}

#[test]
fn code_3_in_a_packed_weight() {
    let d = copy_fixture(BASE);
    rewrite_tensors(d.path(), |n, dt, s, b| {
        (n == "model.layers.0.mlp.down_proj.weight").then(|| {
            let mut b = b.to_vec();
            b[5] = 0b0111_0101;
            (dt, s.to_vec(), b)
        })
    });
    assert_fails_with(
        &info(d.path()),
        &["down_proj.weight", "invalid ternary code 3", "byte 5"],
    );
}

#[test]
fn unknown_hidden_act_rope_type_and_contradicting_config() {
    let d = copy_fixture(BASE);
    // (silu is a valid BitNetForCausalLM activation: transformers computes ACT2FN[hidden_act],
    // and so does the model graph; an activation neither implements is refused)
    edit_config(d.path(), |v| v["hidden_act"] = "gelu".into());
    assert_fails_with(&info(d.path()), &["hidden_act", "gelu"]);

    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0})
    });
    assert_fails_with(&info(d.path()), &["RoPE type", "llama3"]);

    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| v["intermediate_size"] = 256.into());
    assert_fails_with(&info(d.path()), &["expected shape", "disagree"]);

    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| v["vocab_size"] = 100.into());
    assert_fails_with(&info(d.path()), &["vocab"]);

    let d = copy_fixture(BASE);
    std::fs::write(d.path().join("config.json"), "{not json").unwrap();
    assert_fails_with(&info(d.path()), &["config.json", "not valid JSON"]);
}

#[test]
fn corrupt_tokenizer() {
    let d = copy_fixture(BASE);
    std::fs::write(d.path().join("tokenizer.json"), "{\"version\": 3}").unwrap();
    assert_fails_with(&info(d.path()), &["tokenizer"]);
}

#[test]
fn token_ids_out_of_range_and_bad_token_lists() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    let o = bitnet(&[
        "generate", "--model", m, "--tokens", "1,999999", "--device", "cpu",
    ]);
    assert_fails_with(&o, &["token id 999999", "out of range"]);
    let o = bitnet(&[
        "logits",
        "--model",
        m,
        "--tokens",
        "1,2,x",
        "--out",
        "/tmp/x.npy",
    ]);
    assert_fails_with(&o, &["\"x\" is not a token id"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    let long: Vec<String> = (0..20).map(|i| (i + 3).to_string()).collect();
    let o = bitnet(&[
        "generate",
        "--model",
        m,
        "--tokens",
        &long.join(","),
        "--ctx",
        "8",
        "--device",
        "cpu",
    ]);
    assert_fails_with(&o, &["context overflow", "20 positions", "holds 8"]);
    // beyond max_position_embeddings (128 for the fixtures)
    let long: Vec<String> = (0..200).map(|i| (i % 50 + 3).to_string()).collect();
    let o = bitnet(&[
        "logits",
        "--model",
        m,
        "--tokens",
        &long.join(","),
        "--out",
        "/tmp/never.npy",
    ]);
    assert_fails_with(&o, &["context overflow", "200"]);
    let o = bitnet(&["generate", "--model", m, "--tokens", "1", "--ctx", "4096"]);
    assert_fails_with(&o, &["context 4096", "max_position_embeddings"]);
}

#[test]
fn invalid_utf8_prompt_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("prompt.txt");
    std::fs::write(&p, b"hello \xff\xfe world").unwrap();
    let m = fixture(BASE);
    let o = bitnet(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt-file",
        p.to_str().unwrap(),
    ]);
    assert_fails_with(&o, &["not valid UTF-8", "offset 6"]);
}

#[test]
fn unwritable_output() {
    let m = fixture(BASE);
    let o = bitnet(&[
        "logits",
        "--model",
        m.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--out",
        "/nonexistent/dir/l.npy",
    ]);
    assert_fails_with(&o, &["/nonexistent/dir/l.npy"]);
}

#[test]
fn untied_config_without_a_head_tensor() {
    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
    });
    assert_fails_with(&info(d.path()), &["lm_head.weight", "tie_word_embeddings"]);
}
