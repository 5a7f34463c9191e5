//! LayerNorm and RMSNorm with a backward pass (candle's fused kernels have none).

use candle_core::Tensor;

use super::param::Param;
use crate::{ops, Result};

#[derive(Debug)]
pub struct LayerNorm {
    pub name: String,
    pub weight: Param,
    pub bias: Option<Param>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            bias: bias.map(|b| Param::new(format!("{name}.bias"), b)),
            name,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(
            x,
            &self.weight.value(),
            self.bias.as_ref().map(|b| b.value()).as_ref(),
            self.eps,
        )
    }

    /// `forward(hidden + residual)`, as one node where it can be ([`ops::add_layer_norm`]).
    pub fn forward_residual(&self, hidden: &Tensor, residual: &Tensor) -> Result<Tensor> {
        ops::add_layer_norm(
            hidden,
            residual,
            &self.weight.value(),
            self.bias.as_ref().map(|b| b.value()).as_ref(),
            self.eps,
        )
    }
}

/// RMSNorm (Llama's `LlamaRMSNorm`, T5's `T5LayerNorm`): scale only, no mean, no bias.
#[derive(Debug)]
pub struct RmsNorm {
    pub name: String,
    pub weight: Param,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(name: impl Into<String>, weight: Tensor, eps: f64) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            name,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight.value(), self.eps)
    }
}

/// GroupNorm (torch's `nn.GroupNorm`) over `[batch, channels, ...]`: the channels split into
/// `groups`, each normalised over its channels and positions with the biased variance, then a
/// per-channel affine. With a frozen affine (the PEFT case) the forward pass records one node and
/// the backward is the closed form for `dx`; trained affine parameters go through primitives.
#[derive(Debug)]
pub struct GroupNorm {
    pub name: String,
    pub weight: Param,
    pub bias: Param,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(
        name: impl Into<String>,
        weight: Tensor,
        bias: Tensor,
        groups: usize,
        eps: f64,
    ) -> Self {
        let name = name.into();
        Self {
            weight: Param::new(format!("{name}.weight"), weight),
            bias: Param::new(format!("{name}.bias"), bias),
            name,
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(
            x,
            &self.weight.value(),
            &self.bias.value(),
            self.groups,
            self.eps,
        )
    }
}
