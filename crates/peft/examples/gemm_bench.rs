//! GFLOP/s of each `ops::gemm` backend (and candle's own bf16 matmul) on the products of a
//! MiniLM training step (batch 8 × 128 tokens): the projections' forward `x · Wᵀ` and backward
//! `dy · W`. Median of `--reps` runs per cell.
//!
//! `cargo run --release -p peft --example gemm_bench -- [reps]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use peft::ops::gemm::{matmul_bf16_with, matmul_f32, Backend, MatMut, MatRef, Threads};

/// `W` as the right-hand side: `Wᵀ` forward, `W` backward.
fn wview(w: MatRef<'_, f32>, backward: bool) -> MatRef<'_, f32> {
    if backward {
        w
    } else {
        w.t()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("reps"))
        .unwrap_or(15);
    println!(
        "threads {}; backends available: {:?}",
        candle_core::utils::get_num_threads(),
        Backend::ALL
            .iter()
            .filter(|b| b.is_available())
            .map(|b| b.name())
            .collect::<Vec<_>>()
    );
    // (rows, in, out, backward): forward x[rows, in] · Wᵀ (W [out, in]); backward dy[rows, out] · W.
    let cases = [
        (1024, 384, 384, false),
        (1024, 384, 1536, false),
        (1024, 1536, 384, false),
        (1024, 384, 384, true),
        (1024, 384, 1536, true),
        (1024, 1536, 384, true),
    ];
    println!("shape (m x k x n)           f32     bf16/widen  bf16/avx512  candle bf16   GFLOP/s");
    for (rows, inp, out, backward) in cases {
        let (k, n) = if backward { (out, inp) } else { (inp, out) };
        let x: Vec<f32> = (0..rows * k).map(|i| ((i as f32) * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| ((i as f32) * 0.11).cos()).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut dst = vec![0f32; rows * n];
        let flops = 2.0 * (rows * k * n) as f64 / 1e9;
        let f32_s = time(reps, || {
            matmul_f32(
                MatMut::row_major(&mut dst, rows, n).unwrap(),
                false,
                MatRef::row_major(&x, rows, k).unwrap(),
                wview(MatRef::row_major(&w, out, inp).unwrap(), backward),
                1.0,
                Threads::All,
            )
            .unwrap()
        });
        let mut bf = Vec::new();
        for backend in Backend::ALL {
            if !backend.is_available() {
                bf.push(f64::NAN);
                continue;
            }
            let wv = MatRef::row_major(&wb, out, inp).unwrap();
            let wv = if backward { wv } else { wv.t() };
            bf.push(time(reps, || {
                matmul_bf16_with(
                    backend,
                    MatMut::row_major(&mut dst, rows, n).unwrap(),
                    false,
                    MatRef::row_major(&xb, rows, k).unwrap(),
                    wv,
                    1.0,
                    Threads::All,
                )
                .unwrap()
            }));
        }
        let dev = Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (rows, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let wt = Tensor::from_vec(w.clone(), (out, inp), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let wt = if backward { wt } else { wt.t().unwrap() };
        let candle_s = time(reps, || {
            xt.matmul(&wt).unwrap();
        });
        println!(
            "{:>5} x {:>4} x {:>4} {}  {:>8.1}  {:>10.1}  {:>11.1}  {:>11.1}",
            rows,
            k,
            n,
            if backward { "bwd" } else { "fwd" },
            flops / f32_s,
            flops / bf[0],
            flops / bf[1],
            flops / candle_s
        );
    }
}
