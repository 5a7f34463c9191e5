//! AdaLoRA's rank allocator (PEFT 0.21's `RankAllocator`): a sensitivity score per singular
//! triplet, smoothed over steps, and a cubic budget schedule from `init_r` per layer down to
//! `target_r`; the least important triplets are pruned by zeroing their entry of `E`.
//!
//! The score of a parameter entry is `Ī · Ū`, where `I = |p ⊙ ∇p|`, `Ī` its EMA (`beta1`) and `Ū`
//! the EMA (`beta2`) of `|I - Ī|`. A triplet's score is its E entry's score plus the mean score of
//! its row of A and of its column of B.

use candle_core::{Tensor, Var, D};
use std::collections::{BTreeMap, HashMap};

use super::config::AdaLoraConfig;
use super::layer::AdaLoraLinear;
use crate::{Error, Result};

/// Per-triplet keep flags by `"<module>.lora_E"`, PEFT's `rank_pattern`.
pub type RankPattern = BTreeMap<String, Vec<bool>>;

#[derive(Debug)]
struct Ema {
    avg_ipt: Tensor,
    avg_unc: Tensor,
}

#[derive(Debug)]
pub struct RankAllocator {
    pub adapter: String,
    init_bgt: usize,
    target_bgt: usize,
    tinit: usize,
    tfinal: usize,
    total_step: usize,
    delta_t: usize,
    beta1: f64,
    beta2: f64,
    state: HashMap<String, Ema>,
}

/// One adapted layer as the allocator sees it: its module path and its factors.
pub type Layer<'a> = (String, &'a AdaLoraLinear);

