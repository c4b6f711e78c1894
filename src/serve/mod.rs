//! `bitnet serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! Data flow: `http` checks and tokenizes a request ([`api`] types) and hands it to the
//! [`scheduler`] thread, which owns the model and runs one step at a time over every running
//! sequence (each in its own KV-cache slot), samples on the host and sends text events back;
//! `http` turns them into SSE chunks or one JSON body. [`metrics`] holds what both sides share.
//! [`bench`] is the load generator of `bitnet bench-serve`.

pub mod api;
pub mod bench;
pub mod http;
pub mod metrics;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{build_model, AnyModel, Engine, EngineOptions};
use crate::error::{BitnetError, Result};
use crate::model::ModelOptions;
use crate::tokenizer::Tokenizer;
use metrics::{Loaded, Shared};
use scheduler::{Control, Scheduler, SchedulerConfig};

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face model folder.
    Dir(PathBuf),
    /// Random weights of a preset shape (`2b4t`, `large`, `tiny`), for load tests; text goes
    /// through the tokenizer of `tokenizer_dir` (ids past its vocabulary decode to nothing).
    Synthetic {
        preset: String,
        tokenizer_dir: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: ModelSource,
    /// Device, threads and LM-head format (its `ctx` is ignored: see `ctx` here).
    pub engine: EngineOptions,
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// KV-cache slots: sequences decoded together.
    pub parallel: usize,
    /// Positions per slot; None: the model's max_position_embeddings, at most 2048.
    pub ctx: Option<usize>,
    /// Rows per model step at most: the running sequences' decode rows plus a prefill chunk.
    pub step_tokens: usize,
    pub api_key: Option<String>,
    /// Requests waiting for a slot at most; more get 429.
    pub queue: usize,
    /// Request body limit in bytes.
    pub body_limit: usize,
    /// Time limit of a non-streaming request.
    pub request_timeout: Duration,
    /// How long a shutdown waits for open connections to close.
    pub shutdown_grace: Duration,
    /// Shut down on SIGINT / SIGTERM (the command line; not a library embedding the server).
    pub handle_signals: bool,
}

impl ServeOptions {
    pub fn new(model: ModelSource) -> Self {
        ServeOptions {
            model,
            engine: EngineOptions::default(),
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx: None,
            step_tokens: 256,
            api_key: None,
            queue: 64,
            body_limit: 1 << 20,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            handle_signals: false,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(BitnetError::InvalidArgument(m));
        if self.parallel == 0 || self.parallel > 4096 {
            return bad(format!("--parallel {} must be in 1..=4096", self.parallel));
        }
        if self.step_tokens <= self.parallel {
            return bad(format!(
                "--step-tokens {} must exceed --parallel {} (every step holds one decode row \
                 per sequence plus room for a prompt chunk)",
                self.step_tokens, self.parallel
            ));
        }
        if self.ctx == Some(0) {
            return bad("--ctx must be at least 1".into());
        }
        Ok(())
    }
}

/// The model, its tokenizer and what the scheduler needs, loaded with `slots` KV-cache slots.
fn load(opts: &ServeOptions) -> Result<(AnyModel, Tokenizer, Vec<u32>, String, usize)> {
    let sizes = |max_pos: usize| {
        let ctx = opts.ctx.unwrap_or(max_pos.min(2048));
        ModelOptions {
            ctx,
            max_batch: opts.step_tokens,
            max_logit_rows: opts.parallel,
            lm_head: opts.engine.lm_head,
            kv_cache: opts.engine.kv_cache,
            slots: opts.parallel,
        }
    };
    match &opts.model {
        ModelSource::Dir(dir) => {
            // built once, with the server's slots (the context from the model's config)
            let engine =
                Engine::load_sized(dir, &opts.engine, |c| sizes(c.max_position_embeddings))?;
            let options = engine.model_options();
            if let Some(note) = &engine.device_note {
                eprintln!("note: {note}");
            }
            let stop = engine.stop_ids();
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string());
            let Engine {
                model, tokenizer, ..
            } = engine;
            Ok((model, tokenizer, stop, name, options.ctx))
        }
        ModelSource::Synthetic {
            preset,
            tokenizer_dir,
        } => {
            let config = crate::synthetic::preset(preset)?;
            let weights = crate::synthetic::random_weights(&config, 1)?;
            let files = crate::load::ModelFiles::locate(tokenizer_dir)?;
            let tokenizer =
                Tokenizer::from_files(&files.tokenizer, files.tokenizer_config.as_deref())?;
            let options = sizes(config.max_position_embeddings);
            let model = build_model(&weights, &opts.engine, options)?;
            // random weights: no end-of-sequence token, requests run to max_tokens
            Ok((
                model,
                tokenizer,
                Vec::new(),
                format!("synthetic-{preset}"),
                options.ctx,
            ))
        }
    }
}

