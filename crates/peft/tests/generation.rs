//! Generation on a small random LlamaForCausalLM (tools/fixtures/make_generation_fixtures.py):
//! greedy continuations equal transformers' (one prompt at a time and as a left-padded batch),
//! the key/value cache changes nothing, seeded sampling repeats, adapters take part, and a prompt
//! longer than the context window is an error.

use candle_core::{Device, Tensor};
use peft::generation::{generate, generate_stream, FinishReason, GenerationConfig, SamplingConfig};
use peft::models::{self, LoadOptions};
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model, Inputs, LoraConfig, Model};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generation/tiny_llama")
}

fn expected() -> serde_json::Value {
    peft::io::read_json(&dir().join("expected.json")).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn load() -> Box<dyn Model> {
    models::load(&dir(), &LoadOptions::default()).unwrap()
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    }
}

#[test]
fn greedy_matches_transformers_alone_and_left_padded() {
    let fx = expected();
    let model = load();
    let prompts = rows(&fx["prompt_ids"]);
    for (p, want) in prompts.iter().zip(rows(&fx["single"])) {
        let got = generate(model.as_ref(), std::slice::from_ref(p), &greedy(12), None).unwrap();
        assert_eq!(got.tokens[0], want, "prompt {p:?}");
    }
    let got = generate(model.as_ref(), &prompts, &greedy(12), None).unwrap();
    assert_eq!(got.tokens, rows(&fx["batched"]));
    assert!(
        prompts.iter().any(|p| p.len() != prompts[0].len()),
        "the batch must need padding"
    );
}

/// Greedy decoding the slow way: the whole sequence through the model at every step.
fn uncached_greedy(model: &dyn Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&Inputs::new(ids), false).unwrap();
        let last: Vec<f32> = logits
            .squeeze(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        seq.push(peft::generation::logits::argmax(&last));
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn cached_greedy_equals_uncached_greedy() {
    let model = load();
    for p in rows(&expected()["prompt_ids"]) {
        let mut cfg = greedy(20);
        cfg.eos_token_ids = vec![u32::MAX]; // run the full 20 steps
        let cached = generate(model.as_ref(), std::slice::from_ref(&p), &cfg, None).unwrap();
        assert_eq!(cached.tokens[0], uncached_greedy(model.as_ref(), &p, 20));
        assert_eq!(cached.finish[0], FinishReason::Length);
    }
}

#[test]
fn seeded_sampling_repeats_and_seeds_differ() {
    let model = load();
    let prompts = rows(&expected()["prompt_ids"]);
    let sample = |seed| {
        let cfg = GenerationConfig {
            max_new_tokens: 16,
            sampling: SamplingConfig {
                do_sample: true,
                temperature: 1.5,
                top_k: 50,
                top_p: 0.95,
                repetition_penalty: 1.1,
            },
            eos_token_ids: vec![u32::MAX],
            seed,
            ..Default::default()
        };
        generate(model.as_ref(), &prompts, &cfg, None)
            .unwrap()
            .tokens
    };
    assert_eq!(sample(3), sample(3));
    assert_ne!(sample(3), sample(4));
}

#[test]
fn generation_runs_through_an_active_adapter() {
    let p = rows(&expected()["prompt_ids"])[0].clone();
    let base = generate(load().as_ref(), std::slice::from_ref(&p), &greedy(12), None).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 32.0,
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()])),
        init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let mut peft_model = get_peft_model(load(), config, "default").unwrap();
    let mut streamed = Vec::new();
    let with = generate_stream(
        &peft_model,
        std::slice::from_ref(&p),
        &greedy(12),
        None,
        &mut |row, t| streamed.push((row, t)),
    )
    .unwrap();
    assert_ne!(
        with.tokens, base.tokens,
        "a random non-zero LoRA must change the greedy path"
    );
    assert_eq!(
        streamed.iter().map(|&(_, t)| t).collect::<Vec<_>>(),
        with.tokens[0]
    );
    let disabled = peft_model.disable_adapter().unwrap();
    let off = generate(&*disabled, std::slice::from_ref(&p), &greedy(12), None).unwrap();
    assert_eq!(off.tokens, base.tokens);
}

#[test]
fn a_prompt_longer_than_the_context_window_is_an_error() {
    let model = load();
    let max = model.dims().max_positions.unwrap();
    let long = vec![5u32; max + 3];
    let err = generate(model.as_ref(), &[long], &greedy(4), None).unwrap_err();
    assert!(err.to_string().contains("context window"), "{err}");
    // A prompt that leaves room generates only up to the window.
    let near = vec![5u32; max - 2];
    let mut cfg = greedy(10);
    cfg.eos_token_ids = vec![u32::MAX];
    let got = generate(model.as_ref(), &[near], &cfg, None).unwrap();
    assert_eq!(got.tokens[0].len(), 2);
    assert_eq!(got.finish[0], FinishReason::Length);
}

#[test]
fn a_stop_string_ends_the_row_once_its_text_appears() {
    let fx = expected();
    let model = load();
    let tok = peft::io::tokenizer::Tokenizer::from_path(&dir()).unwrap();
    let prompt = rows(&fx["prompt_ids"])[0].clone();
    let full = rows(&fx["single"])[0].clone();
    let stop = tok.decode(&full[..3], false).unwrap();
    assert!(!stop.is_empty());
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    let got = generate(model.as_ref(), &[prompt], &cfg, Some(&tok)).unwrap();
    assert_eq!(got.finish[0], FinishReason::StopString);
    assert!(got.tokens[0].len() <= 3 && full.starts_with(&got.tokens[0]));
    assert!(tok.decode(&got.tokens[0], false).unwrap().contains(&stop));
}
