//! `peft serve`: one base model, many adapters, behind an OpenAI-compatible HTTP server.
//!
//! - Causal language models: `/v1/completions` and `/v1/chat/completions` (streamed or not),
//!   with continuous batching across adapters ([`peft::generation::batch`]): requests join the
//!   running batch at every step whatever adapter they name, prompts are prefilled in chunks
//!   between decode steps, and every request keeps its own key/value cache.
//! - Encoder models (BERT family): `/v1/embeddings` (pooled as the model's sentence-transformers
//!   config says) and `/predict` (Text Embeddings Inference's shape) for SEQ_CLS / TOKEN_CLS
//!   adapters.
//! - `/v1/models`, vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, `/health`,
//!   `/metrics` (Prometheus).
//!
//! The model runs on a thread of its own; the async workers only parse, tokenize and stream.

mod api;
mod encoder;
mod engine;
mod error;
mod metrics;
mod openai;
mod text;

use candle_core::Device;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use api::App;
pub use error::ApiError;

/// Everything `peft serve` takes.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model directory or GGUF file.
    pub model: PathBuf,
    /// `(name, dir)` adapters loaded at start.
    pub adapters: Vec<(String, PathBuf)>,
    pub host: String,
    pub port: u16,
    /// `Authorization: Bearer` key required on `/v1/*` and `/predict`.
    pub api_key: Option<String>,
    /// Adapters on the model at once (batchable together).
    pub max_loras: usize,
    /// Adapters whose files stay in memory (default: `max_loras`, at least).
    pub max_cpu_loras: Option<usize>,
    /// Where `/v1/load_lora_adapter` may read adapters from (no runtime loading without it).
    pub adapter_root: Option<PathBuf>,
    /// Requests decoding at once.
    pub max_batch_size: usize,
    /// Requests accepted at once (queued or running); more get 429.
    pub max_concurrent_requests: usize,
    /// Prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// The base model's name in `model` and `/v1/models` (default: the model path's file name).
    pub served_model_name: Option<String>,
    /// How long shutdown waits for requests in flight before cancelling them.
    pub shutdown_timeout: Duration,
    pub device: Device,
}

impl ServeConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            adapters: Vec::new(),
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_loras: 8,
            max_cpu_loras: None,
            adapter_root: None,
            max_batch_size: 32,
            max_concurrent_requests: 256,
            prefill_chunk: 512,
            max_body_bytes: 4 << 20,
            max_tokens_limit: 4096,
            served_model_name: None,
            shutdown_timeout: Duration::from_secs(30),
            device: Device::Cpu,
        }
    }
}

/// Loads the model and serves until SIGTERM or Ctrl-C, then shuts down gracefully (stops
/// accepting, lets requests in flight finish within the shutdown timeout, cancels the rest).
pub fn run(cfg: ServeConfig) -> peft::Result<()> {
    let runtime = runtime()?;
    let app = App::load(cfg.clone())?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| peft::Error::io(PathBuf::from(&addr), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| peft::Error::io(PathBuf::from(&addr), e))?;
        tracing::info!("peft serve: listening on http://{local}");
        app.serve(listener, shutdown_signal()).await
    })
}

fn runtime() -> peft::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| peft::Error::Config(format!("cannot start the async runtime: {e}")))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("peft serve: shutting down (no new connections; finishing requests in flight)");
}

/// A server running on a thread of its own (tests, embedding in another program).
pub struct Handle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<peft::Result<()>>>,
}

impl Handle {
    /// Loads the model and starts serving on `cfg.host:cfg.port` (port 0: any free port).
    pub fn start(cfg: ServeConfig) -> peft::Result<Self> {
        let app = App::load(cfg.clone())?;
        let std_listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .map_err(|e| peft::Error::io(PathBuf::from(&cfg.host), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| peft::Error::io(PathBuf::from(&cfg.host), e))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| peft::Error::io(PathBuf::from(&cfg.host), e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("peft-serve-http".into())
            .spawn(move || {
                let runtime = runtime()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .map_err(|e| peft::Error::io(PathBuf::from("listener"), e))?;
                    app.serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await
                })
            })
            .map_err(|e| peft::Error::Config(format!("cannot start the server thread: {e}")))?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Shuts down as SIGTERM would and waits for the server to end.
    pub fn shutdown(mut self) -> peft::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> peft::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| peft::Error::Config("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
