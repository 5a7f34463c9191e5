//! LoHa (Hyeon-Woo et al., FedPara; LyCORIS) as PEFT 0.21 implements it on linear layers: the
//! update is a Hadamard product of two rank-`r` products,
//! `ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha / r`, added to the layer's output as `x · ΔWᵀ`.

pub mod layer;

pub use layer::LohaLinear;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::Model;
use crate::tuners::common::{adapter_json, parse_config};
use crate::tuners::lycoris::{self, LycorisFields};
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

impl LohaConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        let c: Self = parse_config(v, strict, "LoHaConfig")?;
        c.common.validate()?;
        Ok(c)
    }

    pub fn to_adapter_json(&self) -> Value {
        adapter_json(self, "LOHA", &["alpha"])
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
    lycoris::inject(
        model,
        name,
        &mut config.common,
        modules_to_save,
        "LoHa",
        default_target_modules,
        |_, l, r, alpha| {
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
            Ok(Box::new(layer))
        },
    )
}
