//! GGUF block-quantized weights kept quantized, layer by layer, for every GGML type llama.cpp
//! stores weights in. Truth is candle: its `QMatMul` for the forward (which quantizes the
//! activations to Q8 as llama.cpp does) and its dequantized weight for the input gradient and
//! for merges. Weights are random values quantized by candle.
//!
//! A few rows of 32-block types (Q4_0 … Q8_0) take our own kernels (`quant::ggml_dot`, tested
//! kernel by kernel in `ggml_dot.rs`), which equal `QMatMul` bit for bit for Q4_0/Q8_0 and to
//! float order for the rest. Batches of the types candle multiplies with SIMD (Q4_0, Q8_0, the
//! K-quants) run its very kernel and must equal `QMatMul` bit for bit; batches of Q4_1/Q5_0/Q5_1,
//! whose candle dot products are scalar, take the banded f32 product, which must equal the
//! dequantized product and stay within the Q8 activation rounding of `QMatMul`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use peft::layers::Linear;
use peft::quant::ggml::{type_name, SUPPORTED};
use peft::quant::ggml_dot;
use peft::quant::{GgmlWeight, QuantWeight};

/// Deterministic pseudo-random values in about [-1, 1] (no RNG state to share between tests).
fn values(n: usize, seed: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as f64 * 12.9898 + seed * 78.233).sin() * 43758.5453;
            (2.0 * (x - x.floor()) - 1.0) as f32
        })
        .collect()
}

fn tensor(dims: &[usize], seed: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu).unwrap()
}

/// Shapes per type: rows that are not a multiple of the product's band (256 rows at these
/// widths; 64 at 4096 columns), columns a multiple of the type's block (and of two blocks:
/// see [`odd_block_counts_take_the_banded_product`]).
fn shapes(dtype: GgmlDType) -> Vec<(usize, usize)> {
    if dtype.block_size() == 256 {
        vec![(300, 256), (70, 4096), (3, 512)]
    } else {
        vec![(300, 128), (70, 4096), (5, 64)]
    }
}

fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn weight(dtype: GgmlDType, rows: usize, cols: usize, seed: f64) -> GgmlWeight {
    let w = tensor(&[rows, cols], seed);
    GgmlWeight::new(QTensor::quantize(&w, dtype).unwrap()).unwrap()
}

#[test]
fn forward_equals_candle_qmatmul_for_every_type() {
    for dtype in SUPPORTED {
        for (rows, cols) in shapes(dtype) {
            let name = format!("{} [{rows}, {cols}]", type_name(dtype));
            let g = weight(dtype, rows, cols, rows as f64);
            let reference = QMatMul::from_arc(Arc::clone(g.qtensor())).unwrap();
            let kernel = g.uses_candle_kernel();
            let scalar_in_candle =
                matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
            assert!(!has_avx2() || kernel != scalar_in_candle, "{name}: path");
            let q = QuantWeight::Ggml(g.clone());
            let dense_w = g.dequantize(&Device::Cpu).unwrap();
            // 7 and 6 rows: a decode step (the few-row kernels for the 32-blocks, else candle's);
            // 40 rows: a training batch (candle's kernel or the banded f32 product).
            for x_dims in [vec![7, cols], vec![2, 3, cols], vec![2, 20, cols]] {
                let x = tensor(&x_dims, 0.5);
                let few_rows = x.elem_count() / cols <= ggml_dot::MAX_ROWS;
                let want = reference.forward(&x).unwrap();
                let got = peft::ops::quant_linear(&x, &q, None).unwrap();
                assert_eq!(got.dims(), want.dims(), "{name}");
                // The product with the dequantized weight, up to the Q8 rounding of the
                // activations (an independent check that the blocks are the right ones).
                let dense = x.broadcast_matmul(&dense_w.t().unwrap()).unwrap();
                let err = max_abs_diff(&got, &dense) / max_abs(&dense);
                let off_candle = max_abs_diff(&got, &want) / max_abs(&want);
                if few_rows && ggml_dot::supports(dtype) {
                    // Q8-rounded activations as candle's: its very outputs for Q4_0 and Q8_0
                    // (same lanes and FMA order as its AVX2 kernels), its scalar loop's up to
                    // the float order for the others.
                    if has_avx2() && !scalar_in_candle {
                        assert_eq!(off_candle, 0.0, "{name}: not candle's output");
                    } else {
                        assert!(
                            off_candle < 1e-5,
                            "{name}: {off_candle} off candle's QMatMul"
                        );
                    }
                    assert!(err < 2e-2, "{name}: {err} off the dequantized product");
                } else if kernel {
                    assert_eq!(off_candle, 0.0, "{name}: not candle's output");
                    assert!(err < 2e-2, "{name}: {err} off the dequantized product");
                } else {
                    assert!(err < 1e-5, "{name}: {err} off the dequantized product");
                    assert!(
                        off_candle < 2e-2,
                        "{name}: {off_candle} off candle's QMatMul"
                    );
                }
            }
            // A bias is added after the product.
            let b = tensor(&[rows], 9.0);
            let x = tensor(&[4, cols], 1.5);
            let without = peft::ops::quant_linear(&x, &q, None).unwrap();
            let got = peft::ops::quant_linear(&x, &q, Some(&b)).unwrap();
            let want = without.broadcast_add(&b).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "{name} with bias");
        }
    }
}

