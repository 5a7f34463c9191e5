//! Helpers for the LoHa / LoKr / IA3 / VeRA fixture tests. Fixtures come from
//! tools/fixtures/make_tuner_fixtures.py (real transformers + PEFT), on the models of the BERT,
//! decoder and T5 fixture scripts.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::ops::cross_entropy;
use peft::{Inputs, Model, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tuners")
}

pub fn case_dir(case: &str) -> PathBuf {
    fixtures().join("cases").join(case)
}

/// The cases with logits (every case directory except the refused `vera_noproj`).
pub fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join("cases"))
        .expect("tuner fixture cases")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|c| c != "vera_noproj")
        .collect();
    v.sort();
    v
}

pub fn meta(case: &str) -> serde_json::Value {
    peft::io::read_json(&case_dir(case).join("meta.json")).unwrap()
}

pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    peft::io::load_safetensors(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn task(case: &str) -> TaskType {
    meta(case)["task_type"].as_str().unwrap().parse().unwrap()
}

/// The architecture family of a case: `bert`, `gpt2`, `llama` or `t5`.
pub fn family(case: &str) -> String {
    meta(case)["model"].as_str().unwrap().to_string()
}

pub fn model_dir(case: &str) -> PathBuf {
    repo().join(meta(case)["model_dir"].as_str().unwrap())
}

pub fn load_base(case: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(case)),
        ..Default::default()
    };
    models::load(&model_dir(case), &opts).unwrap()
}

pub fn raw_inputs(case: &str) -> HashMap<String, Tensor> {
    load_st(&repo().join(meta(case)["inputs"].as_str().unwrap()))
}

/// The model inputs the fixture script used for this family.
pub fn inputs(case: &str) -> Inputs {
    let t = raw_inputs(case);
    let u = |k: &str| Some(t[k].to_dtype(DType::U32).unwrap());
    match family(case).as_str() {
        "bert" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            token_type_ids: u("token_type_ids"),
            ..Default::default()
        },
        "t5" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            decoder_input_ids: u("decoder_input_ids"),
            ..Default::default()
        },
        _ => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            ..Default::default()
        },
    }
}

/// The loss the fixture script trained with: cross-entropy on the class labels (SEQ_CLS), on
/// the next token at real positions (CAUSAL_LM), or on the decoder labels (SEQ_2_SEQ_LM).
pub fn loss(case: &str, logits: &Tensor) -> Tensor {
    let t = raw_inputs(case);
    match task(case) {
        TaskType::SeqCls => cross_entropy(logits, &t["labels"]).unwrap(),
        TaskType::Seq2SeqLm => {
            let (b, s, v) = logits.dims3().unwrap();
            cross_entropy(
                &logits.reshape((b * s, v)).unwrap(),
                &t["labels"].flatten_all().unwrap(),
            )
            .unwrap()
        }
        _ => {
            let (b, s, v) = logits.dims3().unwrap();
            let ids: Vec<Vec<i64>> = t["input_ids"].to_vec2().unwrap();
            let mask: Vec<Vec<i64>> = t["attention_mask"].to_vec2().unwrap();
            let mut labels = Vec::new();
            for r in 0..b {
                for p in 1..s {
                    labels.push(if mask[r][p] == 1 { ids[r][p] } else { -100 });
                }
            }
            let shifted = logits
                .narrow(1, 0, s - 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b * (s - 1), v))
                .unwrap();
            let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
            cross_entropy(&shifted, &labels).unwrap()
        }
    }
}

/// Logits at the positions whose output means something: every position except the padded ones
/// of a decoder-only model (what a padded query attends to is an implementation detail).
pub fn real(case: &str, t: &Tensor) -> Tensor {
    if family(case) != "gpt2" && family(case) != "llama" {
        return t.clone();
    }
    let mask: Vec<u32> = inputs(case)
        .attention_mask
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (b, s, n) = t.dims3().unwrap();
    let idx: Vec<u32> = (0..(b * s) as u32)
        .filter(|&i| mask[i as usize] == 1)
        .collect();
    let idx = Tensor::new(idx.as_slice(), t.device()).unwrap();
    t.reshape((b * s, n))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap()
}

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

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Compares logits of `case` at meaningful positions.
pub fn check(case: &str, what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_diff(&real(case, got), &real(case, want));
    assert!(d <= tol, "{case}: {what}: max abs diff {d} > {tol}");
}
