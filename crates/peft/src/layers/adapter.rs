//! What a tuner plugs into a layer, and the bookkeeping every layer shares: which adapters exist,
//! which are active, which are merged into the base weight, and whether all are switched off.

use candle_core::{Device, Tensor, Var};
use std::any::Any;
use std::fmt::Debug;
use std::sync::OnceLock;

use crate::quant::QuantWeight;

use crate::Result;

/// The frozen base of a linear layer as an adapter sees it. A quantized base is dequantized
/// only when an adapter asks for the dense weight (DoRA's norm, a merge), once per `LinearBase`.
#[derive(Clone)]
pub struct LinearBase {
    /// `[out, in]`, or `[in, out]` when `transposed` (GPT-2's Conv1D layout); unused when the
    /// base is quantized.
    weight: Tensor,
    quant: Option<(QuantWeight, OnceLock<Tensor>)>,
    /// Set when the layer's products run as `torch.autocast` runs them (a bf16 weight, f32
    /// activations): adapters that read the dense weight get it widened to f32, once.
    widened: Option<OnceLock<Tensor>>,
    pub bias: Option<Tensor>,
    pub transposed: bool,
}

impl LinearBase {
    pub fn dense(weight: Tensor, bias: Option<Tensor>, transposed: bool) -> Self {
        Self {
            weight,
            quant: None,
            widened: None,
            bias,
            transposed,
        }
    }

    /// This base as an autocast forward sees it: [`Self::product`] multiplies the stored
    /// (bf16) weight with f32 inputs, and [`Self::weight`] hands adapters an f32 copy, so their
    /// own f32 arithmetic (DoRA's norm, a materialised delta) meets one dtype.
    pub fn autocast(mut self) -> Self {
        if self.quant.is_none() {
            self.widened = Some(OnceLock::new());
        }
        self
    }

    /// A quantized `[out, in]` base; `device` is where its dense weight is wanted.
    pub fn quantized(q: QuantWeight, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Tensor::zeros(0, q.dtype(), device)?,
            quant: Some((q, OnceLock::new())),
            widened: None,
            bias,
            transposed: false,
        })
    }

    /// The quantized weight, when the base is stored quantized.
    pub fn quant(&self) -> Option<&QuantWeight> {
        self.quant.as_ref().map(|(q, _)| q)
    }

    /// The dense weight in its stored layout (dequantized on first use).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.quant {
            None => match &self.widened {
                None => Ok(self.weight.clone()),
                Some(cell) => {
                    if let Some(w) = cell.get() {
                        return Ok(w.clone());
                    }
                    let w = self.weight.to_dtype(candle_core::DType::F32)?;
                    Ok(cell.get_or_init(|| w).clone())
                }
            },
            Some((q, dense)) => {
                if let Some(w) = dense.get() {
                    return Ok(w.clone());
                }
                tracing::debug!("dequantizing a quantized base weight {:?}", q.dims());
                let w = q.dequantize(self.weight.device())?;
                Ok(dense.get_or_init(|| w).clone())
            }
        }
    }

    /// The weight in the `[out, in]` layout, whatever the storage.
    pub fn weight_out_in(&self) -> Result<Tensor> {
        let w = self.weight()?;
        Ok(if self.transposed { w.t()? } else { w })
    }

    /// `x · Wᵀ` (no bias) for `x` `[rows, in]`, with a gradient for `x` only; a quantized base
    /// multiplies band by band without expanding.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self.quant() {
            Some(q) => crate::ops::quant_linear(x, q, None),
            None => crate::ops::frozen_linear(x, &self.weight, self.transposed),
        }
    }
}

/// What every adapter on a layer has, whatever the layer: its tensors, the name PEFT reports for
/// it, and whether it can serve one row group of a mixed batch.
pub trait Adapter: Debug + Send + Sync {
    /// The adapter's tensors by their key suffix (`lora_A.weight`, ...), trainable or not.
    fn tensors(&self) -> Vec<(String, Var)>;

    /// The module type PEFT's `get_layer_status` reports for the wrapped layer (`lora.Linear`,
    /// `adalora.SVDLinear`, IA3's bare `Linear`, ...).
    fn type_name(&self) -> &'static str;

    fn as_any(&self) -> &dyn Any;

    /// Parameters PEFT's layer holds beyond [`Adapter::tensors`], neither trained nor saved but
    /// counted in its totals (AdaLoRA's `ranknum`).
    fn untracked_params(&self) -> usize {
        0
    }

    /// Whether rows of a mixed batch may use this adapter (PEFT refuses DoRA there).
    fn supports_mixed_batch(&self) -> bool {
        true
    }
}

