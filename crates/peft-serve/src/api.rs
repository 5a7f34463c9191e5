//! The HTTP side: routes, auth, admission (429), adapter names, and the OpenAI response shapes.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use peft::generation::batch::{Request, TokenLogprob};
use peft::generation::{FinishReason, SamplingConfig};
use peft::io::tokenizer::Tokenizer;
use peft::layers::mixed::BASE;
use peft::models::{ModelDims, TaskType};
use peft::peft_model::AdapterFiles;
use peft::tuners::{Bias, MethodKind};
use peft::{LoadOptions, PeftModel};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc::UnboundedReceiver, oneshot};

use crate::encoder::{self, Encoder, Job, Prediction};
use crate::engine::{self, Command, GenEvent, Served};
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::openai::*;
use crate::text::TextState;
use crate::ServeConfig;

/// One adapter name the server answers to.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    /// The version requests naming it get now (`name@version` on the model).
    internal: String,
    created: u64,
}

#[derive(Default)]
struct Catalog {
    adapters: BTreeMap<String, Entry>,
    next_version: u64,
}

enum Backend {
    Generator {
        commands: mpsc::Sender<Command>,
        dims: ModelDims,
    },
    Encoder {
        jobs: mpsc::Sender<Job>,
        max_positions: Option<usize>,
    },
}

pub(crate) struct Shared {
    cfg: ServeConfig,
    base_name: String,
    backend: Backend,
    catalog: RwLock<Catalog>,
    /// Decoding (shared); encoding needs `&mut` (truncation settings), so it has its own lock.
    tokenizer: Arc<Tokenizer>,
    encoder_tok: Mutex<Tokenizer>,
    metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    next_ticket: AtomicU64,
    closing: AtomicBool,
    started: u64,
}

/// A loaded server: the model on its thread, the routes, the shared state.
pub struct App {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads an adapter and checks that this server can serve it.
fn read_adapter(
    dir: &Path,
    base: &Path,
    device: &candle_core::Device,
) -> peft::Result<AdapterFiles> {
    // The base's config is needed only by GGUF LoRA files (their q/k permutation).
    let base_config = peft::io::read_base_config(base).ok();
    let files = AdapterFiles::read_for_base(dir, base_config.as_ref(), device)?;
    let c = &files.config;
    if c.kind() == MethodKind::Input {
        return Err(peft::Error::Adapter(format!(
            "{}: {} rewrites the model's inputs (a prompt-learning method); peft serve batches \
             layer-wise adapters across requests and cannot serve it — merge nothing, serve it \
             with `peft generate`",
            dir.display(),
            c.peft_type()
        )));
    }
    if c.bias() != Bias::None {
        return Err(peft::Error::Adapter(format!(
            "{}: this adapter trains the base model's biases (bias != \"none\"), which every \
             other adapter shares; peft serve cannot serve it next to others (merge it with \
             `peft merge` and serve the merged model)",
            dir.display()
        )));
    }
    Ok(files)
}

fn wait_installed(
    waits: Vec<oneshot::Receiver<std::result::Result<(), String>>>,
) -> peft::Result<()> {
    for w in waits {
        match w.blocking_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(peft::Error::Adapter(e)),
            Err(_) => {
                return Err(peft::Error::Config(
                    "the model thread stopped while loading adapters".into(),
                ))
            }
        }
    }
    Ok(())
}

