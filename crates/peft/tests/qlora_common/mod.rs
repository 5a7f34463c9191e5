//! What the QLoRA test files share: the fixture directory and quantization config of
//! tools/fixtures/make_qlora_fixtures.py, and views of a model's quantized layers.
#![allow(dead_code)]

use peft::layers::ModuleRef;
use peft::quant::{BitsAndBytesConfig, QuantWeight};
use peft::Model;
use std::path::{Path, PathBuf};

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qlora")
}

pub fn qlora_config() -> BitsAndBytesConfig {
    BitsAndBytesConfig::from_json(&serde_json::json!({
        "load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
        "bnb_4bit_compute_dtype": "float32"
    }))
    .unwrap()
}

/// Names of the Linear layers stored quantized.
pub fn quantized_linears(m: &dyn Model) -> Vec<String> {
    m.modules()
        .into_iter()
        .filter_map(|m| match m {
            ModuleRef::Linear(l) if l.quant().is_some() => Some(l.name.clone()),
            _ => None,
        })
        .collect()
}

pub const TOL: f32 = 2e-4;

pub fn packed_codes(m: &dyn Model) -> std::collections::HashMap<String, Vec<u8>> {
    m.modules()
        .into_iter()
        .filter_map(|m| match m {
            ModuleRef::Linear(l) => match l.quant() {
                Some(QuantWeight::Bnb4(q)) => Some((l.name.clone(), q.packed.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

pub fn sorted_quantized(m: &dyn Model) -> Vec<String> {
    let mut v = quantized_linears(m);
    v.sort();
    v
}

/// One model's fixtures under qlora/ (`gpt2`, `bert`): what the per-model test files read.
pub fn model_dir(model: &str) -> PathBuf {
    dir().join(model)
}

pub fn model_st(model: &str, name: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    crate::common::load_st(&model_dir(model).join(name))
}

pub fn model_inputs(model: &str) -> peft::Inputs {
    let t = model_st(model, "inputs.safetensors");
    peft::Inputs {
        input_ids: Some(t["input_ids"].to_dtype(candle_core::DType::U32).unwrap()),
        attention_mask: Some(
            t["attention_mask"]
                .to_dtype(candle_core::DType::U32)
                .unwrap(),
        ),
        ..Default::default()
    }
}

pub fn model_expected(model: &str, name: &str) -> candle_core::Tensor {
    model_st(model, "expected.safetensors")[name].clone()
}

pub fn load_as(
    dir: &Path,
    task: peft::TaskType,
    quantization: Option<BitsAndBytesConfig>,
) -> Box<dyn Model> {
    let opts = peft::models::LoadOptions {
        task: Some(task),
        quantization,
        ..Default::default()
    };
    peft::models::load(dir, &opts).unwrap()
}

pub fn model_meta(model: &str) -> serde_json::Value {
    peft::io::read_json(&model_dir(model).join("meta.json")).unwrap()
}

/// The module names transformers made `Linear4bit` / `Linear8bitLt` (meta.json `key`), sorted.
pub fn quantized_names(model: &str, key: &str) -> Vec<String> {
    let mut v: Vec<String> = model_meta(model)[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}
