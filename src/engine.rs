//! A loaded model ready to use: files, config, tokenizer and the model on the chosen backend,
//! plus generation (prefill, decode loop, stop tokens, streaming) on top of it.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::wgpu::{self as gpu, AdapterChoice, WgpuBackend};
use crate::backend::StepRow;
pub use crate::backend::{HeadFormat, KvDtype};
use crate::config::ModelConfig;
use crate::error::{BitnetError, Result};
use crate::load::{load_model, ModelFiles, ModelWeights};
use crate::model::{Model, ModelOptions};
use crate::sampler::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A hardware GPU if there is a usable one, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A GPU (software adapters included); an error if there is none.
    Gpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = BitnetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu),
            _ => Err(BitnetError::InvalidArgument(format!(
                "unknown device {s:?} (expected auto, cpu or gpu)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    /// Substring of the GPU adapter name to use.
    pub adapter: Option<String>,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Context length; None = max_position_embeddings.
    pub ctx: Option<usize>,
    /// Show a progress bar while loading.
    pub progress: bool,
    /// Storage of the LM head (`q8`, `q4`: smaller and faster on the CPU, approximate).
    pub lm_head: HeadFormat,
    /// Storage of the KV cache (`f16` or `f32`); `None` = the device's default (f16 on a GPU,
    /// f32 on the CPU).
    pub kv_cache: Option<KvDtype>,
    /// Choices for GGUF files (I2_S layout, FFN activation override).
    pub gguf: crate::gguf::GgufOptions,
}

/// The model on one of the backends, chosen at run time.
// One model per engine, moved rarely: boxing the larger GPU variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
pub enum AnyModel {
    Cpu(Model<CpuBackend>),
    Gpu(Model<WgpuBackend>),
}

macro_rules! with_model {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            AnyModel::Cpu($m) => $body,
            AnyModel::Gpu($m) => $body,
        }
    };
}

