//! Every method reports its layers and its tuner under PEFT's own names (`lora.Linear`,
//! `adalora.SVDLinear`, IA3's bare `Linear`, `LoHaModel`, ...), and parameters are counted as
//! PEFT counts them, tied embeddings once. Fixture: `tools/fixtures/make_status_fixtures.py`
//! (PEFT 0.21.2).

use peft::models::{self, LoadOptions};
use peft::peft_model::{LayerStatus, ModelStatus, Status};
use peft::{get_peft_model, PeftConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn status(v: &Value) -> Status {
    match v {
        Value::Bool(true) => Status::Yes,
        Value::Bool(false) => Status::No,
        Value::String(s) if s == "irregular" => Status::Irregular,
        other => panic!("not a status: {other}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn check_layer(case: &str, got: &LayerStatus, want: &Value) {
    let at = format!("{case} {}", got.name);
    assert_eq!(got.name, want["name"].as_str().unwrap(), "{case}");
    assert_eq!(
        got.module_type,
        want["module_type"].as_str().unwrap(),
        "{at}"
    );
    assert_eq!(got.enabled, want["enabled"].as_bool().unwrap(), "{at}");
    assert_eq!(
        got.active_adapters,
        strings(&want["active_adapters"]),
        "{at}"
    );
    assert_eq!(
        got.merged_adapters,
        strings(&want["merged_adapters"]),
        "{at}"
    );
    assert_eq!(
        got.available_adapters,
        strings(&want["available_adapters"]),
        "{at}"
    );
    for (k, v) in want["requires_grad"].as_object().unwrap() {
        assert_eq!(got.requires_grad.get(k), Some(&status(v)), "{at} {k}");
    }
    assert_eq!(
        got.requires_grad.len(),
        want["requires_grad"].as_object().unwrap().len(),
        "{at}"
    );
}

fn check_model(case: &str, got: &ModelStatus, want: &Value) {
    assert_eq!(
        got.base_model_type,
        want["base_model_type"].as_str().unwrap(),
        "{case}"
    );
    assert_eq!(
        got.adapter_model_type,
        want["adapter_model_type"].as_str().unwrap(),
        "{case}"
    );
    for (k, v) in want["peft_types"].as_object().unwrap() {
        assert_eq!(got.peft_types[k], v.as_str().unwrap(), "{case} {k}");
    }
    assert_eq!(
        got.trainable_params as u64,
        want["trainable_params"].as_u64().unwrap(),
        "{case}"
    );
    assert_eq!(
        got.total_params as u64,
        want["total_params"].as_u64().unwrap(),
        "{case}"
    );
    assert_eq!(
        got.num_adapter_layers as u64,
        want["num_adapter_layers"].as_u64().unwrap(),
        "{case}"
    );
    assert_eq!(got.enabled, status(&want["enabled"]), "{case}");
    assert_eq!(
        got.active_adapters,
        Some(strings(&want["active_adapters"])),
        "{case}"
    );
    assert_eq!(
        got.merged_adapters,
        Some(strings(&want["merged_adapters"])),
        "{case}"
    );
    assert_eq!(
        got.available_adapters,
        strings(&want["available_adapters"]),
        "{case}"
    );
}

#[test]
fn every_method_reports_peft_names_and_counts() {
    let all = peft::io::read_json(&fixtures().join("status/status.json")).unwrap();
    let cases = all["cases"].as_array().unwrap();
    let mut methods = std::collections::BTreeSet::new();
    for c in cases {
        let name = c["case"].as_str().unwrap();
        let config = PeftConfig::from_user_json(&c["config"]).unwrap();
        methods.insert(config.peft_type());
        let opts = LoadOptions {
            task: config.task_type(),
            ..Default::default()
        };
        let model = models::load(&fixtures().join(c["model"].as_str().unwrap()), &opts).unwrap();
        let m = get_peft_model(model, config, "default").unwrap();
        let layers = m.layer_status().unwrap();
        let want = c["layer_status"].as_array().unwrap();
        let got_names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        let want_names: Vec<&str> = want.iter().map(|l| l["name"].as_str().unwrap()).collect();
        assert_eq!(got_names, want_names, "{name}");
        for (g, w) in layers.iter().zip(want) {
            check_layer(name, g, w);
        }
        check_model(name, &m.model_status().unwrap(), &c["model_status"]);
        assert_eq!(
            m.trainable_parameters_line(),
            c["print_trainable_parameters"].as_str().unwrap(),
            "{name}"
        );
    }
    // Every weight-based method is covered.
    for t in ["LORA", "ADALORA", "LOHA", "LOKR", "IA3", "VERA"] {
        assert!(methods.contains(t), "no status case for {t}");
    }
}
