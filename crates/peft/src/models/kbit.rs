//! PEFT's `prepare_model_for_kbit_training`: readies a base model with quantized layers for
//! adapter training. PEFT freezes every parameter, casts the float parameters that are not
//! quantized (norms, embeddings, heads kept in fp16/bf16) to fp32 so that the small trainable
//! paths around them do not lose precision, and makes the embedding output require grad so that
//! gradient checkpointing still sends gradients to adapters below it.

use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId};

use super::Model;
use crate::Result;

/// What [`prepare_model_for_kbit_training`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KbitPrepared {
    /// Parameters that were being trained in place and are now frozen.
    pub frozen: Vec<String>,
    /// Parameters cast from f16/bf16 to f32.
    pub cast_to_f32: Vec<String>,
    /// Parameters left quantized.
    pub quantized: usize,
}

/// Freezes every base parameter, drops per-adapter trainable copies, and casts every float
/// parameter that is not quantized from f16/bf16 to f32 (tied weights stay shared). Quantized
/// weights keep their codes.
///
/// PEFT's third step, `enable_input_require_grads`, has nothing to switch on here: candle
/// records the graph through any tensor that depends on a trainable variable, and a
/// gradient-checkpointed block gives an input that records nothing a gradient itself
/// (`grad::checkpoint::block`); there is no flag to set and none is pretended.
pub fn prepare_model_for_kbit_training(model: &mut dyn Model) -> Result<KbitPrepared> {
    let mut out = KbitPrepared::default();
    let mut cast: HashMap<TensorId, Tensor> = HashMap::new();
    for module in model.modules_mut() {
        for p in module.params_mut() {
            if p.base_var().is_some() {
                p.freeze()?;
                out.frozen.push(p.name.clone());
            }
            p.drop_copies();
            if p.quant().is_some() {
                out.quantized += 1;
                continue;
            }
            if !matches!(p.base().dtype(), DType::F16 | DType::BF16) {
                continue;
            }
            let id = p.base().id();
            let t = match cast.get(&id) {
                Some(t) => t.clone(),
                None => {
                    let t = p.base().to_dtype(DType::F32)?;
                    cast.insert(id, t.clone());
                    t
                }
            };
            p.set_base(t)?;
            out.cast_to_f32.push(p.name.clone());
        }
    }
    tracing::info!(
        "prepare_model_for_kbit_training: {} parameters cast to f32, {} frozen, {} quantized",
        out.cast_to_f32.len(),
        out.frozen.len(),
        out.quantized
    );
    Ok(out)
}
