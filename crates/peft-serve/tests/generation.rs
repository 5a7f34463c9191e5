//! `peft serve` over real HTTP on an ephemeral loopback port, with the tiny Llama fixture and
//! LoRA adapters made from fixed seeds: concurrent requests across three adapters (one of them
//! DoRA, which cannot share a batch) and the base, streamed and not, give exactly the greedy
//! tokens of the library's `generate` with that adapter alone; the streamed text adds up to the
//! non-streamed text; unknown names are a 404 listing the names; auth; adapter paths stay inside
//! --adapter-root; adapters evicted from the model and from memory are read back when named.

mod common;

use common::*;
use peft::generation::{generate, GenerationConfig};
use peft::io::tokenizer::Tokenizer;
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model_with_seed, load_with_adapter, LoadOptions, LoraConfig, TaskType};
use peft_serve::{Handle, ServeConfig};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A LoRA adapter on the tiny Llama with random (non-zero) weights from `seed`.
fn make_adapter(dir: &Path, seed: u64, targets: &[&str], dora: bool) -> PathBuf {
    let model = peft::models::load(
        &tiny_llama(),
        &LoadOptions {
            task: Some(TaskType::CausalLm),
            ..Default::default()
        },
    )
    .unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSpec::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        init_lora_weights: InitLoraWeights::Bool(false),
        use_dora: dora,
        ..Default::default()
    };
    let pm = get_peft_model_with_seed(model, config, "default", seed).unwrap();
    pm.save_pretrained(dir).unwrap();
    dir.to_path_buf()
}

fn greedy_alone(adapter: Option<&Path>, prompt: &[u32], n: usize) -> Vec<u32> {
    let cfg = GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let out = match adapter {
        Some(dir) => {
            let m = load_with_adapter(&tiny_llama(), dir, opts).unwrap();
            generate(&m, &[prompt.to_vec()], &cfg, None).unwrap()
        }
        None => {
            let m = peft::models::load(&tiny_llama(), &opts).unwrap();
            generate(m.as_ref(), &[prompt.to_vec()], &cfg, None).unwrap()
        }
    };
    out.tokens[0].clone()
}

fn config() -> ServeConfig {
    let mut cfg = ServeConfig::new(tiny_llama());
    cfg.port = 0;
    cfg.served_model_name = Some("tiny".into());
    cfg
}

const PROMPTS: [&str; 4] = [
    "the quick brown",
    "hello world",
    "numbers 0 1 2",
    "a longer prompt, in chunks",
];

