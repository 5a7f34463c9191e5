//! Stable Diffusion adapters against PEFT and diffusers: the LoRA PEFT trained on the UNet
//! (attention, feed-forward, resnet 3×3 and 1×1 convolutions, stride-2 downsamplers, time
//! projections) and the text encoder, read from PEFT's folders, diffusers' file (current and
//! legacy keys) and kohya's file, then merged; DoRA on the same layers; written back in each
//! format and read again; and the errors for files that do not fit.

mod sd_common;

use candle_core::{DType, Tensor};
use peft::diffusion::lora_files::AdapterFormat;
use sd_common::*;
use std::collections::HashMap;

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

fn check(
    what: &str,
    pipe: &peft::StableDiffusion,
    comp: &HashMap<String, Tensor>,
    e: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let (u, h) = outputs(pipe, comp);
    assert_close(
        &format!("{what} unet"),
        &u,
        &e[&format!("{prefix}unet.sample")],
        1e-4,
    );
    assert_close(
        &format!("{what} text encoder"),
        &h,
        &e[&format!("{prefix}text_encoder.last_hidden_state")],
        1e-4,
    );
}

#[test]
fn lora_files_from_python_load_with_the_same_outputs() {
    for sd in ["sd1", "sd2"] {
        let comp = fixture(&format!("{sd}_components.safetensors"));
        let dir = sd_fixtures().join(format!("{sd}_lora"));
        let e = load_st(&dir.join("expected.safetensors"));
        for (fmt, path, prefix) in [
            ("peft", dir.join("peft"), ""),
            ("diffusers", dir.join("diffusers"), "diffusers."),
            (
                "diffusers file",
                dir.join("diffusers/pytorch_lora_weights.safetensors"),
                "diffusers.",
            ),
            (
                "diffusers legacy",
                dir.join("diffusers_legacy"),
                "diffusers_legacy.",
            ),
            ("kohya", dir.join("kohya/lora.safetensors"), "kohya."),
        ] {
            if sd != "sd1" && matches!(fmt, "diffusers legacy" | "kohya") {
                // Written for sd1 only: they differ from PEFT's layout in names alone.
                continue;
            }
            let mut pipe = pipeline(sd);
            let done = pipe.load_adapter(&path, "a", false).unwrap();
            assert_eq!(done, ["unet", "text_encoder"], "{sd} {fmt}");
            check(&format!("{sd} {fmt}"), &pipe, &comp, &e, prefix);
        }
        // Without the adapter the pipeline is the base one again.
        let mut pipe = pipeline(sd);
        pipe.load_adapter(&dir.join("peft"), "a", false).unwrap();
        pipe.unet.delete_adapter("a").unwrap();
        let (u, _) = outputs(&pipe, &comp);
        assert_close(&format!("{sd} deleted"), &u, &comp["unet.sample"], 1e-4);
    }
}

#[test]
fn merged_pipeline_matches_peft_merge_and_saves_for_diffusers() {
    for sd in ["sd1", "sd2"] {
        let comp = fixture(&format!("{sd}_components.safetensors"));
        let dir = sd_fixtures().join(format!("{sd}_lora"));
        let e = load_st(&dir.join("expected.safetensors"));
        let mut pipe = pipeline(sd);
        pipe.load_adapter(&dir.join("peft"), "a", false).unwrap();
        pipe.unet.merge_adapter().unwrap();
        pipe.text_encoder.merge_adapter().unwrap();
        check(&format!("{sd} merged"), &pipe, &comp, &e, "merged.");
        pipe.unet.unmerge_adapter().unwrap();
        pipe.text_encoder.unmerge_adapter().unwrap();
        check(&format!("{sd} unmerged"), &pipe, &comp, &e, "");
        // merge_and_unload, then the pipeline written as diffusers lays it out and read back.
        pipe.unet.merge_adapter().unwrap();
        pipe.text_encoder.merge_adapter().unwrap();
        let out = tempfile::tempdir().unwrap();
        pipe.save_pretrained(out.path()).unwrap();
        for f in [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ] {
            assert!(out.path().join(f).exists(), "{f}");
        }
        let again = peft::StableDiffusion::load(out.path(), &candle_core::Device::Cpu).unwrap();
        check(&format!("{sd} saved merged"), &again, &comp, &e, "merged.");
        // No adapter keys leak into the merged weights.
        let w = load_st(&out.path().join("unet/diffusion_pytorch_model.safetensors"));
        assert!(w.keys().all(|k| !k.contains("lora")));
        let base = load_st(
            &sd_fixtures()
                .join(sd)
                .join("unet/diffusion_pytorch_model.safetensors"),
        );
        assert_eq!(
            w.keys().collect::<std::collections::BTreeSet<_>>(),
            base.keys().collect::<std::collections::BTreeSet<_>>()
        );
    }
}