impl App {
    /// Loads the model, its tokenizer and the start-up adapters; starts the model thread.
    pub fn load(cfg: ServeConfig) -> peft::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let tokenizer = Tokenizer::for_model(&cfg.model)?;
        let encoder_tok = Tokenizer::for_model(&cfg.model)?;
        let config_json = cfg.model.join("config.json");
        let model_type = if config_json.exists() {
            peft::io::read_json(&config_json)?
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        } else {
            String::new()
        };
        let is_encoder = matches!(model_type.as_str(), "bert" | "roberta" | "xlm-roberta");
        let base_name = cfg.served_model_name.clone().unwrap_or_else(|| {
            let p = cfg
                .model
                .canonicalize()
                .unwrap_or_else(|_| cfg.model.clone());
            p.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "base".into())
        });
        for (name, _) in &cfg.adapters {
            check_name(name, &base_name).map_err(|e| peft::Error::Config(e.message))?;
        }
        let mut catalog = Catalog::default();
        let mut files = Vec::new();
        for (name, dir) in &cfg.adapters {
            catalog.next_version += 1;
            let internal = format!("{name}@{}", catalog.next_version);
            files.push((
                internal.clone(),
                Arc::new(read_adapter(dir, &cfg.model, &cfg.device)?),
            ));
            catalog.adapters.insert(
                name.clone(),
                Entry {
                    path: dir.clone(),
                    internal,
                    created: now_secs(),
                },
            );
        }
        let mut threads = Vec::new();
        let backend = if is_encoder {
            let enc = Encoder::new(cfg.model.clone(), cfg.device.clone(), tokenizer.pad_id())?;
            let max_positions = peft::models::load(
                &cfg.model,
                &LoadOptions {
                    task: Some(TaskType::FeatureExtraction),
                    device: cfg.device.clone(),
                    ..Default::default()
                },
            )?
            .dims()
            .max_positions;
            let (tx, rx) = mpsc::channel();
            // Start-up adapters go through the same path as runtime loads.
            let mut waits = Vec::new();
            for (internal, f) in files {
                let (reply, got) = oneshot::channel();
                tx.send(Job::Install {
                    internal,
                    files: f,
                    reply,
                })
                .ok();
                waits.push(got);
            }
            threads.push(
                std::thread::Builder::new()
                    .name("peft-serve-encoder".into())
                    .spawn(move || encoder::run(enc, rx))
                    .map_err(|e| peft::Error::Config(e.to_string()))?,
            );
            wait_installed(waits)?;
            Backend::Encoder {
                jobs: tx,
                max_positions,
            }
        } else {
            let opts = LoadOptions {
                task: Some(TaskType::CausalLm),
                device: cfg.device.clone(),
                ..Default::default()
            };
            let model = PeftModel::without_adapters(peft::models::load(&cfg.model, &opts)?);
            let dims = peft::generation::batch::BatchModel::dims(&model);
            let max_loras = cfg.max_loras.max(1);
            let max_cpu = cfg.max_cpu_loras.unwrap_or(max_loras).max(max_loras);
            let served = Served::new(model, max_loras, max_cpu, metrics.clone());
            let (tx, rx) = mpsc::channel();
            let mut waits = Vec::new();
            for (internal, f) in files {
                let (reply, got) = oneshot::channel();
                tx.send(Command::Install {
                    internal,
                    files: f,
                    reply,
                })
                .ok();
                waits.push(got);
            }
            let sched = peft::generation::batch::SchedulerConfig {
                max_batch_size: cfg.max_batch_size.max(1),
                prefill_chunk: cfg.prefill_chunk.max(1),
            };
            let m = metrics.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("peft-serve-engine".into())
                    .spawn(move || {
                        if let Err(e) = engine::run(served, sched, rx, m) {
                            tracing::error!("the generation engine stopped: {e}");
                        }
                    })
                    .map_err(|e| peft::Error::Config(e.to_string()))?,
            );
            wait_installed(waits)?;
            Backend::Generator { commands: tx, dims }
        };
        let shared = Arc::new(Shared {
            base_name,
            backend,
            catalog: RwLock::new(catalog),
            tokenizer: Arc::new(tokenizer),
            encoder_tok: Mutex::new(encoder_tok),
            metrics,
            in_flight: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            started: now_secs(),
            cfg,
        });
        Ok(Self { shared, threads })
    }

    /// The routes.
    pub fn router(&self) -> Router {
        let st = self.shared.clone();
        let api = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/predict", post(predict))
            .route("/v1/load_lora_adapter", post(load_adapter))
            .route("/v1/unload_lora_adapter", post(unload_adapter))
            .route_layer(middleware::from_fn_with_state(st.clone(), auth));
        Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .merge(api)
            .fallback(not_found_route)
            .layer(DefaultBodyLimit::max(st.cfg.max_body_bytes))
            .with_state(st)
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, waits for requests
    /// in flight up to the shutdown timeout, cancels what is left, and stops the model thread.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> peft::Result<()> {
        let st = self.shared.clone();
        let router = self.router();
        let (fired_tx, fired_rx) = oneshot::channel::<()>();
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = fired_tx.send(());
        });
        let server = tokio::spawn(async move { server.await });
        let _ = fired_rx.await;
        st.closing.store(true, Ordering::SeqCst);
        let timeout = st.cfg.shutdown_timeout;
        let mut server = server;
        let finished = tokio::time::timeout(timeout, &mut server).await.is_ok();
        if !finished {
            tracing::warn!("peft serve: requests still running after {timeout:?}; cancelling them");
            if let Backend::Generator { commands, .. } = &st.backend {
                let _ = commands.send(Command::CancelAll);
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut server).await;
            server.abort();
        }
        if let Backend::Generator { commands, .. } = &st.backend {
            let _ = commands.send(Command::Shutdown);
        }
        drop(st);
        let threads = self.threads;
        drop(self.shared);
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .ok();
        tracing::info!("peft serve: stopped");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Admission, auth, names.

/// A request's hold on one of the `--max-concurrent-requests` slots; also counts the request's
/// outcome when it ends (a client that went away counts as `cancelled`).
struct Slot {
    st: Arc<Shared>,
    endpoint: &'static str,
    adapter: String,
    status: String,
    arrived: Instant,
}

impl Slot {
    fn acquire(st: &Arc<Shared>, endpoint: &'static str) -> ApiResult<Self> {
        if st.closing.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let limit = st.cfg.max_concurrent_requests.max(1);
        let prev = st.in_flight.fetch_add(1, Ordering::SeqCst);
        if prev >= limit {
            st.in_flight.fetch_sub(1, Ordering::SeqCst);
            st.metrics.count(endpoint, "", "429");
            return Err(ApiError::overloaded(limit));
        }
        st.metrics.in_flight.inc();
        Ok(Self {
            st: st.clone(),
            endpoint,
            adapter: String::new(),
            status: "cancelled".into(),
            arrived: Instant::now(),
        })
    }

