//! Task heads checked against transformers + PEFT (tools/fixtures/make_zoo_fixtures.py):
//! `T5ForSequenceClassification` / `MT5ForSequenceClassification` (EOS pooling over the decoder,
//! `classification_head`), `T5ForTokenClassification`, `T5ForQuestionAnswering`, and the
//! TOKEN_CLS / QUESTION_ANS heads of Llama, GPT-2 and OPT; base logits and logits with a LoRA
//! adapter PEFT trained (the head saved through `modules_to_save`). Also Qwen2's sliding window
//! chosen per layer by `max_window_layers` or `layer_types`.
//!
//! The fixtures reuse the T5 and decoder models of the other fixture sets; the head weights
//! transformers initialised are stored apart (`head.safetensors`) and put next to the base
//! weights in a temporary model directory here.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_st};
use peft::models::{self, Cache, LoadOptions};
use peft::{Inputs, Model, PeftModel, TaskType};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A model directory holding the fixture's base model plus its head, named as the class names it.
fn model_with_head(case: &str, tmp: &Path) -> (PathBuf, serde_json::Value) {
    let meta = peft::io::read_json(&fixtures().join("zoo").join(case).join("meta.json")).unwrap();
    let src = fixtures().join(meta["model"].as_str().unwrap());
    let dir = tmp.join(case);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = peft::io::read_json(&src.join("config.json")).unwrap();
    config["architectures"] = serde_json::json!([meta["architecture"]]);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Tensor)> = load_st(&src.join("model.safetensors"))
        .into_iter()
        .collect();
    tensors.extend(load_st(
        &fixtures().join("zoo").join(case).join("head.safetensors"),
    ));
    peft::io::save_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    (dir, meta)
}

fn load(dir: &Path, meta: &serde_json::Value) -> Box<dyn Model> {
    let opts = LoadOptions {
        num_labels: meta["num_labels"].as_u64().map(|n| n as usize),
        ..Default::default()
    };
    models::load(dir, &opts).unwrap()
}

fn inputs(set: &str) -> Inputs {
    let t = load_st(&fixtures().join(set).join("inputs.safetensors"));
    Inputs {
        input_ids: Some(t["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(t["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    }
}

fn check(case: &str, set: &str, task: TaskType, architecture: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, meta) = model_with_head(case, tmp.path());
    let want = load_st(
        &fixtures()
            .join("zoo")
            .join(case)
            .join("expected.safetensors"),
    );
    let base = load(&dir, &meta);
    assert_eq!(base.info().task, task, "{case}");
    assert_eq!(base.info().architecture, architecture, "{case}");
    let got = base.forward(&inputs(set), false).unwrap();
    assert_close(&format!("{case}: base"), &got, &want["base_logits"], TOL);

    let adapter = fixtures().join("zoo").join(case).join("adapter");
    let lora = PeftModel::from_pretrained(load(&dir, &meta), &adapter, Default::default()).unwrap();
    let got = lora.forward(&inputs(set), false).unwrap();
    assert_close(&format!("{case}: lora"), &got, &want["lora_logits"], TOL);
    // The adapter written here has PEFT's keys.
    let out = tmp.path().join("saved");
    lora.save_pretrained(&out).unwrap();
    let mut keys: Vec<String> = load_st(&out.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    keys.sort();
    let want_keys: Vec<String> = serde_json::from_value(meta["adapter_keys"].clone()).unwrap();
    assert_eq!(keys, want_keys, "{case}: adapter keys");
}

#[test]
fn t5_sequence_classification() {
    check(
        "t5_seq_cls",
        "t5",
        TaskType::SeqCls,
        "T5ForSequenceClassification",
    );
    check(
        "mt5_seq_cls",
        "t5",
        TaskType::SeqCls,
        "MT5ForSequenceClassification",
    );
}

#[test]
fn t5_token_classification_and_question_answering() {
    check(
        "t5_token_cls",
        "t5",
        TaskType::TokenCls,
        "T5ForTokenClassification",
    );
    check(
        "t5_qa",
        "t5",
        TaskType::QuestionAns,
        "T5ForQuestionAnswering",
    );
}

#[test]
fn t5_sequence_classification_needs_one_eos_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, meta) = model_with_head("t5_seq_cls", tmp.path());
    let m = load(&dir, &meta);
    // Row 0 with two EOS tokens, row 1 with one.
    let ids = Tensor::new(&[[5u32, 1, 7, 1], [5, 6, 7, 1]], &Device::Cpu).unwrap();
    let e = m.forward(&Inputs::new(ids), false).unwrap_err().to_string();
    assert!(e.contains("same number") && e.contains("[2, 1]"), "{e}");
}

