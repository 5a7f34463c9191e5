//! `peft export` between PEFT adapters and llama.cpp GGUF LoRA files, and GGUF adapters on the
//! command line (fixtures: tools/fixtures/make_gguf_lora_fixtures.py — PEFT adapters on a tiny
//! Llama, llama.cpp's convert_lora_to_gguf.py output for them, PEFT's logits).

mod common;

use common::{max_diff, peft, peft_fixtures, tensor};
use std::path::{Path, PathBuf};

fn fx() -> PathBuf {
    peft_fixtures().join("gguf_lora")
}

fn ids() -> String {
    let t = tensor(&fx().join("inputs.safetensors"), "input_ids");
    let rows: Vec<Vec<i64>> = t
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    format!("{rows:?}")
}

/// `peft forward` through `adapter`; PEFT's logits for `case` are the truth.
fn check_logits(adapter: &Path, case: &str, out: &Path) {
    let (ok, log) = peft(&[
        "forward",
        "--model",
        fx().join("base").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input-ids",
        &ids(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let want = tensor(&fx().join("logits.safetensors"), case);
    let d = max_diff(&tensor(out, "logits"), &want);
    assert!(d < 1e-4, "{case}: {d}");
}

#[test]
fn export_to_gguf_and_back_gives_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("a.gguf");
    let base = fx().join("base");
    let (ok, log) = peft(&[
        "export",
        "--adapter",
        fx().join("lora_all").to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--format",
        "gguf",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    // Byte for byte llama.cpp's converter output but for the model-card metadata it guesses:
    // the tensor data section is identical.
    let ours = std::fs::read(&gguf).unwrap();
    let theirs = std::fs::read(fx().join("lora_all.gguf")).unwrap();
    let tail = 4 * 1024;
    assert_eq!(ours[ours.len() - tail..], theirs[theirs.len() - tail..]);
    let logits = tmp.path().join("l.safetensors");
    check_logits(&gguf, "lora_all", &logits);
    let back = tmp.path().join("peft");
    let (ok, log) = peft(&[
        "export",
        "--adapter",
        gguf.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--format",
        "peft",
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    assert!(back.join("adapter_config.json").exists());
    check_logits(&back, "lora_all", &logits);
}

#[test]
fn merge_takes_a_gguf_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let (ok, log) = peft(&[
        "merge",
        "--model",
        fx().join("base").to_str().unwrap(),
        "--adapter",
        fx().join("lora_qv.gguf").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let out = tmp.path().join("l.safetensors");
    let (ok, log) = peft(&[
        "forward",
        "--model",
        merged.to_str().unwrap(),
        "--input-ids",
        &ids(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let want = tensor(&fx().join("logits.safetensors"), "lora_qv");
    assert!(max_diff(&tensor(&out, "logits"), &want) < 1e-4);
}

#[test]
fn export_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    // A GGUF adapter given where a PEFT directory is expected, and a non-llama base.
    let out = tmp.path().join("x.gguf");
    let (ok, log) = peft(&[
        "export",
        "--adapter",
        fx().join("lora_qv").to_str().unwrap(),
        "--base",
        peft_fixtures()
            .join("bert/models/seq_cls")
            .to_str()
            .unwrap(),
        "--format",
        "gguf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        log.contains("llama-family") && log.contains("bert"),
        "{log}"
    );
    assert!(!out.exists());
}
