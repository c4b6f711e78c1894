//! `bitnet bench` end to end on a tiny synthetic model: llama-bench test names, JSON/CSV output,
//! real sensors read from a fake sysfs tree (BITNET_SYSFS_ROOT), declared-power estimates, plots.

use std::process::Command;

fn bench(args: &[&str], sysfs: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .arg("bench")
        .args(["--synthetic", "tiny", "-r", "2", "--idle-seconds", "0"])
        .args(args)
        .env("BITNET_SYSFS_ROOT", sysfs)
        .output()
        .unwrap()
}

#[test]
fn json_rows_have_llama_bench_names_and_measured_speed() {
    let empty = tempfile::tempdir().unwrap();
    let o = bench(
        &["-p", "16", "-n", "4", "-d", "0,8", "-o", "json"],
        empty.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["pp16", "tg4", "pp16 @ d8", "tg4 @ d8"]);
    for r in rows {
        assert!(r["tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
        assert!(
            r["energy"].is_null(),
            "no sensor in an empty sysfs → no energy"
        );
        assert!(r["energy_na_reason"].as_str().unwrap().contains("RAPL"));
        assert_eq!(r["params"].as_u64().unwrap(), 4_200_704);
    }
}

/// `-b 1,4`: each decode test also runs with 4 sequences decoded together (`tg4 x4`, one row
/// of each per step), on the CPU and, where an adapter exists, the GPU; the rows carry the batch
/// and count every sequence's tokens; a batch of 0 is refused by name.
#[test]
fn batched_decode_tests_run_on_each_backend() {
    let empty = tempfile::tempdir().unwrap();
    let mut devices = vec!["cpu"];
    if let Some(g) = bitnet_wgpu::backend::wgpu::gpu_backend_for_test("bench_batched_decode") {
        drop(g);
        devices.push("gpu");
    }
    for device in devices {
        let o = bench(
            &[
                "-p", "0", "-n", "4", "-b", "1,4", "-d", "0,3", "--device", device, "-o", "json",
            ],
            empty.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let rows = v.as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            vec!["tg4", "tg4 x4", "tg4 @ d3", "tg4 x4 @ d3"],
            "{device}"
        );
        let batches: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, vec![1, 4, 1, 4], "{device}");
        for r in rows {
            assert_eq!(r["n_tokens"].as_u64(), Some(4), "{device}: {r}");
            assert!(r["tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
        }
        let backend = rows[0]["backend"].as_str().unwrap();
        let want = if device == "cpu" { "cpu" } else { "wgpu" };
        assert!(backend.starts_with(want), "{device}: {backend}");
        // the formats measured: the exact head, and each device's default KV cache
        let kv = if device == "cpu" { "f32" } else { "f16" };
        for r in rows {
            assert_eq!(
                (r["lm_head"].as_str(), r["kv_cache"].as_str()),
                (Some("exact"), Some(kv)),
                "{device}: {r}"
            );
        }
    }
    // a context deeper than one step's rows (max_batch 512) is filled in several steps
    let o = bench(
        &[
            "-p", "0", "-n", "2", "-b", "2", "-d", "600", "--device", "cpu", "-o", "json",
        ],
        empty.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["test"].as_str(), Some("tg2 x2 @ d600"));
    let o = bench(&["-p", "0", "-n", "4", "-b", "2,0"], empty.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--batch 0") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn fake_rapl_tree_is_used_and_named() {
    let root = tempfile::tempdir().unwrap();
    let zone = root.path().join("sys/class/powercap/intel-rapl:0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("name"), "package-0\n").unwrap();
    std::fs::write(zone.join("energy_uj"), "1000000\n").unwrap();
    std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").unwrap();
    let o = bench(&["-p", "8", "-n", "2", "-o", "csv"], root.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.lines().next().unwrap().contains("joules_per_token"));
    // the counter does not move in a fake tree: 0 J measured, and said so, not n/a
    assert!(out.contains("package-0"), "{out}");
    let mut lines = out.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = head.iter().position(|&h| h == "joules_per_token").unwrap();
    let rows: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    for row in rows {
        let j = row.split(',').nth(col).unwrap();
        assert_eq!(
            j.parse::<f64>().ok(),
            Some(0.0),
            "joules_per_token {j:?}: {out}"
        );
    }
}

#[test]
fn declared_power_is_an_estimate_and_plot_is_written() {
    let empty = tempfile::tempdir().unwrap();
    let plot = empty.path().join("speed.svg");
    let o = bench(
        &[
            "-p",
            "8",
            "-n",
            "2",
            "--power-watts",
            "30",
            "--idle-watts",
            "10",
            "-o",
            "md",
            "--plot",
            plot.to_str().unwrap(),
        ],
        empty.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(" pp8 |") && out.contains(" tg2 |"), "{out}");
    assert!(out.contains("estimate"), "{out}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("tokens/s"));
}

#[test]
fn bad_bench_arguments_fail_cleanly() {
    let empty = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["-o", "xml"], "--output"),
        (vec!["--plot", "x.gif"], ".svg or .png"),
        (vec!["--power-watts=-3"], "--power-watts"),
        (vec!["-p", "0", "-n", "0"], "nothing to run"),
    ] {
        let o = bench(&args, empty.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A real model's context is a limit; random weights have none, so a synthetic model's
    // context grows to the deepest test, with a note (llama-bench's -d 4096 -p 512 on 2b4t).
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-bitnet");
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "bench", "--model", model, "-p", "5000", "-n", "0", "-r", "1",
        ])
        .args(["--idle-seconds", "0", "--device", "cpu"])
        .env("BITNET_SYSFS_ROOT", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("context overflow") && !err.contains("panicked"),
        "{err}"
    );
    let o = bench(&["-p", "1100", "-n", "0", "--device", "cpu"], empty.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("context is extended"), "{err}");
}

/// `BITNET_GPU_NO_SUBGROUPS=1` switches the GPU kernels to the workgroup-memory reductions, and
/// the backend's name in the report says which ones ran ("(subgroups)"). Follows the GPU-test
/// policy: skipped loudly without an adapter, a failure with BITNET_REQUIRE_GPU=1.
#[test]
fn no_subgroups_variable_selects_the_workgroup_reductions() {
    let Some(g) = bitnet_wgpu::backend::wgpu::gpu_backend_for_test("no_subgroups_variable") else {
        return;
    };
    let adapter_has_them = g.reductions() == "subgroup";
    drop(g);
    let empty = tempfile::tempdir().unwrap();
    for (value, want) in [("0", adapter_has_them), ("1", false)] {
        let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args([
                "bench",
                "--synthetic",
                "tiny",
                "--device",
                "gpu",
                "-p",
                "0",
                "-n",
                "2",
            ])
            .args(["-r", "1", "--idle-seconds", "0", "-o", "json"])
            .env("BITNET_SYSFS_ROOT", empty.path())
            .env("BITNET_GPU_NO_SUBGROUPS", value)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let backend = v[0]["backend"].as_str().unwrap().to_string();
        assert_eq!(
            backend.ends_with("(subgroups)"),
            want,
            "BITNET_GPU_NO_SUBGROUPS={value}: {backend}"
        );
    }
}

/// The tile variables of the hardware A/B (`BITNET_GPU_PRO_BLOCKS`, the prologue's blocks per
/// workgroup; `BITNET_GPU_TILE_K` / `BITNET_GPU_TILE_TJ`, the prefill matmul's k-step and tokens
/// per thread) change only how the work is grouped: the bundled model's greedy text on the GPU,
/// after a 40-token prompt (one tiled prefill step), is the same under each; `bitnet info`
/// shows the shapes in use.
#[test]
fn tile_variables_keep_the_greedy_text() {
    let Some(g) = bitnet_wgpu::backend::wgpu::gpu_backend_for_test("tile_variables") else {
        return;
    };
    drop(g);
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-bitnet");
    let prompt = "Once upon a time there was a little girl named Lily. She loved to play \
                  outside in the park with her dog and her friends every sunny day";
    let command = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
        c.envs(env.iter().copied());
        c
    };
    let run = |env: &[(&str, &str)]| {
        let o = command(env)
            .args(["generate", "--model", model, "--device", "gpu"])
            .args(["--prompt", prompt, "--max-tokens", "16"])
            .args(["--temperature", "0", "--ignore-eos"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let default = run(&[]);
    assert!(default.trim().len() > 16, "{default:?}");
    for env in [
        ("BITNET_GPU_PRO_BLOCKS", "1"),
        ("BITNET_GPU_PRO_BLOCKS", "8"),
        ("BITNET_GPU_TILE_K", "4"),
        ("BITNET_GPU_TILE_K", "8"),
        ("BITNET_GPU_TILE_TJ", "2"),
    ] {
        assert_eq!(run(&[env]), default, "{env:?}");
    }
    let info = |env: &[(&str, &str)]| {
        let o = command(env)
            .args(["info", "--model", model])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = info(&[("BITNET_GPU_TILE_K", "4"), ("BITNET_GPU_PRO_BLOCKS", "3")]);
    assert!(
        shown.contains("k-step 64 columns") && shown.contains("norm prologue 3 x 16 rows"),
        "{shown}"
    );
    // a value the kernels do not take is ignored, with a warning naming it
    let o = command(&[("BITNET_GPU_TILE_K", "6")])
        .args(["info", "--model", model])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("BITNET_GPU_TILE_K=\"6\""),
        "{err}"
    );
}
