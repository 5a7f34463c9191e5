//! Bottleneck adapters, fusions and heads in AdapterHub's layout, both ways.
//!
//! Reading: an adapter directory (`adapter_config.json` with `config`, `hidden_size`,
//! `model_class`, `model_name`, `model_type`, `name`, `version`; `adapter.safetensors` or
//! `pytorch_adapter.bin`; optionally a head, `head_config.json` + `model_head.safetensors` /
//! `pytorch_model_head.bin`) or a fusion directory (`adapter_fusion_config.json` with
//! `adapter_names` + `model_adapter_fusion.safetensors` / `pytorch_model_adapter_fusion.bin`,
//! optionally a head) becomes a [`PeftConfig`] and the tensors under the keys
//! `PeftModel::adapter_state_dict` uses. Keys such as
//! `bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight` are matched to the
//! model's hook points whatever the base-model prefix (`bert.`, `transformer.`, none), as
//! AdapterHub's loader does.
//!
//! Writing ([`AdapterHubExt::save_adapterhub`]): the same files, weights as safetensors (load
//! them in Python with `load_adapter(dir, use_safetensors=True)`).

use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

use super::config::{BottleneckConfig, HeadConfig};
use crate::io::adapterhub::{self, ADAPTER, FUSION, HEAD, VERSION};
use crate::io::KEY_PREFIX;
use crate::layers::ModuleRef;
use crate::models::{Model, TaskType};
use crate::tuners::fusion::FusionConfig;
use crate::tuners::{AdapterHost, PeftConfig};
use crate::{Error, Result};

/// The key prefix of a head's tensors in `adapter_state_dict` (`head.1.weight`, ...).
pub const HEAD_KEY: &str = "head.";

fn hook_points(model: &dyn Model) -> Vec<String> {
    model
        .modules()
        .into_iter()
        .filter_map(|m| match m {
            ModuleRef::Hook(h) => Some(h.name.clone()),
            _ => None,
        })
        .collect()
}

/// The model's hook point that AdapterHub's module path `path` names, whatever prefix either
/// side carries.
fn point_for<'a>(path: &str, points: &'a [String]) -> Option<&'a String> {
    points.iter().find(|p| *p == path).or_else(|| {
        points
            .iter()
            .find(|p| p.ends_with(&format!(".{path}")) || path.ends_with(&format!(".{p}")))
    })
}

/// Splits `<path>.<marker><name>.<suffix>` at the marker (`adapters.`, `adapter_fusion_layer.`).
fn split_key<'a>(key: &'a str, marker: &str, name: &str) -> Option<(&'a str, &'a str)> {
    let needle = format!("{marker}{name}.");
    let i = key.find(&needle)?;
    let path = key[..i].strip_suffix('.').unwrap_or(&key[..i]);
    Some((path, &key[i + needle.len()..]))
}

fn check_hidden(json: &Value, model: &dyn Model, what: &Path) -> Result<()> {
    let hidden = model.dims().hidden_size;
    if let Some(h) = json.get("hidden_size").and_then(|v| v.as_u64()) {
        if h as usize != hidden {
            return Err(Error::Adapter(format!(
                "{} was saved for hidden size {h}, the model has {hidden}: it belongs to another model",
                what.display()
            )));
        }
    }
    if let (Some(t), mt) = (
        json.get("model_type").and_then(|v| v.as_str()),
        &model.info().model_type,
    ) {
        if t != mt {
            tracing::warn!(
                "{} was saved for model_type `{t}`, the model is `{mt}`",
                what.display()
            );
        }
    }
    Ok(())
}