#[test]
fn dora_on_convolutions_matches_peft() {
    let comp = fixture("sd1_components.safetensors");
    let dir = sd_fixtures().join("sd1_dora");
    let e = load_st(&dir.join("expected.safetensors"));
    let mut pipe = pipeline("sd1");
    pipe.load_adapter(&dir.join("peft"), "d", false).unwrap();
    check("sd1 dora", &pipe, &comp, &e, "");
    pipe.unet.merge_adapter().unwrap();
    pipe.text_encoder.merge_adapter().unwrap();
    check("sd1 dora merged", &pipe, &comp, &e, "merged.");
    pipe.unet.unmerge_adapter().unwrap();
    pipe.text_encoder.unmerge_adapter().unwrap();
    check("sd1 dora unmerged", &pipe, &comp, &e, "");
    // DoRA has no kohya form; diffusers' file keeps the magnitudes.
    let out = tempfile::tempdir().unwrap();
    let err = pipe
        .save_adapter(out.path(), "d", AdapterFormat::Kohya)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
    pipe.save_adapter(out.path(), "d", AdapterFormat::Diffusers)
        .unwrap();
    let mut again = pipeline("sd1");
    again.load_adapter(out.path(), "d", false).unwrap();
    check("sd1 dora via diffusers file", &again, &comp, &e, "");
}

