//! AdaLoRA (Zhang et al., 2023) as PEFT 0.21 implements it: LoRA in SVD form whose ranks are
//! reallocated during training by importance, under a shrinking total budget.
//!
//! The adapter's model-level side ([`AdaLoraTuner`]) holds the rank allocator of a trained
//! adapter: the training loop adds its [`orth_reg_loss`] to the loss and lets it run
//! [`update_and_allocate`] after each optimizer step, through the generic [`Tuner`] hooks.

pub mod allocator;
pub mod config;
pub mod layer;

pub use allocator::{RankAllocator, RankPattern};
pub use config::AdaLoraConfig;
pub use layer::AdaLoraLinear;

use candle_core::Tensor;
use rand::SeedableRng;
use serde_json::Value;

use crate::layers::{ModuleMut, ModuleRef, Modules};
use crate::models::Model;
use crate::tuners::config::BaseFields;
use crate::tuners::inject::{fix_fan_in_fan_out, inject_matching, resolve_targets, unsupported};
use crate::tuners::targets::TargetMatcher;
use crate::tuners::{
    Existing, InjectContext, Injected, MethodKind, PeftConfig, Tuner, TunerConfig,
};
use crate::{Error, Result};

/// PEFT's `TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING` (wider than LoRA's).
pub fn default_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "t5" => &["q", "k", "v", "o", "wi", "wo"],
        "mt5" => &["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "bart" | "opt" => &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "gpt2" => &["c_attn"],
        "llama" | "qwen2" => &["q_proj", "v_proj"],
        "bert" => &["query", "value"],
        "roberta" => &["query", "key", "value", "dense"],
        _ => return None,
    })
}

impl TunerConfig for AdaLoraConfig {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }
    fn tuner_name(&self) -> &'static str {
        "AdaLoraModel"
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
        AdaLoraConfig::to_adapter_json(self)
    }
    fn bias(&self) -> crate::tuners::Bias {
        self.bias.into()
    }
    /// PEFT's AdaLoraModel trains one adapter at a time.
    fn check_new_adapter(&self, trainable: bool, existing: &[Existing<'_>]) -> Result<()> {
        let other_trained = existing
            .iter()
            .any(|e| e.trainable && (e.config as &dyn std::any::Any).is::<AdaLoraConfig>());
        if trainable && other_trained {
            return Err(Error::Adapter(
                "AdaLoRA trains one adapter at a time; load other AdaLoRA adapters for inference \
                 only"
                    .into(),
            ));
        }
        Ok(())
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        crate::tuners::config::ConfigFields::validate(self)?;
        let name = ctx.adapter_name;
        let modules = inject(model, name, self, ctx.modules_to_save, ctx.seed)?;
        let allocator = if ctx.trainable {
            Some(RankAllocator::new(self, name, &layers(&*model, name))?)
        } else {
            None
        };
        Ok(Injected {
            modules,
            tuner: Box::new(AdaLoraTuner { allocator }),
        })
    }
}

/// An AdaLoRA adapter's model-level side: the rank allocator while it is trained.
pub struct AdaLoraTuner {
    allocator: Option<RankAllocator>,
}

impl Tuner for AdaLoraTuner {
    fn regularization_loss(
        &self,
        model: &dyn Model,
        adapter: &str,
        config: &PeftConfig,
    ) -> Result<Option<Tensor>> {
        let Some(c) = config.downcast_ref::<AdaLoraConfig>() else {
            return Ok(None);
        };
        if self.allocator.is_none() || c.orth_reg_weight == 0.0 {
            return Ok(None);
        }
        orth_reg_loss(&layers(model, adapter), c.orth_reg_weight)
    }

    fn after_optimizer_step(
        &mut self,
        model: &dyn Model,
        adapter: &str,
        config: &mut PeftConfig,
        step: usize,
        grads: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Result<()> {
        let (Some(alloc), Some(c)) = (
            self.allocator.as_mut(),
            config.downcast_mut::<AdaLoraConfig>(),
        ) else {
            return Ok(());
        };
        update_and_allocate(alloc, c, &layers(model, adapter), step, grads)
    }

    fn state_dict_to_save(
        &self,
        config: &PeftConfig,
        state: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        match config.downcast_ref::<AdaLoraConfig>() {
            Some(c) => resize_state_dict(c, crate::io::KEY_PREFIX, state),
            None => Ok(state),
        }
    }
}

/// Attaches AdaLoRA adapter `name` to every matching linear layer (rank `init_r`, or what the
/// config's `rank_pattern` kept when a saved adapter is loaded). Returns the adapted modules.
pub fn inject(
    model: &mut dyn Model,
    name: &str,
    config: &mut AdaLoraConfig,
    modules_to_save: &[String],
    seed: u64,
) -> Result<Vec<String>> {
    let targets = resolve_targets(model, &mut config.target_modules, default_target_modules)?;
    let matcher = TargetMatcher::new(
        &targets,
        config.exclude_modules.as_ref(),
        modules_to_save,
        config.layers_to_transform.as_ref(),
        config.layers_pattern.as_ref(),
    )?;
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let init = !matches!(
        config.init_lora_weights,
        crate::tuners::lora::InitLoraWeights::Bool(false)
    );
    inject_matching(model, &targets, &matcher, |key, module| {
        let l = match module {
            ModuleMut::Linear(l) => l,
            other => return Err(unsupported("AdaLoRA", key, &other, "linear layers")),
        };
        fix_fan_in_fan_out(&mut config.fan_in_fan_out, key, l.transposed);
        let r = match config.kept(key) {
            Some(keep) => keep.iter().filter(|k| **k).count(),
            None => config.init_r,
        };
        let layer = AdaLoraLinear {
            dropout: config.lora_dropout,
            ..AdaLoraLinear::new(
                l.in_features(),
                l.out_features(),
                r,
                config.init_r,
                config.lora_alpha,
                init,
                &mut rng,
                &device,
            )?
        };
        l.adapters.insert(name, Box::new(layer));
        Ok(())
    })
}

/// The AdaLoRA layers of adapter `name`, in module order.
pub fn layers<'a>(model: &'a dyn Modules, name: &str) -> Vec<allocator::Layer<'a>> {
    let mut out = Vec::new();
    for m in model.modules() {
        if let ModuleRef::Linear(l) = m {
            if let Some(a) = l
                .adapters
                .get(name)
                .and_then(|a| a.as_any().downcast_ref::<AdaLoraLinear>())
            {
                out.push((l.name.clone(), a));
            }
        }
    }
    out
}

