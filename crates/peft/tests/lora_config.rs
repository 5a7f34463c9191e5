//! LoRA behaviours with closed-form answers: default targets, initialisations, scaling,
//! fan_in_fan_out correction, and the disable scope.

mod common;

use common::*;
use peft::layers::ModuleRef;
use peft::tuners::lora::{InitLoraWeights, LoraConfig, LoraLinear};
use peft::tuners::targets::ModuleSpec;
use peft::tuners::BaseFields;
use peft::{get_peft_model, TaskType};

fn loras(m: &peft::PeftModel) -> Vec<(String, &LoraLinear)> {
    let mut out = Vec::new();
    for module in m.base_model().modules() {
        if let ModuleRef::Linear(l) = module {
            if let Some(a) = l.adapters.get("default") {
                out.push((
                    l.name.clone(),
                    a.as_any().downcast_ref::<LoraLinear>().unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn bert_defaults_to_query_and_value() {
    let config = LoraConfig {
        base: BaseFields {
            task_type: Some(TaskType::SeqCls),
            ..Default::default()
        },
        ..Default::default()
    };
    let m = get_peft_model(load_model("list_qv"), config, "default").unwrap();
    let names: Vec<String> = loras(&m).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.self.value",
            "bert.encoder.layer.1.attention.self.query",
            "bert.encoder.layer.1.attention.self.value"
        ]
    );
    match m
        .peft_config("default")
        .unwrap()
        .downcast_ref::<LoraConfig>()
    {
        Some(c) => assert_eq!(
            c.target_modules,
            Some(ModuleSpec::List(vec!["query".into(), "value".into()]))
        ),
        None => panic!("not a LoRA config"),
    }
}

fn stats(t: &candle_core::Tensor) -> (f32, f32) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mean_sq = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    (max, mean_sq.sqrt())
}

#[test]
fn initialisations_follow_peft() {
    let make = |init: InitLoraWeights, r: usize| {
        let config = LoraConfig {
            r,
            init_lora_weights: init,
            target_modules: Some(ModuleSpec::List(vec!["intermediate.dense".into()])),
            ..Default::default()
        };
        get_peft_model(load_model("list_qv"), config, "default").unwrap()
    };
    // true: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0.
    let m = make(InitLoraWeights::Bool(true), 8);
    for (_, l) in loras(&m) {
        let (max_a, rms_a) = stats(l.a.as_tensor());
        let bound = 1.0 / 32f32.sqrt();
        assert!(
            max_a <= bound && rms_a > 0.8 * bound / 3f32.sqrt(),
            "uniform A: max {max_a}, rms {rms_a}"
        );
        assert_eq!(stats(l.b.as_tensor()).0, 0.0);
    }
    // "gaussian": A ~ N(0, 1/r), B = 0.
    let m = make(InitLoraWeights::Method("gaussian".into()), 4);
    for (_, l) in loras(&m) {
        let (_, rms) = stats(l.a.as_tensor());
        assert!((rms - 0.25).abs() < 0.05, "gaussian A rms {rms}");
        assert_eq!(stats(l.b.as_tensor()).0, 0.0);
    }
    // false: B keeps a random nn.Linear init, so the adapter changes the output at once.
    let m = make(InitLoraWeights::Bool(false), 8);
    for (_, l) in loras(&m) {
        assert!(stats(l.b.as_tensor()).0 > 0.0);
    }
}

#[test]
fn scaling_is_alpha_over_r_or_sqrt_r() {
    for (rslora, r, alpha, want) in [
        (false, 4, 32.0, 8.0),
        (true, 16, 2.0, 0.5),
        (false, 8, 16.0, 2.0),
    ] {
        let config = LoraConfig {
            r,
            lora_alpha: alpha,
            use_rslora: rslora,
            ..Default::default()
        };
        let m = get_peft_model(load_model("list_qv"), config, "default").unwrap();
        for (_, l) in loras(&m) {
            assert_eq!(l.scaling, want);
        }
    }
}

#[test]
fn fan_in_fan_out_is_corrected_for_linear_layers() {
    let config = LoraConfig {
        fan_in_fan_out: true,
        ..Default::default()
    };
    let m = get_peft_model(load_model("list_qv"), config, "default").unwrap();
    match m
        .peft_config("default")
        .unwrap()
        .downcast_ref::<LoraConfig>()
    {
        Some(c) => assert!(!c.fan_in_fan_out),
        None => panic!("not a LoRA config"),
    }
}

#[test]
fn disabled_scope_restores_the_adapter() {
    let dir = case_dir("list_qv");
    let mut m = peft::PeftModel::from_pretrained(
        load_model("list_qv"),
        &dir.join("adapter"),
        Default::default(),
    )
    .unwrap();
    let expected = load_st(&dir.join("expected.safetensors"));
    m.merge_adapter().unwrap();
    {
        let off = m.disable_adapter().unwrap();
        assert_close(
            "disabled after merge",
            &off.forward(&inputs(), false).unwrap(),
            &expected["base_logits"],
            1e-4,
        );
    }
    assert_close(
        "enabled again",
        &m.forward(&inputs(), false).unwrap(),
        &expected["lora_logits"],
        1e-4,
    );
}