    fn done(&mut self, status: &str) {
        self.status = status.into();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.st.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.st.metrics.in_flight.dec();
        self.st
            .metrics
            .count(self.endpoint, &self.adapter, &self.status);
        // Generation latencies are observed per choice by the engine.
        let generation = matches!(self.endpoint, "completions" | "chat");
        if self.status == "ok" && !generation {
            self.st
                .metrics
                .e2e
                .observe(self.arrived.elapsed().as_secs_f64());
        }
    }
}

/// Counts an error answered before a slot was taken or after it, and returns it.
fn fail(slot: &mut Slot, e: ApiError) -> Response {
    slot.done(e.status.as_str());
    e.into_response()
}

async fn auth(State(st): State<Arc<Shared>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = given.as_bytes().ct_eq(key.as_bytes()).into();
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn check_name(name: &str, base: &str) -> ApiResult<()> {
    if name.is_empty()
        || name == base
        || name == BASE
        || name.len() > 200
        || name.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(ApiError::bad_request(format!(
            "`{name}` cannot name an adapter: use a non-empty name without `/` or control \
             characters, other than the base model's name `{base}`"
        ))
        .param("lora_name"));
    }
    Ok(())
}

impl Shared {
    /// `model` → (public name, internal name); unknown names are a 404 listing the known ones.
    fn resolve(&self, model: &str) -> ApiResult<(String, String)> {
        if model == self.base_name {
            return Ok((model.to_string(), BASE.to_string()));
        }
        let cat = self
            .catalog
            .read()
            .map_err(|_| ApiError::internal("lock"))?;
        match cat.adapters.get(model) {
            Some(e) => Ok((model.to_string(), e.internal.clone())),
            None => Err(ApiError::not_found(format!(
                "the model `{model}` does not exist; models: {}",
                std::iter::once(self.base_name.as_str())
                    .chain(cat.adapters.keys().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .param("model")),
        }
    }

    fn dims(&self) -> ApiResult<&ModelDims> {
        match &self.backend {
            Backend::Generator { dims, .. } => Ok(dims),
            Backend::Encoder { .. } => Err(ApiError::bad_request(
                "this server serves an encoder model: use /v1/embeddings or /predict",
            )),
        }
    }
}

/// Parses a JSON body into `T`, with OpenAI's error shape on failure.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Json<Value>, JsonRejection>) -> ApiResult<T> {
    let Json(v) = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..ApiError::bad_request(format!("{e}; the limit is set by --max-body-bytes"))
            }
        } else {
            ApiError::bad_request(format!("invalid JSON body: {e}"))
        }
    })?;
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Plain routes.

async fn health(State(st): State<Arc<Shared>>) -> Response {
    if st.closing.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found_route() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request(
            "no such route; routes: /v1/models, /v1/completions, /v1/chat/completions, \
             /v1/embeddings, /predict, /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, \
             /metrics",
        )
    }
    .into_response()
}

