//! LoRA on BERT against fixtures produced by transformers + PEFT 0.21 (tools/fixtures/).
//! Every case: base logits, the trained adapter's logits loaded from PEFT's files, merged
//! logits, the parameter count line, and a save → load round trip in PEFT's layout.

mod common;

use common::*;
use peft::peft_model::{CONFIG_NAME, WEIGHTS_NAME};
use peft::{get_peft_model, PeftConfig, PeftModel};

const TOL: f32 = 1e-4;

#[test]
fn base_logits_match_transformers() {
    for case in all_cases() {
        let model = load_model(&case);
        let expected = load_st(&case_dir(&case).join("expected.safetensors"));
        let got = model.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: base"),
            &got,
            &expected["base_logits"],
            TOL,
        );
    }
}

#[test]
fn peft_adapters_load_and_match_lora_and_merged_logits() {
    for case in all_cases() {
        let dir = case_dir(&case);
        let expected = load_st(&dir.join("expected.safetensors"));
        let mut m =
            PeftModel::from_pretrained(load_model(&case), &dir.join("adapter"), Default::default())
                .unwrap();
        let lora = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: lora"),
            &lora,
            &expected["lora_logits"],
            TOL,
        );
        // Without a graph each LoRA layer runs as one product with the update accumulated
        // into the base output (ops::frozen_linear_low_rank): the same logits.
        let inference = peft::no_grad(|| m.forward(&inputs(), false)).unwrap();
        assert_close(
            &format!("{case}: lora, no graph"),
            &inference,
            &expected["lora_logits"],
            TOL,
        );
        assert_close(
            &format!("{case}: lora, no graph vs graph"),
            &inference,
            &lora,
            1e-5,
        );
        {
            let disabled = m.disable_adapter().unwrap();
            let base = disabled.forward(&inputs(), false).unwrap();
            assert_close(
                &format!("{case}: disabled"),
                &base,
                &expected["disabled_logits"],
                TOL,
            );
        }
        let again = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: re-enabled"),
            &again,
            &expected["lora_logits"],
            TOL,
        );
        m.merge_adapter().unwrap();
        let merged = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: merged"),
            &merged,
            &expected["merged_logits"],
            TOL,
        );
        let plain = m.merge_and_unload().unwrap();
        let unloaded = plain.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: merge_and_unload"),
            &unloaded,
            &expected["merged_logits"],
            TOL,
        );
    }
}

#[test]
fn merge_then_unmerge_restores_base_weights() {
    for case in all_cases() {
        let dir = case_dir(&case);
        let mut m =
            PeftModel::from_pretrained(load_model(&case), &dir.join("adapter"), Default::default())
                .unwrap();
        let before: Vec<_> = weights_of(&m);
        m.merge_adapter().unwrap();
        let merged: Vec<_> = weights_of(&m);
        assert!(
            before
                .iter()
                .zip(&merged)
                .any(|(a, b)| max_diff(a, b) > 0.0),
            "{case}: merging changed no weight"
        );
        m.unmerge_adapter().unwrap();
        for (a, b) in before.iter().zip(weights_of(&m)) {
            assert!(
                max_diff(a, &b) <= 1e-5,
                "{case}: unmerge did not restore the base"
            );
        }
    }
}

fn weights_of(m: &PeftModel) -> Vec<candle_core::Tensor> {
    m.base_model()
        .modules()
        .iter()
        .flat_map(|module| {
            module
                .params()
                .into_iter()
                .map(|p| p.base().copy().unwrap())
        })
        .collect()
}

#[test]
fn print_trainable_parameters_matches_peft() {
    for case in all_cases() {
        let meta = meta(&case);
        let config = PeftConfig::from_adapter_json(
            &peft::io::read_json(&case_dir(&case).join("adapter").join(CONFIG_NAME)).unwrap(),
        )
        .unwrap();
        let m = get_peft_model(load_model(&case), config, "default").unwrap();
        assert_eq!(
            m.trainable_parameters_line(),
            meta["print_trainable_parameters"].as_str().unwrap(),
            "{case}"
        );
    }
}

#[test]
fn saved_adapter_has_peft_keys_config_fields_and_values() {
    for case in all_cases() {
        let dir = case_dir(&case);
        let m =
            PeftModel::from_pretrained(load_model(&case), &dir.join("adapter"), Default::default())
                .unwrap();
        let out = tempfile::tempdir().unwrap();
        m.save_pretrained(out.path()).unwrap();

        let theirs = load_st(&dir.join("adapter").join(WEIGHTS_NAME));
        let ours = load_st(&out.path().join(WEIGHTS_NAME));
        let mut their_keys: Vec<_> = theirs.keys().collect();
        let mut our_keys: Vec<_> = ours.keys().collect();
        their_keys.sort();
        our_keys.sort();
        assert_eq!(our_keys, their_keys, "{case}: tensor keys");
        for (k, t) in &theirs {
            assert!(
                max_diff(t, &ours[k]) == 0.0,
                "{case}: {k} changed in the round trip"
            );
        }

        let their_cfg = peft::io::read_json(&dir.join("adapter").join(CONFIG_NAME)).unwrap();
        let our_cfg = peft::io::read_json(&out.path().join(CONFIG_NAME)).unwrap();
        let mut tk: Vec<_> = their_cfg.as_object().unwrap().keys().collect();
        let mut ok: Vec<_> = our_cfg.as_object().unwrap().keys().collect();
        tk.sort();
        ok.sort();
        assert_eq!(ok, tk, "{case}: adapter_config.json fields");
        for k in [
            "r",
            "lora_alpha",
            "bias",
            "use_rslora",
            "task_type",
            "peft_type",
            "init_lora_weights",
        ] {
            assert_eq!(our_cfg[k], their_cfg[k], "{case}: field {k}");
        }

        // And the reloaded copy gives the same logits.
        let reloaded =
            PeftModel::from_pretrained(load_model(&case), out.path(), Default::default()).unwrap();
        let expected = load_st(&dir.join("expected.safetensors"));
        assert_close(
            &format!("{case}: reloaded"),
            &reloaded.forward(&inputs(), false).unwrap(),
            &expected["lora_logits"],
            TOL,
        );
    }
}
