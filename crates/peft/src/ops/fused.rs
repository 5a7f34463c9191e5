//! Fused CPU kernels for the training hot path, each with an explicit backward.
//!
//! candle's backward pass allocates a zero tensor and adds into it for every node of the graph,
//! and its elementwise ops run one pass over memory per primitive (GELU's backward alone is eight
//! passes plus a scalar `erf`). On a small CPU those passes cost as much as the matrix products,
//! so the ops here do one pass per direction, vectorised (AVX-512 or AVX2 chosen at run time)
//! and split over the cores with rayon. Each falls back to the composed candle version off the
//! CPU or for other dtypes, and is tested against that version (`tests/fused_ops.rs`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::saved::Saved;
use super::BackwardFn;
use crate::Result;

/// Compiles `$body` three times (AVX-512, AVX2 + FMA, baseline) and picks the best the CPU has
/// at run time, so that the loops vectorise without building the whole crate for one CPU.
macro_rules! simd_fn {
    ($vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")]
                unsafe fn v4($($a: $t),*) { inner($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) { inner($($a),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { v4($($a),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// Elements per parallel task: large enough that rayon's overhead is noise, small enough that
/// both cores get work on the smallest activations (`[1024, 384]`).
pub(crate) const CHUNK: usize = 1 << 15;

/// `e^x` for `x <= 88`, branch-free so it vectorises: Cephes' `expf` (range reduction by
/// `ln 2`, degree-6 polynomial), relative error about 2e-7; arguments below -87 give 0.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// `erf(x)` from Numerical Recipes' Chebyshev fit of `erfc` (fractional error below 1.2e-7),
/// branch-free.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_9
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp_f32(poly - z * z);
    (1.0 - erfc).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

simd_fn!(
    fn gelu_fwd_kernel(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
        }
    }
);

simd_fn!(
    fn gelu_bwd_kernel(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    }
);

/// A 32-bit hash of `(seed, index)` (splitmix64's finaliser): counter-based random numbers, so
/// a dropout mask is the same however the work is split and can be redrawn in backward.
#[inline(always)]
pub(crate) fn hash32(seed: u64, index: u64) -> u32 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// The dropout multiplier of element `index`: 0 with probability `threshold / 2^32`, else
/// `scale`.
#[inline(always)]
pub(crate) fn keep(seed: u64, index: u64, threshold: u32, scale: f32) -> f32 {
    if hash32(seed, index) < threshold {
        0.0
    } else {
        scale
    }
}

simd_fn!(
    fn dropout_kernel(x: &[f32], y: &mut [f32], seed: u64, start: u64, threshold: u32, scale: f32) {
        for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            *y = x * keep(seed, start + i as u64, threshold, scale);
        }
    }
);

simd_fn!(
    fn add_dropout_kernel(
        src: &[f32],
        dst: &mut [f32],
        seed: u64,
        start: u64,
        threshold: u32,
        scale: f32,
    ) {
        for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
            *d += s * keep(seed, start + i as u64, threshold, scale);
        }
    }
);

/// `x` times the mask [`dropout_f32`] draws for `seed`, as plain data (an op that keeps the
/// dropped input out of the graph redraws it in its backward).
pub(crate) fn dropout_data(x: &[f32], p: f64, seed: u64) -> Vec<f32> {
    let (threshold, scale) = dropout_params(p);
    // SAFETY: the dropout kernel writes its whole output chunk.
    unsafe {
        par_map(x, move |x, y, start| {
            dropout_kernel(x, y, seed, start as u64, threshold, scale)
        })
    }
}

/// `dst += src` times the mask of `seed` (the backward of a dropout whose output fed `src`).
pub(crate) fn add_dropout(dst: &mut [f32], src: &[f32], p: f64, seed: u64) {
    let (threshold, scale) = dropout_params(p);
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(i, (d, s))| {
            add_dropout_kernel(s, d, seed, (i * CHUNK) as u64, threshold, scale)
        });
}

/// Dropout parameters in integer form: the drop threshold out of 2^32 and the keep scale.
pub(crate) fn dropout_params(p: f64) -> (u32, f32) {
    (
        (p * 4_294_967_296.0).min(u32::MAX as f64) as u32,
        (1.0 / (1.0 - p)) as f32,
    )
}

/// Whether the fused CPU kernels apply to `x`.
pub(crate) fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The data of a contiguous f32 CPU input of the op `what`.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: expected contiguous f32 inputs"),
    }
}

/// Runs `f` on the contiguous f32 data of `t` (CPU).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Ok(f(&v[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("fused op: expected f32 data on the CPU"),
    }
}

