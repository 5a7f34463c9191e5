//! Tensor operations that are safe to train through.
//!
//! candle's fused kernels (`softmax_last_dim`, `layer_norm`, `rms_norm`, rotary embeddings) have no
//! backward pass and silently drop gradients, so the model code uses these compositions of
//! primitive ops instead. The one custom op here, [`frozen_linear`], exists for speed: candle's
//! matmul backward always computes the gradient of *both* operands, which for a frozen weight is
//! a full GEMM thrown away. Parameter-efficient training is exactly the case where almost every
//! weight is frozen, so skipping that GEMM cuts the backward pass by about a third.

use candle_core::{DType, Tensor, D};

use crate::Result;

mod attention;
mod bf16;
pub(crate) mod buffer;
mod cached_attention;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod device_attention;
mod fused;
pub mod gemm;
mod linear;
mod linear_cross_entropy;
mod low_rank;
mod precomputed;
mod quant;
mod saved;
mod scale;
mod spatial;

pub use attention::{attention_merged_heads, attention_split_heads};
pub use cached_attention::cached_attention;
pub use cross_entropy::next_token_labels;
pub use device_attention::attention_node;
pub use fused::{gelu_erf, silu_mul};
pub use linear_cross_entropy::{linear_cross_entropy, HeadWeight};
pub use low_rank::BaseWeight;
use precomputed::BackwardFn;
pub use precomputed::{with_backward, with_backward2, with_backward3};
pub use quant::quant_linear;
pub use scale::scale_columns;
pub use spatial::{
    conv2d, frozen_conv2d, group_norm, upsample_nearest, upsample_nearest2x, ConvParams,
};

/// Whether the one-node frozen linear op (f32 or bf16 on the CPU) serves these tensors.
pub fn fused_applies(x: &Tensor, w: &Tensor) -> bool {
    linear::applies(x, w, None)
}

/// Whether `x · wᵀ` runs as `torch.autocast` runs it on the CPU: an f32 input and a bf16
/// weight, the product in bf16 with f32 accumulation and an f32 result (the one-node frozen
/// linear serves it; nothing else needs to cast).
pub fn autocast_applies(x: &Tensor, w: &Tensor) -> bool {
    linear::autocast(x, w) && x.device().is_cpu() && w.device().is_cpu()
}

/// bf16 activations on the CPU: the fused f32 kernels serve them between two casts (the casts
/// are single passes; the composed bf16 ops they replace are many, and candle computes each
/// bf16 element through f32 anyway). The matrix products take bf16 directly ([`gemm`]).
pub(crate) fn bf16_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::BF16
}

/// Softmax over the last dimension. Forward with candle's fused kernel; backward in closed form,
/// `dx = y * (dy - sum(dy * y))`, which the fused kernel lacks.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    masked_softmax(x, None)
}

/// `softmax(x + mask)` with a constant additive `mask` broadcast over `x`: attention
/// probabilities in one node, so neither the masked nor the raw scores stay alive for backward.
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scores = match mask {
        Some(m) => x.detach().broadcast_add(m)?,
        None => x.detach(),
    };
    let y = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    with_backward(x, y, |_x, y, g| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    })
}

/// The additive attention mask for a padding mask `[batch, cols]` (1 = attend): `[batch, 1, 1,
/// total]`, 0 where attended and the most negative float where padded. A mask covering only the
/// newest `cols < total` positions attends to every earlier (cached or prefix) position.
pub fn padding_mask(mask: &Tensor, total: usize, dtype: DType) -> Result<Tensor> {
    let (b, cols) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let m = match cols.cmp(&total) {
        std::cmp::Ordering::Equal => m,
        std::cmp::Ordering::Less => Tensor::cat(
            &[
                &Tensor::ones((b, total - cols), DType::F32, mask.device())?,
                &m,
            ],
            1,
        )?,
        std::cmp::Ordering::Greater => {
            return Err(crate::Error::ShapeMismatch {
                name: "attention_mask".into(),
                expected: vec![b, total],
                found: vec![b, cols],
            })
        }
    };
    Ok((m.affine(-1.0, 1.0)? * f32::MIN as f64)?
        .reshape((b, 1, 1, total))?
        .to_dtype(dtype)?)
}

