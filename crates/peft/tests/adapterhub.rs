//! Bottleneck adapters, AdapterFusion, AdapterDrop and prediction heads against AdapterHub's
//! `adapters` 1.3.0 (fixtures: tools/fixtures/make_adapterhub_fixtures.py): the adapters it saved
//! load as they are (pickles and safetensors) and give its outputs, gradients of one step
//! included, on BERT, RoBERTa, GPT-2, Llama and T5; what we save in its layout reads back the
//! same; bad input is refused clearly.

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions, Model};
use peft::{
    AdapterHubExt, BottleneckConfig, FromPretrained, FusionConfig, Inputs, PeftConfig, PeftModel,
    TaskType,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;
const ARCHS: &[&str] = &["bert", "roberta", "gpt2", "llama", "t5"];
const CASES: &[&str] = &[
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "scaled_par_bn",
    "pfeiffer",
    "houlsby",
    "parallel",
    "custom",
    "channel",
    "seq_bn_safe",
];
/// Cases with AdapterDrop and gradient expectations.
const FULL: &[&str] = &["seq_bn", "double_seq_bn", "par_bn", "custom", "channel"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapterhub")
}

fn task(arch: &str) -> TaskType {
    match arch {
        "bert" | "roberta" => TaskType::FeatureExtraction,
        "t5" => TaskType::Seq2SeqLm,
        _ => TaskType::CausalLm,
    }
}

fn base(arch: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(arch)),
        ..Default::default()
    };
    models::load(&fixtures().join("models").join(arch), &opts).unwrap()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn inputs(arch: &str) -> Inputs {
    let all = read(&fixtures().join("inputs.safetensors"));
    let ids = all["input_ids"].to_dtype(DType::U32).unwrap();
    let mut x = Inputs::new(ids);
    if arch == "t5" {
        x.decoder_input_ids = Some(all["decoder_input_ids"].to_dtype(DType::U32).unwrap());
    }
    x
}

fn weights(arch: &str) -> Tensor {
    read(&fixtures().join("inputs.safetensors"))[&format!("weights_{arch}")].clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `‖a − b‖ / max(‖b‖, 1)`: gradients summed over a whole batch and vocabulary are large,
/// and float rounding grows with them.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    norm(&(a - b).unwrap()) / norm(b).max(1.0)
}

fn norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

/// Gradient tolerance, relative to the gradient's norm.
const GRAD_TOL: f32 = 1e-4;

fn opts(name: &str, trainable: bool) -> FromPretrained {
    FromPretrained {
        adapter_name: name.into(),
        is_trainable: trainable,
    }
}

/// `base_model.model.<point>.<suffix>` → AdapterHub's `<point>.<marker>.<name>.<suffix>`.
fn hub_key(model: &dyn Model, key: &str, marker: &str, name: &str) -> String {
    let path = key.strip_prefix("base_model.model.").unwrap();
    let point = model
        .modules()
        .into_iter()
        .filter_map(|m| match m {
            peft::layers::ModuleRef::Hook(h) => Some(h.name.clone()),
            _ => None,
        })
        .filter(|p| path.starts_with(&format!("{p}.")))
        .max_by_key(|p| p.len())
        .unwrap_or_else(|| panic!("{key} is at no hook point"));
    format!("{point}.{marker}.{name}.{}", &path[point.len() + 1..])
}

#[test]
fn every_preset_and_custom_config_gives_adapterhubs_outputs() {
    for arch in ARCHS {
        let want = read(&fixtures().join(arch).join("expected.safetensors"));
        let x = inputs(arch);
        for case in CASES {
            let dir = fixtures().join(arch).join(case);
            let mut m = PeftModel::from_pretrained(base(arch), &dir, opts(case, false))
                .unwrap_or_else(|e| panic!("{arch}/{case}: {e}"));
            let out = m.forward(&x, false).unwrap();
            let d = max_diff(&out, &want[*case]);
            assert!(d < TOL, "{arch}/{case}: max diff {d}");
            if FULL.contains(case) {
                m.set_skip_layers(Some(&[0, 1])).unwrap();
                assert_eq!(m.skip_layers(), [0, 1]);
                let out = m.forward(&x, false).unwrap();
                let d = max_diff(&out, &want[&format!("skip_{case}")]);
                assert!(d < TOL, "{arch}/skip_{case}: max diff {d}");
                m.set_skip_layers(None).unwrap();
                let d = max_diff(&m.forward(&x, false).unwrap(), &want[*case]);
                assert!(d < TOL, "{arch}/{case} after skipping: {d}");
            }
        }
    }
}

