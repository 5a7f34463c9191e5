//! LoRA's operations on a whole model with adapters, as PEFT's `LoraModel` offers them:
//! `add_weighted_adapter` (combining several LoRA adapters into a new one) and saving a PiSSA /
//! OLoRA adapter converted back to a plain LoRA. They reach the model through
//! [`AdapterHost`], so they work on a [`crate::PeftModel`] once [`LoraModelExt`] is in scope.

use candle_core::{Tensor, Var};
use std::path::Path;

use super::convert;
use super::weighted::{
    combine_layer, CombinationType, LayerJob, MaskSource, Matrix, RandomMasks, Source,
    WeightedOptions,
};
use super::{InitLoraWeights, LoraConfig, LoraEmbedding, LoraLinear};
use crate::io::{
    load_safetensors, read_json, save_safetensors, write_atomic,
    ADAPTER_CONFIG_NAME as CONFIG_NAME, ADAPTER_WEIGHTS_NAME as WEIGHTS_NAME,
};
use crate::layers::ModuleRef;
use crate::models::Model;
use crate::tuners::targets::ModuleSpec;
use crate::tuners::{AdapterHost, PeftConfig};
use crate::{Error, Result};

/// LoRA's model-level operations, for any [`AdapterHost`] (a [`crate::PeftModel`]).
pub trait LoraModelExt: AdapterHost {
    /// PEFT's `add_weighted_adapter`: a new, frozen LoRA adapter `name` combining `adapters`
    /// with `weights` (negative weights subtract). DARE's masks are drawn from `opts.seed`.
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        opts: &WeightedOptions,
    ) -> Result<()> {
        let mut masks = RandomMasks::new(opts.seed);
        self.add_weighted_adapter_with_masks(adapters, weights, name, opts, &mut masks)
    }

    /// [`PeftModel::add_weighted_adapter`] with DARE's masks from `masks`.
    fn add_weighted_adapter_with_masks(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        opts: &WeightedOptions,
        masks: &mut dyn MaskSource,
    ) -> Result<()> {
        if self.peft_config(name).is_some() {
            return Err(Error::Adapter(format!(
                "an adapter named `{name}` already exists; pick a new name for the combination"
            )));
        }
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(Error::Adapter(format!(
                "add_weighted_adapter needs one weight per adapter; got {} adapters and {} weights",
                adapters.len(),
                weights.len()
            )));
        }
        let mut configs = Vec::new();
        for a in adapters {
            match self.peft_config(a) {
                Some(c) => match c.downcast_ref::<LoraConfig>() {
                    Some(c) => configs.push(c.clone()),
                    None => {
                        return Err(Error::Adapter(format!(
                            "add_weighted_adapter combines LoRA adapters; `{a}` is {}",
                            c.peft_type()
                        )))
                    }
                },
                None => return Err(Error::Adapter(format!("adapter `{a}` does not exist"))),
            }
        }
        for module in self.base_model().modules() {
            for p in module.params() {
                if adapters.iter().filter(|a| p.copy(a).is_some()).count() > 1 {
                    return Err(Error::Adapter(format!(
                        "cannot add weighted adapters if they target the same module with \
                         modules_to_save (`{}`)",
                        module.name()
                    )));
                }
            }
        }
        let mut opts = opts.clone();
        if adapters.len() == 1 {
            opts.combination_type = CombinationType::Linear;
        }
        let ct = opts.combination_type;
        let ranks: Vec<usize> = configs
            .iter()
            .map(|c| {
                c.rank_pattern
                    .values()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .fold(c.r, usize::max)
            })
            .collect();
        use CombinationType as C;
        let new_rank = match ct {
            C::Cat => ranks.iter().sum(),
            ct if ct.is_svd() => opts
                .svd_rank
                .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
            _ => {
                if ranks.iter().any(|r| *r != ranks[0]) {
                    return Err(Error::Adapter(format!(
                        "all adapters must have the same r value when using combination_type {} \
                         (ranks {ranks:?}); use cat or an _svd type",
                        ct.as_str()
                    )));
                }
                ranks[0]
            }
        };
        let targets = union_targets(&configs)?;
        let mut config = configs[0].clone();
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.target_modules = Some(targets);
        config.alpha_pattern.clear();
        config.rank_pattern.clear();
        // Modules to save of the first adapter are already in its config (task heads included).
        self.add_frozen_adapter(name, PeftConfig::new(config))?;
        let filled = fill_weighted(
            self.base_model(),
            adapters,
            weights,
            name,
            &opts,
            new_rank,
            masks,
        );
        if let Err(e) = filled {
            self.delete_adapter(name)?;
            return Err(e);
        }
        Ok(())
    }

    /// Saves adapter `default` (others under `dir/<name>/`) like [`PeftModel::save_pretrained`],
    /// but a PiSSA / OLoRA adapter is first turned back into a plain LoRA of rank 2r that applies
    /// to the *original* base weights (PEFT's `path_initial_model_for_weight_conversion`).
    /// `initial` holds the same adapter saved before training with `init_lora_weights = true`;
    /// like PEFT, its `adapter_config.json` is rewritten with that setting.
    fn save_pretrained_converted(&self, dir: &Path, initial: &Path) -> Result<()> {
        let init_cfg = PeftConfig::from_adapter_json(&read_json(&initial.join(CONFIG_NAME))?)?;
        let Some(init_cfg) = init_cfg.downcast_ref::<LoraConfig>() else {
            return Err(Error::Adapter(format!(
                "{}: the initial adapter is not a LoRA adapter",
                initial.display()
            )));
        };
        convert::check_initial_config(init_cfg)?;
        let init_weights =
            load_safetensors(&initial.join(WEIGHTS_NAME), self.base_model().device())?;
        for name in self.adapter_names() {
            let c = self
                .peft_config(name)
                .and_then(|c| c.downcast_ref::<LoraConfig>());
            let Some(c) = c else {
                return Err(Error::Adapter(format!(
                    "adapter `{name}` is not a LoRA adapter; only PiSSA / OLoRA adapters convert"
                )));
            };
            convert::check_convertible(c)?;
            let target = if name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            let state = convert::convert_state_dict(self.adapter_state_dict(name)?, &init_weights)?;
            save_safetensors(&target.join(WEIGHTS_NAME), &state)?;
            let mut initial_cfg = c.clone();
            initial_cfg.init_lora_weights = InitLoraWeights::Bool(true);
            write_json(&initial.join(CONFIG_NAME), &initial_cfg)?;
            write_json(&target.join(CONFIG_NAME), &convert::converted_config(c))?;
        }
        Ok(())
    }
}

