//! T5 v1.0 (ReLU, tied head), T5 v1.1 (gated-gelu, own head, 3 decoder layers) and mT5 against
//! fixtures from transformers + PEFT 0.21 (tools/fixtures/make_seq2seq_fixtures.py): base logits,
//! embeddings instead of ids, prefixes through the cache, the encoder alone, LoRA adapters trained
//! by PEFT, merged weights, and incremental decoding.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_close, load_st, max_diff};
use peft::models::{self, t5::shift_right, LoadOptions};
use peft::models::{Cache, KeyValue};
use peft::train::classification_loss;
use peft::tuners::BaseFields;
use peft::{Inputs, Model, PeftModel, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;
const CASES: [&str; 3] = ["t5_v1_0", "t5_v1_1", "mt5"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5")
}

fn raw_inputs() -> HashMap<String, Tensor> {
    load_st(&dir().join("inputs.safetensors"))
}

fn inputs() -> Inputs {
    let t = raw_inputs();
    let u32t = |k: &str| t[k].to_dtype(DType::U32).unwrap();
    Inputs {
        input_ids: Some(u32t("input_ids")),
        attention_mask: Some(u32t("attention_mask")),
        decoder_input_ids: Some(u32t("decoder_input_ids")),
        ..Default::default()
    }
}

fn load(case: &str, task: TaskType) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    models::load(&dir().join(case).join("model"), &opts).unwrap()
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    load_st(&dir().join(case).join("expected.safetensors"))
}

