//! The CUDA path against the same transformers + PEFT fixtures the CPU tests use: BERT LoRA logits
//! for every case and gradients against torch's, T5 LoRA and merged logits, and greedy generation
//! of a small Llama. Built only with `--features cuda`; without a CUDA device each test says so and
//! returns (CI has no GPU, so it never builds this file).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft::generation::{generate, GenerationConfig};
use peft::models::{self, LoadOptions};
use peft::train::classification_loss;
use peft::{Inputs, PeftModel, TaskType};
use std::path::{Path, PathBuf};

fn gpu() -> Option<Device> {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA device: nothing to check");
        return None;
    }
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

fn to(dev: &Device, inputs: &Inputs) -> Inputs {
    let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(dev).unwrap());
    Inputs {
        input_ids: mv(&inputs.input_ids),
        attention_mask: mv(&inputs.attention_mask),
        token_type_ids: mv(&inputs.token_type_ids),
        decoder_input_ids: mv(&inputs.decoder_input_ids),
        decoder_attention_mask: mv(&inputs.decoder_attention_mask),
        ..Default::default()
    }
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

fn bert_on(dev: &Device, case: &str) -> PeftModel {
    let m = meta(case);
    let dir = fixtures().join("models").join(m["model"].as_str().unwrap());
    let opts = LoadOptions {
        task: Some(task_of(case)),
        device: dev.clone(),
        ..Default::default()
    };
    let base = models::load(&dir, &opts).unwrap();
    PeftModel::from_pretrained(base, &case_dir(case).join("adapter"), Default::default()).unwrap()
}

#[test]
fn bert_lora_logits_on_cuda_match_peft() {
    let Some(dev) = gpu() else { return };
    for case in all_cases() {
        let want = load_st(&case_dir(&case).join("expected.safetensors"));
        let m = bert_on(&dev, &case);
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs()), false)).unwrap();
        assert_close(
            &format!("{case} on cuda"),
            &cpu(&got),
            &want["lora_logits"],
            1e-4,
        );
    }
}

#[test]
fn bert_gradients_on_cuda_match_torch() {
    let Some(dev) = gpu() else { return };
    let case = "list_qv";
    let want = load_st(&case_dir(case).join("grads.safetensors"));
    let mut m = bert_on(&dev, case);
    m.delete_adapter("default").unwrap();
    m.load_adapter(&case_dir(case).join("adapter"), "default", true)
        .unwrap();
    let logits = m.forward(&to(&dev, &inputs()), false).unwrap();
    let labels = labels(task_of(case)).to_device(&dev).unwrap();
    let loss = classification_loss(&logits, &labels).unwrap();
    assert_close("loss", &cpu(&loss.reshape(1).unwrap()), &want["loss"], 1e-5);
    let grads = loss.backward().unwrap();
    for (key, var) in m.trainable_parameters() {
        let g = grads.get(var.as_tensor()).expect("gradient");
        assert_close(&key, &cpu(g), &want[&key], 1e-4);
    }
}

#[test]
fn t5_lora_and_merged_logits_on_cuda_match_peft() {
    let Some(dev) = gpu() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5");
    let raw = load_st(&dir.join("inputs.safetensors"));
    let u32t = |k: &str| raw[k].to_dtype(DType::U32).unwrap();
    let inputs = Inputs {
        input_ids: Some(u32t("input_ids")),
        attention_mask: Some(u32t("attention_mask")),
        decoder_input_ids: Some(u32t("decoder_input_ids")),
        ..Default::default()
    };
    for case in ["t5_v1_0", "t5_v1_1", "mt5"] {
        let want = load_st(&dir.join(case).join("expected.safetensors"));
        let opts = LoadOptions {
            task: Some(TaskType::Seq2SeqLm),
            device: dev.clone(),
            ..Default::default()
        };
        let base = models::load(&dir.join(case).join("model"), &opts).unwrap();
        let mut m =
            PeftModel::from_pretrained(base, &dir.join(case).join("adapter"), Default::default())
                .unwrap();
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs), false)).unwrap();
        assert_close(case, &cpu(&got), &want["lora_logits"], 1e-4);
        m.merge_adapter().unwrap();
        let got = peft::no_grad(|| m.forward(&to(&dev, &inputs), false)).unwrap();
        assert_close(case, &cpu(&got), &want["merged_logits"], 1e-4);
    }
}

