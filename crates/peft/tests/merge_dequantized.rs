//! `merge_and_unload_dequantized`: a LoRA merged into a quantized base as a dense f32/bf16 model
//! (no re-quantization), saved as a plain transformers checkpoint. Truth: the merged weights are
//! dequant(W) + (alpha / r)·B·A computed here from the fixtures' stored tensors — bitsandbytes'
//! own dequantized 8-bit weights (tools/fixtures/make_int8_fixtures.py) and the 4-bit base with
//! the LoRA PEFT trained on it (make_qlora_fixtures.py) — and the merged model gives PEFT's
//! logits of the unmerged 4-bit model + LoRA.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_close, load_st, max_diff};
use peft::layers::ModuleRef;
use peft::models::{self, LoadOptions};
use peft::{get_peft_model_with_seed, Inputs, LoraConfig, Model, PeftModel, TaskType};
use std::path::{Path, PathBuf};

fn fixtures(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(path: &Path) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    models::load(path, &opts).unwrap()
}

/// The dense weight of Linear `name` and whether it is still quantized.
fn weight(m: &dyn Model, name: &str) -> (Tensor, bool) {
    m.modules()
        .into_iter()
        .find_map(|module| match module {
            ModuleRef::Linear(l) if l.name == name => {
                Some((l.dense_weight().unwrap(), l.quant().is_some()))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Linear {name}"))
}

fn n_quantized(m: &dyn Model) -> usize {
    m.modules()
        .into_iter()
        .filter(|module| matches!(module, ModuleRef::Linear(l) if l.quant().is_some()))
        .count()
}

#[test]
fn eight_bit_base_merges_to_bnb_dequant_plus_lora() {
    let dir = fixtures("int8");
    let expected = load_st(&dir.join("expected.safetensors"));
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(peft::tuners::targets::ModuleSpec::List(vec![
            "q_proj".into(),
            "lm_head".into(),
        ])),
        init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let pm = get_peft_model_with_seed(load(&dir.join("llama_8bit")), config, "default", 3).unwrap();
    let state = pm.adapter_state_dict("default").unwrap();
    let factor = |layer: &str, f: &str| -> Tensor {
        let key = format!("base_model.model.{layer}.lora_{f}.weight");
        state.iter().find(|(k, _)| *k == key).unwrap().1.clone()
    };
    let merged = pm.merge_and_unload_dequantized(DType::F32).unwrap();
    assert_eq!(n_quantized(merged.as_ref()), 0);
    for layer in ["model.layers.0.self_attn.q_proj", "lm_head"] {
        let (w, quantized) = weight(merged.as_ref(), layer);
        assert!(!quantized);
        let delta = (factor(layer, "B").matmul(&factor(layer, "A")).unwrap() * 2.0).unwrap();
        let want = (&expected[&format!("dequant.{layer}")] + delta).unwrap();
        assert_close(layer, &w, &want, 1e-6);
    }
}

#[test]
fn four_bit_base_with_peft_lora_merges_dense_and_saves_plain() {
    let dir = fixtures("qlora");
    let base = load(&dir.join("llama_4bit"));
    // dequant(W) before merging (our NF4 dequantization equals bitsandbytes', see bnb_quant.rs).
    let layer = "model.layers.1.self_attn.q_proj";
    let (w0, quantized) = weight(base.as_ref(), layer);
    assert!(quantized);
    let pm = PeftModel::from_pretrained(base, &dir.join("llama_lora"), Default::default()).unwrap();
    let merged = pm.merge_and_unload_dequantized(DType::F32).unwrap();
    assert_eq!(n_quantized(merged.as_ref()), 0);
    // Closed form from the adapter file PEFT wrote: alpha 8, r 4.
    let lora = load_st(&dir.join("llama_lora/adapter_model.safetensors"));
    let ab = |f: &str| lora[&format!("base_model.model.{layer}.lora_{f}.weight")].clone();
    let want = (&w0 + (ab("B").matmul(&ab("A")).unwrap() * 2.0).unwrap()).unwrap();
    let (w, _) = weight(merged.as_ref(), layer);
    assert_close("merged q_proj", &w, &want, 1e-6);
    // The dense merged model gives PEFT's logits of the 4-bit model with its LoRA.
    let t = load_st(&dir.join("inputs.safetensors"));
    let inputs = Inputs {
        input_ids: Some(t["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(t["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    };
    let mask = t["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let real = |x: &Tensor| x.broadcast_mul(&mask).unwrap();
    let y = merged.forward(&inputs, false).unwrap();
    let want = load_st(&dir.join("expected.safetensors"))["logits_lora"].clone();
    assert_close("merged logits", &real(&y), &real(&want), 2e-4);
    // Saved: a plain checkpoint (no quantization_config) that loads dense with the same logits.
    let tmp = tempfile::tempdir().unwrap();
    models::save_pretrained(merged.as_ref(), tmp.path()).unwrap();
    let cfg = peft::io::read_json(&tmp.path().join("config.json")).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    let back = load(tmp.path());
    assert_eq!(n_quantized(back.as_ref()), 0);
    let y2 = back.forward(&inputs, false).unwrap();
    assert!(max_diff(&y, &y2) < 1e-6);
}

#[test]
fn bf16_output_is_the_f32_merge_rounded() {
    let dir = fixtures("qlora");
    let merge = |dtype| {
        let base = load(&dir.join("llama_4bit"));
        PeftModel::from_pretrained(base, &dir.join("llama_lora"), Default::default())
            .unwrap()
            .merge_and_unload_dequantized(dtype)
            .unwrap()
    };
    let (f32m, bf16m) = (merge(DType::F32), merge(DType::BF16));
    for layer in [
        "model.layers.0.mlp.down_proj",
        "model.embed_tokens",
        "lm_head",
    ] {
        let find = |m: &dyn Model| -> Tensor {
            m.modules()
                .into_iter()
                .find(|x| x.name() == layer)
                .unwrap()
                .params()[0]
                .dense()
                .unwrap()
        };
        let (a, b) = (find(f32m.as_ref()), find(bf16m.as_ref()));
        assert_eq!(b.dtype(), DType::BF16, "{layer}");
        let want = a
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_diff(&b, &want), 0.0, "{layer}");
    }
    let tmp = tempfile::tempdir().unwrap();
    models::save_pretrained(bf16m.as_ref(), tmp.path()).unwrap();
    let cfg = peft::io::read_json(&tmp.path().join("config.json")).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    let st = load_st(&tmp.path().join("model.safetensors"));
    assert!(st.values().all(|t| t.dtype() == DType::BF16));
}
