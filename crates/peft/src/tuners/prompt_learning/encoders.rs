//! The small networks prompt encoders are made of, with torch's default initialisations and
//! PEFT's parameter names: `nn.Embedding` (standard normal), `nn.Linear` (weight and bias
//! uniform in ±1/√fan_in), `nn.LSTM` (bidirectional, batch first; every tensor uniform in ±1/√h).

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::tuners::ModelTensor;
use crate::{ops, Error, Result};

/// A trainable tensor with its in-memory name.
pub fn param(key: impl Into<String>, var: &Var) -> ModelTensor {
    ModelTensor::parameter(key, var)
}

/// `[rows, cols]` drawn from `N(mean, std)`.
pub fn normal(
    rows: usize,
    cols: usize,
    std: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Var> {
    let dist = Normal::new(0.0f32, std as f32).map_err(|e| Error::Config(e.to_string()))?;
    let v: Vec<f32> = (0..rows * cols).map(|_| dist.sample(rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        (rows, cols),
        device,
    )?)?)
}

/// A tensor of `shape` uniform in `±bound`.
pub fn uniform(shape: &[usize], bound: f64, rng: &mut StdRng, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let b = bound as f32;
    let dist = Uniform::new_inclusive(-b, b).map_err(|e| Error::Config(e.to_string()))?;
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

/// `nn.Linear(input, output)`.
pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    pub fn new(input: usize, output: usize, rng: &mut StdRng, device: &Device) -> Result<Self> {
        let bound = 1.0 / (input as f64).sqrt();
        Ok(Self {
            weight: uniform(&[output, input], bound, rng, device)?,
            bias: uniform(&[output], bound, rng, device)?,
        })
    }

    /// `x Wᵀ + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::grad::live(self.weight.as_tensor());
        Ok(x.broadcast_matmul(&w.t()?)?
            .broadcast_add(&crate::grad::live(self.bias.as_tensor()))?)
    }

    pub fn tensors(&self, prefix: &str) -> Vec<ModelTensor> {
        vec![
            param(format!("{prefix}.weight"), &self.weight),
            param(format!("{prefix}.bias"), &self.bias),
        ]
    }
}

/// `1 / (1 + e^-x)`, from ops that have a backward pass.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// One direction of one LSTM layer: `weight_ih` `[4h, in]`, `weight_hh` `[4h, h]`, biases `[4h]`,
/// gates in torch's order (input, forget, cell, output).
pub struct LstmCell {
    pub weight_ih: Var,
    pub weight_hh: Var,
    pub bias_ih: Var,
    pub bias_hh: Var,
}

/// `nn.LSTM(input, hidden, num_layers, dropout, bidirectional=True, batch_first=True)`.
pub struct Lstm {
    pub hidden: usize,
    /// Per layer, the forward and the reverse direction.
    pub layers: Vec<[LstmCell; 2]>,
    pub dropout: f64,
}

impl Lstm {
    pub fn new(
        input: usize,
        hidden: usize,
        num_layers: usize,
        dropout: f64,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let inp = if l == 0 { input } else { 2 * hidden };
            // torch registers, per layer: the forward direction's four tensors, then the
            // reverse's, and draws them in that order.
            let mut cell = || -> Result<LstmCell> {
                Ok(LstmCell {
                    weight_ih: uniform(&[4 * hidden, inp], bound, rng, device)?,
                    weight_hh: uniform(&[4 * hidden, hidden], bound, rng, device)?,
                    bias_ih: uniform(&[4 * hidden], bound, rng, device)?,
                    bias_hh: uniform(&[4 * hidden], bound, rng, device)?,
                })
            };
            let fwd = cell()?;
            let rev = cell()?;
            layers.push([fwd, rev]);
        }
        Ok(Self {
            hidden,
            layers,
            dropout,
        })
    }

    /// PEFT's names: `<prefix>.weight_ih_l0`, `..._l0_reverse`, ...
    pub fn tensors(&self, prefix: &str) -> Vec<ModelTensor> {
        let mut out = Vec::new();
        for (l, dirs) in self.layers.iter().enumerate() {
            for (d, c) in dirs.iter().enumerate() {
                let sfx = if d == 1 { "_reverse" } else { "" };
                out.push(param(format!("{prefix}.weight_ih_l{l}{sfx}"), &c.weight_ih));
                out.push(param(format!("{prefix}.weight_hh_l{l}{sfx}"), &c.weight_hh));
                out.push(param(format!("{prefix}.bias_ih_l{l}{sfx}"), &c.bias_ih));
                out.push(param(format!("{prefix}.bias_hh_l{l}{sfx}"), &c.bias_hh));
            }
        }
        out
    }

    /// The output sequence `[batch, seq, 2h]` (both directions' hidden states) for `x`
    /// `[batch, seq, input]`; dropout between layers while training, as torch applies it.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (l, [fwd, rev]) in self.layers.iter().enumerate() {
            let f = self.direction(fwd, &x, false)?;
            let r = self.direction(rev, &x, true)?;
            x = Tensor::cat(&[&f, &r], 2)?;
            if l < last {
                x = ops::dropout(&x, self.dropout, train)?;
            }
        }
        Ok(x)
    }

    /// One direction over the sequence: `[batch, seq, h]` in the input's order.
    fn direction(&self, c: &LstmCell, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.hidden;
        // The input projections of every step at once.
        let xi = x
            .broadcast_matmul(&crate::grad::live(c.weight_ih.as_tensor()).t()?)?
            .broadcast_add(&crate::grad::live(c.bias_ih.as_tensor()))?
            .broadcast_add(&crate::grad::live(c.bias_hh.as_tensor()))?;
        let whh = crate::grad::live(c.weight_hh.as_tensor()).t()?;
        let mut hs = Tensor::zeros((b, h), DType::F32, x.device())?;
        let mut cs = hs.clone();
        let mut outs: Vec<Tensor> = Vec::with_capacity(t);
        let steps: Vec<usize> = if reverse {
            (0..t).rev().collect()
        } else {
            (0..t).collect()
        };
        for i in steps {
            let g = (xi.narrow(1, i, 1)?.squeeze(1)? + hs.matmul(&whh)?)?;
            let ig = sigmoid(&g.narrow(1, 0, h)?)?;
            let fg = sigmoid(&g.narrow(1, h, h)?)?;
            let gg = g.narrow(1, 2 * h, h)?.tanh()?;
            let og = sigmoid(&g.narrow(1, 3 * h, h)?)?;
            cs = ((fg * &cs)? + (ig * gg)?)?;
            hs = (og * cs.tanh()?)?;
            outs.push(hs.unsqueeze(1)?);
        }
        if reverse {
            outs.reverse();
        }
        Ok(Tensor::cat(&outs, 1)?)
    }
}
