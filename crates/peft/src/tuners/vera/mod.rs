//! VeRA (Kopiczko et al., 2024) as PEFT 0.21 implements it: one pair of frozen random projections
//! `A` `[r, max_in]` and `B` `[max_out, r]` shared by every adapted layer, and per layer two
//! trained vectors: `y += λ_b ⊙ (B[:out] · (λ_d ⊙ (A[:, :in] · dropout(x))))`.
//!
//! PEFT draws the projections with torch's CPU generator seeded by `projection_prng_key`, and,
//! with `save_projection = true` (the default), saves them in the adapter file as
//! `base_model.vera_A` / `base_model.vera_B`; we load those. An adapter created here draws them
//! from our own generator (seeded by the same key) and always saves them. A PEFT adapter saved
//! with `save_projection = false` cannot be reproduced here (it would need torch's generator) and
//! is refused with an explanation.

pub mod layer;

pub use layer::VeraLinear;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::config_err;
use crate::layers::{ModuleMut, ModuleRef};
use crate::models::Model;
use crate::tuners::config::{
    adapter_json, check_prob, parse_config, BaseFields, Bias, ConfigFields,
};
use crate::tuners::inject::{fix_fan_in_fan_out, inject_matching, resolve_targets, unsupported};
use crate::tuners::targets::{ModuleSpec, OneOrMany, TargetMatcher};
use crate::tuners::{
    Existing, InjectContext, Injected, MethodKind, ModelTensor, Tuner, TunerConfig,
};
use crate::{Error, Result};

/// Keys of the shared projections in the adapter file.
pub const VERA_A_KEY: &str = "base_model.vera_A";
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// VeRA's `bias`: `"none"`, `"all"` or `"vera_only"` (biases of the adapted layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VeraBias {
    #[default]
    None,
    All,
    VeraOnly,
}

impl From<VeraBias> for Bias {
    fn from(b: VeraBias) -> Bias {
        match b {
            VeraBias::None => Bias::None,
            VeraBias::All => Bias::All,
            VeraBias::VeraOnly => Bias::AdaptedOnly,
        }
    }
}

/// `VeraConfig`, PEFT's field names and defaults (`r` 256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VeraConfig {
    pub r: usize,
    pub target_modules: Option<ModuleSpec>,
    /// Seed of the shared projections.
    pub projection_prng_key: u64,
    /// Save the projections in the adapter file (required here; see the module docs).
    pub save_projection: bool,
    pub vera_dropout: f64,
    /// Initial value of every `λ_d` entry.
    pub d_initial: f64,
    pub fan_in_fan_out: bool,
    pub bias: VeraBias,
    /// `true`: `λ_b = 0` (the identity at start), `λ_d = d_initial`; `false`: `λ_b = 1`,
    /// `λ_d` standard normal.
    pub init_weights: bool,
    pub layers_to_transform: Option<OneOrMany<usize>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self {
            r: 256,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            fan_in_fan_out: false,
            bias: VeraBias::None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            base: BaseFields::default(),
        }
    }
}

impl ConfigFields for VeraConfig {
    const PEFT_TYPE: &'static str = "VERA";
    const NAME: &'static str = "VeraConfig";

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(config_err!("VeraConfig `r` must be a positive integer"));
        }
        check_prob("vera_dropout", self.vera_dropout)?;
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(config_err!(
                "when `layers_pattern` is specified, `layers_to_transform` must also be specified"
            ));
        }
        Ok(())
    }
}

impl VeraConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    pub fn validate(&self) -> Result<()> {
        ConfigFields::validate(self)
    }

    pub fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
}

impl TunerConfig for VeraConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "VeraModel"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Layer
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
    fn bias(&self) -> Bias {
        self.bias.into()
    }
    /// VeRA adapters on one model share their projections (see [`check_shared_projections`]).
    fn check_new_adapter(&self, _trainable: bool, existing: &[Existing<'_>]) -> Result<()> {
        for e in existing {
            if let Some(old) = (e.config as &dyn std::any::Any).downcast_ref::<VeraConfig>() {
                check_shared_projections(old, self)?;
            }
        }
        Ok(())
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        let (modules, shared) =
            inject(model, ctx.adapter_name, self, ctx.modules_to_save, ctx.seed)?;
        Ok(Injected {
            modules,
            tuner: Box::new(VeraTuner { shared }),
        })
    }
}

/// A VeRA adapter's model-level side: the shared projections, saved and loaded with it, never
/// trained.
pub struct VeraTuner {
    shared: Vec<(String, Var)>,
}