impl AnyModel {
    pub fn backend_name(&self) -> String {
        use crate::backend::Backend;
        with_model!(self, m => m.backend.name())
    }
    pub fn position(&self) -> usize {
        with_model!(self, m => m.position())
    }
    pub fn reset(&mut self) {
        with_model!(self, m => m.reset())
    }
    pub fn truncate(&mut self, pos: usize) {
        with_model!(self, m => m.truncate(pos))
    }
    pub fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        with_model!(self, m => m.forward_last(tokens))
    }
    pub fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        with_model!(self, m => m.forward_argmax(tokens))
    }
    pub fn greedy_begin(&mut self, tokens: &[u32]) -> Result<()> {
        with_model!(self, m => m.greedy_begin(tokens))
    }
    pub fn greedy_next(&mut self) -> Result<u32> {
        with_model!(self, m => m.greedy_next())
    }
    pub fn greedy_finish(&mut self) -> Result<u32> {
        with_model!(self, m => m.greedy_finish())
    }
    pub fn sample_begin(
        &mut self,
        tokens: &[u32],
        sampler: Sampler,
        history: &[u32],
    ) -> Result<()> {
        with_model!(self, m => m.sample_begin(tokens, sampler, history))
    }
    pub fn sample_end(&mut self, read_pending: bool) -> Option<(Sampler, Vec<u32>)> {
        with_model!(self, m => m.sample_end(read_pending))
    }
    /// Whether this model samples with `config` on its device (the GPU: top-k 1..=1024).
    pub fn samples_on_device(&self, config: &crate::sampler::SamplerConfig) -> bool {
        use crate::backend::Backend;
        with_model!(self, m => m.backend.samples_on_device(config))
    }
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        with_model!(self, m => m.forward_all(tokens))
    }
    /// One step of `rows` (any slots and positions), returning the logits of the rows
    /// `logit_rows` names, in that order: `[logit_rows.len(), vocab]`.
    pub fn step_logits(&mut self, rows: &[StepRow], logit_rows: &[u32]) -> Result<Vec<f32>> {
        with_model!(self, m => {
            m.step_rows(rows, logit_rows)?;
            m.read_logits(logit_rows.len())
        })
    }
    pub fn vocab_size(&self) -> usize {
        with_model!(self, m => m.config.vocab_size)
    }
    pub fn ctx(&self) -> usize {
        with_model!(self, m => m.options.ctx)
    }
    /// The most rows one step takes.
    pub fn max_batch(&self) -> usize {
        with_model!(self, m => m.options.max_batch)
    }
    /// How the KV cache is stored (as asked, or the device's default).
    pub fn kv_dtype(&self) -> KvDtype {
        with_model!(self, m => m.kv_dtype())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token (config eos ids, `<|eot_id|>`).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (KV cache) is full.
    Context,
    /// The caller stopped it (`on_text` returned `ControlFlow::Break`: Ctrl-C, a closed pipe).
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated ids only (a final stop token included, as transformers' generate does).
    pub token_ids: Vec<u32>,
    /// Generated text (special tokens skipped).
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Generation {
    /// Decode speed in tokens/s (tokens after the first, which comes out of the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if self.decode_s > 0.0 {
            n as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

pub struct Engine {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub weights: ModelWeights,
    pub model: AnyModel,
    pub load_time: Duration,
    /// Why `--device auto` chose the CPU, if it did.
    pub device_note: Option<String>,
    /// How the engine was loaded (device, threads), to rebuild the model with other sizes.
    pub options: EngineOptions,
    /// Token ids whose keys/values are in the cache, in order (for prefix reuse in chat).
    fed: Vec<u32>,
}

/// Puts the weights on the chosen device (see [`build_model_explained`]).
pub fn build_model(
    weights: &ModelWeights,
    opts: &EngineOptions,
    options: ModelOptions,
) -> Result<AnyModel> {
    build_model_explained(weights, opts, options).map(|(m, _)| m)
}

/// Puts the weights on the chosen device: `Cpu`; `Gpu`, any adapter (software ones such as
/// lavapipe included), an error when there is none or the model does not fit; `Auto`, a hardware
/// GPU (discrete, then integrated, never a software one) when the model is likely to fit it,
/// else the CPU. Returns the model and, when `Auto` fell back to the CPU, why.
pub fn build_model_explained(
    weights: &ModelWeights,
    opts: &EngineOptions,
    options: ModelOptions,
) -> Result<(AnyModel, Option<String>)> {
    let cpu = || cpu_model(weights, opts.threads, options);
    match opts.device {
        DeviceChoice::Cpu => Ok((cpu()?, None)),
        DeviceChoice::Gpu => Ok((
            AnyModel::Gpu(gpu_model(weights, opts, options, AdapterChoice::Gpu)?),
            None,
        )),
        DeviceChoice::Auto => match gpu_model(weights, opts, options, AdapterChoice::Auto) {
            Ok(m) => Ok((AnyModel::Gpu(m), None)),
            Err(e) => Ok((cpu()?, Some(format!("running on the CPU: {e}")))),
        },
    }
}

/// The model on the CPU backend, once the memory it allocates is known to be there.
fn cpu_model(weights: &ModelWeights, threads: usize, options: ModelOptions) -> Result<AnyModel> {
    check_host_memory(&weights.config, &options, available_memory())?;
    let threads = cap_threads(threads);
    Ok(AnyModel::Cpu(Model::new(
        CpuBackend::new(threads)?,
        weights,
        options,
    )?))
}

/// Thread counts above this many per core only add scheduling and memory (10 000 threads make a
/// 2-core machine unusable); a larger request is capped with a warning.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// `threads` (0 = the default) capped at [`MAX_THREADS_PER_CORE`] × the cores we may use.
pub fn cap_threads(threads: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = cores * MAX_THREADS_PER_CORE;
    if threads > max {
        eprintln!(
            "warning: --threads {threads} is more than {MAX_THREADS_PER_CORE} per core ({cores} cores here); using {max}"
        );
        return max;
    }
    threads
}

/// Memory the OS can still give us (`MemAvailable` of `/proc/meminfo`, Linux); None elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Fails, naming `--ctx`, when the KV cache and activations the model allocates up front (the
/// weights stay memory-mapped) exceed `available` bytes, instead of letting the allocation abort
/// the process. Unknown available memory (`None`) skips the check.
pub fn check_host_memory(
    config: &ModelConfig,
    options: &ModelOptions,
    available: Option<u64>,
) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    // The CPU backend's buffers have the GPU's layout and sizes (its cache f32 by default).
    let kv = options.kv_dtype::<CpuBackend>();
    let options = ModelOptions {
        kv_cache: Some(kv),
        ..*options
    };
    let need = gpu::estimate_memory(config, &options, 4);
    let bytes = need.kv_cache.saturating_add(need.activations);
    if bytes > available {
        let per_pos = (config.kv_bytes_per_position() / 4 * kv.bytes()).max(1);
        let fits = available.saturating_sub(need.activations) / per_pos;
        return Err(BitnetError::InvalidArgument(format!(
            "a context of {} positions needs {:.1} GiB for the KV cache and activations but only {:.1} GiB of memory is available: use a smaller --ctx (at most about {fits})",
            options.ctx,
            bytes as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64,
        )));
    }
    Ok(())
}

/// The model on the adapter chosen by `choice` and `opts.adapter`, when it is likely to fit
/// (wgpu cannot query free memory: see `backend::wgpu::check_fits`).
fn gpu_model(
    weights: &ModelWeights,
    opts: &EngineOptions,
    options: ModelOptions,
    choice: AdapterChoice,
) -> Result<Model<WgpuBackend>> {
    let adapter = gpu::select_adapter(choice, opts.adapter.as_deref()).map_err(BitnetError::Gpu)?;
    let info = adapter.get_info();
    let elem_bytes = weights.embed_tokens.dtype.on_device().row_bytes(1) as u64;
    let need = gpu::estimate_memory(&weights.config, &options, elem_bytes);
    gpu::check_fits(&need, &info, &adapter.limits())
        .map_err(|e| BitnetError::Gpu(format!("{}: {e}", info.name)))?;
    Model::new(WgpuBackend::from_adapter(adapter)?, weights, options)
}

impl Engine {
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<Self> {
        Self::load_sized(dir, opts, |config| {
            let mut options = ModelOptions::for_config(config);
            if let Some(ctx) = opts.ctx {
                options.ctx = ctx;
            }
            options.lm_head = opts.lm_head;
            options.kv_cache = opts.kv_cache;
            options
        })
    }

    /// [`Engine::load`] with the model's sizes (context, batch, slots, head) chosen by `sizes`
    /// from the model's config once it is read: the model is built once, at those sizes (a
    /// [`Engine::rebuild`] holds two models in memory while it builds the second).
    pub fn load_sized(
        dir: &Path,
        opts: &EngineOptions,
        sizes: impl FnOnce(&ModelConfig) -> ModelOptions,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let bar = opts.progress.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "loading {msg} [{bar:30}] {pos}/{len} layers",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_message(dir.display().to_string());
            bar
        });
        let (files, config, tokenizer, weights) = load_model(dir, &opts.gguf, |i, n| {
            if let Some(b) = &bar {
                b.set_length(n as u64);
                b.set_position(i as u64)
            }
        })?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let (model, device_note) = build_model_explained(&weights, opts, sizes(&config))?;
        Ok(Engine {
            device_note,
            options: opts.clone(),
            files,
            config,
            tokenizer,
            weights,
            model,
            load_time: t0.elapsed(),
            fed: Vec::new(),
        })
    }

    /// Ids that end generation: the config's eos ids plus `<|eot_id|>` / `<|end_of_text|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        for t in ["<|eot_id|>", "<|end_of_text|>"] {
            if let Some(id) = self.tokenizer.token_to_id(t) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The sizes the model was built with (context, batch).
    pub fn model_options(&self) -> ModelOptions {
        with_model!(&self.model, m => m.options)
    }

    /// Rebuilds the model on the same device with other sizes (the context is cleared). The old
    /// model stays until the new one is built (so a failure leaves the engine usable): both are
    /// in memory for a moment; [`Engine::load_sized`] builds once.
    pub fn rebuild(&mut self, options: ModelOptions) -> Result<()> {
        self.model = build_model(&self.weights, &self.options, options)?;
        self.fed.clear();
        Ok(())
    }

    /// Clears the context.
    pub fn reset(&mut self) {
        self.model.reset();
        self.fed.clear();
    }

    /// Makes the cache hold exactly `ids`, reusing the longest common prefix already there, and
    /// returns the logits of the last id (None when `want_logits` is false and greedy suffices).
    fn feed(&mut self, ids: &[u32], mode: &Pick) -> Result<Fed> {
        if ids.is_empty() {
            return Err(BitnetError::EmptyInput("the prompt has no tokens"));
        }
        if ids.len() > self.model.ctx() {
            return Err(BitnetError::ContextOverflow {
                needed: ids.len(),
                ctx: self.model.ctx(),
            });
        }
        let mut common = self.fed.iter().zip(ids).take_while(|(a, b)| a == b).count();
        common = common.min(ids.len() - 1); // always run at least one token to get logits
        self.model.truncate(common);
        self.fed.truncate(common);
        let new = ids[common..].to_vec();
        let out = self.step(&new, mode)?;
        self.fed.extend_from_slice(&new);
        Ok(out)
    }

    /// Runs `tokens` after the cached ones. If the GPU is lost, generation goes on on the CPU
    /// from the same position: the cache is rebuilt from the tokens fed so far, no token lost.
    fn step(&mut self, tokens: &[u32], mode: &Pick) -> Result<Fed> {
        let run = |m: &mut AnyModel| -> Result<Fed> {
            Ok(match mode {
                Pick::Greedy => {
                    m.greedy_begin(tokens)?; // pipelined: the token is read by greedy_next/finish
                    Fed::Greedy
                }
                Pick::Sample(sampler, history) => {
                    // pipelined too, the pick sampled on the device
                    m.sample_begin(tokens, (**sampler).clone(), history)?;
                    Fed::Greedy
                }
                Pick::Logits => Fed::Logits(m.forward_last(tokens)?),
            })
        };
        match run(&mut self.model) {
            Err(BitnetError::Gpu(msg)) if matches!(self.model, AnyModel::Gpu(_)) => {
                self.fall_back_to_cpu(&msg)?;
                run(&mut self.model)
            }
            other => other,
        }
    }

    /// Replaces the GPU model by a CPU one holding the same context (and the same pending
    /// greedy token, recomputed).
    fn fall_back_to_cpu(&mut self, msg: &str) -> Result<()> {
        eprintln!(
            "warning: GPU failed ({msg}); continuing on the CPU from position {}",
            self.fed.len()
        );
        let options = self.model_options();
        // A sampled decode goes on with the sampler as it was before its unreturned picks.
        let sampling = self.model.sample_end(false);
        self.model = cpu_model(&self.weights, self.options.threads, options)?;
        self.device_note = Some(format!("fell back to the CPU after a GPU failure: {msg}"));
        if !self.fed.is_empty() {
            let fed = self.fed.clone();
            // also recomputes a lost pending token
            match sampling {
                Some((sampler, history)) => self.model.sample_begin(&fed, sampler, &history)?,
                None => self.model.greedy_begin(&fed)?,
            }
        }
        Ok(())
    }

    /// The pending greedy token, run through the model first when `run` (its successor is then
    /// under way before it is read); on a GPU failure, the CPU takes over as in `step`.
    fn greedy_token(&mut self, run: bool) -> Result<u32> {
        let r = if run {
            self.model.greedy_next()
        } else {
            self.model.greedy_finish()
        };
        match r {
            Err(BitnetError::Gpu(msg)) if matches!(self.model, AnyModel::Gpu(_)) => {
                self.fall_back_to_cpu(&msg)?;
                if run {
                    self.model.greedy_next()
                } else {
                    self.model.greedy_finish()
                }
            }
            other => other,
        }
    }

    /// Generates after `prompt` (which may extend the cached context: chat turns reuse it).
    /// `on_text` receives streamed text pieces.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        ignore_eos: bool,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        self.generate_until(prompt, max_tokens, sampler, ignore_eos, |t| {
            on_text(t);
            ControlFlow::Continue(())
        })
    }

    /// [`Engine::generate`] that the caller can stop: when `on_text` returns
    /// `ControlFlow::Break`, no further token is computed and the generation so far is returned
    /// with [`FinishReason::Cancelled`].
    pub fn generate_until(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        ignore_eos: bool,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let stop = if ignore_eos {
            Vec::new()
        } else {
            self.stop_ids()
        };
        let mode = if sampler.config.is_greedy() {
            Pick::Greedy
        } else if self.model.samples_on_device(&sampler.config) && !sample_on_host() {
            Pick::Sample(Box::new(sampler.clone()), prompt.to_vec())
        } else {
            Pick::Logits
        };
        let r = self.generate_picking(prompt, max_tokens, sampler, &stop, &mode, &mut on_text);
        if let Pick::Sample(..) = mode {
            // the stream as if only the returned picks had been drawn
            if let Some((s, _)) = self.model.sample_end(true) {
                *sampler = s;
            }
        }
        r
    }

    /// The decode loop of [`Engine::generate_until`], picking tokens as `mode` says.
    fn generate_picking(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mode: &Pick,
        on_text: &mut impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut out = Vec::new();
        let mut stream = StreamDecoder::default();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut next = self.feed(prompt, mode)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        while out.len() < max_tokens {
            // Greedy: the token's own step is submitted before it is read (when it will be
            // needed: not the last token, room in the context); a stop token's step is the one
            // step of work thrown away.
            let ran = matches!(next, Fed::Greedy)
                && out.len() + 1 < max_tokens
                && self.model.position() < self.model.ctx();
            let id = match next {
                Fed::Greedy => self.greedy_token(ran)?,
                Fed::Logits(ref l) => sampler.try_sample(l, &history)?,
            };
            if ran {
                self.fed.push(id); // its step has run: the cache holds it
            }
            out.push(id);
            history.push(id);
            if stop.contains(&id) {
                if ran {
                    self.fed.pop();
                    self.model.truncate(self.fed.len());
                }
                finish = FinishReason::Stop;
                break;
            }
            let piece = stream.push(&self.tokenizer, id)?;
            text.push_str(&piece);
            if on_text(&piece).is_break() {
                finish = FinishReason::Cancelled;
                break;
            }
            if out.len() == max_tokens {
                break;
            }
            if ran {
                continue;
            }
            if self.model.position() >= self.model.ctx() {
                finish = FinishReason::Context;
                break;
            }
            next = self.step(&[id], mode)?;
            self.fed.push(id);
        }
        let rest = stream.finish(&self.tokenizer)?;
        if finish != FinishReason::Cancelled {
            let _ = on_text(&rest);
        }
        text.push_str(&rest);
        Ok(Generation {
            token_ids: out,
            text,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }

    /// Logits of every position of `tokens` from an empty context: `[n, vocab]` flattened.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        if tokens.len() > self.model.ctx() {
            return Err(BitnetError::ContextOverflow {
                needed: tokens.len(),
                ctx: self.model.ctx(),
            });
        }
        let out = self.model.forward_all(tokens);
        self.reset();
        out
    }
}

/// How a generation picks its tokens.
enum Pick {
    /// Argmax, pipelined (`Model::greedy_begin`).
    Greedy,
    /// The sampler on the device, pipelined (`Model::sample_begin`): its state before the
    /// generation and the context's tokens.
    Sample(Box<Sampler>, Vec<u32>),
    /// The sampler on the host, from the logits of each step.
    Logits,
}

/// `BITNET_SAMPLE_ON_HOST=1`: sample from read-back logits even where the device could sample
/// (for comparisons), read once per process.
fn sample_on_host() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BITNET_SAMPLE_ON_HOST").is_ok_and(|v| v == "1"))
}

enum Fed {
    /// A pipelined pick (greedy or sampled) is pending in the model.
    Greedy,
    Logits(Vec<f32>),
}
