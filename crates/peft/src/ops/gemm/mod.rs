//! The one place a training step's matrix products are computed on the CPU, so that a faster
//! kernel, chosen at run time from the CPU's features, applies to every product at once.
//!
//! - f32 × f32 goes through the `gemm` crate (runtime-dispatched AVX-512 / AVX2 kernels).
//! - bf16 × bf16 accumulates in f32, as PyTorch's autocast does. candle has no bf16 kernel on
//!   the CPU: it widens both operands to f32 on every call, so bf16 training was slower than
//!   f32. Here, on a CPU with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids), a
//!   `vdpbf16ps` micro-kernel multiplies the bf16 data directly (two multiply-adds per f32 lane
//!   per instruction, twice the f32 FMA rate); elsewhere both operands are widened to f32 and
//!   the f32 path runs, which costs one conversion pass over each operand.
//!
//! - A few rows times a transposed row-major weight (`x · Wᵀ` with m ≤ [`SKINNY_MAX_ROWS`], every
//!   decoding step's products) goes through [`skinny`]'s kernels instead, which stream the weight
//!   once without packing it (AVX-512 / AVX2 + FMA / portable, chosen at run time).
//!
//! - On a CPU with AMX-BF16 (Sapphire Rapids and later Xeons), bf16 products run on AMX tiles
//!   instead ([`amx`]): there `vdpbf16ps` only matches the f32 FMA rate, the tiles do ~16 times
//!   as many multiply-adds per instruction.
//!
//! `PEFT_GEMM=f32`, `bf16-avx512` or `bf16-amx` forces the bf16 backend (benchmarks, tests), and
//! `PEFT_GEMM_SKINNY=avx512|avx2|portable|off` the small-m kernel (`off`: the `gemm` crate for
//! every shape); an unavailable choice falls back to the best available one with a warning.

use half::bf16;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod skinny;

pub use skinny::{Kernel as SkinnyKernel, MAX_ROWS as SKINNY_MAX_ROWS};

/// A way to compute bf16 × bf16 → f32 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Widen both operands to f32 and use the `gemm` crate: available everywhere.
    F32,
    /// `vdpbf16ps` micro-kernels on packed pair-interleaved panels (x86-64 with AVX512-BF16).
    Bf16Avx512,
    /// `tdpbf16ps` on AMX tiles (Sapphire Rapids and later Xeons, Linux).
    Bf16Amx,
}

impl Backend {
    /// Every backend this build knows, available on this CPU or not.
    pub const ALL: [Backend; 3] = [Backend::F32, Backend::Bf16Avx512, Backend::Bf16Amx];

    /// The name `PEFT_GEMM` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Backend::F32 => "f32",
            Backend::Bf16Avx512 => "bf16-avx512",
            Backend::Bf16Amx => "bf16-amx",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Why this backend cannot run on this CPU, or `None` when it can.
    pub fn unavailable_reason(self) -> Option<&'static str> {
        match self {
            Backend::F32 => None,
            Backend::Bf16Avx512 => {
                #[cfg(target_arch = "x86_64")]
                {
                    if avx512bf16::detected() {
                        None
                    } else {
                        Some("the CPU lacks avx512bf16 or avx512f")
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    Some("not an x86-64 CPU")
                }
            }
            Backend::Bf16Amx => {
                #[cfg(target_arch = "x86_64")]
                {
                    if amx::detected() {
                        None
                    } else {
                        Some("the CPU lacks amx-bf16, or the OS did not grant tile permission")
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    Some("not an x86-64 CPU")
                }
            }
        }
    }

    pub fn is_available(self) -> bool {
        self.unavailable_reason().is_none()
    }
}

/// Whether bf16 products run faster than f32 ones here: true when a native bf16 kernel serves
/// them. Without one, bf16 activations only add conversions (callers may prefer f32 then).
pub fn bf16_is_native() -> bool {
    bf16_backend() != Backend::F32
}

/// The backend bf16 products use: `PEFT_GEMM` when it names an available backend, else the
/// fastest available one. Chosen once per process.
pub fn bf16_backend() -> Backend {
    static CHOICE: OnceLock<Backend> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let best = [Backend::Bf16Amx, Backend::Bf16Avx512]
            .into_iter()
            .find(|b| b.is_available())
            .unwrap_or(Backend::F32);
        match std::env::var("PEFT_GEMM") {
            Ok(name) => match Backend::from_name(&name) {
                Some(b) => match b.unavailable_reason() {
                    None => b,
                    Some(why) => {
                        tracing::warn!("PEFT_GEMM={name}: {why}; using {}", best.name());
                        best
                    }
                },
                None => {
                    tracing::warn!(
                        "PEFT_GEMM={name} is not a backend (f32, bf16-avx512, bf16-amx); using {}",
                        best.name()
                    );
                    best
                }
            },
            Err(_) => best,
        }
    })
}

