//! Merging adapters into the base weights, taking them out again, unloading them, and switching
//! them off for a scope.

use std::ops::{Deref, DerefMut};

use super::PeftModel;
use crate::models::Model;
use crate::tuners::MethodKind;
use crate::{Error, Result};

impl PeftModel {
    /// Folds the active adapter into the base weights (PEFT's `merge_adapter`).
    pub fn merge_adapter(&mut self) -> Result<()> {
        let names = self.active.clone();
        if let Some(e) = self
            .adapters
            .iter()
            .find(|e| names.contains(&e.name) && e.config.kind() == MethodKind::Input)
        {
            return Err(Error::Adapter(format!(
                "adapter `{}` ({}) rewrites the model's inputs; it has no weights to merge",
                e.name,
                e.config.peft_type()
            )));
        }
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.merge(&names)?;
            }
        }
        Ok(())
    }

    /// Takes merged adapters back out of the base weights.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.unmerge()?;
            }
        }
        Ok(())
    }

    /// Merges the active adapter and returns the plain base model, adapters removed.
    pub fn merge_and_unload(mut self) -> Result<Box<dyn Model>> {
        self.merge_adapter()?;
        Ok(self.strip(true))
    }

    /// [`PeftModel::merge_and_unload`] into a dense model: every quantized base weight is
    /// dequantized first, the adapter is added to it in f32 (`dequant(W) + scale·B·A`, never
    /// re-quantized, so none of the rounding PEFT warns about), and every float weight is then
    /// cast to `dtype` (f32, bf16 or f16). Saved with [`crate::models::save_pretrained`], the
    /// result is a plain transformers checkpoint.
    pub fn merge_and_unload_dequantized(
        mut self,
        dtype: candle_core::DType,
    ) -> Result<Box<dyn Model>> {
        use candle_core::DType;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Config(format!(
                "a dequantized merge writes f32, bf16 or f16 weights, not {dtype:?}"
            )));
        }
        for module in self.model.modules_mut() {
            if let crate::layers::ModuleMut::Linear(l) = module {
                l.dequantize_in_place()?;
            }
        }
        self.merge_adapter()?;
        let mut model = self.strip(true);
        for module in model.modules_mut() {
            for p in module.params_mut() {
                let t = p.base();
                if t.dtype().is_float() && t.dtype() != dtype {
                    let cast = t.to_dtype(dtype)?;
                    p.set_base(cast)?;
                }
            }
        }
        Ok(model)
    }

    /// Returns the base model with every adapter removed and nothing merged.
    pub fn unload(mut self) -> Result<Box<dyn Model>> {
        self.unmerge_adapter()?;
        Ok(self.strip(false))
    }

    fn strip(mut self, keep_active_copies: bool) -> Box<dyn Model> {
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.adapters_mut().clear();
            }
        }
        self.for_each_param(|p| {
            if keep_active_copies {
                p.bake_active_copy();
            } else {
                p.drop_copies();
            }
            let _ = p.freeze();
        });
        self.model
    }

    /// Switches every adapter layer off (`true`) or on (`false`). Merged adapters are unmerged
    /// first, as in PEFT.
    pub fn disable_adapter_layers(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            self.unmerge_adapter()?;
        }
        self.disabled = disabled;
        let active = self.active.first().cloned().unwrap_or_default();
        for module in self.model.modules_mut() {
            if let Some(site) = module.site_mut() {
                site.adapters_mut().set_disabled(disabled);
            }
        }
        self.for_each_param(|p| {
            if p.has_copies() {
                p.activate(if disabled { None } else { Some(&active) });
            }
        });
        Ok(())
    }

    /// Runs the base model until the returned guard is dropped (PEFT's `with model.disable_adapter():`).
    pub fn disable_adapter(&mut self) -> Result<AdapterDisabled<'_>> {
        self.disable_adapter_layers(true)?;
        Ok(AdapterDisabled { model: self })
    }
}

/// The scope of [`PeftModel::disable_adapter`]: adapters come back when it is dropped.
pub struct AdapterDisabled<'a> {
    model: &'a mut PeftModel,
}

impl Deref for AdapterDisabled<'_> {
    type Target = PeftModel;
    fn deref(&self) -> &PeftModel {
        self.model
    }
}

impl DerefMut for AdapterDisabled<'_> {
    fn deref_mut(&mut self) -> &mut PeftModel {
        self.model
    }
}

impl Drop for AdapterDisabled<'_> {
    fn drop(&mut self) {
        // Re-enabling only flips flags and routes copies; it cannot fail.
        let _ = self.model.disable_adapter_layers(false);
    }
}