/// The head saved beside an adapter or fusion, as a config and tensors keyed `head.<...>`.
fn read_head(
    dir: &Path,
    model: &dyn Model,
) -> Result<Option<(HeadConfig, HashMap<String, Tensor>)>> {
    let Some(saved) = adapterhub::read(dir, HEAD, model.device())? else {
        return Ok(None);
    };
    let path = dir.join(HEAD.config);
    check_hidden(&saved.json, model, &path)?;
    let config = saved.json.get("config").cloned().unwrap_or(Value::Null);
    if config.is_null() {
        // A static head: the model's own head module (`lm_head`, `classifier`), saved as it is.
        // Nothing to load when it is the base model's; a trained one is refused by name.
        let modules = model.modules();
        let params: Vec<&crate::layers::Param> = modules.iter().flat_map(|m| m.params()).collect();
        for (k, t) in &saved.tensors {
            let named = params.iter().find(|p| {
                p.name == *k
                    || p.name.ends_with(&format!(".{k}"))
                    || k.ends_with(&format!(".{}", p.name))
            });
            let equal = |p: &&crate::layers::Param| -> Result<bool> {
                if p.base().dims() != t.dims() {
                    return Ok(false);
                }
                let d = (p.base().to_dtype(candle_core::DType::F32)?
                    - t.to_dtype(candle_core::DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
                Ok(d == 0.0)
            };
            let same = match named {
                Some(p) => equal(p)?,
                // A head tied to the input embeddings has no parameter of its own here.
                None => params
                    .iter()
                    .map(&equal)
                    .collect::<Result<Vec<_>>>()?
                    .contains(&true),
            };
            if !same {
                return Err(Error::Adapter(format!(
                    "{}: the static head tensor `{k}` (model_class {}) is not the base model's; a \
                     trained static head is not loaded from AdapterHub's layout (save the adapter \
                     from an AutoAdapterModel with a flex head, or train the head as \
                     modules_to_save in PEFT's layout)",
                    path.display(),
                    saved.json.get("model_class").unwrap_or(&Value::Null)
                )));
            }
        }
        tracing::debug!(
            "{}: static head equal to the base model's; nothing to load",
            path.display()
        );
        return Ok(None);
    }
    let head: HeadConfig = serde_json::from_value(config)
        .map_err(|e| Error::Config(format!("{}: head config: {e}", path.display())))?;
    head.validate()?;
    let name = saved
        .json
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let prefix = format!("heads.{name}.");
    let mut out = HashMap::new();
    for (k, t) in saved.tensors {
        let rest = k.strip_prefix(&prefix).ok_or_else(|| {
            Error::Adapter(format!(
                "{}: tensor `{k}` is not part of head `{name}`",
                dir.join(HEAD.bin).display()
            ))
        })?;
        out.insert(format!("{HEAD_KEY}{rest}"), t);
    }
    Ok(Some((head, out)))
}

fn task_of(head: &HeadConfig) -> TaskType {
    if head.head_type == "tagging" {
        TaskType::TokenCls
    } else {
        TaskType::SeqCls
    }
}

/// Reads an AdapterHub adapter or fusion directory for `model`.
pub fn read_dir(
    dir: &Path,
    model: &dyn Model,
    _name: &str,
) -> Result<(PeftConfig, HashMap<String, Tensor>)> {
    let points = hook_points(model);
    if let Some(saved) = adapterhub::read(dir, FUSION, model.device())? {
        let path = dir.join(FUSION.config);
        check_hidden(&saved.json, model, &path)?;
        let mut config =
            FusionConfig::from_json(saved.json.get("config").unwrap_or(&Value::Null), false)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.adapter_names = saved
            .json
            .get("adapter_names")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| Error::Config(format!("{}: no `adapter_names`", path.display())))?;
        let fusion_name = saved
            .json
            .get("name")
            .and_then(|v| v.as_str())
            .map(String::from)
            .unwrap_or_else(|| config.adapter_names.join(","));
        let mut out = HashMap::new();
        for (k, t) in saved.tensors {
            let (p, suffix) = split_key(&k, "adapter_fusion_layer.", &fusion_name)
                .ok_or_else(|| bad_key(dir, &k, &fusion_name))?;
            let point = point_for(p, &points).ok_or_else(|| no_point(dir, &k))?;
            out.insert(format!("{KEY_PREFIX}{point}.{suffix}"), t);
        }
        if let Some((head, tensors)) = read_head(dir, model)? {
            config.base.task_type = Some(task_of(&head));
            config.head = Some(head);
            out.extend(tensors);
        }
        return Ok((PeftConfig::new(config), out));
    }
    let saved = adapterhub::read(dir, ADAPTER, model.device())?.ok_or_else(|| {
        Error::Adapter(format!(
            "{}: no adapter_config.json or adapter_fusion_config.json",
            dir.display()
        ))
    })?;
    let path = dir.join(ADAPTER.config);
    check_hidden(&saved.json, model, &path)?;
    let inner = match saved.json.get("config") {
        Some(Value::String(preset)) => json!({ "config": preset }),
        Some(v) => v.clone(),
        None => return Err(Error::Config(format!("{}: no `config`", path.display()))),
    };
    let mut config = BottleneckConfig::from_json(&inner, false)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let saved_name = saved
        .json
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Config(format!("{}: no `name`", path.display())))?
        .to_string();
    let mut out = HashMap::new();
    let mut aliases = Vec::new();
    for (k, t) in saved.tensors {
        let (p, suffix) =
            split_key(&k, "adapters.", &saved_name).ok_or_else(|| bad_key(dir, &k, &saved_name))?;
        let point = point_for(p, &points).ok_or_else(|| no_point(dir, &k))?;
        let key = format!("{KEY_PREFIX}{point}.{suffix}");
        // With ln_before, AdapterHub saves the LayerNorm twice: as `adapter_norm_before` and as
        // the first module of `adapter_down`.
        if config.ln_before && suffix.starts_with("adapter_down.0.") {
            aliases.push(key);
            continue;
        }
        out.insert(key, t);
    }
    for a in aliases {
        let canonical = a.replace("adapter_down.0.", "adapter_norm_before.");
        if !out.contains_key(&canonical) {
            return Err(Error::Adapter(format!(
                "{}: `{a}` without its `adapter_norm_before` twin",
                dir.display()
            )));
        }
    }
    if let Some((head, tensors)) = read_head(dir, model)? {
        config.base.task_type = Some(task_of(&head));
        config.head = Some(head);
        out.extend(tensors);
    }
    Ok((PeftConfig::new(config), out))
}

