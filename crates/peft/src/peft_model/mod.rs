//! `PeftModel`: a base model with named adapters attached — inject, switch, train, save, load,
//! merge and unload, with PEFT's names and semantics. It knows adapters only through the
//! [`crate::tuners::TunerConfig`] / [`crate::tuners::Tuner`] interface and the sites of
//! [`crate::layers`]; it names no method.

mod load;
mod merge;
mod mixed;
mod status;

use candle_core::{Tensor, Var};
use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use crate::generation::Generate;
use crate::layers::Param;
use crate::models::{Cache, Inputs, Model, ModelDims};
use crate::tuners::targets::in_modules_to_save;
use crate::tuners::{AdapterHost, Bias, Existing, InjectContext, MethodKind, PeftConfig, Tuner};
use crate::{Error, Result};

pub use crate::io::KEY_PREFIX;
/// The key prefix of `modules_to_save` tensors of input-method adapters, which PEFT saves from
/// the unwrapped model (`base_model.classifier.weight`).
pub const INPUT_KEY_PREFIX: &str = "base_model.";
pub use crate::io::{ADAPTER_CONFIG_NAME as CONFIG_NAME, ADAPTER_WEIGHTS_NAME as WEIGHTS_NAME};
pub use load::{base_task, load_auto, load_with_adapter, saved_head_classes, AdapterFiles};
pub use merge::AdapterDisabled;
pub use mixed::MixedBatch;
pub use status::{LayerStatus, ModelStatus, Status};

/// One adapter on the model.
struct AdapterEntry {
    name: String,
    config: PeftConfig,
    /// `modules_to_save` after adding the task's head names.
    modules_to_save: Vec<String>,
    trainable: bool,
    /// The method's model-level side.
    tuner: Box<dyn Tuner>,
}

pub struct PeftModel {
    model: Box<dyn Model>,
    adapters: Vec<AdapterEntry>,
    /// The active adapters (one usually; several are summed, see `set_adapters`).
    active: Vec<String>,
    /// Seed for adapter initialisation; each added adapter advances it.
    seed: u64,
    /// Every adapter switched off ([`PeftModel::disable_adapter`]).
    disabled: bool,
}

/// Options of [`PeftModel::from_pretrained`] (PEFT's keyword arguments).
#[derive(Debug, Clone)]
pub struct FromPretrained {
    /// The name the adapter gets on the model.
    pub adapter_name: String,
    /// Train it further (PEFT's `is_trainable`); by default it is frozen for inference.
    pub is_trainable: bool,
}

impl Default for FromPretrained {
    fn default() -> Self {
        Self {
            adapter_name: "default".into(),
            is_trainable: false,
        }
    }
}

/// Wraps `model` with a new trainable adapter named `adapter_name` (PEFT's `get_peft_model`).
pub fn get_peft_model(
    model: Box<dyn Model>,
    config: impl Into<PeftConfig>,
    adapter_name: &str,
) -> Result<PeftModel> {
    get_peft_model_with_seed(model, config, adapter_name, 0)
}

/// [`get_peft_model`] with the seed that draws the adapter's random initial weights.
pub fn get_peft_model_with_seed(
    model: Box<dyn Model>,
    config: impl Into<PeftConfig>,
    adapter_name: &str,
    seed: u64,
) -> Result<PeftModel> {
    let mut m = PeftModel::wrap(model, seed);
    m.add_adapter(adapter_name, config)?;
    Ok(m)
}

impl PeftModel {
    /// `model` with no adapter yet (adapters come from [`PeftModel::add_adapter`] or
    /// [`PeftModel::load_adapter`]); it runs as the bare model until then.
    pub fn bare(model: Box<dyn Model>) -> Self {
        Self::wrap(model, 0)
    }

