//! The subcommands, each a short composition of library calls.

use candle_core::{DType, Device, Tensor};
use peft::io::{read_json, save_safetensors, Weights};
use peft::layers::ModuleRef;
use peft::models::{self, LoadOptions};
use peft::peft_model::{thousands, CONFIG_NAME, WEIGHTS_NAME};
use peft::train::config::TrainConfig;
use peft::{Error, Inputs, LoraModelExt, Result};
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

/// `peft train`: the config file with `--set` overrides (and `--resume`), Ctrl-C saving a
/// checkpoint.
pub fn train(config_path: &Path, overrides: &[String], resume: Option<String>) -> Result<()> {
    let mut cfg = TrainConfig::from_toml_file_with(config_path, overrides)?;
    if resume.is_some() {
        cfg.training.resume_from_checkpoint = resume;
    }
    peft::train::install_interrupt_handler()?;
    peft::train::run::train(&cfg, &device()?)
}

/// `peft eval`: metrics of a trained adapter on the config's evaluation data.
pub fn eval(config_path: &Path, overrides: &[String], adapter: Option<&Path>) -> Result<()> {
    let cfg = TrainConfig::from_toml_file_with(config_path, overrides)?;
    peft::train::run::eval(&cfg, adapter, &device()?).map(|_| ())
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
            ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) | ModuleRef::Hook(_) => {}
        }
    }
    println!("parameters: {}", thousands(params));
    println!("adaptable layers ({}):", adaptable.len());
    for l in adaptable {
        println!("{l}");
    }
    Ok(())
}
