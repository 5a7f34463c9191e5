//! Trains every prompt-learning method here (a few steps of the training loop on random data) on
//! the small fixture models and writes, per case, the adapter as `save_pretrained` writes it,
//! the inputs, and the logits `PeftModel::forward` gives on them; then
//! tools/fixtures/check_prompt_roundtrip.py loads each adapter in Python PEFT and compares.
//!
//!     cargo run -p peft --example prompt_roundtrip -- OUT_DIR
//!     /tmp/pyenv/bin/python tools/fixtures/check_prompt_roundtrip.py OUT_DIR

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::train::config::{Interval, TrainingArguments};
use peft::train::data::{CollateOptions, Example, PaddingSide, Target};
use peft::train::Trainer;
use peft::tuners::multitask_prompt_tuning::MultitaskPromptTuningConfig;
use peft::tuners::p_tuning::{PromptEncoderConfig, Reparameterization};
use peft::tuners::prefix_tuning::PrefixTuningConfig;
use peft::tuners::prompt_tuning::PromptTuningConfig;
use peft::tuners::{PeftConfig, TunerConfig};
use peft::{get_peft_model, CptConfig, Inputs, TaskType};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

struct Family {
    name: &'static str,
    dir: &'static str,
    inputs: &'static str,
    task: TaskType,
    /// Token ids drawn for the training data.
    ids: (u32, u32),
}

const FAMILIES: &[Family] = &[
    Family {
        name: "bert",
        dir: "bert/models/seq_cls",
        inputs: "bert/inputs.safetensors",
        task: TaskType::SeqCls,
        ids: (110, 999),
    },
    Family {
        name: "roberta",
        dir: "roberta/seq_cls/model",
        inputs: "roberta/inputs.safetensors",
        task: TaskType::SeqCls,
        ids: (3, 99),
    },
    Family {
        name: "gpt2",
        dir: "decoder/models/gpt2",
        inputs: "decoder/inputs.safetensors",
        task: TaskType::CausalLm,
        ids: (3, 31),
    },
    Family {
        name: "llama",
        dir: "decoder/models/llama_gqa",
        inputs: "decoder/inputs.safetensors",
        task: TaskType::CausalLm,
        ids: (3, 31),
    },
    Family {
        name: "opt",
        dir: "decoder/models/opt_post",
        inputs: "decoder/inputs.safetensors",
        task: TaskType::CausalLm,
        ids: (3, 31),
    },
    Family {
        name: "t5",
        dir: "t5/t5_v1_0/model",
        inputs: "t5/inputs.safetensors",
        task: TaskType::Seq2SeqLm,
        ids: (3, 47),
    },
    Family {
        name: "mt5",
        dir: "t5/mt5/model",
        inputs: "t5/inputs.safetensors",
        task: TaskType::Seq2SeqLm,
        ids: (3, 47),
    },
];

fn methods(task: TaskType) -> Vec<(&'static str, PeftConfig)> {
    let mut lstm = PromptEncoderConfig::new(3);
    lstm.encoder_reparameterization_type = Reparameterization::Lstm;
    lstm.encoder_hidden_size = Some(8);
    let mut proj = PrefixTuningConfig::new(3);
    proj.prefix_projection = true;
    proj.encoder_hidden_size = Some(16);
    let mut v: Vec<(&str, PeftConfig)> = vec![
        (
            "prompt",
            PromptTuningConfig::new(4).with_task_type(task).into(),
        ),
        (
            "ptuning",
            PromptEncoderConfig::new(3).with_task_type(task).into(),
        ),
        ("ptuning_lstm", lstm.with_task_type(task).into()),
        (
            "prefix",
            PrefixTuningConfig::new(3).with_task_type(task).into(),
        ),
        ("prefix_proj", proj.with_task_type(task).into()),
        (
            "mpt",
            MultitaskPromptTuningConfig::new(3, 3, 2)
                .with_task_type(task)
                .into(),
        ),
    ];
    if task == TaskType::CausalLm {
        let c = CptConfig::new(vec![5, 9, 12, 17, 21], vec![1, 2, 3, 4, 5]);
        v.push(("cpt", c.into()));
    }
    v
}

