//! The `peft` binary on the tiny Stable Diffusion pipelines (made by diffusers 0.42 + PEFT 0.21,
//! see tools/fixtures/make_sd_fixtures.py): `forward --inputs` on each component with and
//! without an adapter, `generate-image` with several weighted adapters, `merge` of a pipeline,
//! `convert` between the three adapter layouts, a DreamBooth `train`, and the errors for a
//! pipeline missing a component and an undecodable picture.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

mod common;

use common::{max_diff, peft, tensor};

fn sd() -> PathBuf {
    common::peft_fixtures().join("sd")
}

fn p(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture's component inputs under diffusers' / transformers' names, in a file.
fn inputs_file(dir: &Path, sd_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let c = sd().join(format!("{sd_name}_components.safetensors"));
    let t = candle_core::safetensors::load(&c, &Device::Cpu).unwrap();
    let pick = |names: &[&str]| -> Vec<(String, Tensor)> {
        names
            .iter()
            .map(|n| (n.to_string(), t[*n].clone()))
            .collect()
    };
    let unet = dir.join("unet_inputs.safetensors");
    peft::io::save_safetensors(
        &unet,
        &pick(&["sample", "timestep", "encoder_hidden_states"]),
    )
    .unwrap();
    let te = dir.join("te_inputs.safetensors");
    peft::io::save_safetensors(&te, &pick(&["input_ids"])).unwrap();
    let mut img = pick(&["image"]);
    img[0].0 = "sample".into();
    let vae = dir.join("vae_inputs.safetensors");
    peft::io::save_safetensors(&vae, &img).unwrap();
    (unet, te, vae)
}

#[test]
fn forward_on_each_component_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (unet_in, te_in, vae_in) = inputs_file(tmp.path(), "sd1");
    let comp = sd().join("sd1_components.safetensors");
    let out = tmp.path().join("out.safetensors");
    let run = |model: &Path, inputs: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "forward",
            "--model",
            p(model),
            "--inputs",
            p(inputs),
            "--out",
            p(&out),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", p(a)]);
        }
        let (ok, log) = peft(&args);
        assert!(ok, "{log}");
    };
    run(&sd().join("sd1/unet"), &unet_in, None);
    assert!(max_diff(&tensor(&out, "sample"), &tensor(&comp, "unet.sample")) <= 1e-4);
    run(&sd().join("sd1/text_encoder"), &te_in, None);
    assert!(
        max_diff(
            &tensor(&out, "last_hidden_state"),
            &tensor(&comp, "text_encoder.last_hidden_state")
        ) <= 1e-4
    );
    assert!(
        max_diff(
            &tensor(&out, "pooler_output"),
            &tensor(&comp, "text_encoder.pooler_output")
        ) <= 1e-4
    );
    run(&sd().join("sd1/vae"), &vae_in, None);
    for n in ["latent_dist.mean", "latent_dist.logvar", "sample"] {
        assert!(
            max_diff(&tensor(&out, n), &tensor(&comp, &format!("vae.{n}"))) <= 1e-4,
            "{n}"
        );
    }
    // With PEFT's adapter on the UNet and on the text encoder.
    let e = sd().join("sd1_lora/expected.safetensors");
    run(
        &sd().join("sd1/unet"),
        &unet_in,
        Some(&sd().join("sd1_lora/peft/unet")),
    );
    assert!(max_diff(&tensor(&out, "sample"), &tensor(&e, "unet.sample")) <= 1e-4);
    run(
        &sd().join("sd1/text_encoder"),
        &te_in,
        Some(&sd().join("sd1_lora/peft/text_encoder")),
    );
    assert!(
        max_diff(
            &tensor(&out, "last_hidden_state"),
            &tensor(&e, "text_encoder.last_hidden_state")
        ) <= 1e-4
    );
    // A name diffusers does not use is refused, naming the ones it does.
    let bad = tmp.path().join("bad.safetensors");
    peft::io::save_safetensors(
        &bad,
        &[(
            "latents".to_string(),
            Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )],
    )
    .unwrap();
    let (ok, log) = peft(&[
        "forward",
        "--model",
        p(&sd().join("sd1/unet")),
        "--inputs",
        p(&bad),
        "--out",
        p(&out),
    ]);
    assert!(
        !ok && log.contains("latents") && log.contains("encoder_hidden_states"),
        "{log}"
    );
}

