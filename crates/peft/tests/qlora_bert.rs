//! QLoRA on a BERT sequence classifier against transformers 5 + bitsandbytes 0.50 (CPU) +
//! PEFT 0.21 (fixtures: tools/fixtures/make_qlora_fixtures.py).

mod common;
mod qlora_common;

use candle_core::Tensor;
use common::{assert_close, max_diff};
use peft::layers::ModuleRef;
use peft::quant::{Absmax, BitsAndBytesConfig, QuantWeight};
use peft::{get_peft_model, Inputs, Model, PeftConfig, PeftModel, TaskType};
use qlora_common::*;
use std::path::{Path, PathBuf};

// ---- BERT: a sequence classifier. transformers 5 quantizes the pooler and, with no skip list,
// the classifier too (its last parameter is `classifier.bias`, which its default skips do not
// match); QLoRA names the classifier in llm_int8_skip_modules so that PEFT can train it as a
// modules_to_save. Fixtures: qlora/bert/ (same script).

fn bert_dir() -> PathBuf {
    model_dir("bert")
}

fn bert_st(name: &str) -> std::collections::HashMap<String, Tensor> {
    model_st("bert", name)
}

fn bert_inputs() -> Inputs {
    model_inputs("bert")
}

fn bert_expected(name: &str) -> Tensor {
    model_expected("bert", name)
}

fn bert_load(dir: &Path, quantization: Option<BitsAndBytesConfig>) -> Box<dyn Model> {
    load_as(dir, TaskType::SeqCls, quantization)
}

fn bert_meta() -> serde_json::Value {
    model_meta("bert")
}

fn bert_quantized_names(key: &str) -> Vec<String> {
    quantized_names("bert", key)
}

/// The QLoRA config of the fixture: NF4 + double quantization, the classifier kept dense.
fn bert_qlora_config() -> BitsAndBytesConfig {
    BitsAndBytesConfig::from_json(&serde_json::json!({
        "load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
        "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": ["classifier"]
    }))
    .unwrap()
}

#[test]
fn bert_transformers_4bit_checkpoint_loads_and_gives_its_logits() {
    let m = bert_load(&bert_dir().join("nf4"), None);
    // The twelve encoder projections and the pooler are 4-bit; the classifier was skipped.
    let q = sorted_quantized(m.as_ref());
    assert_eq!(q, bert_quantized_names("linear4bit"));
    assert!(q.iter().any(|n| n.ends_with("pooler.dense")), "{q:?}");
    let y = m.forward(&bert_inputs(), false).unwrap();
    assert_close(
        "BERT 4-bit checkpoint logits",
        &y,
        &bert_expected("logits_nf4"),
        TOL,
    );
    assert_close(
        "BERT 4-bit, transformers reloaded",
        &y,
        &bert_expected("logits_nf4_reloaded"),
        TOL,
    );
    assert!(max_diff(&y, &bert_expected("logits_dense")) > 0.1);
}

