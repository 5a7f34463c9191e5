//! DoRA, PiSSA, OLoRA and AdaLoRA on small random BERT, GPT-2, Llama and T5 models against
//! fixtures from transformers + PEFT 0.21 (tools/fixtures/make_lora_family_fixtures.py): adapters
//! trained by PEFT load here with PEFT's logits, merge and unload like PEFT's, PiSSA / OLoRA move
//! the same part of the base weight and convert back to a plain LoRA, and AdaLoRA's rank
//! allocator prunes the same triplets as PEFT's given the same parameters and gradients.
//!
//! `PEFT_EXPORT_DIR=/some/dir` keeps the adapters trained here for tools/fixtures/check_adapter.py.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, load_st, max_diff};
use peft::models::{self, LoadOptions};
use peft::tuners::adalora::AdaLoraConfig;
use peft::tuners::lora::{InitLoraWeights, LoraConfig};
use peft::{get_peft_model, Inputs, LoraModelExt, Model, PeftModel, TaskType};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    root().join("lora_family").join(case)
}

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("lora_family"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn meta(case: &str) -> Value {
    peft::io::read_json(&case_dir(case).join("meta.json")).unwrap()
}

fn model_key(case: &str) -> String {
    meta(case)["model"].as_str().unwrap().to_string()
}

fn model_dir(m: &str) -> PathBuf {
    root().join(match m {
        "bert" => "bert/models/seq_cls",
        "gpt2" => "decoder/models/gpt2",
        "llama" => "decoder/models/llama_gqa",
        "t5" => "t5/t5_v1_0/model",
        other => panic!("unknown model {other}"),
    })
}

fn task(m: &str) -> TaskType {
    match m {
        "bert" => TaskType::SeqCls,
        "t5" => TaskType::Seq2SeqLm,
        _ => TaskType::CausalLm,
    }
}

fn load_model(m: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(m)),
        ..Default::default()
    };
    models::load(&model_dir(m), &opts).unwrap()
}

fn raw_inputs(m: &str) -> HashMap<String, Tensor> {
    let f = match m {
        "bert" => "bert/inputs.safetensors",
        "t5" => "t5/inputs.safetensors",
        _ => "decoder/inputs.safetensors",
    };
    load_st(&root().join(f))
}

fn inputs(m: &str) -> Inputs {
    let t = raw_inputs(m);
    let u = |k: &str| Some(t[k].to_dtype(DType::U32).unwrap());
    match m {
        "bert" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            token_type_ids: u("token_type_ids"),
            ..Default::default()
        },
        "t5" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            decoder_input_ids: u("decoder_input_ids"),
            ..Default::default()
        },
        _ => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            ..Default::default()
        },
    }
}

