//! What the weight-based tuners share: the config fields every PEFT config has, reading and
//! writing `adapter_config.json`, resolving `target_modules`, and walking a model to attach an
//! adapter to each matching linear layer.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::config_err;
use crate::layers::{Linear, LinearAdapter, ModuleMut, ModuleRef};
use crate::models::{Model, TaskType};
use crate::tuners::lora::config::PEFT_VERSION;
use crate::tuners::targets::{ModuleSpec, TargetMatcher};
use crate::{Error, Result};

/// Fields of PEFT's base `PeftConfig` that every method's config carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BaseFields {
    pub task_type: Option<TaskType>,
    pub modules_to_save: Option<Vec<String>>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
    /// Written by PEFT when `task_type` is null; kept as it is.
    pub auto_mapping: Option<Value>,
}

/// Parses a config of type `T` from JSON. `strict` (a hand-written `[peft]` table): every key must
/// be a field of `T`. Otherwise (`adapter_config.json`): unknown keys, which newer PEFT versions
/// add, are dropped with a warning, as PEFT does. The known fields are the keys `T::default()`
/// serialises to, so the list cannot drift from the struct.
pub(crate) fn parse_config<T>(v: &Value, strict: bool, what: &str) -> Result<T>
where
    T: DeserializeOwned + Serialize + Default,
{
    let obj = v
        .as_object()
        .ok_or_else(|| config_err!("the {what} must be a JSON object / TOML table"))?;
    let known: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let mut kept = Map::new();
    for (k, val) in obj {
        if k == "peft_type" || (!strict && (k == "peft_version" || k == "runtime_config")) {
            continue;
        }
        if known.contains(k) {
            kept.insert(k.clone(), val.clone());
        } else if strict {
            let near = crate::tuners::nearest(k, &known);
            return Err(config_err!("unknown {what} field `{k}`{near}"));
        } else {
            eprintln!("warning: ignoring unknown {what} field `{k}` in adapter_config.json");
        }
    }
    serde_json::from_value(Value::Object(kept.clone())).map_err(|e| {
        // serde does not say which field failed; find it by trying each alone on the defaults.
        let field = kept.iter().find_map(|(k, val)| {
            let mut one = match serde_json::to_value(T::default()) {
                Ok(Value::Object(m)) => m,
                _ => return None,
            };
            one.insert(k.clone(), val.clone());
            serde_json::from_value::<T>(Value::Object(one))
                .is_err()
                .then(|| k.clone())
        });
        match field {
            Some(f) => config_err!("{what} field `{f}` = {}: {e}", kept[&f]),
            None => config_err!("{what}: {e}"),
        }
    })
}

/// `adapter_config.json` as PEFT writes it: every field, sorted, `peft_type`, `peft_version`,
/// `inference_mode` true, and integral values of `int_fields` written as integers (PEFT declares
/// them `int`; we hold them as floats).
pub(crate) fn adapter_json<T: Serialize>(
    config: &T,
    peft_type: &str,
    int_fields: &[&str],
) -> Value {
    let mut out = match serde_json::to_value(config) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    out.insert("peft_type".into(), Value::String(peft_type.into()));
    out.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
    out.insert("inference_mode".into(), Value::Bool(true));
    for f in int_fields {
        if let Some(a) = out.get_mut(*f) {
            if let Some(x) = a.as_f64() {
                if x.fract() == 0.0 {
                    *a = Value::from(x as i64);
                }
            }
        }
    }
    let mut sorted: Vec<(String, Value)> = out.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(sorted.into_iter().collect())
}

/// Checks a probability-like field: `[0, 1)`.
pub(crate) fn check_prob(field: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(config_err!("`{field}` must be in [0, 1), got {p}"));
    }
    Ok(())
}

