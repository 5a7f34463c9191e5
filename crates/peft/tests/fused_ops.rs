//! The fused CPU ops (GELU, LayerNorm, attention) against the same math composed from candle
//! primitives, forward and backward (candle's autograd of the primitives is the reference), and
//! attention's dropout backward against finite differences.

use candle_core::{DType, Device, Tensor, Var, D};
use peft::ops;

/// Deterministic, irregular test data in about [-scale, scale].
fn data(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| scale * ((i as f32 * 0.618 + seed).sin() * 1.7 + (i as f32 * 0.1377).cos()) / 2.7)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `sum(y * r)` for a fixed random `r`: every output element gets its own upstream gradient.
fn weighted_sum(y: &Tensor) -> Tensor {
    let r = data(y.dims(), 3.3, 1.0);
    (y * r).unwrap().sum_all().unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let diff = max_abs_diff(got, want);
    let scale = max_abs(want).max(1e-3);
    assert!(
        diff <= tol * scale,
        "{what}: max |diff| {diff} > {tol} × {scale}"
    );
    assert!(max_abs(want) > 0.0, "{what}: reference is all zeros");
}

#[test]
fn gelu_matches_candle_forward_and_backward() {
    // Wide range, including the tails where erf saturates and values near 0.
    let x = Var::from_tensor(&data(&[64, 1536], 0.5, 6.0)).unwrap();
    let ours = ops::gelu_erf(x.as_tensor()).unwrap();
    let reference = x.as_tensor().gelu_erf().unwrap();
    assert_close("gelu forward", &ours, &reference, 1e-6);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    assert_close(
        "gelu backward",
        g_ours.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
        1e-5,
    );
}

#[test]
fn silu_mul_matches_candle_forward_and_backward() {
    // Large |gate| too, where the sigmoid saturates; a length that is not a multiple of the
    // vector width or of the parallel chunk.
    let gate = Var::from_tensor(&data(&[7, 9, 1531], 0.2, 12.0)).unwrap();
    let up = Var::from_tensor(&data(&[7, 9, 1531], 1.3, 2.0)).unwrap();
    let ours = ops::silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
    let reference = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
    assert_close("silu-mul forward", &ours, &reference, 1e-6);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    for (what, v) in [("gate", &gate), ("up", &up)] {
        assert_close(
            &format!("silu-mul backward ({what})"),
            g_ours.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    }
    // bf16: the f32 result rounded once.
    let (g16, u16) = (
        gate.as_tensor().to_dtype(DType::BF16).unwrap(),
        up.as_tensor().to_dtype(DType::BF16).unwrap(),
    );
    let y16 = ops::silu_mul(&g16, &u16).unwrap();
    assert_eq!(y16.dtype(), DType::BF16);
    let want = (g16.to_dtype(DType::F32).unwrap().silu().unwrap()
        * u16.to_dtype(DType::F32).unwrap())
    .unwrap()
    .to_dtype(DType::BF16)
    .unwrap();
    assert_close(
        "silu-mul bf16",
        &y16.to_dtype(DType::F32).unwrap(),
        &want.to_dtype(DType::F32).unwrap(),
        1e-2,
    );
    let wrong = data(&[7, 9, 1530], 0.0, 1.0);
    assert!(ops::silu_mul(gate.as_tensor(), &wrong).is_err());
}

fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

#[test]
fn layer_norm_matches_composed_forward_and_backward() {
    let x = Var::from_tensor(&data(&[3, 50, 384], 1.0, 4.0)).unwrap();
    let w = (data(&[384], 2.0, 1.0) + 1.0).unwrap();
    let b = data(&[384], 7.0, 0.5);
    let ours = ops::layer_norm(x.as_tensor(), &w, Some(&b), 1e-12).unwrap();
    let reference = layer_norm_composed(x.as_tensor(), &w, &b, 1e-12);
    assert_close("layer norm forward", &ours, &reference, 1e-5);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    assert_close(
        "layer norm backward",
        g_ours.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
        1e-4,
    );
}

#[test]
fn add_layer_norm_matches_the_sum_then_the_norm_forward_and_backward() {
    let h = Var::from_tensor(&data(&[3, 50, 384], 1.0, 4.0)).unwrap();
    let r = Var::from_tensor(&data(&[3, 50, 384], 5.0, 2.0)).unwrap();
    let w = (data(&[384], 2.0, 1.0) + 1.0).unwrap();
    let b = data(&[384], 7.0, 0.5);
    let ours = ops::add_layer_norm(h.as_tensor(), r.as_tensor(), &w, Some(&b), 1e-12).unwrap();
    let sum = (h.as_tensor() + r.as_tensor()).unwrap();
    let reference = layer_norm_composed(&sum, &w, &b, 1e-12);
    assert_close("add + layer norm forward", &ours, &reference, 1e-5);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    for (name, v) in [("hidden", &h), ("residual", &r)] {
        assert_close(
            &format!("add + layer norm backward, {name}"),
            g_ours.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
            1e-4,
        );
    }
}

/// Attention from primitives only (composed softmax), heads split and merged explicitly.
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
    scale: f64,
) -> Tensor {
    let (b, t, hd) = q.dims3().unwrap();
    let s = k.dim(1).unwrap();
    let d = hd / heads;
    let split = |x: &Tensor, n: usize| {
        x.reshape((b, n, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let scores = (split(q, t) * scale)
        .unwrap()
        .matmul(&split(k, s).t().unwrap())
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap().detach();
    let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&split(v, s))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, hd))
        .unwrap()
}