/// Log-softmax over the last dimension (for the cross-entropy loss).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `layer_norm(hidden + residual)`: a post-norm block's residual step. With a frozen affine on
/// f32 CPU tensors it is one node (the sum kept inside it); otherwise the sum and [`layer_norm`].
pub fn add_layer_norm(
    hidden: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let affine_trained = weight.track_op() || bias.is_some_and(|b| b.track_op());
    let fast = [hidden, residual, weight]
        .into_iter()
        .chain(bias)
        .all(fused::fast);
    if !affine_trained && fast && hidden.shape() == residual.shape() {
        return fused::add_layer_norm_frozen(hidden, residual, weight, bias, eps);
    }
    layer_norm(&(hidden + residual)?, weight, bias, eps)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
/// biased variance as torch computes it.
///
/// With frozen affine parameters (the usual case in PEFT) the forward pass is candle's fused
/// kernel and the backward pass is the closed form for `dx`; that keeps two activations alive per
/// norm instead of the eight intermediates of the composed version. When the weight or bias is
/// trained, the composed version gives their gradients too.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let affine_trained = weight.track_op() || bias.is_some_and(|b| b.track_op());
    if affine_trained {
        return layer_norm_composed(x, weight, bias, eps);
    }
    if fused::fast(x) && fused::fast(weight) {
        return fused::layer_norm_frozen(x, weight, bias, eps);
    }
    if bf16_cpu(x) {
        let b = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        let w = weight.to_dtype(DType::F32)?;
        let y = fused::layer_norm_frozen(&x.to_dtype(DType::F32)?, &w, b.as_ref(), eps)?;
        return Ok(y.to_dtype(DType::BF16)?);
    }
    let zeros;
    let beta = match bias {
        Some(b) => b,
        None => {
            zeros = weight.zeros_like()?;
            &zeros
        }
    };
    let y = candle_nn::ops::layer_norm(&x.detach().contiguous()?, weight, beta, eps as f32)?;
    let w = weight.clone();
    with_backward(x, y, move |x, _y, g| {
        let x = x.detach();
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let xhat = centered.broadcast_mul(&rstd)?;
        let dxhat = g.broadcast_mul(&w)?;
        let m1 = dxhat.mean_keepdim(D::Minus1)?;
        let m2 = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
        dxhat
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)
    })
}

/// RMSNorm over the last dimension, as Llama and T5 define it (no mean subtraction, no bias):
/// `x / sqrt(mean(x²) + eps) * weight`. Fused forward and closed-form backward for `dx` when the
/// weight is frozen; composed from primitives (so the weight gets its gradient) when trained.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if weight.track_op() {
        let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return Ok(x.broadcast_mul(&rstd)?.broadcast_mul(weight)?);
    }
    let y = candle_nn::ops::rms_norm(&x.detach().contiguous()?, weight, eps as f32)?;
    let w = weight.clone();
    with_backward(x, y, move |x, _y, g| {
        let x = x.detach();
        let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xhat = x.broadcast_mul(&rstd)?;
        let gw = g.broadcast_mul(&w)?;
        let m = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        gw.sub(&xhat.broadcast_mul(&m)?)?.broadcast_mul(&rstd)
    })
}

fn layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.broadcast_mul(weight)?;
    Ok(match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    })
}

/// Inverted dropout as torch applies it in training: zero with probability `p`, scale the rest by
/// `1 / (1 - p)`. The identity when `p == 0` or outside training.
///
/// Only the mask's seed is kept for the backward pass, which draws the same mask again; the
/// attention-probability masks would otherwise be the largest tensors kept alive.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    let seed = next_dropout_seed();
    if fused::fast(x) {
        // One node with its own backward, no copy of the result.
        return fused::dropout_f32(x, p, seed);
    }
    let y = dropout_seeded(x, p, seed)?;
    with_backward(x, y, move |_x, _y, g| {
        dropout_seeded(g, p, seed).map_err(candle_core::Error::wrap)
    })
}

