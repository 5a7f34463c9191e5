//! Many adapters on one model: several active at once, weighted combinations
//! (`add_weighted_adapter`), mixed batches (each row its own adapter), loading every adapter of a
//! saved directory, and PEFT's per-layer / per-model status.

use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{modules_to_save_root, PeftModel, CONFIG_NAME};
use crate::generation::Generate;
use crate::layers::mixed::{self, BASE};
use crate::layers::{ModuleMut, ModuleRef};
use crate::models::{Cache, Inputs, ModelDims};
use crate::tuners::lora::weighted::{
    combine_layer, LayerJob, MaskSource, Matrix, RandomMasks, Source, WeightedOptions,
};
use crate::tuners::lora::{LoraEmbedding, LoraLinear};
use crate::tuners::targets::ModuleSpec;
use crate::tuners::PeftConfig;
use crate::{Error, Result};

/// `true`, `false`, or PEFT's `"irregular"` when the layers disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Yes,
    No,
    Irregular,
}

impl Status {
    fn of(values: impl IntoIterator<Item = bool>) -> Status {
        let v: Vec<bool> = values.into_iter().collect();
        if v.iter().all(|x| *x) {
            Status::Yes
        } else if v.iter().any(|x| *x) {
            Status::Irregular
        } else {
            Status::No
        }
    }
}

/// PEFT's `TunerLayerStatus`: one adapter layer (or `modules_to_save` wrapper).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStatus {
    /// The name PEFT reports: `model.` + the module path.
    pub name: String,
    /// `lora.Linear`, `lora.Embedding` or `ModulesToSaveWrapper`.
    pub module_type: String,
    pub enabled: bool,
    pub active_adapters: Vec<String>,
    pub merged_adapters: Vec<String>,
    /// Per adapter: whether its tensors here are trained.
    pub requires_grad: BTreeMap<String, Status>,
    pub available_adapters: Vec<String>,
    /// Per adapter: the device kinds its tensors live on (`cpu`, `cuda`).
    pub devices: BTreeMap<String, Vec<String>>,
}

/// PEFT's `TunerModelStatus`: the layers' status summed up; `None` in the list fields means the
/// layers disagree (PEFT's `"irregular"`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatus {
    pub base_model_type: String,
    pub adapter_model_type: String,
    pub peft_types: BTreeMap<String, String>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub num_adapter_layers: usize,
    pub enabled: Status,
    pub active_adapters: Option<Vec<String>>,
    pub merged_adapters: Option<Vec<String>>,
    pub requires_grad: BTreeMap<String, Status>,
    pub available_adapters: Vec<String>,
    pub devices: BTreeMap<String, Vec<String>>,
}

fn device_kind(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "mps".into(),
    }
}

