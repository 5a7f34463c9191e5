//! `peft serve`: the `peft-serve` crate's server, configured from the command line.

use clap::Args;
use peft::Result;
use std::path::PathBuf;
use std::time::Duration;

use crate::args::{parse_device, DeviceArg, DEVICE_HELP};

#[derive(Args)]
pub struct ServeArgs {
    /// The base model: a Hugging Face directory (causal LM, or a BERT-family encoder for
    /// embeddings and /predict) or a GGUF file.
    #[arg(long, value_name = "DIR_OR_GGUF")]
    pub model: PathBuf,
    /// An adapter to serve from the start, as NAME=DIR (a plain DIR is named `default`);
    /// repeatable. Requests choose it with `"model": "NAME"`.
    #[arg(long, value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /predict (/health and /metrics stay
    /// open). Also read from PEFT_API_KEY.
    #[arg(long, value_name = "KEY", env = "PEFT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Adapters on the model at once (a batch mixes at most this many); the least recently
    /// used one not in use makes room for another.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_loras: usize,
    /// Adapters whose weights stay in memory (default: --max-loras); others are read from disk
    /// again when a request names them.
    #[arg(long, value_name = "M")]
    pub max_cpu_loras: Option<usize>,
    /// Directory /v1/load_lora_adapter may load adapters from (paths outside it, symlinks
    /// included, are refused); without it, adapters cannot be loaded at run time.
    #[arg(long, value_name = "DIR")]
    pub adapter_root: Option<PathBuf>,
    /// Requests decoding together at most.
    #[arg(long, default_value_t = 32, value_name = "B")]
    pub max_batch_size: usize,
    /// Requests accepted at once (queued or running); more get 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_name = "C")]
    pub max_concurrent_requests: usize,
    /// Prompt tokens prefilled per step, between decode steps (longer prompts go in chunks).
    #[arg(long, default_value_t = 512, value_name = "TOKENS")]
    pub prefill_chunk: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_tokens_limit: usize,
    /// The base model's name for `model` and /v1/models (default: the model path's file name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Seconds shutdown (SIGTERM, Ctrl-C) waits for requests in flight before cancelling them.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let mut cfg = peft_serve::ServeConfig::new(a.model);
    cfg.adapters = specs;
    cfg.host = a.host;
    cfg.port = a.port;
    cfg.api_key = a.api_key.filter(|k| !k.is_empty());
    cfg.max_loras = a.max_loras;
    cfg.max_cpu_loras = a.max_cpu_loras;
    cfg.adapter_root = a.adapter_root;
    cfg.max_batch_size = a.max_batch_size;
    cfg.max_concurrent_requests = a.max_concurrent_requests;
    cfg.prefill_chunk = a.prefill_chunk;
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.max_tokens_limit = a.max_tokens_limit;
    cfg.served_model_name = a.served_model_name;
    cfg.shutdown_timeout = Duration::from_secs(a.shutdown_timeout);
    cfg.device = crate::args::device(a.device)?;
    peft_serve::run(cfg)
}
