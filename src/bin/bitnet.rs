//! `bitnet`: the command-line face of the library. A thin layer: parse arguments, load, call the
//! library, print. Errors are printed as one line (`error: ...`, the causes joined, never a
//! backtrace: those are for panics, i.e. bugs) with a non-zero exit status.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, FinishReason, HeadFormat, KvDtype};
use bitnet_wgpu::sampler::{Sampler, SamplerConfig};
use bitnet_wgpu::tokenizer::ChatMessage;

/// The model that ships with the project: a tiny BitNet b1.58 trained on public-domain stories.
const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-bitnet");

#[derive(Parser)]
#[command(
    name = "bitnet",
    version,
    about = "Run BitNet b1.58 ternary language models on any GPU (wgpu) or the CPU, and measure them",
    long_about = "Run BitNet b1.58 ternary language models (e.g. microsoft/bitnet-b1.58-2B-4T) from a \
Hugging Face model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) \
or a GGUF file (I2_S from bitnet.cpp, TQ1_0/TQ2_0 from llama.cpp).\n\n\
Without --model, the small model bundled in assets/tiny-bitnet is used (or $BITNET_MODEL)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout; statistics go to stderr).
    Generate(GenerateArgs),
    /// Interactive multi-turn chat; the KV cache is kept between turns. /reset clears, /exit quits.
    Chat(ChatArgs),
    /// Write the logits of every position of a token sequence to a float32 .npy [n_tokens, vocab].
    Logits(LogitsArgs),
    /// Perplexity of a text file (sliding windows, like llama-perplexity / the HF guide).
    #[command(mut_arg("ctx", |a| a.help("Window length in tokens (default: 512, at most max_position_embeddings)")))]
    Perplexity(PerplexityArgs),
    /// Measure prefill (ppN) and decode (tgN) speed like llama-bench, with energy where sensors exist.
    Bench(BenchArgs),
    /// Show a model's architecture, parameter counts, weight variant and memory needs.
    Info(InfoArgs),
    /// Download a Hugging Face repo into the standard HF cache ($HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub; $HF_ENDPOINT picks the hub), resuming and checksumming.
    Pull(PullArgs),
    /// OpenAI-compatible HTTP server (chat/completions, completions, models, health, metrics)
    /// with continuous batching of up to --parallel sequences.
    Serve(ServeArgs),
    /// Load generator for an OpenAI-compatible server: C clients x M tokens, aggregate tokens/s,
    /// time to first token and inter-token latency.
    BenchServe(BenchServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Model folder (Hugging Face layout). Default: $BITNET_MODEL, else the bundled tiny model.
    #[arg(short, long, value_name = "DIR", conflicts_with = "synthetic")]
    model: Option<PathBuf>,
    /// Random weights of a real shape (2b4t, large, tiny) for load tests; text goes through the
    /// bundled model's tokenizer and requests run to max_tokens (there is no end token).
    #[arg(long, value_name = "PRESET")]
    synthetic: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// CPU threads (default: one per physical core).
    #[arg(short, long, default_value_t = 0)]
    threads: usize,
    /// Positions per sequence slot (default: the model's max_position_embeddings, at most 2048).
    #[arg(long)]
    ctx: Option<usize>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (KV-cache slots); more requests wait in the queue.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Rows per model step at most: one decode row per running sequence plus a prompt chunk.
    #[arg(long, default_value_t = 256)]
    step_tokens: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (health and metrics stay open).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Requests waiting for a slot at most; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Request body limit in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Time limit of a non-streaming request, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Args)]
struct BenchServeArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent clients per level (comma-separated levels, run in order).
    #[arg(short = 'c', long, default_value = "1,4,8,16", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Requests each client sends per level, back to back.
    #[arg(short = 'r', long, default_value_t = 2)]
    requests: usize,
    /// Tokens per request (generated with ignore_eos, greedy).
    #[arg(short = 'n', long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(short, long, default_value = "Once upon a time")]
    prompt: String,
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PullArgs {
    /// Repo id, e.g. microsoft/bitnet-b1.58-2B-4T-gguf.
    repo: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Only files matching this glob (repeatable), e.g. --include '*.gguf'.
    #[arg(long, value_name = "PATTERN")]
    include: Vec<String>,
}

fn pull(a: PullArgs) -> Result<()> {
    let cache = bitnet_wgpu::pull::cache_dir();
    let p = bitnet_wgpu::pull::pull(None, &cache, &a.repo, &a.revision, &a.include, true)
        .with_context(|| format!("cannot pull {}", a.repo))?;
    for (f, fresh) in &p.files {
        println!("{} {f}", if *fresh { "downloaded" } else { "cached    " });
    }
    println!("snapshot {} (commit {})", p.snapshot.display(), p.commit);
    println!("use it with: --model {}", a.repo);
    Ok(())
}