async fn list_models(State(st): State<Arc<Shared>>) -> Response {
    let cat = match st.catalog.read() {
        Ok(c) => c,
        Err(_) => return ApiError::internal("lock").into_response(),
    };
    let mut data = vec![json!({
        "id": st.base_name,
        "object": "model",
        "created": st.started,
        "owned_by": "peft",
        "root": st.cfg.model.display().to_string(),
        "parent": null,
    })];
    for (name, e) in &cat.adapters {
        data.push(json!({
            "id": name,
            "object": "model",
            "created": e.created,
            "owned_by": "peft",
            "root": e.path.display().to_string(),
            "parent": st.base_name,
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

// ---------------------------------------------------------------------------------------------
// Adapters at run time.

/// Resolves `lora_path` inside `--adapter-root`: relative paths are taken from the root, and the
/// real path (symlinks followed) must stay inside it.
fn resolve_in_root(root: &Path, given: &str) -> ApiResult<PathBuf> {
    let root = root
        .canonicalize()
        .map_err(|e| ApiError::internal(format!("--adapter-root {}: {e}", root.display())))?;
    let p = Path::new(given);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    };
    let real = joined.canonicalize().map_err(|_| {
        ApiError::not_found(format!(
            "no adapter directory at `{given}` under the adapter root"
        ))
        .param("lora_path")
        .code("adapter_not_found")
    })?;
    if !real.starts_with(&root) {
        return Err(ApiError::forbidden(format!(
            "`{given}` resolves outside the adapter root; adapters load only from inside \
             --adapter-root"
        ))
        .param("lora_path"));
    }
    Ok(real)
}

async fn load_adapter(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "load_lora_adapter") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match load_adapter_inner(&st, body).await {
        Ok(r) => {
            slot.done("ok");
            r
        }
        Err(e) => fail(&mut slot, e),
    }
}

async fn load_adapter_inner(
    st: &Arc<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Response> {
    let req: LoadAdapter = parse(body)?;
    check_name(&req.lora_name, &st.base_name)?;
    let root = st.cfg.adapter_root.as_ref().ok_or_else(|| {
        ApiError::forbidden(
            "loading adapters at run time is off; start the server with --adapter-root DIR to \
             load adapters from inside DIR",
        )
    })?;
    let dir = resolve_in_root(root, &req.lora_path)?;
    let device = st.cfg.device.clone();
    let d = dir.clone();
    let base = st.cfg.model.clone();
    let files = tokio::task::spawn_blocking(move || read_adapter(&d, &base, &device))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::bad_request(e.to_string()).param("lora_path"))?;
    let files = Arc::new(files);
    let internal = {
        let mut cat = st.catalog.write().map_err(|_| ApiError::internal("lock"))?;
        cat.next_version += 1;
        format!("{}@{}", req.lora_name, cat.next_version)
    };
    let (reply, got) = oneshot::channel();
    match &st.backend {
        Backend::Generator { commands, .. } => commands
            .send(Command::Install {
                internal: internal.clone(),
                files,
                reply,
            })
            .map_err(|_| ApiError::unavailable("the model thread has stopped"))?,
        Backend::Encoder { jobs, .. } => jobs
            .send(Job::Install {
                internal: internal.clone(),
                files,
                reply,
            })
            .map_err(|_| ApiError::unavailable("the model thread has stopped"))?,
    }
    got.await
        .map_err(|_| ApiError::unavailable("the model thread has stopped"))?
        .map_err(|e| ApiError::bad_request(e).param("lora_path"))?;
    // Swap the name over and retire the old version under the write lock: any request that
    // resolved the old version has already sent its command, so the model thread sees it first.
    let replaced = {
        let mut cat = st.catalog.write().map_err(|_| ApiError::internal("lock"))?;
        let old = cat.adapters.insert(
            req.lora_name.clone(),
            Entry {
                path: dir.clone(),
                internal,
                created: now_secs(),
            },
        );
        if let Some(old) = &old {
            st.retire(&old.internal);
        }
        old.is_some()
    };
    tracing::info!(
        "adapter {} {} from {}",
        req.lora_name,
        if replaced { "replaced" } else { "loaded" },
        dir.display()
    );
    Ok(Json(json!({
        "object": "lora_adapter",
        "lora_name": req.lora_name,
        "lora_path": dir.display().to_string(),
        "replaced": replaced,
        "message": format!("Success: LoRA adapter '{}' added successfully.", req.lora_name),
    }))
    .into_response())
}

impl Shared {
    fn retire(&self, internal: &str) {
        match &self.backend {
            Backend::Generator { commands, .. } => {
                let _ = commands.send(Command::Retire(internal.to_string()));
            }
            Backend::Encoder { jobs, .. } => {
                let _ = jobs.send(Job::Remove(internal.to_string()));
            }
        }
    }
}

async fn unload_adapter(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "unload_lora_adapter") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let r = (|| -> ApiResult<Response> {
        let req: UnloadAdapter = parse(body)?;
        let mut cat = st.catalog.write().map_err(|_| ApiError::internal("lock"))?;
        let Some(old) = cat.adapters.remove(&req.lora_name) else {
            return Err(ApiError::not_found(format!(
                "no adapter named `{}`; adapters: {}",
                req.lora_name,
                cat.adapters.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
            .param("lora_name"));
        };
        st.retire(&old.internal);
        Ok(Json(json!({
            "object": "lora_adapter",
            "lora_name": req.lora_name,
            "message": format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name),
        }))
        .into_response())
    })();
    match r {
        Ok(r) => {
            slot.done("ok");
            r
        }
        Err(e) => fail(&mut slot, e),
    }
}

// ---------------------------------------------------------------------------------------------
// Generation.

/// A generation request after parsing: the prompts' ids and the per-choice options.
struct Job0 {
    public: String,
    internal: String,
    prompts: Vec<Vec<u32>>,
    n: usize,
    max_tokens: usize,
    sampling: SamplingConfig,
    seed: u64,
    stops: Vec<String>,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
}

fn sampling_options(
    st: &Shared,
    s: &Sampling,
    prompts: &[Vec<u32>],
    default_max: Option<usize>,
) -> ApiResult<(usize, SamplingConfig, u64, Vec<String>, usize)> {
    let dims = st.dims()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    let room = dims
        .max_positions
        .map_or(usize::MAX, |m| m.saturating_sub(longest));
    if room == 0 {
        return Err(ApiError::bad_request(format!(
            "the prompt has {longest} tokens; this model's maximum context length is {} tokens",
            dims.max_positions.unwrap_or(0)
        ))
        .param("messages"));
    }
    let asked = s.max_completion_tokens.or(s.max_tokens);
    let max_tokens = match asked {
        Some(0) => {
            return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens"))
        }
        Some(m) if m > st.cfg.max_tokens_limit => {
            return Err(ApiError::bad_request(format!(
                "max_tokens is {m}; this server allows at most {} (--max-tokens-limit)",
                st.cfg.max_tokens_limit
            ))
            .param("max_tokens"))
        }
        Some(m) if m > room => {
            return Err(ApiError::bad_request(format!(
                "this model's maximum context length is {} tokens; you requested {} ({longest} in \
                 the prompt, {m} in the completion)",
                dims.max_positions.unwrap_or(0),
                longest + m
            ))
            .param("max_tokens"))
        }
        Some(m) => m,
        None => default_max
            .unwrap_or(room)
            .min(room)
            .min(st.cfg.max_tokens_limit),
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature must be in [0, 2]").param("temperature"));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request("top_p must be in (0, 1]").param("top_p"));
    }
    for (v, name) in [
        (s.presence_penalty, "presence_penalty"),
        (s.frequency_penalty, "frequency_penalty"),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_request(format!(
                "{name} is not implemented by this server; leave it at 0 (repetition_penalty is \
                 available)"
            ))
            .param(name));
        }
    }
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return Err(
            ApiError::bad_request("repetition_penalty must be > 0").param("repetition_penalty")
        );
    }
    let n = s.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad_request("n must be between 1 and 16").param("n"));
    }
    let stops = s.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stops.len() > 16 {
        return Err(ApiError::bad_request("at most 16 stop sequences").param("stop"));
    }
    let sampling = SamplingConfig {
        do_sample: temperature > 0.0,
        temperature: if temperature > 0.0 { temperature } else { 1.0 },
        top_k: s.top_k.filter(|&k| k > 0).map_or(0, |k| k as usize),
        top_p,
        repetition_penalty,
    };
    let seed = s.seed.unwrap_or_else(rand::random);
    Ok((max_tokens, sampling, seed, stops, n))
}