#[test]
fn generate_image_merge_and_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let model = sd().join("sd1");
    let lora = sd().join("sd1_lora");
    let png = tmp.path().join("a.png");
    // Two adapters (the same LoRA in two files), weighted, Euler ancestral, two images.
    let (ok, log) = peft(&[
        "generate-image",
        "--model",
        p(&model),
        "--adapter",
        &format!("a={}", p(&lora.join("peft"))),
        "--adapter",
        &format!("b={}", p(&lora.join("kohya/lora.safetensors"))),
        "--weights",
        "0.7,0.3",
        "--prompt",
        "a photo of sks dog",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--width",
        "24",
        "--height",
        "16",
        "--num-images",
        "2",
        "--out",
        p(&png),
    ]);
    assert!(ok, "{log}");
    for f in ["a-0.png", "a-1.png"] {
        let i = image::open(tmp.path().join(f)).unwrap();
        assert_eq!((i.width(), i.height()), (24, 16), "{f}");
    }
    // The default scheduler of a PNDM pipeline is DDIM, and the default size 16 x 16.
    let (ok, log) = peft(&[
        "generate-image",
        "--model",
        p(&model),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        p(&png),
    ]);
    assert!(ok, "{log}");
    assert_eq!(image::open(&png).unwrap().width(), 16);

    // merge: the pipeline written with the adapter folded in gives the adapter's outputs.
    let merged = tmp.path().join("merged");
    let (ok, log) = peft(&[
        "merge",
        "--model",
        p(&model),
        "--adapter",
        p(&lora.join("diffusers")),
        "--out",
        p(&merged),
    ]);
    assert!(ok, "{log}");
    let (unet_in, _, _) = inputs_file(tmp.path(), "sd1");
    let out = tmp.path().join("out.safetensors");
    let (ok, log) = peft(&[
        "forward",
        "--model",
        p(&merged.join("unet")),
        "--inputs",
        p(&unet_in),
        "--out",
        p(&out),
    ]);
    assert!(ok, "{log}");
    let e = lora.join("expected.safetensors");
    assert!(max_diff(&tensor(&out, "sample"), &tensor(&e, "merged.unet.sample")) <= 1e-4);

    // convert: PEFT's folders into kohya's file and back into diffusers', same outputs.
    let kohya = tmp.path().join("kohya");
    let (ok, log) = peft(&[
        "convert",
        "--model",
        p(&model),
        "--adapter",
        p(&lora.join("peft")),
        "--format",
        "kohya",
        "--out",
        p(&kohya),
    ]);
    assert!(ok, "{log}");
    let diffusers = tmp.path().join("diffusers");
    let (ok, log) = peft(&[
        "convert",
        "--model",
        p(&model),
        "--adapter",
        p(&kohya.join("lora_kohya.safetensors")),
        "--format",
        "diffusers",
        "--out",
        p(&diffusers),
    ]);
    assert!(ok, "{log}");
    let peft_dir = tmp.path().join("peft");
    let (ok, log) = peft(&[
        "convert",
        "--model",
        p(&model),
        "--adapter",
        p(&diffusers),
        "--format",
        "peft",
        "--out",
        p(&peft_dir),
    ]);
    assert!(ok, "{log}");
    let (ok, log) = peft(&[
        "forward",
        "--model",
        p(&model.join("unet")),
        "--adapter",
        p(&peft_dir.join("unet")),
        "--inputs",
        p(&unet_in),
        "--out",
        p(&out),
    ]);
    assert!(ok, "{log}");
    assert!(max_diff(&tensor(&out, "sample"), &tensor(&e, "unet.sample")) <= 1e-4);
}