impl PeftModel {
    /// Activates several adapters at once; their contributions add up in every layer (PEFT's
    /// `base_model.set_adapter([...])`). A `modules_to_save` module can follow only one adapter,
    /// so two of the names owning a copy of the same module is an error, as in PEFT.
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        if names.is_empty() {
            return Err(Error::Adapter(
                "set_adapters needs at least one name".into(),
            ));
        }
        for name in names {
            if self.entry(name).is_none() {
                return Err(Error::Adapter(format!(
                    "no adapter named `{name}`; loaded: {}",
                    self.adapter_names().join(", ")
                )));
            }
        }
        if names.len() > 1 {
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
            match module {
                ModuleMut::Linear(l) => l.adapters.set_active(&list),
                ModuleMut::Embedding(e) => e.adapters.set_active(&list),
                ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {}
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

    /// The active adapters, in the order they were set.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Checks a mixed batch as PEFT does before running it.
    fn check_mixed(&self, names: &[String]) -> Result<()> {
        for module in self.model.modules() {
            let merged = match &module {
                ModuleRef::Linear(l) => !l.adapters.merged().is_empty(),
                ModuleRef::Embedding(e) => !e.adapters.merged().is_empty(),
                ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) => {
                    if module.params().iter().any(|p| p.has_copies()) {
                        return Err(Error::Adapter(format!(
                            "mixed batches route Linear and Embedding layers only, but `{}` is a \
                             normalisation layer in modules_to_save",
                            module.name()
                        )));
                    }
                    false
                }
            };
            if merged {
                return Err(Error::Adapter(
                    "cannot pass adapter_names when there are merged adapters; call \
                     unmerge_adapter first"
                        .into(),
                ));
            }
        }
        let unknown: BTreeSet<&str> = names
            .iter()
            .map(|s| s.as_str())
            .filter(|n| *n != BASE && self.entry(n).is_none())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Adapter(format!(
                "trying to infer with non-existing adapter(s): {}; loaded: {}",
                unknown.into_iter().collect::<Vec<_>>().join(", "),
                self.adapter_names().join(", ")
            )));
        }
        for module in self.model.modules() {
            let refuses = |n: &str| match &module {
                ModuleRef::Linear(l) => {
                    l.adapters.get(n).is_some_and(|a| !a.supports_mixed_batch())
                }
                ModuleRef::Embedding(e) => {
                    e.adapters.get(n).is_some_and(|a| !a.supports_mixed_batch())
                }
                _ => false,
            };
            if let Some(n) = names.iter().find(|n| refuses(n)) {
                return Err(Error::Adapter(format!(
                    "cannot pass adapter_names with adapter `{n}`: its method (e.g. DoRA) does not \
                     support mixed batches (layer `{}`)",
                    module.name()
                )));
            }
        }
        Ok(())
    }

    /// Runs one batch where row `i` uses adapter `adapter_names[i]` (`"__base__"`: none), whatever
    /// the active adapters are (PEFT's `model(**inputs, adapter_names=...)`). Inference only.
    pub fn forward_mixed(&self, inputs: &Inputs, adapter_names: &[String]) -> Result<Tensor> {
        self.forward_mixed_with_cache(inputs, None, adapter_names)
    }

    /// [`PeftModel::forward_mixed`] attending to and extending a cache.
    pub fn forward_mixed_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        adapter_names: &[String],
    ) -> Result<Tensor> {
        let (batch, _) = inputs.batch_seq()?;
        if adapter_names.len() != batch {
            return Err(Error::Data(format!(
                "length of adapter_names should be the number of inputs, but got {} and {batch}",
                adapter_names.len()
            )));
        }
        self.check_mixed(adapter_names)?;
        mixed::with_adapter_names(adapter_names, || {
            self.model.forward_with_cache(inputs, cache, false)
        })
    }

    /// The model seen through per-row adapters, for [`crate::generation::generate`]: prompt `i`
    /// is continued with adapter `adapter_names[i]`.
    pub fn with_adapter_names(&self, adapter_names: &[String]) -> Result<MixedBatch<'_>> {
        self.check_mixed(adapter_names)?;
        Ok(MixedBatch {
            model: self,
            names: adapter_names.to_vec(),
        })
    }

    /// Wraps `model` with every adapter saved in `dir` (see [`PeftModel::load_adapters_from`]);
    /// the first one found is active.
    pub fn from_pretrained_all(
        model: Box<dyn crate::Model>,
        dir: &Path,
        is_trainable: bool,
    ) -> Result<Self> {
        let mut m = PeftModel {
            model,
            adapters: Vec::new(),
            active: Vec::new(),
            seed: 0,
            allocator: None,
        };
        m.load_adapters_from(dir, is_trainable)?;
        Ok(m)
    }

    /// Loads the base model in `model_dir` with the head the first adapter was trained for, then
    /// every `(name, dir)` adapter on it, frozen; the first is active. The several-adapter form
    /// of [`super::load_with_adapter`].
    pub fn load_with_adapters(
        model_dir: &Path,
        adapters: &[(String, std::path::PathBuf)],
        mut opts: crate::LoadOptions,
    ) -> Result<Self> {
        let (_, first) = adapters
            .first()
            .ok_or_else(|| Error::Adapter("no adapter given".into()))?;
        let config =
            PeftConfig::from_adapter_json(&crate::io::read_json(&first.join(CONFIG_NAME))?)?;
        if opts.task.is_none() {
            opts.task = config.task_type();
        }
        if opts.num_labels.is_none() {
            opts.num_labels = super::saved_head_classes(first)?;
        }
        let mut m = PeftModel {
            model: crate::models::load(model_dir, &opts)?,
            adapters: Vec::new(),
            active: Vec::new(),
            seed: 0,
            allocator: None,
        };
        for (name, dir) in adapters {
            m.load_adapter(dir, name, false)?;
        }
        Ok(m)
    }

    /// Loads every adapter saved in `dir` by `save_pretrained`: `default` from `dir` itself (if it
    /// holds one) and each subdirectory holding an `adapter_config.json` under its own name.
    /// Returns the names loaded, `default` first, then by name.
    pub fn load_adapters_from(&mut self, dir: &Path, is_trainable: bool) -> Result<Vec<String>> {
        let mut found = Vec::new();
        if dir.join(CONFIG_NAME).exists() {
            found.push(("default".to_string(), dir.to_path_buf()));
        }
        let mut subs: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(CONFIG_NAME).exists())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        subs.sort();
        found.extend(subs);
        if found.is_empty() {
            return Err(Error::Adapter(format!(
                "{}: no adapter_config.json in it or in its subdirectories",
                dir.display()
            )));
        }
        for (name, path) in &found {
            self.load_adapter(path, name, is_trainable)?;
        }
        Ok(found.into_iter().map(|(n, _)| n).collect())
    }

    /// PEFT's `add_weighted_adapter`: a new, frozen LoRA adapter `name` combining `adapters`
    /// with `weights` (negative weights subtract). DARE's masks are drawn from `opts.seed`.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        opts: &WeightedOptions,
    ) -> Result<()> {
        let mut masks = RandomMasks::new(opts.seed);
        self.add_weighted_adapter_with_masks(adapters, weights, name, opts, &mut masks)
    }

    /// [`PeftModel::add_weighted_adapter`] with DARE's masks from `masks`.
    pub fn add_weighted_adapter_with_masks(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        opts: &WeightedOptions,
        masks: &mut dyn MaskSource,
    ) -> Result<()> {
        if self.entry(name).is_some() {
            return Err(Error::Adapter(format!(
                "an adapter named `{name}` already exists; pick a new name for the combination"
            )));
        }
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(Error::Adapter(format!(
                "add_weighted_adapter needs one weight per adapter; got {} adapters and {} weights",
                adapters.len(),
                weights.len()
            )));
        }
        let mut configs = Vec::new();
        for a in adapters {
            match self.entry(a).map(|e| &e.config) {
                Some(PeftConfig::Lora(c)) => configs.push(c.clone()),
                Some(other) => {
                    return Err(Error::Adapter(format!(
                        "add_weighted_adapter combines LoRA adapters; `{a}` is {}",
                        other.peft_type()
                    )))
                }
                None => return Err(Error::Adapter(format!("adapter `{a}` does not exist"))),
            }
        }
        for module in self.model.modules() {
            for p in module.params() {
                if adapters.iter().filter(|a| p.copy(a).is_some()).count() > 1 {
                    return Err(Error::Adapter(format!(
                        "cannot add weighted adapters if they target the same module with \
                         modules_to_save (`{}`)",
                        module.name()
                    )));
                }
            }
        }
        let mut opts = opts.clone();
        if adapters.len() == 1 {
            opts.combination_type = crate::tuners::lora::weighted::CombinationType::Linear;
        }
        let ct = opts.combination_type;
        let ranks: Vec<usize> = configs
            .iter()
            .map(|c| {
                c.rank_pattern
                    .values()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .fold(c.r, usize::max)
            })
            .collect();
        use crate::tuners::lora::weighted::CombinationType as C;
        let new_rank = match ct {
            C::Cat => ranks.iter().sum(),
            ct if ct.is_svd() => opts
                .svd_rank
                .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
            _ => {
                if ranks.iter().any(|r| *r != ranks[0]) {
                    return Err(Error::Adapter(format!(
                        "all adapters must have the same r value when using combination_type {} \
                         (ranks {ranks:?}); use cat or an _svd type",
                        ct.as_str()
                    )));
                }
                ranks[0]
            }
        };
        let targets = union_targets(&configs)?;
        let mut config = configs[0].clone();
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.target_modules = Some(targets);
        config.alpha_pattern.clear();
        config.rank_pattern.clear();
        // Modules to save of the first adapter are already in its config (task heads included).
        self.inject(name, PeftConfig::Lora(config), false)?;
        if let Err(e) = self.fill_weighted(adapters, weights, name, &opts, new_rank, masks) {
            self.delete_adapter(name)?;
            return Err(e);
        }
        Ok(())
    }

    fn fill_weighted(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        opts: &WeightedOptions,
        new_rank: usize,
        masks: &mut dyn MaskSource,
    ) -> Result<()> {
        for module in self.model.modules() {
            let mut sources = Vec::new();
            let mut transposed = true;
            let target: (Var, Var) = match &module {
                ModuleRef::Linear(l) => {
                    transposed = l.transposed;
                    let Some(t) = l.adapters.get(name) else {
                        continue;
                    };
                    let t = lora_linear(t.as_any(), module.name(), name)?;
                    for (a, w) in adapters.iter().zip(weights) {
                        if let Some(s) = l.adapters.get(a) {
                            let s = lora_linear(s.as_any(), module.name(), a)?;
                            sources.push(source(a, *w, s.scaling, &s.a, &s.b)?);
                        }
                    }
                    (t.a.clone(), t.b.clone())
                }
                ModuleRef::Embedding(e) => {
                    let Some(t) = e.adapters.get(name) else {
                        continue;
                    };
                    let t = lora_embedding(t.as_any(), module.name(), name)?;
                    for (a, w) in adapters.iter().zip(weights) {
                        if let Some(s) = e.adapters.get(a) {
                            let s = lora_embedding(s.as_any(), module.name(), a)?;
                            sources.push(source(a, *w, s.scaling, &s.a, &s.b)?);
                        }
                    }
                    (t.a.clone(), t.b.clone())
                }
                ModuleRef::LayerNorm(_) | ModuleRef::RmsNorm(_) => continue,
            };
            let job = LayerJob {
                module: module.name(),
                sources,
                new_rank,
                transposed,
            };
            let (a, b) = combine_layer(&job, opts, masks)?;
            set_matrix(module.name(), &target.0, &a)?;
            set_matrix(module.name(), &target.1, &b)?;
        }
        Ok(())
    }

    /// PEFT's `get_layer_status`: every adapter layer and `modules_to_save` wrapper, in module
    /// order.
    pub fn layer_status(&self) -> Result<Vec<LayerStatus>> {
        let trainable: BTreeMap<&str, bool> = self
            .adapters
            .iter()
            .map(|e| (e.name.as_str(), e.trainable))
            .collect();
        let all_saved: Vec<String> = self
            .adapters
            .iter()
            .flat_map(|e| e.modules_to_save.iter().cloned())
            .collect();
        let mut out: Vec<LayerStatus> = Vec::new();
        for module in self.model.modules() {
            let (kind, names, merged, enabled, tensors) = match &module {
                ModuleRef::Linear(l) if !l.adapters.is_empty() => (
                    "lora.Linear",
                    l.adapters.names().map(String::from).collect::<Vec<_>>(),
                    l.adapters.merged().to_vec(),
                    !l.adapters.is_disabled(),
                    l.adapters
                        .iter()
                        .map(|(n, a)| (n.to_string(), a.tensors()))
                        .collect::<Vec<_>>(),
                ),
                ModuleRef::Embedding(e) if !e.adapters.is_empty() => (
                    "lora.Embedding",
                    e.adapters.names().map(String::from).collect(),
                    e.adapters.merged().to_vec(),
                    !e.adapters.is_disabled(),
                    e.adapters
                        .iter()
                        .map(|(n, a)| (n.to_string(), a.tensors()))
                        .collect(),
                ),
                _ => {
                    self.wrapper_status(&module, &all_saved, &trainable, &mut out);
                    continue;
                }
            };
            let mut available = names.clone();
            available.sort();
            out.push(LayerStatus {
                name: format!("model.{}", module.name()),
                module_type: kind.into(),
                enabled,
                // As PEFT: the model's active list, whether or not this layer has them.
                active_adapters: self.active.clone(),
                merged_adapters: merged,
                requires_grad: tensors
                    .iter()
                    .map(|(n, _)| (n.clone(), self.grad_status(n, &trainable)))
                    .collect(),
                available_adapters: available,
                devices: devices(&tensors),
            });
        }
        if out.is_empty() {
            return Err(Error::Adapter(
                "no adapter layers found in the model".into(),
            ));
        }
        Ok(out)
    }

    /// PEFT trains the active adapters of a trainable model; inactive and frozen (loaded for
    /// inference) adapters do not receive gradients.
    fn grad_status(&self, adapter: &str, trainable: &BTreeMap<&str, bool>) -> Status {
        let t = trainable.get(adapter).copied().unwrap_or(false);
        if t && self.active.iter().any(|a| a == adapter) {
            Status::Yes
        } else {
            Status::No
        }
    }

    /// A `modules_to_save` wrapper, reported once at its root module.
    fn wrapper_status(
        &self,
        module: &ModuleRef<'_>,
        all_saved: &[String],
        trainable: &BTreeMap<&str, bool>,
        out: &mut Vec<LayerStatus>,
    ) {
        let params = module.params();
        let owners: Vec<String> = self
            .adapters
            .iter()
            .filter(|e| params.iter().any(|p| p.copy(&e.name).is_some()))
            .map(|e| e.name.clone())
            .collect();
        if owners.is_empty() {
            return;
        }
        let root = modules_to_save_root(module.name(), all_saved).unwrap_or(module.name());
        let name = format!("model.{root}");
        if out.iter().any(|s| s.name == name) {
            return;
        }
        let tensors: Vec<(String, Vec<(String, Var)>)> = owners
            .iter()
            .map(|n| {
                let vars = params
                    .iter()
                    .filter_map(|p| p.copy(n).map(|v| (p.name.clone(), v.clone())))
                    .collect();
                (n.clone(), vars)
            })
            .collect();
        let active: Vec<String> = self
            .active
            .iter()
            .filter(|a| owners.contains(a))
            .cloned()
            .collect();
        let enabled = params
            .iter()
            .any(|p| p.is_trainable() || owners.iter().any(|o| p.copy(o).is_some()));
        out.push(LayerStatus {
            name,
            module_type: "ModulesToSaveWrapper".into(),
            enabled,
            active_adapters: active,
            merged_adapters: Vec::new(),
            requires_grad: owners
                .iter()
                .map(|n| (n.clone(), self.grad_status(n, trainable)))
                .collect(),
            available_adapters: {
                let mut v = owners.clone();
                v.sort();
                v
            },
            devices: devices(&tensors),
        });
    }

    /// PEFT's `get_model_status`.
    pub fn model_status(&self) -> Result<ModelStatus> {
        let layers = self.layer_status()?;
        let (trainable_params, total_params) = self.get_nb_trainable_parameters();
        let same = |f: &dyn Fn(&LayerStatus) -> Vec<String>| {
            let first = f(&layers[0]);
            layers.iter().all(|l| f(l) == first).then_some(first)
        };
        let mut requires_grad: BTreeMap<String, Vec<Status>> = BTreeMap::new();
        let mut devices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for l in &layers {
            for (k, v) in &l.requires_grad {
                requires_grad.entry(k.clone()).or_default().push(*v);
            }
            for (k, v) in &l.devices {
                devices
                    .entry(k.clone())
                    .or_default()
                    .extend(v.iter().cloned());
            }
        }
        let info = self.model.info();
        Ok(ModelStatus {
            base_model_type: info.architecture.clone(),
            adapter_model_type: "LoraModel".into(),
            peft_types: self
                .adapters
                .iter()
                .map(|e| (e.name.clone(), e.config.peft_type().to_string()))
                .collect(),
            trainable_params,
            total_params,
            num_adapter_layers: layers.len(),
            enabled: Status::of(layers.iter().map(|l| l.enabled)),
            active_adapters: same(&|l| l.active_adapters.clone()),
            merged_adapters: same(&|l| l.merged_adapters.clone()),
            requires_grad: requires_grad
                .into_iter()
                .map(|(k, v)| {
                    let s = if v.iter().all(|x| *x == v[0]) {
                        v[0]
                    } else {
                        Status::Irregular
                    };
                    (k, s)
                })
                .collect(),
            available_adapters: layers
                .iter()
                .flat_map(|l| l.available_adapters.iter().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            devices: devices
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
        })
    }
}