/// An adapter whose whole effect on a linear layer is `y += s · (dropout(x) Aᵀ) Bᵀ`: no bias,
/// nothing depending on the base weight. Mixed batches apply many of these at once (two batched
/// products for all rows) instead of one row group at a time, and a frozen dense layer runs one
/// in the same product as its base ([`crate::ops::frozen_linear_low_rank`]).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scaling: f64,
    /// The dropout on the update's input, in training.
    pub dropout: f64,
}

/// An adapter on a linear layer (LoRA, DoRA, IA3, ...).
pub trait LinearAdapter: Adapter {
    /// This adapter as a plain low-rank update, if it is one (see [`LowRank`]).
    fn low_rank(&self) -> Option<LowRank> {
        None
    }

    /// Given the layer input `x` (`[rows, in]`) and the output so far (`[rows, out]`), returns the
    /// output with this adapter applied.
    fn forward(&self, x: &Tensor, out: Tensor, base: &LinearBase, train: bool) -> Result<Tensor>;

    /// Merges into `base` in place of running `forward`: returns the new `[out, in]` weight and,
    /// if the adapter changes it, the new bias.
    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)>;

    /// Undoes [`LinearAdapter::merge`].
    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)>;
}

/// An adapter on a 2-D convolution (PEFT's `_ConvNd` layers).
pub trait Conv2dAdapter: Adapter {
    /// Given the layer input `x` (`[batch, in, h, w]`) and the output so far (`[batch, out, h',
    /// w']`), returns the output with this adapter applied.
    fn forward(
        &self,
        x: &Tensor,
        out: Tensor,
        base: &super::conv::Conv2dBase,
        train: bool,
    ) -> Result<Tensor>;

    /// Merges into `base`: the new `[out, in / groups, kh, kw]` weight and, if the adapter
    /// changes it, the new bias.
    fn merge(&self, base: &super::conv::Conv2dBase) -> Result<(Tensor, Option<Tensor>)>;

    /// Undoes [`Conv2dAdapter::merge`].
    fn unmerge(&self, base: &super::conv::Conv2dBase) -> Result<(Tensor, Option<Tensor>)>;
}

/// An adapter on an embedding layer.
pub trait EmbeddingAdapter: Adapter {
    /// `ids`: `[n]` (u32); `out`: `[n, dim]` base rows. Returns the adapted rows.
    fn forward(&self, ids: &Tensor, out: Tensor, train: bool) -> Result<Tensor>;
    /// The change to the `[num_embeddings, dim]` table.
    fn delta_weight(&self) -> Result<Tensor>;
    /// The table with this adapter merged in (DoRA rescales as well as adds).
    fn merge(&self, weight: &Tensor) -> Result<Tensor> {
        Ok((weight + self.delta_weight()?)?)
    }
    /// Undoes [`EmbeddingAdapter::merge`].
    fn unmerge(&self, weight: &Tensor) -> Result<Tensor> {
        Ok((weight - self.delta_weight()?)?)
    }
}

/// The adapters attached to one layer, keyed by adapter name.
#[derive(Debug)]
pub struct Adapters<A: ?Sized> {
    items: Vec<(String, Box<A>)>,
    active: Vec<String>,
    merged: Vec<String>,
    disabled: bool,
    /// Per-adapter weights other than 1 (diffusers' `set_adapters(..., adapter_weights)`).
    weights: Vec<(String, f64)>,
}

impl<A: ?Sized> Default for Adapters<A> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            weights: Vec::new(),
        }
    }
}

