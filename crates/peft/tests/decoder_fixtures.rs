//! Decoder-only models (Llama, Mistral, Qwen2, GPT-2, OPT) against transformers + PEFT: base,
//! LoRA and merged logits with right and left padding, `inputs_embeds`, a random key/value prefix
//! (the path prefix tuning takes), incremental decoding with the cache, and gradients.
//! Fixtures: tools/fixtures/make_decoder_fixtures.py.
//!
//! Logits are compared at real (non-padding) positions only: what a padded query position attends
//! to is an implementation detail of the attention kernel and no output depends on it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_st};
use peft::models::{self, Cache, KeyValue, LoadOptions};
use peft::train::classification_loss;
use peft::{Inputs, Model, PeftModel, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("cases").join(case)
}

fn meta(case: &str) -> serde_json::Value {
    peft::io::read_json(&case_dir(case).join("meta.json")).unwrap()
}

fn task(case: &str) -> TaskType {
    meta(case)["task_type"].as_str().unwrap().parse().unwrap()
}

fn model_dir(case: &str) -> PathBuf {
    fixtures()
        .join("models")
        .join(meta(case)["model"].as_str().unwrap())
}

fn load_base(case: &str) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task(case)),
        ..Default::default()
    };
    models::load(&model_dir(case), &opts).unwrap()
}

fn load_lora(case: &str) -> PeftModel {
    PeftModel::from_pretrained(
        load_base(case),
        &case_dir(case).join("adapter"),
        Default::default(),
    )
    .unwrap()
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    load_st(&case_dir(case).join("expected.safetensors"))
}

fn raw_inputs() -> HashMap<String, Tensor> {
    load_st(&fixtures().join("inputs.safetensors"))
}

