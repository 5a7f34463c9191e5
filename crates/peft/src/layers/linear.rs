//! The adapter-aware linear layer every model builds its projections from.

use candle_core::Tensor;

use super::adapter::{AdapterList, AdapterSite, Adapters, LinearAdapter, LinearBase, LowRank};
use super::mixed;
use super::param::Param;
use crate::quant::QuantWeight;
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
    /// The weight and bias from before each merge at an adapter weight other than 1, to
    /// restore on unmerge.
    snapshots: Vec<(String, Stored, Option<Tensor>)>,
}

/// A mixed batch's low-rank factors, row by row, at one layer.
enum RowFactors {
    /// Some adapter here is not a plain low-rank update: the layer routes rows by groups.
    NotLowRank,
    /// No adapter here has a rank: the base product alone.
    NoRank,
    /// `a` `[B, in, r]`, `b` `[B, r, out]` and the scalings `s` `[B, 1, 1]`.
    Gathered { a: Tensor, b: Tensor, s: Tensor },
}

/// A base weight as stored: dense, or quantized.
#[derive(Debug, Clone)]
enum Stored {
    Dense(Tensor),
    Quant(QuantWeight),
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
            snapshots: Vec::new(),
        }
    }

    /// A Linear whose frozen `[out, in]` weight stays quantized (QLoRA's base); `device` is
    /// where activations, the bias and any dequantized weight live.
    pub fn quantized(
        name: impl Into<String>,
        weight: QuantWeight,
        bias: Option<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let name = name.into();
        Ok(Self {
            weight: Param::quantized(format!("{name}.weight"), weight, device)?,
            bias: bias.map(|b| Param::new(format!("{name}.bias"), b)),
            name,
            transposed: false,
            adapters: Adapters::default(),
            snapshots: Vec::new(),
        })
    }

    /// A quantized `Conv1D` (GPT-2): the weight is quantized `[out, in]` as transformers'
    /// `Linear4bit` holds it, so adapters see a plain Linear (PEFT's `fan_in_fan_out = False`),
    /// but a dense model made from it stores the weight `[in, out]` again, as GPT-2 expects.
    pub fn quantized_conv1d(
        name: impl Into<String>,
        weight: QuantWeight,
        bias: Option<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let mut l = Self::quantized(name, weight, bias, device)?;
        l.weight.set_checkpoint_transposed(true);
        Ok(l)
    }

    /// The quantized base weight, when the layer is quantized.
    pub fn quant(&self) -> Option<&QuantWeight> {
        self.weight.quant()
    }

    /// The dense weight in its stored layout (dequantized when the layer is quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        self.weight.dense()
    }

    /// Replaces the base weight by its dequantized value (a dense model out of a quantized one,
    /// `merge_and_unload` with a dense output). A no-op on a dense layer. A quantized `Conv1D`
    /// gets its `[in, out]` layout back.
    pub fn dequantize_in_place(&mut self) -> Result<()> {
        if self.quant().is_some() {
            let transposed = self.weight.checkpoint_transposed();
            let w = self.weight.checkpoint_value()?;
            let mut dense = Param::new(self.weight.name.clone(), w);
            std::mem::swap(&mut self.weight, &mut dense);
            self.transposed = transposed;
        }
        Ok(())
    }

    pub fn in_features(&self) -> usize {
        if let Some(q) = self.quant() {
            return q.dims().1;
        }
        let d = self.weight.base().dims();
        if self.transposed {
            d[0]
        } else {
            d[1]
        }
    }

    pub fn out_features(&self) -> usize {
        if let Some(q) = self.quant() {
            return q.dims().0;
        }
        let d = self.weight.base().dims();
        if self.transposed {
            d[1]
        } else {
            d[0]
        }
    }

    pub fn base(&self) -> Result<LinearBase> {
        let bias = self.bias.as_ref().map(|b| b.value());
        match self.quant() {
            Some(q) => LinearBase::quantized(q.clone(), bias, self.weight.base().device()),
            None => Ok(LinearBase::dense(
                self.weight.value(),
                bias,
                self.transposed,
            )),
        }
    }

    /// The frozen weight and bias when this layer is a plain frozen product for `x` that a
    /// one-node CPU op serves: no adapter running, nothing trained, no mixed-batch routing. A
    /// dense weight comes cast for `x` (or kept bf16 for autocast); a quantized one as stored.
    /// Ops that fuse the product with what follows it (the causal-LM loss) take it from here.
    pub fn frozen_product(&self, x: &Tensor) -> Result<Option<(ops::HeadWeight, Option<Tensor>)>> {
        let bias_frozen = self.bias.as_ref().is_none_or(|b| !b.is_trainable());
        let mixed_rows = mixed::current().is_some() && self.routes_rows();
        if self.weight.is_trainable()
            || !bias_frozen
            || mixed_rows
            || self.adapters.running().next().is_some()
        {
            return Ok(None);
        }
        let b = match &self.bias {
            Some(b) => Some(cast_to(b.value(), x.dtype())?),
            None => None,
        };
        let w = match self.quant() {
            Some(q) => ops::HeadWeight::Quant(q.clone()),
            None => ops::HeadWeight::Dense {
                w: weight_for(self.weight.value(), x)?,
                transposed: self.transposed,
            },
        };
        Ok(w.applies(x, b.as_ref()).then_some((w, b)))
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
        let bias_frozen = self.bias.as_ref().is_none_or(|b| !b.is_trainable());
        let mixed_rows = mixed::current().is_some() && self.routes_rows();
        if !self.weight.is_trainable()
            && bias_frozen
            && !mixed_rows
            && self.adapters.running().next().is_none()
        {
            let b = match &self.bias {
                Some(b) => Some(cast_to(b.value(), x.dtype())?),
                None => None,
            };
            if let Some(q) = self.quant() {
                return ops::quant_linear(x, q, b.as_ref());
            }
            let w = weight_for(self.weight.value(), x)?;
            if ops::fused_applies(x, &w) {
                // One node for the whole layer, whatever the leading dimensions.
                return ops::frozen_linear_bias(x, &w, b.as_ref(), self.transposed);
            }
        }
        if !mixed_rows {
            if let Some(y) = self.forward_fused_low_rank(x, train)? {
                return Ok(y);
            }
        }
        let x2 = x.reshape(((), k))?;
        let y = match mixed::current() {
            Some(names) if self.routes_rows() => {
                self.forward_mixed(&x2, &names, lead.first().copied())?
            }
            _ => {
                let mut y = self.affine(
                    &x2,
                    &self.weight.value(),
                    self.bias.as_ref().map(|b| b.value()),
                    self.weight.is_trainable(),
                )?;
                let mut base = self.base()?;
                if ops::autocast_applies(&x2, &self.weight.value()) {
                    base = base.autocast();
                }
                for (adapter, w) in self.adapters.running_weighted() {
                    y = if w == 1.0 {
                        adapter.forward(&x2, y, &base, train)?
                    } else {
                        // diffusers' adapter weights: only the adapter's part is scaled.
                        let with = adapter.forward(&x2, y.clone(), &base, train)?;
                        (&y + ((with - &y)? * w)?)?
                    };
                }
                y
            }
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        Ok(y.reshape(out_dims)?)
    }

    /// A frozen dense layer with one running plain low-rank adapter (LoRA at full weight): the
    /// base product, the update and, in training, their backward in one node
    /// ([`ops::frozen_linear_low_rank`]). `None` when that does not apply.
    fn forward_fused_low_rank(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        if self.weight.is_trainable() {
            return Ok(None);
        }
        let mut running = self.adapters.running_weighted();
        let (Some((adapter, weight)), None) = (running.next(), running.next()) else {
            return Ok(None);
        };
        let bias = match &self.bias {
            Some(b) if b.is_trainable() => return Ok(None),
            Some(b) => Some(b.value()),
            None => None,
        };
        let dense = self.weight.value();
        let base = match self.quant() {
            Some(q) => ops::BaseWeight::Quant(q),
            None => ops::BaseWeight::Dense {
                w: &dense,
                transposed: self.transposed,
            },
        };
        // Before building the factors: VeRA's and AdaLoRA's are small graph nodes of their own.
        if weight != 1.0 || !ops::frozen_linear_low_rank_applies(x, &base) {
            return Ok(None);
        }
        let Some(low_rank) = adapter.low_rank() else {
            return Ok(None);
        };
        ops::frozen_linear_low_rank(
            x,
            base,
            bias.as_ref(),
            (&low_rank.a, &low_rank.b, low_rank.scaling),
            low_rank.dropout,
            train,
        )
    }

    /// `x2 · Wᵀ + b` for a `[rows, in]` input. On a quantized layer `w` is the base's
    /// placeholder (a quantized weight has no copies and is never trained) and the product
    /// reads the quantized weight.
    fn affine(
        &self,
        x2: &Tensor,
        w: &Tensor,
        b: Option<Tensor>,
        trainable: bool,
    ) -> Result<Tensor> {
        if let Some(q) = self.quant() {
            let b = match b {
                Some(b) => Some(cast_to(b, x2.dtype())?),
                None => None,
            };
            return match b {
                Some(b) if b.track_op() => Ok(ops::quant_linear(x2, q, None)?.broadcast_add(&b)?),
                b => ops::quant_linear(x2, q, b.as_ref()),
            };
        }
        let w = if trainable {
            cast_to(w.clone(), x2.dtype())?
        } else {
            weight_for(w.clone(), x2)?
        };
        let b = match b {
            Some(b) => Some(cast_to(b, x2.dtype())?),
            None => None,
        };
        if trainable {
            let wt = if self.transposed { w.clone() } else { w.t()? };
            let y = x2.matmul(&wt)?;
            return Ok(match b {
                Some(b) => y.broadcast_add(&b)?,
                None => y,
            });
        }
        match b {
            // A trained bias (`bias="all"`) needs its own node for its gradient.
            Some(b) if b.track_op() => {
                Ok(ops::frozen_linear(x2, &w, self.transposed)?.broadcast_add(&b)?)
            }
            b => ops::frozen_linear_bias(x2, &w, b.as_ref(), self.transposed),
        }
    }

    /// Whether a mixed batch changes anything here: the layer carries adapters or per-adapter
    /// copies (`modules_to_save`), and they are not switched off.
    fn routes_rows(&self) -> bool {
        let copies = self.weight.has_copies() || self.bias.as_ref().is_some_and(|b| b.has_copies());
        (copies || !self.adapters.is_empty()) && !self.adapters.is_disabled()
    }

    /// PEFT's `_mixed_batch_forward`: each row group runs through its own adapter (any adapter
    /// this layer has, active or not) or, for `__base__`, the bare layer.
    fn forward_mixed(&self, x2: &Tensor, names: &[String], lead: Option<usize>) -> Result<Tensor> {
        let g = mixed::groups(names, lead, x2.dim(0)?, &self.name, x2.device())?;
        let copies = self.weight.has_copies() || self.bias.as_ref().is_some_and(|b| b.has_copies());
        if !copies && g.groups.len() > 1 {
            if let Some(y) = self.forward_low_rank(x2, names)? {
                return Ok(y);
            }
        }
        let shared = if copies {
            None
        } else {
            let b = self.bias.as_ref().map(|b| crate::grad::live(b.base()));
            Some(self.affine(x2, &crate::grad::live(self.weight.base()), b, false)?)
        };
        let mut base = self.base()?;
        if ops::autocast_applies(x2, &self.weight.value()) {
            base = base.autocast();
        }
        let mut outs = Vec::with_capacity(g.groups.len());
        for (name, idx) in &g.groups {
            let xg = x2.index_select(idx, 0)?;
            let mut yg = match &shared {
                Some(y) => y.index_select(idx, 0)?,
                None => {
                    let pick = |p: &Param| match p.copy(name) {
                        Some(v) => crate::grad::live(v.as_tensor()),
                        None => crate::grad::live(p.base()),
                    };
                    let w = pick(&self.weight);
                    let b = self.bias.as_ref().map(pick);
                    self.affine(&xg, &w, b, false)?
                }
            };
            if name != mixed::BASE {
                if let Some(adapter) = self.adapters.get(name) {
                    yg = adapter.forward(&xg, yg, &base, false)?;
                }
            }
            outs.push(yg);
        }
        Ok(Tensor::cat(&outs, 0)?.index_select(&g.inverse, 0)?)
    }

    /// Mixed batches whose adapters here are all plain low-rank updates ([`LowRank`]): every
    /// row's factors gathered (rank padded with zeros, which adds exact zeros) and applied in two
    /// batched products, whatever the number of adapters. `None` when some adapter is not one.
    /// The gathered factors are kept with the rows ([`mixed::MixedRows::cached`]), so a
    /// generation gathers them once, not once per token.
    fn forward_low_rank(&self, x2: &Tensor, names: &[String]) -> Result<Option<Tensor>> {
        let (dtype, device) = (x2.dtype(), x2.device());
        let gathered = match mixed::current_rows() {
            Some(rows) => rows.cached(&format!("{}/low-rank/{dtype:?}", self.name), || {
                self.gather_low_rank(names, dtype, device)
            })?,
            None => std::rc::Rc::new(self.gather_low_rank(names, dtype, device)?),
        };
        if let RowFactors::NotLowRank = *gathered {
            return Ok(None);
        }
        let bias = self.bias.as_ref().map(|b| crate::grad::live(b.base()));
        let y = self.affine(x2, &crate::grad::live(self.weight.base()), bias, false)?;
        let RowFactors::Gathered { a, b, s } = &*gathered else {
            return Ok(Some(y));
        };
        let b_rows = names.len();
        let per = x2.dim(0)? / b_rows;
        let x3 = x2.reshape((b_rows, per, self.in_features()))?;
        let delta = x3.matmul(a)?.matmul(b)?.broadcast_mul(s)?;
        Ok(Some(
            (y + delta.reshape((b_rows * per, self.out_features()))?)?,
        ))
    }

    /// Each row's low-rank factors for [`Linear::forward_low_rank`].
    fn gather_low_rank(
        &self,
        names: &[String],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<RowFactors> {
        let mut factors: Vec<(&str, LowRank)> = Vec::new();
        for name in names {
            if name == mixed::BASE || factors.iter().any(|(n, _)| n == name) {
                continue;
            }
            let Some(adapter) = self.adapters.get(name) else {
                continue;
            };
            match adapter.low_rank() {
                Some(f) => factors.push((name, f)),
                None => return Ok(RowFactors::NotLowRank),
            }
        }
        let b_rows = names.len();
        let (k, out) = (self.in_features(), self.out_features());
        let r = factors
            .iter()
            .map(|(_, f)| f.a.dims().first().copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        if r == 0 {
            return Ok(RowFactors::NoRank);
        }
        let pad = |t: Tensor, dim: usize| -> Result<Tensor> {
            let have = t.dim(dim)?;
            let t = t.to_dtype(dtype)?;
            if have == r {
                return Ok(t);
            }
            let mut shape = t.dims().to_vec();
            shape[dim] = r - have;
            Ok(Tensor::cat(
                &[&t, &Tensor::zeros(shape, dtype, device)?],
                dim,
            )?)
        };
        // Slot 0 is the zero update (rows of the bare model or of an adapter absent here); slot
        // i + 1 is the i-th distinct adapter. Rows pick their slot with one gather.
        let mut a_slots = vec![Tensor::zeros((r, k), dtype, device)?];
        let mut b_slots = vec![Tensor::zeros((out, r), dtype, device)?];
        let mut scale_slots = vec![0f32];
        for (_, f) in &factors {
            a_slots.push(pad(f.a.clone(), 0)?);
            b_slots.push(pad(f.b.clone(), 1)?);
            scale_slots.push(f.scaling as f32);
        }
        let slot_of: Vec<u32> = names
            .iter()
            .map(|name| {
                factors
                    .iter()
                    .position(|(n, _)| n == name)
                    .map_or(0, |i| i as u32 + 1)
            })
            .collect();
        let slot_of = Tensor::from_vec(slot_of, b_rows, device)?;
        let a = Tensor::stack(&a_slots, 0)?
            .index_select(&slot_of, 0)?
            .transpose(1, 2)?
            .contiguous()?; // [B, in, r]
        let b = Tensor::stack(&b_slots, 0)?
            .index_select(&slot_of, 0)?
            .transpose(1, 2)?
            .contiguous()?; // [B, r, out]
        let s = Tensor::from_vec(scale_slots, factors.len() + 1, device)?
            .index_select(&slot_of, 0)?
            .reshape((b_rows, 1, 1))?
            .to_dtype(dtype)?;
        Ok(RowFactors::Gathered { a, b, s })
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
            let base = self.base()?;
            let weight = self.adapters.weight(name);
            let (w, b) = weighted_merge(adapter.merge(&base)?, &base, weight)?;
            if weight != 1.0 {
                let snapshot = (
                    name.clone(),
                    self.stored(),
                    self.bias.as_ref().map(|b| b.base().clone()),
                );
                self.snapshots.push(snapshot);
            }
            if self.quant().is_some() {
                tracing::warn!(
                    "Merge {name} into the quantized layer {} may give different generations \
                     due to rounding errors (the merged weight is re-quantized)",
                    self.name
                );
            }
            self.apply_weights(w, b)?;
            self.adapters.mark_merged(name, true);
        }
        Ok(())
    }

    /// Takes every merged adapter back out of the base weight, last merged first.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.adapters.merged().last().cloned() {
            if let Some(i) = self.snapshots.iter().position(|(n, _, _)| *n == name) {
                // Merged at a weight other than 1: restore the weights from before.
                let (_, w, b) = self.snapshots.remove(i);
                match w {
                    Stored::Dense(w) => self.weight.set_base(w)?,
                    Stored::Quant(q) => self.weight.set_quant(q)?,
                }
                if let (Some(b), Some(p)) = (b, self.bias.as_mut()) {
                    p.set_base(b)?;
                }
            } else if let Some(adapter) = self.adapters.get(&name) {
                if self.quant().is_some() {
                    tracing::warn!(
                        "Unmerge {name} from the quantized layer {} may give different \
                         generations due to rounding errors (the weight is re-quantized)",
                        self.name
                    );
                }
                let (w, b) = adapter.unmerge(&self.base()?)?;
                self.apply_weights(w, b)?;
            }
            self.adapters.mark_merged(&name, false);
        }
        Ok(())
    }

    fn stored(&self) -> Stored {
        match self.quant() {
            Some(q) => Stored::Quant(q.clone()),
            None => Stored::Dense(self.weight.base().clone()),
        }
    }

    fn apply_weights(&mut self, w_out_in: Tensor, bias: Option<Tensor>) -> Result<()> {
        if let Some(q) = self.quant() {
            let q = q.requantize(&w_out_in.detach())?;
            self.weight.set_quant(q)?;
            if let (Some(b), Some(p)) = (bias, self.bias.as_mut()) {
                p.set_base(b)?;
            }
            return Ok(());
        }
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

impl AdapterSite for Linear {
    fn site_name(&self) -> &str {
        &self.name
    }
    fn adapters(&self) -> &dyn AdapterList {
        &self.adapters
    }
    fn adapters_mut(&mut self) -> &mut dyn AdapterList {
        &mut self.adapters
    }
    fn merge(&mut self, names: &[String]) -> Result<()> {
        Linear::merge(self, names)
    }
    fn unmerge(&mut self) -> Result<()> {
        Linear::unmerge(self)
    }
}

/// A frozen weight as the product with `x` wants it: as stored when the product runs as autocast
/// runs it (a bf16 weight, an f32 input, on the CPU), else in `x`'s dtype (mixed precision's
/// fp32 trainable copies, `modules_to_save`, meeting bf16 activations).
fn weight_for(w: Tensor, x: &Tensor) -> Result<Tensor> {
    if ops::autocast_applies(x, &w) {
        Ok(w)
    } else {
        cast_to(w, x.dtype())
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

/// `(W', b')` of a merge taken at `weight`: `W + weight · (W' − W)` (the adapter's change
/// scaled, as diffusers' adapter weights scale it).
fn weighted_merge(
    merged: (Tensor, Option<Tensor>),
    base: &LinearBase,
    weight: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    if weight == 1.0 {
        return Ok(merged);
    }
    let w0 = base.weight_out_in()?;
    let w = (&w0 + ((merged.0 - &w0)? * weight)?)?;
    let b = match (merged.1, base.bias.as_ref()) {
        (Some(b1), Some(b0)) => Some((b0 + ((b1 - b0)? * weight)?)?),
        (b, _) => b,
    };
    Ok((w, b))
}
