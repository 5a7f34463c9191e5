//! Microseconds per product of SmolLM2-135M's projection shapes in GGUF blocks, for `m` rows of
//! `x`: the few-row kernels (`quant::ggml_dot`), `ops::quant_linear` (which takes them up to
//! `ggml_dot::MAX_ROWS` rows and the banded f32 product above), candle's `QMatMul`, and the
//! dense f32 product with the pre-dequantized weight. Median of `reps` runs, interleaved.
//!
//! `cargo run --release -p peft --example ggml_dot_bench -- [Q4_1|Q4_0|Q5_0|Q5_1|Q8_0] [reps]`

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use peft::quant::ggml_dot;
use peft::quant::{GgmlWeight, QuantWeight};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dtype = match args.get(1).map(String::as_str).unwrap_or("Q4_1") {
        "Q4_0" => GgmlDType::Q4_0,
        "Q5_0" => GgmlDType::Q5_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q8_0" => GgmlDType::Q8_0,
        _ => GgmlDType::Q4_1,
    };
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(21);
    println!(
        "{dtype:?}, isa {:?}, {} threads; microseconds (median of {reps})",
        ggml_dot::Isa::detect(),
        candle_core::utils::get_num_threads()
    );
    println!("shape        m   ggml_dot  quant_linear  QMatMul  dense_f32");
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = Tensor::randn(0f32, 0.1, (n, k), &Device::Cpu).unwrap();
        let g = GgmlWeight::new(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let qmm = QMatMul::from_arc(Arc::clone(g.qtensor())).unwrap();
        let q = QuantWeight::Ggml(g.clone());
        let dense = g.dequantize(&Device::Cpu).unwrap();
        let dense_t = dense.t().unwrap();
        for m in [1, 2, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut y = vec![0f32; m * n];
            let mut t = [vec![], vec![], vec![], vec![]];
            for _ in 0..reps {
                let s = Instant::now();
                ggml_dot::matmul(&g, &xv, &mut y, false).unwrap();
                t[0].push(s.elapsed().as_secs_f64());
                let s = Instant::now();
                peft::ops::quant_linear(&x, &q, None).unwrap();
                t[1].push(s.elapsed().as_secs_f64());
                let s = Instant::now();
                qmm.forward(&x).unwrap();
                t[2].push(s.elapsed().as_secs_f64());
                let s = Instant::now();
                x.matmul(&dense_t).unwrap();
                t[3].push(s.elapsed().as_secs_f64());
            }
            let [a, b, c, d] = t.map(|v| median(v) * 1e6);
            println!("{n:4} x {k:4} {m:3} {a:9.1} {b:13.1} {c:8.1} {d:10.1}");
        }
    }
}
