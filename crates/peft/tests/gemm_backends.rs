//! Every matrix-product backend `ops::gemm` has, against an f64 product of the same (bf16-
//! rounded) inputs, for the shapes, strides and transpositions a training step uses and the
//! awkward ones around them (odd k, k across a block boundary, ragged tile edges, transposed
//! and strided views, an output with a wider row stride, accumulate and scale). A backend this
//! CPU cannot run is reported as skipped, with the reason, never passed silently.

use half::bf16;
use peft::ops::gemm::{
    bf16_backend, matmul_bf16_with, matmul_f32, Backend, MatMut, MatRef, Threads,
};

/// Deterministic values in about [-2, 2], rounded to bf16, none subnormal.
fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            bf16::from_f64(4.0 * u - 2.0)
        })
        .collect()
}

/// A logical `rows × cols` matrix stored either row-major with a padded row stride, or
/// transposed (column-major, padded), so views have `cs != 1` too.
struct Stored {
    data: Vec<bf16>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Stored {
    fn new(rows: usize, cols: usize, transposed: bool, seed: u64) -> Self {
        let pad = 3;
        let (rs, cs, len) = if transposed {
            (1, rows + pad, cols * (rows + pad))
        } else {
            (cols + pad, 1, rows * (cols + pad))
        };
        Self {
            data: values(len.max(1), seed),
            rows,
            cols,
            rs,
            cs,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.rs + j * self.cs].to_f64()
    }

    fn view(&self) -> MatRef<'_, bf16> {
        MatRef::new(&self.data, self.rows, self.cols, self.rs, self.cs).unwrap()
    }

    fn f32_data(&self) -> Vec<f32> {
        self.data.iter().map(|v| v.to_f32()).collect()
    }
}

/// `alpha · a · b (+ c0)` and `Σ |a||b|` per element, in f64.
fn reference(a: &Stored, b: &Stored, alpha: f64, c0: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut g) = (0f64, 0f64);
            for p in 0..k {
                let t = a.at(i, p) * b.at(p, j);
                s += t;
                g += t.abs();
            }
            out[i * n + j] = alpha * s + c0.map_or(0.0, |c| c[i * n + j] as f64);
            mag[i * n + j] = alpha.abs() * g + c0.map_or(0.0, |c| (c[i * n + j] as f64).abs());
        }
    }
    (out, mag)
}

/// The shapes: a training step's (BERT-small projections and their backward, LoRA's rank-8
/// factors, attention heads) and edge cases around the kernels' tiles (12 × 32) and k blocks
/// (256).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 2),
    (2, 3, 1),
    (12, 32, 2),
    (13, 33, 3),
    (11, 31, 255),
    (25, 47, 256),
    (25, 47, 257),
    (37, 65, 513),
    (130, 96, 384),
    (64, 384, 8),
    (64, 8, 384),
    (128, 128, 32),
    (128, 32, 128),
    (200, 70, 1537),
    (257, 100, 1025),
];

fn check(what: &str, got: &[f32], dst_rs: usize, n: usize, want: &[f64], mag: &[f64]) {
    for (idx, (w, g)) in want.iter().zip(mag).enumerate() {
        let (i, j) = (idx / n, idx % n);
        let v = got[i * dst_rs + j] as f64;
        // f32 accumulation: a few ulps of the magnitudes summed.
        let tol = 1e-5 * g + 1e-30;
        assert!(
            (v - w).abs() <= tol,
            "{what}: ({i}, {j}) = {v}, reference {w}, tolerance {tol}"
        );
    }
}

/// Runs `f(backend)` for each backend this CPU has; says which were skipped and why.
fn for_each_backend(mut f: impl FnMut(Backend)) {
    let mut ran = Vec::new();
    for backend in Backend::ALL {
        match backend.unavailable_reason() {
            Some(why) => eprintln!("gemm backend {} skipped: {why}", backend.name()),
            None => {
                f(backend);
                ran.push(backend.name());
            }
        }
    }
    eprintln!("gemm backends tested: {ran:?}");
    assert!(ran.contains(&"f32"), "the f32 backend runs everywhere");
}

