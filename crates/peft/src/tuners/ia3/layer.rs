//! IA3's layer math on a linear layer.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;

use crate::grad::live;
use crate::layers::{Adapter, LinearAdapter, LinearBase};
use crate::tuners::lora::layer::normal;
use crate::{ops, Result};

/// PEFT's tolerance in the unmerge division.
const UNMERGE_EPS: f64 = 1e-8;

/// `l`: `[out, 1]` (output scaling) or `[1, in]` (feed-forward: input scaling), PEFT's `ia3_l`.
#[derive(Debug)]
pub struct Ia3Linear {
    pub l: Var,
    pub feedforward: bool,
}

impl Ia3Linear {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        feedforward: bool,
        init_ones: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (rows, cols) = if feedforward {
            (1, in_dim)
        } else {
            (out_dim, 1)
        };
        let l = if init_ones {
            Tensor::ones((rows, cols), candle_core::DType::F32, device)?
        } else {
            normal(rows, cols, 1.0, rng, device)?
        };
        Ok(Self {
            l: Var::from_tensor(&l)?,
            feedforward,
        })
    }

    /// The `[out, in]` weight times `l` (`+ eps` and divided when `inverse`), and the bias
    /// likewise for output scaling.
    fn scaled(&self, base: &LinearBase, inverse: bool) -> Result<(Tensor, Option<Tensor>)> {
        let l = self.l.as_tensor().detach();
        let apply = |t: &Tensor, s: &Tensor| -> Result<Tensor> {
            Ok(if inverse {
                t.broadcast_div(&(s + UNMERGE_EPS)?)?
            } else {
                t.broadcast_mul(s)?
            })
        };
        let w = apply(&base.weight_out_in()?, &l)?;
        let bias = match (&base.bias, self.feedforward) {
            (Some(b), false) => Some(apply(b, &l.flatten_all()?)?),
            _ => None,
        };
        Ok((w, bias))
    }
}

impl Adapter for Ia3Linear {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "Linear"
    }
}

impl LinearAdapter for Ia3Linear {
    /// Output scaling: `y · l`. Input scaling: `W (x ⊙ l) + b`, computed from the output already
    /// there as `y + W (x ⊙ (l − 1))`, which is the same function.
    fn forward(&self, x: &Tensor, out: Tensor, base: &LinearBase, _train: bool) -> Result<Tensor> {
        let l = live(&self.l);
        if self.feedforward {
            let xs = ops::scale_columns(x, &(l - 1.0)?)?;
            let h = base.product(&xs)?;
            Ok((out + h)?)
        } else {
            ops::scale_columns(&out, &l)
        }
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        self.scaled(base, false)
    }

    /// Divides by `l + 1e-8`, as PEFT does (inexact, as PEFT warns).
    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        self.scaled(base, true)
    }
}
