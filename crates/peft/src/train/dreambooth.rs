//! DreamBooth fine-tuning of a Stable Diffusion pipeline's adapters, as diffusers' and PEFT's
//! DreamBooth example scripts train them: a folder of pictures of the subject with an instance
//! prompt (or a caption per picture), optionally class pictures with a class prompt for prior
//! preservation (generated with the base pipeline when there are fewer than
//! `num_class_images`); each step encodes the pictures with the VAE (a draw from the posterior,
//! times `scaling_factor`), adds DDPM noise at random timesteps, and regresses the UNet's
//! prediction on the noise (or the velocity, as the scheduler config says) with an MSE loss,
//! the class half weighted by `prior_loss_weight`. The UNet's adapter always trains, the text
//! encoder's when the config has one.
//!
//! The config is the `peft train` TOML with `[model] path` a diffusers pipeline folder:
//! `[peft]` the UNet's adapter, `[peft_text_encoder]` the text encoder's (optional), `[data]`
//! the pictures ([`DreamBoothData`]), `[training]` the usual arguments.

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::callback::{StepInfo, TrainerCallback, TrainerEvent};
use super::config::{apply_override_in, section_error, TrainingArguments};
use super::optim::{clip_scale, norm_of, AdamW, AdamWParams};
use super::schedule::{warmup_steps, Schedule};
use super::trainer::StopSignal;
use crate::diffusion::scheduler::NoiseSchedule;
use crate::diffusion::{randn, GenerateOptions, SamplerKind, StableDiffusion};
use crate::io::image::{self as img, Preprocess};
use crate::tuners::PeftConfig;
use crate::{Error, Result};

const TABLES: [&str; 5] = ["model", "peft", "peft_text_encoder", "data", "training"];

/// `[model]` of a DreamBooth config: the pipeline folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    pub path: PathBuf,
}

/// `[data]` of a DreamBooth config, with the names of diffusers' `train_dreambooth_lora.py`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothData {
    /// Pictures of the subject (PNG or JPEG).
    pub instance_data_dir: PathBuf,
    /// The prompt naming the subject (`a photo of sks dog`).
    pub instance_prompt: String,
    /// Per-picture prompts: JSON lines `{"file_name": ..., "text": ...}` (the `metadata.jsonl`
    /// of an image folder) or a CSV with those columns; pictures it does not list use
    /// `instance_prompt`.
    pub captions_file: Option<PathBuf>,
    /// Pictures of the subject's class, for prior preservation.
    pub class_data_dir: Option<PathBuf>,
    pub class_prompt: Option<String>,
    /// With prior preservation, the class pictures wanted; missing ones are generated with the
    /// base pipeline from `class_prompt` into `class_data_dir`.
    #[serde(default = "default_class_images")]
    pub num_class_images: usize,
    #[serde(default = "one")]
    pub prior_loss_weight: f64,
    /// Side of the square training pictures (a multiple of the VAE's downscaling).
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    /// Center crop instead of a random crop after resizing the shorter side.
    #[serde(default)]
    pub center_crop: bool,
    #[serde(default)]
    pub random_flip: bool,
    /// Steps of the sampler that generates missing class pictures.
    #[serde(default = "default_class_steps")]
    pub class_sample_steps: usize,
}

fn default_class_images() -> usize {
    100
}
fn one() -> f64 {
    1.0
}
fn default_resolution() -> usize {
    512
}
fn default_class_steps() -> usize {
    25
}

/// A DreamBooth run's config.
#[derive(Debug, Clone)]
pub struct DreamBoothConfig {
    pub pipeline: PathBuf,
    /// The UNet's adapter.
    pub peft: PeftConfig,
    /// The text encoder's adapter, when it trains too.
    pub peft_text_encoder: Option<PeftConfig>,
    pub data: DreamBoothData,
    pub training: TrainingArguments,
}

/// Whether the `peft train` config at `path` trains a diffusion pipeline (its `[model] path` is
/// a diffusers pipeline folder).
pub fn is_pipeline_config(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(value
        .get("model")
        .and_then(|m| m.get("path"))
        .and_then(|p| p.as_str())
        .is_some_and(|p| crate::diffusion::is_pipeline(Path::new(p))))
}

fn peft_table(value: &toml::Table, name: &str) -> Result<Option<PeftConfig>> {
    let Some(t) = value.get(name) else {
        return Ok(None);
    };
    let json = serde_json::to_value(t).map_err(|e| Error::Config(e.to_string()))?;
    PeftConfig::from_user_json(&json)
        .map(Some)
        .map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("[{name}] {m}")),
            other => other,
        })
}