/// A padding mask with the last `pad[i]` positions of row `i` masked.
fn padding(b: usize, s: usize, pad: &[usize]) -> Tensor {
    let m: Vec<u32> = (0..b)
        .flat_map(|i| (0..s).map(move |j| u32::from(j + pad[i] < s)))
        .collect();
    let m = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
    ops::padding_mask(&m, s, DType::F32).unwrap()
}

#[test]
fn attention_matches_composed_forward_and_backward() {
    let (b, t, heads, d) = (2, 7, 3, 8);
    let hd = heads * d;
    let q = Var::from_tensor(&data(&[b, t, hd], 0.1, 2.0)).unwrap();
    let k = Var::from_tensor(&data(&[b, t, hd], 1.2, 2.0)).unwrap();
    let v = Var::from_tensor(&data(&[b, t, hd], 2.3, 2.0)).unwrap();
    let mask = padding(b, t, &[0, 3]);
    let scale = 1.0 / (d as f64).sqrt();
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let ours =
        ops::attention_merged_heads(qt, kt, vt, heads, Some(&mask), scale, 0.0, true).unwrap();
    let reference = attention_composed(qt, kt, vt, heads, &mask, scale);
    assert_close("attention forward", &ours, &reference, 1e-5);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        assert_close(
            &format!("attention backward d{name}"),
            g_ours.get(var.as_tensor()).unwrap(),
            g_ref.get(var.as_tensor()).unwrap(),
            1e-4,
        );
    }
    // Keys and values longer than the queries (a cache): `s != t`.
    let k2 = data(&[b, 11, hd], 4.0, 2.0);
    let v2 = data(&[b, 11, hd], 5.0, 2.0);
    let mask2 = padding(b, 11, &[2, 0]);
    let ours =
        ops::attention_merged_heads(qt, &k2, &v2, heads, Some(&mask2), scale, 0.0, false).unwrap();
    let reference = attention_composed(qt, &k2, &v2, heads, &mask2, scale);
    assert_close("attention forward, s != t", &ours, &reference, 1e-5);
}

/// Grouped-query attention from primitives, heads first (`[b, h, t, d]` queries, `[b, kv, s, d]`
/// keys and values): each key/value head repeated for its query heads, as transformers does.
fn gqa_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let groups = q.dim(1).unwrap() / k.dim(1).unwrap();
    let k = peft::layers::attention::repeat_kv(k, groups).unwrap();
    let v = peft::layers::attention::repeat_kv(v, groups).unwrap();
    let scores = (q * scale)
        .unwrap()
        .matmul(&k.t().unwrap().contiguous().unwrap())
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap().detach();
    let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

