//! `bitnet`: the command-line face of the library. A thin layer: parse arguments, load, call the
//! library, print. Errors are reported with context through anyhow and a non-zero exit status.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use bitnet_wgpu::engine::{DeviceChoice, Engine, EngineOptions, HeadFormat};
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
    Perplexity(PerplexityArgs),
    /// Measure prefill (ppN) and decode (tgN) speed like llama-bench, with energy where sensors exist.
    Bench(BenchArgs),
    /// Show a model's architecture, parameter counts, weight variant and memory needs.
    Info(InfoArgs),
    /// Download a Hugging Face repo into the standard HF cache ($HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub; $HF_ENDPOINT picks the hub), resuming and checksumming.
    Pull(PullArgs),
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
    /// CPU threads (default: one per physical core).
    #[arg(short, long, default_value_t = 0)]
    threads: usize,
    /// Context length in tokens (default: the model's max_position_embeddings).
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
    /// LM head storage: exact (the checkpoint's floats) or q8 (CPU only: int8 with a scale per
    /// 64 columns, ~1.9x less memory traffic per token, logits within ~1e-3 relative).
    #[arg(long, default_value = "exact", value_name = "exact|q8")]
    lm_head: HeadFormat,
    /// GGUF I2_S block layout: x86 (Microsoft's published files) or arm (written by bitnet.cpp
    /// built for ARM; the file does not record it).
    #[arg(long, default_value = "x86", value_name = "x86|arm")]
    i2s_layout: bitnet_wgpu::gguf::I2sLayout,
    /// GGUF: override the FFN activation implied by the architecture name (llama.cpp's `bitnet`
    /// means silu; relu2 for a file known to be converted from 2B4T).
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
            gguf: self.gguf_options(),
        }
    }
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        resolve_model(
            self.model
                .clone()
                .or_else(|| std::env::var_os("BITNET_MODEL").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(BUNDLED_MODEL)),
        )
    }

    fn load(&self) -> Result<Engine> {
        let dir = self.dir();
        let opts = self.device.engine_options(self.threads, self.ctx, true);
        let engine = Engine::load(&dir, &opts)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        if let Some(note) = &engine.device_note {
            eprintln!("note: {note}");
        }
        Ok(engine)
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample from the k most likely tokens only (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise tokens seen in the last 64 (1 = off).
    #[arg(long, default_value_t = 1.1)]
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
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
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
    /// Here --ctx is the window length (default 512, capped by max_position_embeddings).
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(short, long, value_name = "TEXT")]
    file: PathBuf,
    /// Start a new window every N tokens (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
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
    #[arg(long, value_name = "W")]
    power_watts: Option<f64>,
    /// With --power-watts: the idle wall power (W) you read before the run.
    #[arg(long, value_name = "W", requires = "power_watts")]
    idle_watts: Option<f64>,
    /// Seconds of idle power measurement before the run (0 = skip).
    #[arg(long, default_value_t = 3.0)]
    idle_seconds: f64,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Logits(a) => logits(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench(a),
        Command::Pull(a) => pull(a),
    }
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
    let g = engine.generate(
        &prompt_ids,
        a.sampling.max_tokens,
        &mut sampler,
        a.sampling.ignore_eos,
        |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
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
        "bitnet chat: {} on {}. Type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
        engine.files.dir.display(),
        engine.model.backend_name()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line.context("reading the next message from stdin (is it valid UTF-8?)")?;
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
        let mut ids = engine.tokenizer.encode_chat(&messages, true)?;
        // Drop the oldest turns (never the system message) until the prompt leaves room to answer.
        let room = a.sampling.max_tokens.min(engine.model.ctx() / 2);
        while ids.len() + room > engine.model.ctx()
            && messages.iter().filter(|m| m.role != "system").count() > 1
        {
            let first = messages.iter().position(|m| m.role != "system").unwrap();
            messages.remove(first);
            ids = engine.tokenizer.encode_chat(&messages, true)?;
        }
        let mut stdout = std::io::stdout().lock();
        let g = engine.generate(&ids, a.sampling.max_tokens, &mut sampler, false, |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        writeln!(stdout)?;
        messages.push(ChatMessage::new("assistant", g.text.trim()));
    }
    Ok(())
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
    bitnet_wgpu::npy::write_f32(&a.out, &[ids.len(), vocab], &logits)
        .with_context(|| format!("writing {}", a.out.display()))?;
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
    let window = margs.ctx.unwrap_or(512).min(max_pos);
    margs.ctx = Some(window);
    let mut engine = margs.load()?;
    let stride = a.stride.unwrap_or(window / 2).max(1);
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
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
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
            println!("model folder     {}", engine.files.dir.display());
            println!("format           Hugging Face folder (safetensors)");
            println!("architecture     BitNetForCausalLM (BitNet b1.58)");
        }
        Some(g) => {
            println!("model file       {}", engine.files.dir.display());
            println!("format           GGUF v{}", g.version);
            println!("architecture     {}", g.architecture);
            let types: Vec<String> = g
                .tensor_types
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            println!("tensor types     {}", types.join(", "));
            for (k, line) in g.conversions.iter().enumerate() {
                let label = if k == 0 { "converted" } else { "" };
                println!("{label:<17}{line}");
            }
            if let Some(l) = g.i2s_layout {
                println!("i2_s layout      {l:?} (--i2s-layout)");
            }
        }
    }
    println!(
        "ffn activation   {}{}",
        c.activation.name(),
        engine
            .files
            .gguf
            .as_ref()
            .map(|g| format!(" ({})", g.activation_source))
            .unwrap_or_default()
    );
    println!(
        "shape            hidden {}, intermediate {}, layers {}, heads {} (kv {}), head_dim {}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!("vocab            {}", c.vocab_size);
    println!(
        "context          {} positions (rope_theta {})",
        c.max_position_embeddings, c.rope_theta
    );
    println!("weights          {}", c.variant.describe());
    println!(
        "lm head          {}",
        if c.tie_word_embeddings {
            "tied to the embedding"
        } else {
            "separate lm_head.weight"
        }
    );
    println!(
        "parameters       {} ternary + {} float = {}",
        count(c.ternary_params()),
        count(c.float_params()),
        count(c.ternary_params() + c.float_params())
    );
    let ternary = w.ternary_bytes() as u64;
    let emb = w.embed_tokens.bytes() as u64 + w.lm_head.as_ref().map_or(0, |m| m.bytes() as u64);
    println!(
        "memory           {} packed ternary weights + {} embedding/head",
        gib(ternary),
        gib(emb)
    );
    println!(
        "kv cache         {} per token (f32), {} at the full context of {}",
        gib(c.kv_bytes_per_position()),
        gib(c.kv_bytes_per_position() * c.max_position_embeddings as u64),
        c.max_position_embeddings
    );
    println!(
        "tokens           bos {:?}, stop {:?}",
        c.bos_token_id,
        engine.stop_ids()
    );
    println!("backend          {}", engine.model.backend_name());
    println!("load time        {:.2} s", engine.load_time.as_secs_f64());
    let adapters = bitnet_wgpu::backend::wgpu::list_adapters();
    if adapters.is_empty() {
        println!("gpu adapters     none found");
    }
    for (i, a) in adapters.iter().enumerate() {
        let label = if i == 0 { "gpu adapters" } else { "" };
        println!("{label:<17}{a}");
    }
    let need = bitnet_wgpu::backend::wgpu::estimate_memory(
        c,
        &engine.model_options(),
        w.embed_tokens.dtype.size() as u64,
    );
    println!(
        "gpu memory       {} needed on a GPU (weights, f32 KV cache, activations)",
        gib(need.total())
    );
    if let Some(note) = &engine.device_note {
        println!("auto device      {note}");
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    use bitnet_wgpu::bench::{
        plot_series, render, BenchResult, EnergyResult, OutputFormat, Summary,
    };
    use bitnet_wgpu::benchmark::{build_for_tests, run_test, TestKind, TestSpec};
    use bitnet_wgpu::energy::{
        discover_sensors, peak_rss_bytes, reset_peak_rss, DiscoverOptions, EnergyMeter,
        EnergyReading, WallMeterEstimate,
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

    let (weights, model_name, size) = match (&a.model, &a.synthetic) {
        (_, Some(p)) => {
            let config = bitnet_wgpu::synthetic::preset(p)?;
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
    let mut tests = Vec::new();
    for &d in &a.depth {
        for &p in a.n_prompt.iter().filter(|&&p| p > 0) {
            tests.push(TestSpec {
                kind: TestKind::Prefill,
                n_tokens: p,
                depth: d,
            });
        }
        for &n in a.n_gen.iter().filter(|&&n| n > 0) {
            tests.push(TestSpec {
                kind: TestKind::Decode,
                n_tokens: n,
                depth: d,
            });
        }
    }
    if tests.is_empty() {
        bail!("nothing to run: -p and -n are both 0");
    }
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
            let mut readings: Vec<EnergyReading> = Vec::new();
            let mut energy_err: Option<String> = None;
            let mut snap = None;
            let times = run_test(&mut model, spec, reps, 7, |start| {
                let Some(m) = meter.as_mut() else { return };
                if start {
                    snap = m.start().map_err(|e| energy_err = Some(e.to_string())).ok();
                } else if let Some(s) = snap.take() {
                    match m.stop(&s) {
                        Ok(r) => readings.push(r),
                        Err(e) => energy_err = Some(e.to_string()),
                    }
                }
            })?;
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
                tokens_per_s: tps,
                energy: None,
                energy_na_reason: None,
                peak_rss_bytes: peak_rss_bytes(),
                gpu_mem_bytes: None,
            };
            let energy = match (meter.is_some(), energy_err, readings.split_first()) {
                (false, _, _) => Err(na_reason.clone()),
                (_, Some(e), _) => Err(format!("energy reading failed: {e}")),
                (_, None, Some((first, rest))) => {
                    // Sum the timed repetitions only (the untimed context pre-fill is excluded).
                    let mut total = first.clone();
                    for x in rest {
                        total.total_j += x.total_j;
                        total.seconds += x.seconds;
                        for (acc, y) in total.joules_by_sensor.iter_mut().zip(&x.joules_by_sensor) {
                            acc.2 += y.2;
                        }
                    }
                    EnergyResult::from_reading(&total, (spec.n_tokens * reps) as u64, idle.as_ref())
                        .ok_or_else(|| "no time measured".to_string())
                }
                (_, None, None) => Err("no reading".to_string()),
            };
            r.set_energy(energy);
            results.push(r);
        }
    }
    println!("{}", render(format, &results)?);

    if let Some(path) = &a.plot {
        // x axis: context depth when several depths were run, else the thread count.
        let by_depth = a.depth.len() > 1 || threads.len() == 1;
        let mut speed: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let mut joules: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in &results {
            let label = if by_depth {
                format!(
                    "{} {}t",
                    if r.test.starts_with("pp") {
                        format!("pp{}", r.n_tokens)
                    } else {
                        format!("tg{}", r.n_tokens)
                    },
                    r.threads
                )
            } else {
                r.test.clone()
            };
            let x = if by_depth {
                r.depth as f64
            } else {
                r.threads as f64
            };
            let push = |v: &mut Vec<(String, Vec<(f64, f64)>)>, y: f64| match v
                .iter_mut()
                .find(|s| s.0 == label)
            {
                Some(s) => s.1.push((x, y)),
                None => v.push((label.clone(), vec![(x, y)])),
            };
            push(&mut speed, r.tokens_per_s.mean);
            if let Some(e) = &r.energy {
                push(&mut joules, e.joules_per_token);
            }
        }
        let x_label = if by_depth {
            "context depth (tokens)"
        } else {
            "threads"
        };
        let title = format!("{model_name}: tokens/s");
        plot_series(
            path,
            &title,
            x_label,
            &speed,
            (!joules.is_empty()).then_some(&joules[..]),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