/// The small-m kernel f32 products with few rows use: `PEFT_GEMM_SKINNY` when it names an
/// available kernel (`off`: none, the `gemm` crate serves every shape), else the fastest
/// available one. Chosen once per process.
pub fn skinny_kernel() -> Option<SkinnyKernel> {
    static CHOICE: OnceLock<Option<SkinnyKernel>> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let best = SkinnyKernel::best();
        match std::env::var("PEFT_GEMM_SKINNY") {
            Ok(name) if name == "off" => None,
            Ok(name) => match SkinnyKernel::from_name(&name) {
                Some(k) => match k.unavailable_reason() {
                    None => Some(k),
                    Some(why) => {
                        tracing::warn!("PEFT_GEMM_SKINNY={name}: {why}; using {}", best.name());
                        Some(best)
                    }
                },
                None => {
                    tracing::warn!(
                        "PEFT_GEMM_SKINNY={name} is not a kernel (avx512, avx2, portable, off); \
                         using {}",
                        best.name()
                    );
                    Some(best)
                }
            },
            Err(_) => Some(best),
        }
    })
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread only (the caller already runs one product per rayon task).
    One,
    /// As many as candle uses (`RAYON_NUM_THREADS`, else the cores), on rayon's global pool,
    /// the pool candle's own kernels and the fused ops share, so nothing is oversubscribed.
    All,
}

impl Threads {
    pub(crate) fn count(self) -> usize {
        match self {
            Threads::One => 1,
            Threads::All => crate::threads::num_threads(),
        }
    }
}

/// A read-only strided matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A view of `data`; errors when an element would fall outside it.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> candle_core::Result<Self> {
        if rows > 0 && cols > 0 && (rows - 1) * rs + (cols - 1) * cs >= data.len() {
            candle_core::bail!(
                "gemm: a {rows}x{cols} view with strides ({rs}, {cs}) reaches past {} elements",
                data.len()
            );
        }
        Ok(Self {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A row-major `rows × cols` view.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> candle_core::Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }
}

/// A writable row-major f32 matrix whose rows are `rs` apart (`rs >= cols`).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        rs: usize,
    ) -> candle_core::Result<Self> {
        if rs < cols || (rows > 0 && cols > 0 && (rows - 1) * rs + cols > data.len()) {
            candle_core::bail!(
                "gemm: a {rows}x{cols} output with row stride {rs} does not fit {} elements",
                data.len()
            );
        }
        Ok(Self {
            data,
            rows,
            cols,
            rs,
        })
    }

    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> candle_core::Result<Self> {
        Self::new(data, rows, cols, cols)
    }
}

fn check_shapes<A, B>(dst: &MatMut, lhs: &MatRef<A>, rhs: &MatRef<B>) -> candle_core::Result<()> {
    if lhs.cols != rhs.rows || dst.rows != lhs.rows || dst.cols != rhs.cols {
        candle_core::bail!(
            "gemm: cannot multiply {}x{} by {}x{} into {}x{}",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols,
            dst.rows,
            dst.cols
        );
    }
    Ok(())
}

/// `dst = alpha · lhs · rhs (+ dst when accumulate)`, in f32.
pub fn matmul_f32(
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<f32>,
    rhs: MatRef<f32>,
    alpha: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    check_shapes(&dst, &lhs, &rhs)?;
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            zero_rows(dst);
        }
        return Ok(());
    }
    if let Some(kernel) = skinny_kernel() {
        if skinny::fits(&lhs, &rhs) {
            skinny::matmul(kernel, dst, accumulate, lhs, rhs, alpha, threads);
            return Ok(());
        }
    }
    let par = match threads.count() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: `MatRef::new` and `MatMut::new` checked that every element of the three views
    // lies inside its slice, and `check_shapes` that the views agree: the product reads and
    // writes nothing else. `dst` is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    };
    Ok(())
}

