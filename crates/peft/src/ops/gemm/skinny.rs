//! `x · Wᵀ` for a handful of rows `x` (`m × k`, m ≤ [`MAX_ROWS`]) and a weight stored row-major
//! `[n, k]`: `y[i][j] = Σ_p x[i][p] · W[j][p]`, the product of every decoding step (batch × hidden
//! times each frozen projection and the `[vocab, hidden]` lm_head).
//!
//! That product is memory-bound: each weight element is used m times, so what counts is reading
//! `W` once, at full bandwidth, with the m rows of `x` reused from registers and L1. The `gemm`
//! crate packs `W` into panels first (one extra read and write of the whole weight per call) and
//! its small-m path is a poor fit for a transposed right-hand side; here the weight rows are read
//! in place: a block of `NR` weight rows (a few KiB, L1-resident) meets `MR` rows of `x` at a
//! time in an `MR × NR` tile of vector accumulators, each the dot product of two contiguous rows,
//! reduced horizontally once at the end. Kernels: AVX-512 (16 lanes, masked k tail), AVX2 + FMA
//! (8 lanes, masked k tail), and a portable one, chosen at run time.
//!
//! Threads split the weight rows (output columns) into chunks on rayon's global pool, each at
//! least [`TASK_MIN_ELEMS`] weight elements (so a small product stays on the calling thread:
//! a hand-off costs more than streaming a few hundred KiB). Each task fills its own `m × chunk` buffer, then
//! the results are scattered into `dst` (with `alpha` and accumulation) on the calling thread:
//! m × n stores, negligible next to the n × k weight reads, and no shared mutable output.

use rayon::prelude::*;

use super::{MatMut, MatRef, Threads};

/// The largest m `matmul_f32` sends here. Above it the `gemm` crate's packed micro-kernels
/// win (measured with `examples/gemm_bench.rs`; decision 0010).
pub const MAX_ROWS: usize = 32;

/// The smallest m `matmul_f32` sends here: a single row is a matrix-vector product, which the
/// `gemm` crate's own gemv path streams as fast or faster in a whole decoding run (decision
/// 0010), so it keeps it.
pub const MIN_ROWS: usize = 2;

/// Weight elements each parallel task streams at least (512 KiB of f32): below that, a rayon
/// hand-off costs about what it saves, and on a busy machine much more.
const TASK_MIN_ELEMS: usize = 128 * 1024;

/// A small-m kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 16-lane f32 FMA (x86-64 with AVX-512F).
    Avx512,
    /// 8-lane f32 FMA (x86-64 with AVX2 and FMA).
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl Kernel {
    /// Every kernel this build knows, available on this CPU or not, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable];

    /// The name `PEFT_GEMM_SKINNY` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Why this kernel cannot run on this CPU, or `None` when it can.
    pub fn unavailable_reason(self) -> Option<&'static str> {
        match self {
            Kernel::Portable => None,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                (!std::is_x86_feature_detected!("avx512f")).then_some("the CPU lacks avx512f")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => (!(std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")))
            .then_some("the CPU lacks avx2 or fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => Some("not an x86-64 CPU"),
        }
    }

    pub fn is_available(self) -> bool {
        self.unavailable_reason().is_none()
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Portable)
    }
}

/// Whether `lhs · rhs` has the shape served here: `lhs` rows contiguous, `rhs` the transpose of
/// a row-major weight (consecutive k contiguous), and few rows.
pub(super) fn fits(lhs: &MatRef<f32>, rhs: &MatRef<f32>) -> bool {
    (MIN_ROWS..=MAX_ROWS).contains(&lhs.rows)
        && (lhs.cs == 1 || lhs.cols == 1)
        && (rhs.rs == 1 || rhs.rows == 1)
}

/// `dst = alpha · lhs · rhs (+ dst when accumulate)`. The caller checked the shapes agree, that
/// m, n, k > 0, that [`fits`] holds (any m) and that `kernel` is available.
pub(super) fn matmul(
    kernel: Kernel,
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<f32>,
    rhs: MatRef<f32>,
    alpha: f32,
    threads: Threads,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    // Row i of x starts at i · rs, row j of W (column j of rhs) at j · cs; along a row the
    // elements are contiguous (or there is one, k = 1).
    let xs = Rows::new(lhs.data, 0, m, lhs.rs, k);
    // Two tasks per thread at most, so that a core taken by another process is evened out.
    let tasks = (2 * threads.count()).min(n * k / TASK_MIN_ELEMS).max(1);
    let chunk = n.div_ceil(tasks).next_multiple_of(4);
    let run = |j0: usize| -> Vec<f32> {
        let j1 = (j0 + chunk).min(n);
        let ws = Rows::new(rhs.data, j0, j1 - j0, rhs.cs, k);
        let mut out = vec![0f32; m * (j1 - j0)];
        product(kernel, &xs, &ws, &mut out);
        out
    };
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    let blocks: Vec<Vec<f32>> = if starts.len() > 1 {
        starts.par_iter().map(|&j0| run(j0)).collect()
    } else {
        starts.iter().map(|&j0| run(j0)).collect()
    };
    for (&j0, block) in starts.iter().zip(&blocks) {
        let width = block.len() / m;
        for (i, src) in block.chunks_exact(width).enumerate() {
            let row = &mut dst.data[i * dst.rs + j0..i * dst.rs + j0 + width];
            if accumulate {
                row.iter_mut().zip(src).for_each(|(d, s)| *d += alpha * s);
            } else if alpha == 1.0 {
                row.copy_from_slice(src);
            } else {
                row.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
            }
        }
    }
}

/// `count` rows of `k` contiguous elements, `stride` apart in `data`, starting at row `first`
/// (all inside `data`: checked when made).
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    data: &'a [f32],
    count: usize,
    stride: usize,
    k: usize,
}

