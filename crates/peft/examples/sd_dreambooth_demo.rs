//! A short DreamBooth run on the tiny random Stable Diffusion pipeline of the test fixtures,
//! and the README's before/after grid: four pictures of a red disc on a white ground (drawn
//! here), a LoRA on the UNet's attention, feed-forward and resnet convolutions and on the text
//! encoder, then the same four seeds sampled without and with the adapter.
//!
//! ```sh
//! cargo run --release -p peft --example sd_dreambooth_demo -- [OUT_DIR] [STEPS]
//! ```
//!
//! Writes `OUT_DIR/instance/*.png`, the adapter (`OUT_DIR/adapter/unet/`, `text_encoder/`,
//! `pytorch_lora_weights.safetensors`) and `OUT_DIR/grid.png` (top row: base pipeline; bottom
//! row: with the adapter). The pipeline's weights are random, so "before" is structured noise;
//! what the grid shows is that the adapter pulls the samples towards the training pictures.

use candle_core::Device;
use peft::diffusion::{GenerateOptions, SamplerKind};
use peft::io::image as img;
use peft::train::dreambooth::{DreamBoothConfig, DreamBoothData, DreamBoothJob};
use peft::train::TrainingArguments;
use peft::{LoraConfig, ModuleSpec};
use std::path::PathBuf;

const PROMPT: &str = "a photo of sks disc";

fn main() -> peft::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "sd-demo".into()));
    let steps: i64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(300);
    let pipeline = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/sd1");
    let res = 32;
    // Four pictures of the subject: a red disc at different places on white.
    let inst = out.join("instance");
    std::fs::create_dir_all(&inst).map_err(|e| peft::Error::io(&inst, e))?;
    for (i, (cx, cy)) in [(12.0, 12.0), (20.0, 12.0), (12.0, 20.0), (18.0, 18.0)]
        .into_iter()
        .enumerate()
    {
        let pic = image::RgbImage::from_fn(res as u32, res as u32, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            if d < 8.0 {
                image::Rgb([220, 30, 30])
            } else {
                image::Rgb([250, 250, 250])
            }
        });
        img::save_png(&inst.join(format!("disc_{i}.png")), &pic)?;
    }
    let targets = |names: &[&str]| {
        Some(ModuleSpec::List(
            names.iter().map(|s| s.to_string()).collect(),
        ))
    };
    let config = DreamBoothConfig {
        pipeline: pipeline.clone(),
        peft: LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            target_modules: targets(&[
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "ff.net.0.proj",
                "ff.net.2",
                "conv1",
                "conv2",
                "conv_shortcut",
                "proj_in",
                "proj_out",
            ]),
            ..Default::default()
        }
        .into(),
        peft_text_encoder: Some(
            LoraConfig {
                r: 4,
                lora_alpha: 4.0,
                target_modules: targets(&["q_proj", "k_proj", "v_proj", "out_proj"]),
                ..Default::default()
            }
            .into(),
        ),
        data: DreamBoothData {
            instance_data_dir: inst,
            instance_prompt: PROMPT.into(),
            captions_file: None,
            class_data_dir: None,
            class_prompt: None,
            num_class_images: 0,
            prior_loss_weight: 1.0,
            resolution: res,
            center_crop: true,
            random_flip: true,
            class_sample_steps: 25,
        },
        training: TrainingArguments {
            output_dir: out.join("adapter"),
            learning_rate: 3e-3,
            max_steps: steps,
            per_device_train_batch_size: 4,
            lr_scheduler_type: peft::train::schedule::SchedulerType::Constant,
            logging_steps: 50,
            save_strategy: peft::train::config::Interval::No,
            seed: 0,
            ..Default::default()
        },
    };
    let device = Device::Cpu;
    let mut job = DreamBoothJob::prepare(&config, &device, &mut |_, _| {})?;
    eprintln!("{}", job.trainable_parameters_line());
    let samples = |pipe: &peft::StableDiffusion| -> peft::Result<Vec<candle_core::Tensor>> {
        (0..4)
            .map(|seed| {
                let opts = GenerateOptions {
                    prompt: PROMPT.into(),
                    negative_prompt: String::new(),
                    steps: 25,
                    guidance_scale: 3.0,
                    sampler: SamplerKind::Ddim,
                    seed,
                    width: res,
                    height: res,
                    num_images: 1,
                };
                Ok(pipe.generate(&opts, &mut |_, _| {})?.get(0)?)
            })
            .collect()
    };
    job.pipe.unet.disable_adapter_layers(true)?;
    job.pipe.text_encoder.disable_adapter_layers(true)?;
    let before = peft::no_grad(|| samples(&job.pipe))?;
    job.pipe.unet.disable_adapter_layers(false)?;
    job.pipe.text_encoder.disable_adapter_layers(false)?;
    let mut log = |e: &peft::train::TrainerEvent<'_>| {
        if let peft::train::TrainerEvent::Log(s) = e {
            eprintln!("step {:>4}  loss {:.4}", s.step, s.loss);
        }
    };
    let report = job.run(Some(&mut log))?;
    eprintln!("{} steps in {:.1} s", report.steps, report.seconds);
    let after = peft::no_grad(|| samples(&job.pipe))?;
    let mut all = before;
    all.extend(after);
    // Each 32-pixel sample drawn 4x larger so the grid is visible in the README.
    let big: Vec<candle_core::Tensor> = all
        .iter()
        .map(|t| {
            t.unsqueeze(0)
                .and_then(|t| t.upsample_nearest2d(res * 4, res * 4))
                .and_then(|t| t.squeeze(0))
        })
        .collect::<candle_core::Result<_>>()?;
    let grid = img::grid(&big, 4, 4)?;
    img::save_png(&out.join("grid.png"), &grid)?;
    println!("{}", out.join("grid.png").display());
    Ok(())
}
