//! LoHa (Hyeon-Woo et al., FedPara; LyCORIS) as PEFT 0.21 implements it on linear layers and
//! convolutions ([`LohaConv2d`]): the
//! update is a Hadamard product of two rank-`r` products,
//! `ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha / r`, added to the layer's output as `x · ΔWᵀ`.

pub mod layer;

pub use layer::{LohaConv2d, LohaLinear};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::lycoris::{self, LycorisFields, Made, Target};
use crate::tuners::{InjectContext, Injected, MethodKind, TunerConfig};
use crate::Result;

/// `LoHaConfig`, PEFT's field names and defaults (`r` 8, `alpha` 8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LohaConfig {
    #[serde(flatten)]
    pub common: LycorisFields,
    /// `true`: W2b starts at zero, so the adapter starts as the identity; `false`: every factor
    /// random (PEFT discourages it).
    pub init_weights: bool,
}

impl Default for LohaConfig {
    fn default() -> Self {
        Self {
            common: LycorisFields::default(),
            init_weights: true,
        }
    }
}

impl ConfigFields for LohaConfig {
    const PEFT_TYPE: &'static str = "LOHA";
    const NAME: &'static str = "LoHaConfig";
    const INT_FIELDS: &'static [&'static str] = &["alpha"];

    fn validate(&self) -> Result<()> {
        self.common.validate()
    }
}

impl LohaConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    pub fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
}

impl TunerConfig for LohaConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "LoHaModel"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Layer
    }
    fn base(&self) -> &BaseFields {
        &self.common.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.common.base
    }
    fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        ConfigFields::validate(self)?;
        let modules = inject(model, ctx.adapter_name, self, ctx.modules_to_save, ctx.seed)?;
        Ok(Injected::layers(modules))
    }
}

/// PEFT's default LoHa targets (`TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING`, a copy of
/// LoRA's).
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    crate::tuners::lora::default_target_modules(model_type)
}

/// Attaches LoHa adapter `name` to every matching linear layer; returns the adapted modules.
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut LohaConfig,
    modules_to_save: &[String],
    seed: u64,
) -> Result<Vec<String>> {
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let init = config.init_weights;
    let (rank_dropout, module_dropout) = (config.common.rank_dropout, config.common.module_dropout);
    let effective = config.common.use_effective_conv2d;
    lycoris::inject(
        model,
        name,
        &mut config.common,
        modules_to_save,
        "LoHa",
        default_target_modules,
        |_, target, r, alpha| match target {
            Target::Linear(l) => {
                let mut layer = LohaLinear::new(
                    l.in_features(),
                    l.out_features(),
                    r,
                    alpha / r as f64,
                    init,
                    &mut rng,
                    &device,
                )?;
                layer.dropout.rank_dropout = rank_dropout;
                layer.dropout.module_dropout = module_dropout;
                Ok(Made::Linear(Box::new(layer)))
            }
            Target::Conv2d(c) => {
                let mut layer = LohaConv2d::new(
                    &c.base(),
                    r,
                    alpha / r as f64,
                    init,
                    effective,
                    &mut rng,
                    &device,
                )?;
                layer.dropout.rank_dropout = rank_dropout;
                layer.dropout.module_dropout = module_dropout;
                Ok(Made::Conv2d(Box::new(layer)))
            }
        },
    )
}
