//! Learning-rate schedules with transformers' formulas (`get_scheduler`): the multiplier of the
//! base learning rate at each optimizer step, warmup included.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    #[default]
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
    Polynomial,
}

/// A schedule as the Trainer builds it; saved in checkpoints (`scheduler.json`) so that a
/// resumed run continues on the same curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup: usize,
    pub total: usize,
    /// Polynomial only: the learning rate reached at `total`, and the decay's power.
    pub lr_end: f64,
    pub power: f64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based: the first update uses 0).
    pub fn lr(&self, step: usize) -> f64 {
        if self.kind == SchedulerType::Polynomial {
            return self.base_lr * self.polynomial(step);
        }
        self.base_lr * lr_lambda(self.kind, step, self.warmup, self.total)
    }

    /// transformers' `get_polynomial_decay_schedule_with_warmup`.
    fn polynomial(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        if step < self.warmup {
            return s / w.max(1.0);
        }
        if step > self.total {
            return self.lr_end / self.base_lr;
        }
        let range = self.base_lr - self.lr_end;
        let remaining = 1.0 - (s - w) / (t - w);
        (range * remaining.powf(self.power) + self.lr_end) / self.base_lr
    }
}

/// The multiplier of the base learning rate at optimizer step `step` (0-based) for the
/// schedules that depend on nothing but the step counts (all but polynomial; see [`Schedule`]).
pub fn lr_lambda(kind: SchedulerType, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    if kind != SchedulerType::Constant && step < warmup {
        return s / w.max(1.0);
    }
    match kind {
        SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
        SchedulerType::Linear | SchedulerType::Polynomial => {
            ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0)
        }
        SchedulerType::Cosine => {
            let progress = (s - w) / (total as f64 - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// transformers' warmup length: `warmup_steps` if set, else `ceil(warmup_ratio * total)`.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values of transformers' get_linear_schedule_with_warmup(opt, 2, 10) lambdas at steps 0..=10,
    // which follow from its closed form: step/2 during warmup, then (10-step)/8.
    #[test]
    fn linear_with_warmup_matches_closed_form() {
        let got: Vec<f64> = (0..=10)
            .map(|s| lr_lambda(SchedulerType::Linear, s, 2, 10))
            .collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn cosine_reaches_half_at_midpoint() {
        assert!((lr_lambda(SchedulerType::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(warmup_steps(0, 0.06, 1923), 116);
    }
}