#[test]
fn concurrent_requests_across_adapters_equal_generate_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let a = make_adapter(&tmp.path().join("a"), 1, &["q_proj", "v_proj"], false);
    let b = make_adapter(
        &tmp.path().join("b"),
        2,
        &["k_proj", "o_proj", "down_proj"],
        false,
    );
    let c = make_adapter(&tmp.path().join("c"), 3, &["q_proj", "up_proj"], true);
    let mut cfg = config();
    cfg.adapters = vec![
        ("a".into(), a.clone()),
        ("b".into(), b.clone()),
        ("c".into(), c.clone()),
    ];
    cfg.prefill_chunk = 5;
    cfg.max_batch_size = 6;
    // Two adapters on the model at once: the third waits or evicts, never mixes in wrongly.
    cfg.max_loras = 2;
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;

    let mut tok = Tokenizer::for_model(&tiny_llama()).unwrap();
    let n = 10;
    let models: [(&str, Option<&Path>); 4] = [
        ("tiny", None),
        ("a", Some(&a)),
        ("b", Some(&b)),
        ("c", Some(&c)),
    ];
    let mut jobs = Vec::new();
    for (m, dir) in models {
        for p in PROMPTS {
            let ids = tok.encode_text(p, true).unwrap();
            let want = greedy_alone(dir, &ids, n);
            assert!(!want.is_empty());
            for stream in [false, true] {
                jobs.push((m, p, stream, want.clone()));
            }
        }
    }
    // The base and the adapters must disagree, or the test could not tell them apart.
    let first: Vec<_> = jobs.iter().filter(|j| j.1 == PROMPTS[0] && !j.2).collect();
    for i in 0..first.len() {
        for j in i + 1..first.len() {
            assert_ne!(first[i].3, first[j].3, "{} and {}", first[i].0, first[j].0);
        }
    }
    let handles: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (m, p, stream, want))| {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis((i % 7) as u64 * 3));
                let body = json!({
                    "model": m, "prompt": p, "max_tokens": n, "temperature": 0,
                    "logprobs": 1, "stream": stream,
                });
                let r = post(addr, "/v1/completions", &body);
                assert_eq!(r.status, 200, "{}", r.body);
                (m, p, stream, want, r)
            })
        })
        .collect();
    let tok = Tokenizer::for_model(&tiny_llama()).unwrap();
    let mut texts = std::collections::HashMap::new();
    for h in handles {
        let (m, p, stream, want, r) = h.join().unwrap();
        let want_tokens: Vec<String> = want
            .iter()
            .map(|&t| tok.decode(&[t], false).unwrap())
            .collect();
        let eos = 2;
        let want_text = tok
            .decode(
                &want
                    .iter()
                    .copied()
                    .filter(|&t| t != eos)
                    .collect::<Vec<_>>(),
                true,
            )
            .unwrap();
        let (text, tokens) = if stream {
            let events = r.events();
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let mut text = String::new();
            let mut tokens = Vec::new();
            for e in &events[..events.len() - 1] {
                let v: serde_json::Value = serde_json::from_str(e).unwrap();
                let ch = &v["choices"][0];
                text.push_str(ch["text"].as_str().unwrap());
                for t in ch["logprobs"]["tokens"].as_array().unwrap() {
                    tokens.push(t.as_str().unwrap().to_string());
                }
            }
            (text, tokens)
        } else {
            let v = r.json();
            let ch = &v["choices"][0];
            assert_eq!(v["usage"]["completion_tokens"], want.len(), "{m} {p}");
            let tokens = ch["logprobs"]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            (ch["text"].as_str().unwrap().to_string(), tokens)
        };
        assert_eq!(tokens, want_tokens, "{m} {p:?} stream={stream}: tokens");
        assert_eq!(text, want_text, "{m} {p:?} stream={stream}: text");
        if let Some(other) = texts.insert((m, p), text.clone()) {
            assert_eq!(other, text, "{m} {p:?}: streamed and plain text differ");
        }
    }
    // Chat: the template from tokenizer_config.json, then the same greedy tokens.
    let mut tok = Tokenizer::for_model(&tiny_llama()).unwrap();
    let chat = [
        ("system".to_string(), "s".to_string()),
        ("user".to_string(), "hi".to_string()),
    ];
    let rendered = tok.apply_chat_template(&chat, true).unwrap();
    let ids = tok.encode_text(&rendered, false).unwrap();
    let want = greedy_alone(Some(&b), &ids, 8);
    let want_text = tok
        .decode(
            &want.iter().copied().filter(|&t| t != 2).collect::<Vec<_>>(),
            true,
        )
        .unwrap();
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want_text.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                "max_tokens": 8, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, want_text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], want.len());
    assert!(chunks.last().unwrap()["choices"]
        .as_array()
        .unwrap()
        .is_empty());

    // A stop string ends the text before it, streamed or not.
    let full = &texts[&("a", PROMPTS[0])];
    if let Some(stop) = full.get(3..5).filter(|s| !s.trim().is_empty()) {
        let cut = &full[..full.find(stop).unwrap()];
        for stream in [false, true] {
            let r = post(
                addr,
                "/v1/completions",
                &json!({"model": "a", "prompt": PROMPTS[0], "max_tokens": n,
                        "temperature": 0, "stop": [stop], "stream": stream}),
            );
            let text: String = if stream {
                r.events()
                    .iter()
                    .filter(|e| *e != "[DONE]")
                    .map(|e| {
                        let v: serde_json::Value = serde_json::from_str(e).unwrap();
                        v["choices"][0]["text"].as_str().unwrap().to_string()
                    })
                    .collect()
            } else {
                let v = r.json();
                assert_eq!(v["choices"][0]["finish_reason"], "stop");
                v["choices"][0]["text"].as_str().unwrap().to_string()
            };
            assert_eq!(text, cut, "stop {stop:?} stream={stream}");
        }
    }

    // Metrics saw every adapter and the histograms filled.
    let m = get(addr, "/metrics").body;
    for name in ["a", "b", "c", "tiny"] {
        assert!(
            metric(
                &m,
                "peft_requests_total",
                &[("adapter", name), ("status", "ok")]
            )
            .unwrap_or(0.0)
                >= 8.0,
            "{name}: {m}"
        );
    }
    assert!(metric(&m, "peft_time_to_first_token_seconds_count", &[]).unwrap() >= 32.0);
    assert!(metric(&m, "peft_adapter_loaded", &[("residency", "active")]).unwrap() <= 2.0);
    server.shutdown().unwrap();
}

