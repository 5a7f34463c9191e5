//! PiSSA / OLoRA back to a plain LoRA (PEFT's `save_pretrained(...,
//! path_initial_model_for_weight_conversion=...)`).
//!
//! Such an adapter trains on a residual base `W_res = W - s·B₀A₀`. With the initial factors saved
//! beforehand, the change to the *original* W is `s·(B A - B₀ A₀) = s·[B | -B₀] [A ; A₀]`: a LoRA
//! of rank 2r with the same scaling (alpha doubled, or times √2 with rsLoRA), usable on the
//! untouched base model and with other adapters.

use candle_core::Tensor;
use serde_json::Value;
use std::collections::HashMap;

use super::config::{InitLoraWeights, LoraConfig};
use crate::{Error, Result};

/// Checks that a conversion is possible for `config` (PEFT refuses rsLoRA with rank or alpha
/// patterns, and a DoRA update is not a low-rank difference).
pub fn check_convertible(config: &LoraConfig) -> Result<()> {
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(Error::Config(
            "converting to LoRA is not supported with rank_pattern or alpha_pattern together with \
             use_rslora = true"
                .into(),
        ));
    }
    if config.use_dora {
        return Err(Error::Config(
            "a DoRA adapter cannot be converted to a plain LoRA (its update is not B A)".into(),
        ));
    }
    Ok(())
}

/// The config of the converted adapter: `init_lora_weights = true`, rank doubled, scaling kept.
pub fn converted_config(config: &LoraConfig) -> LoraConfig {
    let mut c = config.clone();
    c.init_lora_weights = InitLoraWeights::Bool(true);
    c.r *= 2;
    c.lora_alpha *= if c.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    for v in c.rank_pattern.values_mut() {
        if let Some(n) = v.as_u64() {
            *v = Value::from(2 * n);
        }
    }
    c
}

/// The initial adapter's config must load as a plain LoRA (`init_lora_weights = true`), or
/// loading it would subtract the decomposition from the base a second time.
pub fn check_initial_config(initial: &LoraConfig) -> Result<()> {
    if initial.init_lora_weights.method()?.mutates_base() {
        return Err(Error::Config(
            "the initial adapter's init_lora_weights must be true (save it with init_lora_weights \
             = true before training); otherwise loading it subtracts the decomposition again"
                .into(),
        ));
    }
    Ok(())
}

/// `lora_A → [A ; A₀]` (rows), `lora_B → [B | -B₀]` (columns); other tensors are kept.
///
/// PEFT 0.21 keeps only the `lora_A`/`lora_B` tensors here, which drops a classifier saved
/// through `modules_to_save` and leaves an adapter PEFT itself cannot load; we keep them.
pub fn convert_state_dict(
    trained: Vec<(String, Tensor)>,
    initial: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let init = |k: &str| {
        initial.get(k).ok_or_else(|| {
            Error::Adapter(format!(
                "the initial adapter has no `{k}`; it must be the same adapter saved before training"
            ))
        })
    };
    let mut out = Vec::with_capacity(trained.len());
    for (k, t) in trained {
        let t = if k.ends_with(".lora_A.weight") {
            Tensor::cat(&[&t, &init(&k)?.to_dtype(t.dtype())?], 0)?
        } else if k.ends_with(".lora_B.weight") {
            Tensor::cat(&[&t, &init(&k)?.to_dtype(t.dtype())?.neg()?], 1)?
        } else {
            t
        };
        out.push((k, t));
    }
    Ok(out)
}
