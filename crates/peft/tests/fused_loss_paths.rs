//! Which path the trainer's causal-LM loss takes, and that each gives the loss and gradients of
//! the logits-then-cross-entropy path: a frozen head is fused into the loss; a head with a LoRA
//! adapter, or a head kept trainable (`modules_to_save`), keeps its logits so that its own
//! parameters get their gradients.

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::peft_model::get_peft_model_with_seed;
use peft::train::data::Targets;
use peft::train::eval::training_loss;
use peft::tuners::lora::LoraConfig;
use peft::tuners::targets::ModuleSpec;
use peft::tuners::BaseFields;
use peft::{Inputs, PeftModel, TaskType};

/// A random two-block Llama with an untied head, as a checkpoint.
fn tiny_llama(dir: &std::path::Path) {
    let (v, h, i) = (96, 32, 64);
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.1, shape, &dev).unwrap();
    let ones = || Tensor::ones(h, DType::F32, &dev).unwrap();
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), r(&[v, h])),
        ("lm_head.weight".to_string(), r(&[v, h])),
        ("model.norm.weight".to_string(), ones()),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{p}.self_attn.{m}.weight"), r(&[h, h])));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), r(&[i, h])));
        t.push((format!("{p}.mlp.up_proj.weight"), r(&[i, h])));
        t.push((format!("{p}.mlp.down_proj.weight"), r(&[h, i])));
        t.push((format!("{p}.input_layernorm.weight"), ones()));
        t.push((format!("{p}.post_attention_layernorm.weight"), ones()));
    }
    peft::io::save_safetensors(&dir.join("model.safetensors"), &t).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v,
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": false,
        "max_position_embeddings": 64
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn model(dir: &std::path::Path, config: LoraConfig) -> PeftModel {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    get_peft_model_with_seed(models::load(dir, &opts).unwrap(), config, "default", 3).unwrap()
}

fn batch() -> (Inputs, Tensor) {
    let ids: Vec<u32> = (0..3 * 10).map(|k| (k * 37 % 96) as u32).collect();
    let ids = Tensor::from_vec(ids, (3, 10), &Device::Cpu).unwrap();
    // Padding-like -100s in the labels, as a collated batch has them.
    let mut labels: Vec<i64> = ids
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&x| x as i64)
        .collect();
    labels[27..].fill(-100);
    let labels = Tensor::from_vec(labels, (3, 10), &Device::Cpu).unwrap();
    let inputs = Inputs {
        input_ids: Some(ids),
        ..Default::default()
    };
    (inputs, labels)
}

/// The trainer's loss and gradients against logits + `causal_lm_loss`, dropout off.
fn check(m: &PeftModel, head_has_trained_tensors: bool) {
    let (inputs, labels) = batch();
    let targets = Targets::Tokens(labels.clone());
    // `lora_dropout = 0`: both calls compute the same function.
    let fused = training_loss(m, TaskType::CausalLm, &inputs, &targets).unwrap();
    let unfused = peft::causal_lm_loss(&m.forward(&inputs, true).unwrap(), &labels).unwrap();
    let (a, b) = (
        fused.to_scalar::<f32>().unwrap(),
        unfused.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-5 * b, "loss {a} vs unfused {b}");
    let (gf, gu) = (fused.backward().unwrap(), unfused.backward().unwrap());
    let mut head_grads = 0;
    for (key, var) in m.trainable_parameters() {
        let (x, y) = (
            gf.get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {key}")),
            gu.get(var.as_tensor()).unwrap(),
        );
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = y
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            s > 0.0 && d <= 1e-4 * s,
            "{key}: gradient differs by {d} (scale {s})"
        );
        head_grads += usize::from(key.contains("lm_head"));
    }
    assert_eq!(head_grads > 0, head_has_trained_tensors);
}

#[test]
fn frozen_adapted_and_trained_heads_all_give_the_unfused_loss_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_llama(tmp.path());
    let lora = |targets: &[&str], save: Option<Vec<String>>| LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Some(ModuleSpec::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
        base: BaseFields {
            modules_to_save: save,
            task_type: Some(TaskType::CausalLm),
            ..Default::default()
        },
        ..Default::default()
    };
    // A frozen head: fused.
    let m = model(tmp.path(), lora(&["q_proj", "v_proj"], None));
    let (inputs, labels) = batch();
    assert!(m.causal_lm_loss(&inputs, &labels, true).unwrap().is_some());
    check(&m, false);
    // LoRA on the head: its logits are made and its LoRA tensors get gradients.
    check(&model(tmp.path(), lora(&["q_proj", "lm_head"], None)), true);
    // The head trained whole (`modules_to_save`).
    check(
        &model(tmp.path(), lora(&["q_proj"], Some(vec!["lm_head".into()]))),
        true,
    );
}