#[test]
fn unknown_adapter_is_404_listing_names_and_models_lists_all() {
    let tmp = tempfile::tempdir().unwrap();
    let a = make_adapter(&tmp.path().join("a"), 1, &["q_proj"], false);
    let mut cfg = config();
    cfg.adapters = vec![("a".into(), a)];
    let server = Handle::start(cfg).unwrap();
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"model": "nope", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 404);
    let e = &r.json()["error"];
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("nope") && msg.contains("tiny") && msg.contains('a'),
        "{msg}"
    );
    assert_eq!(e["code"], "model_not_found");
    assert!(e["type"].is_string());
    let models = get(server.addr, "/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "a"]);
    assert_eq!(models["data"][1]["parent"], "tiny");
    // Bad requests have OpenAI's error shape too.
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"model": "a", "prompt": "hi", "max_tokens": 100000}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let r = request(
        server.addr,
        "POST",
        "/v1/completions",
        &[],
        Some("{not json"),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].is_string());
    // The body is bounded.
    let big = format!(
        "{{\"model\": \"a\", \"prompt\": \"{}\"}}",
        "x".repeat(5 << 20)
    );
    let r = request(server.addr, "POST", "/v1/completions", &[], Some(&big));
    assert_eq!(r.status, 413, "{}", r.body);
    // Encoder routes on a decoder are refused in words.
    let r = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "a", "input": "hi"}),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn api_key_guards_v1_but_not_health() {
    let mut cfg = config();
    cfg.api_key = Some("s3cret".into());
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    assert_eq!(get(addr, "/health").status, 200);
    let r = get(addr, "/v1/models");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let wrong = request(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert_eq!(wrong.status, 401);
    let ok = request(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(ok.status, 200);
    let body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}).to_string();
    let r = request(addr, "POST", "/v1/completions", &[], Some(&body));
    assert_eq!(r.status, 401);
    let r = request(
        addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer s3cret")],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    drop(server);
    // Without --api-key nothing is asked.
    let server = Handle::start(config()).unwrap();
    assert_eq!(get(server.addr, "/v1/models").status, 200);
}

#[test]
fn adapter_paths_stay_inside_the_adapter_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let inside = make_adapter(&root.join("good"), 5, &["q_proj"], false);
    let outside = make_adapter(&tmp.path().join("outside"), 6, &["q_proj"], false);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();

    // Without --adapter-root nothing loads at run time.
    let server = Handle::start(config()).unwrap();
    let r = post(
        server.addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": inside.display().to_string()}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    drop(server);

    let mut cfg = config();
    cfg.adapter_root = Some(root.clone());
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    let load = |path: String| {
        post(
            addr,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": path}),
        )
    };
    for bad in [
        "../outside".to_string(),
        outside.display().to_string(),
        "good/../../outside".to_string(),
        #[cfg(unix)]
        "link".to_string(),
    ] {
        let r = load(bad.clone());
        assert_eq!(r.status, 403, "{bad}: {}", r.body);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapter root"));
    }
    assert_eq!(load("missing".into()).status, 404);
    // An adapter that trains the base biases would change every other adapter's outputs.
    let model = peft::models::load(&tiny_llama(), &LoadOptions::default()).unwrap();
    let biased = LoraConfig {
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into()])),
        bias: peft::tuners::lora::Bias::All,
        ..Default::default()
    };
    get_peft_model_with_seed(model, biased, "default", 1)
        .unwrap()
        .save_pretrained(&root.join("biased"))
        .unwrap();
    let r = load("biased".into());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("biases"));
    let r = load("good".into());
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": "hi", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Unloading makes the name unknown again.
    let r = post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "x"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": "hi", "max_tokens": 3}),
    );
    assert_eq!(r.status, 404);
    let r = post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "x"}));
    assert_eq!(r.status, 404);
    // Once nothing uses it, it leaves memory.
    wait_until("the unloaded adapter to leave memory", || {
        let m = get(addr, "/metrics").body;
        metric(&m, "peft_adapter_loaded", &[("adapter", "x")]).is_none()
    });
}

/// `--max-loras 1 --max-cpu-loras 1`: each adapter named pushes the other off the model and out
/// of memory (the metrics say where each one lives); naming the evicted one again reads it back
/// from disk and gives its own greedy text, never the other's or the base's.
#[test]
fn evicted_adapters_are_read_back_when_named() {
    let tmp = tempfile::tempdir().unwrap();
    let a = make_adapter(&tmp.path().join("a"), 7, &["q_proj", "v_proj"], false);
    let b = make_adapter(&tmp.path().join("b"), 8, &["q_proj", "v_proj"], false);
    let mut cfg = config();
    cfg.adapters = vec![("a".into(), a.clone()), ("b".into(), b.clone())];
    cfg.max_loras = 1;
    cfg.max_cpu_loras = Some(1);
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    let mut tok = Tokenizer::for_model(&tiny_llama()).unwrap();
    let prompt = PROMPTS[0];
    let ids = tok.encode_text(prompt, true).unwrap();
    let n = 8;
    let text_of = |dir: Option<&Path>| {
        let want = greedy_alone(dir, &ids, n);
        let want: Vec<u32> = want.into_iter().filter(|&t| t != 2).collect();
        tok.decode(&want, true).unwrap()
    };
    let (want_a, want_b, want_base) = (text_of(Some(&a)), text_of(Some(&b)), text_of(None));
    assert!(want_a != want_b && want_a != want_base && want_b != want_base);
    let residency = |name: &str| {
        let m = get(addr, "/metrics").body;
        ["active", "cpu"].into_iter().find(|r| {
            metric(
                &m,
                "peft_adapter_loaded",
                &[("adapter", name), ("residency", r)],
            )
            .is_some()
        })
    };
    for (model, want) in [
        ("a", &want_a),
        ("b", &want_b),
        ("a", &want_a),
        ("b", &want_b),
    ] {
        let r = post(
            addr,
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["text"], want.as_str(), "{model}");
        let other = if model == "a" { "b" } else { "a" };
        assert_eq!(residency(model), Some("active"), "{model}");
        assert_eq!(
            residency(other),
            None,
            "{other} should be off the model and out of memory"
        );
    }
    server.shutdown().unwrap();
}
