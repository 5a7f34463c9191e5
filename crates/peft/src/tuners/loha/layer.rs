//! LoHa's layer math on a linear layer.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;

use crate::grad::live;
use crate::layers::{Adapter, Conv2dAdapter, Conv2dBase, ConvParams, LinearAdapter, LinearBase};
use crate::tuners::lora::layer::{kaiming_uniform, zeros};
use crate::tuners::lycoris::{cp_weight, forward_delta, forward_delta_conv, LycorisDropout};
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

/// LoHa on a convolution (PEFT's `loha.Conv2d`). Without `use_effective_conv2d` the kernel is
/// flattened to `[out, in / groups · kh · kw]` and the factors are the linear ones
/// (`w1a`, `w2a` `[out, r]`; `w1b`, `w2b` `[r, in·kh·kw]`); with it (kernels larger than 1×1),
/// each Hadamard operand is a CP rebuild from a core `hada_t{1,2}` `[r, r, kh, kw]` and mode
/// factors `w{1,2}a` `[r, out]`, `w{1,2}b` `[r, in / groups]`.
#[derive(Debug)]
pub struct LohaConv2d {
    pub w1a: Var,
    pub w1b: Var,
    pub w2a: Var,
    pub w2b: Var,
    /// The CP cores, with `use_effective_conv2d`.
    pub t: Option<(Var, Var)>,
    pub scaling: f64,
    pub dropout: LycorisDropout,
    pub params: ConvParams,
    /// The base kernel's shape `[out, in / groups, kh, kw]`.
    pub shape: [usize; 4],
}

impl LohaConv2d {
    /// PEFT's shapes and initialisation (He-uniform factors and cores, `w2b` zero when
    /// `init_weights`).
    pub fn new(
        base: &Conv2dBase,
        r: usize,
        scaling: f64,
        init_weights: bool,
        effective: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (out, in_g, kh, kw) = base.weight.dims4()?;
        let effective = effective && (kh, kw) != (1, 1);
        let var = |t: Tensor| Var::from_tensor(&t);
        let (w1a, w1b, w2a, w2b, t) = if effective {
            let t1 = kaiming_uniform(r, r * kh * kw, rng, device)?.reshape((r, r, kh, kw))?;
            let w1a = kaiming_uniform(r, out, rng, device)?;
            let w1b = kaiming_uniform(r, in_g, rng, device)?;
            let t2 = kaiming_uniform(r, r * kh * kw, rng, device)?.reshape((r, r, kh, kw))?;
            let w2a = kaiming_uniform(r, out, rng, device)?;
            let w2b = if init_weights {
                zeros(r, in_g, device)?
            } else {
                kaiming_uniform(r, in_g, rng, device)?
            };
            (w1a, w1b, w2a, w2b, Some((var(t1)?, var(t2)?)))
        } else {
            let fan = in_g * kh * kw;
            let w1a = kaiming_uniform(out, r, rng, device)?;
            let w1b = kaiming_uniform(r, fan, rng, device)?;
            let w2a = kaiming_uniform(out, r, rng, device)?;
            let w2b = if init_weights {
                zeros(r, fan, device)?
            } else {
                kaiming_uniform(r, fan, rng, device)?
            };
            (w1a, w1b, w2a, w2b, None)
        };
        Ok(Self {
            w1a: var(w1a)?,
            w1b: var(w1b)?,
            w2a: var(w2a)?,
            w2b: var(w2b)?,
            t,
            scaling,
            dropout: LycorisDropout {
                rank_dropout: 0.0,
                module_dropout: 0.0,
                rank_dropout_scale: true,
            },
            params: base.params,
            shape: [out, in_g, kh, kw],
        })
    }

    /// `ΔW`, `[out, in / groups, kh, kw]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let w = match &self.t {
            Some((t1, t2)) => {
                let w1 = cp_weight(&live(t1), &live(&self.w1a), &live(&self.w1b))?;
                let w2 = cp_weight(&live(t2), &live(&self.w2a), &live(&self.w2b))?;
                (w1 * w2)?
            }
            None => {
                let w1 = live(&self.w1a).matmul(&live(&self.w1b))?;
                let w2 = live(&self.w2a).matmul(&live(&self.w2b))?;
                (w1 * w2)?
            }
        };
        Ok((w * self.scaling)?.reshape(self.shape.to_vec())?)
    }
}

impl Adapter for LohaConv2d {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("hada_w1_a".into(), self.w1a.clone()),
            ("hada_w1_b".into(), self.w1b.clone()),
            ("hada_w2_a".into(), self.w2a.clone()),
            ("hada_w2_b".into(), self.w2b.clone()),
        ];
        if let Some((t1, t2)) = &self.t {
            v.push(("hada_t1".into(), t1.clone()));
            v.push(("hada_t2".into(), t2.clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "loha.Conv2d"
    }
}

impl Conv2dAdapter for LohaConv2d {
    fn forward(&self, x: &Tensor, out: Tensor, _base: &Conv2dBase, train: bool) -> Result<Tensor> {
        forward_delta_conv(x, out, self.dropout, train, self.params, || {
            self.delta_weight()
        })
    }

    fn merge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.detach();
        Ok(((&base.weight + delta)?, None))
    }

    fn unmerge(&self, base: &Conv2dBase) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.detach();
        Ok(((&base.weight - delta)?, None))
    }
}
