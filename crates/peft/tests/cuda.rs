//! The CUDA path against the same transformers + PEFT fixtures the CPU tests use: BERT LoRA logits
//! for every case and gradients against torch's, T5 LoRA and merged logits, and greedy generation
//! of a small Llama. Built only with `--features cuda`; without a CUDA device each test says so and
//! returns (CI has no GPU, so it never builds this file).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions};
use peft::train::classification_loss;
use peft::{Inputs, PeftModel, TaskType};
use std::path::{Path, PathBuf};

fn gpu() -> Option<Device> {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA device: nothing to check");
        return None;
    }
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

fn to(dev: &Device, inputs: &Inputs) -> Inputs {
    let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(dev).unwrap());
    Inputs {
        input_ids: mv(&inputs.input_ids),
        attention_mask: mv(&inputs.attention_mask),
        token_type_ids: mv(&inputs.token_type_ids),
        decoder_input_ids: mv(&inputs.decoder_input_ids),
        decoder_attention_mask: mv(&inputs.decoder_attention_mask),
        ..Default::default()
    }
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

fn bert_on(dev: &Device, case: &str) -> PeftModel {
    let m = meta(case);
    let dir = fixtures().join("models").join(m["model"].as_str().unwrap());
    let opts = LoadOptions {
        task: Some(task_of(case)),
        device: dev.clone(),
        ..Default::default()
    };
    let base = models::load(&dir, &opts).unwrap();
    PeftModel::from_pretrained(base, &case_dir(case).join("adapter"), Default::default()).unwrap()
}

#[test]
fn bert_lora_logits_on_cuda_match_peft() {
    let Some(dev) = gpu() else { return };
    for case in all_cases() {
        let want = load_st(&case_dir(&case).join("expected.safetensors"));
        let m = bert_on(&dev, &case);
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs()), false)).unwrap();
        assert_close(
            &format!("{case} on cuda"),
            &cpu(&got),
            &want["lora_logits"],
            1e-4,
        );
    }
}

#[test]
fn bert_gradients_on_cuda_match_torch() {
    let Some(dev) = gpu() else { return };
    let case = "list_qv";
    let want = load_st(&case_dir(case).join("grads.safetensors"));
    let mut m = bert_on(&dev, case);
    m.delete_adapter("default").unwrap();
    m.load_adapter(&case_dir(case).join("adapter"), "default", true)
        .unwrap();
    let logits = m.forward(&to(&dev, &inputs()), false).unwrap();
    let labels = labels(task_of(case)).to_device(&dev).unwrap();
    let loss = classification_loss(&logits, &labels).unwrap();
    assert_close("loss", &cpu(&loss.reshape(1).unwrap()), &want["loss"], 1e-5);
    let grads = loss.backward().unwrap();
    for (key, var) in m.trainable_parameters() {
        let g = grads.get(var.as_tensor()).expect("gradient");
        assert_close(&key, &cpu(g), &want[&key], 1e-4);
    }
}

#[test]
fn t5_lora_and_merged_logits_on_cuda_match_peft() {
    let Some(dev) = gpu() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5");
    let raw = load_st(&dir.join("inputs.safetensors"));
    let u32t = |k: &str| raw[k].to_dtype(DType::U32).unwrap();
    let inputs = Inputs {
        input_ids: Some(u32t("input_ids")),
        attention_mask: Some(u32t("attention_mask")),
        decoder_input_ids: Some(u32t("decoder_input_ids")),
        ..Default::default()
    };
    for case in ["t5_v1_0", "t5_v1_1", "mt5"] {
        let want = load_st(&dir.join(case).join("expected.safetensors"));
        let opts = LoadOptions {
            task: Some(TaskType::Seq2SeqLm),
            device: dev.clone(),
            ..Default::default()
        };
        let base = models::load(&dir.join(case).join("model"), &opts).unwrap();
        let mut m =
            PeftModel::from_pretrained(base, &dir.join(case).join("adapter"), Default::default())
                .unwrap();
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs), false)).unwrap();
        assert_close(case, &cpu(&got), &want["lora_logits"], 1e-4);
        m.merge_adapter().unwrap();
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs), false)).unwrap();
        assert_close(case, &cpu(&got), &want["merged_logits"], 1e-4);
    }
}

#[test]
fn greedy_generation_on_cuda_matches_transformers() {
    let Some(dev) = gpu() else { return };
    let dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generation/tiny_llama");
    let fx = peft::io::read_json(&dir.join("expected.json")).unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<u32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let opts = LoadOptions {
        device: dev,
        ..Default::default()
    };
    let model = models::load(&dir, &opts).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    for (p, want) in rows(&fx["prompt_ids"]).iter().zip(rows(&fx["single"])) {
        let got = generate(model.as_ref(), std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(got.tokens[0], want, "prompt {p:?}");
    }
}
