//! `PeftModel`: a base model with named adapters attached — inject, switch, train, save, load,
//! merge and unload, with PEFT's names and semantics.

use candle_core::{Tensor, Var};
use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};
use std::path::Path;

use crate::io::{load_safetensors, read_json, save_safetensors, write_atomic};
use crate::layers::{ModuleMut, ModuleRef, Param};
use crate::models::{Cache, Inputs, Model};
use crate::tuners::adalora::{self, RankAllocator};
use crate::tuners::lora::Bias;
use crate::tuners::targets::in_modules_to_save;
use crate::tuners::PeftConfig;
use crate::{Error, Result};

#[path = "peft_model_lora_family.rs"]
mod lora_family;
mod multi;
pub use multi::{LayerStatus, MixedBatch, ModelStatus, Status};

/// Prefix of every key in an adapter file: PEFT's wrapper path to the base model's modules.
pub const KEY_PREFIX: &str = "base_model.model.";
pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";

struct AdapterEntry {
    name: String,
    config: PeftConfig,
    /// `modules_to_save` after adding the task's head names.
    modules_to_save: Vec<String>,
    trainable: bool,
    /// Frozen model-level tensors of the adapter (VeRA's projections), under their file keys.
    shared: Vec<(String, Var)>,
}

pub struct PeftModel {
    model: Box<dyn Model>,
    adapters: Vec<AdapterEntry>,
    /// The active adapters (one usually; several are summed, see `set_adapters`).
    active: Vec<String>,
    /// Seed for adapter initialisation; each added adapter advances it.
    seed: u64,
    /// AdaLoRA's rank allocator for the trainable AdaLoRA adapter, if there is one.
    allocator: Option<RankAllocator>,
}

/// Wraps `model` with a new trainable adapter named `default`.
pub fn get_peft_model(model: Box<dyn Model>, config: impl Into<PeftConfig>) -> Result<PeftModel> {
    get_peft_model_with_seed(model, config, 0)
}

/// [`get_peft_model`] with the seed that draws the adapter's random initial weights.
pub fn get_peft_model_with_seed(
    model: Box<dyn Model>,
    config: impl Into<PeftConfig>,
    seed: u64,
) -> Result<PeftModel> {
    let mut m = PeftModel {
        model,
        adapters: Vec::new(),
        active: vec!["default".into()],
        seed,
        allocator: None,
    };
    m.add_adapter("default", config.into())?;
    Ok(m)
}

impl PeftModel {
    /// Loads the adapter in `dir` onto `model` as `default`, frozen (PEFT's `is_trainable=False`).
    pub fn from_pretrained(model: Box<dyn Model>, dir: &Path) -> Result<Self> {
        let mut m = PeftModel {
            model,
            adapters: Vec::new(),
            active: vec!["default".into()],
            seed: 0,
            allocator: None,
        };
        m.load_adapter(dir, "default", false)?;
        Ok(m)
    }

    pub fn base_model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The first active adapter (PEFT's `active_adapter`).
    pub fn active_adapter(&self) -> &str {
        self.active.first().map_or("", |s| s.as_str())
    }

    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    pub fn peft_config(&self, name: &str) -> Option<&PeftConfig> {
        self.entry(name).map(|e| &e.config)
    }

    fn entry(&self, name: &str) -> Option<&AdapterEntry> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Adds a trainable adapter. Like PEFT, it does not become active unless it is the first.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<PeftConfig>) -> Result<()> {
        self.inject(name, config.into(), true)
    }

