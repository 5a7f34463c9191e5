//! Trains bottleneck adapters (with AdapterHub prediction heads) and a fusion here, saves them in
//! AdapterHub's layout with the logits they give, for `tools/fixtures/check_adapterhub.py` to
//! load in `adapters` 1.3.0 and compare.
//!
//!     cargo run -p peft --example adapterhub_export -- /tmp/ah-export
//!     /tmp/pyenv-ah/bin/python tools/fixtures/check_adapterhub.py /tmp/ah-export
//!
//! On the fixture BERT (crates/peft/tests/fixtures/adapterhub/models/bert): `pfeiffer_cls`
//! (seq_bn + a 2-layer classification head), `houlsby_tag` (double_seq_bn + a tagging head),
//! `custom` (ln_before/after, gating, learned scaling, per-layer reduction, leave_out; no head),
//! `second` (seq_bn, reduction 8, no head) and `fusion` (Fuse(pfeiffer_cls, second) with its own
//! classification head), each trained 20
//! AdamW steps on random labels. `logits.safetensors` holds each one's eval-mode output on
//! `input_ids` (also saved there).

use peft::candle::{DType, Device, Tensor};
use peft::tuners::bottleneck::ReductionFactor;
use peft::{
    AdamW, AdamWParams, AdapterHubExt, BottleneckConfig, FusionConfig, HeadConfig, Inputs,
    LoadOptions, PeftModel, TaskType,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapterhub/models/bert")
}

fn base() -> peft::Result<Box<dyn peft::Model>> {
    peft::load_model(
        &model_dir(),
        &LoadOptions {
            task: Some(TaskType::FeatureExtraction),
            ..Default::default()
        },
    )
}

/// 20 AdamW steps of cross-entropy on random labels (sequence or token level), or of the mean
/// square of the output without a head; plus the method's regularisation.
fn train(m: &mut PeftModel, ids: &Tensor, tagging: bool, classes: u32) -> peft::Result<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut opt = AdamW::new(m.trainable_parameters(), AdamWParams::default())?;
    let (b, t) = ids.dims2()?;
    let mut last = 0.0;
    for _ in 0..20 {
        let out = m.forward(&Inputs::new(ids.clone()), true)?;
        let mut loss = if classes == 0 {
            out.sqr()?.mean_all()?
        } else if tagging {
            let labels: Vec<i64> = (0..b * t)
                .map(|_| rng.random_range(0..classes) as i64)
                .collect();
            let labels = Tensor::from_vec(labels, b * t, &Device::Cpu)?;
            peft::classification_loss(&out.reshape((b * t, classes as usize))?, &labels)?
        } else {
            let labels: Vec<i64> = (0..b)
                .map(|_| rng.random_range(0..classes) as i64)
                .collect();
            peft::classification_loss(&out, &Tensor::from_vec(labels, b, &Device::Cpu)?)?
        };
        if let Some(r) = m.regularization_loss()? {
            loss = (loss + r)?;
        }
        last = loss.to_scalar::<f32>()?;
        opt.step(&loss.backward()?, 5e-3, 1.0)?;
    }
    Ok(last)
}

fn main() -> peft::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or("/tmp/ah-export".into()));
    std::fs::create_dir_all(&out).map_err(|e| peft::Error::io(&out, e))?;
    let ids = Tensor::new(
        &[
            [3u32, 17, 41, 12, 5, 9, 33, 2],
            [4, 22, 8, 61, 11, 10, 7, 70],
            [9, 9, 81, 6, 14, 30, 2, 1],
        ],
        &Device::Cpu,
    )?;
    let x = Inputs::new(ids.clone());
    let mut logits: Vec<(String, Tensor)> = vec![("input_ids".into(), ids.to_dtype(DType::I64)?)];

    // seq_bn with a classification head, double_seq_bn with a tagging head.
    for (name, preset, head, tagging, classes) in [
        (
            "pfeiffer_cls",
            "seq_bn",
            HeadConfig::classification(3),
            false,
            3,
        ),
        (
            "houlsby_tag",
            "double_seq_bn",
            HeadConfig::tagging(4),
            true,
            4,
        ),
    ] {
        let config = BottleneckConfig {
            head: Some(head),
            ..BottleneckConfig::preset(preset)?
        };
        let mut m = peft::get_peft_model_with_seed(base()?, config, name, 1)?;
        let loss = train(&mut m, &ids, tagging, classes)?;
        m.save_adapterhub(name, &out.join(name))?;
        logits.push((name.into(), m.forward(&x, false)?));
        eprintln!("{name}: final loss {loss:.4}");
    }

    // A custom config, no head.
    let custom = BottleneckConfig {
        mh_adapter: true,
        output_adapter: true,
        reduction_factor: ReductionFactor::PerLayer(BTreeMap::from([
            ("0".to_string(), 2.0),
            ("default".to_string(), 8.0),
        ])),
        non_linearity: "gelu".into(),
        ln_before: true,
        ln_after: true,
        use_gating: true,
        scaling: peft::tuners::bottleneck::Scaling::Mode("learned".into()),
        leave_out: vec![2],
        ..BottleneckConfig::preset("seq_bn")?
    };
    let mut m = peft::get_peft_model_with_seed(base()?, custom, "custom", 2)?;
    let loss = train(&mut m, &ids, false, 0)?;
    m.save_adapterhub("custom", &out.join("custom"))?;
    logits.push(("custom".into(), m.forward(&x, false)?));
    eprintln!("custom: final loss {loss:.4}");

    // A second seq_bn adapter (reduction 8), then Fuse(pfeiffer_cls, second) with its own head;
    // only the fusion trains.
    let second = BottleneckConfig {
        reduction_factor: ReductionFactor::All(8.0),
        ..BottleneckConfig::preset("seq_bn")?
    };
    let mut m = peft::get_peft_model_with_seed(base()?, second, "second", 3)?;
    train(&mut m, &ids, false, 0)?;
    m.save_adapterhub("second", &out.join("second"))?;
    logits.push(("second".into(), m.forward(&x, false)?));
    let mut m = PeftModel::from_pretrained(
        base()?,
        &out.join("pfeiffer_cls"),
        peft::FromPretrained {
            adapter_name: "pfeiffer_cls".into(),
            is_trainable: false,
        },
    )?;
    m.load_adapter(&out.join("second"), "second", false)?;
    let fusion = FusionConfig {
        adapter_names: vec!["pfeiffer_cls".into(), "second".into()],
        head: Some(HeadConfig::classification(2)),
        ..FusionConfig::preset("dynamic")?
    };
    m.add_adapter("fusion", fusion)?;
    m.set_adapter("fusion")?;
    let loss = train(&mut m, &ids, false, 2)?;
    m.save_adapterhub("fusion", &out.join("fusion"))?;
    logits.push(("fusion".into(), m.forward(&x, false)?));
    eprintln!("fusion: final loss {loss:.4}");

    peft::io::save_safetensors(&out.join("logits.safetensors"), &logits)?;
    println!("wrote {}", out.display());
    Ok(())
}
