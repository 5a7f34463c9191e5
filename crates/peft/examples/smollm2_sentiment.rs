//! SmolLM2-135M-Instruct (its Q4_1 GGUF, kept quantized) learns Rotten Tomatoes sentiment as a
//! causal LM with prompt tuning: the twin of tools/reference/smollm2_sentiment.py (same recipe,
//! described there), for a side-by-side measurement of accuracy and seconds per step.
//!
//!     cargo run --release -p peft --example smollm2_sentiment -- [STEPS] [BATCH] [LR] [EVAL]

use peft::candle::{Device, Tensor};
use peft::io::tokenizer::Tokenizer;
use peft::train::callback::TrainerEvent;
use peft::train::config::{Interval, TrainingArguments};
use peft::train::data::{CollateOptions, Example, PaddingSide, Target};
use peft::train::Trainer;
use peft::tuners::prompt_tuning::PromptTuningConfig;
use peft::{get_peft_model, load_model, Inputs, LoadOptions, TaskType, TunerConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TEMPLATE: (&str, &str) = ("Review: ", "\nSentiment:");
const INIT: &str = "Classify the sentiment of this review as positive or negative:";
const MAX_LEN: usize = 96;

fn rows(path: &Path) -> Vec<(String, i64)> {
    let mut r =
        csv::Reader::from_path(path).expect("rotten_tomatoes csv (scripts/fetch-assets.sh)");
    r.records()
        .map(|x| {
            let x = x.unwrap();
            (x[0].to_string(), x[1].parse().unwrap())
        })
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> peft::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let steps: usize = arg(0, "60").parse().expect("steps");
    let batch: usize = arg(1, "8").parse().expect("batch");
    let lr: f64 = arg(2, "3e-2").parse().expect("lr");
    let n_eval: usize = arg(3, "200").parse().expect("eval");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let gguf = root.join(".assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let data = root.join(".assets/rotten_tomatoes");
    let mut tok = Tokenizer::for_model(&gguf)?;
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let config = PromptTuningConfig::new(20)
        .with_text_init(INIT, gguf.to_str().unwrap_or_default())
        .with_task_type(TaskType::CausalLm);
    let mut model = get_peft_model(load_model(&gguf, &opts)?, config, "default")?;
    println!("{}", model.trainable_parameters_line());
    let dims = model.base_model().dims();
    let eos = dims.eos_token_ids.first().copied().unwrap_or(0);
    let pad = dims.pad_token_id.unwrap_or(eos);

    let mut train = rows(&data.join("train.csv"));
    train.shuffle(&mut rand::rngs::StdRng::seed_from_u64(42));
    train.truncate(steps * batch);
    let word = |label: i64| if label == 1 { " positive" } else { " negative" };
    let mut examples = Vec::new();
    for (text, label) in &train {
        let prompt = tok.encode_text(&format!("{}{text}{}", TEMPLATE.0, TEMPLATE.1), true)?;
        let mut completion = tok.encode_text(word(*label), false)?;
        completion.push(eos);
        let mut ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let mut labels: Vec<i64> = std::iter::repeat_n(-100, prompt.len())
            .chain(completion.iter().map(|&t| t as i64))
            .collect();
        ids.truncate(MAX_LEN);
        labels.truncate(MAX_LEN);
        examples.push(Example {
            token_type_ids: vec![0; ids.len()],
            input_ids: ids,
            target: Target::Tokens(labels),
            task_id: None,
        });
    }
    let load0 = loadavg();
    let mut log = |e: &TrainerEvent<'_>| {
        if let TrainerEvent::Log(s) = e {
            println!("step {}/{}  loss {:.4}", s.step, s.total_steps, s.loss);
        }
    };
    let start = Instant::now();
    let report = Trainer {
        model: &mut model,
        args: TrainingArguments {
            output_dir: PathBuf::from("/tmp/smollm2-sentiment-peft"),
            learning_rate: lr,
            max_steps: steps as i64,
            per_device_train_batch_size: batch,
            weight_decay: 0.0,
            warmup_steps: 0,
            logging_steps: 10,
            save_strategy: Interval::No,
            seed: 42,
            ..Default::default()
        },
        collate: CollateOptions {
            task: TaskType::CausalLm,
            pad_id: pad,
            padding_side: PaddingSide::Right,
            decoder_start_id: 0,
        },
        train: &examples,
        eval: None,
        label_names: Vec::new(),
        callback: Some(&mut log),
        stop: Default::default(),
        group: Default::default(),
    }
    .train()?;
    let train_s = start.elapsed().as_secs_f64();

    let pos = tok.encode_text(" positive", false)?[0] as usize;
    let neg = tok.encode_text(" negative", false)?[0] as usize;
    let test: Vec<(String, i64)> = rows(&data.join("test.csv"))
        .into_iter()
        .take(n_eval)
        .collect();
    let mut right = 0;
    for chunk in test.chunks(16) {
        let enc = chunk
            .iter()
            .map(|(t, _)| {
                let mut ids = tok.encode_text(&format!("{}{t}{}", TEMPLATE.0, TEMPLATE.1), true)?;
                ids.truncate(MAX_LEN);
                Ok(ids)
            })
            .collect::<peft::Result<Vec<Vec<u32>>>>()?;
        let width = enc.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for e in &enc {
            ids.extend(std::iter::repeat_n(pad, width - e.len()).chain(e.iter().copied()));
            mask.extend(
                std::iter::repeat_n(0u32, width - e.len()).chain(std::iter::repeat_n(1, e.len())),
            );
        }
        let b = enc.len();
        let x = Inputs {
            input_ids: Some(Tensor::from_vec(ids, (b, width), &Device::Cpu)?),
            attention_mask: Some(Tensor::from_vec(mask, (b, width), &Device::Cpu)?),
            logits_to_keep: 1,
            ..Default::default()
        };
        let logits = peft::no_grad(|| model.forward(&x, false))?;
        let last: Vec<Vec<f32>> = logits.squeeze(1)?.to_vec2()?;
        for (row, (_, label)) in last.iter().zip(chunk) {
            let pred = i64::from(row[pos] > row[neg]);
            right += usize::from(pred == *label);
        }
    }
    println!(
        "{{\"impl\":\"peft-rs\",\"accuracy\":{:.4},\"eval_reviews\":{},\"steps\":{},\"batch\":{batch},\"seconds_per_step\":{:.3},\"train_seconds\":{train_s:.1},\"final_loss\":{:.4},\"peak_rss_mb\":{:.0},\"loadavg_before\":\"{load0}\",\"loadavg_after\":\"{}\"}}",
        right as f64 / test.len() as f64,
        test.len(),
        report.steps,
        train_s / report.steps.max(1) as f64,
        report.final_loss,
        peak_rss_mb(),
        loadavg()
    );
    Ok(())
}
