//! The subcommands, each a short composition of library calls.

use candle_core::{DType, Device, Tensor};
use clap::Args;
use peft::io::{read_json, save_safetensors, Weights};
use peft::layers::ModuleRef;
use peft::models::{self, LoadOptions};
use peft::peft_model::{thousands, CONFIG_NAME, WEIGHTS_NAME};
use peft::train::config::TrainConfig;
use peft::train::dist::ProcessGroup;
use peft::train::run::{Evaluation, TrainJob};
use peft::train::Outcome;
use peft::{Error, Inputs, LoraModelExt, Result};
use std::path::{Path, PathBuf};

use crate::args::{
    device, parse_device, CombinationArg, DeviceArg, MajoritySignArg, QuantArgs, TaskTypeArg,
    DEVICE_HELP,
};

#[derive(Args)]
pub struct TrainArgs {
    /// The job's TOML file: [model] (path, task_type, num_labels), [peft] (adapter_config.json
    /// fields), [data] and [training] (TrainingArguments names).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config value: `--set training.learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from a checkpoint directory, or without a value from the newest
    /// `checkpoint-N` in output_dir.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "last")]
    pub resume: Option<String>,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

/// `peft train`: the config file with `--set` overrides (and `--resume`), Ctrl-C saving a
/// checkpoint. Prints the trainable-parameter line, then after training the metrics and where
/// the adapter went; progress and logs go to stderr. Under `mpirun` / `srun` (built with
/// `--features mpi`) each process trains on its shard of every batch and only rank 0 prints
/// and writes; an error on any rank ends the whole job.
pub fn train(a: TrainArgs) -> Result<()> {
    let group = ProcessGroup::from_env()?;
    let result = train_in(a, &group);
    if let Err(e) = &result {
        if group.is_distributed() {
            eprintln!(
                "error on rank {} of {}: {e}\nstopping every process of the job",
                group.rank(),
                group.world_size()
            );
            group.abort(1);
        }
    }
    result
}

fn train_in(a: TrainArgs, group: &ProcessGroup) -> Result<()> {
    if peft::train::dreambooth::is_pipeline_config(&a.config)? {
        if a.resume.is_some() {
            return Err(Error::Config(
                "--resume: a DreamBooth run starts from the adapter in its config".into(),
            ));
        }
        if group.is_distributed() {
            return Err(Error::Config(
                "DreamBooth training runs in one process; launch it without mpirun".into(),
            ));
        }
        return crate::diffusion::train_dreambooth(&a.config, &a.set, a.device);
    }
    let mut cfg = TrainConfig::from_toml_file_with(&a.config, &a.set)?;
    a.quant.apply(&mut cfg.model.quantization)?;
    cfg.model.keep_gguf_quantized |= a.quant.keep_gguf_quantized;
    if a.resume.is_some() {
        cfg.training.resume_from_checkpoint = a.resume;
    }
    let device = rank_device(a.device, group)?;
    let mut job = TrainJob::prepare(&cfg, &device)?;
    job.group = group.clone().for_device(&device)?;
    peft::train::install_interrupt_handler(job.stop.clone())?;
    let main = group.is_main();
    if main {
        println!("{}", job.model.trainable_parameters_line());
        if group.is_distributed() {
            println!(
                "data-parallel on {} processes: effective batch {} ({} per process x {} \
                 accumulation steps x {} processes)",
                group.world_size(),
                cfg.training.per_device_train_batch_size
                    * cfg.training.gradient_accumulation_steps
                    * group.world_size(),
                cfg.training.per_device_train_batch_size,
                cfg.training.gradient_accumulation_steps,
                group.world_size()
            );
        }
    }
    let mut progress = crate::logging::TrainProgress::new(main && crate::logging::shows_info());
    let out = job.run(Some(&mut progress))?;
    drop(progress);
    if !main {
        return Ok(());
    }
    let r = &out.report;
    println!(
        "trained {} steps ({:.2} epochs) in {:.1} s, {:.1} examples/s, final loss {:.4}",
        r.steps, r.epochs, r.seconds, r.examples_per_second, r.final_loss
    );
    if group.is_distributed() {
        println!(
            "all-reduce: {:.3} s on rank 0 ({:.1} ms per step, {:.1} % of the run)",
            r.communication_seconds,
            1e3 * r.communication_seconds / r.steps.max(1) as f64,
            100.0 * r.communication_seconds / r.seconds.max(1e-9)
        );
    }
    if let Outcome::Interrupted(dir) = &r.outcome {
        println!("checkpoint saved to {}", dir.display());
        return Ok(());
    }
    if let Some(e) = &out.eval {
        print_metrics(e);
    }
    println!(
        "adapter saved to {} (metrics.jsonl, curves.png, curves.svg, README.md)",
        out.output_dir.display()
    );
    Ok(())
}

/// `--device` for this rank: in a data-parallel job, `cuda` (or the default on a GPU build) is
/// the GPU of the process's local rank, one GPU per process.
fn rank_device(arg: Option<DeviceArg>, group: &ProcessGroup) -> Result<Device> {
    if !group.is_distributed() {
        return device(arg);
    }
    let gpu = match arg {
        Some(DeviceArg::Cuda(_)) => true,
        Some(DeviceArg::Cpu) => false,
        None => cfg!(feature = "cuda") && candle_core::utils::cuda_is_available(),
    };
    device(Some(if gpu {
        DeviceArg::Cuda(group.local_rank())
    } else {
        DeviceArg::Cpu
    }))
}

/// The metrics block `peft train` and `peft eval` print (stdout).
fn print_metrics(e: &Evaluation) {
    let n = e.examples;
    println!("eval metrics ({n} examples):");
    for (k, v) in &e.metrics {
        println!("  {k}: {v:.4}");
    }
    if let Some(acc) = e.metrics.get("accuracy") {
        println!("test accuracy: {acc:.4} ({n} examples)");
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// The job's TOML file (as for `peft train`): the model, the data and the batch size.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Adapter directory; default: the config's output_dir.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// AdapterDrop: evaluate with these layers running without their adapters, e.g. 0,1,2.
    #[arg(long, value_name = "L,L,...", value_delimiter = ',')]
    pub skip_layers: Vec<usize>,
    /// Override a config value: `--set data.eval_file=test.jsonl` (repeatable).
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

/// `peft eval`: metrics of a trained adapter on the config's evaluation data.
pub fn eval(a: EvalArgs) -> Result<()> {
    let mut cfg = TrainConfig::from_toml_file_with(&a.config, &a.set)?;
    a.quant.apply(&mut cfg.model.quantization)?;
    cfg.model.keep_gguf_quantized |= a.quant.keep_gguf_quantized;
    let e = peft::train::run::eval_skipping(
        &cfg,
        a.adapter.as_deref(),
        &device(a.device)?,
        &a.skip_layers,
    )?;
    tracing::info!("evaluated on {}", e.source);
    print_metrics(&e);
    Ok(())
}

#[derive(Args)]
pub struct ForwardArgs {
    /// The base model: a Hugging Face model directory or a GGUF file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// An adapter directory, or NAME=DIR; repeat for several adapters (the first is active).
    #[arg(long, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// One adapter name per input row, comma-separated (`__base__`: no adapter): a mixed
    /// batch, each row through its own adapter.
    #[arg(long, value_name = "NAME,NAME,...")]
    pub adapter_names: Option<String>,
    /// Equal-length rows of token ids as JSON, e.g. '[[101, 2023, 102]]'.
    #[arg(long, value_name = "JSON", required_unless_present = "inputs")]
    pub input_ids: Option<String>,
    /// The inputs as named tensors in a safetensors file, as transformers and diffusers name
    /// them: input_ids, attention_mask, token_type_ids, decoder_input_ids; a UNet's sample,
    /// timestep and encoder_hidden_states; a VAE's sample (an image in [-1, 1], or latents to
    /// decode). Every output is then written under its name (logits or last_hidden_state,
    /// pooler_output, sample, latent_dist.mean, latent_dist.logvar).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["input_ids", "attention_mask", "token_type_ids", "decoder_input_ids"])]
    pub inputs: Option<PathBuf>,
    /// Same shape as --input-ids; 1 for real tokens, 0 for padding.
    #[arg(long, value_name = "JSON")]
    pub attention_mask: Option<String>,
    /// Same shape as --input-ids; segment ids for BERT-style pairs.
    #[arg(long, value_name = "JSON")]
    pub token_type_ids: Option<String>,
    /// Encoder-decoder models (T5): the decoder's token ids, equal-length rows as JSON, one
    /// row per --input-ids row; logits are then [batch, decoder positions, vocab].
    #[arg(long, value_name = "JSON")]
    pub decoder_input_ids: Option<String>,
    /// An AdapterFusion directory (AdapterHub's `adapter_fusion_config.json`, or a PEFT-layout
    /// ADAPTER_FUSION adapter) over the --adapter NAME=DIR adapters it names: runs
    /// Fuse(adapters), with the head saved beside the fusion if there is one.
    #[arg(long, value_name = "DIR")]
    pub fusion: Option<PathBuf>,
    /// AdapterDrop: run these layers without their adapters, e.g. 0,1,2 (AdapterHub's
    /// skip_layers; an encoder-decoder model's decoder layers follow its encoder layers).
    #[arg(long, value_name = "L,L,...", value_delimiter = ',')]
    pub skip_layers: Vec<usize>,
    /// One task id per input row as JSON, e.g. '[0, 2]': PEFT's `task_ids`, for adapters with a
    /// prompt per task (multitask prompt tuning).
    #[arg(long, value_name = "JSON")]
    pub task_ids: Option<String>,
    /// The head to use when no adapter says (default: from config.json's architectures).
    #[arg(long, value_enum, ignore_case = true)]
    pub task_type: Option<TaskTypeArg>,
    /// Classes of a classification head (default: config.json's).
    #[arg(long, value_name = "N")]
    pub num_labels: Option<usize>,
    /// The safetensors FILE to write, holding one f32 tensor `logits` (a file, not a directory).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

/// Parses `--task-ids '[0, 2]'`: one task id per row of a batch of `rows`.
pub(crate) fn parse_task_ids(json: &str, rows: usize) -> Result<Vec<u32>> {
    let ids: Vec<u32> = serde_json::from_str(json).map_err(|e| {
        Error::Data(format!(
            "--task-ids: expected a JSON list of non-negative integers, one per row: {e}"
        ))
    })?;
    if ids.len() != rows {
        return Err(Error::Data(format!(
            "--task-ids has {} ids for {rows} rows; give one task id per row",
            ids.len()
        )));
    }
    Ok(ids)
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
    if a.out.is_dir() {
        return Err(Error::Config(format!(
            "--out {}: is a directory; `peft forward` writes a safetensors file, e.g. --out {}",
            a.out.display(),
            a.out.join("logits.safetensors").display()
        )));
    }
    let device = device(a.device)?;
    if let Some(file) = &a.inputs {
        return forward_named(&a, file, &device);
    }
    let input_ids = parse_matrix(
        "input-ids",
        a.input_ids.as_deref().unwrap_or_default(),
        &device,
    )?;
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
        task_ids: a
            .task_ids
            .as_deref()
            .map(|t| {
                let ids = parse_task_ids(t, input_ids.dim(0)?)?;
                Ok::<_, Error>(Tensor::new(ids.as_slice(), &device)?)
            })
            .transpose()?,
        input_ids: Some(input_ids.clone()),
        ..Default::default()
    };
    let mut opts = LoadOptions {
        task: a.task_type.map(Into::into),
        num_labels: a.num_labels,
        device,
        seed: 42,
        quantization: a.quant.config()?,
        keep_gguf_quantized: a.quant.keep_gguf_quantized,
    };
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let rows = input_ids.dim(0)?;
    if specs.is_empty() && (a.fusion.is_some() || !a.skip_layers.is_empty()) {
        return Err(Error::Config(
            "--fusion and --skip-layers act on adapters: pass --adapter [NAME=]DIR".into(),
        ));
    }
    if let Some(f) = &a.fusion {
        // The fusion decides the base model's head (its own head, or the fused adapters').
        peft::peft_model::base_task(f, &mut opts)?;
    }
    let logits = match (specs.is_empty(), &a.adapter_names) {
        (true, Some(_)) => {
            return Err(Error::Config(
                "--adapter-names needs the adapters it names: pass --adapter NAME=DIR".into(),
            ))
        }
        (true, None) => models::load(&a.model, &opts)?.forward(&inputs, false)?,
        (false, names) => {
            let mut model = crate::adapters::load(&a.model, &specs, opts)?;
            if let Some(f) = &a.fusion {
                model.load_adapter(f, "fusion", false)?;
                model.set_adapter("fusion")?;
            }
            if !a.skip_layers.is_empty() {
                model.set_skip_layers(Some(&a.skip_layers))?;
            }
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
    tracing::info!("wrote logits {:?} to {}", logits.dims(), a.out.display());
    Ok(())
}

/// `peft forward --inputs FILE`: named tensors in, every named output out.
fn forward_named(a: &ForwardArgs, file: &Path, device: &Device) -> Result<()> {
    let inputs = crate::diffusion::inputs_from_file(file, device)?;
    let opts = LoadOptions {
        task: a.task_type.map(Into::into),
        num_labels: a.num_labels,
        device: device.clone(),
        seed: 42,
        quantization: a.quant.config()?,
        keep_gguf_quantized: a.quant.keep_gguf_quantized,
    };
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let outputs = if specs.is_empty() {
        let model = models::load(&a.model, &opts)?;
        peft::no_grad(|| model.outputs(&inputs, false))?
    } else {
        let model = crate::adapters::load(&a.model, &specs, opts)?;
        if model.active_adapters().len() == 1 && a.adapter_names.is_none() {
            // The adapters live in the layers: the base model's outputs carry them.
            peft::no_grad(|| model.base_model().outputs(&inputs, false))?
        } else {
            return Err(Error::Config(
                "--inputs with --adapter-names is not offered; run one adapter at a time".into(),
            ));
        }
    };
    let tensors: Vec<(String, Tensor)> = outputs
        .into_iter()
        .map(|(n, t)| Ok((n, t.detach().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    save_safetensors(&a.out, &tensors)?;
    for (n, t) in &tensors {
        tracing::info!("wrote {n} {:?} to {}", t.dims(), a.out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model: a Hugging Face model directory, a GGUF file, or a Stable Diffusion
    /// pipeline folder (then the adapters go into its UNet and text encoder, --weights scaling
    /// each as diffusers' set_adapters does, and the whole pipeline is written).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// An adapter directory, or NAME=DIR; repeat to merge a weighted combination of several.
    #[arg(long, required = true, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// One weight per adapter, comma-separated (default: 1 each); negative subtracts.
    #[arg(long, value_name = "W,W,...", allow_hyphen_values = true)]
    pub weights: Option<String>,
    /// How several adapters combine (PEFT's add_weighted_adapter).
    #[arg(long, value_enum, default_value_t = CombinationArg::Svd)]
    pub combination_type: CombinationArg,
    /// Rank of the _svd combinations (default: the largest input rank).
    #[arg(long, value_name = "R")]
    pub svd_rank: Option<usize>,
    /// Quantile at which _svd factors are clamped.
    #[arg(long, value_name = "Q")]
    pub svd_clamp: Option<f64>,
    /// Fraction of entries TIES / DARE / magnitude pruning keep (needed by those).
    #[arg(long, value_name = "D")]
    pub density: Option<f64>,
    /// TIES sign election.
    #[arg(long, value_enum, default_value_t = MajoritySignArg::Total)]
    pub majority_sign_method: MajoritySignArg,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The model DIRECTORY to write (created if missing): config.json, model.safetensors and
    /// the tokenizer files, loadable by transformers.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// With a quantized base: merge into the dequantized weights and write a dense model in
    /// this dtype (no re-quantization, no quantization_config), instead of PEFT's
    /// dequantize-add-requantize. Also casts a dense base.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dequantize: Option<DenseDtypeArg>,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
}

/// `--dequantize` of `peft merge`: the dtype of the dense merged model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DenseDtypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
}

impl DenseDtypeArg {
    fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Merges one adapter, or a weighted combination of several (PEFT's `add_weighted_adapter`
/// followed by `merge_and_unload`), into the base model.
pub fn merge(a: MergeArgs) -> Result<()> {
    if a.out.exists() && !a.out.is_dir() {
        return Err(Error::Config(format!(
            "--out {}: is a file; `peft merge` writes a model directory",
            a.out.display()
        )));
    }
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    if peft::diffusion::is_pipeline(&a.model) {
        // diffusers' way: each adapter's update at its weight (set_adapters), then merged.
        return crate::diffusion::merge_pipeline(
            &a.model,
            &specs,
            a.weights.as_deref(),
            &a.out,
            &device(a.device)?,
        );
    }
    let combination = a.combination_type.to_peft()?;
    let several = specs.len() > 1 || a.weights.is_some();
    if several && combination.needs_density() && a.density.is_none() {
        return Err(Error::Config(format!(
            "--combination-type {} needs --density (the fraction of entries kept, e.g. 0.5)",
            a.combination_type.name()
        )));
    }
    let opts = LoadOptions {
        device: device(a.device)?,
        ..Default::default()
    };
    let mut peft_model = crate::adapters::load(&a.model, &specs, opts)?;
    if several {
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
            combination_type: combination,
            svd_rank: a.svd_rank,
            svd_clamp: a.svd_clamp,
            density: a.density,
            majority_sign_method: a.majority_sign_method.into(),
            seed: a.seed,
        };
        let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        let combined = "__weighted__";
        peft_model.add_weighted_adapter(&names, &weights, combined, &wopts)?;
        peft_model.set_adapter(combined)?;
        tracing::info!(
            "combined {} with weights {weights:?} ({})",
            names.join(", "),
            a.combination_type.name()
        );
    }
    let merged = match a.dequantize {
        Some(d) => peft_model.merge_and_unload_dequantized(d.dtype())?,
        None => peft_model.merge_and_unload()?,
    };
    models::save_pretrained(merged.as_ref(), &a.out)?;
    tracing::info!("merged model written to {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// An adapter directory (adapter_config.json), a model directory (config.json) or a GGUF
    /// file or a directory holding one.
    pub dir: PathBuf,
}

pub fn inspect(dir: &Path) -> Result<()> {
    if peft::diffusion::is_pipeline(dir) {
        // A Stable Diffusion pipeline: each model component in turn.
        for c in ["unet", "text_encoder", "vae"] {
            inspect_model(&dir.join(c))?;
            println!();
        }
        Ok(())
    } else if peft::tuners::foreign_format(dir).is_some() {
        inspect_adapterhub(dir)
    } else if dir.join(CONFIG_NAME).exists() {
        inspect_adapter(dir)
    } else if dir.join("config.json").exists() || peft::io::gguf::find_gguf(dir)?.is_some() {
        inspect_model(dir)
    } else {
        Err(Error::Config(format!(
            "{}: neither an adapter (adapter_config.json), a model (config.json or a .gguf file) \
             nor a diffusers pipeline (model_index.json)",
            dir.display()
        )))
    }
}

/// An AdapterHub directory: its adapter or fusion, and the head saved with it.
fn inspect_adapterhub(dir: &Path) -> Result<()> {
    use peft::io::adapterhub::{read, ADAPTER, FUSION, HEAD};
    println!("adapter: {} (AdapterHub layout)", dir.display());
    let mut total = 0;
    for (what, pair) in [("fusion", FUSION), ("adapter", ADAPTER), ("head", HEAD)] {
        let Some(saved) = read(dir, pair, &Device::Cpu)? else {
            continue;
        };
        println!("{what} ({}):", pair.config);
        println!(
            "{}",
            serde_json::to_string_pretty(&saved.json).unwrap_or_default()
        );
        let mut names: Vec<&String> = saved.tensors.keys().collect();
        names.sort();
        println!("{what} tensors ({}):", names.len());
        for n in names {
            let t = &saved.tensors[n];
            total += t.elem_count();
            println!("  {n} {:?} {:?}", t.dims(), t.dtype());
        }
    }
    println!("parameters: {}", thousands(total));
    Ok(())
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
    let mut seen = std::collections::HashSet::new();
    let mut adaptable = Vec::new();
    for m in model.modules() {
        // A tensor shared by two layers (tied embeddings) counts once, as in PyTorch.
        params += m
            .params()
            .iter()
            .filter(|p| seen.insert(p.base().id()))
            .map(|p| p.elem_count())
            .sum::<usize>();
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
            ModuleRef::Conv2d(c) => {
                let (kh, kw) = c.kernel();
                adaptable.push(format!(
                    "  {} (Conv2d {} -> {}, {kh}x{kw})",
                    c.name,
                    c.in_channels(),
                    c.out_channels()
                ))
            }
            ModuleRef::LayerNorm(_)
            | ModuleRef::GroupNorm(_)
            | ModuleRef::RmsNorm(_)
            | ModuleRef::Hook(_) => {}
        }
    }
    println!("parameters: {}", thousands(params));
    println!("adaptable layers ({}):", adaptable.len());
    for l in adaptable {
        println!("{l}");
    }
    Ok(())
}