#[test]
fn gradients_of_one_step_match_adapterhub() {
    for arch in ARCHS {
        let want = read(&fixtures().join(arch).join("expected.safetensors"));
        let x = inputs(arch);
        let w = weights(arch);
        for case in FULL {
            let dir = fixtures().join(arch).join(case);
            let m = PeftModel::from_pretrained(base(arch), &dir, opts(case, true)).unwrap();
            let out = m.forward(&x, true).unwrap();
            let loss = (out * &w).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let params = m.trainable_parameters();
            let expected: Vec<&String> = want
                .keys()
                .filter(|k| k.starts_with(&format!("{case}.grad.")))
                .collect();
            assert_eq!(
                params.len(),
                expected.len(),
                "{arch}/{case}: parameter count"
            );
            for (k, v) in &params {
                let hk = hub_key(m.base_model(), k, "adapters", case);
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no grad {k}"));
                let e = &want[&format!("{case}.grad.{hk}")];
                let g = g.reshape(e.dims()).unwrap();
                let d = max_diff(&g, e);
                let rel = rel_err(&g, e);
                assert!(
                    rel < GRAD_TOL,
                    "{arch}/{case} {hk}: gradient off by {rel} (max diff {d})"
                );
            }
        }
    }
}

#[test]
fn active_adapters_stack_as_adapterhubs_stack() {
    for arch in ARCHS {
        let want = read(&fixtures().join(arch).join("expected.safetensors"));
        let mut m = PeftModel::from_pretrained(
            base(arch),
            &fixtures().join(arch).join("seq_bn"),
            opts("seq_bn", false),
        )
        .unwrap();
        m.load_adapter(
            &fixtures().join(arch).join("double_seq_bn"),
            "double_seq_bn",
            false,
        )
        .unwrap();
        m.set_adapters(&["seq_bn", "double_seq_bn"]).unwrap();
        let d = max_diff(&m.forward(&inputs(arch), false).unwrap(), &want["stack"]);
        assert!(d < TOL, "{arch}: stack diff {d}");
    }
}

fn fusion_model(arch: &str, kind: &str, trainable: bool) -> PeftModel {
    let dir = fixtures().join(arch).join(format!("fusion_{kind}"));
    let mut m = PeftModel::from_pretrained(base(arch), &dir.join("a"), opts("a", false)).unwrap();
    m.load_adapter(&dir.join("b"), "b", false).unwrap();
    m.load_adapter(&dir, "fusion", trainable).unwrap();
    m.set_adapter("fusion").unwrap();
    m
}

