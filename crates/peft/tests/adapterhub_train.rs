//! Training hook methods through the generic trainer: a bottleneck adapter with its own
//! AdapterHub head learns (only adapter and head weights train), AdapterDrop skips a random
//! prefix of layers each step and none afterwards, a fusion trains alone with its regularisation,
//! and `[peft]` tables with AdapterHub's field names parse.

use candle_core::{Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::train::config::{Interval, TrainConfig, TrainingArguments};
use peft::train::data::{CollateOptions, Example, PaddingSide, Target};
use peft::train::Trainer;
use peft::{BottleneckConfig, FusionConfig, HeadConfig, PeftConfig, PeftModel, TaskType};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapterhub")
}

fn base() -> Box<dyn peft::Model> {
    models::load(
        &fixtures().join("models/bert"),
        &LoadOptions {
            task: Some(TaskType::FeatureExtraction),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Sequences whose class is their second token's parity: learnable.
fn examples(n: usize) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    (0..n)
        .map(|_| {
            let len = rng.random_range(4..10);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(5..99)).collect();
            Example {
                token_type_ids: vec![0; len],
                target: Target::Class((ids[1] % 2) as i64),
                input_ids: ids,
                task_id: None,
            }
        })
        .collect()
}

fn trainer<'a>(m: &'a mut PeftModel, train: &'a [Example], out: &Path) -> Trainer<'a> {
    Trainer {
        model: m,
        args: TrainingArguments {
            output_dir: out.to_path_buf(),
            learning_rate: 1e-2,
            num_train_epochs: 15.0,
            per_device_train_batch_size: 8,
            logging_steps: 1000,
            save_strategy: Interval::No,
            seed: 1,
            ..Default::default()
        },
        collate: CollateOptions {
            task: TaskType::SeqCls,
            pad_id: 0,
            padding_side: PaddingSide::Right,
            decoder_start_id: 0,
        },
        train,
        eval: Some(train),
        label_names: vec![],
        callback: None,
        stop: Default::default(),
        group: Default::default(),
    }
}

#[test]
fn a_bottleneck_adapter_with_its_own_head_trains_through_the_trainer() {
    let config = BottleneckConfig {
        head: Some(HeadConfig::classification(2)),
        adapter_drop: true,
        ..BottleneckConfig::preset("seq_bn").unwrap()
    }
    .with_task_type_seq_cls();
    let mut m = peft::get_peft_model_with_seed(base(), config, "default", 1).unwrap();
    let keys: Vec<String> = m
        .trainable_parameters()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.iter()
            .all(|k| k.contains(".adapter_") || k.starts_with("head.")),
        "{keys:?}"
    );
    assert_eq!(keys.iter().filter(|k| k.starts_with("head.")).count(), 4);
    let data = examples(48);
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(&mut m, &data, tmp.path());
    let before = t.evaluate().unwrap().unwrap();
    t.train().unwrap();
    let after = t.evaluate().unwrap().unwrap();
    assert!(
        after["loss"] < before["loss"] * 0.8,
        "loss {} → {}",
        before["loss"],
        after["loss"]
    );
    // AdapterDrop is off once training ends.
    assert!(m.skip_layers().is_empty());
}

trait SeqCls {
    fn with_task_type_seq_cls(self) -> Self;
}
impl SeqCls for BottleneckConfig {
    fn with_task_type_seq_cls(mut self) -> Self {
        self.base.task_type = Some(TaskType::SeqCls);
        self
    }
}