/// Logits with a decoder's padded positions zeroed (what transformers puts there is meaningless).
fn comparable(m: &str, logits: &Tensor) -> Tensor {
    if task(m) != TaskType::CausalLm {
        return logits.clone();
    }
    let mask = raw_inputs(m)["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    logits.broadcast_mul(&mask).unwrap()
}

fn check(what: &str, m: &str, got: &Tensor, want: &Tensor) {
    assert_close(what, &comparable(m, got), &comparable(m, want), TOL);
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    load_st(&case_dir(case).join("expected.safetensors"))
}

fn run(model: &PeftModel, m: &str) -> Tensor {
    peft::no_grad(|| model.forward(&inputs(m), false)).unwrap()
}

#[test]
fn peft_adapters_load_with_peft_logits_and_merge_like_peft() {
    for case in cases() {
        let m = model_key(&case);
        let want = expected(&case);
        let model = PeftModel::from_pretrained(
            load_model(&m),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        check(
            &format!("{case}: adapter"),
            &m,
            &run(&model, &m),
            &want["lora_logits"],
        );
        let mut model = model;
        model.merge_adapter().unwrap();
        check(
            &format!("{case}: merged"),
            &m,
            &run(&model, &m),
            &want["merged_logits"],
        );
        model.unmerge_adapter().unwrap();
        check(
            &format!("{case}: unmerged"),
            &m,
            &run(&model, &m),
            &want["lora_logits"],
        );
        let merged = model.merge_and_unload().unwrap();
        let got = peft::no_grad(|| merged.forward(&inputs(&m), false)).unwrap();
        check(
            &format!("{case}: merge_and_unload"),
            &m,
            &got,
            &want["merged_logits"],
        );
        // Methods that leave the base alone give it back on unload; PiSSA / OLoRA leave the
        // residual weights behind, as in PEFT.
        let mutates = case.contains("pissa") || case.contains("olora");
        let model = PeftModel::from_pretrained(
            load_model(&m),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let base = model.unload().unwrap();
        let got = peft::no_grad(|| base.forward(&inputs(&m), false)).unwrap();
        let d = max_diff(&comparable(&m, &got), &comparable(&m, &want["base_logits"]));
        assert_eq!(
            d <= TOL,
            !mutates,
            "{case}: unload gave base logits within {d}"
        );
    }
}

#[test]
fn saved_adapters_have_peft_keys_and_shapes() {
    for case in cases() {
        let m = model_key(&case);
        let model = PeftModel::from_pretrained(
            load_model(&m),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let ours: HashMap<String, Vec<usize>> = model
            .adapter_state_dict("default")
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        let theirs: HashMap<String, Vec<usize>> = meta(&case)["adapter_keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let s = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize);
                (k.clone(), s.collect())
            })
            .collect();
        assert_eq!(ours, theirs, "{case}");
        // The config round-trips with every field PEFT wrote.
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(dir.path()).unwrap();
        let mine = peft::io::read_json(&dir.path().join("adapter_config.json")).unwrap();
        let peft_cfg =
            peft::io::read_json(&case_dir(&case).join("adapter/adapter_config.json")).unwrap();
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&mine), keys(&peft_cfg), "{case}: config fields");
        for f in [
            "peft_type",
            "rank_pattern",
            "use_dora",
            "init_lora_weights",
            "target_modules",
        ] {
            assert_eq!(mine[f], peft_cfg[f], "{case}: {f}");
        }
        let reloaded =
            PeftModel::from_pretrained(load_model(&m), dir.path(), Default::default()).unwrap();
        check(
            &format!("{case}: re-saved"),
            &m,
            &run(&reloaded, &m),
            &expected(&case)["lora_logits"],
        );
    }
}

fn lora_config(case: &str) -> LoraConfig {
    let c = &meta(case)["config"];
    let mut v = c.clone();
    v["task_type"] = Value::String(meta(case)["task_type"].as_str().unwrap().into());
    LoraConfig::from_json(&v, true).unwrap()
}

/// (module, [out, in]) weights of the `init.safetensors` residuals, in the layer's own layout.
#[test]
fn pissa_and_olora_move_the_same_part_of_the_weight_as_peft() {
    for case in cases()
        .into_iter()
        .filter(|c| c.contains("pissa") || c.contains("olora"))
    {
        let m = model_key(&case);
        let residual = load_st(&case_dir(&case).join("init.safetensors"));
        let model = get_peft_model(load_model(&m), lora_config(&case), "default").unwrap();
        let mut seen = 0;
        for module in model.base_model().modules() {
            for p in module.params() {
                if let Some(want) = residual.get(&p.name) {
                    let d = max_diff(p.base(), want);
                    assert!(d < 2e-5, "{case}: residual of {} differs by {d}", p.name);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, residual.len(), "{case}");
        // The initial factors: B A is unique even where the signs of singular vectors are not.
        let init = load_st(&case_dir(&case).join("initial/adapter_model.safetensors"));
        let ours: HashMap<String, Tensor> = model
            .adapter_state_dict("default")
            .unwrap()
            .into_iter()
            .collect();
        for (k, a) in &init {
            let Some(prefix) = k.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let kb = format!("{prefix}.lora_B.weight");
            let want = init[&kb].matmul(a).unwrap();
            let got = ours[&kb].matmul(&ours[k]).unwrap();
            assert!(max_diff(&got, &want) < 2e-5, "{case}: B A of {prefix}");
            // Each factor equals PEFT's up to the sign of a whole rank component.
            let (a_ours, a_peft) = (ours[k].abs().unwrap(), a.abs().unwrap());
            assert!(max_diff(&a_ours, &a_peft) < 2e-5, "{case}: |A| of {prefix}");
        }
        // With the initial factors the model computes exactly the base model.
        let got = run(&model, &m);
        check(
            &format!("{case}: init"),
            &m,
            &got,
            &expected(&case)["base_logits"],
        );
    }
}

#[test]
fn pissa_and_olora_convert_to_plain_lora_like_peft() {
    for case in cases()
        .into_iter()
        .filter(|c| c.contains("pissa") || c.contains("olora"))
    {
        let m = model_key(&case);
        let dir = tempfile::tempdir().unwrap();
        let initial = dir.path().join("initial");
        std::fs::create_dir_all(&initial).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(case_dir(&case).join("initial").join(f), initial.join(f)).unwrap();
        }
        let model = PeftModel::from_pretrained(
            load_model(&m),
            &case_dir(&case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let out = dir.path().join("converted");
        model.save_pretrained_converted(&out, &initial).unwrap();
        let ours = load_st(&out.join("adapter_model.safetensors"));
        let theirs = load_st(&case_dir(&case).join("converted/adapter_model.safetensors"));
        for (k, t) in &theirs {
            assert_close(&format!("{case}: converted {k}"), &ours[k], t, 1e-6);
        }
        let cfg = peft::io::read_json(&out.join("adapter_config.json")).unwrap();
        let peft_cfg =
            peft::io::read_json(&case_dir(&case).join("converted/adapter_config.json")).unwrap();
        for f in ["r", "lora_alpha", "init_lora_weights"] {
            assert_eq!(cfg[f], peft_cfg[f], "{case}: converted {f}");
        }
        // On the untouched base model the converted adapter is the trained one.
        let conv = PeftModel::from_pretrained(load_model(&m), &out, Default::default()).unwrap();
        let want = expected(&case);
        check(
            &format!("{case}: converted"),
            &m,
            &run(&conv, &m),
            &want["lora_logits"],
        );
        if let Some(c) = want.get("converted_logits") {
            check(&format!("{case}: converted (PEFT)"), &m, &run(&conv, &m), c);
        }
    }
}

#[test]
fn pissa_niter_keeps_the_weight_and_the_rank() {
    let mut base_w = None;
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(peft::tuners::targets::ModuleSpec::List(
            vec!["query".into()],
        )),
        init_lora_weights: InitLoraWeights::Method("pissa_niter_8".into()),
        ..Default::default()
    };
    let original = load_model("bert");
    for module in original.modules() {
        for p in module.params() {
            if p.name == "bert.encoder.layer.0.attention.self.query.weight" {
                base_w = Some(p.base().clone());
            }
        }
    }
    let w = base_w.unwrap();
    let model = get_peft_model(load_model("bert"), config, "default").unwrap();
    let sd: HashMap<String, Tensor> = model
        .adapter_state_dict("default")
        .unwrap()
        .into_iter()
        .collect();
    let pre = "base_model.model.bert.encoder.layer.0.attention.self.query";
    let (a, b) = (
        &sd[&format!("{pre}.lora_A.weight")],
        &sd[&format!("{pre}.lora_B.weight")],
    );
    assert_eq!(a.dims(), &[4, 32]);
    assert_eq!(b.dims(), &[32, 4]);
    let ba = (b.matmul(a).unwrap() * 2.0).unwrap();
    let mut res = None;
    for module in model.base_model().modules() {
        for p in module.params() {
            if p.name == "bert.encoder.layer.0.attention.self.query.weight" {
                res = Some(p.base().clone());
            }
        }
    }
    let rebuilt = (res.unwrap() + &ba).unwrap();
    assert!(max_diff(&rebuilt, &w) < 1e-5, "W_res + s B A = W");
    // A = sqrt(S/s) Vhᵀ has orthogonal rows: A Aᵀ is diagonal with S/s on it, S descending.
    let aat: Vec<Vec<f32>> = a.matmul(&a.t().unwrap()).unwrap().to_vec2().unwrap();
    for i in 0..4 {
        for (j, x) in aat[i].iter().enumerate() {
            if i != j {
                assert!(x.abs() < 1e-4, "A rows orthogonal");
            }
        }
        assert!(aat[i][i] > 0.0);
        if i > 0 {
            assert!(
                aat[i][i] <= aat[i - 1][i - 1] + 1e-5,
                "singular values descend"
            );
        }
    }
    // Eight power iterations get the top singular values of this 32x32 matrix to within 5%.
    let full = get_peft_model(
        load_model("bert"),
        LoraConfig {
            init_lora_weights: InitLoraWeights::Method("pissa".into()),
            ..model_config_like(&model)
        },
        "default",
    )
    .unwrap();
    let fsd: HashMap<String, Tensor> = full
        .adapter_state_dict("default")
        .unwrap()
        .into_iter()
        .collect();
    let fa = &fsd[&format!("{pre}.lora_A.weight")];
    let faat: Vec<Vec<f32>> = fa.matmul(&fa.t().unwrap()).unwrap().to_vec2().unwrap();
    assert!(
        (aat[0][0] - faat[0][0]).abs() / faat[0][0] < 0.05,
        "top singular value"
    );
}

fn model_config_like(model: &PeftModel) -> LoraConfig {
    match model
        .peft_config("default")
        .unwrap()
        .downcast_ref::<LoraConfig>()
    {
        Some(c) => c.clone(),
        None => unreachable!(),
    }
}

#[test]
fn olora_refuses_conv1d_weights() {
    let config = LoraConfig {
        r: 4,
        init_lora_weights: InitLoraWeights::Method("olora".into()),
        ..Default::default()
    };
    let err = get_peft_model(load_model("gpt2"), config, "default")
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("olora") && err.contains("Conv1D"), "{err}");
}

fn adalora_config(case: &str) -> AdaLoraConfig {
    let mut v = meta(case)["config"].clone();
    v["task_type"] = Value::String(meta(case)["task_type"].as_str().unwrap().into());
    AdaLoraConfig::from_json(&v, true).unwrap()
}

/// Feeds PEFT's recorded parameters and gradients to our allocator step by step and compares the
/// masks it leaves on E and the rank pattern it records.
#[test]
fn adalora_rank_allocation_matches_peft_for_the_same_gradients() {
    for case in ["bert_adalora", "gpt2_adalora", "llama_adalora"] {
        let m = model_key(case);
        let steps = load_st(&case_dir(case).join("steps.safetensors"));
        let config = adalora_config(case);
        let total = config.total_step.unwrap();
        let mut model = get_peft_model(load_model(&m), config, "default").unwrap();
        let vars: Vec<(String, Var)> = model.trainable_parameters();
        let patterns = meta(case)["rank_patterns"].as_array().unwrap().clone();
        for step in 0..total {
            let mut loss: Option<Tensor> = None;
            for (key, var) in &vars {
                let path = key.strip_prefix("base_model.model.").unwrap();
                let Some(value) = steps.get(&format!("{step}.{path}.value")) else {
                    continue;
                };
                var.set(value).unwrap();
                let g = &steps[&format!("{step}.{path}.grad")];
                let term = (var.as_tensor() * g).unwrap().sum_all().unwrap();
                loss = Some(match loss {
                    Some(l) => (l + term).unwrap(),
                    None => term,
                });
            }
            let grads = loss.unwrap().backward().unwrap();
            model.update_and_allocate(step, &grads).unwrap();
            for (key, var) in &vars {
                let path = key.strip_prefix("base_model.model.").unwrap();
                if let Some(want) = steps.get(&format!("{step}.{path}.after")) {
                    assert_close(
                        &format!("{case}: step {step} {path}"),
                        var.as_tensor(),
                        want,
                        0.0,
                    );
                }
            }
            let Some(c) = model
                .peft_config("default")
                .and_then(|c| c.downcast_ref::<AdaLoraConfig>())
            else {
                panic!()
            };
            let want = &patterns[step];
            match (&c.rank_pattern, want) {
                (None, Value::Null) => {}
                (Some(got), Value::Object(w)) => {
                    let w: serde_json::Map<String, Value> = w
                        .iter()
                        .map(|(k, v)| (k.replace(".default", ""), v.clone()))
                        .collect();
                    assert_eq!(got, &w, "{case}: rank pattern after step {step}");
                }
                (got, want) => panic!("{case}: step {step}: {got:?} vs {want}"),
            }
        }
        let saved =
            peft::io::read_json(&case_dir(case).join("adapter/adapter_config.json")).unwrap();
        let Some(c) = model
            .peft_config("default")
            .and_then(|c| c.downcast_ref::<AdaLoraConfig>())
        else {
            panic!()
        };
        assert_eq!(
            Value::Object(c.rank_pattern.clone().unwrap()),
            saved["rank_pattern"],
            "{case}"
        );
    }
}

/// An adapter trained here (with the orthogonal regulariser and the allocator in the loop)
/// saves in PEFT's layout, with the ranks it kept, and loads back with the same logits.
#[test]
fn adalora_trained_here_prunes_saves_and_reloads() {
    for m in ["bert", "t5"] {
        let case = format!("{m}_adalora");
        let config = adalora_config(&case);
        let total = config.total_step.unwrap();
        let mut model = get_peft_model(load_model(m), config, "default").unwrap();
        let mut opt = peft::train::optim::AdamW::new(
            model.trainable_parameters(),
            peft::train::optim::AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        )
        .unwrap();
        for step in 0..total {
            let loss = task_loss(&model, m);
            let reg = model.regularization_loss().unwrap().expect("orth reg");
            let grads = (loss + reg).unwrap().backward().unwrap();
            opt.step(&grads, 1e-2, 1.0).unwrap();
            model.update_and_allocate(step, &grads).unwrap();
        }
        let Some(c) = model
            .peft_config("default")
            .and_then(|c| c.downcast_ref::<AdaLoraConfig>())
        else {
            panic!()
        };
        let rp = c.rank_pattern.clone().expect("rank pattern recorded");
        let kept: usize = rp
            .values()
            .map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| b.as_bool().unwrap())
                    .count()
            })
            .sum();
        assert!(kept <= c.target_r * rp.len(), "{m}: budget {kept}");
        let dir = export_dir(&format!("{m}_adalora"));
        model.save_pretrained(dir.path()).unwrap();
        let before = run(&model, m);
        let back =
            PeftModel::from_pretrained(load_model(m), dir.path(), Default::default()).unwrap();
        check(&format!("{m}: reloaded"), m, &run(&back, m), &before);
        write_export(&dir, &back, m);
    }
}