#[test]
fn every_available_bf16_backend_matches_the_f64_product() {
    for_each_backend(|backend| {
        for &(m, n, k) in SHAPES {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = Stored::new(m, k, ta, (m * 31 + k) as u64);
                let b = Stored::new(k, n, tb, (n * 17 + k + 5) as u64);
                for (accumulate, alpha, threads) in [
                    (false, 1.0f32, Threads::All),
                    (true, 0.5, Threads::One),
                    (false, -0.25, Threads::One),
                ] {
                    // Output rows 5 wider than the matrix, to catch writes past a row.
                    let rs = n + 5;
                    let init: Vec<f32> = values(m * rs, 99).iter().map(|v| v.to_f32()).collect();
                    let mut dst = init.clone();
                    let c0: Vec<f32> = (0..m * n).map(|x| init[(x / n) * rs + x % n]).collect();
                    matmul_bf16_with(
                        backend,
                        MatMut::new(&mut dst, m, n, rs).unwrap(),
                        accumulate,
                        a.view(),
                        b.view(),
                        alpha,
                        threads,
                    )
                    .unwrap();
                    let (want, mag) =
                        reference(&a, &b, alpha as f64, accumulate.then_some(c0.as_slice()));
                    let what = format!(
                        "{} {m}x{k} · {k}x{n} (lhs transposed {ta}, rhs transposed {tb}, \
                         accumulate {accumulate}, alpha {alpha}, {threads:?})",
                        backend.name()
                    );
                    check(&what, &dst, rs, n, &want, &mag);
                    // The padding between rows is untouched.
                    for i in 0..m {
                        assert_eq!(
                            &dst[i * rs + n..(i + 1) * rs],
                            &init[i * rs + n..(i + 1) * rs]
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn the_f32_product_matches_the_f64_product() {
    for &(m, n, k) in SHAPES {
        for (ta, tb) in [(false, false), (true, true), (false, true)] {
            let a = Stored::new(m, k, ta, (m + 3 * k) as u64);
            let b = Stored::new(k, n, tb, (n + 7 * k) as u64);
            let (ad, bd) = (a.f32_data(), b.f32_data());
            let mut dst = vec![0f32; m * n];
            matmul_f32(
                MatMut::row_major(&mut dst, m, n).unwrap(),
                false,
                MatRef::new(&ad, m, k, a.rs, a.cs).unwrap(),
                MatRef::new(&bd, k, n, b.rs, b.cs).unwrap(),
                1.0,
                Threads::All,
            )
            .unwrap();
            let (want, mag) = reference(&a, &b, 1.0, None);
            check(&format!("f32 {m}x{k}x{n}"), &dst, n, n, &want, &mag);
        }
    }
}

#[test]
fn views_and_shapes_are_checked() {
    let v = values(12, 1);
    assert!(MatRef::new(&v, 3, 4, 4, 1).is_ok());
    assert!(
        MatRef::new(&v, 3, 5, 4, 1).is_err(),
        "reaches past the data"
    );
    assert!(MatRef::new(&v, 4, 3, 1, 4).is_ok(), "column-major 4x3");
    assert!(MatRef::new(&v, 4, 3, 1, 5).is_err());
    let mut out = vec![0f32; 6];
    assert!(
        MatMut::new(&mut out, 2, 3, 2).is_err(),
        "row stride below the width"
    );
    let a = MatRef::row_major(&v, 3, 4).unwrap();
    let b = MatRef::row_major(&v, 3, 4).unwrap();
    for_each_backend(|backend| {
        let mut out = vec![0f32; 9];
        let err = matmul_bf16_with(
            backend,
            MatMut::row_major(&mut out, 3, 3).unwrap(),
            false,
            a,
            b,
            1.0,
            Threads::One,
        );
        assert!(err.is_err(), "3x4 · 3x4 must be refused");
    });
    for backend in Backend::ALL {
        if backend.unavailable_reason().is_some() {
            let mut out = vec![0f32; 9];
            let r = matmul_bf16_with(
                backend,
                MatMut::row_major(&mut out, 3, 3).unwrap(),
                false,
                a,
                b.t(),
                1.0,
                Threads::One,
            );
            assert!(
                r.is_err(),
                "{} is unavailable and must say so",
                backend.name()
            );
        }
    }
}

/// `PEFT_GEMM` chooses the backend for the whole process: each available backend is forced in
/// a child process (this test binary, running only [`child_reports_the_forced_backend`]).
#[test]
fn peft_gemm_env_forces_each_available_backend() {
    if std::env::var_os("PEFT_GEMM_TEST_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for_each_backend(|backend| {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "child_reports_the_forced_backend", "--nocapture"])
            .env("PEFT_GEMM", backend.name())
            .env("PEFT_GEMM_TEST_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {text}", backend.name());
        assert!(
            text.contains(&format!("bf16 backend: {}", backend.name())),
            "{}: {text}",
            backend.name()
        );
        assert!(text.contains("1 passed"), "{}: {text}", backend.name());
    });
}

#[test]
fn child_reports_the_forced_backend() {
    let Ok(name) = std::env::var("PEFT_GEMM") else {
        return;
    };
    if std::env::var_os("PEFT_GEMM_TEST_CHILD").is_none() {
        return;
    }
    println!("bf16 backend: {}", bf16_backend().name());
    assert_eq!(bf16_backend().name(), name);
}