#[test]
fn greedy_generation_on_cuda_matches_transformers() {
    let Some(dev) = gpu() else { return };
    let dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generation/tiny_llama");
    let fx = peft::io::read_json(&dir.join("expected.json")).unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<u32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let opts = LoadOptions {
        device: dev,
        ..Default::default()
    };
    let model = models::load(&dir, &opts).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    for (p, want) in rows(&fx["prompt_ids"]).iter().zip(rows(&fx["single"])) {
        let got = generate(model.as_ref(), std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(got.tokens[0], want, "prompt {p:?}");
    }
}

// ---- the CUDA kernels (crates/peft/src/ops/cuda.rs) against the CPU kernels ----

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    // A fixed pseudo-random tensor built on the host, so both devices see the same values.
    let n = shape.0 * shape.1;
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Dropout on the GPU draws the CPU kernels' mask for the same seed, bit for bit, in f32 and
/// bf16; its backward multiplies by the same mask; about `p` of the elements are dropped.
#[test]
fn device_dropout_draws_the_cpu_mask_and_backprops_it() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::BF16] {
        let x = randn((1000, 517), 3).to_dtype(dtype).unwrap();
        let run = |d: &Device| {
            let v = candle_core::Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
            peft::ops::seed_dropout(7);
            let y = peft::ops::dropout(v.as_tensor(), 0.3, true).unwrap();
            let g = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(v.as_tensor())
                .unwrap()
                .clone();
            (cpu(&y), cpu(&g))
        };
        let (y_cpu, g_cpu) = run(&Device::Cpu);
        let (y_gpu, g_gpu) = run(&dev);
        assert_eq!(max_diff(&y_gpu, &y_cpu), 0.0, "{dtype:?}: output");
        assert_eq!(max_diff(&g_gpu, &g_cpu), 0.0, "{dtype:?}: gradient");
        let g: Vec<f32> = g_gpu
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dropped = g.iter().filter(|&&a| a == 0.0).count() as f64 / g.len() as f64;
        assert!(
            (dropped - 0.3).abs() < 0.005,
            "{dtype:?}: dropped {dropped}"
        );
        let kept = g
            .iter()
            .filter(|&&a| a != 0.0)
            .map(|&a| a as f64)
            .sum::<f64>()
            / g.iter().filter(|&&a| a != 0.0).count() as f64;
        assert!(
            (kept - 1.0 / 0.7).abs() < 1e-2,
            "{dtype:?}: kept scale {kept}"
        );
    }
    // Two draws in a row differ (the seed advances).
    let x = Tensor::ones((256, 256), DType::F32, &dev).unwrap();
    let a = cpu(&peft::ops::dropout(&x, 0.5, true).unwrap());
    let b = cpu(&peft::ops::dropout(&x, 0.5, true).unwrap());
    assert!(max_diff(&a, &b) > 0.0, "two masks in a row are the same");
}

/// The exact GELU on the GPU against the CPU kernel, value and gradient.
#[test]
fn device_gelu_matches_the_cpu_kernel() {
    let Some(dev) = gpu() else { return };
    let x = randn((300, 777), 5);
    let run = |d: &Device| {
        let v = candle_core::Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
        let y = peft::ops::gelu_erf(v.as_tensor()).unwrap();
        let w = randn((300, 777), 9).to_device(d).unwrap();
        let g = (&y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(v.as_tensor())
            .unwrap()
            .clone();
        (cpu(&y), cpu(&g))
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu);
    let (y_gpu, g_gpu) = run(&dev);
    assert_close("gelu", &y_gpu, &y_cpu, 1e-6);
    assert_close("gelu gradient", &g_gpu, &g_cpu, 1e-5);
}

/// Cross-entropy with the labels on the GPU (nothing read back) against the CPU loss.
#[test]
fn device_cross_entropy_matches_the_cpu_loss() {
    let Some(dev) = gpu() else { return };
    let x = randn((37, 1001), 11);
    let labels: Vec<i64> = (0..37)
        .map(|i| {
            if i % 5 == 2 {
                -100
            } else {
                (i * 97 % 1001) as i64
            }
        })
        .collect();
    let run = |d: &Device| {
        let v = candle_core::Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
        let l = Tensor::new(labels.as_slice(), d).unwrap();
        let loss = peft::ops::cross_entropy(v.as_tensor(), &l).unwrap();
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
        (cpu(&loss.reshape(1).unwrap()), cpu(&g))
    };
    let (l_cpu, g_cpu) = run(&Device::Cpu);
    let (l_gpu, g_gpu) = run(&dev);
    assert_close("loss", &l_gpu, &l_cpu, 1e-5);
    assert_close("gradient", &g_gpu, &g_cpu, 1e-7);
}

// ---- every decoder family on the GPU ----

fn decoder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder")
}

