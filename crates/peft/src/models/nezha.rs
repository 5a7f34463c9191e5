//! NEZHA (Wei et al., 2019; transformers ≤ 4.57's `NezhaModel`,
//! `NezhaForSequenceClassification`, `NezhaForTokenClassification`, keys under `nezha.`): BERT
//! without absolute position embeddings, with the functional relative position encoding in the
//! keys and values of every self-attention. The layers, heads and hook points are BERT's
//! ([`super::bert`], flavor NEZHA); what is NEZHA's own lives here: the sinusoidal table indexed
//! by `clip(j − i, ±max_relative_position)` and the attention that adds `q_i · r_ij` to the
//! scores and `Σ_j p_ij r_ij` to the context.

use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::bert::Bert;
use super::LoadOptions;
use crate::io::Weights;
use crate::layers::HeadInit;
use crate::{ops, Result};

/// Loads a NEZHA checkpoint (`model_type` `nezha`).
pub fn load(
    weights: &Weights,
    init: &HeadInit,
    config: serde_json::Value,
    dir: &Path,
    opts: &LoadOptions,
) -> Result<Bert> {
    Bert::load_nezha(weights, init, config, dir, opts)
}

/// transformers' `NezhaRelativePositionsEncoding`: `[length, length, depth]`, row `i`, column
/// `j` holding the sinusoid of `clip(j − i, ±max_relative_position) + max_relative_position`.
pub fn relative_table(
    length: usize,
    depth: usize,
    max_relative_position: usize,
    device: &Device,
) -> Result<Tensor> {
    let vocab = 2 * max_relative_position + 1;
    let mut table = vec![0f32; vocab * depth];
    for p in 0..vocab {
        for k in (0..depth).step_by(2) {
            // Computed in f32 as torch does: exp(k · (−ln 10000 / depth)).
            let div = ((k as f32) * (-(10000f32).ln() / depth as f32)).exp();
            let angle = p as f32 * div;
            table[p * depth + k] = angle.sin();
            if k + 1 < depth {
                table[p * depth + k + 1] = angle.cos();
            }
        }
    }
    let m = max_relative_position as i64;
    let mut out = Vec::with_capacity(length * length * depth);
    for i in 0..length as i64 {
        for j in 0..length as i64 {
            let idx = ((j - i).clamp(-m, m) + m) as usize;
            out.extend_from_slice(&table[idx * depth..(idx + 1) * depth]);
        }
    }
    Ok(Tensor::from_vec(out, (length, length, depth), device)?)
}

/// NEZHA's self-attention on the projections `q` `[b, t, heads·d]`, `k`, `v` `[b, s, heads·d]`
/// with the relative table `rel` (`[≥ s, ≥ s, d]`; query `i` uses row `past + i`), the additive
/// `mask` and dropout on the probabilities. Returns the merged context `[b, t, heads·d]`.
#[allow(clippy::too_many_arguments)]
pub fn relative_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    rel: &Tensor,
    dropout: f64,
    train: bool,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let s = k.dim(1)?;
    let d = hd / heads;
    let past = s - t;
    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        Ok(x.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (qh, kh, vh) = (split(q, t)?, split(k, s)?, split(v, s)?);
    // [t, s, d]: the rows of the query positions, the columns of every key.
    let r = rel
        .narrow(0, past, t)?
        .narrow(1, 0, s)?
        .to_dtype(q.dtype())?
        .contiguous()?;
    let scores = qh.matmul(&kh.t()?)?;
    // q_i · r_ij: [t, b·heads, d] @ [t, d, s] → [t, b·heads, s] → [b, heads, t, s].
    let q_t = qh
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((t, b * heads, d))?;
    let key_pos = q_t
        .matmul(&r.transpose(1, 2)?.contiguous()?)?
        .reshape((t, b, heads, s))?
        .permute((1, 2, 0, 3))?;
    let scores = ((scores + key_pos)? / (d as f64).sqrt())?;
    let probs = ops::dropout(&ops::masked_softmax(&scores, mask)?, dropout, train)?;
    let ctx = probs.matmul(&vh)?;
    // Σ_j p_ij r_ij: [t, b·heads, s] @ [t, s, d] → [b, heads, t, d].
    let p_t = probs
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((t, b * heads, s))?;
    let val_pos = p_t
        .matmul(&r)?
        .reshape((t, b, heads, d))?
        .permute((1, 2, 0, 3))?;
    let ctx = (ctx + val_pos)?;
    Ok(ctx.transpose(1, 2)?.reshape((b, t, hd))?)
}

/// The table's dtype-independent default: f32 on the model's device.
pub fn table_for(
    max_positions: usize,
    head_dim: usize,
    max_relative_position: usize,
    device: &Device,
) -> Result<Tensor> {
    relative_table(max_positions, head_dim, max_relative_position, device)?
        .to_dtype(DType::F32)
        .map_err(Into::into)
}
