//! One bottleneck adapter at one hook point, computed as AdapterHub's `Adapter` /
//! `ParallelAdapter` (`adapters/methods/modeling.py`) and `BottleneckLayer`'s Stack composition
//! (`methods/bottleneck.py`) compute it.
//!
//! With `h` the sub-layer output, `r` its residual input and `LN` the block's normalisation (none
//! in pre-norm blocks), a stack of adapters runs, for each adapter in turn, `pre_forward` (the
//! input and residual it sees: e.g. Pfeiffer's `LN(h + r)` with residual `h`), its bottleneck
//! (`[LN_before] → down → act → up → · scaling → dropout → · gate`, its residual, `[LN_after]`),
//! and the last adapter's `post_forward` (`LN(x + r)` when `original_ln_after`; a parallel
//! adapter adds `h` first).

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use std::any::Any;

use super::config::{BottleneckConfig, ResidualBeforeLn, Scaling};
use crate::error::config_err;
use crate::layers::{Adapter, HookAdapter, HookInput, HookPoint, LayerNorm};
use crate::{ops, Error, Result};

/// AdapterHub's `Activation_Function_Class`: transformers' `ACT2FN` names, lower-cased.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    Relu,
    Gelu,
    GeluTanh,
    Silu,
    Tanh,
    Sigmoid,
    LeakyRelu,
    Linear,
}

impl Act {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_lowercase().as_str() {
            "relu" => Act::Relu,
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "swish" | "silu" => Act::Silu,
            "tanh" => Act::Tanh,
            "sigmoid" => Act::Sigmoid,
            "leakyrelu" => Act::LeakyRelu,
            "linear" => Act::Linear,
            other => {
                return Err(config_err!(
                    "non-linearity `{other}` is not supported; supported: relu, gelu, gelu_new, \
                     swish, silu, tanh, sigmoid, leakyrelu, linear"
                ))
            }
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Relu => x.relu()?,
            Act::Gelu => ops::gelu_erf(x)?,
            Act::GeluTanh => x.gelu()?,
            Act::Silu => x.silu()?,
            Act::Tanh => x.tanh()?,
            Act::Sigmoid => sigmoid(x)?,
            Act::LeakyRelu => {
                // torch's default negative slope 0.01: max(x, 0) + 0.01 · min(x, 0).
                let pos = x.relu()?;
                let neg = (x - &pos)?;
                (pos + (neg * 0.01)?)?
            }
            Act::Linear => x.clone(),
        })
    }
}

/// `1 / (1 + e^{-x})` from ops with a backward.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// `x W^T + b` for `x` of any rank, with trainable `W` `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims[dims.len() - 1];
    let rows = x.elem_count() / n.max(1);
    let y = x.reshape((rows, n))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// A trainable LayerNorm (nn.LayerNorm, eps 1e-5).
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Var,
    pub bias: Var,
}

impl Norm {
    fn new(h: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::ones(h, DType::F32, device)?,
            bias: Var::zeros(h, DType::F32, device)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::grad::live(self.weight.as_tensor()).to_dtype(x.dtype())?;
        let b = crate::grad::live(self.bias.as_tensor()).to_dtype(x.dtype())?;
        ops::layer_norm(x, &w, Some(&b), 1e-5)
    }
}

#[derive(Debug, Clone)]
pub enum Scale {
    Fixed(f64),
    /// `"learned"` (`[1]`) or `"channel"` (`[hidden]`).
    Trained(Var),
}

/// A weight and bias pair.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Dense {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::grad::live(self.weight.as_tensor()).to_dtype(x.dtype())?;
        let b = match &self.bias {
            Some(b) => Some(crate::grad::live(b.as_tensor()).to_dtype(x.dtype())?),
            None => None,
        };
        linear(x, &w, b.as_ref())
    }
}

/// The behaviour flags of one adapter, from its config.
#[derive(Debug, Clone)]
struct Flags {
    parallel: bool,
    original_ln_before: bool,
    original_ln_after: bool,
    residual_before_ln: ResidualBeforeLn,
    adapter_residual_before_ln: bool,
    dropout: f64,
}