fn devices(tensors: &[(String, Vec<(String, Var)>)]) -> BTreeMap<String, Vec<String>> {
    tensors
        .iter()
        .map(|(n, vars)| {
            let set: BTreeSet<String> = vars.iter().map(|(_, v)| device_kind(v.device())).collect();
            (n.clone(), set.into_iter().collect())
        })
        .collect()
}

/// PEFT's new `target_modules`: the union of lists, or the regexes joined as alternatives.
fn union_targets(configs: &[crate::tuners::lora::LoraConfig]) -> Result<ModuleSpec> {
    let specs: Vec<&ModuleSpec> = configs
        .iter()
        .map(|c| {
            c.target_modules.as_ref().ok_or_else(|| {
                Error::Adapter("an adapter to combine has no resolved target_modules".into())
            })
        })
        .collect::<Result<_>>()?;
    if specs.iter().all(|s| matches!(s, ModuleSpec::List(_))) {
        let mut all: Vec<String> = Vec::new();
        for s in &specs {
            if let ModuleSpec::List(v) = s {
                for n in v {
                    if !all.contains(n) {
                        all.push(n.clone());
                    }
                }
            }
        }
        return Ok(ModuleSpec::List(all));
    }
    if specs.iter().all(|s| matches!(s, ModuleSpec::Regex(_))) {
        let joined = specs
            .iter()
            .filter_map(|s| match s {
                ModuleSpec::Regex(r) => Some(format!("({r})")),
                ModuleSpec::List(_) => None,
            })
            .collect::<Vec<_>>()
            .join("|");
        return Ok(ModuleSpec::Regex(joined));
    }
    Err(Error::Adapter(
        "all adapter configs should follow the same target modules type; combining list and \
         regex target_modules is not supported"
            .into(),
    ))
}

