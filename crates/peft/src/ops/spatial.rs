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

/// `x ⋆ w` for a kernel that may be trained (LoRA's factors): candle's convolution, whose
/// autograd gives the kernel's gradient; the input's gradient comes from
/// [`conv2d_input_grad`] when candle's would be wrong (candle sizes its transposed convolution
/// from the height alone, so a strided convolution over an input whose height and width leave
/// different remainders fails in backward).
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    if p.groups != 1 || same_remainders(x, w, p)? || !(x.track_op() || w.track_op()) {
        return Ok(x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?);
    }
    // candle's backward would compute (and fail on) the input's gradient whenever either
    // operand is tracked: one node per operand, each with its own closed-form gradient.
    let y = x
        .detach()
        .conv2d(&w.detach(), p.padding, p.stride, p.dilation, p.groups)?;
    let zeros = y.zeros_like()?;
    let (_, _, kh, kw) = w.dims4()?;
    let xd = x.detach();
    let through_w = with_backward(w, y, move |_w, _y, g| {
        xd.transpose(0, 1)?
            .conv2d(&g.transpose(0, 1)?, p.padding, p.dilation, p.stride, 1)?
            .transpose(0, 1)?
            .narrow(2, 0, kh)?
            .narrow(3, 0, kw)
    })?;
    if !x.track_op() {
        return Ok(through_w);
    }
    let wd = w.detach();
    let through_x = with_backward(x, zeros, move |x, _y, g| conv2d_input_grad(x, &wd, g, p))?;
    Ok((through_w + through_x)?)
}

/// Whether both spatial axes need the same output padding in the input's gradient.
fn same_remainders(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<bool> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let rest = |n: usize, k: usize| {
        (n + 2 * p.padding).saturating_sub(p.dilation * (k - 1) + 1) % p.stride
    };
    Ok(rest(h, kh) == rest(wd, kw))
}

/// The gradient of `x ⋆ w` with respect to `x`. For a square kernel whose padding is at most
/// its reach it is itself a convolution — of `g` (strides spread out with zeros) by the kernel
/// flipped and with its channel axes swapped — which runs on candle's GEMM path; otherwise a
/// transposed convolution (candle's is a direct loop, much slower on wide layers). Rows and
/// columns of `x` that no window reaches get zero.
fn conv2d_input_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let reach = p.dilation * (kh - 1);
    let dx = if kh == kw && p.padding <= reach {
        let flip = |t: &Tensor, dim: usize, n: usize| -> candle_core::Result<Tensor> {
            if n == 1 {
                return Ok(t.clone());
            }
            let idx: Vec<u32> = (0..n as u32).rev().collect();
            t.index_select(&Tensor::new(idx.as_slice(), t.device())?, dim)
        };
        let wf = flip(&flip(w, 2, kh)?, 3, kw)?
            .transpose(0, 1)?
            .contiguous()?;
        let mut g = if p.stride > 1 {
            spread(g, p.stride)?
        } else {
            g.clone()
        };
        // Row i of dx sums g's (spread) rows i + padding - k·dilation: the symmetric padding
        // gives `len + reach - 2·padding` rows; the rows past them that the last windows read
        // (with padding, up to `padding` of them; with strides, up to `stride - 1` more) need
        // zeros after g's end.
        let (_, _, sh, sw) = g.dims4()?;
        let missing =
            |n: usize, s: usize| n as isize - (s + reach) as isize + 2 * p.padding as isize;
        let (mh, mw) = (missing(h, sh), missing(wd, sw));
        if mh > 0 {
            g = g.pad_with_zeros(2, 0, mh as usize)?;
        }
        if mw > 0 {
            g = g.pad_with_zeros(3, 0, mw as usize)?;
        }
        g.conv2d(&wf, reach - p.padding, 1, p.dilation, 1)?
    } else {
        let (_, _, gh, gw) = g.dims4()?;
        let span = |go: usize, k: usize| (go - 1) * p.stride + p.dilation * (k - 1) + 1;
        let (oh, ow) = (
            span(gh, kh).saturating_sub(2 * p.padding),
            span(gw, kw).saturating_sub(2 * p.padding),
        );
        // `output_padding` extends the transposed convolution's canvas with true contributions
        // (at most stride - 1 rows / columns can have any); one value serves both axes and the
        // longer one is cut back below.
        let op = h
            .saturating_sub(oh)
            .max(wd.saturating_sub(ow))
            .min(p.stride.saturating_sub(1));
        g.conv_transpose2d(w, p.padding, op, p.stride, p.dilation)?
    };
    let (_, _, dh, dw) = dx.dims4()?;
    let dx = match dh.cmp(&h) {
        std::cmp::Ordering::Less => dx.pad_with_zeros(2, 0, h - dh)?,
        std::cmp::Ordering::Greater => dx.narrow(2, 0, h)?,
        std::cmp::Ordering::Equal => dx,
    };
    match dw.cmp(&wd) {
        std::cmp::Ordering::Less => dx.pad_with_zeros(3, 0, wd - dw),
        std::cmp::Ordering::Greater => dx.narrow(3, 0, wd),
        std::cmp::Ordering::Equal => Ok(dx),
    }
}

