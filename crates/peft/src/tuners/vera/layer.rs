//! VeRA's layer math on a linear layer.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;

use crate::grad::live;
use crate::layers::{Adapter, LinearAdapter, LinearBase};
use crate::tuners::lora::layer::normal;
use crate::{ops, Result};

/// `λ_b` `[out]`, `λ_d` `[r]` (trained), and handles on the shared frozen projections
/// (`vera_a` `[r, max_in]`, `vera_b` `[max_out, r]`), of which this layer uses the leading
/// `in` columns / `out` rows.
#[derive(Debug)]
pub struct VeraLinear {
    pub lambda_b: Var,
    pub lambda_d: Var,
    pub vera_a: Var,
    pub vera_b: Var,
    pub in_features: usize,
    pub out_features: usize,
    pub dropout: f64,
}

impl VeraLinear {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_features: usize,
        out_features: usize,
        r: usize,
        (vera_a, vera_b): (Var, Var),
        init_weights: bool,
        d_initial: f64,
        dropout: f64,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (lambda_b, lambda_d) = if init_weights {
            (
                Tensor::zeros(out_features, DType::F32, device)?,
                (Tensor::ones(r, DType::F32, device)? * d_initial)?,
            )
        } else {
            (
                Tensor::ones(out_features, DType::F32, device)?,
                normal(1, r, 1.0, rng, device)?.flatten_all()?,
            )
        };
        Ok(Self {
            lambda_b: Var::from_tensor(&lambda_b)?,
            lambda_d: Var::from_tensor(&lambda_d)?,
            vera_a,
            vera_b,
            in_features,
            out_features,
            dropout,
        })
    }

    /// The slices of the shared projections this layer uses, frozen: `A` `[r, in]`, `B` `[out, r]`.
    fn projections(&self) -> Result<(Tensor, Tensor)> {
        let a = self
            .vera_a
            .as_tensor()
            .detach()
            .narrow(1, 0, self.in_features)?
            .contiguous()?;
        let b = self
            .vera_b
            .as_tensor()
            .detach()
            .narrow(0, 0, self.out_features)?
            .contiguous()?;
        Ok((a, b))
    }

    /// `(λ_b ⊙ B) · (λ_d ⊙ A)`, `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a, b) = self.projections()?;
        let lb = self.lambda_b.as_tensor().detach().unsqueeze(1)?;
        let ld = self.lambda_d.as_tensor().detach().unsqueeze(1)?;
        Ok(b.broadcast_mul(&lb)?.matmul(&a.broadcast_mul(&ld)?)?)
    }
}

impl Adapter for VeraLinear {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![
            ("vera_lambda_b".into(), self.lambda_b.clone()),
            ("vera_lambda_d".into(), self.lambda_d.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "vera.Linear"
    }
}

impl LinearAdapter for VeraLinear {
    /// `(λ_d ⊙ A, λ_b ⊙ B)`: the whole update as two thin factors, so a frozen dense layer runs
    /// it in its own product (the scales reach `λ` through the factors' gradients).
    fn low_rank(&self) -> Option<crate::layers::LowRank> {
        let factors = || -> Result<(Tensor, Tensor)> {
            let (a, b) = self.projections()?;
            let a = a.broadcast_mul(&live(&self.lambda_d).unsqueeze(1)?)?;
            let b = b.broadcast_mul(&live(&self.lambda_b).unsqueeze(1)?)?;
            Ok((a, b))
        };
        let (a, b) = factors().ok()?;
        Some(crate::layers::LowRank {
            a,
            b,
            scaling: 1.0,
            dropout: self.dropout,
        })
    }

    fn forward(&self, x: &Tensor, out: Tensor, _base: &LinearBase, train: bool) -> Result<Tensor> {
        let (a, b) = self.projections()?;
        let x = ops::dropout(x, self.dropout, train)?;
        // The projections are frozen: a plain matmul would also build their (discarded)
        // gradients, two products as large as the forward's.
        let h = ops::scale_columns(&ops::frozen_linear(&x, &a, false)?, &live(&self.lambda_d))?;
        let h = ops::scale_columns(&ops::frozen_linear(&h, &b, false)?, &live(&self.lambda_b))?;
        Ok((out + h)?)
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? + self.delta_weight()?)?, None))
    }

    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? - self.delta_weight()?)?, None))
    }
}