    /// Seeds the random initial weights of the adapters added from now on (each added adapter
    /// advances the seed, as [`get_peft_model_with_seed`] starts it).
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed.wrapping_sub(self.adapters.len() as u64);
    }

    /// The one constructor: `model` with no adapter yet.
    fn wrap(model: Box<dyn Model>, seed: u64) -> Self {
        Self {
            model,
            adapters: Vec::new(),
            active: Vec::new(),
            seed,
            disabled: false,
        }
    }

    /// `model` with no adapter yet: adapters come later ([`PeftModel::load_adapter`],
    /// [`PeftModel::add_adapter`]), as a server that loads them at run time needs.
    pub fn without_adapters(model: Box<dyn Model>) -> Self {
        Self::wrap(model, 0)
    }

    /// Loads the adapter in `dir` onto `model` (PEFT's `PeftModel.from_pretrained`): as
    /// `opts.adapter_name`, frozen unless `opts.is_trainable`.
    pub fn from_pretrained(
        model: Box<dyn Model>,
        dir: &Path,
        opts: FromPretrained,
    ) -> Result<Self> {
        let mut m = Self::wrap(model, 0);
        m.load_adapter(dir, &opts.adapter_name, opts.is_trainable)?;
        Ok(m)
    }

    /// Wraps `model` with every adapter saved in `dir` (see [`PeftModel::load_adapters_from`]);
    /// the first one found is active.
    pub fn from_pretrained_all(
        model: Box<dyn Model>,
        dir: &Path,
        is_trainable: bool,
    ) -> Result<Self> {
        let mut m = Self::wrap(model, 0);
        m.load_adapters_from(dir, is_trainable)?;
        Ok(m)
    }

    pub fn base_model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The first active adapter (PEFT's `active_adapter`).
    pub fn active_adapter(&self) -> &str {
        self.active.first().map_or("", |s| s.as_str())
    }

    /// The active adapters, in the order they were set.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    pub fn peft_config(&self, name: &str) -> Option<&PeftConfig> {
        self.entry(name).map(|e| &e.config)
    }

    /// The config of adapter `name`, to change before saving (e.g. PEFT's recipe of setting
    /// `init_lora_weights = true` before saving a PiSSA adapter's initial state).
    pub fn peft_config_mut(&mut self, name: &str) -> Option<&mut PeftConfig> {
        self.adapters
            .iter_mut()
            .find(|a| a.name == name)
            .map(|a| &mut a.config)
    }

    fn entry(&self, name: &str) -> Option<&AdapterEntry> {
        self.adapters.iter().find(|a| a.name == name)
    }

    fn no_such_adapter(&self, name: &str) -> Error {
        Error::Adapter(format!(
            "no adapter named `{name}`; loaded: {}",
            self.adapter_names().join(", ")
        ))
    }

    /// Adds a trainable adapter. Like PEFT, it does not become active unless it is the first.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<PeftConfig>) -> Result<()> {
        self.inject(name, config.into(), true, false)
    }

    fn inject(
        &mut self,
        name: &str,
        mut config: PeftConfig,
        trainable: bool,
        from_file: bool,
    ) -> Result<()> {
        if self.entry(name).is_some() {
            return Err(Error::Adapter(format!(
                "an adapter named `{name}` already exists"
            )));
        }
        // Adapters this one builds on (a fusion's fused adapters), frozen, unless present. The
        // new adapter stays the active one if it is the first the caller adds.
        let was_empty = self.adapters.is_empty();
        let deps = config.as_dyn().depends_on();
        for (dep, dir) in &deps {
            let (dep, dir) = (dep.clone(), dir.clone());
            if self.entry(&dep).is_none() {
                self.load_adapter(&dir, &dep, false).map_err(|e| {
                    Error::Adapter(format!(
                        "adapter `{name}` builds on `{dep}`, which could not be loaded from {}: {e}",
                        dir.display()
                    ))
                })?;
            }
        }
        // As PEFT: the task's head joins modules_to_save only when the config names the task
        // (PeftModelForSequenceClassification and friends), not because the model has a head.
        let task_heads = config
            .task_type()
            .map_or(&[][..], |t| t.default_modules_to_save());
        let mut modules_to_save = config.modules_to_save().cloned().unwrap_or_default();
        for m in task_heads {
            if !modules_to_save.iter().any(|x| x == m) {
                modules_to_save.push(m.to_string());
            }
        }
        if !modules_to_save.is_empty() {
            config.set_modules_to_save(Some(modules_to_save.clone()));
        }
        if config.base_model_name_or_path().is_none() {
            config.set_base_model_name_or_path(Some(self.model.info().dir.display().to_string()));
        }
        self.check_new_adapter(&config)?;
        let existing: Vec<Existing<'_>> = self
            .adapters
            .iter()
            .map(|a| Existing {
                config: a.config.as_dyn(),
                trainable: a.trainable,
            })
            .collect();
        config.as_dyn().check_new_adapter(trainable, &existing)?;
        let seed = self.seed.wrapping_add(self.adapters.len() as u64);
        let first = self.adapters.is_empty();
        let ctx = InjectContext {
            adapter_name: name,
            modules_to_save: &modules_to_save,
            seed,
            trainable,
            from_file,
        };
        let injected = config.as_dyn_mut().inject(self.model.as_mut(), &ctx)?;
        let bias = config.bias();
        let adapted: BTreeSet<String> = injected.modules.into_iter().collect();
        for module in self.model.modules_mut() {
            let module_name = module.name().to_string();
            let is_adapted = adapted.contains(&module_name);
            let saved = in_modules_to_save(&module_name, &modules_to_save);
            for p in module.params_mut() {
                if saved {
                    p.add_copy(name)?;
                    if first {
                        p.activate(Some(name));
                    }
                }
                let is_bias = p.name.ends_with(".bias");
                let train_bias = match bias {
                    Bias::None => false,
                    Bias::All => is_bias,
                    Bias::AdaptedOnly => is_bias && is_adapted,
                };
                if train_bias && trainable && !saved {
                    p.train_in_place()?;
                }
            }
        }
        self.adapters.push(AdapterEntry {
            name: name.to_string(),
            config,
            modules_to_save,
            trainable,
            tuner: injected.tuner,
        });
        if first {
            self.active = vec![name.to_string()];
        }
        if was_empty && !deps.is_empty() {
            self.set_adapter(name)?;
        }
        Ok(())
    }

    /// PEFT's rules for every new adapter, whatever its method: biases are base weights, so only
    /// the first adapter may train them; and one model holds either input-method adapters (soft
    /// prompts) or adapters of the other kinds, never both.
    fn check_new_adapter(&self, config: &PeftConfig) -> Result<()> {
        if !self.adapters.is_empty() && config.bias() != Bias::None {
            return Err(Error::Config(format!(
                "only the first adapter on a model may train base biases (bias = {} here, and \
                 the model already has an adapter); set bias = \"none\" on this one, as PEFT \
                 requires",
                config.to_adapter_json()["bias"]
            )));
        }
        let input = config.kind() == MethodKind::Input;
        if let Some(other) = self
            .adapters
            .iter()
            .find(|a| (a.config.kind() == MethodKind::Input) != input)
        {
            return Err(Error::Adapter(format!(
                "cannot combine a {} adapter with adapter `{}` ({}): a model holds either \
                 prompt-learning adapters or adapters of the other methods, as in PEFT",
                config.peft_type(),
                other.name,
                other.config.peft_type()
            )));
        }
        Ok(())
    }

    /// Makes `name` the adapter the forward pass uses.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Activates several adapters at once; their contributions add up in every layer (PEFT's
    /// `base_model.set_adapter([...])`). A `modules_to_save` module can follow only one adapter,
    /// so two of the names owning a copy of the same module is an error, as in PEFT.
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        if names.is_empty() {
            return Err(Error::Adapter(
                "set_adapters needs at least one name".into(),
            ));
        }
        if let Some(bad) = names.iter().find(|n| self.entry(n).is_none()) {
            return Err(self.no_such_adapter(bad));
        }
        if names.len() > 1 {
            if let Some(input) = names.iter().find(|n| {
                self.entry(n)
                    .is_some_and(|e| e.config.kind() == MethodKind::Input)
            }) {
                return Err(Error::Adapter(format!(
                    "adapter `{input}` rewrites the model's inputs; only one such adapter can be \
                     active at a time"
                )));
            }
            for module in self.model.modules() {
                for p in module.params() {
                    let owners: Vec<&&str> = names.iter().filter(|n| p.copy(n).is_some()).collect();
                    if owners.len() > 1 {
                        return Err(Error::Adapter(format!(
                            "adapters {owners:?} each have their own copy of `{}` (modules_to_save); \
                             only one of them can be active at a time",
                            module.name()
                        )));
                    }
                }
            }
        }
        let list: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.adapters_mut().set_active(&list);
            }
        }
        self.for_each_param(|p| {
            if p.has_copies() {
                let owner = list.iter().find(|n| p.copy(n).is_some());
                p.activate(owner.map(|s| s.as_str()));
            }
        });
        self.active = list;
        Ok(())
    }

    /// Activates several adapters, each contributing with its weight (diffusers'
    /// `set_adapters(names, adapter_weights)`): every site adds `weight · (its output with the
    /// adapter − without)`, which for LoRA scales the update `s · B A` by the weight.
    pub fn set_adapters_weighted(&mut self, names: &[&str], weights: &[f64]) -> Result<()> {
        if names.len() != weights.len() {
            return Err(Error::Adapter(format!(
                "{} adapters but {} weights; give one weight per adapter",
                names.len(),
                weights.len()
            )));
        }
        self.set_adapters(names)?;
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                for (n, w) in names.iter().zip(weights) {
                    site.adapters_mut().set_weight(n, *w);
                }
            }
        }
        Ok(())
    }

    /// AdapterDrop at inference (AdapterHub's `skip_layers`): the hook points of these layers run
    /// without adapters, counting layers as AdapterHub does (an encoder-decoder model's decoder
    /// blocks follow its encoder blocks). `None` or an empty list runs every layer's adapters.
    pub fn set_skip_layers(&mut self, layers: Option<&[usize]>) -> Result<()> {
        let dims = self.model.dims();
        let total = if dims.is_encoder_decoder {
            dims.num_encoder_layers + dims.num_layers
        } else {
            dims.num_layers
        };
        let layers = layers.unwrap_or(&[]);
        if let Some(bad) = layers.iter().find(|l| **l >= total) {
            return Err(Error::Config(format!(
                "skip layer {bad} is outside the model's layers 0..{total} ({} has {total} layers)",
                self.model.info().model_type
            )));
        }
        for module in self.model.modules_mut() {
            if let crate::layers::ModuleMut::Hook(point) = module {
                let layer = point.global_layer(dims.num_encoder_layers);
                point.skipped = layers.contains(&layer);
            }
        }
        Ok(())
    }

    /// The layers [`PeftModel::set_skip_layers`] skips, in order.
    pub fn skip_layers(&self) -> Vec<usize> {
        let enc = self.model.dims().num_encoder_layers;
        let mut out: Vec<usize> = self
            .model
            .modules()
            .into_iter()
            .filter_map(|m| match m {
                crate::layers::ModuleRef::Hook(p) if p.skipped => Some(p.global_layer(enc)),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes adapter `name` from every site.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = self
            .adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| self.no_such_adapter(name))?;
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.remove_adapter(name)?;
            }
        }
        self.for_each_param(|p| p.remove_copy(name));
        self.adapters.remove(i);
        if self.active.iter().any(|a| a == name) {
            // As PEFT: the other active adapters stay; with none left, the first remaining one.
            let mut next: Vec<String> =
                self.active.iter().filter(|a| *a != name).cloned().collect();
            if next.is_empty() {
                next.extend(self.adapters.first().map(|a| a.name.clone()));
            }
            if next.is_empty() {
                self.active.clear();
            } else {
                let next: Vec<&str> = next.iter().map(|s| s.as_str()).collect();
                self.set_adapters(&next)?;
            }
        }
        Ok(())
    }

    fn for_each_param(&mut self, mut f: impl FnMut(&mut Param)) {
        for module in self.model.modules_mut() {
            for p in module.params_mut() {
                f(p);
            }
        }
    }

    /// The active adapter's input transform, if its method rewrites inputs.
    fn input_transform(&self) -> Option<&dyn crate::tuners::InputTransform> {
        if self.disabled {
            return None;
        }
        self.active
            .iter()
            .filter_map(|n| self.entry(n))
            .find_map(|e| e.tuner.input_transform())
    }

    /// Gradient checkpointing for forward passes on this thread until the guard drops: each block
    /// keeps only its input and runs again in backward (transformers'
    /// `gradient_checkpointing_enable`). Take gradients with [`crate::grad::backward`] inside
    /// the session. `None` when the base model's blocks cannot be checkpointed.
    pub fn gradient_checkpointing(&self) -> Option<crate::grad::Checkpointing<'_>> {
        self.model
            .checkpointing()
            .map(|e| crate::grad::Checkpointing::enable([e]))
    }

    /// Runs the model with the active adapters, as PEFT's forward does (for an input method, the
    /// output includes the positions it put in front, as PEFT returns them). `train` switches
    /// dropout on.
    pub fn forward(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.forward_with_cache(inputs, None, train)
    }

    /// [`Model::forward_with_cache`] through the adapters (generation, prefix tuning).
    pub fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self.forward_prepared(inputs, cache, train)?.0)
    }

    /// [`PeftModel::forward`] with the output's sequence axis aligned to the inputs: positions an
    /// input method put in front are dropped (what losses and generation need).
    pub fn forward_aligned(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        let (out, prefix) = self.forward_prepared(inputs, None, train)?;
        strip_prefix(out, prefix)
    }

    /// The active adapter's own prediction head, if its method brings one.
    fn output_head(&self) -> Option<&dyn crate::tuners::OutputHead> {
        if self.disabled {
            return None;
        }
        self.active
            .iter()
            .filter_map(|n| self.entry(n))
            .find_map(|e| e.tuner.head())
    }

    /// [`PeftModel::forward`] and the number of positions the active input method put in front of
    /// the output's sequence axis (0 without one). A loss over token labels pads them with that
    /// many -100 in front, as PEFT does (see [`PeftModel::method_loss`] for methods with their
    /// own loss).
    pub fn forward_with_prefix(&self, inputs: &Inputs, train: bool) -> Result<(Tensor, usize)> {
        self.forward_prepared(inputs, None, train)
    }

    /// A causal LM's training loss for token `labels` (`[batch, seq]`, unshifted, -100
    /// ignored) without materialising the logits, where nothing between the base model's head
    /// and the loss needs them: no input method (prefixes, CPT's own loss) and no head an
    /// adapter brings. `None` otherwise, or for a model without a causal-LM head; the caller
    /// then takes the loss from [`PeftModel::forward_with_prefix`]'s logits.
    pub fn causal_lm_loss(
        &self,
        inputs: &Inputs,
        labels: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        if self.input_transform().is_some() || self.output_head().is_some() {
            return Ok(None);
        }
        let next = crate::ops::next_token_labels(labels)?;
        self.model.lm_loss(inputs, &next, train)
    }

    /// [`PeftModel::causal_lm_loss`] for a seq2seq model: `labels` are the decoder's targets
    /// (`[batch, target_len]`, not shifted; the decoder's inputs are them shifted right).
    pub fn seq2seq_lm_loss(
        &self,
        inputs: &Inputs,
        labels: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        if self.input_transform().is_some() || self.output_head().is_some() {
            return Ok(None);
        }
        self.model.lm_loss(inputs, labels, train)
    }

    /// The active input method's own loss, if it replaces the task's (CPT), from the logits of
    /// [`PeftModel::forward_with_prefix`] and the batch's token labels (`[batch, seq]`, -100
    /// ignored).
    pub fn method_loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
        match self.input_transform() {
            Some(t) => t.loss(logits, labels),
            None => Ok(None),
        }
    }

    /// Positions the active input method puts in front of every sequence (0 without one): they
    /// count against the model's context window.
    pub fn virtual_tokens(&self) -> usize {
        self.input_transform().map_or(0, |t| t.virtual_tokens())
    }

    fn forward_prepared(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let (out, prefix) = self.forward_base(inputs, cache, train)?;
        match self.output_head() {
            Some(head) => Ok((head.forward(&out, inputs, train)?, prefix)),
            None => Ok((out, prefix)),
        }
    }

    /// The base model's output with the active adapters, before any head an adapter brings.
    fn forward_base(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let Some(transform) = self.input_transform() else {
            return Ok((self.model.forward_with_cache(inputs, cache, train)?, 0));
        };
        let mut cache = cache;
        let prepared =
            transform.prepare(self.model.as_ref(), inputs, cache.as_deref_mut(), train)?;
        let mut own = prepared.cache;
        let cache = match cache {
            Some(c) => Some(c),
            None => own.as_mut(),
        };
        let out = self
            .model
            .forward_with_cache(&prepared.inputs, cache, train)?;
        Ok((out, prepared.output_prefix))
    }

    /// bf16 mixed precision as `torch.autocast(dtype=torch.bfloat16)` runs a training step on
    /// the CPU: the frozen weights of linear layers are stored in bf16 and their products run in
    /// bf16 with f32 accumulation, while activations, norms, embeddings, biases and the
    /// trainable tensors stay f32 (so no elementwise op, residual add or gradient sum runs in
    /// bf16). Off the CPU the frozen base is cast whole ([`Self::cast_frozen`]).
    ///
    /// On a CPU without bf16 matrix instructions (AVX512-BF16 or AMX) bf16 products would only
    /// add conversions around f32 ones, so the model stays in fp32 (a warning says so) and this
    /// returns `false`; `true` when bf16 is in effect.
    pub fn autocast_bf16(&mut self) -> Result<bool> {
        use candle_core::DType;
        let mut on_cpu = true;
        for module in self.model.modules() {
            if let crate::layers::ModuleRef::Linear(l) = module {
                on_cpu &= l.weight.base().device().is_cpu();
            }
        }
        if !on_cpu {
            self.cast_frozen(DType::BF16)?;
            return Ok(true);
        }
        if !crate::ops::gemm::bf16_is_native() {
            tracing::warn!(
                "bf16: this CPU has no bf16 matrix instructions (AVX512-BF16, AMX), where bf16 \
                 products only add conversions to f32 ones; training in fp32 instead"
            );
            return Ok(false);
        }
        self.cast_frozen_in(DType::BF16, |m| match m {
            crate::layers::ModuleMut::Linear(l) => vec![&mut l.weight],
            _ => Vec::new(),
        })?;
        Ok(true)
    }

    /// Stores every frozen base weight in `dtype` (pure bf16 or f16): activations follow the
    /// weights' dtype, while trainable tensors stay fp32 master weights, cast per use.
    /// Weights shared between layers (tied embeddings) stay shared.
    pub fn cast_frozen(&mut self, dtype: candle_core::DType) -> Result<()> {
        self.cast_frozen_in(dtype, |m| m.params_mut())
    }

    /// Casts the frozen base of the parameters `pick` names in each module to `dtype`. A
    /// quantized weight keeps its codes (its products follow the activations' dtype); a tensor
    /// shared by several parameters (tied embeddings) is cast once and stays shared.
    fn cast_frozen_in(
        &mut self,
        dtype: candle_core::DType,
        pick: for<'a> fn(crate::layers::ModuleMut<'a>) -> Vec<&'a mut Param>,
    ) -> Result<()> {
        let mut cast: std::collections::HashMap<candle_core::TensorId, Tensor> = Default::default();
        for module in self.model.modules_mut() {
            for p in pick(module) {
                if p.base_var().is_some() || p.quant().is_some() || p.base().dtype() == dtype {
                    continue;
                }
                let t = match cast.get(&p.base().id()) {
                    Some(t) => t.clone(),
                    None => p.base().to_dtype(dtype)?,
                };
                cast.insert(p.base().id(), t.clone());
                p.set_base(t)?;
            }
        }
        Ok(())
    }

    /// Trainable tensors under the keys they are saved with.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        // As PEFT: only the active adapters require grad (add_adapter leaves a new one inactive).
        let active = |e: &&AdapterEntry| self.active.contains(&e.name);
        for entry in self.adapters.iter().filter(|e| e.trainable).filter(active) {
            out.extend(self.adapter_vars(&entry.name));
            out.extend(
                entry
                    .tuner
                    .model_tensors()
                    .into_iter()
                    .filter(|t| t.is_parameter && !t.frozen)
                    .map(|t| (t.key, t.var)),
            );
        }
        out.extend(self.in_place_trained());
        out
    }

    /// Base parameters trained in place (a method's `bias`), under their keys.
    fn in_place_trained(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for module in self.model.modules() {
            let wrapped = module.has_adapters();
            for p in module.params() {
                if let Some(v) = p.base_var() {
                    out.push((bias_key(module.name(), &p.name, wrapped), v.clone()));
                }
            }
        }
        out
    }

    /// Every tensor adapter `name` holds in the model's sites and `modules_to_save` copies,
    /// under its PEFT key (no adapter name in the key).
    fn adapter_vars(&self, name: &str) -> Vec<(String, Var)> {
        let prefix = self.key_prefix(name);
        let mut out = Vec::new();
        for module in self.model.modules() {
            let tensors = module
                .site()
                .and_then(|s| s.adapters().adapter(name).map(|a| a.tensors()));
            for (suffix, var) in tensors.unwrap_or_default() {
                out.push((format!("{prefix}{}.{suffix}", module.name()), var));
            }
            for p in module.params() {
                if let Some(v) = p.copy(name) {
                    out.push((format!("{prefix}{}", p.name), v.clone()));
                }
            }
        }
        out
    }

    /// What PEFT puts before a module path in the keys of adapter `name`: `base_model.model.`
    /// when the method wraps the model in its tuner model (every method that adapts layers),
    /// `base_model.` for input methods, which leave the model as it is.
    fn key_prefix(&self, name: &str) -> &'static str {
        match self.entry(name).map(|e| e.config.kind()) {
            Some(MethodKind::Input) => INPUT_KEY_PREFIX,
            _ => KEY_PREFIX,
        }
    }

    /// `(trainable, all)` parameter counts as PEFT's `get_nb_trainable_parameters` counts them:
    /// base weights (a tensor shared by two layers, such as tied embeddings, once), every
    /// adapter's tensors, and `modules_to_save` copies.
    pub fn get_nb_trainable_parameters(&self) -> (usize, usize) {
        let mut seen = HashSet::new();
        let mut all = 0;
        for module in self.model.modules() {
            for p in module.params() {
                if seen.insert(p.base().id()) {
                    all += p.elem_count();
                }
            }
        }
        for module in self.model.modules() {
            let Some(list) = module.site().map(|s| s.adapters()) else {
                continue;
            };
            for n in list.names() {
                all += list.adapter(&n).map_or(0, |a| a.untracked_params());
            }
        }
        for entry in &self.adapters {
            let model_level = entry
                .tuner
                .model_tensors()
                .into_iter()
                .filter(|t| t.is_parameter)
                .map(|t| t.var);
            let vars = self
                .adapter_vars(&entry.name)
                .into_iter()
                .map(|(_, v)| v)
                .chain(model_level);
            for v in vars {
                if seen.insert(v.as_tensor().id()) {
                    all += v.elem_count();
                }
            }
        }
        let trainable = self
            .trainable_parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        (trainable, all)
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_parameters_line(&self) -> String {
        let (t, a) = self.get_nb_trainable_parameters();
        let pct = if a == 0 {
            0.0
        } else {
            100.0 * t as f64 / a as f64
        };
        format!(
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(t),
            thousands(a)
        )
    }

    /// PEFT's `print_trainable_parameters`: the line of [`PeftModel::trainable_parameters_line`],
    /// logged at info level (the library writes nothing to stdout itself).
    pub fn print_trainable_parameters(&self) {
        tracing::info!("{}", self.trainable_parameters_line());
    }

    /// What each active, trained adapter's method adds to the training loss (AdaLoRA's
    /// orthogonal regularisation), summed; `None` when no method adds anything.
    pub fn regularization_loss(&self) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for e in self.adapters.iter().filter(|e| e.trainable) {
            if let Some(t) = e
                .tuner
                .regularization_loss(self.model.as_ref(), &e.name, &e.config)?
            {
                sum = Some(match sum {
                    Some(s) => (s + t)?,
                    None => t,
                });
            }
        }
        Ok(sum)
    }

    /// Each active, trained adapter's hook before a training step (AdapterDrop's random layer
    /// skipping); `seed` makes the step's draws reproducible.
    pub fn before_train_step(&mut self, seed: u64) -> Result<()> {
        let model = self.model.as_mut();
        for e in self.adapters.iter().filter(|e| e.trainable) {
            if self.active.contains(&e.name) {
                e.tuner.before_train_step(model, &e.config, seed)?;
            }
        }
        Ok(())
    }

    /// Undoes [`PeftModel::before_train_step`] for evaluation and inference.
    pub fn after_training(&mut self) -> Result<()> {
        let model = self.model.as_mut();
        for e in &self.adapters {
            e.tuner.after_training(model, &e.config)?;
        }
        Ok(())
    }

    /// Each trained adapter's per-step hook, after the optimizer step, with that step's gradients
    /// and the 0-based step number (PEFT's `update_and_allocate(global_step)`, AdaLoRA's rank
    /// allocation). Does nothing for methods without one.
    pub fn update_and_allocate(
        &mut self,
        global_step: usize,
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        self.update_and_allocate_by(global_step, &|t| grads.get(t).cloned())
    }

    /// [`PeftModel::update_and_allocate`] with the gradients given by a lookup from parameter to
    /// gradient (a trainer that accumulates micro-batches holds sums, not a `GradStore`).
    pub fn update_and_allocate_by(
        &mut self,
        global_step: usize,
        grads: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Result<()> {
        let model = self.model.as_ref();
        for e in self.adapters.iter_mut().filter(|e| e.trainable) {
            e.tuner
                .after_optimizer_step(model, &e.name, &mut e.config, global_step, grads)?;
        }
        Ok(())
    }
}