#[test]
fn fusion_dynamic_and_static_match_with_the_regularised_training_loss() {
    for arch in ARCHS {
        let want = read(&fixtures().join(arch).join("expected.safetensors"));
        let x = inputs(arch);
        for kind in ["dynamic", "static"] {
            let name = format!("fusion_{kind}");
            let m = fusion_model(arch, kind, false);
            let d = max_diff(&m.forward(&x, false).unwrap(), &want[&name]);
            assert!(d < TOL, "{arch}/{name}: {d}");
            // Train mode: only the fusion trains; the loss is the task loss plus the
            // regularisation AdapterHub's trainer adds.
            let m = fusion_model(arch, kind, true);
            let out = m.forward(&x, true).unwrap();
            let task_loss = (out * weights(arch)).unwrap().sum_all().unwrap();
            let reg = m.regularization_loss().unwrap();
            let want_reg = want[&format!("{name}.reg")].to_vec1::<f32>().unwrap()[0];
            match &reg {
                Some(r) => {
                    let r = r.to_scalar::<f32>().unwrap();
                    assert!(
                        (r - want_reg).abs() < TOL * want_reg.abs().max(1.0),
                        "{arch}/{name} reg {r} vs {want_reg}"
                    );
                }
                None => assert_eq!(want_reg, 0.0, "{arch}/{name}: no regularisation"),
            }
            let loss = match reg {
                Some(r) => (task_loss + r).unwrap(),
                None => task_loss,
            };
            let want_loss = want[&format!("{name}.loss")].to_vec1::<f32>().unwrap()[0];
            let l = loss.to_scalar::<f32>().unwrap();
            assert!(
                (l - want_loss).abs() < 1e-3 * want_loss.abs().max(1.0),
                "{arch}/{name} loss {l} vs {want_loss}"
            );
            let grads = loss.backward().unwrap();
            let params = m.trainable_parameters();
            let n_expected = want
                .keys()
                .filter(|k| k.starts_with(&format!("{name}.grad.")))
                .count();
            // The key biases' gradients are zero in exact arithmetic (a softmax ignores a shift
            // common to all scores), so both sides hold rounding noise there: errors are measured
            // against the norm of the whole step's gradient.
            let step_norm = want
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{name}.grad.")))
                .map(|(_, t)| {
                    t.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .sum::<f32>()
                .sqrt()
                .max(1.0);
            assert_eq!(
                params.len(),
                n_expected,
                "{arch}/{name}: only the fusion trains"
            );
            for (k, v) in &params {
                let hk = hub_key(m.base_model(), k, "adapter_fusion_layer", "a,b");
                let e = &want[&format!("{name}.grad.{hk}")];
                let g = grads.get(v.as_tensor()).unwrap();
                let scale = e
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1.0);
                let d = max_diff(g, e);
                let rel = norm(&(g - e).unwrap()) / step_norm;
                assert!(rel < GRAD_TOL, "{arch}/{name} {hk}: gradient off by {rel} of the step (max diff {d}, scale {scale})");
            }
        }
    }
}

#[test]
fn heads_saved_with_adapters_and_fusions_give_adapterhubs_logits() {
    let want = read(&fixtures().join("heads/expected.safetensors"));
    let x = inputs("bert");
    for (case, arch) in [
        ("bert_cls", "bert"),
        ("bert_tag", "bert"),
        ("roberta_cls", "roberta"),
    ] {
        let dir = fixtures().join("heads").join(case);
        let mut opts_ = LoadOptions::default();
        peft::peft_model::base_task(&dir, &mut opts_).unwrap();
        assert_eq!(opts_.task, Some(TaskType::FeatureExtraction));
        let m = peft::load_with_adapter(
            &fixtures().join("models").join(arch),
            &dir,
            LoadOptions::default(),
        )
        .unwrap();
        let out = m.forward(&x, false).unwrap();
        let d = max_diff(&out, &want[case]);
        assert!(d < TOL, "{case}: {d}");
        let config = m.peft_config("default").unwrap();
        let want_task = if case == "bert_tag" {
            TaskType::TokenCls
        } else {
            TaskType::SeqCls
        };
        assert_eq!(config.task_type(), Some(want_task));
    }
    let dir = fixtures().join("heads/bert_fusion");
    let mut m = PeftModel::from_pretrained(base("bert"), &dir.join("a"), opts("a", false)).unwrap();
    m.load_adapter(&dir.join("b"), "b", false).unwrap();
    m.load_adapter(&dir, "fusion", false).unwrap();
    m.set_adapter("fusion").unwrap();
    let d = max_diff(&m.forward(&x, false).unwrap(), &want["bert_fusion"]);
    assert!(d < TOL, "bert_fusion: {d}");
}

#[test]
fn what_we_save_in_either_layout_reads_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["bert", "t5"] {
        let x = inputs(arch);
        for case in ["custom", "channel", "par_bn"] {
            let m = PeftModel::from_pretrained(
                base(arch),
                &fixtures().join(arch).join(case),
                opts(case, false),
            )
            .unwrap();
            let want = m.forward(&x, false).unwrap();
            // AdapterHub's layout.
            let hub = tmp.path().join(format!("{arch}_{case}_hub"));
            m.save_adapterhub(case, &hub).unwrap();
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(hub.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            for k in [
                "config",
                "hidden_size",
                "model_class",
                "model_name",
                "model_type",
                "name",
                "version",
            ] {
                assert!(config.get(k).is_some(), "{k} missing");
            }
            assert_eq!(config["version"], "adapters.1.3.0");
            assert!(hub.join("adapter.safetensors").exists());
            let back = PeftModel::from_pretrained(base(arch), &hub, opts("x", false)).unwrap();
            assert!(
                max_diff(&back.forward(&x, false).unwrap(), &want) < 1e-6,
                "{arch}/{case} hub"
            );
            // PEFT's layout, peft_type BOTTLENECK.
            let own = tmp.path().join(format!("{arch}_{case}_peft"));
            let mut m = m;
            m.set_adapter(case).unwrap();
            m.save_pretrained_selected(&own, Some(&[case])).unwrap();
            let saved: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(own.join(case).join("adapter_config.json"))
                    .or_else(|_| std::fs::read_to_string(own.join("adapter_config.json")))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(saved["peft_type"], "BOTTLENECK");
            let back = PeftModel::from_pretrained_all(base(arch), &own, false).unwrap();
            assert!(
                max_diff(&back.forward(&x, false).unwrap(), &want) < 1e-6,
                "{arch}/{case} peft"
            );
        }
    }
    // A fusion with its head, both ways.
    let dir = fixtures().join("heads/bert_fusion");
    let mut m = PeftModel::from_pretrained(base("bert"), &dir.join("a"), opts("a", false)).unwrap();
    m.load_adapter(&dir.join("b"), "b", false).unwrap();
    m.load_adapter(&dir, "fusion", false).unwrap();
    m.set_adapter("fusion").unwrap();
    let want = m.forward(&inputs("bert"), false).unwrap();
    let out = tmp.path().join("fusion_hub");
    m.save_adapterhub("fusion", &out).unwrap();
    assert!(out.join("adapter_fusion_config.json").exists());
    assert!(out.join("model_adapter_fusion.safetensors").exists());
    assert!(out.join("head_config.json").exists());
    let mut m = PeftModel::from_pretrained(base("bert"), &dir.join("a"), opts("a", false)).unwrap();
    m.load_adapter(&dir.join("b"), "b", false).unwrap();
    m.load_adapter(&out, "f2", false).unwrap();
    m.set_adapter("f2").unwrap();
    assert!(max_diff(&m.forward(&inputs("bert"), false).unwrap(), &want) < 1e-6);
}

#[test]
fn configs_read_adapterhubs_names_and_refuse_what_is_not_implemented() {
    let parse = |v: serde_json::Value| PeftConfig::from_user_json(&v);
    // Presets and old names.
    for (preset, mh, par) in [
        ("seq_bn", false, false),
        ("pfeiffer", false, false),
        ("double_seq_bn", true, false),
        ("houlsby", true, false),
        ("par_bn", false, true),
        ("parallel", false, true),
        ("scaled_par_bn", false, true),
    ] {
        let c = parse(serde_json::json!({"peft_type": "BOTTLENECK", "config": preset})).unwrap();
        let c = c.downcast_ref::<BottleneckConfig>().unwrap();
        assert_eq!((c.mh_adapter, c.is_parallel), (mh, par), "{preset}");
    }
    let c = parse(
        serde_json::json!({"peft_type": "BOTTLENECK", "config": "seq_bn", "reduction_factor": 8}),
    )
    .unwrap();
    assert_eq!(
        c.downcast_ref::<BottleneckConfig>()
            .unwrap()
            .reduction_factor,
        peft::tuners::bottleneck::ReductionFactor::All(8.0)
    );
    let err = |v: serde_json::Value| parse(v).unwrap_err().to_string();
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "config": "seq_bm"}));
    assert!(
        e.contains("unknown AdapterHub config `seq_bm`") && e.contains("seq_bn"),
        "{e}"
    );
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "config": "compacter"}));
    assert!(e.contains("phm_layer"), "{e}");
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "reduction_factr": 8}));
    assert!(
        e.contains("`reduction_factr`") && e.contains("reduction_factor"),
        "{e}"
    );
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "phm_layer": true}));
    assert!(e.contains("phm_layer"), "{e}");
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "inv_adapter": "nice"}));
    assert!(e.contains("inv_adapter"), "{e}");
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "stochastic_depth": 0.1}));
    assert!(e.contains("stochastic_depth"), "{e}");
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "non_linearity": "softsign"}));
    assert!(e.contains("softsign"), "{e}");
    let e = err(serde_json::json!({"peft_type": "BOTTLENECK", "reduction_factor": {"x": 8}}));
    assert!(e.contains("`x`"), "{e}");
    let e = err(serde_json::json!({"peft_type": "ADAPTER_FUSION", "config": "dinamic"}));
    assert!(e.contains("dynamic, static"), "{e}");
    let e = err(
        serde_json::json!({"peft_type": "ADAPTER_FUSION", "adapter_names": ["a", "b"], "temprature": true}),
    );
    assert!(
        e.contains("`temprature`") && e.contains("temperature"),
        "{e}"
    );
    let f = parse(serde_json::json!({"peft_type": "ADAPTER_FUSION", "config": "static", "adapter_names": ["a", "b"]}))
        .unwrap();
    assert!(!f.downcast_ref::<FusionConfig>().unwrap().value);
}

