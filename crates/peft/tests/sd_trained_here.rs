//! Adapters trained here load in diffusers with the same outputs.
//!
//! tools/fixtures/make_sd_trained_here_fixtures.py trained a LoRA on each tiny pipeline with the
//! `peft` binary (UNet attention, ResNet convolutions and `proj_in`; text-encoder attention),
//! kept PEFT's folders, diffusers' file and the kohya file it wrote, loaded each in diffusers 0.42
//! and PEFT 0.21, and recorded the UNet's and the text encoder's outputs. Here: today's writers
//! produce exactly those files from the PEFT folders (so what diffusers read is what this code
//! writes), and this code's outputs with each file equal diffusers'.

mod sd_common;

use candle_core::{DType, Tensor};
use peft::diffusion::lora_files::AdapterFormat;
use sd_common::*;
use std::collections::HashMap;
use std::path::Path;

fn outputs(pipe: &peft::StableDiffusion, comp: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    peft::no_grad(|| {
        let u = pipe
            .predict(
                &comp["sample"],
                &comp["timestep"],
                &comp["encoder_hidden_states"],
                false,
            )
            .unwrap();
        let h = pipe
            .encode_ids(&comp["input_ids"].to_dtype(DType::U32).unwrap(), false)
            .unwrap();
        (u, h)
    })
}

/// Same keys, same values, bit for bit.
fn assert_same_tensors(what: &str, ours: &Path, theirs: &Path) {
    let (a, b) = (load_st(ours), load_st(theirs));
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: keys");
    for k in ka {
        assert_eq!(a[k].dims(), b[k].dims(), "{what}: {k}");
        if a[k].rank() > 0 {
            assert_eq!(max_diff(&a[k], &b[k]), 0.0, "{what}: {k}");
        } else {
            assert_eq!(
                a[k].to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                b[k].to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                "{what}: {k}"
            );
        }
    }
}

#[test]
fn files_written_here_are_the_ones_diffusers_loaded() {
    for sd in ["sd1", "sd2"] {
        let dir = sd_fixtures().join("trained_here").join(sd);
        let mut pipe = pipeline(sd);
        pipe.load_adapter(&dir.join("peft"), "trained", false)
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        for fmt in [
            AdapterFormat::Peft,
            AdapterFormat::Diffusers,
            AdapterFormat::Kohya,
        ] {
            pipe.save_adapter(out.path(), "trained", fmt).unwrap();
        }
        for c in ["unet", "text_encoder"] {
            let f = Path::new(c).join("adapter_model.safetensors");
            assert_same_tensors(
                &format!("{sd} peft {c}"),
                &out.path().join(&f),
                &dir.join("peft").join(&f),
            );
        }
        let f = "pytorch_lora_weights.safetensors";
        assert_same_tensors(
            &format!("{sd} diffusers"),
            &out.path().join(f),
            &dir.join("diffusers").join(f),
        );
        let (ours, theirs) = (
            peft::io::safetensors_metadata(&out.path().join(f)).unwrap(),
            peft::io::safetensors_metadata(&dir.join("diffusers").join(f)).unwrap(),
        );
        assert_eq!(ours, theirs, "{sd}: diffusers metadata");
        let f = "lora_kohya.safetensors";
        assert_same_tensors(
            &format!("{sd} kohya"),
            &out.path().join(f),
            &dir.join("kohya").join(f),
        );
    }
}

#[test]
fn adapters_trained_here_give_diffusers_outputs_in_every_layout() {
    for sd in ["sd1", "sd2"] {
        let comp = fixture(&format!("{sd}_components.safetensors"));
        let dir = sd_fixtures().join("trained_here").join(sd);
        let e = load_st(&dir.join("expected.safetensors"));
        for (layout, path) in [
            ("peft", dir.join("peft")),
            ("diffusers", dir.join("diffusers")),
            ("kohya", dir.join("kohya/lora_kohya.safetensors")),
        ] {
            let mut pipe = pipeline(sd);
            pipe.load_adapter(&path, "trained", false).unwrap();
            let (u, h) = outputs(&pipe, &comp);
            let want_u = &e[&format!("{layout}.unet.sample")];
            let want_h = &e[&format!("{layout}.text_encoder.last_hidden_state")];
            assert_close(&format!("{sd} {layout} unet"), &u, want_u, 1e-4);
            assert_close(&format!("{sd} {layout} text encoder"), &h, want_h, 1e-4);
            // The adapter does something, so agreeing means something.
            assert!(
                max_diff(want_u, &e["base.unet.sample"]) > 0.1,
                "{sd} {layout}"
            );
            assert!(
                max_diff(want_h, &e["base.text_encoder.last_hidden_state"]) > 0.1,
                "{sd} {layout}"
            );
        }
    }
}
