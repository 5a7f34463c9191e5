//! The parts of attention every architecture shares: extending a key/value cache, the causal
//! (and sliding-window) mask, grouped-query head sharing, and scaled dot-product attention built
//! from ops that have a backward pass.

use candle_core::{DType, Device, Tensor};

use super::cache::KeyValue;
use crate::{ops, Result};

/// Appends this step's keys and values (`[batch, kv_heads, new, head_dim]`) to `slot` and returns
/// everything the attention should see: the cached positions followed by the new ones. Without a
/// slot (no cache) the new keys and values are returned as they are.
pub fn extend_cache(
    slot: Option<&mut Option<KeyValue>>,
    key: Tensor,
    value: Tensor,
) -> Result<(Tensor, Tensor)> {
    let Some(slot) = slot else {
        return Ok((key, value));
    };
    let (key, value) = match slot.as_ref() {
        Some(past) if !past.is_empty() => (
            Tensor::cat(&[&past.key, &key], 2)?,
            Tensor::cat(&[&past.value, &value], 2)?,
        ),
        _ => (key, value),
    };
    *slot = Some(KeyValue {
        key: key.clone(),
        value: value.clone(),
    });
    Ok((key, value))
}

/// The additive mask `[batch, 1, new, past + new]` of a decoder: position `past + i` attends to
/// positions `0..=past + i` (and, with a sliding window `w`, only to the last `w` of them), minus
/// padded positions of `padding` (`[batch, past + new]` or `[batch, new]`, 1 = real token).
pub fn causal_mask(
    batch: usize,
    new: usize,
    past: usize,
    padding: Option<&Tensor>,
    sliding_window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let total = past + new;
    let neg = f32::MIN;
    let causal: Vec<f32> = (0..new)
        .flat_map(|i| {
            let q = past + i;
            (0..total).map(move |k| {
                let too_old = sliding_window.is_some_and(|w| q >= w && k <= q - w);
                if k > q || too_old {
                    neg
                } else {
                    0.0
                }
            })
        })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, new, total), device)?;
    let mask = match padding {
        Some(p) => {
            // Both parts are 0 or the most negative float; their sum must not overflow to -inf
            // (softmax of an all -inf row is NaN), so take the minimum instead of adding.
            let pad = ops::padding_mask(p, total, DType::F32)?;
            causal
                .broadcast_as((batch, 1, new, total))?
                .broadcast_minimum(&pad)?
        }
        None => causal.broadcast_as((batch, 1, new, total))?.contiguous()?,
    };
    Ok(mask.to_dtype(dtype)?)
}

/// Repeats each key/value head `groups` times so that `[batch, kv_heads, s, d]` lines up with
/// `[batch, kv_heads * groups, t, d]` queries (grouped-query attention).
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, groups, s, d))?
        .reshape((b, kv * groups, s, d))?)
}

/// `softmax(q kᵀ · scale + mask [+ bias]) v` with dropout on the probabilities, for `q`
/// `[batch, heads, t, d]` and `k`, `v` `[batch, kv_heads, s, d]` (kv heads shared by groups of
/// query heads). `bias` is an additive score bias broadcast like the mask (T5's relative
/// position bias). Returns `[batch, heads, t, d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    bias: Option<&Tensor>,
    scale: f64,
    dropout: f64,
    train: bool,
) -> Result<Tensor> {
    if bias.is_none() && (!train || dropout == 0.0) && !crate::grad::is_enabled() {
        // Nothing records gradients (generation, evaluation: `no_grad`): read the cache in
        // place. Decided by the context, not by whether this model's tensors happen to track
        // ops, so a model gives the same numbers wrapped in adapters or not.
        if let Some(y) = ops::cached_attention(q, k, v, mask, scale)? {
            return Ok(y);
        }
    }
    if ops::attention_node_applies(q, bias, dropout, train) {
        return ops::attention_node(q, k, v, mask, bias, scale, dropout, train);
    }
    if bias.is_none() {
        // On the CPU in f32: one node, key/value heads read in place for their query heads.
        if let Some(y) = ops::attention_split_heads(q, k, v, mask, scale, dropout, train)? {
            return Ok(y);
        }
    }
    let heads = q.dim(1)?;
    let groups = heads / k.dim(1)?;
    let k = repeat_kv(k, groups)?;
    let v = repeat_kv(v, groups)?;
    let q = if scale == 1.0 {
        q.clone()
    } else {
        (q * scale)?
    };
    let mut scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    if let Some(b) = bias {
        scores = scores.broadcast_add(b)?;
    }
    let probs = ops::dropout(&ops::masked_softmax(&scores, mask)?, dropout, train)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}
