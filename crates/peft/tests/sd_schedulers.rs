//! The samplers and the training noise schedule against diffusers 0.42: each sampler built from
//! the pipeline's scheduler config (PNDM's for the SD 1.x-style pipeline, DDIM's with
//! v-prediction for the 2.x-style one), five steps from fixed latents with fixed model outputs.
//!
//! Timesteps and sigmas agree to 1e-4 relative (diffusers keeps the schedule in f32, this crate
//! in f64). The latents after each step are compared within 1e-4 absolute, except where the
//! values themselves are large: Euler's first latents are scaled by `init_noise_sigma` ≈ 14.6,
//! so its steps are compared within 1e-4 relative to the largest latent (the f32 rounding of
//! diffusers' sigmas alone moves them by ~1e-6 relative, then five steps accumulate it).

mod sd_common;

use peft::diffusion::scheduler::{NoiseSchedule, Sampler, SamplerKind, SchedulerConfig};
use sd_common::*;

fn config(sd: &str) -> SchedulerConfig {
    let v = peft::io::read_json(
        &sd_fixtures()
            .join(sd)
            .join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    SchedulerConfig::from_json(&v).unwrap()
}

fn scalars(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn samplers_step_as_diffusers() {
    for sd in ["sd1", "sd2"] {
        let t = fixture(&format!("{sd}_schedulers.safetensors"));
        let c = config(sd);
        for (name, kind) in [
            ("ddim", SamplerKind::Ddim),
            ("euler", SamplerKind::Euler),
            ("euler_a", SamplerKind::EulerAncestral),
            ("dpmpp", SamplerKind::DpmSolverPP),
        ] {
            let what = format!("{sd} {name}");
            let mut s = Sampler::new(kind, &c, 5).unwrap();
            let want_t = scalars(&t[&format!("{name}.timesteps")]);
            assert_eq!(s.timesteps().len(), want_t.len(), "{what}");
            for (a, b) in s.timesteps().iter().zip(&want_t) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{what}: timestep {a} vs {b}"
                );
            }
            if let Some(sig) = t.get(&format!("{name}.sigmas")) {
                for (a, b) in s.sigmas().iter().zip(scalars(sig)) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                        "{what}: sigma {a} vs {b}"
                    );
                }
            }
            let init = scalars(&t[&format!("{name}.init_noise_sigma")])[0];
            assert!((s.init_noise_sigma() - init).abs() <= 1e-4 * init, "{what}");
            let mut x = t[&format!("{name}.x0")].clone();
            // Absolute 1e-4, relative to the latents' size for the Euler samplers (see above).
            let scale = if matches!(kind, SamplerKind::Euler | SamplerKind::EulerAncestral) {
                scalars(&x.abs().unwrap().flatten_all().unwrap())
                    .into_iter()
                    .fold(1.0f64, f64::max) as f32
            } else {
                1.0
            };
            for i in 0..want_t.len() {
                let out = &t[&format!("{name}.{i}.model_output")];
                let scaled = s.scale_model_input(&x, i).unwrap();
                assert_close(
                    &format!("{what} step {i} scaled input"),
                    &scaled,
                    &t[&format!("{name}.{i}.scaled")],
                    1e-4 * scale,
                );
                let noise = t.get(&format!("{name}.{i}.noise"));
                assert_eq!(noise.is_some(), s.needs_noise(), "{what}");
                x = s.step(out, i, &x, noise).unwrap();
                assert_close(
                    &format!("{what} step {i}"),
                    &x,
                    &t[&format!("{name}.{i}.prev")],
                    1e-4 * scale,
                );
            }
        }
    }
}

#[test]
fn training_noise_matches_ddpm() {
    for sd in ["sd1", "sd2"] {
        let t = fixture(&format!("{sd}_schedulers.safetensors"));
        let s = NoiseSchedule::new(&config(sd)).unwrap();
        let ts: Vec<usize> = scalars(&t["ddpm.timesteps"])
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let noisy = s.add_noise(&t["ddpm.x0"], &t["ddpm.noise"], &ts).unwrap();
        assert_close(&format!("{sd} add_noise"), &noisy, &t["ddpm.noisy"], 1e-5);
        let v = s
            .get_velocity(&t["ddpm.x0"], &t["ddpm.noise"], &ts)
            .unwrap();
        assert_close(&format!("{sd} velocity"), &v, &t["ddpm.velocity"], 1e-5);
    }
    assert!(NoiseSchedule::new(&config("sd1"))
        .unwrap()
        .add_noise(
            &fixture("sd1_schedulers.safetensors")["ddpm.x0"],
            &fixture("sd1_schedulers.safetensors")["ddpm.noise"],
            &[0, 1, 2, 1000]
        )
        .is_err());
}

#[test]
fn scheduler_names_and_errors() {
    for (s, k) in [
        ("ddim", SamplerKind::Ddim),
        ("euler", SamplerKind::Euler),
        ("euler-a", SamplerKind::EulerAncestral),
        ("dpm++", SamplerKind::DpmSolverPP),
    ] {
        assert_eq!(s.parse::<SamplerKind>().unwrap(), k);
        assert_eq!(k.name(), s);
    }
    let e = "pndm".parse::<SamplerKind>().unwrap_err().to_string();
    assert!(e.contains("ddim, euler, euler-a or dpm++"), "{e}");
    let e = Sampler::new(SamplerKind::Ddim, &config("sd1"), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("inference steps"), "{e}");
}
