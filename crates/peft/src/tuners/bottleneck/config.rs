//! `BnConfig`, AdapterHub's bottleneck-adapter config (`adapters` 1.3.0): its presets, every
//! field with AdapterHub's name and default, and the head config an adapter may bring
//! (AdapterHub's flex heads).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::error::config_err;
use crate::tuners::config::{nearest, BaseFields, Bias, PEFT_VERSION};
use crate::Result;

/// `reduction_factor`: one value for every layer, or per layer (`{"1": 8, "default": 16}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReductionFactor {
    All(f64),
    PerLayer(BTreeMap<String, f64>),
}

impl ReductionFactor {
    /// The factor of layer `layer` (AdapterHub's lookup: the layer's own entry, else `default`).
    pub fn at(&self, layer: usize) -> Result<f64> {
        match self {
            ReductionFactor::All(f) => Ok(*f),
            ReductionFactor::PerLayer(m) => m
                .get(&layer.to_string())
                .or_else(|| m.get("default"))
                .copied()
                .ok_or_else(|| {
                    config_err!(
                        "reduction_factor {m:?} names no factor for layer {layer} and has no \
                         `default`; add one, e.g. {{\"{layer}\": 16, \"default\": 16}}"
                    )
                }),
        }
    }
}

/// `scaling`: a constant, `"learned"` (one trained scalar) or `"channel"` (a trained vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scaling {
    Value(f64),
    Mode(String),
}

/// `residual_before_ln`: `true`, `false` or `"post_add"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResidualBeforeLn {
    Flag(bool),
    Mode(String),
}

/// AdapterHub's prediction head config (`head_config.json`'s `config`): classification and
/// tagging heads on the first token / every token of the base model's last hidden state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "HeadFields")]
pub struct HeadConfig {
    pub head_type: String,
    /// 0 in a `[peft]` table: the class count of the training data.
    pub num_labels: usize,
    pub layers: usize,
    pub activation_function: Option<String>,
    pub use_pooler: bool,
    pub bias: bool,
    pub dropout_prob: Option<f64>,
    pub label2id: Option<Map<String, Value>>,
}

/// A head config as written: what is left out takes the defaults of AdapterHub's
/// `add_<head_type>_head` (a classification head has 2 layers, a tagging head 1, both tanh).
#[derive(Deserialize)]
struct HeadFields {
    head_type: String,
    #[serde(default)]
    num_labels: usize,
    layers: Option<usize>,
    #[serde(default = "tanh")]
    activation_function: Option<String>,
    #[serde(default)]
    use_pooler: bool,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default)]
    dropout_prob: Option<f64>,
    #[serde(default)]
    label2id: Option<Map<String, Value>>,
}

impl From<HeadFields> for HeadConfig {
    fn from(f: HeadFields) -> Self {
        let layers = f.layers.unwrap_or(if f.head_type == "classification" {
            2
        } else {
            1
        });
        Self {
            head_type: f.head_type,
            num_labels: f.num_labels,
            layers,
            activation_function: f.activation_function,
            use_pooler: f.use_pooler,
            bias: f.bias,
            dropout_prob: f.dropout_prob,
            label2id: f.label2id,
        }
    }
}

fn tanh() -> Option<String> {
    Some("tanh".into())
}
fn yes() -> bool {
    true
}

impl HeadConfig {
    /// AdapterHub's `add_classification_head` defaults (2 layers, tanh).
    pub fn classification(num_labels: usize) -> Self {
        Self {
            head_type: "classification".into(),
            num_labels,
            layers: 2,
            activation_function: Some("tanh".into()),
            use_pooler: false,
            bias: true,
            dropout_prob: None,
            label2id: None,
        }
    }

    /// AdapterHub's `add_tagging_head` defaults (1 layer).
    pub fn tagging(num_labels: usize) -> Self {
        Self {
            head_type: "tagging".into(),
            layers: 1,
            ..Self::classification(num_labels)
        }
    }