#[test]
fn grouped_query_attention_with_split_heads_matches_composed_forward_and_backward() {
    let (b, heads, kv_heads, t, d) = (2, 6, 2, 7, 8);
    let q = Var::from_tensor(&data(&[b, heads, t, d], 0.1, 2.0)).unwrap();
    let k = Var::from_tensor(&data(&[b, kv_heads, t, d], 1.2, 2.0)).unwrap();
    let v = Var::from_tensor(&data(&[b, kv_heads, t, d], 2.3, 2.0)).unwrap();
    let padding = Tensor::from_vec(
        vec![1u32, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1],
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    let mask = peft::layers::attention::causal_mask(
        b,
        t,
        0,
        Some(&padding),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let ours = ops::attention_split_heads(qt, kt, vt, Some(&mask), scale, 0.0, true)
        .unwrap()
        .expect("f32 on the CPU");
    let reference = gqa_composed(qt, kt, vt, &mask, scale);
    assert_close("grouped attention forward", &ours, &reference, 1e-5);
    let g_ours = weighted_sum(&ours).backward().unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        assert_close(
            &format!("grouped attention backward d{name}"),
            g_ours.get(var.as_tensor()).unwrap(),
            g_ref.get(var.as_tensor()).unwrap(),
            1e-4,
        );
    }
    // With dropout: the same masks as the heads-side-by-side layout draws for the same seed
    // (whose dropout backward is checked against finite differences below).
    let merge = |x: &Tensor| {
        let (b, h, n, d) = x.dims4().unwrap();
        x.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    };
    ops::restore_dropout(5, 0);
    let split = ops::attention_split_heads(qt, kt, vt, Some(&mask), scale, 0.3, true)
        .unwrap()
        .unwrap();
    ops::restore_dropout(5, 0);
    let merged = ops::attention_merged_heads(
        &merge(qt),
        &merge(kt),
        &merge(vt),
        heads,
        Some(&mask),
        scale,
        0.3,
        true,
    )
    .unwrap();
    assert_close(
        "dropout, split vs merged layout",
        &merge(&split),
        &merged,
        1e-6,
    );
    let g_split = weighted_sum(&merge(&split)).backward().unwrap();
    let g_merged = weighted_sum(&merged).backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        assert_close(
            &format!("dropout, split vs merged layout, d{name}"),
            g_split.get(var.as_tensor()).unwrap(),
            g_merged.get(var.as_tensor()).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn attention_dropout_backward_matches_finite_differences() {
    let (b, t, heads, d) = (1, 5, 2, 4);
    let hd = heads * d;
    let p = 0.3;
    let inputs = [
        data(&[b, t, hd], 0.4, 1.0),
        data(&[b, t, hd], 1.5, 1.0),
        data(&[b, t, hd], 2.6, 1.0),
    ];
    let mask = padding(b, t, &[1]);
    // The loss with the dropout mask of seed 7, in f64 for the differences' sake.
    let loss = |x: &[Tensor; 3]| -> f64 {
        ops::seed_dropout(7);
        let y = ops::attention_merged_heads(&x[0], &x[1], &x[2], heads, Some(&mask), 0.5, p, true)
            .unwrap();
        weighted_sum(&y)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    ops::seed_dropout(7);
    let y = ops::attention_merged_heads(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        heads,
        Some(&mask),
        0.5,
        p,
        true,
    )
    .unwrap();
    // Dropout did act: the output differs from the one without it.
    let plain = ops::attention_merged_heads(
        &inputs[0],
        &inputs[1],
        &inputs[2],
        heads,
        Some(&mask),
        0.5,
        0.0,
        true,
    )
    .unwrap();
    assert!(max_abs_diff(&y, &plain) > 1e-3, "dropout changed nothing");
    let grads = weighted_sum(&y).backward().unwrap();
    let h = 1e-2f32;
    for (which, var) in vars.iter().enumerate() {
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().any(|&x| x != 0.0), "input {which}: zero gradient");
        let base: Vec<f32> = inputs[which].flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0, 3, 9, 17, 26, 38] {
            let bump = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                let mut x = inputs.clone();
                x[which] = Tensor::from_vec(v, (b, t, hd), &Device::Cpu).unwrap();
                loss(&x)
            };
            let fd = (bump(h) - bump(-h)) / (2.0 * h as f64);
            assert!(
                (fd - g[idx] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "input {which}[{idx}]: finite difference {fd} vs backward {}",
                g[idx]
            );
        }
    }
}

#[test]
fn frozen_linear_matches_matmul_for_3d_inputs_in_both_layouts() {
    let x = Var::from_tensor(&data(&[2, 5, 12], 0.7, 2.0)).unwrap();
    let w = data(&[7, 12], 1.9, 1.0); // [out, in]
    let b = data(&[7], 3.1, 1.0);
    let reference = x
        .as_tensor()
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let g_ref = weighted_sum(&reference).backward().unwrap();
    for transposed in [false, true] {
        let stored = if transposed {
            w.t().unwrap().contiguous().unwrap()
        } else {
            w.clone()
        };
        let ours = ops::frozen_linear_bias(x.as_tensor(), &stored, Some(&b), transposed).unwrap();
        assert_close("frozen linear forward", &ours, &reference, 1e-6);
        let g = weighted_sum(&ours).backward().unwrap();
        assert_close(
            "frozen linear backward",
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
            1e-6,
        );
    }
}

/// Each element of `got` (bf16) is `want` (f32, from the same bf16 inputs) rounded once to
/// bf16: within half a bf16 ulp (2^-9 relative), plus slack for the f32 summation order.
fn assert_bf16_rounding_of(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), DType::BF16, "{what}: dtype");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = w.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        let tol = w.abs() / 256.0 + 1e-5 * scale;
        assert!(
            (g - w).abs() <= tol,
            "{what}: [{i}] {g} vs {w} (tolerance {tol})"
        );
    }
}