    fn inject(&mut self, name: &str, mut config: PeftConfig, trainable: bool) -> Result<()> {
        if self.entry(name).is_some() {
            return Err(Error::Adapter(format!(
                "an adapter named `{name}` already exists"
            )));
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
        let existing: Vec<&PeftConfig> = self.adapters.iter().map(|a| &a.config).collect();
        config.check_new_adapter(&existing)?;
        let seed = self.seed.wrapping_add(self.adapters.len() as u64);
        let first = self.adapters.is_empty();
        if matches!(config, PeftConfig::AdaLora(_)) && trainable && self.allocator.is_some() {
            return Err(Error::Adapter(
                "AdaLoRA trains one adapter at a time; load other AdaLoRA adapters for inference \
                 only"
                    .into(),
            ));
        }
        let injected = config.inject(self.model.as_mut(), name, &modules_to_save, seed)?;
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
                    Bias::LoraOnly => is_bias && is_adapted,
                };
                if train_bias && trainable && !saved {
                    p.train_in_place()?;
                }
            }
        }
        if let (PeftConfig::AdaLora(c), true) = (&config, trainable) {
            let layers = adalora::layers(self.model.as_ref(), name);
            self.allocator = Some(RankAllocator::new(c, name, &layers)?);
        }
        self.adapters.push(AdapterEntry {
            name: name.to_string(),
            config,
            modules_to_save,
            trainable,
            shared: injected.shared,
        });
        if first {
            self.active = vec![name.to_string()];
        }
        Ok(())
    }

    /// Makes `name` the adapter the forward pass uses.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    fn for_each_param(&mut self, mut f: impl FnMut(&mut Param)) {
        for module in self.model.modules_mut() {
            for p in module.params_mut() {
                f(p);
            }
        }
    }

    /// Runs the model with the active adapter. `train` switches dropout on.
    pub fn forward(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.model.forward(inputs, train)
    }

    /// [`Model::forward_with_cache`] through the adapters (generation, prefix tuning).
    pub fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        self.model.forward_with_cache(inputs, cache, train)
    }

    /// Stores every frozen base weight in `dtype` (bf16 mixed precision): activations follow
    /// the weights' dtype, while trainable tensors stay fp32 master weights, cast per use.
    pub fn cast_frozen(&mut self, dtype: candle_core::DType) -> Result<()> {
        let mut result = Ok(());
        self.for_each_param(|p| {
            if p.base_var().is_none() && p.base().dtype() != dtype && result.is_ok() {
                result = p
                    .base()
                    .to_dtype(dtype)
                    .map_err(Error::from)
                    .and_then(|t| p.set_base(t));
            }
        });
        result
    }

    /// Trainable tensors under the keys they are saved with.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        // As PEFT: only the active adapters require grad (add_adapter leaves a new one inactive).
        let active = |e: &&AdapterEntry| self.active.contains(&e.name);
        for entry in self.adapters.iter().filter(|e| e.trainable).filter(active) {
            out.extend(self.adapter_vars(&entry.name));
        }
        out.extend(self.in_place_trained());
        out
    }

    /// Base parameters trained in place (PEFT's `bias="all"` / `"lora_only"`), under their keys.
    fn in_place_trained(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for module in self.model.modules() {
            let wrapped = has_adapters(&module);
            for p in module.params() {
                if let Some(v) = p.base_var() {
                    out.push((bias_key(module.name(), &p.name, wrapped), v.clone()));
                }
            }
        }
        out
    }

    /// Every tensor belonging to adapter `name`, under its PEFT key (no adapter name in the key).
    fn adapter_vars(&self, name: &str) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for module in self.model.modules() {
            let tensors = match &module {
                ModuleRef::Linear(l) => l.adapters.get(name).map(|a| a.tensors()),
                ModuleRef::Embedding(e) => e.adapters.get(name).map(|a| a.tensors()),
                ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) => None,
            };
            for (suffix, var) in tensors.unwrap_or_default() {
                out.push((format!("{KEY_PREFIX}{}.{suffix}", module.name()), var));
            }
            for p in module.params() {
                if let Some(v) = p.copy(name) {
                    out.push((format!("{KEY_PREFIX}{}", p.name), v.clone()));
                }
            }
        }
        out
    }

    /// `(trainable, all)` parameter counts as PEFT's `get_nb_trainable_parameters` counts them:
    /// base weights, every adapter's tensors, and `modules_to_save` copies.
    pub fn get_nb_trainable_parameters(&self) -> (usize, usize) {
        let mut all = 0;
        for module in self.model.modules() {
            for p in module.params() {
                all += p.elem_count();
            }
        }
        for entry in &self.adapters {
            all += self
                .adapter_vars(&entry.name)
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>();
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

    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters_line());
    }

    /// The tensors `save_pretrained` writes for adapter `name`.
    pub fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let entry = self
            .entry(name)
            .ok_or_else(|| Error::Adapter(format!("no adapter named `{name}`")))?;
        let mut out: Vec<(String, Tensor)> = self
            .adapter_vars(name)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        out.extend(
            entry
                .shared
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach())),
        );
        let bias = entry.config.bias();
        if bias != Bias::None {
            for module in self.model.modules() {
                let wrapped = has_adapters(&module);
                for p in module.params() {
                    let wanted = p.name.ends_with(".bias")
                        && match bias {
                            Bias::All => true,
                            Bias::LoraOnly => wrapped,
                            Bias::None => false,
                        };
                    if !wanted {
                        continue;
                    }
                    match modules_to_save_root(module.name(), &entry.modules_to_save) {
                        // PEFT's bias filter also catches the wrapper's two inner modules.
                        Some(root) if bias == Bias::All => {
                            let rest = &p.name[root.len() + 1..];
                            let base = format!("{KEY_PREFIX}{root}.original_module.{rest}");
                            out.push((base, p.base().detach()));
                            if let Some(copy) = p.copy(name) {
                                let key = format!("{KEY_PREFIX}{root}.modules_to_save.{rest}");
                                out.push((key, copy.as_tensor().detach()));
                            }
                        }
                        Some(_) => {}
                        None => {
                            out.push((bias_key(module.name(), &p.name, wrapped), p.base().detach()))
                        }
                    }
                }
            }
        }
        if let PeftConfig::AdaLora(c) = &entry.config {
            out = adalora::resize_state_dict(c, KEY_PREFIX, out)?;
        }
        Ok(out)
    }

    /// Writes every adapter in PEFT's layout: `default` in `dir`, others in `dir/<name>/`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.save_pretrained_selected(dir, None)
    }

    /// [`PeftModel::save_pretrained`] of only the named adapters (PEFT's `selected_adapters`).
    pub fn save_pretrained_selected(&self, dir: &Path, selected: Option<&[&str]>) -> Result<()> {
        if let Some(sel) = selected {
            if let Some(bad) = sel.iter().find(|n| self.entry(n).is_none()) {
                return Err(Error::Adapter(format!(
                    "cannot save adapter `{bad}`: no such adapter; loaded: {}",
                    self.adapter_names().join(", ")
                )));
            }
        }
        let chosen = self
            .adapters
            .iter()
            .filter(|e| selected.is_none_or(|sel| sel.contains(&e.name.as_str())));
        for entry in chosen {
            let target = if entry.name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(&entry.name)
            };
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            save_safetensors(
                &target.join(WEIGHTS_NAME),
                &self.adapter_state_dict(&entry.name)?,
            )?;
            let json = serde_json::to_string_pretty(&entry.config.to_adapter_json())
                .map_err(|e| Error::Adapter(e.to_string()))?;
            write_atomic(&target.join(CONFIG_NAME), json.as_bytes())?;
        }
        Ok(())
    }

    /// Loads the adapter in `dir` as `name`. Every tensor the config implies must be in the file
    /// with the model's shape, and the file must hold nothing the model cannot place.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, is_trainable: bool) -> Result<()> {
        let config_path = dir.join(CONFIG_NAME);
        if !config_path.exists() {
            return Err(Error::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an adapter directory (no adapter_config.json)",
                ),
            ));
        }
        let config = PeftConfig::from_adapter_json(&read_json(&config_path)?)?;
        let weights_path = dir.join(WEIGHTS_NAME);
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Adapter(format!(
                "{}: only adapter_model.bin (pickle) found; re-save it with safe_serialization=True",
                dir.display()
            )));
        }
        let mut file = load_safetensors(&weights_path, self.model.device())?;
        let first = self.adapters.is_empty();
        self.inject(name, config, is_trainable)?;
        let mut expected = self.adapter_vars(name);
        if let Some(e) = self.entry(name) {
            expected.extend(e.shared.iter().cloned());
        }
        // Trained biases are part of the adapter too: `bias` = all / lora_only.
        let bias = self.entry(name).map_or(Bias::None, |e| e.config.bias());
        let mut missing = Vec::new();
        for (key, var) in expected.drain(..) {
            match file.remove(&key) {
                Some(t) => set_checked(&key, &var, &t)?,
                None => missing.push(key),
            }
        }
        if bias != Bias::None {
            let (biases, rest): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut file)
                .into_iter()
                .partition(|(k, _)| k.ends_with(".bias"));
            file = rest;
            for (key, t) in biases {
                self.load_bias(&key, name, t)?;
            }
        }
        if !missing.is_empty() || !file.is_empty() {
            let mut unexpected: Vec<&String> = file.keys().collect();
            unexpected.sort();
            // Roll back so a failed load leaves the model as it was.
            self.delete_adapter(name)?;
            return Err(Error::Adapter(format!(
                "{} does not fit this model: missing tensors [{}]; tensors the model has no place for [{}]",
                weights_path.display(),
                missing.join(", "),
                unexpected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        if first {
            self.set_adapter(name)?;
        }
        Ok(())
    }

    /// Places a trained bias saved with the adapter (`bias` = all / lora_only). PEFT writes a
    /// wrapped layer's bias under `base_layer`, and for a `modules_to_save` module also under
    /// `original_module` (the base) and `modules_to_save` (the adapter's copy, which the plain
    /// key already carries).
    fn load_bias(&mut self, key: &str, adapter: &str, t: Tensor) -> Result<()> {
        let path = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        let to_copy = path.contains(".modules_to_save.");
        let path = path
            .replace(".base_layer.", ".")
            .replace(".modules_to_save.", ".")
            .replace(".original_module.", ".");
        for module in self.model.modules_mut() {
            for p in module.params_mut() {
                if p.name != path {
                    continue;
                }
                if p.base().dims() != t.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key.to_string(),
                        expected: p.base().dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                let t = t.to_dtype(p.base().dtype())?;
                return match p.copy(adapter) {
                    Some(copy) if to_copy => Ok(copy.set(&t)?),
                    Some(_) => Ok(()),
                    None => p.set_base(t),
                };
            }
        }
        Err(Error::Adapter(format!(
            "adapter bias `{key}` matches no parameter of the model"
        )))
    }

    /// Removes adapter `name` from every layer.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = self
            .adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::Adapter(format!("no adapter named `{name}`")))?;
        for module in self.model.modules_mut() {
            match module {
                ModuleMut::Linear(l) => {
                    if l.adapters.merged().iter().any(|n| n == name) {
                        l.unmerge()?;
                    }
                    l.adapters.remove(name);
                    for p in std::iter::once(&mut l.weight).chain(l.bias.as_mut()) {
                        p.remove_copy(name);
                    }
                }
                ModuleMut::Embedding(e) => {
                    if e.adapters.merged().iter().any(|n| n == name) {
                        e.unmerge()?;
                    }
                    e.adapters.remove(name);
                    e.weight.remove_copy(name);
                }
                ModuleMut::LayerNorm(n) => {
                    for p in std::iter::once(&mut n.weight).chain(n.bias.as_mut()) {
                        p.remove_copy(name);
                    }
                }
                ModuleMut::RmsNorm(n) => n.weight.remove_copy(name),
            }
        }
        self.adapters.remove(i);
        if self.allocator.as_ref().is_some_and(|a| a.adapter == name) {
            self.allocator = None;
        }
        if self.active.iter().any(|a| a == name) {
            if let Some(next) = self.adapters.first().map(|a| a.name.clone()) {
                self.set_adapter(&next)?;
            }
        }
        Ok(())
    }

    /// Folds the active adapter into the base weights (PEFT's `merge_adapter`).
    pub fn merge_adapter(&mut self) -> Result<()> {
        let names = self.active.clone();
        for module in self.model.modules_mut() {
            match module {
                ModuleMut::Linear(l) => l.merge(&names)?,
                ModuleMut::Embedding(e) => e.merge(&names)?,
                ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {}
            }
        }
        Ok(())
    }

    /// Takes merged adapters back out of the base weights.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for module in self.model.modules_mut() {
            match module {
                ModuleMut::Linear(l) => l.unmerge()?,
                ModuleMut::Embedding(e) => e.unmerge()?,
                ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {}
            }
        }
        Ok(())
    }

    /// Merges the active adapter and returns the plain base model, adapters removed.
    pub fn merge_and_unload(mut self) -> Result<Box<dyn Model>> {
        self.merge_adapter()?;
        Ok(self.strip(true))
    }

    /// Returns the base model with every adapter removed and nothing merged.
    pub fn unload(mut self) -> Result<Box<dyn Model>> {
        self.unmerge_adapter()?;
        Ok(self.strip(false))
    }

    fn strip(mut self, keep_active_copies: bool) -> Box<dyn Model> {
        for module in self.model.modules_mut() {
            match module {
                ModuleMut::Linear(l) => l.adapters.clear(),
                ModuleMut::Embedding(e) => e.adapters.clear(),
                ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {}
            }
        }
        self.for_each_param(|p| {
            if keep_active_copies {
                p.bake_active_copy();
            } else {
                p.drop_copies();
            }
            let _ = p.freeze();
        });
        self.model
    }

    /// Switches every adapter layer off (`true`) or on (`false`). Merged adapters are unmerged
    /// first, as in PEFT.
    pub fn disable_adapter_layers(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            self.unmerge_adapter()?;
        }
        let active = self.active.first().cloned().unwrap_or_default();
        for module in self.model.modules_mut() {
            match module {
                ModuleMut::Linear(l) => l.adapters.set_disabled(disabled),
                ModuleMut::Embedding(e) => e.adapters.set_disabled(disabled),
                ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {}
            }
        }
        self.for_each_param(|p| {
            if p.has_copies() {
                p.activate(if disabled { None } else { Some(&active) });
            }
        });
        Ok(())
    }

    /// Runs the base model until the returned guard is dropped (PEFT's `with model.disable_adapter():`).
    pub fn disable_adapter(&mut self) -> Result<AdapterDisabled<'_>> {
        self.disable_adapter_layers(true)?;
        Ok(AdapterDisabled { model: self })
    }
}

