//! The small-m kernels of `ops::gemm` (`x · Wᵀ` for a few rows `x` and a row-major weight `W`,
//! the products of every decoding step) against an f64 product of the same inputs: every kernel
//! this CPU runs, m = 1..17, k and n around the vector widths (8, 16) and tile sizes, k = 1,
//! padded row strides on both operands and the output, accumulate and alpha, one and all
//! threads. A kernel this CPU cannot run is reported as skipped, with the reason, and refuses to
//! run; `PEFT_GEMM_SKINNY` forces one (the portable one included) in a child process.

use peft::ops::gemm::{
    matmul_f32, matmul_skinny_with, skinny_kernel, MatMut, MatRef, SkinnyKernel, Threads,
    SKINNY_MAX_ROWS,
};

/// Deterministic values in about [-2, 2].
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            (4.0 * u - 2.0) as f32
        })
        .collect()
}

/// A row-major `rows × cols` matrix whose rows are `cols + pad` apart.
struct Padded {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    rs: usize,
}

impl Padded {
    fn new(rows: usize, cols: usize, pad: usize, seed: u64) -> Self {
        let rs = cols + pad;
        Self {
            data: values((rows * rs).max(1), seed),
            rows,
            cols,
            rs,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.rs + j] as f64
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::new(&self.data, self.rows, self.cols, self.rs, 1).unwrap()
    }
}

/// `alpha · x · wᵀ (+ c0)` and `Σ |x||w|` per element, in f64.
fn reference(x: &Padded, w: &Padded, alpha: f64, c0: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k) = (x.rows, w.rows, x.cols);
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut g) = (0f64, 0f64);
            for p in 0..k {
                let t = x.at(i, p) * w.at(j, p);
                s += t;
                g += t.abs();
            }
            let c = c0.map_or(0.0, |c| c[i * n + j] as f64);
            out[i * n + j] = alpha * s + c;
            mag[i * n + j] = alpha.abs() * g + c.abs();
        }
    }
    (out, mag)
}

/// Runs `f(kernel)` for each kernel this CPU has; says which were skipped and why.
fn for_each_kernel(mut f: impl FnMut(SkinnyKernel)) {
    let mut ran = Vec::new();
    for kernel in SkinnyKernel::ALL {
        match kernel.unavailable_reason() {
            Some(why) => eprintln!("skinny kernel {} skipped: {why}", kernel.name()),
            None => {
                f(kernel);
                ran.push(kernel.name());
            }
        }
    }
    eprintln!("skinny kernels tested: {ran:?}");
    assert!(
        ran.contains(&"portable"),
        "the portable kernel runs everywhere"
    );
}

/// One product on `kernel` (or through `matmul_f32` when `None`) checked against f64, with the
/// output's row padding checked untouched.
#[allow(clippy::too_many_arguments)]
fn check_one(
    kernel: Option<SkinnyKernel>,
    m: usize,
    k: usize,
    n: usize,
    pads: (usize, usize),
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    let x = Padded::new(m, k, pads.0, (m * 131 + k) as u64);
    let w = Padded::new(n, k, pads.1, (n * 17 + k + 5) as u64);
    let rs = n + 2;
    let init = values(m * rs, 99);
    let mut dst = init.clone();
    let c0: Vec<f32> = (0..m * n).map(|t| init[(t / n) * rs + t % n]).collect();
    let out = MatMut::new(&mut dst, m, n, rs).unwrap();
    match kernel {
        Some(kernel) => matmul_skinny_with(
            kernel,
            out,
            accumulate,
            x.view(),
            w.view().t(),
            alpha,
            threads,
        ),
        None => matmul_f32(out, accumulate, x.view(), w.view().t(), alpha, threads),
    }
    .unwrap();
    let (want, mag) = reference(&x, &w, alpha as f64, accumulate.then_some(c0.as_slice()));
    let what = format!(
        "{} {m}x{k} · ({n}x{k})ᵀ (pads {pads:?}, accumulate {accumulate}, alpha {alpha}, \
         {threads:?})",
        kernel.map_or("matmul_f32", |k| k.name())
    );
    for i in 0..m {
        for j in 0..n {
            let got = dst[i * rs + j] as f64;
            let (wv, tol) = (want[i * n + j], 1e-5 * mag[i * n + j] + 1e-30);
            assert!(
                (got - wv).abs() <= tol,
                "{what}: ({i}, {j}) = {got}, reference {wv}, tolerance {tol}"
            );
        }
        assert_eq!(
            &dst[i * rs + n..(i + 1) * rs],
            &init[i * rs + n..(i + 1) * rs],
            "{what}: the padding after row {i} was written"
        );
    }
}

