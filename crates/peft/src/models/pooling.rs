//! Sentence embeddings as sentence-transformers computes them from a model's last hidden states:
//! the pooling its `modules.json` names (`sentence_transformers.models.Pooling`, configured by
//! `<path>/config.json`: CLS token, mean, max, mean divided by √length, last token), then L2
//! normalisation when a `Normalize` module follows. A directory without `modules.json` gets what
//! sentence-transformers builds for a plain transformers model: mean pooling, not normalised.

use candle_core::{DType, Tensor, D};
use std::path::Path;

use crate::io::read_json;
use crate::{Error, Result};

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's vector (`pooling_mode_cls_token`).
    Cls,
    /// The mean over real tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The element-wise maximum over real tokens (`pooling_mode_max_tokens`).
    Max,
    /// The sum over real tokens divided by √(their count) (`pooling_mode_mean_sqrt_len_tokens`).
    MeanSqrtLen,
    /// The last real token's vector (`pooling_mode_lasttoken`).
    LastToken,
}

impl PoolingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingMode::Cls => "cls",
            PoolingMode::Mean => "mean",
            PoolingMode::Max => "max",
            PoolingMode::MeanSqrtLen => "mean_sqrt_len_tokens",
            PoolingMode::LastToken => "lasttoken",
        }
    }
}

/// A model's sentence-embedding recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// Divide by the L2 norm (a `Normalize` module follows the pooling).
    pub normalize: bool,
}

impl Default for Pooling {
    fn default() -> Self {
        Self {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

impl Pooling {
    /// Reads the recipe from a sentence-transformers model directory (see the module docs).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Self::default());
        }
        let modules = read_json(&modules_path)?;
        let list = modules.as_array().ok_or_else(|| {
            Error::Config(format!(
                "{}: expected a list of modules",
                modules_path.display()
            ))
        })?;
        let kind = |m: &serde_json::Value, suffix: &str| {
            m.get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(suffix))
        };
        let normalize = list.iter().any(|m| kind(m, ".Normalize"));
        let Some(pooling) = list.iter().find(|m| kind(m, ".Pooling")) else {
            return Ok(Self {
                mode: PoolingMode::Mean,
                normalize,
            });
        };
        let sub = pooling.get("path").and_then(|p| p.as_str()).unwrap_or("");
        let config_path = dir.join(sub).join("config.json");
        let cfg = read_json(&config_path)?;
        let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let modes = [
            ("pooling_mode_cls_token", PoolingMode::Cls),
            ("pooling_mode_mean_tokens", PoolingMode::Mean),
            ("pooling_mode_max_tokens", PoolingMode::Max),
            (
                "pooling_mode_mean_sqrt_len_tokens",
                PoolingMode::MeanSqrtLen,
            ),
            ("pooling_mode_lasttoken", PoolingMode::LastToken),
        ];
        let chosen: Vec<PoolingMode> = modes
            .iter()
            .filter(|(k, _)| on(k))
            .map(|&(_, m)| m)
            .collect();
        let mode = match chosen.as_slice() {
            [m] => *m,
            [] => {
                return Err(Error::Config(format!(
                    "{}: no pooling mode is switched on; set one of {}",
                    config_path.display(),
                    modes.map(|(k, _)| k).join(", ")
                )))
            }
            _ => {
                return Err(Error::Config(format!(
                    "{}: several pooling modes are on ({}); their concatenation is not supported, \
                     keep one",
                    config_path.display(),
                    chosen
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        Ok(Self { mode, normalize })
    }

    /// Pools `hidden` `[batch, seq, dim]` over the real tokens of `mask` `[batch, seq]` (1 = real)
    /// into `[batch, dim]` f32.
    pub fn apply(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let count = m.sum(1)?; // [batch, 1]
        let pooled = match self.mode {
            PoolingMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Mean => hidden
                .broadcast_mul(&m)?
                .sum(1)?
                .broadcast_div(&count.clamp(1e-9, f64::MAX)?)?,
            PoolingMode::MeanSqrtLen => hidden
                .broadcast_mul(&m)?
                .sum(1)?
                .broadcast_div(&count.sqrt()?)?,
            PoolingMode::Max => {
                // Padding set to -1e9 first, as sentence-transformers does.
                let off = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&off)?.max(1)?
            }
            PoolingMode::LastToken => {
                let lens: Vec<f32> = count.squeeze(1)?.to_vec1()?;
                let rows = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let last = (n as usize).max(1) - 1;
                        Ok(hidden.get(i)?.get(last)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?)
    }
}