impl Tuner for VeraTuner {
    fn model_tensors(&self) -> Vec<ModelTensor> {
        self.shared
            .iter()
            .map(|(key, var)| ModelTensor {
                key: key.clone(),
                var: var.clone(),
                is_parameter: false,
                frozen: false,
            })
            .collect()
    }
}

/// VeRA adapters on one model share their projections, so a new one must be drawn from the key
/// of those already there, as PEFT requires. (PEFT's other rule, that all or none save their
/// projections, holds by construction: `inject` refuses `save_projection = false`.)
pub(crate) fn check_shared_projections(old: &VeraConfig, new: &VeraConfig) -> Result<()> {
    if old.projection_prng_key != new.projection_prng_key {
        return Err(config_err!(
            "VeRA adapters on one model share their projections: projection_prng_key is {} here \
             but {} in the adapter already loaded; use the same key for every VeRA adapter",
            new.projection_prng_key,
            old.projection_prng_key
        ));
    }
    Ok(())
}

/// PEFT's default VeRA targets (`TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING`: LoRA's, but
/// q/v for phi).
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    crate::tuners::lora::default_target_modules(model_type)
}

/// Attaches VeRA adapter `name`. Returns the adapted modules and the shared projections under
/// their file keys (frozen: they are saved, never trained).
#[allow(clippy::type_complexity)]
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut VeraConfig,
    modules_to_save: &[String],
    seed: u64,
) -> Result<(Vec<String>, Vec<(String, Var)>)> {
    config.validate()?;
    if !config.save_projection {
        return Err(config_err!(
            "VeRA with save_projection = false is not supported: the shared projections vera_A/vera_B \
             would then have to be redrawn from projection_prng_key with torch's random generator, which \
             this implementation does not reproduce. Set save_projection = true (PEFT's default); for an \
             adapter saved by PEFT without its projections, load it in Python and save it again with \
             VeraConfig(save_projection=True)"
        ));
    }
    let targets = resolve_targets(model, &mut config.target_modules, default_target_modules)?;
    let matcher = TargetMatcher::new(
        &targets,
        None,
        modules_to_save,
        config.layers_to_transform.as_ref(),
        config.layers_pattern.as_ref(),
    )?;
    // PEFT's `_find_dim`: the projections cover the largest input and output of any target.
    let (mut max_out, mut max_in) = (0usize, 0usize);
    for m in model.modules() {
        if let ModuleRef::Linear(l) = m {
            if matcher.matches(&l.name) {
                max_out = max_out.max(l.out_features());
                max_in = max_in.max(l.in_features());
            }
        }
    }
    if max_in == 0 {
        // No linear target: let the walk give its error listing the layers there are (or
        // refuse a non-linear target by name).
        inject_matching(model, &targets, &matcher, |key, module| {
            Err(unsupported("VeRA", key, &module, "linear layers"))
        })?;
    }
    let device = model.device().clone();
    let r = config.r;
    let mut proj_rng = rand::rngs::StdRng::seed_from_u64(config.projection_prng_key);
    let vera_a = Var::from_tensor(&kaiming_uniform_gain2(r, max_in, &mut proj_rng, &device)?)?;
    let vera_b = Var::from_tensor(&kaiming_uniform_gain2(max_out, r, &mut proj_rng, &device)?)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (init, d_initial, dropout) = (config.init_weights, config.d_initial, config.vera_dropout);
    let fan_in_fan_out = &mut config.fan_in_fan_out;
    let adapted = inject_matching(model, &targets, &matcher, |key, module| {
        let l = match module {
            ModuleMut::Linear(l) => l,
            other => return Err(unsupported("VeRA", key, &other, "linear layers")),
        };
        fix_fan_in_fan_out(fan_in_fan_out, key, l.transposed);
        let layer = VeraLinear::new(
            l.in_features(),
            l.out_features(),
            r,
            (vera_a.clone(), vera_b.clone()),
            init,
            d_initial,
            dropout,
            &mut rng,
            &device,
        )?;
        l.adapters.insert(name, Box::new(layer));
        Ok(())
    })?;
    Ok((
        adapted,
        vec![(VERA_A_KEY.into(), vera_a), (VERA_B_KEY.into(), vera_b)],
    ))
}

/// PEFT's `_kaiming_init` for the projections: `U(-b, b)`, `b = √3 · √2 / √fan_in`, with
/// `fan_in = cols`.
fn kaiming_uniform_gain2(
    rows: usize,
    cols: usize,
    rng: &mut rand::rngs::StdRng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let bound = (6.0 / cols as f64).sqrt() as f32;
    let dist = Uniform::new(-bound, bound).map_err(|e| Error::Config(e.to_string()))?;
    let v: Vec<f32> = (0..rows * cols).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}
