//! Stable Diffusion pipelines: a diffusers pipeline directory (`model_index.json`, `unet/`,
//! `text_encoder/`, `vae/`, `tokenizer/`, `scheduler/`) loaded into our own models, the UNet and
//! the text encoder each inside a [`PeftModel`] so adapters attach to them as to any model;
//! prompt encoding, sampling with classifier-free guidance ([`StableDiffusion::generate`]),
//! adapters in PEFT's, diffusers' and kohya's files ([`lora_files`]), and writing the pipeline
//! back (merged) for diffusers to load.

pub mod lora_files;
pub mod scheduler;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::io::clip_tokenizer::ClipTokenizer;
use crate::io::{read_json, Weights};
use crate::layers::HeadInit;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKl;
use crate::models::{clip::ClipText, Inputs, LoadOptions, Model};
use crate::peft_model::PeftModel;
use crate::{Error, Result};
pub use scheduler::{NoiseSchedule, Prediction, Sampler, SamplerKind, SchedulerConfig};

/// The pipeline's components, by folder.
pub const COMPONENTS: [&str; 5] = ["unet", "text_encoder", "vae", "tokenizer", "scheduler"];

/// A Stable Diffusion 1.x / 2.x pipeline.
pub struct StableDiffusion {
    pub unet: PeftModel,
    pub text_encoder: PeftModel,
    pub vae: AutoencoderKl,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
    /// `scheduler/scheduler_config.json` as read.
    pub scheduler_json: Value,
    pub model_index: Value,
    pub dir: PathBuf,
    pub device: Device,
}

/// Whether `dir` looks like a diffusers pipeline directory.
pub fn is_pipeline(dir: &Path) -> bool {
    dir.join("model_index.json").exists()
}

fn missing(dir: &Path, what: &str) -> Error {
    Error::Config(format!(
        "{}: not a complete Stable Diffusion pipeline: {what} is missing (a diffusers pipeline \
         directory has model_index.json, unet/, text_encoder/, vae/, tokenizer/ and scheduler/)",
        dir.display()
    ))
}

fn load_component(dir: &Path, name: &str) -> Result<(Value, Weights, PathBuf)> {
    let sub = dir.join(name);
    if !sub.is_dir() {
        return Err(missing(dir, &format!("the `{name}/` folder")));
    }
    let cfg = sub.join("config.json");
    if !cfg.exists() {
        return Err(missing(dir, &format!("`{name}/config.json`")));
    }
    let config = read_json(&cfg)?;
    let weights = Weights::from_dir(&sub)?;
    Ok((config, weights, sub))
}

/// What [`StableDiffusion::generate`] makes.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Images per prompt.
    pub num_images: usize,
}