/// One bottleneck adapter at one hook point.
#[derive(Debug)]
pub struct Bottleneck {
    flags: Flags,
    act: Act,
    pub norm_before: Option<Norm>,
    pub down: Dense,
    pub up: Dense,
    pub scaling: Scale,
    pub norm_after: Option<Norm>,
    pub gate: Option<Dense>,
}

/// What an adapter's bottleneck produced: its output (residual included) and the scaled
/// up-projection (what AdapterFusion attends over).
pub struct Out {
    pub output: Tensor,
    pub up: Tensor,
}

fn normal(rng: &mut StdRng, shape: (usize, usize), std: f64, dev: &Device) -> Result<Var> {
    let d = Normal::new(0.0f32, std as f32).map_err(|e| Error::Adapter(e.to_string()))?;
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| d.sample(rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)?)
}

/// torch's `trunc_normal_(mean 0, std, a = -2 std, b = 2 std)` by rejection.
fn trunc_normal(rng: &mut StdRng, shape: (usize, usize), std: f64, dev: &Device) -> Result<Var> {
    let d = Normal::new(0.0f32, std as f32).map_err(|e| Error::Adapter(e.to_string()))?;
    let lim = 2.0 * std as f32;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| loop {
            let x = d.sample(rng);
            if x.abs() <= lim {
                break x;
            }
        })
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)?)
}

/// nn.Linear's default init (kaiming_uniform a=√5 → U(±1/√fan_in), bias U(±1/√fan_in)).
fn kaiming(rng: &mut StdRng, shape: (usize, usize), dev: &Device) -> Result<Var> {
    let bound = 1.0 / (shape.1 as f32).sqrt();
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)?)
}

fn zeros(shape: usize, dev: &Device) -> Result<Var> {
    Ok(Var::zeros(shape, DType::F32, dev)?)
}

impl Bottleneck {
    /// A new adapter for hidden size `h` and bottleneck `d`, initialised as `init_weights` says.
    pub fn new(
        config: &BottleneckConfig,
        h: usize,
        d: usize,
        rng: &mut StdRng,
        dev: &Device,
    ) -> Result<Self> {
        let act = Act::parse(&config.non_linearity)?;
        let norm_before = config.ln_before.then(|| Norm::new(h, dev)).transpose()?;
        let norm_after = config.ln_after.then(|| Norm::new(h, dev)).transpose()?;
        let (down_w, up_w, gate) = match config.init_weights.as_str() {
            "bert" => {
                let down = normal(rng, (d, h), 0.02, dev)?;
                let up = normal(rng, (h, d), 0.02, dev)?;
                let gate = config
                    .use_gating
                    .then(|| normal(rng, (1, h), 0.02, dev))
                    .transpose()?;
                (
                    down,
                    up,
                    gate.map(|w| zeros(1, dev).map(|b| (w, b))).transpose()?,
                )
            }
            "mam_adapter" => {
                let down = kaiming(rng, (d, h), dev)?;
                let up = Var::zeros((h, d), DType::F32, dev)?;
                let gate = config
                    .use_gating
                    .then(|| normal(rng, (1, h), 0.02, dev))
                    .transpose()?;
                (
                    down,
                    up,
                    gate.map(|w| zeros(1, dev).map(|b| (w, b))).transpose()?,
                )
            }
            _ => {
                let down = trunc_normal(rng, (d, h), 1e-2, dev)?;
                let up = trunc_normal(rng, (h, d), 1e-2, dev)?;
                let gate = match config.use_gating {
                    true => {
                        let w = kaiming(rng, (1, h), dev)?;
                        let bound = 1.0 / (h as f32).sqrt();
                        let b = Tensor::new(&[rng.random_range(-bound..bound)], dev)?;
                        Some((w, Var::from_tensor(&b)?))
                    }
                    false => None,
                };
                (down, up, gate)
            }
        };
        let scaling = match &config.scaling {
            Scaling::Value(s) => Scale::Fixed(*s),
            Scaling::Mode(m) if m == "learned" => Scale::Trained(Var::ones(1, DType::F32, dev)?),
            Scaling::Mode(_) => Scale::Trained(Var::ones(h, DType::F32, dev)?),
        };
        Ok(Self {
            flags: Flags {
                parallel: config.is_parallel,
                original_ln_before: config.original_ln_before,
                original_ln_after: config.original_ln_after,
                residual_before_ln: config.residual_before_ln.clone(),
                adapter_residual_before_ln: config.adapter_residual_before_ln,
                dropout: config.dropout,
            },
            act,
            norm_before,
            down: Dense {
                weight: down_w,
                bias: Some(zeros(d, dev)?),
            },
            up: Dense {
                weight: up_w,
                bias: Some(zeros(h, dev)?),
            },
            scaling,
            norm_after,
            gate: gate.map(|(weight, bias)| Dense {
                weight,
                bias: Some(bias),
            }),
        })
    }

