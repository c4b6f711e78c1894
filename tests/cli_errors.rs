//! The hardening of issue 18, end to end through the `bitnet` binary: inputs that used to crash,
//! hang or mislead now give one clear line and a non-zero exit (or work, where they should).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const BASE: &str = "tiny-autobitlinear";

/// Rewrites the JSON file `name` of a model folder through `edit`.
fn edit_json(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(name);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(dir, "config.json", edit)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The CPU keeps its KV cache in f32 (the exact semantics) unless `--kv-cache f16` asks for
/// half the memory: `info` says which, with its size, and generation runs with both.
#[test]
fn cpu_kv_cache_is_f32_by_default_and_f16_on_request() {
    let d = copy_fixture(BASE);
    let m = d.path().to_str().unwrap();
    let kv_line = |extra: &[&str]| {
        let mut args = vec!["info", "--model", m, "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = bitnet(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
            .lines()
            .find(|l| l.starts_with("kv cache"))
            .unwrap_or_else(|| panic!("no kv cache line: {}", stdout(&o)))
            .to_string()
    };
    let (f32_line, f16_line) = (kv_line(&[]), kv_line(&["--kv-cache", "f16"]));
    assert!(
        f32_line.contains("(f32, the device's default"),
        "{f32_line}"
    );
    assert!(f16_line.contains("(f16, --kv-cache)"), "{f16_line}");
    assert!(kv_line(&["--kv-cache", "f32"]).contains("(f32, --kv-cache)"));
    // half the bytes per token
    let per_token = |l: &str| l.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap();
    assert_eq!(
        per_token(&f32_line),
        2.0 * per_token(&f16_line),
        "{f32_line} / {f16_line}"
    );
    for kv in ["f16", "f32"] {
        let o = bitnet(&[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--kv-cache",
            kv,
            "--tokens",
            "1,2,3",
            "-n",
            "4",
            "--temperature",
            "0",
        ]);
        assert!(o.status.success(), "--kv-cache {kv}: {}", stderr(&o));
    }
    let o = bitnet(&["info", "--model", m, "--device", "cpu", "--kv-cache", "f8"]);
    assert!(
        !o.status.success() && stderr(&o).contains("f8"),
        "{}",
        stderr(&o)
    );
}

/// Issue 18.1: a huge max_position_embeddings used to allocate its KV cache eagerly and abort.
#[test]
fn huge_max_position_embeddings_uses_a_default_context_and_checks_memory() {
    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| {
        v["max_position_embeddings"] = (1u64 << 31).into()
    });
    let m = d.path().to_str().unwrap();
    let o = bitnet(&["info", "--model", m, "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("4096 positions in use"),
        "{}",
        stdout(&o)
    );
    let o = bitnet(&[
        "generate", "--model", m, "--device", "cpu", "--tokens", "1", "-n", "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // 2^31 positions × 512 B per position = 1 TiB of KV cache: refused before allocating.
    let o = bitnet(&[
        "generate",
        "--model",
        m,
        "--device",
        "cpu",
        "--tokens",
        "1",
        "--ctx",
        "2147483648",
    ]);
    assert_fails_with(&o, &["--ctx", "memory is available"]);
}

/// Runs bitnet with stdout into a pipe that the reader closes after `keep` bytes.
fn with_closed_pipe(args: &[&str], keep: usize) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; keep];
    out.read_exact(&mut buf).unwrap();
    drop(out); // as `head -c keep` does
    let o = child.wait_with_output().unwrap();
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Ended by a closed pipe: quietly (exit 0 or SIGPIPE), never a panic or an error message.
fn assert_quiet_pipe_exit(what: &str, status: std::process::ExitStatus, err: &str) {
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success() || status.signal() == Some(13),
        "{what}: {status:?}; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!err.contains("error"), "{what}: {err}");
}

/// Issue 18.2: `bitnet info | head -1` panicked ("failed printing to stdout"), and `generate`
/// kept generating into a closed pipe.
#[test]
fn a_closed_stdout_ends_quietly_and_stops_generation() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    let (status, err) = with_closed_pipe(&["info", "--model", m, "--device", "cpu"], 10);
    assert_quiet_pipe_exit("info", status, &err);
    // 100 000 tokens would take minutes: the closed pipe must stop it long before.
    let t0 = std::time::Instant::now();
    let (status, err) = with_closed_pipe(
        &[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--prompt",
            "Once",
            "--ignore-eos",
            "-n",
            "100000",
            "--ctx",
            "128",
        ],
        1,
    );
    assert_quiet_pipe_exit("generate", status, &err);
    assert!(
        !err.contains("generated"),
        "the run went on to its statistics line: {err}"
    );
    assert!(t0.elapsed().as_secs() < 60);
}

/// Issue 18.3: a negative, NaN or infinite duration or power panicked in Duration::from_secs_f64.
#[test]
fn bench_rejects_bad_seconds_and_watts_before_running() {
    for (flag, v) in [
        ("--idle-seconds", "-1"),
        ("--idle-seconds", "NaN"),
        ("--idle-seconds", "inf"),
        ("--power-watts", "-5"),
        ("--power-watts", "nan"),
        ("--idle-watts", "-1"),
    ] {
        let arg = format!("{flag}={v}");
        let mut args = vec!["bench", "--synthetic", "tiny", &arg, "-p", "8", "-n", "1"];
        if flag != "--power-watts" {
            args.extend(["--power-watts", "50"]);
        }
        let o = bitnet(&args);
        assert_fails_with(&o, &[flag, v]);
        assert!(o.status.code() == Some(2), "{arg}: a usage error: {o:?}");
    }
}

/// Issue 18.4: a tiny temperature overflowed logits / T to inf, the probabilities became NaN,
/// and token 0 came out forever. A tiny temperature is greedy.
#[test]
fn a_tiny_temperature_is_greedy() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    let run = |t: &str| {
        let o = bitnet(&[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--tokens",
            "377,100,200",
            "-n",
            "12",
            "--ignore-eos",
            "--temperature",
            t,
            "--repeat-penalty",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        ids(&v["token_ids"])
    };
    let tiny = run("1e-38");
    assert_eq!(tiny, run("0"), "temperature 1e-38 must be greedy");
    assert!(tiny.iter().any(|&t| t != 0), "{tiny:?}");
}

/// Issue 18.5: --threads 10000 made a 2-core machine unusable.
#[test]
fn absurd_thread_counts_are_capped_with_a_warning() {
    let m = fixture(BASE);
    let o = bitnet(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "cpu",
        "--tokens",
        "1",
        "-n",
        "2",
        "--threads",
        "10000",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: --threads 10000"),
        "{}",
        stderr(&o)
    );
}

/// Issue 18.6: errors were "Error: ...", "Caused by:" and the same cause twice, plus a stack
/// trace with RUST_BACKTRACE=1. One line now, whatever RUST_BACKTRACE says.
#[test]
fn user_errors_are_one_line_without_backtrace() {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["info", "--model", "/nonexistent/model"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_fails_with(&o, &["/nonexistent/model", "model folder not found"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.matches("not found").count(), 1, "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("Caused by"),
        "{err}"
    );
}

/// Issue 18.7: one bad chat message ended the session.
#[test]
fn a_bad_chat_message_ends_only_that_message() {
    use std::io::Write;
    let m = fixture(BASE);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "--model",
            m.to_str().unwrap(),
            "--device",
            "cpu",
            "-n",
            "4",
        ])
        .args(["--temperature", "0", "--ctx", "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let long = "once upon a time there was a ".repeat(20);
    stdin.write_all(b"hello \xff\xfe there\n").unwrap();
    stdin.write_all(long.as_bytes()).unwrap();
    stdin.write_all(b"\nhello\n/exit\n").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert!(err.contains("context overflow"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The third message was answered (before, the session ended at the first: no output).
    assert!(!o.stdout.is_empty(), "{err}");
}

/// Issue 18.8: messages that misled.
#[test]
fn messages_name_the_real_problem() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    // A failed write is a write.
    let o = bitnet(&[
        "logits",
        "--model",
        m,
        "--tokens",
        "1",
        "--out",
        "/nonexistent/l.npy",
    ]);
    assert_fails_with(&o, &["cannot write /nonexistent/l.npy"]);
    assert!(!stderr(&o).contains("cannot read"), "{}", stderr(&o));
    // BITNET_MODEL is named; empty means unset.
    let run_env = |k: &str, v: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(args)
            .env(k, v)
            .output()
            .unwrap()
    };
    let o = run_env(
        "BITNET_MODEL",
        "/no/such/model",
        &["info", "--device", "cpu"],
    );
    assert_fails_with(&o, &["/no/such/model", "$BITNET_MODEL"]);
    let o = run_env("BITNET_MODEL", "", &["info", "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("tiny-bitnet"), "{}", stdout(&o));
    // An unknown kernel name is not "not available here".
    let o = run_env(
        "BITNET_CPU_KERNEL",
        "avx9000",
        &[
            "generate", "--model", m, "--device", "cpu", "--tokens", "1", "-n", "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\"avx9000\" is not a kernel level"),
        "{}",
        stderr(&o)
    );
    // A negative number is a value, rejected for what it is.
    let o = bitnet(&[
        "generate",
        "--model",
        m,
        "--tokens",
        "1",
        "--temperature",
        "-1",
    ]);
    assert_fails_with(&o, &["--temperature -1 must be ≥ 0"]);
}

/// Issue 18.8: the safetensors error named no tensor.
#[test]
fn a_tensor_with_bad_offsets_is_named() {
    let d = copy_fixture(BASE);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Same length, so the file stays well-formed elsewhere: [1, 64] bf16 needs 128 bytes.
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let off = &v["model.norm.weight"]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
    let old = format!("[{a},{b}]");
    assert!(header.contains(&old), "{header}");
    let new = format!("[{a},{:<w$}]", b - 2, w = b.to_string().len());
    let header = header.replacen(&old, &new, 1);
    bytes[8..8 + n].copy_from_slice(header.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let o = bitnet(&[
        "info",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_fails_with(&o, &["corrupt safetensors", "model.norm.weight"]);
}

/// Issue 18.9: help and behaviour that disagreed, and options silently ignored.
#[test]
fn options_do_what_help_says_or_are_refused() {
    let m = fixture(BASE);
    let m = m.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", m, "--device", "cpu", "-n", "1"];
        a.extend_from_slice(extra);
        bitnet(&a)
    };
    assert_fails_with(
        &gen(&["--prompt", "hi", "--system", "be brief"]),
        &["--chat"],
    );
    assert_fails_with(&gen(&["--tokens", "1", "--chat"]), &["--chat", "--tokens"]);
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), "Once upon a time there was a little dog.").unwrap();
    let t = text.path().to_str().unwrap();
    let o = bitnet(&["perplexity", "--model", m, "--file", t, "--stride", "0"]);
    assert_fails_with(&o, &["--stride", "0"]);
    let help = bitnet(&["perplexity", "--help"]);
    assert!(stdout(&help).contains("Window length in tokens (default: 512"));
    let o = bitnet(&["perplexity", "--model", m, "--file", t, "--ctx", "4096"]);
    assert_fails_with(&o, &["--ctx 4096", "max_position_embeddings 128"]);
    let help = bitnet(&["generate", "--help"]);
    assert!(!stdout(&help).contains("[default: 0]"), "{}", stdout(&help));
    let o = bitnet(&["info", "--model", m, "--device", "cpu"]);
    assert!(stdout(&o).contains("bos 377,"), "{}", stdout(&o));
    let plot = "/nonexistent/folder/speed.svg";
    let o = bitnet(&[
        "bench",
        "--synthetic",
        "tiny",
        "--plot",
        plot,
        "--idle-seconds",
        "0",
    ]);
    assert_fails_with(&o, &["/nonexistent/folder", "does not exist"]);
    assert!(!stderr(&o).contains("running"), "{}", stderr(&o));
}

/// Issue 18.9: an all-inf embedding loaded without a word and printed "!!!!".
#[test]
fn non_finite_float_weights_are_rejected_at_load() {
    use safetensors::tensor::TensorView;
    let d = copy_fixture(BASE);
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned = Vec::new();
    for (name, v) in st.tensors() {
        let mut data = v.data().to_vec();
        if name == "model.embed_tokens.weight" {
            // bf16 +inf at row 3, column 5 (hidden 64).
            let k = (3 * 64 + 5) * 2;
            data[k..k + 2].copy_from_slice(&0x7f80u16.to_le_bytes());
        }
        owned.push((name, v.dtype(), v.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = bitnet(&[
        "info",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_fails_with(
        &o,
        &["model.embed_tokens.weight", "row 3, column 5", "not finite"],
    );
}

/// Issue 18.10: Mesa printed "XDG_RUNTIME_DIR is invalid or not set" on every GPU probe.
#[test]
fn no_runtime_dir_complaint_without_xdg_runtime_dir() {
    let m = fixture(BASE);
    // `info` lists the GPU adapters, so the Vulkan driver is loaded even with --device cpu.
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["info", "--model", m.to_str().unwrap(), "--device", "cpu"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("XDG_RUNTIME_DIR"), "{}", stderr(&o));
}

/// Issue 18.7: Ctrl-C during a chat answer ended the session; now it ends the answer, and the
/// next message is answered. (Linux: the handler is installed with libc.)
#[cfg(target_os = "linux")]
#[test]
fn ctrl_c_ends_the_answer_not_the_chat() {
    use std::io::{BufRead, BufReader, Read, Write};
    // The bundled model: 200 tokens take seconds, so the signal lands mid-answer.
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "--device",
            "cpu",
            "-n",
            "200",
            "--ignore-eos",
            "--ctx",
            "1024",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    stdin.write_all(b"Tell me a story.\n").unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap(); // the answer is streaming
                                         // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut seen = String::new();
    for line in (&mut err).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("(answer interrupted)") {
            break;
        }
    }
    assert!(seen.contains("(answer interrupted)"), "{seen}");
    stdin.write_all(b"And then?\n/exit\n").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let mut text = Vec::new();
    out.read_to_end(&mut text).unwrap();
    assert!(status.success(), "{status:?}: {seen}{rest}");
    assert!(
        !rest.contains("interrupted"),
        "the second answer ran to its end: {rest}"
    );
    assert!(text.len() > 20, "the second message was answered");
}

/// Sizes at config.json's per-key limit (2^31) overflowed the u64 parameter and KV-byte counts
/// derived from them (a panic with overflow checks, a wrapped number without).
#[test]
fn configs_beyond_any_real_model_are_refused() {
    let d = copy_fixture(BASE);
    edit_config(d.path(), |v| {
        v["num_hidden_layers"] = (1u64 << 31).into();
        v["num_key_value_heads"] = (1u64 << 31).into();
        v["num_attention_heads"] = (1u64 << 31).into();
        v["head_dim"] = (1u64 << 30).into();
    });
    let o = bitnet(&[
        "info",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_fails_with(&o, &["model size", "far beyond any real one"]);
}

/// Found by the tokenizer fuzz target: a JSON syntax error inside tokenizer.json's "decoder"
/// made the tokenizers crate panic (`expect("Helper")`).
#[test]
fn a_syntax_error_in_the_tokenizer_decoder_is_an_error_not_a_panic() {
    let d = copy_fixture(BASE);
    let p = d.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let at = text.find("\"decoder\"").expect("the fixture has a decoder");
    let brace = at + text[at..].find('{').unwrap();
    let broken = format!("{}{{\"type\" 1}}", &text[..brace]);
    std::fs::write(&p, broken).unwrap();
    let o = bitnet(&[
        "info",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_fails_with(&o, &["tokenizer.json", "not valid JSON"]);
}

/// Found by the tokenizer fuzz target: a post-processor template naming a special token its
/// special_tokens lack made tokenizers panic in encode ("no entry found for key").
#[test]
fn a_post_processor_with_an_undefined_special_token_is_an_error() {
    let d = copy_fixture(BASE);
    edit_json(d.path(), "tokenizer.json", |v| {
        // The fixture: Sequence [ByteLevel, TemplateProcessing]; rename the single template's
        // first special token (<|begin_of_text|>) in the template only.
        let procs = v["post_processor"]["processors"].as_array_mut().unwrap();
        let template = procs
            .iter_mut()
            .find(|p| p["type"] == "TemplateProcessing")
            .unwrap();
        template["single"][0]["SpecialToken"]["id"] = "<|nowhere|>".into();
    });
    let o = bitnet(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "-n",
        "1",
    ]);
    assert_fails_with(&o, &["tokenizer.json", "<|nowhere|>", "special_tokens"]);
}

/// Issue 16: a LlamaForCausalLM folder is read only with a bitnet quantization_config and the
/// fields this runtime implements; anything else is one line naming the field.
#[test]
fn llama_configs_without_bitnet_quantization_or_with_unsupported_fields_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 4] = [
        (
            |v| {
                v.as_object_mut().unwrap().remove("quantization_config");
            },
            "no quantization_config",
        ),
        (
            |v| v["quantization_config"]["use_rms_norm"] = true.into(),
            "quantization_config.use_rms_norm",
        ),
        (|v| v["attention_bias"] = true.into(), "attention_bias"),
        (|v| v["hidden_act"] = "gelu".into(), "hidden_act"),
    ];
    for (edit, field) in cases {
        let d = copy_fixture("tiny-llama-bitnet");
        edit_config(d.path(), edit);
        let o = bitnet(&[
            "info",
            "--model",
            d.path().to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_fails_with(&o, &[field]);
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

/// Fuzzer finding (chat_template): a tokenizer_config.json whose template repeats the message
/// list 87 million times ran for minutes and took gigabytes; now a one-line error at once.
#[test]
fn a_chat_template_repeating_a_sequence_is_refused() {
    let dir = copy_fixture(BASE);
    edit_json(dir.path(), "tokenizer_config.json", |v| {
        v["chat_template"] = "{{ messages * 87000000 ~ '' }}".into();
    });
    let t0 = std::time::Instant::now();
    let o = bitnet(&[
        "generate",
        "-m",
        dir.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--chat",
        "-p",
        "hi",
        "-n",
        "2",
    ]);
    assert_fails_with(
        &o,
        &[
            "chat template",
            "`*` multiplies a value that is not a literal",
        ],
    );
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
}

/// A template that doubles a string 40 times (8 TiB; fuel never sees it, one instruction per
/// doubling) used to abort the process on a failed allocation. The binary renders templates in
/// a child process with a 1 GiB limit: the prompt fails with a one-line error, no abort.
#[test]
fn a_chat_template_building_a_huge_string_fails_its_prompt_only() {
    let dir = copy_fixture(BASE);
    edit_json(dir.path(), "tokenizer_config.json", |v| {
        v["chat_template"] = "{% set ns = namespace(s='abcdefgh') %}{% for i in range(40) %}\
                              {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
            .into();
    });
    let o = bitnet(&[
        "generate",
        "-m",
        dir.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--chat",
        "-p",
        "hi",
        "-n",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_fails_with(&o, &["chat template", "MiB of memory"]);
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
}
