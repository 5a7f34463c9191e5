//! The subcommands, each a short composition of library calls.

use candle_core::{DType, Device, Tensor};
use peft::io::tokenizer::Tokenizer;
use peft::io::{read_json, save_safetensors, Weights};
use peft::layers::ModuleRef;
use peft::models::{self, LoadOptions};
use peft::peft_model::get_peft_model_with_seed;
use peft::peft_model::{thousands, CONFIG_NAME, WEIGHTS_NAME};
use peft::train::config::TrainConfig;
use peft::train::data::{encode_rows, read_rows, Columns, Labels};
use peft::train::{evaluate_accuracy, train as run_training};
use peft::{Error, Inputs, Result, TaskType};
use std::path::{Path, PathBuf};

pub(crate) fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if candle_core::utils::cuda_is_available() {
            return Ok(Device::new_cuda(0)?);
        }
    }
    Ok(Device::Cpu)
}

pub fn train(config_path: &Path) -> Result<()> {
    let cfg = TrainConfig::from_toml_file(config_path)?;
    let task = cfg.model.task_type.unwrap_or(TaskType::SeqCls);
    let mut tok = Tokenizer::from_path(&cfg.model.path)?;
    let cols = Columns {
        text: cfg.data.text_column.clone(),
        text_pair: cfg.data.text_pair_column.clone(),
        label: cfg.data.label_column.clone(),
    };
    let train_rows = read_rows(&cfg.data.train_file, &cols)?;
    let labels = Labels::infer(&train_rows);
    let num_labels = cfg
        .model
        .num_labels
        .unwrap_or_else(|| labels.num_classes(&train_rows).max(2));
    let device = device()?;
    let opts = LoadOptions {
        task: Some(task),
        num_labels: Some(num_labels),
        device,
        seed: cfg.training.seed,
    };
    let model = models::load(&cfg.model.path, &opts)?;
    let mut peft_config = cfg.peft.clone();
    if peft_config.task_type().is_none() {
        // The [model] table already says the task; PEFT needs it to train and save the head.
        peft_config.set_task_type(task);
    }
    let mut peft_model = get_peft_model_with_seed(model, peft_config, cfg.training.seed)?;
    peft_model.print_trainable_parameters();
    let max_len = cfg.data.max_length;
    let train_set = encode_rows(
        &train_rows,
        &labels,
        num_labels,
        &mut tok,
        max_len,
        &cfg.data.train_file,
    )?;
    let eval_set = match &cfg.data.eval_file {
        Some(f) => {
            let rows = read_rows(f, &cols)?;
            Some(encode_rows(
                &rows, &labels, num_labels, &mut tok, max_len, f,
            )?)
        }
        None => None,
    };
    println!(
        "training on {} examples ({} labels){}",
        train_set.len(),
        num_labels,
        eval_set
            .as_ref()
            .map(|e| format!(", evaluating on {}", e.len()))
            .unwrap_or_default()
    );
    let report = run_training(&mut peft_model, &train_set, &cfg.training, tok.pad_id())?;
    println!(
        "trained {} steps ({:.2} epochs) in {:.1} s, {:.1} examples/s, final loss {:.4}",
        report.steps, report.epochs, report.seconds, report.examples_per_second, report.final_loss
    );
    if let Some(eval) = &eval_set {
        let acc = evaluate_accuracy(
            &peft_model,
            eval,
            cfg.training.per_device_eval_batch_size,
            tok.pad_id(),
        )?;
        println!("test accuracy: {acc:.4} ({} examples)", eval.len());
    }
    peft_model.save_pretrained(&cfg.training.output_dir)?;
    println!("adapter saved to {}", cfg.training.output_dir.display());
    Ok(())
}

pub struct ForwardArgs {
    pub model: PathBuf,
    pub adapter: Vec<String>,
    pub adapter_names: Option<String>,
    pub input_ids: String,
    pub attention_mask: Option<String>,
    pub token_type_ids: Option<String>,
    pub decoder_input_ids: Option<String>,
    pub task_type: Option<String>,
    pub num_labels: Option<usize>,
    pub out: PathBuf,
}

