//! `LoraConfig`, with PEFT 0.21's field names, defaults and on-disk form.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::config_err;
use crate::tuners::config::{
    adapter_json, check_fixed, check_patterns, check_prob, BaseFields, ConfigFields,
};
use crate::tuners::targets::{ModuleSpec, OneOrMany};
use crate::Result;

/// `bias`: which biases of the base model are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    #[default]
    None,
    All,
    /// The biases of the layers LoRA wraps.
    LoraOnly,
}

impl From<Bias> for crate::tuners::config::Bias {
    fn from(b: Bias) -> Self {
        match b {
            Bias::None => Self::None,
            Bias::All => Self::All,
            Bias::LoraOnly => Self::AdaptedOnly,
        }
    }
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
    pub init_lora_weights: InitLoraWeights,
    pub layers_to_transform: Option<OneOrMany<usize>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub rank_pattern: Map<String, Value>,
    pub alpha_pattern: Map<String, Value>,
    /// DoRA: a trained per-output magnitude on top of LoRA's direction.
    pub use_dora: bool,
    #[serde(flatten)]
    pub base: BaseFields,
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
            init_lora_weights: InitLoraWeights::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            use_dora: false,
            base: BaseFields::default(),
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

impl ConfigFields for LoraConfig {
    const PEFT_TYPE: &'static str = "LORA";
    const NAME: &'static str = "LoraConfig";
    // PEFT declares `lora_alpha` an int.
    const INT_FIELDS: &'static [&'static str] = &["lora_alpha"];

    fn fixed_fields() -> Map<String, Value> {
        unimplemented_defaults()
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(config_err!("`r` must be a positive integer"));
        }
        check_prob("lora_dropout", self.lora_dropout)?;
        self.init_lora_weights.method()?;
        check_fixed::<Self>(&self.other)?;
        check_patterns(&[
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ])?;
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(config_err!(
                "when `layers_pattern` is specified, `layers_to_transform` must also be specified"
            ));
        }
        Ok(())
    }
}

impl LoraConfig {
    /// Parses a config; `strict` (a hand-written `[peft]` table): every key must be a LoraConfig
    /// field. Otherwise (`adapter_config.json` of any PEFT version) unknown keys are dropped with a
    /// warning, as PEFT does.
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        crate::tuners::config::parse_config(v, strict)
    }

    pub fn validate(&self) -> Result<()> {
        ConfigFields::validate(self)
    }

    /// `adapter_config.json` as PEFT writes it: every field, sorted, `inference_mode` true.
    pub fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
}
