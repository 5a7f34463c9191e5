//! `x · Wᵀ + b + s · (dropout(x) · Aᵀ) · Bᵀ` for a frozen `W` and `b` as one graph node, in f32
//! on the CPU: a linear layer with a low-rank update, forward and backward.
//!
//! Composed from candle ops, a LoRA layer in training is six activation-sized nodes (the
//! reshape, the base product, the dropped input, the update, the sum, the reshape back), and
//! candle's backward clears and adds a gradient the size of the activations for each. Here the
//! update is accumulated into the base product's output by the same gemm (its `alpha` carries
//! `s`), the dropped input is never kept (its mask is redrawn from the seed in backward), and only
//! `dropout(x) · Aᵀ` (`rows × r`) is saved. The backward gives
//!
//! - `dx = dy · W + s · dropout_mask ⊙ ((dy · B) · A)` (the base product's backward, then the
//!   update's, accumulated into the same buffer),
//! - `dA = s · (dy · B)ᵀ · dropout(x)` and `dB = s · dyᵀ · (dropout(x) · Aᵀ)`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::fused::{add_dropout, dropout_data};
use super::gemm::{matmul_f32, MatMut, MatRef, Threads};
use super::linear::{data, Data, FrozenLinear};
use super::saved::Saved;
use crate::quant::QuantWeight;
use crate::Result;

/// A frozen base weight as the op multiplies it.
pub enum BaseWeight<'a> {
    /// `[out, in]`, or `[in, out]` when `transposed`; f32, or bf16 under autocast.
    Dense {
        w: &'a Tensor,
        transposed: bool,
    },
    Quant(&'a QuantWeight),
}

enum Base {
    Dense(FrozenLinear),
    Quant(QuantWeight),
}

impl Base {
    /// `(in, out)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            Base::Dense(l) => l.dims(),
            Base::Quant(q) => (q.dims().1, q.dims().0),
        }
    }

    /// `y (+)= x · Wᵀ`.
    fn forward(&self, x: &[f32], y: &mut [f32], accumulate: bool) -> candle_core::Result<()> {
        match self {
            Base::Dense(l) => l.product(Data::F32(x), false, y, accumulate),
            Base::Quant(q) => super::quant::forward_into(q, x, y, accumulate),
        }
    }

    /// `dx = dy · W`.
    fn backward(&self, g: &[f32], dx: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Base::Dense(l) => l.product(Data::F32(g), true, dx, false),
            Base::Quant(q) => super::quant::input_grad_into(q, g, dx),
        }
    }
}

/// Whether the op multiplies `base` for `x` as the plain layer would: a dense weight in f32 or
/// under autocast, or a quantized one outside candle's GGUF batch kernel.
pub(super) fn applies(x: &Tensor, base: &BaseWeight) -> bool {
    match base {
        BaseWeight::Dense { w, .. } => {
            w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16)
        }
        BaseWeight::Quant(q) => {
            let rows = x.elem_count() / q.dims().1.max(1);
            super::quant::slices_apply(q, rows)
        }
    }
}

