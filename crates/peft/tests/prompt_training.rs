//! Prompt-learning adapters in the training loop and at their edges: every method trains on
//! every architecture with the base weights left bit-identical and every trainable tensor moved;
//! a run resumed from a checkpoint continues an encoder PEFT does not save; adapters reload
//! (and, where the file holds the whole trainable state, train on); and the bad inputs the issue
//! names fail with errors naming the values.

use candle_core::{Device, Tensor};
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions, Model};
use peft::train::config::{Interval, TrainingArguments};
use peft::train::data::{CollateOptions, Example, PaddingSide, Target};
use peft::train::Trainer;
use peft::tuners::multitask_prompt_tuning::MultitaskPromptTuningConfig;
use peft::tuners::p_tuning::{PromptEncoderConfig, Reparameterization};
use peft::tuners::prefix_tuning::PrefixTuningConfig;
use peft::tuners::prompt_tuning::PromptTuningConfig;
use peft::tuners::{PeftConfig, TunerConfig};
use peft::{get_peft_model, CptConfig, FromPretrained, Inputs, PeftModel, TaskType};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn load(rel: &str, task: TaskType) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    models::load(&fixture(rel), &opts).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-prompt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Random examples for `task` over token ids `lo..hi`, with a task id in `0..3` each.
fn examples(task: TaskType, n: usize, lo: u32, hi: u32, with_task: bool) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|i| {
            let len = rng.random_range(3..7);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(lo..hi)).collect();
            let target = match task {
                TaskType::SeqCls => Target::Class(rng.random_range(0..3)),
                TaskType::CausalLm => Target::Tokens(ids.iter().map(|&t| t as i64).collect()),
                _ => Target::Sequence((0..3).map(|_| rng.random_range(lo..hi)).collect()),
            };
            Example {
                task_id: with_task.then_some((i % 3) as u32),
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                target,
            }
        })
        .collect()
}

fn args(out: &Path, steps: i64) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.to_path_buf(),
        learning_rate: 1e-2,
        max_steps: steps,
        per_device_train_batch_size: 4,
        logging_steps: 0,
        save_strategy: Interval::No,
        seed: 3,
        ..Default::default()
    }
}

fn collate(task: TaskType) -> CollateOptions {
    CollateOptions {
        task,
        pad_id: 0,
        padding_side: PaddingSide::Right,
        decoder_start_id: 0,
    }
}

fn base_weights(m: &PeftModel) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for module in m.base_model().modules() {
        for p in module.params() {
            let v = p
                .base()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            out.push((p.name.clone(), v));
        }
    }
    out
}

fn snapshot(m: &PeftModel) -> HashMap<String, Tensor> {
    m.trainable_parameters()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().copy().unwrap()))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

