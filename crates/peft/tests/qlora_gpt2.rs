//! QLoRA on GPT-2 against transformers 5 + bitsandbytes 0.50 (CPU) + PEFT 0.21 (fixtures:
//! tools/fixtures/make_qlora_fixtures.py).

mod common;
mod qlora_common;

use candle_core::{DType, Tensor};
use common::{assert_close, load_st, max_diff};
use peft::layers::ModuleRef;
use peft::models;
use peft::quant::{BitsAndBytesConfig, QuantWeight};
use peft::{get_peft_model, Inputs, Model, PeftConfig, PeftModel, TaskType};
use qlora_common::*;
use std::path::{Path, PathBuf};

// ---- GPT-2: Conv1D projections (weight stored [in, out]) that transformers quantizes transposed,
// as the Linear4bit it puts in their place. Fixtures: qlora/gpt2/ (same script).

fn gpt2_dir() -> PathBuf {
    model_dir("gpt2")
}

fn gpt2_st(name: &str) -> std::collections::HashMap<String, Tensor> {
    model_st("gpt2", name)
}

fn gpt2_inputs() -> Inputs {
    model_inputs("gpt2")
}

fn gpt2_expected(name: &str) -> Tensor {
    model_expected("gpt2", name)
}

/// GPT-2 logits at the positions its attention mask keeps.
fn gpt2_real(t: &Tensor) -> Tensor {
    let mask = gpt2_st("inputs.safetensors")["attention_mask"].clone();
    let mask = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    t.to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&mask)
        .unwrap()
}

fn gpt2_load(dir: &Path, quantization: Option<BitsAndBytesConfig>) -> Box<dyn Model> {
    load_as(dir, TaskType::CausalLm, quantization)
}

fn gpt2_meta() -> serde_json::Value {
    model_meta("gpt2")
}

fn gpt2_quantized_names(key: &str) -> Vec<String> {
    quantized_names("gpt2", key)
}

#[test]
fn gpt2_transformers_4bit_checkpoint_loads_and_gives_its_logits() {
    let m = gpt2_load(&gpt2_dir().join("nf4"), None);
    // Every Conv1D projection is 4-bit, stored [out, in]; wte and the tied LM head stay dense.
    assert_eq!(
        sorted_quantized(m.as_ref()),
        gpt2_quantized_names("linear4bit")
    );
    for module in m.modules() {
        if let ModuleRef::Linear(l) = module {
            if l.name.ends_with("attn.c_attn") {
                assert_eq!(l.quant().unwrap().dims(), (192, 64), "{}", l.name);
            }
        }
    }
    let y = m.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "GPT-2 4-bit checkpoint logits",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_nf4")),
        TOL,
    );
    assert_close(
        "GPT-2 4-bit, transformers reloaded",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_nf4_reloaded")),
        TOL,
    );
    assert!(max_diff(&gpt2_real(&y), &gpt2_real(&gpt2_expected("logits_dense"))) > 0.1);
}