    /// AdapterHub's `pre_forward`: the adapter's input, the residual its bottleneck adds back,
    /// and the fusion query (`query_before_ln` picks the input before the block's LayerNorm).
    pub fn pre_forward(
        &self,
        hidden: &Tensor,
        residual_in: &Tensor,
        norm: Option<&LayerNorm>,
        query_before_ln: bool,
        point: &str,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.flags.parallel {
            return Ok((
                residual_in.clone(),
                residual_in.clone(),
                residual_in.clone(),
            ));
        }
        let mut residual = None;
        if self.flags.residual_before_ln == ResidualBeforeLn::Flag(true) {
            residual = Some(hidden.clone());
        }
        let query_early = hidden.clone();
        let mut h = hidden.clone();
        if self.flags.original_ln_before {
            h = (&h + residual_in)?;
            match norm {
                Some(ln) => {
                    if matches!(self.flags.residual_before_ln, ResidualBeforeLn::Mode(_)) {
                        residual = Some(h.clone());
                    }
                    h = ln.forward(&h)?;
                }
                None if matches!(self.flags.residual_before_ln, ResidualBeforeLn::Mode(_)) => {
                    return Err(Error::Adapter(format!(
                        "residual_before_ln = \"post_add\" takes the residual before the block's \
                         LayerNorm, and `{point}` has none (a pre-norm block); use true or false"
                    )))
                }
                None => {}
            }
        }
        if self.flags.residual_before_ln == ResidualBeforeLn::Flag(false) {
            residual = Some(h.clone());
        }
        let residual = residual.ok_or_else(|| {
            Error::Adapter(format!(
                "`{point}`: no residual for the adapter (check residual_before_ln)"
            ))
        })?;
        let query = if query_before_ln {
            query_early
        } else {
            h.clone()
        };
        Ok((h, residual, query))
    }

