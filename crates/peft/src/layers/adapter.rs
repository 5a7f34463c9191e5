//! What a tuner plugs into a layer, and the bookkeeping every layer shares: which adapters exist,
//! which are active, which are merged into the base weight, and whether all are switched off.

use candle_core::{Tensor, Var};
use std::any::Any;
use std::fmt::Debug;

use crate::Result;

/// The frozen base of a linear layer as an adapter sees it.
#[derive(Clone)]
pub struct LinearBase {
    /// `[out, in]`, or `[in, out]` when `transposed` (GPT-2's Conv1D layout).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub transposed: bool,
}

impl LinearBase {
    /// The weight in the `[out, in]` layout, whatever the storage.
    pub fn weight_out_in(&self) -> Result<Tensor> {
        Ok(if self.transposed {
            self.weight.t()?
        } else {
            self.weight.clone()
        })
    }
}

/// An adapter on a linear layer (LoRA, DoRA, IA3, ...).
pub trait LinearAdapter: Debug + Send + Sync {
    /// Given the layer input `x` (`[rows, in]`) and the output so far (`[rows, out]`), returns the
    /// output with this adapter applied.
    fn forward(&self, x: &Tensor, out: Tensor, base: &LinearBase, train: bool) -> Result<Tensor>;

    /// Merges into `base` in place of running `forward`: returns the new `[out, in]` weight and,
    /// if the adapter changes it, the new bias.
    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)>;

    /// Undoes [`LinearAdapter::merge`].
    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)>;

    /// The adapter's tensors by their PEFT key suffix (`lora_A.weight`, ...), trainable or not.
    fn tensors(&self) -> Vec<(String, Var)>;

    fn as_any(&self) -> &dyn Any;

    /// Whether rows of a mixed batch may use this adapter (PEFT refuses DoRA there).
    fn supports_mixed_batch(&self) -> bool {
        true
    }
}

/// An adapter on an embedding layer.
pub trait EmbeddingAdapter: Debug + Send + Sync {
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
    fn tensors(&self) -> Vec<(String, Var)>;
    fn as_any(&self) -> &dyn Any;

    /// Whether rows of a mixed batch may use this adapter (PEFT refuses DoRA there).
    fn supports_mixed_batch(&self) -> bool {
        true
    }
}

/// The adapters attached to one layer, keyed by adapter name.
#[derive(Debug)]
pub struct Adapters<A: ?Sized> {
    items: Vec<(String, Box<A>)>,
    active: Vec<String>,
    merged: Vec<String>,
    disabled: bool,
}

impl<A: ?Sized> Default for Adapters<A> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
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
