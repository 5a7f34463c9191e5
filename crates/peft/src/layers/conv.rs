//! The adapter-aware 2-D convolution (torch's `nn.Conv2d`): the third kind of adaptation site,
//! beside [`super::Linear`] and [`super::Embedding`]. The UNet and the VAE of Stable Diffusion
//! build their convolutions from it, so the LoRA family attaches to them as PEFT's `_ConvNd`
//! layers do.

use candle_core::Tensor;

use super::adapter::{AdapterList, AdapterSite, Adapters, Conv2dAdapter};
use super::mixed;
use super::param::Param;
pub use crate::ops::ConvParams;
use crate::{ops, Error, Result};

/// The frozen base of a convolution as an adapter sees it.
#[derive(Clone)]
pub struct Conv2dBase {
    /// `[out, in / groups, kh, kw]`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: ConvParams,
}

impl Conv2dBase {
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input channels of the whole layer (all groups).
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.params.groups
    }

    /// `(kh, kw)`.
    pub fn kernel(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[2], d[3])
    }
}

#[derive(Debug)]
pub struct Conv2d {
    /// diffusers module path, e.g. `down_blocks.0.resnets.0.conv1`.
    pub name: String,
    /// `[out, in / groups, kh, kw]`.
    pub weight: Param,
    pub bias: Option<Param>,
    pub params: ConvParams,
    pub adapters: Adapters<dyn Conv2dAdapter>,
    /// The weight and bias from before each merge at an adapter weight other than 1.
    snapshots: Vec<(String, Tensor, Option<Tensor>)>,
}

impl Conv2d {
    pub fn new(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        params: ConvParams,
    ) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            bias: bias.map(|b| Param::new(format!("{name}.bias"), b)),
            name,
            params,
            adapters: Adapters::default(),
            snapshots: Vec::new(),
        }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.base().dims()[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.base().dims()[1] * self.params.groups
    }

    /// `(kh, kw)`.
    pub fn kernel(&self) -> (usize, usize) {
        let d = self.weight.base().dims();
        (d[2], d[3])
    }

    pub fn base(&self) -> Conv2dBase {
        Conv2dBase {
            weight: self.weight.value(),
            bias: self.bias.as_ref().map(|b| b.value()),
            params: self.params,
        }
    }

    /// `x`: `[batch, in, h, w]` → `[batch, out, h', w']`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.in_channels() {
            return Err(Error::ShapeMismatch {
                name: format!("input channels of {}", self.name),
                expected: vec![self.in_channels()],
                found: vec![c],
            });
        }
        let routes =
            (self.weight.has_copies() || !self.adapters.is_empty()) && !self.adapters.is_disabled();
        if let Some(names) = mixed::current().filter(|_| routes) {
            return self.forward_mixed(x, &names);
        }
        let mut y = self.affine(
            x,
            &self.weight.value(),
            self.bias.as_ref().map(|b| b.value()),
        )?;
        let base = self.base();
        for (adapter, w) in self.adapters.running_weighted() {
            y = if w == 1.0 {
                adapter.forward(x, y, &base, train)?
            } else {
                // diffusers' adapter weights: only the adapter's part is scaled.
                let with = adapter.forward(x, y.clone(), &base, train)?;
                (&y + ((with - &y)? * w)?)?
            };
        }
        Ok(y)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// The convolution with weight `w` and bias `b`, frozen unless they track gradients.
    fn affine(&self, x: &Tensor, w: &Tensor, b: Option<Tensor>) -> Result<Tensor> {
        let w = super::linear::cast_to(w.clone(), x.dtype())?;
        let b = match b {
            Some(b) => Some(super::linear::cast_to(b, x.dtype())?),
            None => None,
        };
        if w.track_op() || b.as_ref().is_some_and(|b| b.track_op()) {
            let y = conv2d(x, &w, self.params)?;
            return Ok(match b {
                Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
                None => y,
            });
        }
        ops::frozen_conv2d(x, &w, b.as_ref(), self.params)
    }

    /// PEFT's mixed batch on a convolution: each group of rows through its own adapter.
    fn forward_mixed(&self, x: &Tensor, names: &[String]) -> Result<Tensor> {
        let b = x.dim(0)?;
        let g = mixed::groups(names, Some(b), b, &self.name, x.device())?;
        let base = self.base();
        let mut outs = Vec::with_capacity(g.groups.len());
        for (name, idx) in &g.groups {
            let xg = x.index_select(idx, 0)?;
            let pick = |p: &Param| match p.copy(name) {
                Some(v) => crate::grad::live(v.as_tensor()),
                None => crate::grad::live(p.base()),
            };
            let w = pick(&self.weight);
            let bias = self.bias.as_ref().map(pick);
            let mut yg = self.affine(&xg, &w, bias)?;
            if name != mixed::BASE {
                if let Some(adapter) = self.adapters.get(name) {
                    yg = adapter.forward(&xg, yg, &base, false)?;
                }
            }
            outs.push(yg);
        }
        Ok(Tensor::cat(&outs, 0)?.index_select(&g.inverse, 0)?)
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
            let weight = self.adapters.weight(name);
            let (mut w, mut b) = adapter.merge(&self.base())?;
            if weight != 1.0 {
                let w0 = self.weight.base().clone();
                let b0 = self.bias.as_ref().map(|b| b.base().clone());
                w = (&w0 + ((w - &w0)? * weight)?)?;
                b = match (b, &b0) {
                    (Some(b1), Some(b0)) => Some((b0 + ((b1 - b0)? * weight)?)?),
                    (b, _) => b,
                };
                self.snapshots.push((name.clone(), w0, b0));
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
                let (_, w, b) = self.snapshots.remove(i);
                self.apply_weights(w, b)?;
            } else if let Some(adapter) = self.adapters.get(&name) {
                let (w, b) = adapter.unmerge(&self.base())?;
                self.apply_weights(w, b)?;
            }
            self.adapters.mark_merged(&name, false);
        }
        Ok(())
    }

    fn apply_weights(&mut self, w: Tensor, bias: Option<Tensor>) -> Result<()> {
        let dtype = self.weight.base().dtype();
        self.weight.set_base(w.to_dtype(dtype)?)?;
        if let (Some(b), Some(p)) = (bias, self.bias.as_mut()) {
            p.set_base(b.to_dtype(dtype)?)?;
        }
        Ok(())
    }
}

impl AdapterSite for Conv2d {
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
        Conv2d::merge(self, names)
    }
    fn unmerge(&mut self) -> Result<()> {
        Conv2d::unmerge(self)
    }
}

/// `x ⋆ w`, with gradients to both operands when they track them ([`ops::conv2d`]).
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    ops::conv2d(x, w, p)
}