/// `--model` values that are not a path but a repo id in the HF cache resolve to its snapshot.
fn resolve_model(p: PathBuf) -> PathBuf {
    if p.exists() {
        return p;
    }
    let id = p.to_string_lossy();
    bitnet_wgpu::pull::resolve_cached(&bitnet_wgpu::pull::cache_dir(), &id).unwrap_or(p)
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model folder (Hugging Face layout), .gguf file, or a repo id in the HF cache
    /// (ORG/NAME or ORG/NAME:FILE, see `bitnet pull`). Default: $BITNET_MODEL, else the
    /// bundled tiny model.
    #[arg(short, long, value_name = "DIR|FILE.gguf")]
    model: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// CPU threads (default: one per physical core; at most 4 per core).
    #[arg(short, long, default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Context length in tokens (default: the model's max_position_embeddings, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
}

/// Where and in which format the model runs (shared by the model commands and `bench`).
#[derive(Args, Clone)]
struct DeviceArgs {
    /// Where to run: auto (a hardware GPU if usable, else CPU), cpu, or gpu.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|gpu")]
    device: DeviceChoice,
    /// Use the GPU adapter whose name contains this text.
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// LM head storage: exact (the checkpoint's floats), q8 (CPU and GPU: int8 with a scale per
    /// 64 columns, ~1.9x less memory traffic per token, logits within ~1e-3 relative) or q4
    /// (CPU only: 4-bit with a bf16 scale per 64 columns, ~3.8x less traffic than bf16, logits
    /// within a few % of their spread; see the README for what it costs in perplexity).
    #[arg(long, default_value = "exact", value_name = "exact|q8|q4")]
    lm_head: HeadFormat,
    /// KV cache storage: f16 (half the memory and attention traffic; logits move by up to
    /// ~1e-2 of their range, see the README) or f32 (the exact semantics). Default: f16 on a
    /// GPU, f32 on the CPU.
    #[arg(long, value_name = "f16|f32")]
    kv_cache: Option<KvDtype>,
    /// GGUF I2_S block layout: x86 (Microsoft's published files) or arm (written by bitnet.cpp
    /// built for ARM; the file does not record it).
    #[arg(long, default_value = "x86", value_name = "x86|arm")]
    i2s_layout: bitnet_wgpu::gguf::I2sLayout,
    /// GGUF: override the FFN activation implied by the architecture name (llama.cpp's `bitnet`
    /// and `llama` mean silu; relu2 for a file known to be converted from 2B4T).
    #[arg(long, value_name = "relu2|silu")]
    ffn_activation: Option<bitnet_wgpu::config::FfnActivation>,
}

impl DeviceArgs {
    fn gguf_options(&self) -> bitnet_wgpu::gguf::GgufOptions {
        bitnet_wgpu::gguf::GgufOptions {
            i2s_layout: self.i2s_layout,
            activation: self.ffn_activation,
        }
    }