#[test]
fn decoder_token_classification_heads() {
    check(
        "llama_token_cls",
        "decoder",
        TaskType::TokenCls,
        "LlamaForTokenClassification",
    );
    check(
        "gpt2_token_cls",
        "decoder",
        TaskType::TokenCls,
        "GPT2ForTokenClassification",
    );
}

#[test]
fn decoder_question_answering_heads() {
    check(
        "llama_qa",
        "decoder",
        TaskType::QuestionAns,
        "LlamaForQuestionAnswering",
    );
    check(
        "gpt2_qa",
        "decoder",
        TaskType::QuestionAns,
        "GPT2ForQuestionAnswering",
    );
    check(
        "opt_qa",
        "decoder",
        TaskType::QuestionAns,
        "OPTForQuestionAnswering",
    );
}

/// Qwen2 with `use_sliding_window`: the window applies on the layers from `max_window_layers`
/// on, or on those `layer_types` names; full forward and one-token-at-a-time decoding.
#[test]
fn qwen2_sliding_window_layers() {
    let fx = fixtures().join("zoo/qwen2_sliding");
    let meta = peft::io::read_json(&fx.join("meta.json")).unwrap();
    let want = load_st(&fx.join("expected.safetensors"));
    let src = fixtures().join(meta["model"].as_str().unwrap());
    let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = want["attention_mask"].to_dtype(DType::U32).unwrap();
    let real: Vec<Vec<u32>> = mask.to_vec2().unwrap();
    let configs = meta["configs"].as_object().unwrap();
    assert_eq!(configs.len(), 2);
    for (name, config) in configs {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            src.join("model.safetensors"),
            tmp.path().join("model.safetensors"),
        )
        .unwrap();
        let m = models::load(tmp.path(), &LoadOptions::default()).unwrap();
        let inputs = Inputs {
            input_ids: Some(ids.clone()),
            attention_mask: Some(mask.clone()),
            ..Default::default()
        };
        let got = m.forward(&inputs, false).unwrap();
        let expected = &want[&format!("{name}_logits")];
        // Padded positions' logits are not meaningful: compare the real ones.
        for (row, cols) in real.iter().enumerate() {
            let n = cols.iter().filter(|&&c| c == 1).count();
            let g = got.get(row).unwrap().narrow(0, 0, n).unwrap();
            let w = expected.get(row).unwrap().narrow(0, 0, n).unwrap();
            assert_close(&format!("{name} row {row}"), &g, &w, TOL);
        }
        // Nine positions at once, then one at a time through the cache.
        let mut cache = Cache::default();
        let mut steps = Vec::new();
        let t = ids.dim(1).unwrap();
        for (start, len) in std::iter::once((0, 9)).chain((9..t).map(|s| (s, 1))) {
            let step = Inputs {
                input_ids: Some(ids.narrow(1, start, len).unwrap()),
                attention_mask: Some(mask.narrow(1, 0, start + len).unwrap()),
                ..Default::default()
            };
            steps.push(
                m.forward_with_cache(&step, Some(&mut cache), false)
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&steps, 1).unwrap();
        let row0 = cached.get(0).unwrap();
        assert_close(
            &format!("{name} cached"),
            &row0,
            &expected.get(0).unwrap(),
            TOL,
        );
    }
}

/// A training step through each new head (dropout on) gives every trainable tensor, LoRA and the
/// `modules_to_save` head copies, a non-zero gradient.
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    use peft::train::classification_loss;
    let cases = [
        ("t5_seq_cls", "t5"),
        ("t5_token_cls", "t5"),
        ("t5_qa", "t5"),
        ("llama_token_cls", "decoder"),
        ("gpt2_qa", "decoder"),
        ("opt_qa", "decoder"),
    ];
    for (case, set) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, meta) = model_with_head(case, tmp.path());
        let adapter = fixtures().join("zoo").join(case).join("adapter");
        let mut m =
            PeftModel::from_pretrained(load(&dir, &meta), &adapter, Default::default()).unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&adapter, "default", true).unwrap();
        let inputs = inputs(set);
        let logits = m.forward(&inputs, true).unwrap();
        // Labels: class 1 for sequences, position-dependent classes (0/1) per token.
        let labels = match logits.rank() {
            2 => Tensor::ones(logits.dim(0).unwrap(), DType::I64, &Device::Cpu).unwrap(),
            _ => {
                let (b, t, _) = logits.dims3().unwrap();
                let v: Vec<i64> = (0..b * t).map(|i| (i % 2) as i64).collect();
                Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
            }
        };
        let loss = classification_loss(&logits, &labels).unwrap();
        let grads = loss.backward().unwrap();
        let params = m.trainable_parameters();
        assert!(params.iter().any(|(k, _)| k.contains("lora_A")), "{case}");
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
