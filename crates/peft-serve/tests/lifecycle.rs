//! `peft serve` with the real SmolLM2-135M (slow enough on a CPU that requests overlap what the
//! test does): an adapter replaced and then unloaded while a request on it runs (the request
//! finishes on the old weights, new requests get the new ones); 429 with Retry-After past
//! --max-concurrent-requests; a dropped connection frees its slot and its batch row (seen in
//! /metrics); shutdown lets the request in flight finish.

mod common;

use common::*;
use peft::generation::{generate, GenerationConfig};
use peft::io::tokenizer::Tokenizer;
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model_with_seed, load_with_adapter, LoadOptions, LoraConfig, TaskType};
use peft_serve::{Handle, ServeConfig};
use serde_json::json;
use std::io::BufReader;
use std::path::Path;

fn opts() -> LoadOptions {
    LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    }
}

fn make_adapter(dir: &Path, seed: u64) {
    let model = peft::models::load(&smollm2(), &opts()).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()])),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    get_peft_model_with_seed(model, config, "default", seed)
        .unwrap()
        .save_pretrained(dir)
        .unwrap();
}

fn greedy_text(adapter: &Path, prompt: &str, n: usize) -> String {
    let mut tok = Tokenizer::for_model(&smollm2()).unwrap();
    let ids = tok.encode_text(prompt, true).unwrap();
    let m = load_with_adapter(&smollm2(), adapter, opts()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    let out = generate(&m, &[ids], &cfg, None).unwrap().tokens.remove(0);
    let eos = m.base_model().dims().eos_token_ids;
    let kept: Vec<u32> = out.into_iter().filter(|t| !eos.contains(t)).collect();
    tok.decode(&kept, true).unwrap()
}

fn config() -> ServeConfig {
    let mut cfg = ServeConfig::new(smollm2());
    cfg.port = 0;
    cfg.served_model_name = Some("smol".into());
    cfg
}

/// Opens a streamed completion and reads until its first text arrives.
fn open_stream(addr: std::net::SocketAddr, model: &str, prompt: &str, n: usize) -> Stream {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                      "stream": true})
    .to_string();
    let s = send(addr, "POST", "/v1/completions", &[], Some(&body));
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let mut st = Stream {
        r,
        text: String::new(),
        done: false,
        chunks: 0,
    };
    while st.text.is_empty() && st.next() {}
    st
}

struct Stream {
    r: BufReader<std::net::TcpStream>,
    text: String,
    done: bool,
    chunks: usize,
}

impl Stream {
    /// Reads one chunk; false at the end.
    fn next(&mut self) -> bool {
        let Some(c) = read_chunk(&mut self.r) else {
            self.done = true;
            return false;
        };
        for line in c.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            self.text
                .push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            self.chunks += 1;
        }
        true
    }
    fn finish(mut self) -> String {
        while self.next() {}
        assert!(self.done);
        self.text
    }
}

#[test]
fn replace_and_unload_while_requests_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    make_adapter(&root.join("v1"), 11);
    make_adapter(&root.join("v2"), 12);
    let prompt = "The capital of France is";
    let n = 24;
    let want_v1 = greedy_text(&root.join("v1"), prompt, n);
    let want_v2 = greedy_text(&root.join("v2"), prompt, n);
    assert_ne!(want_v1, want_v2);

    let mut cfg = config();
    cfg.adapter_root = Some(root.clone());
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    let load = |path: &str| {
        post(
            addr,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": path}),
        )
    };
    let r = load("v1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["replaced"], false);

    // Replace while a request on v1 runs: it finishes on v1; a new request gets v2.
    let running = open_stream(addr, "x", prompt, n);
    let r = load("v2");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["replaced"], true);
    assert!(
        !running.done,
        "the request ended before the replace: the test proves nothing"
    );
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": prompt, "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["text"], want_v2.as_str());
    assert_eq!(
        running.finish(),
        want_v1,
        "the in-flight request left its weights"
    );

    // Unload while a request on v2 runs: it finishes; the name is gone for new requests.
    let running = open_stream(addr, "x", prompt, n);
    let r = post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "x"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!running.done);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": prompt, "max_tokens": 2}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(running.finish(), want_v2);
    wait_until("both versions to leave memory", || {
        let m = get(addr, "/metrics").body;
        metric(&m, "peft_adapter_loaded", &[("adapter", "x")]).is_none()
    });
    server.shutdown().unwrap();
}

#[test]
fn overload_disconnect_and_graceful_shutdown() {
    let mut cfg = config();
    cfg.max_concurrent_requests = 2;
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    let long = open_stream(addr, "smol", "Once upon a time", 400);
    let short = open_stream(addr, "smol", "The weather today", 120);

    // A third request is one too many.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "smol", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let m = get(addr, "/metrics").body;
    assert_eq!(metric(&m, "peft_requests_in_flight", &[]), Some(2.0));

    // The client of the long request goes away: its slot and its batch row are freed at once,
    // while the other request still runs.
    drop(long);
    wait_until("the dropped request to leave", || {
        let m = get(addr, "/metrics").body;
        metric(&m, "peft_requests_in_flight", &[]) == Some(1.0)
            && metric(&m, "peft_running_batch_size", &[]) == Some(1.0)
            && metric(&m, "peft_requests_total", &[("status", "cancelled")]) == Some(1.0)
    });
    let generated = metric(
        &get(addr, "/metrics").body,
        "peft_generated_tokens_total",
        &[],
    );
    assert!(
        generated.unwrap() < 300.0,
        "the dropped request kept generating"
    );

    // Shutdown: the request in flight (the wait above saw it running) still finishes, then the
    // server stops.
    let stopper = std::thread::spawn(move || server.shutdown());
    let text = short.finish();
    assert!(!text.is_empty());
    stopper.join().unwrap().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting"
    );
}