    fn engine_options(&self, threads: usize, ctx: Option<usize>, progress: bool) -> EngineOptions {
        EngineOptions {
            device: self.device,
            adapter: self.adapter.clone(),
            threads,
            ctx,
            progress,
            lm_head: self.lm_head,
            kv_cache: self.kv_cache,
            gguf: self.gguf_options(),
        }
    }
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        self.dir_and_source().0
    }

    /// The model folder, and where it came from when that was not --model (for error messages).
    fn dir_and_source(&self) -> (PathBuf, &'static str) {
        match (&self.model, std::env::var_os("BITNET_MODEL")) {
            (Some(m), _) => (resolve_model(m.clone()), ""),
            // An empty BITNET_MODEL= (a common way to "unset" it) means unset, not the cwd.
            (None, Some(env)) if !env.is_empty() => {
                (resolve_model(PathBuf::from(env)), " (from $BITNET_MODEL)")
            }
            _ => (PathBuf::from(BUNDLED_MODEL), ""),
        }
    }

    fn load(&self) -> Result<Engine> {
        let (dir, source) = self.dir_and_source();
        let opts = self.device.engine_options(self.threads, self.ctx, true);
        let engine = Engine::load(&dir, &opts)
            .with_context(|| format!("cannot load the model in {}{source}", dir.display()))?;
        if let Some(note) = &engine.device_note {
            eprintln!("note: {note}");
        }
        Ok(engine)
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the k most likely tokens only (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens seen in the last 64 (1 = off).
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Random seed (same seed, same text).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn sampler(&self) -> Result<Sampler> {
        // Greedy means plain argmax: no penalty either, so --temperature 0 is exactly reproducible.
        let greedy = self.temperature == 0.0;
        Ok(Sampler::new(SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: if greedy { 1.0 } else { self.repeat_penalty },
            repeat_last_n: 64,
            seed: self.seed,
        })?)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt text.
    #[arg(short, long, conflicts_with_all = ["tokens", "prompt_file"])]
    prompt: Option<String>,
    /// Read the prompt from a UTF-8 text file.
    #[arg(long, value_name = "FILE", conflicts_with = "tokens")]
    prompt_file: Option<PathBuf>,
    /// The prompt as comma-separated token ids (no tokenization, no BOS added).
    #[arg(long, value_name = "ID,ID,...")]
    tokens: Option<String>,
    /// Wrap the prompt in the model's chat format (a user turn, then the assistant's cue).
    #[arg(long, conflicts_with = "tokens")]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Print one JSON object (token_ids, text, finish_reason, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System message that starts the conversation.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_name = "ID,ID,...", required_unless_present = "prompt")]
    tokens: Option<String>,
    /// Text to tokenize (with the BOS the tokenizer adds) instead of --tokens.
    #[arg(short, long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Output .npy file: float32 [n_tokens, vocab_size].
    #[arg(short, long, value_name = "FILE.npy")]
    out: PathBuf,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(short, long, value_name = "TEXT")]
    file: PathBuf,
    /// Start a new window every N tokens (default: half the window).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stride: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Model folder or .gguf file to measure (or use --synthetic).
    #[arg(
        short,
        long,
        value_name = "DIR|FILE.gguf",
        conflicts_with = "synthetic"
    )]
    model: Option<PathBuf>,
    /// Random weights of a real shape built in memory: 2b4t, large (0.7B) or tiny.
    #[arg(long, value_name = "PRESET")]
    synthetic: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt lengths for the prefill tests (comma-separated; 0 = none).
    #[arg(
        short = 'p',
        long = "n-prompt",
        default_value = "512",
        value_delimiter = ','
    )]
    n_prompt: Vec<usize>,
    /// Generated tokens for the decode tests (comma-separated; 0 = none).
    #[arg(
        short = 'n',
        long = "n-gen",
        default_value = "128",
        value_delimiter = ','
    )]
    n_gen: Vec<usize>,
    /// Sequences decoded together in each decode test (comma-separated): one row of each per
    /// step, as `bitnet serve` batches its requests, reported as `tg128 x8`, tokens/s counting
    /// every sequence's tokens. Compare `-b 1,8` to see how a backend scales with the rows of a
    /// step.
    #[arg(short = 'b', long, default_value = "1", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Repetitions per test (after one warm-up).
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// CPU thread counts to test (comma-separated; default: one per physical core).
    #[arg(short = 't', long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Context depths to pre-fill before each test (comma-separated).
    #[arg(short = 'd', long, default_value = "0", value_delimiter = ',')]
    depth: Vec<usize>,
    /// Output format: md (llama-bench style table), json or csv.
    #[arg(short = 'o', long, default_value = "md")]
    output: String,
    /// Draw tokens/s (and J/token where measured) against depth or threads into FILE.svg/.png.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// No sensor? Declare the wall power (W) you read on a meter; results are labelled estimates.
    #[arg(long, value_name = "W", allow_negative_numbers = true, value_parser = positive_f64)]
    power_watts: Option<f64>,
    /// With --power-watts: the idle wall power (W) you read before the run.
    #[arg(long, value_name = "W", requires = "power_watts", allow_negative_numbers = true, value_parser = non_negative_f64)]
    idle_watts: Option<f64>,
    /// Seconds of idle power measurement before the run (0 = skip).
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true, value_parser = non_negative_f64)]
    idle_seconds: f64,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
}

/// A finite number ≥ 0 (a NaN, inf or negative count of seconds or watts is a typo, and
/// `Duration::from_secs_f64` panics on them).
fn non_negative_f64(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x >= 0.0) {
        return Err(format!("{s} must be a finite number ≥ 0"));
    }
    Ok(x)
}

/// A finite number > 0.
fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    let x = non_negative_f64(s)?;
    if x == 0.0 {
        return Err(format!("{s} must be > 0"));
    }
    Ok(x)
}

