//! Scaled dot-product attention as one graph node off the CPU.
//!
//! Composed from candle ops, attention keeps three `[batch, heads, t, s]` tensors per layer
//! alive for backward: the scores (the softmax node's input), the probabilities, and the
//! probabilities after dropout (the product's input). Each graph node also costs candle's
//! backward a fresh zero tensor and an add. Here the forward runs detached; one node over
//! `(q, k, v)` keeps the probabilities alone; and backward redraws the dropout mask from its
//! seed and writes the three gradients in closed form.
//!
//! The CPU has its own fused op (`attention.rs`). This one is for devices where candle's
//! products are the fast path (CUDA) and the tensors are too large to keep three of.

use candle_core::{Tensor, D};

use super::{dropout_seeded, next_dropout_seed, with_backward3};
use crate::Result;

/// `softmax(q kᵀ · scale + bias + mask)` with dropout on the probabilities, times `v`.
///
/// - `q` is `[batch, heads, t, d]`; `k` and `v` are `[batch, kv_heads, s, d]`. Each key/value
///   head serves `heads / kv_heads` query heads.
/// - `mask` and the frozen score `bias` are additive and broadcast to `[batch, heads, t, s]`.
/// - Returns `[batch, heads, t, d]`.
/// - The dropout mask is the one [`super::dropout`] draws (one seed, as that draws). So this
///   node gives what the composed version gives, mask included.
#[allow(clippy::too_many_arguments)]
pub fn attention_node(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    bias: Option<&Tensor>,
    scale: f64,
    dropout: f64,
    train: bool,
) -> Result<Tensor> {
    let p = if train { dropout } else { 0.0 };
    if p >= 1.0 {
        return Err(crate::Error::Config(format!(
            "attention dropout {p}: the one-node attention takes 0 <= p < 1"
        )));
    }
    let (b, heads, _, d) = q.dims4()?;
    let (kv_heads, s) = (k.dim(1)?, k.dim(2)?);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(crate::Error::ShapeMismatch {
            name: "attention key/value heads".into(),
            expected: vec![heads],
            found: vec![kv_heads],
        });
    }
    let groups = heads / kv_heads;
    // Key/value heads repeated for their query heads, `[batch, heads, s, d]`, contiguous.
    let repeat = move |x: &Tensor| -> candle_core::Result<Tensor> {
        if groups == 1 {
            return x.contiguous();
        }
        x.unsqueeze(2)?
            .expand((b, kv_heads, groups, s, d))?
            .reshape((b, heads, s, d))
    };
    // A gradient for the repeated heads summed back onto each key/value head.
    let fold = move |x: Tensor| -> candle_core::Result<Tensor> {
        if groups == 1 {
            return Ok(x);
        }
        x.reshape((b, kv_heads, groups, s, d))?.sum(2)
    };
    let scaled = move |q: &Tensor| -> candle_core::Result<Tensor> {
        let q = q.detach();
        if scale == 1.0 {
            q.contiguous()
        } else {
            (q * scale)?.contiguous()
        }
    };

    let qs = scaled(q)?;
    let kr = repeat(&k.detach())?;
    let mut scores = qs.matmul(&kr.t()?.contiguous()?)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(&bias.detach())?;
    }
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let seed = (p > 0.0).then(next_dropout_seed);
    let drop_with = move |x: &Tensor| -> candle_core::Result<Tensor> {
        match seed {
            Some(seed) => dropout_seeded(x, p, seed).map_err(candle_core::Error::wrap),
            None => Ok(x.clone()),
        }
    };
    let vr = repeat(&v.detach())?;
    let y = drop_with(&probs)?.matmul(&vr)?;
    drop((qs, kr, vr));
    with_backward3(q, k, v, y, move |q, k, v, _y, g| {
        let g = g.contiguous()?;
        let (qs, kr, vr) = (scaled(q)?, repeat(&k.detach())?, repeat(&v.detach())?);
        let dropped = drop_with(&probs)?;
        let dv = dropped.t()?.contiguous()?.matmul(&g)?;
        drop(dropped);
        // Through dropout (the same mask and scale), then softmax: `p ⊙ (dp - Σ dp ⊙ p)`.
        let dp = drop_with(&g.matmul(&vr.t()?.contiguous()?)?)?;
        let dot = (&dp * &probs)?.sum_keepdim(D::Minus1)?;
        let ds = (&probs * dp.broadcast_sub(&dot)?)?;
        drop(dp);
        let mut dq = ds.matmul(&kr)?;
        if scale != 1.0 {
            dq = (dq * scale)?;
        }
        let dk = ds.t()?.contiguous()?.matmul(&qs)?;
        Ok((Some(dq), Some(fold(dk)?), Some(fold(dv)?)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The one-node attention against the composed one on the CPU (the same candle products,
    /// the same dropout masks for the same seed): output and the gradients of q, k and v, with
    /// grouped key/value heads, a padding mask, a score bias and dropout.
    #[test]
    fn matches_the_composed_attention_with_gradients() {
        let dev = Device::Cpu;
        let (b, heads, kv, t, s, d) = (2, 6, 2, 5, 7, 8);
        let q = Var::randn(0f32, 1.0, (b, heads, t, d), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, kv, s, d), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, kv, s, d), &dev).unwrap();
        let pad = Tensor::new(&[[1u32, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], &dev).unwrap();
        let mask = crate::ops::padding_mask(&pad, s, DType::F32).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (1, heads, t, s), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev).unwrap();
        for (p, with_bias) in [(0.0, false), (0.3, false), (0.2, true)] {
            let bias = with_bias.then_some(&bias);
            let run = |node: bool| {
                crate::ops::seed_dropout(11);
                let y = if node {
                    attention_node(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        Some(&mask),
                        bias,
                        0.35,
                        p,
                        true,
                    )
                } else {
                    // The composed reference, written out as layers::attention composes it.
                    let rep = |x: &Tensor| {
                        x.unsqueeze(2)
                            .unwrap()
                            .expand((b, kv, heads / kv, s, d))
                            .unwrap()
                            .reshape((b, heads, s, d))
                            .unwrap()
                    };
                    let (kr, vr) = (rep(k.as_tensor()), rep(v.as_tensor()));
                    let qs = (q.as_tensor() * 0.35).unwrap();
                    let mut scores = qs
                        .contiguous()
                        .unwrap()
                        .matmul(&kr.t().unwrap().contiguous().unwrap())
                        .unwrap();
                    if let Some(bias) = bias {
                        scores = scores.broadcast_add(bias).unwrap();
                    }
                    let probs = crate::ops::dropout(
                        &crate::ops::masked_softmax(&scores, Some(&mask)).unwrap(),
                        p,
                        true,
                    )
                    .unwrap();
                    Ok(probs.matmul(&vr.contiguous().unwrap()).unwrap())
                }
                .unwrap();
                let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
                (y, g(&q), g(&k), g(&v))
            };
            let (a, b_) = (run(true), run(false));
            let diff = |x: &Tensor, y: &Tensor| {
                (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            for (name, x, y) in [
                ("y", &a.0, &b_.0),
                ("dq", &a.1, &b_.1),
                ("dk", &a.2, &b_.2),
                ("dv", &a.3, &b_.3),
            ] {
                assert!(
                    diff(x, y) < 1e-5,
                    "p = {p}, bias {with_bias}: {name} differs by {}",
                    diff(x, y)
                );
            }
        }
    }
}
