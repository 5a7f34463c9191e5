//! PEFT's per-layer and per-model status (`get_layer_status`, `get_model_status`), with each
//! method's own names for its layers and its tuner.

use candle_core::{Device, Var};
use std::collections::{BTreeMap, BTreeSet};

use super::{modules_to_save_root, PeftModel};
use crate::layers::ModuleRef;
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
    /// PEFT's `get_layer_status`: every adapter layer and `modules_to_save` wrapper, in module
    /// order.
    pub fn layer_status(&self) -> Result<Vec<LayerStatus>> {
        // As PEFT, which raises a TypeError: input methods leave the model's layers alone.
        if let Some(e) = self
            .adapters
            .iter()
            .find(|e| e.config.kind() == crate::tuners::MethodKind::Input)
        {
            return Err(Error::Adapter(format!(
                "layer and model status describe adapter layers, and adapter `{}` ({}) has none: \
                 it rewrites the model's inputs (PEFT's get_layer_status / get_model_status \
                 refuse it too); use trainable_parameters_line() or peft_config() instead",
                e.name,
                e.config.peft_type()
            )));
        }
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
            let Some(site) = module.site().filter(|s| !s.adapters().is_empty()) else {
                self.wrapper_status(&module, &all_saved, &trainable, &mut out);
                continue;
            };
            let list = site.adapters();
            let names = list.names();
            let tensors: Vec<(String, Vec<(String, Var)>)> = names
                .iter()
                .filter_map(|n| list.adapter(n).map(|a| (n.clone(), a.tensors())))
                .collect();
            // A layer carries adapters of one method; PEFT names the wrapper class after it.
            let kind = names
                .first()
                .and_then(|n| list.adapter(n))
                .map_or("", |a| a.type_name());
            let (merged, enabled) = (list.merged().to_vec(), !list.is_disabled());
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
            adapter_model_type: self
                .active
                .iter()
                .chain(self.adapters.iter().map(|e| &e.name))
                .find_map(|n| self.entry(n))
                .map_or(String::new(), |e| {
                    e.config.as_dyn().tuner_name().to_string()
                }),
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
