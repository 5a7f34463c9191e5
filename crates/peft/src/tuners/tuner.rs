//! The interface every PEFT method implements, whatever its kind.
//!
//! A method is two things: its config ([`TunerConfig`]: PEFT's fields, parsing, `adapter_config.json`,
//! and attaching an adapter to a model), and, once attached, the adapter's model-level side
//! ([`Tuner`]: tensors held outside any layer, a term added to the loss, a hook after each
//! optimizer step, a last change to the tensors it saves, and for input methods the rewriting of
//! each batch). What lives inside layers goes through the layer traits of [`crate::layers`]
//! ([`crate::layers::LinearAdapter`], [`crate::layers::EmbeddingAdapter`],
//! [`crate::layers::HookAdapter`]). The PEFT wrapper and the trainer only ever see these traits;
//! see docs/decisions/0003 for the three kinds of method and how to add one.

use candle_core::{Tensor, Var};
use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;

use super::config::{BaseFields, Bias};
use super::PeftConfig;
use crate::models::{Cache, Inputs, Model};
use crate::Result;

/// How a method adapts a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// Wraps linear / embedding layers (the LoRA family, IA3, VeRA).
    Layer,
    /// Runs at the hook points of each block (bottleneck adapters, AdapterFusion).
    Hook,
    /// Holds model-level state and rewrites the inputs (prompt tuning, p-tuning, prefix tuning,
    /// multitask prompt tuning, CPT).
    Input,
}

/// A PEFT method's configuration: one struct per method, with PEFT's field names.
pub trait TunerConfig: ConfigObject + Debug + Send + Sync {
    /// `peft_type` in `adapter_config.json` (`LORA`, `IA3`, ...).
    fn peft_type(&self) -> &'static str;

    /// The class PEFT wraps the base model in for this method (`LoraModel`, `IA3Model`, ...), as
    /// `get_model_status` reports it.
    fn tuner_name(&self) -> &'static str;

    fn kind(&self) -> MethodKind;

    fn base(&self) -> &BaseFields;
    fn base_mut(&mut self) -> &mut BaseFields;

    /// `adapter_config.json` as PEFT writes it.
    fn to_adapter_json(&self) -> serde_json::Value;

    /// Which base biases are trained and saved with the adapter.
    fn bias(&self) -> Bias {
        Bias::None
    }

    /// Whether the adapter brings its own prediction head ([`Tuner::head`]): the base model is
    /// then loaded as FEATURE_EXTRACTION.
    fn brings_head(&self) -> bool {
        false
    }

    /// Adapters this one builds on, by name and saved directory (a fusion's fused adapters): the
    /// wrapper loads each, frozen, before attaching this one when the model lacks it.
    fn depends_on(&self) -> Vec<(String, std::path::PathBuf)> {
        Vec::new()
    }

    /// The class count of the head the adapter brings, when its config leaves it to the data.
    fn set_num_labels(&mut self, _n: usize) {}