impl AdapterHost for PeftModel {
    fn base_model(&self) -> &dyn Model {
        self.model.as_ref()
    }
    fn adapter_names(&self) -> Vec<&str> {
        PeftModel::adapter_names(self)
    }
    fn peft_config(&self, name: &str) -> Option<&PeftConfig> {
        PeftModel::peft_config(self, name)
    }
    fn peft_config_mut(&mut self, name: &str) -> Option<&mut PeftConfig> {
        PeftModel::peft_config_mut(self, name)
    }
    fn add_frozen_adapter(&mut self, name: &str, config: PeftConfig) -> Result<()> {
        self.inject(name, config, false, false)
    }
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        PeftModel::delete_adapter(self, name)
    }
    fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        PeftModel::adapter_state_dict(self, name)
    }
}

impl Generate for PeftModel {
    fn dims(&self) -> ModelDims {
        self.model.dims()
    }
    fn device(&self) -> &candle_core::Device {
        self.model.device()
    }
    fn forward_with_cache(&self, inputs: &Inputs, cache: Option<&mut Cache>) -> Result<Tensor> {
        PeftModel::forward_with_cache(self, inputs, cache, false)
    }
    fn virtual_tokens(&self) -> usize {
        PeftModel::virtual_tokens(self)
    }
}