/// `orth_reg_weight · mean over factors of ‖P Pᵀ - I‖_F`, PEFT's addition to the loss.
pub fn orth_reg_loss(layers: &[allocator::Layer<'_>], weight: f64) -> Result<Option<Tensor>> {
    let mut sum: Option<Tensor> = None;
    let mut n = 0usize;
    for (_, l) in layers {
        for t in layer::orth_terms(l)? {
            n += 1;
            if let Some(t) = t {
                sum = Some(match sum {
                    Some(s) => (s + t)?,
                    None => t,
                });
            }
        }
    }
    match sum {
        Some(s) if n > 0 => Ok(Some(((s / n as f64)? * weight)?)),
        _ => Ok(None),
    }
}

/// PEFT's `AdaLoraModel.update_and_allocate(global_step)`: importance update and pruning during
/// the budgeting phase, a final forced pruning at `total_step - tfinal` (recorded as the config's
/// `rank_pattern`), and the final pattern re-applied after it.
pub fn update_and_allocate(
    alloc: &mut RankAllocator,
    config: &mut AdaLoraConfig,
    layers: &[allocator::Layer<'_>],
    step: usize,
    grads: &dyn Fn(&Tensor) -> Option<Tensor>,
) -> Result<()> {
    let end = alloc.total_step() - alloc.tfinal();
    if step < end {
        let (_, pattern) = alloc.update_and_allocate(layers, step, grads, false)?;
        if let Some(p) = pattern {
            config.rank_pattern = Some(to_json(&p));
        }
    } else if step == end {
        let (_, pattern) = alloc.update_and_allocate(layers, step, grads, true)?;
        if let Some(p) = pattern {
            config.rank_pattern = Some(to_json(&p));
        }
        alloc.reset_ipt();
    } else if let Some(p) = config.rank_pattern.as_ref() {
        RankAllocator::mask_using_rank_pattern(layers, &from_json(p))?;
    }
    Ok(())
}

fn to_json(p: &RankPattern) -> serde_json::Map<String, Value> {
    p.iter()
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect()
}

fn from_json(p: &serde_json::Map<String, Value>) -> RankPattern {
    p.iter()
        .map(|(k, v)| {
            let keep = v
                .as_array()
                .map(|a| a.iter().map(|b| b.as_bool().unwrap_or(false)).collect())
                .unwrap_or_default();
            (k.clone(), keep)
        })
        .collect()
}

/// Drops the pruned triplets from a state dict about to be saved (PEFT's
/// `resize_state_dict_by_rank_pattern`): rows of `lora_A` / `lora_E`, columns of `lora_B`.
pub fn resize_state_dict(
    config: &AdaLoraConfig,
    key_prefix: &str,
    state: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(state.len());
    for (k, t) in state {
        let path = k.strip_prefix(key_prefix).unwrap_or(&k);
        let split = ["lora_A", "lora_B", "lora_E"]
            .iter()
            .find_map(|s| path.strip_suffix(&format!(".{s}")).map(|m| (m, *s)));
        let t = match split.and_then(|(m, s)| config.kept(m).map(|keep| (keep, s))) {
            Some((keep, kind)) => {
                let dim = if kind == "lora_B" { 1 } else { 0 };
                if keep.iter().filter(|x| **x).count() == t.dims()[dim] {
                    t
                } else {
                    select(&t, dim, &keep)?
                }
            }
            None => t,
        };
        out.push((k, t));
    }
    Ok(out)
}

fn select(t: &Tensor, dim: usize, keep: &[bool]) -> Result<Tensor> {
    if keep.len() != t.dims()[dim] {
        return Err(Error::Adapter(format!(
            "AdaLoRA: rank_pattern has {} entries for a factor of rank {}",
            keep.len(),
            t.dims()[dim]
        )));
    }
    let idx: Vec<u32> = (0..keep.len() as u32)
        .filter(|&i| keep[i as usize])
        .collect();
    if idx.is_empty() {
        let mut shape = t.dims().to_vec();
        shape[dim] = 0;
        return Ok(Tensor::zeros(shape, t.dtype(), t.device())?);
    }
    let n = idx.len();
    Ok(t.index_select(&Tensor::from_vec(idx, n, t.device())?, dim)?)
}