/// `g` with `stride - 1` zeros between neighbouring rows and columns: `[b, c, (h-1)·s+1,
/// (w-1)·s+1]`.
fn spread(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    let t = g
        .reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, c, h * s, w * s))?;
    t.narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// dx[c, i, j] = Σ g[o, a, b] · w[o, c, k, l] over the windows with i = a·s + k·d - p
    /// (and the same for j), summed in a plain loop.
    fn naive_input_grad(
        x: (usize, usize, usize),
        w: &[f32],
        wk: (usize, usize, usize, usize),
        g: &[f32],
        gs: (usize, usize),
        p: ConvParams,
    ) -> Vec<f32> {
        let (c, h, wd) = x;
        let (o, _, kh, kw) = wk;
        let mut dx = vec![0f32; c * h * wd];
        for oc in 0..o {
            for a in 0..gs.0 {
                for b in 0..gs.1 {
                    let gv = g[(oc * gs.0 + a) * gs.1 + b];
                    for ci in 0..c {
                        for k in 0..kh {
                            for l in 0..kw {
                                let i =
                                    (a * p.stride + k * p.dilation) as isize - p.padding as isize;
                                let j =
                                    (b * p.stride + l * p.dilation) as isize - p.padding as isize;
                                if i < 0 || j < 0 || i >= h as isize || j >= wd as isize {
                                    continue;
                                }
                                dx[(ci * h + i as usize) * wd + j as usize] +=
                                    gv * w[((oc * c + ci) * kh + k) * kw + l];
                            }
                        }
                    }
                }
            }
        }
        dx
    }

    #[test]
    fn input_gradient_matches_the_sum_over_windows() {
        let dev = Device::Cpu;
        let mut checked = 0;
        for (k, stride, padding, dilation) in [
            (1, 1, 0, 1),
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (3, 2, 0, 1),
            (3, 3, 1, 1),
            (3, 1, 2, 2),
            (2, 2, 0, 1),
            (3, 1, 3, 1),
        ] {
            for (h, wd) in [(7, 7), (8, 8), (6, 9), (9, 4), (5, 8)] {
                let p = ConvParams {
                    stride,
                    padding,
                    dilation,
                    groups: 1,
                };
                let (c, o) = (2, 3);
                let n = |len: usize, seed: f32| -> Vec<f32> {
                    (0..len)
                        .map(|i| ((i as f32 + seed) * 0.7311).sin())
                        .collect()
                };
                let wv = n(o * c * k * k, 1.0);
                let w = Tensor::from_vec(wv.clone(), (o, c, k, k), &dev).unwrap();
                let x = Tensor::zeros((1, c, h, wd), DType::F32, &dev).unwrap();
                let (_, _, gh, gw) = x
                    .conv2d(&w, padding, stride, dilation, 1)
                    .unwrap()
                    .dims4()
                    .unwrap();
                let gv = n(o * gh * gw, 5.0);
                let g = Tensor::from_vec(gv.clone(), (1, o, gh, gw), &dev).unwrap();
                let got = conv2d_input_grad(&x, &w, &g, p)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = naive_input_grad((c, h, wd), &wv, (o, c, k, k), &gv, (gh, gw), p);
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-5,
                    "k {k} stride {stride} padding {padding} dilation {dilation} {h}x{wd}: off by {d}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 40);
    }
}
