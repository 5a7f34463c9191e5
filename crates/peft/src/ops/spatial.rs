//! Image-shaped operations (`[batch, channels, h, w]`) for the diffusion models, each with a
//! backward pass that costs no more than it must: a frozen convolution passes gradients to its
//! input only (candle's conv backward also builds the kernel's gradient, a full product thrown
//! away when the kernel is frozen), GroupNorm with a frozen affine has a closed-form `dx`, and the
//! nearest-neighbour upsampling sums its gradient in place of candle's grouped convolution (which
//! also overwrites, rather than adds to, the input's gradient).

use candle_core::{Tensor, D};

use super::with_backward;
use crate::Result;

/// Stride, padding, dilation and groups of a convolution (equal along both spatial axes, as in
/// every convolution of the diffusers models; candle's kernels take one value per parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl ConvParams {
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride,
            padding,
            ..Self::default()
        }
    }
}

/// `x ⋆ w + b` for a kernel and bias that are not trained: gradients flow to `x` only.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> Result<Tensor> {
    let mut y = x
        .detach()
        .conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
    }
    if !x.track_op() {
        return Ok(y);
    }
    if p.groups != 1 {
        // candle's transposed convolution has no groups: let its autograd split the groups.
        let y2 = x.conv2d(&w.detach(), p.padding, p.stride, p.dilation, p.groups)?;
        return Ok(match bias {
            Some(b) => y2.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y2,
        });
    }
    let w = w.detach();
    with_backward(x, y, move |x, _y, g| conv2d_input_grad(x, &w, g, p))
}

/// The gradient of `x ⋆ w` with respect to `x`: a transposed convolution of `g`, zero-padded
/// at the bottom and right to `x`'s size where the strided windows did not reach.
fn conv2d_input_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let dx = g.conv_transpose2d(w, p.padding, 0, p.stride, p.dilation)?;
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, gh, gw) = dx.dims4()?;
    let dx = if gh < h {
        dx.pad_with_zeros(2, 0, h - gh)?
    } else {
        dx
    };
    if gw < wd {
        dx.pad_with_zeros(3, 0, wd - gw)
    } else {
        Ok(dx)
    }
}

/// GroupNorm over `[batch, channels, ...]`: torch's `F.group_norm` (biased variance).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(crate::Error::Config(format!(
            "GroupNorm: {c} channels do not split into {groups} groups"
        )));
    }
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let wv = weight.reshape(affine_shape.clone())?;
    let bv = bias.reshape(affine_shape)?;
    let normalize = move |x: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
        let xr = x.contiguous()?.reshape((b, groups, ()))?;
        let mean = xr.mean_keepdim(D::Minus1)?;
        let centered = xr.broadcast_sub(&mean)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        Ok((centered.broadcast_mul(&rstd)?, rstd))
    };
    if weight.track_op() || bias.track_op() || !x.track_op() {
        let (xhat, _) = normalize(x)?;
        return Ok(xhat.reshape(dims)?.broadcast_mul(&wv)?.broadcast_add(&bv)?);
    }
    let (xhat, _) = normalize(&x.detach())?;
    let y = xhat
        .reshape(dims.clone())?
        .broadcast_mul(&wv)?
        .broadcast_add(&bv)?;
    drop(xhat);
    let wv = wv.detach();
    with_backward(x, y, move |x, _y, g| {
        let (xhat, rstd) = normalize(&x.detach())?;
        let dxhat = g.broadcast_mul(&wv)?.reshape((b, groups, ()))?;
        let m1 = dxhat.mean_keepdim(D::Minus1)?;
        let m2 = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
        dxhat
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?
            .reshape(dims.clone())
    })
}

/// Nearest-neighbour upsampling by 2 in both spatial axes (`F.interpolate(scale_factor=2.0,
/// mode="nearest")`); its gradient sums each 2×2 block.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let y = x.detach().upsample_nearest2d(h * 2, w * 2)?;
    with_backward(x, y, move |_x, _y, g| {
        g.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)
    })
}

/// Nearest-neighbour upsampling to `(h, w)` (diffusers' `upsample_size` path); the size must be
/// an integer multiple, as in every UNet.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, xh, xw) = x.dims4()?;
    if h == xh * 2 && w == xw * 2 {
        return upsample_nearest2x(x);
    }
    Ok(x.upsample_nearest2d(h, w)?)
}
