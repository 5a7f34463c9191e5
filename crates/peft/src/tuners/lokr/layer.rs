//! LoKr's layer math on a linear layer.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::any::Any;

use super::{LokrConfig, LokrInit};
use crate::grad::live;
use crate::layers::{Adapter, Conv2dAdapter, Conv2dBase, ConvParams, LinearAdapter, LinearBase};
use crate::tuners::lora::layer::{kaiming_uniform, zeros};
use crate::tuners::lycoris::{
    cp_weight, forward_delta, forward_delta_conv, kron, kron4, LycorisDropout,
};
use crate::Result;

/// One Kronecker factor: a full matrix (`lokr_w1`), a rank-`r` product (`lokr_w1_a · lokr_w1_b`)
/// or, for a convolution's `W2` with `use_effective_conv2d`, a CP rebuild from a core
/// (`lokr_t2`, `lokr_w2_a`, `lokr_w2_b`).
#[derive(Debug)]
pub enum Factor {
    Full(Var),
    Product(Var, Var),
    Cp(Var, Var, Var),
}

impl Factor {
    fn value(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(w) => live(w),
            Factor::Product(a, b) => live(a).matmul(&live(b))?,
            Factor::Cp(t, a, b) => cp_weight(&live(t), &live(a), &live(b))?,
        })
    }

    fn tensors(&self, stem: &str) -> Vec<(String, Var)> {
        match self {
            Factor::Full(w) => vec![(stem.to_string(), w.clone())],
            Factor::Product(a, b) => vec![
                (format!("{stem}_a"), a.clone()),
                (format!("{stem}_b"), b.clone()),
            ],
            Factor::Cp(t, a, b) => vec![
                (format!("{stem}_a"), a.clone()),
                (format!("{stem}_b"), b.clone()),
                (stem.replace("_w", "_t"), t.clone()),
            ],
        }
    }
}

/// `w1`: `[out_l, in_m]`, `w2`: `[out_k, in_n]`, with `out = out_l·out_k`, `in = in_m·in_n`.
#[derive(Debug)]
pub struct LokrLinear {
    pub w1: Factor,
    pub w2: Factor,
    pub scaling: f64,
    pub dropout: LycorisDropout,
}

/// PEFT's `factorization`: splits `dimension` into `(m, n)`, `m·n = dimension`. A positive
/// `factor` that divides it gives `(factor, dimension / factor)` as it is; otherwise the pair of
/// divisors with the smallest sum whose smaller one is at most `factor` (any with `-1`), smaller
/// first.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        std::mem::swap(&mut m, &mut n);
    }
    (m, n)
}

impl LokrLinear {
    /// Shapes and initialisation as PEFT's `update_layer` for nn.Linear.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        scaling: f64,
        config: &LokrConfig,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (in_m, in_n) = factorization(in_dim, config.decompose_factor);
        let (out_l, out_k) = factorization(out_dim, config.decompose_factor);
        let rf = r as f64;
        let use_w1 = !(config.decompose_both && rf < out_l.max(in_m) as f64 / 2.0);
        let use_w2 = rf >= out_k.max(in_n) as f64 / 2.0;
        // Which factor starts at zero: W1 (`true`), W2 (`"lycoris"`), none (`false`).
        let (zero_w1, zero_w2) = match &config.init_weights {
            LokrInit::Bool(true) => (true, false),
            LokrInit::Bool(false) => (false, false),
            LokrInit::Named(_) => (false, true),
        };
        // Draw order follows PEFT's: W1 (or w1_a, w1_b), then W2 (or w2_a, w2_b).
        let w1 = if use_w1 {
            Factor::Full(Var::from_tensor(&if zero_w1 {
                zeros(out_l, in_m, device)?
            } else {
                kaiming_uniform(out_l, in_m, rng, device)?
            })?)
        } else {
            let a = if zero_w1 {
                zeros(out_l, r, device)?
            } else {
                kaiming_uniform(out_l, r, rng, device)?
            };
            let b = kaiming_uniform(r, in_m, rng, device)?;
            Factor::Product(Var::from_tensor(&a)?, Var::from_tensor(&b)?)
        };
        let w2 = if use_w2 {
            Factor::Full(Var::from_tensor(&if zero_w2 {
                zeros(out_k, in_n, device)?
            } else {
                kaiming_uniform(out_k, in_n, rng, device)?
            })?)
        } else {
            let a = kaiming_uniform(out_k, r, rng, device)?;
            let b = if zero_w2 {
                zeros(r, in_n, device)?
            } else {
                kaiming_uniform(r, in_n, rng, device)?
            };
            Factor::Product(Var::from_tensor(&a)?, Var::from_tensor(&b)?)
        };
        Ok(Self {
            w1,
            w2,
            scaling,
            dropout: LycorisDropout {
                rank_dropout: 0.0,
                module_dropout: 0.0,
                rank_dropout_scale: false,
            },
        })
    }

    /// `ΔW = kron(W1, W2) · scaling`, `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((kron(&self.w1.value()?, &self.w2.value()?)? * self.scaling)?)
    }
}