/// Parses `[[1, 2], [3, 4]]` into a `[rows, cols]` u32 tensor; rows must have equal length.
fn parse_matrix(what: &str, json: &str, device: &Device) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = serde_json::from_str(json).map_err(|e| {
        Error::Data(format!(
            "--{what}: expected a JSON list of lists of non-negative integers: {e}"
        ))
    })?;
    let cols = rows.first().map_or(0, |r| r.len());
    if rows.is_empty() || cols == 0 {
        return Err(Error::Data(format!("--{what}: empty input")));
    }
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != cols) {
        return Err(Error::Data(format!(
            "--{what}: row {i} has {} ids but row 0 has {cols}; pad rows to equal length",
            r.len()
        )));
    }
    let flat: Vec<u32> = rows.concat();
    Ok(Tensor::from_vec(flat, (rows.len(), cols), device)?)
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let device = device()?;
    let input_ids = parse_matrix("input-ids", &a.input_ids, &device)?;
    let check = |name: &str, t: Tensor| -> Result<Tensor> {
        if t.dims() != input_ids.dims() {
            return Err(Error::Data(format!(
                "--{name} has shape {:?} but --input-ids has {:?}",
                t.dims(),
                input_ids.dims()
            )));
        }
        Ok(t)
    };
    let inputs = Inputs {
        attention_mask: a
            .attention_mask
            .as_deref()
            .map(|m| {
                check(
                    "attention-mask",
                    parse_matrix("attention-mask", m, &device)?,
                )
            })
            .transpose()?,
        token_type_ids: a
            .token_type_ids
            .as_deref()
            .map(|m| {
                check(
                    "token-type-ids",
                    parse_matrix("token-type-ids", m, &device)?,
                )
            })
            .transpose()?,
        decoder_input_ids: a
            .decoder_input_ids
            .as_deref()
            .map(|m| {
                let d = parse_matrix("decoder-input-ids", m, &device)?;
                if d.dim(0)? != input_ids.dim(0)? {
                    return Err(Error::Data(format!(
                        "--decoder-input-ids has {} rows but --input-ids has {}; give one \
                         decoder row per input row",
                        d.dim(0)?,
                        input_ids.dim(0)?
                    )));
                }
                Ok(d)
            })
            .transpose()?,
        input_ids: Some(input_ids.clone()),
        ..Default::default()
    };
    let opts = LoadOptions {
        task: a.task_type.as_deref().map(str::parse).transpose()?,
        num_labels: a.num_labels,
        device,
        seed: 42,
    };
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let rows = input_ids.dim(0)?;
    let logits = match (specs.is_empty(), &a.adapter_names) {
        (true, Some(_)) => {
            return Err(Error::Config(
                "--adapter-names needs the adapters it names: pass --adapter NAME=DIR".into(),
            ))
        }
        (true, None) => models::load(&a.model, &opts)?.forward(&inputs, false)?,
        (false, names) => {
            let model = crate::adapters::load(&a.model, &specs, opts)?;
            match names {
                Some(list) => {
                    let names = crate::adapters::parse_row_names(list);
                    crate::adapters::check_rows(&names, rows)?;
                    peft::no_grad(|| model.forward_mixed(&inputs, &names))?
                }
                None => peft::no_grad(|| model.forward(&inputs, false))?,
            }
        }
    };
    save_safetensors(
        &a.out,
        &[("logits".to_string(), logits.detach().to_dtype(DType::F32)?)],
    )?;
    println!("wrote logits {:?} to {}", logits.dims(), a.out.display());
    Ok(())
}

pub struct MergeArgs {
    pub model: PathBuf,
    pub adapter: Vec<String>,
    pub weights: Option<String>,
    pub combination_type: String,
    pub svd_rank: Option<usize>,
    pub svd_clamp: Option<f64>,
    pub density: Option<f64>,
    pub majority_sign_method: String,
    pub seed: u64,
    pub out: PathBuf,
}

/// Merges one adapter, or a weighted combination of several (PEFT's `add_weighted_adapter`
/// followed by `merge_and_unload`), into the base model.
pub fn merge(a: MergeArgs) -> Result<()> {
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let opts = LoadOptions {
        device: device()?,
        ..Default::default()
    };
    let mut peft_model = crate::adapters::load(&a.model, &specs, opts)?;
    if specs.len() > 1 || a.weights.is_some() {
        let weights: Vec<f64> = match &a.weights {
            Some(w) => w
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f64>()
                        .map_err(|_| Error::Config(format!("--weights: `{x}` is not a number")))
                })
                .collect::<Result<_>>()?,
            None => vec![1.0; specs.len()],
        };
        let wopts = peft::tuners::lora::weighted::WeightedOptions {
            combination_type: a.combination_type.parse()?,
            svd_rank: a.svd_rank,
            svd_clamp: a.svd_clamp,
            density: a.density,
            majority_sign_method: a.majority_sign_method.parse()?,
            seed: a.seed,
        };
        let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        let combined = "__weighted__";
        peft_model.add_weighted_adapter(&names, &weights, combined, &wopts)?;
        peft_model.set_adapter(combined)?;
        println!(
            "combined {} with weights {weights:?} ({})",
            names.join(", "),
            a.combination_type
        );
    }
    let merged = peft_model.merge_and_unload()?;
    models::save_pretrained(merged.as_ref(), &a.out)?;
    println!("merged model written to {}", a.out.display());
    Ok(())
}

pub fn inspect(dir: &Path) -> Result<()> {
    if dir.join(CONFIG_NAME).exists() {
        inspect_adapter(dir)
    } else if dir.join("config.json").exists() || peft::io::gguf::find_gguf(dir)?.is_some() {
        inspect_model(dir)
    } else {
        Err(Error::Config(format!(
            "{}: neither an adapter (adapter_config.json) nor a model (config.json or a .gguf file)",
            dir.display()
        )))
    }
}

