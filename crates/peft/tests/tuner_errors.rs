//! What LoHa, LoKr, IA3 and VeRA refuse, with messages that say what to do.

mod tuners_common;

use peft::peft_model::get_peft_model_with_seed;
use peft::{PeftConfig, PeftModel};
use serde_json::json;
use tuners_common::*;

fn user(v: serde_json::Value) -> String {
    PeftConfig::from_user_json(&v)
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
}

fn assert_err(v: serde_json::Value, needles: &[&str]) {
    let msg = user(v.clone());
    assert!(!msg.is_empty(), "{v} was accepted");
    for n in needles {
        assert!(msg.contains(n), "{v}: `{msg}` does not mention `{n}`");
    }
}

#[test]
fn bad_config_values_name_the_field() {
    assert_err(json!({"peft_type": "LOHA", "r": 0}), &["`r`", "positive"]);
    assert_err(
        json!({"peft_type": "LOHA", "rank_dropout": 1.5}),
        &["rank_dropout", "[0, 1)"],
    );
    assert_err(
        json!({"peft_type": "LOKR", "module_dropout": -0.1}),
        &["module_dropout"],
    );
    assert_err(
        json!({"peft_type": "LOKR", "decompose_factor": 0}),
        &["decompose_factor", "-1"],
    );
    assert_err(
        json!({"peft_type": "LOKR", "init_weights": "pissa"}),
        &["init_weights", "lycoris"],
    );
    assert_err(
        json!({"peft_type": "LOHA", "alhpa": 4}),
        &["alhpa", "did you mean `alpha`"],
    );
    assert_err(
        json!({"peft_type": "LOHA", "rank_pattern": {"q": "x"}}),
        &["rank_pattern"],
    );
    assert_err(
        json!({"peft_type": "LOHA", "layers_pattern": "layer"}),
        &["layers_to_transform"],
    );
    assert_err(
        json!({"peft_type": "IA3", "target_modules": ["key"], "feedforward_modules": ["output.dense"]}),
        &["feedforward_modules", "subset", "output.dense"],
    );
    assert_err(
        json!({"peft_type": "IA3", "init_ia3_weight": true}),
        &["did you mean `init_ia3_weights`"],
    );
    assert_err(json!({"peft_type": "VERA", "r": 0}), &["`r`"]);
    assert_err(
        json!({"peft_type": "VERA", "vera_dropout": 1.0}),
        &["vera_dropout"],
    );
    assert_err(json!({"peft_type": "VERA", "bias": "lora_only"}), &["bias"]);
    assert_err(json!({"peft_type": "BOFT"}), &["BOFT", "LOHA", "VERA"]);
    // PEFT's own adapter files may carry fields of newer versions: those are tolerated.
    let v = json!({"peft_type": "LOHA", "some_future_field": 1});
    assert!(PeftConfig::from_adapter_json(&v).is_ok());
}

/// PEFT's LoHa and LoKr take nn.Linear only and refuse GPT-2's Conv1D (the fixture records what
/// PEFT raises); so do we, naming the layer.
#[test]
fn lycoris_methods_refuse_conv1d_like_peft() {
    let errors = peft::io::read_json(&fixtures().join("errors.json")).unwrap();
    let case = "ia3_gpt2"; // the GPT-2 model, inputs and task
    for (method, peft_type) in [("loha", "LOHA"), ("lokr", "LOKR")] {
        let peft_says = errors[format!("{method}_gpt2")].as_str().unwrap();
        assert!(peft_says.contains("Conv1D") && peft_says.contains("not supported"));
        let c =
            PeftConfig::from_user_json(&json!({"peft_type": peft_type, "task_type": "CAUSAL_LM"}))
                .unwrap();
        let err = get_peft_model_with_seed(load_base(case), c, "default", 0)
            .err()
            .unwrap_or_else(|| panic!("{method} on GPT-2 was accepted"))
            .to_string();
        assert!(err.contains("Conv1D") && err.contains("c_attn"), "{err}");
    }
}