#[test]
fn gpt2_dense_quantized_at_load_gives_transformers_codes_and_logits() {
    let saved = gpt2_load(&gpt2_dir().join("nf4"), None);
    let ours = gpt2_load(&gpt2_dir().join("dense"), Some(qlora_config()));
    assert_eq!(
        sorted_quantized(ours.as_ref()),
        gpt2_quantized_names("linear4bit")
    );
    // Quantizing the transposed Conv1D weight here gives the codes transformers saved.
    let (a, b) = (packed_codes(saved.as_ref()), packed_codes(ours.as_ref()));
    assert_eq!(a.len(), 8);
    for (name, codes) in &a {
        assert!(b[name] == *codes, "{name}: packed codes differ");
    }
    let y = ours.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "GPT-2 NF4 at load",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_nf4")),
        TOL,
    );

    // FP4 without double quantization, the same way.
    let fp4 = BitsAndBytesConfig::from_json(&serde_json::json!({
        "load_in_4bit": true, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float32"
    }))
    .unwrap();
    let m = gpt2_load(&gpt2_dir().join("dense"), Some(fp4));
    let y = m.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "GPT-2 FP4 at load",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_fp4")),
        TOL,
    );

    // LLM.int8 with transformers' default skips: the same eight projections, row-wise over the
    // transposed weight. bitsandbytes' training product (dequantize, then matmul) is the truth.
    let int8 = BitsAndBytesConfig::from_json(&serde_json::json!({"load_in_8bit": true})).unwrap();
    let m = gpt2_load(&gpt2_dir().join("dense"), Some(int8));
    let mut eight: Vec<String> = m
        .modules()
        .into_iter()
        .filter_map(|m| match m {
            ModuleRef::Linear(l) => match l.quant() {
                Some(QuantWeight::Int8(_)) => Some(l.name.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    eight.sort();
    assert_eq!(eight, gpt2_quantized_names("linear8bit"));
    let y = m.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "GPT-2 8-bit at load",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_8bit_fp")),
        1e-4,
    );
}

#[test]
fn gpt2_peft_lora_on_the_4bit_base_gives_peft_logits() {
    // PEFT's Linear4bit sets fan_in_fan_out = False: the adapter is [r, in] / [out, r] and the
    // delta is added in the quantized layer's [out, in] layout, not Conv1D's.
    for (adapter, logits) in [("lora_init", "logits_lora_init"), ("lora", "logits_lora")] {
        let pm = PeftModel::from_pretrained(
            gpt2_load(&gpt2_dir().join("nf4"), None),
            &gpt2_dir().join(adapter),
            Default::default(),
        )
        .unwrap();
        let y = pm.forward(&gpt2_inputs(), false).unwrap();
        assert_close(
            &format!("GPT-2 {adapter} on 4-bit"),
            &gpt2_real(&y),
            &gpt2_real(&gpt2_expected(logits)),
            TOL,
        );
        assert!(max_diff(&gpt2_real(&y), &gpt2_real(&gpt2_expected("logits_nf4"))) > 0.1);
    }
    let meta = gpt2_meta();
    let pm = get_peft_model(
        gpt2_load(&gpt2_dir().join("nf4"), None),
        PeftConfig::from_user_json(&serde_json::json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
            "target_modules": ["c_attn", "c_proj", "c_fc"]
        }))
        .unwrap(),
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
/// PEFT's losses, adapter weights and logits after its three steps.
#[test]
fn gpt2_qlora_training_here_follows_peft() {
    use peft::train::optim::{AdamW, AdamWParams};
    let pm = PeftModel::from_pretrained(
        gpt2_load(&gpt2_dir().join("nf4"), None),
        &gpt2_dir().join("lora_init"),
        peft::FromPretrained {
            is_trainable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let vars = pm.trainable_parameters();
    assert_eq!(vars.len(), 16);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let x = gpt2_inputs();
    let labels = gpt2_st("inputs.safetensors")["labels"].clone();
    let want_losses: Vec<f32> = gpt2_expected("losses").to_vec1().unwrap();
    for (step, want) in want_losses.iter().enumerate() {
        let logits = pm.forward(&x, true).unwrap();
        let loss = peft::train::causal_lm_loss(&logits, &labels).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "step {step}: loss {got} vs PEFT {want}"
        );
        let grads = loss.backward().unwrap();
        opt.step(&grads, 1e-2, 1.0).unwrap();
    }
    let trained = gpt2_st("lora/adapter_model.safetensors");
    for (name, var) in &vars {
        // Ours: `...c_attn.lora_A.default.weight`; PEFT's file drops the adapter name.
        let key = name.replace(".default.", ".");
        let want = trained
            .get(&key)
            .unwrap_or_else(|| panic!("{key} not in PEFT's adapter"));
        assert_close(&key, var.as_tensor(), want, 1e-4);
    }
    let y = pm.forward(&x, false).unwrap();
    assert_close(
        "GPT-2 logits after 3 QLoRA steps",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_lora")),
        1e-3,
    );
}

/// A dense model out of the 4-bit GPT-2 (`peft merge --dequantize`, or `save_pretrained` of a
/// quantized base) is a GPT-2 checkpoint: Conv1D weights written `[in, out]` again, so that it
/// loads as one here (and in transformers) and gives the merged adapter's logits.
#[test]
fn gpt2_dequantized_merge_writes_conv1d_layout() {
    let pm = PeftModel::from_pretrained(
        gpt2_load(&gpt2_dir().join("nf4"), None),
        &gpt2_dir().join("lora"),
        Default::default(),
    )
    .unwrap();
    let merged = pm.merge_and_unload_dequantized(DType::F32).unwrap();
    assert!(sorted_quantized(merged.as_ref()).is_empty());
    let y = merged.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "merged in memory",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_lora")),
        TOL,
    );
    let tmp = tempfile::tempdir().unwrap();
    models::save_pretrained(merged.as_ref(), tmp.path()).unwrap();
    let saved = load_st(&tmp.path().join("model.safetensors"));
    for (name, dims) in [
        ("transformer.h.0.attn.c_attn.weight", [64, 192]),
        ("transformer.h.1.mlp.c_fc.weight", [64, 128]),
        ("transformer.h.1.mlp.c_proj.weight", [128, 64]),
    ] {
        assert_eq!(saved[name].dims(), dims, "{name}");
    }
    let reloaded = gpt2_load(tmp.path(), None);
    let y = reloaded.forward(&gpt2_inputs(), false).unwrap();
    assert_close(
        "merged, saved and reloaded",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_lora")),
        TOL,
    );

    // The base alone, saved dense while still quantized: the dequantized weights, [in, out].
    let tmp = tempfile::tempdir().unwrap();
    let base = gpt2_load(&gpt2_dir().join("nf4"), None);
    models::save_pretrained(base.as_ref(), tmp.path()).unwrap();
    let y = gpt2_load(tmp.path(), None)
        .forward(&gpt2_inputs(), false)
        .unwrap();
    assert_close(
        "4-bit base saved dense",
        &gpt2_real(&y),
        &gpt2_real(&gpt2_expected("logits_nf4")),
        TOL,
    );
}