async fn completions(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "completions") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let job = match (|| -> ApiResult<Job0> {
        let req: CompletionRequest = parse(body)?;
        st.dims()?;
        let (public, internal) = st.resolve(&req.sampling.model)?;
        let prompts: Vec<Vec<u32>> = {
            let mut tok = st
                .encoder_tok
                .lock()
                .map_err(|_| ApiError::internal("lock"))?;
            match req.prompt {
                Prompt::Text(t) => vec![tok.encode_text(&t, true)?],
                Prompt::Texts(ts) => ts
                    .iter()
                    .map(|t| tok.encode_text(t, true))
                    .collect::<peft::Result<_>>()?,
                Prompt::Ids(ids) => vec![ids],
                Prompt::IdLists(l) => l,
            }
        };
        if prompts.is_empty() {
            return Err(ApiError::bad_request("no prompt given").param("prompt"));
        }
        if req.logprobs.is_some_and(|l| l > 20) {
            return Err(ApiError::bad_request("logprobs must be at most 20").param("logprobs"));
        }
        let (max_tokens, sampling, seed, stops, n) =
            sampling_options(&st, &req.sampling, &prompts, Some(16))?;
        Ok(Job0 {
            public,
            internal,
            prompts,
            n,
            max_tokens,
            sampling,
            seed,
            stops,
            logprobs: req.logprobs,
            stream: req.sampling.stream,
            ignore_eos: req.sampling.ignore_eos,
            include_usage: req
                .sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    })() {
        Ok(j) => j,
        Err(e) => return fail(&mut slot, e),
    };
    slot.adapter = job.public.clone();
    run_generation(st, slot, job, Flavor::Completion).await
}

async fn chat_completions(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "chat") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let job = match (|| -> ApiResult<Job0> {
        let req: ChatRequest = parse(body)?;
        st.dims()?;
        let (public, internal) = st.resolve(&req.sampling.model)?;
        let mut messages = Vec::new();
        for m in &req.messages {
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Array(parts) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(|t| t.as_str()), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.clone()),
                            _ => Err(ApiError::bad_request(
                                "only text content parts are supported by a text model",
                            )
                            .param("messages")),
                        },
                    )
                    .collect::<ApiResult<Vec<_>>>()?
                    .join(""),
                _ => {
                    return Err(ApiError::bad_request(
                        "message content must be a string or a list of parts",
                    )
                    .param("messages"))
                }
            };
            messages.push((m.role.clone(), content));
        }
        if messages.is_empty() {
            return Err(ApiError::bad_request("messages is empty").param("messages"));
        }
        let prompt = {
            let mut tok = st
                .encoder_tok
                .lock()
                .map_err(|_| ApiError::internal("lock"))?;
            let text = tok
                .apply_chat_template(&messages, true)
                .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
            tok.encode_text(&text, false)?
        };
        let prompts = vec![prompt];
        if req.top_logprobs.is_some_and(|l| l > 20) {
            return Err(
                ApiError::bad_request("top_logprobs must be at most 20").param("top_logprobs")
            );
        }
        let (max_tokens, sampling, seed, stops, n) =
            sampling_options(&st, &req.sampling, &prompts, None)?;
        Ok(Job0 {
            public,
            internal,
            prompts,
            n,
            max_tokens,
            sampling,
            seed,
            stops,
            logprobs: req.logprobs.then(|| req.top_logprobs.unwrap_or(0)),
            stream: req.sampling.stream,
            ignore_eos: req.sampling.ignore_eos,
            include_usage: req
                .sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    })() {
        Ok(j) => j,
        Err(e) => return fail(&mut slot, e),
    };
    slot.adapter = job.public.clone();
    run_generation(st, slot, job, Flavor::Chat).await
}

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Completion,
    Chat,
}