/// The scope of [`PeftModel::disable_adapter`]: adapters come back when it is dropped.
pub struct AdapterDisabled<'a> {
    model: &'a mut PeftModel,
}

impl Deref for AdapterDisabled<'_> {
    type Target = PeftModel;
    fn deref(&self) -> &PeftModel {
        self.model
    }
}

impl DerefMut for AdapterDisabled<'_> {
    fn deref_mut(&mut self) -> &mut PeftModel {
        self.model
    }
}

impl Drop for AdapterDisabled<'_> {
    fn drop(&mut self) {
        // Re-enabling only flips flags and routes copies; it cannot fail.
        let _ = self.model.disable_adapter_layers(false);
    }
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

fn has_adapters(module: &ModuleRef<'_>) -> bool {
    match module {
        ModuleRef::Linear(l) => !l.adapters.is_empty(),
        ModuleRef::Embedding(e) => !e.adapters.is_empty(),
        ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) => false,
    }
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

fn set_checked(key: &str, var: &Var, t: &Tensor) -> Result<()> {
    if var.dims() != t.dims() {
        return Err(Error::ShapeMismatch {
            name: key.to_string(),
            expected: var.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
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

/// Loads the base model in `model_dir` with the head the adapter in `adapter_dir` was trained
/// for (its `task_type`, and the class count of its saved classifier), then the adapter on top,
/// frozen. The counterpart of `AutoPeftModelFor...from_pretrained` for a known base directory.
pub fn load_with_adapter(
    model_dir: &Path,
    adapter_dir: &Path,
    mut opts: crate::LoadOptions,
) -> Result<PeftModel> {
    let config = PeftConfig::from_adapter_json(&read_json(&adapter_dir.join(CONFIG_NAME))?)?;
    if opts.task.is_none() {
        opts.task = config.task_type();
    }
    if opts.num_labels.is_none() {
        opts.num_labels = saved_head_classes(adapter_dir)?;
    }
    let model = crate::models::load(model_dir, &opts)?;
    PeftModel::from_pretrained(model, adapter_dir)
}

/// Rows of a classification head saved in an adapter (`modules_to_save`), if there is one.
pub fn saved_head_classes(adapter_dir: &Path) -> Result<Option<usize>> {
    let path = adapter_dir.join(WEIGHTS_NAME);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(meta
        .tensors()
        .iter()
        .find(|(k, _)| {
            k.ends_with(".classifier.weight")
                || k.ends_with(".classifier.out_proj.weight")
                || k.ends_with(".score.weight")
        })
        .map(|(_, info)| info.shape[0]))
}

/// Loads the adapter in `adapter_dir` on the base model its config names, found without network
/// access (PEFT's `AutoPeftModelFor...from_pretrained(adapter_dir)`): `base_model_name_or_path`
/// as a path (also relative to the adapter directory), else the Hugging Face cache (see
/// [`crate::io::hub::resolve_model`]). The head comes from the adapter's `task_type`.
pub fn load_auto(adapter_dir: &Path, opts: crate::LoadOptions) -> Result<PeftModel> {
    let config = PeftConfig::from_adapter_json(&read_json(&adapter_dir.join(CONFIG_NAME))?)?;
    let base = config.base_model_name_or_path().ok_or_else(|| {
        Error::Adapter(format!(
            "{}: no base_model_name_or_path; pass the base model explicitly",
            adapter_dir.join(CONFIG_NAME).display()
        ))
    })?;
    let model_dir = crate::io::hub::resolve_model(base, Some(adapter_dir))?;
    load_with_adapter(&model_dir, adapter_dir, opts)
}
