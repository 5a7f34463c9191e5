//! The adapter-aware linear layer every model builds its projections from.

use candle_core::Tensor;

use super::adapter::{Adapters, LinearAdapter, LinearBase};
use super::param::Param;
use crate::{ops, Error, Result};

#[derive(Debug)]
pub struct Linear {
    /// Hugging Face module path, e.g. `bert.encoder.layer.0.attention.self.query`.
    pub name: String,
    pub weight: Param,
    pub bias: Option<Param>,
    /// The weight is stored `[in, out]` (transformers' `Conv1D`, PEFT's `fan_in_fan_out`).
    pub transposed: bool,
    pub adapters: Adapters<dyn LinearAdapter>,
}

impl Linear {
    pub fn new(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        transposed: bool,
    ) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            bias: bias.map(|b| Param::new(format!("{name}.bias"), b)),
            name,
            transposed,
            adapters: Adapters::default(),
        }
    }

    pub fn in_features(&self) -> usize {
        let d = self.weight.base().dims();
        if self.transposed {
            d[0]
        } else {
            d[1]
        }
    }

    pub fn out_features(&self) -> usize {
        let d = self.weight.base().dims();
        if self.transposed {
            d[1]
        } else {
            d[0]
        }
    }

    pub fn base(&self) -> LinearBase {
        LinearBase {
            weight: self.weight.value(),
            bias: self.bias.as_ref().map(|b| b.value()),
            transposed: self.transposed,
        }
    }

    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (&k, lead) = dims
            .split_last()
            .ok_or_else(|| Error::Config(format!("{}: scalar input", self.name)))?;
        if k != self.in_features() {
            return Err(Error::ShapeMismatch {
                name: format!("input of {}", self.name),
                expected: vec![self.in_features()],
                found: vec![k],
            });
        }
        // Mixed precision: fp32 trainable copies (modules_to_save) meet bf16 activations.
        let w = cast_to(self.weight.value(), x.dtype())?;
        let bias_frozen = self.bias.as_ref().is_none_or(|b| !b.is_trainable());
        if !self.weight.is_trainable() && bias_frozen && self.adapters.running().next().is_none() {
            let b = match &self.bias {
                Some(b) => Some(cast_to(b.value(), x.dtype())?),
                None => None,
            };
            if ops::fused_applies(x, &w) {
                // One node for the whole layer, whatever the leading dimensions.
                return ops::frozen_linear_bias(x, &w, b.as_ref(), self.transposed);
            }
        }
        let x2 = x.reshape(((), k))?;
        let bias = match &self.bias {
            Some(b) => Some((cast_to(b.value(), x.dtype())?, b.is_trainable())),
            None => None,
        };
        let mut y = match (&bias, self.weight.is_trainable()) {
            (None, false) => ops::frozen_linear(&x2, &w, self.transposed)?,
            (Some((b, false)), false) => {
                ops::frozen_linear_bias(&x2, &w, Some(b), self.transposed)?
            }
            _ => {
                let wt = if self.transposed { w.clone() } else { w.t()? };
                x2.matmul(&wt)?
            }
        };
        if let Some((b, trainable)) = &bias {
            if *trainable || self.weight.is_trainable() {
                y = y.broadcast_add(b)?;
            }
        }
        let base = self.base();
        for adapter in self.adapters.running() {
            y = adapter.forward(&x2, y, &base, train)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        Ok(y.reshape(out_dims)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Folds the named adapters into the base weight (PEFT's `merge`).
    pub fn merge(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            if self.adapters.merged().contains(name) {
                continue;
            }
            let Some(adapter) = self.adapters.get(name) else {
                continue;
            };
            let (w, b) = adapter.merge(&self.base())?;
            self.apply_weights(w, b)?;
            self.adapters.mark_merged(name, true);
        }
        Ok(())
    }

    /// Takes every merged adapter back out of the base weight, last merged first.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.adapters.merged().last().cloned() {
            if let Some(adapter) = self.adapters.get(&name) {
                let (w, b) = adapter.unmerge(&self.base())?;
                self.apply_weights(w, b)?;
            }
            self.adapters.mark_merged(&name, false);
        }
        Ok(())
    }

    fn apply_weights(&mut self, w_out_in: Tensor, bias: Option<Tensor>) -> Result<()> {
        let w = if self.transposed {
            w_out_in.t()?.contiguous()?
        } else {
            w_out_in
        };
        self.weight.set_base(w)?;
        if let (Some(b), Some(p)) = (bias, self.bias.as_mut()) {
            p.set_base(b)?;
        }
        Ok(())
    }
}

/// `t` in `dtype` (a no-op when it already is); the cast passes gradients back in `t`'s dtype.
pub(crate) fn cast_to(t: Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t)
    } else {
        Ok(t.to_dtype(dtype)?)
    }
}
