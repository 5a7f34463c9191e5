//! The `peft` binary end to end on the fixture models (made by transformers + PEFT, see
//! tools/fixtures/): forward with a PEFT adapter, merge into a model directory, inspect, train.

use candle_core::Tensor;
use std::path::{Path, PathBuf};

mod common;

use common::{matrix, max_diff, peft, tensor, write_word_tokenizer};

fn fixtures() -> PathBuf {
    common::peft_fixtures().join("bert")
}

fn inputs() -> (String, String, String) {
    let f = fixtures().join("inputs.safetensors");
    (
        matrix(&tensor(&f, "input_ids")),
        matrix(&tensor(&f, "attention_mask")),
        matrix(&tensor(&f, "token_type_ids")),
    )
}

#[test]
fn forward_with_a_peft_adapter_gives_peft_logits_and_merge_writes_a_loadable_model() {
    let (ids, mask, types) = inputs();
    let tmp = tempfile::tempdir().unwrap();
    for case in ["list_qv", "token_cls", "embedding", "feature_extraction"] {
        let case_dir = fixtures().join("cases").join(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case_dir.join("meta.json")).unwrap())
                .unwrap();
        let model = fixtures()
            .join("models")
            .join(meta["model"].as_str().unwrap());
        let adapter = case_dir.join("adapter");
        let expected = case_dir.join("expected.safetensors");
        let out = tmp.path().join(format!("{case}.safetensors"));
        let (ok, log) = peft(&[
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--attention-mask",
            &mask,
            "--token-type-ids",
            &types,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{case}: {log}");
        let d = max_diff(&tensor(&out, "logits"), &tensor(&expected, "lora_logits"));
        assert!(d <= 1e-4, "{case}: forward differs from PEFT by {d}");

        let merged = tmp.path().join(format!("{case}-merged"));
        let (ok, log) = peft(&[
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert!(ok, "{case}: {log}");
        // The merged directory is a plain model: no adapter, same logits as PEFT's merge.
        let out = tmp.path().join(format!("{case}-merged.safetensors"));
        let (ok, log) = peft(&[
            "forward",
            "--model",
            merged.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--attention-mask",
            &mask,
            "--token-type-ids",
            &types,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{case}: {log}");
        let d = max_diff(&tensor(&out, "logits"), &tensor(&expected, "merged_logits"));
        assert!(
            d <= 1e-4,
            "{case}: merged model differs from PEFT's merge by {d}"
        );
    }
}

#[test]
fn inspect_describes_adapters_and_models() {
    let (ok, text) = peft(&[
        "inspect",
        fixtures().join("cases/embedding/adapter").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("method: LORA"), "{text}");
    assert!(
        text.contains(
            "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A [8, 1000]"
        ),
        "{text}"
    );
    let (ok, text) = peft(&[
        "inspect",
        fixtures().join("models/seq_cls").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("BertForSequenceClassification"), "{text}");
    assert!(
        text.contains("bert.encoder.layer.1.attention.self.query (Linear 32 -> 32)"),
        "{text}"
    );
}

#[test]
fn bad_input_fails_cleanly() {
    let model = fixtures().join("models/seq_cls");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let (ok, text) = peft(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "[[1,2],[3]]",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("row 1 has 1 ids"), "{text}");
    let (ok, text) = peft(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "[[1,2]]",
        "--attention-mask",
        "[[1,1,1]]",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("attention-mask"), "{text}");
    let (ok, text) = peft(&[
        "train",
        "--config",
        tmp.path().join("nope.toml").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("nope.toml"), "{text}");
    assert!(!out.exists(), "a failed run must not leave an output file");
    assert!(!text.contains("panicked"), "{text}");
}

/// A short training run from a TOML config on the fixture model, then the saved adapter loads.
#[test]
fn train_writes_an_adapter_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let lines: Vec<String> = (0..24)
        .map(|i| {
            format!(
                "{{\"sentence\": \"{} token{}\", \"y\": \"{}\"}}",
                ["good", "bad", "meh"][i % 3],
                i,
                ["pos", "neg", "mid"][i % 3]
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    // The fixture model has no tokenizer of its own: give a copy a word-level one over its
    // 1000-id vocabulary.
    let model = fixtures().join("models/seq_cls");
    let model_copy = tmp.path().join("model");
    std::fs::create_dir_all(&model_copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), model_copy.join(f)).unwrap();
    }
    write_word_tokenizer(&model_copy.join("tokenizer.json"));
    let out_dir = tmp.path().join("adapter");
    let config = format!(
        r#"
[model]
path = "{}"
task_type = "SEQ_CLS"
num_labels = 3
[peft]
peft_type = "LORA"
r = 4
lora_alpha = 8
target_modules = ["query", "value"]
[data]
train_file = "{}"
text_column = "sentence"
label_column = "y"
max_length = 16
[training]
output_dir = "{}"
learning_rate = 1e-2
max_steps = 6
per_device_train_batch_size = 4
logging_steps = 2
"#,
        model_copy.display(),
        data.display(),
        out_dir.display()
    );
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, config).unwrap();
    let (ok, text) = peft(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{text}");
    // r=4 on query and value of 2 layers (4 x (4x32 + 32x4)) plus the 3-class head (32x3 + 3).
    assert!(
        text.contains("trainable params: 1,123 || all params:"),
        "{text}"
    );
    assert!(text.contains("step 6/6"), "{text}");
    assert!(
        out_dir.join("adapter_config.json").exists()
            && out_dir.join("adapter_model.safetensors").exists()
    );
    let (ok, text) = peft(&["inspect", out_dir.to_str().unwrap()]);
    assert!(ok && text.contains("lora_A.weight [4, 32]"), "{text}");
}

/// A seq2seq model: `--decoder-input-ids` feeds the decoder and the logits are PEFT's
/// (`[batch, decoder positions, vocab]`); without decoder ids the error says what is missing.
#[test]
fn forward_on_t5_with_decoder_input_ids() {
    let t5 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures/t5");
    let f = t5.join("inputs.safetensors");
    let (ids, mask, dec) = (
        matrix(&tensor(&f, "input_ids")),
        matrix(&tensor(&f, "attention_mask")),
        matrix(&tensor(&f, "decoder_input_ids")),
    );
    let case = t5.join("t5_v1_0");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let (ok, text) = peft(&[
        "forward",
        "--model",
        case.join("model").to_str().unwrap(),
        "--adapter",
        case.join("adapter").to_str().unwrap(),
        "--input-ids",
        &ids,
        "--attention-mask",
        &mask,
        "--decoder-input-ids",
        &dec,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let want = tensor(&case.join("expected.safetensors"), "lora_logits");
    let got = tensor(&out, "logits");
    assert!(max_diff(&got, &want) <= 1e-4, "{}", max_diff(&got, &want));

    let (ok, text) = peft(&[
        "forward",
        "--model",
        case.join("model").to_str().unwrap(),
        "--input-ids",
        &ids,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("decoder_input_ids"), "{text}");
}

fn adapter_tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    peft::io::load_safetensors(
        &dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// `--set` overrides, checkpoints, logs and curves, `peft eval`, and `--resume` after a run
/// lost its later checkpoints ends with the same adapter.
#[test]
fn train_eval_resume_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.csv");
    let mut csv = String::from("sentence,y\n");
    for i in 0..30 {
        csv += &format!(
            "{} token{i},{}\n",
            ["good", "bad"][i % 2],
            ["pos", "neg"][i % 2]
        );
    }
    std::fs::write(&data, csv).unwrap();
    let model = fixtures().join("models/seq_cls");
    let model_copy = tmp.path().join("model");
    std::fs::create_dir_all(&model_copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), model_copy.join(f)).unwrap();
    }
    write_word_tokenizer(&model_copy.join("tokenizer.json"));
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\ntask_type = \"SEQ_CLS\"\n[peft]\npeft_type = \"LORA\"\nr = 4\n\
             lora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"query\", \"value\"]\n[data]\n\
             train_file = \"{}\"\ntext_column = \"sentence\"\nlabel_column = \"y\"\n\
             validation_split = 0.2\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-3\n\
             max_steps = 6\nper_device_train_batch_size = 4\nlogging_steps = 1\n",
            model_copy.display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let sets = [
        "--set",
        "training.save_steps=2",
        "--set",
        "training.learning_rate=1e-2",
    ];
    let mut args = vec!["train", "--config", c];
    args.extend(sets);
    let (ok, text) = peft(&args);
    assert!(ok, "{text}");
    assert!(
        text.contains("evaluating on 6") && text.contains("accuracy:"),
        "{text}"
    );
    for f in [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "metrics.jsonl",
        "curves.png",
        "curves.svg",
        "README.md",
        "eval_results.json",
    ] {
        assert!(out.join(f).exists(), "{f}: {text}");
    }
    let first = adapter_tensors(&out);
    let (ok, text) = peft(&["eval", "--config", c]);
    assert!(
        ok && text.contains("accuracy:") && text.contains("f1:"),
        "{text}"
    );

    // Lose everything after checkpoint-2, then resume: same adapter as before.
    for f in ["checkpoint-4", "checkpoint-6"] {
        std::fs::remove_dir_all(out.join(f)).unwrap();
    }
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let mut args = vec!["train", "--config", c, "--resume"];
    args.extend(sets);
    let (ok, text) = peft(&args);
    assert!(
        ok && text.contains("resuming from") && text.contains("checkpoint-2"),
        "{text}"
    );
    let second = adapter_tensors(&out);
    for (k, t) in &first {
        let d = (t - &second[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{k}");
    }

    let (ok, text) = peft(&["train", "--config", c, "--set", "training.lerning_rate=1"]);
    assert!(
        !ok && text.contains("did you mean `learning_rate`"),
        "{text}"
    );
}

/// CAUSAL_LM prompt/completion training on the tiny Llama, then `peft eval` reports perplexity.
#[test]
fn causal_lm_training_and_perplexity() {
    let tiny =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures/generation/tiny_llama");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\": \"q{} is\", \"completion\": \" a b c\"}}",
                i % 4
            )
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("lm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\ntask_type = \"CAUSAL_LM\"\n[peft]\npeft_type = \"LORA\"\nr = 4\n\
             lora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n[data]\ntrain_file = \"{}\"\n\
             prompt_column = \"prompt\"\nvalidation_split = 0.25\n[training]\noutput_dir = \"{}\"\n\
             learning_rate = 1e-2\nmax_steps = 4\nper_device_train_batch_size = 3\nlogging_steps = 2\n\
             eval_strategy = \"steps\"\neval_steps = 2\n",
            tiny.display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let (ok, text) = peft(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(ok && text.contains("perplexity:"), "{text}");
    let (ok, text) = peft(&["eval", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{text}");
    let line = text.lines().find(|l| l.contains("perplexity:")).unwrap();
    let ppl: f64 = line.split(':').nth(1).unwrap().trim().parse().unwrap();
    let loss_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("loss:"))
        .unwrap();
    let loss: f64 = loss_line.split(':').nth(1).unwrap().trim().parse().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{text}");
    assert!(
        (ppl.ln() - loss).abs() < 1e-3,
        "perplexity = exp(loss): {text}"
    );
}
