//! A named weight of the base model that can be frozen, trained in place, or shadowed by a
//! trainable per-adapter copy.
//!
//! The last case is PEFT's `modules_to_save`: the original stays untouched (it is what the model
//! uses with the adapter disabled) and each adapter owns a copy that is trained and saved.

use candle_core::{Tensor, Var};

use crate::quant::QuantWeight;
use crate::{Error, Result};

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
    /// A frozen base kept quantized (a QLoRA base weight). `base` is then an empty placeholder
    /// of the weight's dtype: the dense weight exists only when someone asks for it.
    quant: Option<QuantWeight>,
    /// The quantized weight is `[out, in]` but the model's dense checkpoint stores it `[in, out]`
    /// (GPT-2's `Conv1D`, which transformers quantizes transposed as a `Linear4bit`).
    checkpoint_transposed: bool,
}

impl Param {
    pub fn new(name: impl Into<String>, value: Tensor) -> Self {
        Self {
            name: name.into(),
            base: value,
            base_var: None,
            copies: Vec::new(),
            active_copy: None,
            quant: None,
            checkpoint_transposed: false,
        }
    }

    /// A frozen base weight stored quantized on `device`.
    pub fn quantized(
        name: impl Into<String>,
        q: QuantWeight,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let placeholder = Tensor::zeros(0, q.dtype(), device)?;
        let mut p = Self::new(name, placeholder);
        p.quant = Some(q);
        Ok(p)
    }

    /// Marks a quantized `[out, in]` weight as one a dense checkpoint stores `[in, out]`
    /// (a quantized `Conv1D`); see [`Param::checkpoint_value`].
    pub fn set_checkpoint_transposed(&mut self, transposed: bool) {
        self.checkpoint_transposed = transposed;
    }

    /// Whether a dense checkpoint stores this quantized weight `[in, out]`.
    pub fn checkpoint_transposed(&self) -> bool {
        self.quant.is_some() && self.checkpoint_transposed
    }

    /// The dense base value in the layout the model's dense checkpoint stores it: the
    /// dequantized weight transposed back to `[in, out]` for a quantized `Conv1D`, else
    /// [`Param::dense`]. What a dense checkpoint written from a quantized model holds.
    pub fn checkpoint_value(&self) -> Result<Tensor> {
        let w = self.dense()?;
        if self.checkpoint_transposed() {
            return Ok(w.t()?.contiguous()?);
        }
        Ok(w)
    }

    /// The quantized base, when the base is stored quantized.
    pub fn quant(&self) -> Option<&QuantWeight> {
        self.quant.as_ref()
    }

    /// Replaces a quantized base (merging into a quantized layer re-quantizes).
    pub fn set_quant(&mut self, q: QuantWeight) -> Result<()> {
        if self.quant.is_none() {
            return Err(Error::Config(format!(
                "`{}` is stored dense; it cannot take a quantized value",
                self.name
            )));
        }
        self.quant = Some(q);
        Ok(())
    }

    /// The dense base value: the stored tensor, or the quantized weight dequantized (saving a
    /// dense checkpoint, `merge_and_unload` to a dense model).
    pub fn dense(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => q.dequantize(self.base.device()),
            None => Ok(self.base.clone()),
        }
    }

    fn refuse_training(&self, what: &str) -> Result<()> {
        if self.quant.is_some() {
            return Err(Error::Config(format!(
                "`{}` is a quantized base weight and cannot be {what}: quantized weights stay \
                 frozen (train an adapter on top of them, or keep this layer dense: list it in \
                 the quantization config's llm_int8_skip_modules, or load without quantization)",
                self.name
            )));
        }
        Ok(())
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

    /// Elements of the dense weight (a quantized weight counts as its dense size, as PEFT's
    /// `get_nb_trainable_parameters` counts a `Params4bit`).
    pub fn elem_count(&self) -> usize {
        match &self.quant {
            Some(q) => {
                let (o, i) = q.dims();
                o * i
            }
            None => self.base.elem_count(),
        }
    }

    /// Replaces the base value (merging a delta into it, loading a checkpoint). Keeps trainability.
    pub fn set_base(&mut self, value: Tensor) -> Result<()> {
        self.refuse_training("overwritten with a dense value")?;
        match &self.base_var {
            Some(v) => v.set(&value)?,
            None => self.base = value,
        }
        Ok(())
    }

    /// Makes the base value itself trainable and returns its variable.
    pub fn train_in_place(&mut self) -> Result<Var> {
        self.refuse_training("trained")?;
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
        self.refuse_training("given a trainable copy (modules_to_save)")?;
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
