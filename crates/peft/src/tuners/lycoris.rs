//! What LoHa and LoKr share, as PEFT's `LycorisConfig` / `LycorisLayer` define it: the config
//! fields, the forward pass through a materialised delta weight with rank and module dropout, and
//! injection with per-module rank and alpha.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::layers::{Linear, LinearAdapter, ModuleMut};
use crate::models::Model;
use crate::tuners::config::{check_patterns, check_prob, BaseFields};
use crate::tuners::inject::{inject_matching, resolve_targets, unsupported};
use crate::tuners::targets::{pattern_value, ModuleSpec, OneOrMany, TargetMatcher};
use crate::{Error, Result};

/// The fields LoHa and LoKr configs have in common, with PEFT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LycorisFields {
    pub r: usize,
    pub alpha: f64,
    /// Probability of dropping a whole output row of the delta weight while training.
    pub rank_dropout: f64,
    /// Probability of skipping the adapter altogether for a training step.
    pub module_dropout: f64,
    /// Conv layers only (the CP decomposition of the kernel); accepted and ignored on linear layers,
    /// as PEFT does.
    pub use_effective_conv2d: bool,
    pub target_modules: Option<ModuleSpec>,
    pub exclude_modules: Option<ModuleSpec>,
    pub layers_to_transform: Option<OneOrMany<usize>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub rank_pattern: Map<String, Value>,
    pub alpha_pattern: Map<String, Value>,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for LycorisFields {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            base: BaseFields::default(),
        }
    }
}

impl LycorisFields {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("`r` must be a positive integer".into()));
        }
        check_prob("rank_dropout", self.rank_dropout)?;
        check_prob("module_dropout", self.module_dropout)?;
        check_patterns(&[
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ])?;
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(Error::Config(
                "when `layers_pattern` is specified, `layers_to_transform` must also be specified"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Rank and module dropout of one adapter, applied in the forward pass while training.
#[derive(Debug, Clone, Copy)]
pub struct LycorisDropout {
    pub rank_dropout: f64,
    pub module_dropout: f64,
    /// Rescale the kept rows by the inverse of the kept fraction (always on for LoHa, LoKr's
    /// `rank_dropout_scale`).
    pub rank_dropout_scale: bool,
}

/// `out + x · Δᵀ`, PEFT's LyCORIS forward: while training the adapter is skipped with
/// probability `module_dropout`, and each output row of Δ is dropped with probability
/// `rank_dropout` (then optionally rescaled by the mean of the kept mask).
pub(crate) fn forward_delta(
    x: &Tensor,
    out: Tensor,
    drop: LycorisDropout,
    train: bool,
    delta: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if train && drop.module_dropout > 0.0 && uniform() <= drop.module_dropout {
        return Ok(out);
    }
    let mut delta = delta()?;
    if train && drop.rank_dropout > 0.0 {
        let rows = delta.dim(0)?;
        let mut keep: Vec<f32> = (0..rows)
            .map(|_| f32::from(uniform() > drop.rank_dropout))
            .collect();
        if drop.rank_dropout_scale {
            let mean = keep.iter().sum::<f32>() / rows as f32;
            if mean > 0.0 {
                keep.iter_mut().for_each(|k| *k /= mean);
            }
        }
        let keep = Tensor::from_vec(keep, (rows, 1), delta.device())?.to_dtype(delta.dtype())?;
        delta = delta.broadcast_mul(&keep)?;
    }
    let h = x.matmul(&delta.t()?)?;
    Ok((out + h)?)
}

/// `kron(a, b)` for matrices: `[p, q] ⊗ [s, t] → [p·s, q·t]`, built from a broadcast product so
/// that it has a backward.
pub(crate) fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (s, t) = b.dims2()?;
    let prod = a
        .reshape((p, 1, q, 1))?
        .broadcast_mul(&b.reshape((1, s, 1, t))?)?;
    Ok(prod.reshape((p * s, q * t))?)
}

/// Attaches a LyCORIS adapter built by `make(key, layer, r, alpha)` to every target. Like PEFT,
/// GPT-2's Conv1D layers are refused (PEFT's LyCORIS tuners take nn.Linear only).
pub(crate) fn inject(
    model: &mut dyn Model,
    name: &str,
    fields: &mut LycorisFields,
    modules_to_save: &[String],
    method: &str,
    defaults: impl Fn(&str) -> Option<&'static [&'static str]>,
    mut make: impl FnMut(&str, &Linear, usize, f64) -> Result<Box<dyn LinearAdapter>>,
) -> Result<Vec<String>> {
    let targets = resolve_targets(model, &mut fields.target_modules, defaults)?;
    let matcher = TargetMatcher::new(
        &targets,
        fields.exclude_modules.as_ref(),
        modules_to_save,
        fields.layers_to_transform.as_ref(),
        fields.layers_pattern.as_ref(),
    )?;
    let (rank_pattern, alpha_pattern, r0, a0) = (
        fields.rank_pattern.clone(),
        fields.alpha_pattern.clone(),
        fields.r,
        fields.alpha,
    );
    inject_matching(model, &targets, &matcher, |key, module| {
        let l = match module {
            ModuleMut::Linear(l) => l,
            other => return Err(unsupported(method, key, &other, "linear layers")),
        };
        if l.transposed {
            return Err(Error::Config(format!(
                "target module `{key}` is a transformers Conv1D layer (weight stored [in, out], as in \
                 GPT-2); PEFT's {method} supports nn.Linear layers only, so such an adapter could not be \
                 used in PEFT. Target other layers, or use LoRA, IA3 or VeRA"
            )));
        }
        let r =
            pattern_value(&rank_pattern, key, |v| v.as_u64().map(|x| x as usize))?.unwrap_or(r0);
        let alpha = pattern_value(&alpha_pattern, key, |v| v.as_f64())?.unwrap_or(a0);
        if r == 0 {
            return Err(Error::Config(format!("rank for `{key}` must be positive")));
        }
        let adapter = make(key, l, r, alpha)?;
        l.adapters.insert(name, adapter);
        Ok(())
    })
}

/// A draw in `[0, 1)` from the thread's dropout generator (seeded by [`crate::ops::seed_dropout`]),
/// for rank and module dropout.
fn uniform() -> f64 {
    (crate::ops::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}
