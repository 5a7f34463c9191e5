//! (IA)³ (Liu et al., 2022) as PEFT 0.21 implements it: a learned vector `l` rescales a linear
//! layer's output (`y · l`, bias included), or, for `feedforward_modules`, its input
//! (`W (x ⊙ l) + b`).

pub mod layer;

pub use layer::Ia3Linear;

use rand::SeedableRng;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::config_err;
use crate::layers::ModuleMut;
use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::inject::{fix_fan_in_fan_out, inject_matching, resolve_targets, unsupported};
use crate::tuners::targets::{ModuleSpec, TargetMatcher};
use crate::tuners::{InjectContext, Injected, MethodKind, TunerConfig};
use crate::{Error, Result};

/// `IA3Config`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    pub target_modules: Option<ModuleSpec>,
    pub exclude_modules: Option<ModuleSpec>,
    /// Targets whose *input* is rescaled. A string is a full-match regex; a list entry matches any
    /// module name that ends with it (PEFT's `key.endswith(entry)`, no dot required).
    pub feedforward_modules: Option<ModuleSpec>,
    pub fan_in_fan_out: bool,
    /// `true`: the vectors start at one (the identity); `false`: standard normal.
    pub init_ia3_weights: bool,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            init_ia3_weights: true,
            base: BaseFields::default(),
        }
    }
}

impl ConfigFields for Ia3Config {
    const PEFT_TYPE: &'static str = "IA3";
    const NAME: &'static str = "IA3Config";

    /// PEFT's check: listed `feedforward_modules` must all be listed `target_modules`.
    fn validate(&self) -> Result<()> {
        if let (Some(ModuleSpec::List(ff)), Some(ModuleSpec::List(t))) =
            (&self.feedforward_modules, &self.target_modules)
        {
            if let Some(extra) = ff.iter().find(|f| !t.contains(f)) {
                return Err(config_err!(
                    "`feedforward_modules` should be a subset of `target_modules`: `{extra}` is not in {t:?}"
                ));
            }
        }
        Ok(())
    }
}

impl Ia3Config {
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

impl TunerConfig for Ia3Config {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "IA3Model"
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
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        let modules = inject(model, ctx.adapter_name, self, ctx.modules_to_save, ctx.seed)?;
        Ok(Injected::layers(modules))
    }
}

/// PEFT's default IA3 targets (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`).
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "bert" | "roberta" => &["key", "value", "output.dense"],
        "t5" => &["k", "v", "wo"],
        "mt5" => &["k", "v", "wi_1"],
        "gpt2" => &["c_attn", "mlp.c_proj"],
        "llama" | "mistral" => &["k_proj", "v_proj", "down_proj"],
        "qwen2" => &["q_proj", "v_proj", "down_proj"],
        "opt" => &["q_proj", "k_proj", "fc2"],
        "bart" => &["q_proj", "v_proj", "fc2"],
        _ => return None,
    })
}

/// PEFT's default feed-forward modules (`TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`).
pub fn default_feedforward_modules(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "bert" | "roberta" => &["output.dense"],
        "t5" => &["wo"],
        "mt5" => &[],
        "gpt2" => &["mlp.c_proj"],
        "llama" | "mistral" | "qwen2" => &["down_proj"],
        "opt" | "bart" => &["fc2"],
        _ => return None,
    })
}

/// Attaches IA3 adapter `name` to every matching linear layer; returns the adapted modules.
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut Ia3Config,
    modules_to_save: &[String],
    seed: u64,
) -> Result<Vec<String>> {
    // PEFT checks the subset rule when the config is made, before the defaults are filled in
    // (a default feed-forward module need not be targeted).
    config.validate()?;
    let model_type = model.info().model_type.clone();
    let targets = resolve_targets(model, &mut config.target_modules, default_target_modules)?;
    let feedforward_spec = match &config.feedforward_modules {
        Some(spec) => spec.clone(),
        None => {
            let d = default_feedforward_modules(&model_type).ok_or_else(|| {
                Error::Config(format!(
                    "no default feedforward_modules for model_type `{model_type}`; set feedforward_modules"
                ))
            })?;
            ModuleSpec::List(d.iter().map(|s| s.to_string()).collect())
        }
    };
    config.feedforward_modules = Some(feedforward_spec.clone());
    let feedforward = match &feedforward_spec {
        ModuleSpec::Regex(s) => FeedForward::Regex(
            Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| config_err!("feedforward_modules: invalid regex `{s}`: {e}"))?,
        ),
        ModuleSpec::List(v) => FeedForward::Suffixes(v.clone()),
    };
    let matcher = TargetMatcher::new(
        &targets,
        config.exclude_modules.as_ref(),
        modules_to_save,
        None,
        None,
    )?;
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let init = config.init_ia3_weights;
    let fan_in_fan_out = &mut config.fan_in_fan_out;
    inject_matching(model, &targets, &matcher, |key, module| {
        let l = match module {
            ModuleMut::Linear(l) => l,
            other => return Err(unsupported("IA3", key, &other, "linear layers")),
        };
        fix_fan_in_fan_out(fan_in_fan_out, key, l.transposed);
        let layer = Ia3Linear::new(
            l.in_features(),
            l.out_features(),
            feedforward.matches(key),
            init,
            &mut rng,
            &device,
        )?;
        l.adapters.insert(name, Box::new(layer));
        Ok(())
    })
}

enum FeedForward {
    Regex(Regex),
    Suffixes(Vec<String>),
}

impl FeedForward {
    fn matches(&self, key: &str) -> bool {
        match self {
            FeedForward::Regex(r) => r.is_match(key),
            FeedForward::Suffixes(v) => v.iter().any(|s| key.ends_with(s.as_str())),
        }
    }
}
