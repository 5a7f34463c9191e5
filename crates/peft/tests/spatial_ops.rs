//! The image-shaped ops' hand-written backward passes against candle's autograd of the same
//! maths composed from primitives: a frozen convolution's input gradient (strides, paddings,
//! dilations and sizes the windows do or do not end on), GroupNorm with a frozen affine, and
//! nearest-neighbour upsampling.

use candle_core::{DType, Device, Tensor, Var};
use peft::ops::{self, ConvParams};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u64 + 1)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed.wrapping_mul(1442695040888963407));
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// d(sum(f(x) · r))/dx through `f` and through `reference`.
fn grads(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Tensor,
    reference: impl Fn(&Tensor) -> Tensor,
) -> (Tensor, Tensor, f32) {
    let v1 = Var::from_tensor(x).unwrap();
    let y1 = f(v1.as_tensor());
    let r = rand(y1.dims(), 99);
    let g1 = (y1.clone() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let v2 = Var::from_tensor(x).unwrap();
    let y2 = reference(v2.as_tensor());
    let fwd = max_diff(&y1, &y2);
    let g2 = (y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        g1.get(v1.as_tensor()).unwrap().clone(),
        g2.get(v2.as_tensor()).unwrap().clone(),
        fwd,
    )
}

/// A convolution from primitives (strided row/column picks of the padded input, one product
/// per kernel tap), whose autograd is candle's generic one: the reference for every size,
/// including those where candle's own conv backward, which sizes its transposed convolution
/// from the height alone, fails.
fn conv_reference(x: &Tensor, k: &Tensor, s: usize, p: usize, d: usize) -> Tensor {
    let (b, c, h, w) = x.dims4().unwrap();
    let (o, _, kh, kw) = k.dims4().unwrap();
    let xp = x
        .pad_with_zeros(2, p, p)
        .unwrap()
        .pad_with_zeros(3, p, p)
        .unwrap();
    let oh = (h + 2 * p - d * (kh - 1) - 1) / s + 1;
    let ow = (w + 2 * p - d * (kw - 1) - 1) / s + 1;
    let mut out: Option<Tensor> = None;
    for a in 0..kh {
        for bb in 0..kw {
            let rows: Vec<u32> = (0..oh).map(|i| (a * d + s * i) as u32).collect();
            let cols: Vec<u32> = (0..ow).map(|j| (bb * d + s * j) as u32).collect();
            let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            let cols = Tensor::new(cols.as_slice(), &Device::Cpu).unwrap();
            let xs = xp
                .index_select(&rows, 2)
                .unwrap()
                .index_select(&cols, 3)
                .unwrap();
            let wab = k
                .narrow(2, a, 1)
                .unwrap()
                .narrow(3, bb, 1)
                .unwrap()
                .reshape((o, c))
                .unwrap();
            let y = xs
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((b * oh * ow, c))
                .unwrap()
                .matmul(&wab.t().unwrap())
                .unwrap()
                .reshape((b, oh, ow, o))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            out = Some(match out {
                Some(acc) => (acc + y).unwrap(),
                None => y,
            });
        }
    }
    out.unwrap()
}

#[test]
fn frozen_conv_input_gradient_matches_autograd() {
    for (k, stride, padding, dilation, h, w) in [
        (3, 1, 1, 1, 8, 8),
        (1, 1, 0, 1, 5, 7),
        (3, 2, 1, 1, 8, 8),
        (3, 2, 1, 1, 9, 8),
        (3, 2, 0, 1, 9, 9),
        (3, 2, 0, 1, 8, 10),
        (3, 1, 2, 2, 7, 7),
        (5, 3, 2, 1, 11, 10),
    ] {
        let p = ConvParams {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let x = rand(&[2, 3, h, w], 1);
        let kernel = rand(&[4, 3, k, k], 2);
        let bias = rand(&[4], 3);
        let (a, b, fwd) = grads(
            &x,
            |x| ops::frozen_conv2d(x, &kernel, Some(&bias), p).unwrap(),
            |x| {
                conv_reference(x, &kernel, stride, padding, dilation)
                    .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap()
            },
        );
        assert!(fwd < 1e-5, "forward k{k} s{stride} p{padding}: {fwd:e}");
        assert_eq!(a.dims(), [2, 3, h, w]);
        let d = max_diff(&a, &b);
        assert!(
            d < 1e-5,
            "k{k} s{stride} p{padding} d{dilation} {h}x{w}: dx off by {d:e}"
        );
    }
}

#[test]
fn group_norm_gradient_matches_autograd() {
    let x = rand(&[2, 8, 5, 3], 4);
    let weight = (rand(&[8], 5) + 1.0).unwrap();
    let bias = rand(&[8], 6);
    let (a, b, fwd) = grads(
        &x,
        |x| ops::group_norm(x, &weight, &bias, 4, 1e-6).unwrap(),
        |x| {
            let xr = x.reshape((2, 4, ())).unwrap();
            let mean = xr.mean_keepdim(2).unwrap();
            let c = xr.broadcast_sub(&mean).unwrap();
            let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
            let n = c
                .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                .unwrap();
            n.reshape((2, 8, 5, 3))
                .unwrap()
                .broadcast_mul(&weight.reshape((1, 8, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&bias.reshape((1, 8, 1, 1)).unwrap())
                .unwrap()
        },
    );
    assert!(fwd < 1e-5, "forward {fwd:e}");
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "dx off by {d:e}");
    assert_eq!(a.dtype(), DType::F32);
}

#[test]
fn upsample_gradient_sums_each_block() {
    let x = rand(&[1, 2, 3, 4], 7);
    let (a, b, fwd) = grads(
        &x,
        |x| ops::upsample_nearest2x(x).unwrap(),
        |x| {
            x.unsqueeze(3)
                .unwrap()
                .unsqueeze(5)
                .unwrap()
                .broadcast_as((1, 2, 3, 2, 4, 2))
                .unwrap()
                .reshape((1, 2, 6, 8))
                .unwrap()
        },
    );
    assert_eq!(fwd, 0.0);
    assert!(max_diff(&a, &b) < 1e-6);
}

#[test]
fn trainable_conv_gradients_match_autograd_on_any_size() {
    // A LoRA factor's convolution: gradients to the input and to the kernel, including sizes
    // where height and width end on different remainders of the stride.
    for (h, w) in [(8, 8), (9, 8), (8, 11), (12, 9)] {
        let p = ConvParams {
            stride: 2,
            padding: 1,
            dilation: 1,
            groups: 1,
        };
        let x = rand(&[2, 3, h, w], 11);
        let k = rand(&[4, 3, 3, 3], 12);
        let (xv, kv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&k).unwrap());
        let y = ops::conv2d(xv.as_tensor(), kv.as_tensor(), p).unwrap();
        let r = rand(y.dims(), 13);
        let g = (y.clone() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (xr, kr) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&k).unwrap());
        let yr = conv_reference(xr.as_tensor(), kr.as_tensor(), 2, 1, 1);
        assert!(max_diff(&y, &yr) < 1e-5);
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = max_diff(
            g.get(xv.as_tensor()).unwrap(),
            gr.get(xr.as_tensor()).unwrap(),
        );
        let dk = max_diff(
            g.get(kv.as_tensor()).unwrap(),
            gr.get(kr.as_tensor()).unwrap(),
        );
        assert!(dx < 1e-5 && dk < 1e-4, "{h}x{w}: dx {dx:e}, dkernel {dk:e}");
    }
}