impl DreamBoothConfig {
    pub fn from_toml_file_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str_with(&text, overrides).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_toml_str_with(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        for o in overrides {
            apply_override_in(&mut value, o, &TABLES)?;
        }
        for k in value.keys() {
            if !TABLES.contains(&k.as_str()) {
                let near = crate::tuners::nearest(k, &TABLES.map(String::from));
                return Err(Error::Config(format!(
                    "unknown table `[{k}]`{near}; a DreamBooth config has [model], [peft], \
                     [peft_text_encoder] (optional), [data] and [training]"
                )));
            }
        }
        let table = |name: &str| -> Result<toml::Value> {
            value
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("missing table `[{name}]`")))
        };
        let model: PipelineSection = table("model")?
            .try_into()
            .map_err(|e| section_error("model", e))?;
        let data: DreamBoothData = table("data")?
            .try_into()
            .map_err(|e| section_error("data", e))?;
        let training: TrainingArguments = match value.get("training") {
            Some(t) => t
                .clone()
                .try_into()
                .map_err(|e| section_error("training", e))?,
            None => TrainingArguments::default(),
        };
        training.validate()?;
        if training.resume_from_checkpoint.is_some() {
            return Err(Error::Config(
                "[training] resume_from_checkpoint: DreamBooth runs start from the adapter in \
                 their config; to continue one, load its saved adapter as the starting point"
                    .into(),
            ));
        }
        let peft = peft_table(&value, "peft")?
            .ok_or_else(|| Error::Config("missing table `[peft]`".into()))?;
        let peft_text_encoder = peft_table(&value, "peft_text_encoder")?;
        if data.class_data_dir.is_some() != data.class_prompt.is_some() {
            return Err(Error::Config(
                "[data] prior preservation needs both class_data_dir and class_prompt".into(),
            ));
        }
        Ok(Self {
            pipeline: model.path,
            peft,
            peft_text_encoder,
            data,
            training,
        })
    }
}

/// One training picture: its decoded pixels and its prompt.
#[derive(Clone)]
pub struct Picture {
    pub path: PathBuf,
    pub rgb: image::RgbImage,
    pub prompt: String,
}

/// The images (PNG, JPEG) of a folder, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && img::is_image(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Per-file prompts from a captions file (see [`DreamBoothData::captions_file`]).
pub fn read_captions(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let records = super::data::read_records(path)?;
    let mut out = std::collections::HashMap::new();
    for r in records {
        let get = |k: &str| r.fields.get(k).and_then(|v| v.as_str()).map(String::from);
        let (Some(file), Some(text)) = (get("file_name"), get("text")) else {
            return Err(Error::Data(format!(
                "{}:{}: a captions row needs `file_name` and `text`",
                path.display(),
                r.line
            )));
        };
        out.insert(file, text);
    }
    Ok(out)
}

/// The pictures of `dir`, each with its caption or `prompt`. Fails on an undecodable file.
pub fn load_pictures(
    dir: &Path,
    prompt: &str,
    captions: Option<&std::collections::HashMap<String, String>>,
) -> Result<Vec<Picture>> {
    let files = image_files(dir)?;
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let prompt = captions
                .and_then(|c| c.get(&name))
                .cloned()
                .unwrap_or_else(|| prompt.to_string());
            Ok(Picture {
                rgb: img::open_rgb(&path)?,
                path,
                prompt,
            })
        })
        .collect()
}

/// One batch: the pictures `[n, 3, r, r]` in [-1, 1] and their prompts' ids `[n, 77]`; with
/// prior preservation the first half are the subject's, the second the class's.
pub struct DreamBoothBatch {
    pub pixel_values: Tensor,
    pub input_ids: Tensor,
    pub with_prior: bool,
}

/// What a step draws at random, given here so a step can be replayed.
pub struct StepNoise {
    /// The posterior draw's noise, `[n, latent_channels, h, w]`.
    pub vae_noise: Tensor,
    /// The diffusion noise, same shape.
    pub noise: Tensor,
    /// One training timestep per row.
    pub timesteps: Vec<usize>,
}

