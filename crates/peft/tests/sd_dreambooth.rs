//! One DreamBooth training step against diffusers' training script (PEFT's DreamBooth example):
//! the same pictures, prompts, posterior noise, diffusion noise and timesteps injected, a LoRA
//! with random factors (`init_lora_weights=False`, so every factor has a gradient) on the UNet
//! (attention, feed-forward, resnet and down/up-sampling convolutions, time projections) and
//! the text encoder. SD 1.x-style with prior preservation (weight 0.7, epsilon), SD 2.x-style
//! without (v-prediction). The loss and every LoRA gradient match PyTorch's, and every one is
//! non-zero.

mod sd_common;

use candle_core::DType;
use peft::diffusion::scheduler::NoiseSchedule;
use peft::train::dreambooth::{dreambooth_loss, DreamBoothBatch, StepNoise};
use sd_common::*;

#[test]
fn one_step_loss_and_every_gradient_match_pytorch() {
    for sd in ["sd1", "sd2"] {
        let t = fixture(&format!("{sd}_dreambooth.safetensors"));
        let meta =
            peft::io::read_json(&sd_fixtures().join(format!("{sd}_dreambooth.json"))).unwrap();
        let prior = meta["prior_loss_weight"].as_f64();
        let mut pipe = pipeline(sd);
        pipe.load_adapter(
            &sd_fixtures().join(format!("{sd}_dreambooth_init")),
            "default",
            true,
        )
        .unwrap();
        let schedule = NoiseSchedule::new(&pipe.scheduler).unwrap();
        let batch = DreamBoothBatch {
            pixel_values: t["pixel_values"].clone(),
            input_ids: t["input_ids"].to_dtype(DType::U32).unwrap(),
            with_prior: prior.is_some(),
        };
        let noise = StepNoise {
            vae_noise: t["vae_noise"].clone(),
            noise: t["noise"].clone(),
            timesteps: t["timesteps"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
                .into_iter()
                .map(|v| v as usize)
                .collect(),
        };
        let loss =
            dreambooth_loss(&pipe, &schedule, &batch, &noise, prior.unwrap_or(1.0), true).unwrap();
        let want = t["loss"].to_vec1::<f32>().unwrap()[0];
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{sd}: loss {got} vs {want}"
        );
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (component, m) in [("unet", &pipe.unet), ("text_encoder", &pipe.text_encoder)] {
            let params = m.trainable_parameters();
            let expected: Vec<&String> = t
                .keys()
                .filter(|k| k.starts_with(&format!("grad.{component}.")))
                .collect();
            assert_eq!(
                params.len(),
                expected.len(),
                "{sd} {component}: LoRA tensors"
            );
            for (key, var) in params {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{sd} {component} {key}: no gradient"));
                let w = &t[&format!("grad.{component}.{key}")];
                let scale = w
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(scale > 0.0, "{key}: PyTorch's gradient is zero");
                let d = max_diff(g, w);
                if std::env::var("SD_DEBUG").is_ok() {
                    eprintln!("{sd} {component} {key} {d:e} {scale:e}");
                    continue;
                }
                assert!(
                    d <= 1e-4 * scale.max(1e-2),
                    "{sd} {component} {key}: gradient off by {d:e} (largest {scale:e})"
                );
                checked += 1;
            }
        }
        assert!(checked > 100, "{sd}: {checked} tensors");
    }
}
