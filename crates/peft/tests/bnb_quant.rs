//! bitsandbytes' 4-bit and 8-bit formats against bitsandbytes 0.50 itself (fixtures from
//! tools/fixtures/make_bnb_fixtures.py, run on its CPU backend).

use std::collections::HashMap;
use std::path::Path;

use peft::candle::{DType, Device, Tensor};
use peft::quant::{bnb4, Absmax, Int8Rows, Quant4, QuantType};

fn fixtures() -> HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb/bnb.safetensors");
    peft::io::load_safetensors(&p, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const SHAPES: [&str; 3] = ["even", "straddle", "odd"];

/// Every fixture case: (tag, shape name, dtype, quant type, double quant).
fn cases() -> Vec<(String, &'static str, DType, QuantType, bool)> {
    let mut out = Vec::new();
    for s in SHAPES {
        for (dn, dt) in [("float32", DType::F32), ("bfloat16", DType::BF16)] {
            for (qn, qt) in [("nf4", QuantType::Nf4), ("fp4", QuantType::Fp4)] {
                for dq in [false, true] {
                    let tag = format!("{s}.{dn}.{qn}.{}", if dq { "dq" } else { "plain" });
                    out.push((tag, s, dt, qt, dq));
                }
            }
        }
    }
    out
}

#[test]
fn the_signed_dynamic_map_is_bitsandbytes_bit_for_bit() {
    let t = fixtures();
    let theirs = f32s(&t["dynamic_map"]);
    let ours = bnb4::signed_dynamic_map();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "map[{i}]: ours {a:e}, bitsandbytes {b:e}"
        );
    }
    assert_eq!(ours.len(), theirs.len());
}

