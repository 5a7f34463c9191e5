//! `peft serve` as a user runs it: the binary on an ephemeral port, answering with exactly the
//! greedy text `peft generate` prints for the same adapter, and exiting 0 on SIGTERM.

use peft::models::{self, LoadOptions};
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model_with_seed, LoraConfig, TaskType};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures/generation/tiny_llama")
}

fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[cfg(unix)]
#[test]
fn serve_answers_as_generate_and_exits_0_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("a");
    let model = models::load(
        &tiny(),
        &LoadOptions {
            task: Some(TaskType::CausalLm),
            ..Default::default()
        },
    )
    .unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()])),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    get_peft_model_with_seed(model, config, "default", 7)
        .unwrap()
        .save_pretrained(&adapter)
        .unwrap();
    serves_as_generate(&adapter, &adapter);
}

/// The same adapter as a llama.cpp GGUF LoRA (`peft export --format gguf`): served, it answers
/// with the text `peft generate` prints for the PEFT adapter.
#[cfg(unix)]
#[test]
fn serve_takes_a_gguf_lora_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("a");
    let model = models::load(
        &tiny(),
        &LoadOptions {
            task: Some(TaskType::CausalLm),
            ..Default::default()
        },
    )
    .unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "k_proj".into()])),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    get_peft_model_with_seed(model, config, "default", 7)
        .unwrap()
        .save_pretrained(&adapter)
        .unwrap();
    let gguf = tmp.path().join("a.gguf");
    let status = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["export", "--format", "gguf", "--adapter"])
        .args([
            &adapter,
            &PathBuf::from("--base"),
            &tiny(),
            &PathBuf::from("--out"),
            &gguf,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    serves_as_generate(&adapter, &gguf);
}

/// `peft generate` through `generate_adapter` and `peft serve` through `serve_adapter` give the
/// same greedy text; the server exits 0 on SIGTERM.
#[cfg(unix)]
fn serves_as_generate(generate_adapter: &Path, serve_adapter: &Path) {
    let m = tiny();
    let spec = format!("a={}", generate_adapter.display());
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args([
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            &spec,
        ])
        .args([
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "10",
            "--print-ids",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ids = &ids[0];
    let tok = peft::io::tokenizer::Tokenizer::for_model(&m).unwrap();
    let text = tok
        .decode(
            &ids.iter().copied().filter(|&t| t != 2).collect::<Vec<_>>(),
            true,
        )
        .unwrap();

    let spec = format!("a={}", serve_adapter.display());
    let mut server = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["serve", "--model", m.to_str().unwrap(), "--adapter", &spec])
        .args(["--port", "0", "--served-model-name", "tiny"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(server.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "peft serve ended");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.trim().to_string();
        }
    };
    let body = serde_json::json!({"model": "a", "prompt": "hello world", "max_tokens": 10,
                                  "temperature": 0})
    .to_string();
    let (status, body) = post(&addr, "/v1/completions", &body);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], ids.len());

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = server.wait().unwrap();
    assert!(status.success(), "peft serve exited with {status}");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("stopped"), "{rest}");
}