/// Checks that every value of a `rank_pattern` / `alpha_pattern` is a number.
pub(crate) fn check_patterns(pats: &[(&str, &Map<String, Value>)]) -> Result<()> {
    for (name, pat) in pats {
        for (k, v) in pat.iter() {
            if !v.is_number() {
                return Err(config_err!("{name}[\"{k}\"] must be a number, got {v}"));
            }
        }
    }
    Ok(())
}

/// Resolves `target_modules` the way PEFT does before injection: the method's per-architecture
/// default when absent, and `all-linear` expanded to the full names of every linear layer except
/// the output head. The config field is updated, so it is saved in resolved form as PEFT saves it.
pub fn resolve_targets(
    model: &dyn Model,
    target_modules: &mut Option<ModuleSpec>,
    defaults: impl Fn(&str) -> Option<&'static [&'static str]>,
) -> Result<ModuleSpec> {
    let info = model.info();
    let spec = match target_modules {
        Some(t) => t.clone(),
        None => {
            let d = defaults(&info.model_type).ok_or_else(|| {
                Error::Config(format!(
                    "no default target_modules for model_type `{}`; set target_modules",
                    info.model_type
                ))
            })?;
            ModuleSpec::List(d.iter().map(|s| s.to_string()).collect())
        }
    };
    let spec = if spec.is_all_linear() {
        let names = model
            .modules()
            .iter()
            .filter_map(|m| match m {
                ModuleRef::Linear(l) if !info.head.contains(&l.name) => Some(l.name.clone()),
                _ => None,
            })
            .collect();
        ModuleSpec::List(names)
    } else {
        spec
    };
    *target_modules = Some(spec.clone());
    Ok(spec)
}

/// Calls `make` for every linear layer that `matcher` selects and attaches what it returns as
/// adapter `name`. Targets that are not linear layers are refused (`method` names the tuner in
/// the message). Returns the adapted module names; matching nothing is an error that lists the
/// layers there are.
pub(crate) fn inject_linear(
    model: &mut dyn Model,
    name: &str,
    targets: &ModuleSpec,
    matcher: &TargetMatcher,
    method: &str,
    mut make: impl FnMut(&str, &Linear) -> Result<Box<dyn LinearAdapter>>,
) -> Result<Vec<String>> {
    let mut adapted = Vec::new();
    let mut available = Vec::new();
    for module in model.modules_mut() {
        let key = module.name().to_string();
        if !matches!(module, ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_)) {
            available.push(key.clone());
        }
        if !matcher.matches(&key) {
            continue;
        }
        match module {
            ModuleMut::Linear(l) => {
                let adapter = make(&key, l)?;
                l.adapters.insert(name, adapter);
            }
            ModuleMut::Embedding(_) => {
                return Err(Error::Config(format!(
                    "target module `{key}` is an embedding layer; {method} supports linear layers only \
                     (remove it from target_modules)"
                )))
            }
            ModuleMut::LayerNorm(_) | ModuleMut::RmsNorm(_) => {
                return Err(Error::Config(format!(
                    "target module `{key}` is a normalisation layer; {method} supports linear layers only"
                )))
            }
        }
        adapted.push(key);
    }
    if adapted.is_empty() {
        return Err(Error::NoTargetMatched {
            targets: targets.describe(),
            available: available.join(", "),
        });
    }
    Ok(adapted)
}

/// PEFT's correction of `fan_in_fan_out` per layer: nn.Linear forces false, GPT-2's Conv1D true,
/// with a warning.
pub(crate) fn fix_fan_in_fan_out(flag: &mut bool, key: &str, transposed: bool) {
    if *flag != transposed {
        eprintln!(
            "warning: fan_in_fan_out = {flag} does not fit `{key}`, whose weight is stored {}; setting fan_in_fan_out = {transposed}",
            if transposed { "[in, out]" } else { "[out, in]" },
        );
        *flag = transposed;
    }
}

/// A draw in `[0, 1)` from the thread's dropout generator (seeded by [`crate::ops::seed_dropout`]),
/// for the tuners' rank and module dropout.
pub(crate) fn uniform() -> f64 {
    (crate::ops::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}
