//! What LoHa and LoKr share, as PEFT's `LycorisConfig` / `LycorisLayer` define it: the config
//! fields, the forward pass through a materialised delta weight with rank and module dropout, and
//! injection with per-module rank and alpha.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::layers::{Conv2d, Conv2dAdapter, ConvParams, Linear, LinearAdapter, ModuleMut};
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

/// `out + x · Δᵀ`, PEFT's LyCORIS forward on a linear layer: while training the adapter is
/// skipped with probability `module_dropout`, and each output row of Δ is dropped with
/// probability `rank_dropout` (then optionally rescaled by the mean of the kept mask).
pub(crate) fn forward_delta(
    x: &Tensor,
    out: Tensor,
    drop: LycorisDropout,
    train: bool,
    delta: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    forward_delta_with(out, drop, train, delta, |d| Ok(x.matmul(&d.t()?)?))
}

/// [`forward_delta`] on a convolution: `out + conv(x, Δ)` with the base layer's stride, padding,
/// dilation and groups (PEFT's LyCORIS `Conv2d._get_delta_activations`).
pub(crate) fn forward_delta_conv(
    x: &Tensor,
    out: Tensor,
    drop: LycorisDropout,
    train: bool,
    params: ConvParams,
    delta: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    forward_delta_with(out, drop, train, delta, |d| {
        crate::layers::conv::conv2d(x, &d.to_dtype(x.dtype())?, params)
    })
}

fn forward_delta_with(
    out: Tensor,
    drop: LycorisDropout,
    train: bool,
    delta: impl FnOnce() -> Result<Tensor>,
    apply: impl FnOnce(&Tensor) -> Result<Tensor>,
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
        let mut shape = vec![1usize; delta.rank()];
        shape[0] = rows;
        let keep = Tensor::from_vec(keep, shape, delta.device())?.to_dtype(delta.dtype())?;
        delta = delta.broadcast_mul(&keep)?;
    }
    let h = apply(&delta)?;
    Ok((out + h)?)
}

/// The CP (Tucker) rebuild of a kernel from a core `t` `[r1, r2, kh, kw]` and mode factors `wa`
/// `[r1, out]`, `wb` `[r2, in]`: `einsum("i j k l, i p, j r -> p r k l")`, `[out, in, kh, kw]`
/// (PEFT's `make_weight_cp`, LoHa's and LoKr's `use_effective_conv2d`).
pub(crate) fn cp_weight(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (i, j, k, l) = t.dims4()?;
    let p = wa.dim(1)?;
    let r = wb.dim(1)?;
    // [k, l, i, j] · wb → [k, l, i, r]
    let t1 = t
        .permute((2, 3, 0, 1))?
        .contiguous()?
        .reshape((k * l * i, j))?
        .matmul(wb)?
        .reshape((k, l, i, r))?;
    // [k, l, r, i] · wa → [k, l, r, p]
    let t2 = t1
        .transpose(2, 3)?
        .contiguous()?
        .reshape((k * l * r, i))?
        .matmul(wa)?
        .reshape((k, l, r, p))?;
    Ok(t2.permute((3, 2, 0, 1))?.contiguous()?)
}

/// `kron(a, b)` for a matrix `a` `[p, q]` and a kernel `b` `[s, t, kh, kw]`: `[p·s, q·t, kh, kw]`
/// (torch's `kron` of `a[:, :, None, None]` and `b`).
pub(crate) fn kron4(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (s, t, kh, kw) = b.dims4()?;
    let prod = a
        .reshape((p, 1, q, 1, 1, 1))?
        .broadcast_mul(&b.reshape((1, s, 1, t, kh, kw))?)?;
    Ok(prod.reshape((p * s, q * t, kh, kw))?)
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

/// The layer a LyCORIS adapter is made for.
pub(crate) enum Target<'a> {
    Linear(&'a Linear),
    Conv2d(&'a Conv2d),
}

/// A LyCORIS adapter made for a [`Target`].
pub(crate) enum Made {
    Linear(Box<dyn LinearAdapter>),
    Conv2d(Box<dyn Conv2dAdapter>),
}

/// Attaches a LyCORIS adapter built by `make(key, layer, r, alpha)` to every target: linear
/// layers and convolutions, as PEFT's LoHa and LoKr take them. Like PEFT, GPT-2's Conv1D
/// layers are refused (PEFT's LyCORIS tuners take nn.Linear, not transformers' Conv1D).
pub(crate) fn inject(
    model: &mut dyn Model,
    name: &str,
    fields: &mut LycorisFields,
    modules_to_save: &[String],
    method: &str,
    defaults: impl Fn(&str) -> Option<&'static [&'static str]>,
    mut make: impl FnMut(&str, Target<'_>, usize, f64) -> Result<Made>,
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
        let r =
            pattern_value(&rank_pattern, key, |v| v.as_u64().map(|x| x as usize))?.unwrap_or(r0);
        let alpha = pattern_value(&alpha_pattern, key, |v| v.as_f64())?.unwrap_or(a0);
        if r == 0 {
            return Err(Error::Config(format!("rank for `{key}` must be positive")));
        }
        match module {
            ModuleMut::Linear(l) => {
                if l.transposed {
                    return Err(Error::Config(format!(
                        "target module `{key}` is a transformers Conv1D layer (weight stored [in, out], as in \
                         GPT-2); PEFT's {method} supports nn.Linear layers only, so such an adapter could not be \
                         used in PEFT. Target other layers, or use LoRA, IA3 or VeRA"
                    )));
                }
                match make(key, Target::Linear(l), r, alpha)? {
                    Made::Linear(a) => l.adapters.insert(name, a),
                    Made::Conv2d(_) => {
                        return Err(Error::Adapter(format!(
                            "{method}: a conv adapter for `{key}`"
                        )))
                    }
                }
            }
            ModuleMut::Conv2d(c) => match make(key, Target::Conv2d(c), r, alpha)? {
                Made::Conv2d(a) => c.adapters.insert(name, a),
                Made::Linear(_) => {
                    return Err(Error::Adapter(format!(
                        "{method}: a linear adapter for `{key}`"
                    )))
                }
            },
            other => return Err(unsupported(method, key, &other, "linear and Conv2d layers")),
        }
        Ok(())
    })
}

/// A draw in `[0, 1)` from the thread's dropout generator (seeded by [`crate::ops::seed_dropout`]),
/// for rank and module dropout.
fn uniform() -> f64 {
    (crate::ops::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}