fn lora_linear<'a>(
    any: &'a dyn std::any::Any,
    module: &str,
    adapter: &str,
) -> Result<&'a LoraLinear> {
    any.downcast_ref::<LoraLinear>().ok_or_else(|| {
        Error::Adapter(format!(
            "add_weighted_adapter combines plain LoRA adapters; `{adapter}` on `{module}` is not one"
        ))
    })
}

fn lora_embedding<'a>(
    any: &'a dyn std::any::Any,
    module: &str,
    adapter: &str,
) -> Result<&'a LoraEmbedding> {
    any.downcast_ref::<LoraEmbedding>().ok_or_else(|| {
        Error::Adapter(format!(
            "add_weighted_adapter combines plain LoRA adapters; `{adapter}` on `{module}` is not one"
        ))
    })
}

fn matrix(v: &Var) -> Result<Matrix> {
    let (r, c) = v.dims2()?;
    let data = v
        .as_tensor()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Matrix::new(r, c, data))
}

fn source(adapter: &str, weight: f64, scaling: f64, a: &Var, b: &Var) -> Result<Source> {
    Ok(Source {
        adapter: adapter.to_string(),
        weight,
        scaling,
        a: matrix(a)?,
        b: matrix(b)?,
    })
}

fn set_matrix(module: &str, var: &Var, m: &Matrix) -> Result<()> {
    if var.dims() != [m.rows, m.cols] {
        return Err(Error::ShapeMismatch {
            name: format!("{module} (weighted adapter)"),
            expected: var.dims().to_vec(),
            found: vec![m.rows, m.cols],
        });
    }
    let t = Tensor::from_vec(m.data.clone(), (m.rows, m.cols), var.device())?;
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// A [`PeftModel`] whose forward passes route row `i` through adapter `names[i]`; see
/// [`PeftModel::with_adapter_names`].
pub struct MixedBatch<'a> {
    model: &'a PeftModel,
    names: Vec<String>,
}

impl Generate for MixedBatch<'_> {
    fn dims(&self) -> ModelDims {
        self.model.base_model().dims()
    }
    fn device(&self) -> &Device {
        self.model.base_model().device()
    }
    fn forward_with_cache(&self, inputs: &Inputs, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.model
            .forward_mixed_with_cache(inputs, cache, &self.names)
    }
}
