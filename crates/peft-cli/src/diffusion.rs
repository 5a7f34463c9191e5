//! The Stable Diffusion side of the CLI: `peft generate-image`, and what `peft train`, `peft
//! merge` and `peft forward` do when given a diffusers pipeline folder (or one of its
//! components).

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use peft::diffusion::lora_files::AdapterFormat;
use peft::diffusion::{GenerateOptions, SamplerKind, StableDiffusion};
use peft::io::image as img;
use peft::train::dreambooth::{DreamBoothConfig, DreamBoothJob};
use peft::{Error, Inputs, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::args::{device, parse_device, DeviceArg, DEVICE_HELP};

/// `--scheduler`: the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulerArg {
    /// DDIM (deterministic, eta 0).
    Ddim,
    /// Euler (Karras et al.'s discretisation of the probability-flow ODE).
    Euler,
    /// Euler ancestral (adds fresh noise at each step).
    #[value(name = "euler-a")]
    EulerA,
    /// DPM-Solver++ (2M), multistep second order.
    #[value(name = "dpm++")]
    DpmPP,
}

impl From<SchedulerArg> for SamplerKind {
    fn from(s: SchedulerArg) -> Self {
        match s {
            SchedulerArg::Ddim => SamplerKind::Ddim,
            SchedulerArg::Euler => SamplerKind::Euler,
            SchedulerArg::EulerA => SamplerKind::EulerAncestral,
            SchedulerArg::DpmPP => SamplerKind::DpmSolverPP,
        }
    }
}

#[derive(Args)]
pub struct GenerateImageArgs {
    /// A diffusers Stable Diffusion pipeline folder (model_index.json, unet/, text_encoder/,
    /// vae/, tokenizer/, scheduler/), SD 1.x or 2.x.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// An adapter: PEFT's unet/ + text_encoder/ folders, diffusers'
    /// pytorch_lora_weights.safetensors (or its folder) or a kohya .safetensors file; NAME=PATH
    /// and repeat for several, combined with --weights.
    #[arg(long, value_name = "[NAME=]PATH")]
    pub adapter: Vec<String>,
    /// One weight per adapter, comma-separated (diffusers' set_adapters weights; default 1).
    #[arg(long, value_name = "W,W,...", allow_hyphen_values = true)]
    pub weights: Option<String>,
    /// What to draw.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional prompt).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub steps: usize,
    /// Classifier-free guidance scale (1: no guidance, one UNet pass per step).
    #[arg(long, default_value_t = 7.5, value_name = "G")]
    pub guidance_scale: f64,
    /// The sampler [default: the pipeline's scheduler when it is one of these, else ddim].
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerArg>,
    /// Seed of the initial latents (and of Euler ancestral's noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels [default: the UNet's sample_size times the VAE's scale].
    #[arg(long, value_name = "PX")]
    pub width: Option<usize>,
    /// Image height in pixels [default: as --width].
    #[arg(long, value_name = "PX")]
    pub height: Option<usize>,
    /// Images to make; with more than one, OUT gets `-0`, `-1`, ... before its extension.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,
    /// The PNG file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
}

/// Parses `--weights`.
pub fn parse_weights(w: Option<&str>, n: usize) -> Result<Vec<f64>> {
    let Some(w) = w else {
        return Ok(vec![1.0; n]);
    };
    let v: Vec<f64> = w
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| Error::Config(format!("--weights: `{x}` is not a number")))
        })
        .collect::<Result<_>>()?;
    if v.len() != n {
        return Err(Error::Config(format!(
            "--weights has {} values for {n} adapters; give one per --adapter",
            v.len()
        )));
    }
    Ok(v)
}

/// Loads the pipeline with every adapter of `specs` on it, weighted.
pub fn load_pipeline(
    model: &Path,
    specs: &[(String, PathBuf)],
    weights: &[f64],
    device: &Device,
) -> Result<StableDiffusion> {
    let mut pipe = StableDiffusion::load(model, device)?;
    let mut unet_names = Vec::new();
    let mut te_names = Vec::new();
    for ((name, path), w) in specs.iter().zip(weights) {
        let done = pipe.load_adapter(path, name, false)?;
        tracing::info!(
            "adapter `{name}` ({}) on the {}",
            path.display(),
            done.join(" and ")
        );
        if done.contains(&"unet") {
            unet_names.push((name.as_str(), *w));
        }
        if done.contains(&"text_encoder") {
            te_names.push((name.as_str(), *w));
        }
    }
    for (m, list) in [
        (&mut pipe.unet, &unet_names),
        (&mut pipe.text_encoder, &te_names),
    ] {
        if !list.is_empty() {
            let names: Vec<&str> = list.iter().map(|(n, _)| *n).collect();
            let ws: Vec<f64> = list.iter().map(|(_, w)| *w).collect();
            m.set_adapters_weighted(&names, &ws)?;
        }
    }
    Ok(pipe)
}

fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// `peft generate-image`.
pub fn generate_image(a: GenerateImageArgs) -> Result<()> {
    if a.out.is_dir() {
        return Err(Error::Config(format!(
            "--out {}: is a directory; give a PNG file name, e.g. {}",
            a.out.display(),
            a.out.join("image.png").display()
        )));
    }
    let device = device(a.device)?;
    let specs = crate::adapters::parse_specs(&a.adapter)?;
    let weights = parse_weights(a.weights.as_deref(), specs.len())?;
    let pipe = load_pipeline(&a.model, &specs, &weights, &device)?;
    let sampler = match a.scheduler {
        Some(s) => s.into(),
        None => {
            let class = pipe.scheduler.class_name.clone().unwrap_or_default();
            SamplerKind::from_class(&class).unwrap_or_else(|| {
                tracing::info!("the pipeline's {class} is not offered here; sampling with DDIM");
                SamplerKind::Ddim
            })
        }
    };
    let side = pipe.default_size();
    let width = a.width.or(a.height).unwrap_or(side);
    let height = a.height.or(a.width).unwrap_or(side);
    let opts = GenerateOptions {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        sampler,
        seed: a.seed,
        width,
        height,
        num_images: a.num_images,
    };
    let bar = ProgressBar::with_draw_target(Some(a.steps as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !crate::logging::shows_info() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let t0 = Instant::now();
    let images = pipe.generate(&opts, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    for i in 0..a.num_images {
        let path = numbered(&a.out, i, a.num_images);
        img::save_png(&path, &img::to_rgb(&images.get(i)?)?)?;
        println!("{}", path.display());
    }
    tracing::info!(
        "{} image(s) of {width}x{height}, {} {} steps in {secs:.1} s ({:.3} s/step)",
        a.num_images,
        a.steps,
        sampler.name(),
        secs / a.steps.max(1) as f64
    );
    Ok(())
}

/// `peft train` on a pipeline: a DreamBooth run.
pub fn train_dreambooth(config: &Path, set: &[String], dev: Option<DeviceArg>) -> Result<()> {
    let cfg = DreamBoothConfig::from_toml_file_with(config, set)?;
    let device = device(dev)?;
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let mut job = DreamBoothJob::prepare(&cfg, &device, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message("generating class images");
    })?;
    bar.finish_and_clear();
    peft::train::install_interrupt_handler(job.stop.clone())?;
    if job.generated_class_images > 0 {
        tracing::info!(
            "generated {} class images in {}",
            job.generated_class_images,
            cfg.data
                .class_data_dir
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        );
    }
    println!("{}", job.trainable_parameters_line());
    let mut progress = crate::logging::TrainProgress::new(crate::logging::shows_info());
    let r = job.run(Some(&mut progress))?;
    drop(progress);
    println!(
        "trained {} steps in {:.1} s ({:.2} s/step), final loss {:.4}",
        r.steps,
        r.seconds,
        r.seconds / r.steps.max(1) as f64,
        r.final_loss
    );
    for f in &r.saved {
        println!("saved {}", f.display());
    }
    Ok(())
}

/// `peft merge` on a pipeline: the adapters merged into the UNet and text encoder, the whole
/// pipeline written to `out`.
pub fn merge_pipeline(
    model: &Path,
    specs: &[(String, PathBuf)],
    weights: Option<&str>,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let weights = parse_weights(weights, specs.len())?;
    let mut pipe = load_pipeline(model, specs, &weights, device)?;
    pipe.unet.merge_adapter()?;
    pipe.text_encoder.merge_adapter()?;
    pipe.save_pretrained(out)?;
    tracing::info!("merged pipeline written to {}", out.display());
    Ok(())
}

/// `--format` of `peft convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// PEFT's folders: OUT/unet/ and OUT/text_encoder/ (adapter_config.json +
    /// adapter_model.safetensors).
    Peft,
    /// diffusers' OUT/pytorch_lora_weights.safetensors (what load_lora_weights reads).
    Diffusers,
    /// A kohya-ss file, OUT/lora_kohya.safetensors (lora_unet_ / lora_te_ keys with alphas),
    /// as sd-scripts and the web UIs read it.
    Kohya,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The Stable Diffusion pipeline folder the adapter belongs to.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The adapter, in any of the three layouts.
    #[arg(long, value_name = "PATH")]
    pub adapter: PathBuf,
    /// The layout to write.
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// The folder to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Option<DeviceArg>,
}

/// `peft convert`: an adapter of a pipeline rewritten in another layout.
pub fn convert(a: ConvertArgs) -> Result<()> {
    let mut pipe = StableDiffusion::load(&a.model, &device(a.device)?)?;
    pipe.load_adapter(&a.adapter, "default", false)?;
    let format = match a.format {
        FormatArg::Peft => AdapterFormat::Peft,
        FormatArg::Diffusers => AdapterFormat::Diffusers,
        FormatArg::Kohya => AdapterFormat::Kohya,
    };
    for f in pipe.save_adapter(&a.out, "default", format)? {
        println!("{}", f.display());
    }
    Ok(())
}

/// The named tensors of `--inputs` as a model's inputs (transformers' and diffusers' names).
pub fn inputs_from_file(path: &Path, device: &Device) -> Result<Inputs> {
    let mut t = peft::io::load_safetensors(path, device)?;
    let ids = |t: Option<Tensor>| -> Result<Option<Tensor>> {
        t.map(|x| x.to_dtype(DType::U32).map_err(Error::from))
            .transpose()
    };
    let known = [
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "decoder_input_ids",
        "sample",
        "timestep",
        "encoder_hidden_states",
    ];
    let mut unknown: Vec<&String> = t.keys().filter(|k| !known.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::Data(format!(
            "{}: unknown input tensors {unknown:?}; the inputs are named as transformers and \
             diffusers name them: {}",
            path.display(),
            known.join(", ")
        )));
    }
    let float = |t: Option<Tensor>| -> Result<Option<Tensor>> {
        t.map(|x| x.to_dtype(DType::F32).map_err(Error::from))
            .transpose()
    };
    Ok(Inputs {
        input_ids: ids(t.remove("input_ids"))?,
        attention_mask: ids(t.remove("attention_mask"))?,
        token_type_ids: ids(t.remove("token_type_ids"))?,
        decoder_input_ids: ids(t.remove("decoder_input_ids"))?,
        sample: float(t.remove("sample"))?,
        timestep: float(t.remove("timestep"))?,
        encoder_hidden_states: float(t.remove("encoder_hidden_states"))?,
        ..Default::default()
    })
}