    /// The bottleneck itself (AdapterHub's `Adapter.forward` / `ParallelAdapter.forward`).
    pub fn bottleneck(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Out> {
        let mut down = x.clone();
        if let Some(n) = &self.norm_before {
            down = n.forward(&down)?;
        }
        let down = self.act.apply(&self.down.forward(&down)?)?;
        let mut up = self.up.forward(&down)?;
        up = match &self.scaling {
            Scale::Fixed(s) => (up * *s)?,
            Scale::Trained(v) => {
                up.broadcast_mul(&crate::grad::live(v.as_tensor()).to_dtype(x.dtype())?)?
            }
        };
        let mut output = ops::dropout(&up, self.flags.dropout, train)?;
        if let Some(g) = &self.gate {
            // sigmoid(gate(x)), averaged over the sequence: one gate per example.
            let gate = sigmoid(&g.forward(x)?)?.mean_keepdim(1)?;
            output = output.broadcast_mul(&gate)?;
        }
        if self.flags.parallel {
            if let Some(n) = &self.norm_after {
                output = n.forward(&output)?;
            }
            return Ok(Out { output, up });
        }
        if self.flags.adapter_residual_before_ln {
            output = (output + residual)?;
        }
        if let Some(n) = &self.norm_after {
            output = n.forward(&output)?;
        }
        if !self.flags.adapter_residual_before_ln {
            output = (output + residual)?;
        }
        Ok(Out { output, up })
    }

    /// AdapterHub's `post_forward`: the block's residual add and LayerNorm after the adapters.
    pub fn post_forward(
        &self,
        x: Tensor,
        hidden: &Tensor,
        residual_in: &Tensor,
        norm: Option<&LayerNorm>,
    ) -> Result<Tensor> {
        let x = if self.flags.parallel {
            (x + hidden)?
        } else {
            x
        };
        if !self.flags.original_ln_after {
            return Ok(x);
        }
        let sum = (x + residual_in)?;
        match norm {
            Some(n) => n.forward(&sum),
            None => Ok(sum),
        }
    }

    /// The adapter's tensors under AdapterHub's names (without `adapters.<name>.`); a LayerNorm
    /// before the bottleneck is listed once, as `adapter_norm_before` (AdapterHub also saves it
    /// as `adapter_down.0`).
    pub fn named(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Scale::Trained(v) = &self.scaling {
            out.push(("scaling".to_string(), v.clone()));
        }
        if let Some(n) = &self.norm_before {
            out.push(("adapter_norm_before.weight".into(), n.weight.clone()));
            out.push(("adapter_norm_before.bias".into(), n.bias.clone()));
        }
        let i = usize::from(self.norm_before.is_some());
        out.push((format!("adapter_down.{i}.weight"), self.down.weight.clone()));
        if let Some(b) = &self.down.bias {
            out.push((format!("adapter_down.{i}.bias"), b.clone()));
        }
        out.push(("adapter_up.weight".into(), self.up.weight.clone()));
        if let Some(b) = &self.up.bias {
            out.push(("adapter_up.bias".into(), b.clone()));
        }
        if let Some(n) = &self.norm_after {
            out.push(("adapter_norm_after.weight".into(), n.weight.clone()));
            out.push(("adapter_norm_after.bias".into(), n.bias.clone()));
        }
        if let Some(g) = &self.gate {
            out.push(("gate.weight".into(), g.weight.clone()));
            if let Some(b) = &g.bias {
                out.push(("gate.bias".into(), b.clone()));
            }
        }
        out
    }

    /// The up-projection's output size (the model's hidden size).
    pub fn hidden_size(&self) -> usize {
        self.up.weight.dims()[0]
    }
}

impl Adapter for Bottleneck {
    fn tensors(&self) -> Vec<(String, Var)> {
        self.named()
    }
    fn type_name(&self) -> &'static str {
        if self.flags.parallel {
            "adapters.ParallelAdapter"
        } else {
            "adapters.Adapter"
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn supports_mixed_batch(&self) -> bool {
        false
    }
}

impl HookAdapter for Bottleneck {
    /// AdapterHub's Stack: each running adapter in activation order.
    fn forward(
        &self,
        point: &HookPoint,
        running: &[(&str, &dyn HookAdapter)],
        input: &HookInput<'_>,
    ) -> Result<Tensor> {
        let mut x = input.hidden.clone();
        let mut last: &Bottleneck = self;
        for (name, a) in running {
            let a = a.as_any().downcast_ref::<Bottleneck>().ok_or_else(|| {
                Error::Adapter(format!(
                    "`{name}` at `{}` is not a bottleneck adapter and cannot be stacked with one; \
                     activate it alone",
                    point.name
                ))
            })?;
            let (h, residual, _) =
                a.pre_forward(&x, input.residual, input.norm, false, &point.name)?;
            x = a.bottleneck(&h, &residual, input.train)?.output;
            last = a;
        }
        last.post_forward(x, input.hidden, input.residual, input.norm)
    }
}

/// The reduction for a layer: AdapterHub's `int(hidden // reduction_factor)`, at least 1.
pub fn bottleneck_size(hidden: usize, factor: f64) -> usize {
    ((hidden as f64 / factor).floor() as usize).max(1)
}
