//! LoRA's layer math: `W x + s · B A dropout(x)`, with `s = alpha / r` (or `alpha / sqrt(r)` for
//! rsLoRA), on linear and embedding layers.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use std::any::Any;

use super::config::{InitLoraWeights, InitMethod};
use crate::grad::live;
use crate::layers::{Adapter, EmbeddingAdapter, LinearAdapter, LinearBase};
use crate::{ops, Error, Result};

/// LoRA on a linear layer. `a`: `[r, in]`, `b`: `[out, r]` (nn.Linear convention, whatever the
/// base layout).
#[derive(Debug)]
pub struct LoraLinear {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraLinear {
    /// Factors initialised as `init` says; no dropout (set the `dropout` field for that).
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        scaling: f64,
        init: &InitLoraWeights,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        // PiSSA and OLoRA replace both factors afterwards (they need the base weight).
        let (a, b) = match init.method()? {
            InitMethod::Default
            | InitMethod::Pissa
            | InitMethod::PissaNiter(_)
            | InitMethod::Olora => (
                kaiming_uniform(r, in_dim, rng, device)?,
                zeros(out_dim, r, device)?,
            ),
            InitMethod::Gaussian => (
                normal(r, in_dim, 1.0 / r as f64, rng, device)?,
                zeros(out_dim, r, device)?,
            ),
            // No initialisation: both factors keep nn.Linear's default init.
            InitMethod::Random => (
                kaiming_uniform(r, in_dim, rng, device)?,
                kaiming_uniform(out_dim, r, rng, device)?,
            ),
        };
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling,
            dropout: 0.0,
        })
    }

    /// `s · B A` as an `[out, in]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

impl Adapter for LoraLinear {
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
        "lora.Linear"
    }
}

impl LinearAdapter for LoraLinear {
    fn low_rank(&self) -> Option<crate::layers::LowRank> {
        Some(crate::layers::LowRank {
            a: live(&self.a),
            b: live(&self.b),
            scaling: self.scaling,
            dropout: self.dropout,
        })
    }

    fn forward(&self, x: &Tensor, out: Tensor, _base: &LinearBase, train: bool) -> Result<Tensor> {
        let x = ops::dropout(x, self.dropout, train)?;
        // fp32 master weights, computed in the activations' dtype (bf16 training).
        let (a, b) = (live(&self.a), live(&self.b));
        let (a, b) = if a.dtype() != x.dtype() {
            (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?)
        } else {
            (a, b)
        };
        // The scaling folded into `B` (`r × out`) rather than applied to the `[rows, out]`
        // product: one activation-sized pass and one kept tensor fewer.
        let b = if self.scaling == 1.0 {
            b
        } else {
            (b * self.scaling)?
        };
        let h = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
        Ok((out + h)?)
    }

    fn merge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? + self.delta_weight()?)?, None))
    }

    fn unmerge(&self, base: &LinearBase) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((base.weight_out_in()? - self.delta_weight()?)?, None))
    }
}

/// LoRA on an embedding table. `a`: `[r, num_embeddings]`, `b`: `[dim, r]`; the update to a row
/// `i` is `s · B a_i`. PEFT starts `a` at zero and `b` normal, the reverse of the linear case.
#[derive(Debug)]
pub struct LoraEmbedding {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
}

impl LoraEmbedding {
    pub fn new(
        num: usize,
        dim: usize,
        r: usize,
        scaling: f64,
        init: &InitLoraWeights,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (a, b) = match init {
            InitLoraWeights::Bool(false) => (
                normal(r, num, 1.0, rng, device)?,
                normal(dim, r, 1.0, rng, device)?,
            ),
            _ => (zeros(r, num, device)?, normal(dim, r, 1.0, rng, device)?),
        };
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling,
        })
    }
}

impl Adapter for LoraEmbedding {
    fn tensors(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_embedding_A".into(), self.a.clone()),
            ("lora_embedding_B".into(), self.b.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        "lora.Embedding"
    }
}

impl EmbeddingAdapter for LoraEmbedding {
    fn forward(&self, ids: &Tensor, out: Tensor, _train: bool) -> Result<Tensor> {
        let rows = live(&self.a).t()?.contiguous()?.index_select(ids, 0)?;
        let h = rows.matmul(&live(&self.b).t()?)?.to_dtype(out.dtype())?;
        Ok((out + (h * self.scaling)?)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(self.a.as_tensor())?.t()? * self.scaling)?)
    }
}

pub(crate) fn zeros(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((rows, cols), DType::F32, device)?)
}

/// torch's `kaiming_uniform_(w, a=sqrt(5))`, nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub(crate) fn kaiming_uniform(
    rows: usize,
    fan_in: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let dist = Uniform::new(-bound, bound).map_err(|e| Error::Config(e.to_string()))?;
    let v: Vec<f32> = (0..rows * fan_in).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, (rows, fan_in), device)?)
}

pub(crate) fn normal(
    rows: usize,
    cols: usize,
    std: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Tensor> {
    let dist = Normal::new(0.0f32, std as f32).map_err(|e| Error::Config(e.to_string()))?;
    let v: Vec<f32> = (0..rows * cols).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}