fn decoder_lora(case: &str, dev: &Device) -> PeftModel {
    let dir = decoder().join("cases").join(case);
    let m = peft::io::read_json(&dir.join("meta.json")).unwrap();
    let opts = LoadOptions {
        task: Some(m["task_type"].as_str().unwrap().parse().unwrap()),
        device: dev.clone(),
        ..Default::default()
    };
    let base = models::load(
        &decoder().join("models").join(m["model"].as_str().unwrap()),
        &opts,
    )
    .unwrap();
    let mut pm =
        PeftModel::from_pretrained(base, &dir.join("adapter"), Default::default()).unwrap();
    pm.delete_adapter("default").unwrap();
    pm.load_adapter(&dir.join("adapter"), "default", true)
        .unwrap();
    pm
}

/// Logits at real (non-padding) positions, `[real tokens, vocab]`.
fn at_real_positions(t: &Tensor, mask: &Tensor) -> Tensor {
    if t.rank() != 3 {
        return t.clone();
    }
    let (b, s, n) = t.dims3().unwrap();
    let m: Vec<u32> = cpu(mask).flatten_all().unwrap().to_vec1().unwrap();
    let idx: Vec<u32> = (0..(b * s) as u32)
        .filter(|&i| m[i as usize] == 1)
        .collect();
    let idx = Tensor::new(idx.as_slice(), t.device()).unwrap();
    t.reshape((b * s, n))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap()
}

/// GPT-2, Llama (GQA, tied, every RoPE scaling), Mistral, Qwen2 and OPT: LoRA logits on the GPU
/// against transformers + PEFT, and the gradient of every adapter tensor against the CPU's.
#[test]
fn decoder_lora_logits_and_gradients_on_cuda() {
    let Some(dev) = gpu() else { return };
    let raw = load_st(&decoder().join("inputs.safetensors"));
    let host = Inputs {
        input_ids: Some(raw["input_ids"].to_dtype(DType::U32).unwrap()),
        attention_mask: Some(raw["attention_mask"].to_dtype(DType::U32).unwrap()),
        ..Default::default()
    };
    let mask = host.attention_mask.clone().unwrap();
    let mut cases: Vec<String> = std::fs::read_dir(decoder().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "decoder cases: {cases:?}");
    for case in cases {
        let want = load_st(
            &decoder()
                .join("cases")
                .join(&case)
                .join("expected.safetensors"),
        );
        let grads_on = |d: &Device| {
            let m = decoder_lora(&case, d);
            let x = to(d, &host);
            let logits = m.forward(&x, false).unwrap();
            // Any scalar of every logit reaches every adapter tensor; fixed weights keep it
            // the same on both devices.
            let (rows, cols) = logits
                .flatten_to(logits.rank() - 2)
                .unwrap()
                .dims2()
                .unwrap();
            let w = randn((rows, cols), 17)
                .reshape(logits.shape())
                .unwrap()
                .to_device(d)
                .unwrap();
            let grads = (&logits * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<(String, Tensor)> = m
                .trainable_parameters()
                .into_iter()
                .map(|(k, v)| (k, cpu(grads.get(v.as_tensor()).expect("gradient"))))
                .collect();
            (cpu(&logits), g)
        };
        let (logits, g_gpu) = grads_on(&dev);
        assert_close(
            &format!("{case}: lora logits on cuda"),
            &at_real_positions(&logits, &mask),
            &at_real_positions(&want["lora_logits"], &mask),
            1e-4,
        );
        let (_, g_cpu) = grads_on(&Device::Cpu);
        assert!(!g_cpu.is_empty(), "{case}: nothing trainable");
        for ((k, g), (_, c)) in g_gpu.iter().zip(&g_cpu) {
            let scale = c
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_close(&format!("{case}: {k}"), g, c, 1e-4 * scale.max(1.0));
        }
    }
}

// ---- mixed-adapter generation ----

/// A batch whose rows use different adapters generates on the GPU what PEFT generates
/// (`tests/fixtures/multi/gpt2`), and each row what its adapter generates alone.
#[test]
fn mixed_adapter_generation_on_cuda_matches_peft_and_each_adapter_alone() {
    let Some(dev) = gpu() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let multi = root.join("tests/fixtures/multi/gpt2");
    let meta = peft::io::read_json(&multi.join("meta.json")).unwrap();
    let exp = load_st(&multi.join("expected.safetensors"));
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        device: dev.clone(),
        ..Default::default()
    };
    let base = models::load(
        &root.join("../..").join(meta["model"].as_str().unwrap()),
        &opts,
    )
    .unwrap();
    let mut pm = PeftModel::from_pretrained_all(base, &multi.join("adapters"), false).unwrap();
    let names: Vec<String> = meta["mixed_adapter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let ids: Vec<Vec<u32>> = exp["input_ids_left"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mask: Vec<Vec<u32>> = exp["attention_mask_left"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, m)| **m == 1)
                .map(|(t, _)| *t)
                .collect()
        })
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        pad_token_id: Some(0),
        ..Default::default()
    };
    let want: Vec<Vec<u32>> = exp["mixed_generated"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let out = {
        let mixed = pm.with_adapter_names(&names).unwrap();
        generate(&mixed, &prompts, &cfg, None).unwrap()
    };
    for (i, row) in out.tokens.iter().enumerate() {
        assert_eq!(row[..], want[i][..row.len()], "row {i} ({})", names[i]);
    }
    for (i, name) in names.iter().enumerate() {
        let alone = if name == "__base__" {
            let d = pm.disable_adapter().unwrap();
            generate(&*d, std::slice::from_ref(&prompts[i]), &cfg, None).unwrap()
        } else {
            pm.set_adapter(name).unwrap();
            generate(&pm, std::slice::from_ref(&prompts[i]), &cfg, None).unwrap()
        };
        assert_eq!(alone.tokens[0], out.tokens[i], "row {i} ({name}) alone");
    }
}

