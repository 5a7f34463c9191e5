//! Helpers shared by the CLI tests: run the built `peft` binary, read fixture tensors.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `crates/peft/tests/fixtures`, made by the Python libraries (tools/fixtures/).
pub fn peft_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures")
}

/// Runs `peft ARGS`; returns (success, stdout then stderr).
pub fn peft(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `peft ARGS`; returns (exit code, stdout, stderr).
pub fn peft_split(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn tensor(path: &Path, name: &str) -> Tensor {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    t.remove(name)
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
}

pub fn matrix(t: &Tensor) -> String {
    serde_json::to_string(&t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A WordLevel tokenizer.json over the fixture vocabulary (ids 0..1000), with BERT's special
/// tokens at BERT's places and a [CLS] ... [SEP] template.
pub fn write_word_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert(t.to_string(), (i as u32).into());
    }
    for i in 4..1000u32 {
        let word = match i {
            4 => "good".to_string(),
            5 => "bad".to_string(),
            6 => "meh".to_string(),
            _ => format!("token{}", i - 7),
        };
        vocab.insert(word, i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, serde_json::to_string(&tok).unwrap()).unwrap();
}
