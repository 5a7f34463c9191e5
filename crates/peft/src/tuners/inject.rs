//! Attaching an adapter: resolving `target_modules` as PEFT does, and one walk over a model's
//! sites that hands each matching one to the method.

use crate::error::config_err;
use crate::layers::{ModuleMut, ModuleRef};
use crate::models::Model;
use crate::tuners::targets::{ModuleSpec, TargetMatcher};
use crate::{Error, Result};

/// Resolves `target_modules` the way PEFT does before injection: the method's per-architecture
/// default when absent, and `all-linear` expanded to the full names of every linear layer except
/// the output head. The config field is updated, so it is saved in resolved form as PEFT saves it.
pub fn resolve_targets(
    model: &dyn Model,
    target_modules: &mut Option<ModuleSpec>,
    defaults: impl Fn(&str) -> Option<&'static [&'static str]>,
) -> Result<ModuleSpec> {
    let info = model.info();
    let spec = match target_modules {
        Some(t) => t.clone(),
        None => {
            let d = defaults(&info.model_type).ok_or_else(|| {
                Error::Config(format!(
                    "no default target_modules for model_type `{}`; set target_modules",
                    info.model_type
                ))
            })?;
            ModuleSpec::List(d.iter().map(|s| s.to_string()).collect())
        }
    };
    let spec = if spec.is_all_linear() {
        let names = model
            .modules()
            .iter()
            .filter_map(|m| match m {
                ModuleRef::Linear(l) if !info.head.contains(&l.name) => Some(l.name.clone()),
                _ => None,
            })
            .collect();
        ModuleSpec::List(names)
    } else {
        spec
    };
    *target_modules = Some(spec.clone());
    Ok(spec)
}

/// Calls `attach` with every layer of `model` that `matcher` selects (the method attaches its
/// adapter there, or refuses the kind of layer with its own words). Hook points are not layers
/// and are never offered. Returns the names of the layers attached to; matching nothing is an
/// error that lists the layers there are.
pub fn inject_matching(
    model: &mut dyn Model,
    targets: &ModuleSpec,
    matcher: &TargetMatcher,
    mut attach: impl FnMut(&str, ModuleMut<'_>) -> Result<()>,
) -> Result<Vec<String>> {
    let mut adapted = Vec::new();
    let mut available = Vec::new();
    for module in model.modules_mut() {
        let key = module.name().to_string();
        match module {
            ModuleMut::Hook(_) => continue,
            ModuleMut::Linear(_) | ModuleMut::Embedding(_) | ModuleMut::Conv2d(_) => {
                available.push(key.clone())
            }
            ModuleMut::LayerNorm(_) | ModuleMut::GroupNorm(_) | ModuleMut::RmsNorm(_) => {}
        }
        if !matcher.matches(&key) {
            continue;
        }
        attach(&key, module)?;
        adapted.push(key);
    }
    if adapted.is_empty() {
        return Err(Error::NoTargetMatched {
            targets: targets.describe(),
            available: available.join(", "),
        });
    }
    Ok(adapted)
}

/// The error for a target whose kind of module a method cannot adapt.
pub fn unsupported(method: &str, key: &str, module: &ModuleMut<'_>, supported: &str) -> Error {
    let kind = match module {
        ModuleMut::Linear(_) => "a linear layer",
        ModuleMut::Embedding(_) => "an embedding layer",
        ModuleMut::Conv2d(_) => "a Conv2d layer",
        ModuleMut::LayerNorm(_) | ModuleMut::GroupNorm(_) | ModuleMut::RmsNorm(_) => {
            "a normalisation layer"
        }
        ModuleMut::Hook(_) => "a hook point",
    };
    config_err!(
        "target module `{key}` is {kind}; {method} adapts {supported} only (remove it from \
         target_modules)"
    )
}

/// PEFT's correction of `fan_in_fan_out` per layer: nn.Linear forces false, GPT-2's Conv1D true,
/// with a warning.
pub fn fix_fan_in_fan_out(flag: &mut bool, key: &str, transposed: bool) {
    if *flag != transposed {
        tracing::warn!(
            "fan_in_fan_out = {flag} does not fit `{key}`, whose weight is stored {}; setting \
             fan_in_fan_out = {transposed}",
            if transposed { "[in, out]" } else { "[out, in]" },
        );
        *flag = transposed;
    }
}
