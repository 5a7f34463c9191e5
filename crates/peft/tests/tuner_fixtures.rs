//! LoHa, LoKr, IA3 and VeRA adapters written by PEFT 0.21 (after a few training steps) on small
//! random BERT, Llama, GPT-2 and T5 models: loaded here they give PEFT's logits; merged, unmerged,
//! unloaded and saved again they behave as PEFT's; their gradients are torch's.
//! Fixtures: tools/fixtures/make_tuner_fixtures.py.

mod tuners_common;

use peft::{PeftModel, TaskType};
use std::collections::BTreeSet;
use tuners_common::*;

const TOL: f32 = 1e-4;

fn load(case: &str) -> PeftModel {
    PeftModel::from_pretrained(
        load_base(case),
        &case_dir(case).join("adapter"),
        Default::default(),
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"))
}

#[test]
fn the_fixtures_cover_every_method_on_every_architecture() {
    let have: BTreeSet<String> = cases().into_iter().collect();
    for method in ["loha", "lokr", "ia3", "vera"] {
        for model in ["bert", "llama", "t5"] {
            assert!(
                have.contains(&format!("{method}_{model}")),
                "{method}_{model}"
            );
        }
    }
    // PEFT's LoHa/LoKr refuse GPT-2's Conv1D layers (see tuner_errors); IA3 and VeRA take them.
    assert!(have.contains("ia3_gpt2") && have.contains("vera_gpt2"));
}

#[test]
fn peft_adapters_give_peft_logits() {
    for case in cases() {
        let e = load_st(&case_dir(&case).join("expected.safetensors"));
        let base = load_base(&case).forward(&inputs(&case), false).unwrap();
        check(&case, "base", &base, &e["base_logits"], TOL);
        let m = load(&case);
        let got = m.forward(&inputs(&case), false).unwrap();
        check(&case, "adapter", &got, &e["adapter_logits"], TOL);
    }
}

#[test]
fn merged_unmerged_and_unloaded_models_match_peft() {
    for case in cases() {
        let e = load_st(&case_dir(&case).join("expected.safetensors"));
        let x = inputs(&case);
        let mut m = load(&case);
        m.merge_adapter().unwrap();
        let merged = m.forward(&x, false).unwrap();
        check(&case, "merged", &merged, &e["merged_logits"], TOL);
        // IA3's unmerge divides by the vector (+1e-8), so it is exact only up to rounding.
        m.unmerge_adapter().unwrap();
        let back = m.forward(&x, false).unwrap();
        check(&case, "unmerged", &back, &e["adapter_logits"], TOL);
        let plain = load(&case).merge_and_unload().unwrap();
        check(
            &case,
            "merge_and_unload",
            &plain.forward(&x, false).unwrap(),
            &e["merged_logits"],
            TOL,
        );
        // `unload` gives the base back, except for biases trained in place (vera_bert: bias
        // "vera_only"), which PEFT leaves in the base model too.
        let base = load(&case).unload().unwrap();
        let got = base.forward(&x, false).unwrap();
        let d = max_diff(&real(&case, &got), &real(&case, &e["base_logits"]));
        if meta(&case)["config"]["bias"].is_string() {
            assert!(d > 1e-4, "{case}: trained biases stay after unload");
        } else {
            assert!(d <= TOL, "{case}: unload: {d}");
        }
    }
}

#[test]
fn disabled_adapters_give_the_base_model() {
    for case in cases() {
        if meta(&case)["config"]["bias"].is_string() {
            continue; // trained biases are part of the base model, as in PEFT
        }
        let e = load_st(&case_dir(&case).join("expected.safetensors"));
        let mut m = load(&case);
        m.merge_adapter().unwrap();
        {
            let d = m.disable_adapter().unwrap();
            let got = d.forward(&inputs(&case), false).unwrap();
            check(&case, "disabled", &got, &e["base_logits"], TOL);
        }
        let got = m.forward(&inputs(&case), false).unwrap();
        check(&case, "re-enabled", &got, &e["adapter_logits"], TOL);
    }
}

/// Saving what was loaded writes PEFT's file back: the same keys, shapes and values, and the same
/// `adapter_config.json`.
#[test]
fn save_writes_peft_layout_back() {
    for case in cases() {
        let dir = case_dir(&case).join("adapter");
        let m = load(&case);
        let out = tempfile::tempdir().unwrap();
        m.save_pretrained(out.path()).unwrap();
        let want = load_st(&dir.join("adapter_model.safetensors"));
        let got = load_st(&out.path().join("adapter_model.safetensors"));
        let wk: BTreeSet<&String> = want.keys().collect();
        let gk: BTreeSet<&String> = got.keys().collect();
        assert_eq!(gk, wk, "{case}: saved keys");
        for (k, w) in &want {
            assert_eq!(max_diff(&got[k], w), 0.0, "{case}: {k}");
        }
        let wc = peft::io::read_json(&dir.join("adapter_config.json")).unwrap();
        let gc = peft::io::read_json(&out.path().join("adapter_config.json")).unwrap();
        assert_eq!(gc, wc, "{case}: adapter_config.json");
    }
}

/// The reloaded adapter, trainable, in eval mode: the loss and every gradient are torch's, and
/// every trainable tensor gets one.
#[test]
fn gradients_match_torch() {
    for case in cases() {
        let want = load_st(&case_dir(&case).join("grads.safetensors"));
        let mut m = PeftModel::from_pretrained(
            load_base(&case),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&case_dir(&case).join("adapter"), "default", true)
            .unwrap();
        let logits = m.forward(&inputs(&case), false).unwrap();
        let loss = loss(&case, &logits);
        let d = max_diff(&loss.reshape(1).unwrap(), &want["loss"]);
        assert!(d <= 1e-5, "{case}: loss differs by {d}");
        let grads = loss.backward().unwrap();
        let params = m.trainable_parameters();
        assert_eq!(params.len(), want.len() - 1, "{case}: trainable tensors");
        for (key, var) in params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
            let w = want
                .get(&key)
                .unwrap_or_else(|| panic!("{case}: torch has no gradient named {key}"));
            assert!(max_abs(g) > 0.0, "{case}: zero gradient for {key}");
            let tol = 1e-4 * max_abs(w).max(1.0);
            let d = max_diff(g, w);
            assert!(d <= tol, "{case}: {key}: gradient differs by {d}");
        }
    }
}

