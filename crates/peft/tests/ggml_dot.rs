//! The few-row GGUF kernels (`quant::ggml_dot`), every instruction set this CPU has (the portable
//! loop always) × Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, against two independent truths:
//! - an f64 sum of the dequantized weight rows (`dequantize_rows`) times the activations rounded
//!   to Q8 by candle's own `BlockQ8_0/BlockQ8_1::from_float` and widened by its `to_float`;
//! - candle's `vec_dot` on candle's blocks (even block counts: candle asserts them), which the
//!   portable loop equals bit for bit, and the x86 kernels for Q4_0/Q8_0 (candle's AVX2 order).
//!
//! Shapes: 1..=9 rows of `x`, row counts that are not a multiple of the kernels' four, odd and
//! even numbers of blocks per row.

use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use peft::quant::ggml::type_name;
use peft::quant::ggml_dot::{matmul_with, Isa};
use peft::quant::GgmlWeight;

const TYPES: [GgmlDType; 5] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
];

/// Deterministic pseudo-random values in about [-1, 1], with a per-seed offset so that Q4_1 /
/// Q5_1 blocks have minima away from zero.
fn values(n: usize, seed: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as f64 * 12.9898 + seed * 78.233).sin() * 43758.5453;
            (2.0 * (x - x.floor()) - 1.0 + 0.3 * (seed * 0.7).sin()) as f32
        })
        .collect()
}

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}

fn weight(dtype: GgmlDType, rows: usize, cols: usize, seed: f64) -> (GgmlWeight, Vec<f32>) {
    let w = values(rows * cols, seed);
    let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
    (
        GgmlWeight::new(QTensor::quantize(&t, dtype).unwrap()).unwrap(),
        w,
    )
}

/// `x`'s rows rounded to Q8_0 (or Q8_1) by candle and widened back: what the kernels multiply.
fn q8_rounded(x: &[f32], with_sum: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if with_sum {
        let mut b = vec![BlockQ8_1::zeros(); x.len() / 32];
        BlockQ8_1::from_float(x, &mut b);
        BlockQ8_1::to_float(&b, &mut out);
    } else {
        let mut b = vec![BlockQ8_0::zeros(); x.len() / 32];
        BlockQ8_0::from_float(x, &mut b);
        BlockQ8_0::to_float(&b, &mut out);
    }
    out
}

fn with_sum(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1)
}

