//! GFLOP/s of each `ops::gemm` backend (and candle's own bf16 matmul) on the products of a
//! MiniLM training step (batch 8 × 128 tokens): the projections' forward `x · Wᵀ` and backward
//! `dy · W`. Median of `--reps` runs per cell.
//!
//! The second table is the decoding products (a few rows `x` times a transposed row-major
//! weight, SmolLM2-135M's projections and lm_head): each small-m kernel of `ops::gemm` against
//! the `gemm` crate called directly (what `matmul_f32` used before), in GB/s of weight streamed,
//! on one thread and on all; it is what `SKINNY_MAX_ROWS` was chosen from.
//!
//! `cargo run --release -p peft --example gemm_bench -- [reps] [skinny]` (`skinny`: only the
//! second table)

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use peft::ops::gemm::{
    matmul_bf16_with, matmul_f32, matmul_skinny_with, Backend, MatMut, MatRef, SkinnyKernel,
    Threads,
};

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
    let only_skinny = std::env::args().nth(2).is_some_and(|a| a == "skinny");
    if only_skinny {
        skinny(reps);
        return;
    }
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
    println!(
        "shape (m x k x n)           f32     bf16/widen  bf16/avx512     bf16/amx  candle bf16   GFLOP/s"
    );
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
            "{:>5} x {:>4} x {:>4} {}  {:>8.1}  {:>10.1}  {:>11.1}  {:>11.1}  {:>11.1}",
            rows,
            k,
            n,
            if backward { "bwd" } else { "fwd" },
            flops / f32_s,
            flops / bf[0],
            flops / bf[1],
            flops / bf[2],
            flops / candle_s
        );
    }
}

/// `x[m, k] · W[n, k]ᵀ` through the `gemm` crate, as `matmul_f32` called it before the small-m
/// kernels.
fn gemm_crate(dst: &mut [f32], x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), t: usize) {
    let par = if t > 1 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    };
    assert!(dst.len() >= m * n && x.len() >= m * k && w.len() >= n * k);
    // SAFETY: the three buffers hold the row-major m × n, m × k and n × k matrices (asserted).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn skinny(reps: usize) {
    let kernels: Vec<SkinnyKernel> = SkinnyKernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    println!(
        "decoding products, GB/s of f32 weight streamed (threads: 1 / {})",
        candle_core::utils::get_num_threads()
    );
    print!("  m  x    k x     n     gemm crate");
    for k in &kernels {
        print!("  {:>14}", k.name());
    }
    println!();
    for (k, n) in [(576, 576), (576, 1536), (1536, 576), (576, 49152)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.11).cos()).collect();
        for m in [1, 2, 4, 8, 12, 16, 24, 32, 64] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect();
            let mut dst = vec![0f32; m * n];
            let gb = (n * k * 4) as f64 / 1e9;
            let cell = |f: &mut dyn FnMut(Threads)| -> String {
                let one = time(reps, || f(Threads::One));
                let all = time(reps, || f(Threads::All));
                format!("{:>6.1} / {:>5.1}", gb / one, gb / all)
            };
            let base = cell(&mut |t: Threads| {
                let t = if t == Threads::One {
                    1
                } else {
                    candle_core::utils::get_num_threads()
                };
                gemm_crate(&mut dst, &x, &w, (m, k, n), t)
            });
            print!("{m:>3} x {k:>4} x {n:>5}  {base}");
            for &kern in &kernels {
                let c = cell(&mut |t: Threads| {
                    matmul_skinny_with(
                        kern,
                        MatMut::row_major(&mut dst, m, n).unwrap(),
                        false,
                        MatRef::row_major(&x, m, k).unwrap(),
                        MatRef::row_major(&w, n, k).unwrap().t(),
                        1.0,
                        t,
                    )
                    .unwrap()
                });
                print!("  {c}");
            }
            println!();
        }
    }
}
