//! LoHa's layer math on a linear layer.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;

use crate::grad::live;
use crate::layers::{Adapter, LinearAdapter, LinearBase};
use crate::tuners::lora::layer::{kaiming_uniform, zeros};
use crate::tuners::lycoris::{forward_delta, LycorisDropout};
use crate::Result;

/// `w1a`, `w2a`: `[out, r]`; `w1b`, `w2b`: `[r, in]` (PEFT's `hada_w{1,2}_{a,b}`).
#[derive(Debug)]
pub struct LohaLinear {
    pub w1a: Var,
    pub w1b: Var,
    pub w2a: Var,
    pub w2b: Var,
    pub scaling: f64,
    pub dropout: LycorisDropout,
}

impl LohaLinear {
    /// PEFT's initialisation: He-uniform (`kaiming_uniform_(a=√5)`) factors, except `w2b`, which
    /// is zero when `init_weights` so that the adapter starts as the identity.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        scaling: f64,
        init_weights: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let w1a = kaiming_uniform(out_dim, r, rng, device)?;
        let w1b = kaiming_uniform(r, in_dim, rng, device)?;
        let w2a = kaiming_uniform(out_dim, r, rng, device)?;
        let w2b = if init_weights {
            zeros(r, in_dim, device)?
        } else {
            kaiming_uniform(r, in_dim, rng, device)?
        };
        Ok(Self {
            w1a: Var::from_tensor(&w1a)?,
            w1b: Var::from_tensor(&w1b)?,
            w2a: Var::from_tensor(&w2a)?,
            w2b: Var::from_tensor(&w2b)?,
            scaling,
            dropout: LycorisDropout {
                rank_dropout: 0.0,
                module_dropout: 0.0,
                rank_dropout_scale: true,
            },
        })
    }

    /// `ΔW = (W1a·W1b) ⊙ (W2a·W2b) · scaling`, `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let w1 = live(&self.w1a).matmul(&live(&self.w1b))?;
        let w2 = live(&self.w2a).matmul(&live(&self.w2b))?;
        Ok(((w1 * w2)? * self.scaling)?)
    }
}

impl Adapter for LohaLinear {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![
            ("hada_w1_a".into(), self.w1a.clone()),
            ("hada_w1_b".into(), self.w1b.clone()),
            ("hada_w2_a".into(), self.w2a.clone()),
            ("hada_w2_b".into(), self.w2b.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "loha.Linear"
    }
}

impl LinearAdapter for LohaLinear {
    fn forward(&self, x: &Tensor, out: Tensor, _base: &LinearBase, train: bool) -> Result<Tensor> {
        forward_delta(x, out, self.dropout, train, || self.delta_weight())
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.detach();
        Ok(((base.weight_out_in()? + delta)?, None))
    }

    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.detach();
        Ok(((base.weight_out_in()? - delta)?, None))
    }
}
