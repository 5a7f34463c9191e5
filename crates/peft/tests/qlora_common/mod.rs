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