    /// `head_config.json`'s `config` as AdapterHub's head class holds it (a tagging head has no
    /// `use_pooler` or `bias`).
    pub fn adapterhub_dict(&self) -> Value {
        let mut m = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        if self.head_type == "tagging" {
            m.remove("use_pooler");
            m.remove("bias");
        }
        if self.label2id.is_none() {
            let map: Map<String, Value> = (0..self.num_labels)
                .map(|i| (format!("LABEL_{i}"), Value::from(i)))
                .collect();
            m.insert("label2id".into(), Value::Object(map));
        }
        sorted(m)
    }

    pub fn validate(&self) -> Result<()> {
        if self.head_type == "tagging" && !self.bias {
            return Err(config_err!(
                "a tagging head always has a bias in AdapterHub; set bias = true"
            ));
        }
        if !matches!(self.head_type.as_str(), "classification" | "tagging") {
            return Err(config_err!(
                "head_type `{}` is not supported; supported: classification, tagging",
                self.head_type
            ));
        }
        if self.use_pooler {
            return Err(config_err!(
                "head `use_pooler = true` is not supported (the head reads the base model's last \
                 hidden state); use use_pooler = false"
            ));
        }
        if self.layers == 0 {
            return Err(config_err!("head `layers` must be at least 1"));
        }
        if let Some(p) = self.dropout_prob {
            if !(0.0..1.0).contains(&p) {
                return Err(config_err!(
                    "head `dropout_prob` must be in [0, 1), got {p}"
                ));
            }
        }
        if let Some(a) = &self.activation_function {
            super::layer::Act::parse(a)?;
        }
        Ok(())
    }
}

/// A bottleneck adapter's config: AdapterHub's `BnConfig` fields (with its names), PEFT's base
/// fields, and the head the adapter brings, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    pub mh_adapter: bool,
    pub output_adapter: bool,
    pub reduction_factor: ReductionFactor,
    pub non_linearity: String,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
    pub ln_before: bool,
    pub ln_after: bool,
    pub init_weights: String,
    pub init_weights_seed: Option<u64>,
    pub is_parallel: bool,
    pub scaling: Scaling,
    pub use_gating: bool,
    pub residual_before_ln: ResidualBeforeLn,
    pub adapter_residual_before_ln: bool,
    pub inv_adapter: Option<String>,
    pub inv_adapter_reduction_factor: Option<f64>,
    pub cross_adapter: bool,
    pub leave_out: Vec<usize>,
    pub dropout: f64,
    pub phm_layer: bool,
    pub stochastic_depth: f64,
    /// The PHM fields (`phm_dim`, `phm_rank`, ...): they only matter with `phm_layer`, which is
    /// refused; kept as read and written back.
    pub phm: Map<String, Value>,
    /// A prediction head trained and saved with the adapter (AdapterHub's flex head); the base
    /// model then runs as FEATURE_EXTRACTION.
    pub head: Option<HeadConfig>,
    /// AdapterDrop in training: each step, the adapters of a random number of the lowest layers
    /// (0 to all but the last) are skipped; none at evaluation. Not an AdapterHub config field
    /// (AdapterHub does this with a trainer callback); written only in PEFT's layout.
    pub adapter_drop: bool,
    pub base: BaseFields,
}

/// BnConfig's fields that this crate reads into the struct's own fields.
const FIELDS: &[&str] = &[
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "ln_before",
    "ln_after",
    "init_weights",
    "init_weights_seed",
    "is_parallel",
    "scaling",
    "use_gating",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "inv_adapter",
    "inv_adapter_reduction_factor",
    "cross_adapter",
    "leave_out",
    "dropout",
    "phm_layer",
    "stochastic_depth",
];