#[test]
fn dreambooth_train_then_generate_and_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let inst = tmp.path().join("instance");
    std::fs::create_dir_all(&inst).unwrap();
    for i in 0..2u8 {
        let pic = image::RgbImage::from_fn(20, 16, |x, _| image::Rgb([200, 40 * i, x as u8 * 10]));
        pic.save(inst.join(format!("p{i}.png"))).unwrap();
    }
    std::fs::write(
        inst.join("captions.jsonl"),
        "{\"file_name\": \"p1.png\", \"text\": \"a sks dog on grass\"}\n",
    )
    .unwrap();
    let class = tmp.path().join("class");
    let out = tmp.path().join("run");
    let config = tmp.path().join("db.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                r#"
[model]
path = "{model}"

[peft]
peft_type = "LORA"
r = 2
lora_alpha = 4
target_modules = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]

[peft_text_encoder]
peft_type = "LORA"
r = 2
lora_alpha = 4
target_modules = ["q_proj", "v_proj"]

[data]
instance_data_dir = "{inst}"
instance_prompt = "a photo of sks dog"
captions_file = "{captions}"
class_data_dir = "{class}"
class_prompt = "a photo of dog"
num_class_images = 2
class_sample_steps = 2
prior_loss_weight = 0.5
resolution = 16
random_flip = true
{extra}

[training]
output_dir = "{out}"
learning_rate = 1e-3
max_steps = 3
per_device_train_batch_size = 1
logging_steps = 1
save_steps = 2
"#,
                model = p(&sd().join("sd1")),
                inst = p(&inst),
                captions = p(&inst.join("captions.jsonl")),
                class = p(&class),
                out = p(&out),
            ),
        )
        .unwrap()
    };
    write("");
    let (ok, log) = peft(&["train", "--config", p(&config)]);
    assert!(ok, "{log}");
    assert!(
        log.contains("unet: trainable params") && log.contains("text_encoder: trainable params"),
        "{log}"
    );
    // Two class pictures were generated for prior preservation.
    assert_eq!(std::fs::read_dir(&class).unwrap().count(), 2);
    for f in [
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
        "text_encoder/adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
        "metrics.jsonl",
        "checkpoint-2/unet/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    // The trained adapter samples.
    let png = tmp.path().join("after.png");
    let (ok, log) = peft(&[
        "generate-image",
        "--model",
        p(&sd().join("sd1")),
        "--adapter",
        p(&out),
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "2",
        "--out",
        p(&png),
    ]);
    assert!(ok, "{log}");

    // A picture that is not one.
    std::fs::write(inst.join("broken.png"), b"not a png").unwrap();
    let (ok, log) = peft(&["train", "--config", p(&config)]);
    assert!(
        !ok && log.contains("broken.png") && log.contains("cannot decode"),
        "{log}"
    );
    std::fs::remove_file(inst.join("broken.png")).unwrap();
    // An unknown [data] key names the valid ones.
    write("resolutoin = 8");
    let (ok, log) = peft(&["train", "--config", p(&config)]);
    assert!(
        !ok && log.contains("resolutoin") && log.contains("resolution"),
        "{log}"
    );
    // A pipeline without its VAE.
    let partial = tmp.path().join("partial");
    for c in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        let d = partial.join(c);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(sd().join("sd1").join(c)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        sd().join("sd1/model_index.json"),
        partial.join("model_index.json"),
    )
    .unwrap();
    let (ok, log) = peft(&[
        "generate-image",
        "--model",
        p(&partial),
        "--prompt",
        "x",
        "--out",
        p(&png),
    ]);
    assert!(
        !ok && log.contains("vae/") && log.contains("missing"),
        "{log}"
    );
}