#[test]
fn adapter_drop_skips_a_random_prefix_of_layers_each_step_and_none_after() {
    let config = BottleneckConfig {
        adapter_drop: true,
        ..BottleneckConfig::preset("double_seq_bn").unwrap()
    };
    let mut m = peft::get_peft_model(base(), config, "default").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..40 {
        m.before_train_step(seed).unwrap();
        let skipped = m.skip_layers();
        // A prefix 0..k, k in [0, layers - 1) = [0, 3) for the 4-layer model.
        assert!(skipped.len() < 3, "{skipped:?}");
        assert_eq!(skipped, (0..skipped.len()).collect::<Vec<_>>());
        seen.insert(skipped.len());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
    m.after_training().unwrap();
    assert!(m.skip_layers().is_empty());
    // Without adapter_drop nothing is skipped.
    let mut m = peft::get_peft_model(
        base(),
        BottleneckConfig::preset("seq_bn").unwrap(),
        "default",
    )
    .unwrap();
    m.before_train_step(5).unwrap();
    assert!(m.skip_layers().is_empty());
}

#[test]
fn a_fusion_trains_alone_with_its_regularisation() {
    let dir = fixtures().join("bert/fusion_dynamic");
    let mut m = PeftModel::from_pretrained(
        base(),
        &dir.join("a"),
        peft::FromPretrained {
            adapter_name: "a".into(),
            is_trainable: false,
        },
    )
    .unwrap();
    m.load_adapter(&dir.join("b"), "b", false).unwrap();
    let config = FusionConfig {
        adapter_names: vec!["a".into(), "b".into()],
        head: Some(HeadConfig::classification(2)),
        ..FusionConfig::preset("dynamic").unwrap()
    };
    m.add_adapter("fusion", config).unwrap();
    m.set_adapter("fusion").unwrap();
    // The value matrices start at the identity (off-diagonal 1e-6): the regularisation is tiny.
    let reg = m
        .regularization_loss()
        .unwrap()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(reg < 1e-6, "{reg}");
    let frozen: Vec<(String, Tensor)> = m.adapter_state_dict("a").unwrap();
    let data = examples(24);
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(&mut m, &data, tmp.path());
    t.args.num_train_epochs = 3.0;
    t.train().unwrap();
    // The fused adapters did not move; the fusion did, and is now regularised.
    for (k, v) in m.adapter_state_dict("a").unwrap() {
        let old = &frozen.iter().find(|(n, _)| *n == k).unwrap().1;
        let d = (v - old)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k} moved");
    }
    let reg = m
        .regularization_loss()
        .unwrap()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(reg > 1e-6, "{reg}");
    let _ = Device::Cpu;
}