#[test]
fn bert_dense_quantized_at_load_gives_transformers_codes_and_logits() {
    let saved = bert_load(&bert_dir().join("nf4"), None);
    let ours = bert_load(&bert_dir().join("dense"), Some(bert_qlora_config()));
    assert_eq!(
        sorted_quantized(ours.as_ref()),
        bert_quantized_names("linear4bit")
    );
    let (a, b) = (packed_codes(saved.as_ref()), packed_codes(ours.as_ref()));
    assert_eq!(a.len(), 13);
    for (name, codes) in &a {
        assert!(b[name] == *codes, "{name}: packed codes differ");
    }
    // The 8-bit codes of the block scales (double quantization): bitsandbytes' CPU kernel finds
    // a code through an approximate bucket search and then compares it with the next one only,
    // so it can miss the nearest code by one; ours is the nearest. Here that happens for two of
    // the 1088 scales (scale 59 of layer 0's value projection, 11 of layer 1's: checked in
    // torch against the nearest code), each one code step off.
    let nested = |m: &dyn Model| -> std::collections::HashMap<String, Vec<u8>> {
        m.modules()
            .into_iter()
            .filter_map(|m| match m {
                ModuleRef::Linear(l) => match l.quant() {
                    Some(QuantWeight::Bnb4(q)) => match &q.absmax {
                        Absmax::Nested { codes, .. } => Some((l.name.clone(), codes.clone())),
                        Absmax::Plain(_) => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    let (na, nb) = (nested(saved.as_ref()), nested(ours.as_ref()));
    assert_eq!(na.len(), 13);
    let mut missed = 0;
    for (name, theirs) in &na {
        for (x, y) in theirs.iter().zip(&nb[name]) {
            assert!(x.abs_diff(*y) <= 1, "{name}: scale codes {x} vs {y}");
            missed += usize::from(x != y);
        }
    }
    assert!(missed <= 2, "{missed} scale codes differ");
    // Two scales one code apart move these O(1) logits by ~1e-3; the 4-bit rounding itself
    // moves them by ~0.5 (below).
    const SCALE_TOL: f32 = 3e-3;
    let y = ours.forward(&bert_inputs(), false).unwrap();
    assert_close(
        "BERT NF4 at load",
        &y,
        &bert_expected("logits_nf4"),
        SCALE_TOL,
    );
    assert!(max_diff(&y, &bert_expected("logits_dense")) > 0.1);

    // No skip list: transformers 5's default skips keep nothing of BERT's dense, so the pooler
    // and the classifier (2 x 64: two blocks) are 4-bit too.
    let m = bert_load(&bert_dir().join("dense"), Some(qlora_config()));
    let q = sorted_quantized(m.as_ref());
    assert_eq!(q, bert_quantized_names("linear4bit_default"));
    assert!(q.iter().any(|n| n == "classifier"), "{q:?}");
    let y = m.forward(&bert_inputs(), false).unwrap();
    assert_close(
        "BERT NF4 at load, default skips",
        &y,
        &bert_expected("logits_nf4_default"),
        SCALE_TOL,
    );
    assert!(max_diff(&y, &bert_expected("logits_nf4")) > 1e-3);
    // PEFT cannot train a 4-bit classifier as a modules_to_save; neither can we, and the error
    // says how to keep it dense.
    let e = get_peft_model(m, bert_lora(), "default")
        .err()
        .expect("a 4-bit modules_to_save classifier is refused")
        .to_string();
    assert!(
        e.contains("classifier") && e.contains("llm_int8_skip_modules"),
        "{e}"
    );
}

fn bert_lora() -> PeftConfig {
    PeftConfig::from_user_json(&serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS",
        "target_modules": ["query", "value"]
    }))
    .unwrap()
}

#[test]
fn bert_peft_lora_on_the_4bit_base_gives_peft_logits() {
    for (adapter, logits) in [("lora_init", "logits_lora_init"), ("lora", "logits_lora")] {
        let pm = PeftModel::from_pretrained(
            bert_load(&bert_dir().join("nf4"), None),
            &bert_dir().join(adapter),
            Default::default(),
        )
        .unwrap();
        let y = pm.forward(&bert_inputs(), false).unwrap();
        assert_close(
            &format!("BERT {adapter} on 4-bit"),
            &y,
            &bert_expected(logits),
            TOL,
        );
        assert!(max_diff(&y, &bert_expected("logits_nf4")) > 1e-2);
    }
    let meta = bert_meta();
    let pm = get_peft_model(
        bert_load(&bert_dir().join("nf4"), None),
        bert_lora(),
        "default",
    )
    .unwrap();
    let (trainable, all) = pm.get_nb_trainable_parameters();
    assert_eq!(
        (trainable as u64, all as u64),
        (
            meta["trainable_params"].as_u64().unwrap(),
            meta["all_params"].as_u64().unwrap()
        )
    );
}

/// Three AdamW steps here (torch's defaults: weight decay 0.01) from PEFT's initial adapter give
/// PEFT's losses, adapter weights (LoRA and the modules_to_save classifier) and logits.
#[test]
fn bert_qlora_training_here_follows_peft() {
    use peft::train::optim::{AdamW, AdamWParams};
    let pm = PeftModel::from_pretrained(
        bert_load(&bert_dir().join("nf4"), None),
        &bert_dir().join("lora_init"),
        peft::FromPretrained {
            is_trainable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let vars = pm.trainable_parameters();
    // query/value A and B in two layers, the classifier's weight and bias.
    assert_eq!(
        vars.len(),
        10,
        "{:?}",
        vars.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let x = bert_inputs();
    let labels = bert_st("inputs.safetensors")["labels"].clone();
    let want_losses: Vec<f32> = bert_expected("losses").to_vec1().unwrap();
    for (step, want) in want_losses.iter().enumerate() {
        let logits = pm.forward(&x, true).unwrap();
        let loss = peft::train::classification_loss(&logits, &labels).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "step {step}: loss {got} vs PEFT {want}"
        );
        let grads = loss.backward().unwrap();
        opt.step(&grads, 1e-2, 1.0).unwrap();
    }
    let init = bert_st("lora_init/adapter_model.safetensors");
    let trained = bert_st("lora/adapter_model.safetensors");
    let mut classifier = 0;
    for (name, var) in &vars {
        // Ours carry the adapter name; PEFT's file drops it.
        let key = name
            .replace(".modules_to_save.default.", ".")
            .replace(".default.", ".");
        let want = trained
            .get(&key)
            .unwrap_or_else(|| panic!("{key} not in PEFT's adapter"));
        assert_close(&key, var.as_tensor(), want, 1e-4);
        assert!(
            max_diff(var.as_tensor(), &init[&key]) > 1e-3,
            "{key} untrained"
        );
        classifier += usize::from(key.contains("classifier"));
    }
    assert_eq!(classifier, 2);
    let y = pm.forward(&x, false).unwrap();
    assert_close(
        "BERT logits after 3 QLoRA steps",
        &y,
        &bert_expected("logits_lora"),
        1e-3,
    );
}
