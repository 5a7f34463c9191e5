//! `peft bench`: training-step throughput (fixed-length random batches, AdamW) for a
//! classification or causal-LM model, or generation speed (greedy, a fixed number of new tokens),
//! of any model `peft` loads (a Hugging Face directory or a GGUF file). The adapter is LoRA r=8
//! unless a PEFT config file names another method. Prints one JSON line, the same fields as the
//! PyTorch references in tools/reference/ (bench_train.py, bench_train_causal.py,
//! bench_generate.py), so the two can be put side by side.

use candle_core::{DType, Tensor};
use clap::Args;
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions};
use peft::peft_model::get_peft_model_with_seed;
use peft::train::data::Targets;
use peft::train::eval::training_loss;
use peft::train::optim::{AdamW, AdamWParams};
use peft::tuners::lora::LoraConfig;
use peft::tuners::targets::ModuleSpec;
use peft::tuners::PeftConfig;
use peft::{Error, Inputs, Result, TaskType};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

use crate::args::{parse_device, DeviceArg, QuantArgs, TaskTypeArg, DEVICE_HELP};

#[derive(Args)]
pub struct BenchArgs {
    /// A model directory or GGUF file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The head: SEQ_CLS or CAUSAL_LM for training steps; generation uses the LM head
    /// (SEQ_2_SEQ_LM for T5) whatever this says.
    #[arg(long, alias = "task", value_enum, ignore_case = true, default_value_t = TaskTypeArg::SeqCls)]
    pub task_type: TaskTypeArg,
    /// Comma-separated LoRA target modules (default: PEFT's for the model type).
    #[arg(long, value_delimiter = ',', value_name = "NAME,NAME,...")]
    pub target_modules: Option<Vec<String>>,
    /// A PEFT config JSON (any method, as in adapter_config.json) to train instead of LoRA.
    #[arg(long, conflicts_with = "target_modules", value_name = "FILE")]
    pub peft_config: Option<PathBuf>,
    /// Time generating this many new tokens per row (prompts of --seq-len random ids) instead
    /// of training.
    #[arg(long, value_name = "N")]
    pub generate: Option<usize>,
    /// With --generate: attach this many LoRA adapters (r=8 on q/v, random non-zero weights)
    /// and time the batch twice, every row through the first adapter and the rows spread over
    /// all of them (a mixed batch, as `peft serve` runs requests for different adapters).
    #[arg(long, value_name = "N", requires = "generate")]
    pub adapters: Option<usize>,
    /// Time the forward pass instead (no gradients, dropout off) with the LoRA adapter (r=8,
    /// random non-zero weights) switched on and off in turn (`disable_adapter`), and report
    /// the adapter's overhead.
    #[arg(long, conflicts_with = "generate")]
    pub inference: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row (the prompt length with --generate).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Timed steps (or generation runs; the best run is reported).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
    /// bf16 frozen weights and compute, fp32 adapter weights (the trainer's `bf16 = true`).
    #[arg(long)]
    pub bf16: bool,
    /// Recompute each block in backward (the trainer's `gradient_checkpointing = true`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[command(flatten)]
    pub quant: QuantArgs,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let task_type = TaskType::from(a.task_type);
    if a.generate.is_none() && !matches!(task_type, TaskType::SeqCls | TaskType::CausalLm) {
        return Err(Error::Config(format!(
            "peft bench trains SEQ_CLS or CAUSAL_LM, not {}",
            task_type.as_str()
        )));
    }
    let device = crate::args::device(a.device)?;
    let task = match (a.generate, task_type) {
        (Some(_), TaskType::Seq2SeqLm) | (None, _) => task_type,
        (Some(_), _) => TaskType::CausalLm,
    };
    let opts = LoadOptions {
        task: Some(task),
        num_labels: (task_type == TaskType::SeqCls).then_some(2),
        device: device.clone(),
        seed: 0,
        quantization: a.quant.config()?,
        keep_gguf_quantized: a.quant.keep_gguf_quantized,
    };
    let base = models::load(&a.model, &opts)?;
    let vocab = base.dims().vocab_size as u32;
    // Random ids away from the special tokens at the start of most vocabularies.
    let low = (vocab / 10).min(1000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut random_ids =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(low..vocab)).collect() };

    if let Some(new_tokens) = a.generate {
        let prompts: Vec<Vec<u32>> = (0..a.batch).map(|_| random_ids(a.seq_len)).collect();
        let cfg = GenerationConfig {
            max_new_tokens: new_tokens,
            // An id outside the vocabulary: no row stops early, every run makes `new_tokens`.
            eos_token_ids: vec![vocab],
            ..Default::default()
        };
        let time = |model: &dyn Fn() -> Result<peft::generation::Generated>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for run in 0..a.warmup + a.steps {
                let t = Instant::now();
                let out = model()?;
                device.synchronize()?;
                let s = t.elapsed().as_secs_f64();
                if out.tokens.iter().any(|r| r.len() != new_tokens) {
                    return Err(Error::Data("generation stopped early".into()));
                }
                if run >= a.warmup {
                    best = best.min(s);
                }
            }
            Ok(best)
        };
        let report = |mode: &str, best: f64| {
            println!(
                "{{\"impl\":\"peft\",\"mode\":\"{mode}\",\"tokens_per_s\":{:.2},\"seconds\":{best:.3},\"batch\":{},\"prompt_len\":{},\"new_tokens\":{new_tokens},\"peak_rss_mb\":{:.0}}}",
                (a.batch * new_tokens) as f64 / best,
                a.batch,
                a.seq_len,
                peak_rss_mb()
            )
        };
        let Some(n) = a.adapters.filter(|&n| n > 0) else {
            report(
                "generate",
                time(&|| generate(base.as_ref(), &prompts, &cfg, None))?,
            );
            return Ok(());
        };
        let lora = |alpha: f64| {
            let mut c = LoraConfig {
                r: 8,
                lora_alpha: alpha,
                target_modules: a.target_modules.clone().map(ModuleSpec::List),
                // Random non-zero B: every adapter really changes its rows.
                init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
                ..Default::default()
            };
            c.base.task_type = Some(task);
            PeftConfig::new(c)
        };
        let mut model = get_peft_model_with_seed(base, lora(16.0), "a0", 0)?;
        for i in 1..n {
            model.add_adapter(&format!("a{i}"), lora(16.0 + i as f64))?;
        }
        report(
            "generate-single-adapter",
            time(&|| generate(&model, &prompts, &cfg, None))?,
        );
        let rows: Vec<String> = (0..a.batch).map(|i| format!("a{}", i % n)).collect();
        let mixed = model.with_adapter_names(&rows)?;
        report(
            &format!("generate-mixed-{n}-adapters"),
            time(&|| generate(&mixed, &prompts, &cfg, None))?,
        );
        return Ok(());
    }

    if a.inference {
        let (b, t) = (a.batch, a.seq_len);
        let ids = Tensor::from_vec(random_ids(b * t), (b, t), &device)?;
        return inference(a, base, task, &ids);
    }

    let config = adapter_config(
        a,
        task_type,
        LoraConfig {
            lora_dropout: 0.1,
            ..Default::default()
        },
    )?;
    let method = match config.downcast_ref::<LoraConfig>() {
        Some(c) if c.use_dora => "DORA",
        _ => config.peft_type(),
    };
    let mut model = get_peft_model_with_seed(base, config, "default", 0)?;
    // false where the CPU has no bf16 matrix instructions and the step stays fp32.
    let bf16 = a.bf16 && model.autocast_bf16()?;
    let (b, t) = (a.batch, a.seq_len);
    let ids = Tensor::from_vec(random_ids(b * t), (b, t), &device)?;
    let inputs = bench_inputs(&ids)?;
    let labels = match task_type {
        TaskType::SeqCls => {
            let l: Vec<i64> = (0..b).map(|i| (i % 2) as i64).collect();
            Tensor::new(l.as_slice(), &device)?
        }
        TaskType::CausalLm => ids.to_dtype(DType::I64)?,
        other => {
            return Err(Error::Config(format!(
                "peft bench trains SEQ_CLS or CAUSAL_LM, not {}",
                other.as_str()
            )))
        }
    };
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWParams::default())?;
    let mut timed = 0.0;
    for step in 0..a.warmup + a.steps {
        let start = Instant::now();
        // The loss as the trainer computes it (an input method's virtual positions included).
        let checkpointing = if a.gradient_checkpointing {
            Some(model.gradient_checkpointing().ok_or_else(|| {
                Error::Config("this model's blocks cannot be checkpointed".into())
            })?)
        } else {
            None
        };
        let targets = match task_type {
            TaskType::CausalLm => Targets::Tokens(labels.clone()),
            _ => Targets::Class(labels.clone()),
        };
        let mut loss = training_loss(&model, task_type, &inputs, &targets)?;
        // The method's own loss term and per-step hook (AdaLoRA), as the trainer runs them.
        if let Some(reg) = model.regularization_loss()? {
            loss = (loss + reg)?;
        }
        let t_f = start.elapsed().as_secs_f64();
        let grads = peft::grad::backward(&loss)?;
        drop(checkpointing);
        let t_b = start.elapsed().as_secs_f64();
        opt.step(&grads, 1e-4, 1.0)?;
        model.update_and_allocate(step, &grads)?;
        // `peft -v bench`: where each step's time goes.
        tracing::debug!(
            "step {step}: fwd {t_f:.3} bwd {:.3} opt {:.3}",
            t_b - t_f,
            start.elapsed().as_secs_f64() - t_b
        );
        device.synchronize()?;
        if step >= a.warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    let step_s = timed / a.steps.max(1) as f64;
    let trainable: usize = model
        .trainable_parameters()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    println!(
        "{{\"impl\":\"peft\",\"method\":\"{method}\",\"task\":\"{}\",\"seq_per_s\":{:.2},\"step_s\":{step_s:.4},\"peak_rss_mb\":{:.0},\"batch\":{b},\"seq_len\":{t},\"trainable\":{trainable},\"base\":\"{}\",\"gradient_checkpointing\":{},\"gemm_bf16\":\"{}\"}}",
        task_type.as_str(),
        b as f64 / step_s,
        peak_rss_mb(),
        base_kind(a, bf16),
        a.gradient_checkpointing,
        peft::ops::gemm::bf16_backend().name()
    );
    Ok(())
}

