//! `x ⊙ s` with one trained factor per column (the last dimension): IA3's vectors, VeRA's
//! `λ_d`/`λ_b`, DoRA's magnitude ratio.
//!
//! candle builds this as a broadcast product, whose backward takes several passes over
//! `x`-sized memory for each input (a broadcast copy, a product, a zero fill and an add, then a
//! reduction for `s`). Here the forward is one pass, and the backward one pass for `∂x = g ⊙ s`
//! and one for `∂s = Σ_rows g ⊙ x`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{fast, simd_fn, with_f32, CHUNK};
use crate::{Error, Result};

/// `x ⊙ s`, `s` broadcast over every dimension of `x` but the last; gradients reach both.
pub fn scale_columns(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let cols = x.dims().last().copied().unwrap_or(1);
    if s.elem_count() != cols {
        return Err(Error::ShapeMismatch {
            name: "column scale".into(),
            expected: vec![cols],
            found: s.dims().to_vec(),
        });
    }
    let s = s.flatten_all()?;
    if fast(x) && fast(&s) {
        return Ok(x.contiguous()?.apply_op2(&s.contiguous()?, ScaleColumns)?);
    }
    Ok(x.broadcast_mul(&s)?)
}

struct ScaleColumns;

simd_fn! {
    fn scale_rows_kernel(x: &[f32], s: &[f32], out: &mut [f32]) {
        for (o, x) in out.chunks_exact_mut(s.len()).zip(x.chunks_exact(s.len())) {
            for ((o, x), s) in o.iter_mut().zip(x).zip(s) {
                *o = x * s;
            }
        }
    }
}

simd_fn! {
    fn column_dot_kernel(g: &[f32], x: &[f32], acc: &mut [f32]) {
        let n = acc.len();
        for (g, x) in g.chunks_exact(n).zip(x.chunks_exact(n)) {
            for ((a, g), x) in acc.iter_mut().zip(g).zip(x) {
                *a += g * x;
            }
        }
    }
}

/// Rows per parallel task: about [`CHUNK`] elements, whole rows.
fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// `x ⊙ s` row by row, in parallel.
fn scaled(x: &[f32], s: &[f32]) -> Vec<f32> {
    let step = rows_per_task(s.len()) * s.len();
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { super::buffer::uninit(x.len()) };
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(o, x)| scale_rows_kernel(x, s, o));
    out
}

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "scale-columns"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(s), Some((x0, x1)), Some((s0, s1))) =
            (xs, ss, xl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("scale-columns: expected contiguous f32 inputs")
        };
        Ok((
            CpuStorage::F32(scaled(&x[x0..x1], &s[s0..s1])),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let cols = s.elem_count();
        let dx = with_f32(g, |gv| with_f32(s, |sv| scaled(gv, sv)))??;
        let step = rows_per_task(cols) * cols;
        let ds = with_f32(g, |gv| {
            with_f32(x, |xv| {
                gv.par_chunks(step)
                    .zip(xv.par_chunks(step))
                    .map(|(g, x)| {
                        let mut acc = vec![0f32; cols];
                        column_dot_kernel(g, x, &mut acc);
                        acc
                    })
                    .reduce(
                        || vec![0f32; cols],
                        |mut a, b| {
                            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                            a
                        },
                    )
            })
        })??;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(ds, s.shape(), s.device())?),
        ))
    }
}
