//! Chat templates rendered in a child process (`tokenizer/sandbox.rs`) through the real binary:
//! the same text as in-process, template errors passed through, and the two bounds the child
//! adds — memory (a string doubled past 1 GiB) and the deadline (a renderer that hangs) — turned
//! into errors of that one rendering.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitnet_wgpu::tokenizer::{render_chat_template_in_process, ChatMessage, TemplateRenderer};

fn renderer() -> TemplateRenderer {
    TemplateRenderer::new(PathBuf::from(env!("CARGO_BIN_EXE_bitnet")))
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You answer in one line."),
        ChatMessage::new("user", "Héllo — 日本語 \"quoted\" \\ and a\nnewline"),
        ChatMessage::new("assistant", "Fine 👍"),
        ChatMessage::new("user", "again"),
    ]
}

#[test]
fn the_child_renders_the_bundled_template_exactly_as_in_process() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-bitnet");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = config["chat_template"].as_str().unwrap();
    let msgs = conversation();
    for add_generation_prompt in [false, true] {
        let want = render_chat_template_in_process(
            template,
            "<|begin_of_text|>",
            "<|end_of_text|>",
            &msgs,
            add_generation_prompt,
        )
        .unwrap();
        let got = renderer()
            .render(
                template,
                "<|begin_of_text|>",
                "<|end_of_text|>",
                &msgs,
                add_generation_prompt,
            )
            .unwrap();
        assert_eq!(got, want);
        assert!(got.contains("日本語") && got.contains("👍"), "{got}");
    }
}

#[test]
fn template_errors_come_back_with_their_message() {
    let e = renderer()
        .render(
            "{{ raise_exception('roles must alternate') }}",
            "",
            "",
            &conversation(),
            true,
        )
        .unwrap_err();
    assert!(e.to_string().contains("roles must alternate"), "{e}");
    let e = renderer()
        .render("{% for %}", "", "", &conversation(), true)
        .unwrap_err();
    assert!(e.to_string().contains("syntax error"), "{e}");
}

#[test]
fn a_string_doubled_past_the_memory_limit_fails_only_the_child() {
    // A loop over a namespace variable, and a recursive macro (FUZZING.md).
    for template in [
        "{% set ns = namespace(s='abcdefgh') %}{% for i in range(40) %}\
         {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}\
         {% endmacro %}{{ d('a', 40) }}",
    ] {
        let t0 = Instant::now();
        let e = renderer()
            .render(template, "", "", &conversation(), true)
            .unwrap_err();
        assert!(
            e.to_string().contains("1024 MiB of memory"),
            "{template}: {e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    }
    // Below the limit the same construction renders (the limit is not set too tight): 2^20
    // copies of 8 bytes = 8 MiB, printed as its length.
    let ok = renderer()
        .render(
            "{% set ns = namespace(s='abcdefgh') %}{% for i in range(20) %}\
             {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "",
            "",
            &conversation(),
            true,
        )
        .unwrap();
    assert_eq!(ok, (8u64 << 20).to_string());
}

#[cfg(unix)]
#[test]
fn a_renderer_past_its_deadline_is_stopped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hanging-renderer");
    std::fs::write(&exe, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = TemplateRenderer {
        exe,
        deadline: Duration::from_millis(300),
    };
    let t0 = Instant::now();
    let e = r.render("hi", "", "", &[], true).unwrap_err();
    assert!(e.to_string().contains("longer than 0.3 s"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn a_missing_renderer_is_named() {
    let r = TemplateRenderer::new(PathBuf::from("/nonexistent/bitnet"));
    let e = r.render("hi", "", "", &[], true).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/bitnet"), "{e}");
}

/// Informational: what one out-of-process rendering costs (a process start), printed.
#[test]
fn render_cost_is_printed() {
    let msgs = conversation();
    let n = 20;
    let t0 = Instant::now();
    for _ in 0..n {
        renderer()
            .render("{{ messages|length }}", "", "", &msgs, true)
            .unwrap();
    }
    eprintln!(
        "one chat-template rendering in a child process: {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}