/// [`matmul_f32`] on a given small-m kernel, for any m: `lhs` must have contiguous rows and
/// `rhs` be the transpose of a row-major weight (`MatRef::row_major(w, n, k).t()`). Errors when
/// this CPU cannot run the kernel or the layout does not fit.
pub fn matmul_skinny_with(
    kernel: SkinnyKernel,
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<f32>,
    rhs: MatRef<f32>,
    alpha: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    check_shapes(&dst, &lhs, &rhs)?;
    if let Some(why) = kernel.unavailable_reason() {
        candle_core::bail!("skinny kernel {}: {why}", kernel.name());
    }
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let contiguous = k == 1 || (lhs.cs == 1 && rhs.rs == 1);
    if !contiguous {
        candle_core::bail!(
            "skinny kernel: needs contiguous lhs rows and a transposed row-major rhs, got \
             strides ({}, {}) and ({}, {})",
            lhs.rs,
            lhs.cs,
            rhs.rs,
            rhs.cs
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            zero_rows(dst);
        }
        return Ok(());
    }
    skinny::matmul(kernel, dst, accumulate, lhs, rhs, alpha, threads);
    Ok(())
}

/// `dst = alpha · lhs · rhs (+ dst when accumulate)` for bf16 operands, accumulated in f32, on
/// the backend [`bf16_backend`] chose.
pub fn matmul_bf16(
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<bf16>,
    rhs: MatRef<bf16>,
    alpha: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    matmul_bf16_with(bf16_backend(), dst, accumulate, lhs, rhs, alpha, threads)
}

/// [`matmul_bf16`] on a given backend; errors when this CPU cannot run it.
pub fn matmul_bf16_with(
    backend: Backend,
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<bf16>,
    rhs: MatRef<bf16>,
    alpha: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    check_shapes(&dst, &lhs, &rhs)?;
    if let Some(why) = backend.unavailable_reason() {
        candle_core::bail!("gemm backend {}: {why}", backend.name());
    }
    if dst.rows == 0 || dst.cols == 0 {
        return Ok(());
    }
    if lhs.cols == 0 {
        if !accumulate {
            zero_rows(dst);
        }
        return Ok(());
    }
    let (n, t) = (rhs.cols, threads.count());
    match backend {
        Backend::F32 => {
            let (a, b) = (widen(&lhs), widen(&rhs));
            matmul_f32(
                dst,
                accumulate,
                MatRef::row_major(&a, lhs.rows, lhs.cols)?,
                MatRef::row_major(&b, rhs.rows, rhs.cols)?,
                alpha,
                threads,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Bf16Avx512 => {
            let packed = avx512bf16::pack(&rhs, t);
            avx512bf16::matmul(dst, accumulate, lhs, &packed, n, alpha, t);
            Ok(())
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Bf16Amx => {
            let packed = amx::pack(&rhs, t);
            amx::matmul(dst, accumulate, lhs, &packed, n, alpha, t);
            Ok(())
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("unavailable_reason rejects it off x86-64 ({n}, {t})"),
    }
}

/// `f(r0, rows, c)` over blocks of the output's rows, `c` holding rows `r0 .. r0 + rows` (rows
/// `dst.rs` apart): a few blocks per thread, each a multiple of `mr` rows, as rayon tasks when
/// there is more than one thread, so that a busy core is evened out. The bf16 kernels' driver.
#[cfg(target_arch = "x86_64")]
fn for_row_blocks(
    dst: MatMut,
    mr: usize,
    threads: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let m = dst.rows;
    let tasks = if threads > 1 { 4 * threads } else { 1 };
    let rows_per = m.div_ceil(tasks).div_ceil(mr) * mr;
    let blocks = m.div_ceil(rows_per);
    let run = |(t, c): (usize, &mut [f32])| {
        let r0 = t * rows_per;
        f(r0, rows_per.min(m - r0), c)
    };
    let len = rows_per * dst.rs;
    if tasks > 1 && blocks > 1 {
        dst.data
            .par_chunks_mut(len)
            .take(blocks)
            .enumerate()
            .for_each(run);
    } else {
        dst.data
            .chunks_mut(len)
            .take(blocks)
            .enumerate()
            .for_each(run);
    }
}

/// The view's elements as a row-major f32 matrix.
fn widen(m: &MatRef<bf16>) -> Vec<f32> {
    if m.cs == 1 && m.rs == m.cols {
        return super::bf16::widen(&m.data[..m.rows * m.cols]);
    }
    let mut out = Vec::with_capacity(m.rows * m.cols);
    if m.cs == 1 {
        for i in 0..m.rows {
            let row = &m.data[i * m.rs..i * m.rs + m.cols];
            out.extend(row.iter().map(|v| v.to_f32()));
        }
    } else {
        for i in 0..m.rows {
            out.extend((0..m.cols).map(|j| m.at(i, j).to_f32()));
        }
    }
    out
}

fn zero_rows(dst: MatMut) {
    for i in 0..dst.rows {
        dst.data[i * dst.rs..i * dst.rs + dst.cols].fill(0.0);
    }
}