/// A running server: its address, and a handle to stop it.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Blocks until the model is loaded (Ok) or failed to load (Err).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let t0 = std::time::Instant::now();
        loop {
            if self.shared.loaded.get().is_some() {
                return Ok(());
            }
            if let Some(e) = self.shared.load_error.get() {
                return Err(BitnetError::Serve(format!("the model failed to load: {e}")));
            }
            if t0.elapsed() > timeout {
                return Err(BitnetError::Serve("the model is still loading".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops accepting, ends open streams with a final chunk, waits for the connections to
    /// close (at most the grace period) and for the scheduler to stop.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join()
    }

    /// Runs until SIGINT or SIGTERM (then shuts down as [`Server::shutdown`]).
    pub fn join(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(BitnetError::Serve("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds, then loads the model in the background (`/health` answers 503 until it is ready) and
/// serves until [`Server::shutdown`], SIGINT or SIGTERM.
pub fn start(opts: ServeOptions) -> Result<Server> {
    opts.check()?;
    let shared = Arc::new(Shared::default());
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel::<Control>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
    let sh = shared.clone();
    let thread = std::thread::Builder::new()
        .name("bitnet-http".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| BitnetError::Serve(format!("cannot start the runtime: {e}")))?;
            rt.block_on(serve(opts, sh, ctl_tx, ctl_rx, stop_rx, addr_tx))
        })
        .map_err(|e| BitnetError::Serve(format!("cannot start a thread: {e}")))?;
    let addr = match addr_rx.recv() {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            return Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => BitnetError::Serve("the server thread stopped".into()),
            })
        }
    };
    Ok(Server {
        addr,
        shared,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn serve(
    opts: ServeOptions,
    shared: Arc<Shared>,
    ctl_tx: std::sync::mpsc::Sender<Control>,
    ctl_rx: std::sync::mpsc::Receiver<Control>,
    stop_rx: tokio::sync::oneshot::Receiver<()>,
    addr_tx: std::sync::mpsc::Sender<Result<SocketAddr>>,
) -> Result<()> {
    let bind = format!("{}:{}", opts.host, opts.port);
    let listener = match tokio::net::TcpListener::bind(&bind).await {
        Ok(l) => l,
        Err(e) => {
            let e = BitnetError::Serve(format!("cannot listen on {bind}: {e}"));
            let _ = addr_tx.send(Err(BitnetError::Serve(e.to_string())));
            return Err(e);
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| BitnetError::Serve(format!("no local address: {e}")))?;
    let _ = addr_tx.send(Ok(addr));

    // the scheduler thread: loads, then owns the model
    let sh = shared.clone();
    let lo = opts.clone();
    let scheduler = std::thread::Builder::new()
        .name("bitnet-scheduler".into())
        .spawn(move || match load(&lo) {
            Ok((model, tokenizer, stop, name, ctx)) => {
                let tokenizer = Arc::new(tokenizer);
                let backend = model.backend_name();
                let _ = sh.loaded.set(Loaded {
                    tokenizer: tokenizer.clone(),
                    model_name: name,
                    ctx,
                    slots: lo.parallel,
                    backend: backend.clone(),
                });
                sh.start_energy();
                eprintln!(
                    "bitnet serve: ready on {backend}: {} slots of {ctx} positions",
                    lo.parallel
                );
                let cfg = SchedulerConfig {
                    slots: lo.parallel,
                    ctx,
                    step_tokens: lo.step_tokens,
                };
                Scheduler::new(model, tokenizer, stop, cfg, sh).run(ctl_rx);
            }
            Err(e) => {
                eprintln!("bitnet serve: cannot load the model: {e}");
                let _ = sh.load_error.set(e.to_string());
            }
        })
        .map_err(|e| BitnetError::Serve(format!("cannot start a thread: {e}")))?;

    let app = Arc::new(http::App {
        shared: shared.clone(),
        scheduler: Mutex::new(ctl_tx.clone()),
        api_key: opts.api_key.clone(),
        queue: opts.queue,
        body_limit: opts.body_limit,
        request_timeout: opts.request_timeout,
    });
    let router = http::router(app);
    let stopping = Arc::new(tokio::sync::Notify::new());
    let (sh, st) = (shared.clone(), stopping.clone());
    let handle_signals = opts.handle_signals;
    let signal = async move {
        let os_signal = async {
            if handle_signals {
                signal_received().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = stop_rx => {}
            _ = os_signal => {}
        }
        eprintln!("bitnet serve: shutting down");
        sh.shutting_down.store(true, Ordering::Relaxed);
        // the scheduler ends every open stream with a final chunk
        let _ = ctl_tx.send(Control::Shutdown);
        st.notify_one();
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(signal);
    let grace = opts.shutdown_grace;
    let result = tokio::select! {
        r = server => r.map_err(|e| BitnetError::Serve(format!("server error: {e}"))),
        _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("bitnet serve: connections still open after {grace:?}; closing them");
            Ok(())
        }
    };
    // the scheduler stops once its sequences have ended (or at once when it never loaded)
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    result
}

#[cfg(unix)]
async fn signal_received() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn signal_received() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await
    }
}
