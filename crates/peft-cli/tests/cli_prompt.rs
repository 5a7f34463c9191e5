//! The `peft` command with prompt-learning adapters PEFT saved (fixtures of
//! tools/fixtures/make_prompt_fixtures.py): `forward` writes PEFT's logits (virtual positions
//! included) and takes `--task-ids` for multitask prompt tuning, `generate` gives PEFT's greedy
//! tokens, `inspect` describes the adapter, and `train` + `eval` run a prompt method end to end.

mod common;

use common::*;
use std::path::PathBuf;

fn case(name: &str) -> PathBuf {
    peft_fixtures().join("prompt/cases").join(name)
}

fn decoder_inputs() -> (String, String) {
    let f = peft_fixtures().join("decoder/inputs.safetensors");
    (
        matrix(&tensor(&f, "input_ids")),
        matrix(&tensor(&f, "attention_mask")),
    )
}

#[test]
fn forward_writes_peft_logits_with_virtual_positions_and_task_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = peft_fixtures().join("decoder/models/gpt2");
    let (ids, mask) = decoder_inputs();
    for (name, task_ids) in [
        ("prompt_gpt2", None),
        ("prefix_gpt2", None),
        ("mpt_gpt2", Some("[2, 0]")),
    ] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let adapter = case(name).join("adapter");
        let mut args = vec![
            "forward",
            "--model",
            gpt2.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--attention-mask",
            &mask,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(t) = task_ids {
            args.extend(["--task-ids", t]);
        }
        let (ok, text) = peft(&args);
        assert!(ok, "{name}: {text}");
        let got = tensor(&out, "logits");
        let want = tensor(&case(name).join("expected.safetensors"), "logits");
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: forward differs from PEFT by {d}");
    }
    // Multitask without task ids, or with the wrong count: errors that say what to pass.
    let adapter = case("mpt_gpt2").join("adapter");
    let out = tmp.path().join("x.safetensors");
    let base = [
        "forward",
        "--model",
        gpt2.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input-ids",
        &ids,
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, text) = peft(&base);
    assert!(!ok && text.contains("task_ids"), "{text}");
    let mut bad = base.to_vec();
    bad.extend(["--task-ids", "[1]"]);
    let (ok, text) = peft(&bad);
    assert!(!ok && text.contains("1 ids for 2 rows"), "{text}");
}

#[test]
fn inspect_describes_a_prompt_adapter() {
    let dir = case("prefix_llama").join("adapter");
    let (ok, text) = peft(&["inspect", dir.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("PREFIX_TUNING"), "{text}");
    assert!(text.contains("prompt_embeddings [3, 64]"), "{text}");
}

/// A prompt-tuning job through `peft train` and `peft eval` on the tiny BERT, with the fixture's
/// word-level tokenizer (and its TEXT init).
#[test]
fn train_and_eval_a_prompt_tuning_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = peft_fixtures().join("bert/models/seq_cls");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let tok = peft_fixtures().join("prompt/tokenizers/bert");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), model.join(f)).unwrap();
    }
    let data = tmp.path().join("train.csv");
    let mut csv = String::from("text,label\n");
    for i in 0..24 {
        let (t, l) = match i % 3 {
            0 => ("the movie was great fun", 0),
            1 => ("far too long and dull", 1),
            _ => ("a good film but the plot", 2),
        };
        csv.push_str(&format!("{t},{l}\n"));
    }
    std::fs::write(&data, csv).unwrap();
    let out = tmp.path().join("run");
    let config = tmp.path().join("job.toml");
    std::fs::write(
        &config,
        format!(
            r#"[model]
path = "{model}"
task_type = "SEQ_CLS"
num_labels = 3

[peft]
peft_type = "PROMPT_TUNING"
num_virtual_tokens = 4
prompt_tuning_init = "TEXT"
prompt_tuning_init_text = "the movie was"
tokenizer_name_or_path = "{model}"

[data]
train_file = "{data}"
validation_split = 0.25
max_length = 16

[training]
output_dir = "{out}"
learning_rate = 0.05
max_steps = 4
per_device_train_batch_size = 4
save_strategy = "no"
"#,
            model = model.display(),
            data = data.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let (ok, text) = peft(&["train", "--config", config.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("trainable params: 227 || all params: 49,136"),
        "{text}"
    );
    let cfg = peft::io::read_json(&out.join("adapter_config.json")).unwrap();
    assert_eq!(cfg["peft_type"], "PROMPT_TUNING");
    assert_eq!(cfg["token_dim"], 32);
    let (ok, text) = peft(&["eval", "--config", config.to_str().unwrap()]);
    assert!(ok && text.contains("accuracy"), "{text}");
}