#[test]
fn bad_models_layers_and_fusions_are_refused_clearly() {
    // A reduction-factor map without the layer or a default fails when attached.
    let config = PeftConfig::from_user_json(&serde_json::json!({
        "peft_type": "BOTTLENECK", "reduction_factor": {"1": 8}
    }))
    .unwrap();
    let e = peft::get_peft_model(base("bert"), config, "x")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no factor for layer 0") && e.contains("default"),
        "{e}"
    );
    // leave_out and skip lists outside the model.
    let config = PeftConfig::from_user_json(
        &serde_json::json!({"peft_type": "BOTTLENECK", "leave_out": [9]}),
    )
    .unwrap();
    let e = peft::get_peft_model(base("bert"), config, "x")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("leave_out names layer 9") && e.contains("0..4"),
        "{e}"
    );
    let mut m = PeftModel::from_pretrained(
        base("bert"),
        &fixtures().join("bert/seq_bn"),
        opts("a", false),
    )
    .unwrap();
    let e = m.set_skip_layers(Some(&[1, 4])).unwrap_err().to_string();
    assert!(e.contains("skip layer 4") && e.contains("0..4"), "{e}");
    // T5 counts decoder blocks after the encoder's: 6 layers.
    let mut t5 =
        PeftModel::from_pretrained(base("t5"), &fixtures().join("t5/seq_bn"), opts("a", false))
            .unwrap();
    t5.set_skip_layers(Some(&[5])).unwrap();
    assert!(t5.set_skip_layers(Some(&[6])).is_err());
    // "post_add" needs the block's LayerNorm.
    let config = PeftConfig::from_user_json(&serde_json::json!({
        "peft_type": "BOTTLENECK", "residual_before_ln": "post_add"
    }))
    .unwrap();
    let m = peft::get_peft_model(base("gpt2"), config, "x").unwrap();
    let e = m.forward(&inputs("gpt2"), false).unwrap_err().to_string();
    assert!(e.contains("post_add") && e.contains("pre-norm"), "{e}");
    // An adapter, and a fusion, saved for another hidden size.
    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("bert/seq_bn/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["hidden_size"] = 64.into();
    std::fs::write(wrong.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("bert/seq_bn/pytorch_adapter.bin"),
        wrong.join("pytorch_adapter.bin"),
    )
    .unwrap();
    let e = PeftModel::from_pretrained(base("bert"), &wrong, opts("a", false))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hidden size 64") && e.contains("32"), "{e}");
    let src = fixtures().join("bert/fusion_dynamic");
    let wrong_fusion = tmp.path().join("wrong_fusion");
    std::fs::create_dir_all(&wrong_fusion).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("adapter_fusion_config.json")).unwrap(),
    )
    .unwrap();
    cfg["hidden_size"] = 64.into();
    std::fs::write(
        wrong_fusion.join("adapter_fusion_config.json"),
        cfg.to_string(),
    )
    .unwrap();
    std::fs::copy(
        src.join("pytorch_model_adapter_fusion.bin"),
        wrong_fusion.join("pytorch_model_adapter_fusion.bin"),
    )
    .unwrap();
    let mut m = PeftModel::from_pretrained(base("bert"), &src.join("a"), opts("a", false)).unwrap();
    m.load_adapter(&src.join("b"), "b", false).unwrap();
    let e = m
        .load_adapter(&wrong_fusion, "f", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden size 64"), "{e}");
    // A fusion over an adapter that is not there, and over a non-bottleneck adapter.
    let fusion = FusionConfig {
        adapter_names: vec!["a".into(), "zzz".into()],
        ..FusionConfig::preset("dynamic").unwrap()
    };
    let mut m = PeftModel::from_pretrained(
        base("bert"),
        &fixtures().join("bert/seq_bn"),
        opts("a", false),
    )
    .unwrap();
    let e = m.add_adapter("f", fusion).unwrap_err().to_string();
    assert!(e.contains("`zzz` is not on the model"), "{e}");
    // Fused adapters must sit at the same kinds of point (AdapterHub's common_config_value).
    m.load_adapter(&fixtures().join("bert/double_seq_bn"), "h", false)
        .unwrap();
    let fusion = FusionConfig {
        adapter_names: vec!["a".into(), "h".into()],
        ..FusionConfig::preset("dynamic").unwrap()
    };
    let e = m.add_adapter("f", fusion).unwrap_err().to_string();
    assert!(e.contains("`mh_adapter`") && e.contains("`a`"), "{e}");
}