/// bf16 activations and weights (mixed-precision training): the product accumulates in f32
/// and is rounded once, forward and backward, on the bf16 gemm backend this CPU offers. Odd
/// sizes so the native kernel's ragged tiles and odd k are exercised.
#[test]
fn frozen_linear_in_bf16_rounds_the_f32_product_forward_and_backward() {
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (rows, inp, out) = (45, 37, 70);
    let x = Var::from_tensor(&bf(data(&[2, rows, inp], 0.7, 2.0))).unwrap();
    let w = bf(data(&[out, inp], 1.9, 1.0)); // [out, in]
    let b = bf(data(&[out], 3.1, 1.0));
    let want = f32_of(x.as_tensor())
        .broadcast_matmul(&f32_of(&w).t().unwrap())
        .unwrap()
        .broadcast_add(&f32_of(&b))
        .unwrap();
    let r = bf(data(&[2, rows, out], 3.3, 1.0));
    let dx_want = f32_of(&r).broadcast_matmul(&f32_of(&w)).unwrap();
    eprintln!("bf16 gemm backend: {}", ops::gemm::bf16_backend().name());
    for transposed in [false, true] {
        let stored = if transposed {
            w.t().unwrap().contiguous().unwrap()
        } else {
            w.clone()
        };
        let y = ops::frozen_linear_bias(x.as_tensor(), &stored, Some(&b), transposed).unwrap();
        assert_bf16_rounding_of("bf16 frozen linear forward", &y, &want);
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        assert_bf16_rounding_of("bf16 frozen linear backward", dx, &dx_want);
    }
}