/// k and n around the 8- and 16-lane widths and the 3- and 4-row tiles; one large enough
/// (130 × 577 weight elements) to be split across threads.
const KS: &[usize] = &[1, 2, 7, 8, 15, 16, 17, 33, 64, 100];
const NS: &[usize] = &[1, 2, 3, 4, 5, 9, 17];

#[test]
fn every_available_skinny_kernel_matches_the_f64_product() {
    for_each_kernel(|kernel| {
        for m in 1..=17 {
            for &k in KS {
                for &n in NS {
                    let pads = (m % 3, (n + k) % 4);
                    check_one(Some(kernel), m, k, n, pads, false, 1.0, Threads::One);
                }
            }
            // Accumulate with a scale, padded strides; and a product split across threads.
            check_one(Some(kernel), m, 47, 13, (3, 5), true, -0.5, Threads::One);
            check_one(Some(kernel), m, 577, 130, (1, 3), false, 0.25, Threads::All);
            check_one(Some(kernel), m, 577, 130, (0, 0), true, 1.0, Threads::All);
        }
    });
}

#[test]
fn matmul_f32_serves_few_rows_times_a_transposed_weight() {
    // Either side of the threshold, so both the small-m kernel and the gemm crate are checked
    // on the layout the dispatch looks at.
    for m in [1, 2, 8, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 40] {
        for (k, n) in [(1, 5), (17, 33), (576, 200)] {
            check_one(None, m, k, n, (1, 2), false, 1.0, Threads::All);
            check_one(None, m, k, n, (0, 0), true, 0.5, Threads::One);
        }
    }
}

#[test]
fn layouts_the_kernels_do_not_serve_are_refused() {
    let v = values(64, 3);
    let x = MatRef::row_major(&v, 2, 8).unwrap();
    let w = MatRef::row_major(&v, 8, 8).unwrap();
    for_each_kernel(|kernel| {
        let mut out = vec![0f32; 16];
        // `w` as it is (rows k apart, not a transposed weight): refused, not miscomputed.
        let r = matmul_skinny_with(
            kernel,
            MatMut::row_major(&mut out, 2, 8).unwrap(),
            false,
            x,
            w,
            1.0,
            Threads::One,
        );
        assert!(r.is_err(), "{}: a non-transposed rhs", kernel.name());
        let r = matmul_skinny_with(
            kernel,
            MatMut::row_major(&mut out, 2, 8).unwrap(),
            false,
            x,
            MatRef::row_major(&v, 4, 8).unwrap().t(),
            1.0,
            Threads::One,
        );
        assert!(r.is_err(), "{}: 2x8 · 8x4 into 2x8", kernel.name());
    });
    for kernel in SkinnyKernel::ALL {
        if kernel.unavailable_reason().is_some() {
            let mut out = vec![0f32; 16];
            let r = matmul_skinny_with(
                kernel,
                MatMut::row_major(&mut out, 2, 8).unwrap(),
                false,
                x,
                w.t(),
                1.0,
                Threads::One,
            );
            assert!(
                r.is_err(),
                "{} is unavailable and must say so",
                kernel.name()
            );
        }
    }
}

/// `PEFT_GEMM_SKINNY` chooses the kernel `matmul_f32` uses for the whole process: each
/// available kernel, and `off`, is forced in a child process (this test binary, running only
/// [`child_uses_the_forced_kernel`]), which checks the choice and a product through
/// `matmul_f32`.
#[test]
fn peft_gemm_skinny_env_forces_each_available_kernel() {
    if std::env::var_os("PEFT_GEMM_TEST_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut names: Vec<&str> = Vec::new();
    for_each_kernel(|kernel| names.push(kernel.name()));
    names.push("off");
    for name in names {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "child_uses_the_forced_kernel", "--nocapture"])
            .env("PEFT_GEMM_SKINNY", name)
            .env("PEFT_GEMM_TEST_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {text}");
        assert!(
            text.contains(&format!("skinny kernel: {name}")),
            "{name}: {text}"
        );
        assert!(text.contains("1 passed"), "{name}: {text}");
    }
}

#[test]
fn child_uses_the_forced_kernel() {
    let Ok(name) = std::env::var("PEFT_GEMM_SKINNY") else {
        return;
    };
    if std::env::var_os("PEFT_GEMM_TEST_CHILD").is_none() {
        return;
    }
    let chosen = skinny_kernel().map_or("off", |k| k.name());
    println!("skinny kernel: {chosen}");
    assert_eq!(chosen, name);
    for m in [1, 5, 16] {
        check_one(None, m, 33, 21, (1, 1), true, 2.0, Threads::All);
    }
}