/// `f(x chunk, out chunk, chunk start)` over `x`, in parallel.
///
/// # Safety
/// `f` must write the whole output chunk it is given: the output is not cleared first.
pub(crate) unsafe fn par_map(x: &[f32], f: impl Fn(&[f32], &mut [f32], usize) + Sync) -> Vec<f32> {
    // SAFETY: the chunks cover `out`, and `f` writes each chunk whole (the caller's contract).
    let mut out = unsafe { super::buffer::uninit(x.len()) };
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(i, (o, x))| f(x, o, i * CHUNK));
    out
}

/// `f(a chunk, b chunk, out chunk)` over two equally long inputs, in parallel.
///
/// # Safety
/// As for [`par_map`]: `f` must write the whole output chunk.
pub(crate) unsafe fn par_map2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    // SAFETY: as in `par_map`: `f` writes each chunk whole.
    let mut out = unsafe { super::buffer::uninit(a.len()) };
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| f(a, b, o));
    out
}

/// An elementwise op computed in one pass over the (contiguous, f32, CPU) input, with a
/// backward given as a closure. Unlike [`super::with_backward`], the forward runs inside the
/// op, so its output is not copied once more into the graph.
type ForwardFn = dyn Fn(&[f32]) -> candle_core::Result<Vec<f32>> + Send + Sync;

struct MapOp {
    name: &'static str,
    fwd: Box<ForwardFn>,
    bwd: Box<BackwardFn>,
    /// The output's shape where it differs from the input's.
    shape: Option<Shape>,
}

impl CustomOp1 for MapOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("{}: expected contiguous f32 input", self.name)
        };
        let shape = self.shape.clone().unwrap_or_else(|| l.shape().clone());
        Ok((CpuStorage::F32((self.fwd)(&v[start..end])?), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(arg, res, grad)?))
    }
}

/// An op whose output has `shape`, computed from the contiguous f32 input by `fwd`, with the
/// input's gradient from `bwd(x, y, dy)`.
pub(super) fn apply_shaped(
    x: &Tensor,
    name: &'static str,
    shape: Shape,
    fwd: impl Fn(&[f32]) -> candle_core::Result<Vec<f32>> + Send + Sync + 'static,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let op = MapOp {
        name,
        fwd: Box::new(fwd),
        bwd: Box::new(bwd),
        shape: Some(shape),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

fn apply_map(
    x: &Tensor,
    name: &'static str,
    fwd: impl Fn(&[f32]) -> Vec<f32> + Send + Sync + 'static,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let op = MapOp {
        name,
        fwd: Box::new(move |x| Ok(fwd(x))),
        bwd: Box::new(bwd),
        shape: None,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `x * Φ(x)` with the exact (erf) normal CDF, as torch's `gelu` and transformers' `"gelu"`.
/// Vectorised erf and a one-pass closed-form backward, `dy · (Φ(x) + x φ(x))`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::bf16_cpu(x) {
        let y = gelu_erf(&x.to_dtype(candle_core::DType::F32)?)?;
        return Ok(y.to_dtype(candle_core::DType::BF16)?);
    }
    #[cfg(feature = "cuda")]
    if super::cuda::applies(x) {
        return super::cuda::gelu_erf(x);
    }
    if !fast(x) {
        return Ok(x.gelu_erf()?);
    }
    apply_map(
        x,
        "gelu-erf",
        // SAFETY (all three maps): the kernels zip over their whole output chunk.
        |x| unsafe { par_map(x, |x, y, _| gelu_fwd_kernel(x, y)) },
        |x, _y, g| {
            let g = g.contiguous()?;
            let dx = with_f32(x, |xv| {
                with_f32(&g, |gv| unsafe { par_map2(xv, gv, gelu_bwd_kernel) })
            })??;
            Tensor::from_vec(dx, x.shape(), x.device())
        },
    )
}

