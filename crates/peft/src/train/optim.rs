//! AdamW with torch's update rule (decoupled weight decay, bias-corrected moments) and global
//! gradient-norm clipping as transformers' Trainer applies it. Moments are fp32 whatever the
//! compute dtype, and can be saved and restored for resuming.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// `[m; v]` in one buffer when `m` and `v` are its rows (after a fused GPU update), so the
    /// next update reads them without packing them first.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    mv: Option<Tensor>,
}

pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    step: usize,
}

impl AdamW {
    /// `vars`: `(name, var)`; weight decay skips biases and norm weights, as the Trainer does.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let lower = name.to_ascii_lowercase();
                let decay = !(lower.ends_with("bias")
                    || lower.contains("layernorm")
                    || lower.contains("norm."));
                Ok(Slot {
                    m: var.zeros_like()?.to_dtype(DType::F32)?,
                    v: var.zeros_like()?.to_dtype(DType::F32)?,
                    mv: None,
                    name,
                    var,
                    decay,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            params,
            step: 0,
        })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Each variable's gradient from `grads`, in the optimizer's order, detached (see
    /// [`AdamW::step_with`]).
    pub fn gradients(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.slots
            .iter()
            .map(|s| grads.get(s.var.as_tensor()).map(Tensor::detach))
            .collect()
    }

    /// L2 norm of all gradients together.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        norm_of(&self.gradients(grads))
    }

    /// One update with learning rate `lr`. Gradients are multiplied by `grad_scale` first (used for
    /// clipping). Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let g = self.gradients(grads);
        self.step_with(&g, lr, grad_scale)
    }

    /// [`AdamW::step`] with gradients given in the optimizer's order (see [`AdamW::gradients`]).
    pub fn step_with(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (s, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            #[cfg(feature = "cuda")]
            if crate::ops::cuda::adamw_applies(s.var.as_tensor(), g) {
                // One launch per tensor on the GPU instead of a dozen; the same arithmetic.
                let mv = match &s.mv {
                    Some(mv) => mv.clone(),
                    None => Tensor::stack(&[s.m.flatten_all()?, s.v.flatten_all()?], 0)?,
                };
                let decay = if s.decay && p.weight_decay != 0.0 {
                    1.0 - lr * p.weight_decay
                } else {
                    1.0
                };
                let h = crate::ops::cuda::AdamW {
                    lr_over_bc1: (lr / bc1) as f32,
                    beta1: p.beta1 as f32,
                    beta2: p.beta2 as f32,
                    eps: p.eps as f32,
                    decay: decay as f32,
                    inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
                    grad_scale: grad_scale as f32,
                };
                let out = crate::ops::cuda::adamw(s.var.as_tensor(), g, &mv, h)?;
                let shape = s.var.shape().clone();
                s.var.set(&out.get(0)?.reshape(&shape)?)?;
                let mv = out.narrow(0, 1, 2)?;
                s.m = mv.get(0)?.reshape(&shape)?;
                s.v = mv.get(1)?.reshape(&shape)?;
                s.mv = Some(mv);
                continue;
            }
            s.mv = None;
            // candle leaves a variable's gradient attached to the graph that computed it when
            // that graph reads another variable (LoHa's `W1a·W1b`, AdaLoRA's `A ⊙ E`); a moment
            // built from it would keep every earlier step's graph alive.
            let g = g.detach().to_dtype(DType::F32)?;
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g
            };
            let mut theta = s.var.as_tensor().detach().to_dtype(DType::F32)?;
            if s.decay && p.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * p.weight_decay))?;
            }
            s.m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = (s.m.div(&denom)? * (lr / bc1))?;
            s.var.set(&(theta - update)?.to_dtype(s.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments under torch's names (`<param>.exp_avg`, `<param>.exp_avg_sq`) and the step
    /// count (`step`, as an f32 scalar like torch's state).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.slots.len() * 2 + 1);
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), s.m.clone()));
            out.push((format!("{}.exp_avg_sq", s.name), s.v.clone()));
        }
        out.push((
            "step".into(),
            Tensor::new(&[self.step as f32], &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] wrote; every parameter's moments must be there
    /// with its shape.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(Device::Cpu);
        let mut t: HashMap<String, Tensor> = crate::io::load_safetensors(path, &device)?;
        let step = t
            .remove("step")
            .ok_or_else(|| Error::Training(format!("{}: no `step` entry", path.display())))?;
        self.step = step.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as usize;
        for s in &mut self.slots {
            for (suffix, slot) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let v = t.remove(&key).ok_or_else(|| {
                    Error::Training(format!(
                        "{}: no `{key}`; the checkpoint was written for a different adapter \
                         config",
                        path.display()
                    ))
                })?;
                if v.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        expected: s.var.dims().to_vec(),
                        found: v.dims().to_vec(),
                    });
                }
                *slot = v.to_dtype(DType::F32)?;
            }
            s.mv = None;
        }
        Ok(())
    }
}

/// L2 norm of a list of gradients together: each gradient's sum of squares stays on its device
/// and the total is read back once (one host round trip per step on a GPU, not one per tensor).
pub fn norm_of(grads: &[Option<Tensor>]) -> Result<f64> {
    let sums = grads
        .iter()
        .flatten()
        .map(|g| {
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// The factor that brings the gradient norm down to `max_norm` (torch's `clip_grad_norm_`), or 1.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