fn task_loss(model: &PeftModel, m: &str) -> Tensor {
    let logits = model.forward(&inputs(m), true).unwrap();
    let t = raw_inputs(m);
    match m {
        "bert" => peft::train::classification_loss(&logits, &t["labels"]).unwrap(),
        "t5" => {
            let labels = t["labels"].clone();
            let c = logits.dim(2).unwrap();
            peft::ops::cross_entropy(
                &logits.reshape(((), c)).unwrap(),
                &labels.flatten_all().unwrap(),
            )
            .unwrap()
        }
        _ => {
            let ids = t["input_ids"].clone();
            let c = logits.dim(2).unwrap();
            let l = logits.narrow(1, 0, ids.dim(1).unwrap() - 1).unwrap();
            let y = ids.narrow(1, 1, ids.dim(1).unwrap() - 1).unwrap();
            peft::ops::cross_entropy(&l.reshape(((), c)).unwrap(), &y.flatten_all().unwrap())
                .unwrap()
        }
    }
}

/// A temporary directory, or `$PEFT_EXPORT_DIR/<name>` kept for check_adapter.py.
enum Out {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Out {
    fn path(&self) -> &Path {
        match self {
            Out::Temp(t) => t.path(),
            Out::Kept(p) => p,
        }
    }
}

fn export_dir(name: &str) -> Out {
    match std::env::var_os("PEFT_EXPORT_DIR") {
        Some(d) => {
            let p = PathBuf::from(d).join(name);
            std::fs::create_dir_all(&p).unwrap();
            Out::Kept(p)
        }
        None => Out::Temp(tempfile::tempdir().unwrap()),
    }
}

/// With `PEFT_EXPORT_DIR`: `inputs.safetensors` and our `logits.safetensors` next to the adapter,
/// for `check_adapter.py --inputs`. Decoders get their ids unpadded (padded positions of a causal
/// LM are not comparable).
fn write_export(dir: &Out, model: &PeftModel, m: &str) {
    let Out::Kept(p) = dir else { return };
    let raw = raw_inputs(m);
    let names: &[&str] = match m {
        "bert" => &["input_ids", "attention_mask", "token_type_ids"],
        "t5" => &["input_ids", "attention_mask", "decoder_input_ids"],
        _ => &["input_ids"],
    };
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|k| (k.to_string(), raw[*k].clone()))
        .collect();
    let u = |k: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.to_dtype(DType::U32).unwrap())
    };
    let inputs = Inputs {
        input_ids: u("input_ids"),
        attention_mask: u("attention_mask"),
        token_type_ids: u("token_type_ids"),
        decoder_input_ids: u("decoder_input_ids"),
        ..Default::default()
    };
    let logits = peft::no_grad(|| model.forward(&inputs, false)).unwrap();
    peft::io::save_safetensors(&p.join("inputs.safetensors"), &tensors).unwrap();
    peft::io::save_safetensors(&p.join("logits.safetensors"), &[("logits".into(), logits)])
        .unwrap();
}

