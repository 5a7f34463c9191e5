//! `x · deq(W)ᵀ` for a frozen quantized weight, never expanding the whole layer: the weight is
//! dequantized a band of output rows at a time into a small f32 buffer that the product reads
//! while it is still in cache. The backward is the same walk, `dx = dy · deq(W)`, and there is
//! no weight gradient (a quantized base weight is never trained).
//!
//! GGUF blocks are multiplied as they are for a few rows of Q4_0 … Q8_0 (our kernels,
//! [`ggml_dot`]: generation's decode steps) and for batches of the types candle has SIMD dot
//! products for (candle's quantized matmul, what `QMatMul` runs, so outputs match candle bit for
//! bit); other batches take the banded walk forward too (see
//! [`GgmlWeight::uses_candle_kernel`]), and every backward does.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::bf16::narrow;
use super::fused::{apply_shaped, fast, with_f32};
use super::gemm::{bf16_is_native, matmul_bf16, MatMut, MatRef, Threads};
use crate::quant::{ggml_dot, GgmlWeight, QuantWeight};
use crate::{Error, Result};

/// Output rows dequantized per band: 64 rows of a 4096-wide layer are 1 MiB of f32.
const BAND_ELEMS: usize = 1 << 18;

fn band_rows(cols: usize) -> usize {
    (BAND_ELEMS / cols.max(1)).clamp(1, 256)
}