// ---- bf16 training ----

/// Training in bf16 on the GPU (frozen weights cast, adapters and optimizer in f32) follows the
/// fp32 run: both lower the loss, and their losses stay within a few percent of each other.
#[test]
fn bf16_training_on_cuda_follows_fp32() {
    let Some(dev) = gpu() else { return };
    let case = "list_qv";
    let curve = |bf16: bool| -> Vec<f32> {
        let mut m = bert_on(&dev, case);
        m.delete_adapter("default").unwrap();
        m.load_adapter(&case_dir(case).join("adapter"), "default", true)
            .unwrap();
        if bf16 {
            m.autocast_bf16().unwrap();
        }
        let mut opt = peft::train::optim::AdamW::new(
            m.trainable_parameters(),
            peft::train::optim::AdamWParams::default(),
        )
        .unwrap();
        let x = to(&dev, &inputs());
        let labels = labels(task_of(case)).to_device(&dev).unwrap();
        (0..30)
            .map(|_| {
                let logits = m.forward(&x, false).unwrap();
                let loss = classification_loss(&logits, &labels).unwrap();
                let v = loss
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let grads = peft::grad::backward(&loss).unwrap();
                opt.step(&grads, 1e-3, 1.0).unwrap();
                v
            })
            .collect()
    };
    let fp32 = curve(false);
    let bf16 = curve(true);
    assert!(fp32[29] < fp32[0] * 0.7, "fp32 did not learn: {fp32:?}");
    assert!(bf16[29] < bf16[0] * 0.7, "bf16 did not learn: {bf16:?}");
    for (i, (a, b)) in fp32.iter().zip(&bf16).enumerate() {
        assert!(
            (a - b).abs() <= 0.05 * a.abs().max(0.1),
            "step {i}: fp32 {a} vs bf16 {b}"
        );
    }
}

/// The fused AdamW kernel against the optimizer's composed update on the CPU: weight and both
/// moments after several steps with weight decay and a clipping scale, and the moments it would
/// save for a resume.
#[test]
fn fused_adamw_on_cuda_matches_the_cpu_optimizer() {
    use peft::train::optim::{AdamW, AdamWParams};
    let Some(dev) = gpu() else { return };
    let w0 = randn((64, 300), 21);
    let run = |d: &Device| {
        let var = candle_core::Var::from_tensor(&w0.to_device(d).unwrap()).unwrap();
        let params = AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("lora_A.weight".into(), var.clone())], params).unwrap();
        for k in 0..5 {
            let g = randn((64, 300), 30 + k).to_device(d).unwrap();
            opt.step_with(&[Some(g)], 1e-3, 0.5).unwrap();
        }
        let state: Vec<Tensor> = opt
            .state_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, t)| cpu(&t))
            .collect();
        (cpu(var.as_tensor()), state)
    };
    let (w_cpu, s_cpu) = run(&Device::Cpu);
    let (w_gpu, s_gpu) = run(&dev);
    // NVRTC contracts `theta * decay - update` into a fused multiply-add, which rounds weights
    // of magnitude up to 3 a few ulps (2.4e-7 each) away from the CPU's separate multiply and
    // subtract; a wrong update rule would be off by the order of lr (1e-3).
    assert_close("weight", &w_gpu, &w_cpu, 3e-6);
    for (i, (a, b)) in s_gpu.iter().zip(&s_cpu).enumerate() {
        assert_close(&format!("state {i}"), a, b, 1e-6);
    }
}

