//! `x · Wᵀ + b` for a frozen `W` and `b` as one graph node on the CPU, in f32 or bf16.
//!
//! The product runs inside the op, straight into its output with the bias preloaded, over any
//! leading dimensions of `x` (no reshape nodes, no copy into the graph); the backward is
//! `dy · W` for `x` only, since a frozen weight needs no gradient. Both directions go through
//! [`super::gemm`], so bf16 activations and weights use the native bf16 kernel where the CPU
//! has one. In bf16 the products accumulate in f32, the bias is added in f32 and the result is
//! rounded to bf16 once (PyTorch's autocast rounds the product, then adds the bias in bf16).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use half::bf16;

use super::bf16::narrow;
use super::gemm::{matmul_bf16, matmul_f32, MatMut, MatRef, Threads};
use crate::Result;

/// Whether the one-node op serves these tensors: all on the CPU, all f32 or all bf16, or
/// autocast's mix (f32 input and bias, bf16 weight).
pub(crate) fn applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    let weight_ok = ok(w) || (autocast(x, w) && w.device().is_cpu());
    matches!(x.dtype(), DType::F32 | DType::BF16) && ok(x) && weight_ok && bias.is_none_or(ok)
}

/// `torch.autocast`'s bf16 products: an f32 input meets a weight stored in bf16. The input is
/// rounded to bf16 inside the op and the product accumulates in f32; what comes out (and the
/// input's gradient) is f32, so the norms, softmaxes and residual stream around the layer stay
/// in f32 as autocast keeps them.
pub(crate) fn autocast(x: &Tensor, w: &Tensor) -> bool {
    x.dtype() == DType::F32 && w.dtype() == DType::BF16
}

/// `x @ w.T + bias` (`x @ w + bias` when `w` is stored `[in, out]`, `transposed`); the caller
/// checked [`applies`].
pub(crate) fn frozen_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let (d0, d1) = w.dims2()?;
    let (in_dim, out_dim) = if transposed { (d0, d1) } else { (d1, d0) };
    let mut out_dims = x.dims().to_vec();
    if out_dims.last() != Some(&in_dim) {
        return Err(crate::Error::ShapeMismatch {
            name: "input of a linear layer".into(),
            expected: vec![in_dim],
            found: out_dims,
        });
    }
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = FrozenLinear {
        w: w.contiguous()?,
        bias,
        transposed,
        in_dim,
        out_dim,
        out_shape: Shape::from(out_dims),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

pub(super) struct FrozenLinear {
    w: Tensor,
    bias: Option<Vec<f32>>,
    transposed: bool,
    in_dim: usize,
    out_dim: usize,
    out_shape: Shape,
}

/// Contiguous CPU data of one of the two dtypes the op takes.
pub(super) enum Data<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

pub(super) fn data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Data<'a>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(Data::F32(&v[a..b])),
        (CpuStorage::BF16(v), Some((a, b))) => Ok(Data::BF16(&v[a..b])),
        _ => candle_core::bail!("frozen-linear: expected contiguous f32 or bf16 data"),
    }
}

impl FrozenLinear {
    /// The product with `w` (`[out, in]`, or `[in, out]` when `transposed`), for ops that run it
    /// on their own buffers (no bias; no output shape).
    pub(super) fn new(w: Tensor, transposed: bool) -> Result<Self> {
        let (d0, d1) = w.dims2()?;
        let (in_dim, out_dim) = if transposed { (d0, d1) } else { (d1, d0) };
        Ok(Self {
            w: w.contiguous()?,
            bias: None,
            transposed,
            in_dim,
            out_dim,
            out_shape: Shape::from(vec![0, out_dim]),
        })
    }

    /// `(in, out)` of the product.
    pub(super) fn dims(&self) -> (usize, usize) {
        (self.in_dim, self.out_dim)
    }

    /// `lhs (rows × k) · W'` into `dst` (rows × n), where `W'` is `Wᵀ` (forward, `k = in`) or
    /// `W` (backward, `k = out`), read in place through strides.
    pub(super) fn product(
        &self,
        lhs: Data,
        backward: bool,
        dst: &mut [f32],
        accumulate: bool,
    ) -> candle_core::Result<()> {
        let (k, n) = if backward {
            (self.out_dim, self.in_dim)
        } else {
            (self.in_dim, self.out_dim)
        };
        let rows = match &lhs {
            Data::F32(v) => v.len() / k.max(1),
            Data::BF16(v) => v.len() / k.max(1),
        };
        // `W` as stored is `[out, in]`, or `[in, out]` when transposed; the forward wants the
        // `in × out` matrix, the backward the `out × in` one.
        let (r, c) = if self.transposed {
            (self.in_dim, self.out_dim)
        } else {
            (self.out_dim, self.in_dim)
        };
        let flip = backward == self.transposed;
        let dst = MatMut::row_major(dst, rows, n)?;
        let (storage, layout) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*storage else {
            candle_core::bail!("frozen-linear: weight not on the CPU")
        };
        match (lhs, data(ws, layout)?) {
            (Data::F32(x), Data::F32(w)) => {
                let w = MatRef::row_major(w, r, c)?;
                let w = if flip { w.t() } else { w };
                matmul_f32(
                    dst,
                    accumulate,
                    MatRef::row_major(x, rows, k)?,
                    w,
                    1.0,
                    Threads::All,
                )
            }
            (Data::BF16(x), Data::BF16(w)) => {
                let w = MatRef::row_major(w, r, c)?;
                let w = if flip { w.t() } else { w };
                matmul_bf16(
                    dst,
                    accumulate,
                    MatRef::row_major(x, rows, k)?,
                    w,
                    1.0,
                    Threads::All,
                )
            }
            (Data::F32(x), Data::BF16(w)) => {
                // Autocast: the input rounded to bf16 once (a pass over `rows × k`, against the
                // product's `rows × k × n`), then the bf16 kernel.
                let x = narrow(x);
                let w = MatRef::row_major(w, r, c)?;
                let w = if flip { w.t() } else { w };
                matmul_bf16(
                    dst,
                    accumulate,
                    MatRef::row_major(&x, rows, k)?,
                    w,
                    1.0,
                    Threads::All,
                )
            }
            _ => candle_core::bail!("frozen-linear: a bf16 input needs a bf16 weight"),
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let rows = self.out_shape.elem_count() / self.out_dim.max(1);
        // SAFETY: every row is either the bias (copied below) or written by the product, which
        // then does not accumulate.
        let mut y = unsafe { super::buffer::uninit(rows * self.out_dim) };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_dim) {
                row.copy_from_slice(b);
            }
        }
        let is_bf16 = matches!(x, Data::BF16(_));
        self.product(x, false, &mut y, self.bias.is_some())?;
        let out = if is_bf16 {
            CpuStorage::BF16(narrow(&y))
        } else {
            CpuStorage::F32(y)
        };
        Ok((out, self.out_shape.clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let rows = g.elem_count() / self.out_dim.max(1);
        // SAFETY: the product below writes every element (no accumulation).
        let mut dx = unsafe { super::buffer::uninit(rows * self.in_dim) };
        let (storage, layout) = g.storage_and_layout();
        let Storage::Cpu(gs) = &*storage else {
            candle_core::bail!("frozen-linear: gradient not on the CPU")
        };
        self.product(data(gs, layout)?, true, &mut dx, false)?;
        let dx = match x.dtype() {
            DType::BF16 => Tensor::from_vec(narrow(&dx), x.shape(), x.device())?,
            _ => Tensor::from_vec(dx, x.shape(), x.device())?,
        };
        Ok(Some(dx))
    }
}
