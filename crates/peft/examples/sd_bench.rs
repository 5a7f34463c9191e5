//! UNet LoRA training-step and sampling-step times, the Rust half of `tools/bench_sd.py` (which
//! times diffusers + PEFT on the same UNet, inputs and machine).
//!
//! ```sh
//! cargo run --release -p peft --example sd_bench -- UNET_DIR LATENT_SIDE [STEPS] [RANK] [cpu|cuda]
//! /usr/bin/time -v target/release/examples/sd_bench UNET_DIR 64 3   # peak RSS too
//! ```
//!
//! Training step: LoRA (r = RANK, alpha = RANK; diffusers' DreamBooth targets to_q, to_k, to_v,
//! to_out.0) on the UNet, batch 1, latents `[1, 4, side, side]`, text states `[1, 77,
//! cross_attention_dim]`, MSE against the noise, backward, AdamW. Sampling step: the UNet on a
//! classifier-free-guidance batch of 2 without gradients. Prints one JSON line per measure (the
//! first step is a warm-up and not counted).

use candle_core::{DType, Device, Tensor};
use peft::models::{self, Inputs, LoadOptions};
use peft::{AdamW, AdamWParams, LoraConfig, ModuleSpec};
use std::time::Instant;

fn main() -> peft::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("UNET_DIR"));
    let side: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rank: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let dev = match args.next().as_deref() {
        Some("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let t0 = Instant::now();
    let opts = LoadOptions {
        device: dev.clone(),
        ..Default::default()
    };
    let unet = models::load(&dir, &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = &unet.info().config;
    let ctx_dim = match &cfg["cross_attention_dim"] {
        serde_json::Value::Array(v) => v[0].as_u64().unwrap_or(768),
        v => v.as_u64().unwrap_or(768),
    } as usize;
    let lora = LoraConfig {
        r: rank,
        lora_alpha: rank as f64,
        target_modules: Some(ModuleSpec::List(
            ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        )),
        ..Default::default()
    };
    let mut model = peft::get_peft_model(unet, lora, "default")?;
    let (trainable, all) = model.get_nb_trainable_parameters();
    let randn = |shape: &[usize], seed: u64| -> peft::Result<Tensor> {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        peft::diffusion::randn(&mut rng, shape, &dev)
    };
    let sample = randn(&[1, 4, side, side], 1)?;
    let noise = randn(&[1, 4, side, side], 2)?;
    let context = randn(&[1, 77, ctx_dim], 3)?;
    let timestep = Tensor::new(&[500f32], &dev)?;
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWParams::default())?;
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        let inputs = Inputs {
            sample: Some(sample.clone()),
            timestep: Some(timestep.clone()),
            encoder_hidden_states: Some(context.clone()),
            ..Default::default()
        };
        let pred = model.forward(&inputs, true)?;
        let loss = (pred - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4, 1.0)?;
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let train = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"measure": "train_step", "impl": "peft (Rust)", "latent_side": side,
            "rank": rank, "trainable_params": trainable, "all_params": all,
            "seconds_per_step": train, "steps": times.len(), "load_seconds": load_s,
            "device": format!("{dev:?}")})
    );
    model.set_adapter("default")?;
    let cfg_sample = Tensor::cat(&[&sample, &sample], 0)?;
    let cfg_context = Tensor::cat(&[&context, &randn(&[1, 77, ctx_dim], 4)?], 0)?;
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        let inputs = Inputs {
            sample: Some(cfg_sample.clone()),
            timestep: Some(timestep.clone()),
            encoder_hidden_states: Some(cfg_context.clone()),
            ..Default::default()
        };
        let y = peft::no_grad(|| model.forward(&inputs, false))?;
        let _ = y.sum_all()?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let sample_s = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"measure": "sampling_step", "impl": "peft (Rust)", "latent_side": side,
            "batch": 2, "seconds_per_step": sample_s, "steps": times.len()})
    );
    Ok(())
}