#[test]
fn four_bit_codes_equal_bitsandbytes_bit_for_bit_and_dequantize_alike() {
    let t = fixtures();
    for (tag, s, dtype, qt, dq) in cases() {
        let w = t[&format!("{s}.weight")].to_dtype(dtype).unwrap();
        let values = f32s(&w);
        let q = Quant4::quantize(&values, w.dims(), qt, 64, dq, dtype).unwrap();
        let packed: Vec<u8> = t[&format!("{tag}.weight")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(q.packed, packed, "{tag}: packed 4-bit codes");
        let theirs = f32s(&t[&format!("{tag}.dequant")]);
        match &q.absmax {
            Absmax::Plain(a) => {
                assert_eq!(a, &f32s(&t[&format!("{tag}.weight.absmax")]), "{tag}");
                let ours = f32s(&q.dequantize(&Device::Cpu).unwrap());
                assert_eq!(max_diff(&ours, &theirs), 0.0, "{tag}: dequantized");
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                blocksize,
                ..
            } => {
                // bitsandbytes' CPU kernel codes the absmax through a lookup table that misses
                // the nearest code in rare ties; the values it stands for still agree closely.
                let their_codes: Vec<u8> = t[&format!("{tag}.weight.absmax")].to_vec1().unwrap();
                // Where a nested block's absmax is 0, every code stands for the same value.
                for (i, (a, b)) in codes.iter().zip(&their_codes).enumerate() {
                    let any = nested_absmax[i / blocksize] == 0.0;
                    assert!(
                        any || a.abs_diff(*b) <= 1,
                        "{tag}: nested code {i}: ours {a}, theirs {b}"
                    );
                }
                let ours = f32s(&q.dequantize(&Device::Cpu).unwrap());
                let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = max_diff(&ours, &theirs);
                assert!(
                    d <= 1e-2 * scale,
                    "{tag}: dequantized differ by {d} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn bitsandbytes_state_dicts_load_and_save_back_unchanged() {
    let t = fixtures();
    for (tag, _, dtype, qt, dq) in cases() {
        let prefix = format!("{tag}.weight");
        let q = Quant4::from_state_dict(&prefix, &t)
            .unwrap()
            .unwrap_or_else(|| panic!("{tag}: no quant state found"));
        assert_eq!(
            (q.quant_type, q.dtype, q.blocksize),
            (qt, dtype, 64),
            "{tag}"
        );
        assert_eq!(matches!(q.absmax, Absmax::Nested { .. }), dq, "{tag}");
        // The dequantized weight exactly as bitsandbytes computes it (f32, then the weight dtype).
        let ours = f32s(&q.dequantize(&Device::Cpu).unwrap());
        assert_eq!(
            max_diff(&ours, &f32s(&t[&format!("{tag}.dequant")])),
            0.0,
            "{tag}"
        );
        // Written back: the same tensors, the quant state's JSON bytes included.
        for (k, v) in q.to_state_dict(&prefix).unwrap() {
            let theirs = t
                .get(&k)
                .unwrap_or_else(|| panic!("{tag}: we write {k}, they do not"));
            assert_eq!(v.dims(), theirs.dims(), "{k}");
            let same = match v.dtype() {
                DType::U8 => {
                    v.flatten_all().unwrap().to_vec1::<u8>().unwrap()
                        == theirs.flatten_all().unwrap().to_vec1::<u8>().unwrap()
                }
                _ => f32s(&v) == f32s(theirs),
            };
            assert!(same, "{k} differs from bitsandbytes'");
        }
        let written = q.to_state_dict(&prefix).unwrap().len();
        let theirs = t
            .keys()
            .filter(|k| k.starts_with(&format!("{prefix}.")))
            .count()
            + 1;
        assert_eq!(
            written, theirs,
            "{tag}: as many tensors as bitsandbytes saves"
        );
    }
}

#[test]
fn llm_int8_rows_equal_bitsandbytes() {
    let t = fixtures();
    for s in SHAPES {
        let w = &t[&format!("{s}.weight")];
        let (rows, cols) = w.dims2().unwrap();
        let q = Int8Rows::quantize(&f32s(w), rows, cols).unwrap();
        let codes: Vec<i8> = f32s(&t[&format!("{s}.int8.codes")])
            .iter()
            .map(|&c| c as i8)
            .collect();
        for (i, (a, b)) in q.codes.iter().zip(&codes).enumerate() {
            assert_eq!(
                a,
                b,
                "{s}: int8 code {i} (row {}, SCB {})",
                i / cols,
                q.scb[i / cols]
            );
        }
        assert_eq!(q.scb, f32s(&t[&format!("{s}.int8.SCB")]), "{s}: SCB");
        let ours = f32s(&q.dequantize(&Device::Cpu).unwrap());
        assert_eq!(
            max_diff(&ours, &f32s(&t[&format!("{s}.int8.dequant")])),
            0.0
        );
    }
}

#[test]
fn bad_quantization_input_is_named() {
    let e = Quant4::quantize(&[0.0; 64], &[1, 64], QuantType::Nf4, 48, false, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("48") && e.contains("64"), "{e}");
    let e = QuantType::parse("int4").unwrap_err().to_string();
    assert!(
        e.contains("int4") && e.contains("nf4") && e.contains("fp4"),
        "{e}"
    );
    let e = Quant4::quantize(
        &[f32::NAN; 64],
        &[1, 64],
        QuantType::Nf4,
        64,
        false,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("NaN"), "{e}");
    // A state whose packed codes do not fit its shape.
    let t = fixtures();
    let mut bad = t.clone();
    let prefix = "even.float32.nf4.plain.weight";
    bad.insert(
        prefix.to_string(),
        Tensor::zeros((10, 1), DType::U8, &Device::Cpu).unwrap(),
    );
    let e = Quant4::from_state_dict(prefix, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains(prefix), "{e}");
}

/// `Linear4bit` / `Linear8bitLt` on bitsandbytes' CPU backend: our banded product and its input
/// gradient against theirs (bf16 layers compute in bf16 there, in f32 over bf16 values here).
#[test]
fn quantized_linear_forward_and_input_gradient_match_bitsandbytes() {
    use peft::candle::Var;
    use peft::quant::QuantWeight;
    let t = fixtures();
    let check = |what: &str,
                 w: &QuantWeight,
                 x: &Tensor,
                 y: &Tensor,
                 gy: &Tensor,
                 gx: &Tensor,
                 tol: f32| {
        let xv = Var::from_tensor(x).unwrap();
        let ours = peft::ops::quant_linear(xv.as_tensor(), w, None).unwrap();
        let scale = f32s(y).iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&f32s(&ours), &f32s(y));
        assert!(d <= tol * scale.max(1.0), "{what}: forward differs by {d}");
        let grads = (ours * gy).unwrap().sum_all().unwrap().backward().unwrap();
        let ours_gx = grads.get(xv.as_tensor()).expect("input gradient");
        let scale = f32s(gx).iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&f32s(ours_gx), &f32s(gx));
        assert!(
            d <= tol * scale.max(1.0),
            "{what}: input gradient differs by {d}"
        );
    };
    for (tag, s, dtype, _, _) in cases() {
        let q = Quant4::from_state_dict(&format!("{tag}.weight"), &t)
            .unwrap()
            .unwrap();
        // The layer computes in the fixture's compute dtype, as bitsandbytes' did.
        let w = QuantWeight::bnb4(Quant4 {
            compute_dtype: Some(dtype),
            ..q
        })
        .unwrap();
        // The input as the layer sees it: in the compute dtype.
        let x = t[&format!("{s}.x")]
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        let get = |k: &str| t[&format!("{tag}.{k}")].clone();
        check(&tag, &w, &x, &get("y"), &get("grad_y"), &get("grad_x"), tol);
    }
    for s in SHAPES {
        let w = &t[&format!("{s}.weight")];
        let (rows, cols) = w.dims2().unwrap();
        let q = QuantWeight::Int8(std::sync::Arc::new(
            Int8Rows::quantize(&f32s(w), rows, cols).unwrap(),
        ));
        let get = |k: &str| t[&format!("{s}.{k}")].clone();
        check(
            &format!("{s} int8"),
            &q,
            &get("x"),
            &get("int8.y"),
            &get("int8.grad_y"),
            &get("int8.grad_x"),
            1e-5,
        );
    }
}

#[test]
fn bf16_compute_dtype_rounds_inputs_and_weights_to_bf16_with_f32_accumulation() {
    use peft::candle::Var;
    use peft::quant::{QuantWeight, Scheme};
    let t = fixtures();
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for s in SHAPES {
        let dense = &t[&format!("{s}.weight")];
        let x = Var::from_tensor(&t[&format!("{s}.x")].to_dtype(DType::F32).unwrap()).unwrap();
        let scheme = |compute_dtype| Scheme::FourBit {
            quant_type: QuantType::Nf4,
            double_quant: true,
            blocksize: 64,
            compute_dtype,
        };
        let w = QuantWeight::quantize(dense, &scheme(DType::BF16)).unwrap();
        assert_eq!(w.compute_dtype(), Some(DType::BF16));
        let deq = w.dequantize(&Device::Cpu).unwrap(); // [out, in], f32
        let y = peft::ops::quant_linear(x.as_tensor(), &w, None).unwrap();
        let gy = (y.ones_like().unwrap() * 0.37).unwrap();
        let gx = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = gx.get(x.as_tensor()).unwrap();
        let (want_y, want_gx) = if peft::ops::gemm::bf16_is_native() {
            (
                round(x.as_tensor())
                    .matmul(&round(&deq).t().unwrap())
                    .unwrap(),
                round(&gy).matmul(&round(&deq)).unwrap(),
            )
        } else {
            // No bf16 matrix instructions: the products stay f32.
            eprintln!("no native bf16 products on this CPU: checked the f32 fallback");
            (
                x.as_tensor().matmul(&deq.t().unwrap()).unwrap(),
                gy.matmul(&deq).unwrap(),
            )
        };
        for (what, got, want) in [("forward", &y, &want_y), ("input gradient", gx, &want_gx)] {
            let scale = f32s(want).iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max_diff(&f32s(got), &f32s(want));
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{s} {what}: {d} (scale {scale})"
            );
        }
        if peft::ops::gemm::bf16_is_native() {
            // The rounding is real: the f32 product is further away than accumulation noise.
            let exact = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
            assert!(max_diff(&f32s(&y), &f32s(&exact)) > 1e-4);
        }
        // The default compute dtype (f32) multiplies in f32.
        let w32 = QuantWeight::quantize(dense, &scheme(DType::F32)).unwrap();
        let y32 = peft::ops::quant_linear(x.as_tensor(), &w32, None).unwrap();
        let exact = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
        let scale = f32s(&exact).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max_diff(&f32s(&y32), &f32s(&exact)) <= 1e-5 * scale.max(1.0));
    }
}
