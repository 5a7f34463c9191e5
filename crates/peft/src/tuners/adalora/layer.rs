//! AdaLoRA's SVD-form update on a linear layer: `ΔW = B (A ⊙ E) · s / (ranknum + 1e-5)`, with
//! `A` `[r, in]` (right singular vectors), `E` `[r, 1]` (singular values) and `B` `[out, r]`.
//! Pruning a rank zeroes its entry of `E`; saving drops it.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, StandardNormal};
use std::any::Any;

use crate::grad::live;
use crate::layers::{Adapter, LinearAdapter, LinearBase};
use crate::{ops, Error, Result};

#[derive(Debug)]
pub struct AdaLoraLinear {
    pub a: Var,
    pub e: Var,
    pub b: Var,
    /// The rank the layer was created with (`init_r`); PEFT divides by it even after pruning.
    pub ranknum: f64,
    /// `lora_alpha`, or `r` when alpha is not positive (AdaLoRA does not divide alpha by r).
    pub scaling: f64,
    pub dropout: f64,
}

fn random(rows: usize, cols: usize, std: f64, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = if std == 1.0 {
        (0..rows * cols)
            .map(|_| StandardNormal.sample(rng))
            .collect()
    } else {
        let d = Normal::new(0.0f32, std as f32).map_err(|e| Error::Config(e.to_string()))?;
        (0..rows * cols).map(|_| d.sample(rng)).collect()
    };
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

impl AdaLoraLinear {
    /// PEFT's init: `E = 0`, `A, B ~ N(0, 0.02)`; with `init_lora_weights = false` all three
    /// standard normal. `r` may be below `ranknum` when a saved rank pattern is loaded.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        ranknum: usize,
        lora_alpha: f64,
        init: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (a, e, b) = if init {
            (
                random(r, in_dim, 0.02, rng, device)?,
                Tensor::zeros((r, 1), DType::F32, device)?,
                random(out_dim, r, 0.02, rng, device)?,
            )
        } else {
            (
                random(r, in_dim, 1.0, rng, device)?,
                random(r, 1, 1.0, rng, device)?,
                random(out_dim, r, 1.0, rng, device)?,
            )
        };
        Ok(Self {
            a: Var::from_tensor(&a)?,
            e: Var::from_tensor(&e)?,
            b: Var::from_tensor(&b)?,
            ranknum: ranknum as f64,
            scaling: if lora_alpha > 0.0 {
                lora_alpha
            } else {
                r as f64
            },
            dropout: 0.0,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `ranknum + 1e-5` as PEFT computes it (a float32 parameter plus a Python float).
    fn denom(&self) -> f64 {
        (self.ranknum as f32 + 1e-5f32) as f64
    }

    /// `B (A ⊙ E) · s / (ranknum + 1e-5)` as an `[out, in]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (out, inp) = (self.b.dims()[0], self.a.dims()[1]);
        if self.rank() == 0 {
            return Ok(Tensor::zeros((out, inp), DType::F32, self.a.device())?);
        }
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?;
        Ok(((self.b.matmul(&ae)? * self.scaling)? / self.denom())?)
    }
}

impl Adapter for AdaLoraLinear {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A".into(), self.a.clone()),
            ("lora_B".into(), self.b.clone()),
            ("lora_E".into(), self.e.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "adalora.SVDLinear"
    }

    /// PEFT keeps `ranknum` as a one-element frozen parameter.
    fn untracked_params(&self) -> usize {
        1
    }
}

impl LinearAdapter for AdaLoraLinear {
    /// `(A ⊙ E, B)` with `s / (ranknum + 1e-5)`: the whole update, so a frozen dense layer runs
    /// it in its own product. A layer pruned to rank 0 has none.
    fn low_rank(&self) -> Option<crate::layers::LowRank> {
        if self.rank() == 0 {
            return None;
        }
        let a = live(&self.a).broadcast_mul(&live(&self.e)).ok()?;
        Some(crate::layers::LowRank {
            a,
            b: live(&self.b),
            scaling: self.scaling / self.denom(),
            dropout: self.dropout,
        })
    }

    fn forward(&self, x: &Tensor, out: Tensor, _base: &LinearBase, train: bool) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(out);
        }
        let x = ops::dropout(x, self.dropout, train)?;
        let ae = live(&self.a).broadcast_mul(&live(&self.e))?;
        let h = x.matmul(&ae.t()?)?.matmul(&live(&self.b).t()?)?;
        Ok((out + ((h * self.scaling)? / self.denom())?)?)
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? + self.delta_weight()?)?, None))
    }

    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? - self.delta_weight()?)?, None))
    }
}

/// PEFT's orthogonal regularisation of one layer's factors: `‖A Aᵀ - I‖_F` and `‖Bᵀ B - I‖_F`.
/// A pruned-to-zero layer contributes two zero terms (they still count in PEFT's mean).
pub fn orth_terms(layer: &AdaLoraLinear) -> Result<Vec<Option<Tensor>>> {
    let r = layer.rank();
    if r == 0 {
        return Ok(vec![None, None]);
    }
    let eye = Tensor::eye(r, DType::F32, layer.a.device())?;
    let (a, b) = (live(&layer.a), live(&layer.b));
    let fro = |m: Tensor| -> Result<Tensor> { Ok((m - &eye)?.sqr()?.sum_all()?.sqrt()?) };
    Ok(vec![
        Some(fro(a.matmul(&a.t()?)?)?),
        Some(fro(b.t()?.matmul(&b)?)?),
    ])
}