impl<T: AdapterHost + ?Sized> LoraModelExt for T {}

/// Sets the factors of the combined adapter `name` in every layer it adapts.
fn fill_weighted(
    model: &dyn Model,
    adapters: &[&str],
    weights: &[f64],
    name: &str,
    opts: &WeightedOptions,
    new_rank: usize,
    masks: &mut dyn MaskSource,
) -> Result<()> {
    for module in model.modules() {
        let mut sources = Vec::new();
        let mut transposed = true;
        let target: (Var, Var) = match &module {
            ModuleRef::Linear(l) => {
                transposed = l.transposed;
                let Some(t) = l.adapters.get(name) else {
                    continue;
                };
                let t = lora_linear(t.as_any(), module.name(), name)?;
                for (a, w) in adapters.iter().zip(weights) {
                    if let Some(s) = l.adapters.get(a) {
                        let s = lora_linear(s.as_any(), module.name(), a)?;
                        sources.push(source(a, *w, s.scaling, &s.a, &s.b)?);
                    }
                }
                (t.a.clone(), t.b.clone())
            }
            ModuleRef::Embedding(e) => {
                let Some(t) = e.adapters.get(name) else {
                    continue;
                };
                let t = lora_embedding(t.as_any(), module.name(), name)?;
                for (a, w) in adapters.iter().zip(weights) {
                    if let Some(s) = e.adapters.get(a) {
                        let s = lora_embedding(s.as_any(), module.name(), a)?;
                        sources.push(source(a, *w, s.scaling, &s.a, &s.b)?);
                    }
                }
                (t.a.clone(), t.b.clone())
            }
            _ => continue,
        };
        let job = LayerJob {
            module: module.name(),
            sources,
            new_rank,
            transposed,
        };
        let (a, b) = combine_layer(&job, opts, masks)?;
        set_matrix(module.name(), &target.0, &a)?;
        set_matrix(module.name(), &target.1, &b)?;
    }
    Ok(())
}