impl<A: ?Sized> Adapters<A> {
    /// Adds an adapter. Like PEFT, a layer's first adapter becomes active; later ones wait for
    /// `set_active`.
    pub fn insert(&mut self, name: &str, adapter: Box<A>) {
        self.items.retain(|(n, _)| n != name);
        self.items.push((name.to_string(), adapter));
        if self.active.is_empty() {
            self.active.push(name.to_string());
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Box<A>> {
        let i = self.items.iter().position(|(n, _)| n == name)?;
        self.active.retain(|n| n != name);
        self.weights.retain(|(n, _)| n != name);
        self.merged.retain(|n| n != name);
        Some(self.items.remove(i).1)
    }

    pub fn get(&self, name: &str) -> Option<&A> {
        self.items
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| &**a)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|(n, _)| n.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &A)> {
        self.items.iter().map(|(n, a)| (n.as_str(), &**a))
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Activates the named adapters that this layer has (others are ignored, as in PEFT where a
    /// layer may not carry every adapter).
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names
            .iter()
            .filter(|n| self.items.iter().any(|(m, _)| m == *n))
            .cloned()
            .collect();
    }

    pub fn active(&self) -> &[String] {
        &self.active
    }

    pub fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    pub fn merged(&self) -> &[String] {
        &self.merged
    }

    pub(crate) fn mark_merged(&mut self, name: &str, merged: bool) {
        self.merged.retain(|n| n != name);
        if merged {
            self.merged.push(name.to_string());
        }
    }

    /// The weight adapter `name` contributes with (1 unless set).
    pub fn weight(&self, name: &str) -> f64 {
        self.weights
            .iter()
            .find(|(n, _)| n == name)
            .map_or(1.0, |(_, w)| *w)
    }

    /// Sets the weight of adapter `name` (see [`Adapters::weight`]).
    pub fn set_weight(&mut self, name: &str, weight: f64) {
        self.weights.retain(|(n, _)| n != name);
        if weight != 1.0 && self.items.iter().any(|(n, _)| n == name) {
            self.weights.push((name.to_string(), weight));
        }
    }

    /// [`Adapters::running`] with each adapter's weight.
    pub fn running_weighted(&self) -> impl Iterator<Item = (&A, f64)> {
        let on = !self.disabled;
        self.active
            .iter()
            .filter(move |n| on && !self.merged.contains(n))
            .filter_map(|n| self.get(n).map(|a| (a, self.weight(n))))
    }

    /// The adapters the forward pass must run: active, not merged, and not disabled.
    pub fn running(&self) -> impl Iterator<Item = &A> {
        let on = !self.disabled;
        self.active
            .iter()
            .filter(move |n| on && !self.merged.contains(n))
            .filter_map(|n| self.get(n))
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// An [`Adapters`] list seen without its adapter type: what the PEFT wrapper manages on every
/// kind of site alike.
pub trait AdapterList {
    fn names(&self) -> Vec<String>;
    fn adapter(&self, name: &str) -> Option<&dyn Adapter>;
    fn active(&self) -> &[String];
    fn merged(&self) -> &[String];
    fn is_disabled(&self) -> bool;
    fn is_empty(&self) -> bool;
    fn set_active(&mut self, names: &[String]);
    fn set_disabled(&mut self, disabled: bool);
    /// The weight the adapter contributes with (see [`Adapters::weight`]).
    fn weight(&self, name: &str) -> f64;
    fn set_weight(&mut self, name: &str, weight: f64);
    /// Drops the adapter from the list (a merged adapter must be unmerged first; see
    /// [`AdapterSite::remove_adapter`]).
    fn remove(&mut self, name: &str) -> bool;
    fn clear(&mut self);
}

macro_rules! impl_adapter_list {
    ($a:ty) => {
        impl AdapterList for Adapters<$a> {
            fn names(&self) -> Vec<String> {
                Adapters::names(self).map(String::from).collect()
            }
            fn adapter(&self, name: &str) -> Option<&dyn Adapter> {
                self.get(name).map(|a| a as &dyn Adapter)
            }
            fn active(&self) -> &[String] {
                Adapters::active(self)
            }
            fn merged(&self) -> &[String] {
                Adapters::merged(self)
            }
            fn is_disabled(&self) -> bool {
                Adapters::is_disabled(self)
            }
            fn is_empty(&self) -> bool {
                Adapters::is_empty(self)
            }
            fn set_active(&mut self, names: &[String]) {
                Adapters::set_active(self, names)
            }
            fn set_disabled(&mut self, disabled: bool) {
                Adapters::set_disabled(self, disabled)
            }
            fn weight(&self, name: &str) -> f64 {
                Adapters::weight(self, name)
            }
            fn set_weight(&mut self, name: &str, weight: f64) {
                Adapters::set_weight(self, name, weight)
            }
            fn remove(&mut self, name: &str) -> bool {
                Adapters::remove(self, name).is_some()
            }
            fn clear(&mut self) {
                Adapters::clear(self)
            }
        }
    };
}
impl_adapter_list!(dyn LinearAdapter);
impl_adapter_list!(dyn EmbeddingAdapter);
impl_adapter_list!(dyn Conv2dAdapter);
impl_adapter_list!(dyn super::hook::HookAdapter);

/// A place in a model that carries adapters: a linear, embedding or convolution layer, or a hook
/// point. The
/// PEFT wrapper activates, merges, disables and removes adapters through this, whatever the kind
/// of site and method.
pub trait AdapterSite {
    /// The site's Hugging Face module path.
    fn site_name(&self) -> &str;
    fn adapters(&self) -> &dyn AdapterList;
    fn adapters_mut(&mut self) -> &mut dyn AdapterList;
    /// Folds the named adapters into the base weights (PEFT's `merge`).
    fn merge(&mut self, names: &[String]) -> Result<()>;
    /// Takes every merged adapter back out, last merged first.
    fn unmerge(&mut self) -> Result<()>;

    /// Removes adapter `name`, unmerging first if it is merged.
    fn remove_adapter(&mut self, name: &str) -> Result<()> {
        if self.adapters().merged().iter().any(|n| n == name) {
            self.unmerge()?;
        }
        self.adapters_mut().remove(name);
        Ok(())
    }
}