simd_fn!(
    fn silu_mul_fwd_kernel(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp_f32(-g)) * u;
        }
    }
);

simd_fn!(
    fn silu_mul_bwd_kernel(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + exp_f32(-g[i]));
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
);

/// `silu(gate) * up`, the gated MLP of the Llama family (SwiGLU), as one node: composed, the
/// graph keeps `silu(gate)` alive for the product's backward beside `gate` and `up` (6 MB a
/// layer for SmolLM2 at 8 × 128) and runs four passes each way; here one pass each way and only
/// the two inputs kept. Off the CPU or in other dtypes, the composed ops; bf16 computes in f32
/// and rounds the result (and the gradients) once.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(crate::Error::ShapeMismatch {
            name: "up projection of a gated MLP".into(),
            expected: gate.dims().to_vec(),
            found: up.dims().to_vec(),
        });
    }
    if super::bf16_cpu(gate) && super::bf16_cpu(up) {
        let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        return Ok(silu_mul(&f(gate)?, &f(up)?)?.to_dtype(candle_core::DType::BF16)?);
    }
    if !(fast(gate) && fast(up)) {
        return Ok((gate.silu()? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (
            contiguous_f32(s1, l1, "silu-mul")?,
            contiguous_f32(s2, l2, "silu-mul")?,
        );
        // SAFETY: the kernel writes its whole output chunk.
        let y = unsafe { par_map2(g, u, silu_mul_fwd_kernel) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (dg, du) = with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(&dy, |dy| {
                    // SAFETY: the kernel writes every element of both.
                    let mut dg = unsafe { super::buffer::uninit(g.len()) };
                    let mut du = unsafe { super::buffer::uninit(g.len()) };
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(i, (dg, du))| {
                            let r = i * CHUNK..i * CHUNK + dg.len();
                            silu_mul_bwd_kernel(&g[r.clone()], &u[r.clone()], &dy[r], dg, du)
                        });
                    (dg, du)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// Inverted dropout in one pass; the mask is a hash of `(seed, element index)`, drawn again in
/// backward, so nothing but the seed is kept.
pub(crate) fn dropout_f32(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let (threshold, scale) = dropout_params(p);
    let kernel = move |x: &[f32], y: &mut [f32], start: usize| {
        dropout_kernel(x, y, seed, start as u64, threshold, scale)
    };
    apply_map(
        x,
        "dropout",
        // SAFETY (both maps): the dropout kernel writes its whole output chunk.
        move |x| unsafe { par_map(x, kernel) },
        move |_x, _y, g| {
            let dx = with_f32(g, |gv| unsafe { par_map(gv, kernel) })?;
            Tensor::from_vec(dx, g.shape(), g.device())
        },
    )
}

simd_fn!(
    fn layer_norm_rows(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let n = w.len();
        for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mean = x.iter().sum::<f32>() / n as f32;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        }
    }
);

simd_fn!(
    fn layer_norm_bwd_rows(x: &[f32], g: &[f32], dx: &mut [f32], w: &[f32], eps: f32) {
        let n = w.len();
        for ((x, g), dx) in x
            .chunks_exact(n)
            .zip(g.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n))
        {
            let mean = x.iter().sum::<f32>() / n as f32;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            // dxhat = g w; dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
            let (mut m1, mut m2) = (0f32, 0f32);
            for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                let d = g * w;
                m1 += d;
                m2 += d * (x - mean) * rstd;
            }
            let (m1, m2) = (m1 / n as f32, m2 / n as f32);
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = (g * w - m1 - (x - mean) * rstd * m2) * rstd;
            }
        }
    }
);

simd_fn!(
    fn add_kernel(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a + b;
        }
    }
);

