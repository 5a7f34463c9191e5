//! What attention layers have already seen: per-layer keys and values, as a generation cache or
//! as the virtual tokens of prefix tuning.

use candle_core::Tensor;

/// Keys and values of one attention layer, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct KeyValue {
    pub key: Tensor,
    pub value: Tensor,
}

impl KeyValue {
    pub fn len(&self) -> usize {
        self.key.dims().get(2).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Positions the model has already seen, per attention layer: a generation cache, or the
/// virtual tokens of prefix tuning (a cache the model did not compute). A forward pass given a
/// cache attends to what it holds and appends the new positions' keys and values, so passing a
/// clone keeps the original (cloning only copies tensor handles).
#[derive(Debug, Clone, Default)]
pub struct Cache {
    /// Self-attention of each layer (the decoder's layers in an encoder-decoder model).
    pub self_attn: Vec<Option<KeyValue>>,
    /// Encoder-decoder models: each decoder layer's cross-attention keys/values. Prefix tuning
    /// may put virtual tokens here; otherwise the model fills them from the encoder output once
    /// and reuses them.
    pub cross_attn: Vec<Option<KeyValue>>,
    /// Encoder-decoder models: prefixes for the encoder's self-attention (never appended to).
    pub encoder_self_attn: Vec<Option<KeyValue>>,
    /// Encoder-decoder models: the encoder's output `[batch, src, hidden]` and its mask, so that
    /// decoding steps run the encoder once.
    pub encoder_output: Option<(Tensor, Option<Tensor>)>,
}

impl Cache {
    /// Positions held by the (decoder) self-attention cache.
    pub fn past_len(&self) -> usize {
        self.self_attn
            .iter()
            .flatten()
            .map(|kv| kv.len())
            .next()
            .unwrap_or(0)
    }
}
