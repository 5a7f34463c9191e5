//! `LoraConfig`, with PEFT 0.21's field names, defaults and on-disk form.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::config_err;
use crate::models::TaskType;
use crate::tuners::targets::{ModuleSpec, OneOrMany};
use crate::Result;

/// `bias`: which biases of the base model are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    #[default]
    None,
    All,
    LoraOnly,
}

/// `init_lora_weights`: `true`, `false`, or the name of an initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Bool(bool),
    Method(String),
}

/// An `init_lora_weights` value, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMethod {
    /// `true`: A kaiming-uniform, B zero (embeddings: A zero, B normal).
    Default,
    /// `false`: both factors random, so the adapter changes the output from the start.
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `"pissa"`: the top-r singular triplets of W move into the adapter (full SVD).
    Pissa,
    /// `"pissa_niter_N"`: the same through a randomized SVD with N subspace iterations.
    PissaNiter(usize),
    /// `"olora"`: the first r columns of W's QR decomposition move into the adapter.
    Olora,
}

impl InitMethod {
    /// True for the initialisations that subtract the initial adapter from the base weight.
    pub fn mutates_base(self) -> bool {
        matches!(
            self,
            InitMethod::Pissa | InitMethod::PissaNiter(_) | InitMethod::Olora
        )
    }
}

impl InitLoraWeights {
    /// Parses the value; an unknown name lists the ones this crate implements.
    pub fn method(&self) -> Result<InitMethod> {
        Ok(match self {
            InitLoraWeights::Bool(true) => InitMethod::Default,
            InitLoraWeights::Bool(false) => InitMethod::Random,
            InitLoraWeights::Method(m) => match m.as_str() {
                "gaussian" => InitMethod::Gaussian,
                "pissa" => InitMethod::Pissa,
                "olora" => InitMethod::Olora,
                other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                    Some(Ok(n)) => InitMethod::PissaNiter(n),
                    _ => {
                        return Err(config_err!(
                            "init_lora_weights = \"{m}\" is not available; use true, false, \"gaussian\", \"pissa\", \"pissa_niter_<n>\" or \"olora\""
                        ))
                    }
                },
            },
        })
    }
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Option<ModuleSpec>,
    pub exclude_modules: Option<ModuleSpec>,
    pub fan_in_fan_out: bool,
    pub bias: Bias,
    pub use_rslora: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub init_lora_weights: InitLoraWeights,
    pub layers_to_transform: Option<OneOrMany<usize>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub rank_pattern: Map<String, Value>,
    pub alpha_pattern: Map<String, Value>,
    /// DoRA: a trained per-output magnitude on top of LoRA's direction.
    pub use_dora: bool,
    pub task_type: Option<TaskType>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
    /// PEFT fields this implementation knows but does not act on; they must keep PEFT's default
    /// (checked by [`LoraConfig::validate`]) and are written back unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            fan_in_fan_out: false,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            use_dora: false,
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            other: Map::new(),
        }
    }
}

/// PEFT 0.21's LoraConfig fields that this crate does not implement, with the defaults PEFT
/// writes. A config that sets one of them to anything else is refused rather than silently
/// trained as something it is not.
pub(crate) fn unimplemented_defaults() -> Map<String, Value> {
    let v = json!({
        "alora_invocation_tokens": null,
        "arrow_config": null,
        "auto_mapping": null,
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "kasa_config": null,
        "layer_replication": null,
        "loftq_config": {},
        "lora_bias": false,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "monteclora_config": null,
        "qalora_group_size": 16,
        "target_parameters": null,
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_qalora": false,
        "velora_config": null,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The PEFT format version this crate reads and writes.
pub const PEFT_VERSION: &str = "0.21.2";

impl LoraConfig {
    /// Parses a config strictly: every key must be a LoraConfig field (a TOML `[peft]` table that a
    /// person wrote). Adapter files written by other PEFT versions go through
    /// [`LoraConfig::from_adapter_json`] instead.
    pub fn from_json_strict(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| config_err!("the LoRA config must be a table"))?;
        let known = known_fields();
        for k in obj.keys() {
            if k != "peft_type" && !known.contains(k) {
                let near = crate::tuners::nearest(k, &known);
                return Err(config_err!("unknown LoraConfig field `{k}`{near}"));
            }
        }
        let c: LoraConfig = serde_json::from_value(strip_peft_type(obj))
            .map_err(|e| config_err!("LoraConfig: {e}"))?;
        c.validate()?;
        Ok(c)
    }

    /// Parses `adapter_config.json`: unknown keys (from newer PEFT versions) are dropped with a
    /// warning, as PEFT does.
    pub fn from_adapter_json(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| config_err!("adapter_config.json must hold an object"))?;
        let known = known_fields();
        let mut kept = Map::new();
        for (k, val) in obj {
            if k == "peft_type" || k == "peft_version" || k == "runtime_config" {
                continue;
            }
            if known.contains(k) {
                kept.insert(k.clone(), val.clone());
            } else {
                eprintln!(
                    "warning: ignoring unknown LoraConfig field `{k}` in adapter_config.json"
                );
            }
        }
        let c: LoraConfig = serde_json::from_value(Value::Object(kept))
            .map_err(|e| config_err!("adapter_config.json: {e}"))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(config_err!("`r` must be a positive integer"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(config_err!(
                "`lora_dropout` must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        self.init_lora_weights.method()?;
        let defaults = unimplemented_defaults();
        for (k, v) in &self.other {
            // Informational only (which AutoPeftModel class to rebuild); any value is fine.
            if k == "auto_mapping" {
                continue;
            }
            if let Some(d) = defaults.get(k) {
                let is_default = v == d
                    || (v.is_null()
                        && (d.is_object() || d.is_boolean() && d == &Value::Bool(false)));
                if !is_default {
                    return Err(config_err!("LoraConfig field `{k}` = {v} is not supported by this version of peft (only {d})"));
                }
            }
        }
        for (name, pat) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            for (k, v) in pat {
                if !v.is_number() {
                    return Err(config_err!("{name}[\"{k}\"] must be a number, got {v}"));
                }
            }
        }
        Ok(())
    }

    /// `adapter_config.json` as PEFT writes it: every field, sorted, `inference_mode` true.
    pub fn to_adapter_json(&self) -> Value {
        let mut out = unimplemented_defaults();
        if let Ok(Value::Object(mine)) = serde_json::to_value(self) {
            for (k, v) in mine {
                out.insert(k, v);
            }
        }
        out.insert("peft_type".into(), Value::String("LORA".into()));
        out.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
        out.insert("inference_mode".into(), Value::Bool(true));
        // rank/alpha patterns and lora_alpha are numbers in PEFT; write integral alphas as ints.
        if let Some(a) = out.get_mut("lora_alpha") {
            if let Some(f) = a.as_f64() {
                if f.fract() == 0.0 {
                    *a = Value::from(f as i64);
                }
            }
        }
        let mut sorted: Vec<(String, Value)> = out.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        Value::Object(sorted.into_iter().collect())
    }
}

fn strip_peft_type(obj: &Map<String, Value>) -> Value {
    Value::Object(
        obj.iter()
            .filter(|(k, _)| *k != "peft_type")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

fn known_fields() -> Vec<String> {
    let mut v: Vec<String> = [
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_dora",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(unimplemented_defaults().keys().cloned());
    v
}
