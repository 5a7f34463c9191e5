//! The three kinds of method work through the one `TunerConfig` / `Tuner` interface, with methods
//! defined here, outside the crate:
//! - a hook method (scales a sub-layer's output at every hook point of one kind): with scale 0 at
//!   the feed-forward (or attention) points, every architecture must give exactly the logits of
//!   the same model with that sub-layer's output projection zeroed — which pins each point to the
//!   sub-layer output before its residual add and normalisation;
//! - an input method (learned vectors put in front of `inputs_embeds`): the same logits as the
//!   base model run on the concatenated embeddings, gradients reaching the vectors, its tensors
//!   saved, `forward_aligned` dropping the virtual positions, and the wrapper's rules for it.

use candle_core::{DType, Device, Tensor, Var};
use peft::layers::{Adapter, HookAdapter, HookInput, HookLocation, HookPoint, ModuleMut};
use peft::models::{self, Cache, LoadOptions, Model};
use peft::tuners::{
    BaseFields, InjectContext, Injected, InputTransform, MethodKind, ModelTensor, Prepared, Tuner,
    TunerConfig,
};
use peft::{get_peft_model, Inputs, TaskType};
use std::any::Any;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

// ---- a hook method ----------------------------------------------------------------------------

#[derive(Debug)]
struct ScaleHidden {
    scale: Var,
}

impl Adapter for ScaleHidden {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![("scale".into(), self.scale.clone())]
    }
    fn type_name(&self) -> &'static str {
        "test.ScaleHidden"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HookAdapter for ScaleHidden {
    fn forward(
        &self,
        _point: &HookPoint,
        running: &[(&str, &dyn HookAdapter)],
        input: &HookInput<'_>,
    ) -> peft::Result<Tensor> {
        // Several active adapters stack: each scales in turn.
        let mut h = input.hidden.clone();
        for (_, a) in running {
            let a = a.as_any().downcast_ref::<ScaleHidden>().unwrap();
            h = h.broadcast_mul(a.scale.as_tensor())?;
        }
        HookInput {
            hidden: &h,
            ..*input
        }
        .plain()
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ScaleHiddenConfig {
    at: HookLocation,
    init: f32,
    base: BaseFields,
}

impl TunerConfig for ScaleHiddenConfig {
    fn peft_type(&self) -> &'static str {
        "TEST_HOOK"
    }
    fn tuner_name(&self) -> &'static str {
        "ScaleHiddenModel"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Hook
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> serde_json::Value {
        serde_json::json!({"peft_type": "TEST_HOOK", "init": self.init})
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> peft::Result<Injected> {
        let mut names = Vec::new();
        for m in model.modules_mut() {
            if let ModuleMut::Hook(h) = m {
                if h.location == self.at {
                    let scale = Var::from_tensor(&Tensor::new(&[self.init], &Device::Cpu)?)?;
                    h.adapters
                        .insert(ctx.adapter_name, Box::new(ScaleHidden { scale }));
                    names.push(h.name.clone());
                }
            }
        }
        Ok(Injected::layers(names))
    }
}

/// `(model dir, task, [output projections of the FF sub-layer], [of the attention sub-layers])`.
fn architectures() -> Vec<(
    &'static str,
    TaskType,
    &'static [&'static str],
    &'static [&'static str],
)> {
    vec![
        (
            "bert/models/seq_cls",
            TaskType::SeqCls,
            &["output.dense"][..],
            &["attention.output.dense"][..],
        ),
        (
            "nezha/models/seq_cls",
            TaskType::SeqCls,
            &["output.dense"][..],
            &["attention.output.dense"][..],
        ),
        (
            "decoder/models/gpt2",
            TaskType::CausalLm,
            &["mlp.c_proj"],
            &["attn.c_proj"],
        ),
        (
            "decoder/models/llama_gqa",
            TaskType::CausalLm,
            &["mlp.down_proj"],
            &["self_attn.o_proj"],
        ),
        (
            "decoder/models/opt",
            TaskType::CausalLm,
            &["fc2"],
            &["self_attn.out_proj"],
        ),
        (
            "decoder/models/opt_post",
            TaskType::CausalLm,
            &["fc2"],
            &["self_attn.out_proj"],
        ),
        (
            "t5/t5_v1_0/model",
            TaskType::Seq2SeqLm,
            &["DenseReluDense.wo"],
            &["SelfAttention.o", "EncDecAttention.o"],
        ),
    ]
}

fn load(dir: &str, task: TaskType) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    models::load(&fixtures().join(dir), &opts).unwrap()
}

fn inputs(task: TaskType) -> Inputs {
    let ids = Tensor::new(
        &[[3u32, 7, 1, 12, 5, 9], [4, 2, 8, 6, 11, 10]],
        &Device::Cpu,
    )
    .unwrap();
    let mut x = Inputs::new(ids.clone());
    if task == TaskType::Seq2SeqLm {
        x.decoder_input_ids = Some(ids.narrow(1, 0, 4).unwrap());
    }
    x
}

