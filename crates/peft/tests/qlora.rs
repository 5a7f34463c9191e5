//! QLoRA: quantized bases in the model, against transformers 4.x/5 + bitsandbytes 0.50 (CPU) +
//! PEFT 0.21. Fixtures: tools/fixtures/make_qlora_fixtures.py (a tiny random Llama saved dense,
//! the same loaded with NF4 + double quantization and saved by transformers, and LoRA trained by
//! PEFT on that 4-bit model).
//! GPT-2 and BERT: qlora_gpt2.rs, qlora_bert.rs.

mod common;
mod qlora_common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_st, max_diff};
use peft::layers::{ModuleMut, ModuleRef};
use peft::models::{self, LoadOptions};
use peft::quant::{BitsAndBytesConfig, QuantWeight};
use peft::{get_peft_model, Inputs, Model, PeftConfig, PeftModel, TaskType};
use qlora_common::*;

fn inputs() -> Inputs {
    let t = load_st(&dir().join("inputs.safetensors"));
    Inputs {
        input_ids: Some(t["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(t["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    }
}

fn expected(name: &str) -> Tensor {
    load_st(&dir().join("expected.safetensors"))[name].clone()
}

/// Logits at the positions the attention mask keeps (padding rows are kernel details).
fn real(t: &Tensor) -> Tensor {
    let mask = load_st(&dir().join("inputs.safetensors"))["attention_mask"].clone();
    let mask = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    t.to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&mask)
        .unwrap()
}

fn load(name: &str, quantization: Option<BitsAndBytesConfig>) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        quantization,
        ..Default::default()
    };
    models::load(&dir().join(name), &opts).unwrap()
}

// Tolerances: our NF4 codes equal bitsandbytes' bit for bit, but the 8-bit nested absmax codes
// may differ from bitsandbytes' CPU lookup in rare ties (see bnb_quant.rs), and the product's
// summation order differs from torch's; the tiny model's logits are O(1).

#[test]
fn dense_checkpoint_quantized_at_load_gives_transformers_4bit_logits() {
    let m = load("llama_dense", Some(qlora_config()));
    let q = quantized_linears(m.as_ref());
    // 7 projections per layer, 2 layers; lm_head, embeddings and norms stay dense.
    assert_eq!(q.len(), 14, "{q:?}");
    assert!(!q.iter().any(|n| n.contains("lm_head")));
    let y = m.forward(&inputs(), false).unwrap();
    assert_close(
        "4-bit logits",
        &real(&y),
        &real(&expected("logits_4bit")),
        TOL,
    );
    // The quantization matters: the dense model's logits are far from these.
    assert!(max_diff(&real(&expected("logits_dense")), &real(&y)) > 0.1);
}