/// `layer_norm(h + r)` over the last dimension with frozen affine parameters, as one node: the
/// sum is kept by the op for the norm's backward instead of being a node of its own (which
/// candle's backward would clear and add a gradient for), and both inputs get the norm's input
/// gradient. The residual-and-norm step of every post-norm transformer block.
pub(crate) fn add_layer_norm_frozen(
    h: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let n = w.elem_count();
    let bias = match b {
        Some(b) => b.flatten_all()?.to_vec1()?,
        None => vec![0.0; n],
    };
    let op = AddLayerNorm {
        w: w.flatten_all()?.to_vec1()?,
        b: bias,
        eps: eps as f32,
        sum: Saved::empty(),
    };
    Ok(h.contiguous()?.apply_op2(&r.contiguous()?, op)?)
}

struct AddLayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
    /// `h + r`, kept by the forward for the backward.
    sum: Saved<Vec<f32>>,
}

impl CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, r) = (
            contiguous_f32(s1, l1, "add-layer-norm")?,
            contiguous_f32(s2, l2, "add-layer-norm")?,
        );
        let n = self.w.len();
        if l1.shape() != l2.shape() || l1.shape().dims().last() != Some(&n) {
            candle_core::bail!(
                "add-layer-norm: inputs {:?} and {:?} for a norm over {n}",
                l1.shape(),
                l2.shape()
            )
        }
        // SAFETY: both kernels write every element of their outputs.
        let sum = unsafe { par_map2(h, r, add_kernel) };
        let mut y = unsafe { super::buffer::uninit(sum.len()) };
        let step = row_chunk(n);
        y.par_chunks_mut(step)
            .zip(sum.par_chunks(step))
            .for_each(|(y, x)| layer_norm_rows(x, y, &self.w, &self.b, self.eps));
        self.sum.put("add-layer-norm", sum)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let step = row_chunk(self.w.len());
        let g = grad.contiguous()?;
        let dx = self.sum.with("add-layer-norm", |x| {
            with_f32(&g, |gv| {
                // SAFETY: the kernel writes every element of every row.
                let mut dx = unsafe { super::buffer::uninit(x.len()) };
                dx.par_chunks_mut(step)
                    .zip(x.par_chunks(step).zip(gv.par_chunks(step)))
                    .for_each(|(d, (x, g))| layer_norm_bwd_rows(x, g, d, &self.w, self.eps));
                dx
            })
        })??;
        let dx = Tensor::from_vec(dx, h.shape(), h.device())?;
        Ok((Some(dx.clone()), Some(dx)))
    }
}

/// Rows of `n` per parallel task (whole rows, about [`CHUNK`] elements).
fn row_chunk(n: usize) -> usize {
    (CHUNK / n).max(1) * n
}

/// LayerNorm over the last dimension with frozen affine parameters: one pass forward, one pass
/// backward for `dx` (mean and variance recomputed per row rather than stored).
pub(crate) fn layer_norm_frozen(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let n = w.elem_count();
    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let bv: Vec<f32> = match b {
        Some(b) => b.flatten_all()?.to_vec1()?,
        None => vec![0.0; n],
    };
    let eps = eps as f32;
    let step = row_chunk(n);
    let w_bwd = wv.clone();
    apply_map(
        x,
        "layer-norm",
        move |x| {
            // SAFETY: the kernel writes every element of every row.
            let mut y = unsafe { super::buffer::uninit(x.len()) };
            y.par_chunks_mut(step)
                .zip(x.par_chunks(step))
                .for_each(|(y, x)| layer_norm_rows(x, y, &wv, &bv, eps));
            y
        },
        move |x, _y, g| {
            let g = g.contiguous()?;
            let dx = with_f32(x, |xv| {
                with_f32(&g, |gv| {
                    // SAFETY: the kernel writes every element of every row.
                    let mut dx = unsafe { super::buffer::uninit(xv.len()) };
                    dx.par_chunks_mut(step)
                        .zip(xv.par_chunks(step).zip(gv.par_chunks(step)))
                        .for_each(|(d, (x, g))| layer_norm_bwd_rows(x, g, d, &w_bwd, eps));
                    dx
                })
            })??;
            Tensor::from_vec(dx, x.shape(), x.device())
        },
    )
}