fn prefix_cache(case: &str, n_layers: usize, with_cross: bool) -> Cache {
    let p = load_st(&dir().join(case).join("prefix.safetensors"));
    let kv = |kind: &str, i: usize| {
        Some(KeyValue {
            key: p[&format!("{kind}.{i}.key")].clone(),
            value: p[&format!("{kind}.{i}.value")].clone(),
        })
    };
    Cache {
        self_attn: (0..n_layers).map(|i| kv("self", i)).collect(),
        cross_attn: if with_cross {
            (0..n_layers).map(|i| kv("cross", i)).collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

#[test]
fn base_logits_match_transformers() {
    for case in CASES {
        let m = load(case, TaskType::Seq2SeqLm);
        let want = expected(case);
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(&format!("{case}: base"), &got, &want["base_logits"], TOL);
    }
}

#[test]
fn encoder_model_gives_the_last_hidden_state() {
    for case in CASES {
        let m = load(case, TaskType::FeatureExtraction);
        assert!(m.info().architecture.ends_with("EncoderModel"));
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: encoder"),
            &got,
            &expected(case)["encoder_hidden"],
            TOL,
        );
    }
}

#[test]
fn embeddings_instead_of_ids() {
    let raw = raw_inputs();
    for case in CASES {
        let m = load(case, TaskType::Seq2SeqLm);
        let inputs = Inputs {
            inputs_embeds: Some(raw["inputs_embeds"].clone()),
            decoder_inputs_embeds: Some(raw["decoder_inputs_embeds"].clone()),
            attention_mask: inputs().attention_mask,
            ..Default::default()
        };
        let got = m.forward(&inputs, false).unwrap();
        assert_close(
            &format!("{case}: embeds"),
            &got,
            &expected(case)["embeds_logits"],
            TOL,
        );
    }
}

/// transformers takes a cross-attention cache that is filled when the call starts as already
/// computed: it replaces the encoder output's keys and values. Self-attention prefixes shift
/// the decoder's relative positions by their length.
#[test]
fn prefixes_through_the_cache() {
    for case in CASES {
        let m = load(case, TaskType::Seq2SeqLm);
        let n = m.dims().num_layers;
        let want = expected(case);
        let mut cache = prefix_cache(case, n, true);
        let got = m
            .forward_with_cache(&inputs(), Some(&mut cache), false)
            .unwrap();
        assert_close(
            &format!("{case}: prefix"),
            &got,
            &want["prefix_logits"],
            TOL,
        );
        let t = inputs().decoder_input_ids.unwrap().dim(1).unwrap();
        assert_eq!(cache.past_len(), 3 + t, "self-attention cache extended");

        let mut cache = prefix_cache(case, n, false);
        let got = m
            .forward_with_cache(&inputs(), Some(&mut cache), false)
            .unwrap();
        assert_close(
            &format!("{case}: self-attention prefix only"),
            &got,
            &want["self_prefix_logits"],
            TOL,
        );
        assert!(cache.encoder_output.is_some());
        assert_eq!(cache.cross_attn.iter().flatten().count(), n);
    }
}

/// Decoding one position at a time with the cache (the encoder runs once) gives the logits of
/// the full forward pass, for the base model and with a LoRA adapter.
#[test]
fn incremental_decoding_equals_the_full_forward() {
    for case in CASES {
        let want = expected(case);
        let base = load(case, TaskType::Seq2SeqLm);
        let lora = PeftModel::from_pretrained(
            load(case, TaskType::Seq2SeqLm),
            &dir().join(case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let got = stepwise(|i, c| base.forward_with_cache(i, Some(c), false));
        assert_close(
            &format!("{case}: incremental base"),
            &got,
            &want["base_logits"],
            TOL,
        );
        let got = stepwise(|i, c| lora.forward_with_cache(i, Some(c), false));
        assert_close(
            &format!("{case}: incremental lora"),
            &got,
            &want["lora_logits"],
            TOL,
        );
    }
}

/// Runs the decoder one position at a time with one cache; after the first step the encoder
/// output comes from the cache (no input ids are given).
fn stepwise(run: impl Fn(&Inputs, &mut Cache) -> peft::Result<Tensor>) -> Tensor {
    let full = inputs();
    let dec = full.decoder_input_ids.clone().unwrap();
    let mut cache = Cache::default();
    let mut steps = Vec::new();
    for s in 0..dec.dim(1).unwrap() {
        let step = Inputs {
            input_ids: if s == 0 { full.input_ids.clone() } else { None },
            attention_mask: full.attention_mask.clone(),
            decoder_input_ids: Some(dec.narrow(1, s, 1).unwrap()),
            ..Default::default()
        };
        steps.push(run(&step, &mut cache).unwrap());
        assert_eq!(cache.past_len(), s + 1);
    }
    Tensor::cat(&steps, 1).unwrap()
}

#[test]
fn logits_to_keep_gives_the_last_positions() {
    let m = load("t5_v1_0", TaskType::Seq2SeqLm);
    let mut i = inputs();
    i.logits_to_keep = 1;
    let got = m.forward(&i, false).unwrap();
    let want = expected("t5_v1_0")["base_logits"].clone();
    let t = want.dim(1).unwrap();
    assert_close("last", &got, &want.narrow(1, t - 1, 1).unwrap(), TOL);
}

#[test]
fn peft_lora_adapters_load_and_merge() {
    for case in CASES {
        let want = expected(case);
        let mut m = PeftModel::from_pretrained(
            load(case, TaskType::Seq2SeqLm),
            &dir().join(case).join("adapter"),
            Default::default(),
        )
        .unwrap();
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(&format!("{case}: lora"), &got, &want["lora_logits"], TOL);
        m.merge_adapter().unwrap();
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: merged"),
            &got,
            &want["merged_logits"],
            TOL,
        );
        let plain = m.merge_and_unload().unwrap();
        let got = plain.forward(&inputs(), false).unwrap();
        assert_close(
            &format!("{case}: merge_and_unload"),
            &got,
            &want["merged_logits"],
            TOL,
        );
    }
}

#[test]
fn default_lora_targets_are_q_and_v() {
    let m = load("mt5", TaskType::Seq2SeqLm);
    let config = peft::tuners::lora::LoraConfig {
        base: BaseFields {
            task_type: Some(TaskType::Seq2SeqLm),
            ..Default::default()
        },
        ..Default::default()
    };
    let p = peft::get_peft_model(m, config, "default").unwrap();
    let meta: serde_json::Value =
        peft::io::read_json(&dir().join("mt5").join("meta.json")).unwrap();
    let mut want: Vec<String> = meta["lora_modules"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    want.sort();
    let mut got: Vec<String> = p
        .base_model()
        .modules()
        .iter()
        .filter_map(|m| match m {
            peft::layers::ModuleRef::Linear(l) if !l.adapters.is_empty() => Some(l.name.clone()),
            _ => None,
        })
        .collect();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn shift_right_matches_the_fixture_decoder_ids() {
    let raw = raw_inputs();
    let got = shift_right(&raw["labels"], 0, 0).unwrap();
    assert_eq!(
        max_diff(
            &got,
            &raw["decoder_input_ids"].to_dtype(DType::U32).unwrap()
        ),
        0.0
    );
    let m = load("t5_v1_0", TaskType::Seq2SeqLm);
    let d = m.dims();
    assert!(d.is_encoder_decoder);
    assert_eq!(d.decoder_start_token_id, Some(0));
    assert_eq!(d.pad_token_id, Some(0));
    assert_eq!(d.eos_token_ids, vec![1]);
    assert_eq!((d.num_layers, d.num_encoder_layers), (2, 2));
    let d = load("t5_v1_1", TaskType::Seq2SeqLm).dims();
    assert_eq!((d.num_layers, d.num_encoder_layers, d.head_dim), (3, 2, 8));
}

/// A training step in train mode (dropout on) gives every trainable LoRA tensor a non-zero
/// gradient, for every T5 variant (the t5_v1_1 adapter covers q, k, v, o, wi_0, wi_1, wo).
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let labels = raw_inputs()["labels"].clone();
    for case in CASES {
        let adapter = dir().join(case).join("adapter");
        let mut m = PeftModel::from_pretrained(
            load(case, TaskType::Seq2SeqLm),
            &adapter,
            Default::default(),
        )
        .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&adapter, "default", true).unwrap();
        let logits = m.forward(&inputs(), true).unwrap();
        let loss = classification_loss(&logits, &labels).unwrap();
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
}

#[test]
fn bad_configs_and_weights_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir().join("t5_v1_0").join("model");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg = peft::io::read_json(&cfg_path).unwrap();
    cfg["feed_forward_proj"] = "gated-swish".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = models::load(tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("gated-swish") && e.contains("gated-gelu"), "{e}");

    cfg["feed_forward_proj"] = "gated-gelu".into(); // the checkpoint has wi, not wi_0/wi_1
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = models::load(tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("DenseReluDense.wi_0"), "{e}");

    cfg["feed_forward_proj"] = "relu".into();
    cfg["d_ff"] = 30.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = models::load(tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("DenseReluDense.wi.weight"), "{e}");

    cfg["model_type"] = "t6".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = models::load(tmp.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("t6") && e.contains("mt5"), "{e}");
}

/// The trainer's seq2seq loss, with the LM head (T5 v1.0's tied one after the `d_model^-0.5`
/// scaling, v1.1's and mT5's own) fused into the cross-entropy, equals the loss over
/// transformers + PEFT's logits, and gives every LoRA tensor the gradient the unfused head and
/// loss give.
#[test]
fn fused_head_and_loss_match_the_fixture_logits_and_the_unfused_gradients() {
    let labels = raw_inputs()["labels"].clone();
    for case in CASES {
        let adapter = dir().join(case).join("adapter");
        let mut m = PeftModel::from_pretrained(
            load(case, TaskType::Seq2SeqLm),
            &adapter,
            Default::default(),
        )
        .unwrap();
        m.delete_adapter("default").unwrap();
        m.load_adapter(&adapter, "default", true).unwrap();
        let want = classification_loss(&expected(case)["lora_logits"], &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Dropout off on both sides, so the two graphs compute the same function.
        let fused = m
            .seq2seq_lm_loss(&inputs(), &labels, false)
            .unwrap()
            .expect("a frozen head is fused into the loss");
        let unfused = classification_loss(&m.forward(&inputs(), false).unwrap(), &labels).unwrap();
        let got = fused.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-4, "{case}: loss {got} vs {want}");
        let (gf, gu) = (fused.backward().unwrap(), unfused.backward().unwrap());
        for (key, var) in m.trainable_parameters() {
            let (a, b) = (gf.get(var.as_tensor()), gu.get(var.as_tensor()));
            let (a, b) = (a.expect("fused gradient"), b.expect("unfused gradient"));
            let scale = max_diff(b, &b.zeros_like().unwrap()).max(1e-6);
            let d = max_diff(a, b);
            assert!(
                d <= 1e-4 * scale,
                "{case}: {key} differs by {d} (scale {scale})"
            );
        }
    }
}