fn inspect_adapter(dir: &Path) -> Result<()> {
    let config = read_json(&dir.join(CONFIG_NAME))?;
    let parsed = peft::PeftConfig::from_adapter_json(&config)?;
    println!("adapter: {}", dir.display());
    println!("method: {}", parsed.peft_type());
    println!(
        "config: {}",
        serde_json::to_string_pretty(&config).unwrap_or_default()
    );
    let tensors = peft::io::load_safetensors(&dir.join(WEIGHTS_NAME), &Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut total = 0;
    println!("tensors ({}):", names.len());
    for n in names {
        let t = &tensors[n];
        total += t.elem_count();
        println!("  {n} {:?} {:?}", t.dims(), t.dtype());
    }
    println!("parameters: {}", thousands(total));
    Ok(())
}

fn inspect_model(dir: &Path) -> Result<()> {
    let model = models::load(dir, &LoadOptions::default())?;
    let info = model.info();
    println!("model: {}", dir.display());
    println!(
        "model_type: {}  architecture: {}  task: {}",
        info.model_type,
        info.architecture,
        info.task.as_str()
    );
    let weights = match peft::io::gguf::find_gguf(dir)? {
        Some(gguf) if !dir.join("config.json").exists() => Weights::from_gguf(&gguf)?,
        _ => Weights::from_dir(dir)?,
    };
    println!("checkpoint tensors: {}", weights.names().count());
    let mut params = 0;
    let mut adaptable = Vec::new();
    for m in model.modules() {
        params += m.params().iter().map(|p| p.elem_count()).sum::<usize>();
        match &m {
            ModuleRef::Linear(l) => adaptable.push(format!(
                "  {} (Linear {} -> {})",
                l.name,
                l.in_features(),
                l.out_features()
            )),
            ModuleRef::Embedding(e) => adaptable.push(format!(
                "  {} (Embedding {} x {})",
                e.name,
                e.num_embeddings(),
                e.dim()
            )),
            ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) => {}
        }
    }
    println!("parameters: {}", thousands(params));
    println!("adaptable layers ({}):", adaptable.len());
    for l in adaptable {
        println!("{l}");
    }
    Ok(())
}

/// Training-step throughput of LoRA r=8 on query/value, the setup of
/// tools/reference/bench_train.py, printed as one JSON line.
pub fn bench(
    model_dir: &Path,
    batch: usize,
    seq_len: usize,
    steps: usize,
    warmup: usize,
) -> Result<()> {
    use peft::train::optim::{AdamW, AdamWParams};
    use peft::tuners::lora::LoraConfig;
    use peft::tuners::targets::ModuleSpec;
    use rand::{Rng, SeedableRng};
    use std::time::Instant;

    let device = device()?;
    let opts = LoadOptions {
        task: Some(TaskType::SeqCls),
        num_labels: Some(2),
        device: device.clone(),
        seed: 0,
    };
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        target_modules: Some(ModuleSpec::List(vec!["query".into(), "value".into()])),
        task_type: Some(TaskType::SeqCls),
        ..Default::default()
    };
    let model = get_peft_model_with_seed(models::load(model_dir, &opts)?, config, 0)?;
    let vocab = model.base_model().modules().iter().find_map(|m| match m {
        ModuleRef::Embedding(e) => Some(e.num_embeddings()),
        _ => None,
    });
    let vocab = vocab.unwrap_or(1000) as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|_| rng.random_range(1000..vocab))
        .collect();
    let inputs = Inputs {
        input_ids: Some(Tensor::from_vec(ids, (batch, seq_len), &device)?),
        attention_mask: Some(Tensor::ones((batch, seq_len), DType::U32, &device)?),
        ..Default::default()
    };
    let labels: Vec<i64> = (0..batch).map(|i| (i % 2) as i64).collect();
    let labels = Tensor::new(labels.as_slice(), &device)?;
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWParams::default())?;
    let mut timed = 0.0;
    for step in 0..warmup + steps {
        let t = Instant::now();
        let logits = model.forward(&inputs, true)?;
        let loss = peft::train::classification_loss(&logits, &labels)?;
        let t_f = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let t_b = t.elapsed().as_secs_f64();
        opt.step(&grads, 1e-4, 1.0)?;
        if std::env::var("PEFT_BENCH_SPLIT").is_ok() {
            eprintln!(
                "fwd {t_f:.3} bwd {:.3} opt {:.3}",
                t_b - t_f,
                t.elapsed().as_secs_f64() - t_b
            );
        }
        device.synchronize()?;
        if step >= warmup {
            timed += t.elapsed().as_secs_f64();
        }
    }
    let step_s = timed / steps as f64;
    println!(
        "{{\"impl\":\"peft-rs\",\"seq_per_s\":{:.2},\"step_s\":{:.4},\"peak_rss_mb\":{:.0},\"batch\":{batch},\"seq_len\":{seq_len}}}",
        batch as f64 / step_s,
        step_s,
        peak_rss_mb()
    );
    Ok(())
}

/// Peak resident set size of this process (VmHWM), in MB; 0 where /proc is unavailable.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