/// Drops the first `prefix` positions of a `[batch, seq, ...]` output.
fn strip_prefix(out: Tensor, prefix: usize) -> Result<Tensor> {
    if prefix == 0 || out.rank() < 3 {
        return Ok(out);
    }
    let seq = out.dim(1)?;
    Ok(out.narrow(1, prefix, seq - prefix)?)
}

/// PEFT saves a bias under the wrapped layer's `base_layer` when the layer carries an adapter.
fn bias_key(module: &str, param: &str, wrapped: bool) -> String {
    if wrapped {
        let leaf = param.rsplit('.').next().unwrap_or("bias");
        format!("{KEY_PREFIX}{module}.base_layer.{leaf}")
    } else {
        format!("{KEY_PREFIX}{param}")
    }
}

/// 1234567 → "1,234,567", as Python's `{:,}`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `modules_to_save` wrapper a module sits in: its outermost ancestor (or itself) whose name
/// ends with an entry, as PEFT wraps the first match in module order.
fn modules_to_save_root<'a>(key: &'a str, modules_to_save: &[String]) -> Option<&'a str> {
    let ends = key
        .match_indices('.')
        .map(|(i, _)| i)
        .chain(std::iter::once(key.len()));
    ends.map(|end| &key[..end])
        .find(|prefix| modules_to_save.iter().any(|m| prefix.ends_with(m.as_str())))
}