#[test]
fn adapters_round_trip_through_every_format() {
    for sd in ["sd1", "sd2"] {
        let comp = fixture(&format!("{sd}_components.safetensors"));
        let dir = sd_fixtures().join(format!("{sd}_lora"));
        let e = load_st(&dir.join("expected.safetensors"));
        let mut pipe = pipeline(sd);
        pipe.load_adapter(&dir.join("peft"), "sks", false).unwrap();
        for fmt in [
            AdapterFormat::Peft,
            AdapterFormat::Diffusers,
            AdapterFormat::Kohya,
        ] {
            let out = tempfile::tempdir().unwrap();
            let files = pipe.save_adapter(out.path(), "sks", fmt).unwrap();
            assert!(!files.is_empty());
            let mut again = pipeline(sd);
            again.load_adapter(out.path(), "x", false).unwrap();
            check(&format!("{sd} {fmt:?} round trip"), &again, &comp, &e, "");
        }
        // PEFT's layout holds exactly the tensors PEFT wrote.
        let out = tempfile::tempdir().unwrap();
        pipe.save_adapter(out.path(), "sks", AdapterFormat::Peft)
            .unwrap();
        for c in ["unet", "text_encoder"] {
            let ours = load_st(&out.path().join(c).join("adapter_model.safetensors"));
            let theirs = load_st(&dir.join("peft").join(c).join("adapter_model.safetensors"));
            let mut a: Vec<&String> = ours.keys().collect();
            let mut b: Vec<&String> = theirs.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{sd} {c}");
            for k in a {
                assert_eq!(max_diff(&ours[k], &theirs[k]), 0.0, "{k}");
            }
        }
        // The diffusers file: PEFT's keys under `unet.` / `text_encoder.`, each LoraConfig in
        // the header, as diffusers 0.42 writes them.
        let out = tempfile::tempdir().unwrap();
        pipe.save_adapter(out.path(), "sks", AdapterFormat::Diffusers)
            .unwrap();
        let file = out.path().join("pytorch_lora_weights.safetensors");
        let ours = load_st(&file);
        let theirs = load_st(&dir.join("diffusers/pytorch_lora_weights.safetensors"));
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{sd} diffusers keys");
        let meta = peft::io::safetensors_metadata(&file).unwrap();
        let m: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
        assert_eq!(m["unet.r"], 2);
        assert_eq!(m["unet.lora_alpha"], 4);
        assert_eq!(m["text_encoder.lora_alpha"], 4);
        // kohya: lora_unet_ / lora_te_ keys, scalar alphas, the same key set as Python's.
        if sd != "sd1" {
            continue;
        }
        let out = tempfile::tempdir().unwrap();
        pipe.save_adapter(out.path(), "sks", AdapterFormat::Kohya)
            .unwrap();
        let ours = load_st(&out.path().join("lora_kohya.safetensors"));
        let theirs = load_st(&dir.join("kohya/lora.safetensors"));
        // The text encoder's modules as sd-scripts names them, under transformers 4's
        // `text_model` (the Python file was written from transformers 5's module names).
        assert!(ours
            .keys()
            .any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_")));
        let ours: HashMap<String, Tensor> = ours
            .into_iter()
            .map(|(k, v)| (k.replace("lora_te_text_model_", "lora_te_"), v))
            .collect();
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{sd} kohya keys");
        let alpha = ours.iter().find(|(k, _)| k.ends_with(".alpha")).unwrap().1;
        assert_eq!(alpha.dims(), [0usize; 0]);
        assert_eq!(alpha.to_scalar::<f32>().unwrap(), 4.0);
    }
}

#[test]
fn several_adapters_with_weights() {
    let comp = fixture("sd1_components.safetensors");
    let e = load_st(&sd_fixtures().join("sd1_lora/expected.safetensors"));
    let mut pipe = pipeline("sd1");
    let dir = sd_fixtures().join("sd1_lora");
    pipe.load_adapter(&dir.join("peft"), "a", false).unwrap();
    pipe.load_adapter(&dir.join("kohya/lora.safetensors"), "b", false)
        .unwrap();
    // 0.7 a + 0.3 b of the same adapter is the adapter itself.
    for m in [&mut pipe.unet, &mut pipe.text_encoder] {
        m.set_adapters_weighted(&["a", "b"], &[0.7, 0.3]).unwrap();
    }
    check("0.7 a + 0.3 b", &pipe, &comp, &e, "");
    // Weight 0 is the base model; weights 0.5 + 0.5 of it halfway.
    for m in [&mut pipe.unet, &mut pipe.text_encoder] {
        m.set_adapters_weighted(&["a", "b"], &[0.0, 0.0]).unwrap();
    }
    let (u, _) = outputs(&pipe, &comp);
    assert_close("weights 0", &u, &comp["unet.sample"], 1e-5);
    // A weighted merge equals the weighted forward, and unmerges back.
    for m in [&mut pipe.unet, &mut pipe.text_encoder] {
        m.set_adapters_weighted(&["a", "b"], &[0.25, 0.5]).unwrap();
    }
    let (u1, h1) = outputs(&pipe, &comp);
    for m in [&mut pipe.unet, &mut pipe.text_encoder] {
        m.merge_adapter().unwrap();
    }
    let (u2, h2) = outputs(&pipe, &comp);
    assert_close("weighted merge unet", &u2, &u1, 1e-4);
    assert_close("weighted merge te", &h2, &h1, 1e-4);
    for m in [&mut pipe.unet, &mut pipe.text_encoder] {
        m.unmerge_adapter().unwrap();
        m.set_adapters_weighted(&["a"], &[1.0]).unwrap();
    }
    check("after unmerge", &pipe, &comp, &e, "");
}

#[test]
fn files_that_do_not_fit_say_why() {
    // An SD 2.x-style LoRA on the SD 1.x-style UNet: layers it does not have.
    let mut pipe = pipeline("sd1");
    for f in [
        "sd2_lora/diffusers/pytorch_lora_weights.safetensors",
        "sd2_lora/diffusers",
    ] {
        let err = pipe
            .load_adapter(&sd_fixtures().join(f), "x", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matches no layer") || err.contains("not an adaptable layer"),
            "{err}"
        );
    }
    let err = pipe
        .load_adapter(&sd_fixtures().join("sd2_lora/peft"), "x", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not fit"), "{err}");
    // A LoRA for a UNet whose first block is twice as wide: both shapes are named.
    let tmp = tempfile::tempdir().unwrap();
    let src = sd_fixtures().join("sd1_lora/diffusers/pytorch_lora_weights.safetensors");
    let mut t = load_st(&src);
    let key = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight";
    assert_eq!(t[key].dims(), [2, 8, 3, 3]);
    t.insert(
        key.to_string(),
        Tensor::zeros((2, 16, 3, 3), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let file = tmp.path().join("wide.safetensors");
    peft::io::save_safetensors(&file, &t.into_iter().collect::<Vec<_>>()).unwrap();
    let err = pipe
        .load_adapter(&file, "x", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not fit")
            && err.contains("[2, 16, 3, 3]")
            && err.contains("[2, 8, 3, 3]"),
        "{err}"
    );
    // The failed loads left nothing behind.
    assert!(pipe.unet.adapter_names().is_empty());
    assert!(pipe.text_encoder.adapter_names().is_empty());
    // A pipeline folder without its VAE.
    let tmp = tempfile::tempdir().unwrap();
    for c in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&sd_fixtures().join("sd1").join(c), &tmp.path().join(c));
    }
    std::fs::copy(
        sd_fixtures().join("sd1/model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let err = peft::StableDiffusion::load(tmp.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`vae/`") && err.contains("missing"), "{err}");
    // No adapter at a path.
    let err = pipe
        .load_adapter(tmp.path(), "x", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no adapter here"), "{err}");
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}