/// `peft bench --inference`: the best forward time over `steps` runs with the adapter on and
/// with it off, alternating so that both see the same machine; the overhead is their ratio
/// minus one (tools/reference/bench_inference.py measures PyTorch + PEFT the same way).
fn inference(
    a: &BenchArgs,
    base: Box<dyn models::Model>,
    task: TaskType,
    ids: &Tensor,
) -> Result<()> {
    let config = adapter_config(
        a,
        task,
        LoraConfig {
            // Random non-zero B: the adapter really changes the output, as a trained one does.
            init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
            ..Default::default()
        },
    )?;
    let mut model = get_peft_model_with_seed(base, config, "default", 0)?;
    let (b, t) = ids.dims2()?;
    let device = ids.device();
    let inputs = bench_inputs(ids)?;
    let (mut on, mut off) = (f64::INFINITY, f64::INFINITY);
    for run in 0..a.warmup + a.steps {
        for disabled in [false, true] {
            model.disable_adapter_layers(disabled)?;
            let start = Instant::now();
            let out = peft::no_grad(|| model.forward(&inputs, false))?;
            device.synchronize()?;
            let s = start.elapsed().as_secs_f64();
            drop(out);
            if run >= a.warmup {
                let best = if disabled { &mut off } else { &mut on };
                *best = best.min(s);
            }
        }
    }
    model.disable_adapter_layers(false)?;
    println!(
        "{{\"impl\":\"peft\",\"mode\":\"inference\",\"task\":\"{}\",\"adapter_s\":{on:.4},\"base_s\":{off:.4},\"overhead\":{:.4},\"batch\":{b},\"seq_len\":{t},\"peak_rss_mb\":{:.0}}}",
        task.as_str(),
        on / off - 1.0,
        peak_rss_mb()
    );
    Ok(())
}