/// Trains every method here for a few steps on each architecture (DoRA, PiSSA, OLoRA) and checks
/// the saved adapter reloads with the same logits; with `PEFT_EXPORT_DIR` set, the adapters and
/// their logits are kept for tools/fixtures/check_adapter.py.
#[test]
fn dora_pissa_olora_trained_here_reload() {
    for case in cases().into_iter().filter(|c| !c.contains("adalora")) {
        let m = model_key(&case);
        let mut model = get_peft_model(load_model(&m), lora_config(&case), "default").unwrap();
        let mut opt = peft::train::optim::AdamW::new(
            model.trainable_parameters(),
            peft::train::optim::AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        )
        .unwrap();
        for _ in 0..3 {
            let grads = task_loss(&model, &m).backward().unwrap();
            opt.step(&grads, 1e-2, 1.0).unwrap();
        }
        let before = run(&model, &m);
        let dir = export_dir(&case);
        model.save_pretrained(dir.path()).unwrap();
        let back =
            PeftModel::from_pretrained(load_model(&m), dir.path(), Default::default()).unwrap();
        check(
            &format!("{case}: trained here, reloaded"),
            &m,
            &run(&back, &m),
            &before,
        );
        write_export(&dir, &back, &m);
        model.merge_adapter().unwrap();
        check(
            &format!("{case}: trained here, merged"),
            &m,
            &run(&model, &m),
            &before,
        );
    }
}