/// Every method on every architecture: a few steps of the training loop move every trainable
/// tensor and leave the base model's weights bit-identical.
#[test]
fn training_moves_every_trainable_tensor_and_no_base_weight() {
    let cpt = || PeftConfig::new(CptConfig::new(vec![5, 9, 12, 17], vec![1, 2, 3, 4]));
    let methods = |task: TaskType| -> Vec<(&'static str, PeftConfig)> {
        let mut lstm = PromptEncoderConfig::new(3);
        lstm.encoder_reparameterization_type = Reparameterization::Lstm;
        lstm.encoder_hidden_size = Some(8);
        let mut proj = PrefixTuningConfig::new(3);
        proj.prefix_projection = true;
        proj.encoder_hidden_size = Some(16);
        let mut v: Vec<(&str, PeftConfig)> = vec![
            (
                "prompt",
                PromptTuningConfig::new(3).with_task_type(task).into(),
            ),
            (
                "p-tuning mlp",
                PromptEncoderConfig::new(3).with_task_type(task).into(),
            ),
            ("p-tuning lstm", lstm.with_task_type(task).into()),
            (
                "prefix",
                PrefixTuningConfig::new(3).with_task_type(task).into(),
            ),
            ("prefix projection", proj.with_task_type(task).into()),
            (
                "multitask",
                MultitaskPromptTuningConfig::new(3, 3, 2)
                    .with_task_type(task)
                    .into(),
            ),
        ];
        if task == TaskType::CausalLm {
            v.push(("cpt", cpt()));
        }
        v
    };
    let models: [(&str, TaskType, u32, u32); 6] = [
        ("bert/models/seq_cls", TaskType::SeqCls, 110, 999),
        ("roberta/seq_cls/model", TaskType::SeqCls, 3, 99),
        ("decoder/models/gpt2", TaskType::CausalLm, 3, 31),
        ("decoder/models/llama_gqa", TaskType::CausalLm, 3, 31),
        ("decoder/models/opt_post", TaskType::CausalLm, 3, 31),
        ("t5/t5_v1_0/model", TaskType::Seq2SeqLm, 3, 47),
    ];
    for (rel, task, lo, hi) in models {
        for (what, config) in methods(task) {
            let mut m = get_peft_model(load(rel, task), config, "default").unwrap();
            let before = base_weights(&m);
            let start = snapshot(&m);
            assert!(!start.is_empty(), "{rel} {what}: nothing to train");
            let data = examples(task, 8, lo, hi, what == "multitask");
            let out = tmp("train");
            let mut t = Trainer {
                model: &mut m,
                args: args(&out, 3),
                collate: collate(task),
                train: &data,
                eval: None,
                label_names: Vec::new(),
                callback: None,
                stop: Default::default(),
                group: Default::default(),
            };
            let report = t.train().unwrap_or_else(|e| panic!("{rel} {what}: {e}"));
            assert!(report.final_loss.is_finite(), "{rel} {what}");
            let after = snapshot(&m);
            for (k, v) in &start {
                assert!(
                    max_diff(v, &after[k]) > 0.0,
                    "{rel} {what}: {k} did not move"
                );
            }
            assert!(
                before == base_weights(&m),
                "{rel} {what}: a base weight changed"
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
}

/// A p-tuning run resumed from a checkpoint ends where the uninterrupted run does: the
/// checkpoint keeps the MLP, which PEFT's adapter file does not.
#[test]
fn resuming_p_tuning_restores_its_encoder() {
    let task = TaskType::CausalLm;
    let data = examples(task, 8, 3, 31, false);
    let run = |a: TrainingArguments| -> HashMap<String, Tensor> {
        let config = PromptEncoderConfig::new(3).with_task_type(task);
        let mut m = get_peft_model(load("decoder/models/gpt2", task), config, "default").unwrap();
        let mut t = Trainer {
            model: &mut m,
            args: a,
            collate: collate(task),
            train: &data,
            eval: None,
            label_names: Vec::new(),
            callback: None,
            stop: Default::default(),
            group: Default::default(),
        };
        t.train().unwrap();
        snapshot(&m)
    };
    let full = tmp("whole");
    let mut a = args(&full, 4);
    a.save_strategy = Interval::Steps;
    a.save_steps = 1;
    let whole = run(a.clone());
    let ckpt = full.join("checkpoint-2");
    let saved =
        peft::io::load_safetensors(&ckpt.join("trainable.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("prompt_encoder.mlp_head.0.weight"));
    // A fresh process resumes from the checkpoint the killed run left.
    let out = tmp("resumed");
    let copy = out.join("checkpoint-2");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(&ckpt).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    a.output_dir = out;
    a.resume_from_checkpoint = Some("last".into());
    let resumed = run(a);
    for (k, v) in &whole {
        let d = max_diff(v, &resumed[k]);
        assert!(d < 1e-5, "{k}: resumed differs by {d}");
    }
}

/// Adapters whose file is their whole trainable state (prompt tuning, prefix tuning without
/// projection, multitask prompt tuning, CPT) load trainable and train on; p-tuning and projected
/// prefixes, whose encoders PEFT does not save, are refused with what to do.
#[test]
fn trainable_loads_continue_where_the_file_allows() {
    let task = TaskType::CausalLm;
    let dir = fixture("prompt/cases");
    let trainable = FromPretrained {
        is_trainable: true,
        ..Default::default()
    };
    for case in ["prompt_gpt2", "prefix_llama", "mpt_gpt2", "cpt_gpt2"] {
        let rel = if case.contains("llama") {
            "decoder/models/llama_gqa"
        } else {
            "decoder/models/gpt2"
        };
        let adapter = dir.join(case).join("adapter");
        let frozen =
            PeftModel::from_pretrained(load(rel, task), &adapter, Default::default()).unwrap();
        let m = PeftModel::from_pretrained(load(rel, task), &adapter, trainable.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(!m.trainable_parameters().is_empty(), "{case}");
        let mut x = Inputs::new(Tensor::new(&[[3u32, 7, 1, 12]], &Device::Cpu).unwrap());
        if case.starts_with("mpt") {
            x.task_ids = Some(Tensor::new(&[1u32], &Device::Cpu).unwrap());
        }
        let a = frozen.forward(&x, false).unwrap();
        let b = m.forward(&x, false).unwrap();
        assert!(
            max_diff(&a, &b) < 1e-5,
            "{case}: trainable load changes the output"
        );
    }
    for case in ["ptuning_gpt2", "prefix_gpt2"] {
        let err = PeftModel::from_pretrained(
            load("decoder/models/gpt2", task),
            &dir.join(case).join("adapter"),
            trainable.clone(),
        )
        .err()
        .unwrap_or_else(|| panic!("{case}: accepted"))
        .to_string();
        assert!(
            err.contains("cannot be trained further") && err.contains("checkpoint"),
            "{case}: {err}"
        );
    }
}

fn err_of<T>(r: peft::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn input_and_virtual_tokens_longer_than_the_context_are_refused() {
    let task = TaskType::CausalLm;
    // GPT-2 fixture: 32 positions.
    let m = get_peft_model(
        load("decoder/models/gpt2", task),
        PromptTuningConfig::new(4).with_task_type(task),
        "default",
    )
    .unwrap();
    let long = Tensor::new(&[[5u32; 30]], &Device::Cpu).unwrap();
    let e = err_of(m.forward(&Inputs::new(long.clone()), false));
    assert!(
        e.contains("30 input tokens") && e.contains("4 virtual tokens") && e.contains("32"),
        "{e}"
    );
    let e = err_of(generate(
        &m,
        &[vec![5; 28]],
        &GenerationConfig::default(),
        None,
    ));
    assert!(
        e.contains("28 tokens") && e.contains("4 virtual tokens"),
        "{e}"
    );
    let prefix = get_peft_model(
        load("decoder/models/gpt2", task),
        PrefixTuningConfig::new(4).with_task_type(task),
        "default",
    )
    .unwrap();
    let e = err_of(prefix.forward(&Inputs::new(long), false));
    assert!(e.contains("30 input tokens + 4 virtual tokens"), "{e}");
    // Generation leaves the virtual tokens their room: 27 + 4 + new tokens fit 32.
    let g = generate(
        &prefix,
        &[vec![5; 27]],
        &GenerationConfig {
            max_new_tokens: 10,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(g.tokens[0].len(), 1);
}

#[test]
fn multitask_needs_valid_task_ids() {
    let task = TaskType::CausalLm;
    let m = get_peft_model(
        load("decoder/models/gpt2", task),
        MultitaskPromptTuningConfig::new(3, 2, 1).with_task_type(task),
        "default",
    )
    .unwrap();
    let ids = Tensor::new(&[[3u32, 4, 5], [6, 7, 8]], &Device::Cpu).unwrap();
    let e = err_of(m.forward(&Inputs::new(ids.clone()), false));
    assert!(
        e.contains("task_ids") && e.contains("one task index"),
        "{e}"
    );
    let mut x = Inputs::new(ids);
    x.task_ids = Some(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap());
    let e = err_of(m.forward(&x, false));
    assert!(
        e.contains("task id 2") && e.contains("num_tasks = 2"),
        "{e}"
    );
    x.task_ids = Some(Tensor::new(&[1u32], &Device::Cpu).unwrap());
    let e = err_of(m.forward(&x, false));
    assert!(e.contains("1 task_ids for a batch of 2"), "{e}");
    let e = err_of(generate(
        &m,
        &[vec![3, 4]],
        &GenerationConfig {
            task_ids: Some(vec![0, 1]),
            ..Default::default()
        },
        None,
    ));
    assert!(e.contains("2 task_ids for 1 prompts"), "{e}");
}

#[test]
fn cpt_is_for_causal_language_models_only() {
    let mut c = CptConfig::new(vec![1, 2], vec![1, 4]);
    c.base.task_type = Some(TaskType::SeqCls);
    let e = err_of(get_peft_model(
        load("bert/models/seq_cls", TaskType::SeqCls),
        c,
        "default",
    ));
    assert!(e.contains("CAUSAL_LM") && e.contains("SEQ_CLS"), "{e}");
    // Declared causal, but the model is a classifier.
    let e = err_of(get_peft_model(
        load("bert/models/seq_cls", TaskType::SeqCls),
        CptConfig::new(vec![1, 2], vec![1, 4]),
        "default",
    ));
    assert!(
        e.contains("causal language models only") && e.contains("bert"),
        "{e}"
    );
    let json =
        serde_json::json!({"peft_type": "CPT", "task_type": "SEQ_2_SEQ_LM", "cpt_token_ids": [1]});
    let e = err_of(PeftConfig::from_adapter_json(&json));
    assert!(e.contains("CAUSAL_LM"), "{e}");
}

#[test]
fn an_adapter_made_for_another_width_is_refused() {
    let task = TaskType::CausalLm;
    let mut c = PromptTuningConfig::new(3).with_task_type(task);
    c.prompt.token_dim = Some(48);
    let e = err_of(get_peft_model(
        load("decoder/models/gpt2", task),
        c,
        "default",
    ));
    assert!(
        e.contains("token_dim` = 48") && e.contains("32 wide"),
        "{e}"
    );
    // PEFT's prompt_opt adapter (token_dim 32) on an OPT whose embeddings are 16 wide.
    let e = err_of(PeftModel::from_pretrained(
        load("decoder/models/opt", task),
        &fixture("prompt/cases/prompt_opt/adapter"),
        Default::default(),
    ));
    assert!(
        e.contains("token_dim` = 32") && e.contains("16 wide"),
        "{e}"
    );
    // A prefix made for two kv heads of 8 on a model with four heads of 8.
    let e = err_of(PeftModel::from_pretrained(
        load("decoder/models/gpt2", task),
        &fixture("prompt/cases/prefix_llama/adapter"),
        Default::default(),
    ));
    assert!(
        e.contains("2 heads of 8") && e.contains("4 key/value heads"),
        "{e}"
    );
    let mut p = PrefixTuningConfig::new(2).with_task_type(task);
    p.prompt.num_layers = Some(5);
    let e = err_of(get_peft_model(
        load("decoder/models/gpt2", task),
        p,
        "default",
    ));
    assert!(
        e.contains("num_layers` = 5") && e.contains("2 layers"),
        "{e}"
    );
}

/// The multitask seq2seq decoder prompt with `decoder_input_ids` (where PEFT fails) equals the
/// same with their embeddings given as `decoder_inputs_embeds` (PEFT's path from labels).
#[test]
fn multitask_seq2seq_accepts_decoder_input_ids() {
    let task = TaskType::Seq2SeqLm;
    let m = PeftModel::from_pretrained(
        load("t5/t5_v1_0/model", task),
        &fixture("prompt/cases/mpt_t5/adapter"),
        Default::default(),
    )
    .unwrap();
    let dev = Device::Cpu;
    let dec = Tensor::new(&[[0u32, 5, 9], [0, 7, 2]], &dev).unwrap();
    let mut x = Inputs::new(Tensor::new(&[[4u32, 8, 1], [6, 3, 1]], &dev).unwrap());
    x.task_ids = Some(Tensor::new(&[2u32, 0], &dev).unwrap());
    x.decoder_input_ids = Some(dec.clone());
    let a = m.forward(&x, false).unwrap();
    assert_eq!(a.dims(), &[2, 6, 48]);
    let mut y = x.clone();
    y.decoder_input_ids = None;
    y.decoder_inputs_embeds = Some(m.base_model().embed_tokens(&dec, false).unwrap());
    let b = m.forward(&y, false).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    x.decoder_input_ids = None;
    let e = err_of(m.forward(&x, false));
    assert!(e.contains("decoder_input_ids"), "{e}");
}

/// Evaluation runs under `no_grad`: a soft prompt, its encoder, prefixes and task factors must
/// then be read detached, or the whole forward graph of an evaluation batch is kept alive.
#[test]
fn input_methods_record_nothing_under_no_grad() {
    let mut lstm = PromptEncoderConfig::new(3);
    lstm.encoder_reparameterization_type = Reparameterization::Lstm;
    let mut proj = PrefixTuningConfig::new(3);
    proj.prefix_projection = true;
    proj.encoder_hidden_size = Some(16);
    let task = TaskType::CausalLm;
    let methods: Vec<(&str, PeftConfig)> = vec![
        (
            "prompt",
            PromptTuningConfig::new(3).with_task_type(task).into(),
        ),
        (
            "p-tuning mlp",
            PromptEncoderConfig::new(3).with_task_type(task).into(),
        ),
        ("p-tuning lstm", lstm.with_task_type(task).into()),
        (
            "prefix",
            PrefixTuningConfig::new(3).with_task_type(task).into(),
        ),
        ("prefix projection", proj.with_task_type(task).into()),
        (
            "multitask",
            MultitaskPromptTuningConfig::new(3, 3, 2)
                .with_task_type(task)
                .into(),
        ),
        (
            "cpt",
            PeftConfig::new(CptConfig::new(vec![5, 9, 12, 17], vec![1, 2, 3, 4])),
        ),
    ];
    for (what, config) in methods {
        let m = get_peft_model(load("decoder/models/gpt2", task), config, "default").unwrap();
        let ids = Tensor::new(&[[5u32, 9, 12, 17]], &Device::Cpu).unwrap();
        let inputs = Inputs {
            task_ids: Some(Tensor::new(&[1u32], &Device::Cpu).unwrap()),
            ..Inputs::new(ids)
        };
        assert!(m.forward(&inputs, false).unwrap().track_op(), "{what}");
        let out = peft::no_grad(|| m.forward(&inputs, false)).unwrap();
        assert!(
            !out.track_op(),
            "{what}: a graph was recorded under no_grad"
        );
    }
}
