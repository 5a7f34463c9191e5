//! Whole sampling loops against diffusers' `StableDiffusionPipeline.__call__` on the tiny
//! pipelines: a prompt and a negative prompt, 4 steps, guidance 7.5, fixed initial latents, every
//! sampler (Euler ancestral's noise as diffusers drew it), with and without the trained LoRA.
//!
//! Latents are compared within 1e-4 relative to their largest value (each step feeds the UNet's
//! output, guidance-amplified 7.5 times, into the next, so diffusers' f32 schedule rounding and
//! the UNet's ~1e-6 differences accumulate), the decoded images within 1e-4 absolute.

mod sd_common;

use candle_core::{DType, Tensor};
use peft::diffusion::{Sampler, SamplerKind};
use sd_common::*;

const PROMPT: &str = "a photo of sks dog";
const NEGATIVE: &str = "blurry, low quality";

fn run(
    pipe: &peft::StableDiffusion,
    t: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
    name: &str,
    kind: SamplerKind,
) {
    let mut s = Sampler::new(kind, &pipe.scheduler, 4).unwrap();
    let latents = (&t["latents"] * s.init_noise_sigma()).unwrap();
    let cond = pipe.encode_prompts(&[PROMPT], false).unwrap();
    let uncond = pipe.encode_prompts(&[NEGATIVE], false).unwrap();
    let context = Tensor::cat(&[&uncond, &cond], 0).unwrap();
    let mut noise = |i: usize, _: &Tensor| -> peft::Result<Tensor> {
        Ok(t[&format!("{prefix}{name}.{i}.noise")].clone())
    };
    let mut steps = Vec::new();
    let out = pipe
        .denoise(latents, &context, 7.5, &mut s, &mut noise, &mut |i, n| {
            steps.push((i, n))
        })
        .unwrap();
    assert_eq!(steps.last(), Some(&(4, 4)));
    let want = &t[&format!("{prefix}{name}.latents")];
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    assert_close(&format!("{prefix}{name} latents"), &out, want, 1e-4 * scale);
    let img = pipe.decode_latents(&out).unwrap();
    assert_close(
        &format!("{prefix}{name} image"),
        &img,
        &t[&format!("{prefix}{name}.image")],
        1e-4,
    );
}

const SAMPLERS: [(&str, SamplerKind); 4] = [
    ("ddim", SamplerKind::Ddim),
    ("euler", SamplerKind::Euler),
    ("euler_a", SamplerKind::EulerAncestral),
    ("dpmpp", SamplerKind::DpmSolverPP),
];

#[test]
fn sampling_matches_diffusers_pipeline() {
    for sd in ["sd1", "sd2"] {
        let pipe = pipeline(sd);
        let t = fixture(&format!("{sd}_sampling.safetensors"));
        for (name, kind) in SAMPLERS {
            run(&pipe, &t, "", name, kind);
        }
    }
}

#[test]
fn sampling_with_lora_matches_diffusers_pipeline() {
    for sd in ["sd1", "sd2"] {
        let mut pipe = pipeline(sd);
        let done = pipe
            .load_adapter(
                &sd_fixtures().join(format!("{sd}_lora/diffusers")),
                "sks",
                false,
            )
            .unwrap();
        assert_eq!(done, ["unet", "text_encoder"]);
        let t = fixture(&format!("{sd}_sampling.safetensors"));
        for (name, kind) in [SAMPLERS[0], SAMPLERS[2]] {
            run(&pipe, &t, "lora.", name, kind);
        }
    }
}

#[test]
fn generate_is_seeded_and_sized() {
    let pipe = pipeline("sd1");
    let opts = peft::diffusion::GenerateOptions {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        steps: 3,
        guidance_scale: 5.0,
        sampler: SamplerKind::EulerAncestral,
        seed: 3,
        width: 24,
        height: 16,
        num_images: 2,
    };
    let a = pipe.generate(&opts, &mut |_, _| {}).unwrap();
    assert_eq!(a.dims(), [2, 3, 16, 24]);
    let b = pipe.generate(&opts, &mut |_, _| {}).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0, "same seed, same images");
    let c = pipe
        .generate(
            &peft::diffusion::GenerateOptions {
                seed: 4,
                ..opts.clone()
            },
            &mut |_, _| {},
        )
        .unwrap();
    assert!(max_diff(&a, &c) > 1e-3, "another seed, other images");
    let lo = a
        .min_keepdim(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap();
    assert!(lo.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() >= 0.0);
    let e = pipe
        .generate(
            &peft::diffusion::GenerateOptions { width: 15, ..opts },
            &mut |_, _| {},
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiples of 2"), "{e}");
}