#[test]
fn every_kernel_equals_the_f64_product_with_q8_rounded_activations() {
    let n = 13;
    for dtype in TYPES {
        for nb in [1, 3, 4, 18, 25] {
            let k = 32 * nb;
            let (g, _) = weight(dtype, n, k, nb as f64);
            let mut deq = vec![0f32; n * k];
            g.dequantize_rows(0, &mut deq);
            for m in 1..=9 {
                let x = values(m * k, 0.5 + m as f64);
                let xq = q8_rounded(&x, with_sum(dtype));
                for isa in isas() {
                    let name = format!("{} {isa:?} k={k} m={m}", type_name(dtype));
                    let mut y = vec![f32::NAN; m * n];
                    matmul_with(isa, &g, &x, &mut y, false).unwrap();
                    for i in 0..m {
                        let xr = &xq[i * k..(i + 1) * k];
                        for r in 0..n {
                            let wr = &deq[r * k..(r + 1) * k];
                            let want: f64 =
                                wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let mag: f64 = wr
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                                .sum();
                            // f32 sums of exact integer block products; Q4_1/Q5_1 also round
                            // each block's `d·Σq` to f16 (llama.cpp's Q8_1), an error of at most
                            // 2^-10 of `|m_w|·|Σ x|` per block, bounded here by `max|w|·Σ|x|`.
                            let mut tol = 1e-5 * mag + 1e-6;
                            if with_sum(dtype) {
                                for b in 0..nb {
                                    let s = b * 32..(b + 1) * 32;
                                    let wmax =
                                        wr[s.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
                                    let xsum: f32 = xr[s].iter().sum();
                                    tol += (wmax * xsum.abs()) as f64 / 1024.0;
                                }
                            }
                            let got = y[i * n + r] as f64;
                            assert!(
                                (got - want).abs() <= tol,
                                "{name} [{i}, {r}]: {got} vs {want} (tolerance {tol})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// candle's `vec_dot` for one weight row and one Q8 activation row, on candle's own blocks.
fn candle_dot(dtype: GgmlDType, w: &[f32], x: &[f32], scalar: bool) -> f32 {
    fn dot<T: GgmlType>(w: &[f32], x: &[f32], scalar: bool) -> f32 {
        let mut wb = vec![T::zeros(); w.len() / 32];
        T::from_float(w, &mut wb);
        let mut xb = vec![T::VecDotType::zeros(); x.len() / 32];
        T::VecDotType::from_float(x, &mut xb);
        if scalar {
            T::vec_dot_unopt(w.len(), &wb, &xb)
        } else {
            T::vec_dot(w.len(), &wb, &xb)
        }
    }
    match dtype {
        GgmlDType::Q4_0 => dot::<BlockQ4_0>(w, x, scalar),
        GgmlDType::Q4_1 => dot::<BlockQ4_1>(w, x, scalar),
        GgmlDType::Q5_0 => dot::<BlockQ5_0>(w, x, scalar),
        GgmlDType::Q5_1 => dot::<BlockQ5_1>(w, x, scalar),
        _ => dot::<BlockQ8_0>(w, x, scalar),
    }
}

#[test]
fn kernels_agree_with_candles_dot_products() {
    let n = 7;
    for dtype in TYPES {
        for nb in [2, 18, 48] {
            let k = 32 * nb;
            let (g, w) = weight(dtype, n, k, 3.0 + nb as f64);
            for m in [1, 2, 5, 9] {
                let x = values(m * k, 1.5 + m as f64);
                for isa in isas() {
                    let name = format!("{} {isa:?} k={k} m={m}", type_name(dtype));
                    let mut y = vec![f32::NAN; m * n];
                    matmul_with(isa, &g, &x, &mut y, false).unwrap();
                    for i in 0..m {
                        let xr = &x[i * k..(i + 1) * k];
                        for r in 0..n {
                            let wr = &w[r * k..(r + 1) * k];
                            let got = y[i * n + r];
                            // The portable loop is candle's scalar loop; the x86 Q4_0/Q8_0
                            // kernels are candle's AVX2 ones (same lanes, same FMA order).
                            let exact = isa == Isa::Portable
                                || matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q8_0);
                            let scalar = isa == Isa::Portable;
                            let want = candle_dot(dtype, wr, xr, scalar);
                            if exact {
                                assert_eq!(got, want, "{name} [{i}, {r}]");
                            } else {
                                // Only the float order differs (lanes vs block by block).
                                let scale: f32 =
                                    wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                                assert!(
                                    (got - want).abs() <= 1e-5 * scale + 1e-6,
                                    "{name} [{i}, {r}]: {got} vs candle's {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn accumulating_adds_to_the_output_and_bad_shapes_are_errors() {
    let (g, _) = weight(GgmlDType::Q4_1, 9, 96, 1.0);
    let x = values(2 * 96, 2.0);
    let mut y = vec![0f32; 2 * 9];
    matmul_with(Isa::Portable, &g, &x, &mut y, false).unwrap();
    let mut acc = vec![1.5f32; 2 * 9];
    matmul_with(Isa::Portable, &g, &x, &mut acc, true).unwrap();
    for (a, b) in acc.iter().zip(&y) {
        assert_eq!(*a, b + 1.5);
    }
    assert!(matmul_with(Isa::Portable, &g, &x[..95], &mut y, false).is_err());
    assert!(matmul_with(Isa::Portable, &g, &x, &mut y[..17], false).is_err());
    let (k4, _) = weight(GgmlDType::Q4K, 4, 256, 1.0);
    let x = values(256, 2.0);
    let err = matmul_with(Isa::Portable, &k4, &x, &mut [0f32; 4], false).unwrap_err();
    assert!(err.to_string().contains("Q4_K"), "{err}");
}
