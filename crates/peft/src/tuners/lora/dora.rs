//! DoRA (Liu et al., 2024) as PEFT 0.21 computes it: LoRA's update gives the direction, a trained
//! vector `m` the magnitude of each output row (each embedding column).
//!
//! The weight norm `‖W + s·B A‖` is computed from a *detached* `B A` and then detached itself
//! (section 4.3 of the paper), so gradients reach `m`, `A` and `B` only through
//! `m / norm` and the LoRA branch. With dropout active in training, PEFT recomputes the base
//! output from the dropped input (`x_drop Wᵀ`); otherwise it reuses the layer's output minus bias.

use candle_core::{Tensor, Var, D};
use std::any::Any;
use std::sync::Mutex;

use super::layer::{LoraEmbedding, LoraLinear};
use crate::grad::live;
use crate::layers::{Adapter, EmbeddingAdapter, LinearAdapter, LinearBase};
use crate::{ops, Error, Result};

/// Row norms of `[rows, cols]` as `[rows]`.
fn row_norm(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum(D::Minus1)?.sqrt()?)
}

/// DoRA on a linear layer: LoRA plus `lora_magnitude_vector` `[out]`.
#[derive(Debug)]
pub struct DoraLinear {
    pub lora: LoraLinear,
    pub magnitude: Var,
    /// The weight norm at merge time, needed to unmerge (the merged weight has another norm).
    merged_norm: Mutex<Option<Tensor>>,
}

impl DoraLinear {
    /// Starts `m` at `‖W + s·B A‖` per output row, so the layer's output is unchanged.
    pub fn new(lora: LoraLinear, base: &LinearBase) -> Result<Self> {
        let norm = Self::weight_norm(&lora, &base.weight_out_in()?, &lora.delta_weight()?)?;
        Ok(Self {
            lora,
            magnitude: Var::from_tensor(&norm)?,
            merged_norm: Mutex::new(None),
        })
    }

    /// `‖W + delta‖` per output row, detached.
    fn weight_norm(_lora: &LoraLinear, w_out_in: &Tensor, delta: &Tensor) -> Result<Tensor> {
        row_norm(&(w_out_in.detach() + delta.detach())?)
    }

    fn factor(&self, norm: &Tensor) -> Result<Tensor> {
        Ok((live(&self.magnitude) / norm)?)
    }
}

impl Adapter for DoraLinear {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut t = self.lora.tensors();
        t.push(("lora_magnitude_vector".into(), self.magnitude.clone()));
        t
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// PEFT refuses DoRA in mixed batches (the weight norm is per adapter, not per row).
    fn supports_mixed_batch(&self) -> bool {
        false
    }

    fn type_name(&self) -> &'static str {
        "lora.Linear"
    }
}

impl LinearAdapter for DoraLinear {
    fn forward(&self, x: &Tensor, out: Tensor, base: &LinearBase, train: bool) -> Result<Tensor> {
        let lora = &self.lora;
        let w = base.weight_out_in()?;
        let delta = (self.lora.b.as_tensor().matmul(self.lora.a.as_tensor())? * lora.scaling)?;
        let norm = Self::weight_norm(lora, &w, &delta)?;
        let scale = self.factor(&norm)?; // [out]
        let dropping = lora.dropout > 0.0 && train;
        let (x, base_result) = if dropping {
            let xd = ops::dropout(x, lora.dropout, true)?;
            let y = base.product(&xd)?;
            (xd, y)
        } else {
            let y = match &base.bias {
                Some(b) => out.broadcast_sub(&b.detach())?,
                None => out.clone(),
            };
            (x.clone(), y)
        };
        let (a, b) = (live(&lora.a), live(&lora.b));
        let lora_result = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let dora = (ops::scale_columns(&base_result, &scale.affine(1.0, -1.0)?)?
            + ops::scale_columns(&lora_result, &scale.affine(lora.scaling, 0.0)?)?)?;
        Ok((out + dora)?)
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        let w = base.weight_out_in()?;
        let delta = self.lora.delta_weight()?;
        let norm = Self::weight_norm(&self.lora, &w, &delta)?;
        let f = self.factor(&norm)?.detach().unsqueeze(1)?; // [out, 1]
        let merged = f.broadcast_mul(&(w + delta)?)?;
        *self.merged_norm.lock().map_err(|_| poisoned())? = Some(norm);
        Ok((merged, None))
    }

    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        let norm = self
            .merged_norm
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| Error::Adapter("DoRA: unmerge without a merge".into()))?;
        let f = self.factor(&norm)?.detach().unsqueeze(1)?;
        let w = (base.weight_out_in()?.broadcast_div(&f)? - self.lora.delta_weight()?)?;
        Ok((w, None))
    }
}