/// The head the base model runs with under an AdapterHub adapter: FEATURE_EXTRACTION when a
/// head is saved with it, else what its `model_class` says (`BertModel` → FEATURE_EXTRACTION,
/// `GPT2LMHeadModel` → CAUSAL_LM, ...).
pub fn base_task(dir: &Path) -> Result<Option<TaskType>> {
    let head = dir.join(HEAD.config);
    if head.exists() && !crate::io::read_json(&head)?["config"].is_null() {
        return Ok(Some(TaskType::FeatureExtraction));
    }
    let json = match crate::io::read_json(&dir.join(FUSION.config)) {
        Ok(j) => j,
        Err(_) => crate::io::read_json(&dir.join(ADAPTER.config))?,
    };
    let class = json
        .get("model_class")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let class = class.replace("AdapterModel", "Model");
    Ok(crate::models::task_from_architectures(
        &json!({ "architectures": [class] }),
    ))
}

fn bad_key(dir: &Path, key: &str, name: &str) -> Error {
    Error::Adapter(format!(
        "{}: tensor `{key}` does not belong to `{name}` (the `name` in its config)",
        dir.display()
    ))
}

fn no_point(dir: &Path, key: &str) -> Error {
    Error::Adapter(format!(
        "{}: tensor `{key}` sits at a module this model does not have",
        dir.display()
    ))
}

/// transformers' `base_model_prefix` of a `model_type`. AdapterHub's fusion loader places keys
/// that carry it in any model (a bare base model strips it) but keys without it only in a bare
/// base model, so we always write it.
fn base_model_prefix(model_type: &str) -> &str {
    match model_type {
        "gpt2" | "t5" | "mt5" => "transformer",
        "llama" | "mistral" | "qwen2" | "opt" => "model",
        "xlm-roberta" => "roberta",
        other => other,
    }
}

/// AdapterHub's flex-head model class for a `model_type` (what its head loader expects).
fn adapter_model_class(model_type: &str) -> String {
    let family = match model_type {
        "bert" => "Bert",
        "roberta" => "Roberta",
        "xlm-roberta" => "XLMRoberta",
        "gpt2" => "GPT2",
        "llama" => "Llama",
        "mistral" => "Mistral",
        "t5" => "T5",
        "mt5" => "MT5",
        other => other,
    };
    format!("{family}AdapterModel")
}