impl<'a> Rows<'a> {
    /// Rows `first..first + count` of a view whose rows are `stride` apart.
    fn new(data: &'a [f32], first: usize, count: usize, stride: usize, k: usize) -> Self {
        let start = first * stride;
        let end = start + (count - 1) * stride + k;
        Self {
            data: &data[start..end],
            count,
            stride,
            k,
        }
    }

    /// Row `i`, exactly k long.
    #[inline(always)]
    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.k]
    }
}

/// `out[i · n + j] = xs[i] · ws[j]` (`n = ws.count`).
fn product(kernel: Kernel, xs: &Rows, ws: &Rows, out: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            assert!(
                Kernel::Avx512.is_available(),
                "avx512 kernel on a CPU without it"
            );
            // SAFETY: avx512f was detected just above.
            unsafe { x86::product_avx512(xs, ws, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            assert!(
                Kernel::Avx2.is_available(),
                "avx2 kernel on a CPU without it"
            );
            // SAFETY: avx2 and fma were detected just above.
            unsafe { x86::product_avx2(xs, ws, out) }
        }
        _ => portable(xs, ws, out),
    }
}

/// Any CPU: eight independent partial sums per dot product, which the compiler vectorises.
fn portable(xs: &Rows, ws: &Rows, out: &mut [f32]) {
    let n = ws.count;
    for i in 0..xs.count {
        let x = xs.row(i);
        for j in 0..n {
            let w = ws.row(j);
            let mut acc = [0f32; 8];
            let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
            let tail: f32 = xc
                .remainder()
                .iter()
                .zip(wc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in xc.zip(wc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            out[i * n + j] = acc.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // indexed loops over const-size register tiles
mod x86 {
    //! The vector kernels. Every load reads `row[p..p + LANES]` with `p + LANES <= k` or, for the
    //! tail, a masked load of `row[p..k]` (masked-off lanes are not accessed), and every row
    //! slice is exactly k long (`Rows::row`): no access leaves its slice.

    use std::arch::x86_64::*;

    use super::Rows;

    /// Tile sizes: `MR × NR` accumulators plus NR weight vectors and one x vector must fit the
    /// register file (32 zmm; 16 ymm).
    const MR512: usize = 4;
    const NR512: usize = 4;
    const MR256: usize = 3;
    const NR256: usize = 3;

    macro_rules! entry {
        ($name:ident, $tile:ident, $feat:literal, $mr:expr, $nr:expr) => {
            /// `out[i · n + j] = xs[i] · ws[j]`.
            ///
            /// # Safety
            /// The CPU must have the features this function is compiled for.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(xs: &Rows, ws: &Rows, out: &mut [f32]) {
                let (m, n) = (xs.count, ws.count);
                assert_eq!(out.len(), m * n);
                // Weight blocks outside, row groups inside: the block stays in L1 while every
                // row group passes over it, so the weight is read from memory once.
                let mut j = 0;
                while j < n {
                    let nr = $nr.min(n - j);
                    let mut i = 0;
                    while i < m {
                        let mr = $mr.min(m - i);
                        dispatch!($tile, mr, nr, xs, ws, &mut *out, i, j, n);
                        i += mr;
                    }
                    j += nr;
                }
            }
        };
    }

    /// Calls the tile instance for the (runtime) `mr × nr` with constant sizes.
    macro_rules! dispatch {
        ($tile:ident, $mr:expr, $nr:expr, $xs:expr, $ws:expr, $out:expr, $i:expr, $j:expr, $n:expr) => {{
            let (xs, ws, out, i, j, n) = ($xs, $ws, $out, $i, $j, $n);
            macro_rules! go {
                ($a:literal, $b:literal) => {{
                    let r = $tile::<$a, $b>(xs, i, ws, j);
                    for (a, row) in r.iter().enumerate() {
                        out[(i + a) * n + j..(i + a) * n + j + $b].copy_from_slice(row);
                    }
                }};
            }
            match ($mr, $nr) {
                (4, 4) => go!(4, 4),
                (4, 3) => go!(4, 3),
                (4, 2) => go!(4, 2),
                (4, 1) => go!(4, 1),
                (3, 4) => go!(3, 4),
                (3, 3) => go!(3, 3),
                (3, 2) => go!(3, 2),
                (3, 1) => go!(3, 1),
                (2, 4) => go!(2, 4),
                (2, 3) => go!(2, 3),
                (2, 2) => go!(2, 2),
                (2, 1) => go!(2, 1),
                (1, 4) => go!(1, 4),
                (1, 3) => go!(1, 3),
                (1, 2) => go!(1, 2),
                _ => go!(1, 1),
            }
        }};
    }

    entry!(product_avx512, tile512, "avx512f", MR512, NR512);
    entry!(product_avx2, tile256, "avx2,fma", MR256, NR256);

    /// The `MR × NR` dot products of `xs[..MR]` with `ws[..NR]`.
    #[target_feature(enable = "avx512f")]
    fn tile512<const MR: usize, const NR: usize>(
        xs: &Rows,
        i0: usize,
        ws: &Rows,
        j0: usize,
    ) -> [[f32; NR]; MR] {
        let k = xs.k;
        debug_assert_eq!(k, ws.k);
        let mut x = [std::ptr::null::<f32>(); MR];
        for i in 0..MR {
            x[i] = xs.row(i0 + i).as_ptr();
        }
        let mut w = [std::ptr::null::<f32>(); NR];
        for j in 0..NR {
            w[j] = ws.row(j0 + j).as_ptr();
        }
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut p = 0;
        while p + 16 <= k {
            // SAFETY: p + 16 <= k and every row is k long.
            unsafe {
                let mut wv = [_mm512_setzero_ps(); NR];
                for j in 0..NR {
                    wv[j] = _mm512_loadu_ps(w[j].add(p));
                }
                for i in 0..MR {
                    let xv = _mm512_loadu_ps(x[i].add(p));
                    for j in 0..NR {
                        acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }
            p += 16;
        }
        if p < k {
            let mask: __mmask16 = (1u16 << (k - p)) - 1;
            // SAFETY: p < k; the mask enables lanes p..k only, inside every row.
            unsafe {
                let mut wv = [_mm512_setzero_ps(); NR];
                for j in 0..NR {
                    wv[j] = _mm512_maskz_loadu_ps(mask, w[j].add(p));
                }
                for i in 0..MR {
                    let xv = _mm512_maskz_loadu_ps(mask, x[i].add(p));
                    for j in 0..NR {
                        acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; NR]; MR];
        for i in 0..MR {
            for j in 0..NR {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        out
    }

    /// The `MR × NR` dot products of `xs[..MR]` with `ws[..NR]`.
    #[target_feature(enable = "avx2,fma")]
    fn tile256<const MR: usize, const NR: usize>(
        xs: &Rows,
        i0: usize,
        ws: &Rows,
        j0: usize,
    ) -> [[f32; NR]; MR] {
        let k = xs.k;
        debug_assert_eq!(k, ws.k);
        let mut x = [std::ptr::null::<f32>(); MR];
        for i in 0..MR {
            x[i] = xs.row(i0 + i).as_ptr();
        }
        let mut w = [std::ptr::null::<f32>(); NR];
        for j in 0..NR {
            w[j] = ws.row(j0 + j).as_ptr();
        }
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut p = 0;
        while p + 8 <= k {
            // SAFETY: p + 8 <= k and every row is k long.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); NR];
                for j in 0..NR {
                    wv[j] = _mm256_loadu_ps(w[j].add(p));
                }
                for i in 0..MR {
                    let xv = _mm256_loadu_ps(x[i].add(p));
                    for j in 0..NR {
                        acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }
            p += 8;
        }
        if p < k {
            let left = (k - p) as i32;
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(left),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            // SAFETY: p < k; the mask enables lanes p..k only, inside every row.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); NR];
                for j in 0..NR {
                    wv[j] = _mm256_maskload_ps(w[j].add(p), mask);
                }
                for i in 0..MR {
                    let xv = _mm256_maskload_ps(x[i].add(p), mask);
                    for j in 0..NR {
                        acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; NR]; MR];
        for i in 0..MR {
            for j in 0..NR {
                out[i][j] = hsum256(acc[i][j]);
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}
