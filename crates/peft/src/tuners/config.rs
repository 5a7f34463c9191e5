//! What every method's config shares: PEFT's base `PeftConfig` fields, reading a config from JSON
//! (strictly for a hand-written `[peft]` table, tolerantly for `adapter_config.json`), and writing
//! `adapter_config.json` as PEFT writes it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::config_err;
use crate::models::TaskType;
use crate::Result;

/// The PEFT format version this crate reads and writes.
pub const PEFT_VERSION: &str = "0.21.2";

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

/// Which biases of the base model an adapter trains and saves with itself (each method spells
/// its `bias` field its own way: LoRA's `"lora_only"` is VeRA's `"vera_only"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bias {
    #[default]
    None,
    All,
    /// Only the biases of the layers the adapter wraps.
    AdaptedOnly,
}

/// A method's config as a serde struct with PEFT's field names.
pub trait ConfigFields: Serialize + DeserializeOwned + Default {
    /// `peft_type` in `adapter_config.json`.
    const PEFT_TYPE: &'static str;
    /// The config's class name in PEFT, for messages (`LoraConfig`).
    const NAME: &'static str;
    /// Fields PEFT writes as integers that this crate holds as floats.
    const INT_FIELDS: &'static [&'static str] = &[];

    /// PEFT fields this crate knows but does not act on, with PEFT's defaults. They are accepted
    /// only at those values (see [`check_fixed`]) and written back as they are.
    fn fixed_fields() -> Map<String, Value> {
        Map::new()
    }

    /// PEFT's checks of the config (`__post_init__`).
    fn validate(&self) -> Result<()>;
}

/// Parses a config of type `T` from JSON. `strict` (a hand-written `[peft]` table): every key must
/// be a field of `T`, and a misspelt one is named with the nearest field. Otherwise
/// (`adapter_config.json`): unknown keys, which newer PEFT versions add, are dropped with a
/// warning, as PEFT does. The known fields are the keys `T::default()` serialises to plus
/// [`ConfigFields::fixed_fields`], so the list cannot drift from the struct.
pub fn parse_config<T: ConfigFields>(v: &Value, strict: bool) -> Result<T> {
    let what = T::NAME;
    let obj = v
        .as_object()
        .ok_or_else(|| config_err!("the {what} must be a JSON object / TOML table"))?;
    let mut known: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    known.extend(T::fixed_fields().keys().cloned());
    let mut kept = Map::new();
    for (k, val) in obj {
        if k == "peft_type" || (!strict && (k == "peft_version" || k == "runtime_config")) {
            continue;
        }
        if known.contains(k) {
            kept.insert(k.clone(), val.clone());
        } else if strict {
            let near = nearest(k, &known);
            return Err(config_err!("unknown {what} field `{k}`{near}"));
        } else {
            tracing::warn!("ignoring unknown {what} field `{k}` in adapter_config.json");
        }
    }
    let config: T = serde_json::from_value(Value::Object(kept.clone())).map_err(|e| {
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
    })?;
    config.validate()?;
    Ok(config)
}

/// Checks the fields of [`ConfigFields::fixed_fields`] a config carries (`other`, its flattened
/// map of them): each must hold PEFT's default, so that nothing is silently trained as something
/// it is not.
pub fn check_fixed<T: ConfigFields>(other: &Map<String, Value>) -> Result<()> {
    let defaults = T::fixed_fields();
    for (k, v) in other {
        if let Some(d) = defaults.get(k) {
            let is_default = v == d || (v.is_null() && (d.is_object() || d == &Value::Bool(false)));
            if !is_default {
                return Err(config_err!(
                    "{} field `{k}` = {v} is not supported by this version of peft (only {d})",
                    T::NAME
                ));
            }
        }
    }
    Ok(())
}

/// `adapter_config.json` as PEFT writes it: every field (the fixed ones at their values), sorted,
/// `peft_type`, `peft_version`, `inference_mode` true, and integral values of `INT_FIELDS` written
/// as integers.
pub fn adapter_json<T: ConfigFields>(config: &T) -> Value {
    let mut out = T::fixed_fields();
    if let Ok(Value::Object(mine)) = serde_json::to_value(config) {
        out.extend(mine);
    }
    out.insert("peft_type".into(), Value::String(T::PEFT_TYPE.into()));
    out.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
    out.insert("inference_mode".into(), Value::Bool(true));
    for f in T::INT_FIELDS {
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
pub fn check_prob(field: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(config_err!("`{field}` must be in [0, 1), got {p}"));
    }
    Ok(())
}

/// Checks that every value of a `rank_pattern` / `alpha_pattern` is a number.
pub fn check_patterns(pats: &[(&str, &Map<String, Value>)]) -> Result<()> {
    for (name, pat) in pats {
        for (k, v) in pat.iter() {
            if !v.is_number() {
                return Err(config_err!("{name}[\"{k}\"] must be a number, got {v}"));
            }
        }
    }
    Ok(())
}

/// " (did you mean `x`?)" for the known name closest to `key`, or "" when nothing is close.
pub fn nearest(key: &str, known: &[String]) -> String {
    let best = known.iter().map(|k| (edit_distance(key, k), k)).min();
    match best {
        Some((d, k)) if d <= 3.max(key.len() / 3) => format!(" (did you mean `{k}`?)"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}