/// The part of a module path after its block index (`bert.encoder.layer.0.output.dense` →
/// `output.dense`), and T5's sub-layer index too (`layer.1.DenseReluDense.wo` → `DenseReluDense.wo`).
fn in_block(name: &str) -> &str {
    let parts: Vec<&str> = name.split('.').collect();
    let Some(i) = parts.iter().position(|p| p.parse::<usize>().is_ok()) else {
        return name;
    };
    let start: usize = parts[..=i].iter().map(|p| p.len() + 1).sum();
    let rest = &name[start..];
    match rest.strip_prefix("layer.") {
        Some(r) => r.split_once('.').map_or(r, |(_, tail)| tail),
        None => rest,
    }
}

fn zero_projections(model: &mut dyn Model, suffixes: &[&str]) -> usize {
    let mut n = 0;
    for m in model.modules_mut() {
        let hit = suffixes.contains(&in_block(m.name()));
        if let (true, ModuleMut::Linear(_)) = (hit, &m) {
            n += 1;
            for p in m.params_mut() {
                let z = p.base().zeros_like().unwrap();
                p.set_base(z).unwrap();
            }
        }
    }
    n
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
fn hook_points_sit_where_each_sub_layer_meets_its_residual() {
    for (dir, task, ff, attn) in architectures() {
        for (at, projections) in [
            (HookLocation::FeedForward, ff),
            (HookLocation::Attention, attn),
        ] {
            let x = inputs(task);
            let mut zeroed = load(dir, task);
            assert!(zero_projections(zeroed.as_mut(), projections) > 0, "{dir}");
            let want = zeroed.forward(&x, false).unwrap();
            let base = load(dir, task).forward(&x, false).unwrap();
            assert!(
                max_diff(&want, &base) > 1e-3,
                "{dir}: zeroing changed nothing"
            );
            // T5's attention points include cross-attention in the decoder.
            let mut config = ScaleHiddenConfig {
                at,
                init: 0.0,
                base: BaseFields::default(),
            };
            let mut m = get_peft_model(load(dir, task), config.clone(), "zero").unwrap();
            if dir.starts_with("t5") && at == HookLocation::Attention {
                config.at = HookLocation::CrossAttention;
                m.add_adapter("zero_cross", config).unwrap();
                m.set_adapters(&["zero", "zero_cross"]).unwrap();
            }
            let got = m.forward(&x, false).unwrap();
            assert_eq!(max_diff(&got, &want), 0.0, "{dir} {at:?}");
            // Switched off, the points give the base model back.
            let off = m.disable_adapter().unwrap();
            assert_eq!(
                max_diff(&off.forward(&x, false).unwrap(), &base),
                0.0,
                "{dir}"
            );
        }
    }
}

#[test]
fn hook_adapters_train_save_and_refuse_to_merge() {
    let task = TaskType::SeqCls;
    let config = ScaleHiddenConfig {
        at: HookLocation::FeedForward,
        init: 1.0,
        base: BaseFields::default(),
    };
    let mut m = get_peft_model(load("bert/models/seq_cls", task), config, "default").unwrap();
    // Scale 1 is the identity.
    let base = load("bert/models/seq_cls", task)
        .forward(&inputs(task), false)
        .unwrap();
    let out = m.forward(&inputs(task), false).unwrap();
    assert_eq!(max_diff(&out, &base), 0.0);
    let params = m.trainable_parameters();
    let keys: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "base_model.model.bert.encoder.layer.0.output.scale",
            "base_model.model.bert.encoder.layer.1.output.scale"
        ]
    );
    let loss = out.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (k, v) in &params {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{k}"
        );
    }
    let status = m.layer_status().unwrap();
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|s| s.module_type == "test.ScaleHidden"));
    assert_eq!(
        m.model_status().unwrap().adapter_model_type,
        "ScaleHiddenModel"
    );
    let err = m.merge_adapter().unwrap_err().to_string();
    assert!(err.contains("cannot be merged"), "{err}");
}

// ---- an input method --------------------------------------------------------------------------

/// Learned vectors in front of the token embeddings (prompt tuning's shape of method).
struct Prefix {
    prompt: Var,
}