impl Adapter for LokrLinear {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut v = self.w1.tensors("lokr_w1");
        v.extend(self.w2.tensors("lokr_w2"));
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "lokr.Linear"
    }
}

impl LinearAdapter for LokrLinear {
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

/// LoKr on a convolution (PEFT's `lokr.Conv2d`): `ΔW = kron(W1, W2) · scaling` reshaped to the
/// kernel `[out, in / groups, kh, kw]`, with `W2` a full kernel `[out_k, in_n, kh, kw]` when the
/// rank is large against it, else a CP rebuild (`use_effective_conv2d`, kernels larger than 1×1)
/// or a product `[out_k, r] · [r, in_n · kh · kw]`.
#[derive(Debug)]
pub struct LokrConv2d {
    pub w1: Factor,
    pub w2: Factor,
    pub scaling: f64,
    pub dropout: LycorisDropout,
    pub params: ConvParams,
    pub shape: [usize; 4],
}

impl LokrConv2d {
    /// Shapes and initialisation as PEFT's `update_layer` for nn.Conv2d.
    pub fn new(
        base: &Conv2dBase,
        r: usize,
        scaling: f64,
        config: &LokrConfig,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (out_dim, in_dim, kh, kw) = base.weight.dims4()?;
        let (in_m, in_n) = factorization(in_dim, config.decompose_factor);
        let (out_l, out_k) = factorization(out_dim, config.decompose_factor);
        let rf = r as f64;
        let use_w1 = !(config.decompose_both && rf < out_l.max(in_m) as f64 / 2.0);
        let use_w2 = rf >= out_k.max(in_n) as f64 / 2.0;
        let effective = config.common.use_effective_conv2d && (kh, kw) != (1, 1);
        // Which factor starts at zero: W1 (`true`), W2 (`"lycoris"`), none (`false`).
        let (zero_w1, zero_w2) = match &config.init_weights {
            LokrInit::Bool(true) => (true, false),
            LokrInit::Bool(false) => (false, false),
            LokrInit::Named(_) => (false, true),
        };
        let var = |t: Tensor| Var::from_tensor(&t);
        let w1 = if use_w1 {
            Factor::Full(var(if zero_w1 {
                zeros(out_l, in_m, device)?
            } else {
                kaiming_uniform(out_l, in_m, rng, device)?
            })?)
        } else {
            let a = if zero_w1 {
                zeros(out_l, r, device)?
            } else {
                kaiming_uniform(out_l, r, rng, device)?
            };
            Factor::Product(var(a)?, var(kaiming_uniform(r, in_m, rng, device)?)?)
        };
        let w2 = if use_w2 {
            let w = if zero_w2 {
                zeros(out_k, in_n * kh * kw, device)?
            } else {
                kaiming_uniform(out_k, in_n * kh * kw, rng, device)?
            };
            Factor::Full(var(w.reshape((out_k, in_n, kh, kw))?)?)
        } else if effective {
            let t = kaiming_uniform(r, r * kh * kw, rng, device)?.reshape((r, r, kh, kw))?;
            let a = kaiming_uniform(r, out_k, rng, device)?;
            let b = if zero_w2 {
                zeros(r, in_n, device)?
            } else {
                kaiming_uniform(r, in_n, rng, device)?
            };
            Factor::Cp(var(t)?, var(a)?, var(b)?)
        } else {
            let a = kaiming_uniform(out_k, r, rng, device)?;
            let b = if zero_w2 {
                zeros(r, in_n * kh * kw, device)?
            } else {
                kaiming_uniform(r, in_n * kh * kw, rng, device)?
            };
            Factor::Product(var(a)?, var(b)?)
        };
        Ok(Self {
            w1,
            w2,
            scaling,
            dropout: LycorisDropout {
                rank_dropout: 0.0,
                module_dropout: 0.0,
                rank_dropout_scale: false,
            },
            params: base.params,
            shape: [out_dim, in_dim, kh, kw],
        })
    }

    /// `ΔW`, `[out, in / groups, kh, kw]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let w1 = self.w1.value()?;
        let w2 = self.w2.value()?;
        let w = if w2.rank() == 4 {
            kron4(&w1, &w2)?
        } else {
            kron(&w1, &w2)?
        };
        Ok((w * self.scaling)?.reshape(self.shape.to_vec())?)
    }
}

impl Adapter for LokrConv2d {
    fn tensors(&self) -> Vec<(String, Var)> {
        let mut v = self.w1.tensors("lokr_w1");
        v.extend(self.w2.tensors("lokr_w2"));
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "lokr.Conv2d"
    }
}

impl Conv2dAdapter for LokrConv2d {
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

#[cfg(test)]
mod tests {
    use super::factorization;

    /// The examples of PEFT's docstring.
    #[test]
    fn factorization_matches_peft_examples() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(32, 8), (8, 4));
        assert_eq!(factorization(32, -1), (4, 8));
    }
}