fn examples(task: TaskType, (lo, hi): (u32, u32)) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    (0..12)
        .map(|i| {
            let len = rng.random_range(3..8);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(lo..hi)).collect();
            let target = match task {
                TaskType::SeqCls => Target::Class(rng.random_range(0..3)),
                TaskType::CausalLm => Target::Tokens(ids.iter().map(|&t| t as i64).collect()),
                _ => Target::Sequence((0..4).map(|_| rng.random_range(lo..hi)).collect()),
            };
            Example {
                task_id: Some(i % 3),
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                target,
            }
        })
        .collect()
}

fn main() -> peft::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: prompt_roundtrip OUT_DIR"),
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut list = Vec::new();
    for f in FAMILIES {
        for (method, config) in methods(f.task) {
            let case = format!("{method}_{}", f.name);
            let dir = out.join(&case);
            let model_dir = fixtures.join(f.dir);
            let opts = LoadOptions {
                task: Some(f.task),
                ..Default::default()
            };
            let multitask = method == "mpt";
            let mut m = get_peft_model(models::load(&model_dir, &opts)?, config, "default")?;
            let mut data = examples(f.task, f.ids);
            if !multitask {
                data.iter_mut().for_each(|e| e.task_id = None);
            }
            let mut t = Trainer {
                model: &mut m,
                args: TrainingArguments {
                    output_dir: dir.join("run"),
                    learning_rate: 5e-2,
                    max_steps: 3,
                    per_device_train_batch_size: 4,
                    logging_steps: 0,
                    save_strategy: Interval::No,
                    ..Default::default()
                },
                collate: CollateOptions {
                    task: f.task,
                    pad_id: 0,
                    padding_side: PaddingSide::Right,
                    decoder_start_id: 0,
                },
                train: &data,
                eval: None,
                label_names: Vec::new(),
                callback: None,
                stop: Default::default(),
                group: Default::default(),
            };
            t.train()?;
            m.save_pretrained(&dir.join("adapter"))?;
            let raw = peft::io::load_safetensors(&fixtures.join(f.inputs), &Device::Cpu)?;
            let u = |k: &str| -> peft::Result<Option<Tensor>> {
                Ok(raw.get(k).map(|t| t.to_dtype(DType::U32)).transpose()?)
            };
            let b = raw["input_ids"].dim(0)?;
            let task_ids: Vec<u32> = (0..b as u32).map(|i| (i + 1) % 3).collect();
            let x = Inputs {
                input_ids: u("input_ids")?,
                attention_mask: u("attention_mask")?,
                token_type_ids: u("token_type_ids")?,
                decoder_input_ids: u("decoder_input_ids")?,
                task_ids: multitask
                    .then(|| Tensor::new(task_ids.as_slice(), &Device::Cpu))
                    .transpose()?,
                ..Default::default()
            };
            let logits = m.forward(&x, false)?;
            let mut inputs: Vec<(String, Tensor)> =
                ["input_ids", "attention_mask", "token_type_ids", "labels"]
                    .iter()
                    .filter(|k| {
                        raw.contains_key(**k) && !(**k == "labels" && f.task != TaskType::Seq2SeqLm)
                    })
                    .map(|k| (k.to_string(), raw[*k].clone()))
                    .collect();
            if multitask {
                let t: Vec<i64> = task_ids.iter().map(|&t| t as i64).collect();
                inputs.push(("task_ids".into(), Tensor::new(t.as_slice(), &Device::Cpu)?));
            }
            peft::io::save_safetensors(&dir.join("inputs.safetensors"), &inputs)?;
            peft::io::save_safetensors(
                &dir.join("logits.safetensors"),
                &[("logits".into(), logits)],
            )?;
            let _ = std::fs::remove_dir_all(dir.join("run"));
            list.push(serde_json::json!({
                "case": case,
                "model": model_dir.display().to_string(),
                "task_type": f.task.as_str(),
            }));
            println!("{case}: {}", m.trainable_parameters_line());
        }
    }
    let json = serde_json::to_string_pretty(&list).unwrap_or_default();
    std::fs::write(out.join("cases.json"), json).map_err(|e| peft::Error::io(&out, e))?;
    Ok(())
}