/// The DreamBooth loss of one batch (diffusers' training step): MSE between the UNet's
/// prediction and its target; with prior preservation `mse(subject) + w · mse(class)`.
/// `train_text_encoder`: the text encoder runs with gradients (and its dropout).
pub fn dreambooth_loss(
    pipe: &StableDiffusion,
    schedule: &NoiseSchedule,
    batch: &DreamBoothBatch,
    noise: &StepNoise,
    prior_loss_weight: f64,
    train_text_encoder: bool,
) -> Result<Tensor> {
    let latents = pipe.encode_images(&batch.pixel_values, Some(&noise.vae_noise))?;
    let noisy = schedule.add_noise(&latents, &noise.noise, &noise.timesteps)?;
    let context = if train_text_encoder {
        pipe.encode_ids(&batch.input_ids, true)?
    } else {
        crate::no_grad(|| pipe.encode_ids(&batch.input_ids, false))?
    };
    let t: Vec<f32> = noise.timesteps.iter().map(|t| *t as f32).collect();
    let t = Tensor::new(t.as_slice(), &pipe.device)?;
    let pred = pipe.predict(&noisy, &t, &context, true)?;
    let target = schedule.target(&latents, &noise.noise, &noise.timesteps)?;
    let mse = |a: &Tensor, b: &Tensor| -> Result<Tensor> { Ok((a - b)?.sqr()?.mean_all()?) };
    if batch.with_prior {
        let n = pred.dim(0)? / 2;
        let inst = mse(&pred.narrow(0, 0, n)?, &target.narrow(0, 0, n)?)?;
        let prior = mse(&pred.narrow(0, n, n)?, &target.narrow(0, n, n)?)?;
        Ok((inst + (prior * prior_loss_weight)?)?)
    } else {
        mse(&pred, &target)
    }
}

/// A prepared DreamBooth run: the pipeline with its adapters attached, and the pictures.
pub struct DreamBoothJob {
    pub config: DreamBoothConfig,
    pub pipe: StableDiffusion,
    pub instance: Vec<Picture>,
    pub class: Vec<Picture>,
    /// Class pictures generated by [`DreamBoothJob::prepare`].
    pub generated_class_images: usize,
    /// Ends the run after its current step, saving the adapter trained so far (hand a clone to
    /// [`super::install_interrupt_handler`] for Ctrl-C).
    pub stop: StopSignal,
}

/// What a DreamBooth run did.
#[derive(Debug, Clone)]
pub struct DreamBoothReport {
    pub steps: usize,
    pub final_loss: f64,
    pub seconds: f64,
    /// Files of the saved adapter (PEFT's `unet/`, `text_encoder/`, and diffusers' file).
    pub saved: Vec<PathBuf>,
    /// Class pictures generated before training.
    pub generated_class_images: usize,
}