/// Inverted dropout of `x` with the mask of `seed` (0 < `p` < 1), recording nothing: the mask
/// [`dropout`] draws for that seed on the same device and dtype, so its backward (and ops that
/// redraw a mask in their own backward, the attention node) multiply by the same mask.
pub(crate) fn dropout_seeded(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let x = x.detach();
    if fused::fast(&x) {
        return fused::dropout_f32(&x, p, seed);
    }
    #[cfg(feature = "cuda")]
    if cuda::applies(&x) {
        let (threshold, scale) = fused::dropout_params(p);
        return cuda::dropout(&x, threshold, scale, seed);
    }
    if bf16_cpu(&x) {
        let y = fused::dropout_f32(&x.to_dtype(DType::F32)?, p, seed)?;
        return Ok(y.to_dtype(DType::BF16)?);
    }
    Ok((&x * dropout_mask(&x, p, seed)?)?)
}

/// Whether attention runs as [`attention_node`]: off the CPU (which has its own fused op), with
/// a score bias that is not trained, and a dropout below 1.
pub fn attention_node_applies(
    q: &Tensor,
    bias: Option<&Tensor>,
    dropout: f64,
    train: bool,
) -> bool {
    !q.device().is_cpu()
        && device_kernels()
        && bias.is_none_or(|b| !b.track_op())
        && !(train && dropout >= 1.0)
}

/// Whether the device-side fused paths run (the CUDA kernels, the one-node attention off the
/// CPU). `PEFT_CUDA_KERNELS=0` turns them off, to measure what they save.
pub(crate) fn device_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PEFT_CUDA_KERNELS").as_deref() != Ok("0"))
}

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<rand::rngs::SmallRng> =
        std::cell::RefCell::new(rand::SeedableRng::from_os_rng());
}

thread_local! {
    /// Draws since the last [`seed_dropout`]: with the seed, the generator's whole state.
    static DROPOUT_DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A random word from this thread's dropout generator, for other training-time randomness (the
/// rank and module dropout of LoHa/LoKr), so that [`seed_dropout`] makes it repeatable too and a
/// resumed run ([`restore_dropout`]) draws what the uninterrupted run would have.
pub fn random_u64() -> u64 {
    use rand::Rng;
    DROPOUT_DRAWS.with(|d| d.set(d.get() + 1));
    DROPOUT_RNG.with(|r| r.borrow_mut().random())
}

/// The seed of the next dropout mask, from this thread's generator (counted like every draw).
pub(crate) fn next_dropout_seed() -> u64 {
    random_u64()
}

/// Seeds this thread's dropout masks, so that a training run with a fixed seed repeats exactly.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = rand::SeedableRng::seed_from_u64(seed));
    DROPOUT_DRAWS.with(|d| d.set(0));
}

/// How many dropout masks this thread drew since it was seeded; a checkpoint stores it so that
/// a resumed run draws the masks the uninterrupted run would have drawn.
pub fn dropout_draws() -> u64 {
    DROPOUT_DRAWS.with(|d| d.get())
}

/// This thread's dropout generator and draw count, exactly: a block recomputed in backward
/// (gradient checkpointing) puts it back to draw the masks its forward drew.
#[derive(Clone)]
pub(crate) struct DropoutState(rand::rngs::SmallRng, u64);

/// Replaces this thread's dropout state with `state`, returning the one it had.
pub(crate) fn swap_dropout_state(state: DropoutState) -> DropoutState {
    let DropoutState(rng, draws) = state;
    let rng = DROPOUT_RNG.with(|r| std::mem::replace(&mut *r.borrow_mut(), rng));
    let draws = DROPOUT_DRAWS.with(|d| d.replace(draws));
    DropoutState(rng, draws)
}

/// This thread's dropout state now.
pub(crate) fn dropout_state() -> DropoutState {
    DropoutState(
        DROPOUT_RNG.with(|r| r.borrow().clone()),
        DROPOUT_DRAWS.with(|d| d.get()),
    )
}

/// Puts this thread's dropout generator where it was after `draws` masks from `seed`.
pub fn restore_dropout(seed: u64, draws: u64) {
    use rand::Rng;
    seed_dropout(seed);
    DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        for _ in 0..draws {
            let _: u64 = r.random();
        }
    });
    DROPOUT_DRAWS.with(|d| d.set(draws));
}