/// The node for `x` (`[..., in]`), `a` (`[r, in]`), `b` (`[out, r]`); the caller checked that
/// `x`, `a`, `b` and the bias are f32 on the CPU and [`applies`]. `dropout` is the probability
/// applied to the update's input with its seed (`None` outside training).
pub(super) fn frozen_linear_low_rank(
    x: &Tensor,
    base: BaseWeight,
    bias: Option<&Tensor>,
    (a, b, scaling): (&Tensor, &Tensor, f64),
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    let base = match base {
        BaseWeight::Dense { w, transposed } => {
            Base::Dense(FrozenLinear::new(w.clone(), transposed)?)
        }
        BaseWeight::Quant(q) => Base::Quant(q.clone()),
    };
    let (in_dim, out_dim) = base.dims();
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    let k = *x.dims().last().unwrap_or(&0);
    if k != in_dim || a_in != in_dim || b_out != out_dim || b_r != r {
        return Err(crate::Error::ShapeMismatch {
            name: "low-rank linear (x, A, B)".into(),
            expected: vec![in_dim, r, in_dim, out_dim, r],
            found: vec![k, r, a_in, b_out, b_r],
        });
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    let op = LowRankLinear {
        base,
        bias,
        rank: r,
        scaling: scaling as f32,
        dropout,
        out_shape: Shape::from(out_dims),
        update_input: Saved::empty(),
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

const NAME: &str = "frozen-linear-low-rank";

struct LowRankLinear {
    base: Base,
    bias: Option<Vec<f32>>,
    rank: usize,
    scaling: f32,
    /// `(p, seed)` of the dropout on the update's input.
    dropout: Option<(f64, u64)>,
    out_shape: Shape,
    /// `dropout(x) · Aᵀ` (`rows × r`), kept by the forward for `B`'s gradient.
    update_input: Saved<Vec<f32>>,
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match data(s, l)? {
        Data::F32(v) => Ok(v),
        Data::BF16(_) => candle_core::bail!("low-rank linear: expected f32 data"),
    }
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (f32_data(xs, xl)?, f32_data(as_, al)?, f32_data(bs, bl)?);
        let (in_dim, out_dim) = self.base.dims();
        let rows = x.len() / in_dim.max(1);
        let r = self.rank;
        // SAFETY: every row is the bias (copied below) or written by the base product, which
        // then does not accumulate.
        let mut y: Vec<f32> = unsafe { super::buffer::uninit(rows * out_dim) };
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(out_dim) {
                row.copy_from_slice(bias);
            }
        }
        if rows > 0 {
            self.base.forward(x, &mut y, self.bias.is_some())?;
        }
        let xd = self.dropped(x);
        // SAFETY: the product writes all of `t` (no accumulation).
        let mut t: Vec<f32> = unsafe { super::buffer::uninit(rows * r) };
        matmul_f32(
            MatMut::row_major(&mut t, rows, r)?,
            false,
            MatRef::row_major(&xd, rows, in_dim)?,
            MatRef::row_major(a, r, in_dim)?.t(),
            1.0,
            Threads::All,
        )?;
        matmul_f32(
            MatMut::row_major(&mut y, rows, out_dim)?,
            true,
            MatRef::row_major(&t, rows, r)?,
            MatRef::row_major(b, out_dim, r)?.t(),
            self.scaling,
            Threads::All,
        )?;
        self.update_input.put(NAME, t)?;
        Ok((CpuStorage::F32(y), self.out_shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.update_input
            .with(NAME, |t| self.backward(t, x, a, b, grad))?
    }
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl LowRankLinear {
    /// The update's input: `x`, or `x` through the dropout mask.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.dropout {
            Some((p, seed)) => dropout_data(x, p, seed).into(),
            None => x.into(),
        }
    }

    /// The gradients of `x` (when it is traced), `a` and `b`, given the kept `t`.
    fn backward(
        &self,
        t: &[f32],
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        let (in_dim, out_dim) = self.base.dims();
        let (r, s) = (self.rank, self.scaling);
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(xs), Storage::Cpu(as_), Storage::Cpu(bs)) =
            (&*gs, &*xs, &*as_, &*bs)
        else {
            candle_core::bail!("low-rank linear: tensors not on the CPU")
        };
        let (g, xv, av, bv) = (
            f32_data(gs, gl)?,
            f32_data(xs, xl)?,
            f32_data(as_, al)?,
            f32_data(bs, bl)?,
        );
        let rows = g.len() / out_dim.max(1);
        let g_mat = MatRef::row_major(g, rows, out_dim)?;
        // v = dy · B, `rows × r`.
        // SAFETY: each product below writes its whole output (no accumulation) unless noted.
        let mut v: Vec<f32> = unsafe { super::buffer::uninit(rows * r) };
        matmul_f32(
            MatMut::row_major(&mut v, rows, r)?,
            false,
            g_mat,
            MatRef::row_major(bv, out_dim, r)?,
            1.0,
            Threads::All,
        )?;
        let v_mat = MatRef::row_major(&v, rows, r)?;
        let a_mat = MatRef::row_major(av, r, in_dim)?;
        let dx = if x.track_op() {
            let mut dx: Vec<f32> = unsafe { super::buffer::uninit(rows * in_dim) };
            self.base.backward(g, &mut dx)?;
            match self.dropout {
                None => matmul_f32(
                    MatMut::row_major(&mut dx, rows, in_dim)?,
                    true,
                    v_mat,
                    a_mat,
                    s,
                    Threads::All,
                )?,
                Some((p, seed)) => {
                    let mut u: Vec<f32> = unsafe { super::buffer::uninit(rows * in_dim) };
                    matmul_f32(
                        MatMut::row_major(&mut u, rows, in_dim)?,
                        false,
                        v_mat,
                        a_mat,
                        s,
                        Threads::All,
                    )?;
                    add_dropout(&mut dx, &u, p, seed);
                }
            }
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let mut da: Vec<f32> = unsafe { super::buffer::uninit(r * in_dim) };
        let xd = self.dropped(xv);
        matmul_f32(
            MatMut::row_major(&mut da, r, in_dim)?,
            false,
            v_mat.t(),
            MatRef::row_major(&xd, rows, in_dim)?,
            s,
            Threads::All,
        )?;
        let mut db: Vec<f32> = unsafe { super::buffer::uninit(out_dim * r) };
        matmul_f32(
            MatMut::row_major(&mut db, out_dim, r)?,
            false,
            g_mat.t(),
            MatRef::row_major(t, rows, r)?,
            s,
            Threads::All,
        )?;
        Ok((
            dx,
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}
