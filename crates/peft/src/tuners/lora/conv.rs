//! LoRA and DoRA on a 2-D convolution, as PEFT 0.21's `lora.Conv2d` (`_ConvNd`) computes them:
//! `lora_A` is a convolution from the layer's input channels to `r` with the base kernel size,
//! stride and padding (dilation 1, one group, no bias), `lora_B` a 1×1 convolution from `r` to
//! the output channels with the base layer's groups; the output gains `s · B(A(dropout(x)))`.
//! Merging adds `ΔW[o, i, :, :] = s · Σ_r B[o, r] · A[r, i, :, :]` (PEFT refuses to merge a
//! grouped convolution, and so does this).

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;
use std::sync::Mutex;

use super::config::{InitLoraWeights, InitMethod};
use super::layer::{kaiming_uniform, normal, zeros};
use crate::grad::live;
use crate::layers::conv::conv2d;
use crate::layers::{Adapter, Conv2dAdapter, Conv2dBase, ConvParams};
use crate::{ops, Error, Result};

/// LoRA on a convolution. `a`: `[r, in, kh, kw]`, `b`: `[out, r / groups, 1, 1]`.
#[derive(Debug)]
pub struct LoraConv2d {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    /// `lora_A`'s stride and padding (the base layer's; dilation 1 and one group, as PEFT builds
    /// it).
    pub a_params: ConvParams,
    /// The base layer's groups, which `lora_B` shares.
    pub groups: usize,
}

impl LoraConv2d {
    /// Factors for `base`, initialised as `init` says (PiSSA, OLoRA and friends are for linear
    /// layers only, as in PEFT, where conv layers fall back to the default).
    pub fn new(
        base: &Conv2dBase,
        r: usize,
        scaling: f64,
        init: &InitLoraWeights,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let groups = base.params.groups;
        if !r.is_multiple_of(groups) {
            return Err(Error::Config(format!(
                "LoRA rank {r} on a Conv2d with groups={groups}: PEFT supports only ranks divisible \
                 by the groups; choose another rank or do not target this layer"
            )));
        }
        let (kh, kw) = base.kernel();
        let fan_in = base.in_channels() * kh * kw;
        let a = match init.method()? {
            InitMethod::Gaussian => normal(r, fan_in, 1.0 / r as f64, rng, device)?,
            _ => kaiming_uniform(r, fan_in, rng, device)?,
        };
        let a = a.reshape((r, base.in_channels(), kh, kw))?;
        let b = match init {
            InitLoraWeights::Bool(false) => {
                kaiming_uniform(base.out_channels(), r / groups, rng, device)?
            }
            _ => zeros(base.out_channels(), r / groups, device)?,
        };
        let b = b.reshape((base.out_channels(), r / groups, 1, 1))?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling,
            dropout: 0.0,
            a_params: ConvParams {
                stride: base.params.stride,
                padding: base.params.padding,
                dilation: 1,
                groups: 1,
            },
            groups,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `B(A(x))` without scaling.
    fn branch(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = (live(&self.a), live(&self.b));
        let (a, b) = if a.dtype() != x.dtype() {
            (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?)
        } else {
            (a, b)
        };
        let h = conv2d(x, &a, self.a_params)?;
        conv2d(
            &h,
            &b,
            ConvParams {
                groups: self.groups,
                ..ConvParams::default()
            },
        )
    }

    /// `B · A` as a kernel of the base shape, without scaling (PEFT's `get_delta_weight` / s).
    fn product(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let r = self.rank();
        let (_, i, kh, kw) = a.dims4()?;
        let o = b.dims()[0];
        let bm = b.reshape((o, r))?;
        let am = a.reshape((r, i * kh * kw))?;
        Ok(bm.matmul(&am)?.reshape((o, i, kh, kw))?)
    }

    /// `s · B A`, `[out, in, kh, kw]`, for one group.
    pub fn delta_weight(&self) -> Result<Tensor> {
        if self.groups > 1 {
            return Err(Error::Adapter(
                "merging LoRA into a Conv2d with groups > 1 is not supported (as in PEFT)".into(),
            ));
        }
        Ok((self.product(self.a.as_tensor(), self.b.as_tensor())? * self.scaling)?)
    }
}

impl Adapter for LoraConv2d {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "lora.Conv2d"
    }
}

impl Conv2dAdapter for LoraConv2d {
    fn forward(&self, x: &Tensor, out: Tensor, _base: &Conv2dBase, train: bool) -> Result<Tensor> {
        let x = ops::dropout(x, self.dropout, train)?;
        let h = self.branch(&x)?;
        Ok((out + (h * self.scaling)?)?)
    }