fn poisoned() -> Error {
    Error::Adapter("DoRA: a thread panicked while merging".into())
}

/// DoRA on an embedding table: the magnitude `[dim]` scales each column of the table.
#[derive(Debug)]
pub struct DoraEmbedding {
    pub lora: LoraEmbedding,
    pub magnitude: Var,
    /// The base table (`[num, dim]`), needed for the weight norm in the forward pass.
    base: Mutex<Tensor>,
    merged_norm: Mutex<Option<Tensor>>,
}

impl DoraEmbedding {
    pub fn new(lora: LoraEmbedding, weight: &Tensor) -> Result<Self> {
        let norm = Self::weight_norm(weight, &lora.delta_weight()?)?;
        Ok(Self {
            lora,
            magnitude: Var::from_tensor(&norm)?,
            base: Mutex::new(weight.detach()),
            merged_norm: Mutex::new(None),
        })
    }

    /// `‖W + delta‖` per column of the `[num, dim]` table: `[dim]`, detached.
    fn weight_norm(w: &Tensor, delta: &Tensor) -> Result<Tensor> {
        row_norm(&(w.detach() + delta.detach())?.t()?)
    }

    fn base_weight(&self) -> Result<Tensor> {
        Ok(self.base.lock().map_err(|_| poisoned())?.clone())
    }
}

impl Adapter for DoraEmbedding {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut t = self.lora.tensors();
        t.push(("lora_magnitude_vector".into(), self.magnitude.clone()));
        t
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// PEFT refuses DoRA in mixed batches (the weight norm is per adapter, not per row).
    fn supports_mixed_batch(&self) -> bool {
        false
    }

    fn type_name(&self) -> &'static str {
        "lora.Embedding"
    }
}

impl EmbeddingAdapter for DoraEmbedding {
    fn forward(&self, ids: &Tensor, out: Tensor, _train: bool) -> Result<Tensor> {
        let l = &self.lora;
        let delta = self.lora.delta_weight()?;
        let norm = Self::weight_norm(&self.base_weight()?, &delta)?;
        let scale = (live(&self.magnitude) / norm)?.unsqueeze(0)?; // [1, dim]
        let rows = live(&l.a).t()?.contiguous()?.index_select(ids, 0)?;
        let h = (rows.matmul(&live(&l.b).t()?)? * l.scaling)?;
        Ok((scale.broadcast_mul(&out)? + scale.broadcast_mul(&h)?)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.lora.delta_weight()
    }

    fn merge(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = self.lora.delta_weight()?;
        let norm = Self::weight_norm(weight, &delta)?;
        let f = (self.magnitude.as_tensor() / &norm)?.unsqueeze(0)?;
        *self.merged_norm.lock().map_err(|_| poisoned())? = Some(norm);
        Ok(f.broadcast_mul(&(weight + delta)?)?)
    }

    fn unmerge(&self, weight: &Tensor) -> Result<Tensor> {
        let norm = self
            .merged_norm
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| Error::Adapter("DoRA: unmerge without a merge".into()))?;
        let f = (self.magnitude.as_tensor() / norm)?.unsqueeze(0)?;
        Ok((weight.broadcast_div(&f)? - self.lora.delta_weight()?)?)
    }
}
