//! LoRA adapters on decoder models written here: PEFT's layout (compared with what Python PEFT
//! saved for the same model in the fixtures), and reloaded with the same logits. Set
//! `PEFT_EXPORT_DIR` to keep the GPT-2 adapter for tools/fixtures/check_adapter.py (see its README).

use candle_core::{Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::tuners::lora::{InitLoraWeights, LoraConfig};
use peft::tuners::BaseFields;
use peft::{get_peft_model, Inputs, PeftModel, TaskType};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// An adapter saved for `case`'s model with PEFT's default targets has the keys and shapes
/// Python PEFT wrote for the same model, and loads back with the same logits.
fn adapter_round_trip(case: &str, export: Option<&Path>) {
    let meta = peft::io::read_json(&fixtures().join("cases").join(case).join("meta.json")).unwrap();
    let model_dir = fixtures()
        .join("models")
        .join(meta["model"].as_str().unwrap());
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        init_lora_weights: InitLoraWeights::Bool(false),
        base: BaseFields {
            task_type: Some(TaskType::CausalLm),
            ..Default::default()
        },
        ..Default::default()
    };
    let m = get_peft_model(models::load(&model_dir, &opts).unwrap(), config, "default").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = export.unwrap_or(tmp.path());
    m.save_pretrained(dir).unwrap();

    let keys: serde_json::Map<String, serde_json::Value> = m
        .adapter_state_dict("default")
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, serde_json::json!(t.dims())))
        .collect();
    assert_eq!(
        serde_json::Value::Object(keys),
        meta["adapter_keys"],
        "{case}: keys and shapes as Python PEFT saves them"
    );
    let saved = peft::io::read_json(&dir.join("adapter_config.json")).unwrap();
    let python = peft::io::read_json(
        &fixtures()
            .join("cases")
            .join(case)
            .join("adapter/adapter_config.json"),
    )
    .unwrap();
    for field in ["fan_in_fan_out", "task_type", "peft_type"] {
        assert_eq!(saved[field], python[field], "{case}: {field}");
    }
    // PEFT writes target_modules from a set, in hash order.
    let sorted = |v: &serde_json::Value| {
        let mut names: Vec<String> = serde_json::from_value(v.clone()).unwrap();
        names.sort();
        names
    };
    assert_eq!(
        sorted(&saved["target_modules"]),
        sorted(&python["target_modules"])
    );

    let ids = Tensor::new(
        &[[5u32, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]],
        &Device::Cpu,
    )
    .unwrap();
    let inputs = Inputs::new(ids);
    let want = m.forward(&inputs, false).unwrap();
    let base = models::load(&model_dir, &opts).unwrap();
    let without = base.forward(&inputs, false).unwrap();
    assert!(
        max_diff(&want, &without) > 1e-3,
        "{case}: the adapter changes the logits"
    );
    let loaded = PeftModel::from_pretrained(base, dir, Default::default()).unwrap();
    assert_eq!(
        max_diff(&loaded.forward(&inputs, false).unwrap(), &want),
        0.0
    );
}

#[test]
fn gpt2_adapter_is_saved_in_peft_layout_with_fan_in_fan_out() {
    let export = std::env::var_os("PEFT_EXPORT_DIR").map(PathBuf::from);
    let dir = export.as_ref().map(|d| d.join("gpt2_adapter"));
    adapter_round_trip("gpt2", dir.as_deref());
}

#[test]
fn llama_and_opt_adapters_are_saved_in_peft_layout() {
    adapter_round_trip("llama_gqa", None);
    adapter_round_trip("opt", None);
}