/// The PHM fields with BnConfig's defaults.
fn phm_defaults() -> Map<String, Value> {
    serde_json::json!({
        "phm_dim": 4,
        "factorized_phm_W": true,
        "shared_W_phm": false,
        "shared_phm_rule": true,
        "factorized_phm_rule": false,
        "phm_c_init": "normal",
        "phm_init_range": 0.0001,
        "learn_phm": true,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "phm_rank": 1,
        "phm_bias": true
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

/// The bottleneck presets of `ADAPTER_CONFIG_MAP`, old names included.
pub const PRESETS: &[&str] = &[
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "scaled_par_bn",
    "pfeiffer",
    "houlsby",
    "parallel",
    "scaled_parallel",
];

/// AdapterHub presets of other methods, refused by name with the reason.
const OTHER_PRESETS: &[(&str, &str)] = &[
    ("compacter", "PHM layers (phm_layer)"),
    ("compacter++", "PHM layers (phm_layer)"),
    ("seq_bn_inv", "invertible adapters (inv_adapter)"),
    ("double_seq_bn_inv", "invertible adapters (inv_adapter)"),
    ("pfeiffer+inv", "invertible adapters (inv_adapter)"),
    ("houlsby+inv", "invertible adapters (inv_adapter)"),
    ("prefix_tuning", "prefix tuning"),
    ("prefix_tuning_flat", "prefix tuning"),
    ("prompt_tuning", "prompt tuning"),
    ("lora", "AdapterHub's LoRA (use peft_type LORA)"),
    ("ia3", "AdapterHub's IA3 (use peft_type IA3)"),
    ("mam", "MAM (prefix tuning + parallel adapter)"),
    ("unipelt", "UniPELT (prefix tuning + adapter + LoRA)"),
];

impl BottleneckConfig {
    /// A preset by AdapterHub's name (`seq_bn`, `double_seq_bn`, `par_bn`, `scaled_par_bn`, and
    /// the old names `pfeiffer`, `houlsby`, `parallel`, `scaled_parallel`).
    pub fn preset(name: &str) -> Result<Self> {
        let base = Self::bn_defaults();
        Ok(match name {
            "seq_bn" | "pfeiffer" => Self {
                original_ln_before: true,
                output_adapter: true,
                non_linearity: "relu".into(),
                ..base
            },
            "double_seq_bn" | "houlsby" => Self {
                mh_adapter: true,
                output_adapter: true,
                non_linearity: "swish".into(),
                ..base
            },
            "par_bn" | "parallel" | "scaled_par_bn" | "scaled_parallel" => Self {
                output_adapter: true,
                non_linearity: "relu".into(),
                reduction_factor: ReductionFactor::All(2.0),
                init_weights: "mam_adapter".into(),
                is_parallel: true,
                scaling: if name.starts_with("scaled") {
                    Scaling::Mode("learned".into())
                } else {
                    Scaling::Value(4.0)
                },
                ..base
            },
            other => {
                if let Some((_, why)) = OTHER_PRESETS.iter().find(|(n, _)| *n == other) {
                    return Err(config_err!(
                        "AdapterHub config `{other}` needs {why}, which this crate does not \
                         implement; bottleneck presets: {}",
                        PRESETS.join(", ")
                    ));
                }
                return Err(config_err!(
                    "unknown AdapterHub config `{other}`{}; bottleneck presets: {}",
                    nearest(
                        other,
                        &PRESETS.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                    ),
                    PRESETS.join(", ")
                ));
            }
        })
    }

    /// BnConfig's own defaults (before a preset): neither location on, reduction 16, relu.
    fn bn_defaults() -> Self {
        Self {
            mh_adapter: false,
            output_adapter: false,
            reduction_factor: ReductionFactor::All(16.0),
            non_linearity: "relu".into(),
            original_ln_before: false,
            original_ln_after: true,
            ln_before: false,
            ln_after: false,
            init_weights: "bert".into(),
            init_weights_seed: None,
            is_parallel: false,
            scaling: Scaling::Value(1.0),
            use_gating: false,
            residual_before_ln: ResidualBeforeLn::Flag(true),
            adapter_residual_before_ln: false,
            inv_adapter: None,
            inv_adapter_reduction_factor: None,
            cross_adapter: false,
            leave_out: Vec::new(),
            dropout: 0.0,
            phm_layer: false,
            stochastic_depth: 0.0,
            phm: phm_defaults(),
            head: None,
            adapter_drop: false,
            base: BaseFields::default(),
        }
    }

    /// From JSON: our `[peft]` table / `adapter_config.json` (`peft_type = "BOTTLENECK"`, an
    /// optional `config` preset, BnConfig fields overriding it, PEFT's base fields, `head`), or
    /// AdapterHub's `config` dict. `strict`: every key must be known.
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            config_err!("the bottleneck config must be a JSON object / TOML table")
        })?;
        let preset = match obj.get("config") {
            None | Some(Value::Null) => "seq_bn".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(config_err!(
                    "`config` must name an AdapterHub preset ({}), got {other}",
                    PRESETS.join(", ")
                ))
            }
        };
        let mut out = Self::preset(&preset)?;
        let mut fields = match serde_json::to_value(Self::preset(&preset)?.flat()) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let base_keys: Vec<String> = match serde_json::to_value(BaseFields::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let mut base = Map::new();
        let mut known: Vec<String> = FIELDS.iter().map(|s| s.to_string()).collect();
        known.extend(phm_defaults().keys().cloned());
        known.extend(base_keys.iter().cloned());
        known.extend(["config", "head", "architecture", "adapter_drop"].map(String::from));
        for (k, val) in obj {
            match k.as_str() {
                "config" | "peft_type" => {}
                "peft_version" | "runtime_config" if !strict => {}
                "architecture" => {
                    if !val.is_null() && val != "bottleneck" {
                        return Err(config_err!(
                            "AdapterHub architecture {val} is not a bottleneck adapter"
                        ));
                    }
                }
                "adapter_drop" => {
                    out.adapter_drop = val.as_bool().ok_or_else(|| {
                        config_err!("`adapter_drop` must be true or false, got {val}")
                    })?;
                }
                "head" => {
                    out.head = if val.is_null() {
                        None
                    } else {
                        let h: HeadConfig = serde_json::from_value(val.clone())
                            .map_err(|e| config_err!("bottleneck `head`: {e}"))?;
                        h.validate()?;
                        Some(h)
                    }
                }
                _ if FIELDS.contains(&k.as_str()) => {
                    fields.insert(k.clone(), val.clone());
                }
                _ if phm_defaults().contains_key(k) => {
                    out.phm.insert(k.clone(), val.clone());
                }
                _ if base_keys.contains(k) => {
                    base.insert(k.clone(), val.clone());
                }
                _ if strict => {
                    return Err(config_err!(
                        "unknown bottleneck config field `{k}`{}",
                        nearest(k, &known)
                    ))
                }
                _ => tracing::warn!("ignoring unknown bottleneck config field `{k}`"),
            }
        }
        let flat: Flat = serde_json::from_value(Value::Object(fields.clone())).map_err(|e| {
            let bad = fields.iter().find(|(k, v)| {
                let mut one = match serde_json::to_value(Self::bn_defaults().flat()) {
                    Ok(Value::Object(m)) => m,
                    _ => return false,
                };
                one.insert((*k).clone(), (*v).clone());
                serde_json::from_value::<Flat>(Value::Object(one)).is_err()
            });
            match bad {
                Some((k, v)) => config_err!("bottleneck config field `{k}` = {v}: {e}"),
                None => config_err!("bottleneck config: {e}"),
            }
        })?;
        out.set_flat(flat);
        out.base = serde_json::from_value(Value::Object(base))
            .map_err(|e| config_err!("bottleneck config: {e}"))?;
        out.validate()?;
        Ok(out)
    }

    /// Refuses what this crate does not implement, by field name, and AdapterHub's own checks.
    pub fn validate(&self) -> Result<()> {
        if self.phm_layer {
            return Err(config_err!(
                "`phm_layer = true` (Compacter's PHM layers) is not implemented; use phm_layer = false"
            ));
        }
        if let Some(inv) = &self.inv_adapter {
            return Err(config_err!(
                "`inv_adapter = \"{inv}\"` (invertible adapters) is not implemented; leave it null"
            ));
        }
        if self.stochastic_depth != 0.0 {
            return Err(config_err!(
                "`stochastic_depth = {}` (AdapterPlus' drop path) is not implemented; use 0.0",
                self.stochastic_depth
            ));
        }
        if !matches!(
            self.init_weights.as_str(),
            "bert" | "mam_adapter" | "houlsby"
        ) {
            return Err(config_err!(
                "`init_weights = \"{}\"` is unknown; supported: bert, mam_adapter, houlsby",
                self.init_weights
            ));
        }
        if let Scaling::Mode(m) = &self.scaling {
            if m != "learned" && m != "channel" {
                return Err(config_err!(
                    "`scaling = \"{m}\"` is unknown; use a number, \"learned\" or \"channel\""
                ));
            }
        }
        match &self.residual_before_ln {
            ResidualBeforeLn::Mode(m) if m != "post_add" => {
                return Err(config_err!(
                    "`residual_before_ln = \"{m}\"` is unknown; use true, false or \"post_add\""
                ))
            }
            ResidualBeforeLn::Mode(_) if !self.original_ln_before && !self.is_parallel => {
                return Err(config_err!(
                    "`residual_before_ln = \"post_add\"` takes the residual after the block's \
                     residual add, which only happens with original_ln_before = true"
                ))
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config_err!(
                "`dropout` must be in [0, 1), got {}",
                self.dropout
            ));
        }
        match &self.reduction_factor {
            ReductionFactor::All(f) if *f <= 0.0 => {
                return Err(config_err!("`reduction_factor` must be > 0, got {f}"))
            }
            ReductionFactor::PerLayer(m) => {
                if let Some((k, f)) = m.iter().find(|(_, f)| **f <= 0.0) {
                    return Err(config_err!(
                        "`reduction_factor[\"{k}\"]` must be > 0, got {f}"
                    ));
                }
                if let Some(k) = m
                    .keys()
                    .find(|k| *k != "default" && k.parse::<usize>().is_err())
                {
                    return Err(config_err!(
                        "`reduction_factor` key `{k}` is neither a layer index nor `default`"
                    ));
                }
            }
            _ => {}
        }
        super::layer::Act::parse(&self.non_linearity)?;
        if let Some(h) = &self.head {
            h.validate()?;
        }
        Ok(())
    }

    /// The BnConfig dict as AdapterHub writes it in `adapter_config.json`'s `config`.
    pub fn adapterhub_dict(&self) -> Value {
        let mut m = match serde_json::to_value(self.flat()) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        m.extend(self.phm.clone());
        ints(&mut m);
        sorted(m)
    }

    /// `adapter_config.json` in PEFT's layout (`peft_type = "BOTTLENECK"`).
    pub fn peft_json(&self) -> Value {
        let mut m = match self.adapterhub_dict() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Ok(Value::Object(b)) = serde_json::to_value(&self.base) {
            m.extend(b);
        }
        m.insert(
            "head".into(),
            serde_json::to_value(&self.head).unwrap_or(Value::Null),
        );
        m.insert("adapter_drop".into(), self.adapter_drop.into());
        m.insert("peft_type".into(), "BOTTLENECK".into());
        m.insert("peft_version".into(), PEFT_VERSION.into());
        m.insert("inference_mode".into(), true.into());
        sorted(m)
    }

    pub fn bias(&self) -> Bias {
        Bias::None
    }

    fn flat(&self) -> Flat {
        Flat {
            mh_adapter: self.mh_adapter,
            output_adapter: self.output_adapter,
            reduction_factor: self.reduction_factor.clone(),
            non_linearity: self.non_linearity.clone(),
            original_ln_before: self.original_ln_before,
            original_ln_after: self.original_ln_after,
            ln_before: self.ln_before,
            ln_after: self.ln_after,
            init_weights: self.init_weights.clone(),
            init_weights_seed: self.init_weights_seed,
            is_parallel: self.is_parallel,
            scaling: self.scaling.clone(),
            use_gating: self.use_gating,
            residual_before_ln: self.residual_before_ln.clone(),
            adapter_residual_before_ln: self.adapter_residual_before_ln,
            inv_adapter: self.inv_adapter.clone(),
            inv_adapter_reduction_factor: self.inv_adapter_reduction_factor,
            cross_adapter: self.cross_adapter,
            leave_out: self.leave_out.clone(),
            dropout: self.dropout,
            phm_layer: self.phm_layer,
            stochastic_depth: self.stochastic_depth,
        }
    }

    fn set_flat(&mut self, f: Flat) {
        self.mh_adapter = f.mh_adapter;
        self.output_adapter = f.output_adapter;
        self.reduction_factor = f.reduction_factor;
        self.non_linearity = f.non_linearity;
        self.original_ln_before = f.original_ln_before;
        self.original_ln_after = f.original_ln_after;
        self.ln_before = f.ln_before;
        self.ln_after = f.ln_after;
        self.init_weights = f.init_weights;
        self.init_weights_seed = f.init_weights_seed;
        self.is_parallel = f.is_parallel;
        self.scaling = f.scaling;
        self.use_gating = f.use_gating;
        self.residual_before_ln = f.residual_before_ln;
        self.adapter_residual_before_ln = f.adapter_residual_before_ln;
        self.inv_adapter = f.inv_adapter;
        self.inv_adapter_reduction_factor = f.inv_adapter_reduction_factor;
        self.cross_adapter = f.cross_adapter;
        self.leave_out = f.leave_out;
        self.dropout = f.dropout;
        self.phm_layer = f.phm_layer;
        self.stochastic_depth = f.stochastic_depth;
    }
}