#[test]
fn vera_without_saved_projections_is_refused_with_a_way_out() {
    let err = PeftModel::from_pretrained(
        load_base("vera_bert"),
        &case_dir("vera_noproj").join("adapter"),
        Default::default(),
    )
    .err()
    .expect("a VeRA adapter without projections was accepted")
    .to_string();
    assert!(err.contains("save_projection"), "{err}");
    assert!(err.contains("torch"), "{err}");
    // Creating one here is refused as well: it could not be saved in a form PEFT reproduces.
    let c =
        PeftConfig::from_user_json(&json!({"peft_type": "VERA", "r": 4, "save_projection": false}))
            .unwrap();
    assert!(get_peft_model_with_seed(load_base("vera_bert"), c, "default", 0).is_err());
}

#[test]
fn targets_that_are_not_linear_layers_are_refused() {
    for t in ["LOHA", "LOKR", "IA3", "VERA"] {
        let with = |targets: serde_json::Value| {
            let mut v = json!({"peft_type": t, "target_modules": targets, "task_type": "SEQ_CLS"});
            if t != "IA3" {
                v["r"] = json!(4);
            }
            PeftConfig::from_user_json(&v).unwrap()
        };
        let c = with(json!(["word_embeddings"]));
        let err = get_peft_model_with_seed(load_base("loha_bert"), c, "default", 0)
            .err()
            .unwrap_or_else(|| panic!("{t} on an embedding was accepted"))
            .to_string();
        assert!(
            err.contains("word_embeddings") && err.contains("linear"),
            "{t}: {err}"
        );
        let c = with(json!(["nothing_here"]));
        let err = get_peft_model_with_seed(load_base("loha_bert"), c, "default", 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("nothing_here") && err.contains("query"),
            "{t}: {err}"
        );
    }
}

#[test]
fn ia3_default_tables_follow_peft() {
    use peft::tuners::ia3::{default_feedforward_modules, default_target_modules};
    assert_eq!(
        default_target_modules("bert").unwrap(),
        &["key", "value", "output.dense"]
    );
    assert_eq!(
        default_feedforward_modules("bert").unwrap(),
        &["output.dense"]
    );
    assert_eq!(default_target_modules("t5").unwrap(), &["k", "v", "wo"]);
    assert_eq!(default_target_modules("mt5").unwrap(), &["k", "v", "wi_1"]);
    assert!(default_feedforward_modules("mt5").unwrap().is_empty());
    assert_eq!(
        default_target_modules("qwen2").unwrap(),
        &["q_proj", "v_proj", "down_proj"]
    );
    assert!(default_feedforward_modules("unknown-arch").is_none());
}

#[test]
fn a_second_adapter_must_agree_with_the_first_as_in_peft() {
    let vera = |key: u64| {
        PeftConfig::from_user_json(
            &json!({"peft_type": "VERA", "r": 4, "projection_prng_key": key, "task_type": "SEQ_CLS"}),
        )
        .unwrap()
    };
    let mut pm = get_peft_model_with_seed(load_base("vera_bert"), vera(0), "default", 0).unwrap();
    let err = pm
        .add_adapter("other", vera(7))
        .expect_err("a VeRA adapter with another projection key was accepted")
        .to_string();
    assert!(
        err.contains("projection_prng_key") && err.contains("is 7 here but 0"),
        "{err}"
    );
    assert_eq!(
        pm.adapter_names(),
        ["default"],
        "the refused adapter stayed"
    );
    pm.add_adapter("same_key", vera(0)).unwrap();

    // Base biases belong to the first adapter only.
    let lora = |bias: &str| {
        PeftConfig::from_user_json(&json!({"peft_type": "LORA", "r": 4, "bias": bias})).unwrap()
    };
    let mut pm =
        get_peft_model_with_seed(load_base("vera_bert"), lora("all"), "default", 0).unwrap();
    pm.add_adapter("plain", lora("none")).unwrap();
    let err = pm
        .add_adapter("biased", lora("lora_only"))
        .expect_err("a second adapter training biases was accepted")
        .to_string();
    assert!(
        err.contains("bias = \"lora_only\"") && err.contains("none"),
        "{err}"
    );
    assert_eq!(pm.adapter_names(), ["default", "plain"]);
}