impl InputTransform for Prefix {
    fn prepare(
        &self,
        model: &dyn Model,
        inputs: &Inputs,
        _cache: Option<&mut Cache>,
        train: bool,
    ) -> peft::Result<Prepared> {
        let ids = inputs.ids()?;
        let (b, t) = ids.dims2()?;
        let embeds = model.embed_tokens(ids, train)?;
        let n = self.prompt.dim(0)?;
        let prompt = self
            .prompt
            .as_tensor()
            .unsqueeze(0)?
            .expand((b, n, embeds.dim(2)?))?;
        let mut x = inputs.clone();
        x.input_ids = None;
        x.inputs_embeds = Some(Tensor::cat(&[&prompt, &embeds], 1)?);
        let mask = match &inputs.attention_mask {
            Some(m) => m.clone(),
            None => Tensor::ones((b, t), DType::U32, ids.device())?,
        };
        x.attention_mask = Some(Tensor::cat(
            &[&Tensor::ones((b, n), mask.dtype(), ids.device())?, &mask],
            1,
        )?);
        Ok(Prepared {
            inputs: x,
            cache: None,
            output_prefix: n,
        })
    }
}

impl Tuner for Prefix {
    fn model_tensors(&self) -> Vec<ModelTensor> {
        vec![ModelTensor {
            key: "prompt_embeddings".into(),
            var: self.prompt.clone(),
            is_parameter: true,
            frozen: false,
        }]
    }
    fn input_transform(&self) -> Option<&dyn InputTransform> {
        Some(self)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct PrefixConfig {
    n: usize,
    base: BaseFields,
}

impl TunerConfig for PrefixConfig {
    fn peft_type(&self) -> &'static str {
        "TEST_PREFIX"
    }
    fn tuner_name(&self) -> &'static str {
        "PrefixModel"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Input
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> serde_json::Value {
        serde_json::json!({"peft_type": "TEST_PREFIX", "n": self.n})
    }
    fn inject(
        &mut self,
        model: &mut dyn Model,
        _ctx: &InjectContext<'_>,
    ) -> peft::Result<Injected> {
        let d = model.dims().hidden_size;
        let v: Vec<f32> = (0..self.n * d)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let prompt = Var::from_tensor(&Tensor::from_vec(v, (self.n, d), model.device())?)?;
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(Prefix { prompt }),
        })
    }
}

#[test]
fn input_methods_rewrite_the_batch_and_train_their_state() {
    let task = TaskType::CausalLm;
    let dir = "decoder/models/llama_gqa";
    let config = PrefixConfig {
        n: 3,
        base: BaseFields::default(),
    };
    let mut m = get_peft_model(load(dir, task), config.clone(), "default").unwrap();
    let x = inputs(task);
    let out = m.forward(&x, false).unwrap();
    // What the base model computes on the concatenated embeddings, through its own API.
    let base = load(dir, task);
    let prompt = m.trainable_parameters()[0].1.as_tensor().clone();
    let embeds = base.embed_tokens(x.ids().unwrap(), false).unwrap();
    let cat = Tensor::cat(
        &[
            &prompt.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap(),
            &embeds,
        ],
        1,
    )
    .unwrap();
    let want = base
        .forward(
            &Inputs {
                inputs_embeds: Some(cat),
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(
        out.dims(),
        &[2, 9, 32],
        "PEFT returns the virtual positions too"
    );
    assert!(max_diff(&out, &want) < 1e-6);
    let aligned = m.forward_aligned(&x, false).unwrap();
    assert_eq!(max_diff(&aligned, &want.narrow(1, 3, 6).unwrap()), 0.0);
    // Trained, counted and saved like any adapter tensor.
    let params = m.trainable_parameters();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].0, "prompt_embeddings");
    let grads = aligned
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(params[0].1.as_tensor()).is_some());
    let (trainable, all) = m.get_nb_trainable_parameters();
    assert_eq!(trainable, 3 * 32);
    assert_eq!(
        all,
        m.base_model()
            .modules()
            .iter()
            .flat_map(|x| x.params())
            .map(|p| p.elem_count())
            .sum::<usize>()
            + 96
    );
    let state = m.adapter_state_dict("default").unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0].0, "prompt_embeddings");
    // Off, the base model runs on the plain inputs.
    {
        let off = m.disable_adapter().unwrap();
        let plain = off.forward(&x, false).unwrap();
        assert_eq!(max_diff(&plain, &base.forward(&x, false).unwrap()), 0.0);
    }
    // Nothing to merge; no mixing with layer methods; no mixed batches.
    assert!(m
        .merge_adapter()
        .unwrap_err()
        .to_string()
        .contains("no weights to merge"));
    let lora = peft::LoraConfig {
        target_modules: Some(peft::ModuleSpec::List(vec!["q_proj".into()])),
        ..Default::default()
    };
    assert!(m
        .add_adapter("lora", lora)
        .unwrap_err()
        .to_string()
        .contains("cannot combine"));
    m.add_adapter("other", config).unwrap();
    assert!(m.set_adapters(&["default", "other"]).is_err());
    let names = vec!["default".to_string(), "other".to_string()];
    assert!(m.forward_mixed(&x, &names).is_err());
}
