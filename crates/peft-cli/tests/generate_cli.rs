//! `peft generate` end to end on the small random Llama of tools/fixtures/make_generation_fixtures.py:
//! greedy ids equal transformers', batches, chat formatting, and an adapter whose base model is
//! found through a fake Hugging Face cache.

use peft::models::{self, LoadOptions};
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::tuners::BaseFields;
use peft::{get_peft_model, LoraConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures/generation/tiny_llama")
}

fn expected() -> serde_json::Value {
    peft::io::read_json(&tiny().join("expected.json")).unwrap()
}

/// Runs `peft generate ARGS`; returns (success, stdout, stderr).
fn generate(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft"));
    cmd.arg("generate").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run peft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON line `--print-ids` writes last.
fn printed_ids(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn generate_prints_transformers_greedy_continuations() {
    let fx = expected();
    let model = tiny();
    let m = model.to_str().unwrap();
    let prompts: Vec<&str> = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let (ok, out, err) = generate(
        &[
            "--model",
            m,
            "--prompt",
            prompts[0],
            "--max-new-tokens",
            "12",
            "--print-ids",
        ],
        &[],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(printed_ids(&out), serde_json::json!([fx["single"][0]]));
    assert!(err.contains("tokens/s"), "{err}");

    let mut args = vec!["--model", m, "--max-new-tokens", "12", "--print-ids"];
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    let (ok, out, err) = generate(&args, &[]);
    assert!(ok, "{out}{err}");
    assert_eq!(printed_ids(&out), fx["batched"]);
    assert!(out.starts_with("[0] "), "{out}");
}

#[test]
fn chat_formatting_and_errors() {
    let m = tiny();
    let m = m.to_str().unwrap();
    // The rendered chat prompt is longer than this model's 64 positions: a clean error.
    let (ok, out, err) = generate(
        &[
            "--model",
            m,
            "--prompt",
            "hello",
            "--chat",
            "--max-new-tokens",
            "2",
        ],
        &[],
    );
    assert!(!ok, "{out}");
    assert!(err.contains("context window"), "{err}");
    let (ok, _, err) = generate(&["--prompt", "hello"], &[]);
    assert!(!ok && err.contains("--model"), "{err}");
}

#[test]
fn an_adapter_finds_its_base_model_in_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // A fake cache holding the tiny model as `test-org/tiny-llama`.
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--test-org--tiny-llama");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let base = models::load(&tiny(), &LoadOptions::default()).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 32.0,
        target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()])),
        init_lora_weights: InitLoraWeights::Bool(false),
        base: BaseFields {
            base_model_name_or_path: Some("test-org/tiny-llama".into()),
            task_type: Some(peft::TaskType::CausalLm),
            ..Default::default()
        },
        ..Default::default()
    };
    let adapter = tmp.path().join("adapter");
    get_peft_model(base, config, "default")
        .unwrap()
        .save_pretrained(&adapter)
        .unwrap();
    let a = adapter.to_str().unwrap();
    let args = [
        "--adapter",
        a,
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "6",
        "--print-ids",
    ];
    let (ok, out, err) = generate(&args, &[("HF_HUB_CACHE", &cache)]);
    assert!(ok, "{out}{err}");
    let with_adapter = printed_ids(&out);
    // The same through an explicit --model, and different from the base model alone.
    let (ok, out2, err) = generate(
        &[
            "--model",
            tiny().to_str().unwrap(),
            "--adapter",
            a,
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "6",
            "--print-ids",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(printed_ids(&out2), with_adapter);
    assert_ne!(
        with_adapter,
        serde_json::json!([expected()["single"][1].as_array().unwrap()[..6]])
    );

    // Without the cache, the error names where it looked.
    let empty = tmp.path().join("empty-cache");
    let (ok, _, err) = generate(&args, &[("HF_HUB_CACHE", &empty)]);
    assert!(!ok);
    assert!(
        err.contains("test-org/tiny-llama") && err.contains("models--test-org--tiny-llama"),
        "{err}"
    );
}

/// A word-level tokenizer for the tiny T5 fixture models: `<pad>` 0, `</s>` 1, `t2`..`t47`, and
/// `</s>` appended to every input as T5's tokenizer does.
fn t5_tokenizer() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<pad>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for i in 2..48 {
        vocab.insert(format!("t{i}"), i.into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}
    })
}

/// `peft generate` on T5 v1.1 (an encoder-decoder model, 3 decoder layers), with and without its
/// PEFT adapter: the ids transformers' `generate` chose (tools/fixtures/make_zoo_fixtures.py).
#[test]
fn generate_runs_encoder_decoder_models() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures");
    let fx = peft::io::read_json(&fixtures.join("zoo/t5_generate.json")).unwrap();
    let src = fixtures.join("t5/t5_v1_1");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join("model").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        t5_tokenizer().to_string(),
    )
    .unwrap();
    // Prompt text: every id but the final </s>, which the tokenizer appends.
    let texts: Vec<String> = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let ids = p.as_array().unwrap();
            ids[..ids.len() - 1]
                .iter()
                .map(|i| format!("t{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let m = tmp.path().to_str().unwrap();
    let adapter = src.join("adapter");
    for (adapter, want) in [
        (None, &fx["cases"]["t5_v1_1"]["base_greedy"]["batched"]),
        (
            Some(adapter.to_str().unwrap()),
            &fx["cases"]["t5_v1_1"]["lora_greedy"]["batched"],
        ),
    ] {
        let mut args = vec!["--model", m, "--max-new-tokens", "10", "--print-ids"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        for t in &texts {
            args.extend(["--prompt", t.as_str()]);
        }
        let (ok, out, err) = generate(&args, &[]);
        assert!(ok, "{out}{err}");
        assert_eq!(&printed_ids(&out), want, "adapter {adapter:?}");
    }
}
