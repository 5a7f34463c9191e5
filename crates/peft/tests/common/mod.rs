//! Shared helpers for the fixture tests. Fixtures come from tools/fixtures/make_fixtures.py,
//! which runs the real transformers + PEFT.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::{Inputs, Model, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

pub fn case_dir(case: &str) -> PathBuf {
    fixtures().join("cases").join(case)
}

pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    peft::io::load_safetensors(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn meta(case: &str) -> serde_json::Value {
    peft::io::read_json(&case_dir(case).join("meta.json")).unwrap()
}

pub fn all_cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join("cases"))
        .expect("fixture cases")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn inputs() -> Inputs {
    let t = load_st(&fixtures().join("inputs.safetensors"));
    let u32t = |k: &str| t[k].to_dtype(DType::U32).unwrap();
    Inputs {
        input_ids: Some(u32t("input_ids")),
        attention_mask: Some(u32t("attention_mask")),
        token_type_ids: Some(u32t("token_type_ids")),
        ..Default::default()
    }
}

pub fn labels(task: TaskType) -> Tensor {
    let t = load_st(&fixtures().join("inputs.safetensors"));
    match task {
        TaskType::TokenCls => t["token_labels"].clone(),
        _ => t["labels"].clone(),
    }
}

pub fn task_of(case: &str) -> TaskType {
    meta(case)["task_type"].as_str().unwrap().parse().unwrap()
}

pub fn load_model(case: &str) -> Box<dyn Model> {
    let m = meta(case);
    let dir = fixtures().join("models").join(m["model"].as_str().unwrap());
    let opts = LoadOptions {
        task: Some(task_of(case)),
        ..Default::default()
    };
    models::load(&dir, &opts).unwrap()
}

/// Largest absolute difference; panics on shape mismatch.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
