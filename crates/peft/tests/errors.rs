//! Bad input gives a clear error (never a panic) that names what is wrong.

mod common;

use common::*;
use peft::models::{self, LoadOptions};
use peft::peft_model::{CONFIG_NAME, WEIGHTS_NAME};
use peft::train::config::TrainConfig;
use peft::tuners::lora::LoraConfig;
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model, Error, PeftConfig, PeftModel, TaskType};
use std::path::Path;

fn copy_adapter(case: &str, to: &Path) {
    let from = case_dir(case).join("adapter");
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn missing_adapter_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = PeftModel::from_pretrained(load_model("list_qv"), tmp.path(), Default::default())
        .err()
        .unwrap();
    assert!(message(e).contains(CONFIG_NAME));
    std::fs::copy(
        case_dir("list_qv").join("adapter").join(CONFIG_NAME),
        tmp.path().join(CONFIG_NAME),
    )
    .unwrap();
    let e = PeftModel::from_pretrained(load_model("list_qv"), tmp.path(), Default::default())
        .err()
        .unwrap();
    assert!(message(e).contains(WEIGHTS_NAME));
}

#[test]
fn truncated_safetensors_is_reported_as_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter("list_qv", tmp.path());
    let path = tmp.path().join(WEIGHTS_NAME);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = message(
        PeftModel::from_pretrained(load_model("list_qv"), tmp.path(), Default::default())
            .err()
            .unwrap(),
    );
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn truncated_model_weights_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/seq_cls");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    let e = message(
        models::load(tmp.path(), &LoadOptions::default())
            .err()
            .unwrap(),
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn adapter_shape_mismatch_names_the_tensor_and_both_shapes() {
    let opts = LoadOptions {
        task: Some(TaskType::SeqCls),
        num_labels: Some(5),
        ..Default::default()
    };
    // A checkpoint whose head disagrees with the requested one.
    let e = message(
        models::load(&fixtures().join("models/seq_cls"), &opts)
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("classifier.weight") && e.contains("[5, 32]") && e.contains("[3, 32]"),
        "{e}"
    );
    // An adapter whose saved head disagrees with the model's.
    let model = models::load(&fixtures().join("models/base_noprefix"), &opts).unwrap();
    let e = message(
        PeftModel::from_pretrained(
            model,
            &case_dir("list_qv").join("adapter"),
            Default::default(),
        )
        .err()
        .unwrap(),
    );
    assert!(
        e.contains("classifier.weight") && e.contains("[5, 32]") && e.contains("[3, 32]"),
        "{e}"
    );
}

#[test]
fn unknown_peft_type_lists_supported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter("list_qv", tmp.path());
    let cfg_path = tmp.path().join(CONFIG_NAME);
    let mut cfg = peft::io::read_json(&cfg_path).unwrap();
    cfg["peft_type"] = "SOMETHING_NEW".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = message(
        PeftModel::from_pretrained(load_model("list_qv"), tmp.path(), Default::default())
            .err()
            .unwrap(),
    );
    assert!(e.contains("SOMETHING_NEW") && e.contains("LORA"), "{e}");
}

#[test]
fn unknown_adapter_config_fields_are_tolerated() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter("list_qv", tmp.path());
    let cfg_path = tmp.path().join(CONFIG_NAME);
    let mut cfg = peft::io::read_json(&cfg_path).unwrap();
    cfg["field_from_peft_0_99"] = serde_json::json!({"x": 1});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(
        PeftModel::from_pretrained(load_model("list_qv"), tmp.path(), Default::default()).is_ok()
    );
}

#[test]
fn target_modules_matching_nothing_lists_available_layers() {
    let config = LoraConfig {
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into()])),
        ..Default::default()
    };
    let e = message(
        get_peft_model(load_model("list_qv"), config, "default")
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("q_proj") && e.contains("bert.encoder.layer.0.attention.self.query"),
        "{e}"
    );
}

#[test]
fn bad_lora_config_values_are_refused() {
    let bad = [
        (r#"{"peft_type":"LORA","r":0}"#, "`r`"),
        (r#"{"peft_type":"LORA","init_lora_weights":"pisa"}"#, "pisa"),
        (r#"{"peft_type":"LORA","bias":"some"}"#, "some"),
        (r#"{"peft_type":"LORA","lora_alfa":8}"#, "lora_alpha"),
        (r#"{"peft_type":"LORA","use_qalora":true}"#, "use_qalora"),
        (r#"{"peft_type":"ADALORA","init_r":4}"#, "total_step"),
    ];
    for (json, needle) in bad {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let e = message(
            PeftConfig::from_user_json(&v)
                .err()
                .unwrap_or_else(|| panic!("accepted {json}")),
        );
        assert!(e.contains(needle), "{json}: {e}");
    }
}

#[test]
fn train_config_rejects_unknown_keys_with_a_suggestion() {
    let base = r#"
[model]
path = "m"
[peft]
peft_type = "LORA"
[data]
train_file = "t.csv"
[training]
output_dir = "o"
"#;
    assert!(TrainConfig::from_toml_str(base).is_ok());
    let e = message(
        TrainConfig::from_toml_str(&base.replace("output_dir", "ouput_dir"))
            .err()
            .unwrap(),
    );
    assert!(e.contains("ouput_dir"), "{e}");
    let e = message(
        TrainConfig::from_toml_str(&base.replace("[data]", "[dta]"))
            .err()
            .unwrap(),
    );
    assert!(e.contains("dta") && e.contains("data"), "{e}");
    let e = message(
        TrainConfig::from_toml_str(&format!("{base}learning_rate = -1.0\n"))
            .err()
            .unwrap(),
    );
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn unsupported_model_type_lists_supported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type":"bloom"}"#).unwrap();
    std::fs::copy(
        fixtures().join("models/seq_cls/model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let e = message(
        models::load(tmp.path(), &LoadOptions::default())
            .err()
            .unwrap(),
    );
    assert!(e.contains("bloom") && e.contains("bert"), "{e}");
}