/// Right-padded (`left = false`) or left-padded inputs.
fn inputs(left: bool) -> Inputs {
    let t = raw_inputs();
    let sfx = if left { "_left" } else { "" };
    Inputs {
        input_ids: Some(t[&format!("input_ids{sfx}")].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(
            t[&format!("attention_mask{sfx}")]
                .to_dtype(DType::U32)
                .unwrap(),
        ),
        ..Default::default()
    }
}

/// Rows of `[batch, seq, n]` at the positions where `mask` is 1, as `[real, n]`; a 2-D tensor
/// (sequence classification) as it is.
fn real(t: &Tensor, mask: &Tensor) -> Tensor {
    if t.rank() != 3 {
        return t.clone();
    }
    let (b, s, n) = t.dims3().unwrap();
    let m: Vec<u32> = mask
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let idx: Vec<u32> = (0..(b * s) as u32)
        .filter(|&i| m[i as usize] == 1)
        .collect();
    let idx = Tensor::new(idx.as_slice(), t.device()).unwrap();
    t.reshape((b * s, n))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor, inputs: &Inputs) {
    let mask = inputs.attention_mask.as_ref().unwrap();
    assert_close(what, &real(got, mask), &real(want, mask), TOL);
}

fn past_cache(case: &str, e: &HashMap<String, Tensor>) -> Cache {
    let layers = (0..)
        .take_while(|i| e.contains_key(&format!("past_key.{i}")))
        .map(|i| {
            Some(KeyValue {
                key: e[&format!("past_key.{i}")].clone(),
                value: e[&format!("past_value.{i}")].clone(),
            })
        })
        .collect::<Vec<_>>();
    assert!(
        !layers.is_empty(),
        "{case}: no past key/values in the fixture"
    );
    Cache {
        self_attn: layers,
        ..Default::default()
    }
}

/// Every check against transformers + PEFT that a case's fixture supports.
fn run_case(case: &str) {
    let e = expected(case);
    let right = inputs(false);
    let left = inputs(true);

    let base = load_base(case);
    check(
        &format!("{case}: base"),
        &base.forward(&right, false).unwrap(),
        &e["base_logits"],
        &right,
    );
    if let Some(want) = e.get("base_logits_left") {
        check(
            &format!("{case}: base, left padding"),
            &base.forward(&left, false).unwrap(),
            want,
            &left,
        );
    }

    let lora = load_lora(case);
    check(
        &format!("{case}: lora"),
        &lora.forward(&right, false).unwrap(),
        &e["lora_logits"],
        &right,
    );
    // Without a graph the LoRA layers run fused (ops::frozen_linear_low_rank), GPT-2's
    // transposed Conv1D weights included.
    check(
        &format!("{case}: lora, no graph"),
        &peft::no_grad(|| lora.forward(&right, false)).unwrap(),
        &e["lora_logits"],
        &right,
    );
    if let Some(want) = e.get("lora_logits_left") {
        check(
            &format!("{case}: lora, left padding"),
            &lora.forward(&left, false).unwrap(),
            want,
            &left,
        );
    }
    if let Some(embeds) = e.get("inputs_embeds") {
        let x = Inputs {
            inputs_embeds: Some(embeds.clone()),
            attention_mask: right.attention_mask.clone(),
            ..Default::default()
        };
        check(
            &format!("{case}: inputs_embeds"),
            &lora.forward(&x, false).unwrap(),
            &e["embeds_logits"],
            &right,
        );
    }

    // A random key/value prefix, as prefix tuning hands it to the model.
    let mut cache = past_cache(case, &e);
    let past = meta(case)["past_length"].as_u64().unwrap() as usize;
    let mask = right.attention_mask.as_ref().unwrap();
    let with_past = Inputs {
        attention_mask: Some(
            Tensor::cat(
                &[
                    &Tensor::ones((mask.dim(0).unwrap(), past), DType::U32, &Device::Cpu).unwrap(),
                    mask,
                ],
                1,
            )
            .unwrap(),
        ),
        ..right.clone()
    };
    let got = lora
        .forward_with_cache(&with_past, Some(&mut cache), false)
        .unwrap();
    check(
        &format!("{case}: past_key_values"),
        &got,
        &e["past_logits"],
        &right,
    );
    assert_eq!(
        cache.past_len(),
        past + mask.dim(1).unwrap(),
        "{case}: cache grows by the new positions"
    );

    let merged = load_lora(case).merge_and_unload().unwrap();
    check(
        &format!("{case}: merged"),
        &merged.forward(&right, false).unwrap(),
        &e["merged_logits"],
        &right,
    );
}

/// Prefill then one token at a time through the cache gives the logits of one full forward pass,
/// with right and with left padding; `logits_to_keep = 1` gives the last position only.
fn incremental_decode_matches_full_forward(case: &str) {
    let lora = load_lora(case);
    // Dynamic RoPE rescales once a sequence passes max_position_embeddings, so there (as in
    // transformers) cached keys and a full pass differ; stay within it.
    let config = peft::io::read_json(&model_dir(case).join("config.json")).unwrap();
    let n = config["max_position_embeddings"]
        .as_u64()
        .map_or(8, |m| (m as usize).min(8));
    for left in [false, true] {
        let x = inputs(left);
        let ids = x.input_ids.as_ref().unwrap().narrow(1, 0, n).unwrap();
        let mask = x.attention_mask.as_ref().unwrap().narrow(1, 0, n).unwrap();
        let full_in = Inputs {
            input_ids: Some(ids.clone()),
            attention_mask: Some(mask.clone()),
            ..Default::default()
        };
        let full = lora.forward(&full_in, false).unwrap();
        let mut cache = Cache::default();
        let prefill = 3;
        let mut steps = vec![lora
            .forward_with_cache(
                &Inputs {
                    input_ids: Some(ids.narrow(1, 0, prefill).unwrap()),
                    attention_mask: Some(mask.narrow(1, 0, prefill).unwrap()),
                    ..Default::default()
                },
                Some(&mut cache),
                false,
            )
            .unwrap()];
        for i in prefill..n {
            let step = Inputs {
                input_ids: Some(ids.narrow(1, i, 1).unwrap()),
                attention_mask: Some(mask.narrow(1, 0, i + 1).unwrap()),
                logits_to_keep: 1,
                ..Default::default()
            };
            steps.push(
                lora.forward_with_cache(&step, Some(&mut cache), false)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&steps, 1).unwrap();
        let what = format!("{case}: incremental decode (left padding: {left})");
        assert_close(&what, &real(&stepped, &mask), &real(&full, &mask), TOL);
        let last = lora
            .forward(
                &Inputs {
                    logits_to_keep: 1,
                    ..full_in.clone()
                },
                false,
            )
            .unwrap();
        assert_eq!(last.dim(1).unwrap(), 1);
        assert_close(&what, &last, &full.narrow(1, n - 1, 1).unwrap(), 1e-6);
    }
}

/// Train mode: every trainable LoRA tensor (and saved head) receives a non-zero gradient.
fn every_trainable_parameter_gets_a_gradient(case: &str) {
    let mut m = load_lora(case);
    m.delete_adapter("default").unwrap();
    m.load_adapter(&case_dir(case).join("adapter"), "default", true)
        .unwrap();
    let x = inputs(false);
    let logits = m.forward(&x, true).unwrap();
    let loss = match task(case) {
        TaskType::CausalLm => {
            let (b, t, v) = logits.dims3().unwrap();
            let ids: Vec<Vec<u32>> = x.input_ids.as_ref().unwrap().to_vec2().unwrap();
            let mask: Vec<Vec<u32>> = x.attention_mask.as_ref().unwrap().to_vec2().unwrap();
            let labels: Vec<i64> = (0..b)
                .flat_map(|r| {
                    let (ids, mask) = (&ids[r], &mask[r]);
                    (1..t).map(move |i| if mask[i] == 1 { ids[i] as i64 } else { -100 })
                })
                .collect();
            let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
            let shifted = logits
                .narrow(1, 0, t - 1)
                .unwrap()
                .reshape((b * (t - 1), v))
                .unwrap();
            classification_loss(&shifted, &labels).unwrap()
        }
        _ => classification_loss(&logits, &raw_inputs()["labels"]).unwrap(),
    };
    let grads = loss.backward().unwrap();
    let params = m.trainable_parameters();
    assert!(!params.is_empty());
    for (key, var) in params {
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

macro_rules! tests_for {
    ($module:ident, $check:ident: $($case:ident),* $(,)?) => {
        mod $module {
            $( #[test] fn $case() { super::$check(stringify!($case)); } )*
        }
    };
}

tests_for!(fixtures_match, run_case:
    llama_gqa, llama_tied, mistral, qwen2, llama_linear, llama_dynamic, llama_llama3, llama_yarn, llama_seq_cls,
    gpt2, gpt2_seq_cls, opt, opt_post, opt_seq_cls,
);
tests_for!(incremental_decode, incremental_decode_matches_full_forward:
    llama_gqa, llama_tied, mistral, qwen2, llama_linear, llama_dynamic, llama_llama3, llama_yarn,
    gpt2, opt, opt_post,
);
tests_for!(gradients, every_trainable_parameter_gets_a_gradient:
    llama_gqa, llama_tied, mistral, qwen2, llama_linear, llama_dynamic, llama_llama3, llama_yarn, llama_seq_cls,
    gpt2, gpt2_seq_cls, opt, opt_post, opt_seq_cls,
);

/// A tied model saved with the one shared tensor under the head's name (transformers keeps one
/// copy of tied weights and may keep either name) loads as transformers ties it: the base
/// logits of the fixture.
#[test]
fn tied_weights_saved_under_the_head_name_load() {
    for (case, embed) in [
        ("llama_tied", "model.embed_tokens.weight"),
        ("gpt2", "transformer.wte.weight"),
        ("opt", "model.decoder.embed_tokens.weight"),
    ] {
        let src = model_dir(case);
        let tmp = tempfile::tempdir().unwrap();
        let mut tensors: Vec<(String, Tensor)> = load_st(&src.join("model.safetensors"))
            .into_iter()
            .filter(|(k, _)| k != "lm_head.weight")
            .collect();
        let n = tensors.len();
        for (k, _) in tensors.iter_mut() {
            if k == embed {
                *k = "lm_head.weight".into();
            }
        }
        assert!(tensors.iter().any(|(k, _)| k == "lm_head.weight"), "{case}");
        assert_eq!(tensors.len(), n);
        peft::io::save_safetensors(&tmp.path().join("model.safetensors"), &tensors).unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let opts = LoadOptions {
            task: Some(task(case)),
            ..Default::default()
        };
        let m = models::load(tmp.path(), &opts).unwrap();
        let right = inputs(false);
        check(
            &format!("{case}: head-named tied weight"),
            &m.forward(&right, false).unwrap(),
            &expected(case)["base_logits"],
            &right,
        );
    }
}