impl Default for BottleneckConfig {
    /// AdapterHub's default config, `seq_bn`.
    fn default() -> Self {
        Self::preset("seq_bn").unwrap_or_else(|_| Self::bn_defaults())
    }
}

/// The BnConfig fields alone, for (de)serialising them in one go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flat {
    mh_adapter: bool,
    output_adapter: bool,
    reduction_factor: ReductionFactor,
    non_linearity: String,
    original_ln_before: bool,
    original_ln_after: bool,
    ln_before: bool,
    ln_after: bool,
    init_weights: String,
    init_weights_seed: Option<u64>,
    is_parallel: bool,
    scaling: Scaling,
    use_gating: bool,
    residual_before_ln: ResidualBeforeLn,
    adapter_residual_before_ln: bool,
    inv_adapter: Option<String>,
    inv_adapter_reduction_factor: Option<f64>,
    cross_adapter: bool,
    leave_out: Vec<usize>,
    dropout: f64,
    phm_layer: bool,
    stochastic_depth: f64,
}

/// Integral `reduction_factor`s written as integers, as AdapterHub's presets hold them.
fn ints(m: &mut Map<String, Value>) {
    let int = |v: &mut Value| {
        if let Some(x) = v.as_f64() {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                *v = Value::from(x as i64);
            }
        }
    };
    if let Some(rf) = m.get_mut("reduction_factor") {
        match rf {
            Value::Object(o) => o.values_mut().for_each(int),
            v => int(v),
        }
    }
}

pub(crate) fn sorted(m: Map<String, Value>) -> Value {
    let mut v: Vec<(String, Value)> = m.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(v.into_iter().collect())
}