/// The adapter a benchmark runs, for `task`: `--peft-config` when given, else `lora` with
/// r = 8, alpha = 16 on `--target-modules` (the other fields as `lora` sets them).
fn adapter_config(a: &BenchArgs, task: TaskType, lora: LoraConfig) -> Result<PeftConfig> {
    let mut config = match &a.peft_config {
        Some(path) => PeftConfig::from_user_json(&peft::io::read_json(path)?)?,
        None => PeftConfig::new(LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: a.target_modules.clone().map(ModuleSpec::List),
            ..lora
        }),
    };
    config.set_task_type(task);
    Ok(config)
}

/// The model inputs for `ids` (`[batch, len]`): an all-ones mask, and task 0 for every row
/// (multitask prompt tuning needs task ids; other methods ignore them).
fn bench_inputs(ids: &Tensor) -> Result<Inputs> {
    let (b, t) = ids.dims2()?;
    let device = ids.device();
    Ok(Inputs {
        input_ids: Some(ids.clone()),
        attention_mask: Some(Tensor::ones((b, t), DType::U32, device)?),
        task_ids: Some(Tensor::zeros(b, DType::U32, device)?),
        ..Default::default()
    })
}

/// How the frozen base was stored, for the JSON line: `f32`, `f32+bf16`, `nf4-dq`,
/// `nf4-dq-bfloat16`, `int8`, ...
fn base_kind(a: &BenchArgs, bf16: bool) -> String {
    let q = &a.quant;
    let mut kind = if q.load_in_4bit {
        q.bnb_4bit_quant_type
            .clone()
            .unwrap_or_else(|| "fp4".into())
    } else if q.load_in_8bit {
        "int8".into()
    } else if a.quant.keep_gguf_quantized {
        "gguf-blocks".into()
    } else {
        "f32".into()
    };
    if q.bnb_4bit_use_double_quant {
        kind.push_str("-dq");
    }
    if let Some(d) = &q.bnb_4bit_compute_dtype {
        // The 4-bit products' dtype, when named (`nf4-dq-bfloat16`).
        kind.push('-');
        kind.push_str(d.trim_start_matches("torch."));
    }
    if bf16 {
        kind.push_str("+bf16");
    }
    kind
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
