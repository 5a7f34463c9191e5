//! The inference attention over a key/value cache (`ops::cached_attention`) against attention
//! composed from candle ops in f64: grouped-query heads (each kv head shared by a group of query
//! heads), keys and values read through a cache view that is not contiguous (a narrow of a
//! longer buffer), a causal + padding mask broadcast over heads, one and several new positions.

use candle_core::{DType, Device, Tensor, Var, D};
use peft::ops::cached_attention;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `softmax(q kᵀ · scale + mask) v` in f64, each query head `h` reading kv head `h / groups`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap().contiguous().unwrap();
    let (q, k, v, mask) = (f(q), f(k), f(v), f(mask));
    let groups = q.dim(1).unwrap() / k.dim(1).unwrap();
    let heads: Vec<Tensor> = (0..q.dim(1).unwrap())
        .map(|h| {
            let qh = q.narrow(1, h, 1).unwrap();
            let kh = k.narrow(1, h / groups, 1).unwrap();
            let vh = v.narrow(1, h / groups, 1).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            p.matmul(&vh).unwrap()
        })
        .collect();
    Tensor::cat(&heads, 1).unwrap()
}

#[test]
fn matches_composed_attention_with_grouped_heads_a_strided_cache_and_a_mask() {
    for (b, heads, kv_heads, t, past, d) in [
        (2, 6, 2, 1, 8, 20),
        (3, 9, 3, 4, 5, 64),
        (1, 4, 4, 3, 0, 17),
        (2, 2, 1, 1, 30, 33),
    ] {
        let s = past + t;
        let q = randn(&[b, heads, t, d], 1 + d as u64);
        // The cache: the first s positions of a longer buffer, as a preallocated cache holds them.
        let kbuf = randn(&[b, kv_heads, s + 5, d], 2);
        let vbuf = randn(&[b, kv_heads, s + 5, d], 3);
        let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
        assert!(!k.is_contiguous());
        // Causal, and the first position of row 0 padded.
        let mask: Vec<f32> = (0..b * t * s)
            .map(|x| {
                let (bi, i, j) = (x / (t * s), (x / s) % t, x % s);
                if j > past + i || (bi == 0 && j == 0 && s > 1) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = cached_attention(&q, &k, &v, Some(&mask), scale)
            .unwrap()
            .expect("f32 CPU tensors without gradients are served");
        assert_eq!(got.dims(), &[b, heads, t, d]);
        let want = reference(&q, &k, &v, &mask, scale);
        let diff: f64 = (got.to_dtype(DType::F64).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff < 1e-5,
            "b {b} heads {heads}/{kv_heads} t {t} s {s} d {d}: {diff}"
        );
    }
}

#[test]
fn inputs_that_record_gradients_are_left_to_the_composed_attention() {
    let q = Var::from_tensor(&randn(&[1, 2, 1, 8], 4)).unwrap();
    let k = randn(&[1, 1, 3, 8], 5);
    let v = randn(&[1, 1, 3, 8], 6);
    assert!(cached_attention(q.as_tensor(), &k, &v, None, 1.0)
        .unwrap()
        .is_none());
    let bf = q.as_tensor().to_dtype(DType::BF16).unwrap().detach();
    let (kb, vb) = (
        k.to_dtype(DType::BF16).unwrap(),
        v.to_dtype(DType::BF16).unwrap(),
    );
    assert!(cached_attention(&bf, &kb, &vb, None, 1.0)
        .unwrap()
        .is_none());
}
