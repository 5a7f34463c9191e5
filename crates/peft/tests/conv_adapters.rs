//! Adapters on convolutions against PEFT 0.21: LoRA (`lora_A` with the base kernel, stride and
//! padding, `lora_B` 1×1 with the base groups), DoRA, LoHa and LoKr (flattened and
//! `use_effective_conv2d` CP forms) on a five-convolution net — 1×1, 3×3 padding 1, 3×3
//! stride 2, 3×3 in two groups, 1×3 — built here outside the crate from plain `Conv2d` sites,
//! as any model builds them. Forward, merge and unmerge within 1e-5; merging a grouped
//! convolution's LoRA is refused as PEFT refuses it.

use candle_core::{Device, Tensor};
use peft::layers::{Conv2d, ConvParams};
use peft::models::{Cache, Inputs, Model, ModelDims, ModelInfo, TaskType};
use peft::{FromPretrained, PeftModel};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/conv")
}

struct ConvNet {
    info: ModelInfo,
    convs: Vec<Conv2d>,
}
peft::impl_modules!(ConvNet { convs });

impl ConvNet {
    fn load() -> Self {
        let w = peft::io::load_safetensors(&dir().join("model.safetensors"), &Device::Cpu).unwrap();
        let p = |stride, padding, groups| ConvParams {
            stride,
            padding,
            dilation: 1,
            groups,
        };
        let convs = [
            ("conv_a", p(1, 0, 1)),
            ("conv_b", p(1, 1, 1)),
            ("conv_c", p(2, 1, 1)),
            ("conv_d", p(1, 1, 2)),
            ("conv_e", p(1, 0, 1)),
        ]
        .into_iter()
        .map(|(n, params)| {
            Conv2d::new(
                n,
                w[&format!("{n}.weight")].clone(),
                Some(w[&format!("{n}.bias")].clone()),
                params,
            )
        })
        .collect();
        Self {
            info: ModelInfo {
                model_type: "convnet".into(),
                architecture: "ConvNet".into(),
                task: TaskType::FeatureExtraction,
                head: Vec::new(),
                config: serde_json::json!({}),
                dir: dir(),
            },
            convs,
        }
    }
}

impl Model for ConvNet {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn dims(&self) -> ModelDims {
        ModelDims::default()
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn embed_tokens(&self, _: &Tensor, _: bool) -> peft::Result<Tensor> {
        Err(peft::Error::Config("no tokens".into()))
    }
    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        _: Option<&mut Cache>,
        train: bool,
    ) -> peft::Result<Tensor> {
        let mut x = inputs.sample.clone().unwrap();
        for (i, c) in self.convs.iter().enumerate() {
            x = c.forward_t(&x, train)?;
            if i + 1 < self.convs.len() {
                x = x.silu()?;
            }
        }
        Ok(x)
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn conv_adapters_match_peft() {
    let e = peft::io::load_safetensors(&dir().join("expected.safetensors"), &Device::Cpu).unwrap();
    let inputs = Inputs {
        sample: Some(e["x"].clone()),
        ..Default::default()
    };
    let base = ConvNet::load().forward(&inputs, false).unwrap();
    assert!(max_diff(&base, &e["base"]) < 1e-5);
    for (case, module_type) in [
        ("lora", "lora.Conv2d"),
        ("lora_groups", "lora.Conv2d"),
        ("dora", "lora.Conv2d"),
        ("loha", "loha.Conv2d"),
        ("loha_effective", "loha.Conv2d"),
        ("lokr", "lokr.Conv2d"),
        ("lokr_effective", "lokr.Conv2d"),
    ] {
        let mut m = PeftModel::from_pretrained(
            Box::new(ConvNet::load()),
            &dir().join(case),
            FromPretrained::default(),
        )
        .unwrap_or_else(|err| panic!("{case}: {err}"));
        let status = m.layer_status().unwrap();
        assert!(
            status.iter().all(|s| s.module_type == module_type),
            "{case}"
        );
        let y = m.forward(&inputs, false).unwrap();
        let d = max_diff(&y, &e[&format!("{case}.adapter")]);
        assert!(d < 1e-5, "{case}: adapter output off by {d:e}");
        if case == "lora_groups" {
            let err = m.merge_adapter().unwrap_err().to_string();
            assert!(err.contains("groups > 1"), "{err}");
            continue;
        }
        m.merge_adapter().unwrap();
        let d = max_diff(
            &m.forward(&inputs, false).unwrap(),
            &e[&format!("{case}.merged")],
        );
        assert!(d < 1e-5, "{case}: merged output off by {d:e}");
        m.unmerge_adapter().unwrap();
        let d = max_diff(
            &m.forward(&inputs, false).unwrap(),
            &e[&format!("{case}.unmerged")],
        );
        assert!(d < 1e-5, "{case}: unmerged output off by {d:e}");
        // The saved adapter holds exactly PEFT's tensors.
        let out = tempfile::tempdir().unwrap();
        m.save_pretrained(out.path()).unwrap();
        let ours =
            peft::io::load_safetensors(&out.path().join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        let theirs = peft::io::load_safetensors(
            &dir().join(case).join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut a: Vec<_> = ours.keys().collect();
        let mut b: Vec<_> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}");
    }
}

#[test]
fn conv_lora_trains_and_checks_groups() {
    // A fresh LoRA on every convolution: B starts at zero, so the output is the base one, and
    // after one backward every factor of every convolution has a gradient once B moves.
    let config = peft::LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(peft::ModuleSpec::List(
            ["conv_a", "conv_b", "conv_c", "conv_d", "conv_e"]
                .map(String::from)
                .to_vec(),
        )),
        init_lora_weights: peft::tuners::lora::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let m = peft::get_peft_model(Box::new(ConvNet::load()), config, "default").unwrap();
    let e = peft::io::load_safetensors(&dir().join("expected.safetensors"), &Device::Cpu).unwrap();
    let inputs = Inputs {
        sample: Some(e["x"].clone()),
        ..Default::default()
    };
    let loss = m
        .forward(&inputs, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let params = m.trainable_parameters();
    assert_eq!(params.len(), 10);
    for (k, v) in params {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{k}: zero gradient");
    }
    // A rank the groups do not divide is refused, naming both.
    let config = peft::LoraConfig {
        r: 3,
        target_modules: Some(peft::ModuleSpec::List(vec!["conv_d".into()])),
        ..Default::default()
    };
    let err = peft::get_peft_model(Box::new(ConvNet::load()), config, "default")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rank 3") && err.contains("groups=2"), "{err}");
}
