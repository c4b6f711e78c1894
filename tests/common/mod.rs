//! Helpers shared by the integration tests: fixture paths, the one tolerance definition, and
//! running the `bitnet` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const VARIANTS: [&str; 4] = [
    "tiny-autobitlinear",
    "tiny-bitlinear-untied",
    "tiny-default-f32scale",
    "tiny-online-bf16",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    let p = fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The one tolerance definition of the project: `|got − ref| ≤ abs + rel·|ref|`. Panics naming
/// the first index that fails, with got and expected, plus the worst error seen.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let within = err <= abs + rel * w.abs(); // false for NaN
        if !within && first_bad.is_none() {
            first_bad = Some((i, g, w));
        }
        if err > worst.1 || err.is_nan() {
            worst = (i, err);
        }
    }
    eprintln!(
        "{what}: worst |got - ref| = {:e} at index {}",
        worst.1, worst.0
    );
    if let Some((i, g, w)) = first_bad {
        panic!(
            "{what}: index {i}: got {g}, expected {w} (tolerance {abs} + {rel}·|ref|); worst error {} at index {}",
            worst.1, worst.0
        );
    }
}

/// Runs the bitnet binary.
pub fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .output()
        .expect("run bitnet")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, no panic, and stderr containing every `needles`.
pub fn assert_fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panicked instead of a clean error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

/// Copies a fixture into a temporary folder that a test may damage.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    copy_dir(&fixture(name))
}

/// A temporary copy of the model folder `src` (its files, not subfolders).
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}
