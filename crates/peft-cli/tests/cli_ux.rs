//! What the user sees: `--help` lists the values of every enumerated flag, bad values are refused
//! by the parser (exit code 2) before any model loads, `--device`, `-q` / `-v`, and logs on
//! stderr with results on stdout.

use std::path::{Path, PathBuf};

mod common;

use common::{peft, peft_split, write_word_tokenizer};

const TASK_TYPES: [&str; 6] = [
    "SEQ_CLS",
    "TOKEN_CLS",
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

/// A path that does not exist: any command that got as far as loading would fail on it.
fn missing() -> String {
    std::env::temp_dir()
        .join("peft-cli-ux-no-such-model")
        .display()
        .to_string()
}

fn tiny_llama() -> PathBuf {
    common::peft_fixtures().join("generation/tiny_llama")
}

#[test]
fn help_lists_the_values_of_enumerated_flags() {
    for cmd in ["forward", "bench"] {
        let (ok, text) = peft(&[cmd, "--help"]);
        assert!(ok, "{text}");
        assert!(text.contains("--task-type"), "{cmd}: {text}");
        for t in TASK_TYPES {
            assert!(text.contains(t), "{cmd} --help does not list {t}: {text}");
        }
        assert!(text.contains("--device"), "{cmd}: {text}");
    }
    let (ok, text) = peft(&["merge", "--help"]);
    assert!(ok, "{text}");
    for c in [
        "linear",
        "cat",
        "svd",
        "ties",
        "ties_svd",
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
        "total",
        "frequency",
    ] {
        assert!(
            text.contains(&format!("- {c}:")),
            "merge --help lacks {c}: {text}"
        );
    }
    // --out: a file for forward, a directory for merge, and said so.
    assert!(
        text.contains("--out <DIR>") && text.contains("DIRECTORY"),
        "{text}"
    );
    let (_, text) = peft(&["forward", "--help"]);
    assert!(
        text.contains("--out <FILE>") && text.contains("safetensors FILE"),
        "{text}"
    );
    let (_, text) = peft(&["--help"]);
    assert!(
        text.contains("--quiet") && text.contains("--verbose"),
        "{text}"
    );
    for cmd in ["train", "eval", "forward", "merge", "generate", "bench"] {
        let (_, text) = peft(&[cmd, "--help"]);
        assert!(
            text.contains("--device <DEVICE>"),
            "{cmd} has no --device: {text}"
        );
    }
}

#[test]
fn bad_enumerated_values_are_refused_before_loading() {
    let model = missing();
    let cases: [&[&str]; 5] = [
        &[
            "forward",
            "--model",
            &model,
            "--task-type",
            "SEQ_CLASSIFICATION",
            "--input-ids",
            "[[1]]",
            "--out",
            "x.safetensors",
        ],
        &["bench", "--model", &model, "--task-type", "classify"],
        &["bench", "--model", &model, "--task", "classify"],
        &[
            "merge",
            "--model",
            &model,
            "--adapter",
            "a",
            "--combination-type",
            "average",
            "--out",
            "merged",
        ],
        &[
            "merge",
            "--model",
            &model,
            "--adapter",
            "a",
            "--majority-sign-method",
            "vote",
            "--out",
            "merged",
        ],
    ];
    for args in cases {
        let (code, out, err) = peft_split(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("invalid value") && err.contains("possible values"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("no-such-model"),
            "{args:?} got as far as loading: {err}"
        );
    }
    // PEFT's spelling in any case, and `--task` as the old name of bench's `--task-type`: the
    // parser accepts them, and the run fails later, on the missing model.
    for args in [
        ["bench", "--model", &model, "--task", "CAUSAL_LM"],
        ["bench", "--model", &model, "--task-type", "seq_cls"],
    ] {
        let (code, _, err) = peft_split(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("no-such-model"), "{args:?}: {err}");
    }
    // What the parser cannot check is still checked before loading.
    let (code, _, err) = peft_split(&["bench", "--model", &model, "--task-type", "TOKEN_CLS"]);
    assert!(code == 1 && err.contains("SEQ_CLS or CAUSAL_LM"), "{err}");
    assert!(!err.contains("no-such-model"), "{err}");
    let (code, _, err) = peft_split(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        "a=x",
        "--adapter",
        "b=y",
        "--combination-type",
        "ties",
        "--out",
        "merged",
    ]);
    assert!(code == 1 && err.contains("needs --density"), "{err}");
    let (code, _, err) = peft_split(&["-q", "-v", "inspect", &model]);
    assert_eq!(code, 2, "-q and -v conflict: {err}");
}

#[test]
fn device_flag() {
    let model = missing();
    let (code, _, err) = peft_split(&["bench", "--model", &model, "--device", "tpu"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
    let (code, _, err) = peft_split(&["bench", "--model", &model, "--device", "cuda:x"]);
    assert!(code == 2 && err.contains("not a GPU index"), "{err}");
    if !cfg!(feature = "cuda") {
        for d in ["cuda", "cuda:1"] {
            let (code, _, err) = peft_split(&["bench", "--model", &model, "--device", d]);
            assert_eq!(code, 2, "{err}");
            assert!(
                err.contains("built without CUDA support") && err.contains("--features cuda"),
                "{err}"
            );
            assert!(!err.contains("no-such-model"), "{err}");
        }
    }
    // --device cpu runs.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let (code, _, err) = peft_split(&[
        "forward",
        "--model",
        tiny_llama().to_str().unwrap(),
        "--input-ids",
        "[[1, 2, 3]]",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.exists());
}

#[test]
fn out_is_a_file_for_forward_and_a_directory_for_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = peft_split(&[
        "forward",
        "--model",
        tiny_llama().to_str().unwrap(),
        "--input-ids",
        "[[1, 2, 3]]",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(
        code == 1 && err.contains("is a directory") && err.contains("safetensors file"),
        "{err}"
    );
    let file = tmp.path().join("merged");
    std::fs::write(&file, "not a directory").unwrap();
    let (code, _, err) = peft_split(&[
        "merge",
        "--model",
        &missing(),
        "--adapter",
        "a",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        code == 1 && err.contains("is a file") && err.contains("model directory"),
        "{err}"
    );
}

#[test]
fn quiet_hides_logs_and_keeps_results() {
    let m = tiny_llama();
    let m = m.to_str().unwrap();
    let args = [
        "--model",
        m,
        "--prompt",
        "a b",
        "--max-new-tokens",
        "3",
        "--print-ids",
    ];
    let (code, out, err) = peft_split(&[&["generate"], &args[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("tokens/s"),
        "the throughput is an info log on stderr: {err}"
    );
    assert!(!out.contains("tokens/s"), "{out}");
    let (code, quiet_out, quiet_err) = peft_split(&[&["-q", "generate"], &args[..]].concat());
    assert_eq!(code, 0, "{quiet_err}");
    assert_eq!(quiet_err, "", "-q shows errors only");
    assert_eq!(quiet_out, out, "-q keeps the results on stdout");
    // The flag is global: after the subcommand too.
    let (_, _, err) = peft_split(&[&["generate"], &args[..], &["--quiet"]].concat());
    assert_eq!(err, "");
}

/// A small SEQ_CLS job on the fixture BERT (with a word-level tokenizer); returns its config.
fn seq_cls_job(dir: &Path) -> PathBuf {
    let data = dir.join("train.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{{\"sentence\": \"{} token{i}\", \"y\": \"{}\"}}",
                ["good", "bad"][i % 2],
                ["pos", "neg"][i % 2]
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = common::peft_fixtures().join("bert/models/seq_cls");
    let model_copy = dir.join("model");
    std::fs::create_dir_all(&model_copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), model_copy.join(f)).unwrap();
    }
    write_word_tokenizer(&model_copy.join("tokenizer.json"));
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\ntask_type = \"SEQ_CLS\"\n[peft]\npeft_type = \"LORA\"\nr = 4\n\
             lora_alpha = 8\ntarget_modules = [\"query\", \"value\"]\n[data]\n\
             train_file = \"{}\"\ntext_column = \"sentence\"\nlabel_column = \"y\"\n\
             validation_split = 0.2\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\n\
             max_steps = 4\nper_device_train_batch_size = 4\nlogging_steps = 2\n\
             eval_strategy = \"steps\"\neval_steps = 2\n",
            model_copy.display(),
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    cfg
}

/// The steps of the evaluations in `dir/metrics.jsonl`.
fn eval_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e.get("eval_loss").is_some())
        .map(|e| e["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn train_logs_on_stderr_results_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = seq_cls_job(tmp.path());
    let c = cfg.to_str().unwrap();
    let (code, out, err) = peft_split(&["train", "--config", c, "--device", "cpu"]);
    assert_eq!(code, 0, "{out}{err}");
    // Results: stdout.
    assert!(out.starts_with("trainable params: "), "{out}");
    for s in [
        "trained 4 steps",
        "eval metrics (4 examples):",
        "accuracy:",
        "test accuracy:",
        "adapter saved to",
    ] {
        assert!(out.contains(s), "{s} not on stdout: {out}");
    }
    // Progress and notes: stderr (no bar: stderr is not a terminal).
    for s in [
        "training on 16 examples",
        "evaluating on 4",
        "step 2/4",
        "step 4/4",
        "eval at step 2:",
    ] {
        assert!(err.contains(s), "{s} not on stderr: {err}");
    }
    assert!(
        !out.contains("step 2/4") && !err.contains("trainable params"),
        "{out}\n---\n{err}"
    );
    let card = std::fs::read_to_string(tmp.path().join("run/README.md")).unwrap();
    assert!(
        card.contains("trained with `peft`") && !card.contains("peft-rs"),
        "{card}"
    );

    // Evaluations at steps 2 and 4; the final one (also at step 4) is not logged twice.
    assert_eq!(eval_steps(&tmp.path().join("run")), [2, 4]);
    // -q: the same results, no logs; `peft eval -q` prints only the metrics. Without
    // evaluations during training, the final one is logged and drawn.
    let (code, quiet_out, quiet_err) = peft_split(&[
        "-q",
        "train",
        "--config",
        c,
        "--set",
        "training.eval_strategy=no",
    ]);
    assert_eq!(code, 0, "{quiet_err}");
    assert_eq!(quiet_err, "", "-q shows errors only");
    assert!(quiet_out.contains("trainable params: ") && quiet_out.contains("adapter saved to"));
    assert_eq!(eval_steps(&tmp.path().join("run")), [4]);
    let svg = std::fs::read_to_string(tmp.path().join("run/curves.svg")).unwrap();
    assert!(
        svg.contains("eval accuracy") && svg.contains("eval loss"),
        "{svg}"
    );
    let (code, out, err) = peft_split(&["eval", "-q", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.is_empty() && out.starts_with("eval metrics (4 examples):"),
        "{out}{err}"
    );
}