/// A `{0, 1/(1-p)}` mask shaped like `x`, drawn from `seed` with a fast non-cryptographic
/// generator (candle's `rand_like` is ChaCha-based and several times slower here).
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use rand::{RngCore, SeedableRng};
    let n = x.elem_count();
    let threshold = (p * 4294967296.0) as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut mask = vec![0f32; n];
    for pair in mask.chunks_mut(2) {
        let r = rng.next_u64();
        pair[0] = if (r & 0xffff_ffff) < threshold {
            0.0
        } else {
            scale
        };
        if let Some(m) = pair.get_mut(1) {
            *m = if (r >> 32) < threshold { 0.0 } else { scale };
        }
    }
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// Mean cross-entropy over the rows whose label is not `ignore_index` (-100, as in torch).
/// `logits`: [n, classes]; `labels`: [n] (i64).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    cross_entropy::cross_entropy(logits, labels)
}

/// `x @ w.T` (or `x @ w` when `w` is stored `[in, out]`, `transposed`) for a weight that is not
/// trained. When `x` is part of a graph the gradient flows to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    frozen_linear_bias(x, w, None, transposed)
}

/// Whether [`frozen_linear_low_rank`] can serve input `x` on `base` (the factors, built by the
/// caller, must be f32 on the CPU too): checked before building them.
pub fn frozen_linear_low_rank_applies(x: &Tensor, base: &BaseWeight) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu() && low_rank::applies(x, base)
}

/// `x · Wᵀ + b + s · (dropout(x) · Aᵀ) · Bᵀ`: a frozen linear layer (dense, or quantized) with a
/// plain low-rank update (LoRA; `a` `[r, in]`, `b` `[out, r]`), as one product into one buffer
/// and one graph node whose backward gives `x`, `a` and `b` their gradients, when the
/// activations and factors are f32 on the CPU (a dense weight may be bf16: autocast's
/// products); `None` otherwise (the caller runs the layer and the adapter as usual). `x` may have any
/// leading dimensions. The dropout applies in training only, with a mask drawn as [`dropout`]
/// draws it.
pub fn frozen_linear_low_rank(
    x: &Tensor,
    base: BaseWeight,
    bias: Option<&Tensor>,
    (a, b, scaling): (&Tensor, &Tensor, f64),
    dropout: f64,
    train: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = [a, b]
        .into_iter()
        .chain(bias)
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
    if !f32_cpu || !frozen_linear_low_rank_applies(x, &base) || (train && dropout >= 1.0) {
        return Ok(None);
    }
    let dropout = (train && dropout > 0.0).then(|| (dropout, next_dropout_seed()));
    low_rank::frozen_linear_low_rank(x, base, bias, (a, b, scaling), dropout).map(Some)
}

/// [`frozen_linear`] plus a frozen `bias`, added before the result joins the graph: one node
/// instead of two (candle's backward would also build a full-size gradient for the bias). On
/// the CPU in f32, `x` may have any leading dimensions and the product is written straight into
/// the op's output; elsewhere `x` must be `[rows, in]`.
pub fn frozen_linear_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    if linear::applies(x, w, bias) {
        return linear::frozen_linear(x, w, bias, transposed);
    }
    let wt = if transposed { w.clone() } else { w.t()? };
    let mut y = x.detach().matmul(&wt)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    with_backward(x, y, move |_x, _y, g| g.matmul(&wt.t()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn dropout_zeroes_about_p_scales_the_rest_and_backprops_the_same_mask() {
        let x = Var::ones((200, 500), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = dropout(x.as_tensor(), 0.3, true).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.3).abs() < 0.01, "zero fraction {zeros}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.7).abs() < 1e-6));
        // d(sum y)/dx is the mask itself, which for x = 1 is y.
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, v);
        assert_eq!(
            dropout(x.as_tensor(), 0.3, false)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            100_000.0
        );
    }

    #[test]
    fn cross_entropy_ignores_minus_100_and_matches_closed_form() {
        // logits [[0, ln 3], [5, 5]]: row 0 with label 1 has p = 3/4; row 1 is ignored.
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [5.0, 5.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1i64, -100], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((loss - (-(0.75f32).ln())).abs() < 1e-6, "{loss}");
        let bad = Tensor::new(&[2i64, 0], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &bad).is_err());
    }
}
