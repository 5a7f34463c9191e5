//! Backward pass: gradients of a PEFT adapter against torch's, every trainable tensor gets a
//! gradient, and training leaves frozen weights bit-identical.

mod common;

use candle_core::Tensor;
use common::*;
use peft::peft_model::load_with_adapter;
use peft::train::classification_loss;
use peft::train::optim::{AdamW, AdamWParams};
use peft::{LoadOptions, PeftModel, TaskType};

#[test]
fn gradients_match_torch() {
    let case = "list_qv";
    let dir = case_dir(case);
    let want = load_st(&dir.join("grads.safetensors"));
    let mut m =
        PeftModel::from_pretrained(load_model(case), &dir.join("adapter"), Default::default())
            .unwrap();
    // Reload as trainable, as the fixture did (is_trainable=True).
    m.delete_adapter("default").unwrap();
    m.load_adapter(&dir.join("adapter"), "default", true)
        .unwrap();
    let logits = m.forward(&inputs(), false).unwrap();
    let loss = classification_loss(&logits, &labels(task_of(case))).unwrap();
    assert_close("loss", &loss.reshape(1).unwrap(), &want["loss"], 1e-5);
    let grads = loss.backward().unwrap();
    let params = m.trainable_parameters();
    assert_eq!(
        params.len(),
        want.len() - 1,
        "trainable tensors vs torch's gradients"
    );
    for (key, var) in params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let w = want
            .get(&key)
            .unwrap_or_else(|| panic!("torch has no gradient named {key}"));
        let scale = w
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max_diff(g, w) <= 1e-4 * scale.max(1.0),
            "{key}: gradient differs from torch"
        );
    }
}

/// Train mode (dropout on) for every case: each trainable tensor gets a non-zero gradient, and a
/// few optimizer steps change only trainable tensors.
#[test]
fn every_trainable_parameter_gets_a_gradient_and_frozen_weights_stay_put() {
    for case in all_cases() {
        let dir = case_dir(&case);
        let mut m =
            PeftModel::from_pretrained(load_model(&case), &dir.join("adapter"), Default::default())
                .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&dir.join("adapter"), "default", true)
            .unwrap();
        let frozen: Vec<(String, Tensor)> = m
            .base_model()
            .modules()
            .iter()
            .flat_map(|module| {
                module
                    .params()
                    .into_iter()
                    .filter(|p| p.base_var().is_none())
                    .map(|p| (p.name.clone(), p.base().copy().unwrap()))
            })
            .collect();
        let params = m.trainable_parameters();
        assert!(!params.is_empty(), "{case}: nothing to train");
        let mut opt = AdamW::new(params.clone(), AdamWParams::default()).unwrap();
        let before: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        for step in 0..3 {
            let logits = m.forward(&inputs(), true).unwrap();
            let loss = match task_of(&case) {
                // Hidden states, not logits: any scalar of them will do.
                TaskType::FeatureExtraction => logits.sqr().unwrap().mean_all().unwrap(),
                task => classification_loss(&logits, &labels(task)).unwrap(),
            };
            let grads = loss.backward().unwrap();
            if step == 0 {
                for (key, var) in &params {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
                    let norm = g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(norm > 0.0, "{case}: zero gradient for {key}");
                }
            }
            opt.step(&grads, 1e-2, 1.0).unwrap();
        }
        for ((key, var), b) in params.iter().zip(&before) {
            assert!(
                max_diff(var.as_tensor(), b) > 0.0,
                "{case}: {key} did not change"
            );
        }
        let after: Vec<(String, Tensor)> = m
            .base_model()
            .modules()
            .iter()
            .flat_map(|module| {
                module
                    .params()
                    .into_iter()
                    .filter(|p| p.base_var().is_none())
                    .map(|p| (p.name.clone(), p.base().copy().unwrap()))
            })
            .collect();
        for ((name, a), (_, b)) in frozen.iter().zip(&after) {
            assert!(max_diff(a, b) == 0.0, "{case}: frozen {name} changed");
        }
    }
}

#[test]
fn load_with_adapter_picks_the_head_from_the_adapter() {
    let case = "list_qv";
    let dir = case_dir(case);
    let model_dir = fixtures().join("models/base_noprefix");
    // A base model without a head: task and class count come from the adapter.
    let m = load_with_adapter(&model_dir, &dir.join("adapter"), LoadOptions::default()).unwrap();
    assert_eq!(m.base_model().info().task, peft::TaskType::SeqCls);
    let logits = m.forward(&inputs(), false).unwrap();
    assert_eq!(logits.dims(), &[3, 3]);
}

#[test]
fn no_grad_records_nothing_and_gives_the_same_logits() {
    let dir = case_dir("list_qv");
    let mut m = PeftModel::from_pretrained(
        load_model("list_qv"),
        &dir.join("adapter"),
        Default::default(),
    )
    .unwrap();
    m.delete_adapter("default").unwrap();
    m.load_adapter(&dir.join("adapter"), "default", true)
        .unwrap();
    let with_graph = m.forward(&inputs(), false).unwrap();
    assert!(
        with_graph.track_op(),
        "a forward over trainable adapters is recorded"
    );
    let without = peft::no_grad(|| m.forward(&inputs(), false)).unwrap();
    assert!(!without.track_op(), "inside no_grad nothing is recorded");
    // The same logits up to summation order: without a graph each LoRA layer accumulates its
    // update into the base product (ops::frozen_linear_low_rank) instead of adding it after.
    let diff = max_diff(&with_graph, &without);
    assert!(diff <= 1e-5, "graph and no-graph logits differ by {diff}");
    assert!(
        peft::grad::is_enabled(),
        "no_grad restores recording when it ends"
    );
}
