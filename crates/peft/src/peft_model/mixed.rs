//! Mixed batches: each row of one batch through its own adapter (PEFT's `adapter_names`), in
//! forward passes and in generation.

use candle_core::{Device, Tensor};
use std::collections::BTreeSet;
use std::rc::Rc;

use super::PeftModel;
use crate::generation::batch::BatchModel;
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
        self.forward_rows_with_cache(inputs, cache, &mixed::MixedRows::new(adapter_names))
    }

    /// [`PeftModel::forward_mixed_with_cache`] for checked rows whose cache outlives the call.
    fn forward_rows_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        rows: &Rc<mixed::MixedRows>,
    ) -> Result<Tensor> {
        let (batch, _) = inputs.batch_seq()?;
        if rows.names().len() != batch {
            return Err(Error::Data(format!(
                "length of adapter_names should be the number of inputs, but got {} and {batch}",
                rows.names().len()
            )));
        }
        mixed::with_rows(rows, || self.model.forward_with_cache(inputs, cache, false))
    }

    /// The model seen through per-row adapters, for [`crate::generation::generate`]: prompt `i`
    /// is continued with adapter `adapter_names[i]`.
    pub fn with_adapter_names(&self, adapter_names: &[String]) -> Result<MixedBatch<'_>> {
        self.check_mixed(adapter_names)?;
        Ok(MixedBatch {
            model: self,
            rows: mixed::MixedRows::new(adapter_names),
        })
    }
}

/// A [`PeftModel`] whose forward passes route row `i` through adapter `names[i]`; see
/// [`PeftModel::with_adapter_names`].
///
/// It borrows the model, so the adapters cannot change while it lives: what layers derive from
/// the rows (each row's gathered adapter factors) is built on the first forward pass and reused
/// for every generated token.
pub struct MixedBatch<'a> {
    model: &'a PeftModel,
    rows: Rc<mixed::MixedRows>,
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
            .forward_rows_with_cache(inputs, cache, &self.rows)
    }
}

impl PeftModel {
    /// Whether rows using adapter `name` may share a mixed batch with rows using other adapters:
    /// every layer's method supports it (PEFT refuses DoRA) and the method does not rewrite the
    /// model's inputs. [`BASE`] always may.
    pub fn supports_mixed_batch(&self, name: &str) -> bool {
        if name == BASE {
            return true;
        }
        if self
            .entry(name)
            .is_some_and(|e| e.config.kind() == MethodKind::Input)
        {
            return false;
        }
        self.model.modules().iter().all(|module| {
            module
                .site()
                .and_then(|s| s.adapters().adapter(name))
                .is_none_or(|a| a.supports_mixed_batch())
        })
    }
}

/// Continuous batching through per-row adapters: rows of adapters that mix share one forward
/// pass ([`PeftModel::forward_mixed_with_cache`]); a batch of one adapter that does not mix runs
/// with that adapter active, as `generate` would run it alone.
impl BatchModel for PeftModel {
    fn dims(&self) -> ModelDims {
        self.model.dims()
    }
    fn device(&self) -> Device {
        self.model.device().clone()
    }
    fn shares_batch(&self, adapter: &str) -> bool {
        self.supports_mixed_batch(adapter)
    }
    fn prepare(&mut self, adapter: &str, _in_use: &BTreeSet<String>) -> Result<bool> {
        if adapter != BASE && self.entry(adapter).is_none() {
            return Err(self.no_such_adapter(adapter));
        }
        Ok(true)
    }
    fn forward_rows(
        &mut self,
        inputs: &Inputs,
        cache: &mut Cache,
        adapters: &[String],
    ) -> Result<Tensor> {
        let first = adapters.first().map(String::as_str).unwrap_or(BASE);
        let uniform = adapters.iter().all(|a| a == first);
        if uniform && first != BASE && !self.supports_mixed_batch(first) {
            // Every time: an adapter added since may have become active on layers it alone
            // adapts (a layer's first adapter is active), which the model-level list misses.
            self.set_adapter(first)?;
            return PeftModel::forward_with_cache(self, inputs, Some(cache), false);
        }
        self.forward_mixed_with_cache(inputs, Some(cache), adapters)
    }
}