#[test]
fn frozen_linear_under_autocast_rounds_its_inputs_to_bf16_and_stays_f32() {
    // torch.autocast's bf16 product: an f32 input meets a bf16 weight; the input is rounded to
    // bf16, the product accumulates in f32 and comes out f32 (so does the input's gradient).
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (rows, inp, out) = (45, 37, 70);
    let x = Var::from_tensor(&data(&[2, rows, inp], 0.7, 2.0)).unwrap();
    let w = data(&[out, inp], 1.9, 1.0).to_dtype(DType::BF16).unwrap(); // [out, in]
    let w32 = w.to_dtype(DType::F32).unwrap();
    let b = data(&[out], 3.1, 1.0);
    let want = round(x.as_tensor())
        .broadcast_matmul(&w32.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let unrounded = x
        .as_tensor()
        .broadcast_matmul(&w32.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let r = data(&[2, rows, out], 3.3, 1.0);
    let dx_want = round(&r).broadcast_matmul(&w32).unwrap();
    assert!(ops::autocast_applies(x.as_tensor(), &w));
    for transposed in [false, true] {
        let stored = if transposed {
            w.t().unwrap().contiguous().unwrap()
        } else {
            w.clone()
        };
        let y = ops::frozen_linear_bias(x.as_tensor(), &stored, Some(&b), transposed).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_close("autocast frozen linear forward", &y, &want, 1e-5);
        // The rounding is real: the exact f32 product is further away than accumulation noise.
        assert!(max_abs_diff(&y, &unrounded) > 1e-4 * max_abs(&unrounded));
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        assert_eq!(dx.dtype(), DType::F32);
        assert_close("autocast frozen linear backward", dx, &dx_want, 1e-5);
    }
    // A bf16 input with an f32 weight is not autocast's mix; the op refuses to guess.
    let xb = x.as_tensor().to_dtype(DType::BF16).unwrap();
    assert!(!ops::autocast_applies(&xb, &w32));
}

#[test]
fn scale_columns_matches_candle_forward_and_backward() {
    // Rows not a multiple of the parallel task size, 3-d input, a column count that is not a
    // multiple of the vector width.
    for (shape, cols) in [(vec![3, 70, 37], 37), (vec![5000, 24], 24), (vec![1, 8], 8)] {
        let x = Var::from_tensor(&data(&shape, 0.4, 2.0)).unwrap();
        let s = Var::from_tensor(&data(&[cols], 1.9, 1.5)).unwrap();
        let y = ops::scale_columns(x.as_tensor(), s.as_tensor()).unwrap();
        let want = x.as_tensor().broadcast_mul(s.as_tensor()).unwrap();
        assert_close("scale_columns forward", &y, &want, 1e-6);
        let g = weighted_sum(&y).backward().unwrap();
        let gw = weighted_sum(&want).backward().unwrap();
        for (name, v) in [("x", &x), ("s", &s)] {
            assert_close(
                &format!("scale_columns ∂{name} {shape:?}"),
                g.get(v.as_tensor()).unwrap(),
                gw.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }
    let x = data(&[2, 3], 0.0, 1.0);
    assert!(ops::scale_columns(&x, &data(&[2], 0.0, 1.0)).is_err());
}

/// `base(x) + s (dropout(x) Aᵀ) Bᵀ` composed: the plain layer's base product and the update
/// from candle primitives, with `ops::dropout`'s mask.
fn low_rank_composed(
    base: Tensor,
    x: &Tensor,
    (a, bb, s): (&Tensor, &Tensor, f64),
    p: f64,
) -> Tensor {
    let xd = ops::dropout(x, p, p > 0.0).unwrap();
    let update = xd
        .broadcast_matmul(&a.t().unwrap())
        .unwrap()
        .broadcast_matmul(&bb.t().unwrap())
        .unwrap();
    (base + (update * s).unwrap()).unwrap()
}

/// The bases the fused op takes, each with the plain layer's product for it.
enum TestBase {
    Dense { w: Tensor, transposed: bool },
    Quant(peft::quant::QuantWeight),
}

impl TestBase {
    fn weight(&self) -> ops::BaseWeight<'_> {
        match self {
            TestBase::Dense { w, transposed } => ops::BaseWeight::Dense {
                w,
                transposed: *transposed,
            },
            TestBase::Quant(q) => ops::BaseWeight::Quant(q),
        }
    }

    fn plain(&self, x: &Tensor, bias: &Tensor) -> Tensor {
        match self {
            TestBase::Dense { w, transposed } => {
                ops::frozen_linear_bias(x, w, Some(bias), *transposed).unwrap()
            }
            TestBase::Quant(q) => ops::quant_linear(x, q, Some(bias)).unwrap(),
        }
    }
}

#[test]
fn frozen_linear_low_rank_matches_the_composed_layer_forward_and_backward() {
    use peft::quant::{QuantType, QuantWeight, Scheme};
    let w = data(&[7, 64], 1.9, 1.0); // [out, in]
    let bias = data(&[7], 3.1, 1.0);
    let a = Var::from_tensor(&data(&[3, 64], 0.3, 0.5)).unwrap();
    let bb = Var::from_tensor(&data(&[7, 3], 2.6, 0.5)).unwrap();
    let s = 0.75;
    let nf4 = Scheme::FourBit {
        quant_type: QuantType::Nf4,
        double_quant: true,
        blocksize: 64,
        compute_dtype: DType::F32,
    };
    let bases = [
        (
            "f32",
            TestBase::Dense {
                w: w.clone(),
                transposed: false,
            },
        ),
        (
            "f32 [in, out]",
            TestBase::Dense {
                w: w.t().unwrap().contiguous().unwrap(),
                transposed: true,
            },
        ),
        (
            "autocast bf16",
            TestBase::Dense {
                w: w.to_dtype(DType::BF16).unwrap(),
                transposed: false,
            },
        ),
        (
            "nf4",
            TestBase::Quant(QuantWeight::quantize(&w, &nf4).unwrap()),
        ),
    ];
    for (name, base) in &bases {
        for p in [0.0, 0.3] {
            for x_trained in [true, false] {
                let what = format!("{name}, p={p}, x trained: {x_trained}");
                let xt = data(&[2, 5, 64], 0.7, 2.0);
                let xv = Var::from_tensor(&xt).unwrap();
                let x = if x_trained {
                    xv.as_tensor().clone()
                } else {
                    xt
                };
                // The same seed for both, so both draw the same dropout mask.
                ops::restore_dropout(7, 0);
                let reference = low_rank_composed(base.plain(&x, &bias), &x, (&a, &bb, s), p);
                let g_ref = weighted_sum(&reference).backward().unwrap();
                ops::restore_dropout(7, 0);
                let ours = ops::frozen_linear_low_rank(
                    &x,
                    base.weight(),
                    Some(&bias),
                    (a.as_tensor(), bb.as_tensor(), s),
                    p,
                    true,
                )
                .unwrap()
                .expect("f32 activations on the CPU");
                assert_close(&format!("{what}: forward"), &ours, &reference, 1e-6);
                let g = weighted_sum(&ours).backward().unwrap();
                for (n, t) in [("A", a.as_tensor()), ("B", bb.as_tensor())] {
                    assert_close(
                        &format!("{what}: d{n}"),
                        g.get(t).unwrap(),
                        g_ref.get(t).unwrap(),
                        1e-5,
                    );
                }
                if x_trained {
                    assert_close(
                        &format!("{what}: dx"),
                        g.get(&x).unwrap(),
                        g_ref.get(&x).unwrap(),
                        1e-5,
                    );
                }
            }
        }
    }
    // Without a graph the same values come out, recording nothing, and no dropout outside
    // training.
    let x = data(&[2, 5, 64], 0.7, 2.0);
    let plain = peft::no_grad(|| {
        ops::frozen_linear_low_rank(
            &x,
            bases[0].1.weight(),
            Some(&bias),
            (&a.as_tensor().detach(), &bb.as_tensor().detach(), s),
            0.3,
            false,
        )
    })
    .unwrap()
    .unwrap();
    assert!(!plain.track_op());
    let reference = low_rank_composed(
        bases[0].1.plain(&x, &bias),
        &x,
        (a.as_tensor(), bb.as_tensor(), s),
        0.0,
    );
    assert_close("no graph", &plain, &reference, 1e-6);
}