    /// The method's part of PEFT's `_check_new_adapter_config`: what a new adapter (`self`,
    /// trained or not) must agree on with the adapters already on the model.
    fn check_new_adapter(&self, _trainable: bool, _existing: &[Existing<'_>]) -> Result<()> {
        Ok(())
    }

    /// The config with `task_type` set (PEFT's `task_type=...` keyword).
    fn with_task_type(mut self, task: crate::models::TaskType) -> Self
    where
        Self: Sized,
    {
        self.base_mut().task_type = Some(task);
        self
    }

    /// The config with `modules_to_save` set.
    fn with_modules_to_save(mut self, modules: &[&str]) -> Self
    where
        Self: Sized,
    {
        self.base_mut().modules_to_save = Some(modules.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Attaches an adapter of this method to `model`. The config is completed in place the way
    /// PEFT completes it before saving (resolved `target_modules`, corrected `fan_in_fan_out`).
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected>;
}

/// An adapter already on the model, as a new one sees it.
pub struct Existing<'a> {
    pub config: &'a dyn TunerConfig,
    pub trainable: bool,
}

/// Cloning and comparing configs behind `dyn TunerConfig`; implemented for every config that is
/// `Clone + PartialEq`.
pub trait ConfigObject: Any {
    fn clone_config(&self) -> Box<dyn TunerConfig>;
    fn eq_config(&self, other: &dyn TunerConfig) -> bool;
}

impl<T: TunerConfig + Clone + PartialEq> ConfigObject for T {
    fn clone_config(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn eq_config(&self, other: &dyn TunerConfig) -> bool {
        (other as &dyn Any).downcast_ref::<T>() == Some(self)
    }
}

/// What [`TunerConfig::inject`] is told about the adapter it attaches.
pub struct InjectContext<'a> {
    pub adapter_name: &'a str,
    /// `modules_to_save`, the task's head included: these modules are copied, never adapted.
    pub modules_to_save: &'a [String],
    /// Seed of the adapter's random initial weights.
    pub seed: u64,
    /// Whether the adapter will be trained.
    pub trainable: bool,
    /// Whether its weights are read from an adapter file right after (`from_pretrained`,
    /// `load_adapter`): an initialisation that the file overwrites (a tokenizer to read, a source
    /// adapter to average) can be skipped.
    pub from_file: bool,
}

/// What attaching an adapter produced: the adapted module (site) names and its model-level side.
pub struct Injected {
    pub modules: Vec<String>,
    pub tuner: Box<dyn Tuner>,
}

impl Injected {
    /// An adapter that lives entirely in its layers.
    pub fn layers(modules: Vec<String>) -> Self {
        Self {
            modules,
            tuner: Box::new(LayersOnly),
        }
    }
}

/// A tensor an adapter holds outside any layer.
#[derive(Debug, Clone)]
pub struct ModelTensor {
    /// The full key in the adapter file (`base_model.vera_A`, `prompt_embeddings`, ...).
    pub key: String,
    pub var: Var,
    /// A parameter, trained when its adapter is and counted in the totals (soft prompts), or a
    /// buffer, only saved and loaded (VeRA's projections), as PEFT registers them.
    pub is_parameter: bool,
    /// A parameter that is counted in the totals but never trained (CPT's frozen copy of the
    /// token embeddings its prompt starts from: PEFT's `requires_grad = False`).
    pub frozen: bool,
}

impl ModelTensor {
    /// A trainable parameter saved under `key`.
    pub fn parameter(key: impl Into<String>, var: &Var) -> Self {
        Self {
            key: key.into(),
            var: var.clone(),
            is_parameter: true,
            frozen: false,
        }
    }
}

/// An attached adapter's model-level side. Every hook has a default that does nothing, so a
/// method implements only what it has.
pub trait Tuner: Send + Sync {
    /// Tensors held outside any layer, saved and loaded with the adapter.
    fn model_tensors(&self) -> Vec<ModelTensor> {
        Vec::new()
    }

    /// A term the training loop adds to the loss (AdaLoRA's orthogonal regularisation).
    fn regularization_loss(
        &self,
        _model: &dyn Model,
        _adapter: &str,
        _config: &PeftConfig,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Runs after each optimizer step with that step's gradients (AdaLoRA's rank allocation,
    /// which also records its `rank_pattern` in the config).
    fn after_optimizer_step(
        &mut self,
        _model: &dyn Model,
        _adapter: &str,
        _config: &mut PeftConfig,
        _step: usize,
        _grads: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs before each training step, with the step's seed (AdapterDrop skips a random number
    /// of the lowest layers' adapters each step).
    fn before_train_step(
        &self,
        _model: &mut dyn Model,
        _config: &PeftConfig,
        _seed: u64,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs when training stops or pauses for evaluation: undoes what
    /// [`Tuner::before_train_step`] set, so evaluation and inference see the whole adapter.
    fn after_training(&self, _model: &mut dyn Model, _config: &PeftConfig) -> Result<()> {
        Ok(())
    }

    /// Sets the adapter's model-level tensors from an adapter file, taking the keys it owns out of
    /// `file`; returns the keys it needed and did not find. By default each tensor of
    /// [`Tuner::model_tensors`] is read under its own key, with its shape checked. Methods that
    /// save something other than what they hold (prompt learning saves its encoder's output)
    /// read it their own way.
    fn load_tensors(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for t in self.model_tensors() {
            match file.remove(&t.key) {
                Some(v) => set_checked(&t.key, &t.var, &v)?,
                None => missing.push(t.key),
            }
        }
        Ok(missing)
    }

    /// The last change to the tensors about to be saved (AdaLoRA drops pruned ranks).
    fn state_dict_to_save(
        &self,
        _config: &PeftConfig,
        state: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(state)
    }

    /// Input methods: how a batch is rewritten before the base model runs.
    fn input_transform(&self) -> Option<&dyn InputTransform> {
        None
    }

    /// A prediction head the adapter brings (AdapterHub's flex heads): the base model runs as
    /// FEATURE_EXTRACTION and the head turns its last hidden states into the logits. Its tensors
    /// are among [`Tuner::model_tensors`].
    fn head(&self) -> Option<&dyn OutputHead> {
        None
    }
}

/// A prediction head an adapter brings, applied after the base model.
pub trait OutputHead: Send + Sync {
    /// `hidden`: the base model's last hidden states `[batch, seq, hidden]`.
    fn forward(&self, hidden: &Tensor, inputs: &Inputs, train: bool) -> Result<Tensor>;
}

/// The model-level side of an adapter that has none.
pub struct LayersOnly;
impl Tuner for LayersOnly {}

/// What an input method does to each batch before the base model runs (and to each step of
/// generation: the transform sees the caller's cache, and can tell a first step from a later one
/// by what the cache holds).
pub trait InputTransform: Send + Sync {
    fn prepare(
        &self,
        model: &dyn Model,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Prepared>;

    /// Positions the method puts in front of every sequence (virtual tokens, or a key/value
    /// prefix): they count against the model's context window, so generation leaves room for
    /// them.
    fn virtual_tokens(&self) -> usize {
        0
    }

    /// A loss that replaces the task's own (CPT's weighted loss over its prompt's labels), from the
    /// logits the model returned for `prepared` (positions the method put in front included) and
    /// the batch's token labels as the data gave them (`[batch, seq]`, i64, -100 ignored).
    /// `None`: the task's loss, on labels padded with -100 in front (what PEFT does).
    fn loss(&self, _logits: &Tensor, _labels: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Sets `var` from a tensor read from a file, after checking its shape.
pub fn set_checked(key: &str, var: &Var, t: &Tensor) -> Result<()> {
    if var.dims() != t.dims() {
        return Err(crate::Error::ShapeMismatch {
            name: key.to_string(),
            expected: var.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// A batch as an input method rewrote it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub inputs: Inputs,
    /// A cache for this pass alone (prefix tuning's virtual keys and values when the caller gave
    /// no cache).
    pub cache: Option<Cache>,
    /// Positions the method put in front of the output's sequence axis (prompt tuning's virtual
    /// tokens in a causal LM's logits, as PEFT returns them).
    pub output_prefix: usize,
}

/// What method-specific operations on a model with adapters (LoRA's `add_weighted_adapter`, the
/// PiSSA / OLoRA conversion on save) need of the PEFT wrapper. [`crate::PeftModel`] implements it;
/// the tuners stay below the wrapper.
pub trait AdapterHost {
    fn base_model(&self) -> &dyn Model;
    fn adapter_names(&self) -> Vec<&str>;
    fn peft_config(&self, name: &str) -> Option<&PeftConfig>;
    fn peft_config_mut(&mut self, name: &str) -> Option<&mut PeftConfig>;
    /// Attaches a new adapter that is not trained (a combination of others).
    fn add_frozen_adapter(&mut self, name: &str, config: PeftConfig) -> Result<()>;
    fn delete_adapter(&mut self, name: &str) -> Result<()>;
    /// The tensors `save_pretrained` writes for adapter `name`, under their file keys.
    fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>>;
}