/// Every trainable tensor of every case gets a non-zero gradient (train mode, dropout on where
/// configured), starting from PEFT's trained adapters so that no factor is still zero.
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    for case in cases() {
        let m = model_key(&case);
        let model = load_trainable(&case, &m);
        assert_all_gradients(&case, &model, &m);
        if case.contains("adalora") {
            // From a fresh init too: E = 0, so A and B get their gradient from the regulariser.
            let fresh = get_peft_model(load_model(&m), adalora_config(&case), "default").unwrap();
            assert_all_gradients(&format!("{case} (fresh)"), &fresh, &m);
        }
    }
}

fn assert_all_gradients(case: &str, model: &PeftModel, m: &str) {
    {
        let mut loss = task_loss(model, m);
        if let Some(r) = model.regularization_loss().unwrap() {
            loss = (loss + r).unwrap();
        }
        let grads = loss.backward().unwrap();
        let vars = model.trainable_parameters();
        assert!(!vars.is_empty());
        for (k, v) in vars {
            if v.elem_count() == 0 {
                continue; // a layer AdaLoRA pruned to rank 0 (saved as a [0, in] tensor)
            }
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0 && n.is_finite(), "{case}: gradient of {k} is {n}");
        }
    }
}

fn load_trainable(case: &str, m: &str) -> PeftModel {
    let dir = case_dir(case).join("adapter");
    let mut pm = PeftModel::from_pretrained(load_model(m), &dir, Default::default()).unwrap();
    // The same adapter again, trainable, and the forward routed to it.
    pm.load_adapter(&dir, "train", true).unwrap();
    pm.set_adapter("train").unwrap();
    pm
}