/// Saving an adapter or fusion of a model in AdapterHub's layout.
pub trait AdapterHubExt: AdapterHost {
    /// Writes adapter `name` (a bottleneck adapter or a fusion, with its head if it has one)
    /// into `dir` as AdapterHub's `save_adapter` / `save_adapter_fusion` would, weights as
    /// safetensors.
    fn save_adapterhub(&self, name: &str, dir: &Path) -> Result<()> {
        let config = self
            .peft_config(name)
            .ok_or_else(|| Error::Adapter(format!("no adapter named `{name}`")))?;
        let model = self.base_model();
        let info = model.info();
        let hidden = model.dims().hidden_size;
        let state = self.adapter_state_dict(name)?;
        let points = hook_points(model);
        let meta = |config: Value, name: &str| {
            json!({
                "config": config,
                "hidden_size": hidden,
                "model_class": info.architecture,
                "model_name": info.dir.display().to_string(),
                "model_type": info.model_type,
                "name": name,
                "version": VERSION,
            })
        };
        let (head, pair, json, marker, hub_name) =
            if let Some(c) = config.downcast_ref::<BottleneckConfig>() {
                (
                    c.head.clone(),
                    ADAPTER,
                    meta(c.adapterhub_dict(), name),
                    "adapters",
                    name.to_string(),
                )
            } else if let Some(c) = config.downcast_ref::<FusionConfig>() {
                let fusion = c.adapter_names.join(",");
                let mut j = meta(c.adapterhub_dict(), &fusion);
                j["adapter_names"] = json!(c.adapter_names);
                (c.head.clone(), FUSION, j, "adapter_fusion_layer", fusion)
            } else {
                return Err(Error::Adapter(format!(
                    "adapter `{name}` is a {} adapter; AdapterHub's layout holds bottleneck \
                     adapters and fusions (save it with save_pretrained)",
                    config.peft_type()
                )));
            };
        let ln_before = config
            .downcast_ref::<BottleneckConfig>()
            .is_some_and(|c| c.ln_before);
        let mut tensors = Vec::new();
        let mut head_tensors = Vec::new();
        for (k, t) in state {
            if let Some(rest) = k.strip_prefix(HEAD_KEY) {
                head_tensors.push((format!("heads.{hub_name}.{rest}"), t));
                continue;
            }
            let path = k.strip_prefix(KEY_PREFIX).unwrap_or(&k);
            let (point, suffix) = split_point(path, &points)?;
            let prefix = base_model_prefix(&info.model_type);
            let point = if point.starts_with(&format!("{prefix}.")) {
                point.to_string()
            } else {
                format!("{prefix}.{point}")
            };
            if ln_before && suffix.starts_with("adapter_norm_before.") {
                let twin = suffix.replace("adapter_norm_before.", "adapter_down.0.");
                tensors.push((format!("{point}.{marker}.{hub_name}.{twin}"), t.clone()));
            }
            tensors.push((format!("{point}.{marker}.{hub_name}.{suffix}"), t));
        }
        adapterhub::write(dir, pair, &json, &tensors)?;
        if let Some(h) = head {
            let mut head_json = meta(h.adapterhub_dict(), &hub_name);
            head_json["model_class"] = adapter_model_class(&info.model_type).into();
            adapterhub::write(dir, HEAD, &head_json, &head_tensors)?;
        }
        Ok(())
    }
}

impl<T: AdapterHost + ?Sized> AdapterHubExt for T {}

/// `encoder.layer.0.output.adapter_up.weight` → (`encoder.layer.0.output`, `adapter_up.weight`):
/// the longest hook point the key starts with.
fn split_point<'a>(path: &'a str, points: &[String]) -> Result<(&'a str, &'a str)> {
    points
        .iter()
        .filter(|p| {
            path.len() > p.len() && path.starts_with(p.as_str()) && path.as_bytes()[p.len()] == b'.'
        })
        .max_by_key(|p| p.len())
        .map(|p| (&path[..p.len()], &path[p.len() + 1..]))
        .ok_or_else(|| Error::Adapter(format!("adapter tensor `{path}` is at no hook point")))
}