/// One choice's state on the HTTP side.
struct Choice {
    text: TextState,
    ticket: u64,
    prompt_len: usize,
    generated: usize,
    finish: Option<&'static str>,
    logprobs: Vec<(u32, TokenLogprob)>,
    /// Streaming: logprobs not yet sent.
    pending_lp: Vec<(u32, TokenLogprob)>,
    error: Option<String>,
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

/// Sends the job's choices to the engine; returns the event stream.
fn submit(st: &Arc<Shared>, job: &Job0) -> ApiResult<(UnboundedReceiver<GenEvent>, Vec<Choice>)> {
    let Backend::Generator { commands, dims } = &st.backend else {
        return Err(st
            .dims()
            .err()
            .unwrap_or_else(|| ApiError::internal("no generator")));
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut choices = Vec::new();
    let arrived = Instant::now();
    // Held while sending, so that a reload cannot retire this version before the engine has it.
    let _names = st.catalog.read().map_err(|_| ApiError::internal("lock"))?;
    if job.internal != BASE && !_names.adapters.values().any(|e| e.internal == job.internal) {
        return Err(ApiError::not_found(format!(
            "the adapter `{}` was unloaded",
            job.public
        )));
    }
    for (p, prompt) in job.prompts.iter().enumerate() {
        for j in 0..job.n {
            let index = p * job.n + j;
            let ticket = st.next_ticket.fetch_add(1, Ordering::SeqCst);
            let request = Request {
                prompt: prompt.clone(),
                adapter: job.internal.clone(),
                max_new_tokens: job.max_tokens,
                sampling: job.sampling.clone(),
                seed: job.seed.wrapping_add(index as u64),
                // No token is u32::MAX: nothing ends the request but its length.
                eos_token_ids: if job.ignore_eos {
                    vec![u32::MAX]
                } else {
                    Vec::new()
                },
                logprobs: job.logprobs,
            };
            commands
                .send(Command::Generate {
                    ticket,
                    index,
                    request,
                    adapter: job.public.clone(),
                    arrived,
                    events: tx.clone(),
                })
                .map_err(|_| ApiError::unavailable("the model thread has stopped"))?;
            choices.push(Choice {
                text: TextState::new(job.stops.clone(), dims.eos_token_ids.clone()),
                ticket,
                prompt_len: prompt.len(),
                generated: 0,
                finish: None,
                logprobs: Vec::new(),
                pending_lp: Vec::new(),
                error: None,
            });
        }
    }
    Ok((rx, choices))
}

impl Shared {
    fn cancel(&self, ticket: u64) {
        if let Backend::Generator { commands, .. } = &self.backend {
            let _ = commands.send(Command::Cancel(ticket));
        }
    }
}

/// Applies one engine event to its choice; returns the text it released.
fn apply(st: &Shared, choices: &mut [Choice], ev: GenEvent) -> (usize, String) {
    match ev {
        GenEvent::Token {
            index,
            token,
            logprob,
        } => {
            let c = &mut choices[index];
            if c.finish.is_some() {
                return (index, String::new());
            }
            c.generated += 1;
            if let Some(lp) = logprob {
                c.logprobs.push((token, lp.clone()));
                c.pending_lp.push((token, lp));
            }
            let delta = c.text.push(&st.tokenizer, token).unwrap_or_default();
            if c.text.stopped {
                c.finish = Some("stop");
                st.cancel(c.ticket);
                let rest = c.text.finish();
                return (index, delta + &rest);
            }
            (index, delta)
        }
        GenEvent::Finished { index, reason } => {
            let c = &mut choices[index];
            if c.finish.is_none() {
                c.finish = Some(finish_name(reason));
            }
            (index, c.text.finish())
        }
        GenEvent::Failed { index, message } => {
            let c = &mut choices[index];
            c.finish = Some("error");
            c.error = Some(message);
            (index, String::new())
        }
    }
}

fn token_text(st: &Shared, t: u32) -> String {
    st.tokenizer.decode(&[t], false).unwrap_or_default()
}

fn completion_logprobs(st: &Shared, lps: &[(u32, TokenLogprob)], offset0: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let mut offset = offset0;
    for (t, lp) in lps {
        let s = token_text(st, *t);
        offsets.push(offset);
        offset += s.len();
        tokens.push(s);
        token_logprobs.push(lp.logprob);
        let m: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|(t, l)| (token_text(st, *t), json!(l)))
            .collect();
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

fn chat_logprobs(st: &Shared, lps: &[(u32, TokenLogprob)]) -> Value {
    let entry = |t: u32, l: f32| {
        let s = token_text(st, t);
        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|(t, lp)| {
            let mut e = entry(*t, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|(t, l)| entry(*t, *l)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

async fn run_generation(st: Arc<Shared>, mut slot: Slot, job: Job0, flavor: Flavor) -> Response {
    let (mut rx, mut choices) = match submit(&st, &job) {
        Ok(x) => x,
        Err(e) => return fail(&mut slot, e),
    };
    let created = now_secs();
    let id = format!(
        "{}-{}",
        if flavor == Flavor::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        choices.first().map_or(0, |c| c.ticket)
    );
    let model = job.public.clone();
    if !job.stream {
        while choices.iter().any(|c| c.finish.is_none()) {
            let Some(ev) = rx.recv().await else { break };
            apply(&st, &mut choices, ev);
        }
        if let Some(e) = choices.iter().find_map(|c| c.error.clone()) {
            return fail(&mut slot, ApiError::bad_request(e));
        }
        let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
        let completion_tokens: usize = choices.iter().map(|c| c.generated).sum();
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| match flavor {
                Flavor::Completion => json!({
                    "index": i,
                    "text": c.text.text(),
                    "logprobs": job.logprobs.map(|_| completion_logprobs(&st, &c.logprobs, 0)),
                    "finish_reason": c.finish,
                }),
                Flavor::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text.text()},
                    "logprobs": job.logprobs.map(|_| chat_logprobs(&st, &c.logprobs)),
                    "finish_reason": c.finish,
                }),
            })
            .collect();
        slot.done("ok");
        return Json(json!({
            "id": id,
            "object": if flavor == Flavor::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "choices": out,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }))
        .into_response();
    }

    // Streaming: server-sent events, `data: {chunk}` ... `data: [DONE]`.
    let object = if flavor == Flavor::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let mut first: Vec<Value> = Vec::new();
    if flavor == Flavor::Chat {
        for i in 0..choices.len() {
            first.push(chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
        }
    }
    struct StreamState {
        st: Arc<Shared>,
        rx: UnboundedReceiver<GenEvent>,
        choices: Vec<Choice>,
        slot: Slot,
        job: Job0,
        flavor: Flavor,
        done: bool,
        offsets: Vec<usize>,
    }
    let n = choices.len();
    let state = StreamState {
        st: st.clone(),
        rx,
        choices,
        slot,
        job,
        flavor,
        done: false,
        offsets: vec![0; n],
    };
    let chunk2 = chunk.clone();
    let body = stream::unfold(state, move |mut s| {
        let chunk = chunk2.clone();
        async move {
            if s.done {
                return None;
            }
            loop {
                if s.choices.iter().all(|c| c.finish.is_some()) {
                    s.done = true;
                    let mut out: Vec<Value> = Vec::new();
                    if let Some(e) = s.choices.iter().find_map(|c| c.error.clone()) {
                        out.push(ApiError::bad_request(e).body());
                        s.slot.done("error");
                    } else {
                        s.slot.done("ok");
                    }
                    if s.job.include_usage {
                        let p: usize = s.choices.iter().map(|c| c.prompt_len).sum::<usize>()
                            / s.job.n.max(1);
                        let c: usize = s.choices.iter().map(|c| c.generated).sum();
                        out.push(json!({
                            "id": chunk(json!(null))["id"], "object": chunk(json!(null))["object"],
                            "created": chunk(json!(null))["created"], "model": chunk(json!(null))["model"],
                            "choices": [],
                            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                        }));
                    }
                    let mut events: Vec<Result<SseEvent, Infallible>> = out
                        .into_iter()
                        .map(|v| Ok(SseEvent::default().data(v.to_string())))
                        .collect();
                    events.push(Ok(SseEvent::default().data("[DONE]")));
                    return Some((stream::iter(events), s));
                }
                let Some(ev) = s.rx.recv().await else {
                    for c in s.choices.iter_mut().filter(|c| c.finish.is_none()) {
                        c.finish = Some("error");
                        c.error = Some("the model thread stopped".into());
                    }
                    continue;
                };
                let (i, delta) = apply(&s.st, &mut s.choices, ev);
                let c = &mut s.choices[i];
                let ended = c.finish.filter(|f| *f != "error");
                if delta.is_empty() && ended.is_none() {
                    continue;
                }
                let lp = std::mem::take(&mut c.pending_lp);
                let lp_value = if s.job.logprobs.is_none() {
                    Value::Null
                } else if s.flavor == Flavor::Chat {
                    chat_logprobs(&s.st, &lp)
                } else {
                    completion_logprobs(&s.st, &lp, s.offsets[i])
                };
                s.offsets[i] += delta.len();
                let choice = if s.flavor == Flavor::Chat {
                    json!({"index": i, "delta": if delta.is_empty() { json!({}) } else { json!({"content": delta}) }, "logprobs": lp_value, "finish_reason": ended})
                } else {
                    json!({"index": i, "text": delta, "logprobs": lp_value, "finish_reason": ended})
                };
                let ev: Result<SseEvent, Infallible> =
                    Ok(SseEvent::default().data(chunk(choice).to_string()));
                return Some((stream::iter(vec![ev]), s));
            }
        }
    })
    .flatten();
    let head = stream::iter(
        first
            .into_iter()
            .map(|v| Ok::<_, Infallible>(SseEvent::default().data(v.to_string())))
            .collect::<Vec<_>>(),
    );
    let all: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> =
        Box::pin(head.chain(body));
    Sse::new(all).into_response()
}

// ---------------------------------------------------------------------------------------------
// Encoders.

fn encode_inputs(st: &Shared, input: EmbeddingInput) -> ApiResult<Vec<Vec<u32>>> {
    let Backend::Encoder { max_positions, .. } = &st.backend else {
        return Err(ApiError::bad_request(
            "this server serves a causal language model: embeddings and /predict need an \
             encoder model (BERT family)",
        ));
    };
    let mut tok = st
        .encoder_tok
        .lock()
        .map_err(|_| ApiError::internal("lock"))?;
    let rows: Vec<Vec<u32>> = match input {
        EmbeddingInput::Text(t) => vec![tok.encode_text(&t, true)?],
        EmbeddingInput::Texts(ts) => ts
            .iter()
            .map(|t| tok.encode_text(t, true))
            .collect::<peft::Result<_>>()?,
        EmbeddingInput::Ids(ids) => vec![ids],
        EmbeddingInput::IdLists(l) => l,
    };
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(ApiError::bad_request("empty input").param("input"));
    }
    if rows.len() > 2048 {
        return Err(ApiError::bad_request("at most 2048 inputs per request").param("input"));
    }
    if let Some(max) = max_positions {
        if let Some(r) = rows.iter().find(|r| r.len() > *max) {
            return Err(ApiError::bad_request(format!(
                "an input has {} tokens; this model's maximum is {max}",
                r.len()
            ))
            .param("input"));
        }
    }
    Ok(rows)
}

async fn embeddings(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "embeddings") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let r = async {
        let req: EmbeddingRequest = parse(body)?;
        let (public, internal) = st.resolve(&req.model)?;
        let rows = encode_inputs(&st, req.input)?;
        let tokens: usize = rows.iter().map(Vec::len).sum();
        let (reply, got) = oneshot::channel();
        st.send_job(Job::Embed {
            adapter: internal,
            inputs: rows,
            reply,
        })?;
        let vecs = got
            .await
            .map_err(|_| ApiError::unavailable("the model thread has stopped"))??;
        let base64 = req.encoding_format.as_deref() == Some("base64");
        let data: Vec<Value> = vecs
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64_encode(&bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok::<_, ApiError>((
            public.clone(),
            Json(json!({
                "object": "list",
                "data": data,
                "model": public,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }))
            .into_response(),
        ))
    }
    .await;
    match r {
        Ok((adapter, resp)) => {
            slot.adapter = adapter;
            slot.done("ok");
            resp
        }
        Err(e) => fail(&mut slot, e),
    }
}

impl Shared {
    /// Sends an encoder job while holding the names' read lock (see [`submit`]).
    fn send_job(&self, job: Job) -> ApiResult<()> {
        let _names = self
            .catalog
            .read()
            .map_err(|_| ApiError::internal("lock"))?;
        match &self.backend {
            Backend::Encoder { jobs, .. } => jobs
                .send(job)
                .map_err(|_| ApiError::unavailable("the model thread has stopped")),
            Backend::Generator { .. } => Err(ApiError::bad_request(
                "this server serves a causal language model",
            )),
        }
    }
}

fn softmax(v: &[f32]) -> Vec<f32> {
    peft::generation::logits::softmax(v)
}

async fn predict(
    State(st): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut slot = match Slot::acquire(&st, "predict") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let r = async {
        let req: PredictRequest = parse(body)?;
        let single = matches!(req.inputs, EmbeddingInput::Text(_) | EmbeddingInput::Ids(_));
        let model = req.model.clone().unwrap_or_else(|| st.base_name.clone());
        let (public, internal) = st.resolve(&model)?;
        let rows = encode_inputs(&st, req.inputs)?;
        let (reply, got) = oneshot::channel();
        st.send_job(Job::Predict {
            adapter: internal,
            inputs: rows.clone(),
            reply,
        })?;
        let pred = got
            .await
            .map_err(|_| ApiError::unavailable("the model thread has stopped"))??;
        let score = |logits: &[f32]| -> Vec<f32> {
            if req.raw_scores {
                logits.to_vec()
            } else {
                softmax(logits)
            }
        };
        let labels = |n: usize| -> Vec<String> {
            let config = peft::io::read_json(&st.cfg.model.join("config.json")).unwrap_or_default();
            let map = config.get("id2label").and_then(|m| m.as_object()).cloned();
            (0..n)
                .map(|i| {
                    map.as_ref()
                        .filter(|m| m.len() == n)
                        .and_then(|m| m.get(&i.to_string()))
                        .and_then(|v| v.as_str())
                        .map_or_else(|| format!("LABEL_{i}"), String::from)
                })
                .collect()
        };
        let per_input: Vec<Value> = match pred {
            Prediction::Sequence(rows_logits) => rows_logits
                .iter()
                .map(|l| {
                    let names = labels(l.len());
                    let mut scored: Vec<(String, f32)> = names.into_iter().zip(score(l)).collect();
                    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                    json!(scored
                        .into_iter()
                        .map(|(label, score)| json!({"label": label, "score": score}))
                        .collect::<Vec<_>>())
                })
                .collect(),
            Prediction::Tokens(all) => all
                .iter()
                .zip(&rows)
                .map(|(toks, ids)| {
                    json!(toks
                        .iter()
                        .zip(ids)
                        .map(|(l, &id)| {
                            let s = score(l);
                            let names = labels(l.len());
                            let best = peft::generation::logits::argmax(&s) as usize;
                            json!({
                                "token_id": id,
                                "token": st.tokenizer.inner().id_to_token(id),
                                "label": names[best],
                                "score": s[best],
                                "scores": s,
                            })
                        })
                        .collect::<Vec<_>>())
                })
                .collect(),
        };
        let body = if single {
            per_input.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(per_input)
        };
        Ok::<_, ApiError>((public, Json(body).into_response()))
    };
    match r.await {
        Ok((adapter, resp)) => {
            slot.adapter = adapter;
            slot.done("ok");
            resp
        }
        Err(e) => fail(&mut slot, e),
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}
