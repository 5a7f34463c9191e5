//! LoHa, LoKr, IA3 and VeRA adapters created and trained here: a few AdamW steps change the
//! output, saving and loading gives the same logits, merging matches, and the files follow PEFT's
//! layout (the fixture configs' keys). With `PEFT_EXPORT_DIR` set, each adapter and its logits are
//! kept there for `tools/fixtures/check_adapter.py` (see tools/fixtures/README.md).

mod tuners_common;

use candle_core::Tensor;
use peft::peft_model::get_peft_model_with_seed;
use peft::train::optim::{AdamW, AdamWParams};
use peft::tuners::ia3::Ia3Config;
use peft::tuners::loha::LohaConfig;
use peft::tuners::lokr::LokrConfig;
use peft::tuners::vera::VeraConfig;
use peft::{PeftConfig, PeftModel, TaskType};
use std::collections::BTreeSet;
use std::path::PathBuf;
use tuners_common::*;

/// A config of `method` as a person would write it (TOML `[peft]` table as JSON), with the case's
/// task.
fn config(method: &str, case: &str) -> PeftConfig {
    let task = task(case).as_str();
    let v = match method {
        "loha" => serde_json::json!({"peft_type": "LOHA", "r": 4, "alpha": 8, "task_type": task}),
        "lokr" => serde_json::json!({"peft_type": "LOKR", "r": 2, "alpha": 4, "task_type": task}),
        "ia3" => serde_json::json!({"peft_type": "IA3", "task_type": task}),
        _ => serde_json::json!({"peft_type": "VERA", "r": 8, "task_type": task}),
    };
    PeftConfig::from_user_json(&v).unwrap()
}

fn train(m: &PeftModel, case: &str, steps: usize) {
    let mut opt = AdamW::new(
        m.trainable_parameters(),
        AdamWParams {
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..steps {
        let logits = m.forward(&inputs(case), true).unwrap();
        let grads = loss(case, &logits).backward().unwrap();
        opt.step(&grads, 1e-2, 1.0).unwrap();
    }
}

fn export_dir() -> Option<PathBuf> {
    std::env::var_os("PEFT_EXPORT_DIR").map(PathBuf::from)
}

fn logits_of(m: &PeftModel, case: &str) -> Tensor {
    peft::no_grad(|| m.forward(&inputs(case), false).unwrap())
}

/// Every method on every architecture its PEFT counterpart accepts (GPT-2 only for IA3 and VeRA).
fn combos() -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    for method in ["loha", "lokr", "ia3", "vera"] {
        for model in ["bert", "gpt2", "llama", "t5"] {
            if model == "gpt2" && (method == "loha" || method == "lokr") {
                continue;
            }
            // The PEFT fixture case of the same model gives its directory, task and inputs.
            let case = cases()
                .into_iter()
                .find(|c| c.ends_with(&format!("_{model}")))
                .unwrap();
            v.push((method, case));
        }
    }
    v
}

#[test]
fn adapters_trained_here_round_trip_in_peft_layout() {
    peft::ops::seed_dropout(1);
    for (method, case) in combos() {
        let what = format!("{method} on {case}'s model");
        let m = get_peft_model_with_seed(load_base(&case), config(method, &case), "default", 3)
            .unwrap();
        let before = logits_of(&m, &case);
        train(&m, &case, 3);
        let after = logits_of(&m, &case);
        let moved = max_diff(&real(&case, &before), &real(&case, &after));
        assert!(moved > 1e-4, "{what}: training did not change the output");

        let out = tempfile::tempdir().unwrap();
        let dir = match export_dir() {
            Some(d) => d.join(format!("{method}_{}", family(&case))),
            None => out.path().to_path_buf(),
        };
        m.save_pretrained(&dir).unwrap();
        let reloaded =
            PeftModel::from_pretrained(load_base(&case), &dir, Default::default()).unwrap();
        let again = logits_of(&reloaded, &case);
        let d = max_diff(&real(&case, &after), &real(&case, &again));
        assert!(d <= 1e-5, "{what}: reloaded logits differ by {d}");
        let merged = reloaded.merge_and_unload().unwrap();
        let d = max_diff(
            &real(&case, &after),
            &real(&case, &merged.forward(&inputs(&case), false).unwrap()),
        );
        assert!(d <= 1e-4, "{what}: merged logits differ by {d}");

        // The file holds the keys PEFT writes for the method on this model (the PEFT fixture of the
        // same method, where one exists with the same targets, has the same key suffixes).
        let saved = load_st(&dir.join("adapter_model.safetensors"));
        let suffixes: BTreeSet<String> = saved
            .keys()
            .map(|k| k.rsplit('.').next().unwrap().to_string())
            .collect();
        let want: &[&str] = match method {
            "loha" => &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            "lokr" => &["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
            "ia3" => &["ia3_l"],
            _ => &["vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"],
        };
        for s in want {
            assert!(
                suffixes.contains(*s),
                "{what}: no `{s}` key in {suffixes:?}"
            );
        }
        if task(&case) == TaskType::SeqCls {
            assert!(saved.contains_key("base_model.model.classifier.weight"));
        }
        let cfg = peft::io::read_json(&dir.join("adapter_config.json")).unwrap();
        let fixture_cfg = peft::io::read_json(
            &case_dir(&format!("{method}_{}", family(&case))).join("adapter/adapter_config.json"),
        );
        if let Ok(fc) = fixture_cfg {
            let keys = |v: &serde_json::Value| -> BTreeSet<String> {
                v.as_object().unwrap().keys().cloned().collect()
            };
            assert_eq!(keys(&cfg), keys(&fc), "{what}: adapter_config.json fields");
        }
        if let Some(d) = export_dir() {
            let name = format!("{method}_{}", family(&case));
            peft::io::save_safetensors(
                &d.join(format!("{name}_logits.safetensors")),
                &[("logits".to_string(), after.clone())],
            )
            .unwrap();
        }
    }
}

/// Adapters of the same method built from the typed configs (the library API) equal those from
/// JSON; and `get_peft_model` with a typed config of each method works.
#[test]
fn typed_configs_work() {
    let case = "loha_bert";
    let task = Some(TaskType::SeqCls);
    let mut loha = LohaConfig::default();
    loha.common.base.task_type = task;
    let mut lokr = LokrConfig::default();
    lokr.common.base.task_type = task;
    let mut ia3 = Ia3Config::default();
    ia3.base.task_type = task;
    let mut vera = VeraConfig {
        r: 4,
        ..Default::default()
    };
    vera.base.task_type = task;
    for c in [PeftConfig::from(loha), lokr.into(), ia3.into(), vera.into()] {
        let m = get_peft_model_with_seed(load_base(case), c.clone(), "default", 0).unwrap();
        // Every method starts as the identity with its default initialisation.
        let base = load_base(case).forward(&inputs(case), false).unwrap();
        let d = max_diff(&base, &m.forward(&inputs(case), false).unwrap());
        assert!(
            d <= 1e-6,
            "{}: not the identity at init ({d})",
            c.peft_type()
        );
    }
}