/// Train mode (dropout, rank dropout, module dropout on, seeded): every trainable tensor gets a
/// non-zero gradient. Module dropout skips a whole adapter layer now and then (its tensors get no
/// gradient in that step, as in PEFT), so three steps are taken and each tensor must get one in
/// at least one of them.
#[test]
fn train_mode_gives_every_trainable_tensor_a_gradient() {
    peft::ops::seed_dropout(7);
    for case in cases() {
        let mut m = PeftModel::from_pretrained(
            load_base(&case),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&case_dir(&case).join("adapter"), "default", true)
            .unwrap();
        let params = m.trainable_parameters();
        let mut seen = vec![false; params.len()];
        for _ in 0..3 {
            let logits = m.forward(&inputs(&case), true).unwrap();
            let grads = loss(&case, &logits).backward().unwrap();
            for (i, (_, var)) in params.iter().enumerate() {
                seen[i] |= grads.get(var.as_tensor()).is_some_and(|g| max_abs(g) > 0.0);
            }
        }
        for ((key, _), ok) in params.iter().zip(seen) {
            assert!(ok, "{case}: no gradient for {key} in three training steps");
        }
    }
}

#[test]
fn trainable_parameter_counts_match_peft() {
    for case in cases() {
        let mut m = PeftModel::from_pretrained(
            load_base(&case),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&case_dir(&case).join("adapter"), "default", true)
            .unwrap();
        let (trainable, _) = m.get_nb_trainable_parameters();
        // PEFT counted the freshly created model, whose biases trained in place are trainable too.
        assert_eq!(
            trainable as u64,
            meta(&case)["trainable_params"].as_u64().unwrap(),
            "{case}"
        );
        assert!(matches!(
            task(&case),
            TaskType::SeqCls | TaskType::CausalLm | TaskType::Seq2SeqLm
        ));
    }
}