#[test]
fn input_gradient_equals_the_gradient_through_the_dequantized_weight() {
    for dtype in SUPPORTED {
        for (rows, cols) in shapes(dtype) {
            let name = format!("{} [{rows}, {cols}]", type_name(dtype));
            let g = weight(dtype, rows, cols, 3.0 + rows as f64);
            let dense = g.dequantize(&Device::Cpu).unwrap();
            let q = QuantWeight::Ggml(g);
            let x = Var::from_tensor(&tensor(&[2, 5, cols], 2.0)).unwrap();
            let c = tensor(&[2, 5, rows], 4.0);
            let loss = |y: Tensor| (y * &c).unwrap().sum_all().unwrap();
            let got = loss(peft::ops::quant_linear(x.as_tensor(), &q, None).unwrap())
                .backward()
                .unwrap();
            let got = got.get(x.as_tensor()).expect("a gradient for x");
            let want = loss(x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap())
                .backward()
                .unwrap();
            let want = want.get(x.as_tensor()).unwrap();
            let err = max_abs_diff(got, want) / max_abs(want);
            assert!(err < 1e-5, "{name}: input gradient off by {err}");
        }
    }
}

/// candle's scalar dot products assert an even number of blocks per row (its `QMatMul` panics
/// on a 96-wide Q4_1 weight); such weights take the few-row kernels for a few rows and the
/// banded f32 product (which equals the product with the dequantized weight) for more, and keep
/// the same backward.
#[test]
fn odd_block_counts_take_the_few_row_kernels_or_the_banded_product() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let name = type_name(dtype);
        let g = weight(dtype, 300, 96, 2.0);
        assert!(!g.uses_candle_kernel(), "{name}");
        let dense = g.dequantize(&Device::Cpu).unwrap();
        let q = QuantWeight::Ggml(g);
        for (rows, tolerance) in [(3, 2e-2), (20, 1e-5)] {
            let x = Var::from_tensor(&tensor(&[2, rows, 96], 0.5)).unwrap();
            let y = peft::ops::quant_linear(x.as_tensor(), &q, None).unwrap();
            let want = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
            let err = max_abs_diff(&y, &want) / max_abs(&want);
            assert!(err < tolerance, "{name}: {err} off the dequantized product");
            let grads = y.sum_all().unwrap().backward().unwrap();
            let gx = grads.get(x.as_tensor()).unwrap();
            let want = Tensor::ones((2, rows, 300), DType::F32, &Device::Cpu)
                .unwrap()
                .broadcast_matmul(&dense)
                .unwrap();
            let err = max_abs_diff(gx, &want) / max_abs(&want);
            assert!(err < 1e-5, "{name}: input gradient off by {err}");
        }
    }
}

