//! Encoder-decoder generation on the small T5 v1.0, T5 v1.1 and mT5 fixture models: greedy
//! continuations (plain, and with a repetition penalty, which makes the random models' output
//! vary) equal transformers' `generate`, one prompt at a time and as a padded batch, for the base
//! model and with the PEFT LoRA adapter of each (tools/fixtures/make_zoo_fixtures.py).

use peft::generation::{
    generate, generate_stream, FinishReason, Generate, GenerationConfig, SamplingConfig,
};
use peft::models::{self, LoadOptions};
use peft::{Model, PeftModel};
use std::path::{Path, PathBuf};

const CASES: [&str; 3] = ["t5_v1_0", "t5_v1_1", "mt5"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> serde_json::Value {
    peft::io::read_json(&fixtures().join("zoo/t5_generate.json")).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn load(case: &str) -> Box<dyn Model> {
    models::load(
        &fixtures().join("t5").join(case).join("model"),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn config(max_new_tokens: usize, penalty: f32) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling: SamplingConfig {
            repetition_penalty: penalty,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Checks one model against the `single` and `batched` continuations transformers produced.
fn check<G: Generate + ?Sized>(model: &G, what: &str, want: &serde_json::Value) {
    let fx = expected();
    let prompts = rows(&fx["prompts"]);
    let n = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let penalty = if what.ends_with("penalty") { 1.5 } else { 1.0 };
    let cfg = config(n, penalty);
    for (p, want) in prompts.iter().zip(rows(&want["single"])) {
        let got = generate(model, std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(got.tokens[0], want, "{what}: prompt {p:?}");
        let reason = if want.last() == Some(&1) {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(got.finish[0], reason, "{what}");
    }
    assert!(prompts.iter().any(|p| p.len() != prompts[0].len()));
    let mut streamed = vec![Vec::new(); prompts.len()];
    let got = generate_stream(model, &prompts, &cfg, None, &mut |row, t| {
        streamed[row].push(t)
    })
    .unwrap();
    assert_eq!(got.tokens, rows(&want["batched"]), "{what}: padded batch");
    assert_eq!(streamed, got.tokens, "{what}: streamed tokens");
}

#[test]
fn greedy_generation_matches_transformers() {
    let fx = expected();
    for case in CASES {
        let want = &fx["cases"][case];
        let model = load(case);
        assert!(model.dims().is_encoder_decoder);
        check(
            model.as_ref(),
            &format!("{case} base_greedy"),
            &want["base_greedy"],
        );
        check(
            model.as_ref(),
            &format!("{case} base_penalty"),
            &want["base_penalty"],
        );
    }
}

#[test]
fn greedy_generation_with_a_lora_adapter_matches_transformers() {
    let fx = expected();
    for case in CASES {
        let want = &fx["cases"][case];
        let adapter = fixtures().join("t5").join(case).join("adapter");
        let model = PeftModel::from_pretrained(load(case), &adapter, Default::default()).unwrap();
        check(&model, &format!("{case} lora_greedy"), &want["lora_greedy"]);
        check(
            &model,
            &format!("{case} lora_penalty"),
            &want["lora_penalty"],
        );
    }
}

/// The decoder has its own positions: a long prompt does not take from `max_new_tokens`.
#[test]
fn a_long_prompt_keeps_the_decoder_budget() {
    let model = load("t5_v1_1");
    let long: Vec<u32> = (0..40).map(|i| 2 + i % 40).collect();
    let got = generate(model.as_ref(), &[long], &config(3, 1.0), None).unwrap();
    assert!(!got.tokens[0].is_empty() && got.tokens[0].len() <= 3);
}