    fn merge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let d = self.delta_weight()?.to_dtype(base.weight.dtype())?;
        Ok(((&base.weight + d)?, None))
    }

    fn unmerge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let d = self.delta_weight()?.to_dtype(base.weight.dtype())?;
        Ok(((&base.weight - d)?, None))
    }
}

/// Norms of each output filter of a `[out, ...]` kernel, as `[1, out, 1, 1]` (PEFT's conv
/// `get_weight_norm`, transposed as it stores the magnitude).
fn filter_norm(w: &Tensor) -> Result<Tensor> {
    let o = w.dims()[0];
    Ok(w.reshape((o, ()))?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .reshape((1, o, 1, 1))?)
}

/// DoRA on a convolution: LoRA plus `lora_magnitude_vector` `[1, out, 1, 1]` (PEFT's
/// `DoraConv2dLayer`). The filter norm of `W + s·B A` is computed from a detached `B A` and then
/// detached itself, as on linear layers.
#[derive(Debug)]
pub struct DoraConv2d {
    pub lora: LoraConv2d,
    pub magnitude: Var,
    merged_norm: Mutex<Option<Tensor>>,
}

impl DoraConv2d {
    /// Starts `m` at the filter norms of `W + s·B A`, so the layer's output is unchanged.
    pub fn new(lora: LoraConv2d, base: &Conv2dBase) -> Result<Self> {
        if lora.groups > 1 {
            return Err(Error::Config(
                "DoRA on a Conv2d with groups > 1 is not supported (PEFT's weight norm assumes one \
                 group)"
                    .into(),
            ));
        }
        let norm = filter_norm(&(&base.weight + lora.delta_weight()?)?)?;
        Ok(Self {
            lora,
            magnitude: Var::from_tensor(&norm)?,
            merged_norm: Mutex::new(None),
        })
    }

    fn weight_norm(&self, w: &Tensor) -> Result<Tensor> {
        let delta = self.lora.delta_weight()?.detach();
        filter_norm(&(w.detach() + delta)?)
    }
}

impl Adapter for DoraConv2d {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut t = self.lora.tensors();
        t.push(("lora_magnitude_vector".into(), self.magnitude.clone()));
        t
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn supports_mixed_batch(&self) -> bool {
        false
    }

    fn type_name(&self) -> &'static str {
        "lora.Conv2d"
    }
}

impl Conv2dAdapter for DoraConv2d {
    fn forward(&self, x: &Tensor, out: Tensor, base: &Conv2dBase, train: bool) -> Result<Tensor> {
        let lora = &self.lora;
        let norm = self.weight_norm(&base.weight)?;
        let scale = (live(&self.magnitude) / norm)?; // [1, out, 1, 1]
        let dropping = lora.dropout > 0.0 && train;
        let (x, base_result) = if dropping {
            let xd = ops::dropout(x, lora.dropout, true)?;
            let y = ops::frozen_conv2d(&xd, &base.weight, None, base.params)?;
            (xd, y)
        } else {
            let y = match &base.bias {
                Some(b) => out.broadcast_sub(&b.detach().reshape((1, (), 1, 1))?)?,
                None => out.clone(),
            };
            (x.clone(), y)
        };
        let lora_result = lora.branch(&x)?;
        let dora = (base_result.broadcast_mul(&scale.affine(1.0, -1.0)?)?
            + lora_result.broadcast_mul(&scale.affine(lora.scaling, 0.0)?)?)?;
        Ok((out + dora)?)
    }

    fn merge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.lora.delta_weight()?;
        let norm = filter_norm(&(&base.weight + &delta)?)?;
        let f = (self.magnitude.as_tensor() / &norm)?
            .detach()
            .reshape(((), 1, 1, 1))?;
        let merged = f.broadcast_mul(&(&base.weight + delta)?)?;
        *self.merged_norm.lock().map_err(|_| poisoned())? = Some(norm);
        Ok((merged, None))
    }

    fn unmerge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let norm = self
            .merged_norm
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| Error::Adapter("DoRA: unmerge without a merge".into()))?;
        let f = (self.magnitude.as_tensor() / norm)?
            .detach()
            .reshape(((), 1, 1, 1))?;
        let w = (base.weight.broadcast_div(&f)? - self.lora.delta_weight()?)?;
        Ok((w, None))
    }
}

fn poisoned() -> Error {
    Error::Adapter("DoRA: a thread panicked while merging".into())
}
