//! Chat templates rendered in a child process with a memory limit and a deadline.
//!
//! A chat template comes from the model's files, which may be hostile. In-process, minijinja's
//! fuel bounds the instructions a template runs and the writer bounds what it prints, but nothing
//! bounds the strings it builds between instructions:
//! `{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}` doubles a string 31 times in
//! about a hundred instructions (2 GiB), and in Rust a failed allocation aborts the whole process
//! (the server with every open request, the chat session). So the binary renders each prompt in a
//! child process — itself, started with [`CHILD_ARG`] — under an address-space limit (Linux) and
//! a wall-clock deadline (everywhere). A template that breaks either fails that one rendering
//! with an error naming the cause; the parent goes on. The cost is one process start per
//! rendering (BENCHMARKS.md has it), paid once per chat turn or chat request, not per token.
//!
//! Hand-written rather than a crate: what is needed is a spawn, three pipes, `try_wait` against a
//! deadline and one `setrlimit`; the sandboxing crates (seccomp, namespaces) bound other things.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ChatMessage;
use crate::error::{BitnetError, Result};

/// The hidden first argument that makes the `bitnet` binary a template renderer
/// ([`child_main`]): a request on stdin, the reply on stdout.
pub const CHILD_ARG: &str = "__render-chat-template";

/// Address space the renderer may use: the binary and its libraries take ~30 MB of it, a real
/// chat template a few MB more; 2^30 leaves room for any conversation that fits a context.
pub const MEMORY_LIMIT_BYTES: u64 = 1 << 30;

/// Wall-clock bound of one rendering. Fuel already bounds the instructions (a real template
/// renders in well under a millisecond); this bounds the time of what fuel does not count and a
/// child that hangs for any other reason.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Where and how chat templates render out of process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRenderer {
    /// The program started with [`CHILD_ARG`]; it must call [`child_main`] for it (the `bitnet`
    /// binary does).
    pub exe: PathBuf,
    /// Wall-clock bound of one rendering.
    pub deadline: Duration,
}

impl TemplateRenderer {
    /// `exe` with the default [`DEADLINE`].
    pub fn new(exe: PathBuf) -> Self {
        TemplateRenderer {
            exe,
            deadline: DEADLINE,
        }
    }
}

static RENDERER: OnceLock<TemplateRenderer> = OnceLock::new();

/// Makes every later chat-template rendering of this process run in a child process
/// (`bitnet` passes its own path, `std::env::current_exe()`). Without this call, rendering stays
/// in-process (library users, tests, the fuzz targets), with fuel and the output bound but no
/// memory bound. The first call wins; returns whether `renderer` is the one in use now.
pub fn render_in_child_processes(renderer: TemplateRenderer) -> bool {
    RENDERER.get_or_init(|| renderer.clone()) == &renderer
}

/// The renderer set by [`render_in_child_processes`], if any.
pub(crate) fn renderer() -> Option<&'static TemplateRenderer> {
    RENDERER.get()
}

/// What the parent sends: the arguments of [`super::render_chat_template_in_process`].
#[derive(Serialize, Deserialize)]
struct RenderRequest {
    template: String,
    bos_token: String,
    eos_token: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
}

/// What the child answers.
#[derive(Serialize, Deserialize)]
enum RenderReply {
    Rendered(String),
    Failed(String),
}