// ---- Stable Diffusion on the GPU ----

/// The tiny SD 1.x and 2.x pipelines' UNet, text encoder and VAE on the GPU against diffusers'
/// outputs (the CPU test's fixtures), and a UNet LoRA gradient against the CPU's.
#[test]
fn sd_components_on_cuda_match_diffusers() {
    let Some(dev) = gpu() else { return };
    let sd_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd");
    for sd in ["sd1", "sd2"] {
        let t = load_st(&sd_dir.join(format!("{sd}_components.safetensors")));
        let dir = sd_dir.join(sd);
        let on = |d: &Device| LoadOptions {
            device: d.clone(),
            ..Default::default()
        };
        let g = |k: &str| t[k].to_device(&dev).unwrap();
        let unet = models::load(&dir.join("unet"), &on(&dev)).unwrap();
        let inputs = Inputs {
            sample: Some(g("sample")),
            timestep: Some(g("timestep")),
            encoder_hidden_states: Some(g("encoder_hidden_states")),
            ..Default::default()
        };
        let y = peft::no_grad(|| unet.forward(&inputs, false)).unwrap();
        assert_close(&format!("{sd} unet"), &cpu(&y), &t["unet.sample"], 1e-4);
        let te = models::load(&dir.join("text_encoder"), &on(&dev)).unwrap();
        let ids = g("input_ids").to_dtype(DType::U32).unwrap();
        let out = peft::no_grad(|| te.outputs(&Inputs::new(ids), false)).unwrap();
        assert_close(
            &format!("{sd} text encoder"),
            &cpu(&out[0].1),
            &t["text_encoder.last_hidden_state"],
            1e-4,
        );
        let vae = models::load(&dir.join("vae"), &on(&dev)).unwrap();
        let decoded = peft::no_grad(|| {
            vae.forward(
                &Inputs {
                    sample: Some(g("latents")),
                    ..Default::default()
                },
                false,
            )
        })
        .unwrap();
        assert_close(
            &format!("{sd} vae decode"),
            &cpu(&decoded),
            &t["vae.decoded_latents"],
            1e-4,
        );

        // LoRA on the attention and the ResNet convolutions: every factor's gradient as on the CPU.
        let grads_on = |d: &Device| {
            let base = models::load(&dir.join("unet"), &on(d)).unwrap();
            let lora = peft::LoraConfig {
                r: 4,
                lora_alpha: 4.0,
                target_modules: Some(peft::ModuleSpec::List(
                    ["to_q", "to_v", "conv1", "conv2"]
                        .map(String::from)
                        .to_vec(),
                )),
                init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
                ..Default::default()
            };
            let m = peft::peft_model::get_peft_model_with_seed(
                base,
                peft::tuners::PeftConfig::new(lora),
                "default",
                0,
            )
            .unwrap();
            let x = Inputs {
                sample: Some(t["sample"].to_device(d).unwrap()),
                timestep: Some(t["timestep"].to_device(d).unwrap()),
                encoder_hidden_states: Some(t["encoder_hidden_states"].to_device(d).unwrap()),
                ..Default::default()
            };
            let y = m.forward(&x, false).unwrap();
            let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            m.trainable_parameters()
                .into_iter()
                .map(|(k, v)| (k, cpu(grads.get(v.as_tensor()).expect("gradient"))))
                .collect::<Vec<_>>()
        };
        let g_gpu = grads_on(&dev);
        let g_cpu = grads_on(&Device::Cpu);
        assert!(!g_cpu.is_empty());
        for ((k, a), (_, b)) in g_gpu.iter().zip(&g_cpu) {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_close(&format!("{sd}: {k}"), a, b, 1e-4 * scale.max(1e-3));
        }
    }
}
