//! LoKr (LyCORIS) as PEFT 0.21 implements it on linear layers: the update is a Kronecker product
//! `ΔW = kron(W1, W2) · alpha / r`, where the `[out, in]` shape is split into
//! `(out_l·out_k, in_m·in_n)` by [`factorization`], and each factor is a full matrix or, when the
//! rank is small against it, a rank-`r` product (`decompose_both` extends that to `W1`).

pub mod layer;

pub use layer::{factorization, LokrConv2d, LokrLinear};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::config_err;
use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::lycoris::{self, LycorisDropout, LycorisFields, Made, Target};
use crate::tuners::{InjectContext, Injected, MethodKind, TunerConfig};
use crate::Result;

/// `init_weights`: `true` (W1 zero: the adapter starts as the identity), `false` (all random) or
/// `"lycoris"` (W2 zero, as the LyCORIS repository does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LokrInit {
    Bool(bool),
    Named(String),
}

/// `LoKrConfig`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LokrConfig {
    #[serde(flatten)]
    pub common: LycorisFields,
    /// Decompose W1 into a rank-`r` product too (W2 always is when `r` is small enough).
    pub decompose_both: bool,
    /// Split each dimension as `(factor, dim / factor)` when it divides; `-1`: as near the square
    /// root as possible.
    pub decompose_factor: i64,
    /// Rescale the rows kept by rank dropout by the inverse of the kept fraction.
    pub rank_dropout_scale: bool,
    pub init_weights: LokrInit,
}

impl Default for LokrConfig {
    fn default() -> Self {
        Self {
            common: LycorisFields::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LokrInit::Bool(true),
        }
    }
}

impl ConfigFields for LokrConfig {
    const PEFT_TYPE: &'static str = "LOKR";
    const NAME: &'static str = "LoKrConfig";
    const INT_FIELDS: &'static [&'static str] = &["alpha"];

    fn validate(&self) -> Result<()> {
        let c = self;
        c.common.validate()?;
        if let LokrInit::Named(s) = &c.init_weights {
            if s != "lycoris" {
                return Err(config_err!(
                    "LoKrConfig init_weights = \"{s}\": use true, false or \"lycoris\""
                ));
            }
        }
        if c.decompose_factor == 0 || c.decompose_factor < -1 {
            return Err(config_err!(
                "LoKrConfig decompose_factor = {}: use -1 (near the square root) or a positive integer",
                c.decompose_factor
            ));
        }
        Ok(())
    }
}

impl LokrConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    pub fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
}

impl TunerConfig for LokrConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "LoKrModel"
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

/// PEFT's default LoKr targets (`TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING`, a copy of
/// LoRA's).
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    crate::tuners::lora::default_target_modules(model_type)
}

/// Attaches LoKr adapter `name` to every matching linear or Conv2d layer; returns the adapted
/// modules.
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut LokrConfig,
    modules_to_save: &[String],
    seed: u64,
) -> Result<Vec<String>> {
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = config.clone();
    lycoris::inject(
        model,
        name,
        &mut config.common,
        modules_to_save,
        "LoKr",
        default_target_modules,
        |_, target, r, alpha| {
            let drop = LycorisDropout {
                rank_dropout: c.common.rank_dropout,
                module_dropout: c.common.module_dropout,
                rank_dropout_scale: c.rank_dropout_scale,
            };
            Ok(match target {
                Target::Linear(l) => {
                    let mut layer = LokrLinear::new(
                        l.in_features(),
                        l.out_features(),
                        r,
                        alpha / r as f64,
                        &c,
                        &mut rng,
                        &device,
                    )?;
                    layer.dropout = drop;
                    Made::Linear(Box::new(layer))
                }
                Target::Conv2d(conv) => {
                    let mut layer =
                        LokrConv2d::new(&conv.base(), r, alpha / r as f64, &c, &mut rng, &device)?;
                    layer.dropout = drop;
                    Made::Conv2d(Box::new(layer))
                }
            })
        },
    )
}