fn parallelism() -> gemm::Parallelism {
    let threads = crate::threads::num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m × n] (+)= lhs[m × k] · rhs[k × n]`, every operand row-major with the given row strides,
/// `rhs` optionally read transposed (stored `[n, k]`).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_transposed: bool,
    accumulate: bool,
) {
    let (rhs_rs, rhs_cs) = if rhs_transposed { (1, k) } else { (n, 1) };
    assert!(dst.len() >= (m - 1) * dst_rs + n && lhs.len() >= (m - 1) * lhs_rs + k);
    assert!(rhs.len() >= k * n);
    // SAFETY: the asserts above bound every index the product touches.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// Whether a 4-bit layer's products run in bf16: its config asks for bf16 compute
/// (`bnb_4bit_compute_dtype`, as bitsandbytes' `Linear4bit` does) and this CPU has bf16 matrix
/// instructions; elsewhere they stay f32, which is both faster and more accurate there.
fn bf16_products(w: &QuantWeight) -> bool {
    w.compute_dtype() == Some(DType::BF16) && bf16_is_native()
}

/// `y = x · deq(w)ᵀ (+ bias)` over `x`'s last dimension, with a backward for `x`.
pub fn quant_linear(x: &Tensor, w: &QuantWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims();
    let mut out_dims = x.dims().to_vec();
    if out_dims.last() != Some(&in_dim) {
        return Err(Error::ShapeMismatch {
            name: "input of a quantized linear layer".into(),
            expected: vec![in_dim],
            found: out_dims,
        });
    }
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    let rows = x.elem_count() / in_dim.max(1);
    let few_rows = |g: &GgmlWeight| rows <= ggml_dot::MAX_ROWS && ggml_dot::supports(g.dtype());
    if let QuantWeight::Ggml(g) = w {
        if !(fast(x) && few_rows(g))
            && g.uses_candle_kernel()
            && x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        {
            return ggml_linear(x, g, bias, out_dims);
        }
    }
    if !fast(x) || bias.is_some_and(|b| !fast(b)) {
        // Another device or dtype: the dense weight, once per call.
        let dense = w.dequantize(x.device())?.to_dtype(x.dtype())?;
        let bias = bias.map(|b| b.to_dtype(x.dtype())).transpose()?;
        let y = super::frozen_linear_bias(&x.reshape(((), in_dim))?, &dense, bias.as_ref(), false)?;
        return Ok(y.reshape(out_dims)?);
    }
    let bias: Option<Vec<f32>> = match bias {
        Some(b) => Some(b.flatten_all()?.to_vec1()?),
        None => None,
    };
    let wf = w.clone();
    let fwd = move |x: &[f32]| -> candle_core::Result<Vec<f32>> {
        let rows = x.len() / in_dim;
        // SAFETY: every row is the bias (copied below) or written whole by the product, which
        // then does not accumulate (the banded product's bands cover every column).
        let mut y = unsafe { super::buffer::uninit(rows * out_dim) };
        if rows == 0 {
            return Ok(y);
        }
        if let Some(b) = &bias {
            for row in y.chunks_exact_mut(out_dim) {
                row.copy_from_slice(b);
            }
        }
        forward_into(&wf, x, &mut y, bias.is_some())?;
        Ok(y)
    };
    let wb = w.clone();
    let bwd = move |x: &Tensor, _y: &Tensor, g: &Tensor| -> candle_core::Result<Tensor> {
        input_grad(&wb, x, g)
    };
    apply_shaped(x, "quant-linear", Shape::from(out_dims), fwd, bwd)
}

/// Whether [`forward_into`] computes what [`quant_linear`] does for `rows` rows: everything but
/// the batches that candle's own GGUF kernel multiplies.
pub(super) fn slices_apply(w: &QuantWeight, rows: usize) -> bool {
    match w {
        QuantWeight::Ggml(g) => {
            (rows <= ggml_dot::MAX_ROWS && ggml_dot::supports(g.dtype())) || !g.uses_candle_kernel()
        }
        _ => true,
    }
}

/// `y (+)= x · deq(w)ᵀ` for row-major `x` (`rows × in`) into `y` (`rows × out`): GGUF blocks
/// multiplied as they are for a few rows, the banded walk otherwise.
pub(super) fn forward_into(
    w: &QuantWeight,
    x: &[f32],
    y: &mut [f32],
    accumulate: bool,
) -> candle_core::Result<()> {
    if let QuantWeight::Ggml(g) = w {
        let rows = x.len() / w.dims().1.max(1);
        if rows <= ggml_dot::MAX_ROWS && ggml_dot::supports(g.dtype()) {
            return ggml_dot::matmul(g, x, y, accumulate)
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
    }
    banded_forward_into(w, x, y, accumulate)
}

/// `y (+)= x · deq(w)ᵀ` for row-major `x` (`rows × in`) into `y` (`rows × out`), a band of
/// dequantized rows at a time: the product with the dequantized weight, up to summation order.
pub(super) fn banded_forward_into(
    w: &QuantWeight,
    x: &[f32],
    y: &mut [f32],
    accumulate: bool,
) -> candle_core::Result<()> {
    let (out_dim, in_dim) = w.dims();
    let rows = x.len() / in_dim.max(1);
    if rows == 0 {
        return Ok(());
    }
    let read = w.band_reader();
    let band = band_rows(in_dim);
    let mut buf = vec![0f32; band * in_dim];
    // bf16 products (`bnb_4bit_compute_dtype = bfloat16`): the input rounded once, each band
    // rounded after dequantizing, f32 accumulation.
    let xb = bf16_products(w).then(|| narrow(x));
    for r0 in (0..out_dim).step_by(band) {
        let nb = band.min(out_dim - r0);
        let buf = &mut buf[..nb * in_dim];
        read(r0, buf);
        if let Some(xb) = &xb {
            let wb = narrow(buf);
            matmul_bf16(
                MatMut::new(&mut y[r0..], rows, nb, out_dim)?,
                accumulate,
                MatRef::row_major(xb, rows, in_dim)?,
                MatRef::row_major(&wb, nb, in_dim)?.t(),
                1.0,
                Threads::All,
            )?;
            continue;
        }
        // y[:, r0..r0+nb] (+)= x · bufᵀ
        gemm_into(
            (rows, nb, in_dim),
            &mut y[r0..],
            out_dim,
            x,
            in_dim,
            buf,
            true,
            accumulate,
        );
    }
    Ok(())
}

/// `dx = dy · deq(w)` for `dy` of any leading shape (`[..., out]`), band by band; `dx` has
/// `x`'s shape and dtype.
fn input_grad(w: &QuantWeight, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let in_dim = w.dims().1;
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    // SAFETY: the first band's product overwrites all of `dx` (the others accumulate); with no
    // band there is no row either (`dy` is then empty).
    let mut dx = unsafe { super::buffer::uninit(g.elem_count() / w.dims().0.max(1) * in_dim) };
    with_f32(&g, |gv| input_grad_into(w, gv, &mut dx))??;
    Tensor::from_vec(dx, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// `dx = dy · deq(w)` for row-major `dy` (`rows × out`) into `dx` (`rows × in`).
pub(super) fn input_grad_into(
    w: &QuantWeight,
    gv: &[f32],
    dx: &mut [f32],
) -> candle_core::Result<()> {
    let (out_dim, in_dim) = w.dims();
    let rows = gv.len() / out_dim.max(1);
    if rows == 0 {
        return Ok(());
    }
    let read = w.band_reader();
    let band = band_rows(in_dim);
    let mut buf = vec![0f32; band * in_dim];
    let gb = bf16_products(w).then(|| narrow(gv));
    for (i, r0) in (0..out_dim).step_by(band).enumerate() {
        let nb = band.min(out_dim - r0);
        let buf = &mut buf[..nb * in_dim];
        read(r0, buf);
        if let Some(gb) = &gb {
            let wb = narrow(buf);
            matmul_bf16(
                MatMut::row_major(dx, rows, in_dim)?,
                i > 0,
                MatRef::new(&gb[r0..], rows, nb, out_dim, 1)?,
                MatRef::row_major(&wb, nb, in_dim)?,
                1.0,
                Threads::All,
            )?;
            continue;
        }
        // dx (+)= dy[:, r0..r0+nb] · buf
        gemm_into(
            (rows, in_dim, nb),
            dx,
            in_dim,
            &gv[r0..],
            out_dim,
            buf,
            false,
            i > 0,
        );
    }
    Ok(())
}

/// candle's quantized matmul on GGUF blocks as the forward (the very kernel `QMatMul::forward`
/// runs), with the banded input gradient as the backward.
struct GgmlLinear(GgmlWeight);

impl CustomOp1 for GgmlLinear {
    fn name(&self) -> &'static str {
        "ggml-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.qtensor().cpu_fwd(s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(input_grad(
            &QuantWeight::Ggml(self.0.clone()),
            arg,
            grad,
        )?))
    }
}

fn ggml_linear(
    x: &Tensor,
    w: &GgmlWeight,
    bias: Option<&Tensor>,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let in_dim = w.dims().1;
    // candle's kernel wants a contiguous input of rank 2 or more; the rows are what count.
    let x2 = x.contiguous()?.reshape(((), in_dim))?;
    let mut y = x2.apply_op1(GgmlLinear(w.clone()))?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
    }
    Ok(y.reshape(out_dims)?)
}
