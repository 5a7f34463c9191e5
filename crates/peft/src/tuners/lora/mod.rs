//! LoRA (Hu et al., 2021) as PEFT implements it: config, layer math, and attaching it to a model.

pub mod config;
pub mod conv;
pub mod convert;
pub mod dora;
pub mod gguf;
pub mod init;
pub mod layer;
pub mod model;
pub mod sd_formats;
pub mod weighted;

pub use config::{Bias, InitLoraWeights, InitMethod, LoraConfig};
pub use conv::{DoraConv2d, LoraConv2d};
pub use dora::{DoraEmbedding, DoraLinear};
pub use layer::{LoraEmbedding, LoraLinear};
pub use model::LoraModelExt;

use rand::SeedableRng;

use crate::layers::ModuleMut;
use crate::models::Model;
use crate::tuners::inject::{fix_fan_in_fan_out, inject_matching, unsupported};
use crate::tuners::targets::{pattern_value, ModuleSpec, TargetMatcher};
use crate::tuners::{BaseFields, InjectContext, Injected, MethodKind, TunerConfig};
use crate::{Error, Result};

/// PEFT's default LoRA targets per `model_type`, used when `target_modules` is not given.
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "bert" | "roberta" | "xlm-roberta" => &["query", "value"],
        "t5" | "mt5" => &["q", "v"],
        "gpt2" => &["c_attn"],
        "llama" | "mistral" | "qwen2" | "opt" | "bart" => &["q_proj", "v_proj"],
        _ => return None,
    })
}

/// Resolves `target_modules` the way PEFT does before injection: the per-architecture default
/// when absent, and `all-linear` expanded to the full names of every linear layer except the
/// output head. The config is updated so that it is saved in resolved form, as PEFT saves it.
pub fn resolve_targets(model: &dyn Model, config: &mut LoraConfig) -> Result<ModuleSpec> {
    crate::tuners::inject::resolve_targets(
        model,
        &mut config.target_modules,
        default_target_modules,
    )
}

impl TunerConfig for LoraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }
    fn tuner_name(&self) -> &'static str {
        "LoraModel"
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
    fn to_adapter_json(&self) -> serde_json::Value {
        LoraConfig::to_adapter_json(self)
    }
    fn bias(&self) -> crate::tuners::Bias {
        self.bias.into()
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        crate::tuners::config::ConfigFields::validate(self)?;
        Ok(Injected::layers(inject(
            model,
            ctx.adapter_name,
            self,
            ctx.modules_to_save,
            ctx.seed,
        )?))
    }
}

/// Attaches adapter `name` to every matching layer. Returns the names of the adapted modules.
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut LoraConfig,
    modules_to_save: &[String],
    seed: u64,
) -> Result<Vec<String>> {
    let targets = resolve_targets(model, config)?;
    let matcher = TargetMatcher::new(
        &targets,
        config.exclude_modules.as_ref(),
        modules_to_save,
        config.layers_to_transform.as_ref(),
        config.layers_pattern.as_ref(),
    )?;
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    inject_matching(model, &targets, &matcher, |key, module| {
        let r = pattern_value(&config.rank_pattern, key, |v| {
            v.as_u64().map(|x| x as usize)
        })?
        .unwrap_or(config.r);
        let alpha =
            pattern_value(&config.alpha_pattern, key, |v| v.as_f64())?.unwrap_or(config.lora_alpha);
        if r == 0 {
            return Err(Error::Config(format!("rank for `{key}` must be positive")));
        }
        let scaling = if config.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        match module {
            ModuleMut::Linear(l) => {
                // The layer knows its own layout; like PEFT, correct a config that disagrees
                // (nn.Linear forces false, GPT-2's Conv1D true) and say so.
                fix_fan_in_fan_out(&mut config.fan_in_fan_out, key, l.transposed);
                let mut lora = LoraLinear {
                    dropout: config.lora_dropout,
                    ..LoraLinear::new(
                        l.in_features(),
                        l.out_features(),
                        r,
                        scaling,
                        &config.init_lora_weights,
                        &mut rng,
                        &device,
                    )?
                };
                let method = config.init_lora_weights.method()?;
                if method.mutates_base() {
                    mutate_base(l, key, &mut lora, method, r, scaling, &mut rng)?;
                }
                if config.use_dora {
                    let dora = DoraLinear::new(lora, &l.base()?)?;
                    l.adapters.insert(name, Box::new(dora));
                } else {
                    l.adapters.insert(name, Box::new(lora));
                }
            }
            ModuleMut::Embedding(e) => {
                let lora = LoraEmbedding::new(
                    e.num_embeddings(),
                    e.dim(),
                    r,
                    scaling,
                    &config.init_lora_weights,
                    &mut rng,
                    &device,
                )?;
                if config.use_dora {
                    let dora = DoraEmbedding::new(lora, &e.weight.value())?;
                    e.adapters.insert(name, Box::new(dora));
                } else {
                    e.adapters.insert(name, Box::new(lora));
                }
            }
            ModuleMut::Conv2d(c) => {
                let base = c.base();
                let lora = LoraConv2d {
                    dropout: config.lora_dropout,
                    ..LoraConv2d::new(
                        &base,
                        r,
                        scaling,
                        &config.init_lora_weights,
                        &mut rng,
                        &device,
                    )?
                };
                if config.use_dora {
                    c.adapters
                        .insert(name, Box::new(DoraConv2d::new(lora, &base)?));
                } else {
                    c.adapters.insert(name, Box::new(lora));
                }
            }
            other => {
                return Err(unsupported(
                    "LoRA",
                    key,
                    &other,
                    "linear, embedding and Conv2d layers",
                ))
            }
        }
        Ok(())
    })
}

/// PiSSA / OLoRA: moves the initial adapter out of the base weight of `l`, as PEFT does when the
/// adapter is created (also when a saved adapter is loaded: the trained factors then replace the
/// initial ones, on top of the residual weight).
fn mutate_base(
    l: &mut crate::layers::Linear,
    key: &str,
    lora: &mut LoraLinear,
    method: InitMethod,
    r: usize,
    scaling: f64,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    if l.quant().is_some()
        && matches!(
            method,
            InitMethod::Pissa | InitMethod::PissaNiter(_) | InitMethod::Olora
        )
    {
        return Err(Error::Config(format!(
            "init_lora_weights {method:?} rewrites the base weight of `{key}`, which is quantized; \
             initialise such an adapter on the dense model (PEFT does it there too) or use the \
             default initialisation"
        )));
    }
    let stored = l.weight.base().clone();
    let d = match method {
        InitMethod::Olora if l.transposed => {
            return Err(Error::Config(format!(
                "init_lora_weights = \"olora\" cannot initialise `{key}`: its weight is stored [in, out] \
                 (Conv1D) and PEFT 0.21 takes the QR of the stored weight, which gives factors of the \
                 wrong shape; use \"pissa\" or exclude the module"
            )))
        }
        InitMethod::Olora => init::olora(&stored, r, scaling)?,
        InitMethod::Pissa => init::pissa(&l.base()?.weight_out_in()?, r, scaling)?,
        InitMethod::PissaNiter(n) => init::pissa_niter(&l.base()?.weight_out_in()?, r, scaling, n, rng)?,
        _ => return Ok(()),
    };
    lora.a.set(&d.a)?;
    lora.b.set(&d.b)?;
    let residual = if l.transposed {
        d.residual.t()?.contiguous()?
    } else {
        d.residual
    };
    l.weight.set_base(residual.to_dtype(stored.dtype())?)?;
    Ok(())
}