/// `println!` that returns the write error (a closed pipe) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--tokens: {t:?} is not a token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(ids)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn main() -> ExitCode {
    // The child that renders a chat template (tokenizer/sandbox.rs): nothing else of the CLI.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == bitnet_wgpu::tokenizer::TEMPLATE_RENDERER_ARG)
    {
        return bitnet_wgpu::tokenizer::template_renderer_main();
    }
    // First, while the process has one thread: both change process-wide state. The server and
    // its load generator keep SIGPIPE ignored: a peer closing its socket must not kill them.
    ensure_runtime_dir();
    let cli = Cli::parse();
    // Chat templates come from the model's files: rendered in a memory-limited child process, a
    // hostile one fails its prompt instead of aborting this process.
    match std::env::current_exe() {
        Ok(exe) => {
            bitnet_wgpu::tokenizer::render_in_child_processes(
                bitnet_wgpu::tokenizer::TemplateRenderer::new(exe),
            );
        }
        Err(e) => eprintln!(
            "warning: cannot find this program's path ({e}); chat templates render in-process, \
             without a memory limit"
        ),
    }
    if !matches!(cli.command, Command::Serve(_) | Command::BenchServe(_)) {
        restore_sigpipe();
    }
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Logits(a) => logits(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench(a),
        Command::Pull(a) => pull(a),
        Command::Serve(a) => serve(a),
        Command::BenchServe(a) => bench_serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`bitnet info | head -1`): nothing left to say to anyone.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. A cause whose text its wrapper already printed (the
/// library's messages embed their io::Error source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Rust ignores SIGPIPE, so a write to a closed pipe (`bitnet info | head -1`) is an error that
/// `println!` turns into a panic. Restore the default: the process ends quietly at once, as
/// every Unix filter does.
fn restore_sigpipe() {
    #[cfg(target_os = "linux")]
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" when it is unset
/// (containers, cron, ssh without a session). Give the process a private one: a 0700 folder of
/// this user under the temp dir, reused between runs. Left alone if it cannot be made private.
fn ensure_runtime_dir() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|v| !v.is_empty()) {
            return;
        }
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        let dir = std::env::temp_dir().join(format!("bitnet-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        // Only a folder that is ours and closed to others (someone may have made it first).
        let private = std::fs::symlink_metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0);
        if private {
            // No other thread exists yet (see main), so nothing reads the environment meanwhile.
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    use bitnet_wgpu::serve::{ModelSource, ServeOptions};
    // tower-http's request traces: RUST_LOG=tower_http=debug (default: off; 503s while loading
    // are answers, not failures)
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tower_http=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let model = match a.synthetic {
        Some(preset) => ModelSource::Synthetic {
            preset,
            tokenizer_dir: PathBuf::from(BUNDLED_MODEL),
        },
        None => ModelSource::Dir(
            a.model
                .or_else(|| std::env::var_os("BITNET_MODEL").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(BUNDLED_MODEL)),
        ),
    };
    let mut o = ServeOptions::new(model);
    o.engine = a.device.engine_options(a.threads, None, false);
    o.host = a.host;
    o.port = a.port;
    o.parallel = a.parallel;
    o.ctx = a.ctx;
    o.step_tokens = a.step_tokens;
    o.api_key = a.api_key;
    o.queue = a.queue;
    o.body_limit = a.max_body;
    o.request_timeout = std::time::Duration::from_secs(a.timeout);
    o.handle_signals = true;
    let server = bitnet_wgpu::serve::start(o)?;
    // stdout, one line: scripts and tests read the address from it (--port 0)
    println!("listening on http://{}", server.addr());
    std::io::stdout().flush()?;
    if let Err(e) = server.wait_ready(std::time::Duration::from_secs(3600)) {
        server.shutdown()?;
        return Err(e.into());
    }
    server.join()?;
    eprintln!("bitnet serve: stopped");
    Ok(())
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use bitnet_wgpu::serve::bench;
    if a.clients.is_empty() || a.clients.contains(&0) || a.requests == 0 || a.max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let o = bench::BenchOptions {
        url: a.url,
        clients: a.clients,
        requests: a.requests,
        max_tokens: a.max_tokens,
        prompt: a.prompt,
        api_key: a.api_key,
        timeout: std::time::Duration::from_secs(3600),
    };
    let results = bench::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", bench::markdown(&results));
    }
    let dropped: usize = results.iter().map(|r| r.dropped).sum();
    if dropped > 0 {
        bail!("{dropped} requests did not complete with all their tokens");
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let mut sampler = a.sampling.sampler()?;
    let mut engine = a.model.load()?;
    let prompt_ids = if let Some(t) = &a.tokens {
        parse_tokens(t)?
    } else {
        let text = match (&a.prompt, &a.prompt_file) {
            (Some(p), _) => p.clone(),
            (None, Some(f)) => read_text(f)?,
            (None, None) => {
                bail!("give a prompt: --prompt TEXT, --prompt-file FILE or --tokens IDS")
            }
        };
        if a.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", &text));
            engine.tokenizer.encode_chat(&msgs, true)?
        } else {
            engine.tokenizer.encode(&text, true)?
        }
    };
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    // A failed write (the reader closed the pipe) stops generation at once.
    let mut write_error = None;
    let g = engine.generate_until(
        &prompt_ids,
        a.sampling.max_tokens,
        &mut sampler,
        a.sampling.ignore_eos,
        |piece| {
            if json {
                return ControlFlow::Continue(());
            }
            match stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(anyhow::Error::new(e).context("writing the generated text to stdout"));
    }
    if json {
        let v = serde_json::json!({
            "token_ids": g.token_ids,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "prompt_ids": prompt_ids,
            "prompt_tokens": g.prompt_tokens,
            "prefill_s": g.prefill_s,
            "decode_s": g.decode_s,
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "backend": engine.model.backend_name(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{}] prompt {} tokens in {:.3} s ({:.1} t/s); generated {} tokens, {:.1} t/s decode; stop: {:?}",
            engine.model.backend_name(),
            g.prompt_tokens,
            g.prefill_s,
            g.prompt_tokens as f64 / g.prefill_s.max(1e-9),
            g.token_ids.len(),
            g.decode_tokens_per_s(),
            g.finish_reason
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let mut sampler = a.sampling.sampler()?;
    let mut engine = a.model.load()?;
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    eprintln!(
        "bitnet chat: {} on {}. Type a message; /reset clears the conversation, /exit or Ctrl-D quits; Ctrl-C ends an answer.",
        engine.files.dir.display(),
        engine.model.backend_name()
    );
    catch_ctrl_c();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut raw = Vec::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        raw.clear();
        if input.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        // One bad message ends that message, not the conversation.
        let Ok(line) = std::str::from_utf8(&raw) else {
            eprintln!("error: that message is not valid UTF-8; type it again");
            continue;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                engine.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        match chat_turn(&a, &mut engine, &mut sampler, &mut messages) {
            Ok(answer) => messages.push(ChatMessage::new("assistant", answer.trim())),
            Err(e) => {
                messages.pop();
                eprintln!("error: {}", one_line(&e));
            }
        }
    }
    Ok(())
}

/// Set by the SIGINT handler while an answer is being generated.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Whether an answer is being generated (Ctrl-C then ends the answer, else the program).
static ANSWERING: AtomicBool = AtomicBool::new(false);

/// Ctrl-C during an answer ends the answer and returns to the prompt; at the prompt it quits.
fn catch_ctrl_c() {
    #[cfg(target_os = "linux")]
    {
        extern "C" fn on_sigint(_: libc::c_int) {
            if ANSWERING.load(Ordering::SeqCst) {
                INTERRUPTED.store(true, Ordering::SeqCst);
            } else {
                // SAFETY: _exit is async-signal-safe. 130 = killed by SIGINT, as shells report.
                unsafe { libc::_exit(130) };
            }
        }
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe.
        unsafe {
            libc::signal(
                libc::SIGINT,
                on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// One answer of `chat`: the prompt for `messages` (oldest turns dropped to leave room), streamed.
fn chat_turn(
    a: &ChatArgs,
    engine: &mut Engine,
    sampler: &mut Sampler,
    messages: &mut Vec<ChatMessage>,
) -> Result<String> {
    let mut ids = engine.tokenizer.encode_chat(messages, true)?;
    // Drop the oldest turns (never the system message) until the prompt leaves room to answer.
    let room = a.sampling.max_tokens.min(engine.model.ctx() / 2);
    while ids.len() + room > engine.model.ctx()
        && messages.iter().filter(|m| m.role != "system").count() > 1
    {
        let first = messages.iter().position(|m| m.role != "system").unwrap();
        messages.remove(first);
        ids = engine.tokenizer.encode_chat(messages, true)?;
    }
    let mut stdout = std::io::stdout().lock();
    INTERRUPTED.store(false, Ordering::SeqCst);
    ANSWERING.store(true, Ordering::SeqCst);
    let g = engine.generate_until(
        &ids,
        a.sampling.max_tokens,
        sampler,
        a.sampling.ignore_eos,
        |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            if INTERRUPTED.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    );
    ANSWERING.store(false, Ordering::SeqCst);
    let g = g?;
    writeln!(stdout)?;
    if g.finish_reason == FinishReason::Cancelled {
        eprintln!("(answer interrupted)");
    }
    Ok(g.text)
}

fn logits(a: LogitsArgs) -> Result<()> {
    let mut engine = a.model.load()?;
    let ids = match (&a.tokens, &a.prompt) {
        (Some(t), _) => parse_tokens(t)?,
        (None, Some(p)) => engine.tokenizer.encode(p, true)?,
        (None, None) => bail!("give --tokens or --prompt"),
    };
    let logits = engine.logits(&ids)?;
    let vocab = engine.config.vocab_size;
    bitnet_wgpu::npy::write_f32(&a.out, &[ids.len(), vocab], &logits).map_err(|e| match e {
        // The library's io error says "cannot read": here it was a write.
        bitnet_wgpu::BitnetError::Io { source, .. } => {
            anyhow::anyhow!("cannot write {}: {source}", a.out.display())
        }
        e => anyhow::Error::new(e).context(format!("cannot write {}", a.out.display())),
    })?;
    eprintln!(
        "wrote {} [{}, {}] float32 ({})",
        a.out.display(),
        ids.len(),
        vocab,
        engine.model.backend_name()
    );
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = read_text(&a.file)?;
    let mut margs = a.model.clone();
    let model_path = margs.dir();
    let config = if bitnet_wgpu::gguf::is_gguf_path(&model_path) {
        bitnet_wgpu::gguf::read_config(&model_path)
    } else {
        bitnet_wgpu::config::ModelConfig::from_file(&model_path.join("config.json"))
    };
    let max_pos = config
        .with_context(|| format!("cannot load the model in {}", margs.dir().display()))?
        .max_position_embeddings;
    let window = margs.ctx.unwrap_or(512.min(max_pos));
    if window > max_pos {
        bail!("--ctx {window} is longer than the model's max_position_embeddings {max_pos}");
    }
    margs.ctx = Some(window);
    let mut engine = margs.load()?;
    let stride = match a.stride {
        Some(s) => usize::try_from(s).context("--stride is too large")?,
        None => (window / 2).max(1),
    };
    let ids = engine.tokenizer.encode(&text, false)?;
    let bar = indicatif::ProgressBar::new(0);
    let t0 = std::time::Instant::now();
    let r =
        bitnet_wgpu::perplexity::perplexity(&mut engine, &ids, window, stride, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
    bar.finish_and_clear();
    if a.json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!(
            "perplexity {:.4} over {} scored tokens ({} tokens, {} windows of {} with stride {}) in {:.1} s on {}",
            r.ppl,
            r.n_scored,
            r.n_tokens,
            r.n_windows,
            r.ctx,
            r.stride,
            t0.elapsed().as_secs_f64(),
            engine.model.backend_name()
        );
    }
    Ok(())
}

/// Bytes in the largest binary unit that keeps the number ≥ 1.
fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1048576 => format!("{:.1} KiB", b / 1024.0),
        1048576..1073741824 => format!("{:.1} MiB", b / 1048576.0),
        _ => format!("{:.2} GiB", b / 1073741824.0),
    }
}

/// A parameter count in B or M.
fn count(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.3} B", n as f64 / 1e9)
    } else {
        format!("{:.3} M", n as f64 / 1e6)
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let engine = a.model.load()?;
    let c = &engine.config;
    let w = &engine.weights;
    match &engine.files.gguf {
        None => {
            outln!("model folder     {}", engine.files.dir.display());
            outln!("format           Hugging Face folder (safetensors)");
            outln!("architecture     {}", c.family.describe());
        }
        Some(g) => {
            outln!("model file       {}", engine.files.dir.display());
            outln!("format           GGUF v{}", g.version);
            outln!(
                "architecture     {} ({})",
                g.architecture,
                c.family.describe()
            );
            let types: Vec<String> = g
                .tensor_types
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            outln!("tensor types     {}", types.join(", "));
            for (k, line) in g.conversions.iter().enumerate() {
                let label = if k == 0 { "converted" } else { "" };
                outln!("{label:<17}{line}");
            }
            if let Some(l) = g.i2s_layout {
                outln!("i2_s layout      {l:?} (--i2s-layout)");
            }
        }
    }
    outln!(
        "ffn activation   {}{}",
        c.activation.name(),
        engine
            .files
            .gguf
            .as_ref()
            .map(|g| format!(" ({})", g.activation_source))
            .unwrap_or_default()
    );
    outln!(
        "sub-norms        {}",
        if c.sub_norms {
            "attn_sub_norm before o_proj, ffn_sub_norm before down_proj"
        } else {
            "none (o_proj and down_proj quantize their inputs as they are)"
        }
    );
    outln!(
        "shape            hidden {}, intermediate {}, layers {}, heads {} (kv {}), head_dim {}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    outln!("vocab            {}", c.vocab_size);
    let ctx = engine.model.ctx();
    outln!(
        "context          {ctx} positions in use (--ctx; max_position_embeddings {}, rope_theta {})",
        c.max_position_embeddings, c.rope_theta
    );
    outln!("weights          {}", c.variant.describe());
    outln!(
        "lm head          {}",
        match &w.lm_head {
            None => "tied to the embedding (unquantized)".to_string(),
            Some(m) => format!("separate {} {:?}, unquantized", m.name, m.dtype),
        }
    );
    outln!(
        "parameters       {} ternary + {} float = {}",
        count(c.ternary_params()),
        count(c.float_params()),
        count(c.ternary_params() + c.float_params())
    );
    let ternary = w.ternary_bytes() as u64;
    let emb = w.embed_tokens.bytes() as u64 + w.lm_head.as_ref().map_or(0, |m| m.bytes() as u64);
    outln!(
        "memory           {} packed ternary weights + {} embedding/head",
        gib(ternary),
        gib(emb)
    );
    if let bitnet_wgpu::engine::AnyModel::Cpu(m) = &engine.model {
        let tables = m.backend.table_copy_bytes();
        if tables > 0 {
            outln!(
                "                 + {} table-lookup copy of the ternary weights (steps of several tokens; BITNET_CPU_NO_LUT=1 drops it)",
                gib(tables)
            );
        }
    }
    let kv = engine.model.kv_dtype();
    let kv_per_pos = c.kv_bytes_per_position() / 4 * kv.bytes();
    outln!(
        "kv cache         {} per token ({}{}), {} at the context of {ctx}",
        gib(kv_per_pos),
        kv.name(),
        if engine.options.kv_cache.is_some() {
            ", --kv-cache"
        } else {
            ", the device's default; --kv-cache f16|f32"
        },
        gib(kv_per_pos.saturating_mul(ctx as u64)),
    );
    outln!(
        "tokens           bos {}, stop {:?}",
        c.bos_token_id.map_or("none".to_string(), |b| b.to_string()),
        engine.stop_ids()
    );
    outln!("backend          {}", engine.model.backend_name());
    outln!("load time        {:.2} s", engine.load_time.as_secs_f64());
    let adapters = bitnet_wgpu::backend::wgpu::list_adapters();
    if adapters.is_empty() {
        outln!("gpu adapters     none found");
    }
    for (i, a) in adapters.iter().enumerate() {
        let label = if i == 0 { "gpu adapters" } else { "" };
        outln!("{label:<17}{a}");
        outln!("{:<17}{}", "", a.tiles);
    }
    // what a GPU would hold: the cache as asked, or the GPU's default
    let gpu_options = bitnet_wgpu::model::ModelOptions {
        kv_cache: engine.options.kv_cache,
        ..engine.model_options()
    };
    let need = bitnet_wgpu::backend::wgpu::estimate_memory(
        c,
        &gpu_options,
        w.embed_tokens.dtype.on_device().row_bytes(1) as u64,
    );
    outln!(
        "gpu memory       {} needed on a GPU (weights, {} KV cache, activations)",
        gib(need.total()),
        gpu_options
            .kv_dtype::<bitnet_wgpu::backend::wgpu::WgpuBackend>()
            .name()
    );
    if let Some(note) = &engine.device_note {
        outln!("auto device      {note}");
    }
    Ok(())
}

/// The most sequences a batched decode test runs together (each holds a KV-cache slot).
const MAX_BENCH_BATCH: usize = 1024;

fn bench(a: BenchArgs) -> Result<()> {
    use bitnet_wgpu::bench::{
        bench_series, build_for_tests, plot_series, render, run_metered, test_matrix, BenchResult,
        EnergyResult, OutputFormat, Summary,
    };
    use bitnet_wgpu::energy::{
        discover_sensors, peak_rss_bytes, reset_peak_rss, DiscoverOptions, EnergyMeter,
        WallMeterEstimate,
    };

    let format: OutputFormat = a
        .output
        .parse()
        .map_err(|e| anyhow::anyhow!("--output: {e}"))?;
    if let Some(p) = &a.plot {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "svg" && ext != "png" {
            bail!("--plot {}: use a .svg or .png file name", p.display());
        }
        // Before the run, not after minutes of it.
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(d) = parent.filter(|d| !d.is_dir()) {
            bail!(
                "--plot {}: folder {} does not exist",
                p.display(),
                d.display()
            );
        }
    }

    // Energy first, on the idle machine, before the model takes memory and threads.
    let (mut meter, na_reason) = match a.power_watts {
        Some(w) => {
            if !(w > 0.0 && w.is_finite()) {
                bail!("--power-watts {w} must be a positive number of watts");
            }
            let mut est = WallMeterEstimate::new(w);
            est.idle_watts = a.idle_watts;
            (Some(EnergyMeter::from_estimate(est)), String::new())
        }
        None => {
            let d = discover_sensors(&DiscoverOptions::default());
            let reason = d.na_reason();
            if d.sensors.is_empty() {
                (None, reason)
            } else {
                (Some(EnergyMeter::new(d.sensors)), reason)
            }
        }
    };
    let idle = match meter.as_mut() {
        Some(m) if a.idle_seconds > 0.0 || m.is_estimate() => {
            eprintln!(
                "measuring idle power for {} s ({})...",
                a.idle_seconds,
                m.source()
            );
            m.measure_idle(std::time::Duration::from_secs_f64(a.idle_seconds))?
        }
        _ => None,
    };

    if let Some(b) = a.batch.iter().find(|&&b| b == 0 || b > MAX_BENCH_BATCH) {
        bail!("--batch {b}: give a number of sequences from 1 to {MAX_BENCH_BATCH}");
    }
    let tests = test_matrix(&a.depth, &a.n_prompt, &a.n_gen, &a.batch);
    if tests.is_empty() {
        bail!("nothing to run: -p and -n are both 0");
    }
    let (weights, model_name, size) = match (&a.model, &a.synthetic) {
        (_, Some(p)) => {
            let mut config = bitnet_wgpu::synthetic::preset(p)?;
            // Random weights have no trained context length: a depth test past the real
            // model's (2B4T: 4096, like llama-bench's -d 4096 -p 512) only measures speed.
            let need = tests
                .iter()
                .map(|t| t.depth + t.n_tokens)
                .max()
                .unwrap_or(1);
            if need > config.max_position_embeddings {
                eprintln!(
                    "note: the synthetic {p} context is extended from {} to {need} positions for the depth tests",
                    config.max_position_embeddings
                );
                config.max_position_embeddings = need;
            }
            eprintln!("building random {p} weights in memory...");
            let w = bitnet_wgpu::synthetic::random_weights(&config, 1)?;
            let size = w.ternary_bytes() + w.embed_tokens.bytes();
            (w, format!("synthetic {p}"), size)
        }
        (Some(dir), None) => {
            let dir = &resolve_model(dir.clone());
            let (_, _, _, w) =
                bitnet_wgpu::load::load_model(dir, &a.device.gguf_options(), |_, _| {})?;
            let size = w.ternary_bytes()
                + w.embed_tokens.bytes()
                + w.lm_head.as_ref().map_or(0, |m| m.bytes());
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (w, name, size)
        }
        (None, None) => bail!("give --model DIR or --synthetic 2b4t"),
    };
    let threads = if a.threads.is_empty() {
        vec![bitnet_wgpu::backend::cpu::default_threads()]
    } else {
        a.threads.clone()
    };
    let params = weights.config.ternary_params() + weights.config.float_params();
    let reps = a.repetitions.max(1);
    let mut results = Vec::new();
    for &t in &threads {
        let opts = a.device.engine_options(t, None, false);
        let mut model = build_for_tests(&weights, &opts, &tests)?;
        for &spec in &tests {
            eprintln!(
                "running {} on {} ({} repetitions)...",
                spec.name(),
                model.backend_name(),
                reps
            );
            reset_peak_rss();
            let (times, energy) = run_metered(&mut model, spec, reps, 7, meter.as_mut())?;
            let tps = Summary::from_slice(&times.tokens_per_s()).context("no repetitions ran")?;
            let mut r = BenchResult {
                model: model_name.clone(),
                model_size_bytes: size as u64,
                params,
                backend: model.backend_name(),
                threads: t,
                test: spec.name(),
                n_tokens: spec.n_tokens,
                depth: spec.depth,
                batch: spec.batch,
                lm_head: a.device.lm_head.name().to_string(),
                kv_cache: model.kv_dtype().name().to_string(),
                tokens_per_s: tps,
                energy: None,
                energy_na_reason: None,
                peak_rss_bytes: peak_rss_bytes(),
                gpu_mem_bytes: None,
                gpu_work: times.gpu_work,
            };
            r.set_energy(match energy {
                None => Err(na_reason.clone()),
                Some(reading) => reading.and_then(|total| {
                    EnergyResult::from_reading(&total, (spec.tokens() * reps) as u64, idle.as_ref())
                        .ok_or_else(|| "no time measured".to_string())
                }),
            });
            results.push(r);
        }
    }
    println!("{}", render(format, &results)?);

    if let Some(path) = &a.plot {
        let series = bench_series(&results, a.depth.len() > 1 || threads.len() == 1);
        let title = format!("{model_name}: tokens/s");
        plot_series(
            path,
            &title,
            series.x_label,
            &series.speed,
            (!series.joules.is_empty()).then_some(&series.joules[..]),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
