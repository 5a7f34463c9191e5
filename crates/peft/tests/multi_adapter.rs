//! Many adapters on one model against PEFT: two adapters saved by PEFT load from its directory
//! layout, several active adapters add up, `add_weighted_adapter` gives PEFT's tensors for every
//! combination type (DARE with PEFT's own masks), mixed batches give each row its adapter's
//! output in forward and in generation, and PEFT's layer status. Fixtures:
//! tools/fixtures/make_multi_adapter_fixtures.py.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_st, max_diff};
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions};
use peft::peft_model::Status;
use peft::tuners::lora::weighted::{MaskSource, WeightedOptions};
use peft::{Inputs, LoraModelExt, PeftModel, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn multi() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multi")
}

fn meta(setup: &str) -> serde_json::Value {
    peft::io::read_json(&multi().join(setup).join("meta.json")).unwrap()
}

fn expected(setup: &str) -> HashMap<String, Tensor> {
    load_st(&multi().join(setup).join("expected.safetensors"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn base(setup: &str) -> Box<dyn peft::Model> {
    let m = meta(setup);
    let dir = root().join(m["model"].as_str().unwrap());
    let task = if setup == "gpt2" {
        TaskType::CausalLm
    } else {
        TaskType::SeqCls
    };
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    models::load(&dir, &opts).unwrap()
}

/// The model with every adapter PEFT saved in `<setup>/adapters` (its layout: `default` at the
/// top, the others in subdirectories); the first is active.
fn loaded(setup: &str, trainable: bool) -> PeftModel {
    let dir = multi().join(setup).join("adapters");
    PeftModel::from_pretrained_all(base(setup), &dir, trainable).unwrap()
}

fn adapters(setup: &str) -> Vec<String> {
    meta(setup)["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn bert_inputs() -> Inputs {
    common::inputs()
}

fn gpt2_inputs(exp: &HashMap<String, Tensor>) -> Inputs {
    Inputs {
        input_ids: Some(exp["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(exp["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    }
}

fn inputs_of(setup: &str) -> Inputs {
    if setup == "gpt2" {
        gpt2_inputs(&expected(setup))
    } else {
        bert_inputs()
    }
}

/// Only real tokens carry meaning in decoder logits.
fn real(logits: &Tensor, inputs: &Inputs) -> Tensor {
    if logits.rank() < 3 {
        return logits.clone();
    }
    let mask = inputs.attention_mask.as_ref().unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    logits.broadcast_mul(&m).unwrap()
}

fn check_logits(what: &str, setup: &str, got: &Tensor, want: &Tensor) {
    let inputs = inputs_of(setup);
    assert_close(what, &real(got, &inputs), &real(want, &inputs), TOL);
}

#[test]
fn every_adapter_of_a_peft_directory_loads_with_its_logits() {
    for setup in ["bert", "bert_cls", "gpt2"] {
        let exp = expected(setup);
        let inputs = inputs_of(setup);
        let want = adapters(setup);
        let mut pm = loaded(setup, false);
        assert_eq!(pm.adapter_names(), want, "{setup}: adapters found");
        assert_eq!(pm.active_adapter(), want[0]);
        for name in &want {
            pm.set_adapter(name).unwrap();
            let got = pm.forward(&inputs, false).unwrap();
            check_logits(
                &format!("{setup}/{name}"),
                setup,
                &got,
                &exp[&format!("{name}_logits")],
            );
        }
        let disabled = pm.disable_adapter().unwrap();
        let got = disabled.forward(&inputs, false).unwrap();
        if let Some(want) = exp.get("base_logits") {
            check_logits(&format!("{setup}/disabled"), setup, &got, want);
        }
    }
}

#[test]
fn several_active_adapters_add_up_as_in_peft() {
    for setup in ["bert", "gpt2"] {
        let exp = expected(setup);
        let mut pm = loaded(setup, false);
        pm.set_adapters(&["default", "other"]).unwrap();
        assert_eq!(pm.active_adapters(), ["default", "other"]);
        let got = pm.forward(&inputs_of(setup), false).unwrap();
        check_logits(&format!("{setup}/both"), setup, &got, &exp["both_logits"]);
        // Merging both gives the same function.
        pm.merge_adapter().unwrap();
        let merged = pm.forward(&inputs_of(setup), false).unwrap();
        check_logits(
            &format!("{setup}/both merged"),
            setup,
            &merged,
            &exp["both_logits"],
        );
    }
}

/// DARE masks as PEFT drew them, by module, part and adapter.
struct FixtureMasks(HashMap<String, Tensor>);

impl MaskSource for FixtureMasks {
    fn mask(
        &mut self,
        module: &str,
        part: &str,
        adapter: &str,
        shape: &[usize],
        _density: f64,
    ) -> peft::Result<Vec<f32>> {
        let key = format!("mask/{module}/{part}/{adapter}");
        let t = self
            .0
            .get(&key)
            .unwrap_or_else(|| panic!("PEFT drew no mask {key}"));
        assert_eq!(t.dims(), shape, "{key}");
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

fn options(args: &serde_json::Value) -> WeightedOptions {
    WeightedOptions {
        combination_type: args["combination_type"].as_str().unwrap().parse().unwrap(),
        svd_rank: args
            .get("svd_rank")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize),
        svd_clamp: args.get("svd_clamp").and_then(|v| v.as_f64()),
        density: args.get("density").and_then(|v| v.as_f64()),
        majority_sign_method: args
            .get("majority_sign_method")
            .map_or(Default::default(), |v| v.as_str().unwrap().parse().unwrap()),
        seed: 0,
    }
}

/// An SVD factor pair is unique up to the sign of each rank component; align ours to PEFT's by
/// the sign of `A`'s rows before comparing. Returns the keys of the layers that needed a flip.
fn align_signs(state: &mut HashMap<String, Tensor>, want: &HashMap<String, Tensor>) -> Vec<String> {
    let mut flipped = Vec::new();
    let keys: Vec<String> = state.keys().cloned().collect();
    for a_key in keys
        .iter()
        .filter(|k| k.contains("lora_A") || k.contains("lora_embedding_A"))
    {
        let b_key = a_key
            .replace("lora_A", "lora_B")
            .replace("lora_embedding_A", "lora_embedding_B");
        let (a, wa) = (&state[a_key], &want[a_key]);
        let r = a.dim(0).unwrap();
        let dots: Vec<f32> = (a * wa).unwrap().sum(1).unwrap().to_vec1().unwrap();
        let signs: Vec<f32> = dots
            .iter()
            .map(|d| if *d < 0.0 { -1.0 } else { 1.0 })
            .collect();
        if signs.iter().any(|s| *s < 0.0) {
            flipped.push(a_key.clone());
            flipped.push(b_key.clone());
        }
        let s = Tensor::from_vec(signs, r, &Device::Cpu).unwrap();
        let a2 = a.broadcast_mul(&s.unsqueeze(1).unwrap()).unwrap();
        let b2 = state[&b_key]
            .broadcast_mul(&s.unsqueeze(0).unwrap())
            .unwrap();
        state.insert(a_key.clone(), a2);
        state.insert(b_key, b2);
    }
    flipped
}

fn weighted_cases(setup: &str) {
    let m = meta(setup);
    let weights: Vec<f64> = m["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut pm = loaded(setup, false);
    let inputs = inputs_of(setup);
    for (case, args) in m["weighted"].as_object().unwrap() {
        let file = load_st(
            &multi()
                .join(setup)
                .join("weighted")
                .join(format!("{case}.safetensors")),
        );
        let mut masks = FixtureMasks(file.clone());
        let opts = options(args);
        let name = format!("w_{case}");
        pm.add_weighted_adapter_with_masks(
            &["default", "other"],
            &weights,
            &name,
            &opts,
            &mut masks,
        )
        .unwrap_or_else(|e| panic!("{setup}/{case}: {e}"));
        let mut state: HashMap<String, Tensor> =
            pm.adapter_state_dict(&name).unwrap().into_iter().collect();
        let want: HashMap<String, Tensor> = file
            .iter()
            .filter(|(k, _)| !k.starts_with("mask/") && *k != "logits")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut got_keys: Vec<&String> = state.keys().collect();
        let mut want_keys: Vec<&String> = want.keys().collect();
        got_keys.sort();
        want_keys.sort();
        assert_eq!(got_keys, want_keys, "{setup}/{case}: keys");
        let flipped = if opts.combination_type.is_svd() {
            align_signs(&mut state, &want)
        } else {
            Vec::new()
        };
        // svd_clamp clamps at a quantile of the factors' entries, which depends on the sign
        // LAPACK happened to give each singular vector; only layers whose signs agree with
        // torch's can be compared.
        let clamped = opts.svd_clamp.is_some();
        let mut compared = 0;
        for (k, w) in &want {
            if clamped && flipped.contains(k) {
                continue;
            }
            let d = max_diff(&state[k], w);
            assert!(d <= TOL, "{setup}/{case}: {k} differs from PEFT's by {d}");
            compared += 1;
        }
        if clamped {
            // The rest differ from PEFT's only by LAPACK's choice of signs, which moves the
            // clamping quantile. Our unclamped factors (checked against PEFT in the `svd` case),
            // given PEFT's signs and clamped at torch.quantile of their entries (our quantile is
            // checked in `svd_clamp_quantile_is_torch_s`), must then be PEFT's clamped factors;
            // and ours must be the same factors, with our signs, clamped the same way.
            let q = opts.svd_clamp.unwrap();
            let plain = WeightedOptions {
                svd_clamp: None,
                ..opts.clone()
            };
            let ref_name = format!("{name}_unclamped");
            pm.add_weighted_adapter(&["default", "other"], &weights, &ref_name, &plain)
                .unwrap();
            let ours_signs: HashMap<String, Tensor> = pm
                .adapter_state_dict(&ref_name)
                .unwrap()
                .into_iter()
                .collect();
            pm.delete_adapter(&ref_name).unwrap();
            let mut peft_signs = ours_signs.clone();
            align_signs(&mut peft_signs, &want);
            // `state` was turned to PEFT's signs above; this is ours as it is.
            let ours: HashMap<String, Tensor> =
                pm.adapter_state_dict(&name).unwrap().into_iter().collect();
            let clamp_pair = |f: &HashMap<String, Tensor>, a_key: &str, b_key: &str| {
                let all: Vec<f32> = [&f[b_key], &f[a_key]]
                    .iter()
                    .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect();
                let hi = peft::tuners::lora::weighted::quantile(&all, q) as f64;
                [a_key, b_key].map(|k| (k.to_string(), f[k].clamp(-hi, hi).unwrap()))
            };
            for a_key in flipped.iter().step_by(2) {
                let b_key = a_key.replace("_A", "_B");
                for (k, w) in clamp_pair(&peft_signs, a_key, &b_key) {
                    let d = max_diff(&w, &want[&k]);
                    assert!(
                        d <= TOL,
                        "{setup}/{case}: {k} with PEFT's signs differs from PEFT's by {d}"
                    );
                    compared += 1;
                }
                for (k, w) in clamp_pair(&ours_signs, a_key, &b_key) {
                    assert_close(
                        &format!("{setup}/{case}: {k} (clamped)"),
                        &ours[&k],
                        &w,
                        1e-6,
                    );
                }
            }
        }
        assert_eq!(compared, want.len(), "{setup}/{case}: every tensor checked");
        pm.set_adapter(&name).unwrap();
        let got = pm.forward(&inputs, false).unwrap();
        if !clamped || flipped.is_empty() {
            check_logits(
                &format!("{setup}/{case} logits"),
                setup,
                &got,
                &file["logits"],
            );
        }
        pm.set_adapter("default").unwrap();
        pm.delete_adapter(&name).unwrap();
    }
}

#[test]
fn svd_clamp_quantile_is_torch_s() {
    let exp = expected("bert");
    let x: Vec<f32> = exp["quantile_x"].to_vec1().unwrap();
    let qs: Vec<f32> = exp["quantile_q"].to_vec1().unwrap();
    let want: Vec<f32> = exp["quantile_out"].to_vec1().unwrap();
    for (q, w) in qs.iter().zip(want) {
        let got = peft::tuners::lora::weighted::quantile(&x, *q as f64);
        assert!((got - w).abs() < 1e-6, "quantile {q}: {got} vs torch {w}");
    }
}

#[test]
fn weighted_adapters_match_peft_on_bert() {
    weighted_cases("bert");
}

#[test]
fn weighted_adapters_match_peft_on_gpt2() {
    weighted_cases("gpt2");
}

fn names_of(setup: &str) -> Vec<String> {
    meta(setup)["mixed_adapter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_mixed_batch_gives_each_row_its_adapters_logits() {
    for setup in ["bert", "bert_cls", "gpt2"] {
        let exp = expected(setup);
        let mut pm = loaded(setup, false);
        let inputs = inputs_of(setup);
        let names = names_of(setup);
        let got = pm.forward_mixed(&inputs, &names).unwrap();
        check_logits(
            &format!("{setup}/mixed vs PEFT"),
            setup,
            &got,
            &exp["mixed_logits"],
        );
        // Row by row, the same as running that row's adapter alone here.
        for (i, name) in names.iter().enumerate() {
            let alone = if name == "__base__" {
                let d = pm.disable_adapter().unwrap();
                d.forward(&inputs, false).unwrap()
            } else {
                pm.set_adapter(name).unwrap();
                pm.forward(&inputs, false).unwrap()
            };
            let g = real(&got, &inputs).get(i).unwrap();
            let a = real(&alone, &inputs).get(i).unwrap();
            assert_close(&format!("{setup}: row {i} ({name})"), &g, &a, 1e-5);
        }
    }
}

#[test]
fn mixed_batch_generation_matches_peft() {
    let setup = "gpt2";
    let exp = expected(setup);
    let pm = loaded(setup, false);
    let names = names_of(setup);
    let ids: Vec<Vec<u32>> = exp["input_ids_left"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mask: Vec<Vec<u32>> = exp["attention_mask_left"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, m)| **m == 1)
                .map(|(t, _)| *t)
                .collect()
        })
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        pad_token_id: Some(0),
        ..Default::default()
    };
    let mixed = pm.with_adapter_names(&names).unwrap();
    let out = generate(&mixed, &prompts, &cfg, None).unwrap();
    let want: Vec<Vec<u32>> = exp["mixed_generated"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, row) in out.tokens.iter().enumerate() {
        assert_eq!(row[..], want[i][..row.len()], "row {i} ({})", names[i]);
        assert!(
            want[i][row.len()..].iter().all(|t| *t == 0),
            "row {i} ended early"
        );
    }
    assert!(
        out.tokens.windows(2).any(|w| w[0] != w[1]),
        "adapters should lead the rows apart"
    );
}

#[test]
fn mixed_batches_refuse_what_peft_refuses() {
    let mut pm = loaded("bert", false);
    let inputs = bert_inputs();
    let err = pm
        .forward_mixed(&inputs, &["default".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("length of adapter_names"), "{err}");
    let names = vec!["default".to_string(), "nope".into(), "__base__".into()];
    let err = pm.forward_mixed(&inputs, &names).unwrap_err().to_string();
    assert!(err.contains("non-existing adapter(s): nope"), "{err}");
    pm.merge_adapter().unwrap();
    let err = pm
        .forward_mixed(&inputs, &names_of("bert"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("merged adapters"), "{err}");
    pm.unmerge_adapter().unwrap();
    assert!(pm.forward_mixed(&inputs, &names_of("bert")).is_ok());
}

#[test]
fn weighted_and_multi_active_errors_are_peft_s() {
    let mut pm = loaded("bert_cls", false);
    // Both own a classifier copy (modules_to_save).
    let err = pm.set_adapters(&["a", "b"]).unwrap_err().to_string();
    assert!(err.contains("modules_to_save"), "{err}");
    let err = pm
        .add_weighted_adapter(&["a", "b"], &[1.0, 1.0], "ab", &WeightedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("modules_to_save"), "{err}");
    let mut pm = loaded("bert", false);
    let err = pm
        .add_weighted_adapter(
            &["default", "nope"],
            &[1.0, 1.0],
            "x",
            &WeightedOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("`nope` does not exist"), "{err}");
    let ties = WeightedOptions {
        combination_type: "ties".parse().unwrap(),
        ..Default::default()
    };
    let err = pm
        .add_weighted_adapter(&["default", "other"], &[1.0, 1.0], "x", &ties)
        .unwrap_err()
        .to_string();
    assert!(err.contains("density"), "{err}");
    assert_eq!(
        pm.adapter_names(),
        ["default", "other"],
        "a failed combination leaves nothing"
    );
    let err = "blend"
        .parse::<peft::tuners::lora::weighted::CombinationType>()
        .unwrap_err();
    assert!(err.to_string().contains("dare_ties_svd"), "{err}");
}

#[test]
fn several_adapters_round_trip_through_peft_s_layout() {
    let pm = loaded("bert", false);
    let exp = expected("bert");
    let dir = tempfile::tempdir().unwrap();
    pm.save_pretrained(dir.path()).unwrap();
    assert!(dir.path().join("adapter_config.json").exists());
    assert!(dir.path().join("other/adapter_model.safetensors").exists());
    let mut again =
        PeftModel::from_pretrained(base("bert"), dir.path(), Default::default()).unwrap();
    again
        .load_adapter(&dir.path().join("other"), "other", false)
        .unwrap();
    again.set_adapter("other").unwrap();
    let got = again.forward(&bert_inputs(), false).unwrap();
    check_logits(
        "bert/other after round trip",
        "bert",
        &got,
        &exp["other_logits"],
    );
    // selected_adapters: only `other`, still under its own name.
    let sel = tempfile::tempdir().unwrap();
    pm.save_pretrained_selected(sel.path(), Some(&["other"]))
        .unwrap();
    assert!(!sel.path().join("adapter_config.json").exists());
    assert!(sel.path().join("other/adapter_config.json").exists());
    assert!(pm
        .save_pretrained_selected(sel.path(), Some(&["nope"]))
        .is_err());
}

#[test]
fn layer_status_matches_peft() {
    for setup in ["bert", "bert_cls"] {
        let m = meta(setup);
        // PEFT's fixture model came from get_peft_model: trainable, first adapter active.
        let want_names = adapters(setup);
        let mut pm = loaded(setup, true);
        let got = pm.layer_status().unwrap();
        let want = m["layer_status"].as_array().unwrap();
        let got_names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        let want_list: Vec<&str> = want.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(got_names, want_list, "{setup}: layers");
        for (g, w) in got.iter().zip(want) {
            let strs = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect()
            };
            assert_eq!(
                g.module_type,
                w["module_type"].as_str().unwrap(),
                "{}",
                g.name
            );
            assert_eq!(g.enabled, w["enabled"].as_bool().unwrap(), "{}", g.name);
            assert_eq!(g.active_adapters, strs(&w["active_adapters"]), "{}", g.name);
            assert_eq!(g.merged_adapters, strs(&w["merged_adapters"]), "{}", g.name);
            assert_eq!(
                g.available_adapters,
                strs(&w["available_adapters"]),
                "{}",
                g.name
            );
            for (k, v) in w["requires_grad"].as_object().unwrap() {
                let want = if v.as_bool().unwrap() {
                    Status::Yes
                } else {
                    Status::No
                };
                assert_eq!(g.requires_grad.get(k), Some(&want), "{} {k}", g.name);
            }
        }
        let status = pm.model_status().unwrap();
        assert_eq!(status.num_adapter_layers, want.len());
        assert_eq!(status.active_adapters.as_deref(), Some(&want_names[..1]));
        assert_eq!(status.enabled, Status::Yes);
        pm.merge_adapter().unwrap();
        let merged = pm.layer_status().unwrap();
        assert!(merged
            .iter()
            .filter(|s| s.available_adapters.contains(&want_names[0])
                && s.module_type.starts_with("lora"))
            .all(|s| s.merged_adapters == want_names[..1]));
    }
}
