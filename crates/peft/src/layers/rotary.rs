//! Rotary position embeddings (RoPE) as transformers computes them for the Llama family, with the
//! `rope_scaling` variants in common use. candle's fused `rotary_emb::rope*` kernels have no
//! backward pass, so the rotation is composed from primitive ops that do: LoRA on `q_proj` /
//! `k_proj` must receive its gradient through the rotation.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::config_err;
use crate::Result;

/// How the inverse frequencies are derived (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f64,
    },
    /// NTK-aware: the base grows with the sequence once it exceeds `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: NTK-by-parts interpolation plus an attention temperature on cos/sin.
    Yarn {
        factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

const SUPPORTED: &str = "default, linear, dynamic, llama3, yarn";

/// The rotary embedding of one model: head dimension, base and scaling.
#[derive(Debug, Clone)]
pub struct Rotary {
    pub dim: usize,
    pub theta: f64,
    pub scaling: RopeScaling,
    /// `max_position_embeddings` (the length dynamic scaling starts growing from).
    pub max_positions: usize,
}

impl Rotary {
    /// Reads `rope_theta` / `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)
    /// from a config.json.
    pub fn from_config(config: &Value, dim: usize, max_positions: usize) -> Result<Self> {
        let params = config
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| config.get("rope_scaling").filter(|v| v.is_object()));
        let get = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let theta = get("rope_theta")
            .or_else(|| config.get("rope_theta").and_then(|v| v.as_f64()))
            .unwrap_or(10_000.0);
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let factor = || {
            get("factor").ok_or_else(|| config_err!("rope_scaling of type `{kind}` needs `factor`"))
        };
        let original = get("original_max_position_embeddings")
            .or_else(|| {
                config
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(max_positions as f64);
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: get("low_freq_factor")
                    .ok_or_else(|| config_err!("rope_scaling llama3 needs `low_freq_factor`"))?,
                high_freq_factor: get("high_freq_factor")
                    .ok_or_else(|| config_err!("rope_scaling llama3 needs `high_freq_factor`"))?,
                original_max_position_embeddings: original,
            },
            "yarn" => RopeScaling::Yarn {
                factor: factor()?,
                beta_fast: get("beta_fast").unwrap_or(32.0),
                beta_slow: get("beta_slow").unwrap_or(1.0),
                original_max_position_embeddings: original,
                attention_factor: get("attention_factor"),
                mscale: get("mscale"),
                mscale_all_dim: get("mscale_all_dim"),
                truncate: params
                    .and_then(|p| p.get("truncate"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
            },
            other => {
                return Err(config_err!(
                    "rope_scaling type `{other}` is not supported; supported: {SUPPORTED}"
                ))
            }
        };
        if !dim.is_multiple_of(2) {
            return Err(config_err!(
                "head_dim {dim} must be even for rotary embeddings"
            ));
        }
        Ok(Self {
            dim,
            theta,
            scaling,
            max_positions,
        })
    }

    /// The longest sequence this embedding is meant for: `max_position_embeddings`, stretched by
    /// `factor` for dynamic scaling (whose purpose is to run past it).
    pub fn context_length(&self) -> usize {
        match self.scaling {
            RopeScaling::Dynamic { factor } => (self.max_positions as f64 * factor) as usize,
            _ => self.max_positions,
        }
    }

    fn plain_inv_freq(&self, base: f64) -> Vec<f64> {
        let d = self.dim as f64;
        (0..self.dim / 2)
            .map(|i| {
                // torch computes `base ** (arange / dim)` in f32.
                let e = ((2 * i) as f32 / d as f32) as f64;
                1.0 / (base as f32).powf(e as f32) as f64
            })
            .collect()
    }

    /// Inverse frequencies and the factor cos/sin are multiplied by, for a forward pass whose
    /// positions reach `seq_len - 1` (only dynamic scaling depends on it).
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f64>, f64) {
        match &self.scaling {
            RopeScaling::Default => (self.plain_inv_freq(self.theta), 1.0),
            RopeScaling::Linear { factor } => (
                self.plain_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic { factor } => {
                let max = self.max_positions as f64;
                let len = (seq_len as f64).max(max);
                let d = self.dim as f64;
                let base = self.theta * ((factor * len / max) - (factor - 1.0)).powf(d / (d - 2.0));
                (self.plain_inv_freq(base), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let freqs = self
                    .plain_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let s = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings: old,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let att = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) => get_mscale(*factor, *m) / get_mscale(*factor, *a),
                    _ => get_mscale(*factor, 1.0),
                });
                let d = self.dim as f64;
                let base = self.theta;
                let correction_dim = |rot: f64| {
                    (d * (old / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let extrapolation = self.plain_inv_freq(base);
                let freqs = extrapolation
                    .iter()
                    .enumerate()
                    .map(|(i, &extra)| {
                        let inter = extra / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        inter * (1.0 - extrapolation_factor) + extra * extrapolation_factor
                    })
                    .collect();
                (freqs, att)
            }
        }
    }

    /// `cos` and `sin` `[batch, 1, seq, dim]` for `positions` `[batch, seq]` (or `[1, seq]`).
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let pos: Vec<Vec<u32>> = positions.to_dtype(DType::U32)?.to_vec2()?;
        let seq_len = pos.iter().flatten().max().map_or(0, |&m| m as usize + 1);
        let (inv, att) = self.inv_freq(seq_len);
        let inv: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
        let (b, t) = (pos.len(), pos.first().map_or(0, |r| r.len()));
        let half = self.dim / 2;
        let mut cos = Vec::with_capacity(b * t * self.dim);
        let mut sin = Vec::with_capacity(b * t * self.dim);
        for row in &pos {
            for &p in row {
                let freqs: Vec<f32> = inv.iter().map(|&f| p as f32 * f).collect();
                for _ in 0..2 {
                    for &f in freqs.iter().take(half) {
                        cos.push((f.cos() as f64 * att) as f32);
                        sin.push((f.sin() as f64 * att) as f32);
                    }
                }
            }
        }
        let shape = (b, 1, t, self.dim);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, dim]`, where rotate_half
/// swaps the two halves of the last dimension and negates the (new) first. One kernel with its
/// own backward where the shapes allow ([`rotary_kernel`]); otherwise composed from
/// narrow / neg / cat / mul, which all carry gradients.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let float = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if float && x.rank() == 4 && cos.rank() == 4 && cos.dim(1)? == 1 {
        return rotary_kernel(x, cos, sin);
    }
    rotary_composed(x, cos, sin)
}

/// [`apply_rotary`] from primitives, for any shapes that broadcast.
fn rotary_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(candle_core::D::Minus1, 0, half)?;
    let x2 = x.narrow(candle_core::D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], candle_core::D::Minus1)?;
    Ok(x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)?)
}

/// [`apply_rotary`] as one kernel (candle's `rope`, the same rotate-half rotation) instead of
/// seven elementwise passes per call: on the GPU seven launches, on the CPU seven passes over
/// the queries and keys and four of their copies kept for backward (11 MB a layer for SmolLM2
/// at 8 × 128). Its backward is the
/// inverse rotation, the same kernel with `-sin`: the rotation is orthogonal, and `sin` is the
/// same for both halves of a head.
fn rotary_kernel(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(candle_core::D::Minus1)? / 2;
    // `[b, 1, t, d]` → `[b, t, d/2]` (or `[t, d/2]` for one row shared by the batch).
    let halve = |t: &Tensor| -> Result<Tensor> {
        let t = t
            .squeeze(1)?
            .narrow(candle_core::D::Minus1, 0, half)?
            .to_dtype(x.dtype())?;
        let t = if t.dim(0)? == 1 && x.dim(0)? != 1 {
            t.squeeze(0)?
        } else {
            t
        };
        Ok(t.contiguous()?)
    };
    let (c, s) = (halve(cos)?, halve(sin)?);
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &c, &s)?;
    crate::ops::with_backward(x, y, move |_x, _y, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &c, &s.neg()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rotary(scaling: serde_json::Value) -> Rotary {
        let cfg = serde_json::json!({"rope_theta": 10000.0, "rope_scaling": scaling});
        Rotary::from_config(&cfg, 8, 16).unwrap()
    }

    /// The one-kernel rotation (the GPU's) against the composed one, values and gradients, with
    /// per-row positions and with one row of positions shared by the batch.
    #[test]
    fn the_rotation_kernel_matches_the_composed_rotation() {
        let r = rotary(serde_json::Value::Null);
        for pos in [
            Tensor::new(&[[0u32, 1, 2, 3], [5, 6, 7, 8]], &Device::Cpu).unwrap(),
            Tensor::new(&[[3u32, 4, 5, 6]], &Device::Cpu).unwrap(),
        ] {
            let (cos, sin) = r.cos_sin(&pos, DType::F32, &Device::Cpu).unwrap();
            let x = Var::randn(0f32, 1.0, (2, 3, 4, 8), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &Device::Cpu).unwrap();
            let run = |f: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor(), &cos, &sin).unwrap();
                let g = (&y * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(x.as_tensor())
                    .unwrap()
                    .clone();
                (y, g)
            };
            let (y0, g0) = run(rotary_composed);
            let (y1, g1) = run(rotary_kernel);
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(&y0, &y1) < 1e-6, "values differ by {}", diff(&y0, &y1));
            assert!(
                diff(&g0, &g1) < 1e-6,
                "gradients differ by {}",
                diff(&g0, &g1)
            );
        }
    }

    #[test]
    fn rotation_keeps_norms_and_carries_gradients() {
        let r = rotary(serde_json::Value::Null);
        let pos = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).unwrap();
        let (cos, sin) = r.cos_sin(&pos, DType::F32, &Device::Cpu).unwrap();
        let x = Var::randn(0f32, 1.0, (1, 2, 4, 8), &Device::Cpu).unwrap();
        let y = apply_rotary(x.as_tensor(), &cos, &sin).unwrap();
        let n = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum(candle_core::D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (a, b) in n(x.as_tensor()).iter().zip(n(&y)) {
            assert!((a - b).abs() < 1e-4);
        }
        // Position 0 is the identity.
        let first = y.narrow(2, 0, 1).unwrap();
        let x0 = x.as_tensor().narrow(2, 0, 1).unwrap();
        let d: f32 = (first - x0)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-6);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }

    #[test]
    fn unknown_scaling_type_lists_the_supported_ones() {
        let cfg = serde_json::json!({"rope_scaling": {"rope_type": "su", "factor": 2.0}});
        let e = Rotary::from_config(&cfg, 8, 16).unwrap_err().to_string();
        assert!(e.contains("llama3") && e.contains("`su`"), "{e}");
    }

    #[test]
    fn dynamic_only_changes_past_the_context() {
        let r = rotary(serde_json::json!({"type": "dynamic", "factor": 2.0}));
        assert_eq!(r.inv_freq(10).0, r.inv_freq(16).0);
        assert_ne!(r.inv_freq(16).0, r.inv_freq(20).0);
        assert_eq!(r.context_length(), 32);
    }
}