impl StableDiffusion {
    /// Loads the pipeline in `dir` on `device` (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        if !index_path.exists() {
            return Err(missing(dir, "model_index.json"));
        }
        let model_index = read_json(&index_path)?;
        for c in COMPONENTS {
            if !dir.join(c).is_dir() {
                return Err(missing(dir, &format!("the `{c}/` folder")));
            }
        }
        let opts = LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let init = HeadInit::new(0.02, 0);
        let (cfg, w, sub) = load_component(dir, "unet")?;
        let unet = UNet2DConditionModel::load(&w, &init, cfg, &sub, &opts)?;
        let (cfg, w, sub) = load_component(dir, "text_encoder")?;
        let text_encoder = ClipText::load(&w, &init, cfg, &sub, &opts)?;
        let (cfg, w, sub) = load_component(dir, "vae")?;
        let vae = AutoencoderKl::load(&w, &init, cfg, &sub, &opts)?;
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        if !sched_path.exists() {
            return Err(missing(dir, "`scheduler/scheduler_config.json`"));
        }
        let scheduler_json = read_json(&sched_path)?;
        let scheduler = SchedulerConfig::from_json(&scheduler_json)?;
        let unet_ctx = match &unet.cfg.cross_attention_dim {
            crate::models::unet::PerBlock::One(d) => *d,
            crate::models::unet::PerBlock::Many(v) => v[0],
        };
        if unet_ctx != text_encoder.cfg.hidden_size {
            return Err(Error::Config(format!(
                "{}: the UNet's cross_attention_dim is {unet_ctx} but the text encoder's \
                 hidden_size is {}; the components come from different pipelines",
                dir.display(),
                text_encoder.cfg.hidden_size
            )));
        }
        Ok(Self {
            unet: PeftModel::bare(Box::new(unet)),
            text_encoder: PeftModel::bare(Box::new(text_encoder)),
            vae,
            tokenizer,
            scheduler,
            scheduler_json,
            model_index,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// The VAE's `scaling_factor` (0.18215 in SD 1.x / 2.x).
    pub fn scaling_factor(&self) -> f64 {
        self.vae.cfg.scaling_factor
    }

    /// The UNet's latent channels and the VAE's downscaling factor.
    pub fn latent_shape(&self, height: usize, width: usize) -> Result<(usize, usize, usize)> {
        let f = 1usize << (self.vae.cfg.block_out_channels.len().saturating_sub(1));
        if !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(Error::Config(format!(
                "image size {width}x{height}: both sides must be multiples of {f} (the VAE's \
                 downscaling)"
            )));
        }
        Ok((self.unet_in_channels(), height / f, width / f))
    }

    fn unet_in_channels(&self) -> usize {
        self.unet
            .base_model()
            .info()
            .config
            .get("in_channels")
            .and_then(|v| v.as_u64())
            .unwrap_or(4) as usize
    }

    /// The UNet's `sample_size` times the VAE's scale factor: the default image side.
    pub fn default_size(&self) -> usize {
        let f = 1usize << (self.vae.cfg.block_out_channels.len().saturating_sub(1));
        let s = self
            .unet
            .base_model()
            .info()
            .config
            .get("sample_size")
            .and_then(|v| v.as_u64())
            .unwrap_or(64) as usize;
        s * f
    }

    /// The text encoder's last hidden state for each prompt, `[n, 77, hidden]`.
    pub fn encode_prompts(&self, prompts: &[&str], train: bool) -> Result<Tensor> {
        let ids = self.tokenizer.encode_batch(prompts, &self.device)?;
        self.encode_ids(&ids, train)
    }

    /// The text encoder on token ids `[n, seq]`.
    pub fn encode_ids(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.text_encoder.forward(&Inputs::new(ids.clone()), train)
    }

    /// The UNet's prediction for `latents` at `timestep` under `context`.
    pub fn predict(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let inputs = Inputs {
            sample: Some(latents.clone()),
            timestep: Some(timestep.clone()),
            encoder_hidden_states: Some(context.clone()),
            ..Default::default()
        };
        self.unet.forward(&inputs, train)
    }

    /// The denoising loop of diffusers' `StableDiffusionPipeline.__call__` from `latents`
    /// (already multiplied by the sampler's `init_noise_sigma`): with `guidance_scale > 1`,
    /// `context` holds the negative prompts' states then the prompts' (`[2n, ...]`) and each
    /// step runs both halves in one UNet batch, `uncond + g · (cond − uncond)`. `noise(i)` gives
    /// the ancestral sampler's noise at step `i`; `progress(i, n)` is called after each step.
    pub fn denoise(
        &self,
        mut latents: Tensor,
        context: &Tensor,
        guidance_scale: f64,
        sampler: &mut Sampler,
        noise: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let cfg = guidance_scale > 1.0;
        let steps = sampler.timesteps().to_vec();
        for (i, t) in steps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sampler.scale_model_input(&input, i)?;
            let tt = Tensor::new(&[*t as f32], &self.device)?;
            let pred = crate::no_grad(|| self.predict(&input, &tt, context, false))?;
            let pred = if cfg {
                let n = latents.dim(0)?;
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * guidance_scale)?)?
            } else {
                pred
            };
            let z = if sampler.needs_noise() {
                Some(noise(i, &latents)?)
            } else {
                None
            };
            latents = sampler.step(&pred, i, &latents, z.as_ref())?;
            progress(i + 1, steps.len());
        }
        Ok(latents)
    }

    /// Images in [0, 1] from the UNet's latents (divided by `scaling_factor` first).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.scaling_factor())?;
        let img = crate::no_grad(|| self.vae.decode(&z, false))?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// The latents of images `[n, 3, h, w]` in [-1, 1], times `scaling_factor`: the posterior's
    /// mean, or a draw from it with `noise`.
    pub fn encode_images(&self, images: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (mean, logvar) = crate::no_grad(|| self.vae.encode(images, false))?;
        let z = match noise {
            Some(n) => AutoencoderKl::sample_posterior(&mean, &logvar, n)?,
            None => mean,
        };
        Ok((z * self.scaling_factor())?)
    }

    /// Text-to-image: `[num_images, 3, height, width]` in [0, 1]. The initial latents and the
    /// ancestral noise come from one generator seeded with `opts.seed`.
    pub fn generate(
        &self,
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (c, h, w) = self.latent_shape(opts.height, opts.width)?;
        let n = opts.num_images.max(1);
        let mut sampler = Sampler::new(opts.sampler, &self.scheduler, opts.steps)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let mut gaussian = |shape: &[usize]| -> Result<Tensor> {
            let count: usize = shape.iter().product();
            let v: Vec<f32> = (0..count)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Ok(Tensor::from_vec(v, shape, &self.device)?)
        };
        let latents = (gaussian(&[n, c, h, w])? * sampler.init_noise_sigma())?;
        let prompts: Vec<&str> = vec![opts.prompt.as_str(); n];
        let cond = crate::no_grad(|| self.encode_prompts(&prompts, false))?;
        let context = if opts.guidance_scale > 1.0 {
            let negs: Vec<&str> = vec![opts.negative_prompt.as_str(); n];
            let uncond = crate::no_grad(|| self.encode_prompts(&negs, false))?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        };
        let mut noise = |_: usize, like: &Tensor| gaussian(like.dims());
        let latents = self.denoise(
            latents,
            &context,
            opts.guidance_scale,
            &mut sampler,
            &mut noise,
            progress,
        )?;
        self.decode_latents(&latents)
    }

    /// Writes the pipeline to `out` as diffusers lays it out, every component's weights as they
    /// are now (merged adapters included; adapters themselves are not written): UNet, text
    /// encoder and VAE weights and configs, the tokenizer and scheduler files copied.
    pub fn save_pretrained(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let write_json = |p: &Path, v: &Value| -> Result<()> {
            let s = serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))?;
            crate::io::write_atomic(p, s.as_bytes())
        };
        write_json(&out.join("model_index.json"), &self.model_index)?;
        let save = |name: &str, model: &dyn Model, file: &str| -> Result<()> {
            let sub = out.join(name);
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
            let mut tensors = Vec::new();
            for m in model.modules() {
                for p in m.params() {
                    tensors.push((p.name.clone(), p.base().detach()));
                }
            }
            crate::io::save_safetensors(&sub.join(file), &tensors)?;
            write_json(&sub.join("config.json"), &model.info().config)
        };
        save(
            "unet",
            self.unet.base_model(),
            "diffusion_pytorch_model.safetensors",
        )?;
        save(
            "text_encoder",
            self.text_encoder.base_model(),
            "model.safetensors",
        )?;
        save("vae", &self.vae, "diffusion_pytorch_model.safetensors")?;
        for folder in ["tokenizer", "scheduler"] {
            let src = self.dir.join(folder);
            let dst = out.join(folder);
            std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            for e in std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))? {
                let e = e.map_err(|e| Error::io(&src, e))?;
                if e.path().is_file() {
                    let bytes = std::fs::read(e.path()).map_err(|err| Error::io(e.path(), err))?;
                    crate::io::write_atomic(&dst.join(e.file_name()), &bytes)?;
                }
            }
        }
        // Other components (safety checker, feature extractor) are copied as they are.
        for e in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !COMPONENTS.contains(&name.as_str()) {
                copy_dir(&e.path(), &out.join(&name))?;
            }
        }
        Ok(())
    }
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()))?;
        } else {
            let bytes = std::fs::read(&p).map_err(|err| Error::io(&p, err))?;
            crate::io::write_atomic(&dst.join(e.file_name()), &bytes)?;
        }
    }
    Ok(())
}

/// A standard-normal tensor from `rng` (the DreamBooth trainer's and the sampler's noise).
pub fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let v: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(DType::F32)?)
}
