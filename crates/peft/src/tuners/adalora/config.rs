//! `AdaLoraConfig`, with PEFT 0.21's field names, defaults and on-disk form. PEFT derives it from
//! `LoraConfig`, so an AdaLoRA `adapter_config.json` carries every LoRA field as well.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::config_err;
use crate::tuners::config::{adapter_json, check_fixed, check_prob, BaseFields, ConfigFields};
use crate::tuners::lora::config::unimplemented_defaults;
use crate::tuners::lora::{Bias, InitLoraWeights};
use crate::tuners::targets::{ModuleSpec, OneOrMany};
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaLoraConfig {
    /// Rank every layer starts with (LoRA's `r` is ignored by AdaLoRA).
    pub init_r: usize,
    /// Average rank per layer once the budget has shrunk.
    pub target_r: usize,
    /// Steps of warm-up before any rank is pruned.
    pub tinit: usize,
    /// Steps at the end with the final ranks fixed.
    pub tfinal: usize,
    /// Interval, in steps, between two budget allocations.
    #[serde(rename = "deltaT")]
    pub delta_t: usize,
    /// EMA coefficient of the sensitivity.
    pub beta1: f64,
    /// EMA coefficient of the uncertainty.
    pub beta2: f64,
    /// Weight of the orthogonality penalty on A and B added to the loss.
    pub orth_reg_weight: f64,
    /// Total training steps; the budget schedule needs it.
    pub total_step: Option<usize>,
    /// Which singular triplets each layer kept (`"<module>.lora_E": [bool; init_r]`), written by
    /// the rank allocator; `null` before any allocation.
    pub rank_pattern: Option<Map<String, Value>>,
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
    pub alpha_pattern: Map<String, Value>,
    #[serde(flatten)]
    pub base: BaseFields,
    /// LoraConfig fields AdaLoRA does not act on; they must keep PEFT's default.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        Self {
            init_r: 12,
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
            rank_pattern: None,
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
            alpha_pattern: Map::new(),
            base: BaseFields::default(),
            other: Map::new(),
        }
    }
}

impl ConfigFields for AdaLoraConfig {
    const PEFT_TYPE: &'static str = "ADALORA";
    const NAME: &'static str = "AdaLoraConfig";
    const INT_FIELDS: &'static [&'static str] = &["lora_alpha"];

    /// LoRA's unimplemented fields, and `use_dora`, which AdaLoRA refuses.
    fn fixed_fields() -> Map<String, Value> {
        let mut m = unimplemented_defaults();
        m.insert("use_dora".into(), json!(false));
        m
    }

    /// PEFT's checks in `AdaLoraConfig.__post_init__` and `RankAllocator.__init__`.
    fn validate(&self) -> Result<()> {
        let total = match self.total_step {
            Some(t) if t > 0 => t,
            _ => {
                return Err(config_err!(
                    "AdaLoRA needs `total_step` > 0 (the number of training steps)"
                ))
            }
        };
        if self.orth_reg_weight < 0.0 {
            return Err(config_err!(
                "`orth_reg_weight` must be >= 0, got {}",
                self.orth_reg_weight
            ));
        }
        if self.tinit + self.tfinal >= total {
            return Err(config_err!(
                "tinit ({}) and tfinal ({}) leave no budgeting phase in total_step = {total}; decrease \
                 tfinal/tinit or increase total_step",
                self.tinit,
                self.tfinal
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(config_err!("`{name}` must be in (0, 1), got {b}"));
            }
        }
        if self.delta_t == 0 {
            return Err(config_err!("`deltaT` must be a positive integer"));
        }
        check_prob("lora_dropout", self.lora_dropout)?;
        if let InitLoraWeights::Method(m) = &self.init_lora_weights {
            return Err(config_err!(
                "AdaLoRA's init_lora_weights must be true or false, got \"{m}\""
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(config_err!("`layers_pattern` needs `layers_to_transform`"));
        }
        check_fixed::<Self>(&self.other)?;
        if let Some(rp) = &self.rank_pattern {
            for (k, v) in rp {
                let ok = v
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_boolean));
                if !ok {
                    return Err(config_err!(
                        "rank_pattern[\"{k}\"] must be a list of booleans"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl AdaLoraConfig {
    /// Parses a config; `strict`: every key must be known (a hand-written table), otherwise
    /// unknown keys are dropped with a warning, as PEFT does.
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

    /// The kept triplets of `module` from `rank_pattern`, if the allocator has run.
    pub fn kept(&self, module: &str) -> Option<Vec<bool>> {
        let rp = self.rank_pattern.as_ref()?;
        let v = rp.get(&format!("{module}.lora_E"))?;
        Some(
            v.as_array()?
                .iter()
                .map(|b| b.as_bool().unwrap_or(false))
                .collect(),
        )
    }
}