impl DreamBoothJob {
    /// Loads the pipeline and the pictures (generating missing class pictures with the base
    /// pipeline, reporting each to `progress`), then attaches the adapters.
    pub fn prepare(
        config: &DreamBoothConfig,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let mut pipe = StableDiffusion::load(&config.pipeline, device)?;
        let d = &config.data;
        pipe.latent_shape(d.resolution, d.resolution)?;
        let captions = d.captions_file.as_deref().map(read_captions).transpose()?;
        let instance = load_pictures(&d.instance_data_dir, &d.instance_prompt, captions.as_ref())?;
        if instance.is_empty() {
            return Err(Error::Data(format!(
                "{}: no PNG or JPEG pictures in instance_data_dir",
                d.instance_data_dir.display()
            )));
        }
        let mut generated = 0;
        let class = match (&d.class_data_dir, &d.class_prompt) {
            (Some(dir), Some(prompt)) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let have = image_files(dir)?.len();
                if have < d.num_class_images {
                    generated = d.num_class_images - have;
                    generate_class_images(
                        &pipe,
                        dir,
                        prompt,
                        have,
                        generated,
                        d,
                        config.training.seed,
                        progress,
                    )?;
                }
                load_pictures(dir, prompt, None)?
            }
            _ => Vec::new(),
        };
        let seed = config.training.seed;
        pipe.unet.set_seed(seed);
        pipe.unet.add_adapter("default", config.peft.clone())?;
        if let Some(te) = &config.peft_text_encoder {
            pipe.text_encoder.set_seed(seed.wrapping_add(1));
            pipe.text_encoder.add_adapter("default", te.clone())?;
        }
        Ok(Self {
            config: config.clone(),
            pipe,
            instance,
            class,
            generated_class_images: generated,
            stop: StopSignal::new(),
        })
    }

    /// `trainable params: ...` for the UNet and, when it trains, the text encoder.
    pub fn trainable_parameters_line(&self) -> String {
        let mut s = format!("unet: {}", self.pipe.unet.trainable_parameters_line());
        if self.config.peft_text_encoder.is_some() {
            s.push_str(&format!(
                "\ntext_encoder: {}",
                self.pipe.text_encoder.trainable_parameters_line()
            ));
        }
        s
    }

    /// A batch of rows `rows` of the dataset (diffusers' DreamBoothDataset: item `i` is
    /// subject picture `i % n` and class picture `i % m`), drawing crops and flips from `rng`.
    pub fn batch(&self, rows: &[usize], rng: &mut rand::rngs::StdRng) -> Result<DreamBoothBatch> {
        let d = &self.config.data;
        let device = &self.pipe.device;
        let mut pics: Vec<&Picture> = rows
            .iter()
            .map(|i| &self.instance[i % self.instance.len()])
            .collect();
        let with_prior = !self.class.is_empty();
        if with_prior {
            pics.extend(rows.iter().map(|i| &self.class[i % self.class.len()]));
        }
        let mut tensors = Vec::with_capacity(pics.len());
        let mut prompts = Vec::with_capacity(pics.len());
        for p in pics {
            let pre = Preprocess {
                resolution: d.resolution,
                center_crop: d.center_crop,
                flip: d.random_flip && rng.random_bool(0.5),
                crop_at: (rng.random::<f64>(), rng.random::<f64>()),
            };
            tensors.push(img::to_tensor(&p.rgb, &pre, device)?);
            prompts.push(p.prompt.as_str());
        }
        Ok(DreamBoothBatch {
            pixel_values: Tensor::stack(&tensors, 0)?,
            input_ids: self.pipe.tokenizer.encode_batch(&prompts, device)?,
            with_prior,
        })
    }

    /// Trains, reporting to `callback`, and saves the adapter in `output_dir` (PEFT's `unet/`
    /// and `text_encoder/` folders, and diffusers' `pytorch_lora_weights.safetensors` for a
    /// LoRA) plus `metrics.jsonl`; checkpoints every `save_steps` under `checkpoint-N/`.
    pub fn run(
        &mut self,
        mut callback: Option<&mut dyn TrainerCallback>,
    ) -> Result<DreamBoothReport> {
        let args = self.config.training.clone();
        let d = self.config.data.clone();
        let train_te = self.config.peft_text_encoder.is_some();
        let schedule_noise = NoiseSchedule::new(&self.pipe.scheduler)?;
        let mut vars = self.pipe.unet.trainable_parameters();
        if train_te {
            vars.extend(
                self.pipe
                    .text_encoder
                    .trainable_parameters()
                    .into_iter()
                    .map(|(k, v)| (format!("text_encoder.{k}"), v)),
            );
        }
        if vars.is_empty() {
            return Err(Error::Training(
                "the adapters have no trainable parameters".into(),
            ));
        }
        let bs = args.per_device_train_batch_size;
        let k = args.gradient_accumulation_steps;
        let len = self.instance.len().max(self.class.len());
        let micro_per_epoch = len.div_ceil(bs);
        let steps_per_epoch = micro_per_epoch.div_ceil(k).max(1);
        let total = if args.max_steps > 0 {
            args.max_steps as usize
        } else {
            (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
        };
        let schedule = Schedule {
            kind: args.lr_scheduler_type,
            base_lr: args.learning_rate,
            warmup: warmup_steps(args.warmup_steps, args.warmup_ratio, total),
            total,
            lr_end: args.lr_end,
            power: args.power,
        };
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
        )?;
        crate::ops::seed_dropout(args.seed);
        let out_dir = args.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics =
            std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
        if let Some(cb) = callback.as_deref_mut() {
            cb.on_event(&TrainerEvent::Begin {
                total_steps: total,
                start_step: 0,
                resumed_from: None,
            });
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let (c, h, w) = self.pipe.latent_shape(d.resolution, d.resolution)?;
        let n_train = self.pipe.scheduler.num_train_timesteps;
        let started = Instant::now();
        let mut order: Vec<usize> = Vec::new();
        let mut cursor = 0;
        let mut epoch = 0usize;
        let (mut window_loss, mut window_n) = (0.0, 0usize);
        let mut last_loss = f64::NAN;
        let mut examples = 0usize;
        let mut done = 0usize;
        for step in 0..total {
            let mut sums: Vec<Option<Tensor>> = vec![None; opt.vars().count()];
            let mut step_loss = 0.0;
            for _ in 0..k {
                if cursor >= order.len() {
                    order = (0..len).collect();
                    order.shuffle(&mut rng);
                    cursor = 0;
                    epoch += 1;
                }
                let rows: Vec<usize> = order[cursor..(cursor + bs).min(order.len())].to_vec();
                cursor += rows.len();
                let batch = self.batch(&rows, &mut rng)?;
                let n = batch.pixel_values.dim(0)?;
                let step_noise = StepNoise {
                    vae_noise: randn(&mut rng, &[n, c, h, w], &self.pipe.device)?,
                    noise: randn(&mut rng, &[n, c, h, w], &self.pipe.device)?,
                    timesteps: (0..n).map(|_| rng.random_range(0..n_train)).collect(),
                };
                let loss = dreambooth_loss(
                    &self.pipe,
                    &schedule_noise,
                    &batch,
                    &step_noise,
                    d.prior_loss_weight,
                    train_te,
                )?;
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    return Err(Error::Training(format!(
                        "the loss is {value} at step {}; lower the learning rate",
                        step + 1
                    )));
                }
                step_loss += value / k as f64;
                let grads = (loss / k as f64)?.backward()?;
                for (s, g) in sums.iter_mut().zip(opt.gradients(&grads)) {
                    *s = match (s.take(), g) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        (a, b) => a.or(b),
                    };
                }
                examples += rows.len();
            }
            let norm = norm_of(&sums)?;
            let lr = schedule.lr(step);
            opt.step_with(&sums, lr, clip_scale(norm, args.max_grad_norm))?;
            last_loss = step_loss;
            window_loss += step_loss;
            window_n += 1;
            let info = StepInfo {
                step: step + 1,
                total_steps: total,
                epoch: epoch.saturating_sub(1) as f64 + cursor as f64 / len.max(1) as f64,
                loss: step_loss,
                learning_rate: lr,
                grad_norm: norm,
                examples_per_second: examples as f64 / started.elapsed().as_secs_f64().max(1e-9),
            };
            if let Some(cb) = callback.as_deref_mut() {
                cb.on_event(&TrainerEvent::Step(&info));
            }
            if args.logging_steps > 0 && ((step + 1) % args.logging_steps == 0 || step + 1 == total)
            {
                let logged = StepInfo {
                    loss: window_loss / window_n.max(1) as f64,
                    ..info.clone()
                };
                let line = serde_json::json!({
                    "step": logged.step, "epoch": logged.epoch, "loss": logged.loss,
                    "learning_rate": logged.learning_rate, "grad_norm": logged.grad_norm,
                });
                writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
                (window_loss, window_n) = (0.0, 0);
                if let Some(cb) = callback.as_deref_mut() {
                    cb.on_event(&TrainerEvent::Log(&logged));
                }
            }
            let save_now = args.save_strategy == super::config::Interval::Steps
                && args.save_steps > 0
                && (step + 1) % args.save_steps == 0
                && step + 1 < total;
            if save_now {
                let t0 = Instant::now();
                let dir = out_dir.join(format!("checkpoint-{}", step + 1));
                self.pipe.save_training_adapter(&dir, "default")?;
                super::checkpoint::rotate(&out_dir, args.save_total_limit, None)?;
                if let Some(cb) = callback.as_deref_mut() {
                    cb.on_event(&TrainerEvent::Save {
                        step: step + 1,
                        dir: &dir,
                        seconds: t0.elapsed().as_secs_f64(),
                    });
                }
            }
            done = step + 1;
            if self.stop.is_requested() && done < total {
                tracing::warn!(
                    "stopped after step {done} of {total}; the adapter trained so far goes to {}",
                    out_dir.display()
                );
                break;
            }
        }
        let saved = self.pipe.save_training_adapter(&out_dir, "default")?;
        if let Some(cb) = callback {
            cb.on_event(&TrainerEvent::End { steps: done });
        }
        Ok(DreamBoothReport {
            steps: done,
            final_loss: last_loss,
            seconds: started.elapsed().as_secs_f64(),
            saved,
            generated_class_images: self.generated_class_images,
        })
    }
}

/// Generates `count` class pictures (`class_<index>.png`) with the base pipeline, as diffusers'
/// script does before training with prior preservation.
#[allow(clippy::too_many_arguments)]
fn generate_class_images(
    pipe: &StableDiffusion,
    dir: &Path,
    prompt: &str,
    have: usize,
    count: usize,
    d: &DreamBoothData,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let sampler = pipe
        .scheduler
        .class_name
        .as_deref()
        .and_then(SamplerKind::from_class)
        .unwrap_or(SamplerKind::Ddim);
    for i in 0..count {
        let opts = GenerateOptions {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: d.class_sample_steps,
            guidance_scale: 7.5,
            sampler,
            seed: seed.wrapping_add(1000 + (have + i) as u64),
            width: d.resolution,
            height: d.resolution,
            num_images: 1,
        };
        let image = pipe.generate(&opts, &mut |_, _| {})?;
        let rgb = img::to_rgb(&image.get(0)?)?;
        img::save_png(&dir.join(format!("class_{:04}.png", have + i)), &rgb)?;
        progress(i + 1, count);
    }
    Ok(())
}
