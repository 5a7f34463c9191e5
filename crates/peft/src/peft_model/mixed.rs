//! Mixed batches: each row of one batch through its own adapter (PEFT's `adapter_names`), in
//! forward passes and in generation.

use candle_core::{Device, Tensor};
use std::collections::BTreeSet;

use super::PeftModel;
use crate::generation::Generate;
use crate::layers::mixed::{self, BASE};
use crate::models::{Cache, Inputs, ModelDims};
use crate::tuners::MethodKind;
use crate::{Error, Result};

impl PeftModel {
    /// Checks a mixed batch as PEFT does before running it.
    fn check_mixed(&self, names: &[String]) -> Result<()> {
        if let Some(e) = self
            .adapters
            .iter()
            .find(|e| e.config.kind() == MethodKind::Input)
        {
            return Err(Error::Adapter(format!(
                "cannot pass adapter_names with adapter `{}` ({}): mixed batches route layers, \
                 and this method rewrites the model's inputs",
                e.name,
                e.config.peft_type()
            )));
        }
        for module in self.model.modules() {
            let merged = match module.site() {
                Some(site) => !site.adapters().merged().is_empty(),
                None => {
                    if module.params().iter().any(|p| p.has_copies()) {
                        return Err(Error::Adapter(format!(
                            "mixed batches route Linear and Embedding layers only, but `{}` is a \
                             normalisation layer in modules_to_save",
                            module.name()
                        )));
                    }
                    false
                }
            };
            if merged {
                return Err(Error::Adapter(
                    "cannot pass adapter_names when there are merged adapters; call \
                     unmerge_adapter first"
                        .into(),
                ));
            }
        }
        let unknown: BTreeSet<&str> = names
            .iter()
            .map(|s| s.as_str())
            .filter(|n| *n != BASE && self.entry(n).is_none())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Adapter(format!(
                "trying to infer with non-existing adapter(s): {}; loaded: {}",
                unknown.into_iter().collect::<Vec<_>>().join(", "),
                self.adapter_names().join(", ")
            )));
        }
        for module in self.model.modules() {
            let refuses = |n: &str| {
                module
                    .site()
                    .and_then(|s| s.adapters().adapter(n))
                    .is_some_and(|a| !a.supports_mixed_batch())
            };
            if let Some(n) = names.iter().find(|n| refuses(n)) {
                return Err(Error::Adapter(format!(
                    "cannot pass adapter_names with adapter `{n}`: its method does not \
                     support mixed batches (layer `{}`)",
                    module.name()
                )));
            }
        }
        Ok(())
    }

    /// Runs one batch where row `i` uses adapter `adapter_names[i]` (`"__base__"`: none), whatever
    /// the active adapters are (PEFT's `model(**inputs, adapter_names=...)`). Inference only.
    pub fn forward_mixed(&self, inputs: &Inputs, adapter_names: &[String]) -> Result<Tensor> {
        self.forward_mixed_with_cache(inputs, None, adapter_names)
    }

    /// [`PeftModel::forward_mixed`] attending to and extending a cache.
    pub fn forward_mixed_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        adapter_names: &[String],
    ) -> Result<Tensor> {
        let (batch, _) = inputs.batch_seq()?;
        if adapter_names.len() != batch {
            return Err(Error::Data(format!(
                "length of adapter_names should be the number of inputs, but got {} and {batch}",
                adapter_names.len()
            )));
        }
        self.check_mixed(adapter_names)?;
        mixed::with_adapter_names(adapter_names, || {
            self.model.forward_with_cache(inputs, cache, false)
        })
    }

    /// The model seen through per-row adapters, for [`crate::generation::generate`]: prompt `i`
    /// is continued with adapter `adapter_names[i]`.
    pub fn with_adapter_names(&self, adapter_names: &[String]) -> Result<MixedBatch<'_>> {
        self.check_mixed(adapter_names)?;
        Ok(MixedBatch {
            model: self,
            names: adapter_names.to_vec(),
        })
    }
}

/// A [`PeftModel`] whose forward passes route row `i` through adapter `names[i]`; see
/// [`PeftModel::with_adapter_names`].
pub struct MixedBatch<'a> {
    model: &'a PeftModel,
    names: Vec<String>,
}

impl Generate for MixedBatch<'_> {
    fn dims(&self) -> ModelDims {
        self.model.base_model().dims()
    }
    fn device(&self) -> &Device {
        self.model.base_model().device()
    }
    fn forward_with_cache(&self, inputs: &Inputs, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.model
            .forward_mixed_with_cache(inputs, cache, &self.names)
    }
}
