//! The example configs parse, and each method example trains the adapter its PyTorch twin does:
//! its `[peft]` table is the config JSON `tools/reference/train_reference.py --peft-config` reads.

use peft::train::config::TrainConfig;
use peft::PeftConfig;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn every_example_config_parses() {
    let dir = repo().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            TrainConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} example configs in {}", dir.display());
}

#[test]
fn method_examples_match_their_pytorch_configs() {
    for (example, json) in [
        ("minilm-rotten-tomatoes-loha.toml", "loha.json"),
        (
            "minilm-rotten-tomatoes-adalora.toml",
            "adalora-400-steps.json",
        ),
        (
            "minilm-rotten-tomatoes-prompt-tuning.toml",
            "prompt_tuning.json",
        ),
        ("minilm-rotten-tomatoes-p-tuning.toml", "p_tuning.json"),
        (
            "minilm-rotten-tomatoes-prefix-tuning.toml",
            "prefix_tuning.json",
        ),
    ] {
        let cfg = TrainConfig::from_toml_file(&repo().join("examples").join(example)).unwrap();
        // The run takes the task from `[model]`, as the JSON names it.
        let mut ours = cfg.peft.clone();
        ours.set_task_type(peft::train::run::task_of(&cfg));
        let text =
            std::fs::read_to_string(repo().join("tools/reference/methods").join(json)).unwrap();
        let theirs = PeftConfig::from_user_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(ours.peft_type(), theirs.peft_type(), "{example}");
        assert_eq!(
            ours.to_adapter_json(),
            theirs.to_adapter_json(),
            "{example} and {json} describe different adapters"
        );
    }
}