#[test]
fn bf16_activations_run_through_candles_bf16_path() {
    let g = weight(GgmlDType::Q4K, 40, 256, 1.0);
    if !g.uses_candle_kernel() {
        return; // no SIMD dot products on this CPU: bf16 takes the dense fallback
    }
    let reference = QMatMul::from_arc(Arc::clone(g.qtensor())).unwrap();
    let x = tensor(&[3, 256], 0.25).to_dtype(DType::BF16).unwrap();
    let want = reference.forward(&x).unwrap();
    let got = peft::ops::quant_linear(&x, &QuantWeight::Ggml(g), None).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let diff = max_abs_diff(
        &got.to_dtype(DType::F32).unwrap(),
        &want.to_dtype(DType::F32).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn requantizing_keeps_the_ggml_type_and_equals_candles_quantizer() {
    for dtype in SUPPORTED {
        let (rows, cols) = shapes(dtype)[0];
        let q = QuantWeight::Ggml(weight(dtype, rows, cols, 7.0));
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let delta = (tensor(&[rows, cols], 8.0) * 0.05).unwrap();
        let merged = q.requantize(&(&dense + &delta).unwrap()).unwrap();
        let QuantWeight::Ggml(m) = &merged else {
            panic!("{}: re-quantized to another storage", type_name(dtype))
        };
        assert_eq!(m.dtype(), dtype);
        let want = QTensor::quantize(&(&dense + &delta).unwrap(), dtype).unwrap();
        assert_eq!(
            m.bytes(),
            &want.data().unwrap()[..],
            "{}: blocks differ from candle's quantizer",
            type_name(dtype)
        );
        assert_eq!(merged.storage_bytes(), want.storage_size_in_bytes());
    }
}

#[test]
fn band_reads_equal_the_whole_dequantized_weight() {
    for dtype in SUPPORTED {
        let (rows, cols) = shapes(dtype)[0];
        let g = weight(dtype, rows, cols, 11.0);
        let whole: Vec<f32> = g
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut band = vec![0f32; 7 * cols];
        g.dequantize_rows(rows - 7, &mut band);
        assert_eq!(
            &band[..],
            &whole[(rows - 7) * cols..],
            "{}",
            type_name(dtype)
        );
    }
}

#[test]
fn permuting_rows_moves_whole_rows_of_blocks() {
    let g = weight(GgmlDType::Q4K, 6, 256, 5.0);
    let order = [5, 0, 4, 1, 3, 2];
    let p = g.permute_rows(&order).unwrap();
    let a = g
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = p
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, &r) in order.iter().enumerate() {
        assert_eq!(b[i], a[r]);
    }
    let e = g.permute_rows(&[0, 1]).unwrap_err().to_string();
    assert!(e.contains("6 rows"), "{e}");
}

#[test]
fn unsupported_types_and_shapes_are_named() {
    // Q8_1 and Q8_K only hold activations in llama.cpp; F16 tensors load dense.
    for dtype in [GgmlDType::Q8_1, GgmlDType::Q8K, GgmlDType::F16] {
        let cols = dtype.block_size().max(32);
        let q = QTensor::quantize(&tensor(&[2, cols], 1.0), dtype).unwrap();
        let e = GgmlWeight::new(q).unwrap_err().to_string();
        assert!(
            e.contains(type_name(dtype)) && e.contains("Q4_1") && e.contains("Q6_K"),
            "{e}"
        );
    }
    let e = GgmlWeight::quantize(&tensor(&[4, 96], 1.0), GgmlDType::Q4K)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("96") && e.contains("256") && e.contains("Q4_K"),
        "{e}"
    );
    let e = GgmlWeight::quantize(&tensor(&[4, 64], 1.0), GgmlDType::Q8_1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Q8_1"), "{e}");
}

#[test]
fn a_quantized_linear_refuses_to_be_trained_as_a_base_weight() {
    let q = QuantWeight::Ggml(weight(GgmlDType::Q8_0, 8, 32, 1.0));
    let mut l = Linear::quantized("blk.0.attn_q", q, None, &Device::Cpu).unwrap();
    let e = l.weight.train_in_place().unwrap_err().to_string();
    assert!(e.contains("quantized") && e.contains("attn_q"), "{e}");
    let e = l.weight.add_copy("default").unwrap_err().to_string();
    assert!(e.contains("modules_to_save"), "{e}");
}
