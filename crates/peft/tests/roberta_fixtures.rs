//! RoBERTa (SEQ_CLS, TOKEN_CLS) and XLM-RoBERTa (SEQ_CLS) against fixtures from transformers +
//! PEFT 0.21 (tools/fixtures/make_seq2seq_fixtures.py): base logits with padding (positions count
//! from the padding index over real tokens only), embeddings instead of ids, key/value prefixes
//! through the cache, LoRA adapters trained by PEFT and merged.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_close, load_st};
use peft::models::{self, Cache, KeyValue, LoadOptions};
use peft::train::classification_loss;
use peft::tuners::BaseFields;
use peft::{Inputs, Model, PeftModel, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;
const CASES: [&str; 3] = ["seq_cls", "token_cls", "xlm_seq_cls"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roberta")
}

fn raw_inputs() -> HashMap<String, Tensor> {
    load_st(&dir().join("inputs.safetensors"))
}

fn inputs() -> Inputs {
    let t = raw_inputs();
    Inputs {
        input_ids: Some(t["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(t["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    }
}

fn meta(case: &str) -> serde_json::Value {
    peft::io::read_json(&dir().join(case).join("meta.json")).unwrap()
}

fn task(case: &str) -> TaskType {
    meta(case)["task_type"].as_str().unwrap().parse().unwrap()
}

fn load(case: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(case)),
        ..Default::default()
    };
    models::load(&dir().join(case).join("model"), &opts).unwrap()
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    load_st(&dir().join(case).join("expected.safetensors"))
}

fn labels(case: &str, classes: usize) -> Tensor {
    let raw = raw_inputs();
    match task(case) {
        TaskType::TokenCls => raw["token_labels"].clone(),
        _ => {
            let l: Vec<i64> = raw["labels"].to_vec1().unwrap();
            let l: Vec<i64> = l.into_iter().map(|v| v % classes as i64).collect();
            Tensor::new(l.as_slice(), &candle_core::Device::Cpu).unwrap()
        }
    }
}

#[test]
fn base_logits_and_architecture() {
    for case in CASES {
        let m = load(case);
        assert_eq!(
            m.info().architecture,
            meta(case)["architecture"].as_str().unwrap()
        );
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: base"),
            &got,
            &expected(case)["base_logits"],
            TOL,
        );
    }
}

#[test]
fn embeddings_instead_of_ids_use_sequential_positions() {
    let raw = raw_inputs();
    for case in CASES {
        let m = load(case);
        let i = Inputs {
            inputs_embeds: Some(raw["inputs_embeds"].clone()),
            attention_mask: inputs().attention_mask,
            ..Default::default()
        };
        let got = m.forward(&i, false).unwrap();
        assert_close(
            &format!("{case}: embeds"),
            &got,
            &expected(case)["embeds_logits"],
            TOL,
        );
    }
}

/// Prefixes through transformers' `past_key_values` (with the attention mask covering them):
/// positions of the real tokens continue after the prefix length.
#[test]
fn prefixes_through_the_cache() {
    for case in CASES {
        let m = load(case);
        let p = load_st(&dir().join(case).join("prefix.safetensors"));
        let mut cache = Cache {
            self_attn: (0..m.dims().num_layers)
                .map(|i| {
                    Some(KeyValue {
                        key: p[&format!("self.{i}.key")].clone(),
                        value: p[&format!("self.{i}.value")].clone(),
                    })
                })
                .collect(),
            ..Default::default()
        };
        let mut i = inputs();
        let mask = i.attention_mask.take().unwrap();
        let ones = Tensor::ones((mask.dim(0).unwrap(), 3), DType::U32, mask.device()).unwrap();
        i.attention_mask = Some(Tensor::cat(&[&ones, &mask], 1).unwrap());
        let got = m.forward_with_cache(&i, Some(&mut cache), false).unwrap();
        assert_close(
            &format!("{case}: prefix"),
            &got,
            &expected(case)["prefix_logits"],
            TOL,
        );
    }
}

#[test]
fn peft_lora_adapters_load_and_merge() {
    for case in CASES {
        let want = expected(case);
        let mut m = PeftModel::from_pretrained(
            load(case),
            &dir().join(case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(&format!("{case}: lora"), &got, &want["lora_logits"], TOL);
        m.merge_adapter().unwrap();
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: merged"),
            &got,
            &want["merged_logits"],
            TOL,
        );
    }
}

/// The classifier (`classifier.dense` + `classifier.out_proj`) travels in the adapter, so a bare
/// base model plus the adapter gives the trained logits.
#[test]
fn load_with_adapter_builds_the_roberta_head() {
    let case = "seq_cls";
    let m = peft::load_with_adapter(
        &dir().join(case).join("model"),
        &dir().join(case).join("adapter"),
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(m.base_model().info().task, TaskType::SeqCls);
    let got = m.forward(&inputs(), false).unwrap();
    assert_close(
        "load_with_adapter",
        &got,
        &expected(case)["lora_logits"],
        TOL,
    );
}

#[test]
fn default_lora_targets_for_roberta_and_xlm_roberta() {
    for case in ["seq_cls", "xlm_seq_cls"] {
        let config = peft::LoraConfig {
            base: BaseFields {
                task_type: Some(TaskType::SeqCls),
                ..Default::default()
            },
            ..Default::default()
        };
        let p = peft::get_peft_model(load(case), config, "default").unwrap();
        let mut got: Vec<String> = p
            .base_model()
            .modules()
            .iter()
            .filter_map(|m| match m {
                peft::layers::ModuleRef::Linear(l) if !l.adapters.is_empty() => {
                    Some(l.name.clone())
                }
                _ => None,
            })
            .collect();
        got.sort();
        let mut want: Vec<String> = meta(case)["lora_modules"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        want.sort();
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn dims_and_position_limit() {
    let m = load("seq_cls");
    let d = m.dims();
    // 40 position embeddings, of which the first padding_idx + 1 = 2 are never used by tokens.
    assert_eq!(d.max_positions, Some(38));
    assert_eq!((d.pad_token_id, d.bos_token_id), (Some(1), Some(0)));
    assert_eq!(d.eos_token_ids, vec![2]);
    let ids = Tensor::zeros((1, 39), DType::U32, &candle_core::Device::Cpu).unwrap();
    let e = m.forward(&Inputs::new(ids), false).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings 40"), "{e}");
}

/// Train mode (dropout on): every trainable tensor, LoRA and the classifier copies, gets a
/// non-zero gradient.
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    for case in CASES {
        let adapter = dir().join(case).join("adapter");
        let mut m = PeftModel::from_pretrained(load(case), &adapter, Default::default()).unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&adapter, "default", true).unwrap();
        let logits = m.forward(&inputs(), true).unwrap();
        let classes = *logits.dims().last().unwrap();
        let loss = classification_loss(&logits, &labels(case, classes)).unwrap();
        let grads = loss.backward().unwrap();
        let params = m.trainable_parameters();
        assert!(
            params.iter().any(|(k, _)| k.contains("classifier")),
            "{case}"
        );
        for (key, var) in params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{case}: zero gradient for {key}");
        }
    }
}