fn factors(layer: &AdaLoraLinear) -> [(&'static str, &Var); 3] {
    [
        ("lora_A", &layer.a),
        ("lora_B", &layer.b),
        ("lora_E", &layer.e),
    ]
}

impl RankAllocator {
    pub fn new(config: &AdaLoraConfig, adapter: &str, layers: &[Layer<'_>]) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            adapter: adapter.to_string(),
            init_bgt: layers.iter().map(|(_, l)| l.rank()).sum(),
            target_bgt: config.target_r * layers.len(),
            tinit: config.tinit,
            tfinal: config.tfinal,
            total_step: config.total_step.unwrap_or(0),
            delta_t: config.delta_t,
            beta1: config.beta1,
            beta2: config.beta2,
            state: HashMap::new(),
        })
    }

    pub fn reset_ipt(&mut self) {
        self.state.clear();
    }

    /// The rank budget at `step` and whether to prune now: `init` until `tinit`, then a cubic
    /// decrease to `target` at `total_step - tfinal` (pruning every `deltaT` steps), then `target`.
    pub fn budget_schedule(&self, step: usize) -> (usize, bool) {
        let (tinit, tfinal, total) = (self.tinit, self.tfinal, self.total_step);
        if step <= tinit {
            (self.init_bgt, false)
        } else if step + tfinal > total {
            (self.target_bgt, true)
        } else {
            let mul = 1.0 - (step - tinit) as f64 / (total - tfinal - tinit) as f64;
            let span = self.init_bgt as f64 - self.target_bgt as f64;
            let budget = (span * mul.powi(3) + self.target_bgt as f64) as usize;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }

    /// Updates the smoothed sensitivity and uncertainty of every factor from its current value
    /// and the gradient of the last backward pass.
    pub fn update_ipt(
        &mut self,
        layers: &[Layer<'_>],
        grads: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Result<()> {
        let (b1, b2) = (self.beta1, self.beta2);
        for (module, layer) in layers {
            for (kind, var) in factors(layer) {
                let p = var.as_tensor();
                let ipt = match grads(p) {
                    Some(g) => (p.detach() * g.detach())?.abs()?,
                    None => p.zeros_like()?,
                };
                let key = format!("{module}.{kind}");
                let prev = match self.state.remove(&key) {
                    Some(e) => e,
                    None => Ema {
                        avg_ipt: p.zeros_like()?,
                        avg_unc: p.zeros_like()?,
                    },
                };
                let avg_ipt = ((prev.avg_ipt * b1)? + (&ipt * (1.0 - b1))?)?;
                let avg_unc = ((prev.avg_unc * b2)? + ((ipt - &avg_ipt)?.abs()? * (1.0 - b2))?)?;
                self.state.insert(key, Ema { avg_ipt, avg_unc });
            }
        }
        Ok(())
    }

    fn score(&self, key: &str) -> Result<Tensor> {
        let e = self.state.get(key).ok_or_else(|| {
            Error::Training(format!("AdaLoRA: no importance recorded for `{key}` yet"))
        })?;
        Ok((&e.avg_ipt * &e.avg_unc)?)
    }

    /// Each triplet's importance, `[r]`, per module.
    fn triplet_scores(&self, layers: &[Layer<'_>]) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        for (module, _) in layers {
            let a = self.score(&format!("{module}.lora_A"))?.mean_keepdim(1)?; // [r, 1]
            let b = self
                .score(&format!("{module}.lora_B"))?
                .mean(0)?
                .unsqueeze(1)?; // [r, 1]
            let e = self.score(&format!("{module}.lora_E"))?; // [r, 1]
            let ab = Tensor::cat(&[&a, &b], 1)?.sum(D::Minus1)?;
            let total = (e.flatten_all()? + ab)?;
            out.push((module.clone(), total.to_vec1::<f32>()?));
        }
        Ok(out)
    }

    /// Zeroes the `E` entries of the least important triplets so that `budget` remain (ties at
    /// the threshold are all pruned, as in PEFT), and returns what each layer kept.
    pub fn mask_to_budget(&self, layers: &[Layer<'_>], budget: usize) -> Result<RankPattern> {
        let scores = self.triplet_scores(layers)?;
        let mut all: Vec<f32> = scores.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        let k = self.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 || all.is_empty() {
            f32::NEG_INFINITY
        } else {
            all.sort_by(|x, y| x.total_cmp(y));
            all[(k - 1).min(all.len() - 1)]
        };
        let mut pattern = RankPattern::new();
        for ((module, layer), (_, s)) in layers.iter().zip(&scores) {
            let keep: Vec<bool> = s.iter().map(|&v| v > threshold).collect();
            apply_mask(&layer.e, &keep)?;
            pattern.insert(format!("{module}.lora_E"), keep);
        }
        Ok(pattern)
    }

    /// One step of PEFT's `RankAllocator.update_and_allocate`: the importance update (before the
    /// final phase), then a pruning when the schedule (or `force_mask`) says so.
    pub fn update_and_allocate(
        &mut self,
        layers: &[Layer<'_>],
        step: usize,
        grads: &dyn Fn(&Tensor) -> Option<Tensor>,
        force_mask: bool,
    ) -> Result<(usize, Option<RankPattern>)> {
        if step + self.tfinal < self.total_step {
            self.update_ipt(layers, grads)?;
        }
        let (budget, mask) = self.budget_schedule(step);
        let pattern = if mask || force_mask {
            Some(self.mask_to_budget(layers, budget)?)
        } else {
            None
        };
        Ok((budget, pattern))
    }

    /// The final phase: keeps the pruned entries of `E` at zero.
    pub fn mask_using_rank_pattern(layers: &[Layer<'_>], pattern: &RankPattern) -> Result<()> {
        for (module, layer) in layers {
            if let Some(keep) = pattern.get(&format!("{module}.lora_E")) {
                apply_mask(&layer.e, keep)?;
            }
        }
        Ok(())
    }

    pub fn total_step(&self) -> usize {
        self.total_step
    }

    pub fn tfinal(&self) -> usize {
        self.tfinal
    }
}

fn apply_mask(e: &Var, keep: &[bool]) -> Result<()> {
    if keep.len() != e.dims()[0] {
        return Err(Error::Adapter(format!(
            "AdaLoRA: a rank mask of {} entries for an E of {} rows",
            keep.len(),
            e.dims()[0]
        )));
    }
    let m: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    let m = Tensor::from_vec(m, (keep.len(), 1), e.device())?;
    e.set(&(e.as_tensor().detach() * m)?)?;
    Ok(())
}
