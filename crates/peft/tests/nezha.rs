//! NEZHA against transformers 4.57.6 (fixtures: tools/fixtures/make_nezha_fixtures.py):
//! `NezhaForSequenceClassification` / `NezhaForTokenClassification` logits with padding and
//! relative positions clipped inside the sequence, the same with PEFT 0.21.2 LoRA adapters, its
//! Chinese WordPiece tokenizer, and bottleneck adapters attaching to its hook points.

use candle_core::{DType, Device, Tensor};
use peft::io::tokenizer::Tokenizer;
use peft::models::{self, LoadOptions};
use peft::{BottleneckConfig, Inputs, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nezha")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn inputs(e: &HashMap<String, Tensor>) -> Inputs {
    let u = |k: &str| e[k].to_dtype(DType::U32).unwrap();
    Inputs {
        input_ids: Some(u("input_ids")),
        attention_mask: Some(u("attention_mask")),
        token_type_ids: Some(u("token_type_ids")),
        ..Default::default()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
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

/// Token classification compares the non-padding positions (transformers computes padding rows
/// too, but nothing reads them).
fn compare(name: &str, got: &Tensor, want: &Tensor, mask: &Tensor) {
    let (got, want) = if got.rank() == 3 {
        let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        (
            got.broadcast_mul(&m).unwrap(),
            want.broadcast_mul(&m).unwrap(),
        )
    } else {
        (got.clone(), want.clone())
    };
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "{name}: max diff {d}");
}

#[test]
fn nezha_heads_give_transformers_logits() {
    let e = expected();
    let x = inputs(&e);
    for (name, task) in [
        ("seq_cls", TaskType::SeqCls),
        ("token_cls", TaskType::TokenCls),
    ] {
        let m = models::load(
            &fixtures().join("models").join(name),
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(m.info().task, task);
        assert!(m.info().architecture.starts_with("Nezha"));
        let out = m.forward(&x, false).unwrap();
        compare(name, &out, &e[name], &e["attention_mask"]);
    }
}

#[test]
fn peft_lora_adapters_on_nezha_give_peft_logits() {
    let e = expected();
    let x = inputs(&e);
    for name in ["seq_cls", "token_cls"] {
        let m = peft::load_with_adapter(
            &fixtures().join("models").join(name),
            &fixtures().join(format!("lora_{name}")),
            LoadOptions::default(),
        )
        .unwrap();
        let out = m.forward(&x, false).unwrap();
        compare(
            &format!("lora_{name}"),
            &out,
            &e[&format!("lora_{name}")],
            &e["attention_mask"],
        );
        // The adapter changes the logits (the fixture's lora_B are not zero).
        assert!(max_diff(&out, &e[name]) > 1e-3);
    }
}

#[test]
fn nezha_chinese_wordpiece_tokenizer_gives_transformers_ids() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenized.json")).unwrap())
            .unwrap();
    let mut tok = Tokenizer::for_model(&fixtures()).unwrap();
    for (i, s) in want["sentences"].as_array().unwrap().iter().enumerate() {
        let ids = tok.encode_text(s.as_str().unwrap(), true).unwrap();
        let row: Vec<u32> = want["input_ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .filter(|&v| v != 0)
            .collect();
        assert_eq!(ids, row, "sentence {i}");
    }
}

#[test]
fn bottleneck_adapters_and_lora_attach_to_nezha() {
    let e = expected();
    let x = inputs(&e);
    let load =
        || models::load(&fixtures().join("models/seq_cls"), &LoadOptions::default()).unwrap();
    let config = BottleneckConfig::preset("double_seq_bn").unwrap();
    let m = peft::get_peft_model(load(), config, "bn").unwrap();
    let names: Vec<String> = m
        .layer_status()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            "model.nezha.encoder.layer.0.attention.output",
            "model.nezha.encoder.layer.0.output",
            "model.nezha.encoder.layer.1.attention.output",
            "model.nezha.encoder.layer.1.output"
        ]
    );
    // Houlsby's initialisation is near the identity; trained, it moves the logits.
    let out = m.forward(&x, false).unwrap();
    assert!(max_diff(&out, &e["seq_cls"]) < 1e-2);
    let loss = out.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (k, v) in m.trainable_parameters() {
        if k.contains("adapter_") {
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {k}");
        }
    }
}
