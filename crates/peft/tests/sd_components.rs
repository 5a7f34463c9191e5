//! The Stable Diffusion models against diffusers / transformers on the tiny SD 1.x- and
//! 2.x-style pipelines: the CLIP tokenizer (from vocab.json + merges.txt), the text encoder, the
//! UNet and the VAE, each within 1e-4.

mod sd_common;

use candle_core::{DType, Device};
use peft::io::clip_tokenizer::ClipTokenizer;
use peft::models::{self, Inputs, LoadOptions};
use sd_common::*;

#[test]
fn clip_tokenizer_matches_transformers() {
    let cases = peft::io::read_json(&sd_fixtures().join("tokenizer/cases.json")).unwrap();
    for (sd, pad) in [("sd1", "<|endoftext|>"), ("sd2", "!")] {
        let tok = ClipTokenizer::from_dir(&sd_fixtures().join(sd).join("tokenizer")).unwrap();
        let want = cases
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["pad_token"] == pad)
            .unwrap();
        assert_eq!(tok.max_length, 77);
        for (text, ids) in want["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want["input_ids"].as_array().unwrap())
        {
            let ids: Vec<u32> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text.as_str().unwrap()).unwrap();
            assert_eq!(got, ids, "{sd}: {text}");
        }
    }
}

#[test]
fn components_match_diffusers() {
    for sd in ["sd1", "sd2"] {
        let t = fixture(&format!("{sd}_components.safetensors"));
        let dir = sd_fixtures().join(sd);
        let opts = LoadOptions::default();
        // Each component loads on its own through models::load, as `peft forward` loads it.
        let unet = models::load(&dir.join("unet"), &opts).unwrap();
        let inputs = Inputs {
            sample: Some(t["sample"].clone()),
            timestep: Some(t["timestep"].clone()),
            encoder_hidden_states: Some(t["encoder_hidden_states"].clone()),
            ..Default::default()
        };
        let out = unet.outputs(&inputs, false).unwrap();
        assert_eq!(out[0].0, "sample");
        assert_close(&format!("{sd} unet"), &out[0].1, &t["unet.sample"], 1e-4);
        // A float timestep shared by the batch.
        let inputs = Inputs {
            timestep: Some(candle_core::Tensor::new(7.5f32, &Device::Cpu).unwrap()),
            ..inputs
        };
        let y = unet.forward(&inputs, false).unwrap();
        assert_close(&format!("{sd} unet t=7.5"), &y, &t["unet.sample_t7"], 1e-4);

        let te = models::load(&dir.join("text_encoder"), &opts).unwrap();
        let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
        let out = te.outputs(&Inputs::new(ids.clone()), false).unwrap();
        assert_eq!(out[0].0, "last_hidden_state");
        assert_close(
            &format!("{sd} text encoder"),
            &out[0].1,
            &t["text_encoder.last_hidden_state"],
            1e-4,
        );
        assert_eq!(out[1].0, "pooler_output");
        assert_close(
            &format!("{sd} pooled"),
            &out[1].1,
            &t["text_encoder.pooler_output"],
            1e-4,
        );

        let vae = models::load(&dir.join("vae"), &opts).unwrap();
        let out = vae
            .outputs(
                &Inputs {
                    sample: Some(t["image"].clone()),
                    ..Default::default()
                },
                false,
            )
            .unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["latent_dist.mean", "latent_dist.logvar", "sample"]);
        for (name, y) in &out {
            assert_close(
                &format!("{sd} vae {name}"),
                y,
                &t[&format!("vae.{name}")],
                1e-4,
            );
        }
        let decoded = vae
            .forward(
                &Inputs {
                    sample: Some(t["latents"].clone()),
                    ..Default::default()
                },
                false,
            )
            .unwrap();
        assert_close(
            &format!("{sd} vae decode"),
            &decoded,
            &t["vae.decoded_latents"],
            1e-4,
        );
    }
}

#[test]
fn pipeline_encodes_prompts_as_diffusers() {
    for sd in ["sd1", "sd2"] {
        let pipe = pipeline(sd);
        let t = fixture(&format!("{sd}_components.safetensors"));
        let ids = pipe
            .tokenizer
            .encode_batch(
                &["a photo of sks dog", "A red CUBE, on a table!"],
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            t["input_ids"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap()
        );
        let h = pipe
            .encode_prompts(&["a photo of sks dog", "A red CUBE, on a table!"], false)
            .unwrap();
        assert_close(sd, &h, &t["text_encoder.last_hidden_state"], 1e-4);
    }
}