/// PEFT's new `target_modules`: the union of lists, or the regexes joined as alternatives.
fn union_targets(configs: &[crate::tuners::lora::LoraConfig]) -> Result<ModuleSpec> {
    let specs: Vec<&ModuleSpec> = configs
        .iter()
        .map(|c| {
            c.target_modules.as_ref().ok_or_else(|| {
                Error::Adapter("an adapter to combine has no resolved target_modules".into())
            })
        })
        .collect::<Result<_>>()?;
    if specs.iter().all(|s| matches!(s, ModuleSpec::List(_))) {
        let mut all: Vec<String> = Vec::new();
        for s in &specs {
            if let ModuleSpec::List(v) = s {
                for n in v {
                    if !all.contains(n) {
                        all.push(n.clone());
                    }
                }
            }
        }
        return Ok(ModuleSpec::List(all));
    }
    if specs.iter().all(|s| matches!(s, ModuleSpec::Regex(_))) {
        let joined = specs
            .iter()
            .filter_map(|s| match s {
                ModuleSpec::Regex(r) => Some(format!("({r})")),
                ModuleSpec::List(_) => None,
            })
            .collect::<Vec<_>>()
            .join("|");
        return Ok(ModuleSpec::Regex(joined));
    }
    Err(Error::Adapter(
        "all adapter configs should follow the same target modules type; combining list and \
         regex target_modules is not supported"
            .into(),
    ))
}

fn lora_linear<'a>(
    any: &'a dyn std::any::Any,
    module: &str,
    adapter: &str,
) -> Result<&'a LoraLinear> {
    any.downcast_ref::<LoraLinear>().ok_or_else(|| {
        Error::Adapter(format!(
            "add_weighted_adapter combines plain LoRA adapters; `{adapter}` on `{module}` is not one"
        ))
    })
}

fn lora_embedding<'a>(
    any: &'a dyn std::any::Any,
    module: &str,
    adapter: &str,
) -> Result<&'a LoraEmbedding> {
    any.downcast_ref::<LoraEmbedding>().ok_or_else(|| {
        Error::Adapter(format!(
            "add_weighted_adapter combines plain LoRA adapters; `{adapter}` on `{module}` is not one"
        ))
    })
}

fn matrix(v: &Var) -> Result<Matrix> {
    let (r, c) = v.dims2()?;
    let data = v
        .as_tensor()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Matrix::new(r, c, data))
}

fn source(adapter: &str, weight: f64, scaling: f64, a: &Var, b: &Var) -> Result<Source> {
    Ok(Source {
        adapter: adapter.to_string(),
        weight,
        scaling,
        a: matrix(a)?,
        b: matrix(b)?,
    })
}

fn set_matrix(module: &str, var: &Var, m: &Matrix) -> Result<()> {
    if var.dims() != [m.rows, m.cols] {
        return Err(Error::ShapeMismatch {
            name: format!("{module} (weighted adapter)"),
            expected: var.dims().to_vec(),
            found: vec![m.rows, m.cols],
        });
    }
    let t = Tensor::from_vec(m.data.clone(), (m.rows, m.cols), var.device())?;
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

fn write_json(path: &Path, config: &LoraConfig) -> Result<()> {
    let json = serde_json::to_string_pretty(&config.to_adapter_json())
        .map_err(|e| Error::Adapter(e.to_string()))?;
    write_atomic(path, json.as_bytes())
}