#[test]
fn peft_tables_take_adapterhubs_field_names() {
    let toml = r#"
[model]
path = "x"
task_type = "SEQ_CLS"
[peft]
peft_type = "BOTTLENECK"
config = "double_seq_bn"
reduction_factor = 8
non_linearity = "relu"
leave_out = [0]
adapter_drop = true
head = { head_type = "classification", layers = 2, activation_function = "tanh" }
[data]
train_file = "t.csv"
"#;
    let cfg = TrainConfig::from_toml_str(toml).unwrap();
    let c = cfg.peft.downcast_ref::<BottleneckConfig>().unwrap();
    assert!(c.mh_adapter && c.output_adapter && c.adapter_drop);
    assert_eq!(c.non_linearity, "relu");
    assert_eq!(c.leave_out, [0]);
    assert!(cfg.peft.brings_head());
    let e = TrainConfig::from_toml_str(&toml.replace("reduction_factor", "reduction_fctor"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[peft]") && e.contains("reduction_factor"),
        "{e}"
    );
    let fusion = r#"
[model]
path = "x"
[peft]
peft_type = "ADAPTER_FUSION"
config = "static"
adapter_names = ["a", "b"]
[data]
train_file = "t.csv"
"#;
    let cfg = TrainConfig::from_toml_str(fusion).unwrap();
    assert_eq!(cfg.peft.peft_type(), "ADAPTER_FUSION");
    let _: &PeftConfig = &cfg.peft;
}

#[test]
fn a_fusion_config_loads_the_adapters_it_fuses_and_saves_self_contained() {
    let dir = fixtures().join("bert/fusion_static");
    let config = PeftConfig::from_user_json(&serde_json::json!({
        "peft_type": "ADAPTER_FUSION",
        "config": "dynamic",
        "adapters": [dir.join("a"), dir.join("b")],
    }))
    .unwrap();
    let f = config.downcast_ref::<FusionConfig>().unwrap();
    // The names AdapterHub recorded in the directories.
    assert_eq!(f.adapter_names, ["a", "b"]);
    let m = peft::get_peft_model(base(), config, "default").unwrap();
    let mut names = m.adapter_names();
    names.sort();
    assert_eq!(names, ["a", "b", "default"]);
    let keys: Vec<String> = m
        .trainable_parameters()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.iter()
            .all(|k| k.contains("query") || k.contains("key") || k.contains("value")),
        "{keys:?}"
    );
    let ids = Tensor::new(&[[3u32, 7, 1, 12, 5, 9]], &Device::Cpu).unwrap();
    let x = peft::Inputs::new(ids);
    let want = m.forward(&x, false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_pretrained(tmp.path()).unwrap();
    assert!(tmp.path().join("a/adapter_config.json").exists());
    // Loading the fusion alone brings its fused adapters from beside it.
    let back = PeftModel::from_pretrained(base(), tmp.path(), Default::default()).unwrap();
    for n in ["a", "b", "default"] {
        let s1: std::collections::HashMap<String, Tensor> =
            m.adapter_state_dict(n).unwrap().into_iter().collect();
        let s2: std::collections::HashMap<String, Tensor> =
            back.adapter_state_dict(n).unwrap().into_iter().collect();
        assert_eq!(s1.len(), s2.len(), "{n}");
        for (k, v) in &s1 {
            let d = (v - &s2[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d == 0.0, "{n} {k} {d}");
        }
    }
    assert_eq!(back.active_adapters(), m.active_adapters());
    let got = back.forward(&x, false).unwrap();
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    // A missing fused adapter is named.
    let e = PeftConfig::from_user_json(&serde_json::json!({
        "peft_type": "ADAPTER_FUSION",
        "adapters": [dir.join("a"), dir.join("nope")],
    }))
    .map(|c| {
        peft::get_peft_model(base(), c, "default")
            .err()
            .unwrap()
            .to_string()
    })
    .unwrap();
    assert!(e.contains("`nope`"), "{e}");
}

/// Evaluation runs under `no_grad`: a bottleneck adapter (and its head) must then record no graph,
/// or every activation of an evaluation batch stays alive until the logits are dropped.
#[test]
fn bottleneck_adapters_record_nothing_under_no_grad() {
    for preset in ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"] {
        let config = BottleneckConfig {
            head: Some(HeadConfig::classification(2)),
            ..BottleneckConfig::preset(preset).unwrap()
        }
        .with_task_type_seq_cls();
        let m = peft::get_peft_model_with_seed(base(), config, "default", 1).unwrap();
        let ids =
            peft::candle::Tensor::new(&[[5u32, 9, 12, 17]], &peft::candle::Device::Cpu).unwrap();
        let inputs = peft::Inputs::new(ids);
        assert!(m.forward(&inputs, false).unwrap().track_op(), "{preset}");
        let out = peft::no_grad(|| m.forward(&inputs, false)).unwrap();
        assert!(
            !out.track_op(),
            "{preset}: a graph was recorded under no_grad"
        );
    }
}

/// A head table that names only its type gets what AdapterHub's `add_classification_head` /
/// `add_tagging_head` build (a fusion example trained a 1-layer head against AdapterHub's 2).
#[test]
fn head_tables_default_to_adapterhubs_heads() {
    let parse = |v: serde_json::Value| serde_json::from_value::<HeadConfig>(v).unwrap();
    assert_eq!(
        parse(serde_json::json!({"head_type": "classification"})),
        HeadConfig::classification(0)
    );
    assert_eq!(
        parse(serde_json::json!({"head_type": "tagging"})),
        HeadConfig::tagging(0)
    );
    let one = parse(
        serde_json::json!({"head_type": "classification", "layers": 1,
                                       "activation_function": null}),
    );
    assert_eq!((one.layers, one.activation_function), (1, None));
}
