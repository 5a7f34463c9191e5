//! A named weight of the base model that can be frozen, trained in place, or shadowed by a
//! trainable per-adapter copy.
//!
//! The last case is PEFT's `modules_to_save`: the original stays untouched (it is what the model
//! uses with the adapter disabled) and each adapter owns a copy that is trained and saved.

use candle_core::{Tensor, Var};

use crate::Result;

#[derive(Debug, Clone)]
pub struct Param {
    /// Full module path plus the parameter name, e.g. `bert.pooler.dense.weight`.
    pub name: String,
    base: Tensor,
    /// Set when the base value itself is trained (PEFT's `bias="all"`).
    base_var: Option<Var>,
    /// Per-adapter trainable copies (`modules_to_save`).
    copies: Vec<(String, Var)>,
    /// Which copy the forward pass uses; `None` uses the base.
    active_copy: Option<usize>,
}

impl Param {
    pub fn new(name: impl Into<String>, value: Tensor) -> Self {
        Self {
            name: name.into(),
            base: value,
            base_var: None,
            copies: Vec::new(),
            active_copy: None,
        }
    }

    /// The value the forward pass uses right now (detached inside [`crate::no_grad`]).
    pub fn value(&self) -> Tensor {
        crate::grad::live(match self.active_copy {
            Some(i) => self.copies[i].1.as_tensor(),
            None => &self.base,
        })
    }

    /// The base model's value, ignoring any adapter copy.
    pub fn base(&self) -> &Tensor {
        &self.base
    }

    /// True when gradients flow into the tensor the forward pass uses.
    pub fn is_trainable(&self) -> bool {
        match self.active_copy {
            Some(_) => true,
            None => self.base_var.is_some(),
        }
    }

    pub fn elem_count(&self) -> usize {
        self.base.elem_count()
    }

    /// Replaces the base value (merging a delta into it, loading a checkpoint). Keeps trainability.
    pub fn set_base(&mut self, value: Tensor) -> Result<()> {
        match &self.base_var {
            Some(v) => v.set(&value)?,
            None => self.base = value,
        }
        Ok(())
    }

    /// Makes the base value itself trainable and returns its variable.
    pub fn train_in_place(&mut self) -> Result<Var> {
        if let Some(v) = &self.base_var {
            return Ok(v.clone());
        }
        let var = Var::from_tensor(&self.base)?;
        self.base = var.as_tensor().clone();
        self.base_var = Some(var.clone());
        Ok(var)
    }

    /// Freezes a base value trained in place, keeping its current value.
    pub fn freeze(&mut self) -> Result<()> {
        if let Some(v) = self.base_var.take() {
            self.base = v.as_tensor().detach();
        }
        Ok(())
    }

    pub fn base_var(&self) -> Option<&Var> {
        self.base_var.as_ref()
    }

    /// Creates (or returns) the trainable copy owned by `adapter`.
    pub fn add_copy(&mut self, adapter: &str) -> Result<Var> {
        if let Some((_, v)) = self.copies.iter().find(|(n, _)| n == adapter) {
            return Ok(v.clone());
        }
        let var = Var::from_tensor(&self.base.detach().copy()?)?;
        self.copies.push((adapter.to_string(), var.clone()));
        Ok(var)
    }

    pub fn copy(&self, adapter: &str) -> Option<&Var> {
        self.copies
            .iter()
            .find(|(n, _)| n == adapter)
            .map(|(_, v)| v)
    }

    pub fn has_copies(&self) -> bool {
        !self.copies.is_empty()
    }

    pub fn remove_copy(&mut self, adapter: &str) {
        self.copies.retain(|(n, _)| n != adapter);
        self.active_copy = None;
    }

    /// Routes the forward pass to `adapter`'s copy when it has one, else to the base.
    pub fn activate(&mut self, adapter: Option<&str>) {
        self.active_copy = adapter.and_then(|a| self.copies.iter().position(|(n, _)| n == a));
    }

    /// Drops all copies, keeping the active copy's value as the new frozen base.
    /// This is `merge_and_unload` for a `modules_to_save` module.
    pub fn bake_active_copy(&mut self) {
        if let Some(i) = self.active_copy {
            self.base = self.copies[i].1.as_tensor().detach();
        }
        self.copies.clear();
        self.active_copy = None;
    }

    /// Drops all copies and returns to the untouched base (`unload`).
    pub fn drop_copies(&mut self) {
        self.copies.clear();
        self.active_copy = None;
    }
}