impl TemplateRenderer {
    /// Renders in a child process (see the module comment); the arguments are those of
    /// [`super::render_chat_template`].
    pub fn render(
        &self,
        template: &str,
        bos_token: &str,
        eos_token: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let request = serde_json::to_vec(&RenderRequest {
            template: template.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            messages: messages.to_vec(),
            add_generation_prompt,
        })
        .map_err(|e| {
            BitnetError::ChatTemplate(format!("cannot encode the rendering request: {e}"))
        })?;
        let failed = |what: String| BitnetError::ChatTemplate(what);
        let exe = &self.exe;
        let mut child = Command::new(exe)
            .arg(CHILD_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                failed(format!(
                    "cannot start the template renderer {}: {e}",
                    exe.display()
                ))
            })?;
        // Three pipes served by three threads: a child blocked writing a full stdout pipe while the
        // parent still writes its stdin would otherwise deadlock.
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let writer = std::thread::spawn(move || {
            ignore_sigpipe_in_this_thread();
            stdin.write_all(&request)
        });
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).map(|_| out)
        });
        let err_reader = std::thread::spawn(move || {
            // The child's stderr only says why it died (one line); more is not kept.
            let mut err = Vec::new();
            let _ = stderr.take(64 << 10).read_to_end(&mut err);
            err
        });
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() >= self.deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(500)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!(
                        "cannot wait for the template renderer: {e}"
                    )));
                }
            }
        };
        // A failed write (the child died before reading its request) shows in the child's status.
        let _ = writer.join();
        let out = reader.join().ok().and_then(|r| r.ok()).unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(failed(format!(
                "rendering took longer than {:.1} s (a template that loops without end?); it was \
             stopped",
                self.deadline.as_secs_f64()
            )));
        };
        if status.success() {
            return match serde_json::from_slice::<RenderReply>(&out) {
                Ok(RenderReply::Rendered(text)) => Ok(text),
                Ok(RenderReply::Failed(msg)) => Err(failed(msg)),
                Err(e) => Err(failed(format!(
                    "the template renderer answered something unreadable: {e}"
                ))),
            };
        }
        let err = String::from_utf8_lossy(&err);
        if err.contains("memory allocation of") {
            return Err(failed(format!(
                "rendering needed more than {} MiB of memory (a template that \
             builds huge strings?); it was stopped",
                MEMORY_LIMIT_BYTES >> 20
            )));
        }
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(failed(format!(
            "the template renderer failed ({status}){}{last}",
            if last.is_empty() { "" } else { ": " }
        )))
    }
}

/// The child's side: reads one [`RenderRequest`] from stdin, then limits its own address space
/// and renders in-process; the reply goes to stdout as JSON. Exit status 0 whenever a reply was
/// written (a template error is a reply); an allocation beyond the limit aborts this process
/// only, and the parent reports it.
pub fn child_main() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("cannot read the rendering request: {e}");
        return ExitCode::FAILURE;
    }
    let request: RenderRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("the rendering request is not valid: {e}");
            return ExitCode::FAILURE;
        }
    };
    drop(input);
    if let Err(e) = limit_address_space(MEMORY_LIMIT_BYTES) {
        eprintln!("cannot limit the renderer's memory: {e}");
        return ExitCode::FAILURE;
    }
    let reply = match super::render_chat_template_in_process(
        &request.template,
        &request.bos_token,
        &request.eos_token,
        &request.messages,
        request.add_generation_prompt,
    ) {
        Ok(text) => RenderReply::Rendered(text),
        Err(BitnetError::ChatTemplate(msg)) => RenderReply::Failed(msg),
        Err(e) => RenderReply::Failed(e.to_string()),
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &reply)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the rendering reply: {e}");
            ExitCode::FAILURE
        }
    }
}

/// RLIMIT_AS of this process (Linux; elsewhere only the deadline bounds the child).
#[cfg(target_os = "linux")]
fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct passed by pointer and changes only this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CLI restores SIGPIPE's default action (so that `bitnet info | head -1` ends quietly);
/// a child that dies before reading its request must not kill the parent through it. A write's
/// SIGPIPE goes to the writing thread: blocked here, the write fails with EPIPE instead, and the
/// pending signal ends with the thread.
#[cfg(target_os = "linux")]
fn ignore_sigpipe_in_this_thread() {
    // SAFETY: sigemptyset/sigaddset fill a local set; pthread_sigmask changes only this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(not(target_os = "linux"))]
fn ignore_sigpipe_in_this_thread() {}

#[cfg(not(target_os = "linux"))]
fn limit_address_space(_bytes: u64) -> std::io::Result<()> {
    Ok(())
}