#[test]
fn transformers_4bit_checkpoint_loads_quantized_and_gives_its_logits() {
    let m = load("llama_4bit", None);
    assert_eq!(quantized_linears(m.as_ref()).len(), 14);
    let y = m.forward(&inputs(), false).unwrap();
    assert_close(
        "4-bit checkpoint logits",
        &real(&y),
        &real(&expected("logits_4bit")),
        TOL,
    );
    assert_close(
        "transformers reloaded",
        &real(&y),
        &real(&expected("logits_4bit_reloaded")),
        TOL,
    );
    // Quantizing the dense checkpoint here gives the codes transformers saved.
    let ours = load("llama_dense", Some(qlora_config()));
    let codes = |m: &dyn Model| -> Vec<Vec<u8>> {
        m.modules()
            .into_iter()
            .filter_map(|m| match m {
                ModuleRef::Linear(l) => match l.quant() {
                    Some(QuantWeight::Bnb4(q)) => Some(q.packed.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    assert_eq!(codes(m.as_ref()), codes(ours.as_ref()));
}

#[test]
fn peft_lora_on_the_4bit_base_gives_peft_logits_and_counts() {
    let base = load("llama_4bit", None);
    let pm =
        PeftModel::from_pretrained(base, &dir().join("llama_lora"), Default::default()).unwrap();
    let y = pm.forward(&inputs(), false).unwrap();
    assert_close(
        "LoRA on 4-bit logits",
        &real(&y),
        &real(&expected("logits_lora")),
        TOL,
    );
    assert!(max_diff(&real(&y), &real(&expected("logits_4bit"))) > 0.1);
    // PEFT counts a 4-bit weight as its dense size.
    let meta = peft::io::read_json(&dir().join("meta.json")).unwrap();
    let (_, all) = pm.get_nb_trainable_parameters();
    assert_eq!(all as u64, meta["all_params"].as_u64().unwrap());
    let trainable = get_peft_model(
        load("llama_4bit", None),
        lora(serde_json::json!({})),
        "default",
    )
    .unwrap()
    .get_nb_trainable_parameters();
    assert_eq!(
        (trainable.0 as u64, trainable.1 as u64),
        (
            meta["trainable_params"].as_u64().unwrap(),
            meta["all_params"].as_u64().unwrap()
        )
    );
}

fn lora(extra: serde_json::Value) -> PeftConfig {
    let mut v = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj", "down_proj"]
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    PeftConfig::from_user_json(&v).unwrap()
}

/// Every adapter method of the Linear kind on top of the quantized model: the forward equals the
/// same adapter on the dequantized (dense) model, gradients reach the adapter, and merging
/// into the quantized layers (re-quantized) stays close to the unmerged output.
#[test]
fn every_linear_adapter_runs_on_a_quantized_base() {
    let targets = serde_json::json!(["q_proj", "v_proj", "down_proj"]);
    let configs = [
        ("lora", lora(serde_json::json!({"init_lora_weights": false}))),
        (
            "dora",
            lora(serde_json::json!({"use_dora": true, "init_lora_weights": false})),
        ),
        ("loha", serde_json::json!({"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": targets, "task_type": "CAUSAL_LM"}).into_cfg()),
        ("lokr", serde_json::json!({"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": targets, "task_type": "CAUSAL_LM"}).into_cfg()),
        ("ia3", serde_json::json!({"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ["down_proj"], "task_type": "CAUSAL_LM"}).into_cfg()),
        ("vera", serde_json::json!({"peft_type": "VERA", "r": 8, "target_modules": ["q_proj", "down_proj"], "task_type": "CAUSAL_LM"}).into_cfg()),
        ("adalora", serde_json::json!({"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "target_modules": targets, "task_type": "CAUSAL_LM"}).into_cfg()),
    ];
    let x = inputs();
    for (method, config) in configs {
        let mut q = get_peft_model(load("llama_4bit", None), config.clone(), "default").unwrap();
        let mut dense_base = load("llama_4bit", None);
        for m in dense_base.modules_mut() {
            if let ModuleMut::Linear(l) = m {
                l.dequantize_in_place().unwrap();
            }
        }
        assert!(quantized_linears(dense_base.as_ref()).is_empty());
        let mut d = get_peft_model(dense_base, config, "default").unwrap();
        // Move every adapter tensor off its initial value (B = 0, l = 1, ...), the same way in both.
        for pm in [&mut q, &mut d] {
            for (i, (_, v)) in pm.trainable_parameters().into_iter().enumerate() {
                let n = v.as_tensor().elem_count();
                let bump = Tensor::arange(0u32, n as u32, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .affine(0.37, i as f64)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .affine(0.3, 0.0)
                    .unwrap()
                    .reshape(v.as_tensor().shape())
                    .unwrap();
                v.set(&(v.as_tensor() + bump).unwrap()).unwrap();
            }
        }
        let yq = q.forward(&x, false).unwrap();
        let yd = d.forward(&x, false).unwrap();
        assert_close(
            &format!("{method}: quantized vs dequantized base"),
            &real(&yq),
            &real(&yd),
            1e-4,
        );
        assert!(
            max_diff(&real(&yq), &real(&expected("logits_4bit"))) > 1e-3,
            "{method}: adapter changes nothing"
        );

        // Gradients reach every trainable tensor through the quantized products.
        let y = q.forward(&x, true).unwrap();
        let grads = (y.sqr().unwrap().mean_all().unwrap()).backward().unwrap();
        for (name, v) in q.trainable_parameters() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{method}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{method}: zero gradient for {name}");
        }

        // Merge dequantizes, adds, and re-quantizes with the same scheme: the codes equal the
        // dense twin's merged weight quantized afresh; the layers stay quantized.
        let before = packed_codes(q.base_model());
        q.merge_adapter().unwrap();
        d.merge_adapter().unwrap();
        assert_eq!(quantized_linears(q.base_model()).len(), 14, "{method}");
        let merged = packed_codes(q.base_model());
        let mut changed = 0;
        for (m, dm) in q
            .base_model()
            .modules()
            .into_iter()
            .zip(d.base_model().modules())
        {
            if let (ModuleRef::Linear(l), ModuleRef::Linear(ld)) = (m, dm) {
                let Some(QuantWeight::Bnb4(got)) = l.quant() else {
                    continue;
                };
                let want = QuantWeight::quantize(
                    &ld.dense_weight().unwrap(),
                    &l.quant().unwrap().scheme().unwrap(),
                )
                .unwrap();
                let QuantWeight::Bnb4(want) = want else {
                    unreachable!()
                };
                assert_eq!(got.packed, want.packed, "{method}: {} merged codes", l.name);
                changed += usize::from(before[&l.name] != got.packed);
            }
        }
        assert!(changed > 0, "{method}: merging changed no quantized weight");
        assert!(merged.len() == before.len());
        q.unmerge_adapter().unwrap();
        // Unmerging re-quantizes W + ΔW − ΔW: most codes come back (a byte holds two codes).
        let after = packed_codes(q.base_model());
        let (same, all) = before.iter().fold((0usize, 0usize), |(s, a), (k, v)| {
            let w = &after[k];
            (
                s + v.iter().zip(w).filter(|(x, y)| x == y).count(),
                a + v.len(),
            )
        });
        assert!(
            same as f64 > 0.75 * all as f64,
            "{method}: unmerge kept {same}/{all} bytes"
        );
        // (This tiny random model amplifies 4-bit rounding: its logits move by O(1) between the
        // dense and 4-bit weights, so the twice re-quantized logits are only checked to run.)
        let yu = q.forward(&x, false).unwrap();
        assert!(real(&yu)
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite());
    }
}

trait IntoCfg {
    fn into_cfg(self) -> PeftConfig;
}
impl IntoCfg for serde_json::Value {
    fn into_cfg(self) -> PeftConfig {
        PeftConfig::from_user_json(&self).unwrap()
    }
}

#[test]
fn quantized_base_weights_cannot_be_trained_and_bad_configs_are_named() {
    let e = get_peft_model(
        load("llama_4bit", None),
        lora(serde_json::json!({"modules_to_save": ["model.layers.0.self_attn.o_proj"]})),
        "default",
    )
    .err()
    .expect("a quantized modules_to_save is refused")
    .to_string();
    assert!(e.contains("quantized") && e.contains("o_proj"), "{e}");

    let bad = |v: serde_json::Value| -> String {
        let mut c = qlora_config();
        for (k, x) in v.as_object().unwrap() {
            match k.as_str() {
                "bnb_4bit_quant_type" => c.bnb_4bit_quant_type = x.as_str().unwrap().into(),
                "bnb_4bit_blocksize" => c.bnb_4bit_blocksize = x.as_u64().unwrap() as usize,
                _ => unreachable!(),
            }
        }
        let opts = LoadOptions {
            quantization: Some(c),
            ..Default::default()
        };
        models::load(&dir().join("llama_dense"), &opts)
            .err()
            .expect("a bad quantization config is refused")
            .to_string()
    };
    let e = bad(serde_json::json!({"bnb_4bit_quant_type": "nf3"}));
    assert!(e.contains("nf3"), "{e}");
    let e = bad(serde_json::json!({"bnb_4bit_blocksize": 48}));
    assert!(e.contains("48"), "{e}");
}

#[test]
fn bf16_cast_keeps_quantized_weights_quantized() {
    let mut pm = get_peft_model(
        load("llama_4bit", None),
        lora(serde_json::json!({})),
        "default",
    )
    .unwrap();
    pm.cast_frozen(DType::BF16).unwrap();
    assert_eq!(quantized_linears(pm.base_model()).len(), 14);
    let y = pm.forward(&inputs(), false).unwrap();
    // bf16 activations over the same quantized weights.
    let d = max_diff(&real(&y), &real(&expected("logits_4bit")));
    assert!(d < 0.2, "bf16 over 4-bit: {d}");
}

#[test]
fn model_table_takes_transformers_quantization_names_and_names_bad_values() {
    let job = |q: &str| {
        format!(
            "[model]\npath = \"m\"\nquantization = {q}\n[peft]\npeft_type = \"LORA\"\n\
             task_type = \"CAUSAL_LM\"\n[data]\ntrain_file = \"t.jsonl\"\n"
        )
    };
    let c = peft::train::TrainConfig::from_toml_str(&job(
        "{ load_in_4bit = true, bnb_4bit_quant_type = \"nf4\", bnb_4bit_use_double_quant = true, \
         bnb_4bit_compute_dtype = \"bfloat16\" }",
    ))
    .unwrap();
    let q = c.model.quantization.unwrap();
    assert!(q.load_in_4bit && q.bnb_4bit_use_double_quant && q.bnb_4bit_quant_type == "nf4");
    let e = peft::train::TrainConfig::from_toml_str(&job(
        "{ load_in_4bit = true, bnb_4bit_quant_type = \"nf5\" }",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("quantization") && e.contains("nf5"), "{e}");
    let e = peft::train::TrainConfig::from_toml_str(&job("{ load_in_4bit = true, bits = 4 }"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bits"), "{e}");
}
